"""``graph=assign``: the co-assignment graphs of a network that clusters (FEC), where every layer
says outright which points it grouped (docs/method.md, Graphs; docs/backbones.md, FEC).

In one image, a layer's head joins each point to one centre. Two points are neighbours when they
joined the same centre: per head ``W_ij = 1`` for every pair of one cluster (itself included),

    W_assign = Σ_heads  A_h A_hᵀ,

with ``A_h`` the ``(points × clusters)`` membership of head ``h`` (``assign_heads: separate``: one
graph per head). Normalised, ``S = D^{-1/2} W D^{-1/2}`` with ``D_i = Σ_heads |cluster of i|``: for
one head ``S y`` is each cluster's mean of ``y`` broadcast back to its points. ``W`` is kept as its
factor ``A`` (one entry per point and head) and applied as ``A (Aᵀ y)`` — neither the ``N × N``
matrix nor a list of clique edges is ever formed.

There are no clusters across images, so in data-set mode the points of different images are joined
by the ``k_inter`` most similar points of the other images in the layer's own similarity space
(``f`` compared with ``f``: the ``qq`` kNN search of :class:`~ldsc.graphs.knn.KnnGraphBuilder`,
similarities ≤ ``threshold`` dropped). The layer's graph is ``W = W_assign + W_inter``, normalised
like every other graph, ``S = D^{-1/2} W D^{-1/2}`` with ``D`` the row sums of the whole of ``W``.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ldsc.errors import ConfigError
from ldsc.features.backbones.base import LayerFeatures
from ldsc.graphs.dataset import DatasetGraph

log = logging.getLogger(__name__)


def membership_factor(assign: Tensor, n_centres: int, heads: Sequence[int] | None = None) -> Tensor:
    """The membership ``A`` (``W = A Aᵀ``) as CSR ``(N, n_images · len(heads) · n_centres)`` of ones.

    ``assign``: ``(n_images, H, h, w)`` cluster index of every point per head (``0 … n_centres-1``,
    per image); points are numbered ``(image, y, x)``; ``heads``: which heads (default all)."""
    n, H, h, w = assign.shape
    heads = list(range(H)) if heads is None else list(heads)
    T = h * w
    N = n * T
    e = len(heads)
    a = assign[:, heads].reshape(n, e, T).long()
    if int(a.min()) < 0 or int(a.max()) >= n_centres:
        raise ValueError(f"cluster indices must lie in [0, {n_centres}), found {int(a.min())} … {int(a.max())}")
    # column of (image i, head j, centre c): (i·e + j)·n_centres + c
    cols = (torch.arange(n).view(n, 1, 1) * e + torch.arange(e).view(1, e, 1)) * n_centres + a  # (n, e, T)
    cols = cols.permute(0, 2, 1).reshape(N, e)  # each point's e columns, points in (image, y, x) order
    values = torch.ones(N * e, dtype=torch.float64)
    crow = torch.arange(0, N * e + 1, e)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols.reshape(-1), values, size=(N, n * e * n_centres),
                                       check_invariants=False)


class CoAssignmentGraph:
    """One layer's (and head's) co-assignment graph, possibly joined across images by kNN edges.

    ``S = D^{-1/2} (A Aᵀ + W_inter) D^{-1/2}`` (see the module docstring), applied by the solvers'
    operator like any other graph (``sym_blocks`` / ``apply``); ``walk`` is the random walk
    ``D⁻¹ W`` the paper's objective uses; ``sym_scipy`` forms ``S`` for the exact reference (the
    clusters become cliques there: only for small cases, as the exact solver is).

    Attributes:
        name, grid, n_images, weight: as the other graphs (``weight = H / h``).
        factor: CSR ``(N, clusters)``, the membership ``A`` of the module docstring (``W = A Aᵀ``).
        inter: the inter-image kNN graph (a :class:`~ldsc.graphs.dataset.DatasetGraph` holding
            ``S_inter`` and its own degrees), or ``None`` (one image, or ``k_inter = 0``).
        inter_weight: the inter-image edges enter ``W`` times this (``W = A Aᵀ + inter_weight · W_inter``);
            ``auto``: the weight that gives both parts the same total (sum of degrees).
        degree: ``(N,)`` row sums of ``W`` (co-assignment: the sizes of the point's clusters over
            heads; plus the inter-image similarities).
    """

    def __init__(self, name: str, grid: tuple[int, int], n_images: int, factor: Tensor,
                 inter: DatasetGraph | None = None, weight: float = 1.0, inter_weight: float | str = "auto"):
        self.name, self.grid, self.n_images, self.weight = name, tuple(grid), int(n_images), float(weight)
        self.factor = factor.to(torch.float64) if factor.dtype != torch.float64 else factor
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.factor_t = self.factor.to_sparse_coo().t().coalesce().to_sparse_csr()
        self.inter = inter
        ones = torch.ones(self.factor.shape[0], 1, dtype=torch.float64)
        degree = (self.factor @ (self.factor_t @ ones)).squeeze(1)
        self.inter_weight = None
        self.inter_degree = None
        if inter is not None:
            knn_degree = inter.degree.to(torch.float64)
            if inter_weight == "auto":  # both parts carry the same total weight (as k_intra = k_inter does for kNN graphs)
                inter_weight = float(degree.sum() / knn_degree.sum().clamp_min(1e-300))
            self.inter_weight = float(inter_weight)
            #: the inter-image part's row sums, ``inter_weight`` times the kNN graph's
            self.inter_degree = self.inter_weight * knn_degree
            degree = degree + self.inter_degree
        self.degree = degree
        self.scale = torch.where(degree > 0, degree.clamp_min(1e-300).rsqrt(), torch.zeros_like(degree))
        #: ``D_inter^{1/2} D^{-1/2}``: maps ``S_inter`` (normalised by its own degrees) into ``S``
        self.inter_scale = None if inter is None else self.inter_degree.sqrt() * self.scale
        self.image_range = None
        self.source = (0, None, 0)

    @property
    def num_nodes(self) -> int:
        return self.n_images * self.grid[0] * self.grid[1]

    @property
    def nnz(self) -> int:
        return int(self.factor._nnz()) + (self.inter.nnz if self.inter is not None else 0)

    def sym_blocks(self) -> list[tuple[int, Tensor]]:
        """The tensors :meth:`apply` uses (the operator converts them to its dtype and device):
        ``A``, ``Aᵀ``, the scalings, then the inter-image graph's blocks."""
        parts = [(0, self.factor), (0, self.factor_t), (0, self.scale)]
        if self.inter is not None:
            parts += [(0, self.inter_scale), *self.inter.sym_blocks()]
        return parts

    def apply(self, Y: Tensor, blocks: list[tuple[int, Tensor]] | None = None) -> Tensor:
        """``S Y`` for ``Y`` ``(N, m)``, points in ``(image, y, x)`` order."""
        blocks = self.sym_blocks() if blocks is None else blocks
        F_, Ft, s = blocks[0][1], blocks[1][1], blocks[2][1].unsqueeze(1)
        out = s * (F_ @ (Ft @ (s * Y)))
        if self.inter is not None:
            r = blocks[3][1].unsqueeze(1)
            out = out + r * self.inter.apply(r * Y, blocks[4:])
        return out

    def walk(self, Y: Tensor) -> Tensor:
        """``D⁻¹ W Y`` (the random walk of the paper's objective)."""
        s = self.scale.to(Y.dtype).unsqueeze(1)
        cache = self.__dict__.setdefault("_blocks_by_dtype", {})
        if Y.dtype not in cache:  # converted once, not at every step of the paper's solver
            cache[Y.dtype] = [(i, b.to(Y.dtype) if b.is_floating_point() else b) for i, b in self.sym_blocks()]
        blocks = cache[Y.dtype]
        return s * self.apply(Y / s.clamp_min(1e-30), blocks)

    def sym_scipy(self):
        """``S`` as a float64 ``scipy.sparse.csr_matrix`` (cliques formed: small cases only)."""
        import scipy.sparse as sp

        def csr(t: Tensor):
            return sp.csr_matrix((t.values().double().numpy(), t.col_indices().numpy(), t.crow_indices().numpy()),
                                 shape=tuple(t.shape))

        s = sp.diags(self.scale.numpy())
        Fs = s @ csr(self.factor)
        S = Fs @ Fs.T
        if self.inter is not None:
            r = sp.diags(self.inter_scale.numpy())
            S = S + r @ self.inter.sym_scipy() @ r
        return S.tocsr()

    def to(self, device) -> "CoAssignmentGraph":
        g = CoAssignmentGraph.__new__(CoAssignmentGraph)
        g.__dict__.update(self.__dict__)
        g._blocks_by_dtype = {}
        for key in ("factor", "factor_t", "degree", "scale", "inter_degree", "inter_scale"):
            value = getattr(self, key)
            setattr(g, key, None if value is None else value.to(device))
        g.inter = None if self.inter is None else self.inter.to(device)
        return g


