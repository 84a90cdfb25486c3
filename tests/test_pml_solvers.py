import pytest
from pytorch_metric_learning import losses, miners

from knnsolver.errors import ConfigError
from knnsolver.registry import SOLVERS, options_of
from knnsolver.solvers.pml import PMLSolver
from helpers import train_in_plain_loop

# name -> (key options with their types, uses the class-balanced sampler, owns proxies)
PML = {
    "triplet": ({"margin": float}, True, False),
    "lifted": ({"neg_margin": float}, True, False),
    "npairs": ({"embedding_reg": float}, True, False),
    "nca": ({"softmax_scale": float}, True, False),
    "proxynca": ({"softmax_scale": float}, False, True),
    "normsoftmax": ({"temperature": float}, False, True),
    "multisimilarity": ({"alpha": float, "beta": float, "base": float, "epsilon": float}, True, False),
    "proxyanchor": ({"margin": float, "alpha": float}, False, True),
}


@pytest.mark.parametrize("name", PML)
def test_solver_shape_options_and_flags(name):
    options, balanced, has_proxies = PML[name]
    cls = SOLVERS.get(name)
    assert issubclass(cls, PMLSolver) and cls.__mro__[1] is PMLSolver
    assert {o.name: o.type for o in options_of(cls, skip=("num_train",))} == {**options, "knn_k": int}
    solver = SOLVERS.build(name, embedding_dim=8, num_classes=5)
    assert solver.needs_balanced_sampler is balanced and solver.predicts_by_knn
    loss_params = list(solver.loss.parameters())
    assert bool(loss_params) is has_proxies
    assert {id(p) for p in loss_params} <= {id(p) for p in solver.parameters()}  # the optimiser sees the proxies


def test_triplet_uses_semihard_mining():
    solver = SOLVERS.build("triplet", embedding_dim=4, num_classes=2, margin=0.3)
    assert isinstance(solver.miner, miners.TripletMarginMiner) and solver.miner.type_of_triplets == "semihard"
    assert isinstance(solver.loss, losses.TripletMarginLoss) and solver.loss.margin == 0.3 == solver.miner.margin


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("triplet", {"margin": 0.0}, "triplet margin must be > 0"),
        ("lifted", {"neg_margin": -1.0}, "lifted neg_margin must be > 0"),
        ("npairs", {"embedding_reg": -0.1}, "npairs embedding_reg must be >= 0"),
        ("nca", {"softmax_scale": 0.0}, "nca softmax_scale must be > 0"),
        ("proxynca", {"softmax_scale": -2.0}, "proxynca softmax_scale must be > 0"),
        ("normsoftmax", {"temperature": 0.0}, "normsoftmax temperature must be > 0"),
        ("multisimilarity", {"beta": 0.0}, "multisimilarity beta must be > 0"),
        ("proxyanchor", {"alpha": -1.0}, "proxyanchor alpha must be > 0"),
        ("nca", {"knn_k": 0}, "knn_k must be >= 1"),
    ],
)
def test_invalid_settings(name, options, message):
    with pytest.raises(ConfigError, match=message):
        SOLVERS.build(name, embedding_dim=8, num_classes=3, **options)


@pytest.mark.parametrize("name", PML)
def test_user_loop_lowers_loss_and_predicts(name):
    _, losses, accuracy = train_in_plain_loop(lambda: SOLVERS.build(name, embedding_dim=8, num_classes=4))
    assert losses[-1] < 0.8 * losses[0]
    assert accuracy >= 0.75
