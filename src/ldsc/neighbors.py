"""Nearest-neighbour search over the tokens of a data set: pure array code, no Lightning.

Every layer of every image has the same ``T = h·w`` tokens, stored image-major, so image ``i``
owns rows ``[i·T, (i+1)·T)``. Two searches per layer (see ``docs/method.md``, "Graphs"):

* :func:`intra_image_knn` — the ``k`` most similar tokens of the *same* image, exact, one block of
  images at a time (a batched ``T × T`` product each): linear in the number of images.
* :func:`inter_image_knn` — the ``k`` most similar tokens of *all other* images. ``exact`` is
  brute force (FAISS flat inner-product search, quadratic in tokens); ``ivf`` and ``hnsw`` are FAISS indexes over
  all tokens, searched one image's queries at a time with that image's own id range excluded
  (``IDSelectorNot(IDSelectorRange)``), so no hit of the query's own image is ever returned.

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
SEARCH_METHODS = ("auto", "exact", "ivf", "hnsw")


def choose_search(method: str, n_tokens: int, exact_max_tokens: int, hnsw_min_tokens: int) -> str:
    """Resolve ``auto``: ``exact`` up to ``exact_max_tokens`` tokens (one layer, all images),
    ``ivf`` up to ``hnsw_min_tokens``, ``hnsw`` beyond (whose search cost grows like log N)."""
    if method not in SEARCH_METHODS:
        raise ValueError(f"graph.search must be one of {SEARCH_METHODS}, not {method!r}")
    if method != "auto":
        return method
    if n_tokens <= exact_max_tokens:
        return "exact"
    return "ivf" if n_tokens < hnsw_min_tokens else "hnsw"


def normalize_rows(x: Tensor) -> Tensor:
    """``(N, d)`` -> float32 unit rows (cosine similarity = dot product)."""
    return F.normalize(x.float(), dim=-1)


def _empty(n: int, k: int) -> tuple[Tensor, Tensor]:
    return torch.full((n, k), -1, dtype=torch.long), torch.full((n, k), float("-inf"))


def intra_image_knn(x: Tensor, y: Tensor, tokens: int, k: int, exclude_self: bool = True,
                    max_chunk_elements: int = 2**24) -> tuple[Tensor, Tensor]:
    """Exact ``k`` nearest tokens of the same image.

    Args:
        x: ``(N, d)`` unit query rows (N = images × ``tokens``); y: ``(N, d)`` unit key rows.
        tokens: tokens per image ``T``.
        k: neighbours per token (at most ``T - 1``).
        exclude_self: drop the token itself (the diagonal).
        max_chunk_elements: similarities held at once (``images_per_block × T²``).

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
    idx = torch.empty(n_images, tokens, k, dtype=torch.long)
    sim = torch.empty(n_images, tokens, k, dtype=torch.float32)
    diag = torch.arange(tokens)
    for s in range(0, n_images, per):
        e = min(n_images, s + per)
        S = torch.bmm(xb[s:e], yb[s:e].transpose(1, 2))  # (b, T, T)
        if exclude_self:
            S[:, diag, diag] = float("-inf")
        v, j = S.topk(k, dim=2)
        sim[s:e] = v.cpu()
        idx[s:e] = (j + (torch.arange(s, e, device=j.device) * tokens).view(-1, 1, 1)).cpu()
    return idx.view(n, k), sim.view(n, k)


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
            progress(e - s)
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


def inter_image_knn(x: Tensor, y: Tensor, tokens: int, k: int, method: str = "exact", nlist: int | None = None,
                    nprobe: int = 8, hnsw_m: int = 32, ef_search: int = 256, ef_construction: int = 64,
                    max_chunk_elements: int = 2**24, seed: int = 0,
                    progress: Callable | None = None) -> tuple[Tensor, Tensor]:
    """The ``k`` most similar tokens of the *other* images.

    Args:
        x: ``(N, d)`` unit query rows; y: ``(N, d)`` unit key rows (image-major, ``tokens`` each).
        method: ``exact`` (brute force), ``ivf`` (FAISS ``IndexIVFFlat``, ``nlist`` lists,
            default ``2·√N``; ``nprobe`` lists visited per query) or ``hnsw`` (FAISS
            ``IndexHNSWFlat``, ``hnsw_m`` links per node, ``ef_construction`` / ``ef_search``
            candidate lists when adding / searching).
        progress: called with the number of images finished, after each block.

    Returns:
        ``(idx (N, k), sim (N, k))``; ``idx`` never points into the query's own image.
    """
    n = x.shape[0]
    n_images = n // tokens
    k = min(k, n - tokens)
    if k <= 0 or n_images < 2:
        return _empty(n, max(k, 0))
    if method == "exact":
        return _exact_inter(x, y, tokens, k, max_chunk_elements, progress)
    if method not in ("ivf", "hnsw"):
        raise ValueError(f"unknown search method {method!r}")
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    xa = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    ya = xa if y is x else np.ascontiguousarray(y.numpy(), dtype=np.float32)
    index = _faiss_index(ya, method, nlist, hnsw_m, ef_construction, seed)
    idx = np.empty((n, k), dtype=np.int64)
    sim = np.empty((n, k), dtype=np.float32)
    # one call per image: its queries share the selector that excludes its own tokens
    for i in range(n_images):
        sel = faiss.IDSelectorNot(faiss.IDSelectorRange(i * tokens, (i + 1) * tokens))
        if method == "ivf":
            params = faiss.SearchParametersIVF(sel=sel, nprobe=int(nprobe))
        else:
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(int(ef_search), k))
        rows = slice(i * tokens, (i + 1) * tokens)
        D, Ii = index.search(xa[rows], k, params=params)
        sim[rows], idx[rows] = D, Ii
        if progress:
            progress(1)
    sim[idx < 0] = -np.inf
    return torch.from_numpy(idx), torch.from_numpy(sim)


def knn_recall(approx: Tensor, exact: Tensor) -> float:
    """Fraction of the exact neighbour lists ``(N, k)`` found by ``approx`` ``(N, k')`` (``-1``
    entries of ``exact`` are not counted)."""
    a, e = approx.long(), exact.long()
    valid = e >= 0
    hit = (e.unsqueeze(2) == a.unsqueeze(1)).any(2) & valid
    return float(hit.sum()) / max(int(valid.sum()), 1)

