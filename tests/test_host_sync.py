"""No host reads per training step on the accelerator paths, checked on the CPU (issue 12).

A host read of a device value (``.item()``, ``bool(t)``, a boolean-mask
selection, ``unique``, ``bincount``, ``nonzero``, ``one_hot``'s range check)
stalls a GPU's queue. :func:`knnsolver.hostsync.accelerator_paths` makes the CPU
take the paths a GPU takes, and :class:`HostReads` records every operator that
needs such a read as it is dispatched, so these tests fail on any machine when a
solver's step or the trainer's loop reads the device.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from knnsolver.functional.centralized import gram_schmidt
from knnsolver.hostsync import accelerator_paths, avoid_host_sync
from knnsolver.interfaces import EpochContext
from knnsolver.registry import SOLVERS

# Operators whose output (or size) the host must know before it can go on (``_linalg_check_errors``: the
# raising linalg functions, which read the factorisation's status).
_READS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::masked_select", "aten::_unique2",
          "aten::unique_dim", "aten::unique_consecutive", "aten::bincount", "aten::equal", "aten::_linalg_check_errors"}
# Tensor methods that copy to the host without an operator on a CPU tensor.
_COPIES = ("tolist", "numpy", "cpu")


class HostReads(TorchDispatchMode):
    """Records what reads device values on the host inside it: operators as they are dispatched, and the
    tensor methods that copy to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self._plain = {name: getattr(torch.Tensor, name) for name in _COPIES}

    def __enter__(self):
        mode = super().__enter__()
        self._own = {name for name in _COPIES if name in vars(torch.Tensor)}  # the rest are inherited
        for name, method in self._plain.items():
            def watched(tensor, *args, _name=name, _method=method, **kwargs):
                self.seen.append(f"Tensor.{_name}")
                return _method(tensor, *args, **kwargs)
            setattr(torch.Tensor, name, watched)
        return mode

    def __exit__(self, *exc):
        for name, method in self._plain.items():
            if name in self._own:
                setattr(torch.Tensor, name, method)
            else:
                delattr(torch.Tensor, name)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        masks = name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_") and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if name in _READS:
            self.seen.append(name)
        elif masks:
            self.seen.append(f"{name} with a boolean mask")
        elif name == "aten::repeat_interleave" and len(args) == 1 and kwargs.get("output_size") is None:
            self.seen.append(name)
        return func(*args, **kwargs)


def test_the_detector_sees_each_kind_of_host_read():
    t = torch.randn(6)
    u = t.clone()
    reads = [lambda: t.sum().item(), lambda: bool(t.sum() > 0), lambda: t[t > 0], lambda: torch.unique(t),
             lambda: torch.bincount(torch.tensor([1, 2])), lambda: (t > 0).nonzero(),
             lambda: F.one_hot(torch.tensor([0, 2]), 3), lambda: torch.repeat_interleave(torch.tensor([1, 2])),
             lambda: u.__setitem__(u > 0, 0.0), lambda: t.tolist(), lambda: t.numpy(), lambda: t.cpu(),
             lambda: torch.linalg.cholesky(torch.eye(2))]
    for read in reads:
        with HostReads() as reads_seen:
            read()
        assert reads_seen.seen, read
    with HostReads() as quiet:
        (t * 2).exp().sum()
        t.index_select(0, torch.tensor([0, 3]))
    assert quiet.seen == []


def test_accelerator_paths_is_scoped():
    cpu = torch.device("cpu")
    assert not avoid_host_sync(cpu)
    with accelerator_paths():
        assert avoid_host_sync(cpu)
        with accelerator_paths():
            assert avoid_host_sync(cpu)
        assert avoid_host_sync(cpu)
    assert not avoid_host_sync(cpu) and avoid_host_sync(torch.device("meta"))


