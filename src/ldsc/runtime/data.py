"""Images in, layer graphs out: images -> backbone -> feature store -> graphs.

Datasets only read and resize images (that is all worker processes do). The
:class:`ImageDataModule` runs the frozen backbone over the images in batches into the feature
store (:mod:`ldsc.features.store`), builds the graphs from the store, and hands the solver
``{"index": (B,), "graphs": [...]}``.

Images are resized to the backbone's square ``input_size`` without cropping by default (aspect
ratio not kept), so the eigenvectors cover the whole image; figures and evaluation resize back. A
backbone given ``resize`` / ``crop`` sees the centred square instead
(:class:`~ldsc.features.images.ImageView`), and label maps and figures are cut the same way.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import functools

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ldsc.errors import DataError
from ldsc.features.images import (IMAGE_EXTENSIONS, SAMPLE_FILES, ImageFiles, batch_seed, sample_paths,  # noqa: F401 (re-exported)
                                  image_tensor, load_image, readable_images)

log = logging.getLogger(__name__)

class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation each epoch, a pure function of ``(seed, epoch)``, so a run resumed from a
    checkpoint sees the same batches as an uninterrupted one. Lightning calls ``set_epoch``."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class _Steps(Dataset):
    """``n`` placeholder items: one per solver step of an epoch over the whole-data-set graphs."""

    def __init__(self, n: int = 1):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class _Finishing:
    """``work()`` on a daemon thread; :meth:`join` waits for it and raises what it raised (a run
    stopped by a signal meanwhile exits without waiting: nothing of it is kept half-done — the
    graph store is renamed into place only when complete)."""

    def __init__(self, work):
        import threading

        self.error: BaseException | None = None

        def run() -> None:
            try:
                work()
            except BaseException as err:  # handed to the joining thread
                self.error = err

        self._thread = threading.Thread(target=run, name="ldsc-graphs", daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise self.error


class ImageDataModule:
    """Images -> frozen backbone -> feature store -> graphs, for the solver.

    A plain class (importing it does not import Lightning): a one-process run computes the
    features and graphs before Lightning is imported (``run.py``), so a problem with them is
    reported without that wait; :func:`as_lightning` gives the same object as a
    ``LightningDataModule`` for ``Trainer.fit``.

    Subclasses implement :meth:`find_images`. ``run.py`` calls :meth:`attach` with the backbone,
    the graph builder, the base grid and the scope the solver works on, before fitting.

    * ``scope="dataset"`` (the default and exact solvers): :meth:`setup` fills the feature store
      (:mod:`ldsc.features.store`; reused when it exists) and builds the whole data set's graphs once
      (:meth:`~ldsc.graphs.knn.KnnGraphBuilder.dataset_graphs`), after a memory estimate; every epoch
      is one batch ``{"index": all images, "graphs": the graphs}``.
    * ``scope="batch"`` (the paper's recipes): batches of ``batch_size`` images, reshuffled every
      epoch; each batch's graphs are built from the store's vectors of its images (draw
      ``epoch mod draws``): ``{"index": (B,), "graphs": list[LayerGraph]}``.

    Args:
        batch_size: images per backbone pass while filling the store, and per batch in the
            ``batch`` scope.
        num_workers: image-reading worker processes.
        shuffle: reshuffle the batches every epoch (``batch`` scope).
        check_images: decode every image once at set-up and skip unreadable ones with a warning.
        limit: use only the first ``limit`` images (sorted by name).
        memory_limit_gb: refuse a data-set run whose estimated peak memory exceeds this
            (``null``: the memory available when the run starts); on several processes the sum
            over the processes of one machine is compared.
    """

    def __init__(self, batch_size: int = 40, num_workers: int = 0, shuffle: bool = True,
                 check_images: bool = True, limit: int | None = None, memory_limit_gb: float | None = None):
        super().__init__()
        #: the Lightning trainer once fitting (set by Lightning on the :func:`as_lightning` object)
        self.trainer = None
        self.batch_size, self.num_workers, self.shuffle = int(batch_size), int(num_workers), shuffle
        self.check_images, self.limit = check_images, limit
        self.memory_limit_gb = memory_limit_gb
        self.files: list[str] | None = None
        self.backbone = None
        self.graph_builder = None
        self.base_size: int | None = None
        self.seed = 0
        self.scope = "dataset"
        self.store_options = None
        self.backbone_config: dict = {}
        #: the graph settings (``cfg.graph``): with the feature store's identity, the graph store's key
        self.graph_config: dict | None = None
        self.store = None
        self.graphs: list | None = None
        #: wall time and peak memory of each stage (see :mod:`ldsc.profiling`)
        self.stages: dict = {}
        self._device_graphs: tuple | None = None
        #: bytes of the solver's own state (table, optimiser, EMA), set by ``run.py`` for the check
        self.solver_state_bytes = 0
        #: write the graph store from a thread while the solver runs (``run.py`` sets it)
        self.background_writes = False
        self._writer = None
        #: the graphs' symmetrisation finishing on a thread (:meth:`build` with ``finish_graphs_in_background``)
        self._finishing = None
        self._finish_in_background = False

    # -- what subclasses provide -------------------------------------------------------------
    def find_images(self) -> list[str]:
        raise NotImplementedError

    # -- wiring ------------------------------------------------------------------------------
    def attach(self, backbone, graph_builder, base_size: int, seed: int = 0, scope: str = "dataset",
               store=None, backbone_config: dict | None = None, graph_config: dict | None = None) -> None:
        """Give the data module its backbone, graph builder and base grid; ``scope`` is
        ``dataset`` or ``batch`` (see class docstring); ``store`` the
        :class:`~ldsc.features.store.StoreOptions`; ``backbone_config`` the backbone's settings (part of
        the store's key); ``graph_config`` the graph settings (part of the graph store's key; ``None``:
        the whole-data-set graphs are not stored)."""
        from ldsc.features.store import StoreOptions

        if scope not in ("dataset", "batch"):
            raise ValueError(f"scope must be 'dataset' or 'batch', not {scope!r}")
        self.backbone, self.graph_builder, self.base_size, self.seed = backbone, graph_builder, base_size, seed
        self.scope, self.store_options = scope, store or StoreOptions()
        self.backbone_config = backbone_config if backbone_config is not None else {"class": type(backbone).__name__}
        self.graph_config = graph_config
        backbone.set_base_size(base_size)

    def prepare_files(self) -> list[str]:
        """Find, limit and check the images once; returns the file list (index -> path)."""
        if self.files is None:
            files = self.find_images()
            if self.limit is not None:
                files = files[: int(self.limit)]
            good, bad = readable_images(files, self.check_images)
            if bad:
                log.warning("skipped %d of %d images that could not be read (first: %s)", len(bad), len(files), bad[0])
            if not good:
                raise DataError(f"None of the {len(files)} images found by {type(self).__name__} could be read.")
            self.files = good
        return self.files

    @property
    def num_images(self) -> int:
        return len(self.prepare_files())

    def _device(self):
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cpu")

    def feature_store(self, device=None):
        """The :class:`~ldsc.features.store.FeatureStore` of this data set (opened or built once)."""
        from ldsc.profiling import stage
        from ldsc.features.store import open_or_build

        if self.store is None:
            if self.backbone is None or self.graph_builder is None:
                raise RuntimeError("call attach(backbone, graph_builder, base_size) before using the data module")
            with stage("features", self.stages):
                self.store = open_or_build(self.store_options, self.prepare_files(), self.backbone,
                                           self.backbone_config, self.base_size, self.graph_builder.kinds,
                                           seed=self.seed, batch_size=self.batch_size,
                                           device=device or self._device(), num_workers=self.num_workers,
                                           before_building=self.check_backbone_memory)
        return self.store

    def memory_limit(self) -> int | None:
        """Bytes a run may use: ``memory_limit_gb``, else what the OS says is available."""
        return int(self.memory_limit_gb * 2**30) if self.memory_limit_gb else available_memory()

    def check_backbone_memory(self) -> None:
        """Refuse, with one sentence, a backbone pass that would not fit in memory (backbones that
        can tell beforehand: :meth:`~ldsc.features.backbones.base.Backbone.pass_bytes`)."""
        from ldsc.errors import ConfigError
        from ldsc.graphs.memory import PROCESS_BYTES

        batch = max(1, min(self.batch_size, len(self.prepare_files())))
        need = getattr(self.backbone, "pass_bytes", lambda b: None)(batch)
        limit = self.memory_limit()
        if need and limit and need + PROCESS_BYTES > limit:
            gb = 2**30
            raise ConfigError(
                f"The backbone pass over a batch of {batch} image(s) at base grid {self.base_size}x{self.base_size} "
                f"needs about {(need + PROCESS_BYTES) / gb:.1f} GB but {limit / gb:.1f} GB are available: lower "
                f"base_size or data.batch_size (or backbone.n_features), or raise data.memory_limit_gb.")

    def check_memory(self, mapped_graphs: bool = False) -> dict:
        """Estimate the peak memory of the whole-data-set graphs and solver; refuse, with one
        sentence, a run that would not fit (see :func:`~ldsc.graphs.memory.estimate_dataset_graph_bytes`).
        ``mapped_graphs``: the graphs come memory-mapped from the graph store (nothing is built;
        their pages are file-backed, so the kernel can drop them): only the solver's part counts."""
        from ldsc.distributed import world_size
        from ldsc.errors import ConfigError
        from ldsc.graphs.memory import PROCESS_BYTES

        store = self.feature_store()
        # the batch scope builds one batch's graphs at a time and keeps the whole table (+ optimiser state)
        n = store.n_images if self.scope == "dataset" else min(self.batch_size, store.n_images)
        est = self.graph_builder.memory_estimate(n, store.layers, store.draws if self.scope == "dataset" else 1,
                                                 self.base_size, shards=world_size())
        if est is None:  # the builder cannot say (attention graphs: bounded per image)
            return {}
        if self.scope == "batch" and self.solver_state_bytes:
            est["solver"] = max(est["solver"], self.solver_state_bytes)
            est["peak"] = PROCESS_BYTES + max(est["build"], est["graphs"] + est["solver"])
        if mapped_graphs:
            est = dict(est, build=0, graphs=0, peak=PROCESS_BYTES + est["solver"])
        limit = self.memory_limit()
        # the processes of one machine share its memory
        local = int(self.trainer.num_devices) if self.trainer is not None and world_size() > 1 else 1
        if limit and est["peak"] * local > limit:
            gb = 2**30
            each = f" in each of its {local} processes on this machine" if local > 1 else ""
            raise ConfigError(
                f"This run needs about {est['peak'] / gb:.1f} GB{each} (graphs {est['graphs'] / gb:.1f} GB, solver "
                f"{est['solver'] / gb:.1f} GB, building {est['build'] / gb:.1f} GB at its peak) but {limit / gb:.1f} GB are available: "
                f"lower graph.k_intra/graph.k_inter, set graph.dim (e.g. 64), use fewer images (data.limit) or a "
                f"smaller base_size, or raise data.memory_limit_gb.")
        return est

    def dataset_graphs(self) -> list:
        """The whole data set's layer graphs, built once from the feature store."""
        from ldsc.profiling import stage

        self._wait_for_graphs()
        if self.graphs is None:
            store = self.feature_store()
            folder, identity = self.graph_store()
            if folder is not None and self.stored_graphs_usable(folder, identity):
                from ldsc.graphs.graph_store import load_graphs

                self.check_memory(mapped_graphs=True)
                with stage("graphs", self.stages):
                    self.graphs = self.graph_builder.from_stored(load_graphs(folder), store, self.base_size)
                self.stages["graphs"]["reused"] = str(folder)
                log.info("graphs: reusing %s (no neighbour search; graph.rebuild=true builds them again)", folder)
                return self.graphs
            self.check_memory()
            builder = self.graph_builder
            # (the kNN builder searches and symmetrises in two halves; the attention and
            # co-assignment builders build in one go)
            if not (self._finish_in_background and hasattr(builder, "searched_layers")):
                with stage("graphs", self.stages):
                    graphs = builder.dataset_graphs(store, self.base_size, device=self._device())
                self._graphs_built(graphs, folder, identity)
                return self.graphs
            with stage("graphs", self.stages):  # the searches here, the symmetrisations on a thread
                layers = list(builder.searched_layers(store, self.base_size, device=self._device()))

            def finish() -> None:
                with stage("graphs", self.stages):
                    graphs = []
                    while layers:  # (each layer's lists released as soon as its graph exists)
                        graphs.append(builder.symmetrized(layers.pop(0)))
                self._graphs_built(graphs, folder, identity)

            self._finishing = _Finishing(finish)
        return self.graphs

    def _graphs_built(self, graphs: list, folder, identity) -> None:
        """Record the finished graphs: timings, the edge check, the graph store."""
        for name, sec in self.graph_builder.timings.items():
            self.stages["graphs"][f"{name}_s"] = round(sec, 3)
        self.stages["graphs"]["layers"] = self.graph_builder.layer_timings
        check_edges(graphs, self.graph_builder)
        log.info("graphs: %s", ", ".join(f"{g.name} {g.grid[0]}x{g.grid[1]}" for g in graphs))
        self.graphs = graphs
        parts = self.graph_builder.stored_parts(graphs)  # (none of attention graphs)
        if folder is not None and parts:
            self.write_graph_store(folder, identity, parts)

    def _wait_for_graphs(self) -> None:
        """Join the graphs' background symmetrisation, if one runs (its error is raised here)."""
        if self._finishing is not None:
            finishing, self._finishing = self._finishing, None
            finishing.join()

    def graph_store(self) -> tuple:
        """``(folder, identity)`` of this run's stored graphs (:mod:`ldsc.graphs.graph_store`), or
        ``(None, None)`` when they are not stored (no graph settings given, a store without identity)."""
        from ldsc.distributed import rank, world_size
        from ldsc.graphs.graph_store import graph_folder, graph_identity

        store_identity = getattr(self.store, "identity", None)
        if self.graph_config is None or store_identity is None:
            return None, None
        identity = graph_identity(store_identity, self.graph_config, self.base_size, rank(), world_size())
        return graph_folder(self.store.path, identity), identity

    def stored_graphs_usable(self, folder, identity: dict) -> bool:
        """Whether every process finds its stored graphs complete and of this run (all or none reuse:
        a process that builds runs collectives the others would never join)."""
        from ldsc.distributed import all_reduce_max
        from ldsc.graphs.graph_store import graph_problem

        problem = None if self.graph_builder.rebuild else graph_problem(folder, identity)
        if problem and folder.exists() and not problem.startswith("meta.json is missing"):
            log.warning("graph store %s cannot be used (%s): building the graphs again", folder, problem)
        return all_reduce_max(0.0 if problem is None and not self.graph_builder.rebuild else 1.0) == 0.0

    def write_graph_store(self, folder, identity: dict, parts: list) -> None:
        """Keep the graphs for resumes and re-runs; a failed write only costs the reuse. With
        :attr:`background_writes` (set by ``run.py``) the files are written by a thread while the
        solver starts (the writes release the GIL); :meth:`wait_for_writes` joins it."""
        import threading
        import time

        from ldsc.graphs.graph_store import save_graphs

        def write() -> None:
            try:
                started = time.perf_counter()
                save_graphs(folder, parts, identity)
                self.stages.setdefault("graphs", {})["store_write_s"] = round(time.perf_counter() - started, 3)
                log.info("graphs: stored in %s", folder)
            except OSError as err:
                log.warning("graphs: could not be stored in %s (%s); a resume will build them again", folder,
                            err.strerror or err)

        if not self.background_writes:
            write()
            return
        # (a daemon: a run stopped by a signal does not wait for it; the folder is renamed into place
        # only when complete, so an unfinished write leaves no store)
        self._writer = threading.Thread(target=write, name="ldsc-graph-store", daemon=True)
        self._writer.start()

    def wait_for_writes(self) -> None:
        """Wait until the graph store written in the background (if any) is on disk."""
        self._wait_for_graphs()  # (whose thread starts that write)
        if self._writer is not None:
            self._writer.join()
            self._writer = None

    def graphs_are_exact(self) -> bool:
        """Whether the whole-data-set graphs were built by exact (brute-force) search."""
        b = self.graph_builder
        if self.store is None:
            return True
        return all(b.search_method(self.store.n_images * layer["grid"][0] * layer["grid"][1], self._device()) == "exact"
                   for layer in self.store.layers)

    def setup(self, stage: str | None = None) -> None:
        from ldsc.distributed import patient_child_observer, world_size

        if world_size() > 1:  # before the collectives of building the store and graphs (Lightning
            # registers its own SIGTERM handler, which runs a collective, only after set-up: the
            # solver takes it over again when training starts)
            from ldsc import interrupt

            interrupt.take_over_sigterm(getattr(self.trainer.strategy.launcher, "kill", None))
            patient_child_observer()  # rank 0 finishes its own stop before the launcher's observer kills it
        self.build()

    def build(self, finish_graphs_in_background: bool = False) -> None:
        """The set-up's work: find the images, fill (or open) the feature store and, in the
        ``dataset`` scope, build (or open) the whole data set's graphs; done once (a later call, or
        Lightning's :meth:`setup`, finds them). Without a trainer it runs on the CPU.

        ``finish_graphs_in_background`` (``run.py``'s one-process CPU runs): return once the
        neighbour searches are done and symmetrise the lists on a thread — compiled loops that
        run without the interpreter lock, beside Lightning's import (seconds of pure Python);
        :meth:`dataset_graphs` waits for them."""
        self.prepare_files()
        self.feature_store()
        if self.scope == "dataset":
            if finish_graphs_in_background:
                from ldsc.graphs.kernels import load_symmetrize_kernels

                load_symmetrize_kernels()  # (here: the thread then imports and compiles nothing)
            self._finish_in_background = finish_graphs_in_background
            try:
                self.dataset_graphs()
            finally:
                self._finish_in_background = False
        else:  # graphs per batch: the same check, per batch
            self.check_memory()

    def train_dataloader(self) -> DataLoader:
        n = self.num_images
        if self.scope == "dataset":
            return DataLoader(_Steps(1), batch_size=1)
        return DataLoader(_Steps(n), batch_size=min(self.batch_size, n),
                          sampler=EpochShuffleSampler(n, self.seed, self.shuffle))

    def on_after_batch_transfer(self, batch, dataloader_idx: int) -> dict:
        device = batch.device
        if self.scope == "dataset":
            if self._device_graphs is None or self._device_graphs[0] != device:
                graphs = self.dataset_graphs()
                self._device_graphs = (device, graphs if device.type == "cpu" else [g.to(device) for g in graphs])
            return {"index": torch.arange(self.num_images, device=device), "graphs": self._device_graphs[1]}
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        store = self.feature_store()
        features = store.features(batch.tolist(), draw=epoch % store.draws)
        for layer in features:
            for name in ("q", "k", "v"):
                if getattr(layer, name) is not None:
                    setattr(layer, name, getattr(layer, name).to(device))
        with torch.no_grad():
            return {"index": batch, "graphs": self.graph_builder(features, self.base_size)}


