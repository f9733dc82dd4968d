"""Segmentation figures: the paper's four-panel figure and a confusion matrix.

matplotlib is imported lazily with the Agg backend, so importing this module is cheap and works
without a display. Everything is drawn at the input image's own resolution: the base-grid
eigenvectors, masks and segmentations are stretched back over the whole image, which is what
the data pipeline squashed to its square input (see ``ldsc.evaluate`` for the same geometry).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def resize_nearest(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of the first two axes of ``a`` to ``size = (H, W)``
    (labels, masks: no new values are invented)."""
    H, W = size
    h, w = a.shape[:2]
    rows = np.minimum((np.arange(H) + 0.5) * h / H, h - 1).astype(np.int64)
    cols = np.minimum((np.arange(W) + 0.5) * w / W, w - 1).astype(np.int64)
    return a[rows][:, cols]


def embedding_rgb(eigvecs) -> np.ndarray:
    """``(K, h, w)`` -> ``(h, w, 3)``: :func:`ldsc.evaluation.figures.pca_rgb` of the eigenvectors without the
    near-constant channel 0 (as in the paper's figure)."""
    import torch

    from ldsc.evaluation.figures import pca_rgb

    E = torch.as_tensor(np.asarray(eigvecs, dtype=np.float32))
    return pca_rgb(E[1:] if E.shape[0] > 1 else E)


def instance_colors(n: int, seed: int = 0) -> np.ndarray:
    """``(n, 3)`` distinct, saturated RGB colours in ``[0, 1]`` (golden-angle hues)."""
    import colorsys

    offset = np.random.default_rng(seed).uniform()
    return np.array([colorsys.hsv_to_rgb((offset + 0.618034 * i) % 1.0, 0.85, 0.95)
                     for i in range(n)]).reshape(n, 3)


def draw_instances(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    alpha: float = 0.45,
    outline: int = 2,
    boxes: bool = True,
    seed: int = 0,
) -> np.ndarray:
    """Coloured, outlined instance masks over an image.

    Args:
        image: ``(H, W, 3)`` uint8 or float in ``[0, 1]``.
        masks: boolean masks, best first, at any resolution (stretched to the image).
        alpha: opacity of the fill; outline: outline width in pixels; boxes: draw bounding boxes
            in the mask's colour (as the paper's figure does).
    Returns:
        ``(H, W, 3)`` float image in ``[0, 1]``. Masks are painted worst first, so the best
        mask is on top.
    """
    from scipy import ndimage

    out = np.asarray(image, dtype=np.float32)
    if out.max() > 1.0:
        out = out / 255.0
    out = out.copy()
    H, W = out.shape[:2]
    colors = instance_colors(len(masks), seed)
    for i in reversed(range(len(masks))):
        m = resize_nearest(np.asarray(masks[i], dtype=bool), (H, W))
        if not m.any():
            continue
        c = colors[i]
        out[m] = (1 - alpha) * out[m] + alpha * c
        edge = m & ~ndimage.binary_erosion(m, iterations=outline)
        out[edge] = c
        if boxes:
            ys, xs = np.nonzero(m)
            y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
            t = max(1, outline // 2)
            out[y0:y0 + t, x0:x1 + 1] = c
            out[y1 - t + 1:y1 + 1, x0:x1 + 1] = c
            out[y0:y1 + 1, x0:x0 + t] = c
            out[y0:y1 + 1, x1 - t + 1:x1 + 1] = c
    return np.clip(out, 0, 1)


def four_panel_figure(
    image,
    eigvecs,
    masks: Sequence[tuple[np.ndarray, float]] | Sequence[np.ndarray],
    segmentation: np.ndarray,
    path: str | Path | None = None,
    title: str | None = None,
    max_masks: int = 12,
):
    """The paper's single-image figure: input, PCA-to-RGB of the embedding, instance masks over
    the image, and the k-means segmentation.

    Args:
        image: PIL image or ``(H, W, 3)`` array (the original image).
        eigvecs: ``(K, h, w)`` eigenvectors of the image.
        masks: output of :func:`ldsc.evaluation.segment.instance_masks` (or bare masks), best first.
        segmentation: ``(h, w)`` label map, e.g. :func:`ldsc.evaluation.segment.segment_image`.
        path: where to save the PNG (the figure is closed and the path returned); ``None``
            returns the figure.
    """
    plt = _plt()
    img = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    H, W = img.shape[:2]
    bare = [m[0] if isinstance(m, tuple) else m for m in masks][:max_masks]
    seg = resize_nearest(np.asarray(segmentation), (H, W))
    k = len(np.unique(seg))
    panels = [
        (img, "input"),
        (resize_nearest(embedding_rgb(eigvecs), (H, W)), "PCA of eigenvectors"),
        (draw_instances(img, bare), f"instance masks ({len(bare)})"),
        (seg, f"k-means segmentation (k={k})"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(8, 8 * H / W + 1.0), layout="constrained")
    for ax, (a, name) in zip(axes.ravel(), panels):
        if a.ndim == 2:
            ax.imshow(a, cmap="tab10" if k <= 10 else "tab20", interpolation="nearest",
                      vmin=0, vmax=(9 if k <= 10 else 19))
        else:
            ax.imshow(a, interpolation="nearest")
        ax.set_title(name)
        ax.set_axis_off()
    from ldsc.evaluation.figures import finish

    return finish(fig, path, title)


def confusion_figure(
    confusion: np.ndarray,
    class_names: Sequence[str] | None = None,
    path: str | Path | None = None,
    title: str = "confusion (rows: ground truth, normalised)",
):
    """Row-normalised confusion matrix (rows = ground truth, columns = matched prediction)."""
    plt = _plt()
    C = np.asarray(confusion, dtype=np.float64)
    n = C.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    R = C / np.maximum(C.sum(1, keepdims=True), 1)
    side = max(4.0, 0.32 * n + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(R, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90, fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("prediction (matched cluster)")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    from ldsc.evaluation.figures import finish

    return finish(fig, path)
