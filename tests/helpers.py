"""Small data helpers shared by the solver tests."""
from collections.abc import Callable

import torch


def blobs(seed: int, per_class: int, num_classes: int = 4, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around fixed class means (the means do not depend on ``seed``)."""
    means = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123))
    y = torch.arange(num_classes).repeat_interleave(per_class)
    return means[y] + torch.randn(len(y), dim, generator=torch.Generator().manual_seed(seed)), y



def train_in_plain_loop(make_solver: Callable[[], torch.nn.Module], steps: int = 20,
                        on_step: Callable | None = None) -> tuple[torch.nn.Module, list[float], float]:
    """Train a linear net (16 -> 8) plus a solver on 4 blobs with Adam, as a user's own loop would.

    ``make_solver()`` builds the solver after the seed is set (8-d embeddings, 4 classes);
    ``on_step(step, solver, net, x, y)`` runs before each step (e.g. a solver's ``on_epoch_start``).
    Returns the solver, the loss per step and the test accuracy of ``solver.predict``
    after ``fit_reference`` on the training embeddings.
    """
    torch.manual_seed(0)
    x, y = blobs(0, 8)
    xt, yt = blobs(1, 50)
    net, solver = torch.nn.Linear(16, 8), make_solver()
    opt = torch.optim.Adam([*net.parameters(), *solver.parameters()], lr=0.01)
    losses = []
    for step in range(steps):
        if on_step is not None:
            on_step(step, solver, net, x, y)
        loss = solver(net(x), y, torch.arange(len(y)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        solver.fit_reference(net(x), y)
        scores = solver.predict(net(xt))
    assert scores.shape == (len(xt), 4)
    return solver, losses, (scores.argmax(1) == yt).float().mean().item()


def train_interrupted(config, stop_after: int) -> None:
    """Run ``train(config)`` and stop it, as Ctrl-C would, once epoch ``stop_after`` has been saved.

    Resuming the same config must then end as an uninterrupted run does (a
    shorter ``epochs`` would not do: the cosine schedule depends on ``epochs``).
    """
    import pytest

    from knnsolver.training import loop, trainer

    original = loop.end_epoch

    def end_epoch(run, optimizer, scaler, epoch, *args):
        result = original(run, optimizer, scaler, epoch, *args)
        if epoch + 1 == stop_after:
            raise KeyboardInterrupt
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "end_epoch", end_epoch)
        with pytest.raises(KeyboardInterrupt):
            trainer.train(config)


def results(summary: dict) -> dict:
    """A run's summary without its timing (wall and phase seconds differ between any two runs)."""
    return {k: v for k, v in summary.items() if k != "timing"}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``knnsolver ARGV`` in-process: exit code, stdout, stderr; no traceback may be printed."""
    from knnsolver.cli.main import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def one_line_error(code: int, err: str, *fragments: str) -> None:
    """Exit code 2 and exactly one ``knnsolver: error:`` line holding every fragment (progress lines and
    warnings may come before it)."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("knnsolver: ")
             and not line.startswith("knnsolver: warning")]
    assert len(lines) == 1 and lines[0].startswith("knnsolver: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
