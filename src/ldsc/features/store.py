"""The feature store: the frozen backbone's token vectors of every image, on disk.

The backbone runs once over the images, in batches, on the run's device; the vectors the graph
type needs (``q``/``k``/``v`` of each captured layer) are written as memory-mapped ``.npy`` files,
one per ``(layer, kind)``, of shape ``(draws, n_images, heads, h, w, d)`` (float16 by default).
Graphs are then built from the store, never from a backbone pass over all images at once.

A store lives in ``<dir>/<key>/``. The key is a hash of everything the vectors depend on: the
backbone's settings, the base grid, the kinds, the number of draws, the seed, the dtype and the
image files themselves (absolute path, size, modification time and a hash of the content), so a
second run over the same files with the same backbone reuses it, and any change builds a new one.
``meta.json`` is written last (atomically) and records all of that: a folder without it is an
interrupted build, and a store whose ``meta.json`` or arrays do not match what this run needs
(damaged, edited, or another run's store under this key) is built again, with a line saying why.
The arrays' disk space is reserved before the backbone runs, so a full disk is one sentence.

Backbones with randomness (Stable Diffusion's timestep and noise) are run ``draws`` times per
image; draw ``r`` of a batch uses a generator seeded by ``(seed, r, the batch's image indices)``,
so a rebuilt store is bit-identical. Each draw gives its own graphs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ldsc.features.backbones.base import LayerFeatures, backbone_draws
from ldsc.errors import ConfigError

log = logging.getLogger(__name__)

#: dtypes a store may be written in
STORE_DTYPES = {"float16": np.float16, "float32": np.float32}
#: kinds kept as integers whatever the store's dtype: ``assign``, the cluster each token joined
#: (``(draws, n_images, heads, h, w)``, from networks that cluster, such as FEC)
INTEGER_KINDS = {"assign": np.int32}


@dataclass
class StoreOptions:
    """Where and how the store is kept (``conf/store/default.yaml``).

    Args:
        dir: parent folder of all stores (default ``outputs/store``, shared by runs).
        rebuild: build again even when a matching store exists.
        dtype: ``float16`` (half the disk and memory) or ``float32``.
    """

    dir: str = "outputs/store"
    rebuild: bool = False
    dtype: str = "float16"

    def __post_init__(self):
        if self.dtype not in STORE_DTYPES:
            raise ConfigError(f"store.dtype must be one of {sorted(STORE_DTYPES)}, not {self.dtype!r}.")


#: content hashes computed in this process, by (path, size, mtime_ns)
_hashes: dict = {}


def file_identity(path: str) -> list:
    """``[absolute path, size, mtime_ns, content hash]`` of an image file: what the store key
    depends on (the hash catches a file rewritten with the same size and time; it is computed
    once per process)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key in _hashes:
        return [*key, _hashes[key]]
    digest = hashlib.blake2b(digest_size=12)
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    _hashes[key] = digest.hexdigest()
    return [*key, _hashes[key]]


def store_identity(backbone_config: dict, base_size: int, kinds: Sequence[str], draws: int, seed: int, dtype: str,
                   files: Sequence[str]) -> dict:
    """Everything the stored vectors depend on (see module docstring), as plain JSON values."""
    payload = {"backbone": backbone_config, "base_size": int(base_size), "kinds": sorted(kinds),
               "draws": int(draws), "seed": int(seed), "dtype": dtype,
               "files": [file_identity(f) for f in files], "version": 2}
    return json.loads(json.dumps(payload, sort_keys=True, default=str))


def identity_key(identity: dict) -> str:
    """The store's folder name: a hash of its :func:`store_identity`."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def store_key(backbone_config: dict, base_size: int, kinds: Sequence[str], draws: int, seed: int, dtype: str,
              files: Sequence[str]) -> str:
    """A hash of everything the stored vectors depend on (see module docstring)."""
    return identity_key(store_identity(backbone_config, base_size, kinds, draws, seed, dtype, files))


def store_problem(path: str | Path, identity: dict | None = None) -> str | None:
    """Why the store at ``path`` cannot be used for a run whose :func:`store_identity` is
    ``identity`` (``None``: any complete store), or ``None`` when it can: ``meta.json`` unreadable
    or of another run, an array missing, truncated, of another shape or dtype."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        layers, kinds = meta["layers"], meta["kinds"]
        n, draws, dtype = int(meta["n_images"]), int(meta["draws"]), STORE_DTYPES[meta["dtype"]]
        shapes = {(li, kind): (draws, n, int(layer["heads"]), *map(int, layer["grid"]))
                  for li, layer in enumerate(layers) for kind in kinds}
        if len(meta["files"]) != n:
            return f"meta.json lists {len(meta['files'])} files for {n} images"
    except FileNotFoundError:
        return "meta.json is missing (an interrupted build)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"meta.json is unreadable ({type(err).__name__}: {str(err)[:80]})"
    if identity is not None and meta.get("identity") != identity:
        theirs = meta.get("identity") or {}
        differs = sorted(k for k in set(identity) | set(theirs) if identity.get(k) != theirs.get(k))
        return f"meta.json records other {', '.join(differs) or 'settings'} than this run's"
    for (li, kind), shape in shapes.items():
        f = path / f"{li}_{kind}.npy"
        try:
            arr = np.load(f, mmap_mode="r")
        except FileNotFoundError:
            return f"{f.name} is missing"
        except (OSError, ValueError, EOFError) as err:
            return f"{f.name} is unreadable ({str(err)[:80]})"
        want = INTEGER_KINDS.get(kind, dtype)
        if tuple(arr.shape[:5]) != shape or arr.dtype != want:
            return f"{f.name} holds {arr.dtype} {tuple(arr.shape)}, meta.json says {np.dtype(want)} {shape + ('d',)}"
    return None


