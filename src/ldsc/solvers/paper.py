"""The paper's solver: gradient descent on the paper's objective (docs/method.md, The paper's objective).

``Z = softmax_K(X)`` of a learnable logit table ``X`` (data-set recipe) or of logits produced by a
small 3-layer conv net from a learnable ``(n_images, 128, H, W)`` input (``parametrization:
convnet``, the single-image recipe); every batch of graphs gets ``steps_per_batch`` forward/backward
steps, with an optimiser step every ``accumulate`` of them. The optimiser is dense (e.g. AdamW, as published): rows of
images not in the batch keep moving through momentum and weight decay — faithful to the paper,
and the reason this solver is kept for reproduction rather than speed.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from ldsc.solvers.base import EigenSolver
from ldsc.spectral import paper_objective


class PaperSolver(EigenSolver):
    """Gradient steps on the paper's objective, batch by batch.

    Args (besides :class:`EigenSolver`'s):
        optimizer: a partial optimiser constructor taking the parameters (Hydra ``_partial_``).
        steps_per_batch: optimiser steps on each batch's graphs before the next batch.
        parametrization: ``softmax`` (the paper's table), ``convnet`` (softmax of a 3-layer conv
            net's output (batch-normalised hidden layers) on a learnable ``conv_channels × H × W`` input per image: the paper's
            single-image recipe) or ``identity`` (raw table).
        conv_channels: channels of the conv net's input and hidden layers.
        eig_weight, orth_weight: weights of the eigenvalue and orthogonality terms.
        accumulate: gradients summed over this many steps before the optimiser steps.
    """

    def __init__(self, n_images: int, K: int, base_size: int, optimizer: Callable | None = None,
                 steps_per_batch: int = 5, parametrization: str = "softmax", eig_weight: float = 1.0,
                 orth_weight: float = 1.0, accumulate: int = 1, init_scale: float = 1.0,
                 ema: float | None = 0.99, conv_channels: int = 128):
        if parametrization not in ("softmax", "identity", "convnet"):
            raise ValueError(f"parametrization must be 'softmax', 'convnet' or 'identity', not {parametrization!r}")
        convnet = parametrization == "convnet"
        super().__init__(n_images, K if not convnet else 1, base_size, init_scale=init_scale,
                         ema=None if convnet else ema)
        self.K = int(K)
        self.parametrization = parametrization
        if convnet:  # the table is replaced by the net's input; a 1-channel stub keeps the base class simple
            c = int(conv_channels)
            self.table.requires_grad_(False)
            self.input = nn.Parameter(torch.randn(self.n_images, c, self.base_size, self.base_size))
            # conv–batch-norm–ReLU twice, then a conv to K logits (the published net normalises its
            # hidden layers; batch statistics always, so training and export see the same net)
            self.net = nn.Sequential(
                nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c, track_running_stats=False), nn.ReLU(),
                nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c, track_running_stats=False), nn.ReLU(),
                nn.Conv2d(c, self.K, 3, padding=1))
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.0)
        self.steps_per_batch, self.accumulate = int(steps_per_batch), max(1, int(accumulate))
        self.eig_weight, self.orth_weight = eig_weight, orth_weight
        self.automatic_optimization = False
        self._micro = 0

    #: the paper's recipe: each batch's own graphs (its images only), reshuffled every epoch
    graph_scope = "batch"

    def pseudo_eigenvectors(self, rows: Tensor) -> Tensor:
        return rows if self.parametrization == "identity" else rows.softmax(1)

    def logits(self, index: Tensor) -> Tensor:
        """``(B, K, H, W)`` logits of the images ``index`` (table rows, or the conv net's output)."""
        if self.parametrization == "convnet":
            return self.net(self.input[index])
        return self.table[index]

    @torch.no_grad()
    def eigenvectors(self) -> Tensor:
        if self.parametrization != "convnet":
            return super().eigenvectors()
        out = [self.pseudo_eigenvectors(self.logits(torch.arange(i, min(i + 64, self.n_images), device=self.device)))
               for i in range(0, self.n_images, 64)]
        return torch.cat(out).float().cpu()

    def configure_optimizers(self):
        return self.optimizer_factory([p for p in self.parameters() if p.requires_grad])

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        opt = self.optimizers()
        index, graphs = batch["index"], batch["graphs"]
        for _ in range(self.steps_per_batch):
            Z = self.pseudo_eigenvectors(self.logits(index))
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
