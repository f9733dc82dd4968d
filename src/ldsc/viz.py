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


def _to_display(image) -> np.ndarray:
    if isinstance(image, Tensor):
        return image.permute(1, 2, 0).clamp(0, 1).cpu().numpy()
    return np.asarray(image)


def eigenvector_panel(image, eigvecs: Tensor, n_vectors: int = 12, title: str | None = None):
    """One image: the input, its first ``n_vectors`` eigenvectors (grayscale) and a PCA-to-RGB view.

    ``image``: PIL image or ``(3, h, w)`` tensor; ``eigvecs``: ``(K, H, W)``.
    """
    plt = _plt()
    n = min(n_vectors, eigvecs.shape[0])
    cols = 5
    rows = int(np.ceil((n + 2) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.5 * rows))
    axes = np.atleast_1d(axes).ravel()
    axes[0].imshow(_to_display(image))
    axes[0].set_title("input")
    axes[1].imshow(pca_rgb(eigvecs))
    axes[1].set_title("PCA → RGB")
    for c in range(n):
        axes[c + 2].imshow(eigvecs[c].cpu().numpy(), cmap="gray")
        axes[c + 2].set_title(f"eigenvector {c}")
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def eigenvector_grid(images: Sequence, eigvecs: Tensor, n_vectors: int = 15, max_images: int = 8):
    """Data-set view: one row per image (up to ``max_images``), the input then its leading
    ``n_vectors`` eigenvectors. Each eigenvector uses one colour scale across all rows, so the
    same channel can be compared between images."""
    plt = _plt()
    m = min(max_images, len(images), eigvecs.shape[0])
    n = min(n_vectors, eigvecs.shape[1])
    E = eigvecs[:m, :n].cpu()
    lo = torch.quantile(E.transpose(0, 1).reshape(n, -1), 0.01, dim=1)
    hi = torch.quantile(E.transpose(0, 1).reshape(n, -1), 0.99, dim=1)
    fig, axes = plt.subplots(m, n + 1, figsize=(1.3 * (n + 1), 1.35 * m), squeeze=False)
    for i in range(m):
        axes[i, 0].imshow(_to_display(images[i]))
        for c in range(n):
            axes[i, c + 1].imshow(E[i, c].numpy(), cmap="viridis", vmin=float(lo[c]), vmax=float(hi[c]))
            if i == 0:
                axes[i, c + 1].set_title(f"{c}", fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].set_title("input", fontsize=8)
    fig.subplots_adjust(wspace=0.04, hspace=0.04, left=0.01, right=0.99, top=0.95, bottom=0.01)
    return fig


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return path