class CoAssignmentGraphBuilder:
    """``graph=assign`` (``conf/graph/assign.yaml``): one co-assignment graph per layer (per head
    with ``assign_heads=separate``) from the backbone's ``assign`` records; in data-set mode joined
    across images by the ``k_inter`` nearest points of other images in ``f`` (the knn settings of
    ``knn.yaml`` choose the search; ``k_intra`` is not used: the clusters are the intra-image edges).

    Args:
        assign_heads: ``sum`` (one graph per layer, the heads' co-assignments added) or ``separate``.
        inter_weight: multiplies the inter-image edges in ``W``. A point's co-assignment degree is the
            size of its clusters — hundreds on a 56² grid — against about ``k_inter`` × a similarity
            for its inter-image edges, so unweighted (1) the images are joined so weakly that the
            leading eigenvectors mostly tell images apart; ``auto`` (default) gives both parts the
            same total weight, as equal ``k_intra`` and ``k_inter`` do for kNN graphs.
        k_inter, threshold, and every other :class:`~ldsc.graphs.knn.KnnGraphBuilder` setting: of
            the inter-image edges (``pair``: ``qq`` compares f with f).
    """

    def __init__(self, assign_heads: str = "sum", inter_weight: float | str = "auto", pair: str = "qq", k_intra: int = 0,
                 k_inter: int = 25, rebuild: bool = False, **knn):
        from ldsc.graphs.knn import KnnGraphBuilder

        if assign_heads not in ("sum", "separate"):
            raise ConfigError(f"graph.assign_heads must be sum or separate, not {assign_heads!r}.")
        if inter_weight != "auto" and not (isinstance(inter_weight, (int, float)) and inter_weight > 0):
            raise ConfigError(f"graph.inter_weight must be auto or a positive number, not {inter_weight!r}.")
        self.assign_heads, self.k_inter, self.rebuild = assign_heads, int(k_inter), bool(rebuild)
        self.inter_weight = inter_weight if inter_weight == "auto" else float(inter_weight)
        self.knn = KnnGraphBuilder(pair=pair, k_intra=0, k_inter=self.k_inter, rebuild=rebuild, **knn)
        self.timings: dict[str, float] = {}
        self.layer_timings: list = []

    @property
    def kinds(self) -> list[str]:
        return sorted({"assign", *(self.knn.kinds if self.k_inter > 0 else [])})

    def describe(self) -> str:
        return (f"graph=assign (co-assignment per {'layer' if self.assign_heads == 'sum' else 'head'}, "
                f"graph.k_inter={self.k_inter}, graph.threshold={self.knn.threshold})")

    def search_method(self, n_tokens: int, device=None) -> str:
        return self.knn.search_method(n_tokens, device) if self.k_inter > 0 else "exact"

    def memory_estimate(self, n_images: int, layers, draws: int, base_size: int, shards: int = 1) -> dict | None:
        """Co-assignment factors (an index and a value per point and head) beside the inter-image
        kNN graphs' estimate."""
        per_point = sum(int(info["grid"][0]) * int(info["grid"][1]) * int(info.get("heads", 1)) for info in layers)
        factors = 2 * 16 * n_images * per_point * draws  # F and Fᵀ: int64 index + float64 value
        inter = self.knn.memory_estimate(n_images, layers, draws, base_size, shards) if self.k_inter > 0 else None
        if inter is None:
            return {"peak": factors, "graphs": factors, "solver": 0, "build": factors}
        return {**inter, "peak": inter["peak"] + factors, "graphs": inter["graphs"] + factors}

    def _heads(self, H: int) -> list[list[int] | None]:
        return [None] if self.assign_heads == "sum" else [[j] for j in range(H)]

    @staticmethod
    def _centres(layer: LayerFeatures | dict) -> int:
        centres = layer.centres if isinstance(layer, LayerFeatures) else layer.get("centres")
        if centres is None:
            name = layer.name if isinstance(layer, LayerFeatures) else layer.get("name")
            raise ConfigError(f"graph=assign needs a backbone whose layers cluster (backbone=fec): layer {name} "
                              f"records no cluster assignments.")
        return int(centres[0]) * int(centres[1])

    def __call__(self, features: list[LayerFeatures], base_size: int) -> list[CoAssignmentGraph]:
        """A batch's graphs (the paper's solver): inter-image edges among the batch's images."""
        from ldsc.graphs.knn import head_vectors, knn_affinity
        from ldsc.graphs.normalize import inverse_sqrt_degree, normalized_values

        graphs = []
        for layer in features:
            h, w = layer.grid
            B = layer.batch_size
            inter = None
            if self.k_inter > 0 and B > 1:
                x = head_vectors(layer.vectors("q"), self.knn.heads)[0]
                ids = torch.arange(B, device=x.device).repeat_interleave(h * w)
                W = knn_affinity(x, ids, 0, self.k_inter, self.knn.threshold).coalesce()
                deg = torch.zeros(W.shape[0], dtype=W.dtype, device=W.device).index_add_(0, W.indices()[0], W.values())
                i, j = W.indices()
                vals = normalized_values(W.values(), i, j, inverse_sqrt_degree(deg))
                S = torch.sparse_coo_tensor(W.indices(), vals, W.shape).to_sparse_csr().cpu()
                inter = DatasetGraph(layer.name, (h, w), B, [(0, S)], deg.cpu())
            for heads in self._heads(layer.heads):
                F_ = membership_factor(layer.vectors("assign").cpu(), self._centres(layer), heads)
                name = layer.name if heads is None else f"{layer.name}.head{heads[0]}"
                graphs.append(CoAssignmentGraph(name, (h, w), B, F_, inter, weight=base_size / h,
                                                inter_weight=self.inter_weight))
        return graphs

    def stored_parts(self, graphs: list[CoAssignmentGraph]) -> list[DatasetGraph]:
        """The inter-image kNN graphs (the search a resume would otherwise repeat); the co-assignment
        factors are formed again from the feature store, in a fraction of a second."""
        unique = {id(g.inter): g.inter for g in graphs if g.inter is not None}
        return list(unique.values())

    def from_stored(self, parts: list[DatasetGraph], store, base_size: int) -> list[CoAssignmentGraph]:
        self.timings, self.layer_timings = {}, []
        return self._graphs(store, base_size, {(g.source[0], g.source[2]): g for g in parts})

    def dataset_graphs(self, store, base_size: int, progress: bool = True, device=None) -> list[CoAssignmentGraph]:
        """Every layer's (and draw's) graph over all images of ``store``."""
        from ldsc.distributed import world_size

        if world_size() > 1:
            raise ConfigError("graph=assign runs in one process: drop trainer=ddp / trainer.devices > 1.")
        inter = {}
        self.timings, self.layer_timings = {}, []
        if self.k_inter > 0 and store.n_images > 1:
            for g in self.knn.dataset_graphs(store, base_size, progress=progress, device=device):
                inter[g.source[0], g.source[2]] = g
            self.timings = {f"inter_{k}": v for k, v in self.knn.timings.items()}
            self.layer_timings = self.knn.layer_timings
        return self._graphs(store, base_size, inter)

    def _graphs(self, store, base_size: int, inter: dict) -> list[CoAssignmentGraph]:
        """The co-assignment graphs of every layer and draw of ``store``, joined by the inter-image
        graphs ``inter[(layer, draw)]`` where there are any."""
        t = time.perf_counter()
        graphs = []
        for draw in range(store.draws):
            for li, info in enumerate(store.layers):
                h, w = info["grid"]
                assign = store.vectors(li, "assign", draw)
                for heads in self._heads(int(info["heads"])):
                    F_ = membership_factor(assign, self._centres(info), heads)
                    name = info["name"] if heads is None else f"{info['name']}.head{heads[0]}"
                    g = CoAssignmentGraph(name, (h, w), store.n_images, F_, inter.get((li, draw)),
                                          weight=base_size / h / store.draws, inter_weight=self.inter_weight)
                    g.source = (li, None if heads is None else heads[0], draw)
                    graphs.append(g)
        self.timings["assign"] = time.perf_counter() - t
        log.info("graph=assign: %d co-assignment graph(s)%s in %.1f s", len(graphs),
                 f", joined across images by {self.k_inter} kNN edges per point" if inter else "",
                 self.timings["assign"])
        return graphs
