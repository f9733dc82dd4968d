"""The paper's objective for one batch (docs/method.md, The paper's objective): trained by gradient
by the ``paper`` solver."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ldsc.graphs.knn import LayerGraph
from ldsc.spectral.operator import layer_pool


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
        PF = g.walk(Fl)  # P_l F̂ (the graph's random walk D⁻¹W)
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
