"""``Solver.compile_loss``: the compiled training maths equals the eager maths and captures as one graph.

``fullgraph=True`` fails on any graph break, so these tests also show that the
compiled loss maths (each solver's ``_step``; CRC is not compiled) has no host
synchronisation and no Python branching on tensor values (the RBF hard case
included). What runs around it in ``forward`` (neighbour lookup, online
updates) is checked by ``tests/test_host_sync.py``. The fast tests trace with
the ``aot_eager`` backend (no code generation); the slow one runs inductor.
"""
from __future__ import annotations

import pytest
import torch

from knnsolver.registry import SOLVERS
from knnsolver.training import TrainConfig, train

N, D, C, B = 300, 8, 6, 24
CASES = [
    ("softmax", {}),
    ("hal", {}),
    ("rbf", {"k": 15}),
    ("rbf", {"k": 15, "learn_sigma": True, "normalize": False}),
    ("crc", {}),
]


def _pair(name: str, options: dict):
    torch.manual_seed(0)
    eager = SOLVERS.build(name, embedding_dim=D, num_classes=C, num_train=N, **options)
    compiled = SOLVERS.build(name, embedding_dim=D, num_classes=C, num_train=N, **options)
    compiled.load_state_dict(eager.state_dict())
    labels = torch.arange(N) % C
    if name == "rbf":
        bank = torch.randn(N, D)
        eager.refresh(bank, labels)
        compiled.refresh(bank, labels)
    return eager, compiled, labels


def _steps(eager, compiled, labels) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        rows = torch.randperm(N, generator=g)[:B]
        x = torch.randn(B, D, generator=g) * 2
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        le, lc = eager(xe, labels[rows], rows), compiled(xc, labels[rows], rows)
        le.backward()
        lc.backward()
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-6)
    for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
        if pe.grad is not None:
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.filterwarnings("ignore::knnsolver.errors.TrainingWarning")  # random banks are "stale"
@pytest.mark.parametrize("name,options", CASES)
def test_compiled_loss_equals_eager_as_one_graph(name: str, options: dict) -> None:
    eager, compiled, labels = _pair(name, options)
    done = compiled.compile_loss(backend="aot_eager", fullgraph=True)
    assert done == (name != "crc")  # CRC keeps its eager maths
    _steps(eager, compiled, labels)
    if name == "rbf":  # the diagnostics come out of the compiled step too, hard cases included
        got, want = compiled.on_epoch_end(None), eager.on_epoch_end(None)
        assert got.keys() == want.keys() and want["frac_true_class_absent"] > 0
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-5), key


@pytest.mark.slow
@pytest.mark.parametrize("name,options", CASES[:3])
def test_inductor_compiled_loss_equals_eager(name: str, options: dict) -> None:
    eager, compiled, labels = _pair(name, options)
    assert compiled.compile_loss(fullgraph=True)
    _steps(eager, compiled, labels)


@pytest.mark.parametrize("device,compiled", [("cpu", 1), ("meta", 2)])
def test_compile_flag_compiles_the_solver_maths_on_accelerators_only(tmp_path, monkeypatch, device, compiled) -> None:
    """``--compile`` compiles the network; the solver's maths only off the CPU (measured slower there)."""
    from types import SimpleNamespace

    from knnsolver.training import loop

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(fn) or fn)
    solver = SOLVERS.build("hal", embedding_dim=D, num_classes=C)
    run = SimpleNamespace(model=torch.nn.Linear(4, D), solver=solver, device=torch.device(device),
                          config=TrainConfig(compile=True))
    loop.loss_step(run)
    assert len(seen) == compiled and seen[0] is run.model
    assert compiled == 1 or getattr(seen[1], "__name__", "") == "hal_loss"


def test_train_with_compile(tmp_path, monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(fn) or fn)
    summary = train(TrainConfig(dataset="digits", solver="hal", epochs=1, out=str(tmp_path), plots=False,
                                progress=False, compile=True, max_per_class=20))
    assert len(seen) == 1 and summary["test_accuracy"] > 0.2


@pytest.mark.parametrize("mode, expected", [("default", {}), ("reduce-overhead", {"mode": "reduce-overhead"})])
def test_compile_mode_reaches_torch_compile_for_the_network(monkeypatch, mode, expected) -> None:
    """``reduce-overhead``: the network's forward and backward as CUDA graphs on a GPU (PyTorch's cudagraph trees)."""
    from types import SimpleNamespace

    from knnsolver.training import loop

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    run = SimpleNamespace(model=torch.nn.Linear(4, D), solver=SOLVERS.build("softmax", embedding_dim=D, num_classes=C),
                          device=torch.device("cpu"), config=TrainConfig(compile=True, compile_mode=mode).validate())
    loop.loss_step(run)
    assert seen == [expected]


def test_compile_mode_is_checked_and_turns_compile_on() -> None:
    from knnsolver.errors import ConfigError

    assert TrainConfig(compile_mode="reduce-overhead").validate().compile
    assert not TrainConfig().validate().compile
    with pytest.raises(ConfigError, match="compile_mode"):
        TrainConfig(compile=True, compile_mode="fast").validate()
