"""Nearest-neighbour search over the tokens of a data set: pure array code, no Lightning.

Every layer of every image has the same ``T = h·w`` tokens, stored image-major, so image ``i``
owns rows ``[i·T, (i+1)·T)``. Two searches per layer (see ``docs/method.md``, "Graphs"):

* :func:`intra_image_knn` — the ``k`` most similar tokens of the *same* image, exact, one block of
  images at a time (a batched ``T × T`` product each): linear in the number of images.
* :func:`inter_image_knn` — the ``k`` most similar tokens of *all other* images. ``exact`` is
  brute force (FAISS flat inner-product search, quadratic in tokens); ``cluster`` groups the
  tokens into the leaves of a hierarchical k-means and scores each leaf's queries against the keys of
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


def choose_search(method: str, n_tokens: int, exact_max_tokens: int, on_gpu: bool = False,
                  gpu_exact_max_tokens: int = 1 << 20) -> str:
    """Resolve ``auto``: ``exact`` up to ``exact_max_tokens`` tokens (one layer, all images) —
    ``gpu_exact_max_tokens`` when the search runs on a GPU (brute force in torch there) —
    ``cluster`` beyond (its work per token does not grow with the data set)."""
    if method not in SEARCH_METHODS:
        raise ValueError(f"graph.search must be one of {SEARCH_METHODS}, not {method!r}")
    if method != "auto":
        return method
    return "exact" if n_tokens <= (gpu_exact_max_tokens if on_gpu else exact_max_tokens) else "cluster"


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
        max_chunk_elements: similarities held at once (``images_per_block × T²``; an image whose
            ``T²`` is larger is searched in blocks of query rows).
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
    if out is None:
        out = (torch.empty(n, k, dtype=torch.long), torch.empty(n, k, dtype=torch.float32))
    idx, sim = out
    on_cpu = x.device.type == "cpu"
    if on_cpu:
        from ldsc.graphs.kernels import intra_topk

    def select(S: Tensor, first_image: int, row0: int, rows: slice) -> None:
        """Top ``k`` of the block ``S`` ``(b, R, T)`` (rows ``row0..`` of images ``first_image..``) into ``rows``."""
        if on_cpu:  # one compiled pass: no masked copy, no sort of the whole row
            intra_topk(S, k, first_image, tokens, row0 if exclude_self else -tokens, idx[rows], sim[rows])
            return
        if exclude_self:
            r = torch.arange(S.shape[1], device=S.device)
            S[:, r, r + row0] = float("-inf")
        v, j = S.topk(k, dim=2)
        sim[rows] = v.reshape(-1, k).cpu()
        first = (torch.arange(first_image, first_image + S.shape[0], device=j.device) * tokens).view(-1, 1, 1)
        idx[rows] = (j + first).reshape(-1, k).cpu().to(idx.dtype)

    if tokens * tokens > max_chunk_elements:  # one image's T x T does not fit: blocks of its query rows
        rows_per = max(1, max_chunk_elements // tokens)
        if on_cpu:  # per worker thread a share of the block size
            rows_per = max(1, rows_per // max(1, torch.get_num_threads()))
        tasks = [(i, r0, min(tokens, r0 + rows_per)) for i in range(n_images) for r0 in range(0, tokens, rows_per)]

        def rows_task(t: int) -> None:
            i, r0, r1 = tasks[t]
            select((xb[i, r0:r1] @ yb[i].T).unsqueeze(0), i, r0, slice(i * tokens + r0, i * tokens + r1))
    else:
        # CPU: small blocks (~2²¹ similarities, a few images), one per worker thread, each with one
        # torch thread (a block's product and its selection stay in that core's cache: 4.8 -> 2.8 s
        # on 10⁶ tokens of 1,024 per image); GPU: blocks of max_chunk_elements
        per = max(1, (2**21 if on_cpu else max_chunk_elements) // (tokens * tokens))
        per = min(per, max(1, max_chunk_elements // (tokens * tokens)))
        tasks = [(s, min(n_images, s + per)) for s in range(0, n_images, per)]

        def rows_task(t: int) -> None:
            s, e = tasks[t]
            select(torch.bmm(xb[s:e], yb[s:e].transpose(1, 2)), s, 0, slice(s * tokens, e * tokens))  # (b, T, T)
    if on_cpu:
        run_parallel(rows_task, len(tasks))
    else:
        for t in range(len(tasks)):
            rows_task(t)
    return idx, sim


def _exact_inter(x: Tensor, y: Tensor, tokens: int, k: int, max_chunk_elements: int,
                 progress: Callable | None, queries: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Brute force with FAISS's flat inner-product search (BLAS products, heap selection): each
    query asks for ``k + tokens`` hits and drops those of its own image, which stays exact (at
    most ``tokens`` hits can be its own) and fast (a selector would leave the BLAS path)."""
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    n, d = x.shape
    q0, q1 = queries or (0, n)
    index = faiss.IndexFlatIP(d)
    index.add(np.ascontiguousarray(y.numpy(), dtype=np.float32))
    xa = np.ascontiguousarray(x[q0:q1].numpy(), dtype=np.float32)
    kk = min(n, k + tokens)
    per = max(1, max_chunk_elements // (kk * tokens * 3))  # images of queries per call (results: 12 B a hit)
    idx = torch.empty(q1 - q0, k, dtype=torch.long)
    sim = torch.empty(q1 - q0, k, dtype=torch.float32)
    for s in range(q0 // tokens, q1 // tokens, per):
        e = min(q1 // tokens, s + per)
        rows = slice(s * tokens - q0, e * tokens - q0)
        D, I = index.search(xa[rows], kk)
        I_t, D_t = torch.from_numpy(I), torch.from_numpy(D)
        own = (I_t // tokens) == (torch.arange(s * tokens, e * tokens) // tokens)[:, None]
        D_t[own | (I_t < 0)] = float("-inf")
        v, j = D_t.topk(k, dim=1)  # hits come sorted: the first k kept ones, in order
        sim[rows], idx[rows] = v, I_t.gather(1, j)
        if progress:
            progress((e - s) * tokens)
    return idx, sim


def _torch_exact_inter(x: Tensor, y: Tensor, tokens: int, k: int, max_chunk_elements: int,
                       progress: Callable | None, queries: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Brute force in torch on ``x``'s device (the GPU path of ``exact``): a block of whole
    images' queries against every key at a time, the block's own images masked, top ``k``.
    Results on the CPU."""
    n = y.shape[0]
    q0, q1 = queries or (0, x.shape[0])
    per = max(1, max_chunk_elements // max(1, tokens * n))  # images of queries per block
    idx = torch.empty(q1 - q0, k, dtype=torch.long)
    sim = torch.empty(q1 - q0, k, dtype=torch.float32)
    for s in range(q0 // tokens, q1 // tokens, per):
        e = min(q1 // tokens, s + per)
        S = (x[s * tokens:e * tokens] @ y.T).view(e - s, tokens, n)
        for i in range(e - s):  # each image's queries lose their own image's keys
            S[i, :, (s + i) * tokens:(s + i + 1) * tokens] = float("-inf")
        v, j = S.view((e - s) * tokens, n).topk(k, dim=1)
        rows = slice(s * tokens - q0, e * tokens - q0)
        sim[rows], idx[rows] = v.float().cpu(), j.cpu()
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


#: k-means trains on at most this many points per centroid: the lists only need to be roughly
#: right, ``nprobe`` covers the rest (:func:`_kmeans`; :class:`ClusterTree` draws the sample
#: before copying the vectors)
KMEANS_POINTS_PER_CENTROID = 64


def _kmeans(v: Tensor, k: int, seed: int, niter: int = 10) -> Tensor:
    """``(k, d)`` unit centroids of a spherical k-means of the unit rows ``v`` (FAISS; trained on
    at most :data:`KMEANS_POINTS_PER_CENTROID` points per centroid)."""
    import faiss

    k = max(1, min(k, v.shape[0]))
    if k == 1:
        return F.normalize(v.mean(0, keepdim=True), dim=-1)
    faiss.omp_set_num_threads(torch.get_num_threads())  # (per calling thread: 1 inside run_parallel)
    km = faiss.Kmeans(v.shape[1], k, niter=niter, seed=seed, spherical=True,
                      max_points_per_centroid=KMEANS_POINTS_PER_CENTROID, min_points_per_centroid=1, verbose=False)
    km.train(np.ascontiguousarray(v.numpy(), dtype=np.float32))
    return torch.from_numpy(km.centroids.copy())


def _nearest(v: Tensor, centroids: Tensor, chunk: int = 1 << 16) -> Tensor:
    """Index of the most similar centroid of every row of ``v`` (int64)."""
    out = torch.empty(v.shape[0], dtype=torch.long)
    for s in range(0, v.shape[0], chunk):
        out[s:s + chunk] = (v[s:s + chunk] @ centroids.T).argmax(1)
    return out


class ClusterTree:
    """Hierarchical spherical k-means over unit vectors: ``depth`` levels of centroids, each node
    split into about ``B = nlist^(1/depth)`` children (``depth = ⌈log_branching nlist⌉``), the last
    level's nodes being the ``nlist ≈ N / list_size`` leaves; plus each leaf's ``neighbours``
    nearest leaves by centroid (``near``, itself first), looked for among the children of the
    ``tops`` parents nearest to its own.

    A vector's leaf (:meth:`assign`) is found by a beam search: the ``tops`` most similar nodes of
    each level are expanded into their children, and the most similar leaf among them is kept
    (a greedy descent misplaces the vectors near a boundary). Finding a leaf costs about
    ``B + (depth - 1)·tops·B`` inner products and building the tree ``O(N·B·depth)``. With the
    default ``branching`` the tree has two levels up to 512² leaves, so ``B ≈ √nlist`` (the first
    level has ``top_scale·B`` nodes): deeper trees grow only logarithmically but found the
    nearest leaf less often in our measurements (docs/benchmarks.md)."""

    def __init__(self, y: Tensor, list_size: int, seed: int = 0, neighbours: int = 32, tops: int = 8,
                 branching: int = 512, top_scale: float = 2.0):
        n = y.shape[0]
        self.tops = tops
        self._beam0 = self._beam0_of = None  # (see assign)
        nlist = max(1, round(n / max(1, list_size)))
        depth = max(1, math.ceil(math.log(nlist) / math.log(max(2, branching)) - 1e-9))
        B = max(2, round(nlist ** (1 / depth)))
        B0 = max(2, round(top_scale * B)) if depth > 1 else B
        #: per level: centroids ``(nodes, d)``; per level below the first: the first child and the
        #: number of children of each node of the level above
        self.levels: list[Tensor] = []
        self.child_first: list[Tensor] = []
        self.child_count: list[Tensor] = []
        node_of = torch.zeros(n, dtype=torch.long)  # greedy descent: the node each vector trains
        n_parents = 1
        for level in range(depth):
            last = level == depth - 1
            rows, offsets = _by_list(node_of, n_parents)
            cents, first, count = [], [], []
            total = 0
            new_node_of = torch.empty(n, dtype=torch.long)
            sizes = (offsets[1:] - offsets[:-1]).tolist()
            n_subs = [max(1, round(m / max(1, list_size)) if last else
                          min(B0 if level == 0 else B, max(1, round(m / max(1, list_size))))) for m in sizes]
            # each node's children: its own k-means (seeded by the children numbered before it)
            counts = [min(ns, max(m, 1)) for ns, m in zip(n_subs, sizes)]  # children each node gets
            seeds = [seed + 1 + before for before in np.cumsum([0] + counts[:-1]).tolist()]
            parts: list = [None] * n_parents

            def split(p: int) -> None:
                members = rows[offsets[p]:offsets[p + 1]]
                if members.numel() == 0:
                    parts[p] = self.levels[-1][p:p + 1] if self.levels else F.normalize(y.mean(0, keepdim=True), dim=-1)
                else:  # the k-means' training sample drawn first: only it is copied out of y
                    most = KMEANS_POINTS_PER_CENTROID * max(1, n_subs[p])
                    if members.numel() > most:
                        pick = torch.randperm(members.numel(), generator=torch.Generator().manual_seed(seeds[p]))
                        members = members[pick[:most]]
                    parts[p] = _kmeans(y[members], n_subs[p], seeds[p])

            run_parallel(split, n_parents)  # many small k-means: one thread each
            if level == 0 and not last:  # (one parent: the root, all vectors)
                # the first level's beam of every vector, kept for `assign(y)` (the same products):
                # its best node is the greedy descent's
                self._beam0 = self._first_beam(y, parts[0])
                self._beam0_of = y
                new_node_of = self._beam0[:, 0].long()
            for p in range(n_parents):
                c = parts[p]
                if not last and level > 0 and sizes[p]:
                    members = rows[offsets[p]:offsets[p + 1]]
                    new_node_of[members] = _nearest(y[members], c) + total
                cents.append(c)
                first.append(total)
                count.append(c.shape[0])
                total += c.shape[0]
            self.levels.append(torch.cat(cents))
            if level > 0:
                self.child_first.append(torch.tensor(first))
                self.child_count.append(torch.tensor(count))
            node_of, n_parents = new_node_of, total
        self.nlist = n_parents
        C = self.centroids = self.levels[-1]
        m = min(neighbours, self.nlist)
        #: ``(nlist, neighbours)`` each leaf's nearest leaves by centroid, itself first
        self.near = torch.empty(self.nlist, m, dtype=torch.long)
        if depth == 1:
            for s0 in range(0, self.nlist, 1024):
                self.near[s0:s0 + 1024] = (C[s0:s0 + 1024] @ C.T).topk(m, 1).indices
            return
        P, first, count = self.levels[-2], self.child_first[-1], self.child_count[-1]
        near_parents = torch.cat([(P[s0:s0 + 1024] @ P.T).topk(min(2 * tops, P.shape[0]), 1).indices
                                  for s0 in range(0, P.shape[0], 1024)])
        for p in range(P.shape[0]):
            s0, e0 = int(first[p]), int(first[p] + count[p])
            cand = torch.cat([torch.arange(int(first[u]), int(first[u] + count[u])) for u in near_parents[p].tolist()])
            if cand.numel() < m:  # few leaves nearby (small data): all of them
                cand = torch.arange(self.nlist)
            self.near[s0:e0] = cand[(C[s0:e0] @ C[cand].T).topk(m, 1).indices]

    def _first_beam(self, v: Tensor, first: Tensor, chunk: int = 1 << 16) -> Tensor:
        """``(N, tops)`` int32: each row's most similar nodes of the first level, best first."""
        from ldsc.graphs.kernels import rows_topk

        width = min(self.tops, first.shape[0])
        out = torch.empty(v.shape[0], width, dtype=torch.int32)
        scores = torch.empty(min(chunk, v.shape[0]), first.shape[0], dtype=v.dtype)  # one block for all chunks
        for s in range(0, v.shape[0], chunk):
            block = scores[:min(chunk, v.shape[0] - s)]
            out[s:s + chunk] = rows_topk(torch.matmul(v[s:s + chunk], first.T, out=block), width)
        return out

    def assign(self, v: Tensor, chunk: int = 1 << 16) -> Tensor:
        """Leaf id of every row of ``v`` (beam search, see the class docstring), a chunk of rows at
        a time (transient memory: a few times ``chunk × tops``). The vectors the tree was built
        from reuse the first level's beam found then (once: it is released)."""
        from ldsc.graphs.kernels import best_child, rows_topk

        leaf = torch.empty(v.shape[0], dtype=torch.long)
        last = len(self.levels) - 1
        kept = self._beam0 if v is self._beam0_of else None
        self._beam0 = self._beam0_of = None
        for s in range(0, v.shape[0], chunk):
            vc = v[s:s + chunk]
            if last == 0:
                leaf[s:s + chunk] = (vc @ self.levels[0].T).argmax(1)
                continue
            if kept is not None:
                beam = kept[s:s + chunk].long()
            else:
                beam = rows_topk(vc @ self.levels[0].T, min(self.tops, self.levels[0].shape[0]))
            for level in range(1, last):
                beam = self._expand(vc, beam, level, keep=self.tops)
            # the leaves: each row's best child of its beam, compiled (cache-local, no gathers)
            leaf[s:s + chunk] = best_child(vc, beam, self.child_first[last - 1], self.child_count[last - 1],
                                           self.levels[last])
        return leaf

    def _expand(self, vc: Tensor, beam: Tensor, level: int, keep: int) -> Tensor:
        """The ``keep`` most similar children (nodes of ``level``) of each row's ``beam`` nodes."""
        n_rows, width = beam.shape
        cents, first, count = self.levels[level], self.child_first[level - 1], self.child_count[level - 1]
        best_s = torch.full((n_rows, keep), float("-inf"))
        best_i = torch.zeros(n_rows, keep, dtype=torch.long)
        flat = beam.reshape(-1)
        valid = (flat >= 0).nonzero().squeeze(1)  # (-1: a slot left empty above)
        order, offsets = _by_list(flat[valid], self.levels[level - 1].shape[0])
        pairs = valid[order]
        for p in torch.nonzero(offsets[1:] > offsets[:-1]).squeeze(1).tolist():
            r = pairs[offsets[p]:offsets[p + 1]] // width
            f, c = int(first[p]), int(count[p])
            sc = vc[r] @ cents[f:f + c].T
            if keep == 1:
                val, j = sc.max(1)
                better = val > best_s[r, 0]
                rb = r[better]
                best_s[rb, 0], best_i[rb, 0] = val[better], j[better] + f
                continue
            val, j = sc.topk(min(keep, c), 1)
            merged_s = torch.cat([best_s[r], val], 1)
            merged_i = torch.cat([best_i[r], j + f], 1)
            top = merged_s.topk(keep, 1).indices
            best_s[r], best_i[r] = merged_s.gather(1, top), merged_i.gather(1, top)
        best_i[best_s == float("-inf")] = -1
        return best_i


def _by_list(assign: Tensor, nlist: int) -> tuple[Tensor, Tensor]:
    """``(order, offsets)``: row ids sorted by list; list ``l`` holds ``order[offsets[l]:offsets[l+1]]``."""
    order = torch.argsort(assign, stable=True)
    offsets = torch.zeros(nlist + 1, dtype=torch.long)
    offsets[1:] = torch.bincount(assign, minlength=nlist).cumsum(0)
    return order, offsets


def run_parallel(work: Callable[[int], None], n: int) -> None:
    """``work(i)`` for ``i`` in ``range(n)`` on as many threads as torch has, each running its
    torch operations on one thread (restored afterwards); ``work`` must write disjoint outputs.
    An exception (a signal's stop included) cancels the tasks not started and is raised once the
    running ones end (a run of at most 64 items each)."""
    threads = torch.get_num_threads()
    if threads <= 1 or n < 2:
        for i in range(n):
            work(i)
        return
    from concurrent.futures import ThreadPoolExecutor

    step = max(1, min(64, n // (8 * threads)))  # contiguous runs of items: cache-friendly, balanced

    def run(start: int) -> None:
        for i in range(start, min(n, start + step)):
            work(i)

    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(threads)
    try:
        for f in [pool.submit(run, s) for s in range(0, n, step)]:
            f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def _cluster_inter(x: Tensor, y: Tensor, tokens: int, k: int, list_size: int, nprobe: int, seed: int,
                   idx: Tensor, sim: Tensor, progress: Callable | None, queries: tuple[int, int] | None = None,
                   gather: Callable | None = None) -> Tensor:
    """Clustered search scored densely: keys and queries fall into the leaves of one
    :class:`ClusterTree`. For the queries of one leaf, each query picks its ``nprobe`` most
    similar leaves among the ``4·nprobe`` leaves nearest to its own; the union of those picks (at
    most the ``2·nprobe`` leaves the most queries picked) is scored in one matrix product,
    own-image keys masked, top ``k`` kept. Work per query is about
    ``nprobe·list_size`` inner products whatever the data set's size; the keys are copied once in
    leaf order, so a leaf's keys are read as one contiguous block. Returns the key ids sorted by
    leaf (similar tokens next to each other: an order that keeps graph products cache-local).
    With ``queries = (q0, q1)`` only those query rows are searched (``idx``/``sim`` hold them);
    with ``gather`` too (processes whose ``queries`` tile all rows in rank order, and an
    all-gather of their rows) each process finds the leaves of its own rows only."""
    tree = ClusterTree(y, list_size, seed, neighbours=max(32, 4 * nprobe))
    if gather is not None and queries is not None:
        key_leaf = gather(tree.assign(y[queries[0]:queries[1]]))
        query_leaf = key_leaf if x is y else gather(tree.assign(x[queries[0]:queries[1]]))
    else:
        key_leaf = tree.assign(y)
        query_leaf = key_leaf if x is y else tree.assign(x)
    korder, koff = _by_list(key_leaf, tree.nlist)
    qorder, qoff = (korder, koff) if x is y else _by_list(query_leaf, tree.nlist)
    del key_leaf, query_leaf
    from ldsc.graphs.kernels import leaf_candidates, masked_topk

    ys = y[korder]  # keys in leaf order
    k_img = korder // tokens
    C, near = tree.centroids, tree.near[:, :4 * nprobe]
    nprobe = min(nprobe, near.shape[1])
    kstart = koff.tolist()
    q0, q1 = queries or (0, x.shape[0])

    def search_leaf(leaf: int) -> None:
        q = qorder[qoff[leaf]:qoff[leaf + 1]]
        mine = None if queries is None else (q >= q0) & (q < q1)
        if q.numel() == 0 or (mine is not None and not bool(mine.any())):
            return
        xq = ys[kstart[leaf]:kstart[leaf + 1]] if x is y else x[q]
        cands = near[leaf]
        # the leaves picked by all the leaf's queries (so a share of the queries gets the same
        # candidates, and the same neighbours, as in a search of all of them), at most the
        # 2·nprobe most picked: their keys' positions in `ys`
        pos = leaf_candidates(xq @ C[cands].T, nprobe, 2 * nprobe, cands, koff)
        if mine is not None:
            q, xq = q[mine], xq[mine]
        # the candidates' similarities in one product; own-image keys skipped while the top k
        # are kept (one compiled pass: no masked copy); fewer than k candidates leave -1 / -inf
        masked_topk(xq @ ys[pos].T, q, tokens, q0, pos, k_img, korder, k, idx, sim)
        if progress:
            progress(q.numel())

    # a leaf's products are small: parallel over leaves (one torch thread per worker, the
    # compiled selection without the GIL) rather than inside each product, whose threads would
    # mostly wait at its barriers
    run_parallel(search_leaf, tree.nlist)
    return korder


def inter_image_knn(x: Tensor, y: Tensor, tokens: int, k: int, method: str = "exact", nlist: int | None = None,
                    nprobe: int = 6, hnsw_m: int = 32, ef_search: int = 256, ef_construction: int = 64,
                    list_size: int = 128, max_chunk_elements: int = 2**24, seed: int = 0,
                    progress: Callable | None = None, out: tuple[Tensor, Tensor] | None = None,
                    return_order: bool = False, queries: tuple[int, int] | None = None,
                    gather: Callable | None = None):
    """The ``k`` most similar tokens of the *other* images.

    Args:
        x: ``(N, d)`` unit query rows; y: ``(N, d)`` unit key rows (image-major, ``tokens`` each);
            on a GPU for ``exact`` (brute force in torch there), on the CPU for the other methods.
        method: ``exact`` (brute force), ``cluster`` (hierarchical k-means leaves of about
            ``list_size`` tokens; the queries of a list scored densely against the ``nprobe``
            nearest lists), ``ivf`` (FAISS ``IndexIVFFlat``, ``nlist`` lists, default ``2·√N``;
            ``nprobe`` lists visited per query) or ``hnsw`` (FAISS ``IndexHNSWFlat``, ``hnsw_m``
            links per node, ``ef_construction`` / ``ef_search`` candidate lists when adding / searching).
        progress: called with the number of query tokens finished, after each block.
        out: ``(idx, sim)`` ``(N, k)`` views to write the result into (any integer dtype for ``idx``).
        return_order: also return an order of the tokens that puts similar ones next to each
            other (``cluster``: sorted by leaf; ``None`` for the other methods).
        queries: ``(q0, q1)``: search only these query rows (whole images; one process's share of
            a sharded run) against all keys; the results have ``q1 - q0`` rows.
        gather: with ``queries``, in a sharded run: all-gathers the processes' rows in rank order
            (:func:`ldsc.distributed.all_gather_rows`), so ``cluster`` splits its leaf assignment.

    Returns:
        ``(idx (N, k), sim (N, k))`` (and the order); ``idx`` never points into the query's own image.
    """
    n = x.shape[0]
    n_images = n // tokens
    k = min(k, n - tokens)
    if queries is not None and (queries[0] % tokens or queries[1] % tokens or not 0 <= queries[0] <= queries[1] <= n):
        raise ValueError(f"queries {queries} must be whole images of {tokens} tokens within {n}")
    rows = n if queries is None else queries[1] - queries[0]
    if out is None:
        out = (torch.empty(rows, max(k, 0), dtype=torch.long), torch.empty(rows, max(k, 0), dtype=torch.float32))
    idx_out, sim_out = out
    order = None
    if k <= 0 or n_images < 2:
        idx_out.fill_(-1)
        sim_out.fill_(float("-inf"))
    elif method == "cluster":
        order = _cluster_inter(x, y, tokens, k, list_size, nprobe, seed, idx_out, sim_out, progress, queries, gather)
    else:
        _faiss_inter(x, y, tokens, k, method, nlist, nprobe, hnsw_m, ef_search, ef_construction,
                     max_chunk_elements, seed, progress, idx_out, sim_out, queries)
    return (*out, order) if return_order else out


def _faiss_inter(x, y, tokens, k, method, nlist, nprobe, hnsw_m, ef_search, ef_construction, max_chunk_elements,
                 seed, progress, idx_out, sim_out, queries=None) -> None:
    """``exact``, ``ivf`` and ``hnsw`` of :func:`inter_image_knn`, written into ``idx_out, sim_out``."""
    q0, q1 = queries or (0, x.shape[0])
    if method == "exact":
        brute = _exact_inter if x.device.type == "cpu" else _torch_exact_inter
        i, s = brute(x, y, tokens, k, max_chunk_elements, progress, queries)
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
    for i in range(q0 // tokens, q1 // tokens):
        sel = faiss.IDSelectorNot(faiss.IDSelectorRange(i * tokens, (i + 1) * tokens))
        if method == "ivf":
            params = faiss.SearchParametersIVF(sel=sel, nprobe=int(nprobe))
        else:
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(int(ef_search), k))
        D, Ii = index.search(xa[i * tokens:(i + 1) * tokens], k, params=params)
        D[Ii < 0] = -np.inf
        rows = slice(i * tokens - q0, (i + 1) * tokens - q0)
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



class TokenIndex:
    """The fitted tokens of one layer, searchable by tokens of *new* images (out-of-sample
    extension): ``search(q, k)`` returns each query's ``k`` most similar fitted tokens.

    ``method`` as :func:`inter_image_knn`, resolved from ``auto`` by :func:`choose_search` on the
    number of fitted tokens: ``exact`` is FAISS's flat inner-product search; ``cluster`` is the
    fit's own clustered search (a :class:`ClusterTree` over the fitted tokens, built once; the new
    queries of one leaf pick their ``nprobe`` most similar leaves among the leaf's nearest, and the
    union is scored in one matrix product); ``ivf`` and ``hnsw`` are FAISS indexes. The cost of a
    query does not grow with the queries answered before it.

    Args:
        y: ``(N, d)`` unit rows of the fitted tokens (CPU).
    """

    def __init__(self, y: Tensor, method: str = "auto", exact_max_tokens: int = 16384, nlist: int | None = None,
                 nprobe: int = 6, hnsw_m: int = 32, ef_search: int = 256, ef_construction: int = 64,
                 list_size: int = 128, seed: int = 0):
        self.method = choose_search(method, y.shape[0], exact_max_tokens)
        self.nprobe, self.ef_search = int(nprobe), int(ef_search)
        self.n = int(y.shape[0])
        if self.method == "cluster":
            self.tree = ClusterTree(y, list_size, seed, neighbours=max(32, 4 * self.nprobe))
            self.order, offsets = _by_list(self.tree.assign(y), self.tree.nlist)
            self.starts = offsets.tolist()
            self.keys = y[self.order].contiguous()  # in leaf order: a leaf's keys are one block
            return
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        ya = np.ascontiguousarray(y.detach().float().cpu().numpy())
        if self.method == "exact":
            self.index = faiss.IndexFlatIP(ya.shape[1])
            self.index.add(ya)
        else:
            self.index = _faiss_index(ya, self.method, nlist, hnsw_m, ef_construction, seed)

    def search(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """``(idx (m, k) int64, sim (m, k) float32)`` of the unit query rows ``q`` ``(m, d)``;
        ``-1`` / ``-inf`` where fewer than ``k`` tokens were found."""
        k = min(int(k), self.n)
        if self.method == "cluster":
            return self._cluster_search(q.float(), k)
        import faiss

        qa = np.ascontiguousarray(q.detach().float().cpu().numpy())
        params = None
        if self.method == "ivf":
            params = faiss.SearchParametersIVF(nprobe=self.nprobe)
        elif self.method == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))
        D, Ii = self.index.search(qa, k, params=params)
        D[Ii < 0] = -np.inf
        return torch.from_numpy(Ii), torch.from_numpy(D)

    def _cluster_search(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The queries of one leaf scored together against the keys of that leaf's ``nprobe``
        nearest leaves (itself first): one dense product per leaf, ``nprobe·list_size`` keys a query."""
        tree = self.tree
        qorder, qoff = _by_list(tree.assign(q), tree.nlist)
        idx = torch.full((q.shape[0], k), -1, dtype=torch.long)
        sim = torch.full((q.shape[0], k), float("-inf"))
        for leaf in torch.nonzero(qoff[1:] > qoff[:-1]).squeeze(1).tolist():
            rows = qorder[qoff[leaf]:qoff[leaf + 1]]
            pos = torch.cat([torch.arange(self.starts[p], self.starts[p + 1]) for p in tree.near[leaf, :self.nprobe].tolist()])
            kk = min(k, pos.numel())
            if kk:
                v, j = (q[rows] @ self.keys[pos].T).topk(kk, dim=1)
                idx[rows, :kk], sim[rows, :kk] = self.order[pos[j]], v
        return idx, sim
