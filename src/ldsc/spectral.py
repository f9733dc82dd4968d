"""Pooling, the paper's objective, the exact reference operator and subspace alignment (DESIGN §3–4).

Pure tensor code: nothing here knows about Lightning or Hydra.

Conventions: pseudo-eigenvectors of a batch are ``Z`` of shape ``(B, K, H, W)`` on the base grid;
"flattened" they are ``(B·H·W, K)`` rows ordered ``(b, y, x)``, the same order graph nodes use.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ldsc.graphs import LayerGraph


def flatten_channels(Z: Tensor) -> Tensor:
    """``(B, K, H, W)`` -> ``(B·H·W, K)`` ordered ``(b, y, x)``."""
    B, K, H, W = Z.shape
    return Z.permute(0, 2, 3, 1).reshape(B * H * W, K)


def unflatten_channels(X: Tensor, n_images: int, H: int, W: int) -> Tensor:
    """``(B·H·W, K)`` -> ``(B, K, H, W)``; inverse of :func:`flatten_channels`."""
    return X.reshape(n_images, H, W, -1).permute(0, 3, 1, 2).contiguous()


def layer_pool(Z: Tensor, grid: tuple[int, int]) -> Tensor:
    """The layer view ``g_l(Z)``: adaptive average pooling of ``(B, K, H, W)`` to ``grid``,
    flattened to ``(B·h·w, K)``."""
    pooled = Z if tuple(Z.shape[-2:]) == tuple(grid) else F.adaptive_avg_pool2d(Z, grid)
    return flatten_channels(pooled)


def paper_objective(
    Z: Tensor,
    graphs: Sequence[LayerGraph],
    eig_weight: float = 1.0,
    orth_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The paper's loss for one batch.

    ``loss = eig_weight · mean_{l,c} w_l |F̂_cᵀ P_l F̂_c − 1| + orth_weight · mean_l w_l mean_{c≠c'} (F̂ᵀF̂)²_{cc'}``
    with ``F̂`` the column-normalised layer view of ``Z`` (``(B, K, H, W)``).

    Returns the scalar loss and a dict of detached diagnostics: ``eig`` (the weighted eigenvalue
    term), ``orth`` (the weighted orthogonality term), ``residual`` (mean ``|λ − 1|``, unweighted)
    and ``eigenvalues`` (``(K,)``, mean over layers).
    """
    K = Z.shape[1]
    eig_terms, orth_terms, lams = [], [], []
    off = ~torch.eye(K, dtype=torch.bool, device=Z.device)
    for g in graphs:
        Fl = F.normalize(layer_pool(Z, g.grid), dim=0)  # (N, K), unit columns
        PF = torch.sparse.mm(g.P, Fl)
        lam = (Fl * PF).sum(0)  # (K,)  Rayleigh quotients F̂ᵀ P F̂
        gram = Fl.T @ Fl
        eig_terms.append(g.weight * (lam - 1).abs())
        orth_terms.append(g.weight * gram[off].pow(2).mean() if K > 1 else Z.new_zeros(()))
        lams.append(lam)
    eig = torch.stack(eig_terms).mean()
    orth = torch.stack(orth_terms).mean()
    loss = eig_weight * eig + orth_weight * orth
    lam = torch.stack(lams).detach()
    stats = {"eig": eig.detach(), "orth": orth.detach(), "residual": (lam - 1).abs().mean(),
             "eigenvalues": lam.mean(0)}
    return loss, stats


def pool_operator(base: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """``U``: the average-pooling operator from ``base`` to ``grid`` as sparse COO ``(h·w, H·W)``,
    rows scaled to unit norm so that ``U Uᵀ = I`` when ``grid`` divides ``base``.

    Windows follow :func:`torch.nn.functional.adaptive_avg_pool2d`
    (``[floor(i·H/h), ceil((i+1)·H/h))``), so ``U`` agrees with :func:`layer_pool` up to scale.
    """
    H, W = base
    h, w = grid

    def windows(n_out: int, n_in: int) -> list[range]:
        return [range((i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)) for i in range(n_out)]

    rows, cols, vals = [], [], []
    for i, ys in enumerate(windows(h, H)):
        for j, xs in enumerate(windows(w, W)):
            area = len(ys) * len(xs)
            for y in ys:
                for x in xs:
                    rows.append(i * w + j)
                    cols.append(y * W + x)
                    vals.append(area**-0.5)
    idx = torch.tensor([rows, cols], dtype=torch.long)
    return torch.sparse_coo_tensor(idx, torch.tensor(vals), (h * w, H * W), check_invariants=False).coalesce()


def _scipy(t: Tensor):
    import scipy.sparse as sp

    t = t.coalesce().cpu()
    i, j = t.indices().numpy()
    return sp.csr_matrix((t.values().double().numpy(), (i, j)), shape=tuple(t.shape))


def exact_operator(
    graphs: Sequence[LayerGraph],
    base: tuple[int, int],
    image_index: Sequence[int] | Tensor | None = None,
    n_images: int | None = None,
    scale: float = 1.0,
):
    """The exact reference ``M = Σ_l w_l U_lᵀ S_l U_l`` (DESIGN §4) as a scipy CSR matrix.

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
        term = (Ug.T @ _scipy(g.sym()) @ Ug) * (g.weight * scale)
        M = term if M is None else M + term
    return M.tocsr()


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


def subspace_alignment(Z: Tensor | np.ndarray, ref: Tensor | np.ndarray) -> float:
    """Mean ``cos²`` of the principal angles between ``span(Z)`` and ``span(ref)``.

    Both are ``(n, K)`` (or ``(B, K, H, W)``, flattened with :func:`flatten_channels`). The mean is
    over the ``K_ref`` reference directions, so 1.0 means ``span(Z)`` contains the reference.
    """
    Z, ref = (torch.as_tensor(a, dtype=torch.float64) for a in (Z, ref))
    if Z.dim() == 4:
        Z = flatten_channels(Z)
    if ref.dim() == 4:
        ref = flatten_channels(ref)
    if Z.shape[0] != ref.shape[0]:
        raise ValueError(f"Z has {Z.shape[0]} rows but the reference has {ref.shape[0]}")
    Qz = torch.linalg.qr(Z).Q
    Qr = torch.linalg.qr(ref).Q
    return float((Qr.T @ Qz).pow(2).sum() / ref.shape[1])


def svd_order(Z: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate pseudo-eigenvectors onto their principal axes.

    ``Z`` (``(B, K, H, W)``, all images) is flattened over pixels to ``X = U Σ Vᵀ``; returns
    ``(X V`` reshaped to ``(B, K, H, W)``, ``Σ (K,))``, so channel 0 carries the largest singular
    value. Signs are fixed so each channel's mean is non-negative (stable figures).
    """
    B, K, H, W = Z.shape
    X = flatten_channels(Z.detach().double())
    _, s, Vh = torch.linalg.svd(X, full_matrices=False)
    E = X @ Vh.T
    sign = torch.where(E.mean(0) < 0, -1.0, 1.0).to(E)
    E = E * sign
    return unflatten_channels(E.float(), B, H, W), s.float()
