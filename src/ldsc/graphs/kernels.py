"""Compiled loops of the graph stage (numba): top-k selection with exclusions, and the
symmetrisation of neighbour lists into CSR.

What these loops do is plain (the ``k`` best per row kept as a sorted list or a heap; a counting sort and a merge of
sorted lists), but written with whole-array torch/numpy operations each needs several passes and
temporaries as large as its input: ``topk`` over a masked copy of a block of similarities, an
argsort of every ``(row, column)`` key of ``A`` and ``Aᵀ``. Here each is one pass over its input,
in parallel over rows (``numba.prange``, as many threads as torch uses), with no temporaries beyond
the output. Compiled on first use and cached on disk (``cache=True``): the first run on a machine
pays the compilation (a few seconds), later runs load it.

Conventions shared with :mod:`ldsc.graphs.search`: similarities are float32, ids int32 or int64,
a missing neighbour is id ``-1`` with similarity ``-inf``; every selection returns each row's
entries by decreasing similarity, ties kept in the order they were met (the lower column first).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import get_num_threads, njit, prange, set_num_threads

NEG_INF = np.float32(-np.inf)


def use_torch_threads() -> None:
    """Run the kernels on as many threads as torch (``torch.set_num_threads`` governs both)."""
    want = max(1, min(torch.get_num_threads(), _max_threads()))
    if get_num_threads() != want:
        set_num_threads(want)


def _max_threads() -> int:
    from numba import config

    return int(config.NUMBA_NUM_THREADS)


#: up to this many kept per row the best are held as a sorted list (an insertion shifts the worse
#: ones down: on 1,024 similarities per row, ~140 insertions, 30 % faster than a heap); beyond it, a heap
SORTED_MAX_K = 48


@njit(inline="always", cache=True)
def _worst(vals, k):
    """The value a candidate must beat to be kept (the last of the sorted list, the heap's root)."""
    return vals[k - 1] if k <= SORTED_MAX_K else vals[0]


@njit(inline="always", cache=True)
def _push(vals, ids, k, v, j):
    """Keep ``(v, j)`` (``v`` beats :func:`_worst`; ``j`` larger than every id kept: columns are met in
    increasing order), dropping the worst: the lowest value, among equal values the latest met."""
    if k <= SORTED_MAX_K:  # sorted by decreasing value, equal values in the order met
        p = k - 1
        while p > 0 and vals[p - 1] < v:
            vals[p] = vals[p - 1]
            ids[p] = ids[p - 1]
            p -= 1
        vals[p] = v
        ids[p] = j
        return
    # min-heap on (value, -id): the root is the worst kept; sift the new entry down from it
    i = 0
    while True:
        left = 2 * i + 1
        if left >= k:
            break
        m = left
        right = left + 1
        if right < k and (vals[right] < vals[left] or (vals[right] == vals[left] and ids[right] > ids[left])):
            m = right
        if vals[m] < v or (vals[m] == v and ids[m] > j):
            vals[i] = vals[m]
            ids[i] = ids[m]
            i = m
        else:
            break
    vals[i] = v
    ids[i] = j


@njit(inline="always", cache=True)
def _finish(vals, ids, k):
    """Order what :func:`_push` kept by decreasing value, ties by increasing id (the heap's case;
    the sorted list already is)."""
    if k <= SORTED_MAX_K:
        return
    for a in range(1, k):  # insertion sort
        v = vals[a]
        j = ids[a]
        b = a - 1
        while b >= 0 and (vals[b] < v or (vals[b] == v and ids[b] > j)):
            vals[b + 1] = vals[b]
            ids[b + 1] = ids[b]
            b -= 1
        vals[b + 1] = v
        ids[b + 1] = j


#: a row's candidates are first looked for at or above the previous row's k-th best minus a margin
#: (similar tokens come one after the other: neighbouring pixels, a leaf's queries); the margin
#: follows how much the k-th best moves from row to row (``MARGIN_FACTOR`` times its running mean
#: change, at least ``MIN_MARGIN``, ``FIRST_MARGIN`` at first); when fewer than k qualify the bar
#: is lowered (4x the margin each time, then the whole row) — the same answer either way
FIRST_MARGIN = np.float32(0.05)
MIN_MARGIN = np.float32(1e-3)
MARGIN_FACTOR = np.float32(3.0)


@njit(inline="always", cache=True)
def _at_least(row, C, bar, buf):
    """Columns of ``row`` with a value at or above ``bar`` into ``buf`` (in order; no branch per
    column: every column is written, the count only advances past the ones that qualify)."""
    c = 0
    for j in range(C):
        buf[c] = j
        c += row[j] >= bar
    return c


@njit(inline="always", cache=True)
def _new_guess():
    """The state :func:`_best_of_row` carries from row to row: ``[k-th best, margin, mean change]``."""
    state = np.empty(3, dtype=np.float32)
    state[0] = NEG_INF
    state[1] = FIRST_MARGIN
    state[2] = FIRST_MARGIN / MARGIN_FACTOR
    return state


@njit(inline="always", cache=True)
def _best_of_row(row, k, group, pos, mine, state, vals, ids, buf):
    """The ``k`` best columns ``j`` of ``row`` with ``group[pos[j]] != mine`` into ``vals`` /
    ``ids`` (by :func:`_push`'s rule; ``-inf`` / ``-1`` where fewer qualify): first among the
    columns at or above the previous row's k-th best minus the margin (``state``, updated here for
    the next row: see :data:`FIRST_MARGIN`), with a lower bar while fewer than ``k`` of those
    qualify, at last the whole row. Any column left out is below the bar, hence below the k
    found: the answer is the full scan's."""
    C = row.shape[0]
    guess = state[0]
    step = state[1]
    bar = guess - step if guess > NEG_INF else NEG_INF
    tries = 0
    while True:
        vals[:] = NEG_INF
        ids[:] = -1
        if bar > NEG_INF:
            for a in range(_at_least(row, C, bar, buf)):
                j = buf[a]
                v = row[j]
                if v > _worst(vals, k) and group[pos[j]] != mine:
                    _push(vals, ids, k, v, j)
            if _worst(vals, k) > NEG_INF:
                break
            tries += 1
            step *= np.float32(4.0)
            bar = guess - step if tries < 4 else NEG_INF
        else:
            for j in range(C):
                v = row[j]
                if v > _worst(vals, k) and group[pos[j]] != mine:
                    _push(vals, ids, k, v, j)
            break
    _finish(vals, ids, k)
    kth = vals[k - 1]
    if kth > NEG_INF:
        if guess > NEG_INF:  # the margin follows the k-th best's running mean change
            change = abs(kth - guess)
            state[2] = np.float32(0.875) * state[2] + np.float32(0.125) * change
            state[1] = max(MIN_MARGIN, MARGIN_FACTOR * state[2])
        state[0] = kth
    return kth


@njit(nogil=True, cache=True)
def _intra_topk(S, k, first_image, tokens, row0, out_idx, out_sim):
    """Per image ``b`` of ``S`` ``(B, T, T)`` and query row ``t``: the ``k`` largest ``S[b, t, j]``
    with ``j != row0 + t`` (its own token), written to ``out_*[b·T + t]`` as global token ids
    ``(first_image + b)·tokens + j``."""
    B, R, C = S.shape
    vals = np.empty(k, dtype=np.float32)
    ids = np.empty(k, dtype=np.int64)
    buf = np.empty(C, dtype=np.int32)
    cols = np.arange(C)  # a column is its own group: the own token's column is skipped
    state = _new_guess()  # the previous row's k-th best and the margin below it
    for r in range(B * R):
        b = r // R
        t = r - b * R
        _best_of_row(S[b, t], k, cols, cols, row0 + t, state, vals, ids, buf)
        base = (first_image + b) * tokens
        for a in range(k):
            out_sim[r, a] = vals[a]
            out_idx[r, a] = ids[a] + base if ids[a] >= 0 else -1


def intra_topk(S: torch.Tensor, k: int, first_image: int, tokens: int, row0: int,
               out_idx: torch.Tensor, out_sim: torch.Tensor) -> None:
    """Top ``k`` of each row of a block of intra-image similarities ``S`` ``(B, R, T)`` (rows
    ``row0 .. row0 + R`` of images ``first_image ..``), the row's own token excluded, into the
    ``(B·R, k)`` views ``out_idx`` / ``out_sim`` (global token ids, by decreasing similarity).
    One thread, without the GIL: the intra-image search calls it from several threads."""
    _intra_topk(S.numpy(), int(k), int(first_image), int(tokens), int(row0), out_idx.numpy(), out_sim.numpy())


@njit(nogil=True, cache=True)
def _masked_topk(S, q, tokens, q0, pos, k_img, key_ids, k, out_idx, out_sim):
    """Per query row ``r`` of ``S`` ``(Q, C)`` (query token ``q[r]``): the ``k`` largest ``S[r, j]``
    over the keys of other images (column ``j`` is the key at position ``pos[j]``: image
    ``k_img[pos[j]] != q[r] // tokens``), written to row ``q[r] - q0`` as ``key_ids[pos[j]]``."""
    Q, C = S.shape
    vals = np.empty(k, dtype=np.float32)
    ids = np.empty(k, dtype=np.int64)
    buf = np.empty(C, dtype=np.int32)
    state = _new_guess()  # the previous row's k-th best and the margin below it
    for r in range(Q):
        _best_of_row(S[r], k, k_img, pos, q[r] // tokens, state, vals, ids, buf)
        o = q[r] - q0
        for a in range(k):
            out_sim[o, a] = vals[a]
            out_idx[o, a] = key_ids[pos[ids[a]]] if ids[a] >= 0 else -1


def masked_topk(S: torch.Tensor, q: torch.Tensor, tokens: int, q0: int, pos: torch.Tensor, k_img: torch.Tensor,
                key_ids: torch.Tensor, k: int, out_idx: torch.Tensor, out_sim: torch.Tensor) -> None:
    """Top ``k`` of each row of ``S`` ``(Q, C)`` among the columns of *other* images: row ``r``
    is query token ``q[r]`` (image ``q[r] // tokens``), column ``j`` the key at position
    ``pos[j]`` of ``k_img`` (its image) and ``key_ids`` (its id). Written into rows ``q - q0`` of
    ``out_idx`` / ``out_sim`` (``-1`` / ``-inf`` where fewer than ``k`` columns qualify). One
    thread, without the GIL: the clustered search calls it from several threads, a leaf each."""
    _masked_topk(S.numpy(), q.numpy(), int(tokens), int(q0), pos.numpy(), k_img.numpy(), key_ids.numpy(), int(k),
                 out_idx.numpy(), out_sim.numpy())


@njit(nogil=True, cache=True)
def _leaf_candidates(scores, nprobe, cap, cands, starts):
    votes = np.zeros(scores.shape[1], dtype=np.int64)
    vals = np.empty(nprobe, dtype=np.float32)
    ids = np.empty(nprobe, dtype=np.int64)
    for r in range(scores.shape[0]):  # each query's nprobe best leaves (ties: the nearer)
        vals[:] = NEG_INF
        ids[:] = -1
        row = scores[r]
        for j in range(row.shape[0]):
            if row[j] > _worst(vals, nprobe):
                _push(vals, ids, nprobe, row[j], j)
        for a in range(nprobe):
            if ids[a] >= 0:
                votes[ids[a]] += 1
    picked = np.empty(votes.shape[0], dtype=np.int64)
    n = 0
    for j in range(votes.shape[0]):
        if votes[j] > 0:
            picked[n] = j
            n += 1
    if n > cap:  # the cap most voted, most votes first (ties: the nearer leaf)
        n = cap
        for a in range(cap):
            best = -1
            for j in range(votes.shape[0]):
                if votes[j] > 0 and (best < 0 or votes[j] > votes[best]):
                    best = j
            picked[a] = best
            votes[best] = 0
    total = 0
    for a in range(n):
        leaf = cands[picked[a]]
        total += starts[leaf + 1] - starts[leaf]
    pos = np.empty(total, dtype=np.int64)
    at = 0
    for a in range(n):
        leaf = cands[picked[a]]
        for p in range(starts[leaf], starts[leaf + 1]):
            pos[at] = p
            at += 1
    return pos


def leaf_candidates(scores: torch.Tensor, nprobe: int, cap: int, cands: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """The keys a leaf's queries are scored against, as positions in leaf order: each query
    (a row of ``scores``, its similarity with the candidate leaves ``cands``) votes for its
    ``nprobe`` most similar leaves; the leaves voted for (in ``cands`` order), or when more than
    ``cap`` the ``cap`` most voted (most votes first, ties: the earlier in ``cands``), each
    contributing its positions ``starts[leaf] .. starts[leaf + 1]``. One thread, without the GIL."""
    return torch.from_numpy(_leaf_candidates(scores.numpy(), int(min(nprobe, scores.shape[1])), int(cap), cands.numpy(),
                                             starts.numpy()))


# -- symmetrisation: neighbour lists -> CSR of W = (A + Aᵀ)/2 --------------------------------------

@njit(parallel=True, nogil=True, cache=True)
def _sort_rows(idx, sim, threshold, sentinel, kept):
    """In place: each row of the lists sorted by id, dropped entries (id < 0 or similarity at or
    below ``threshold``) given id ``sentinel`` (> every id) and moved to the end; ``kept[r]`` counts
    the rest. Duplicate ids in a row stay (they are summed later)."""
    n, k = idx.shape
    for r in prange(n):
        c = 0
        for a in range(k):
            if idx[r, a] < 0 or not sim[r, a] > threshold:
                idx[r, a] = sentinel
            else:
                c += 1
        kept[r] = c
        for a in range(1, k):  # insertion sort by id (k is small)
            j = idx[r, a]
            v = sim[r, a]
            b = a - 1
            while b >= 0 and idx[r, b] > j:
                idx[r, b + 1] = idx[r, b]
                sim[r, b + 1] = sim[r, b]
                b -= 1
            idx[r, b + 1] = j
            sim[r, b + 1] = v


@njit(parallel=True, nogil=True, cache=True)
def _transpose(idx, sim, kept, n, parts):
    """``Aᵀ`` in CSR from the sorted lists: ``(ptr, rows, vals)``, each row's entries in increasing
    row order. A counting sort in ``parts`` bands of rows at once: each band counts its entries
    per column, a pass over the columns turns the counts into each band's first slot (band 0's
    rows before band 1's), and each band fills its slots row by row."""
    m = idx.shape[0]
    counts = np.zeros((parts, n), dtype=np.int64)
    for c in prange(parts):
        for r in range(c * m // parts, (c + 1) * m // parts):
            for a in range(kept[r]):
                counts[c, idx[r, a]] += 1
    ptr = np.zeros(n + 1, dtype=np.int64)
    p = 0
    for col in range(n):
        ptr[col] = p
        for c in range(parts):
            here = counts[c, col]
            counts[c, col] = p
            p += here
    ptr[n] = p
    rows = np.empty(p, dtype=np.int32)
    vals = np.empty(p, dtype=np.float32)
    for c in prange(parts):
        for r in range(c * m // parts, (c + 1) * m // parts):
            for a in range(kept[r]):
                col = idx[r, a]
                q = counts[c, col]
                rows[q] = r
                vals[q] = sim[r, a]
                counts[c, col] = q + 1
    return ptr, rows, vals


@njit(parallel=True, nogil=True, cache=True)
def _merged_lengths(idx, kept, tptr, trows, out_len):
    """Entries of each row of ``A + Aᵀ``: the union of two sorted id lists (duplicates within one list counted once)."""
    n = idx.shape[0]
    for r in prange(n):
        a, na = 0, kept[r]
        b, nb = tptr[r], tptr[r + 1]
        count, last = 0, -1
        while a < na or b < nb:
            if b >= nb or (a < na and idx[r, a] <= trows[b]):
                c = idx[r, a]
                a += 1
            else:
                c = trows[b]
                b += 1
            if c != last:
                count += 1
                last = c
        out_len[r] = count


@njit(parallel=True, nogil=True, cache=True)
def _merge_fill(idx, sim, kept, tptr, trows, tvals, optr, oind, oval, degree):
    """Row ``r`` of ``W = (A + Aᵀ)/2`` into ``oind/oval[optr[r]:optr[r+1]]`` (ids increasing,
    equal ids summed) and its row sum into ``degree[r]`` (float64)."""
    n = idx.shape[0]
    for r in prange(n):
        a, na = 0, kept[r]
        b, nb = tptr[r], tptr[r + 1]
        p = optr[r] - 1
        last = -1
        d = 0.0
        while a < na or b < nb:
            if b >= nb or (a < na and idx[r, a] <= trows[b]):
                c = idx[r, a]
                v = sim[r, a]
                a += 1
            else:
                c = trows[b]
                v = tvals[b]
                b += 1
            half = np.float32(0.5) * v
            if c != last:
                p += 1
                oind[p] = c
                oval[p] = half
                last = c
            else:
                oval[p] += half
            d += half
        degree[r] = d


@njit(parallel=True, nogil=True, cache=True)
def _normalize(optr, oind, oval, dinv):
    """``w_ij d_i^{-1/2} d_j^{-1/2}`` in place (the formula of :func:`ldsc.graphs.normalize.normalized_values`)."""
    n = optr.shape[0] - 1
    for r in prange(n):
        s = dinv[r]
        for p in range(optr[r], optr[r + 1]):
            oval[p] = np.float32(oval[p] * s * dinv[oind[p]])


def symmetrize_lists(idx: np.ndarray, sim: np.ndarray, threshold: float, free: list | None = None):
    """Neighbour lists ``(N, k)`` -> CSR of ``S = D^{-1/2} W D^{-1/2}``, ``W = (A + Aᵀ)/2``:
    ``(indptr int32|int64, indices int32, values float32, degree float64)``.

    ``A`` holds each row's entries with id ≥ 0 and similarity above ``threshold`` (a pair listed
    twice in one row counts twice). The lists are sorted in place (they are the caller's to
    give up: ``free``, a list holding its only references, is cleared once they are read).
    Memory: the lists, ``Aᵀ`` (8 bytes an entry) and the result; time ``O(N·k)``.
    """
    from ldsc.graphs.normalize import inverse_sqrt_degree

    use_torch_threads()
    n, k = idx.shape
    idx = idx if idx.dtype == np.int32 and n < 2**31 - 1 else idx.astype(np.int64)
    sim = np.ascontiguousarray(sim, dtype=np.float32)
    kept = np.empty(n, dtype=np.int64)
    _sort_rows(idx, sim, np.float32(threshold), idx.dtype.type(n), kept)
    # (bands: one per thread, at most 8: each holds a count per column)
    tptr, trows, tvals = _transpose(idx, sim, kept, n, max(1, min(get_num_threads(), 8, n // 4096)))
    lengths = np.empty(n, dtype=np.int64)
    _merged_lengths(idx, kept, tptr, trows, lengths)
    total = int(lengths.sum())
    optr = np.zeros(n + 1, dtype=np.int32 if total < 2**31 else np.int64)
    np.cumsum(lengths, out=optr[1:])
    del lengths
    oind = np.empty(total, dtype=np.int32)
    oval = np.empty(total, dtype=np.float32)
    degree = np.empty(n, dtype=np.float64)
    _merge_fill(idx, sim, kept, tptr, trows, tvals, optr, oind, oval, degree)
    if free is not None:
        free.clear()
    del idx, sim, kept, tptr, trows, tvals
    _normalize(optr, oind, oval, inverse_sqrt_degree(degree))
    return optr, oind, oval, degree


def load_symmetrize_kernels() -> None:
    """Load (or compile) the loops of :func:`symmetrize_lists` and :func:`relabel_in_place` for
    the builder's lists (int32 ids, float32 similarities) on a few rows, in the calling thread:
    a thread that runs them afterwards then only runs them (no import, no compilation)."""
    n = 8
    idx = (np.arange(n * 2, dtype=np.int32).reshape(n, 2) + 1) % n
    sim = np.full((n, 2), 0.5, dtype=np.float32)
    order = np.arange(n, dtype=np.int64)
    relabel_in_place(idx, sim, order, order)
    symmetrize_lists(idx, sim, 0.1)
    from ldsc.graphs.dataset import csr_tensor

    csr_tensor(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([1.0]), (1, 1))  # torch's once-only warnings, here


# -- the clustered search's tree: a vector's leaf ---------------------------------------------------

@njit(parallel=True, nogil=True, cache=True)
def _rows_topk(S, k, out_idx):
    """Column ids of the ``k`` largest entries of each row of ``S`` ``(R, C)``, largest first."""
    R, C = S.shape
    step = 256
    cols = np.arange(C)  # (no column excluded: no group equals -1)
    for c in prange((R + step - 1) // step):  # bands of rows: one buffer each
        vals = np.empty(k, dtype=np.float32)
        ids = np.empty(k, dtype=np.int64)
        buf = np.empty(C, dtype=np.int32)
        state = _new_guess()  # the previous row's k-th best (rows of neighbouring tokens are alike)
        for r in range(c * step, min(R, (c + 1) * step)):
            _best_of_row(S[r], k, cols, cols, -1, state, vals, ids, buf)
            for a in range(k):
                out_idx[r, a] = ids[a]


def rows_topk(S: torch.Tensor, k: int) -> torch.Tensor:
    """``S.topk(k, dim=1).indices`` (int64; ``-1`` for ``-inf`` entries) in one compiled pass."""
    use_torch_threads()
    out = torch.empty(S.shape[0], k, dtype=torch.long)
    _rows_topk(S.numpy(), int(k), out.numpy())
    return out


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def _best_child(v, beam, first, count, cents, out):
    """Per row of ``v`` ``(R, d)``: the most similar child (a row of ``cents``) of its ``beam``
    nodes (``-1``: none); children of node ``p`` are ``first[p] .. first[p] + count[p]``."""
    R, d = v.shape
    for r in prange(R):
        best = NEG_INF
        arg = -1
        x = v[r]
        for a in range(beam.shape[1]):
            p = beam[r, a]
            if p < 0:
                continue
            for c in range(first[p], first[p] + count[p]):
                s = np.float32(0.0)
                cc = cents[c]
                for t in range(d):
                    s += x[t] * cc[t]
                if s > best:
                    best = s
                    arg = c
        out[r] = arg


def best_child(v: torch.Tensor, beam: torch.Tensor, first: torch.Tensor, count: torch.Tensor,
               cents: torch.Tensor) -> torch.Tensor:
    """The last step of the tree's beam search: each row's most similar child of its beam nodes
    (int64 ids into ``cents``), the dot products computed in place (no gathered copies of the rows
    per parent, no scatter of partial maxima)."""
    use_torch_threads()
    out = torch.empty(v.shape[0], dtype=torch.long)
    _best_child(v.contiguous().numpy(), beam.numpy(), first.numpy(), count.numpy(), cents.contiguous().numpy(),
                out.numpy())
    return out


# -- relabelling neighbour lists (the clustered search's leaf order) ---------------------------------

@njit(nogil=True, cache=True)
def _permute_rows(idx, sim, order):
    """In place: row ``r`` becomes the old row ``order[r]`` (both arrays), by following the
    permutation's cycles with one row held aside (no copy of the lists)."""
    n, k = idx.shape
    done = np.zeros(n, dtype=np.bool_)
    ti = np.empty(k, dtype=idx.dtype)
    ts = np.empty(k, dtype=sim.dtype)
    for i in range(n):
        if done[i]:
            continue
        ti[:] = idx[i]
        ts[:] = sim[i]
        j = i
        while True:
            done[j] = True
            src = order[j]
            if src == i:
                idx[j] = ti
                sim[j] = ts
                break
            idx[j] = idx[src]
            sim[j] = sim[src]
            j = src


@njit(parallel=True, nogil=True, cache=True)
def _map_ids(idx, rank):
    n, k = idx.shape
    for r in prange(n):
        for a in range(k):
            if idx[r, a] >= 0:
                idx[r, a] = rank[idx[r, a]]


def relabel_in_place(idx: np.ndarray, sim: np.ndarray, order: np.ndarray, rank: np.ndarray) -> None:
    """Neighbour lists of tokens -> the lists of the nodes ``order`` (node ``r`` is token
    ``order[r]``; ``rank`` its inverse), in place: rows permuted, ids mapped (``-1`` kept)."""
    use_torch_threads()
    _permute_rows(idx, sim, order)
    _map_ids(idx, rank)
