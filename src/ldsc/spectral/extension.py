"""Out-of-sample extension (Nyström) of fitted eigenvectors to new images (docs/library.md, "New images").

The fitted eigenvectors ``Z`` satisfy ``M Z = Z Λ`` with ``M = Σ_l w_l U_lᵀ S_l U_l``. Had the new
images been part of the fit, their rows ``z`` would satisfy the same equation row by row:

``z Λ = Σ_l w_l U_lᵀ (S_l,nf U_l Z_f + S_l,nn U_l z)``

where ``S_l,nf`` links the new tokens to the fitted ones and ``S_l,nn`` links the new tokens of one
image among themselves (:func:`ldsc.graphs.extension.new_token_rows`). The fitted rows ``Z_f``
stay as they are; ``z`` is the fixed point of this equation, reached from the classical Nyström
term (the fitted part alone, divided by the eigenvalues) by ``iters`` substitutions of the
in-image part. Each image is solved on its own (new images do not link to each other).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ldsc.spectral.operator import add_unpooled, flatten_channels, pool_matrix, pool_rows


def pooled_fitted(Z: Tensor, base: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """The layer view ``U_l Z_f`` of fitted eigenvectors ``(n, K, H, W)`` on ``grid``, as the
    operator pools (``(n·h·w, K)``, rows ``(b, y, x)``)."""
    return pool_rows(flatten_channels(Z), base, grid, Z.shape[0], pool_matrix(base, grid, Z.dtype))


def nystrom(terms: Sequence[tuple], eigenvalues: Tensor, base: tuple[int, int], n_images: int,
            iters: int = 20) -> Tensor:
    """Rows of new images for fitted eigenvectors (see module docstring).

    Args:
        terms: per layer graph ``(grid, weight, S_nn, S_nf, Y_f)``: the new tokens' normalised
            rows among themselves ``(m_l, m_l)`` and to the fitted tokens ``(m_l, N_l)`` (sparse),
            and the fitted layer view ``Y_f = U_l Z_f`` ``(N_l, K)``.
        eigenvalues: ``(K,)`` fitted eigenvalues ``Λ``.
        base: base grid; n_images: new images (``m_l = n_images·h_l·w_l``).
        iters: substitutions of the in-image part after the first (fitted-only) estimate.

    Returns:
        ``(n_images·H·W, K)`` rows ``(b, y, x)``.
    """
    H, W = base
    K = eigenvalues.shape[0]
    lam = eigenvalues.to(torch.float32).clamp_min(1e-12)
    fixed = torch.zeros(n_images * H * W, K)
    pools = []
    for grid, weight, S_nn, S_nf, Y_f in terms:
        U = pool_matrix(base, grid)
        pools.append(U)
        add_unpooled(fixed, S_nf @ Y_f.to(torch.float32), base, grid, n_images, U, weight)
    fixed /= lam
    z = fixed.clone()
    for _ in range(int(iters)):
        inner = torch.zeros_like(z)
        for (grid, weight, S_nn, _, _), U in zip(terms, pools):
            add_unpooled(inner, S_nn @ pool_rows(z, base, grid, n_images, U), base, grid, n_images, U, weight)
        z = fixed + inner / lam
    return z
