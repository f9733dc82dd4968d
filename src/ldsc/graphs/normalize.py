"""The one normalisation of the method: ``S = D^{-1/2} W D^{-1/2}`` (docs/method.md, Graphs).

``W`` is a symmetric affinity and ``D`` its row sums; isolated nodes (degree 0) get zero rows, not
infinities. Every graph of the project — batch graphs, whole-data-set graphs (one process or
sharded), the rows of new images, the exact reference — normalises through these two functions
(the compiled symmetrisation, :func:`ldsc.graphs.kernels.symmetrize_lists`, applies the same
formula in its own loop and takes its ``d^{-1/2}`` from :func:`inverse_sqrt_degree`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def inverse_sqrt_degree(degree: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """``d^{-1/2}`` per node, ``0`` where ``d = 0`` (numpy or torch, same type and dtype out)."""
    if isinstance(degree, Tensor):
        safe = degree.clamp_min(torch.finfo(degree.dtype).tiny)
        return torch.where(degree > 0, safe.rsqrt(), torch.zeros_like(degree))
    return np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, np.finfo(degree.dtype).tiny)), 0.0).astype(degree.dtype)


def normalized_values(values, rows, cols, dinv_rows, dinv_cols=None):
    """The entries ``w_ij`` of ``W`` (at ``rows``, ``cols``) scaled to ``w_ij d_i^{-1/2} d_j^{-1/2}``;
    ``dinv_cols`` defaults to ``dinv_rows`` (a square ``W``)."""
    dinv_cols = dinv_rows if dinv_cols is None else dinv_cols
    return values * dinv_rows[rows] * dinv_cols[cols]
