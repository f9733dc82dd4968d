"""The multilevel start of the LOBPCG solve (src/ldsc/spectral/multilevel.py): coarse layers'
problems first; the same eigenvectors as from the random start, in fewer base-grid iterations."""

from __future__ import annotations

import logging

import pytest
import torch

from ldsc import LDSC
from ldsc.features.backbones.pixel import PixelBackbone
from ldsc.features.store import MemoryStore
from ldsc.graphs.knn import KnnGraphBuilder
from ldsc.spectral import LayerOperator, subspace_alignment
from ldsc.spectral.lobpcg import lobpcg_iterate, lobpcg_start, orthonormalize, random_start
from ldsc.spectral.multilevel import coarse_grids, multilevel_start, prolong


class _Grid:
    def __init__(self, grid):
        self.grid = grid


def test_coarse_grids_are_the_layer_grids_below_the_base_coarsest_first():
    graphs = [_Grid((32, 32)), _Grid((8, 8)), _Grid((16, 16)), _Grid((16, 16)), _Grid((37, 37))]
    assert coarse_grids(graphs, (32, 32)) == [(8, 8), (16, 16)]
    assert coarse_grids(graphs, (8, 8)) == []


def test_prolong_repeats_each_cell_over_the_pixels_it_covers():
    X = torch.arange(2 * 2 * 2 * 3, dtype=torch.float32).reshape(2 * 2 * 2, 3)  # 2 images, 2x2 grid, 3 columns
    Y = prolong(X, 2, (2, 2), (4, 4)).reshape(2, 4, 4, 3)
    cells = X.reshape(2, 2, 2, 3)
    for i in range(2):
        for y in range(4):
            for x in range(4):
                assert torch.equal(Y[i, y, x], cells[i, y // 2, x // 2])


@pytest.fixture(scope="module")
def coco_graphs():
    from conftest import COCO_DIR
    from ldsc.features.images import image_tensor

    if not COCO_DIR.is_dir():
        pytest.skip(f"real test images {COCO_DIR} are absent (they live in ../shared/data, outside the repo)")
    paths = sorted(COCO_DIR.glob("*.jpg"))[:40]
    bb = PixelBackbone(n_features=32)
    bb.set_base_size(16)
    feats = bb(torch.stack([image_tensor(p, bb.input_size) for p in paths]))  # layers 16², 8², 4²
    store = MemoryStore(feats, ["v"])
    return KnnGraphBuilder(pair="vv").dataset_graphs(store, 16, progress=False)


def _solve(op, X0, K, tol, iters=300):
    theta, X, MX = lobpcg_start(op, orthonormalize(X0))
    P, MP = torch.empty_like(X), torch.empty_like(MX)
    residual = torch.full((X.shape[1],), float("inf"), dtype=torch.float64)
    done, _ = lobpcg_iterate(op, X, MX, P, MP, theta, residual, K, tol, iters, False)
    return X, done


def test_the_multilevel_start_reaches_the_same_eigenvectors_in_fewer_base_iterations(coco_graphs, caplog):
    """40 COCO images, pixel layers 16², 8², 4²: from the random start and from the coarse levels'
    solution the base problem converges to the same subspace, the latter in fewer iterations."""
    K, m, tol, base = 10, 14, 1e-4, (16, 16)
    op = LayerOperator(coco_graphs, base)
    X_rand, it_rand = _solve(op, random_start(0, slice(0, op.size), m), K, tol)
    with caplog.at_level(logging.INFO, logger="ldsc.spectral.multilevel"):
        X0 = multilevel_start(coco_graphs, base, m, K, tol, seed=0, image_range=(0, 40))
    assert [r.getMessage().split(" grid")[0] for r in caplog.records] == [
        "multilevel start: 4x4", "multilevel start: 8x8"]
    assert X0.shape == (op.size, m)
    # the start is already close to the answer: most of the work was done on the coarse grids
    assert subspace_alignment(X0[:, :K], X_rand[:, :K]) > 0.5
    X_ml, it_ml = _solve(op, X0, K, tol)
    assert subspace_alignment(X_ml[:, :K], X_rand[:, :K]) > 0.9999
    assert it_ml < it_rand


def test_a_stop_during_the_start_hands_back_nothing(coco_graphs):
    assert multilevel_start(coco_graphs, (16, 16), 14, 10, 1e-4, seed=0, image_range=(0, 40), stop=lambda: True) is None


def test_the_estimator_gives_the_same_eigenvectors_with_and_without_it(coco_graphs):
    from conftest import COCO_DIR
    from ldsc.features.images import image_tensor

    paths = sorted(COCO_DIR.glob("*.jpg"))[:24]
    bb = PixelBackbone(n_features=32)
    bb.set_base_size(16)
    layers = [f.v[:, 0] for f in bb(torch.stack([image_tensor(p, bb.input_size) for p in paths]))]
    a = LDSC(K=8, graph="vv", tol=1e-5, progress=False).fit(layers)
    b = LDSC(K=8, graph="vv", tol=1e-5, progress=False, multilevel=False).fit(layers)
    assert a.multilevel and not b.multilevel
    assert subspace_alignment(a.eigenvectors_, b.eigenvectors_) > 0.9999
    assert torch.allclose(a.eigenvalues_, b.eigenvalues_, rtol=1e-4)
