"""Registries from a name to a class, for config-driven construction.

Entries are ``"module:attribute"`` strings imported on first use, so listing
names is instant and an optional dependency is only needed when its entry is
built. :func:`options_of` reads a class's keyword options (name, default, type,
choices, help) from its constructor and docstring so the CLI can expose them as
flags without a second list.
"""
from __future__ import annotations

import importlib
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from knnsolver.constraints import check_type
from knnsolver.docstrings import one_line, option_docs
from knnsolver.errors import ConfigError


@dataclass(frozen=True)
class Option:
    """One keyword option of a registered class.

    Attributes:
        name: the constructor's keyword.
        default: its default value.
        type: the type of its values (``bool``, ``int``, ``float`` or ``str``).
        help: one line from the class's docstring (:mod:`knnsolver.docstrings`).
        choices: the names a ``str`` option takes, from its hint: ``Annotated[str, NAMES]`` with
            ``NAMES`` a :class:`Registry`, a tuple of names or a dict keyed by them (the
            tuple the constructor validates with), or ``Literal["a", "b"]``; empty: any value.
        words: words taken besides values of ``type`` (``float | Literal["auto"]``: ``auto``).
    """

    name: str
    default: Any
    type: type
    help: str = ""
    choices: tuple[str, ...] = ()
    words: tuple[str, ...] = ()

    def describe(self) -> str:
        """The help line and the default, as the CLI shows it (beside the choices or words)."""
        default = f"default: {'none' if self.default is None else self.default}"
        return f"{self.help}; {default}" if self.help else default


class Registry:
    """Maps names to lazily imported classes or factories."""

    def __init__(self, kind: str, entries: dict[str, str], descriptions: dict[str, str],
                 supplied: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._entries = dict(entries)
        self._descriptions = dict(descriptions)
        self.supplied = supplied  # constructor arguments the trainer gives (from the data and the run), not options

    def names(self) -> list[str]:
        return list(self._entries)

    def describe(self, name: str) -> str:
        return self._descriptions.get(name, "")

    def get(self, name: str) -> Any:
        """Return the class registered under ``name``; unknown names list the valid ones."""
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self._entries)}")
        module_name, attr = self._entries[name].split(":")
        return getattr(importlib.import_module(module_name), attr)

    def build(self, name: str, /, **kwargs: Any) -> Any:
        """Construct ``name`` with ``kwargs``; unknown keyword options give a clear error."""
        cls = self.get(name)
        accepted = inspect.signature(cls).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        unknown = sorted(set(kwargs) - set(accepted)) if not takes_any else []
        if unknown:
            valid = ", ".join(o.name for o in options_of(cls, skip=self.supplied))
            raise ConfigError(f"{self.kind} {name!r} has no option {', '.join(unknown)}; its options are: {valid}")
        return cls(**check_options(cls, kwargs, f"{self.kind} {name!r}"))


_SIMPLE = (bool, int, float, str)


def hint_kind(hint: Any) -> tuple[Any, tuple[str, ...], tuple[str, ...]]:
    """``(type, choices, words)`` of a type hint (see :class:`Option`); ``None`` is dropped from unions."""
    choices: tuple[str, ...] = ()
    if typing.get_origin(hint) is Annotated:
        hint, *meta = typing.get_args(hint)
        for m in meta:
            if isinstance(m, Registry):
                choices = tuple(m.names())
            elif isinstance(m, (tuple, list, dict)):  # the names themselves (a dict: its keys)
                choices = tuple(m)
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    members = tuple(m for m in members if m is not type(None))
    words = tuple(w for m in members if typing.get_origin(m) is Literal for w in typing.get_args(m))
    kinds = [m for m in members if typing.get_origin(m) is not Literal]
    if not kinds:  # only names: Literal["a", "b"]
        return type(words[0]), words, ()
    return kinds[0], choices, words


