"""Data-parallel training over torch.distributed (gloo, 2 CPU processes)."""
import json
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

import dist_workers
from knnsolver import distributed
from knnsolver.errors import ConfigError
from knnsolver.search.exact import ExactSearch
from knnsolver.solvers.hal import HALSolver
from knnsolver.solvers.rbf import RBFSolver
from knnsolver.training.checkpoint import load_checkpoint
from knnsolver.training.loop import LossStep
from helpers import results


def test_helpers_are_the_identity_in_one_process():
    t = torch.randn(3, 2)
    assert distributed.all_gather_rows(t) is t and distributed.all_reduce_sum(t) is t
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard(7) == range(7)
    assert distributed.init_from_env("cpu") is False  # no WORLD_SIZE: single process, nothing started


def test_init_from_env_names_the_missing_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="RANK, MASTER_ADDR, MASTER_PORT not set; launch with torchrun"):
        distributed.init_from_env("cpu")


@pytest.mark.parametrize(("n", "size"), [(10, 3), (2, 4), (9, 2)])
def test_shards_partition_the_rows_in_order(monkeypatch, n, size):
    shards = []
    for r in range(size):
        monkeypatch.setattr(distributed, "world_size", lambda: size)
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shards.append(list(distributed.shard(n)))
    assert sum(shards, []) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_collectives_across_two_processes(tmp_path):
    results = dist_workers.spawn(dist_workers.gather_and_shard, tmp_path, 5)
    expected = torch.cat([torch.zeros(1, 3), torch.ones(2, 3)])  # rank 0 sent 1 row of 0s, rank 1 2 rows of 1s
    for r, res in enumerate(results):
        assert (res["rank"], res["size"]) == (r, 2)
        assert torch.equal(res["gathered"], expected)
        assert res["sum"].item() == 3.0
        assert res["broadcast"] == "from 0"
    assert results[0]["shard"] + results[1]["shard"] == [0, 1, 2, 3, 4]


def test_sharded_bank_graph_equals_the_single_process_graph(tmp_path):
    points = torch.randn(101, 8, generator=torch.Generator().manual_seed(3))  # odd: unequal shards
    single = ExactSearch().knn_graph(points, 7)
    for graph in dist_workers.spawn(dist_workers.bank_graph, tmp_path, points, 7):
        assert graph.dtype == torch.int32 and torch.equal(graph, single)


def _make_rbf():
    torch.manual_seed(0)
    return torch.nn.Linear(6, 4), RBFSolver(4, 3, 16, k=5, sigma=1.0, learn_weights=True, online_update=True)


def _make_hal():
    torch.manual_seed(0)
    return torch.nn.Linear(6, 4), HALSolver(4, 3)


def _fill(x, y, model, solver):
    if isinstance(solver, RBFSolver):
        with torch.no_grad():  # centres off the current embeddings, so the online update changes them
            solver.refresh(model(x) + 1.0, y)


@pytest.mark.parametrize("make", [_make_rbf, _make_hal], ids=["rbf", "hal"])
def test_two_process_step_equals_one_step_on_the_whole_batch(tmp_path, make):
    """DDP over 2 halves of a batch == one process on the whole batch (per-row mean losses):
    network, solver parameters (RBF weights, HAL anchors) and the online-updated RBF bank."""
    g = torch.Generator().manual_seed(1)
    x, y, rows = torch.randn(16, 6, generator=g), torch.arange(3).repeat(6)[:16], torch.arange(16)
    fill = partial(_fill, x, y)
    results = dist_workers.spawn(dist_workers.one_step, tmp_path, make, x, y, rows, fill)

    model, solver = make()
    fill(model, solver)
    opt = torch.optim.SGD([*model.parameters(), *solver.parameters()], lr=0.5)
    loss, _ = LossStep(model, solver)(x, y, rows)
    opt.zero_grad()
    loss.backward()
    opt.step()
    before = make()[0].state_dict()
    assert not torch.equal(model.state_dict()["weight"], before["weight"])  # the step moved the network
    for res in results:
        for key, value in model.state_dict().items():
            torch.testing.assert_close(res["model"][key], value)
        for key, value in solver.state_dict().items():
            torch.testing.assert_close(res["solver"][key], value)


