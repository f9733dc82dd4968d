"""The default solver: block eigen-iteration on the layer-averaged operator (DESIGN §4).

Instead of thousands of gradient steps on the paper's objective, every batch applies the exact
reference operator ``M = Σ_l w_l U_lᵀ S_l U_l`` of its graphs (:class:`~ldsc.spectral.LayerOperator`,
sparse products only) to the table rows of its images and keeps the leading Ritz vectors.

Three regimes:

* **Whole data set in one batch** (a single image, or a small folder with ``batch_size ≥`` its
  size): the batch's graphs *are* the data set's graphs, so the table is solved outright by
  LOBPCG warm-started from the table (:func:`~ldsc.spectral.lobpcg_top`), stopping when every
  residual ``‖Mx − θx‖ ≤ tol·θ_max``. With a backbone that draws new randomness every epoch
  (SD's timesteps), the operator solved is the mean of the last ``average_epochs`` epochs' (the
  paper averages over timesteps the same way, through its loss); when an epoch starts converged
  (a deterministic backbone: the same graph again) the run stops.
* **Small data sets in mini-batches** (at most ``whole_max_tokens`` base-grid nodes, images ×
  H × W): the graph of a batch of 40 differs *systematically* from the whole data set's (a
  token's 25 inter-image neighbours are picked among 39 images instead of all of them), so no
  average over batches reaches the whole-data-set eigenspace. When that graph fits, the solver
  builds it once (:meth:`~ldsc.data.ImageDataModule.whole_dataset_graphs`, intra + inter
  neighbours over every image), solves it by LOBPCG as above and stops the run: one pass of
  graph construction instead of one per epoch. ``whole_max_tokens=0`` turns this off.
* **Mini-batches** (data-set mode): the graph of one batch only connects the images in it, so
  its eigenvectors are batch indicators (DESIGN §4). The data-set operator is approached as the
  average ``M̄`` of the batch operators over random partitions, by a *stochastic subspace
  iteration with averaged Rayleigh–Ritz*: during epoch ``e`` every image's rows ``X_b`` are
  replaced by ``Y_b = X_b + η_e M_b X_b`` with a decreasing step ``η_e = step / ((e + 1) Σ_l w_l)``
  (large at first: nearly a power step; small later: averaging the partitions), while the small
  matrices ``Σ Y_bᵀY_b``, ``Σ Y_bᵀ M_b Y_b`` and ``Σ X_bᵀY_b`` are accumulated. At the epoch's end
  one global Rayleigh–Ritz rotates and orthonormalises the whole table; its projected operator
  is a running average (weight ``max(1/(e+1), average)`` for the new epoch) carried from basis to
  basis, so the *order* of the Ritz vectors — which ``K`` are kept — reflects ``M̄`` rather than
  the last partition. Memory is the table plus one batch's graphs.

The table holds ``K + oversample`` vectors per pixel (the extra "guard" vectors speed up
convergence of the ``K``-th); only the first ``K`` (the leading Ritz vectors) are exported.
Nothing here is learned by gradient: the table is a parameter with ``requires_grad=False`` so that
it is checkpointed, exported and resumed like the paper solver's.
"""

from __future__ import annotations

import logging
from collections import deque

import torch
from torch import Tensor

from ldsc.solvers.base import EigenSolver
from ldsc.spectral import LayerOperator, flatten_channels, lobpcg_top, unflatten_channels

log = logging.getLogger(__name__)