def options_of(cls: Any, skip: tuple[str, ...] = ()) -> list[Option]:
    """List the keyword options with simple-typed defaults of ``cls``'s constructor, with their help lines.

    Arguments without a default (``embedding_dim``, ``num_classes`` ...) are
    supplied by the trainer and are not options. ``Optional[X]`` options with a
    ``None`` default take type ``X``.
    """
    hints = typing.get_type_hints(cls.__init__, include_extras=True) if hasattr(cls, "__init__") else {}
    docs = option_docs(cls)
    out = []
    for p in inspect.signature(cls).parameters.values():
        if p.name in skip or p.default is inspect.Parameter.empty or p.kind is not p.KEYWORD_ONLY and p.kind is not p.POSITIONAL_OR_KEYWORD:
            continue
        base, choices, words = hint_kind(hints.get(p.name, type(p.default)))
        if base not in _SIMPLE:
            continue
        out.append(Option(p.name, p.default, base, one_line(docs.get(p.name, "")), choices, words))
    return out


def check_options(cls: Any, values: dict[str, Any], what: str) -> dict[str, Any]:
    """``values`` with each option of ``cls`` (:func:`options_of`) type-checked, and an int given for a float made
    a float (:func:`~knnsolver.constraints.check_type`); one of an option's words (``"auto"``) and other keywords
    pass as they are."""
    options = {o.name: o for o in options_of(cls)}
    checked = dict(values)
    for name, value in values.items():
        opt = options.get(name)
        if opt is not None and not (isinstance(value, str) and value in opt.words):
            checked[name] = check_type(f"{what} option {name}", value, opt.type, optional=opt.default is None)
    return checked


def parse_value(text: str, kind: type, optional: bool = False, words: tuple[str, ...] = ()) -> Any:
    """Parse a command-line string into ``kind`` (bools accept true/false/1/0/yes/no), or one of ``words``;
    ``none``/``null`` is None only where the setting is ``optional``."""
    if text in words:
        return text
    if text.lower() in ("none", "null"):
        if optional:
            return None
        raise ConfigError(f"expected a value of type {kind.__name__}, got {text!r} (this setting cannot be unset)")
    if kind is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"expected true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        also = f" or {' or '.join(words)}" if words else ""
        raise ConfigError(f"expected a value of type {kind.__name__}{also}, got {text!r}") from None


# What the trainer gives every solver's constructor, from the run's settings and its data.
SOLVER_SIZES = ("embedding_dim", "num_classes", "num_train")

SOLVERS = Registry(
    "solver",
    {
        "softmax": "knnsolver.solvers.softmax:SoftmaxSolver",
        "rbf": "knnsolver.solvers.rbf:RBFSolver",
        "hal": "knnsolver.solvers.hal:HALSolver",
        "crc": "knnsolver.solvers.crc:CRCSolver",
        "centralized": "knnsolver.solvers.centralized:CentralizedSolver",
        "triplet": "knnsolver.solvers.pml:TripletSolver",
        "lifted": "knnsolver.solvers.pml:LiftedStructureSolver",
        "npairs": "knnsolver.solvers.pml:NPairsSolver",
        "nca": "knnsolver.solvers.pml:NCASolver",
        "proxynca": "knnsolver.solvers.pml:ProxyNCASolver",
        "normsoftmax": "knnsolver.solvers.pml:NormalizedSoftmaxSolver",
        "multisimilarity": "knnsolver.solvers.pml:MultiSimilaritySolver",
        "proxyanchor": "knnsolver.solvers.pml:ProxyAnchorSolver",
    },
    {
        "softmax": "linear layer + cross-entropy (baseline)",
        "rbf": "nearest-neighbour RBF solver with an embedding bank (Meyer et al.)",
        "hal": "hypersphere anchor loss (Ye et al.)",
        "crc": "DML-CRC: Mahalanobis collaborative representation classifier",
        "centralized": "Normalize-Scale + decorrelated global centralized ranking loss",
        "triplet": "pytorch-metric-learning triplet margin loss, semi-hard mining",
        "lifted": "pytorch-metric-learning lifted structure loss",
        "npairs": "pytorch-metric-learning N-pairs loss",
        "nca": "pytorch-metric-learning NCA loss (batch)",
        "proxynca": "pytorch-metric-learning ProxyNCA loss",
        "normsoftmax": "pytorch-metric-learning normalised softmax loss",
        "multisimilarity": "pytorch-metric-learning multi-similarity loss",
        "proxyanchor": "pytorch-metric-learning proxy-anchor loss",
    },
    supplied=SOLVER_SIZES,
)

