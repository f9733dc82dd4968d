"""The rows of a fitted layer graph for tokens of *new* images (docs/library.md, "New images").

A fitted whole-data-set graph keeps, per token, what a new token needs to join it without
changing it: the unit vectors (to be searched), the degree ``d_j`` and the *radius* ``r_j`` — the
similarity a token must exceed to enter ``j``'s list of ``k_inter`` inter-image neighbours (the
``k_inter``-th similarity of that list, or the threshold while the list has room).

For the tokens of a new image the same rules as for the fitted graph give:

* ``A_nn``: each new token's ``k_intra`` most similar tokens of its own image (exact);
* ``A_nf``: its ``k_inter`` most similar fitted tokens (through the fitted :class:`TokenIndex`);
* ``A_fn``: the fitted tokens that would list it: ``j`` with ``sim(x_j, y_new) > r_j`` among the
  candidates found by searching the new token among the fitted ones (for ``vv``-like graphs the
  similarity is symmetric and the candidates are the ``A_nf`` hits);

then ``W_nn = (A_nn + A_nnᵀ)/2``, ``W_nf = (A_nf + A_fnᵀ)/2`` (similarities at or below the
threshold dropped), ``d_new`` the row sums of ``[W_nn W_nf]``, and the normalised rows
``S_nn = D_new^{-1/2} W_nn D_new^{-1/2}``, ``S_nf = D_new^{-1/2} W_nf D_f^{-1/2}``. New images never
link to each other, so each new image costs the same however many came before it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ldsc.graphs.normalize import inverse_sqrt_degree
from ldsc.graphs.search import TokenIndex, intra_image_knn


@dataclass
class FittedGraph:
    """What one fitted layer graph keeps for new tokens.

    Attributes:
        name, grid, weight: as the fitted graph (``weight`` includes the average over draws).
        layer: index of the layer in the backbone's output; head: head of a ``heads="separate"``
            graph (else ``None``); draw: the backbone pass it was built from.
        x, y: ``(N, d)`` unit row (query-side) and column (key-side) vectors of the fitted tokens;
            the same tensor for graphs that compare a vector kind with itself (``vv``); ``None``
            in a model saved without them (a CLI run's: they are in its feature store).
        degree: ``(N,)`` row sums of the fitted ``W``; radius: ``(N,)`` (see module docstring).
        projection: ``(D, d)`` the reduction applied to raw vectors before normalising, or ``None``.
    """

    name: str
    grid: tuple[int, int]
    weight: float
    layer: int
    head: int | None
    draw: int
    x: Tensor
    y: Tensor
    degree: Tensor
    radius: Tensor
    projection: Tensor | None = None
    #: whether the graph compares a vector kind with itself (``vv``): then ``x`` is ``y``
    symmetric: bool = True
    _indexes: dict = field(default_factory=dict, repr=False)

    def index(self, side: str, **options) -> TokenIndex:
        """The :class:`TokenIndex` over the fitted ``y`` (``side="y"``) or ``x`` vectors, built once."""
        if self.x is None:
            raise ValueError(f"graph {self.name} was loaded without its fitted token vectors")
        if side not in self._indexes:
            self._indexes[side] = TokenIndex(self.y if side == "y" else self.x, **options)
        return self._indexes[side]

    @property
    def inverse_sqrt_degree(self) -> np.ndarray:
        """``d_j^{-1/2}`` of the fitted tokens (computed once: every step of new images uses it)."""
        if "dinv" not in self._indexes:
            self._indexes["dinv"] = inverse_sqrt_degree(self.degree.double().numpy())
        return self._indexes["dinv"]

    def unit(self, vectors: Tensor) -> Tensor:
        """Raw ``(m, D)`` token vectors of new images -> unit rows comparable with :attr:`x` / :attr:`y`."""
        if self.projection is not None:
            vectors = vectors.float() @ self.projection
        return F.normalize(vectors.float(), dim=-1)


def inter_radius(sim: Tensor, k: int, threshold: float) -> Tensor:
    """Per row of inter-image neighbour similarities ``(N, k')``: the similarity a new token must
    exceed to enter the list — its ``k``-th best when the row holds ``k`` of them above the
    threshold, the threshold otherwise."""
    if k <= 0 or sim.shape[1] == 0:
        return torch.full((sim.shape[0],), float("inf"))
    kept = torch.where(sim > threshold, sim, torch.full_like(sim, float("-inf")))
    full = (kept > float("-inf")).sum(1) >= k
    kth = kept.topk(min(k, kept.shape[1]), dim=1).values[:, -1]
    return torch.where(full, kth, torch.full_like(kth, float(threshold)))


def _csr(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int]):
    import scipy.sparse as sp

    return sp.csr_matrix((vals.astype(np.float64), (rows, cols)), shape=shape)


def new_token_rows(fitted: FittedGraph, xn: Tensor, yn: Tensor, tokens: int, k_intra: int, k_inter: int,
                   threshold: float, index_options: dict | None = None) -> tuple[Tensor, Tensor]:
    """``S_nn`` ``(m, m)`` and ``S_nf`` ``(m, N)`` (torch CSR, float32) for the new tokens of whole
    images (``m = images × tokens``, image-major), from their unit vectors ``xn``, ``yn``
    (see module docstring)."""
    m, n_fit = xn.shape[0], fitted.x.shape[0]
    options = index_options or {}
    parts_nn, parts_nf = [], []
    if k_intra > 0 and tokens > 1:
        idx, sim = intra_image_knn(xn, yn, tokens, k_intra)
        r = np.repeat(np.arange(m), idx.shape[1])
        c, v = idx.reshape(-1).numpy(), sim.reshape(-1).numpy()
        keep = (c >= 0) & (v > threshold)
        A = _csr(r[keep], c[keep], v[keep], (m, m))
        parts_nn.append((A + A.T) * 0.5)
    if k_inter > 0:
        idx, sim = fitted.index("y", **options).search(xn, k_inter)  # A_nf: sim(x_new, y_fit)
        r = np.repeat(np.arange(m), idx.shape[1])
        c, v = idx.reshape(-1).numpy(), sim.reshape(-1).numpy()
        keep = (c >= 0) & (v > threshold)
        parts_nf.append(_csr(r[keep], c[keep], 0.5 * v[keep], (m, n_fit)))
        if not fitted.symmetric:  # candidates j for A_fn: sim(x_fit_j, y_new), searched from the new side
            idx, sim = fitted.index("x", **options).search(yn, k_inter)
            r = np.repeat(np.arange(m), idx.shape[1])
            c, v = idx.reshape(-1).numpy(), sim.reshape(-1).numpy()
        radius = fitted.radius.numpy()
        enters = (c >= 0) & (v > threshold)
        enters[enters] &= v[enters] > radius[c[enters]]
        parts_nf.append(_csr(r[enters], c[enters], 0.5 * v[enters], (m, n_fit)))
    import scipy.sparse as sp

    W_nn = sum(parts_nn[1:], parts_nn[0]) if parts_nn else sp.csr_matrix((m, m))
    W_nf = sum(parts_nf[1:], parts_nf[0]) if parts_nf else sp.csr_matrix((m, n_fit))
    degree = np.asarray(W_nn.sum(1)).ravel() + np.asarray(W_nf.sum(1)).ravel()
    dn = inverse_sqrt_degree(degree)
    df = fitted.inverse_sqrt_degree
    S_nn = sp.diags(dn) @ W_nn @ sp.diags(dn)
    S_nf = sp.diags(dn) @ W_nf @ sp.diags(df)
    return _torch_csr(S_nn), _torch_csr(S_nf)


def _torch_csr(S) -> Tensor:
    S = S.tocsr()
    S.sort_indices()
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(torch.from_numpy(S.indptr.astype(np.int64)),
                                       torch.from_numpy(S.indices.astype(np.int64)),
                                       torch.from_numpy(S.data.astype(np.float32)), size=S.shape)
