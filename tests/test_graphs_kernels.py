"""The compiled loops of the graph stage (ldsc.graphs.kernels) against their definitions written
with plain torch operations."""

import numpy as np
import pytest
import torch

from ldsc.graphs import kernels


def test_intra_topk_equals_topk_without_the_own_token():
    g = torch.Generator().manual_seed(0)
    B, R, T, k = 3, 5, 12, 4
    S = torch.randn(B, R, T, generator=g)  # rows 2..6 of each of 3 images (no ties: continuous values)
    idx = torch.empty(B * R, k, dtype=torch.int32)
    sim = torch.empty(B * R, k)
    kernels.intra_topk(S, k, 7, T, 2, idx, sim)
    ref = S.clone()
    r = torch.arange(R)
    ref[:, r, r + 2] = float("-inf")
    v, j = ref.topk(k, dim=2)
    assert torch.equal(sim, v.reshape(-1, k))
    assert torch.equal(idx.long(), (j + (torch.arange(7, 7 + B) * T).view(-1, 1, 1)).reshape(-1, k))


def _check_intra_against_a_stable_sort(S, k):
    """``intra_topk`` of whole images ``S`` (B, T, T) equals a stable descending sort's first ``k``
    with the own token excluded; returns (the masked similarities, the sort's columns)."""
    B, T, _ = S.shape
    idx = torch.empty(B * T, k, dtype=torch.int64)
    sim = torch.empty(B * T, k)
    kernels.intra_topk(S, k, 0, T, 0, idx, sim)
    ref = S.clone()
    r = torch.arange(T)
    ref[:, r, r] = float("-inf")
    v, j = ref.sort(dim=2, descending=True, stable=True)
    assert torch.equal(sim, v[..., :k].reshape(-1, k))
    assert torch.equal(idx, (j[..., :k] + (torch.arange(B) * T).view(-1, 1, 1)).reshape(-1, k))
    return ref, j


@pytest.mark.parametrize("k", [5, kernels.SORTED_MAX_K + 7])  # the sorted-list path and the heap path
def test_selection_keeps_the_lower_column_among_equal_similarities(k):
    """Quantised similarities (many ties, also at the k-th place): each row's k best by decreasing
    value, equal values by increasing column — a stable sort's first k, own token excluded."""
    g = torch.Generator().manual_seed(3)
    B, T = 2, 90
    S = (torch.rand(B, T, T, generator=g) * 8).floor() / 8
    ref, j = _check_intra_against_a_stable_sort(S, k)
    cols = kernels.rows_topk(ref.reshape(-1, T).contiguous(), k)
    assert torch.equal(cols, j[..., :k].reshape(-1, k))


