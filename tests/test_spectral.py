"""The exact reference, the alignment metric, the torch operator and the paper's loss (docs/method.md, Exact reference and The paper's objective)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldsc.graphs.knn import LayerGraph, knn_affinity, random_walk
from ldsc.spectral import (LayerOperator, exact_eigenvectors, exact_operator, flatten_channels, lobpcg_top,
                           paper_objective, pool_operator, subspace_alignment)


def random_graphs(n_images: int, base: int, grids, k: int = 6, seed: int = 0) -> list[LayerGraph]:
    """kNN graphs of random token vectors, with intra- and inter-image neighbours."""
    g = torch.Generator().manual_seed(seed)
    graphs = []
    for s in grids:
        x = torch.randn(n_images * s * s, 8, generator=g)
        ids = torch.arange(n_images).repeat_interleave(s * s)
        W = knn_affinity(x, ids, k, k if n_images > 1 else 0, threshold=-1.0)
        P, deg = random_walk(W)
        graphs.append(LayerGraph(f"rand{s}", (s, s), n_images, W, P, deg, weight=base / s))
    return graphs


def dense_reference(graphs, base: int, image_index, n_images: int) -> np.ndarray:
    """``Σ_l w_l U_lᵀ S_l U_l`` built densely, image by image, from first principles."""
    hw = base * base
    M = np.zeros((n_images * hw, n_images * hw))
    for g in graphs:
        B, (h, w) = g.n_images, g.grid
        U = pool_operator((base, base), g.grid).to_dense().double().numpy()
        W = g.W.to_dense().double().numpy()
        d = W.sum(1)
        dinv = np.where(d > 0, 1 / np.sqrt(np.maximum(d, 1e-300)), 0)
        S = dinv[:, None] * W * dinv[None, :]
        Ug = np.zeros((B * h * w, n_images * hw))
        for b, i in enumerate(image_index):
            Ug[b * h * w:(b + 1) * h * w, i * hw:(i + 1) * hw] = U
        M += g.weight * Ug.T @ S @ Ug
    return M


def test_pool_operator_is_row_orthonormal_average_pooling():
    U = pool_operator((8, 8), (4, 4)).to_dense()
    torch.testing.assert_close(U @ U.T, torch.eye(16))
    x = torch.randn(1, 1, 8, 8)
    pooled = torch.nn.functional.avg_pool2d(x, 2).flatten()
    torch.testing.assert_close(U @ x.flatten() / 2, pooled)  # rows are area^-1/2, area = 4


def test_exact_operator_matches_a_dense_construction_with_global_slots():
    graphs = random_graphs(2, 8, (8, 4))
    M = exact_operator(graphs, (8, 8), image_index=[3, 1], n_images=4).toarray()
    np.testing.assert_allclose(M, dense_reference(graphs, 8, [3, 1], 4), atol=1e-12)
    np.testing.assert_allclose(M, M.T, atol=1e-12)


@pytest.mark.parametrize("n_images,grids", [(1, (8, 4, 2)), (3, (8, 3))])
def test_exact_reference_agrees_with_dense_eigh(n_images, grids):
    graphs = random_graphs(n_images, 8, grids, seed=n_images)
    K = 5
    vals, Z = exact_eigenvectors(graphs, (8, 8), K)
    assert Z.shape == (n_images, K, 8, 8)
    d, V = np.linalg.eigh(exact_operator(graphs, (8, 8)).toarray())
    np.testing.assert_allclose(vals.numpy(), d[::-1][:K], rtol=1e-8, atol=1e-10)
    assert (d[-K] - d[-K - 1]) > 1e-6  # a gap, so the eigenspace is well defined
    assert subspace_alignment(Z, V[:, ::-1][:, :K].copy()) == pytest.approx(1.0, abs=1e-8)


def test_alignment_is_one_under_rotation_and_zero_for_orthogonal_subspaces():
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(200, 10, dtype=torch.float64, generator=g)).Q
    A, B = Q[:, :5], Q[:, 5:]
    R = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=g)).Q
    scale = torch.diag(torch.tensor([1.0, 2.0, 3.0, 0.5, 7.0], dtype=torch.float64))
    assert subspace_alignment(A @ R @ scale, A) == pytest.approx(1.0, abs=1e-12)
    assert subspace_alignment(B, A) == pytest.approx(0.0, abs=1e-12)
    # half of the directions shared: mean cos² over the reference's 2 directions is 1/2
    assert subspace_alignment(torch.cat([A[:, :1], B[:, :1]], 1), A[:, :2]) == pytest.approx(0.5, abs=1e-12)
    # (B, K, H, W) tensors are flattened the same way as the graph nodes
    Z = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g)
    assert subspace_alignment(Z, flatten_channels(Z) @ R[:3, :3]) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("base,grids", [(8, (8, 4, 2)), (8, (8, 3)), (6, (4,))])
def test_layer_operator_equals_exact_operator(base, grids):
    graphs = random_graphs(2, base, grids)
    M = exact_operator(graphs, (base, base))
    X = torch.randn(2 * base * base, 4, dtype=torch.float64)
    op = LayerOperator(graphs, (base, base), dtype=torch.float64)
    np.testing.assert_allclose(op(X).numpy(), M @ X.numpy(), rtol=1e-5, atol=1e-6)  # S_l from float32 graphs
    assert op.shift == pytest.approx(sum(g.weight for g in graphs))


def test_operator_into_a_given_block_and_a_step_with_reused_blocks_equal_fresh_ones():
    """``op(X, out=B)`` overwrites ``B`` with ``M X``; LOBPCG steps that keep their ``R`` and
    ``A R`` blocks (a workspace) take the same steps as steps that allocate new ones."""
    from ldsc.graphs.dataset import Workspace
    from ldsc.spectral.lobpcg import lobpcg_start, lobpcg_step, orthonormalize

    graphs = random_graphs(2, 8, (8, 4))
    op = LayerOperator(graphs, (8, 8), dtype=torch.float64)
    X = torch.randn(128, 4, dtype=torch.float64)
    block = torch.full_like(X, float("nan"))
    assert op(X, out=block) is block and torch.allclose(block, op(X))
    start = orthonormalize(torch.randn(128, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    runs = []
    for work in (None, Workspace()):
        theta, Xs, AX = lobpcg_start(op, start.clone(), None)
        P = AP = None
        for _ in range(4):
            theta, Xs, P, AP, _ = lobpcg_step(op, Xs, AX, theta, P, AP, work=work)
        runs.append((theta, Xs))
    assert torch.allclose(runs[0][0], runs[1][0], atol=1e-10)
    assert torch.allclose(runs[0][1], runs[1][1], atol=1e-8)


def test_lobpcg_reaches_the_exact_eigenspace():
    graphs = random_graphs(1, 16, (16, 8))
    _, ref = exact_eigenvectors(graphs, (16, 16), 6)
    op = LayerOperator(graphs, (16, 16), dtype=torch.float64)
    start = torch.randn(256, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    theta, X, it = lobpcg_top(op, start, 300, tol=1e-6)
    assert it < 300  # stopped by the tolerance, not the iteration cap
    assert subspace_alignment(X[:, :6], ref) > 0.9999


def cycle_graph() -> LayerGraph:
    """A 4-cycle 0-1-3-2-0 on a 2x2 grid (nodes ordered (y, x)): every node has degree 2."""
    W = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1], [1, 0, 0, 1], [0, 1, 1, 0]], dtype=torch.float32)
    P, deg = random_walk(W.to_sparse())
    return LayerGraph("cycle", (2, 2), 1, W.to_sparse(), P, deg, weight=1.0)


def test_paper_loss_matches_a_hand_computation():
    g = cycle_graph()
    # channel 0 constant: P f = f, λ = 1. Channel 1 alternates around the cycle: λ = -1.
    Z = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, -1.0, 1.0]]).reshape(1, 2, 2, 2)
    loss, stats = paper_objective(Z, [g], eig_weight=2.0, orth_weight=2.0)
    # 2 · mean(|1-1|, |-1-1|) + 2 · 0 (the two channels are orthogonal)
    assert float(loss) == pytest.approx(2.0, abs=1e-6)
    torch.testing.assert_close(stats["eigenvalues"], torch.tensor([1.0, -1.0]))
    # channel 1 = (1, 1, 1, 0)/√3: P f = (1, 1/2, 1/2, 1)/√3 in node order -> λ = 2/3;
    # overlap with channel 0: (1/2)(3/√3) = √3/2, squared 3/4 (for both c≠c' entries)
    Z = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]]).reshape(1, 2, 2, 2)
    loss, stats = paper_objective(Z, [g], eig_weight=1.0, orth_weight=1.0)
    assert float(stats["eig"]) == pytest.approx((0 + 1 / 3) / 2, abs=1e-6)
    assert float(stats["orth"]) == pytest.approx(0.75, abs=1e-6)
    assert float(loss) == pytest.approx(1 / 6 + 0.75, abs=1e-6)
    # the layer weight w_l multiplies both terms
    g.weight = 3.0
    loss3, _ = paper_objective(Z, [g], eig_weight=1.0, orth_weight=1.0)
    assert float(loss3) == pytest.approx(3 * (1 / 6 + 0.75), abs=1e-5)


def test_svd_order_keeping_the_order_fixes_each_channels_sign_by_its_largest_entry():
    """With `keep_order` the channels stay, each flipped so that its entry of largest magnitude
    (the first in (image, y, x) order on a tie) is positive; Σ holds their norms."""
    from ldsc.spectral import svd_order

    g = torch.Generator().manual_seed(0)
    Z = torch.randn(3, 4, 5, 6, generator=g)
    Z[1, 2, 3, 4] = -10.0  # channel 2's peak is negative: flipped
    Z[0, 3, 0, 0], Z[2, 3, 4, 5] = 9.0, -9.0  # channel 3: a tie, the first (positive) decides: kept
    E, s = svd_order(Z, keep_order=True)
    assert torch.equal(E[:, [0, 1, 3]], torch.stack([c * torch.sign(c.flatten()[c.abs().flatten().argmax()])
                                                     for c in Z[:, [0, 1, 3]].unbind(1)], 1))
    assert torch.equal(E[:, 2], -Z[:, 2]) and torch.equal(E[:, 3], Z[:, 3])
    assert torch.allclose(s, Z.pow(2).sum((0, 2, 3)).sqrt())
    assert torch.equal(Z[1, 2, 3, 4], torch.tensor(-10.0))  # the input is left as it was