def as_lightning(datamodule: ImageDataModule):
    """``datamodule`` as a ``LightningDataModule`` (its class with Lightning's base added, the same
    state: the two share the stages, files, store and graphs computed so far)."""
    import lightning as L

    cls = _lightning_class(type(datamodule))
    out = cls.__new__(cls)
    L.LightningDataModule.__init__(out)
    out.__dict__.update({k: v for k, v in datamodule.__dict__.items() if k != "trainer"})
    return out


@functools.cache
def _lightning_class(cls: type) -> type:
    import lightning as L

    return type(cls.__name__, (cls, L.LightningDataModule), {"__module__": cls.__module__, "__doc__": cls.__doc__})


def check_edges(graphs: list, builder) -> None:
    """Refuse graphs without a single edge (the solver would return its random start)."""
    from ldsc.errors import ConfigError

    for g in graphs:
        nnz = g.nnz if hasattr(g, "nnz") else int(g.W._nnz())
        if nnz == 0:
            raise ConfigError(
                f"The graph of layer {g.name} ({g.grid[0]}x{g.grid[1]} tokens per image) has no edges with "
                f"{builder.describe()}: lower the threshold, raise the k's or base_size.")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable``), if the OS tells."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


#: the subfolders a run writes into its folder
RUN_SUBFOLDERS = ("figures", "eval", "checkpoints", "csv", "wandb", ".hydra", "store")