def _config(tmp_path, **kw):
    cfg = dict(dataset="digits", solver="rbf", epochs=2, out=str(tmp_path / "run"), embedding_dim=16, batch_size=32,
               progress=False, plots=False, solver_options={"k": 20, "update_interval": 1, "online_update": True})
    cfg.update(kw)
    return cfg


def test_distributed_training_run(tmp_path):
    results = dist_workers.spawn(dist_workers.train_run, tmp_path, _config(tmp_path))
    summaries = [r["summary"] for r in results]
    assert summaries[0] == summaries[1]  # every process returns rank 0's summary
    assert summaries[0]["test_accuracy"] >= 0.6  # 10 classes: chance is 0.1
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    for key, value in best["model"].items():  # every process ends with the best weights, BatchNorm buffers included
        assert torch.equal(results[0]["model"][key], value) and torch.equal(results[1]["model"][key], value), key
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(0 < r["solver_frac_true_class_absent"] + r["solver_mean_rbf_value"] and "val_accuracy" in r for r in log)
    assert not list(tmp_path.glob("run/.*.tmp"))


def test_training_frees_its_ddp_wrappers_before_the_group_ends(tmp_path):
    """The wrappers sit in reference cycles; left to the collector they could be freed at exit, after the
    group is destroyed, where a rank aborted now and then (the torchrun CLI test failed about 1 run in 10)."""
    config = dict(dataset="digits", solver="hal", epochs=1, out=str(tmp_path / "run"), progress=False, plots=False)
    assert dist_workers.spawn(dist_workers.ddp_left_after_train, tmp_path, config) == [0, 0]


