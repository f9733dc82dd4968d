"""The clustering network's own view of an image, beside ldsc's: FEC's clusters of every stage
chained down to the pixels (the view of the FEC paper), and the eigenvector segmentation.

FEC's stem turns each 4 × 4 patch into a point of the first grid; each cluster pooling merges the
points of its input grid into the centres of a grid half as fine. Following a pixel through the
poolings — its patch, the centre that patch joined, the centre *that* joined, … — gives, after each
pooling, a segmentation of the pixels into (at most) that grid's number of clusters: 784, 196 and 49
at 224 px for the official variants.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def chain_to_pixels(first_grid: tuple[int, int], assignments: Sequence, size: tuple[int, int]) -> list[np.ndarray]:
    """Each pooling's clusters as an ``(H, W)`` label map of the pixels.

    Args:
        first_grid: ``(h, w)`` of the first pooling's input (the stem's grid of patches).
        assignments: per pooling, in order, the ``(h_s, w_s)`` index of the centre each point of its
            input grid joined (row-major over the next grid, which is the next pooling's input).
        size: ``(H, W)`` pixels of the image the labels are drawn on (the part the network saw).
    Returns:
        one ``(H, W)`` int64 label map per pooling: the centre each pixel ends in after it.
    """
    h, w = first_grid
    H, W = size
    token = (np.arange(H) * h // H)[:, None] * w + (np.arange(W) * w // W)[None, :]  # the patch of each pixel
    out = []
    for a in assignments:
        token = np.asarray(a).reshape(-1)[token]
        out.append(token.astype(np.int64))
    return out


def overlay_labels(image: np.ndarray, labels: np.ndarray, alpha: float = 0.6, seed: int = 0) -> np.ndarray:
    """``labels`` (``(H, W)``, any ids) in distinct colours over ``image`` (``(H, W, 3)``), with the
    segments' borders drawn."""
    from ldsc.evaluation.segment_viz import instance_colors

    img = np.asarray(image, dtype=np.float32)
    img = img / 255.0 if img.max() > 1.0 else img
    ids, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(labels.shape)
    colours = instance_colors(len(ids), seed)[dense]
    out = (1 - alpha) * img + alpha * colours
    border = np.zeros(labels.shape, dtype=bool)
    border[:-1] |= labels[:-1] != labels[1:]
    border[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    out[border] = 1.0
    return np.clip(out, 0, 1)


def cluster_stages_figure(image, stage_labels: Sequence[np.ndarray], segmentation: np.ndarray,
                          path: str | Path | None = None, title: str | None = None):
    """One row: the input, each pooling's clusters chained to the pixels (:func:`chain_to_pixels`),
    and ldsc's k-means segmentation of the eigenvectors (stretched to the image)."""
    from ldsc.evaluation.segment_viz import _plt, resize_nearest

    plt = _plt()
    img = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    H, W = img.shape[:2]
    panels = [(img, "input")]
    for s, labels in enumerate(stage_labels, start=1):
        panels.append((overlay_labels(img, labels), f"FEC: after pooling {s} ({len(np.unique(labels))} clusters)"))
    seg = resize_nearest(np.asarray(segmentation), (H, W))
    panels.append((overlay_labels(img, seg), f"ldsc: eigenvector k-means (k={len(np.unique(seg))})"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2 * H / W + 0.8), layout="constrained")
    for ax, (a, name) in zip(np.atleast_1d(axes), panels):
        ax.imshow(a, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    from ldsc.evaluation.figures import finish

    return finish(fig, path, title)
