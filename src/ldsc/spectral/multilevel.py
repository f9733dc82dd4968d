"""A multilevel start for LOBPCG: solve the coarse layers' problem first, then refine.

The operator ``M = Σ_l w_l U_lᵀ S_l U_l`` (:class:`~ldsc.spectral.operator.LayerOperator`) has one
term per layer graph, each on its own grid. Restricted to the layers whose grid is at most ``g``,
the same construction on the base grid ``g`` is a problem with ``(g / H)²`` of the rows and of
the nonzeros — the coarse layers see the images' layout and most of their grouping already. So
:func:`multilevel_start` solves the problem of the coarsest grid (from the random start), carries
its Ritz vectors to the next grid (nearest-neighbour upsampling), solves that problem from there,
and so on up to the base grid, whose solve then starts from vectors that are close to its answer.

Every level is solved to the same tolerance as the base problem. The answer is the same (the
base problem's converged eigenvectors; only the start differs): on 1,000 images (pixel layers
32², 16², 8²) it took 30 + 12 + 8 iterations on the three grids, 9.6 s, against 23 iterations,
20.2 s, from the random start (docs/benchmarks.md, "Solver").
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ldsc.spectral.lobpcg import converged, lobpcg_iterate, lobpcg_start, orthonormalize, random_start
from ldsc.spectral.operator import LayerOperator

log = logging.getLogger(__name__)


def coarse_grids(graphs: Sequence, base: tuple[int, int]) -> list[tuple[int, int]]:
    """The grids of the coarse levels, coarsest first: every layer grid smaller than ``base`` in
    both directions (each level's problem holds the layers whose grid fits inside it)."""
    grids = {tuple(int(s) for s in g.grid) for g in graphs}
    return sorted((g for g in grids if g[0] < base[0] and g[1] < base[1]), key=lambda g: (g[0] * g[1], g))


def prolong(X: Tensor, n_images: int, grid: tuple[int, int], to: tuple[int, int]) -> Tensor:
    """Rows ``(n_images·h·w, m)`` on ``grid`` -> rows on the finer grid ``to`` (each coarse cell's
    values repeated over the pixels it covers: nearest-neighbour upsampling)."""
    (h, w), m = grid, X.shape[1]
    Z = X.reshape(n_images, h, w, m).permute(0, 3, 1, 2)
    Z = F.interpolate(Z, size=tuple(to), mode="nearest")
    return Z.permute(0, 2, 3, 1).reshape(-1, m).contiguous()


def multilevel_start(graphs: Sequence, base: tuple[int, int], m: int, K: int, tol: float, seed: int,
                     image_range: tuple[int, int], dtype: torch.dtype = torch.float32, max_iters: int = 200,
                     reduce=None, stop: Callable[[], bool] | None = None, device=None) -> Tensor | None:
    """A starting block ``(local rows on base, m)`` for the base problem (see module docstring), or
    ``None`` when no layer is coarser than the base grid (grids with fewer than ``4·m`` nodes in all
    are skipped), or when ``stop()`` said to stop.

    Args:
        graphs: the layer graphs (whole data set, or this process's rows of it: ``image_range``).
        base: the base grid ``(H, W)``; m: block width (``K`` + guard vectors); K, tol: the
            convergence test of every level (:func:`~ldsc.spectral.lobpcg.converged`).
        seed: of the random start of the coarsest level (rows drawn as
            :func:`~ldsc.spectral.lobpcg.random_start` draws them: the same on any number of processes).
        image_range: ``(first, end)`` images whose rows this process holds.
        max_iters: iterations per level at most (a level that has not converged hands on what it has).
        reduce: all-reduce of the small matrices on several processes.
    """
    n_images = int(graphs[0].n_images)
    # a level needs rows to spare beyond the block's columns (a single image's 2x2 grid has 4)
    levels = [g for g in coarse_grids(graphs, base) if n_images * g[0] * g[1] >= 4 * m]
    if not levels:
        return None
    first, last = int(image_range[0]), int(image_range[1])
    local = last - first
    X, prev = None, None
    for grid in levels:
        level = [g for g in graphs if g.grid[0] <= grid[0] and g.grid[1] <= grid[1]]
        op = LayerOperator(level, grid, dtype)
        hw = grid[0] * grid[1]
        if X is None:
            X0 = random_start(seed, slice(first * hw, last * hw), m, dtype)
        else:
            X0 = prolong(X, local, prev, grid)
        X0 = X0.to(device) if device is not None else X0
        theta, X, MX = lobpcg_start(op, orthonormalize(X0, reduce=reduce), reduce)
        P, MP = torch.empty_like(X), torch.empty_like(MX)
        residual = torch.full((m,), float("inf"), dtype=torch.float64, device=theta.device)
        done, _ = lobpcg_iterate(op, X, MX, P, MP, theta, residual, K, tol, max_iters, False, reduce=reduce, stop=stop)
        if done < max_iters and not converged(residual, theta, K, tol):
            return None  # stop() said to stop
        log.info("multilevel start: %dx%d grid (%d layer graph(s)), %d iteration(s)", grid[0], grid[1], len(level), done)
        prev = grid
        del P, MP, MX
    return prolong(X, local, prev, base)
