"""The training configuration: one dataclass, loadable from JSON or TOML, validated up front."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from knnsolver.errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw")
SPLITS = ("standard", "disjoint")
LR_SCHEDULES = ("constant", "cosine", "step")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
BN_MODES = ("batch", "frozen", "matched")


@dataclass
class TrainConfig:
    """Every setting of a training run; ``solver_options`` go to the solver's constructor.

    Training controls:

    * ``lr_schedule``: ``cosine`` (default) decays the learning rate from ``lr`` to 0
      over the run, step by step; ``step`` multiplies it by ``lr_gamma`` every
      ``lr_step_epochs`` epochs; ``constant`` keeps ``lr``. ``warmup_epochs`` (may be
      fractional) first ramps it linearly from ``lr / warm-up steps`` to ``lr``. The
      rate is a pure function of the step, so ``--resume`` stays bit-exact; raising
      ``epochs`` on resume stretches the rest of a cosine schedule.
    * ``clip_grad_norm``: clip the global gradient norm to this value (``None``: off).
    * ``precise_bn``: before every evaluation and every bank refresh, re-estimate the
      BatchNorm running statistics with a no-grad pass over at most
      ``precise_bn_rows`` training rows (evenly spaced, no augmentation, dropout off).
    * ``device``: ``auto`` (default) trains on CUDA when a GPU is visible, else
      on the CPU; or a torch device name (``cpu``, ``cuda``, ``cuda:1``).
    * ``precision``: ``fp32`` (default); ``bf16`` or ``fp16`` run the network under
      autocast (fp16 with a gradient scaler) while every solver's maths stays
      in fp32 (the embeddings are cast up before the solver).
    * ``compile``: run the network through ``torch.compile``, and on a GPU the solver's loss maths too
      (softmax, HAL, RBF: :meth:`~knnsolver.interfaces.Solver.compile_loss`).
    * ``bn_mode``: how BatchNorm normalises during training. ``batch`` (default):
      batch statistics (PyTorch's train mode); ``frozen``: the running statistics,
      re-estimated at every epoch start, so training-mode queries and an
      eval-mode embedding bank share one normalisation exactly (the RBF paper's
      code trains with the network in eval mode); ``matched``: batch statistics
      in training, and the bank embedded with batch statistics too (BatchNorm in
      train mode over ``eval_batch_size`` rows, running statistics untouched,
      dropout off), so queries and centres are normalised alike. Measured on validation
      (benchmarks/README.md, "training health"): for the RBF solver from scratch,
      frozen BatchNorm cost 3-6 points of validation accuracy against ``batch``
      with precise BN, and ``matched`` was level with ``batch`` (+0.3 points,
      within seed noise, at the cost of an embedding pass per refresh), so
      ``batch`` is the default for every solver.
    """

    dataset: str = "digits"
    solver: str = "softmax"
    out: str = "runs/default"
    split: str = "standard"
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    backbone_lr: float | None = None  # the backbone's rate (the embedding layer and solver take lr); None: lr
    weight_decay: float = 0.0
    momentum: float = 0.9
    seed: int = 0
    model: str = "auto"
    embedding_dim: int = 64
    dropout: float = 0.0
    width: int = 32
    pretrained: str | None = None
    data_dir: str | None = None
    val_fraction: float = 0.1
    max_per_class: int | None = None
    augment: bool = False
    image_size: int | None = None  # None: the dataset's default (64 for image-folder, 224 for the benchmarks)
    resize_size: int | None = None  # benchmarks: shorter side before cropping; None: image_size * 8 / 7
    balanced: bool | None = None  # None: the class-balanced sampler only where the solver needs it
    samples_per_class: int = 0  # class-balanced sampler's m; 0 picks it from batch size and class count
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    lr_step_epochs: int = 10
    lr_gamma: float = 0.1
    clip_grad_norm: float | None = None
    precise_bn: bool = True
    precise_bn_rows: int = 10_000
    bn_mode: str = "batch"
    eval_every: int = 1
    eval_batch_size: int = 512
    num_workers: int = 0  # DataLoader worker processes for file-backed or augmented data
    plots: bool = True
    progress: bool = True
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    solver_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        """Raise :class:`ConfigError` naming the first bad value."""
        positive = ("epochs", "batch_size", "embedding_dim", "width", "eval_every", "eval_batch_size")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        self.torch_device  # checks the device name
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of: {', '.join(LR_SCHEDULES)}")
        if self.bn_mode not in BN_MODES:
            raise ConfigError(f"unknown bn_mode {self.bn_mode!r}; choose one of: {', '.join(BN_MODES)}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        if self.lr_step_epochs < 1:
            raise ConfigError(f"lr_step_epochs must be >= 1, got {self.lr_step_epochs}")
        if not 0 < self.lr_gamma <= 1:
            raise ConfigError(f"lr_gamma must be in (0, 1], got {self.lr_gamma}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ConfigError(f"clip_grad_norm must be > 0 (leave it unset to turn clipping off), got {self.clip_grad_norm}")
        if self.precise_bn_rows < 1:
            raise ConfigError(f"precise_bn_rows must be >= 1 (turn re-estimation off with precise_bn=false), "
                              f"got {self.precise_bn_rows}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0 (0 = load in the main process), got {self.num_workers}")
        if self.samples_per_class < 0:
            raise ConfigError(f"samples_per_class must be >= 0 (0 = automatic), got {self.samples_per_class}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if self.split not in SPLITS:
            raise ConfigError(f"unknown split {self.split!r}; choose one of: {', '.join(SPLITS)}")
        if not isinstance(self.solver_options, dict):
            raise ConfigError("solver_options must be a mapping of option name to value")
        return self

    @property
    def torch_device(self) -> torch.device:
        """``device`` resolved: ``auto`` is CUDA when a GPU is visible, else the CPU."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except (RuntimeError, ValueError):
            raise ConfigError(f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} asked for but no CUDA GPU is visible; use --device cpu or auto")
        return device

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
        return cls(**data)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML config file into a dict (keys as in :class:`TrainConfig`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        return json.loads(text)
    except (ValueError, ImportError) as exc:
        raise ConfigError(f"cannot parse config file {path}: {exc}") from None
