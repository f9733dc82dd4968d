"""Lightning callbacks: the glue between a finished fit and its outputs."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from ldsc.export import save_eigenvectors, write_figures

log = logging.getLogger(__name__)


class ExportEigenvectors(L.Callback):
    """At the end of training, write ``eigvecs.pt`` and the figures to ``output_dir`` and, when the
    logger is a ``WandbLogger``, log the figures as images (other loggers: files only)."""

    def __init__(self, output_dir: str, figures: bool = True, max_images: int = 4, n_vectors: int = 12,
                 grid_vectors: int = 15, grid_images: int = 8, run_config: dict | None = None):
        self.output_dir, self.figures, self.run_config = Path(output_dir), figures, run_config or {}
        self.fig_kwargs = dict(max_images=max_images, n_vectors=n_vectors, grid_vectors=grid_vectors,
                               grid_images=grid_images)
        self.paths: list[Path] = []

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        files = trainer.datamodule.prepare_files()
        E = save_eigenvectors(self.output_dir, pl_module.eigenvectors(), files, self.run_config)
        log.info("eigenvectors written to %s", self.output_dir / "eigvecs.pt")
        if self.figures:
            self.paths = write_figures(self.output_dir, E, files, **self.fig_kwargs)
            log.info("figures written to %s", self.output_dir / "figures")
            self._log_images(trainer)

    def _log_images(self, trainer: L.Trainer) -> None:
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:  # pragma: no cover
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="figures", images=[str(p) for p in self.paths],
                                 caption=[p.stem for p in self.paths])
