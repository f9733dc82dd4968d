"""The paper's solver: gradient descent on the paper's objective (DESIGN §3).

``Z = softmax_K(X)`` of a learnable logit table ``X``; every batch of graphs gets
``steps_per_batch`` optimiser steps. The optimiser is dense (e.g. AdamW, as published): rows of
images not in the batch keep moving through momentum and weight decay — faithful to the paper,
and the reason this solver is kept for reproduction rather than speed.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor

from ldsc.solvers.base import EigenSolver
from ldsc.spectral import paper_objective


class PaperSolver(EigenSolver):
    """Args (besides :class:`EigenSolver`'s):
        optimizer: a partial optimiser constructor taking the parameters (Hydra ``_partial_``).
        steps_per_batch: optimiser steps on each batch's graphs before the next batch.
        parametrization: ``softmax`` (the paper's) or ``identity`` (raw table).
        eig_weight, orth_weight: weights of the eigenvalue and orthogonality terms.
        accumulate: gradients summed over this many steps before the optimiser steps.
    """

    def __init__(self, n_images: int, K: int, base_size: int, optimizer: Callable | None = None,
                 steps_per_batch: int = 1, parametrization: str = "softmax", eig_weight: float = 1.0,
                 orth_weight: float = 1.0, accumulate: int = 1, init_scale: float = 1.0,
                 ema: float | None = None):
        super().__init__(n_images, K, base_size, init_scale=init_scale, ema=ema)
        if parametrization not in ("softmax", "identity"):
            raise ValueError(f"parametrization must be 'softmax' or 'identity', not {parametrization!r}")
        self.parametrization = parametrization
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=1e-2)
        self.steps_per_batch, self.accumulate = int(steps_per_batch), max(1, int(accumulate))
        self.eig_weight, self.orth_weight = eig_weight, orth_weight
        self.automatic_optimization = False
        self._micro = 0

    def pseudo_eigenvectors(self, rows: Tensor) -> Tensor:
        return rows.softmax(1) if self.parametrization == "softmax" else rows

    def configure_optimizers(self):
        return self.optimizer_factory(self.parameters())

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        opt = self.optimizers()
        index, graphs = batch["index"], batch["graphs"]
        for _ in range(self.steps_per_batch):
            Z = self.pseudo_eigenvectors(self.table[index])
            loss, stats = paper_objective(Z, graphs, self.eig_weight, self.orth_weight)
            self.manual_backward(loss / self.accumulate)
            self._micro += 1
            if self._micro % self.accumulate == 0:
                opt.step()
                opt.zero_grad(set_to_none=True)
                self.update_ema()
        self.log_dict({"train/loss": loss.detach(), "train/eig": stats["eig"], "train/orth": stats["orth"],
                       "train/residual": stats["residual"]}, prog_bar=True, batch_size=len(index))
        return loss.detach()