class FastSolver(EigenSolver):
    """Block eigen-iteration on the exact operator of each batch's graphs.

    Args (besides ``n_images``, ``K``, ``base_size``):
        iters: LOBPCG iterations per batch when a batch holds every image.
        tol: LOBPCG stops when all residuals are below ``tol × largest Ritz value``.
        oversample: guard vectors kept beyond ``K`` (more: faster convergence, more memory).
        step: mini-batch mode: ``η_e = step / ((e + 1) Σ_l w_l)`` (see module docstring).
        average: mini-batch mode: least weight of the newest epoch in the averaged Rayleigh–Ritz.
        power: mini-batch mode: ``Y ← Y + η M_b Y`` steps per batch and epoch.
        dtype: ``float32`` (default) or ``float64`` for the products.
        average_epochs: one batch holding every image: LOBPCG solves the mean of the operators of
            the last this many epochs (a backbone with randomness, e.g. SD's timesteps, gives a
            new graph every epoch; a deterministic one the same graph, and the run stops as soon
            as an epoch needs no iteration).
        whole_max_tokens: data sets with at most this many base-grid nodes are solved on their
            whole-data-set graph in one step (see module docstring); 0: always mini-batches.
    """

    #: the exported eigenvectors are orthonormal Ritz vectors, ordered by decreasing eigenvalue
    eigenvalue_ordered = True

    def __init__(self, n_images: int, K: int, base_size: int, iters: int = 30, tol: float = 1e-4,
                 oversample: int = 5, step: float = 100.0, average: float = 0.1, power: int = 3,
                 init_scale: float = 1.0, dtype: str = "float32", whole_max_tokens: int = 0,
                 average_epochs: int = 20):
        m = int(K) + int(oversample)
        super().__init__(n_images, m, base_size, init_scale=init_scale, ema=None)
        self.K, self.m = int(K), m
        self.table.requires_grad_(False)
        self.iters, self.tol, self.power = int(iters), float(tol), int(power)
        self.step, self.average = float(step), float(average)
        self.dtype_ = getattr(torch, dtype)
        self.whole_max_tokens = int(whole_max_tokens)
        # one batch = every image: the operators of the last ``average_epochs`` epochs, solved as their mean
        self._recent: deque[tuple[Tensor, LayerOperator]] = deque(maxlen=max(1, int(average_epochs)))
        self.register_buffer("whole_solved", torch.zeros((), dtype=torch.bool))
        self.automatic_optimization = False
        # running average of the projected operator in the table's current basis (checkpointed)
        self.register_buffer("ritz_average", torch.zeros(m, m, dtype=torch.float64))
        self.register_buffer("epochs_averaged", torch.zeros((), dtype=torch.long))
        # epoch accumulators of the mini-batch regime (reset at every epoch's end)
        for name in ("gram", "proj", "cross"):
            self.register_buffer(name, torch.zeros(m, m, dtype=torch.float64), persistent=False)
        self._visited = 0

    def configure_optimizers(self):
        return None  # no gradients: every update is a closed-form eigen-step

    @torch.no_grad()
    def eigenvectors(self) -> Tensor:
        """The leading ``K`` Ritz vectors of all images, ``(n_images, K, H, W)``, on CPU."""
        return self.table[:, : self.K].float().cpu()

    # -- one batch ----------------------------------------------------------------------------
    @torch.no_grad()
    def training_step(self, batch: dict, batch_idx: int):
        index, graphs = batch["index"], batch["graphs"]
        if len(index) < self.n_images and self.uses_whole_graph():
            return self._solve_whole_dataset(len(index))
        op = LayerOperator(graphs, (self.base_size, self.base_size), dtype=self.dtype_)
        if len(index) == self.n_images:
            self._recent.append((index, op))  # the batch's order differs between epochs: keep it
            stats = self._solve_whole(self._mean_operator(), flatten_channels(self.table).to(self.dtype_),
                                      torch.arange(self.n_images, device=index.device))
            if stats["train/iterations"] == 0:  # the table already solves the (averaged) graphs: done
                self.trainer.should_stop = True
        else:
            stats = self._step_minibatch(op, flatten_channels(self.table[index]).to(self.dtype_), index)
        self.log_dict(stats, prog_bar=True, batch_size=len(index))

    def _mean_operator(self):
        """The mean of the recent epochs' operators, acting on the table's rows in image order."""
        recent, hw = list(self._recent), self.base_size**2

        def apply(V: Tensor) -> Tensor:
            Vi = V.view(self.n_images, hw, -1)
            out = torch.zeros_like(Vi)
            for index, op in recent:
                out[index] += op(Vi[index].reshape(len(index) * hw, -1)).view(len(index), hw, -1)
            return (out / len(recent)).view_as(V)

        return apply

    def uses_whole_graph(self) -> bool:
        """Whether this data set is solved on its whole-data-set graph (small enough, see above)."""
        return 0 < self.n_images * self.base_size**2 <= self.whole_max_tokens

    def _solve_whole_dataset(self, batch_size: int) -> None:
        """Build the whole data set's graphs once, solve them by LOBPCG and stop the run."""
        if not bool(self.whole_solved):
            log.info("fast solver: %d images x %dx%d = %d nodes <= whole_max_tokens=%d: solving the whole-data-set "
                     "graph once instead of mini-batches", self.n_images, self.base_size, self.base_size,
                     self.n_images * self.base_size**2, self.whole_max_tokens)
            graphs = self.trainer.datamodule.whole_dataset_graphs(self.device)
            op = LayerOperator(graphs, (self.base_size, self.base_size), dtype=self.dtype_)
            index = torch.arange(self.n_images, device=self.device)
            stats = self._solve_whole(op, flatten_channels(self.table).to(self.dtype_), index)
            self.whole_solved.fill_(True)
            self.trainer.datamodule.release_whole_dataset_graphs()
            self.log_dict(stats, prog_bar=True, batch_size=batch_size)
        self.trainer.should_stop = True

    def _write(self, index: Tensor, X: Tensor) -> None:
        self.table[index] = unflatten_channels(X.to(self.table.dtype), len(index), self.base_size, self.base_size)

    def _solve_whole(self, op: LayerOperator, X: Tensor, index: Tensor) -> dict:
        theta, X, _, it = lobpcg_top(op, X, self.iters, tol=self.tol)
        self._write(index, X)
        stats = convergence_stats(X[:, : self.K], op(X[:, : self.K]))
        stats["train/iterations"] = float(it)
        return stats

    def _step_minibatch(self, op: LayerOperator, X: Tensor, index: Tensor) -> dict:
        eta = self.step / ((int(self.epochs_averaged) + 1) * op.shift)
        AX = op(X)
        stats = convergence_stats(X[:, : self.K], AX[:, : self.K])
        Y = X + eta * AX
        for _ in range(max(1, self.power) - 1):
            Y = Y + eta * op(Y)
        MY = op(Y)
        Xd, Yd = X.double(), Y.double()
        self.gram += Yd.T @ Yd
        self.proj += Yd.T @ MY.double()
        self.cross += Xd.T @ Yd
        self._visited += len(index)
        self._write(index, Y)
        if self._visited >= self.n_images:
            self._finish_epoch()  # here rather than at epoch end, so callbacks see the rotated table
        return stats

    def on_train_epoch_end(self) -> None:
        if self._visited:  # an epoch that did not visit every image (e.g. limit_train_batches)
            log.warning("fast solver: %d of %d images were visited this epoch; rows not visited are "
                        "rotated with the others", self._visited, self.n_images)
            self._finish_epoch()

    def _finish_epoch(self) -> None:
        """The epoch's global Rayleigh–Ritz with the averaged projected operator: rotate the whole
        table onto orthonormal Ritz vectors ordered by decreasing (averaged) Ritz value."""
        Wn = orthonormalizer(self.gram)  # Y Wn is orthonormal
        T = Wn.T @ ((self.proj + self.proj.T) / 2) @ Wn
        if int(self.epochs_averaged) > 0:  # carry the old average into the new basis: R = X_oldᵀ X_new
            R = self.cross @ Wn
            beta = max(1.0 / (int(self.epochs_averaged) + 1), self.average)
            T = (1 - beta) * (R.T @ self.ritz_average @ R) + beta * T
        theta, E = torch.linalg.eigh((T + T.T) / 2)
        order = torch.argsort(theta, descending=True)
        rotate_table(self.table, (Wn @ E[:, order]).to(self.table.dtype))
        self.ritz_average.copy_(torch.diag(theta[order]))
        self.epochs_averaged += 1
        for buf in (self.gram, self.proj, self.cross):
            buf.zero_()
        self._visited = 0


