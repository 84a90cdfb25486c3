"""Every command of the README's "Standard benchmarks" section parses into a valid configuration."""
import re
import shlex
from pathlib import Path

import pytest

import knnsolver.training
from knnsolver.cli.main import main
from knnsolver.registry import DATASETS, MODELS

README = Path(__file__).resolve().parents[1] / "README.md"


def benchmark_commands() -> list[str]:
    section = README.read_text().split("## Standard benchmarks", 1)[1].split("\n## ", 1)[0]
    return [line for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S)
            for line in block.splitlines() if line.startswith("knnsolver train")]


def test_section_covers_every_dataset_and_backbone():
    commands = " ".join(benchmark_commands())
    for name in ("cub200", "cub200-bbox", "cars196", "sop", "inshop"):
        assert f"--dataset {name} " in commands
    for model in ("resnet18", "resnet50", "vgg16", "timm:"):
        assert f"--model {model}" in commands


@pytest.mark.parametrize("command", benchmark_commands())
def test_readme_benchmark_command_is_valid(command, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(knnsolver.training, "train", lambda cfg, **kwargs: seen.append(cfg) or {})
    assert main(shlex.split(command)[1:]) == 0, capsys.readouterr().err
    cfg = seen[0].validate()
    DATASETS.get(cfg.dataset)
    if not cfg.model.startswith("timm:"):
        MODELS.get(cfg.model)
    assert cfg.pretrained and cfg.backbone_lr is not None and cfg.augment
