"""Issue 14: a finished run is never damaged, and file and environment faults are one line (exit 2).

CLI cases go through ``main()`` in-process and check the exit code, the message,
that no traceback is printed and that no file of an earlier run changed.
"""
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from knnsolver.cli.main import main
from knnsolver.errors import TrainingWarning
from knnsolver.training import loop
from helpers import one_line_error as _one_line_error, results, run_cli as _run

BASE = ["--dataset", "digits", "--solver", "softmax", "--width", "8", "--embedding-dim", "8", "--plots", "false",
        "--progress", "false", "--max-per-class", "30", "--eval-batch-size", "2000"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-epoch run, trained once; tests copy it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *BASE, "--epochs", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture
def run_dir(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def test_a_second_training_into_a_held_folder_is_refused(run_dir, capsys):
    from knnsolver.training.runfolder import RunFolder

    before = _snapshot(run_dir)
    holder = RunFolder(run_dir)
    holder.open()  # as a training in progress holds it
    try:
        code, _, err = _run(capsys, "train", *BASE, "--epochs", "1", "--lr", "0.01", "--out", run_dir, "--overwrite")
        _one_line_error(code, err, f"{run_dir} is in use by another training (pid {os.getpid()}", "choose another --out")
        code, _, err = _run(capsys, "train", *BASE, "--epochs", "3", "--out", run_dir, "--resume")
        _one_line_error(code, err, "is in use by another training")
    finally:
        holder.close()
    assert _snapshot(run_dir) == before
    assert [p.name for p in run_dir.parent.iterdir()] == ["run"]


def test_a_failed_overwrite_leaves_the_old_run_intact(run_dir, capsys, monkeypatch):
    from knnsolver.errors import DataError

    before = _snapshot(run_dir)
    calls = {"n": 0}

    def failing_epoch(*args):
        calls["n"] += 1
        raise DataError("cannot read image x.png: broken")

    monkeypatch.setattr(loop, "train_epoch", failing_epoch)
    code, _, err = _run(capsys, "train", *BASE, "--epochs", "3", "--lr", "0.01", "--out", run_dir, "--overwrite")
    _one_line_error(code, err, "cannot read image x.png")
    assert calls["n"] == 1 and _snapshot(run_dir) == before

    def interrupted_epoch(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_epoch", interrupted_epoch)
    code, _, err = _run(capsys, "train", *BASE, "--epochs", "3", "--lr", "0.01", "--out", run_dir, "--overwrite")
    assert code == 130 and "earlier run in" in err and "unchanged" in err and "--resume" not in err
    assert _snapshot(run_dir) == before
    assert [p.name for p in run_dir.parent.iterdir()] == ["run"]  # the replacement folder is gone
    monkeypatch.undo()
    code, out, err = _run(capsys, "eval", run_dir)
    assert code == 0 and json.loads(out)["test_accuracy"] == json.loads(before["summary.json"])["test_accuracy"]


def test_an_overwrite_interrupted_before_its_folder_opens_says_the_old_run_is_unchanged(run_dir, capsys, monkeypatch):
    """It said only 'interrupted' (the settings check, which waits for the other processes under torchrun, came
    before the message's try)."""
    from knnsolver.training import trainer

    before = _snapshot(run_dir)
    monkeypatch.setattr(trainer, "check_same_config", lambda config: (_ for _ in ()).throw(KeyboardInterrupt))
    code, _, err = _run(capsys, "train", *BASE, "--epochs", "3", "--lr", "0.01", "--out", run_dir, "--overwrite")
    assert code == 130 and f"the earlier run in {run_dir} is unchanged" in err and "--resume" not in err, err
    assert _snapshot(run_dir) == before


def test_an_overwrite_takes_over_at_its_first_checkpoint_and_resumes(run_dir, capsys, monkeypatch):
    train_epoch = loop.train_epoch

    def stop_in_second_epoch(run, step, optimizer, scaler, epoch, *args):
        if epoch == 1:
            raise KeyboardInterrupt
        return train_epoch(run, step, optimizer, scaler, epoch, *args)

    monkeypatch.setattr(loop, "train_epoch", stop_in_second_epoch)
    code, _, err = _run(capsys, "train", *BASE, "--epochs", "3", "--lr", "0.01", "--out", run_dir, "--overwrite")
    assert code == 130 and "continue with --resume" in err
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 0.01
    assert not (run_dir / "summary.json").exists()  # the old run's summary went with it
    assert [p.name for p in run_dir.parent.iterdir()] == ["run"]
    monkeypatch.undo()
    code, out, err = _run(capsys, "train", *BASE, "--epochs", "3", "--lr", "0.01", "--out", run_dir, "--resume")
    assert code == 0, err
    assert json.loads((run_dir / "summary.json").read_text())["best_epoch"] >= 1


def test_interrupt_before_the_first_checkpoint_does_not_advise_resume(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loop, "train_epoch", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    code, _, err = _run(capsys, "train", *BASE, "--epochs", "2", "--out", tmp_path / "r")
    assert code == 130 and "no epoch had finished" in err and "continue with --resume" not in err


def test_eval_writes_nothing_into_the_run_folder(run_dir, tmp_path, capsys):
    before = _snapshot(run_dir)
    mtimes = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    code, out, err = _run(capsys, "eval", run_dir, "--out", tmp_path / "again.json")
    assert code == 0, err
    assert _snapshot(run_dir) == before and {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == mtimes
    assert json.loads((tmp_path / "again.json").read_text()) == json.loads(out)
    code, out, err = _run(capsys, "eval", run_dir, "--out", tmp_path / "missing" / "x.json")  # made, as train's --out
    assert code == 0 and json.loads((tmp_path / "missing" / "x.json").read_text()) == json.loads(out), err
    (tmp_path / "file").write_text("")
    code, _, err = _run(capsys, "eval", run_dir, "--out", tmp_path / "file" / "x.json")
    _one_line_error(code, err, "cannot create folder", "choose a writable --out")


def test_eval_works_on_a_read_only_run_folder(run_dir, capsys, monkeypatch):
    """As root, chmod does not stop writes: every file write is made to fail instead."""
    from knnsolver.training import checkpoint

    def read_only(path, write):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint, "_atomic_write", read_only)
    code, out, err = _run(capsys, "eval", run_dir)
    assert code == 0, err
    assert json.loads(out)["test_accuracy"] == json.loads((run_dir / "summary.json").read_text())["test_accuracy"]


def test_eval_refuses_an_unfinished_run_unless_told(tmp_path, capsys, monkeypatch):
    from helpers import train_interrupted

    from knnsolver.training import TrainConfig

    out = tmp_path / "r"
    cfg = TrainConfig(dataset="digits", solver="softmax", width=8, embedding_dim=8, plots=False, progress=False,
                      max_per_class=30, epochs=3, out=str(out))
    train_interrupted(cfg, stop_after=1)
    before = _snapshot(out)
    code, _, err = _run(capsys, "eval", out)
    _one_line_error(code, err, "unfinished run (1 of 3 epochs", "--resume", "--unfinished")
    code, out_text, err = _run(capsys, "eval", out, "--unfinished")
    assert code == 0, err
    assert json.loads(out_text)["best_epoch"] == 1
    assert _snapshot(out) == before and not (out / "summary.json").exists()


def test_eval_and_resume_warn_when_the_data_changed(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "emb.npz"
    x, y = rng.normal(size=(120, 6)) + np.repeat(np.eye(6)[:3] * 4, 40, 0), np.repeat(np.arange(3), 40)
    np.savez(data, x=x, y=y)
    out = tmp_path / "r"
    args = ["--dataset", "embeddings", "--data-dir", data, "--solver", "softmax", "--embedding-dim", "4",
            "--plots", "false", "--progress", "false", "--out", out]
    assert _run(capsys, "train", *args, "--epochs", "1")[0] == 0
    before = _snapshot(out)
    code, _, err = _run(capsys, "eval", out)
    assert code == 0 and "changed" not in err
    np.savez(data, x=x[::-1].copy(), y=y)  # the same rows in another order: other splits
    with pytest.warns(TrainingWarning, match="the data of the run in .* changed since it was trained.*current data"):
        assert _run(capsys, "eval", out)[0] == 0
    assert _snapshot(out) == before
    with pytest.warns(TrainingWarning, match="changed since it was trained.*resuming trains on the current data"):
        assert _run(capsys, "train", *args, "--epochs", "2", "--resume")[0] == 0


def test_resume_without_validation_keeps_the_last_epoch(tmp_path):
    from knnsolver.training import TrainConfig, train

    kw = dict(dataset="digits", solver="softmax", width=8, embedding_dim=8, plots=False, progress=False,
              max_per_class=30, val_fraction=0.0, lr_schedule="constant")
    full = train(TrainConfig(**kw, epochs=4, out=str(tmp_path / "full")))
    train(TrainConfig(**kw, epochs=2, out=str(tmp_path / "part")))
    resumed = train(TrainConfig(**kw, epochs=4, out=str(tmp_path / "part")), resume=True)
    assert full["best_epoch"] == resumed["best_epoch"] == 4
    full.pop("data_fingerprint"), resumed.pop("data_fingerprint")
    assert results(resumed) == results(full)


def test_a_moved_run_folder_resumes_and_a_changed_setting_is_named(run_dir, tmp_path, capsys):
    moved = tmp_path / "elsewhere"
    shutil.move(run_dir, moved)
    code, _, err = _run(capsys, "train", *BASE, "--epochs", "3", "--out", moved, "--resume")
    assert code == 0, err
    before = _snapshot(moved)
    code, _, err = _run(capsys, "train", *BASE, "--epochs", "4", "--lr", "0.5", "--out", moved, "--resume")
    _one_line_error(code, err, "settings other than epochs and patience differ", "lr: saved 0.001, now 0.5")
    assert _snapshot(moved) == before


def test_resuming_with_fewer_epochs_than_trained_is_refused_and_changes_nothing(run_dir, capsys):
    """Helper review: --epochs below the trained count was accepted and rewrote config.json under 2 logged epochs."""
    before = _snapshot(run_dir)
    code, _, err = _run(capsys, "train", *BASE, "--epochs", "1", "--out", run_dir, "--resume")
    _one_line_error(code, err, "with epochs=1: it has already trained 2 epochs", "resume with --epochs 2 or more")
    assert _snapshot(run_dir) == before
    code, out, err = _run(capsys, "train", *BASE, "--epochs", "3", "--out", run_dir, "--resume")
    assert code == 0, err
    assert f"resuming {run_dir}: 2 of 3 epochs trained" in out + err


def test_leftover_temporary_files_are_removed_at_start(run_dir, capsys):
    stale = run_dir / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    old_overwrite = run_dir.parent / ".run.overwrite-99999"
    old_overwrite.mkdir()
    code, _, err = _run(capsys, "train", *BASE, "--epochs", "3", "--out", run_dir, "--resume")
    assert code == 0, err
    assert not stale.exists() and not old_overwrite.exists()


def test_run_files_get_the_usual_permissions(tmp_path):
    from knnsolver.training.checkpoint import save_checkpoint, write_json

    old = os.umask(0o022)
    try:
        write_json({"a": 1}, tmp_path / "s.json")
        save_checkpoint({"a": 1}, tmp_path / "c.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "s.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o644


def test_logs_and_summaries_are_strict_json(tmp_path):
    from knnsolver.training.checkpoint import write_json, write_jsonl

    write_jsonl([{"loss": float("nan"), "x": [float("inf"), 1.0]}], tmp_path / "log.jsonl")
    write_json({"v": float("-inf")}, tmp_path / "s.json")

    def refuse(name):
        raise ValueError(name)

    assert json.loads((tmp_path / "log.jsonl").read_text(), parse_constant=refuse) == {"loss": None, "x": [None, 1.0]}
    assert json.loads((tmp_path / "s.json").read_text(), parse_constant=refuse) == {"v": None}


@pytest.mark.parametrize("name, command", [("best.pt", "eval"), ("checkpoint.pt", "eval"), ("checkpoint.pt", "resume")])
def test_truncated_checkpoints_are_one_line(run_dir, capsys, name, command):
    data = (run_dir / name).read_bytes()
    (run_dir / name).write_bytes(data[: len(data) // 2])
    before = _snapshot(run_dir)
    if command == "eval":
        code, _, err = _run(capsys, "eval", run_dir)
    else:
        code, _, err = _run(capsys, "train", *BASE, "--epochs", "3", "--out", run_dir, "--resume")
    _one_line_error(code, err, f"checkpoint {run_dir / name} is truncated")
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter "
                                                  "failed writing file data/0: file write failed"),
                                     RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 512 vs 448")],
                         ids=["ENOSPC", "stream-writer", "unexpected-pos"])
def test_a_full_disk_is_one_line_and_keeps_the_earlier_checkpoint(run_dir, capsys, monkeypatch, failure):
    from knnsolver.training import checkpoint

    before = _snapshot(run_dir)

    def full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(checkpoint.torch, "save", full)
    code, _, err = _run(capsys, "train", *BASE, "--epochs", "3", "--out", run_dir, "--resume")
    _one_line_error(code, err, "cannot write", "the previous version of the file is unchanged")
    monkeypatch.undo()
    after = _snapshot(run_dir)
    after.pop("config.json"), before.pop("config.json")
    assert after == before and not list(run_dir.glob(".*.tmp"))


def test_unusable_out_paths_are_one_line(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    code, _, err = _run(capsys, "train", *BASE, "--epochs", "1", "--out", a_file)
    _one_line_error(code, err, f"--out {a_file} is an existing file, not a folder")
    assert a_file.read_text() == "keep me"
    code, _, err = _run(capsys, "train", *BASE, "--epochs", "1", "--out", a_file / "run")
    _one_line_error(code, err, "cannot create the run folder", "choose another --out")

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, _, err = _run(capsys, "train", *BASE, "--epochs", "1", "--out", tmp_path / "new")
    _one_line_error(code, err, "cannot create the run folder", "Read-only file system")


def test_embed_into_a_missing_folder_makes_it(run_dir, tmp_path, capsys):
    code, _, err = _run(capsys, "embed", run_dir, "--out", tmp_path / "missing" / "e.npy")
    assert code == 0, err
    assert np.load(tmp_path / "missing" / "e.npy").shape[0] == np.load(tmp_path / "missing" / "e_labels.npy").shape[0]


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "r"
    code, _, err = _run(capsys, "train", "--dataset", "embeddings", "--data-dir", tmp_path / "none.npz", "--out", out)
    _one_line_error(code, err, "none.npz does not exist")
    assert not out.exists()


def test_a_crash_between_the_swap_renames_restores_the_old_run(run_dir):
    from knnsolver.training.runfolder import RunFolder

    before = _snapshot(run_dir)
    run_dir.rename(run_dir.parent / ".run.replaced-4242")  # the first rename of a swap done, the second not
    folder = RunFolder(run_dir)
    folder.open()
    folder.close()
    assert _snapshot(run_dir) == before and [p.name for p in run_dir.parent.iterdir()] == ["run"]
