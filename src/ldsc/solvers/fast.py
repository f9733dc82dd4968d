"""The default solver: LOBPCG on the whole data set's operator (``docs/method.md``, "Solver").

The data module builds the graphs of *every* image once (intra- and inter-image neighbours over
the whole data set); this solver finds the leading ``K`` eigenvectors of

``M = Σ_l w_l U_lᵀ S_l U_l``  (averaged over draws)

by LOBPCG (:func:`~ldsc.spectral.lobpcg_step`), applied as sparse products
(:class:`~ldsc.spectral.LayerOperator`). The eigenvector table *is* the iterate: a training step
runs ``iters_per_step`` LOBPCG iterations on it, the progress bar shows the residual, and the run
stops once every one of the ``K`` residuals ``‖Mx − θx‖`` is at most ``tol · θ_max``. The
iteration's whole state (the table ``X``, ``MX``, the search directions ``P`` and ``MP``, the Ritz
values) is in the checkpoint, so a run resumed mid-solve continues exactly where it stopped and
ends with the same eigenvectors as an uninterrupted one.

The table holds ``K + oversample`` columns per pixel (the extra "guard" vectors speed up the
convergence of the ``K``-th); only the first ``K`` (the leading Ritz vectors) are exported.
Nothing is learned by gradient: the table has ``requires_grad=False``.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ldsc import interrupt
from ldsc.solvers.base import EigenSolver
from ldsc.spectral import LayerOperator, lobpcg_start, lobpcg_step, orthonormalize, unflatten_channels

log = logging.getLogger(__name__)


class FastSolver(EigenSolver):
    """LOBPCG on the whole-data-set operator, one training step = ``iters_per_step`` iterations.

    Args (besides ``n_images``, ``K``, ``base_size``):
        tol: stop when every residual of the ``K`` leading vectors is at most ``tol × θ_max``.
        iters_per_step: LOBPCG iterations per training step (one step per epoch; a checkpoint
            can be written after each).
        oversample: guard vectors kept beyond ``K`` (more: faster convergence, more memory).
        dtype: ``float32`` (default) or ``float64`` for the table and the products.
        init_scale: std of the random starting table.
    """

    #: the exported eigenvectors are orthonormal Ritz vectors, ordered by decreasing eigenvalue
    eigenvalue_ordered = True

    def __init__(self, n_images: int, K: int, base_size: int, tol: float = 1e-3, iters_per_step: int = 10,
                 oversample: int = 5, dtype: str = "float32", init_scale: float = 1.0):
        super().__init__(n_images, K, base_size, init_scale=init_scale, ema=None, table=False)
        self.m = int(K) + int(oversample)
        self.tol, self.iters_per_step = float(tol), max(1, int(iters_per_step))
        if dtype not in ("float32", "float64"):
            raise ValueError(f"solver.dtype must be 'float32' or 'float64', not {dtype!r}")
        dt = getattr(torch, dtype)
        n = self.n_images * self.base_size**2
        # the iterate, rows ordered (image, y, x): the table of pseudo-eigenvectors
        self.table = torch.nn.Parameter(init_scale * torch.randn(n, self.m, dtype=dt), requires_grad=False)
        for name in ("MX", "P", "MP"):
            self.register_buffer(name, torch.zeros(n, self.m, dtype=dt))
        self.register_buffer("theta", torch.zeros(self.m, dtype=torch.float64))
        self.register_buffer("residual", torch.full((self.m,), float("inf"), dtype=torch.float64))
        self.register_buffer("iterations", torch.zeros((), dtype=torch.long))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))
        self.register_buffer("has_directions", torch.zeros((), dtype=torch.bool))
        self.automatic_optimization = False
        self._operator: tuple | None = None

    def configure_optimizers(self):
        return None  # no gradients: every update is a closed-form eigen-step

    @torch.no_grad()
    def eigenvectors(self) -> Tensor:
        """The leading ``K`` Ritz vectors of all images, ``(n_images, K, H, W)``, on CPU."""
        X = self.table[:, : self.K].float().cpu()
        return unflatten_channels(X, self.n_images, self.base_size, self.base_size)

    def converged(self) -> bool:
        """Whether the ``K`` leading residuals are within ``tol`` (relative to the largest Ritz value)."""
        if not bool(self.started):
            return False
        return bool((self.residual[: self.K] <= self.tol * self.theta.abs().max()).all())

    def relative_residual(self) -> float:
        return float(self.residual[: self.K].max() / self.theta.abs().max().clamp_min(1e-300))

    def operator(self, graphs) -> LayerOperator:
        """The operator of ``graphs`` (built once per graph list)."""
        if self._operator is None or self._operator[0] is not graphs:
            self._operator = (graphs, LayerOperator(graphs, (self.base_size, self.base_size), dtype=self.table.dtype))
        return self._operator[1]

    @torch.no_grad()
    def training_step(self, batch: dict, batch_idx: int):
        graphs = batch["graphs"]
        if graphs[0].n_images != self.n_images:
            raise ValueError(f"the graphs cover {graphs[0].n_images} images, the table {self.n_images}: the fast "
                             f"solver needs the whole data set's graphs (scope 'dataset')")
        op = self.operator(graphs)
        X = self.table.data
        if not bool(self.started):
            X.copy_(orthonormalize(X))
            theta, X, MX = lobpcg_start(op, X)
            self.MX.copy_(MX)
            self.theta.copy_(theta)
            self.started.fill_(True)
        for _ in range(self.iters_per_step):
            if self.converged() or interrupt.requested:  # a signal: stop at this iteration boundary
                break
            theta, _, _, _, rn = lobpcg_step(op, X, self.MX, self.theta, self.P, self.MP,
                                             use_directions=bool(self.has_directions))
            self.has_directions.fill_(True)
            self.theta.copy_(theta)
            self.residual.copy_(rn.double())
            self.iterations += 1
        if self.converged():
            self.trainer.should_stop = True
            log.info("fast solver: converged after %d iterations (residual %.2e <= tol %.0e)",
                     int(self.iterations), self.relative_residual(), self.tol)
        self.log_dict({"train/residual": self.relative_residual(), "train/iterations": float(self.iterations),
                       "train/eigenvalue_K": float(self.theta[self.K - 1]), "train/loss": -float(self.theta[: self.K].mean())},
                      prog_bar=True, batch_size=1)

    def on_train_end(self) -> None:
        if not self.converged():
            log.warning("fast solver: not converged after %d iterations (residual %.2e > tol %.0e): raise "
                        "trainer.max_epochs, or resume the run", int(self.iterations), self.relative_residual(), self.tol)