class FeatureStore:
    """A finished store, read through memory maps.

    Attributes:
        path: the store's folder. layers: one dict per layer (``name``, ``grid``, ``heads``,
        ``dim``). kinds: the stored vector kinds. n_images, draws: array sizes.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta = json.loads((self.path / "meta.json").read_text())
        self.layers: list[dict] = meta["layers"]
        self.kinds: list[str] = meta["kinds"]
        self.n_images, self.draws = int(meta["n_images"]), int(meta["draws"])
        self.files: list[str] = meta["files"]
        #: everything the vectors depend on (:func:`store_identity`; ``None`` for a store written
        #: without it), part of the key of the graphs built from them
        self.identity: dict | None = meta.get("identity")
        self._maps: dict = {}

    @staticmethod
    def is_complete(path: str | Path) -> bool:
        """Whether ``path`` holds a finished, readable store (see :func:`store_problem`)."""
        return store_problem(path) is None

    def array(self, layer: int, kind: str) -> np.ndarray:
        """The memory-mapped ``(draws, n_images, heads, h, w, d)`` array of one layer and kind."""
        if kind not in self.kinds:
            raise ConfigError(f"the feature store at {self.path} holds {self.kinds}, not {kind!r} vectors.")
        key = (layer, kind)
        if key not in self._maps:
            self._maps[key] = np.load(self.path / f"{layer}_{kind}.npy", mmap_mode="r")
        return self._maps[key]

    def release(self) -> None:
        """Unmap the arrays read so far (their pages leave the resident memory; later reads map
        them again)."""
        self._maps = {}

    def vectors(self, layer: int, kind: str, draw: int = 0, images: slice | Sequence[int] | None = None) -> torch.Tensor:
        """``(B, heads, h, w, d)`` float32 vectors of ``images`` (default all) for one draw (``assign``:
        ``(B, heads, h, w)`` int64 cluster indices)."""
        arr = self.array(layer, kind)[draw]
        arr = arr if images is None else arr[images]
        if kind in INTEGER_KINDS:
            return torch.from_numpy(np.asarray(arr, dtype=np.int64))
        if arr.dtype == np.float16:  # widened by torch (vectorised, threaded): numpy's float16 -> float32 is ~10x slower
            with warnings.catch_warnings():  # (a read-only map: only read here, by the copy that widens it)
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(np.asarray(arr)).float()
        return torch.from_numpy(np.asarray(arr, dtype=np.float32))

    def features(self, images: Sequence[int], draw: int = 0) -> list[LayerFeatures]:
        """The :class:`LayerFeatures` of a subset of images, as a backbone would return them."""
        idx = np.asarray(images)
        order = np.argsort(idx)  # memory maps read fastest in index order
        inverse = np.argsort(order)
        out = []
        for li, layer in enumerate(self.layers):
            tensors = {k: self.vectors(li, k, draw, idx[order])[torch.from_numpy(inverse)] for k in self.kinds}
            centres = tuple(layer["centres"]) if "centres" in layer else None
            out.append(LayerFeatures(name=layer["name"], centres=centres, **tensors))
        return out


def build_store(path: str | Path, files: Sequence[str], backbone, kinds: Sequence[str], draws: int = 1,
                batch_size: int = 16, device: str | torch.device = "cpu", seed: int = 0, dtype: str = "float16",
                num_workers: int = 0, progress: bool = True, identity: dict | None = None) -> FeatureStore:
    """Run ``backbone`` over ``files`` in batches of ``batch_size`` (``draws`` times each) and write
    the ``kinds`` of every layer to ``path`` (see module docstring); returns the finished store.

    In a run on several processes (:mod:`ldsc.distributed`) the batches are dealt out round-robin
    (batch ``b`` to rank ``b mod P``: the same batches, so the same noise draws, as in one
    process), every rank writes its rows into the shared files, and rank 0 writes ``meta.json``
    once all have finished."""
    from torch.utils.data import DataLoader
    from ldsc import distributed
    from ldsc.features.images import ImageFiles

    path = Path(path)
    lead, parts = distributed.rank() == 0, distributed.world_size()
    if lead:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    np_dtype = STORE_DTYPES[dtype]
    torch_dtype = torch.float16 if np_dtype is np.float16 else torch.float32
    size = max(1, min(batch_size, len(files)))
    batches = [list(range(s, min(len(files), s + size))) for s in range(0, len(files), size)]
    mine = batches[distributed.rank()::parts]
    loader = DataLoader(ImageFiles(files, backbone.input_size, getattr(backbone, "view", None)), batch_sampler=mine, num_workers=num_workers)
    backbone = backbone.to(device)
    arrays: dict = {}
    layers: list[dict] = []
    from ldsc.progress import bar as progress_bar

    bar = progress_bar(total=sum(map(len, mine)) * draws, desc="features", unit="img", disable=not progress or not mine,
               leave=False)

    def draws_of(batch):
        """``(draw, features)`` of a batch, one draw at a time (each written before the next)."""
        yield from backbone_draws(backbone, batch["image"].to(device), batch["index"], seed, draws)

    written = [0]  # bytes written through the maps since they were last opened

    def write(batch, r: int, feats: list[LayerFeatures]) -> None:
        lo, hi = int(batch["index"][0]), int(batch["index"][-1]) + 1
        for li, layer in enumerate(feats):
            for kind in kinds:
                t = layer.vectors(kind).detach().cpu()
                # (narrowed by torch: numpy's float32 -> float16 is 3-40x slower, the same bits)
                block = t.numpy().astype(INTEGER_KINDS[kind]) if kind in INTEGER_KINDS else t.to(torch_dtype).numpy()
                arrays[li, kind][r, lo:hi] = block
                written[0] += block.nbytes
        if written[0] > UNMAP_EVERY_BYTES:  # written pages would stay in this process's resident memory
            for arr in arrays.values():
                arr.flush()
            _open_for_writing(path, len(feats), kinds, arrays)  # the old maps (and their pages) are dropped
            written[0] = 0
        bar.update(hi - lo)

    it = iter(loader)
    first = next(it, None)
    pending = draws_of(first) if first is not None else iter(())
    head = next(pending, None)  # draw 0 of the first batch: the files' shapes
    if lead:  # (rank 0 always has a batch)
        layers = _allocate(path, head[1], kinds, draws, len(files), np_dtype, arrays)
    distributed.barrier()  # the files exist before any other rank opens them
    if head is not None:
        if not lead:
            _open_for_writing(path, len(head[1]), kinds, arrays)
        write(first, *head)
        del head
        for r, feats in pending:
            write(first, r, feats)
    for batch in it:
        for r, feats in draws_of(batch):
            write(batch, r, feats)
    bar.close()
    for arr in arrays.values():
        arr.flush()
    del arrays
    distributed.barrier()  # every rank's rows are on disk
    if lead:
        meta = {"layers": layers, "kinds": sorted(kinds), "n_images": len(files), "draws": int(draws),
                "files": list(files), "dtype": dtype, "identity": identity}
        tmp = path / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, path / "meta.json")
    distributed.barrier()
    return FeatureStore(path)


#: a store being written is unmapped and mapped again after this many bytes, so that the pages
#: written stay in the page cache (written back by the kernel) and not in the writer's resident set
UNMAP_EVERY_BYTES = 1 << 30


def _open_for_writing(path: Path, n_layers: int, kinds: Sequence[str], arrays: dict) -> None:
    """Open the files rank 0 allocated (see :func:`_allocate`) for writing this rank's rows."""
    for li in range(n_layers):
        for kind in kinds:
            arrays[li, kind] = np.load(path / f"{li}_{kind}.npy", mmap_mode="r+")


