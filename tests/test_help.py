"""Issue 13: the command line explains itself. Every training flag and every solver and search-backend option has
a one-line help from one source (the docstrings), names its choices, and says what a sentinel means."""
import pytest

from knnsolver.cli.main import _train_parser, main, train_options
from knnsolver.docstrings import entries, one_line
from knnsolver.errors import ConfigError
from knnsolver.registry import SEARCHES, SOLVERS, options_of
from knnsolver.solvers.rbf import RBFSolver
from knnsolver.training import TrainConfig

COMMON = ("embedding_dim", "num_classes", "num_train")
# Training settings that take any text (augment: composable names with strengths, such as "flip,crop:2";
# train_classes, val_classes: class ids such as "0,1,2").
FREE_TEXT = {"out", "model", "pretrained", "data_dir", "device", "augment", "train_classes", "val_classes"}
SIZES = {"embedding_dim": 16, "num_classes": 4, "num_train": 40}


def _explained(opt, where):
    assert opt.help, f"{where}: option {opt.name} has no help line; document it in the class's Args/Options section"
    assert "\n" not in opt.help and len(opt.help) <= 200, f"{where}: the help of {opt.name} is not one line"


def _build(name, **options):
    return SOLVERS.build(name, **SIZES, **({"k": 5} if name == "rbf" else {}), **options)


@pytest.mark.parametrize("solver", SOLVERS.names())
def test_every_option_of_every_solver_explains_itself(solver):
    for opt in options_of(SOLVERS.get(solver), skip=COMMON):
        _explained(opt, solver)
        if opt.type is str:  # every text option of a solver takes names: they are listed, and they are the valid ones
            assert opt.choices, f"{solver}: option {opt.name} takes names but lists none"
            for choice in opt.choices:
                _build(solver, **{opt.name: choice})
            with pytest.raises(ConfigError, match="choose one of"):
                _build(solver, **{opt.name: "no-such-name"})
    parser, _ = _train_parser(solver)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and not action.help.startswith("default:"), f"{action.option_strings} has no help"


@pytest.mark.parametrize("backend", SEARCHES.names())
def test_every_search_backend_option_explains_itself(backend):
    for opt in options_of(SEARCHES.get(backend)):
        _explained(opt, backend)


def test_every_training_setting_explains_itself_and_lists_its_choices():
    for opt in train_options():
        _explained(opt, "TrainConfig")
        if opt.type is str and opt.name not in FREE_TEXT:
            assert opt.choices, f"training setting {opt.name} takes names but lists none"
            for choice in opt.choices:
                TrainConfig(**{opt.name: choice}).check_types()
                if opt.name not in ("dataset", "solver"):  # a dataset may need files, a solver nothing here
                    TrainConfig(**{opt.name: choice}).validate()
            with pytest.raises(ConfigError, match="unknown"):
                TrainConfig(**{opt.name: "no-such-name"}).validate()


def test_sigma_auto_is_a_word_and_zero_still_means_it():
    parser, _ = _train_parser("rbf")
    args = vars(parser.parse_args(["--sigma", "auto"]))
    assert args["solveropt__sigma"] == "auto"
    assert vars(parser.parse_args(["--sigma", "0.5"]))["solveropt__sigma"] == 0.5
    config = TrainConfig(solver="rbf", solver_options={"sigma": "auto"}).validate()
    assert config.solver_options == {"sigma": "auto"}
    assert _build("rbf", sigma="auto").auto_sigma and _build("rbf", sigma=0.0).auto_sigma
    assert not _build("rbf", sigma=0.3).auto_sigma
    with pytest.raises(ConfigError, match="sigma must be a finite number >= 0"):
        RBFSolver(16, 4, 40, k=5, sigma="automatic")
    with pytest.raises(SystemExit):
        parser.parse_args(["--sigma", "big"])


def _printed(capsys) -> str:
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines to the terminal's width


def test_help_says_how_to_see_another_solvers_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = _printed(capsys)
    assert "knnsolver train --solver NAME --help" in out and "knnsolver solvers" in out
    assert "softmax solver options" in out and "rbf" in out
    with pytest.raises(SystemExit):
        main(["train", "--solver", "rbf", "--help"])
    out = _printed(capsys)
    assert "--sigma FLOAT|auto" in out and "median nearest-centre spacing" in out
    assert "--neighbour-mode {stored,fresh}" in out and "--optimizer {sgd,adam,adamw}" in out
    assert main(["solvers", "rbf"]) == 0
    out = _printed(capsys)
    assert "--predict-k INT" in out and "0 = the same as k" in out
    assert main(["searches", "faiss-ivf"]) == 0
    assert "nprobe (INT)" in _printed(capsys)
    assert main(["--help"]) == 0
    out = _printed(capsys)
    assert all(command in out for command in ("predict", "search", "add-classes", "export", "searches"))


@pytest.mark.parametrize("solver, fragments", [
    ("softmax", ["label_smoothing=0"]), ("rbf", ["k=5", "sigma=auto", "normalize=True", "search=exact"]),
    ("hal", ["tau=0.1", "predict_by=knn", "knn_k=5"]), ("crc", ["dictionary=batch", "lam=0.1"]),
    ("centralized", ["scale=4", "margin=4", "predict_by=centre"]), ("triplet", ["margin=0.1", "knn_k=5"]),
    ("multisimilarity", ["alpha=2", "beta=50", "epsilon=0.1"]),
])
def test_printing_a_solver_shows_its_key_settings(solver, fragments):
    first = str(_build(solver)).splitlines()[0:2]
    text = " ".join(first)
    assert "embedding_dim=16, num_classes=4" in text
    for fragment in fragments:
        assert fragment in text, (fragment, text)


def test_docstring_sections_give_the_help_lines():
    doc = """Summary.

    Args:
        alpha: the first sentence, e.g. this one. More detail
            on a second line.
        beta (int): uses ``code`` and :meth:`~pkg.mod.fit`.

    Returns:
        gamma: not an option.
    """
    found = entries(doc)
    assert set(found) == {"alpha", "beta"}
    assert one_line(found["alpha"]) == "the first sentence, e.g. this one"
    assert one_line(found["beta"]) == "uses code and fit"
