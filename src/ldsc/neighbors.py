"""Nearest-neighbour search over the tokens of a data set: pure array code, no Lightning.

Every layer of every image has the same ``T = h·w`` tokens, stored image-major, so image ``i``
owns rows ``[i·T, (i+1)·T)``. Two searches per layer (see ``docs/method.md``, "Graphs"):

* :func:`intra_image_knn` — the ``k`` most similar tokens of the *same* image, exact, one block of
  images at a time (a batched ``T × T`` product each): linear in the number of images.
* :func:`inter_image_knn` — the ``k`` most similar tokens of *all other* images. ``exact`` is
  brute force (FAISS flat inner-product search, quadratic in tokens); ``cluster`` groups the
  tokens into the leaves of a two-level k-means and scores each leaf's queries against the keys of
  its ``nprobe`` nearest leaves in one dense product (constant work per token); ``ivf`` and
  ``hnsw`` are FAISS indexes over all tokens, searched one image's queries at a time with that
  image's own id range excluded (``IDSelectorNot(IDSelectorRange)``). No method ever returns a
  hit of the query's own image.

Similarities are cosines: both sides are L2-normalised and the indexes use the inner product.
Results are ``(idx, sim)`` arrays of shape ``(N, k)``: ``idx`` int64 global token ids (``-1``
where fewer than ``k`` candidates exist), ``sim`` float32 (``-inf`` there).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: search methods of :func:`inter_image_knn` (``auto`` is resolved by :func:`choose_search`)
SEARCH_METHODS = ("auto", "exact", "cluster", "ivf", "hnsw")


def choose_search(method: str, n_tokens: int, exact_max_tokens: int) -> str:
    """Resolve ``auto``: ``exact`` up to ``exact_max_tokens`` tokens (one layer, all images),
    ``cluster`` beyond (its work per token does not grow with the data set)."""
    if method not in SEARCH_METHODS:
        raise ValueError(f"graph.search must be one of {SEARCH_METHODS}, not {method!r}")
    if method != "auto":
        return method
    return "exact" if n_tokens <= exact_max_tokens else "cluster"


def normalize_rows(x: Tensor) -> Tensor:
    """``(N, d)`` -> float32 unit rows (cosine similarity = dot product)."""
    return F.normalize(x.float(), dim=-1)


def _empty(n: int, k: int) -> tuple[Tensor, Tensor]:
    return torch.full((n, k), -1, dtype=torch.long), torch.full((n, k), float("-inf"))


def intra_image_knn(x: Tensor, y: Tensor, tokens: int, k: int, exclude_self: bool = True,
                    max_chunk_elements: int = 2**24, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Exact ``k`` nearest tokens of the same image.

    Args:
        x: ``(N, d)`` unit query rows (N = images × ``tokens``); y: ``(N, d)`` unit key rows.
        tokens: tokens per image ``T``.
        k: neighbours per token (at most ``T - 1``).
        exclude_self: drop the token itself (the diagonal).
        max_chunk_elements: similarities held at once (``images_per_block × T²``).
        out: ``(idx, sim)`` ``(N, k)`` tensors (or views) to write into (any integer dtype for ``idx``).

    Returns:
        ``(idx (N, k), sim (N, k))`` with global token ids.
    """
    n = x.shape[0]
    n_images = n // tokens
    k = min(k, tokens - int(exclude_self))
    if k <= 0 or n == 0:
        return _empty(n, max(k, 0))
    xb, yb = x.view(n_images, tokens, -1), y.view(n_images, tokens, -1)
    per = max(1, max_chunk_elements // (tokens * tokens))
    if out is None:
        out = (torch.empty(n, k, dtype=torch.long), torch.empty(n, k, dtype=torch.float32))
    idx, sim = out
    diag = torch.arange(tokens)
    for s in range(0, n_images, per):
        e = min(n_images, s + per)
        S = torch.bmm(xb[s:e], yb[s:e].transpose(1, 2))  # (b, T, T)
        if exclude_self:
            S[:, diag, diag] = float("-inf")
        v, j = S.topk(k, dim=2)
        rows = slice(s * tokens, e * tokens)
        sim[rows] = v.reshape(-1, k).cpu()
        idx[rows] = (j + (torch.arange(s, e, device=j.device) * tokens).view(-1, 1, 1)).reshape(-1, k).cpu().to(idx.dtype)
    return idx, sim


def _exact_inter(x: Tensor, y: Tensor, tokens: int, k: int, max_chunk_elements: int,
                 progress: Callable | None) -> tuple[Tensor, Tensor]:
    """Brute force with FAISS's flat inner-product search (BLAS products, heap selection): each
    query asks for ``k + tokens`` hits and drops those of its own image, which stays exact (at
    most ``tokens`` hits can be its own) and fast (a selector would leave the BLAS path)."""
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    n, d = x.shape
    n_images = n // tokens
    index = faiss.IndexFlatIP(d)
    index.add(np.ascontiguousarray(y.numpy(), dtype=np.float32))
    xa = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    kk = min(n, k + tokens)
    per = max(1, max_chunk_elements // (kk * tokens * 3))  # images of queries per call (results: 12 B a hit)
    idx = torch.empty(n, k, dtype=torch.long)
    sim = torch.empty(n, k, dtype=torch.float32)
    for s in range(0, n_images, per):
        e = min(n_images, s + per)
        D, I = index.search(xa[s * tokens:e * tokens], kk)
        I_t, D_t = torch.from_numpy(I), torch.from_numpy(D)
        own = (I_t // tokens) == (torch.arange(s * tokens, e * tokens) // tokens)[:, None]
        D_t[own | (I_t < 0)] = float("-inf")
        v, j = D_t.topk(k, dim=1)  # hits come sorted: the first k kept ones, in order
        sim[s * tokens:e * tokens], idx[s * tokens:e * tokens] = v, I_t.gather(1, j)
        if progress:
            progress((e - s) * tokens)
    return idx, sim


def _faiss_index(y: np.ndarray, method: str, nlist: int | None, hnsw_m: int, ef_construction: int, seed: int):
    import faiss

    n, d = y.shape
    if method == "ivf":
        nlist = int(nlist or max(1, min(n // 40, int(2 * math.sqrt(n)))))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        # coarse lists only need to be roughly right (nprobe covers the rest): 40 points per list
        # (FAISS's minimum without a warning) and 10 k-means iterations keep training cheap
        rng = np.random.default_rng(seed)
        sample = y if n <= 40 * nlist else y[np.sort(rng.choice(n, 40 * nlist, replace=False))]
        index.cp.seed, index.cp.niter, index.cp.max_points_per_centroid = seed, 10, 40
        index.train(sample)
        index.add(y)
        return index
    index = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = int(ef_construction)
    index.add(y)
    return index


def _kmeans(v: Tensor, k: int, seed: int, niter: int = 10) -> Tensor:
    """``(k, d)`` unit centroids of a spherical k-means of the unit rows ``v`` (FAISS; trained on
    at most 64 points per centroid: the lists only need to be roughly right, ``nprobe`` covers the rest)."""
    import faiss

    k = max(1, min(k, v.shape[0]))
    if k == 1:
        return F.normalize(v.mean(0, keepdim=True), dim=-1)
    km = faiss.Kmeans(v.shape[1], k, niter=niter, seed=seed, spherical=True, max_points_per_centroid=64,
                      min_points_per_centroid=1, verbose=False)
    km.train(np.ascontiguousarray(v.numpy(), dtype=np.float32))
    return torch.from_numpy(km.centroids.copy())


def _nearest(v: Tensor, centroids: Tensor, chunk: int = 1 << 16) -> Tensor:
    """Index of the most similar centroid of every row of ``v`` (int64)."""
    out = torch.empty(v.shape[0], dtype=torch.long)
    for s in range(0, v.shape[0], chunk):
        out[s:s + chunk] = (v[s:s + chunk] @ centroids.T).argmax(1)
    return out


class ClusterTree:
    """Two-level spherical k-means over unit vectors: ``≈ √nlist`` top clusters, each split into
    leaves of about ``list_size`` vectors (``nlist ≈ N / list_size`` leaves in all), plus each
    leaf's ``neighbours`` nearest leaves (by centroid). A vector's leaf is its most similar leaf
    among those of its ``tops`` nearest top clusters (one top cluster alone misplaces the vectors
    near a top-level boundary): about ``(1 + tops)·√nlist`` inner products, so leaves stay cheap
    to find at any size."""

    def __init__(self, y: Tensor, list_size: int, seed: int = 0, neighbours: int = 32):
        n = y.shape[0]
        nlist = max(1, round(n / max(1, list_size)))
        self.top = _kmeans(y, round(math.sqrt(nlist)), seed)
        top_of = _nearest(y, self.top)
        self.leaves, self.first = [], []  # per top cluster: leaf centroids, id of its first leaf
        count = 0
        for t in range(self.top.shape[0]):
            members = (top_of == t).nonzero().squeeze(1)
            n_sub = max(1, round(members.numel() / max(1, list_size)))
            c = _kmeans(y[members], n_sub, seed + 1 + t) if members.numel() else self.top[t:t + 1]
            self.leaves.append(c)
            self.first.append(count)
            count += c.shape[0]
        self.nlist = count
        C = self.centroids = torch.cat(self.leaves)
        m = min(neighbours, count)
        #: ``(nlist, neighbours)`` each leaf's nearest leaves by centroid, itself first
        self.near = torch.cat([(C[s:s + 1024] @ C.T).topk(m, 1).indices for s in range(0, count, 1024)])

    def assign(self, v: Tensor, tops: int = 8, chunk: int = 1 << 20) -> Tensor:
        """Leaf id of every row of ``v`` (see the class docstring), a chunk of rows at a time (the
        transient memory is a few times ``chunk × tops``, whatever the number of rows)."""
        tops = min(tops, self.top.shape[0])
        leaf = torch.empty(v.shape[0], dtype=torch.long)
        for s in range(0, v.shape[0], chunk):
            vc = v[s:s + chunk]
            near = (vc @ self.top.T).topk(tops, 1).indices
            rows_by_top, offsets = _by_list(near.view(-1), self.top.shape[0])  # (row, top) pairs by top
            rows_by_top //= tops
            best = torch.full((vc.shape[0],), float("-inf"))
            lc = torch.zeros(vc.shape[0], dtype=torch.long)
            for t in torch.nonzero(offsets[1:] > offsets[:-1]).squeeze(1).tolist():
                r = rows_by_top[offsets[t]:offsets[t + 1]]
                val, j = (vc[r] @ self.leaves[t].T).max(1)
                better = val > best[r]
                best[r[better]], lc[r[better]] = val[better], j[better] + self.first[t]
            leaf[s:s + chunk] = lc
        return leaf


def _by_list(assign: Tensor, nlist: int) -> tuple[Tensor, Tensor]:
    """``(order, offsets)``: row ids sorted by list; list ``l`` holds ``order[offsets[l]:offsets[l+1]]``."""
    order = torch.argsort(assign, stable=True)
    offsets = torch.zeros(nlist + 1, dtype=torch.long)
    offsets[1:] = torch.bincount(assign, minlength=nlist).cumsum(0)
    return order, offsets


def _cluster_inter(x: Tensor, y: Tensor, tokens: int, k: int, list_size: int, nprobe: int, seed: int,
                   idx: Tensor, sim: Tensor, progress: Callable | None) -> Tensor:
    """Clustered search scored densely: keys and queries fall into the leaves of one
    :class:`ClusterTree`. For the queries of one leaf, each query picks its ``nprobe`` most
    similar leaves among the ``4·nprobe`` leaves nearest to its own; the union of those picks is
    scored in one matrix product, own-image keys masked, top ``k`` kept. Work per query is about
    ``nprobe·list_size`` inner products whatever the data set's size. Returns the key ids sorted
    by leaf (similar tokens next to each other: an order that keeps graph products cache-local)."""
    tree = ClusterTree(y, list_size, seed, neighbours=max(32, 4 * nprobe))
    key_leaf = tree.assign(y)
    query_leaf = key_leaf if x is y else tree.assign(x)
    korder, koff = _by_list(key_leaf, tree.nlist)
    qorder, qoff = _by_list(query_leaf, tree.nlist)
    del key_leaf, query_leaf
    C, near = tree.centroids, tree.near[:, :4 * nprobe]
    nprobe = min(nprobe, near.shape[1])
    sizes = (koff[1:] - koff[:-1]).tolist()
    for leaf in range(tree.nlist):
        q = qorder[qoff[leaf]:qoff[leaf + 1]]
        if q.numel() == 0:
            continue
        xq = x[q]
        cands = near[leaf]
        picked = (xq @ C[cands].T).topk(nprobe, 1).indices.unique()
        cand = torch.cat([korder[koff[p]:koff[p + 1]] for p in cands[picked].tolist() if sizes[p]])
        kk = min(k, cand.numel())
        if kk:
            S = xq @ y[cand].T
            S.masked_fill_((q // tokens)[:, None] == (cand // tokens)[None, :], float("-inf"))
            v, j = S.topk(kk, dim=1)
            hit = cand[j]
            hit[v == float("-inf")] = -1
            idx[q, :kk] = hit.to(idx.dtype)
            sim[q, :kk] = v
        if kk < k:
            idx[q, kk:], sim[q, kk:] = -1, float("-inf")
        if progress:
            progress(q.numel())
    return korder


def inter_image_knn(x: Tensor, y: Tensor, tokens: int, k: int, method: str = "exact", nlist: int | None = None,
                    nprobe: int = 12, hnsw_m: int = 32, ef_search: int = 256, ef_construction: int = 64,
                    list_size: int = 128, max_chunk_elements: int = 2**24, seed: int = 0,
                    progress: Callable | None = None, out: tuple[Tensor, Tensor] | None = None,
                    return_order: bool = False):
    """The ``k`` most similar tokens of the *other* images.

    Args:
        x: ``(N, d)`` unit query rows; y: ``(N, d)`` unit key rows (image-major, ``tokens`` each).
        method: ``exact`` (brute force), ``cluster`` (two-level k-means lists of about
            ``list_size`` tokens; the queries of a list scored densely against the ``nprobe``
            nearest lists), ``ivf`` (FAISS ``IndexIVFFlat``, ``nlist`` lists, default ``2·√N``;
            ``nprobe`` lists visited per query) or ``hnsw`` (FAISS ``IndexHNSWFlat``, ``hnsw_m``
            links per node, ``ef_construction`` / ``ef_search`` candidate lists when adding / searching).
        progress: called with the number of query tokens finished, after each block.
        out: ``(idx, sim)`` ``(N, k)`` views to write the result into (any integer dtype for ``idx``).
        return_order: also return an order of the tokens that puts similar ones next to each
            other (``cluster``: sorted by leaf; ``None`` for the other methods).

    Returns:
        ``(idx (N, k), sim (N, k))`` (and the order); ``idx`` never points into the query's own image.
    """
    n = x.shape[0]
    n_images = n // tokens
    k = min(k, n - tokens)
    if out is None:
        out = (torch.empty(n, max(k, 0), dtype=torch.long), torch.empty(n, max(k, 0), dtype=torch.float32))
    idx_out, sim_out = out
    order = None
    if k <= 0 or n_images < 2:
        idx_out.fill_(-1)
        sim_out.fill_(float("-inf"))
    elif method == "cluster":
        order = _cluster_inter(x, y, tokens, k, list_size, nprobe, seed, idx_out, sim_out, progress)
    else:
        _faiss_inter(x, y, tokens, k, method, nlist, nprobe, hnsw_m, ef_search, ef_construction,
                     max_chunk_elements, seed, progress, idx_out, sim_out)
    return (*out, order) if return_order else out


def _faiss_inter(x, y, tokens, k, method, nlist, nprobe, hnsw_m, ef_search, ef_construction, max_chunk_elements,
                 seed, progress, idx_out, sim_out) -> None:
    """``exact``, ``ivf`` and ``hnsw`` of :func:`inter_image_knn`, written into ``idx_out, sim_out``."""
    n_images = x.shape[0] // tokens
    if method == "exact":
        i, s = _exact_inter(x, y, tokens, k, max_chunk_elements, progress)
        idx_out.copy_(i)
        sim_out.copy_(s)
        return
    if method not in ("ivf", "hnsw"):
        raise ValueError(f"unknown search method {method!r}")
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    xa = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    ya = xa if y is x else np.ascontiguousarray(y.numpy(), dtype=np.float32)
    index = _faiss_index(ya, method, nlist, hnsw_m, ef_construction, seed)
    # one call per image: its queries share the selector that excludes its own tokens
    for i in range(n_images):
        sel = faiss.IDSelectorNot(faiss.IDSelectorRange(i * tokens, (i + 1) * tokens))
        if method == "ivf":
            params = faiss.SearchParametersIVF(sel=sel, nprobe=int(nprobe))
        else:
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(int(ef_search), k))
        rows = slice(i * tokens, (i + 1) * tokens)
        D, Ii = index.search(xa[rows], k, params=params)
        D[Ii < 0] = -np.inf
        sim_out[rows] = torch.from_numpy(D)
        idx_out[rows] = torch.from_numpy(Ii).to(idx_out.dtype)
        if progress:
            progress(tokens)


def knn_recall(approx: Tensor, exact: Tensor) -> float:
    """Fraction of the exact neighbour lists ``(N, k)`` found by ``approx`` ``(N, k')`` (``-1``
    entries of ``exact`` are not counted)."""
    a, e = approx.long(), exact.long()
    valid = e >= 0
    hit = (e.unsqueeze(2) == a.unsqueeze(1)).any(2) & valid
    return float(hit.sum()) / max(int(valid.sum()), 1)

