"""Token vectors -> sparse affinity graphs, one per layer (DESIGN §2).

Pure tensor code. For every token the top ``k_intra`` most similar tokens of the *same* image and
the top ``k_inter`` most similar tokens of the *other* images of the batch are kept; self-edges
are removed and similarities at or below ``threshold`` dropped; the result is symmetrised,
``W = (A + Aᵀ) / 2``, and random-walk normalised, ``P = D⁻¹ W``.

Similarities are computed a chunk of rows at a time, so memory grows with ``N·k`` (the graph)
plus ``chunk·N`` (one block of similarities), never with ``N²``.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ldsc.backbones.base import LayerFeatures

#: graph types built from token vectors: (row vectors, column vectors)
PAIRS = {"qk": ("q", "k"), "vv": ("v", "v"), "kk": ("k", "k"), "qq": ("q", "q"), "hidden": ("hidden", "hidden")}


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
        dinv = self.degree.clamp_min(1e-12).rsqrt()
        dinv = torch.where(self.degree > 0, dinv, torch.zeros_like(dinv))
        vals = W.values() * dinv[i] * dinv[j]
        return torch.sparse_coo_tensor(W.indices(), vals, W.shape, check_invariants=False, is_coalesced=True)

    def to(self, device) -> "LayerGraph":
        return LayerGraph(self.name, self.grid, self.n_images, self.W.to(device), self.P.to(device),
                          self.degree.to(device), self.weight)


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
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"kNN graph of {n} tokens", unit="block", leave=False)
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


class KnnGraphBuilder:
    """Builds one sparse kNN graph per layer (per head with ``heads="separate"``).

    Args:
        pair: which vectors to compare: ``qk``, ``vv``, ``kk``, ``qq`` or ``hidden``.
        k_intra, k_inter, threshold: see :func:`knn_affinity`. ``k_inter`` is ignored for a
            batch of one image.
        heads: ``concat`` | ``mean`` | ``separate`` (see :func:`head_vectors`).
        max_chunk_elements: size of one block of similarities (memory knob).
    """

    def __init__(self, pair: str = "qk", k_intra: int = 25, k_inter: int = 25, threshold: float = 0.1,
                 heads: str = "concat", max_chunk_elements: int = 2**24):
        if pair not in PAIRS:
            raise ValueError(f"graph pair must be one of {sorted(PAIRS)}, not {pair!r}")
        self.pair, self.k_intra, self.k_inter = pair, k_intra, k_inter
        self.threshold, self.heads, self.max_chunk_elements = threshold, heads, max_chunk_elements

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
