"""Issue 14: every setting, from flags and config files alike, is typed and range-checked before anything is written."""
import json
import shutil

import pytest

from knnsolver.cli.main import main
from knnsolver.errors import ConfigError
from knnsolver.training import TrainConfig

BASE = ["--dataset", "digits", "--solver", "softmax", "--width", "8", "--embedding-dim", "8", "--plots", "false",
        "--progress", "false", "--max-per-class", "30", "--epochs", "1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *BASE, "--out", str(out)]) == 0
    return out


@pytest.fixture
def run_dir(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("settings, message", [
    ({"precise_bn": "false"}, "precise_bn must be true or false, got 'false' (a str) (write it without quotes"),
    ({"plots": "some"}, "unknown plots 'some'; choose one of: curves, all, off"),
    ({"augment": "rotate"}, "unknown augmentation 'rotate' in augment; choose from: flip, crop, scale"),
    ({"augment": ["crop:x"]}, "augmentation 'crop:x': the strength after ':' must be a number"),
    ({"augment": 0}, "augment must be true, false or a list of augmentation names (e.g. flip,crop), got 0"),
    ({"epochs": "2"}, "epochs must be an integer, got '2'"),
    ({"epochs": 2.5}, "epochs must be an integer, got 2.5"),
    ({"lr": "0.01"}, "lr must be a number, got '0.01'"),
    ({"solver": "rbf", "solver_options": {"k": "20"}}, "solver option k must be an integer, got '20'"),
    ({"solver_options": ["k", 20]}, "solver_options in"),
    ({"max_per_class": "none"}, "max_per_class must be an integer or null, got 'none'"),
    ({"weight_decay": float("nan")}, "weight_decay must be a finite number, got nan"),
    ({"seed": 2**63}, "seed must be in [0, 4.29497e+09), got 9223372036854775808"),
])
def test_a_bad_config_file_is_refused_and_the_earlier_run_kept(run_dir, tmp_path, capsys, settings, message):
    cfg = tmp_path / "bad.json"
    good = {"dataset": "digits", "width": 8, "embedding_dim": 8, "max_per_class": 30, "epochs": 1, "plots": False,
            "progress": False}
    cfg.write_text(json.dumps({**good, **settings}))
    before = _files(run_dir)
    code = main(["train", "--config", str(cfg), "--out", str(run_dir), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert message in err, err
    assert _files(run_dir) == before


def test_a_config_file_holding_a_list_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "list.json"
    cfg.write_text("[1, 2]")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "must hold a mapping of setting name to value" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, message", [
    (["--device", "tpu"], "unknown device 'tpu'; use auto, cpu, cuda or cuda:N"),
    (["--optimizer", "sgd", "--momentum", "-1"], "momentum must be in [0, 1], got -1.0"),
    (["--weight-decay", "nan"], "weight_decay must be a finite number, got nan"),
    (["--lr", "inf"], "lr must be a finite number, got inf"),
    (["--seed", str(2**63)], "seed must be in [0, 4.29497e+09)"),
    (["--val-fraction", "1.5"], "val_fraction must be in [0, 1), got 1.5"),
    (["--resize-size", "-3"], "resize_size must be >= 1, got -3"),
    (["--backbone-lr", "-1"], "backbone_lr must be > 0"),
])
def test_bad_flag_values_are_one_line_and_write_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "r"
    code = main(["train", *BASE, "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert message in err, err
    assert not out.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    assert main(["train", *BASE, "--out", str(tmp_path / "r"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU is visible; use --device cpu or auto" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag", ["--epochs", "--lr", "--augment"])
def test_none_is_refused_for_settings_that_cannot_be_unset(capsys, flag):
    with pytest.raises(SystemExit) as exc:
        main(["train", flag, "none"])
    assert exc.value.code == 2
    assert "this setting cannot be unset" in capsys.readouterr().err


def test_none_unsets_optional_settings(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", *BASE, "--out", str(out), "--max-per-class", "none", "--epochs", "1",
                 "--eval-batch-size", "2000"]) == 0
    assert json.loads((out / "config.json").read_text())["max_per_class"] is None


def test_the_python_api_types_values_too():
    with pytest.raises(ConfigError, match="precise_bn must be true or false, got 'false'"):
        TrainConfig(precise_bn="false").validate()
    with pytest.raises(ConfigError, match="a configuration must be a mapping"):
        TrainConfig.from_dict([("epochs", 2)])
    assert TrainConfig(lr=1).validate().lr == 1.0 and isinstance(TrainConfig(lr=1).validate().lr, float)


def test_a_saved_config_with_bad_values_is_reported_by_eval(run_dir, capsys):
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["precise_bn"] = "false"
    (run_dir / "config.json").write_text(json.dumps(cfg))
    assert main(["eval", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "has an invalid config.json: precise_bn must be true or false" in err and "Traceback" not in err


def test_class_lists_are_read_from_flags_and_files_and_checked():
    from knnsolver.training import TrainConfig

    assert TrainConfig(dataset="digits", train_classes="3, 0,1").validate().train_classes == [0, 1, 3]
    assert TrainConfig(dataset="digits", train_classes=[5, 4]).validate().train_classes == [4, 5]
    for bad, message in (("0,x", "train_classes must be class ids such as 0,1,2, got '0,x'"),
                         ([0, True], r"class ids such as 0,1,2, got \[0, True\]"), ("", "class ids such as 0,1,2, got ''"), ([], "must name at least one class")):
        with pytest.raises(ConfigError, match=message):
            TrainConfig(dataset="digits", train_classes=bad).validate()
    assert TrainConfig(dataset="digits", val_classes="6,4").validate().val_classes == [4, 6]
    assert TrainConfig(dataset="digits", val_classes="2").validate().val_classes == 2
    with pytest.raises(ConfigError, match="val_classes must be a count >= 0"):
        TrainConfig(dataset="digits", val_classes=-1).validate()


def test_eval_batch_size_zero_is_automatic_by_device():
    """0 (the default) embeds 128 rows at a time on the CPU, where larger batches overflow the cache and embed
    at about half the speed (benchmarks/README.md), and 512 on an accelerator; a set value is kept."""
    import torch

    from knnsolver.training.config import auto_eval_batch_size

    assert TrainConfig().eval_batch_size == 0
    assert TrainConfig(device="cpu").eval_rows == 128
    assert TrainConfig(device="cpu", eval_batch_size=300).eval_rows == 300
    assert auto_eval_batch_size(torch.device("cpu")) == 128
    assert auto_eval_batch_size(torch.device("cuda", 0)) == 512
    with pytest.raises(ConfigError, match=r"eval_batch_size must be >= 0 \(0 = automatic: 128 rows on the CPU, 512 on a GPU\), got -1"):
        TrainConfig(eval_batch_size=-1).validate()


@pytest.mark.parametrize("setting,expected", [(None, 128), (24, 24)])
def test_training_embeds_in_batches_of_the_resolved_eval_batch_size(tmp_path, monkeypatch, setting, expected):
    """Validation, test and bank-refresh embedding passes all use the resolved size (automatic: 128 on the CPU)."""
    from knnsolver.training import run, train

    sizes = []
    embed = run.embed_dataset

    def recording(model, dataset, batch_size, *args, **kwargs):
        sizes.append(batch_size)
        return embed(model, dataset, batch_size, *args, **kwargs)

    monkeypatch.setattr(run, "embed_dataset", recording)
    extra = {} if setting is None else {"eval_batch_size": setting}
    train(TrainConfig(dataset="digits", solver="rbf", solver_options={"k": 10}, width=4, embedding_dim=8, epochs=2,
                      max_per_class=30, plots=False, progress=False, device="cpu", out=str(tmp_path / "run"), **extra))
    assert len(sizes) >= 4 and set(sizes) == {expected}


def test_patience_is_a_count_of_validation_passes_from_zero():
    assert TrainConfig().patience == 0
    with pytest.raises(ConfigError, match=r"patience must be >= 0 \(0 = train every epoch\), got -1"):
        TrainConfig(patience=-1).validate()
    with pytest.raises(ConfigError, match="patience"):
        TrainConfig(patience=1.5).validate()
