"""PNG plots of a run: loss and metric curves (cheap, by default), and on request a 2-D t-SNE of test embeddings by class.

The t-SNE (``plots="all"``) reuses the test embeddings the final evaluation computed and
runs on at most :data:`TSNE_MAX_POINTS` of them, so it costs no second embedding pass.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402

TSNE_MAX_POINTS = 2000


def plot_curves(history: list[dict[str, Any]], out: Path) -> None:
    """``loss.png`` (training loss) and ``metrics.png`` (every ``val_*`` and ``solver_*`` series)."""
    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(epochs, [r["loss"] for r in history], marker="o")
    ax.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
    keys = sorted({k for r in history for k in r if k.startswith(("val_", "solver_"))})
    if not keys:
        return
    fig, axes = plt.subplots(len(keys), 1, figsize=(5, 2.2 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        pts = [(r["epoch"], r[key]) for r in history if key in r]
        ax.plot(*zip(*pts), marker="o")
        ax.set(ylabel=key)
    axes[-1, 0].set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=100)
    plt.close(fig)


def plot_tsne(embeddings: np.ndarray, labels: np.ndarray, out: Path, seed: int = 0) -> None:
    """``tsne.png``: t-SNE of at most 2,000 test embeddings (a fixed random subset), coloured by class."""
    rng = np.random.default_rng(seed)
    if len(embeddings) > TSNE_MAX_POINTS:
        keep = rng.choice(len(embeddings), TSNE_MAX_POINTS, replace=False)
        embeddings, labels = embeddings[keep], labels[keep]
    perplexity = min(30.0, max(2.0, (len(embeddings) - 1) / 3))
    xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(embeddings.astype(np.float32))
    fig, ax = plt.subplots(figsize=(5, 5))
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10" if labels.max() < 10 else "tab20", s=4)
    ax.legend(*sc.legend_elements(), fontsize=6, loc="best", title="class")
    ax.set(title="t-SNE of test embeddings", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(out / "tsne.png", dpi=100)
    plt.close(fig)


def plot_run(history: list[dict[str, Any]], embeddings: np.ndarray, labels: np.ndarray, out: Path, seed: int = 0,
             tsne: bool = False) -> None:
    """The curves, and with ``tsne`` the t-SNE of (a subset of) the test embeddings."""
    plot_curves(history, out)
    if tsne and len(embeddings) > 5:
        plot_tsne(embeddings, labels, out, seed)
