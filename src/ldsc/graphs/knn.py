"""Token vectors -> sparse kNN affinity graphs, one per layer (docs/method.md, Graphs): the graphs of
a batch (:func:`knn_affinity`) and the builder of both kinds (:class:`KnnGraphBuilder`; the
whole data set's graphs are :class:`~ldsc.graphs.dataset.DatasetGraph`).

Pure tensor code. For every token the top ``k_intra`` most similar tokens of the *same* image and
the top ``k_inter`` most similar tokens of the *other* images of the batch are kept; self-edges
are removed and similarities at or below ``threshold`` dropped; the result is symmetrised,
``W = (A + Aᵀ) / 2``, and random-walk normalised, ``P = D⁻¹ W``.

Similarities are computed a chunk of rows at a time, so memory grows with ``N·k`` (the graph)
plus ``chunk·N`` (one block of similarities), never with ``N²``.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ldsc.features.backbones.base import LayerFeatures
from ldsc.graphs.dataset import DatasetGraph, relabel_lists, sharded_symmetric_normalized, sym_apply, \
    symmetric_normalized_blocks
from ldsc.graphs.memory import estimate_dataset_graph_bytes
from ldsc.graphs.normalize import inverse_sqrt_degree, normalized_values

log = logging.getLogger(__name__)

#: graph types built from token vectors: (row vectors, column vectors)
PAIRS = {"qk": ("q", "k"), "vv": ("v", "v"), "kk": ("k", "k"), "qq": ("q", "q")}


@dataclass
class LayerGraph:
    """One layer's graph over the tokens of a batch.

    Attributes:
        name: layer (and head) name.
        grid: ``(h, w)`` token grid of the layer.
        n_images: images in the batch, ``B``; ``N = B·h·w`` nodes, ordered ``(b, y, x)``.
        W: ``(N, N)`` sparse COO symmetric affinity.
        P: ``(N, N)`` sparse COO random-walk matrix ``D⁻¹W`` (rows sum to 1; isolated rows are 0).
        degree: ``(N,)`` row sums of ``W``.
        weight: the layer weight ``w_l = H / h`` of the objective.
    """

    name: str
    grid: tuple[int, int]
    n_images: int
    W: Tensor
    P: Tensor
    degree: Tensor
    weight: float = 1.0

    @property
    def num_nodes(self) -> int:
        return self.n_images * self.grid[0] * self.grid[1]

    def sym(self) -> Tensor:
        """``S = D^{-1/2} W D^{-1/2}`` as sparse COO (shares eigenvalues with ``P``)."""
        W = self.W.coalesce()
        i, j = W.indices()
        vals = normalized_values(W.values(), i, j, inverse_sqrt_degree(self.degree))
        return torch.sparse_coo_tensor(W.indices(), vals, W.shape, check_invariants=False, is_coalesced=True)

    def to(self, device) -> "LayerGraph":
        return LayerGraph(self.name, self.grid, self.n_images, self.W.to(device), self.P.to(device),
                          self.degree.to(device), self.weight)

    def apply(self, Y: Tensor, blocks: list[tuple[int, Tensor]]) -> Tensor:
        """``S Y`` with ``S`` given as :meth:`sym_blocks` (possibly in another dtype or device)."""
        return sym_apply(blocks, Y)

    def walk(self, Y: Tensor) -> Tensor:
        """``P Y``, the random walk ``D⁻¹W`` (the paper's objective)."""
        return torch.sparse.mm(self.P, Y)

    def sym_blocks(self) -> list[tuple[int, Tensor]]:
        """``S`` as one row block: ``[(0, CSR (N, N))]`` (the interface of :class:`DatasetGraph`)."""
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return [(0, self.sym().to_sparse_csr())]


def knn_affinity(
    x: Tensor,
    image_ids: Tensor,
    k_intra: int,
    k_inter: int = 0,
    threshold: float = 0.1,
    y: Tensor | None = None,
    chunk_size: int | None = None,
    max_chunk_elements: int = 2**24,
) -> Tensor:
    """Sparse k-nearest-neighbour cosine affinity, symmetrised.

    Args:
        x: ``(N, d)`` row vectors (e.g. queries).
        image_ids: ``(N,)`` which image each token belongs to.
        k_intra: neighbours kept per token within its own image.
        k_inter: neighbours kept per token among all other images (0 in single-image mode).
        threshold: similarities ``<= threshold`` are dropped.
        y: ``(N, d)`` column vectors (e.g. keys); ``None`` means ``x`` (``vv``-style graphs).
        chunk_size: rows per block; by default chosen so a block holds ``max_chunk_elements``.

    Returns:
        ``(N, N)`` coalesced sparse COO ``W = (A + Aᵀ) / 2`` where ``A`` holds each row's kept
        similarities.
    """
    n = x.shape[0]
    x = F.normalize(x.float(), dim=-1)
    y = x if y is None else F.normalize(y.float(), dim=-1)
    image_ids = image_ids.to(x.device)
    # tokens ordered image-major (the usual case): a block of rows only needs its own images'
    # columns for the intra-image search, and no (chunk, N) mask or masked copy is made
    contiguous = n < 2 or bool((image_ids[1:] >= image_ids[:-1]).all())
    if chunk_size is None:
        if contiguous and k_inter == 0:  # a block of c rows meets at most c + (largest image) columns;
            # at most one image's rows a block: larger blocks are no faster, and their freed
            # candidate lists leave the allocator holding more memory (peak 4x the graph at 1e6 tokens)
            w = int(torch.unique_consecutive(image_ids, return_counts=True)[1].max()) if n else 1
            chunk_size = min(w, int((math.sqrt(w * w + 4 * max_chunk_elements) - w) / 2))
        else:  # every row meets all n columns
            chunk_size = max_chunk_elements // max(n, 1)
        chunk_size = max(1, min(n, chunk_size))
    rows, cols, vals = [], [], []
    arange = torch.arange(n, device=x.device)
    itype = torch.int32 if n < 2**31 else torch.long

    def keep_top(cand: Tensor, k: int, r: Tensor, offset: int) -> None:
        kk = min(k, cand.shape[1])
        v, c = cand.topk(kk, dim=1)
        keep = v > threshold  # also drops the -inf fillers
        rows.append(r[:, None].expand(-1, kk)[keep].to(itype))  # int32 while n allows: half the memory
        cols.append((c[keep] + offset).to(itype))
        vals.append(v[keep])

    starts = range(0, n, chunk_size)
    if k_inter > 0 and n >= 50_000:  # the quadratic search over all images takes minutes on a CPU: show it
        from ldsc.progress import bar

        starts = bar(starts, desc=f"kNN graph of {n} tokens", unit="block", leave=False)
    for start in starts:
        stop = min(n, start + chunk_size)
        r = arange[start:stop]
        lo, hi = 0, n
        if contiguous:
            lo = int(torch.searchsorted(image_ids, image_ids[start:start + 1]))
            hi = int(torch.searchsorted(image_ids, image_ids[stop - 1:stop], right=True))
        sims = x[start:stop] @ (y.T if k_inter > 0 else y[lo:hi].T)  # (c, N) or (c, hi - lo)
        block = sims[:, lo:hi] if k_inter > 0 else sims  # a view: the columns of the rows' own images
        same = image_ids[start:stop, None] == image_ids[None, lo:hi]
        block[r - start, r - lo] = float("-inf")  # no self-edges
        if k_intra > 0:
            keep_top(block.masked_fill(~same, float("-inf")), k_intra, r, lo)
        if k_inter > 0:
            block.masked_fill_(same, float("-inf"))  # in place: sims now holds other images only
            keep_top(sims, k_inter, r, 0)
        del sims, block, same
    return symmetrize(rows, cols, vals, n)


#: bits of a packed key that carry the (quantised) similarity, see :func:`symmetrize`
VALUE_BITS = 23


def symmetrize(rows: list[Tensor], cols: list[Tensor], vals: list[Tensor], n: int) -> Tensor:
    """``W = (A + Aᵀ) / 2`` as a coalesced ``(n, n)`` sparse COO from ``A``'s entries (lists of
    chunks, emptied as they are consumed).

    Entries of ``A`` and ``Aᵀ`` become one int64 key each, sorted and merged. On CPU with
    ``n < 2²⁰`` the similarity (a cosine in ``[-1, 1]``) is packed into the key's low 23 bits
    (a 2.4e-7 step, float32's own resolution near 1) and the keys are sorted in place, so the
    peak memory stays near twice the result's; otherwise an argsort carries the values along.
    """
    device = vals[0].device if vals else torch.device("cpu")
    m = sum(v.numel() for v in vals)
    if m == 0:
        return torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.long, device=device),
                                       torch.zeros(0, device=device), (n, n)).coalesce()
    packed = device.type == "cpu" and n < 2 ** ((63 - VALUE_BITS) // 2)
    scale = (2**VALUE_BITS - 1) / 2.0
    keys = torch.empty(2 * m, dtype=torch.long, device=device)  # row-major keys of A, then of Aᵀ
    half = None if packed else torch.empty(2 * m, dtype=torch.float32, device=device)
    at = 0
    while rows:  # fill chunk by chunk, freeing each chunk as it is copied
        r, c, v = rows.pop(0).long(), cols.pop(0).long(), vals.pop(0)
        j = at + v.numel()
        if packed:
            q = ((v.float().clamp(-1, 1) + 1) * scale).round_().long()
            keys[at:j] = ((r * n + c) << VALUE_BITS) | q
            keys[m + at:m + j] = ((c * n + r) << VALUE_BITS) | q
            del q
        else:
            keys[at:j] = r * n + c
            keys[m + at:m + j] = c * n + r
            half[at:j] = v
            half[m + at:m + j] = v
        at = j
        del r, c, v
    if packed:
        keys.numpy().sort(kind="quicksort")  # in place: no index array
        half = (keys & (2**VALUE_BITS - 1)).float().div_(scale).sub_(1.0).mul_(0.5)
        keys >>= VALUE_BITS
    else:
        keys, order = torch.sort(keys)
        half = half[order].mul_(0.5)
        del order
    uniq, counts = torch.unique_consecutive(keys, return_counts=True)
    del keys
    summed = torch.segment_reduce(half, "sum", lengths=counts) if uniq.numel() < half.numel() else half
    del half, counts
    idx = torch.empty(2, uniq.numel(), dtype=torch.long, device=device)
    torch.div(uniq, n, rounding_mode="floor", out=idx[0])
    torch.remainder(uniq, n, out=idx[1])
    del uniq
    return torch.sparse_coo_tensor(idx, summed, (n, n), check_invariants=False, is_coalesced=True)


def random_walk(W: Tensor) -> tuple[Tensor, Tensor]:
    """``P = D⁻¹W`` for a sparse COO ``W``; returns ``(P, degree)``. Isolated nodes get zero rows."""
    W = W.coalesce()
    i = W.indices()[0]
    degree = torch.zeros(W.shape[0], dtype=W.dtype, device=W.device).index_add_(0, i, W.values())
    inv = torch.where(degree > 0, 1.0 / degree.clamp_min(1e-12), torch.zeros_like(degree))
    # same sparsity as W: share its (coalesced) indices instead of sorting a copy
    P = torch.sparse_coo_tensor(W.indices(), W.values() * inv[i], W.shape, check_invariants=False, is_coalesced=True)
    return P, degree


def head_vectors(t: Tensor, heads: str) -> list[Tensor]:
    """``(B, H, h, w, d)`` -> list of ``(B·h·w, d')`` token matrices, ordered ``(b, y, x)``.

    ``heads="concat"`` L2-normalises each head and concatenates them (scaled by ``1/√H``), so the
    cosine similarity of two tokens is the mean of their per-head cosine similarities;
    ``"mean"`` averages the vectors over heads; ``"separate"`` returns one matrix per head.
    """
    B, H, h, w, d = t.shape
    t = t.float()
    if heads == "separate":
        return [t[:, j].reshape(B * h * w, d) for j in range(H)]
    if heads == "mean":
        return [t.mean(1).reshape(B * h * w, d)]
    if heads == "concat":
        t = F.normalize(t, dim=-1) / H**0.5
        return [t.permute(0, 2, 3, 1, 4).reshape(B * h * w, H * d)]
    raise ValueError(f"heads must be one of 'concat', 'mean', 'separate', not {heads!r}")


@dataclass
class SearchedLayer:
    """One graph's neighbour lists as :meth:`KnnGraphBuilder.searched_layers` finds them, with what
    its :class:`~ldsc.graphs.dataset.DatasetGraph` records (:meth:`KnnGraphBuilder.symmetrized`)."""

    lists: list | None  # [idx (rows, k) int32, sim (rows, k) float32]: released once symmetrised
    order: Tensor | None  # the search's node order (similar tokens together), or None
    name: str
    grid: tuple[int, int]
    n_images: int
    weight: float
    source: tuple
    radius: Tensor
    projection: Tensor | None
    vectors: tuple | None
    timing: dict = field(default_factory=dict)  # the layer's entry of ``layer_timings`` (completed when symmetrised)
    shard: tuple | None = None  # several processes: (first row, row bounds of the processes, image range)


class KnnGraphBuilder:
    """Builds one sparse kNN graph per layer (per head with ``heads="separate"``).

    Two uses: ``builder(features, base_size)`` builds a *batch's* graphs from features in memory
    (:func:`knn_affinity`; the paper solver's batches), and :meth:`dataset_graphs` builds the
    *whole data set's* graphs from a feature store by nearest-neighbour search
    (:mod:`ldsc.graphs.search`): intra-image neighbours exact, inter-image neighbours by ``search``.

    Args:
        pair: which vectors to compare: ``qk``, ``vv``, ``kk`` or ``qq``.
        k_intra, k_inter, threshold: see :func:`knn_affinity`. ``k_inter`` is ignored for one image.
        heads: ``concat`` | ``mean`` | ``separate`` (see :func:`head_vectors`).
        max_chunk_elements: size of one block of similarities (memory knob).
        search: inter-image search, ``auto`` | ``exact`` | ``cluster`` | ``ivf`` | ``hnsw``
            (``auto``: exact up to ``exact_max_tokens`` tokens in a layer, ``cluster`` beyond).
        gpu_exact_max_tokens: ``auto`` when the run's device is a GPU: exact (brute force in torch,
            on the GPU) up to this many tokens in a layer.
        list_size, nprobe: ``cluster``: tokens per k-means leaf, most similar leaves scored per
            query; ``ivf``: ``nprobe`` lists visited per query.
        nlist: IVF lists (``null``: ``2·√N``).
        hnsw_m, ef_search, ef_construction: HNSW links per node and candidate-list sizes.
        dim: reduce every layer's vectors to this many dimensions before the search (``null``: keep).
        reduce: ``pca`` (fitted on a sample of the layer's tokens) or ``random`` (a fixed Gaussian
            projection), used when ``dim`` is set.
        seed: seed of the IVF training sample, the PCA sample and the random projection.
        rebuild: build the whole-data-set graphs again even when the graph store holds them for
            these settings (:mod:`ldsc.graphs.graph_store`; read by the data module).
    """

    def __init__(self, pair: str = "qk", k_intra: int = 25, k_inter: int = 25, threshold: float = 0.1,
                 heads: str = "concat", max_chunk_elements: int = 2**24, search: str = "auto",
                 exact_max_tokens: int = 16384, gpu_exact_max_tokens: int = 1048576, list_size: int = 128,
                 nprobe: int = 6, nlist: int | None = None,
                 hnsw_m: int = 32, ef_search: int = 256, ef_construction: int = 64,
                 dim: int | str | None = "auto", max_vectors_gb: float = 3.0, auto_dim: int = 128, reduce: str = "pca",
                 seed: int = 0, rebuild: bool = False):
        from ldsc.graphs.search import SEARCH_METHODS

        if pair not in PAIRS:
            raise ValueError(f"graph pair must be one of {sorted(PAIRS)}, not {pair!r}")
        if search not in SEARCH_METHODS:
            raise ValueError(f"graph.search must be one of {list(SEARCH_METHODS)}, not {search!r}")
        if reduce not in ("pca", "random"):
            raise ValueError(f"graph.reduce must be 'pca' or 'random', not {reduce!r}")
        self.pair, self.k_intra, self.k_inter = pair, int(k_intra), int(k_inter)
        self.threshold, self.heads, self.max_chunk_elements = float(threshold), heads, int(max_chunk_elements)
        self.search, self.exact_max_tokens = search, int(exact_max_tokens)
        self.gpu_exact_max_tokens = int(gpu_exact_max_tokens)
        self.list_size, self.nlist, self.nprobe = int(list_size), nlist, int(nprobe)
        self.hnsw_m, self.ef_search, self.ef_construction = int(hnsw_m), int(ef_search), int(ef_construction)
        if isinstance(dim, str) and dim != "auto":
            raise ValueError(f"graph.dim must be a number of dimensions, auto or null, not {dim!r}")
        self.dim = dim if dim == "auto" else (int(dim) if dim else None)
        self.max_vectors_gb, self.auto_dim = float(max_vectors_gb), int(auto_dim)
        self.reduce, self.seed = reduce, int(seed)
        self.rebuild = bool(rebuild)
        #: seconds per stage of the last :meth:`dataset_graphs` (``vectors``, ``search``, ``symmetrize``)
        self.timings: dict[str, float] = {}
        #: per graph of the last :meth:`dataset_graphs`: tokens, search method, seconds by step, nnz
        self.layer_timings: list[dict] = []

    @property
    def kinds(self) -> list[str]:
        """The vector kinds this graph type compares (what the feature store must hold)."""
        return sorted(set(PAIRS[self.pair]))

    def vector_width(self, info: dict) -> int:
        """Width of one graph's vectors of a store layer ``info`` before any reduction (heads concatenated
        with ``heads="concat"``)."""
        return int(info.get("dim", 512)) * (int(info["heads"]) if self.heads == "concat" else 1)

    def layer_dim(self, n_tokens: int, width: int) -> int | None:
        """The width a layer's vectors are searched at (``None``: all of ``width``). ``dim`` a number:
        that (if smaller); ``auto``: all of them while ``n_tokens × width`` float32 values fit in
        ``max_vectors_gb``, else ``auto_dim`` — reduced by ``reduce`` (PCA), so a large layer's
        vectors are never held whole at full width. (On 300 crops of 768-d vectors, graphs from
        128 PCA dimensions gave eigenvectors aligned 0.996 with the full width's, 96: 0.988, 64:
        0.927; docs/benchmarks.md.)"""
        if self.dim is None:
            return None
        if self.dim != "auto":
            return self.dim if self.dim < width else None
        if n_tokens * width * 4 <= self.max_vectors_gb * 2**30 or width <= self.auto_dim:
            return None
        return self.auto_dim

    def memory_estimate(self, n_images: int, layers, draws: int, base_size: int, shards: int = 1) -> dict:
        """The peak of building and solving these graphs (:func:`estimate_dataset_graph_bytes`)."""
        k = self.k_intra + (self.k_inter if n_images > 1 else 0)
        dims = [self.layer_dim(n_images * info["grid"][0] * info["grid"][1], self.vector_width(info)) for info in layers]
        return estimate_dataset_graph_bytes(n_images, layers, max(k, 1), draws, dims, self.heads,
                                            base_size=base_size, vectors=len(self.kinds), shards=shards,
                                            chunk_elements=self.max_chunk_elements)

    def stored_parts(self, graphs: list) -> list:
        """Every graph (all are :class:`DatasetGraph` s) is kept in the graph store."""
        return list(graphs)

    def from_stored(self, parts: list, store, base_size: int) -> list:
        return list(parts)

    def describe(self) -> str:
        return f"graph.threshold={self.threshold}, graph.k_intra={self.k_intra}, graph.k_inter={self.k_inter}"

    def __call__(self, features: list[LayerFeatures], base_size: int) -> list[LayerGraph]:
        graphs = []
        a, b = PAIRS[self.pair]
        for layer in features:
            B = layer.batch_size
            h, w = layer.grid
            xs = head_vectors(layer.vectors(a), self.heads)
            ys = xs if a == b else head_vectors(layer.vectors(b), self.heads)
            ids = torch.arange(B, device=xs[0].device).repeat_interleave(h * w)
            for j, (x, y) in enumerate(zip(xs, ys)):
                W = knn_affinity(x, ids, self.k_intra, self.k_inter if B > 1 else 0, self.threshold,
                                 y=None if a == b else y, max_chunk_elements=self.max_chunk_elements)
                P, deg = random_walk(W)
                name = layer.name if len(xs) == 1 else f"{layer.name}/head{j}"
                graphs.append(LayerGraph(name, (h, w), B, W, P, deg, weight=base_size / h))
        return graphs

    # -- the whole data set, from a feature store ------------------------------------------------
    def search_method(self, n_tokens: int, device=None) -> str:
        from ldsc.graphs.search import choose_search

        on_gpu = device is not None and torch.device(device).type == "cuda"
        return choose_search(self.search, n_tokens, self.exact_max_tokens, on_gpu, self.gpu_exact_max_tokens)

    def layer_vectors(self, store, layer: int, draw: int, progress: bool = False) -> list[tuple[Tensor, Tensor]]:
        """Per graph of one layer (one per head with ``heads="separate"``): unit ``(x, y)`` rows of
        every token of the store, reduced to ``dim`` when set; read a block of images at a time."""
        a, b = PAIRS[self.pair]
        info = store.layers[layer]
        h, w = info["grid"]
        n = store.n_images
        # images per read: ~2^27 float32 values (512 MB) of the store at full width, whatever the width
        per = max(1, 2**27 // max(1, h * w * info["heads"] * int(info.get("dim", 512))))
        n_graphs = info["heads"] if self.heads == "separate" else 1
        projections: list = [None] * n_graphs
        dim = self.layer_dim(n * h * w, self.vector_width(info))
        if dim:
            projections = self._fit_projections(store, layer, draw, n_graphs, dim)
            if self.dim == "auto" and any(p is not None for p in projections):
                log.info("graphs: %s vectors reduced %d -> %d dimensions by %s (graph.dim=auto: %s tokens x %d "
                         "float32 would take %.1f GB > graph.max_vectors_gb=%g; graph.auto_dim)", info["name"], self.vector_width(info),
                         dim, self.reduce, f"{n * h * w:,}", self.vector_width(info),
                         n * h * w * self.vector_width(info) * 4 / 2**30, self.max_vectors_gb)
        #: the projections of the last :meth:`layer_vectors`, one per graph (``None``: no reduction)
        self.projections = projections
        out = []
        for kind in dict.fromkeys((a, b)):
            full = None
            for s in range(0, n, per):
                e = min(n, s + per)
                mats = head_vectors(store.vectors(layer, kind, draw, slice(s, e)), self.heads)
                if full is None:
                    d = min(dim or mats[0].shape[1], mats[0].shape[1])
                    full = [torch.empty(n * h * w, d) for _ in mats]
                for g, m in enumerate(mats):
                    if projections[g] is not None:
                        m = m @ projections[g]
                    # F.normalize's division, written straight into the layer's block (no temporary copy)
                    norms = torch.linalg.vector_norm(m, dim=-1, keepdim=True).clamp_min_(1e-12)
                    torch.div(m, norms, out=full[g][s * h * w:e * h * w])
                del mats
                if hasattr(store, "release"):
                    store.release()  # the block's pages leave the resident memory (a layer may be larger than it)
            out.append(full)
        xs = out[0]
        ys = out[1] if len(out) > 1 else out[0]
        return list(zip(xs, ys))

    def _fit_projections(self, store, layer: int, draw: int, n_graphs: int, dim: int) -> list[Tensor]:
        """``(D, dim)`` per graph: top principal axes of a sample of tokens (``pca``; uncentred, so
        inner products are kept best), or a fixed Gaussian projection (``random``)."""
        a, b = PAIRS[self.pair]
        gen = torch.Generator().manual_seed(self.seed)
        n = store.n_images
        pick = torch.randperm(n, generator=gen)[: min(n, 64)].sort().values.numpy()
        mats = [head_vectors(store.vectors(layer, kind, draw, pick), self.heads) for kind in dict.fromkeys((a, b))]
        projs = []
        for g in range(n_graphs):
            sample = torch.cat([F.normalize(m[g], dim=-1) for m in mats])
            D = sample.shape[1]
            if dim >= D:
                projs.append(None)
                continue
            if self.reduce == "random":
                projs.append(torch.randn(D, dim, generator=gen) / dim**0.5)
                continue
            rows = torch.randperm(sample.shape[0], generator=gen)[:200_000]
            _, _, V = torch.linalg.svd(sample[rows], full_matrices=False)
            projs.append(V[:dim].T.contiguous())
        return projs

    def dataset_graphs(self, store, base_size: int, progress: bool = True, device=None,
                       keep_vectors: bool = False) -> list["DatasetGraph"]:
        """The graphs of every layer (and draw) of ``store`` over all its images (see class
        docstring); with several draws each layer's graphs are weighted ``w_l / draws``, so the
        operator averages over draws. On a GPU ``device`` the intra-image search and the exact
        inter-image search run there (the other methods on the CPU); the graphs stay on the CPU.
        Each graph also records what new tokens need to join it (:mod:`ldsc.graphs.extension`):
        its source, the inter-image radius of every token, the projection, and with
        ``keep_vectors`` the unit vectors themselves (:class:`ldsc.LDSC` keeps them).

        The two halves, :meth:`searched_layers` and :meth:`symmetrized`, one layer after the other
        (a layer's lists are released before the next one is searched)."""
        return [self.symmetrized(layer) for layer in self.searched_layers(store, base_size, progress, device, keep_vectors)]

    def searched_layers(self, store, base_size: int, progress: bool = True, device=None,
                        keep_vectors: bool = False) -> Iterator["SearchedLayer"]:
        """The neighbour search of :meth:`dataset_graphs`, one :class:`SearchedLayer` (the lists
        and what the graph records) per graph as it is found; :meth:`symmetrized` turns each into
        its graph. (``run.py`` symmetrises all of them on a thread while Lightning is imported.)"""
        from ldsc.graphs.extension import inter_radius

        import time

        from ldsc.distributed import all_gather_rows, shard, shard_bounds, world_size
        from ldsc.graphs.search import inter_image_knn, intra_image_knn
        from ldsc.profiling import release_free_memory

        self.timings = {"vectors": 0.0, "search": 0.0, "symmetrize": 0.0}
        self.layer_timings = []
        n = store.n_images
        # several processes: this one searches and holds the rows of its own images only
        sharded = world_size() > 1
        first, last = shard(n)
        for draw in range(store.draws):
            for li, info in enumerate(store.layers):
                h, w = info["grid"]
                T = h * w
                t0 = time.perf_counter()
                pairs = self.layer_vectors(store, li, draw)
                projections = self.projections
                if hasattr(store, "release"):
                    store.release()  # the vectors are in memory now: unmap the store's pages
                self.timings["vectors"] += time.perf_counter() - t0
                method = self.search_method(n * T, device)
                on_gpu = device is not None and torch.device(device).type == "cuda"
                dims = int(pairs[0][0].shape[1])
                n_graphs = len(pairs)
                for j in range(len(pairs)):
                    x, y = pairs[j]
                    pairs[j] = None  # freed after the search, before the symmetrisation
                    kept = (x, y) if keep_vectors else None
                    xd, yd = x, y  # the vectors on the run's device (a GPU searches there)
                    if on_gpu:
                        xd = x.to(device)
                        yd = xd if y is x else y.to(device)
                    t0 = time.perf_counter()
                    k_a = min(self.k_intra, T - 1)
                    k_e = min(self.k_inter, n * T - T) if n > 1 else 0
                    q0, q1 = first * T, last * T  # the query rows this process searches
                    idx = torch.empty(q1 - q0, k_a + k_e, dtype=torch.int32)  # both searches' lists, int32
                    sim = torch.empty(q1 - q0, k_a + k_e, dtype=torch.float32)
                    if k_a > 0:
                        intra_image_knn(xd[q0:q1], yd[q0:q1], T, k_a, max_chunk_elements=self.max_chunk_elements,
                                        out=(idx[:, :k_a], sim[:, :k_a]))
                        if q0:
                            idx[:, :k_a] += q0
                    t_intra = time.perf_counter()
                    order = None
                    if k_e > 0:
                        from ldsc.progress import bar as progress_bar

                        bar = progress_bar(total=q1 - q0, desc=f"neighbours {info['name']} ({method})", unit="tok",
                                           unit_scale=True, disable=not progress or n * T < 50_000, leave=False)
                        on_device = method == "exact"  # the other methods search on the CPU
                        order = inter_image_knn(
                            xd if on_device else x, yd if on_device else y, T, k_e, method, nlist=self.nlist, nprobe=self.nprobe, hnsw_m=self.hnsw_m,
                            ef_search=self.ef_search, ef_construction=self.ef_construction, list_size=self.list_size,
                            max_chunk_elements=self.max_chunk_elements, seed=self.seed, progress=bar.update,
                            out=(idx[:, k_a:], sim[:, k_a:]), return_order=True,
                            queries=(q0, q1) if sharded else None,
                            gather=all_gather_rows if sharded else None)[2]  # (keeping no view of the lists)
                        bar.close()
                    del x, y, xd, yd
                    radius = inter_radius(sim[:, k_a:], k_e, self.threshold)
                    if sharded:
                        radius = all_gather_rows(radius)
                    release_free_memory()  # the search's temporaries, before the lists are copied
                    t1 = time.perf_counter()
                    self.timings["search"] += t1 - t0
                    name = info["name"] if n_graphs == 1 else f"{info['name']}/head{j}"
                    if store.draws > 1:
                        name = f"{name}@draw{draw}"
                    timing = {"name": name, "tokens": n * T, "rows": q1 - q0, "dim": dims, "search": method,
                              "intra_s": round(t_intra - t0, 3), "inter_s": round(t1 - t_intra, 3)}
                    self.layer_timings.append(timing)
                    layer = SearchedLayer(
                        lists=[idx, sim], order=order, name=name, grid=(h, w), n_images=n,
                        weight=base_size / h / store.draws, source=(li, j if n_graphs > 1 else None, draw),
                        radius=radius, projection=projections[j], vectors=kept, timing=timing,
                        shard=(q0, [b * T for b in shard_bounds(n)], (first, last)) if sharded else None)
                    del idx, sim, kept, radius, order
                    yield layer
                    del layer
                del pairs

    def symmetrized(self, layer: "SearchedLayer") -> "DatasetGraph":
        """The :class:`~ldsc.graphs.dataset.DatasetGraph` of one searched layer: its lists
        symmetrised and normalised (``S = D^{-1/2} W D^{-1/2}``), nodes in the search's order.
        The layer gives up its lists (their memory is released while the CSR is built)."""
        import time

        from ldsc.profiling import release_free_memory

        t1 = time.perf_counter()
        lists, layer.lists = layer.lists, None
        order, rank = layer.order, None
        if layer.shard is not None:  # this process's rows; their transposed entries come from the other processes
            q0, bounds, image_range = layer.shard
            order = None
            blocks, degree = sharded_symmetric_normalized(lists[0], lists[1], q0, bounds, self.threshold, free=lists)
        else:
            image_range = None
            if order is not None:  # store similar tokens next to each other (cache-local products)
                rank = DatasetGraph.inverse(order)
                relabel_lists(lists[0], lists[1], order, rank)  # in place
            # (not `*lists`: a starred call keeps its argument tuple, and so both lists, alive
            # until it returns — 4 GB at 10⁷ tokens held through the whole symmetrisation)
            blocks, degree = symmetric_normalized_blocks(lists[0], lists[1], self.threshold, free=lists)
            if order is not None:
                degree = degree[rank]
        release_free_memory()
        graph = DatasetGraph(layer.name, layer.grid, layer.n_images, blocks, degree, weight=layer.weight,
                             order=order, rank=rank, image_range=image_range)
        graph.source = layer.source
        graph.radius, graph.projection, graph.vectors = layer.radius, layer.projection, layer.vectors
        seconds = time.perf_counter() - t1
        self.timings["symmetrize"] = self.timings.get("symmetrize", 0.0) + seconds
        layer.timing.update(symmetrize_s=round(seconds, 3), nnz=graph.nnz)
        return graph
