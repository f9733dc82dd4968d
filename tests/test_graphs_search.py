"""Nearest-neighbour search (exact blocks, FAISS indexes) and the CSR graphs built from it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldsc.graphs.dataset import symmetric_normalized_blocks
from ldsc.graphs.knn import head_vectors, knn_affinity
from ldsc.graphs.search import choose_search, inter_image_knn, intra_image_knn, knn_recall, normalize_rows


def brute_force(x, y, tokens, k, same_image: bool):
    """Dense reference: the k most similar columns of the same (or of the other) images."""
    S = x @ y.T
    ids = torch.arange(x.shape[0]) // tokens
    same = ids[:, None] == ids[None, :]
    S = S.masked_fill(~same if same_image else same, float("-inf"))
    if same_image:
        S.fill_diagonal_(float("-inf"))
    return S.topk(k, dim=1)


def random_tokens(n_images=5, tokens=16, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return normalize_rows(torch.randn(n_images * tokens, d, generator=g))


def test_intra_image_search_equals_brute_force():
    x, y = random_tokens(seed=0), random_tokens(seed=1)
    idx, sim = intra_image_knn(x, y, 16, 4, max_chunk_elements=16 * 16 * 2)  # two images per block
    v, j = brute_force(x, y, 16, 4, same_image=True)
    assert torch.equal(idx, j) and torch.allclose(sim, v)


def test_exact_inter_image_search_equals_brute_force_and_never_returns_the_own_image():
    x, y = random_tokens(seed=2), random_tokens(seed=3)
    idx, sim = inter_image_knn(x, y, 16, 6, "exact", max_chunk_elements=16 * 80)
    v, j = brute_force(x, y, 16, 6, same_image=False)
    assert torch.equal(idx, j) and torch.allclose(sim, v)
    assert not (idx // 16 == (torch.arange(80) // 16)[:, None]).any()


def test_torch_brute_force_the_gpu_path_equals_the_faiss_one():
    """The GPU's exact search (torch brute force) written for any device, checked on the CPU."""
    from ldsc.graphs.search import _exact_inter, _torch_exact_inter

    x, y = random_tokens(n_images=7, seed=4), random_tokens(n_images=7, seed=5)
    for queries in (None, (32, 96)):
        idx, sim = _torch_exact_inter(x, y, 16, 6, max_chunk_elements=16 * 112 * 2, progress=None, queries=queries)
        ref_idx, ref_sim = _exact_inter(x, y, 16, 6, max_chunk_elements=16 * 80, progress=None, queries=queries)
        assert torch.equal(idx, ref_idx) and torch.allclose(sim, ref_sim)
    assert choose_search("auto", 100_000, 16384) == "cluster"
    assert choose_search("auto", 100_000, 16384, on_gpu=True, gpu_exact_max_tokens=1 << 20) == "exact"


