"""The default solver: LOBPCG on the whole data set's operator (``docs/method.md``, "Solver").

The data module builds the graphs of *every* image once (intra- and inter-image neighbours over
the whole data set); this solver finds the leading ``K`` eigenvectors of

``M = Σ_l w_l U_lᵀ S_l U_l``  (averaged over draws)

by LOBPCG (:func:`~ldsc.spectral.lobpcg.lobpcg_step`), applied as sparse products
(:class:`~ldsc.spectral.operator.LayerOperator`). The eigenvector table *is* the iterate: a training step
runs ``iters_per_step`` LOBPCG iterations on it, the progress bar shows the residual, and the run
stops once every one of the ``K`` residuals ``‖Mx − θx‖`` is at most ``tol · θ_max``. The
iteration's whole state (the table ``X``, ``MX``, the search directions ``P`` and ``MP``, the Ritz
values) is in the checkpoint, so a run resumed mid-solve continues exactly where it stopped and
ends with the same eigenvectors as an uninterrupted one.

The table holds ``K + oversample`` columns per pixel (the extra "guard" vectors speed up the
convergence of the ``K``-th); only the first ``K`` (the leading Ritz vectors) are exported.
Nothing is learned by gradient: the table has ``requires_grad=False``.

On several processes (``trainer=ddp`` / ``ddp_cpu``; ``docs/distributed.md``) each process holds
its own images' rows of the table and of the graphs: products all-gather each layer's pooled
rows, the small projected matrices are all-reduced, so every process computes the same Ritz
rotation; checkpoints and the export gather the rows on rank 0 (a checkpoint is the same file
whatever the number of processes, so a run can resume on another number of them).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from ldsc import distributed, interrupt
from ldsc.solvers.base import EigenSolver
from ldsc.spectral.lobpcg import converged, lobpcg_iterate, lobpcg_start, orthonormalize, random_start
from ldsc.spectral.multilevel import multilevel_start
from ldsc.spectral.operator import LayerOperator, unflatten_channels

log = logging.getLogger(__name__)


class LobpcgSolver(EigenSolver):
    """LOBPCG on the whole-data-set operator, one training step = ``iters_per_step`` iterations.

    Args (besides ``n_images``, ``K``, ``base_size``):
        tol: stop when every residual of the ``K`` leading vectors is at most ``tol × θ_max``.
        iters_per_step: LOBPCG iterations per training step (one step per epoch; a checkpoint
            can be written after each).
        oversample: guard vectors kept beyond ``K`` (more: faster convergence, more memory).
        dtype: ``float32`` (default) or ``float64`` for the table and the products.
        init_scale: std of the random starting table.
        multilevel: start from the coarse layers' solution (:mod:`ldsc.spectral.multilevel`: the
            problem of the coarsest layer grid first, then each finer one) instead of the random
            table; the same eigenvectors in about half the time.
    """

    #: the exported eigenvectors are orthonormal Ritz vectors, ordered by decreasing eigenvalue
    eigenvalue_ordered = True
    shards_rows = True
    #: the iteration's row blocks (table, then the buffers)
    ROW_STATE = ("table", "MX", "P", "MP")

    def __init__(self, n_images: int, K: int, base_size: int, tol: float = 3e-3, iters_per_step: int = 10,
                 oversample: int = 5, dtype: str = "float32", init_scale: float = 1.0, multilevel: bool = True):
        super().__init__(n_images, K, base_size, init_scale=init_scale, ema=None, table=False)
        #: whether the processes agreed to stop at this step (see :meth:`stop_requested`)
        self.stopping = False
        self.m = int(K) + int(oversample)
        self.tol, self.iters_per_step = float(tol), max(1, int(iters_per_step))
        self.multilevel = bool(multilevel)
        if dtype not in ("float32", "float64"):
            raise ValueError(f"solver.dtype must be 'float32' or 'float64', not {dtype!r}")
        dt = getattr(torch, dtype)
        n = self.n_images * self.base_size**2
        self.init_scale = float(init_scale)
        # the random start is drawn when solving starts, rows in fixed chunks from this seed, so
        # that any process's share of the rows is the same as in a single-process run
        self._init_seed = int(torch.randint(0, 2**62, ()))
        #: the images whose rows this process holds (all of them unless sharded)
        self.image_range = (0, self.n_images)
        # the iterate, rows ordered (image, y, x): the table of pseudo-eigenvectors (uninitialised
        # memory until solving starts: never touched, so never resident, before set-up shards it)
        self.table = torch.nn.Parameter(torch.empty(n, self.m, dtype=dt), requires_grad=False)
        for name in ("MX", "P", "MP"):
            self.register_buffer(name, torch.empty(n, self.m, dtype=dt))
        self.register_buffer("theta", torch.zeros(self.m, dtype=torch.float64))
        self.register_buffer("residual", torch.full((self.m,), float("inf"), dtype=torch.float64))
        self.register_buffer("iterations", torch.zeros((), dtype=torch.long))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))
        self.register_buffer("has_directions", torch.zeros((), dtype=torch.bool))
        self.automatic_optimization = False
        self._operator: tuple | None = None
        self._rebuild_mx = False  # (see on_load_checkpoint)

    def configure_optimizers(self):
        return None  # no gradients: every update is a closed-form eigen-step

    # -- rows of several processes ----------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """On several processes: keep this process's images' rows only (before a checkpoint is
        restored: :meth:`on_load_checkpoint` cuts the same rows out of it)."""
        if distributed.world_size() == 1:
            return
        self.image_range = distributed.shard(self.n_images)
        rows = (self.image_range[1] - self.image_range[0]) * self.base_size**2
        dt = self.table.dtype
        self.table = torch.nn.Parameter(torch.empty(rows, self.m, dtype=dt), requires_grad=False)
        for name in ("MX", "P", "MP"):
            setattr(self, name, torch.empty(rows, self.m, dtype=dt))

    @property
    def sharded(self) -> bool:
        return self.image_range != (0, self.n_images)

    def _rows(self) -> slice:
        hw = self.base_size**2
        return slice(self.image_range[0] * hw, self.image_range[1] * hw)

    def initial_rows(self, rows: slice) -> Tensor:
        """The random start of table rows ``rows`` (:func:`~ldsc.spectral.lobpcg.random_start`)."""
        return random_start(self._init_seed, rows, self.m, self.table.dtype).mul_(self.init_scale)

    #: the blocks only a solve still under way needs (``M X``, the directions and their images): a
    #: converged solver's checkpoint leaves them out (4x smaller: 330 → 82 MB at 10⁶ pixels)
    ITERATION_STATE = ("MX", "P", "MP")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The whole table in the checkpoint, whatever the number of processes (rank 0 gathers);
        once converged, without :attr:`ITERATION_STATE` (``(0, m)`` placeholders)."""
        state = checkpoint["state_dict"]
        light = self.converged()  # (the same on every process: the residuals are all-reduced)
        if light:
            for name in self.ITERATION_STATE:
                state[name] = torch.empty(0, self.m, dtype=self.table.dtype)
        if not self.sharded:
            return
        for name in self.ROW_STATE:
            if light and name in self.ITERATION_STATE:
                continue
            whole = distributed.gather_rows(getattr(self, name).detach())
            if whole is not None:
                state[name] = whole

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """This process's rows of a (whole-table) checkpoint; the blocks a converged checkpoint left
        out are rebuilt at the next step (``M X`` from the table; no directions)."""
        state = checkpoint["state_dict"]
        left_out = [name for name in self.ITERATION_STATE if name in state and state[name].shape[0] == 0]
        for name in left_out:
            state[name] = getattr(self, name).detach()  # (any values: replaced before use)
        if left_out:
            state["has_directions"] = torch.zeros((), dtype=torch.bool)
            self._rebuild_mx = True
        if not self.sharded:
            return
        for name in self.ROW_STATE:
            if name in state and name not in left_out:
                state[name] = state[name][self._rows()].clone()

    @torch.no_grad()
    def eigenvectors(self) -> Tensor | None:
        """The leading ``K`` Ritz vectors of all images, ``(n_images, K, H, W)``, on CPU (on
        several processes: gathered on rank 0, ``None`` on the others; every rank must call it)."""
        X = distributed.gather_rows(self.table[:, : self.K].float().cpu())
        if X is None:
            return None
        return unflatten_channels(X, self.n_images, self.base_size, self.base_size)

    def converged(self) -> bool:
        """Whether the ``K`` leading residuals are within ``tol`` (relative to the largest Ritz value)."""
        return bool(self.started) and converged(self.residual, self.theta, self.K, self.tol)

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
            raise ValueError(f"the graphs cover {graphs[0].n_images} images, the table {self.n_images}: the LOBPCG "
                             f"solver needs the whole data set's graphs (scope 'dataset')")
        own = getattr(graphs[0], "image_range", None) or (0, self.n_images)
        if tuple(own) != self.image_range:
            raise ValueError(f"the graphs hold the rows of images {tuple(own)}, this process's table {self.image_range}")
        op = self.operator(graphs)
        reduce = distributed.all_reduce_sum if self.sharded else None
        X = self.table.data
        if not bool(self.started):
            X0 = None
            if self.multilevel:  # the coarse layers' problems first (ldsc.spectral.multilevel)
                X0 = multilevel_start(graphs, (self.base_size, self.base_size), self.m, self.K, self.tol,
                                      self._init_seed, self.image_range, X.dtype, reduce=reduce,
                                      stop=self.stop_requested, device=X.device)
                if X0 is None and self.stopping:
                    return  # a signal during the start: the checkpoint says "not started"
            if X0 is None:
                X0 = self.initial_rows(self._rows()).to(X.device)
            X.copy_(orthonormalize(X0, reduce=reduce))
            theta, X, MX = lobpcg_start(op, X, reduce)
            self.MX.copy_(MX)
            self.theta.copy_(theta)
            self.started.fill_(True)
        elif self._rebuild_mx:  # restored from a converged checkpoint, which left M X out
            op(X, out=self.MX)
        self._rebuild_mx = False
        # the same iterations as ldsc.LDSC.fit; a signal stops them at an iteration boundary
        done, directions = lobpcg_iterate(op, X, self.MX, self.P, self.MP, self.theta, self.residual, self.K, self.tol,
                                          self.iters_per_step, bool(self.has_directions), reduce=reduce,
                                          stop=self.stop_requested)
        self.has_directions.fill_(directions)
        self.iterations += done
        if self.converged():
            self.trainer.should_stop = True
            op.work.clear()  # the operator's reused blocks: not needed by the export that follows
            log.info("LOBPCG solver: converged after %d iterations (residual %.2e <= tol %.0e)",
                     int(self.iterations), self.relative_residual(), self.tol)
        self.log_dict({"train/residual": self.relative_residual(), "train/iterations": float(self.iterations),
                       "train/eigenvalue_K": float(self.theta[self.K - 1]), "train/mean_eigenvalue": float(self.theta[: self.K].mean())},
                      prog_bar=True, batch_size=1)

    def on_train_start(self) -> None:
        if self.sharded:  # Lightning registered its SIGTERM handler (a collective) after set-up: ours again
            interrupt.take_over_sigterm(getattr(self.trainer.strategy.launcher, "kill", None))

    def stop_requested(self) -> bool:
        """Whether a signal asked the run to stop, agreed by all processes (a signal that reached
        one of them stops them all at the same iteration, so none waits in a collective)."""
        import signal

        if not self.sharded:
            self.stopping = interrupt.requested is not None
            return self.stopping
        mine = interrupt.signal_number(interrupt.requested) if interrupt.requested else 0
        agreed = int(distributed.all_reduce_max(mine))
        if agreed and interrupt.requested is None:
            interrupt.requested = signal.Signals(agreed).name
        # what the processes agreed, not this process's own flag (a signal may have reached it since)
        self.stopping = agreed > 0
        return self.stopping

    def on_train_end(self) -> None:
        if self._operator is not None:  # (a solve that ended unconverged: the same release)
            self._operator[1].work.clear()
        if not self.converged():
            log.warning("LOBPCG solver: not converged after %d iterations (residual %.2e > tol %.0e): raise "
                        "trainer.max_epochs, or resume the run", int(self.iterations), self.relative_residual(), self.tol)
