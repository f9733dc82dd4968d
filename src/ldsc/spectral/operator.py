"""The layer-distributed operator ``M = Σ_l w_l U_lᵀ S_l U_l`` (docs/method.md, Exact reference): the
layer views of pseudo-eigenvectors (pooling to each layer's grid) and the operator applied as sparse
products.

Conventions: pseudo-eigenvectors of a batch are ``Z`` of shape ``(B, K, H, W)`` on the base grid;
"flattened" they are ``(B·H·W, K)`` rows ordered ``(b, y, x)``, the same order graph nodes use.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ldsc.distributed import all_gather_rows, shard, shard_bounds
from ldsc.graphs.dataset import DatasetGraph, Workspace
from ldsc.graphs.knn import LayerGraph


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



def pool_matrix(base: tuple[int, int], grid: tuple[int, int], dtype: torch.dtype = torch.float32,
                device=None) -> Tensor | None:
    """``U_l`` as CSR for a grid that does not divide the base grid, ``None`` for one that does
    (then :func:`pool_rows` pools by a reshape and a mean)."""
    if base[0] % grid[0] == 0 and base[1] % grid[1] == 0:
        return None
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return pool_operator(base, grid).to(device=device, dtype=dtype).to_sparse_csr()


def pool_rows(X: Tensor, base: tuple[int, int], grid: tuple[int, int], n_images: int, U: Tensor | None) -> Tensor:
    """``U_l X`` up to a factor: ``(B·H·W, m)`` rows -> ``(B·h·w, m)`` layer rows. For grids that
    divide the base grid, the mean over each window (``U_l X / √area``, undone by
    :func:`add_unpooled`); otherwise ``U`` (:func:`pool_operator` as CSR) applied per image."""
    (H, W), (h, w), B, m = base, grid, n_images, X.shape[1]
    if U is None:
        fy, fx = H // h, W // w
        if fy == fx == 1:
            return X
        X6 = X.reshape(B, h, fy, w, fx, m)
        out = X6[:, :, 0, :, 0].clone()
        for i in range(fy):  # a sum of strided slices: much faster than .mean((2, 4))
            for j in range(fx):
                if i or j:
                    out += X6[:, :, i, :, j]
        return out.div_(fy * fx).reshape(B * h * w, m)
    Xi = X.reshape(B, H * W, m).permute(1, 0, 2).reshape(H * W, B * m)
    return (U @ Xi).reshape(h * w, B, m).permute(1, 0, 2).reshape(B * h * w, m)


def add_unpooled(out: Tensor, Y: Tensor, base: tuple[int, int], grid: tuple[int, int], n_images: int,
                 U: Tensor | None, weight: float) -> None:
    """``out += weight · U_lᵀ Y`` (``Y`` ``(B·h·w, m)``, ``out`` ``(B·H·W, m)``; see :func:`pool_rows`):
    for divisible grids a broadcast add of each layer value onto its pixels (no upsampled copy)."""
    (H, W), (h, w), B, m = base, grid, n_images, Y.shape[1]
    if U is None:
        out.view(B, h, H // h, w, W // w, m).add_(Y.view(B, h, 1, w, 1, m), alpha=weight)
        return
    Yi = Y.reshape(B, h * w, m).permute(1, 0, 2).reshape(h * w, B * m)
    up = (U.transpose(0, 1) @ Yi).reshape(H * W, B, m).permute(1, 0, 2).reshape(B * H * W, m)
    out.add_(up, alpha=weight)


class LayerOperator:
    """``M = Σ_l w_l U_lᵀ S_l U_l`` of one batch's graphs (docs/method.md, Exact reference), applied as sparse products.

    The torch twin of :func:`exact_operator` (same matrix; never formed): ``S_l`` are kept as CSR,
    and ``U_l`` is a reshape-and-mean when ``h_l, w_l`` divide ``H, W`` (then
    ``U_lᵀ S_l U_l z = upsample(S_l · avgpool(z))``), the sparse :func:`pool_operator` otherwise.

    Args:
        graphs: layer graphs of one batch of ``B`` images (nodes ``(b, y, x)``).
        base: base grid ``(H, W)``.
        dtype: dtype of ``S_l`` and of the vectors it is applied to.

    Calling it maps ``X`` ``(B·H·W, m)`` (rows ``(b, y, x)``) to ``M X`` of the same shape.
    ``shift`` is ``Σ_l w_l``, a bound on ``|λ(M)|``: ``M + shift·I`` is positive semi-definite.

    Sharded graphs (a run on several processes: each :class:`~ldsc.graphs.dataset.DatasetGraph` holds the
    rows of its ``image_range`` only) make a sharded operator: ``X`` and ``M X`` are this process's
    images' rows; each layer's pooled rows are all-gathered (``N_l × m`` dense floats) before
    the product with the local rows of ``S_l``.
    """

    def __init__(self, graphs: Sequence[LayerGraph], base: tuple[int, int], dtype: torch.dtype = torch.float32):
        if not graphs:
            raise ValueError("LayerOperator needs at least one graph")
        self.base = (int(base[0]), int(base[1]))
        self.n_images = graphs[0].n_images
        first, last = getattr(graphs[0], "image_range", None) or (0, self.n_images)
        #: the images whose rows this operator maps (all of them unless sharded)
        self.image_range = (int(first), int(last))
        self.local_images = self.image_range[1] - self.image_range[0]
        self.sharded = self.local_images != self.n_images
        bounds = shard_bounds(self.n_images) if self.sharded else [0, self.n_images]
        if self.sharded and shard(self.n_images) != self.image_range:
            raise ValueError(f"graph rows {self.image_range} are not this process's shard of {self.n_images} images")
        self.terms = []
        for g in graphs:
            if g.n_images != self.n_images:
                raise ValueError(f"graph {g.name} has {g.n_images} images, expected {self.n_images}")
            h, w = g.grid
            blocks = [(s, S if S.dtype == dtype else S.to(dtype)) for s, S in g.sym_blocks()]
            U = pool_matrix(self.base, g.grid, dtype, blocks[0][1].device)
            counts = [(b - a) * h * w for a, b in zip(bounds[:-1], bounds[1:])]
            self.terms.append((g, blocks, (h, w), float(g.weight), U, counts))
        self.shift = float(sum(t[3] for t in self.terms))
        self.size = self.local_images * self.base[0] * self.base[1]
        self.work = Workspace()

    def pool(self, X: Tensor, grid: tuple[int, int], U: Tensor | None) -> Tensor:
        """``U_l X`` of this operator's rows (:func:`pool_rows`)."""
        return pool_rows(X, self.base, grid, self.local_images, U)

    def add_unpooled(self, out: Tensor, Y: Tensor, grid: tuple[int, int], U: Tensor | None, weight: float) -> None:
        """``out += weight · U_lᵀ Y`` (:func:`add_unpooled`)."""
        add_unpooled(out, Y, self.base, grid, self.local_images, U, weight)

    #: ``op(X, out=block)`` writes ``M X`` into ``block`` (:func:`~ldsc.spectral.lobpcg.lobpcg_step` reuses its blocks)
    accepts_out = True

    def __call__(self, X: Tensor, out: Tensor | None = None) -> Tensor:
        """``M X``, into ``out`` when given. The layers' node-order copies and products are blocks
        of a :class:`~ldsc.graphs.dataset.Workspace` kept from call to call (whole-data-set graphs)."""
        out = torch.zeros_like(X) if out is None else out.zero_()
        for g, blocks, grid, weight, U, counts in self.terms:
            pooled = self.pool(X, grid, U)
            if self.sharded:  # every layer node's row, for the products with this shard's rows of S_l
                pooled = all_gather_rows(pooled, counts)
            if isinstance(g, DatasetGraph):
                product = g.apply(pooled, blocks, work=self.work)
            else:
                product = g.apply(pooled, blocks)
            self.add_unpooled(out, product, grid, U, weight)
        return out


