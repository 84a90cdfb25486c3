import json

import pytest

from knnsolver.cli.main import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_lists(capsys):
    code, out, _ = _run(capsys, "datasets")
    assert code == 0 and "digits" in out and "fashion-mnist" in out
    code, out, _ = _run(capsys, "solvers")
    assert code == 0 and "softmax" in out and "label_smoothing=0.0" in out


def test_train_and_eval(tmp_path, capsys):
    out_dir = tmp_path / "r"
    code, out, err = _run(capsys, "train", "--dataset", "digits", "--solver", "softmax", "--epochs", "2", "--out",
                          str(out_dir), "--width", "8", "--plots", "false", "--progress", "false",
                          "--label-smoothing", "0.1")
    assert code == 0, err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert json.loads((out_dir / "config.json").read_text())["solver_options"] == {"label_smoothing": 0.1}
    code, out, err = _run(capsys, "eval", str(out_dir))
    assert code == 0, err
    assert json.loads(out)["test_accuracy"] == summary["test_accuracy"]


def test_config_file_and_flag_precedence(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"dataset": "digits", "epochs": 5, "width": 8, "plots": False, "progress": False,
                               "solver_options": {"label_smoothing": 0.2}}))
    out_dir = tmp_path / "r"
    code, _, err = _run(capsys, "train", "--config", str(cfg), "--epochs", "1", "--out", str(out_dir))
    assert code == 0, err
    saved = json.loads((out_dir / "config.json").read_text())
    assert saved["epochs"] == 1 and saved["width"] == 8 and saved["solver_options"] == {"label_smoothing": 0.2}


@pytest.mark.parametrize(
    "argv, message",
    [(["train", "--solver", "nope", "--out", "x"], "unknown solver 'nope'"),
     (["train", "--dataset", "nope", "--out", "x"], "unknown dataset 'nope'"),
     (["train", "--epochs", "0", "--out", "x"], "epochs must be >= 1"),
     (["train", "--config", "/no/such.json"], "config file /no/such.json does not exist"),
     (["eval", "/no/such/run"], "/no/such/run does not exist or is not a folder; give a run folder"),
     (["frobnicate"], "unknown command 'frobnicate'")],
)
def test_errors_are_one_line(capsys, argv, message):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_flag_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epochs", "many"])
    assert exc.value.code == 2
    assert "expected a value of type int, got 'many'" in capsys.readouterr().err


def test_embed_writes_embeddings_matching_the_best_network(tmp_path, capsys):
    import numpy as np

    from knnsolver.training import TrainConfig, build_run
    from knnsolver.training.checkpoint import load_checkpoint

    out_dir = tmp_path / "r"
    assert _run(capsys, "train", "--epochs", "1", "--width", "8", "--embedding-dim", "12", "--out", str(out_dir),
                "--plots", "false", "--progress", "false")[0] == 0
    code, out, err = _run(capsys, "embed", str(out_dir), "--part", "test", "--out", str(tmp_path / "e.npy"))
    assert code == 0, err
    emb, labels = np.load(tmp_path / "e.npy"), np.load(tmp_path / "e_labels.npy")
    run = build_run(TrainConfig.from_dict(json.loads((out_dir / "config.json").read_text())))
    run.model.load_state_dict(load_checkpoint(out_dir / "best.pt")["model"])
    expected, expected_labels = run.embed(run.data.test)
    assert emb.shape == (len(run.data.test), 12)
    np.testing.assert_allclose(emb, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert np.array_equal(labels, expected_labels.numpy())
    code, _, err = _run(capsys, "embed", str(out_dir), "--part", "holdout", "--out", str(tmp_path / "x.npy"))
    assert code == 2 and "unknown part 'holdout'" in err


def test_output_piped_into_a_reader_that_stops_ends_quietly():
    """Helper review: `knnsolver predict ... | head -2` ended with 'error: Broken pipe' and exit code 2 (and, in a
    first fix, still did: after a failed write Python drops the buffer, so flushing again cannot tell)."""
    import signal
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-m", "knnsolver.cli.main", "solvers"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    child.stdout.close()  # the reader goes before the command writes (it is still importing torch)
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 128 + signal.SIGPIPE and err == ""


def test_a_broken_pipe_other_than_the_output_is_an_error(monkeypatch, capsys):
    """Review: every BrokenPipeError ended silently with status 141, a pipe the command wrote to included."""
    import knnsolver.cli.main as cli

    def write_to_a_closed_pipe(argv):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setitem(cli.COMMANDS, "solvers", write_to_a_closed_pipe)
    assert main(["solvers"]) == 2
    assert capsys.readouterr().err == "knnsolver: error: Broken pipe\n"
