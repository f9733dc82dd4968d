"""``solver=exact``: the exact reference (``docs/method.md``, "Exact reference").

The first training step receives the whole data set's graphs from the data module, forms
``M = Σ_l w_l U_lᵀ S_l U_l`` as a scipy sparse matrix (:func:`~ldsc.spectral.exact.exact_operator`) and
writes its top-``K`` eigenvectors (``scipy.sparse.linalg.eigsh``) into the table; the run stops
there. Export and figures then work as for any solver. With ``graph.search=exact`` the graphs
are those of brute-force neighbour search: the reference other solvers are measured against.

Memory: ``M`` has roughly ``Σ_l N_l·k·(H/h_l)²`` non-zeros in float64 (27.6M, ~330 MB, for 101
images at 32×32 with layers 32/16 and 25 + 25 neighbours; eigsh then takes ~10 s on 2 cores), so
``max_tokens`` (base-grid nodes of the whole data set) guards against runs that would not
finish; past it the run stops with one sentence pointing to ``solver=lobpcg``.
"""

from __future__ import annotations

import logging

import torch

from ldsc.solvers.base import EigenSolver
from ldsc.spectral import exact_eigenvectors

log = logging.getLogger(__name__)


class ExactSolver(EigenSolver):
    """Args (besides ``n_images``, ``K``, ``base_size``):
        max_tokens: largest ``n_images · H · W`` accepted (see module docstring).
        seed: seed of eigsh's start vector.
    """

    #: the exported eigenvectors are orthonormal Ritz vectors, ordered by decreasing eigenvalue
    eigenvalue_ordered = True

    def __init__(self, n_images: int, K: int, base_size: int, max_tokens: int = 250_000, seed: int = 0):
        super().__init__(n_images, K, base_size, init_scale=0.0, ema=None)
        self.table.requires_grad_(False)
        self.max_tokens, self.seed = int(max_tokens), int(seed)
        self.register_buffer("eigenvalues", torch.zeros(self.K, dtype=torch.float64))
        self.register_buffer("solved", torch.zeros((), dtype=torch.bool))
        self.automatic_optimization = False

    def configure_optimizers(self):
        return None

    def on_fit_start(self) -> None:
        tokens = self.n_images * self.base_size**2
        if tokens > self.max_tokens:
            from ldsc.errors import ConfigError

            raise ConfigError(
                f"solver=exact: {self.n_images} images at {self.base_size}x{self.base_size} have {tokens} base-grid "
                f"nodes, above solver.max_tokens={self.max_tokens}: use solver=lobpcg (the default), fewer images "
                f"(data.limit) or a smaller base_size, or raise the limit.")

    @torch.no_grad()
    def training_step(self, batch: dict, batch_idx: int):
        if not bool(self.solved):
            self.solve(batch["graphs"])
        self.trainer.should_stop = True  # solved once: no further epochs needed
        self.log("train/eigenvalue_K", self.eigenvalues[-1].float(), batch_size=len(batch["index"]))

    @torch.no_grad()
    def solve(self, graphs) -> None:
        """Write the exact top-``K`` eigenvectors of ``graphs`` (those of every image) into the table."""
        n = graphs[0].n_images
        if n != self.n_images:
            raise ValueError(f"the graphs cover {n} images, the table {self.n_images}")
        vals, Z = exact_eigenvectors([g.to("cpu") for g in graphs], (self.base_size, self.base_size), self.K,
                                     seed=self.seed)
        self.table.copy_(Z.to(self.table))
        self.eigenvalues.copy_(vals)
        self.solved.fill_(True)
        log.info("exact solver: top-%d eigenvalues %.4f .. %.4f", self.K, float(vals[0]), float(vals[-1]))
