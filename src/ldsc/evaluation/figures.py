"""Figures of pseudo-eigenvectors (matplotlib, Agg backend, imported lazily).

Every function returns a matplotlib Figure; :func:`save` writes it as PNG and closes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def pca_rgb(eigvecs: Tensor) -> np.ndarray:
    """PCA of the embedding to 3 components, each scaled to [0, 1] by its 1st–99th percentile.

    ``eigvecs``: ``(K, H, W)`` or ``(n, K, H, W)`` -> ``(H, W, 3)`` or ``(n, H, W, 3)`` array; the
    projection is shared by all images so colours mean the same across a data set.
    """
    single = eigvecs.dim() == 3
    E = eigvecs[None] if single else eigvecs
    n, K, H, W = E.shape
    X = E.permute(0, 2, 3, 1).reshape(-1, K).double()
    X = X - X.mean(0)
    q = min(3, K)
    _, _, Vh = torch.linalg.svd(X[:: max(1, X.shape[0] // 50_000)], full_matrices=False)
    P = X @ Vh[:q].T
    if q < 3:
        P = torch.cat([P, P.new_zeros(P.shape[0], 3 - q)], 1)
    lo, hi = torch.quantile(P[:: max(1, P.shape[0] // 100_000)], torch.tensor([0.01, 0.99], dtype=P.dtype), dim=0)
    P = ((P - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    out = P.reshape(n, H, W, 3).float().numpy()
    return out[0] if single else out


#: the colour map of every eigenvector image (per-image panels and the data-set grid alike)
CMAP = "viridis"


def _to_display(image) -> np.ndarray:
    if isinstance(image, Tensor):
        return image.permute(1, 2, 0).clamp(0, 1).cpu().numpy()
    return np.asarray(image)


def _size(image) -> tuple[int, int]:
    """``(height, width)`` of a PIL image, an array or a ``(3, h, w)`` tensor."""
    if isinstance(image, Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    if hasattr(image, "size") and not isinstance(image, np.ndarray):
        w, h = image.size
        return int(h), int(w)
    a = np.asarray(image)
    return int(a.shape[0]), int(a.shape[1])


def _aspect(image, grid: tuple[int, int]) -> float:
    """``imshow``'s ``aspect`` that draws an ``(H, W)`` grid with the image's shape (the grid
    covers the whole image, which was squashed to a square on the way in)."""
    h, w = _size(image)
    H, W = grid
    return (h / w) * (W / H)


def _scaled(E: Tensor) -> Tensor:
    """``(n, K, H, W)`` → each eigenvector ``k`` scaled to [0, 1] by its 1st–99th percentile over
    all images and pixels (so one colour bar reads every panel)."""
    X = E.transpose(0, 1).reshape(E.shape[1], -1).float()
    X = X[:, :: max(1, X.shape[1] // 200_000)]
    lo = torch.quantile(X, 0.01, dim=1)[None, :, None, None]
    hi = torch.quantile(X, 0.99, dim=1)[None, :, None, None]
    return ((E.float() - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)


def _colour_bar(fig, axes, label: str = "eigenvector value (1st → 99th percentile)"):
    import matplotlib as mpl

    bar = fig.colorbar(mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(0, 1), cmap=CMAP), ax=axes,
                       fraction=0.025, pad=0.01)
    bar.set_ticks([0, 0.5, 1])
    bar.set_ticklabels(["low", "", "high"])
    bar.set_label(label, fontsize=9)
    return bar


def eigenvector_panel(image, eigvecs: Tensor, n_vectors: int = 12, title: str | None = None):
    """One image: the input, a PCA-to-RGB view and its first ``n_vectors`` eigenvectors, each drawn
    with the image's shape and one colour map (:data:`CMAP`, with a colour bar).

    ``image``: PIL image or ``(3, h, w)`` tensor; ``eigvecs``: ``(K, H, W)``.
    """
    plt = _plt()
    n = min(n_vectors, eigvecs.shape[0])
    h, w = _size(image)
    cols = 5
    rows = int(np.ceil((n + 2) / cols))
    cell_h = 2.4 * min(1.6, max(0.5, h / w))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols + 0.6, cell_h * rows + 0.5), squeeze=False)
    axes = axes.ravel()
    aspect = _aspect(image, eigvecs.shape[-2:])
    axes[0].imshow(_to_display(image))
    axes[0].set_title("input", y=1.0)
    axes[1].imshow(pca_rgb(eigvecs), aspect=aspect)
    axes[1].set_title("PCA → RGB", y=1.0)
    E = _scaled(eigvecs[None, :n].cpu())[0]
    for c in range(n):
        axes[c + 2].imshow(E[c].numpy(), cmap=CMAP, vmin=0, vmax=1, aspect=aspect)
        axes[c + 2].set_title(f"eigenvector {c}", y=1.0)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    _colour_bar(fig, list(axes))
    return fig


def eigenvector_grid(images: Sequence, eigvecs: Tensor, n_vectors: int = 15, max_images: int = 8,
                     names: Sequence[str] | None = None):
    """Data-set view: one row per image (up to ``max_images``, named on the left), the input then
    its leading ``n_vectors`` eigenvectors, each with the image's shape. Each eigenvector uses one
    colour scale across all rows (its 1st–99th percentile over the images shown), so the same
    channel can be compared between images; the colour bar reads every column."""
    plt = _plt()
    m = min(max_images, len(images), eigvecs.shape[0])
    n = min(n_vectors, eigvecs.shape[1])
    E = _scaled(eigvecs[:m, :n].cpu())
    fig, axes = plt.subplots(m, n + 1, figsize=(1.3 * (n + 1) + 2.2, 1.35 * m + 0.6), squeeze=False)
    for i in range(m):
        aspect = _aspect(images[i], eigvecs.shape[-2:])
        axes[i, 0].imshow(_to_display(images[i]))
        for c in range(n):
            axes[i, c + 1].imshow(E[i, c].numpy(), cmap=CMAP, vmin=0, vmax=1, aspect=aspect)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
    axes[0, 0].set_title("input", fontsize=11, y=1.0)
    for c in range(n):
        axes[0, c + 1].set_title(f"{c}", fontsize=11, y=1.0)
    for i in range(m):
        name = str(names[i]) if names is not None and i < len(names) else f"image {i}"
        axes[i, 0].set_ylabel(name if len(name) <= 18 else name[:8] + "…" + name[-8:], fontsize=9, rotation=0,
                              ha="right", va="center")
    fig.subplots_adjust(wspace=0.04, hspace=0.06, left=0.12, right=0.9, top=0.93, bottom=0.02)
    fig.suptitle("leading eigenvectors (columns) of the first images (rows)", fontsize=11)
    _colour_bar(fig, list(axes.ravel()))
    return fig


def finish(fig, path: str | Path | None, title: str | None = None, dpi: int = 100):
    """Give ``fig`` its ``title``, then :func:`save` it to ``path`` (returning the path), or return
    the figure itself when ``path`` is ``None``."""
    if title:
        fig.suptitle(title)
    return fig if path is None else save(fig, path, dpi=dpi)


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as PNG (atomically: a reader never sees half a file) and close it."""
    from ldsc.atomic import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        _plt().close(fig)
    return path
