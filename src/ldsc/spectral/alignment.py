"""Comparing and presenting eigenvector sets: subspace alignment, principal-axis order, signs."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ldsc.spectral.operator import flatten_channels, unflatten_channels


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


def svd_order(Z: Tensor, keep_order: bool = False) -> tuple[Tensor, Tensor]:
    """Rotate pseudo-eigenvectors onto their principal axes.

    ``Z`` (``(B, K, H, W)``, all images) is flattened over pixels to ``X = U Σ Vᵀ``; returns
    ``(X V`` reshaped to ``(B, K, H, W)``, ``Σ (K,))``, so channel 0 carries the largest singular
    value. With ``keep_order`` (solvers whose output is already orthonormal and ordered by
    eigenvalue, where every singular value is 1 and the SVD's axes would be arbitrary) ``Z`` keeps
    its channels and ``Σ`` is their norms. Either way signs are fixed by :func:`fix_signs`.
    """
    B, K, H, W = Z.shape
    if keep_order:  # channel by channel in place of a copy (no flattened float64 copies of the table)
        E = Z.detach().to(torch.float32, copy=True)
        s = torch.empty(K, dtype=torch.float64)
        for c in range(K):
            ch = E[:, c]
            s[c] = ch.double().norm()
            b, at = divmod(int(ch.abs().argmax()), H * W)  # (b, y, x) order, as fix_signs'
            if ch[b, at // W, at % W] < 0:  # fix_signs' rule, on this channel
                ch.neg_()
        return E, s.float()
    X = flatten_channels(Z.detach().double())
    _, s, Vh = torch.linalg.svd(X, full_matrices=False)
    E = X @ Vh.T
    return unflatten_channels(fix_signs(E).float(), B, H, W), s.float()


def fix_signs(E: Tensor) -> Tensor:
    """Flip the columns of ``E`` ``(n, K)`` so that each one's entry of largest magnitude is
    positive: stable figures and reproducible files (the mean, the obvious choice, is ~0 for
    every eigenvector orthogonal to the constant one, so rounding would decide it)."""
    peak = E.gather(0, E.abs().argmax(0, keepdim=True))[0]
    return E * torch.where(peak < 0, -1.0, 1.0).to(E)