def _allocate(path: Path, feats: list[LayerFeatures], kinds: Sequence[str], draws: int, n: int, np_dtype,
              arrays: dict) -> list[dict]:
    layers = []
    for li, layer in enumerate(feats):
        for kind in kinds:
            t = layer.vectors(kind)
            shape = (draws, n, *t.shape[1:])
            f = path / f"{li}_{kind}.npy"
            arrays[li, kind] = np.lib.format.open_memmap(f, mode="w+", dtype=INTEGER_KINDS.get(kind, np_dtype),
                                                         shape=shape)
            _reserve(f)
        h, w = layer.grid
        info = {"name": layer.name, "grid": [h, w], "heads": layer.heads,
                "dim": max([int(layer.vectors(kind).shape[-1]) for kind in kinds if kind not in INTEGER_KINDS] or [0])}
        if layer.centres is not None:  # the cluster grid the ``assign`` indices count over
            info["centres"] = [int(layer.centres[0]), int(layer.centres[1])]
        layers.append(info)
    return layers


def _reserve(f: Path) -> None:
    """Reserve the disk blocks of a freshly created (sparse) memory-mapped file: without it a full
    disk is found only when a page is written through the map, which kills the process (SIGBUS)."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(f, "r+b") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        except OSError as err:
            if err.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve: write as before
                return
            raise


def store_location(options: StoreOptions, files: Sequence[str], backbone_config: dict, base_size: int,
                   kinds: Sequence[str], draws: int, seed: int) -> tuple[Path, dict]:
    """``(folder, identity)`` of the store of these files and settings."""
    identity = store_identity(backbone_config, base_size, kinds, draws, seed, options.dtype, files)
    return Path(os.path.expanduser(options.dir)) / identity_key(identity), identity


def open_or_build(options: StoreOptions, files: Sequence[str], backbone, backbone_config: dict, base_size: int,
                  kinds: Sequence[str], seed: int = 0, batch_size: int = 16, device="cpu",
                  num_workers: int = 0, before_building=None) -> FeatureStore:
    """The store of these files and settings: reused when complete (unless ``options.rebuild``),
    built otherwise (``before_building()`` is called first: e.g. the backbone pass's memory check,
    which a reused store, running no pass, does not need)."""
    draws = int(getattr(backbone, "draws", 1))
    if draws < 1:
        raise ConfigError(f"backbone.draws must be at least 1, not {draws}.")
    from ldsc.distributed import broadcast_object

    from ldsc.distributed import rank

    path, identity = store_location(options, files, backbone_config, base_size, kinds, draws, seed)
    # rank 0 decides for every process (they share the folder)
    problem = None
    if rank() == 0 and path.exists() and not options.rebuild:
        problem = store_problem(path, identity)
        if problem and not problem.startswith("meta.json is missing"):
            log.warning("feature store %s cannot be used (%s): building it again", path, problem)
    if broadcast_object(path.exists() and problem is None and not options.rebuild):
        log.info("feature store: reusing %s", path)
        return FeatureStore(path)
    if before_building is not None:
        before_building()
    log.info("feature store: writing %d image(s) x %d draw(s) to %s", len(files), draws, path)
    try:
        return build_store(path, files, backbone, kinds, draws, batch_size, device, seed, options.dtype, num_workers,
                           identity=identity)
    except OSError as err:
        if rank() == 0:
            shutil.rmtree(path, ignore_errors=True)  # a partial store only takes space
        raise ConfigError(f"Could not write the feature store to '{path}' ({err.strerror or err}): set store.dir "
                          f"to a writable folder with enough space.") from err


class MemoryStore:
    """The read interface of :class:`FeatureStore` over token vectors already in memory (what
    :class:`ldsc.LDSC` fits on): the same graph code reads either.

    Args:
        features: one :class:`LayerFeatures` per layer, each holding every image (``(n, heads, h,
            w, d)`` tensors); draws: always 1 (one backbone pass per image).
    """

    draws = 1

    def __init__(self, features: Sequence[LayerFeatures], kinds: Sequence[str]):
        if not features:
            raise ConfigError("no layers given: pass one tensor (or q/k/v dict) per layer.")
        self.source = list(features)
        self.kinds = list(kinds)
        self.files: list[str] = []
        self.n_images = features[0].batch_size
        self.layers = []
        for layer in self.source:
            if layer.batch_size != self.n_images:
                raise ConfigError(f"layer {layer.name} holds {layer.batch_size} images, the first layer {self.n_images}: "
                                  f"every layer must hold the same images.")
            for kind in self.kinds:
                layer.vectors(kind)  # one sentence now if a kind is missing
            t = layer.vectors(self.kinds[0])
            self.layers.append({"name": layer.name, "grid": list(layer.grid), "heads": layer.heads, "dim": int(t.shape[-1])})

    def vectors(self, layer: int, kind: str, draw: int = 0, images: slice | Sequence[int] | None = None) -> torch.Tensor:
        """``(B, heads, h, w, d)`` float32 vectors of ``images`` (default all)."""
        t = self.source[layer].vectors(kind)
        t = t if images is None else t[images if isinstance(images, slice) else torch.as_tensor(np.asarray(images))]
        return t.float()

    def features(self, images: Sequence[int], draw: int = 0) -> list[LayerFeatures]:
        """The :class:`LayerFeatures` of a subset of images (as :meth:`FeatureStore.features`)."""
        idx = torch.as_tensor(np.asarray(list(images)), dtype=torch.long)
        return [LayerFeatures(name=layer.name, **{k: layer.vectors(k)[idx] for k in self.kinds}) for layer in self.source]

    def release(self) -> None:
        """Nothing to unmap."""
