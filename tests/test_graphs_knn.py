"""Sparse kNN graphs equal a brute-force dense construction; normalisation is right."""

import pytest
import torch
import torch.nn.functional as F

from ldsc.features.backbones.base import LayerFeatures
from ldsc.graphs.knn import KnnGraphBuilder, head_vectors, knn_affinity, random_walk


def dense_knn(x, y, ids, k_intra, k_inter, threshold):
    """Brute force: full similarity matrix, per-row top-k within / across images, symmetrise."""
    S = F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T
    n = S.shape[0]
    A = torch.zeros(n, n)
    for i in range(n):
        for k, mask in ((k_intra, ids == ids[i]), (k_inter, ids != ids[i])):
            mask = mask.clone()
            mask[i] = False
            cand = torch.nonzero(mask).flatten()
            if k == 0 or len(cand) == 0:
                continue
            vals = S[i, cand]
            top = vals.topk(min(k, len(cand))).indices
            for j in cand[top]:
                if S[i, j] > threshold:
                    A[i, j] = S[i, j]
    return (A + A.T) / 2


@pytest.mark.parametrize("k_intra,k_inter,chunk", [(3, 0, None), (4, 2, 5), (6, 3, 1)])
def test_sparse_graph_equals_dense_reference(k_intra, k_inter, chunk):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 8, generator=g)
    y = torch.randn(30, 8, generator=g)
    ids = torch.arange(3).repeat_interleave(10)
    W = knn_affinity(x, ids, k_intra, k_inter, threshold=0.1, y=y, chunk_size=chunk)
    ref = dense_knn(x, y, ids, k_intra, k_inter, 0.1)
    torch.testing.assert_close(W.to_dense(), ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(W.to_dense(), W.to_dense().T)
    assert (W.to_dense().diagonal() == 0).all()


def test_threshold_drops_weak_edges_and_single_image_has_no_inter_edges():
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
    ids = torch.zeros(20, dtype=torch.long)
    W = knn_affinity(x, ids, k_intra=19, k_inter=5, threshold=0.5)
    vals = W.coalesce().values()
    assert (vals > 0.25).all()  # an edge kept by one side has value > threshold / 2 after symmetrisation
    ref = dense_knn(x, x, ids, 19, 5, 0.5)
    torch.testing.assert_close(W.to_dense(), ref)


def test_random_walk_rows_sum_to_one():
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(2))
    W = knn_affinity(x, torch.arange(2).repeat_interleave(20), 5, 2, threshold=-1.0)
    P, deg = random_walk(W)
    torch.testing.assert_close(torch.sparse.sum(P, 1).to_dense(), torch.ones(40))
    torch.testing.assert_close(deg, W.to_dense().sum(1))


def test_chunked_build_memory_is_bounded_by_chunk():
    # a block of 7 rows at a time must give the same graph as one block
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(3))
    ids = torch.arange(4).repeat_interleave(16)
    a = knn_affinity(x, ids, 5, 3, chunk_size=7).to_dense()
    b = knn_affinity(x, ids, 5, 3, chunk_size=64).to_dense()
    torch.testing.assert_close(a, b)


def test_concat_heads_similarity_is_mean_of_per_head_cosines():
    t = torch.randn(1, 3, 2, 2, 4, generator=torch.Generator().manual_seed(4))
    (x,) = head_vectors(t, "concat")
    per_head = torch.stack([F.normalize(h, dim=-1) @ F.normalize(h, dim=-1).T for h in head_vectors(t, "separate")])
    torch.testing.assert_close(x @ x.T, per_head.mean(0))


def test_builder_makes_one_graph_per_layer_and_head_with_weights():
    B, H, d = 2, 2, 8
    g = torch.Generator().manual_seed(5)
    feats = [LayerFeatures(f"l{s}", q=torch.randn(B, H, s, s, d, generator=g), k=torch.randn(B, H, s, s, d, generator=g),
                           v=torch.randn(B, H, s, s, d, generator=g)) for s in (8, 4)]
    graphs = KnnGraphBuilder("qk", k_intra=4, k_inter=2, threshold=-1.0)(feats, base_size=16)
    assert [gr.grid for gr in graphs] == [(8, 8), (4, 4)]
    assert [gr.weight for gr in graphs] == [2.0, 4.0]
    assert graphs[0].P.shape == (B * 64, B * 64)
    sep = KnnGraphBuilder("vv", k_intra=4, k_inter=0, heads="separate")(feats, base_size=16)
    assert len(sep) == 4 and sep[0].name == "l8/head0"
    with pytest.raises(ValueError, match="graph pair"):
        KnnGraphBuilder("xy")


def test_dim_auto_keeps_every_dimension_while_a_layer_fits_and_reduces_beyond():
    auto = KnnGraphBuilder(pair="vv")  # the default: dim=auto, max_vectors_gb=3
    assert auto.dim == "auto" and auto.max_vectors_gb == 3.0 and auto.auto_dim == 128
    assert auto.layer_dim(300 * 1024, 768) is None  # 0.9 GB: kept whole
    assert auto.layer_dim(10_240_000, 768) == 128  # 29 GB at full width
    assert auto.layer_dim(10_240_000, 96) is None  # no wider than auto_dim: nothing to reduce
    assert KnnGraphBuilder(pair="vv", dim=None).layer_dim(10**8, 768) is None
    assert KnnGraphBuilder(pair="vv", dim=64).layer_dim(10, 768) == 64
    assert KnnGraphBuilder(pair="vv", dim=64).layer_dim(10, 32) is None  # nothing to reduce
    with pytest.raises(ValueError, match="graph.dim"):
        KnnGraphBuilder(pair="vv", dim="half")


def test_dim_auto_reduces_only_the_layer_that_does_not_fit(caplog):
    """Six images, layers 16² (1,536 tokens x 64 dims = 393 kB) and 8² (98 kB), a 200 kB budget and
    auto_dim 32: the first is searched at 32 PCA dimensions, the second at its own 64; the memory
    estimate counts that."""
    import logging

    from ldsc.features.store import MemoryStore

    g = torch.Generator().manual_seed(0)
    feats = [LayerFeatures(name=f"l{s}", v=torch.randn(6, 1, s, s, 64, generator=g)) for s in (16, 8)]
    store = MemoryStore(feats, ["v"])
    budget = 200e3 / 2**30
    builder = KnnGraphBuilder(pair="vv", k_intra=5, k_inter=5, max_vectors_gb=budget, auto_dim=32)
    with caplog.at_level(logging.INFO, logger="ldsc.graphs.knn"):
        graphs = builder.dataset_graphs(store, 16, progress=False)
    assert [t["dim"] for t in builder.layer_timings] == [32, 64]
    assert graphs[0].projection.shape == (64, 32) and graphs[1].projection is None
    assert any("l16 vectors reduced 64 -> 32 dimensions by pca" in r.getMessage() for r in caplog.records)
    full = KnnGraphBuilder(pair="vv", k_intra=5, k_inter=5, dim=None)
    assert builder.memory_estimate(6, store.layers, 1, 16)["build"] < full.memory_estimate(6, store.layers, 1, 16)["build"]
