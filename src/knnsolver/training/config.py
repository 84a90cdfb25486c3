"""The training configuration: one dataclass, loadable from JSON or TOML, validated up front."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

import torch

from knnsolver.constraints import Interval, check_choice, check_type
from knnsolver.data.augment import parse_options
from knnsolver.data.datasets import IMAGE_CACHE_MB
from knnsolver.errors import ConfigError
from knnsolver.registry import DATASETS

OPTIMIZERS = ("sgd", "adam", "adamw")
SPLITS = ("standard", "disjoint")
LR_SCHEDULES = ("constant", "cosine", "step")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
BN_MODES = ("batch", "frozen", "matched")
PLOTS = ("curves", "all", "off")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
_CHOICES = {"optimizer": OPTIMIZERS, "split": SPLITS, "lr_schedule": LR_SCHEDULES, "precision": tuple(PRECISIONS),
            "bn_mode": BN_MODES, "plots": PLOTS, "compile_mode": COMPILE_MODES}
_AT_LEAST_ONE = Interval(1)
# Valid ranges of the numeric settings (the seed's bound keeps every per-epoch seed within 64 bits).
_RANGES = {
    "epoch_steps": Interval(1, hint=" (or null for one pass over the training set)"),
    **{name: _AT_LEAST_ONE for name in ("epochs", "batch_size", "embedding_dim", "width", "eval_every",
                                        "lr_step_epochs", "image_size", "resize_size")},
    "eval_batch_size": Interval(0, hint=" (0 = automatic: 128 rows on the CPU, 512 on a GPU)"),
    "patience": Interval(0, hint=" (0 = train every epoch)"),
    "max_per_class": Interval(1, hint=" (or null for no cap)"),
    "precise_bn_rows": Interval(1, hint=" (turn re-estimation off with precise_bn=false)"),
    "num_workers": Interval(0, hint=" (0 = load in the main process)"),
    "image_cache_mb": Interval(0, hint=" (0 = no cache)"),
    "samples_per_class": Interval(0, hint=" (0 = automatic)"),
    "lr": Interval(0, low_open=True),
    "backbone_lr": Interval(0, low_open=True, hint=" (or null for lr)"),
    "weight_decay": Interval(0),
    "momentum": Interval(0, 1),
    "dropout": Interval(0, 1, high_open=True),
    "val_fraction": Interval(0, 1, high_open=True),
    "lr_gamma": Interval(0, 1, low_open=True),
    "clip_grad_norm": Interval(0, low_open=True, hint=" (leave it unset to turn clipping off)"),
    "seed": Interval(0, 2**32, high_open=True),
}


def auto_eval_batch_size(device: torch.device) -> int:
    """The automatic ``eval_batch_size``: 128 rows on the CPU (large batches overflow its cache), 512 on an accelerator."""
    return 128 if device.type == "cpu" else 512


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
      (softmax, HAL, RBF: :meth:`~knnsolver.interfaces.Solver.compile_loss`). ``compile_mode`` is
      ``torch.compile``'s mode for the network: ``reduce-overhead`` replays its forward and backward
      as CUDA graphs on a GPU (PyTorch's cudagraph trees; the same as ``default`` on the CPU), against
      a loop bound by per-step launches there (benchmarks/README.md, "On a GPU"); not yet measured in
      the trainer on a GPU (``benchmarks/bench_cuda_graph.py`` measures it on a bare loop).
    * ``bn_mode``: how BatchNorm normalises during training. ``batch`` (default):
      batch statistics (PyTorch's train mode); ``frozen``: the running statistics,
      re-estimated at every epoch start, so training-mode queries and an
      eval-mode embedding bank share one normalisation exactly (the RBF paper's
      code trains with the network in eval mode); ``matched``: batch statistics
      in training, and the bank embedded with batch statistics too (BatchNorm in
      train mode over batches of the evaluation batch size, running statistics untouched,
      dropout off), so queries and centres are normalised alike. Measured on validation
      (benchmarks/README.md, "training health"): for the RBF solver from scratch,
      frozen BatchNorm cost 3-6 points of validation accuracy against ``batch``
      with precise BN, and ``matched`` was level with ``batch`` (+0.3 points,
      within seed noise, at the cost of an embedding pass per refresh), so
      ``batch`` is the default for every solver.

    Attributes:
        dataset: the data to train on (``knnsolver datasets`` lists them).
        solver: the loss and classifier on top of the network (``knnsolver solvers`` lists them).
        out: the run folder: config, log, checkpoints, summary and plots.
        split: ``standard`` classifies the dataset's own classes, ``disjoint`` scores retrieval on unseen classes.
        epochs: passes over the training set (or epochs of ``epoch_steps`` steps).
        epoch_steps: optimiser steps per epoch; none = one pass over the training set. Epochs then cut a seeded stream of passes into equal parts (each row still seen once per pass), so bank refreshes, validation and checkpoints come every this many steps whatever the training-set size.
        batch_size: training rows per step (per process under torchrun).
        optimizer: the optimiser of the network and the solver.
        lr: learning rate (of the embedding layer and solver when ``backbone_lr`` is set).
        backbone_lr: learning rate of the backbone; none = ``lr``.
        weight_decay: L2 weight decay of the optimiser.
        momentum: SGD momentum.
        seed: seeds the data split, the initial weights and every epoch's sampling.
        model: the network (a registered name or ``timm:NAME``); ``auto`` picks one for the input shape.
        embedding_dim: size of the embedding the network outputs.
        dropout: dropout rate before the embedding layer.
        width: channel width of the small built-in networks.
        pretrained: weights file to start the network from (torchvision's or timm's format); none = random init.
        data_dir: where the dataset's files are; none = the dataset's default.
        val_fraction: share of the training rows held out to choose the best epoch; 0 = none.
        val_classes: split disjoint: training classes held out whole as the validation set (class-disjoint, as the test classes are): a count (the last ones) or class ids such as 4,6; 0 = use val_fraction.
        train_classes: split disjoint: the class ids that train (and validate), e.g. 0,1,2; none = the first half of the classes (or the dataset's own).
        max_per_class: keep at most this many training rows per class; none = all (validation and test keep all of theirs).
        augment: training augmentation: true (the dataset's own set), false, or names such as flip,crop:2,scale:0.5.
        image_size: side of the square images fed to the network; none = the dataset's default (an image folder's shared native size).
        resize_size: shorter side before the centre crop; none = image_size * 8 / 7 (benchmarks) or no crop (image folders).
        image_channels: channels an image folder is read with (1 or 3); none = 1 when every image is greyscale.
        image_cache_mb: most megabytes of decoded images an image folder keeps in memory (0 = decode every epoch).
        balanced: sample batches class-balanced; none = only for solvers that need it.
        samples_per_class: images per class in a balanced batch; 0 = chosen from batch size and class count.
        lr_schedule: how the learning rate changes over the run (see Training controls above).
        warmup_epochs: epochs of linear learning-rate warm-up (may be fractional).
        lr_step_epochs: epochs between the learning-rate drops of the ``step`` schedule.
        lr_gamma: factor of each learning-rate drop of the ``step`` schedule.
        clip_grad_norm: clip the global gradient norm to this value; none = no clipping.
        precise_bn: re-estimate BatchNorm statistics before every evaluation and bank refresh.
        precise_bn_rows: training rows used to re-estimate the BatchNorm statistics.
        bn_mode: how BatchNorm normalises while training (see Training controls above).
        eval_every: validate every this many epochs.
        patience: stop early after this many validation passes in a row without a new best score; 0 = never.
            The count is of passes (as PyTorch Lightning's ``EarlyStopping``), not epochs, so with
            ``eval_every=5`` a patience of 6 waits 30 epochs. Any rise of the score counts (no minimum
            delta): the same test that keeps a new best checkpoint. A resumed run may change it.
        eval_batch_size: rows per batch when embedding for evaluation and bank refreshes; 0 = automatic.
            Automatic (:func:`auto_eval_batch_size`) is 128 rows on the CPU, where a batch whose
            activations overflow the cache embeds at about half the speed (conv28 width 32:
            12.2-13.2 s per 54,000 rows at 512 rows a batch, 5.5-5.8 s at 128; benchmarks/README.md),
            and 512 on a GPU, where fewer, larger batches save launches.
        num_workers: DataLoader worker processes for file-backed or augmented data; 0 = the main process.
            Asked for, never chosen automatically: augmentation draws from each worker's own random
            stream, so an augmented run's result depends on the number of workers (it is reproducible
            for a given number); without augmentation it does not. In-memory data without augmentation
            is gathered on the training device and needs none.
        plots: curves (loss and metric curves), all (adds a t-SNE of at most 2,000 test embeddings) or off.
        progress: show progress bars.
        device: ``auto`` (a CUDA GPU when one is visible, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``fp32``, or run the network under ``bf16`` or ``fp16`` autocast (the solver stays fp32).
        compile: run the network (and on a GPU the solver's loss) through ``torch.compile``.
        compile_mode: ``torch.compile``'s mode for the network: default, reduce-overhead (CUDA graphs on a GPU) or max-autotune; any but default turns ``compile`` on.
        solver_options: the solver's own options, by name (flags of their own on the command line).
    """

    dataset: str = "digits"
    solver: str = "softmax"
    out: str = "runs/default"
    split: str = "standard"
    epochs: int = 10
    epoch_steps: int | None = None
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
    val_classes: str | list[int] | int = 0  # a count, or class ids (a flag's "4,6" is read as [4, 6])
    train_classes: str | list[int] | None = None  # a flag's "0,1,2" is read as [0, 1, 2]
    max_per_class: int | None = None
    # Training augmentation: false (none), true (the dataset's default set), or named options in order, e.g.
    # ["crop:2", "flip"] (--augment crop:2,flip): flip[:P], crop[:pixels], scale[:min area] (knnsolver.data.augment).
    augment: str | list[str] | bool = False
    # None: the dataset's default (an image folder's native size when its images share one, else 64; 224 for the
    # benchmarks)
    image_size: int | None = None
    image_channels: int | None = None  # image-folder: 1 (greyscale) or 3 (RGB); None: 1 when every image is greyscale
    image_cache_mb: int = IMAGE_CACHE_MB  # image-folder: decode every image once into memory when it takes at most this; 0: off
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
    patience: int = 0
    eval_batch_size: int = 0
    num_workers: int = 0  # DataLoader worker processes for file-backed or augmented data
    # curves: loss.png and metrics.png (cheap); all: also a t-SNE of at most 2,000 test embeddings; off.
    # true/false stand for curves/off.
    plots: str | bool = "curves"
    progress: bool = True
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    compile_mode: str = "default"
    solver_options: dict[str, Any] = field(default_factory=dict)

    def check_types(self) -> "TrainConfig":
        """Raise :class:`ConfigError` naming the first value of the wrong type (``"false"`` is not a boolean);
        ints given for float settings become floats."""
        hints = get_type_hints(type(self))
        for f in fields(self):
            if f.name == "solver_options":
                if not isinstance(self.solver_options, dict):
                    raise ConfigError(f"solver_options must be a mapping of option name to value, got {self.solver_options!r}")
                continue
            if f.name in _WORDS:
                setattr(self, f.name, _WORDS[f.name](getattr(self, f.name)))
                continue
            args = get_args(hints[f.name])
            kind = next((a for a in args if a is not type(None)), hints[f.name])
            setattr(self, f.name, check_type(f.name, getattr(self, f.name), kind, optional=type(None) in args))
        return self

    def validate(self) -> "TrainConfig":
        """Raise :class:`ConfigError` naming the first bad value, with the valid range or choices.

        Checks the type of every setting, its range, the names of dataset,
        solver and device, and the type of every solver option, so a bad value
        is refused before a run writes anything.
        """
        self.check_types()
        for name, interval in _RANGES.items():
            interval.check(name, getattr(self, name))
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        for name, choices in _CHOICES.items():
            check_choice(name, getattr(self, name), choices)
        if self.compile_mode != "default":
            self.compile = True  # a mode asks for compilation (as Hugging Face's torch_compile_mode does)
        if isinstance(self.augment, list):
            parse_options(self.augment)
        DATASETS.get(self.dataset)
        self.torch_device  # checks the device name
        self._check_solver_options()
        return self

    def _check_solver_options(self) -> None:
        """Type-check the solver's options against its constructor (unknown names are refused when it is built)."""
        from knnsolver.registry import SOLVERS, check_options

        for name in SOLVERS.supplied:
            if name in self.solver_options:
                what = "use the embedding_dim setting" if name == "embedding_dim" else "it comes from the data"
                raise ConfigError(f"solver_options cannot set {name}: the trainer gives it to the solver ({what}); "
                                  "remove it from solver_options")
        self.solver_options = check_options(SOLVERS.get(self.solver), self.solver_options, "solver")

    @property
    def eval_rows(self) -> int:
        """Rows per evaluation batch: ``eval_batch_size``, or where it is 0 :func:`auto_eval_batch_size` of the device."""
        return self.eval_batch_size or auto_eval_batch_size(self.torch_device)

    @property
    def torch_device(self) -> torch.device:
        """``device`` resolved: ``auto`` is CUDA when a GPU is visible, else the CPU."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except (RuntimeError, ValueError):
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ConfigError(f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} asked for but no CUDA GPU is visible; use --device cpu or auto")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {self.device!r} asked for but only {torch.cuda.device_count()} CUDA GPU(s) are "
                              "visible; use cuda:0 or --device auto")
        return device

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build a config from a mapping (a config file's), refusing unknown keys and values of the wrong type."""
        if not isinstance(data, dict):
            raise ConfigError(f"a configuration must be a mapping of setting name to value, got a {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
        return cls(**data).check_types()


def _augment_value(value: Any) -> bool | list[str]:
    """``augment`` as ``False``, ``True`` or a list of option names; ``"flip,crop"`` (a flag) is split at
    the commas, and the words true/false/default/none keep their meaning (``--augment true`` as before)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = list(value)
    else:
        raise ConfigError(f"augment must be true, false or a list of augmentation names (e.g. flip,crop), "
                          f"got {value!r}")
    items = [item.strip().lower() for item in items if item.strip()]
    if items in ([], ["false"], ["none"]):
        return False
    if items in (["true"], ["default"]):
        return True
    return items


def _plots_value(value: Any) -> str:
    """``plots`` as one of :data:`PLOTS`; ``True``/``False`` (and the words true/false) are curves/off."""
    if isinstance(value, bool) or value in ("true", "false"):
        return "curves" if value in (True, "true") else "off"
    if not isinstance(value, str):
        raise ConfigError(f"plots must be one of: {', '.join(PLOTS)} (or true/false), got {value!r}")
    return value


def _class_ids(name: str, value: Any) -> list[int]:
    """A sorted list of distinct class ids from a list or a flag's ``"0,1,2"``."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        ids = sorted({check_type(name, int(v) if isinstance(v, str) else v, int) for v in items})
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be class ids such as 0,1,2, got {value!r}") from None
    if not ids:
        raise ConfigError(f"{name} must name at least one class id, such as 0,1,2 (or be none)")
    return ids


def _train_classes_value(value: Any) -> list[int] | None:
    """``train_classes`` as sorted class ids, or ``None``."""
    return None if value is None else _class_ids("train_classes", value)


def _val_classes_value(value: Any) -> int | list[int]:
    """``val_classes`` as a count (``"2"`` too) or as sorted class ids (``"4,6"``, a list)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"val_classes must be a count >= 0 (0 = validation from val_fraction) or class ids, "
                              f"got {value}")
        return value
    return _class_ids("val_classes", value)


# Settings given in words as well as values: each is read into one canonical form.
_WORDS = {"augment": _augment_value, "plots": _plots_value, "train_classes": _train_classes_value,
          "val_classes": _val_classes_value}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML config file into a dict (keys as in :class:`TrainConfig`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        raise ConfigError(f"config file {path} is YAML; write it as JSON (.json) or TOML (.toml)")
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (ValueError, ImportError) as exc:
        raise ConfigError(f"cannot parse config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of setting name to value (a JSON object), "
                          f"not a {type(data).__name__}")
    return data
