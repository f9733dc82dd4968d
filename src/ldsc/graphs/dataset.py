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

    def apply(self, Y: Tensor, blocks: list[tuple[int, Tensor]] | None = None, work: Workspace | None = None) -> Tensor:
        """``S_tok Y`` for ``Y`` ``(N, m)`` in token order (``blocks``: the same blocks in another
        dtype or device, default :attr:`blocks`). With ``work``, the node-order copies, the product
        and the result are that workspace's blocks, reused from call to call (the result is valid
        until the next call with the same workspace)."""
        blocks = self.blocks if blocks is None else blocks
        if self.order is None:
            rows = blocks[-1][0] + blocks[-1][1].shape[0]
            return sym_apply(blocks, Y, out=None if work is None else work.get("out", Y, rows))
        if work is None:
            return sym_apply(blocks, Y.index_select(0, self.order.to(Y.device))).index_select(0, self.rank.to(Y.device))
        nodes = torch.index_select(Y, 0, self.order.to(Y.device), out=work.get("nodes", Y))
        product = sym_apply(blocks, nodes, out=work.get("product", Y))
        return torch.index_select(product, 0, self.rank.to(Y.device), out=work.get("out", Y))

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


class Workspace:
    """Blocks reused from one product to the next (:meth:`DatasetGraph.apply`, the solver's
    operator): a new block of tens of MB is faulted in and zeroed by the kernel page by page on
    every touch, ~20 % of a solver iteration's time at 10⁶ tokens (docs/benchmarks.md)."""

    def __init__(self):
        self._blocks: dict = {}

    def get(self, key: str, like: Tensor, rows: int | None = None) -> Tensor:
        """The block named ``key`` with ``like``'s columns, dtype and device (``rows``: default
        ``like``'s), allocated on first use (contents undefined). Blocks are told apart by name and
        shape: graphs of the same size share theirs (a product is used before the next one)."""
        shape = (like.shape[0] if rows is None else int(rows), *like.shape[1:])
        slot = (key, shape, like.dtype, like.device)
        t = self._blocks.get(slot)
        if t is None:
            t = self._blocks[slot] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return t

    def clear(self) -> None:
        """Let go of every block (they are allocated again on next use)."""
        self._blocks.clear()


def sym_apply(blocks: list[tuple[int, Tensor]], Y: Tensor, out: Tensor | None = None) -> Tensor:
    """``S Y`` for ``S`` in row blocks of CSR (rows: those of the blocks, ``Y``: one per column),
    into ``out`` when given (``addmm`` with ``β = 0``: no temporary, whatever ``out`` held)."""
    rows = blocks[-1][0] + blocks[-1][1].shape[0]
    if out is None:
        if len(blocks) == 1:
            return blocks[0][1] @ Y
        out = Y.new_empty(rows, Y.shape[1])
    elif tuple(out.shape) != (rows, Y.shape[1]) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous block of shape {(rows, Y.shape[1])}, not {tuple(out.shape)}")
    for s, B in blocks:
        part = out[s:s + B.shape[0]]  # (rows of a contiguous block: contiguous)
        torch.addmm(part, B, Y, beta=0, out=part)
    return out


def relabel_lists(idx: Tensor, sim: Tensor, order: Tensor, rank: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Neighbour lists of tokens -> the same lists with nodes relabelled by ``order`` (node ``r``
    is token ``order[r]``; ``rank`` its inverse, computed when not given): rows permuted, ids
    mapped through the inverse (``-1`` kept). **In place** (the permutation's cycles are followed
    with one row held aside: no second copy of the lists, 4 GB at 10⁷ tokens); returns ``(idx, sim)``."""
    from ldsc.graphs.kernels import relabel_in_place

    rank = DatasetGraph.inverse(order) if rank is None else rank
    relabel_in_place(idx.numpy(), sim.numpy(), order.numpy(), rank.numpy())
    return idx, sim


def symmetric_normalized_blocks(idx: Tensor, sim: Tensor, threshold: float = 0.1,
                                free: list | None = None) -> tuple[list[tuple[int, Tensor]], Tensor]:
    """Neighbour lists -> ``S = D^{-1/2} W D^{-1/2}`` as one block of CSR.

    ``A`` holds each row's kept similarities (``idx ≥ 0`` and ``sim > threshold``);
    ``W = (A + Aᵀ)/2``. In ``O(nnz)`` time by the compiled loops of :mod:`ldsc.graphs.kernels`:
    each row's list sorted in place, ``Aᵀ`` by a counting sort (its rows come out sorted), each
    row of ``W`` the merge of the two sorted lists; memory: the lists, ``Aᵀ`` and ``W``
    (at 10⁶ tokens and 50 neighbours 1.9 s where a sort of every entry's key took 5.6 s).

    Args:
        idx: ``(N, k)`` neighbour ids (``-1``: none), any integer dtype; sim: ``(N, k)`` similarities.
            Both are overwritten (sorted by id).
        threshold: similarities at or below are dropped.
        free: a list holding the caller's only references to ``idx`` and ``sim``; it is cleared
            once they are read, so their memory is released before the normalisation
            (pass ``free[0], free[1]`` explicitly: ``*free`` would keep them alive).

    Returns:
        ``(blocks, degree)`` with ``blocks = [(0, torch CSR (N, N) float32)]``.
    """
    from ldsc.graphs.kernels import symmetrize_lists

    arrays = [idx.numpy(), sim.numpy()]
    if free is not None:
        free.clear()
    del idx, sim
    indptr, indices, values, degree = symmetrize_lists(arrays[0], arrays[1], threshold, free=arrays)
    n = indptr.shape[0] - 1
    wide = indptr.dtype == np.int64  # beyond 2³¹ entries: torch wants both index arrays in int64
    S = csr_tensor(torch.from_numpy(indptr), torch.from_numpy(indices.astype(np.int64) if wide else indices),
                   torch.from_numpy(values), (n, n))
    return [(0, S)], torch.from_numpy(degree.astype(np.float32))


def csr_tensor(indptr: Tensor, indices: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """``torch.sparse_csr_tensor`` without torch's once-per-process "CSR support is in beta" /
    "invariant checks" warnings: silenced in the main thread; other threads (the graphs'
    background symmetrisation) do not touch the process's warning filters, which
    ``warnings.catch_warnings`` would replace under the main thread's feet — the main thread
    makes one first (:func:`ldsc.graphs.kernels.load_symmetrize_kernels`), so torch is silent then."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return torch.sparse_csr_tensor(indptr, indices, values, size=size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(indptr, indices, values, size=size)


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
