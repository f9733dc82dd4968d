"""The graph store: whole-data-set graphs written once, memory-mapped on reuse.

Building the graphs of a large data set is most of a run (minutes of neighbour search at 10⁴
images); the graphs depend only on the feature store's vectors and the graph settings. So they are
written to disk once, beside the feature store they were built from::

    <store.dir>/<feature store key>/graphs/<graph key>/
        meta.json                      name, grid, n_images, weight, source, image range, blocks
                                       of every graph, and the identity below (written last)
        <g>_degree.npy  <g>_order.npy  <g>_rank.npy  <g>_radius.npy  <g>_projection.npy
        <g>_<b>_crow.npy  <g>_<b>_col.npy  <g>_<b>_val.npy      CSR block b of graph g

The graph key hashes the feature store's identity, every graph setting (``graph.*`` except
``rebuild``), the base grid and the process layout (a run on P processes stores each rank's rows
in its own folder ``rank<r>of<P>``). A resumed run, and any run whose graph settings match — another
``K``, solver or tolerance — opens the stored graphs instead of searching again; the arrays are
memory-mapped (``np.load(mmap_mode="r")``), so reuse reads only the pages a product touches.
``graph.rebuild=true`` forces a new build. The folder is written under a temporary name and
renamed into place, so an interrupted write leaves no half store; a store that fails its checks
(``meta.json`` unreadable or of other settings, an array missing or of another shape) is reported
in one log line and built again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from ldsc.graphs.dataset import DatasetGraph

log = logging.getLogger(__name__)

#: bump when the stored layout changes
VERSION = 1


def graph_identity(store_identity: dict, graph_settings: dict, base_size: int, rank: int = 0, world: int = 1) -> dict:
    """Everything stored graphs depend on, as plain JSON values."""
    settings = {k: v for k, v in graph_settings.items() if k not in ("rebuild", "_target_")}
    payload = {"store": store_identity, "graph": settings, "base_size": int(base_size), "rank": int(rank),
               "world": int(world), "version": VERSION}
    return json.loads(json.dumps(payload, sort_keys=True, default=str))


def graph_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def graph_folder(store_path: str | Path, identity: dict) -> Path:
    """Where the graphs of ``identity`` live: inside the feature store they were built from."""
    sub = graph_key(identity)
    if int(identity.get("world", 1)) > 1:
        sub = f"{sub}/rank{identity['rank']}of{identity['world']}"
    return Path(store_path) / "graphs" / sub


def _save(path: Path, array: np.ndarray) -> None:
    """``np.save`` whose data write releases the GIL (a plain file write of the array's buffer), so
    a store written from a thread does not hold up the solver's Python."""
    array = np.ascontiguousarray(array)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
        f.write(memoryview(array.reshape(-1)).cast("B"))


def _tensor(t):
    return None if t is None else t.detach().cpu().contiguous()


def save_graphs(folder: str | Path, graphs: list[DatasetGraph], identity: dict) -> Path:
    """Write ``graphs`` to ``folder`` (atomically: a temporary folder renamed into place)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    entries = []
    for g_index, g in enumerate(graphs):
        blocks = []
        for b_index, (first, block) in enumerate(g.blocks):
            block = block.detach().cpu()
            for part, t in (("crow", block.crow_indices()), ("col", block.col_indices()), ("val", block.values())):
                _save(tmp / f"{g_index}_{b_index}_{part}.npy", t.contiguous().numpy())
            blocks.append({"first_row": int(first), "shape": list(block.shape), "nnz": int(block.values().numel())})
        arrays = {"degree": g.degree, "order": g.order, "rank": g.rank, "radius": g.radius, "projection": g.projection}
        for name, t in arrays.items():
            if t is not None:
                _save(tmp / f"{g_index}_{name}.npy", _tensor(t).numpy())
        entries.append({"name": g.name, "grid": list(g.grid), "n_images": g.n_images, "weight": g.weight,
                        "source": list(g.source), "image_range": None if g.image_range is None else list(g.image_range),
                        "blocks": blocks, "arrays": sorted(k for k, t in arrays.items() if t is not None)})
    (tmp / "meta.json").write_text(json.dumps({"graphs": entries, "identity": identity}, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder)
    return folder


def _load(path: Path) -> torch.Tensor:
    arr = np.load(path, mmap_mode="r")
    with warnings.catch_warnings():  # read-only pages: the graphs are never written to
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(arr)


def graph_problem(folder: str | Path, identity: dict | None = None) -> str | None:
    """Why the graphs in ``folder`` cannot be used for ``identity`` (``None``: they can)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        entries = meta["graphs"]
    except FileNotFoundError:
        return "meta.json is missing"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"meta.json is unreadable ({type(err).__name__})"
    if identity is not None and meta.get("identity") != identity:
        return "meta.json records other settings than this run's"
    for g_index, entry in enumerate(entries):
        for b_index, block in enumerate(entry["blocks"]):
            rows, nnz = int(block["shape"][0]), int(block["nnz"])
            for part, length in (("crow", rows + 1), ("col", nnz), ("val", nnz)):
                f = folder / f"{g_index}_{b_index}_{part}.npy"
                try:
                    arr = np.load(f, mmap_mode="r")
                except (OSError, ValueError, EOFError):
                    return f"{f.name} is missing or unreadable"
                if arr.shape != (length,):
                    return f"{f.name} holds {arr.shape}, meta.json says ({length},)"
        for name in entry["arrays"]:
            f = folder / f"{g_index}_{name}.npy"
            try:
                np.load(f, mmap_mode="r")
            except (OSError, ValueError, EOFError):
                return f"{f.name} is missing or unreadable"
    return None


def load_graphs(folder: str | Path) -> list[DatasetGraph]:
    """The graphs stored in ``folder``, their arrays memory-mapped (see :func:`graph_problem` first)."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    graphs = []
    for g_index, entry in enumerate(meta["graphs"]):
        blocks = []
        for b_index, block in enumerate(entry["blocks"]):
            crow, col, val = (_load(folder / f"{g_index}_{b_index}_{part}.npy") for part in ("crow", "col", "val"))
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                csr = torch.sparse_csr_tensor(crow, col, val, tuple(block["shape"]), check_invariants=False)
            blocks.append((int(block["first_row"]), csr))
        arrays = {name: _load(folder / f"{g_index}_{name}.npy") for name in entry["arrays"]}
        g = DatasetGraph(entry["name"], tuple(entry["grid"]), entry["n_images"], blocks, arrays["degree"],
                         weight=entry["weight"], order=arrays.get("order"), rank=arrays.get("rank"),
                         image_range=None if entry["image_range"] is None else tuple(entry["image_range"]))
        g.source = (int(entry["source"][0]), None if entry["source"][1] is None else int(entry["source"][1]),
                    int(entry["source"][2]))
        g.radius, g.projection = arrays.get("radius"), arrays.get("projection")
        graphs.append(g)
    return graphs
