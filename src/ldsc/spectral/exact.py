"""The exact reference (docs/method.md, Exact reference): the operator as one scipy matrix and its
leading eigenpairs by ``scipy.sparse.linalg.eigsh``."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ldsc.graphs.knn import LayerGraph
from ldsc.graphs.normalize import inverse_sqrt_degree
from ldsc.spectral.operator import pool_operator, unflatten_channels


def _scipy(t: Tensor):
    import scipy.sparse as sp

    t = t.coalesce().cpu()
    i, j = t.indices().numpy()
    return sp.csr_matrix((t.values().double().numpy(), (i, j)), shape=tuple(t.shape))


def _symmetric_normalized(W: Tensor):
    """``S = D^{-1/2} W D^{-1/2}`` in float64 scipy CSR (degrees recomputed in float64, so ``S`` is
    symmetric to rounding: ``eigsh`` assumes it)."""
    import scipy.sparse as sp

    Ws = _scipy(W)
    d = np.asarray(Ws.sum(1)).ravel()
    dinv = inverse_sqrt_degree(d)
    D = sp.diags(dinv)
    return (D @ Ws @ D).tocsr()


def exact_operator(
    graphs: Sequence[LayerGraph],
    base: tuple[int, int],
    image_index: Sequence[int] | Tensor | None = None,
    n_images: int | None = None,
    scale: float = 1.0,
):
    """The exact reference ``M = Σ_l w_l U_lᵀ S_l U_l`` (docs/method.md, Exact reference) as a scipy CSR matrix.

    Args:
        graphs: layer graphs of one batch (nodes ``(b, y, x)`` of that batch's images).
        base: base grid ``(H, W)``.
        image_index: global index of each of the batch's images (default ``0..B-1``), so graphs
            of several batches can be summed into one data-set operator.
        n_images: total images of the operator (default ``max(image_index) + 1``).
        scale: multiplies the result (e.g. ``1/len(graphs)`` to average).

    Returns:
        ``(n_images·H·W, n_images·H·W)`` symmetric ``scipy.sparse.csr_matrix``.
    """
    import scipy.sparse as sp

    H, W = base
    hw = H * W
    M = None
    for g in graphs:
        B = g.n_images
        idx = np.arange(B) if image_index is None else np.asarray(torch.as_tensor(image_index).cpu())
        n = int(n_images if n_images is not None else idx.max() + 1)
        U = _scipy(pool_operator(base, g.grid))  # (hw_l, HW)
        # block-diagonal pooling, mapped to the global image slots
        Ub = sp.kron(sp.eye(B, format="csr"), U, format="csr")  # (B·hw_l, B·HW)
        cols = (idx[:, None] * hw + np.arange(hw)[None, :]).ravel()
        sel = sp.csr_matrix((np.ones(B * hw), (np.arange(B * hw), cols)), shape=(B * hw, n * hw))
        Ug = (Ub @ sel).tocsr()  # (N_l, n·HW)
        S = g.sym_scipy() if hasattr(g, "sym_scipy") else _symmetric_normalized(g.W)
        term = (Ug.T @ S @ Ug) * (g.weight * scale)
        M = term if M is None else M + term
    return M.tocsr()


def exact_eigenvectors(
    graphs: Sequence[LayerGraph],
    base: tuple[int, int],
    K: int,
    image_index: Sequence[int] | Tensor | None = None,
    n_images: int | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """The exact reference (docs/method.md, Exact reference): the ``K`` largest eigenpairs of :func:`exact_operator`.

    Returns ``(values (K,), Z (n_images, K, H, W))``, float64, by decreasing eigenvalue; ``Z`` has
    orthonormal columns over all pixels of all images.
    """
    H, W = base
    M = exact_operator(graphs, base, image_index=image_index, n_images=n_images)
    vals, vecs = top_eigenvectors(M, K, seed=seed)
    n = M.shape[0] // (H * W)
    return torch.from_numpy(vals.copy()), unflatten_channels(torch.from_numpy(vecs.copy()), n, H, W)


def top_eigenvectors(M, K: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``K`` largest eigenpairs of a symmetric sparse matrix, by ``scipy.sparse.linalg.eigsh``.

    Returns ``(values (K,), vectors (n, K))`` sorted by decreasing eigenvalue.
    """
    from scipy.sparse.linalg import eigsh

    n = M.shape[0]
    if K >= n:
        raise ValueError(f"K={K} must be smaller than the operator size {n}")
    v0 = np.random.default_rng(seed).standard_normal(n)
    vals, vecs = eigsh(M, k=K, which="LA", v0=v0)
    order = np.argsort(-vals)
    return vals[order], vecs[:, order]
