"""Export a loaded model for serving without knnsolver: the network as TorchScript or ONNX, the reference set as .npy.

The exported network is the backbone followed by the solver's transform, so
its outputs are in the same space as the exported reference embeddings:
nearest-neighbour search between the two (squared Euclidean distance) is what
:meth:`KnnModel.search <knnsolver.inference.model.KnnModel.search>` does. Before
the file is put in place, the exported network is loaded back and run on a
batch of inputs of another size than the one it was traced with; its embeddings
must match the model's within ``atol``, else nothing is written.
"""
from __future__ import annotations

import copy
import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from knnsolver.constraints import check_choice
from knnsolver.errors import ConfigError, DataError, MissingDependencyError, StorageError

if TYPE_CHECKING:
    from knnsolver.inference.model import KnnModel

FORMATS = ("torchscript", "onnx")
_ONNX_HINT = "pip install 'knnsolver[onnx]' (the onnx and onnxruntime packages), or export --format torchscript"


class Embedder(nn.Module):
    """Inputs to embeddings in the solver's space: the network, then the solver's transform (frozen constants)."""

    def __init__(self, backbone: nn.Module, transform: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.backbone = backbone
        self._transform = [transform]  # a plain list: the solver's tensors become constants, not submodules

    def forward(self, x: Tensor) -> Tensor:
        return self._transform[0](self.backbone(x))


def reference_paths(path: str | Path) -> dict[str, Path]:
    """The files written beside the exported network ``path`` (``NAME.pt`` gives ``NAME_reference.npy`` ...)."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix else path
    return {"reference": Path(f"{stem}_reference.npy"), "labels": Path(f"{stem}_reference_labels.npy"),
            "classes": Path(f"{stem}_classes.json")}


def _torchscript(embedder: nn.Module, example: Tensor, tmp: Path, check: Tensor) -> Tensor:
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export, which has no loader outside torch
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(embedder, example, check_trace=False)
        torch.jit.save(traced, str(tmp))
        return torch.jit.load(str(tmp), map_location="cpu")(check)


def _onnx(embedder: nn.Module, example: Tensor, tmp: Path, check: Tensor) -> Tensor:
    try:
        import onnx  # noqa: F401  (torch.onnx needs it)
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(f"ONNX export needs the {exc.name or 'onnx'} package: {_ONNX_HINT}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(embedder, (example,), str(tmp), input_names=["input"], output_names=["embedding"],
                          dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}}, dynamo=False)
    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": check.numpy()})[0])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_atol(atol: float, name: str = "export atol") -> None:
    """Refuse a tolerance that no check could meet (negative, or NaN)."""
    if not atol >= 0:
        raise ConfigError(f"{name} must be >= 0 (the largest embedding difference accepted), got {atol}")


def export(model: KnnModel, path: str | Path, format: str = "torchscript", atol: float = 1e-4) -> dict[str, Any]:
    """Write the network to ``path`` and the reference set beside it; return what was written and the check's error.

    Files: ``path`` (TorchScript, load with ``torch.jit.load``; or ONNX, input
    ``input`` of shape ``(N, *shape)``, output ``embedding``), ``NAME_reference.npy``
    (``(R, d)`` float32 reference embeddings in the solver's space),
    ``NAME_reference_labels.npy`` (``(R,)`` int64 class ids) and ``NAME_classes.json``
    (class names by id, the input spec and the solver's space). The network is
    checked before it is put in place (module docstring); the other files are
    written after it, each atomically, the classes file last: it records the
    SHA-256 of the three others (``files``), so a reader can tell a complete
    export from one torn by a crash between two files.
    """
    from knnsolver.training.checkpoint import new_file_mode, write_json, write_npy

    check_choice("export format", format, FORMATS)
    check_atol(atol)
    path = Path(path)
    if path.is_dir():
        raise StorageError(f"--out {path} is a folder; give a file name for the exported network")
    transform = copy.deepcopy(model.solver).cpu().requires_grad_(False).transform
    embedder = Embedder(copy.deepcopy(model.backbone).cpu().eval().requires_grad_(False), transform)
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(2, *model.spec.shape, generator=generator)
    check = torch.rand(5, *model.spec.shape, generator=generator)
    with torch.no_grad():
        expected = embedder(check)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # as every other file the library writes
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, new_file_mode())  # mkstemp's 0600 would keep the file from a server running as another user
        except OSError:
            os.unlink(name)
            raise
        finally:
            os.close(fd)
    except OSError as err:
        raise StorageError(f"cannot write {path}: {err.strerror or err}; choose a writable folder") from None
    tmp = Path(name)
    try:
        with torch.no_grad():
            got = (_torchscript if format == "torchscript" else _onnx)(embedder, example, tmp, check)
        error = float((got.float() - expected).abs().max())
        if not error <= atol:
            raise DataError(f"the exported {format} network's embeddings differ from the model's by up to {error:.3g} "
                            f"(more than {atol:g}); nothing was written")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    files = reference_paths(path)
    write_npy(model.reference_embeddings().numpy(), files["reference"])
    write_npy(model.reference_labels.numpy(), files["labels"])
    digests = {key: {"name": where.name, "sha256": _sha256(where)}
               for key, where in (("network", path), ("reference", files["reference"]), ("labels", files["labels"]))}
    write_json({"classes": model.classes, "input": model.spec.to_dict(), "embedding_space": model.embedding_space,
                "sources": model.reference_sources, "files": digests}, files["classes"])
    return {"network": str(path), "format": format, "max_abs_error": error, **{k: str(v) for k, v in files.items()}}
