"""In-memory batches gathered on the device equal the DataLoader's, random stream included."""
import numpy as np
import torch
from torch.utils.data import DataLoader

from knnsolver.data import build_data
from knnsolver.data.batches import device_rows, iterate_batches, sequential_plan
from knnsolver.data.datasets import RowDataset, TensorPool


def test_device_batches_equal_the_dataloader_and_keep_the_random_stream():
    data = build_data("digits", seed=0)
    assert device_rows(data.train, torch.device("cpu")) is not None
    plan = [[5, 1, 9], [0, 2], list(range(100, 164))]
    torch.manual_seed(3)
    fast = list(iterate_batches(data.train, plan, torch.device("cpu")))
    after_fast = torch.rand(3)
    torch.manual_seed(3)
    slow = list(DataLoader(data.train, batch_sampler=plan))
    after_slow = torch.rand(3)
    assert torch.equal(after_fast, after_slow)
    for (xf, yf, rf), (xs, ys, rs) in zip(fast, slow, strict=True):
        assert torch.equal(xf, xs) and xf.dtype == torch.float32
        assert torch.equal(yf, ys) and torch.equal(rf, torch.as_tensor(rs))


def test_uint8_pool_is_scaled_like_get_and_transforms_use_a_dataloader():
    pixels = torch.randint(0, 256, (20, 1, 4, 4), dtype=torch.uint8)
    dataset = RowDataset(TensorPool(pixels, scale=1 / 255), np.arange(3, 13), np.arange(10) % 2)
    (x, y, rows), = iterate_batches(dataset, [list(range(10))], torch.device("cpu"))
    assert torch.equal(x, torch.stack([dataset[i][0] for i in range(10)]))
    assert device_rows(dataset, torch.device("cpu")).inputs.dtype == torch.uint8  # stored compactly
    flipped = RowDataset(dataset.pool, dataset.rows, dataset.labels.numpy(), transform=lambda t: t.flip(-1))
    assert device_rows(flipped, torch.device("cpu")) is None
    (xt, _, _), = iterate_batches(flipped, [list(range(10))], torch.device("cpu"))
    assert torch.equal(xt, x.flip(-1))
    assert sequential_plan(range(5), 2) == [[0, 1], [2, 3], [4]]


def test_the_run_says_how_batches_are_loaded_and_how_to_decode_in_workers(tmp_path):
    from knnsolver.training import TrainConfig
    from knnsolver.training.run import build_run, describe_run

    def device_line(**options) -> str:
        config = TrainConfig(dataset="digits", device="cpu", progress=False, out=str(tmp_path / "run"), **options)
        return next(line for line in describe_run(build_run(config)) if line.startswith("device:"))

    assert device_line().endswith("batches gathered on the device")
    assert device_line(augment="crop").endswith("loading in the main process (--num-workers N decodes in N worker processes)")
    assert device_line(augment="crop", num_workers=2).endswith("2 loader workers")
