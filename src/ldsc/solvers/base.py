"""What every solver shares: the per-image table of pseudo-eigenvectors, its EMA and its export.

The table is one ``(n_images, K, H, W)`` parameter indexed by the data set's stable image index
(``trainer.datamodule.files[i]`` is image ``i``). Subclasses define how a table row becomes the
pseudo-eigenvectors ``Z`` (:meth:`pseudo_eigenvectors`) and how a batch updates the table.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn


class EigenSolver(L.LightningModule):
    """Base LightningModule: a table of per-image logits on the base grid.

    Args:
        n_images: rows of the table (images of the data set).
        K: pseudo-eigenvectors per pixel.
        base_size: side of the base grid ``H = W``.
        init_scale: std of the random initial table.
        ema: decay of an exponential moving average of the table (``None``/0 disables); the
            exported eigenvectors use the average when enabled.
    """

    #: whether :meth:`eigenvectors` is already orthonormal and ordered by decreasing eigenvalue
    #: (then the export keeps that order instead of SVD-ordering)
    eigenvalue_ordered = False

    #: what a batch's graphs cover: ``dataset`` (the whole data set's graphs, built once by the
    #: data module) or ``batch`` (the graphs of the batch's images only); ``run.py`` tells the
    #: data module
    graph_scope = "dataset"

    #: whether the solver runs on several processes, each holding its images' rows (else a run
    #: on several processes is refused at set-up)
    shards_rows = False

    def __init__(self, n_images: int, K: int, base_size: int, init_scale: float = 1.0, ema: float | None = None,
                 table: bool = True):
        super().__init__()
        self.n_images, self.K, self.base_size = int(n_images), int(K), int(base_size)
        if table:  # subclasses with their own layout (the LOBPCG solver's flat iterate) pass False
            self.table = nn.Parameter(init_scale * torch.randn(self.n_images, self.K, self.base_size, self.base_size))
        self.ema_decay = float(ema) if ema else 0.0
        if self.ema_decay:
            self.register_buffer("ema_table", self.table.detach().clone())

    def setup(self, stage: str | None = None) -> None:
        from ldsc.distributed import world_size
        from ldsc.errors import ConfigError

        if world_size() > 1 and not self.shards_rows:
            raise ConfigError(f"solver={type(self).__name__} runs in one process only: use the default solver "
                              f"(solver=lobpcg) with trainer=ddp / ddp_cpu, or a single-process trainer.")

    # -- parametrisation --------------------------------------------------------------------
    def pseudo_eigenvectors(self, rows: Tensor) -> Tensor:
        """Table rows ``(B, K, H, W)`` -> pseudo-eigenvectors ``Z`` (identity here)."""
        return rows

    @torch.no_grad()
    def update_ema(self, index: Tensor | None = None) -> None:
        if not self.ema_decay:
            return
        if index is None:
            self.ema_table.lerp_(self.table.detach(), 1 - self.ema_decay)
        else:
            self.ema_table[index] = self.ema_table[index].lerp(self.table.detach()[index], 1 - self.ema_decay)

    @torch.no_grad()
    def eigenvectors(self) -> Tensor:
        """Pseudo-eigenvectors of all images, ``(n_images, K, H, W)`` (EMA when enabled), on CPU."""
        rows = self.ema_table if self.ema_decay else self.table
        out = [self.pseudo_eigenvectors(rows[i:i + 256]).float().cpu() for i in range(0, self.n_images, 256)]
        return torch.cat(out)
