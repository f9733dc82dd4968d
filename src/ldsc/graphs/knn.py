"""Token vectors -> sparse affinity graphs, one per layer (docs/method.md, Graphs).

Pure tensor code. For every token the top ``k_intra`` most similar tokens of the *same* image and
the top ``k_inter`` most similar tokens of the *other* images of the batch are kept; self-edges
are removed and similarities at or below ``threshold`` dropped; the result is symmetrised,
``W = (A + Aᵀ) / 2``, and random-walk normalised, ``P = D⁻¹ W``.

Similarities are computed a chunk of rows at a time, so memory grows with ``N·k`` (the graph)
plus ``chunk·N`` (one block of similarities), never with ``N²``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

import torch
import torch.nn.functional as F
from torch import Tensor

from ldsc.features.backbones.base import LayerFeatures
from ldsc.graphs.normalize import inverse_sqrt_degree, normalized_values

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

    def sym_blocks(self) -> list[tuple[int, Tensor]]:
        """``S`` as one row block: ``[(0, CSR (N, N))]`` (the interface of :class:`DatasetGraph`)."""
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return [(0, self.sym().to_sparse_csr())]


class DatasetGraph:
    """One layer's graph over every token of a data set, kept as ``S = D^{-1/2} W D^{-1/2}`` in
    row blocks of CSR (so products run block by block, and a block is all a rank needs to hold).

    The nodes may be stored relabelled: with ``order`` given, node ``r`` of the blocks is token
    ``order[r]`` (similar tokens next to each other, so a product reads ``X`` nearly in sequence
    instead of at random: several times faster on large graphs); ``S`` of the tokens themselves is
    ``S_tok = Pᵀ S P`` with ``(P x)[r] = x[order[r]]``. Use :meth:`apply` for ``S_tok Y``.

    A sharded graph (a run on several processes) holds the rows of its ``image_range`` only, in
    token order: its blocks cover those rows (``first_row`` counted from the range's first token)
    and every column; :meth:`apply` then maps ``Y`` of *all* tokens to the range's rows.

    Attributes:
        name, grid, n_images, weight: as :class:`LayerGraph`.
        blocks: ``[(first_row, CSR (rows, N))]`` covering rows ``0..N-1`` in order (sharded: the
            range's rows).
        degree: ``(N,)`` row sums of ``W``, per token (original order).
        order: ``(N,)`` token of each stored node, or ``None`` (stored in token order).
        image_range: ``(first, end)`` images whose rows are held, or ``None`` (all).
    """

    def __init__(self, name: str, grid: tuple[int, int], n_images: int, blocks: list[tuple[int, Tensor]],
                 degree: Tensor, weight: float = 1.0, order: Tensor | None = None, rank: Tensor | None = None,
                 image_range: tuple[int, int] | None = None):
        self.name, self.grid, self.n_images, self.weight = name, tuple(grid), int(n_images), float(weight)
        self.blocks, self.degree, self.order = blocks, degree, order
        self.image_range = None if image_range is None else (int(image_range[0]), int(image_range[1]))
        if self.image_range is not None and order is not None:
            raise ValueError("a sharded graph is stored in token order (order=None)")
        if order is not None and rank is None:
            rank = self.inverse(order)
        self.rank = rank  # rank[token] = its stored node
        #: ``(layer, head, draw)`` the graph was built from (head ``None`` unless ``heads="separate"``)
        self.source: tuple[int, int | None, int] = (0, None, 0)
        #: per token (token order): the similarity a new token must exceed to enter its inter-image
        #: list (:func:`ldsc.graphs.extension.inter_radius`)
        self.radius: Tensor | None = None
        #: the reduction applied to the raw vectors before normalising (``graph.dim``), or ``None``
        self.projection: Tensor | None = None
        #: the fitted ``(x, y)`` unit vectors, kept with ``dataset_graphs(keep_vectors=True)``
        self.vectors: tuple[Tensor, Tensor] | None = None

    @staticmethod
    def inverse(order: Tensor) -> Tensor:
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        return rank

    @property
    def nnz(self) -> int:
        return sum(int(b._nnz()) for _, b in self.blocks)

    def sym_blocks(self) -> list[tuple[int, Tensor]]:
        return self.blocks

    def nbytes(self) -> int:
        """Bytes this graph holds: its CSR blocks, degrees and node order."""
        parts = [t for _, b in self.blocks for t in (b.values(), b.col_indices(), b.crow_indices())]
        parts += [t for t in (self.degree, self.order, self.rank) if t is not None]
        return sum(t.numel() * t.element_size() for t in parts)

    def apply(self, Y: Tensor, blocks: list[tuple[int, Tensor]] | None = None) -> Tensor:
        """``S_tok Y`` for ``Y`` ``(N, m)`` in token order (``blocks``: the same blocks in another
        dtype or device, default :attr:`blocks`)."""
        blocks = self.blocks if blocks is None else blocks
        if self.order is None:
            return sym_apply(blocks, Y)
        return sym_apply(blocks, Y.index_select(0, self.order.to(Y.device))).index_select(0, self.rank.to(Y.device))

    def sym_scipy(self):
        """``S`` as one float64 ``scipy.sparse.csr_matrix`` in token order (for the exact reference)."""
        import scipy.sparse as sp

        if self.image_range is not None and self.image_range != (0, self.n_images):
            raise ValueError(f"graph {self.name} holds only the rows of images {self.image_range} (a sharded run)")
        parts = [sp.csr_matrix((b.values().double().numpy(), b.col_indices().numpy(), b.crow_indices().numpy()),
                               shape=tuple(b.shape)) for _, b in self.blocks]
        S = sp.vstack(parts, format="csr")
        if self.order is not None:
            rank = self.rank.numpy()
            S = S[rank][:, rank]
        return S

    def to(self, device) -> "DatasetGraph":
        return DatasetGraph(self.name, self.grid, self.n_images, [(s, b.to(device)) for s, b in self.blocks],
                            self.degree.to(device), self.weight, None if self.order is None else self.order.to(device),
                            None if self.rank is None else self.rank.to(device), self.image_range)


def sym_apply(blocks: list[tuple[int, Tensor]], Y: Tensor) -> Tensor:
    """``S Y`` for ``S`` in row blocks of CSR (rows: those of the blocks, ``Y``: one per column)."""
    if len(blocks) == 1:
        return blocks[0][1] @ Y
    out = Y.new_empty(blocks[-1][0] + blocks[-1][1].shape[0], Y.shape[1])
    for s, B in blocks:
        out[s:s + B.shape[0]] = B @ Y
    return out


def relabel_lists(idx: Tensor, sim: Tensor, order: Tensor, rank: Tensor | None = None,
                  rows_per_chunk: int = 1 << 16) -> tuple[Tensor, Tensor]:
    """Neighbour lists of tokens -> the same lists with nodes relabelled by ``order`` (node ``r``
    is token ``order[r]``; ``rank`` its inverse, computed when not given): rows permuted, ids
    mapped through the inverse (``-1`` kept)."""
    n = idx.shape[0]
    rank = DatasetGraph.inverse(order) if rank is None else rank
    new_idx, new_sim = torch.empty_like(idx), torch.empty_like(sim)
    for s in range(0, n, rows_per_chunk):
        rows = order[s:s + rows_per_chunk]
        ids = idx[rows].long()
        new_idx[s:s + rows_per_chunk] = torch.where(ids >= 0, rank[ids.clamp_min(0)], -1).to(idx.dtype)
        new_sim[s:s + rows_per_chunk] = sim[rows]
    return new_idx, new_sim


def symmetric_normalized_blocks(idx: Tensor, sim: Tensor, threshold: float = 0.1, block_entries: int = 2**23,
                                free: list | None = None) -> tuple[list[tuple[int, Tensor]], Tensor]:
    """Neighbour lists -> ``S = D^{-1/2} W D^{-1/2}`` in row blocks of CSR.

    ``A`` holds each row's kept similarities (``idx ≥ 0`` and ``sim > threshold``);
    ``W = (A + Aᵀ)/2``. In ``O(nnz)`` time and ``O(N·k)`` memory, one block of rows at a time:
    the lists become compact CSR blocks of ``A``; ``Aᵀ`` is formed directly in the same row blocks
    (entries counted per column, then placed after one sort per block); block ``b`` of ``W`` is
    ``A_b + (Aᵀ)_b``, after which both are freed, so ``A``, ``Aᵀ`` and ``W`` are never all held
    whole at once.

    Args:
        idx: ``(N, k)`` neighbour ids (``-1``: none), any integer dtype; sim: ``(N, k)`` similarities.
        threshold: similarities at or below are dropped.
        block_entries: about this many list entries per block.
        free: a list holding the caller's only references to ``idx`` and ``sim``; it is cleared
            once they are read, so their memory is released before ``Aᵀ`` and ``W`` are formed
            (pass ``free[0], free[1]`` explicitly: ``*free`` would keep them alive).

    Returns:
        ``(blocks, degree)`` with ``blocks = [(first_row, torch CSR (rows, N) float32)]``.
    """
    import scipy.sparse as sp

    from ldsc.profiling import release_free_memory

    n, k = idx.shape
    rows_per_block = max(1, block_entries // max(k, 1))
    starts = list(range(0, n, rows_per_block))
    ends = starts[1:] + [n]
    # 1. A in compact CSR blocks (kept entries only, columns sorted within a row)
    A, colcount = [], np.zeros(n, dtype=np.int64)
    for r0, r1 in zip(starts, ends):
        cols = idx[r0:r1].numpy().astype(np.int32)
        vals = sim[r0:r1].numpy().astype(np.float32)
        keep = (cols >= 0) & (vals > threshold)
        # int32 offsets: scipy would otherwise widen the column indices to int64 (12 bytes an entry, not 8)
        indptr = np.zeros(r1 - r0 + 1, dtype=np.int32 if cols.size < 2**31 else np.int64)
        np.cumsum(keep.sum(1), out=indptr[1:])
        Ab = sp.csr_matrix((vals[keep], cols[keep], indptr), shape=(r1 - r0, n))
        Ab.sort_indices()
        cols_used, counts = np.unique(Ab.indices, return_counts=True)  # O(block), not O(N), per block
        colcount[cols_used] += counts
        A.append(Ab)
        del cols, vals, keep
    if free is not None:
        free.clear()
    del idx, sim
    release_free_memory()  # the per-block temporaries between A's blocks
    # 2. Aᵀ in the same row blocks: entry (r, c, v) of A goes to row c of Aᵀ, after the entries
    #    of earlier blocks of A (so every row of Aᵀ comes out with sorted columns)
    T_ptr = [np.concatenate([[0], np.cumsum(colcount[r0:r1])]) for r0, r1 in zip(starts, ends)]
    T_ptr = [p.astype(np.int32) if p[-1] < 2**31 else p for p in T_ptr]
    T_ind = [np.empty(int(p[-1]), dtype=np.int32) for p in T_ptr]
    T_val = [np.empty(int(p[-1]), dtype=np.float32) for p in T_ptr]
    filled = np.zeros(n, dtype=np.int64)
    bounds = np.asarray(starts + [n])
    for r0, Ab in zip(starts, A):
        rows = (np.repeat(np.arange(Ab.shape[0], dtype=np.int64), np.diff(Ab.indptr)) + r0).astype(np.int32)
        perm = np.argsort(Ab.indices, kind="stable")
        c = Ab.indices[perm]
        first = np.searchsorted(c, c, side="left")
        within = np.arange(c.size) - first  # rank among this block's entries of column c
        offset = filled[c] + within
        heads = np.flatnonzero(first == np.arange(c.size))  # first entry of each column present
        filled[c[heads]] += np.diff(np.append(heads, c.size))
        cut = np.searchsorted(c, bounds)
        for b in range(len(starts)):
            lo, hi = cut[b], cut[b + 1]
            if lo < hi:
                pos = T_ptr[b][c[lo:hi] - starts[b]] + offset[lo:hi]
                T_ind[b][pos] = rows[perm[lo:hi]]
                T_val[b][pos] = Ab.data[perm[lo:hi]]
        del rows, perm, c, first, within, offset, heads, cut
    # 3. W = (A + Aᵀ)/2 block by block, freeing each block of A and Aᵀ once used
    pieces, degree = [], np.zeros(n, dtype=np.float64)
    for b, (r0, r1) in enumerate(zip(starts, ends)):
        ATb = sp.csr_matrix((T_val[b], T_ind[b], T_ptr[b]), shape=(r1 - r0, n))
        B = (A[b] + ATb) * np.float32(0.5)  # sums mutual neighbours
        A[b] = T_val[b] = T_ind[b] = T_ptr[b] = ATb = None
        degree[r0:r1] = np.asarray(B.sum(1)).ravel()
        pieces.append((r0, B))
    del A, T_val, T_ind, T_ptr
    dinv = inverse_sqrt_degree(degree)
    blocks = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for r0, B in pieces:
            rows = np.repeat(np.arange(B.shape[0]), np.diff(B.indptr)) + r0
            B.data = normalized_values(B.data, rows, B.indices, dinv).astype(np.float32)
            blocks.append((r0, torch.sparse_csr_tensor(torch.from_numpy(B.indptr.astype(np.int32)),
                                                       torch.from_numpy(B.indices.astype(np.int32, copy=False)),
                                                       torch.from_numpy(B.data), size=B.shape)))
    return blocks, torch.from_numpy(degree.astype(np.float32))


def sharded_symmetric_normalized(idx: Tensor, sim: Tensor, first_row: int, bounds: list[int],
                                 threshold: float = 0.1, free: list | None = None,
                                 ) -> tuple[list[tuple[int, Tensor]], Tensor]:
    """:func:`symmetric_normalized_blocks` for one process of a sharded run: the neighbour lists of
    rows ``[first_row, first_row + len(idx))`` in, the same rows of ``S = D^{-1/2} W D^{-1/2}``
    out, with ``W = (A + Aᵀ)/2`` over all processes' lists.

    Every kept entry ``(r, c)`` of ``A`` is sent to the process that owns row ``c``
    (``bounds``: ``[0, end_0, ..., N]``, the rows of each process), which adds it to its rows of
    ``Aᵀ`` (all-to-all); the degrees of all rows are then all-gathered (``N`` floats) for the
    normalisation. Memory: a few copies of this process's kept entries, 4-byte ids and values
    (``free``: a list holding the caller's only references to ``idx`` and ``sim``, cleared once
    they are read, as in :func:`symmetric_normalized_blocks`).

    Returns ``([(0, CSR (rows, N) float32)], degree (N,))``.
    """
    import scipy.sparse as sp

    from ldsc.distributed import all_gather_rows, all_to_all_rows
    from ldsc.profiling import release_free_memory

    n_rows, n = idx.shape[0], bounds[-1]
    itype = np.int32 if n < 2**31 else np.int64
    cols, vals = idx.numpy().astype(itype, copy=False), sim.numpy().astype(np.float32, copy=False)
    keep = (cols >= 0) & (vals > threshold)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(keep.sum(1), out=indptr[1:])
    c, v = cols[keep], vals[keep]  # row by row: A in CSR as it stands
    del cols, vals, keep
    if free is not None:
        free.clear()
    del idx, sim
    A = sp.csr_matrix((v, c, indptr), shape=(n_rows, n))
    # the entries for each process's rows of Aᵀ: (column, global row, value), grouped by owner
    r = np.repeat(np.arange(first_row, first_row + n_rows, dtype=itype), np.diff(indptr))
    send_c, send_r, send_v = np.empty_like(c), np.empty_like(r), np.empty_like(v)
    counts, pos = [], 0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        mine = (c >= lo) & (c < hi)
        m = int(mine.sum())
        send_c[pos:pos + m], send_r[pos:pos + m], send_v[pos:pos + m] = c[mine], r[mine], v[mine]
        counts.append(m)
        pos += m
        del mine
    del r
    got = [all_to_all_rows(torch.from_numpy(a), counts).numpy() for a in (send_c, send_r, send_v)]
    del send_c, send_r, send_v
    got[0] -= itype(first_row)
    AT = sp.csr_matrix((got[2], (got[0], got[1])), shape=(n_rows, n))
    del got
    W = (A + AT).tocsr()
    del A, AT, c, v
    release_free_memory()
    W.data *= np.float32(0.5)  # sums mutual neighbours
    W.sort_indices()
    degree = all_gather_rows(torch.from_numpy(np.asarray(W.sum(1), dtype=np.float64).ravel())).numpy()
    dinv = inverse_sqrt_degree(degree)
    step = max(1, 2**22 // max(1, W.nnz // max(1, n_rows)))  # rows per chunk (bounded temporaries)
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        lo, hi = W.indptr[r0], W.indptr[r1]
        rows = np.repeat(np.arange(first_row + r0, first_row + r1, dtype=itype), np.diff(W.indptr[r0:r1 + 1]))
        W.data[lo:hi] = normalized_values(W.data[lo:hi], rows, W.indices[lo:hi], dinv).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        S = torch.sparse_csr_tensor(torch.from_numpy(W.indptr.astype(np.int64 if W.nnz >= 2**31 else np.int32)),
                                    torch.from_numpy(W.indices.astype(np.int32, copy=False)),
                                    torch.from_numpy(W.data), size=W.shape)
    return [(0, S)], torch.from_numpy(degree.astype(np.float32))


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
    """

    def __init__(self, pair: str = "qk", k_intra: int = 25, k_inter: int = 25, threshold: float = 0.1,
                 heads: str = "concat", max_chunk_elements: int = 2**24, search: str = "auto",
                 exact_max_tokens: int = 16384, gpu_exact_max_tokens: int = 1048576, list_size: int = 128,
                 nprobe: int = 12, nlist: int | None = None,
                 hnsw_m: int = 32, ef_search: int = 256, ef_construction: int = 64,
                 dim: int | None = None, reduce: str = "pca", seed: int = 0):
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
        self.dim, self.reduce, self.seed = (int(dim) if dim else None), reduce, int(seed)
        #: seconds per stage of the last :meth:`dataset_graphs` (``vectors``, ``search``, ``symmetrize``)
        self.timings: dict[str, float] = {}
        #: per graph of the last :meth:`dataset_graphs`: tokens, search method, seconds by step, nnz
        self.layer_timings: list[dict] = []

    @property
    def kinds(self) -> list[str]:
        """The vector kinds this graph type compares (what the feature store must hold)."""
        return sorted(set(PAIRS[self.pair]))

    def memory_estimate(self, n_images: int, layers, draws: int, base_size: int, shards: int = 1) -> dict:
        """The peak of building and solving these graphs (:func:`estimate_dataset_graph_bytes`)."""
        k = self.k_intra + (self.k_inter if n_images > 1 else 0)
        return estimate_dataset_graph_bytes(n_images, layers, max(k, 1), draws, self.dim, self.heads,
                                            base_size=base_size, vectors=len(self.kinds), shards=shards,
                                            chunk_elements=self.max_chunk_elements)

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
        per = max(1, 2**22 // max(1, h * w * info["heads"]))  # images per read (~4M vectors rows x heads)
        n_graphs = info["heads"] if self.heads == "separate" else 1
        projections: list = [None] * n_graphs
        if self.dim:
            projections = self._fit_projections(store, layer, draw, n_graphs)
        #: the projections of the last :meth:`layer_vectors`, one per graph (``None``: no reduction)
        self.projections = projections
        out = []
        for kind in dict.fromkeys((a, b)):
            full = None
            for s in range(0, n, per):
                e = min(n, s + per)
                mats = head_vectors(store.vectors(layer, kind, draw, slice(s, e)), self.heads)
                if full is None:
                    d = self.dim or mats[0].shape[1]
                    full = [torch.empty(n * h * w, d) for _ in mats]
                for g, m in enumerate(mats):
                    if projections[g] is not None:
                        m = m @ projections[g]
                    full[g][s * h * w:e * h * w] = F.normalize(m, dim=-1)
            out.append(full)
        xs = out[0]
        ys = out[1] if len(out) > 1 else out[0]
        return list(zip(xs, ys))

    def _fit_projections(self, store, layer: int, draw: int, n_graphs: int) -> list[Tensor]:
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
            if self.dim >= D:
                projs.append(None)
                continue
            if self.reduce == "random":
                projs.append(torch.randn(D, self.dim, generator=gen) / self.dim**0.5)
                continue
            rows = torch.randperm(sample.shape[0], generator=gen)[:200_000]
            _, _, V = torch.linalg.svd(sample[rows], full_matrices=False)
            projs.append(V[: self.dim].T.contiguous())
        return projs

    def dataset_graphs(self, store, base_size: int, progress: bool = True, device=None,
                       keep_vectors: bool = False) -> list["DatasetGraph"]:
        """The graphs of every layer (and draw) of ``store`` over all its images (see class
        docstring); with several draws each layer's graphs are weighted ``w_l / draws``, so the
        operator averages over draws. On a GPU ``device`` the intra-image search and the exact
        inter-image search run there (the other methods on the CPU); the graphs stay on the CPU.
        Each graph also records what new tokens need to join it (:mod:`ldsc.graphs.extension`):
        its source, the inter-image radius of every token, the projection, and with
        ``keep_vectors`` the unit vectors themselves (:class:`ldsc.LDSC` keeps them)."""
        from ldsc.graphs.extension import inter_radius

        import time

        from ldsc.distributed import all_gather_rows, shard, shard_bounds, world_size
        from ldsc.graphs.search import inter_image_knn, intra_image_knn
        from ldsc.profiling import release_free_memory

        graphs, self.timings = [], {"vectors": 0.0, "search": 0.0, "symmetrize": 0.0}
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
                    rank = None
                    lists = [idx, sim]
                    del idx, sim
                    if sharded:  # this process's rows; their transposed entries come from the other processes
                        order = None
                        blocks, degree = sharded_symmetric_normalized(
                            lists[0], lists[1], q0, [b * T for b in shard_bounds(n)], self.threshold, free=lists)
                    else:
                        if order is not None:  # store similar tokens next to each other (cache-local products)
                            rank = DatasetGraph.inverse(order)
                            lists = list(relabel_lists(lists[0], lists[1], order, rank))
                        # (not `*lists`: a starred call keeps its argument tuple, and so both lists, alive
                        # until it returns — 4 GB at 10⁷ tokens held through the whole symmetrisation)
                        blocks, degree = symmetric_normalized_blocks(lists[0], lists[1], self.threshold, free=lists)
                        if order is not None:
                            degree = degree[rank]
                    release_free_memory()
                    self.timings["symmetrize"] += time.perf_counter() - t1
                    name = info["name"] if n_graphs == 1 else f"{info['name']}/head{j}"
                    if store.draws > 1:
                        name = f"{name}@draw{draw}"
                    graphs.append(DatasetGraph(name, (h, w), n, blocks, degree, weight=base_size / h / store.draws,
                                               order=order, rank=rank, image_range=(first, last) if sharded else None))
                    graphs[-1].source = (li, j if n_graphs > 1 else None, draw)
                    graphs[-1].radius, graphs[-1].projection, graphs[-1].vectors = radius, projections[j], kept
                    del kept
                    t2 = time.perf_counter()
                    self.layer_timings.append({
                        "name": name, "tokens": n * T, "rows": q1 - q0, "dim": dims, "search": method,
                        "intra_s": round(t_intra - t0, 3), "inter_s": round(t1 - t_intra, 3),
                        "symmetrize_s": round(t2 - t1, 3), "nnz": graphs[-1].nnz})
                del pairs
        return graphs


def estimate_dataset_graph_bytes(n_images: int, layers: list[dict], k: int, draws: int = 1, dim: int | None = None,
                                 heads: str = "concat", solver_columns: int = 20, base_size: int = 32,
                                 vectors: int = 1, shards: int = 1, chunk_elements: int = 2**24) -> dict:
    """Bytes a whole-data-set run needs at its peak, by part (``N`` tokens of a layer, ``k``
    neighbours per token, lists of ``N·k`` int32 ids + float32 similarities = ``8·N·k`` bytes).

    ``graphs``: every layer's ``S`` (``W`` has about ``1.3·N·k`` entries of 8 bytes: 1.5 is
    assumed) and its node order; ``build``: the largest of building one layer on top of the graphs
    built before it — while searching, its unit vectors (``vectors`` kinds of ``N × dim`` float32,
    and the keys once more in leaf order for the clustered search), its lists and the intra-image
    lists in int64; while relabelling, two copies of the lists; while symmetrising, the lists,
    their transpose and ``W`` (an upper bound: the lists are freed once ``A`` is formed); ``solver``: six ``N_base × columns``
    float32 blocks of LOBPCG plus three of the largest layer for a product. ``peak`` = the larger
    of the build peak and graphs + solver, plus ``PROCESS_BYTES`` for the interpreter, torch and
    Lightning. Layers are built largest first. ``shards``: processes of a sharded run (each holds
    ``1/shards`` of the lists, graphs and solver blocks, but every layer's vectors whole).
    ``chunk_elements``: similarities the intra-image search holds at once (``graph.max_chunk_elements``;
    at least one query row against a whole image: ``T``), with their top-``k`` selection.
    """
    sizes, largest = [], 0
    for info in layers:
        h, w = info["grid"]
        N = n_images * h * w
        largest = max(largest, N)
        per_graph = info["heads"] if heads == "separate" else 1
        D = dim or info.get("dim", 512) * (info["heads"] if heads == "concat" else 1)
        lists = 8 * N * k // shards
        g = int(1.5 * lists) + 16 * N // shards
        T = h * w  # the intra-image search's similarity block: whole images, or query rows of one
        block = max(1, chunk_elements // T) * T if T * T > chunk_elements else \
            min(n_images, max(1, chunk_elements // (T * T))) * T * T
        intra = 3 * 4 * block
        transient = max(N * D * 4 * (vectors + 1) + lists + 6 * N * k + intra, 2 * lists, 2 * lists + g)
        for _ in range(per_graph * draws):
            sizes.append((g, transient))
    sizes.sort(reverse=True)
    graphs, build, before = sum(g for g, _ in sizes), 0, 0
    for g, transient in sizes:
        build = max(build, before + transient)
        before += g
    solver = (6 * n_images * base_size * base_size // shards + 3 * largest) * solver_columns * 4
    return {"graphs": graphs, "build": build, "solver": solver,
            "peak": PROCESS_BYTES + max(build, graphs + solver)}


#: resident memory of a run before any data (interpreter, torch, Lightning, Hydra), measured ~0.7 GB
PROCESS_BYTES = 2**30
