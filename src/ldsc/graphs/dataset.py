"""Whole-data-set graphs: every token of a layer over all images, kept as
``S = D^{-1/2} W D^{-1/2}`` in row blocks of CSR (docs/method.md, Graphs), built from neighbour lists
in ``O(nnz)`` time and ``O(N·k)`` memory — in one process, or sharded over several (each holding its
own images' rows).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from ldsc.graphs.normalize import inverse_sqrt_degree, normalized_values


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
    columns = np.arange(n, dtype=np.int32)
    for r0, Ab in zip(starts, A):
        # the block's entries grouped by column, rows ascending within a column: scipy's CSR->CSC
        # conversion is a counting sort (O(nnz + N)), no comparison sort of the column ids
        Ac = Ab.tocsc()
        ptr, counts = Ac.indptr, np.diff(Ac.indptr)
        c = np.repeat(columns, counts)
        offset = filled[c] + (np.arange(c.size) - ptr[c])  # after earlier blocks' entries of column c
        filled += counts
        rows = Ac.indices.astype(np.int32) + np.int32(r0)
        for b, (lo_col, hi_col) in enumerate(zip(starts, ends)):
            lo, hi = int(ptr[lo_col]), int(ptr[hi_col])
            if lo < hi:
                pos = T_ptr[b][c[lo:hi] - lo_col] + offset[lo:hi]
                T_ind[b][pos] = rows[lo:hi]
                T_val[b][pos] = Ac.data[lo:hi]
        del Ac, ptr, counts, c, offset, rows
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