def test_refused_run_folder_stops_every_process(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    results = dist_workers.spawn(dist_workers.train_run, tmp_path, _config(tmp_path))
    for res in results:
        assert res["error"].startswith("ConfigError: ") and "already holds a run" in res["error"]


def test_processes_with_different_settings_are_refused(tmp_path):
    results = dist_workers.spawn(dist_workers.train_run, tmp_path, _config(tmp_path), False, False, {1: {"epochs": 3}})
    for res in results:
        assert res["error"] == ("ConfigError: the processes were launched with different settings; "
                                "give every process the same flags")
    assert not (tmp_path / "run").exists()


def test_processes_that_loaded_different_data_are_refused(tmp_path):
    """The data folder may differ between machines, so the flags' check left it out; nothing compared the data
    (labels shuffled on one process trained silently; fewer rows aborted in gloo)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    np.savez(tmp_path / "same.npz", x=x, y=y)
    np.savez(tmp_path / "shuffled.npz", x=x, y=np.random.default_rng(0).permutation(y))
    np.savez(tmp_path / "fewer.npz", x=x[:1200], y=y[:1200])
    for other in ("shuffled", "fewer"):
        cfg = _config(tmp_path, dataset="embeddings", data_dir=str(tmp_path / "same.npz"), solver="hal",
                      solver_options={}, out=str(tmp_path / other))
        results = dist_workers.spawn(dist_workers.train_run, tmp_path, cfg, False, False,
                                     {1: {"data_dir": str(tmp_path / f"{other}.npz")}})
        for rank, res in enumerate(results):
            assert res["error"].startswith("ConfigError: the processes loaded different data: rank 0 has rows train "), res
            assert ("this process (rank 1) has rows" in res["error"]) == (rank == 1)
        assert not (tmp_path / other / "config.json").exists()


def test_the_same_images_at_another_path_are_the_same_data(tmp_path):
    """Another machine's copy of an image folder (another path, other modification times) was refused as other
    data: the check compared the image files' absolute paths and times."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for j in range(12):
            pixels = rng.integers(0, 60, (8, 8)).astype(np.uint8)
            pixels[c * 2 : c * 2 + 3] = 230
            Image.fromarray(pixels).save(tmp_path / "imgs" / f"c{c}" / f"{j}.png")
    shutil.copytree(tmp_path / "imgs", tmp_path / "copy", copy_function=shutil.copyfile)  # new times
    cfg = _config(tmp_path, dataset="image-folder", data_dir=str(tmp_path / "imgs"), solver="hal", solver_options={},
                  epochs=1, batch_size=8)
    results = dist_workers.spawn(dist_workers.train_run, tmp_path, cfg, False, False,
                                 {1: {"data_dir": str(tmp_path / "copy")}})
    assert all("summary" in res for res in results), results


def test_a_resume_on_another_number_of_processes_is_refused(tmp_path):
    """batch_size is per process, so another process count changes the run's batches; it was accepted silently."""
    from knnsolver.training import TrainConfig, train
    from knnsolver.training.checkpoint import save_checkpoint

    cfg = dict(dataset="digits", solver="hal", epochs=1, width=4, embedding_dim=8, max_per_class=30,
               out=str(tmp_path / "run"), progress=False, plots=False)
    assert train(TrainConfig(**cfg))["world_size"] == 1
    from knnsolver.training import evaluate_saved

    assert "world_size" not in evaluate_saved(tmp_path / "run")  # eval runs on 1 process: not the training's count
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["world_size"] == 1
    save_checkpoint({**state, "world_size": 2}, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ConfigError, match=r"it was trained on 2 process\(es\) and this launch has 1"):
        train(TrainConfig(**{**cfg, "epochs": 2}), resume=True)


def test_an_interrupt_is_reported_by_rank_0_alone(tmp_path, monkeypatch, capsys):
    """Every rank printed what it saw saved; another machine's rank, without the folder, said nothing was saved."""
    from knnsolver.cli.main import main
    from knnsolver.training import TrainConfig, loop, train

    monkeypatch.setattr(loop, "train_epoch", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    config = TrainConfig(dataset="digits", solver="hal", epochs=1, width=4, embedding_dim=8, max_per_class=30,
                         out=str(tmp_path / "run"), progress=False, plots=False)
    with pytest.raises(KeyboardInterrupt) as caught:
        train(config)
    assert str(caught.value) == ""
    monkeypatch.setattr("knnsolver.cli.main.launch_rank", lambda: 1)
    assert main(["train", "--dataset", "digits", "--solver", "hal", "--epochs", "1", "--out", str(tmp_path / "b"),
                 "--progress", "false", "--plots", "false"]) == 130
    assert "interrupted" not in capsys.readouterr().err


def test_one_named_gpu_is_refused_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    with pytest.raises(ConfigError, match="device 'cuda:0' names one GPU; under torchrun use --device cuda"):
        distributed.init_from_env("cuda:0")
    assert distributed.launch_rank() == 1
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.launch_rank() == 0  # a stray RANK without a multi-process launch


@pytest.mark.slow
def test_distributed_resume_equals_uninterrupted(tmp_path):
    # A constant rate: a shorter first run stands in for an interrupted one (a cosine schedule follows epochs).
    constant = dict(lr_schedule="constant")
    full = dist_workers.spawn(dist_workers.train_run, tmp_path, _config(tmp_path, out=str(tmp_path / "full"), **constant))
    dist_workers.spawn(dist_workers.train_run, tmp_path, _config(tmp_path, out=str(tmp_path / "part"), epochs=1,
                                                                  **constant))
    resumed = dist_workers.spawn(dist_workers.train_run, tmp_path, _config(tmp_path, out=str(tmp_path / "part"),
                                                                           **constant), True)
    assert results(resumed[0]["summary"]) == results(full[0]["summary"])
    for key, value in full[0]["model"].items():
        assert torch.equal(resumed[0]["model"][key], value) and torch.equal(resumed[1]["model"][key], value), key


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_torchrun_cli(tmp_path):
    """The README's launch line: torchrun starts 2 processes of the knnsolver CLI."""
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "torchrun"), "--nproc-per-node", "2", "--master-port", str(dist_workers.free_port()),
           "--no-python", str(bin_dir / "knnsolver"), "train", "--dataset", "digits", "--solver", "hal",
           "--epochs", "2", "--out", str(tmp_path / "run"), "--progress", "false", "--plots", "false"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": str(bin_dir)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run written to") == 1  # rank 0 alone reports
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["solver"] == "hal" and summary["test_accuracy"] >= 0.8