@pytest.mark.gpu
def test_whole_data_set_graphs_built_on_a_gpu_equal_the_cpu_ones(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from ldsc.graphs.knn import KnnGraphBuilder
    from ldsc.features.store import FeatureStore

    store = _tiny_store(tmp_path)
    builder = KnnGraphBuilder(pair="vv", k_intra=5, k_inter=5, search="auto")
    cpu = builder.dataset_graphs(store, 8)
    gpu = builder.dataset_graphs(FeatureStore(store.path), 8, device="cuda")
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(a.sym_scipy().toarray(), b.sym_scipy().toarray(), atol=1e-5, rtol=1e-4)


def _tiny_store(tmp_path):
    from ldsc.features.backbones.pixel import PixelBackbone
    from ldsc.features.store import build_store

    import numpy as np
    from PIL import Image

    files = []
    for i in range(4):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(p)
        files.append(str(p))
    backbone = PixelBackbone(n_features=16)
    backbone.set_base_size(8)
    return build_store(tmp_path / "store", files, backbone, ["v"], progress=False)


@pytest.mark.parametrize("method", ["cluster", "ivf", "hnsw"])
def test_approximate_search_recall_on_real_images(coco_dir, method):
    """Pixel-backbone value vectors of 12 COCO images (32x32 tokens each): the clustered search,
    FAISS IVF and HNSW find at least 95 % of the exact inter-image neighbours, and never the
    query's own image."""
    from ldsc.features.backbones.pixel import PixelBackbone
    from ldsc.runtime.data import image_tensor

    files = sorted(coco_dir.iterdir())[:12]
    bb = PixelBackbone()
    bb.set_base_size(32)
    feats = bb(torch.stack([image_tensor(f, bb.input_size) for f in files]))[0]
    x = normalize_rows(head_vectors(feats.v, "concat")[0])
    exact, _ = inter_image_knn(x, x, 1024, 25, "exact")
    approx, _ = inter_image_knn(x, x, 1024, 25, method)  # the default settings
    assert knn_recall(approx, exact) >= 0.95
    assert not (approx // 1024 == (torch.arange(x.shape[0]) // 1024)[:, None]).any()


def test_auto_search_is_exact_while_small_then_clustered():
    assert choose_search("auto", 1000, 16384) == "exact"
    assert choose_search("auto", 10**5, 16384) == "cluster"
    assert choose_search("auto", 10**7, 16384) == "cluster"
    assert choose_search("hnsw", 10, 16384) == "hnsw"
    with pytest.raises(ValueError, match="graph.search must be one of"):
        choose_search("annoy", 10, 1)


def test_clustered_search_with_many_leaves_is_exact_when_it_visits_every_leaf():
    """With nprobe >= the number of leaves every key is scored: the result equals brute force,
    also for queries different from the keys (qk graphs)."""
    x, y = random_tokens(n_images=40, tokens=16, d=8, seed=5), random_tokens(n_images=40, tokens=16, d=8, seed=6)
    idx, sim = inter_image_knn(x, y, 16, 5, "cluster", list_size=16, nprobe=1000)
    v, j = brute_force(x, y, 16, 5, same_image=False)
    assert torch.allclose(sim, v) and (idx == j).float().mean() > 0.99  # ties aside


@pytest.mark.parametrize("branching,depth", [(512, 1), (16, 2), (4, 4)])
def test_cluster_tree_beam_search_finds_the_nearest_leaf(branching, depth):
    """A vector's leaf (beam search down the tree) is its most similar leaf centroid for nearly
    every vector, flat (up to `branching` leaves), with two levels (the default from ~6·10⁴ to
    ~3·10⁷ tokens) and deeper; each
    leaf's `near` list starts with itself."""
    from ldsc.graphs.search import ClusterTree

    y = random_tokens(n_images=40, tokens=64, d=8, seed=7)
    tree = ClusterTree(y, 16, branching=branching)
    assert len(tree.levels) == depth
    truth = (y @ tree.centroids.T).argmax(1)
    leaf = tree.assign(y, chunk=1000)  # (the first level's beam kept from building the tree)
    assert (leaf == truth).float().mean() > 0.97
    assert torch.equal(tree.assign(y, chunk=1000), leaf)  # the beam found again: the same leaves
    assert (tree.near[:, 0] == torch.arange(tree.nlist)).all()


def test_csr_equals_the_symmetric_normalised_reference():
    """Neighbour lists -> S = D^-1/2 (A + Aᵀ)/2 D^-1/2 in CSR (the compiled merge) equals the COO
    construction of knn_affinity (same neighbours, same threshold)."""
    x = random_tokens(n_images=4, tokens=9, d=5, seed=4)
    ids = torch.arange(4).repeat_interleave(9)
    W = knn_affinity(x, ids, 3, 2, threshold=0.1).to_dense()
    ia, sa = intra_image_knn(x, x, 9, 3)
    ie, se = inter_image_knn(x, x, 9, 2, "exact")
    blocks, degree = symmetric_normalized_blocks(torch.cat([ia, ie], 1), torch.cat([sa, se], 1), 0.1)
    assert len(blocks) == 1 and blocks[0][1].col_indices().dtype == torch.int32
    S = torch.cat([b.to_dense() for _, b in blocks])
    d = W.sum(1)
    dinv = torch.where(d > 0, d.rsqrt(), torch.zeros_like(d))
    assert torch.allclose(degree, d, atol=1e-5)
    assert torch.allclose(S, dinv[:, None] * W * dinv[None, :], atol=1e-5)
    assert torch.allclose(S, S.T, atol=1e-6)


def test_recall_counts_found_neighbours():
    exact = torch.tensor([[1, 2, 3], [4, 5, -1]])
    approx = torch.tensor([[3, 1, 9], [5, 4, 0]])
    assert knn_recall(approx, exact) == pytest.approx(4 / 5)


def test_relabelled_graph_applies_the_same_operator_in_token_order():
    """Storing the nodes in a locality order (as the clustered search does) changes only how S is
    kept: S Y, the scipy export and the degrees are those of the graph stored in token order."""
    from ldsc.graphs.dataset import DatasetGraph, relabel_lists

    x = random_tokens(n_images=6, tokens=16, d=6, seed=7)
    ia, sa = intra_image_knn(x, x, 16, 4)
    ie, se, order = inter_image_knn(x, x, 16, 3, "cluster", list_size=8, nprobe=4, return_order=True)
    assert order is not None and torch.equal(order.sort().values, torch.arange(96))
    idx, sim = torch.cat([ia, ie], 1).int(), torch.cat([sa, se], 1)
    plain = DatasetGraph("l", (4, 4), 6, *symmetric_normalized_blocks(idx.clone(), sim.clone(), 0.1))
    blocks, degree = symmetric_normalized_blocks(*relabel_lists(idx, sim, order), 0.1)
    moved = DatasetGraph("l", (4, 4), 6, blocks, degree[DatasetGraph.inverse(order)], order=order)
    assert not torch.equal(order, torch.arange(96))  # the relabelling is not the identity
    Y = torch.randn(96, 5)
    assert torch.allclose(moved.apply(Y), plain.apply(Y), atol=1e-5)
    assert abs(moved.sym_scipy() - plain.sym_scipy()).max() < 1e-6
    assert torch.allclose(moved.degree, plain.degree)


def test_products_into_a_workspace_equal_fresh_ones_and_reuse_its_blocks():
    """The solver's products write into blocks kept from call to call (no new block to fault in):
    the same S Y as a fresh product, in token order, whatever the blocks held before."""
    from ldsc.graphs.dataset import DatasetGraph, Workspace, relabel_lists, sym_apply

    x = random_tokens(n_images=6, tokens=16, d=6, seed=3)
    ia, sa = intra_image_knn(x, x, 16, 4)
    ie, se, order = inter_image_knn(x, x, 16, 3, "cluster", list_size=8, nprobe=4, return_order=True)
    idx, sim = torch.cat([ia, ie], 1).int(), torch.cat([sa, se], 1)
    plain = DatasetGraph("l", (4, 4), 6, *symmetric_normalized_blocks(idx.clone(), sim.clone(), 0.1))
    blocks, degree = symmetric_normalized_blocks(*relabel_lists(idx, sim, order), 0.1)
    moved = DatasetGraph("l", (4, 4), 6, blocks, degree[DatasetGraph.inverse(order)], order=order)
    for graph in (plain, moved):
        work = Workspace()
        first = graph.apply(torch.randn(96, 5), work=work)
        first.fill_(float("nan"))  # what a block held before must not leak into the next product
        Y = torch.randn(96, 5)
        again = graph.apply(Y, work=work)
        assert again.data_ptr() == first.data_ptr()  # the same block, reused
        assert torch.allclose(again, graph.apply(Y), atol=1e-6)
        work.clear()  # (the solver lets go of its blocks once it has converged)
        assert torch.allclose(graph.apply(Y, work=work), again, atol=1e-6)
    out = torch.full((96, 5), float("nan"))
    assert sym_apply(plain.blocks, Y, out=out) is out and torch.allclose(out, plain.blocks[0][1] @ Y)
    with pytest.raises(ValueError, match="out must be a contiguous block"):
        sym_apply(plain.blocks, Y, out=torch.empty(95, 5))


def test_intra_image_search_in_row_blocks_equals_whole_images():
    """An image whose T x T similarities exceed graph.max_chunk_elements is searched in blocks of
    its query rows (bounded memory at any base grid), with the same neighbours."""
    from ldsc.graphs.search import intra_image_knn, normalize_rows

    g = torch.Generator().manual_seed(0)
    x = normalize_rows(torch.randn(3 * 100, 8, generator=g))
    y = normalize_rows(torch.randn(3 * 100, 8, generator=g))
    whole = intra_image_knn(x, y, 100, 5)
    blocks = intra_image_knn(x, y, 100, 5, max_chunk_elements=250)  # 2 query rows at a time
    assert torch.equal(whole[0], blocks[0]) and torch.allclose(whole[1], blocks[1])
    assert bool(((blocks[0] // 100) == (torch.arange(300) // 100)[:, None]).all())  # same image only
