"""Lightning callbacks: the glue between a finished fit and its outputs."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar

from ldsc import interrupt

from ldsc.export import background_allowed, draw_figures_in_background, save_eigenvectors, write_figures

log = logging.getLogger(__name__)


class StageTimer(L.Callback):
    """Records the ``solve`` stage (training, from its first step to its end; the alignment
    monitor's exact reference, computed before the first step, is not counted) and the ``export``
    stage (every callback's end-of-training work after it: checkpoint, eigenvectors, figures) in
    ``stages`` (see :mod:`ldsc.profiling`). ``run.py`` puts it first and last in the callbacks."""

    def __init__(self, stages: dict, name: str):
        self.stages, self.name = stages, name
        self._t = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.name == "solve" and self._t is None:  # after on_train_start (the alignment reference)
            from ldsc.profiling import reset_peak

            reset_peak()
            self._t = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        from ldsc.profiling import peak_rss_mb, reset_peak

        now = time.perf_counter()
        if self.name == "solve":
            self._t = self._t if self._t is not None else now
            self.stages["solve"] = {"seconds": round(now - self._t, 3), "peak_rss_mb": round(peak_rss_mb() or 0, 1)}
            self.stages["_export_start"] = now
            reset_peak()
        else:
            start = self.stages.pop("_export_start", now)
            self.stages["export"] = {"seconds": round(now - start, 3), "peak_rss_mb": round(peak_rss_mb() or 0, 1)}


class SolverProgress(ProgressBar):
    """One progress bar over the solver's epochs, with the solver's metrics beside it (a ``tqdm``
    bar in a terminal, a plain line every 30 s in a log file: :mod:`ldsc.progress`).

    Lightning's own bar draws one bar per epoch, opens with an empty ``Training: 0/?`` bar and,
    closing only after every callback's end-of-training work, counts the figures' time as the last
    epoch's. This bar closes when the solver stops, before the export starts (``run.py`` puts it
    first among the callbacks). ``trainer.enable_progress_bar=false`` removes it."""

    def __init__(self, refresh_rate: int = 1):
        super().__init__()
        self.refresh_rate = max(1, int(refresh_rate))
        self._enabled = True
        self._bar = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        from ldsc.progress import bar

        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        self._bar = bar(total=total, desc="solve", unit="epochs", disable=not self._enabled, leave=True)
        if trainer.current_epoch:  # a resumed run starts where the checkpoint stopped
            self._bar.update(trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if self._bar is None:
            return
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        shown = {k.split("/", 1)[-1]: (float(v) if not isinstance(v, str) else v) for k, v in metrics.items()}
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(1)
        last = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        if trainer.should_stop or last:
            self._close()

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class SolverCheckpoint(L.Callback):
    """Writes ``<dirpath>/last.ckpt`` every ``every_n_epochs`` epochs and when training ends,
    atomically (a temporary file renamed over the old one, which stays intact until the new one
    is complete).

    Lightning's ``ModelCheckpoint`` saves only when the global step has moved, which a solver
    without an optimiser (closed-form steps) never does; this callback saves regardless.
    """

    def __init__(self, dirpath: str, every_n_epochs: int = 1):
        self.dirpath, self.every_n_epochs = Path(dirpath), max(1, int(every_n_epochs))
        self.last_path = self.dirpath / "last.ckpt"
        #: what the run's result depends on (images, backbone, graph, K, ...: ``run.run_signature``),
        #: saved in the checkpoint so that a resume with other settings is refused
        self.signature: dict = {}
        #: whether the solver has stepped since the last save (the same on every process, unlike
        #: a look at the file, which another process may be replacing)
        self.unsaved = True

    def state_dict(self) -> dict:
        return {"signature": self.signature}

    def save(self, trainer: L.Trainer) -> None:
        tmp = self.dirpath / "last.ckpt.tmp"
        try:
            trainer.save_checkpoint(tmp, weights_only=False)  # the whole state (loops, callbacks): exact resume
            if trainer.is_global_zero:
                os.replace(tmp, self.last_path)
        except (OSError, RuntimeError) as err:  # torch reports a failed write as a RuntimeError
            if isinstance(err, RuntimeError) and "writ" not in str(err).lower():
                raise
            from ldsc.errors import DataError

            if trainer.is_global_zero:
                tmp.unlink(missing_ok=True)
            reason = getattr(err, "strerror", None) or str(err).splitlines()[0][:160]
            kept = " (the previous one is kept)" if self.last_path.exists() else ""
            raise DataError(f"Could not write the checkpoint {self.last_path} ({reason}){kept}: free space or fix the "
                            f"folder, then run the same command with `resume=true`.") from None
        self.unsaved = False

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        interrupt.training = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.unsaved = True
        # a signal arrived and the solver stopped at an iteration boundary; on several processes the
        # flag they agreed on (a process's own flag may have been set by a signal since: saving on
        # it alone would start a collective the others never join)
        stop = getattr(pl_module, "stopping", None)
        if stop if stop is not None else interrupt.requested:
            self.save(trainer)
            out = self.dirpath.parent
            raise interrupt.RunInterrupted(
                f"Stopped by {interrupt.requested}; the solver's state is saved in {self.last_path}: continue with "
                f"the same command plus `resume=true hydra.run.dir={out}`.",
                interrupt.signal_number(interrupt.requested))

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        from ldsc.distributed import world_size

        # raised by Lightning at a batch boundary: state is whole (on several processes a save is a
        # collective that the other processes may never join; they stop through the solver instead)
        if isinstance(exception, SIGTERMException) and world_size() == 1:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0 or trainer.should_stop:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        interrupt.training = False
        if self.unsaved:  # (not a look at the file: the same answer on every process)
            self.save(trainer)


class ExportEigenvectors(L.Callback):
    """At the end of training, write ``eigvecs.pt`` and the figures to ``output_dir`` and, when the
    logger is a ``WandbLogger``, log the figures as images (other loggers: files only).

    ``figures``: ``true`` draws them before the run returns; ``background`` (default) starts a
    separate process that draws them from ``eigvecs.pt`` once it is written, so the run returns
    without waiting (drawn before returning all the same with a W&B logger, or in a SLURM job);
    ``false`` draws none (``python -m ldsc.export RUN_DIR`` draws them later)."""

    def __init__(self, output_dir: str, figures: bool | str = "background", max_images: int | None = 16,
                 n_vectors: int = 12, grid_vectors: int = 15, grid_images: int = 8, run_config: dict | None = None):
        if figures not in (True, False, "background"):
            from ldsc.errors import ConfigError

            raise ConfigError(f"callbacks.export.figures must be true, false or background, not {figures!r}.")
        self.output_dir, self.figures, self.run_config = Path(output_dir), figures, run_config or {}
        self.fig_kwargs = dict(max_images=max_images, n_vectors=n_vectors, grid_vectors=grid_vectors,
                               grid_images=grid_images)
        self.paths: list[Path] = []

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        Z = pl_module.eigenvectors()  # on several processes: every rank sends its rows to rank 0
        if not trainer.is_global_zero:
            return
        files = trainer.datamodule.prepare_files()
        try:
            E = save_eigenvectors(self.output_dir, Z, files, self.run_config,
                                  keep_order=pl_module.eigenvalue_ordered)
            log.info("eigenvectors written to %s", self.output_dir / "eigvecs.pt")
            background = self.figures == "background" and self._background(trainer)
            if background:  # the answer is on disk: a separate process draws the figures from it
                child = draw_figures_in_background(self.output_dir, **self.fig_kwargs)
                log.info("figures: drawn in the background by process %d into %s (its lines follow in run.log)",
                         child.pid, self.output_dir / "figures")
            self._save_model(trainer, pl_module, E)
            if self.figures and not background:
                self.paths = write_figures(self.output_dir, E, files, view=getattr(trainer.datamodule.backbone, "view", None),
                                           **self.fig_kwargs)
                log.info("figures written to %s", self.output_dir / "figures")
        except OSError as err:  # full disk, read-only or vanished folder: the checkpoint is already written
            from ldsc.errors import DataError

            raise DataError(f"Could not write the outputs to '{self.output_dir}' ({err.strerror or err}); the solver's "
                            f"state is in its checkpoints/last.ckpt: free space or fix the folder, then run the same "
                            f"command with `resume=true hydra.run.dir={self.output_dir}` to export.") from None
        if self.paths:
            self._log_images(trainer)

    def _background(self, trainer: L.Trainer) -> bool:
        """Whether the figures may be drawn in the background (:func:`ldsc.export.background_allowed`)."""
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:  # pragma: no cover
            WandbLogger = ()
        why = background_allowed(use_wandb=any(isinstance(lg, WandbLogger) for lg in trainer.loggers))
        if why:
            log.info("figures: drawn before the run returns (%s)", why)
        return why is None

    def _save_model(self, trainer: L.Trainer, pl_module, E) -> None:
        """``fit.safetensors``: what ``python -m ldsc.extend`` needs to embed new images into this
        run (eigenvalues, each graph's degrees and radii; the token vectors stay in the feature
        store) — written for solvers with eigenvalues on whole-data-set kNN graphs."""
        dm = trainer.datamodule
        graphs = getattr(dm, "graphs", None)
        if not graphs or getattr(graphs[0], "radius", None) is None or getattr(pl_module, "theta", None) is None:
            return
        from ldsc.estimator import LDSC

        model = LDSC.from_solution(dm.graph_builder, E, pl_module.theta[: pl_module.K], graphs, dm.store.layers,
                                   store_path=str(dm.store.path), tol=pl_module.tol, oversample=pl_module.m - pl_module.K)
        model.save(self.output_dir / "fit.safetensors", vectors=False)
        log.info("fitted model written to %s (new images: python -m ldsc.extend %s data.root=...)",
                 self.output_dir / "fit.safetensors", self.output_dir)

    def _log_images(self, trainer: L.Trainer) -> None:
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:  # pragma: no cover
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="figures", images=[str(p) for p in self.paths],
                                 caption=[p.stem for p in self.paths])


class EvaluateRun(L.Callback):
    """After :class:`ExportEigenvectors` has written ``eigvecs.pt``, run :func:`ldsc.evaluation.dataset.evaluate_run`
    on the output folder: four-panel figures, what/where and, with ``labels``, mIoU — the same as
    ``python -m ldsc.evaluate OUTPUT_DIR`` afterwards. Add it with ``+callbacks.evaluate=...`` or
    an experiment preset (``conf/experiment/paper_*.yaml``); it must come after ``export``."""

    def __init__(self, output_dir: str, labels: str | None = None, label_map: str | None = None,
                 clusters: int | None = None, figures: int = 4, protocol: str = "dataset", eval_size: int | None = None):
        self.output_dir, self.labels, self.label_map = Path(output_dir), labels, label_map
        self.clusters, self.figures, self.protocol, self.eval_size = clusters, int(figures), protocol, eval_size
        self.metrics: dict | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        from ldsc.evaluation.dataset import evaluate_run, format_summary

        m = evaluate_run(self.output_dir, labels=self.labels, label_map=self.label_map,
                         clusters=self.clusters, n_figures=self.figures, use_wandb=False, protocol=self.protocol,
                         eval_size=self.eval_size)
        self.metrics = m
        log.info("evaluation:\n%s", format_summary(m))
        scalars = {f"eval/{k}": v for k, v in {**m, **m["what_where"]}.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        confusion = Path(m["out"]) / "confusion.png"
        images = [*m["figures"], *([str(confusion)] if confusion.is_file() else [])]
        for logger in trainer.loggers:  # through the run's own loggers (W&B: the same run)
            logger.log_metrics(scalars, step=trainer.global_step)
            if images and hasattr(logger, "log_image") and type(logger).__name__ == "WandbLogger":
                logger.log_image(key="eval/figures", images=images, caption=[Path(p).stem for p in images])


class ClusterStagesFigure(L.Callback):
    """After :class:`ExportEigenvectors`: for the first ``max_images`` images, a clustering
    network's clusters of every stage chained down to the pixels beside ldsc's eigenvector
    segmentation (:func:`ldsc.evaluation.clusters.cluster_stages_figure`), in
    ``<output_dir>/figures/cluster_stages_<i>_<name>.png``. Needs a backbone that exposes its
    poolings (``backbone=fec``); ``experiment=fec_clusters`` adds it."""

    def __init__(self, output_dir: str, max_images: int = 1, k: int | None = None, seed: int = 0):
        self.output_dir, self.max_images, self.k, self.seed = Path(output_dir), int(max_images), k, int(seed)
        self.paths: list[Path] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:  # before any work: a wrong backbone is one sentence
        backbone = trainer.datamodule.backbone
        if not hasattr(backbone, "pool_assignments"):
            from ldsc.errors import ConfigError

            raise ConfigError(f"callbacks.cluster_stages draws a clustering network's stages: it needs backbone=fec, "
                              f"not {type(backbone).__name__}.")

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        import torch

        from ldsc.evaluation.clusters import chain_to_pixels, cluster_stages_figure
        from ldsc.evaluation.segment import segment_image
        from ldsc.export import load_eigenvectors
        from ldsc.features.images import ImageView, image_tensor, load_image

        backbone = trainer.datamodule.backbone
        run = load_eigenvectors(self.output_dir)
        view = getattr(backbone, "view", None) or ImageView()
        for i, f in enumerate(run["files"][: self.max_images]):
            x = image_tensor(f, backbone.input_size, view).unsqueeze(0).to(next(backbone.buffers()).device)
            first, assigns = backbone.pool_assignments(x)
            shown = view.visible(load_image(f))
            stages = chain_to_pixels(first, [a[0].cpu().numpy() for a in assigns], (shown.size[1], shown.size[0]))
            seg = segment_image(torch.as_tensor(run["eigvecs"][i]).float(), k=self.k, seed=self.seed)
            path = self.output_dir / "figures" / f"cluster_stages_{i:04d}_{Path(f).stem}.png"
            self.paths.append(cluster_stages_figure(shown, stages, seg, path, title=Path(f).name))
        log.info("cluster stages: %s", ", ".join(str(p) for p in self.paths))


class AlignmentMonitor(L.Callback):
    """Logs ``train/alignment``: the subspace alignment (docs/method.md, Exact reference) of the solver's
    pseudo-eigenvectors with the exact top-``K`` eigenspace of the whole data set's graphs.

    The exact reference is computed once, at the start of training, and only for small runs
    (at most ``max_tokens`` base-grid nodes over all images): it needs the whole-data-set graph.
    Larger runs log nothing and say so once. ``history`` keeps ``(epoch, seconds, alignment)``
    with the seconds of training so far, not counting this callback's own work (``overhead``).

    Args:
        enabled: switch the monitor off without removing it from the config.
        max_tokens: largest ``n_images · H · W`` for which the reference is computed.
        every_n_epochs: log every this many epochs (and always after the last).
        max_work: largest ``K² · n_images · H · W`` for which the reference is computed (an ``eigsh``
            of ``K`` vectors costs about that; e.g. ``K=1500`` on one 64×64 image is skipped).
    """

    def __init__(self, enabled: bool = True, max_tokens: int = 50_000, every_n_epochs: int = 1,
                 max_work: float = 2e9):
        self.enabled, self.max_tokens, self.every_n_epochs = enabled, int(max_tokens), max(1, int(every_n_epochs))
        self.max_work = float(max_work)
        self.reference: torch.Tensor | None = None
        self.history: list[tuple[int, float, float]] = []
        self.overhead = 0.0
        self._start = None

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        from ldsc.spectral import exact_eigenvectors

        self._start, self.overhead, self.history = time.perf_counter(), 0.0, []
        if not self.enabled or self.reference is not None:
            return
        from ldsc.distributed import world_size

        dm = trainer.datamodule
        tokens = dm.num_images * dm.base_size**2
        if world_size() > 1:
            log.info("alignment monitor off: on several processes no process holds the whole graph; compare "
                     "eigvecs.pt with a single-process run instead")
            return
        if tokens > self.max_tokens:
            log.info("alignment monitor off: %d base-grid nodes > max_tokens=%d (the exact reference is an eigsh "
                     "of the whole-data-set operator)", tokens, self.max_tokens)
            return
        K = int(pl_module.K)
        if K * K * tokens > self.max_work:
            log.info("alignment monitor off: K=%d on %d nodes would make its exact reference (eigsh, ~K²·N work) "
                     "slower than the solve itself; compare with a run of solver=exact instead", K, tokens)
            return
        if not dm.graphs_are_exact():
            log.info("alignment monitor off: the graphs were built by approximate search (graph.search); "
                     "compare with a run of solver=exact graph.search=exact instead")
            return
        t = time.perf_counter()
        graphs = [g.to("cpu") for g in dm.dataset_graphs()]
        _, ref = exact_eigenvectors(graphs, (dm.base_size, dm.base_size), pl_module.K)
        self.reference = ref
        self.overhead += time.perf_counter() - t
        log.info("alignment monitor: exact reference of %d nodes in %.2f s", tokens, time.perf_counter() - t)

    def alignment(self, pl_module) -> float:
        from ldsc.spectral import subspace_alignment

        return subspace_alignment(pl_module.eigenvectors(), self.reference)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.reference is None:
            return
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        if (epoch + 1) % self.every_n_epochs and not last and not trainer.should_stop:
            return
        t = time.perf_counter()
        a = self.alignment(pl_module)
        self.history.append((epoch, t - self._start - self.overhead, a))
        self.overhead += time.perf_counter() - t
        pl_module.log("train/alignment", a, prog_bar=True)