def convergence_stats(X: Tensor, AX: Tensor) -> dict:
    """What the fast solver logs for a block ``X`` ``(n, K)`` and ``AX = M X``: ``train/loss``
    (minus the mean Rayleigh quotient: the block iteration maximises ``tr(XᵀMX)`` over orthonormal
    ``X``), ``train/residual`` (largest ``‖Mx − θx‖ / ‖x‖``, relative to the largest ``θ``) and
    ``train/eigenvalue_K`` (the smallest of the ``K`` Rayleigh quotients)."""
    Xd, AXd = X.double(), AX.double()
    nrm = Xd.pow(2).sum(0).clamp_min(1e-300)
    theta = (Xd * AXd).sum(0) / nrm
    res = (AXd - Xd * theta).norm(dim=0) / nrm.sqrt()
    return {"train/loss": -theta.mean(), "train/residual": res.max() / theta.abs().max().clamp_min(1e-300),
            "train/eigenvalue_K": theta.min()}


def orthonormalizer(gram: Tensor, eps: float = 1e-10) -> Tensor:
    """``(m, m)`` ``W`` with ``WᵀGW = I`` on the well-conditioned part of ``G = YᵀY`` (so ``YW`` is
    orthonormal); directions of relative squared norm below ``eps`` get zero columns."""
    g, Q = torch.linalg.eigh(gram)
    keep = g > eps * g.max().clamp_min(1e-300)
    Wn = torch.zeros_like(Q)
    Wn[:, keep] = Q[:, keep] / g[keep].sqrt()
    return Wn


@torch.no_grad()
def rotate_table(table: Tensor, C: Tensor, chunk: int = 256) -> None:
    """``table (n, m, H, W) ← table · C`` over the channel axis, in place, ``chunk`` images at a time."""
    for s in range(0, table.shape[0], chunk):
        rows = table[s:s + chunk]
        table[s:s + chunk] = torch.einsum("nchw,cd->ndhw", rows, C)

