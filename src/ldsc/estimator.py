"""``ldsc.LDSC``: the method as an estimator — no Lightning, no Hydra, no files (docs/library.md).

    from ldsc import LDSC
    model = LDSC(K=15, graph="vv").fit(layers)        # per-layer token tensors of n images
    model.eigenvectors_                                # (n, K, H, W), model.eigenvalues_ (K,)
    Z_new = model.transform(new_layers)                # (m, K, H, W): new images, fitted vectors unchanged

``fit`` builds the whole data set's layer graphs with the same code as ``python -m ldsc.run``
(:meth:`ldsc.graphs.knn.KnnGraphBuilder.dataset_graphs`, reading an in-memory
:class:`~ldsc.features.store.MemoryStore` instead of the on-disk store) and solves them with the
same LOBPCG iterations as the CLI's default solver (:func:`ldsc.spectral.lobpcg.lobpcg_iterate`).
``transform`` is the out-of-sample extension (:mod:`ldsc.graphs.extension`,
:mod:`ldsc.spectral.extension`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ldsc.errors import ConfigError, DataError, LdscError
from ldsc.features.backbones.base import LayerFeatures
from ldsc.features.store import MemoryStore
from ldsc.graphs.extension import FittedGraph, new_token_rows
from ldsc.graphs.knn import PAIRS, KnnGraphBuilder, head_vectors
from ldsc.spectral.alignment import svd_order
from ldsc.spectral.extension import nystrom, pooled_fitted
from ldsc.spectral.lobpcg import converged, lobpcg_iterate, lobpcg_start, orthonormalize, random_start
from ldsc.spectral.multilevel import multilevel_start
from ldsc.spectral.operator import LayerOperator, flatten_channels, unflatten_channels

log = logging.getLogger(__name__)

#: what :meth:`LDSC.save` writes besides the tensors (the constructor's arguments, the graphs')
FORMAT_VERSION = 1


def as_layer_features(layers) -> list[LayerFeatures]:
    """Per-layer token vectors in any accepted form -> one :class:`LayerFeatures` per layer.

    Accepted, per layer: a :class:`LayerFeatures` (what backbones return); a tensor ``(n, h, w, d)``
    (or ``(n, heads, h, w, d)``), used as ``q``, ``k`` and ``v`` alike; a dict with any of ``"q"``,
    ``"k"``, ``"v"`` (tensors as above) and optionally ``"name"``.
    """
    if isinstance(layers, (LayerFeatures, Tensor, dict)):
        layers = [layers]
    out = []
    for i, layer in enumerate(layers):
        if isinstance(layer, LayerFeatures):
            out.append(layer)
            continue
        if isinstance(layer, Tensor):
            t = _five_d(layer, f"layer {i}")
            out.append(LayerFeatures(name=f"layer{i}", q=t, k=t, v=t))
            continue
        if isinstance(layer, dict):
            kinds = {k: _five_d(torch.as_tensor(v), f"layer {i} {k!r}") for k, v in layer.items() if k in ("q", "k", "v")}
            if not kinds:
                raise ConfigError(f"layer {i} is a dict without 'q', 'k' or 'v' tensors (keys: {sorted(layer)}).")
            out.append(LayerFeatures(name=str(layer.get("name", f"layer{i}")), **kinds))
            continue
        raise ConfigError(f"layer {i} is a {type(layer).__name__}: pass tensors (n, h, w, d), dicts of q/k/v "
                          f"tensors, or the backbones' LayerFeatures.")
    return out


def _five_d(t: Tensor, what: str) -> Tensor:
    if t.dim() == 4:
        return t[:, None]
    if t.dim() == 5:
        return t
    raise ConfigError(f"{what} has shape {tuple(t.shape)}: expected (n_images, h, w, d) or (n_images, heads, h, w, d).")


class LDSC:
    """Layer-distributed spectral clustering of token vectors (docs/method.md).

    Args:
        K: eigenvectors per pixel.
        graph: which vectors each layer's kNN graph compares: ``vv`` (the "what" pathway),
            ``qk`` (the "where" pathway), ``kk`` or ``qq``.
        k_intra, k_inter, threshold: neighbours within a token's image, among the other images,
            and the similarity at or below which an edge is dropped.
        base_size: side of the base grid of the eigenvectors (``None``: the largest layer's side).
        search: inter-image search, ``auto`` | ``exact`` | ``cluster`` | ``ivf`` | ``hnsw``
            (docs/graphs-and-solvers.md).
        heads: ``concat`` | ``mean`` | ``separate`` (one graph per head).
        dim: reduce the vectors to this many dimensions before the search (``None``: keep; ``"auto"``:
            keep while a layer's float32 vectors fit in ``max_vectors_gb``, 3 GB by default, else
            reduce them by PCA to ``auto_dim``, 128 by default).
        tol: stop when every residual ``‖Mx − θx‖`` of the ``K`` vectors is at most ``tol · θ_max``.
        max_iters: at most this many LOBPCG iterations.
        oversample: guard vectors beyond ``K`` (faster convergence of the ``K``-th).
        extend_iters: substitutions of a new image's own edges in :meth:`transform`.
        seed: the random start and the searches' sampling.
        device: where the solver's products run (``"cpu"``, ``"cuda"``).
        progress: progress bars (tqdm in a terminal, periodic lines otherwise).
        multilevel: start the solve from the coarse layers' solution (:mod:`ldsc.spectral.multilevel`);
            the same eigenvectors, about half the solve time.
        **graph_options: any other setting of :class:`~ldsc.graphs.knn.KnnGraphBuilder`
            (``nprobe``, ``list_size``, ``nlist``, ``hnsw_m``, ``ef_search``, ...).

    Attributes (after :meth:`fit`):
        eigenvectors_: ``(n, K, H, W)`` float32, orthonormal over all pixels of all images, by
            decreasing eigenvalue. eigenvalues_: ``(K,)``. iterations_: LOBPCG iterations run.
        timings_: seconds spent building the graphs (``graphs_s``) and solving (``solve_s``).
        residual_: the largest relative residual reached. graphs_: per layer graph what
            :meth:`transform` needs (:class:`~ldsc.graphs.extension.FittedGraph`).
    """

    def __init__(self, K: int = 15, graph: str = "vv", k_intra: int = 25, k_inter: int = 25, threshold: float = 0.1,
                 base_size: int | None = None, search: str = "auto", heads: str = "concat", dim: int | str | None = "auto",
                 tol: float = 3e-3, max_iters: int = 1000, oversample: int = 5, extend_iters: int = 20, seed: int = 0,
                 device: str = "cpu", progress: bool = True, multilevel: bool = True, **graph_options):
        if graph not in PAIRS:
            raise ConfigError(f"graph must be one of {sorted(PAIRS)}, not {graph!r}.")
        if int(K) < 1:
            raise ConfigError(f"K={K} must be at least 1.")
        self.K, self.graph, self.k_intra, self.k_inter = int(K), graph, int(k_intra), int(k_inter)
        self.threshold, self.base_size, self.search, self.heads = float(threshold), base_size, search, heads
        self.dim, self.tol, self.max_iters, self.oversample = dim, float(tol), int(max_iters), int(oversample)
        self.extend_iters, self.seed, self.device, self.progress = int(extend_iters), int(seed), device, progress
        self.graph_options = dict(graph_options)
        self.multilevel = bool(multilevel)
        self.builder = KnnGraphBuilder(pair=graph, k_intra=self.k_intra, k_inter=self.k_inter,
                                       threshold=self.threshold, heads=heads, search=search, dim=dim, seed=self.seed,
                                       **self.graph_options)
        self.graphs_: list[FittedGraph] = []
        self._pooled: dict[int, Tensor] = {}

    # -- parameters --------------------------------------------------------------------------
    def get_params(self) -> dict:
        """The constructor's arguments (what :meth:`save` records)."""
        return {"K": self.K, "graph": self.graph, "k_intra": self.k_intra, "k_inter": self.k_inter,
                "threshold": self.threshold, "base_size": self.base_size, "search": self.search, "heads": self.heads,
                "dim": self.dim, "tol": self.tol, "max_iters": self.max_iters, "oversample": self.oversample,
                "extend_iters": self.extend_iters, "seed": self.seed, "multilevel": self.multilevel, **self.graph_options}

    def __repr__(self) -> str:
        return f"LDSC(K={self.K}, graph={self.graph!r}, k_intra={self.k_intra}, k_inter={self.k_inter})"

    # -- inputs ------------------------------------------------------------------------------
    def _features(self, X, backbone=None, batch_size: int = 16) -> list[LayerFeatures]:
        if backbone is None:
            return as_layer_features(X)
        return extract_features(X, backbone, self.base_size, self.builder.kinds, batch_size, self.seed, self.progress)

    # -- fit ---------------------------------------------------------------------------------
    def fit(self, X, backbone=None, batch_size: int = 16) -> "LDSC":
        """Fit on the token vectors of ``n`` images (see :func:`as_layer_features` for the forms
        ``X`` may take), or on images (paths or a ``(n, 3, S, S)`` tensor in ``[0, 1]``) passed
        through ``backbone``. Returns ``self``."""
        features = self._features(X, backbone, batch_size)
        store = MemoryStore(features, self.builder.kinds)
        n = store.n_images
        base = int(self.base_size or max(max(layer["grid"]) for layer in store.layers))
        if n * base * base <= self.K + self.oversample:
            raise ConfigError(f"K={self.K} (+{self.oversample} guard vectors) must be smaller than the "
                              f"{n * base * base} pixels of the base grid ({n} image(s) of {base}x{base}).")
        import time

        started = time.perf_counter()
        graphs = self.builder.dataset_graphs(store, base, progress=self.progress, keep_vectors=True,
                                             device=torch.device(self.device))
        graphs_s = time.perf_counter() - started
        dev_graphs = graphs if torch.device(self.device).type == "cpu" else [g.to(self.device) for g in graphs]
        op = LayerOperator(dev_graphs, (base, base))
        m = self.K + self.oversample
        rows = n * base * base
        X0 = None
        if self.multilevel:  # the coarse layers' problems first (ldsc.spectral.multilevel)
            X0 = multilevel_start(dev_graphs, (base, base), m, self.K, self.tol, self.seed, (0, n),
                                  max_iters=self.max_iters, device=torch.device(self.device))
        if X0 is None:
            X0 = random_start(self.seed, slice(0, rows), m, torch.float32).to(self.device)
        theta, Xr, MX = lobpcg_start(op, orthonormalize(X0))
        P, MP = torch.empty_like(Xr), torch.empty_like(MX)
        residual = torch.full((Xr.shape[1],), float("inf"), dtype=torch.float64)
        from ldsc.progress import bar

        it, directions = 0, False
        with bar(total=self.max_iters, desc="LOBPCG", unit="it", disable=not self.progress, leave=False) as pbar:
            while it < self.max_iters and not converged(residual, theta, self.K, self.tol):
                done, directions = lobpcg_iterate(op, Xr, MX, P, MP, theta, residual, self.K, self.tol,
                                                  min(10, self.max_iters - it), directions)
                it += done
                pbar.update(done)
                pbar.set_postfix(residual=f"{float(residual[: self.K].max() / theta.abs().max()):.1e}")
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize()
        self.timings_ = {"graphs_s": round(graphs_s, 3), "solve_s": round(time.perf_counter() - started - graphs_s, 3)}
        self.iterations_ = it
        self.residual_ = float(residual[: self.K].max() / theta.abs().max().clamp_min(1e-300))
        if not converged(residual, theta, self.K, self.tol):
            log.warning("LDSC.fit: not converged after %d iterations (residual %.2e > tol %.0e): raise max_iters",
                        it, self.residual_, self.tol)
        Z = unflatten_channels(Xr[:, : self.K].float().cpu(), n, base, base)
        self.eigenvectors_ = svd_order(Z, keep_order=True)[0]  # signs fixed as the CLI's export does
        self.eigenvalues_ = theta[: self.K].float().cpu()
        self.base_size_ = base
        self.layers_ = [dict(layer) for layer in store.layers]
        self._set_graphs(graphs)
        return self

    def _set_graphs(self, graphs) -> None:
        a, b = PAIRS[self.graph]
        self.graphs_ = [fitted_graph(g, a == b) for g in graphs]
        self._pooled = {}

    @classmethod
    def from_solution(cls, builder: KnnGraphBuilder, eigenvectors: Tensor, eigenvalues: Tensor, graphs, layers: list[dict],
                      store_path: str | None = None, **solver) -> "LDSC":
        """The model of a solved CLI run: its graph builder's settings, its eigenvectors ``(n, K, H, W)``
        (as exported) and eigenvalues, its whole-data-set graphs and the store's layers; the token
        vectors stay in the feature store at ``store_path`` (read again by :meth:`load`)."""
        b = builder
        model = cls(K=eigenvectors.shape[1], graph=b.pair, k_intra=b.k_intra, k_inter=b.k_inter, threshold=b.threshold,
                    base_size=eigenvectors.shape[-1], search=b.search, heads=b.heads, dim=b.dim, seed=b.seed,
                    progress=False, reduce=b.reduce, max_chunk_elements=b.max_chunk_elements,
                    exact_max_tokens=b.exact_max_tokens, gpu_exact_max_tokens=b.gpu_exact_max_tokens,
                    list_size=b.list_size, nprobe=b.nprobe, nlist=b.nlist, hnsw_m=b.hnsw_m, ef_search=b.ef_search,
                    ef_construction=b.ef_construction, **solver)
        model.eigenvectors_, model.eigenvalues_ = eigenvectors.float().cpu(), eigenvalues.float().cpu()
        model.base_size_, model.layers_ = int(eigenvectors.shape[-1]), [dict(layer) for layer in layers]
        model.iterations_, model.residual_ = None, None
        model.store_path = None if store_path is None else str(store_path)
        model._set_graphs(graphs)
        return model

    def fit_transform(self, X, backbone=None, batch_size: int = 16) -> Tensor:
        """:meth:`fit`, then the fitted eigenvectors ``(n, K, H, W)``."""
        return self.fit(X, backbone, batch_size).eigenvectors_

    # -- new images --------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not self.graphs_:
            raise ConfigError("this LDSC is not fitted: call fit(...) (or LDSC.load(path)) first.")

    def transform(self, X, backbone=None, batch_size: int = 16, images_per_step: int = 128) -> Tensor:
        """Eigenvectors of new images, ``(m, K, H, W)``, by out-of-sample extension (docs/library.md,
        "New images"): the fitted eigenvectors do not move, and each image costs the same however
        many were embedded before it. ``X`` as in :meth:`fit`."""
        self._check_fitted()
        if self.k_inter <= 0:
            raise ConfigError("transform needs inter-image edges: fit with k_inter > 0.")
        features = self._features(X, backbone, batch_size)
        self.check_layers(features)
        return self.transform_features([features], images_per_step)

    def check_layers(self, features: list[LayerFeatures]) -> None:
        fitted = [(layer["name"], tuple(layer["grid"]), layer["heads"]) for layer in self.layers_]
        given = [(layer.name, layer.grid, layer.heads) for layer in features]
        if len(given) != len(fitted) or any(g[1:] != f[1:] for g, f in zip(given, fitted)):
            raise ConfigError(f"the new images' layers {[(g[1], g[2]) for g in given]} (grid, heads) differ from the "
                              f"fitted ones {[(f[1], f[2]) for f in fitted]}: extract them with the same backbone.")

    def transform_features(self, draws: Sequence[list[LayerFeatures]], images_per_step: int = 128) -> Tensor:
        """:meth:`transform` of checked features, one list per backbone draw the fit used."""
        from ldsc.progress import bar

        base = self.base_size_
        m = draws[0][0].batch_size
        out = torch.empty(m, self.K, base, base)
        a, b = PAIRS[self.graph]
        index_options = self.index_options()
        with bar(total=m, desc="new images", unit="img", disable=not self.progress or m < 64, leave=False) as pbar:
            for s in range(0, m, images_per_step):
                e = min(m, s + images_per_step)
                terms = []
                for gi, fg in enumerate(self.graphs_):
                    layer = draws[min(fg.draw, len(draws) - 1)][fg.layer]
                    j = fg.head or 0
                    xn = fg.unit(head_vectors(layer.vectors(a)[s:e], self.heads)[j])
                    yn = xn if a == b else fg.unit(head_vectors(layer.vectors(b)[s:e], self.heads)[j])
                    S_nn, S_nf = new_token_rows(fg, xn, yn, fg.grid[0] * fg.grid[1], self.k_intra, self.k_inter,
                                                self.threshold, index_options)
                    terms.append((fg.grid, fg.weight, S_nn, S_nf, self.pooled(gi)))
                z = nystrom(terms, self.eigenvalues_, (base, base), e - s, self.extend_iters)
                out[s:e] = unflatten_channels(z, e - s, base, base)
                pbar.update(e - s)
        return out

    def index_options(self) -> dict:
        b = self.builder
        return {"method": b.search, "exact_max_tokens": b.exact_max_tokens, "nlist": b.nlist, "nprobe": b.nprobe,
                "hnsw_m": b.hnsw_m, "ef_search": b.ef_search, "ef_construction": b.ef_construction,
                "list_size": b.list_size, "seed": b.seed}

    def pooled(self, i: int) -> Tensor:
        """The fitted eigenvectors' layer view on graph ``i``'s grid (computed once)."""
        if i not in self._pooled:
            g = self.graphs_[i]
            self._pooled[i] = pooled_fitted(self.eigenvectors_, (self.base_size_, self.base_size_), g.grid)
        return self._pooled[i]

    # -- files -------------------------------------------------------------------------------
    def save(self, path: str | Path, vectors: bool = True) -> Path:
        """Write the fitted model to ``path`` (safetensors: tensors only, no pickle). ``vectors=False``
        leaves out the fitted token vectors (a CLI run keeps them in its feature store)."""
        from safetensors.torch import save_file

        from ldsc.atomic import atomic_write

        self._check_fitted()
        tensors = {"eigenvectors": self.eigenvectors_.contiguous(), "eigenvalues": self.eigenvalues_.contiguous()}
        graphs = []
        for i, g in enumerate(self.graphs_):
            tensors[f"graph{i}.degree"] = g.degree.contiguous()
            tensors[f"graph{i}.radius"] = g.radius.contiguous()
            if g.projection is not None:
                tensors[f"graph{i}.projection"] = g.projection.contiguous()
            if vectors:
                if g.x is None:
                    raise ConfigError("this model holds no token vectors (a CLI run's): save it with vectors=False.")
                tensors[f"graph{i}.x"] = g.x.contiguous()
                if not g.symmetric:
                    tensors[f"graph{i}.y"] = g.y.contiguous()
            graphs.append({"name": g.name, "grid": list(g.grid), "weight": g.weight, "layer": g.layer,
                           "head": g.head, "draw": g.draw, "symmetric": g.symmetric})
        meta = {"format": FORMAT_VERSION, "params": self.get_params(), "base_size": self.base_size_,
                "layers": self.layers_, "graphs": graphs, "iterations": self.iterations_, "residual": self.residual_,
                "store": None if vectors else getattr(self, "store_path", None)}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"ldsc": json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | Path, vectors: Sequence[tuple[Tensor, Tensor]] | None = None, **overrides) -> "LDSC":
        """A model written by :meth:`save` (read with ``safetensors``: no code is run). ``vectors``:
        the fitted ``(x, y)`` unit vectors per graph when the file was saved without them;
        ``overrides``: constructor arguments to change (e.g. ``progress=False``, ``device``)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise DataError(f"No fitted LDSC model at '{path}'.")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("ldsc", "null") or "null")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except LdscError:  # a signal's RunInterrupted: not a damaged file
            raise
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise DataError(f"'{path}' is not a readable LDSC model file ({type(err).__name__}: {err}).") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            raise DataError(f"'{path}' is not an LDSC model file of format {FORMAT_VERSION}.")
        model = cls(**{**meta["params"], **overrides})
        model.eigenvectors_, model.eigenvalues_ = tensors["eigenvectors"], tensors["eigenvalues"]
        model.base_size_, model.layers_ = int(meta["base_size"]), meta["layers"]
        model.iterations_, model.residual_ = meta.get("iterations"), meta.get("residual")
        model.store_path = meta.get("store")
        if vectors is None and meta["graphs"] and "graph0.x" not in tensors:
            vectors = model._store_vectors(meta["graphs"], path)
        for i, g in enumerate(meta["graphs"]):
            if vectors is not None:
                x, y = vectors[i]
            else:
                x = tensors[f"graph{i}.x"]
                y = x if g["symmetric"] else tensors[f"graph{i}.y"]
            model.graphs_.append(FittedGraph(g["name"], tuple(g["grid"]), float(g["weight"]), int(g["layer"]),
                                             g["head"], int(g["draw"]), x, y, tensors[f"graph{i}.degree"],
                                             tensors[f"graph{i}.radius"], tensors.get(f"graph{i}.projection"),
                                             bool(g["symmetric"])))
        return model

    def _store_vectors(self, graphs: list[dict], path: Path) -> list[tuple[Tensor, Tensor]]:
        """The fitted unit vectors of a model saved without them, read again from its feature store
        (the same reading as when the graphs were built)."""
        from ldsc.features.store import FeatureStore, store_problem

        if not self.store_path:
            raise DataError(f"'{path}' was saved without the fitted token vectors and names no feature store: "
                            f"pass vectors=... to LDSC.load.")
        problem = store_problem(self.store_path)
        if problem:
            raise DataError(f"The feature store of the fitted model ('{self.store_path}') cannot be read ({problem}): "
                            f"run the fit again to rebuild it.")
        store = FeatureStore(self.store_path)
        cache: dict = {}
        out = []
        for g in graphs:
            key = (int(g["layer"]), int(g["draw"]))
            if key not in cache:
                cache[key] = self.builder.layer_vectors(store, *key)
            out.append(cache[key][g["head"] or 0])
        store.release()
        return out


def fitted_graph(g, symmetric: bool) -> FittedGraph:
    """A whole-data-set graph -> what :meth:`LDSC.transform` needs (its vectors when it was built
    with ``keep_vectors=True``, else ``None``)."""
    x, y = g.vectors if g.vectors is not None else (None, None)
    layer, head, draw = g.source
    return FittedGraph(g.name, tuple(g.grid), float(g.weight), layer, head, draw, x, y, g.degree.float().cpu(),
                       g.radius.float().cpu(), g.projection, symmetric)


def extract_features(images, backbone, base_size: int | None, kinds: Sequence[str], batch_size: int = 16,
                     seed: int = 0, progress: bool = True) -> list[LayerFeatures]:
    """Pass images (paths, or a ``(n, 3, S, S)`` tensor in ``[0, 1]``) through a backbone in batches
    and keep the ``kinds`` of every layer, ``(n, heads, h, w, d)`` each (one draw)."""
    from ldsc.features.backbones.base import backbone_draws
    from ldsc.features.images import image_tensor
    from ldsc.progress import bar

    if base_size:
        backbone.set_base_size(int(base_size))
    n = len(images)
    if n == 0:
        raise DataError("no images given.")
    parts: list[dict] = []
    names: list[str] = []
    with bar(total=n, desc=f"backbone {getattr(backbone, 'name', '')}", unit="img", disable=not progress,
             leave=False) as pbar:
        for s in range(0, n, batch_size):
            e = min(n, s + batch_size)
            if isinstance(images, Tensor):
                batch = images[s:e].float()
                if batch.shape[-1] != backbone.input_size or batch.shape[-2] != backbone.input_size:
                    batch = torch.nn.functional.interpolate(batch, size=(backbone.input_size,) * 2, mode="bilinear",
                                                            antialias=True, align_corners=False)
            else:
                batch = torch.stack([image_tensor(p, backbone.input_size, getattr(backbone, "view", None)) for p in images[s:e]])
            _, feats = next(backbone_draws(backbone, batch, torch.arange(s, e), seed))
            names = [f.name for f in feats]
            parts.append([{k: f.vectors(k).float().cpu() for k in kinds} for f in feats])
            pbar.update(e - s)
    return [LayerFeatures(name=names[li], **{k: torch.cat([p[li][k] for p in parts]) for k in kinds})
            for li in range(len(names))]


__all__ = ["LDSC", "as_layer_features", "extract_features", "flatten_channels"]