SEARCHES = Registry(
    "neighbour search",
    {
        "exact": "knnsolver.search.exact:ExactSearch",
        "faiss-flat": "knnsolver.search.faiss_backend:FaissFlatSearch",
        "faiss-ivf": "knnsolver.search.faiss_backend:FaissIVFSearch",
        "faiss-hnsw": "knnsolver.search.faiss_backend:FaissHNSWSearch",
        "fanng": "knnsolver.search.fanng:FANNGSearch",
        "auto": "knnsolver.search.auto:AutoSearch",
    },
    {
        "exact": "blocked matrix multiply + top-k in torch",
        "faiss-flat": "faiss exact flat index",
        "faiss-ivf": "faiss IVF-Flat (approximate)",
        "faiss-hnsw": "faiss HNSW (approximate)",
        "fanng": "FANNG graph search (Harwood & Drummond 2016)",
        "auto": "exact below a size threshold, approximate above",
    },
)

DATASETS = Registry(
    "dataset",
    {
        "digits": "knnsolver.data.datasets:load_digits",
        "fashion-mnist": "knnsolver.data.datasets:load_fashion_mnist",
        "image-folder": "knnsolver.data.datasets:load_image_folder",
        "embeddings": "knnsolver.data.datasets:load_embeddings",
        "cub200": "knnsolver.data.benchmarks:load_cub200",
        "cub200-bbox": "knnsolver.data.benchmarks:load_cub200_bbox",
        "cars196": "knnsolver.data.benchmarks:load_cars196",
        "cars196-bbox": "knnsolver.data.benchmarks:load_cars196_bbox",
        "sop": "knnsolver.data.benchmarks:load_sop",
        "inshop": "knnsolver.data.benchmarks:load_inshop",
    },
    {
        "digits": "scikit-learn's bundled 8x8 digits (default, no download); --augment true = crop:1, no flips (orientation-sensitive)",
        "fashion-mnist": "Fashion-MNIST IDX files (make data); --augment true = crop:2,flip (clothes may be mirrored)",
        "image-folder": "one sub-folder per class (CUB-200 / Cars196 layout; see below); --augment true = scale,flip",
        "embeddings": "precomputed features + labels: an .npz (x, y) or a folder of features.npy and labels.npy; no augmentation",
        "cub200": "CUB-200-2011 as unpacked (images.txt ...); disjoint: classes 1-100 / 101-200",
        "cub200-bbox": "CUB-200-2011 cropped to bounding_boxes.txt",
        "cars196": "Stanford Cars (cars_annos.mat + car_ims/); disjoint: classes 1-98 / 99-196",
        "cars196-bbox": "Stanford Cars cropped to the annotation's boxes",
        "sop": "Stanford Online Products (Ebay_train.txt, Ebay_test.txt)",
        "inshop": "In-Shop Clothes (Eval/list_eval_partition.txt, Img/); query vs gallery",
    },
)

MODELS = Registry(
    "model",
    {
        "auto": "knnsolver.models.factory:auto_model",
        "mlp": "knnsolver.models.nets:MLPNet",
        "conv8": "knnsolver.models.nets:ConvNet8",
        "conv28": "knnsolver.models.nets:ConvNet28",
        "resnet": "knnsolver.models.nets:ResNetSmall",
        "resnet18": "knnsolver.models.backbones:resnet18",
        "resnet50": "knnsolver.models.backbones:resnet50",
        "vgg16": "knnsolver.models.backbones:vgg16",
    },
    {
        "auto": "choose by input and data size: conv8 for 8x8, conv28 up to 64 px (or under 2,000 rows), resnet above, mlp for vectors",
        "mlp": "two-layer MLP for feature vectors",
        "conv8": "small convnet for 8x8 greyscale",
        "conv28": "small convnet (3 conv blocks, global pooling): any image size, made for 28x28",
        "resnet": "ResNet-style net for larger colour images",
        "resnet18": "ResNet-18, torchvision's parameter names (--pretrained resnet18-*.pth), ImageNet input statistics",
        "resnet50": "ResNet-50, torchvision's parameter names (--pretrained resnet50-*.pth), ImageNet input statistics",
        "vgg16": "VGG-16 (the RBF paper's), torchvision's names (--pretrained vgg16-*.pth), embedding after fc7",
    },
)