N, D, C, B = 120, 8, 6, 24
# The library's own solvers. The pytorch-metric-learning baselines (triplet, lifted, npairs, nca, proxynca,
# multisimilarity, proxyanchor) select their pairs with nonzero and boolean masks inside that library.
CASES = [
    ("softmax", {}),
    ("hal", {}),
    ("rbf", {"k": 10}),
    ("rbf", {"k": 10, "neighbour_mode": "fresh", "search": "exact"}),
    ("rbf", {"k": 10, "online_update": True}),
    ("rbf", {"k": 10, "learn_sigma": True, "normalize": False}),
    ("crc", {}),
    ("crc", {"solve": "direct"}),
    ("crc", {"dictionary": "bank"}),
    ("centralized", {"decorrelate_every": 1}),
    ("normsoftmax", {}),
]


@pytest.mark.parametrize("name,options", CASES)
def test_a_training_step_reads_nothing_on_the_host(name, options):
    """Forward and backward of each solver's training step, after its epoch start (a refresh may read)."""
    torch.manual_seed(0)
    solver = SOLVERS.build(name, embedding_dim=D, num_classes=C, num_train=N, **options)
    labels, emb = torch.arange(N) % C, torch.randn(N, D)
    solver.train()
    g = torch.Generator().manual_seed(1)

    def step() -> None:
        rows = torch.randperm(N, generator=g)[:B]
        x = torch.randn(B, D, generator=g, requires_grad=True)
        solver(x, labels[rows], rows).backward()

    with accelerator_paths():
        solver.on_epoch_start(EpochContext(epoch=0, embed_train=lambda: (emb, labels), num_train=N))  # GPU-path index
        step()  # the first step after a refresh checks the batch's row indices once
        with HostReads() as reads:
            for _ in range(3):
                step()
    assert reads.seen == []


def test_the_trainer_reads_the_device_once_per_window_of_steps(tmp_path, monkeypatch):
    """An epoch of about 90 steps on the accelerator paths: the loss and the non-finite flags are read every
    32 steps, not at each (each read costs a few scalar reads: the check and the progress line)."""
    from knnsolver.training import TrainConfig, batch_plan, loop, train

    counts: list[tuple[int, int]] = []
    plain = loop.train_epoch

    def watched(run, step, optimizer, scaler, epoch, ctx, history):
        with HostReads() as reads:
            row = plain(run, step, optimizer, scaler, epoch, ctx, history)
        counts.append((len(batch_plan.process_batches(run, epoch)), len(reads.seen)))
        return row

    monkeypatch.setattr(loop, "train_epoch", watched)
    config = TrainConfig(dataset="digits", solver="softmax", epochs=1, batch_size=16, device="cpu",
                         out=str(tmp_path / "run"), progress=False, seed=0)
    with accelerator_paths():
        train(config)
    (steps, seen), = counts
    windows = math.ceil(steps / loop._GPU_READ_EVERY)
    assert steps >= 64 and windows <= 3 and seen <= 4 * windows + 4


def test_gram_schmidt_equals_the_classical_loop_and_checks_dependence_where_the_host_may_read():
    g = torch.Generator().manual_seed(3)
    v = torch.randn(5, 7, generator=g, dtype=torch.float64)
    rows: list[torch.Tensor] = []  # classical Gram-Schmidt, an independent oracle
    for i in range(5):
        u = v[i] - sum(((q @ v[i]) * q for q in rows), torch.zeros(7, dtype=torch.float64))
        rows.append(u / u.norm())
    torch.testing.assert_close(gram_schmidt(v), torch.stack(rows), rtol=0, atol=1e-12)
    v[3] = v[0] + v[1]
    with pytest.raises(ValueError, match="row 3 is linearly dependent"):
        gram_schmidt(v)
    half = gram_schmidt(v[:3].half())  # computed in float32, returned in the input's dtype (QR takes no halves)
    assert half.dtype == torch.float16
    wide = torch.randn(4, 1024, generator=g)  # float16's eps x d >= 1: a threshold in its precision refused row 0
    assert gram_schmidt(wide.half()).shape == gram_schmidt(wide.bfloat16()).shape == (4, 1024)
    torch.testing.assert_close(half.float(), torch.stack(rows[:3]).float(), rtol=0, atol=2e-3)
    with accelerator_paths(), HostReads() as reads:
        q = gram_schmidt(v)
    assert reads.seen == [] and torch.isfinite(q).all()
