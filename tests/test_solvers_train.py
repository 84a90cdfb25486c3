"""Every HAL / DML-CRC / centralized / pml solver through the real trainer on digits (about 50 s in all)."""
import json

import pytest

from knnsolver.training import TrainConfig, train

# (solver, options): (standard-split test accuracy floor, disjoint-split recall@1 floor).
# Measured with these settings (seed 0, 4 epochs): accuracy 0.93-0.975, recall@1 0.71-0.95;
# each floor is the measured value less about 0.06.
FLOORS = {
    ("hal", ()): (0.90, 0.75),
    ("crc", ()): (0.91, 0.88),
    ("crc", (("dictionary", "bank"),)): (0.90, 0.81),
    ("centralized", ()): (0.90, 0.76),
    ("triplet", ()): (0.88, 0.67),
    ("lifted", ()): (0.89, 0.67),
    ("npairs", ()): (0.87, 0.65),
    ("nca", ()): (0.90, 0.84),
    ("proxynca", ()): (0.90, 0.75),
    ("normsoftmax", ()): (0.90, 0.76),
    ("multisimilarity", ()): (0.91, 0.82),
    ("proxyanchor", ()): (0.90, 0.78),
}


@pytest.mark.slow
@pytest.mark.parametrize("split", ["standard", "disjoint"])
@pytest.mark.parametrize(("solver", "options"), list(FLOORS))
def test_solver_trains_on_digits(tmp_path, solver, options, split):
    config = TrainConfig(
        dataset="digits", solver=solver, solver_options=dict(options), split=split, epochs=4, seed=0, out=str(tmp_path),
        model="mlp", width=64, embedding_dim=32, batch_size=32, samples_per_class=8, plots=False, progress=False,
    )
    summary = train(config)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    accuracy_floor, recall_floor = FLOORS[solver, options]
    if split == "standard":
        assert summary["test_accuracy"] >= accuracy_floor
    else:
        assert summary["recall_at_1"] >= recall_floor
        assert 0 < summary["nmi"] <= 1