def is_ldsc_output(folder: str, dirs: Sequence[str], names: Sequence[str]) -> bool:
    """Whether ``folder`` (with its subfolders ``dirs`` and files ``names``) is an ldsc run folder
    (``eigvecs.pt``, ``stages.json``, a lock, or ``.hydra/config.yaml``) or a feature store
    (``meta.json`` beside ``.npy`` arrays)."""
    names = set(names)
    if any(m in names for m in ("eigvecs.pt", ".ldsc.lock", "stages.json")):
        return True
    if ".hydra" in dirs and os.path.isfile(os.path.join(folder, ".hydra", "config.yaml")):
        return True
    return "meta.json" in names and any(n.endswith(".npy") for n in names)


class FolderDataModule(ImageDataModule):
    """Every image in ``root`` (recursively, sorted by path)."""

    def __init__(self, root: str, recursive: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.root, self.recursive = root, bool(recursive)

    def find_images(self) -> list[str]:
        root = Path(os.path.expanduser(str(self.root)))
        if not root.exists():
            raise DataError(f"Image folder '{root}' does not exist.")
        if not root.is_dir():
            raise DataError(f"'{root}' is a file, not a folder: use data=single data.path={root} for one image.")
        files, skipped = [], []
        for folder, dirs, names in os.walk(root, followlinks=True):  # one walk: the images, minus ldsc's own outputs
            if is_ldsc_output(folder, dirs, names):
                skipped.append(folder)
                if Path(folder) != root:
                    dirs[:] = []
                    continue
                dirs[:] = [d for d in dirs if d not in RUN_SUBFOLDERS]  # a run written into the image folder
            files += [os.path.join(folder, n) for n in names if Path(n).suffix.lower() in IMAGE_EXTENSIONS]
            if not self.recursive:
                break
        files = sorted(f for f in files if os.path.isfile(f))
        if skipped:  # an earlier run's figures are not images of the data set
            log.info("left out %d ldsc output folder(s) under %s (e.g. %s)", len(skipped), root, skipped[0])
        if not files:
            raise DataError(f"Image folder '{root}' contains no images (looked for {', '.join(IMAGE_EXTENSIONS)}).")
        return files


class SingleImageDataModule(ImageDataModule):
    """One image file."""

    def __init__(self, path: str, batch_size: int = 1, shuffle: bool = False, **kwargs):
        super().__init__(batch_size=batch_size, shuffle=shuffle, **kwargs)
        self.path = path

    def find_images(self) -> list[str]:
        path = Path(os.path.expanduser(str(self.path)))
        if path.is_dir():
            raise DataError(f"'{path}' is a folder, not an image: use data=folder data.root={path} for all its images.")
        if not path.is_file():
            raise DataError(f"Image file '{path}' does not exist.")
        load_image(path)  # one sentence if it cannot be read
        return [str(path)]


class SamplesDataModule(ImageDataModule):
    """The colour photographs bundled with scikit-image: runs with nothing downloaded."""

    def __init__(self, names: Sequence[str] = SAMPLE_FILES, batch_size: int = 4, **kwargs):
        super().__init__(batch_size=batch_size, **kwargs)
        self.names = list(names)

    def find_images(self) -> list[str]:
        return sample_paths(self.names)


class CocoDataModule(FolderDataModule):
    """A folder of COCO images (``val2017`` by default; ``make data`` downloads it)."""

    def __init__(self, root: str, num_workers: int = 2, **kwargs):
        super().__init__(root, num_workers=num_workers, **kwargs)

    def find_images(self) -> list[str]:
        root = Path(os.path.expanduser(str(self.root)))
        if not root.exists():
            raise DataError(f"COCO image folder '{root}' does not exist: run `make data` (needs internet) "
                            f"or pass data.root=/path/to/val2017.")
        return super().find_images()


class CocoStuffDataModule(CocoDataModule):
    """COCO images scored on COCO-Stuff-27: with ``curated`` (default) only the images of the curated
    2,175-image list (:func:`ldsc.features.images.curated_ids`, matched by file stem) that are in
    ``root``; the log says how many of the list were found. ``curated=false``: every image."""

    def __init__(self, root: str, curated: bool = True, **kwargs):
        super().__init__(root, **kwargs)
        self.curated = bool(curated)

    def find_images(self) -> list[str]:
        from ldsc.features.images import curated_ids

        files = super().find_images()
        if not self.curated:
            return files
        wanted = curated_ids("cocostuff27")
        keep = set(wanted)
        chosen = [f for f in files if Path(f).stem in keep]
        if not chosen:
            raise DataError(f"'{self.root}' holds none of the {len(wanted):,} images of the curated COCO-Stuff-27 list "
                            f"(files named by their 12-digit COCO id, e.g. {wanted[0]}.jpg): point data.root at COCO "
                            f"val2017, or set data.curated=false to use every image of the folder.")
        log.info("COCO-Stuff-27 curated list: %d of its %s images are in %s (%d other image(s) there not used)",
                 len(chosen), f"{len(wanted):,}", self.root, len(files) - len(chosen))
        return chosen
