"""On a graph with planted block structure, the solvers' eigenvectors separate the blocks."""

from __future__ import annotations

from functools import partial

import lightning as L
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from torch.utils.data import DataLoader

from ldsc.graphs.knn import LayerGraph, random_walk
from ldsc.spectral import svd_order

BASE = 16


def quadrant_labels(size: int = BASE) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((y >= size // 2) * 2 + (x >= size // 2)).flatten()


def planted_graph(grid: int, p_in: float = 0.3, p_out: float = 0.005, seed: int = 0) -> LayerGraph:
    """Random graph on a ``grid×grid`` image whose four quadrants are densely connected inside."""
    g = torch.Generator().manual_seed(seed)
    lab = quadrant_labels(grid)
    n = lab.numel()
    same = lab[:, None] == lab[None, :]
    A = (torch.rand(n, n, generator=g) < torch.where(same, p_in, p_out)).float()
    A = torch.triu(A, 1)
    A = A + A.T
    W = A.to_sparse().coalesce()
    P, deg = random_walk(W)
    return LayerGraph(f"planted{grid}", (grid, grid), 1, W, P, deg, weight=BASE / grid)


class PlantedData(L.LightningDataModule):
    """One image whose layer graphs are the planted graphs (no backbone)."""

    def __init__(self, grids=(16, 8)):
        super().__init__()
        self.graphs = [planted_graph(s, seed=s) for s in grids]
        self.files = ["planted"]

    def prepare_files(self):
        return self.files

    def train_dataloader(self):
        return DataLoader([{"index": 0}] * 4, batch_size=1)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return {"index": batch["index"], "graphs": self.graphs}


def blocks_recovered(solver) -> float:
    E, _ = svd_order(solver.eigenvectors())
    X = E[0].reshape(E.shape[1], -1).T.numpy()
    pred = KMeans(4, n_init=10, random_state=0).fit_predict(X)
    return adjusted_rand_score(quadrant_labels().numpy(), pred)


def fit(solver, epochs: int):
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(solver, datamodule=PlantedData())
    return solver


def test_paper_solver_separates_planted_blocks():
    from ldsc.solvers.paper import PaperSolver

    L.seed_everything(0, verbose=False)
    solver = PaperSolver(1, 4, BASE, optimizer=partial(torch.optim.Adam, lr=0.05), steps_per_batch=25, ema=None)
    fit(solver, epochs=3)  # 3 epochs x 4 batches x 25 steps = 300 steps
    assert blocks_recovered(solver) > 0.95


def test_paper_single_image_recipe_separates_planted_blocks():
    """The published single-image parametrisation: a conv net (batch-normalised hidden layers) on a
    learnable input, gradients accumulated over several steps per Adam update."""
    from ldsc.solvers.paper import PaperSolver

    L.seed_everything(0, verbose=False)
    solver = PaperSolver(1, 4, BASE, optimizer=partial(torch.optim.Adam, lr=0.01), steps_per_batch=40,
                         accumulate=2, parametrization="convnet", conv_channels=16, eig_weight=2.0, orth_weight=2.0)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in solver.net)
    fit(solver, epochs=3)  # 3 epochs x 4 batches x 40 steps = 240 passes, 120 Adam updates
    assert blocks_recovered(solver) > 0.95
    assert set(solver.state_dict()) >= {"input", "net.0.weight"}  # what a checkpoint holds


def test_fast_solver_separates_planted_blocks():
    from ldsc.solvers.lobpcg import LobpcgSolver

    L.seed_everything(0, verbose=False)
    solver = fit(LobpcgSolver(n_images=1, K=4, base_size=BASE), epochs=3)
    assert blocks_recovered(solver) > 0.95