def test_selection_is_the_same_whether_the_previous_row_guesses_right_or_not():
    """Each row is first searched among the columns near the previous row's k-th best: rows alike
    (the guess holds) and rows of alternating scale (it fails every other row, and the row is
    scanned in full) give the definition's answer, in all three selections."""
    g = torch.Generator().manual_seed(5)
    B, T, k = 2, 300, 7
    base = torch.rand(T, generator=g)
    alike = (base + 0.01 * torch.rand(B, T, T, generator=g)).contiguous()
    unlike = torch.rand(B, T, T, generator=g) * torch.tensor([1.0, 0.3]).repeat(T // 2).view(1, T, 1)
    for S in (alike, unlike):
        _check_intra_against_a_stable_sort(S, k)
        rows = S.reshape(-1, T)[:T]  # one image's rows as leaf queries; keys of 3 images, the query's own masked
        k_img = torch.arange(T) % 3
        out_i = torch.empty(T, k, dtype=torch.int64)
        out_s = torch.empty(T, k)
        kernels.masked_topk(rows.contiguous(), torch.arange(T), T, 0, torch.arange(T), k_img, torch.arange(T), k,
                            out_i, out_s)
        masked = rows.clone()
        masked[:, k_img == 0] = float("-inf")
        v, j = masked.sort(dim=1, descending=True, stable=True)
        assert torch.equal(out_s, v[:, :k]) and torch.equal(out_i, j[:, :k])
        # the tree's first level: each row's k best columns, nothing masked
        assert torch.equal(kernels.rows_topk(rows.contiguous(), k), rows.sort(dim=1, descending=True, stable=True)[1][:, :k])


def test_masked_topk_skips_own_image_keys_and_pads_short_rows():
    """Queries are tokens (image = id // tokens, output row = id - q0); columns are keys at
    positions `pos` of the per-position image and id arrays."""
    g = torch.Generator().manual_seed(1)
    Q, C, k, tokens, q0 = 6, 9, 3, 10, 20
    S = torch.randn(Q, C, generator=g)
    q = torch.tensor([25, 21, 30, 34, 45, 59])  # images 2, 2, 3, 3, 4, 5; output rows 5, 1, 10, 14, 25, 39
    pos = torch.tensor([8, 7, 6, 5, 4, 3, 2, 1, 0])
    k_img_at = torch.tensor([4, 4, 4, 4, 3, 3, 2, 2, 2])  # by position: column j's image is k_img_at[pos[j]]
    ids_at = torch.arange(100, 109)
    idx = torch.full((40, k), 7, dtype=torch.int64)
    sim = torch.zeros(40, k)
    kernels.masked_topk(S, q, tokens, q0, pos, k_img_at, ids_at, k, idx, sim)
    col_img, col_id = k_img_at[pos], ids_at[pos]
    for r in range(Q):
        allowed = (col_img != q[r] // tokens).nonzero().squeeze(1)
        vals, order = S[r, allowed].sort(descending=True)
        want_v = torch.full((k,), float("-inf"))
        want_i = torch.full((k,), -1)
        n = min(k, allowed.numel())
        want_v[:n], want_i[:n] = vals[:n], col_id[allowed[order[:n]]]
        assert torch.equal(sim[q[r] - q0], want_v) and torch.equal(idx[q[r] - q0], want_i)


@pytest.mark.parametrize("cap", [2, 4, 100])
def test_leaf_candidates_are_the_leaves_the_queries_vote_for(cap):
    """Each query votes for its nprobe most similar candidate leaves; the voted leaves (in the
    candidates' order), or the cap most voted (most votes first, ties: the earlier candidate),
    give their keys' positions in leaf order."""
    g = torch.Generator().manual_seed(6)
    nprobe, n_leaves = 2, 12
    sizes = torch.randint(0, 5, (n_leaves,), generator=g)
    starts = torch.zeros(n_leaves + 1, dtype=torch.long)
    starts[1:] = sizes.cumsum(0)
    cands = torch.tensor([3, 0, 7, 11, 5, 9])
    scores = torch.rand(40, cands.numel(), generator=g)
    pos = kernels.leaf_candidates(scores, nprobe, cap, cands, starts)
    votes = torch.bincount(scores.topk(nprobe, 1).indices.reshape(-1), minlength=cands.numel())
    voted = (votes > 0).nonzero().squeeze(1).tolist()
    if len(voted) > cap:
        voted = sorted(voted, key=lambda c: (-int(votes[c]), c))[:cap]
    want = [p for c in voted for p in range(int(starts[cands[c]]), int(starts[cands[c] + 1]))]
    assert pos.tolist() == want


def test_symmetrize_lists_equals_the_dense_definition():
    """W = (A + Aᵀ)/2 with A the kept entries (id ≥ 0, similarity > threshold; an id listed twice
    counts twice), S = D^-1/2 W D^-1/2, as CSR with sorted columns."""
    g = torch.Generator().manual_seed(2)
    n, k, thr = 40, 6, 0.1
    idx = torch.randint(0, n, (n, k), generator=g, dtype=torch.int32)
    idx[idx == torch.arange(n, dtype=torch.int32)[:, None]] = -1
    idx[3, :] = -1  # a row with no neighbours of its own
    sim = torch.rand(n, k, generator=g) * 1.2 - 0.1
    A = torch.zeros(n, n, dtype=torch.float64)
    for r in range(n):
        for a in range(k):
            if idx[r, a] >= 0 and sim[r, a] > thr:
                A[r, idx[r, a]] += sim[r, a].double()
    W = (A + A.T) / 2
    d = W.sum(1)
    dinv = torch.where(d > 0, d.rsqrt(), torch.zeros_like(d))
    indptr, indices, values, degree = kernels.symmetrize_lists(idx.numpy().copy(), sim.numpy().copy(), thr)
    for r in range(n):
        cols = indices[indptr[r]:indptr[r + 1]]
        assert np.all(np.diff(cols) > 0)  # sorted, duplicates merged
        assert set(cols.tolist()) == set(W[r].nonzero().squeeze(1).tolist())
    S = torch.sparse_csr_tensor(torch.from_numpy(indptr.astype(np.int64)), torch.from_numpy(indices.astype(np.int64)),
                                torch.from_numpy(values).double(), size=(n, n)).to_dense()
    assert torch.allclose(torch.from_numpy(degree), d, atol=1e-6)
    assert torch.allclose(S, dinv[:, None] * W * dinv[None, :], atol=1e-6)


@pytest.mark.parametrize("parts", [2, 3])
def test_transpose_in_bands_equals_one_band(parts):
    """Aᵀ counted and filled by bands of rows at once (one per thread) is the one-band counting
    sort: the same pointers, and each column's rows in increasing order (a row listing a column twice: twice)."""
    g = torch.Generator().manual_seed(4)
    n, k = 1000, 5
    idx = torch.randint(0, n, (n, k), generator=g, dtype=torch.int32).numpy()
    sim = torch.rand(n, k, generator=g).numpy()
    kept = torch.randint(0, k + 1, (n,), generator=g).numpy().astype(np.int64)
    one = kernels._transpose(idx, sim, kept, n, 1)
    banded = kernels._transpose(idx, sim, kept, n, parts)
    for a, b in zip(one, banded):
        assert np.array_equal(a, b)
    ptr, rows, _ = one
    assert ptr[-1] == kept.sum() and all(np.all(np.diff(rows[ptr[c]:ptr[c + 1]]) >= 0) for c in range(n))


def test_relabel_in_place_permutes_rows_and_maps_ids():
    g = torch.Generator().manual_seed(3)
    n, k = 50, 4
    idx = torch.randint(-1, n, (n, k), generator=g, dtype=torch.int32)
    sim = torch.rand(n, k, generator=g)
    order = torch.randperm(n, generator=g)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n)
    want_sim = sim[order].clone()
    ids = idx[order].long()
    want_idx = torch.where(ids >= 0, rank[ids.clamp_min(0)], -1).int()
    kernels.relabel_in_place(idx.numpy(), sim.numpy(), order.numpy(), rank.numpy())
    assert torch.equal(idx, want_idx) and torch.equal(sim, want_sim)
