"""The fast (default) and exact solvers, and the alignment monitor (DESIGN §3–4)."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY
from test_planted import PlantedData, fit
from torch.utils.data import DataLoader

from ldsc.data import EpochShuffleSampler
from ldsc.errors import ConfigError
from ldsc.graphs import LayerGraph, knn_affinity, random_walk
from ldsc.run import fit as run_fit
from ldsc.solvers.fast import FastSolver
from ldsc.spectral import exact_eigenvectors, subspace_alignment


def test_fast_solver_reaches_the_exact_eigenspace_of_a_planted_graph():
    data = PlantedData()
    _, ref = exact_eigenvectors(data.graphs, (16, 16), 4)
    L.seed_everything(0, verbose=False)
    solver = fit(FastSolver(n_images=1, K=4, base_size=16), epochs=1)
    assert subspace_alignment(solver.eigenvectors(), ref) >= 0.99
    assert solver.eigenvectors().shape == (1, 4, 16, 16)


class PlantedFeatures(L.LightningDataModule):
    """``n`` images on a ``size×size`` grid whose quadrants carry one of 4 noisy "semantic" vectors
    (the same 4 across images, in a different quadrant order per image). Batches of ``batch_size``
    images, reshuffled every epoch, get intra+inter kNN graphs at two scales: data-set mode."""

    def __init__(self, n: int = 6, size: int = 8, batch_size: int = 2, k: int = 6, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(4, 16, generator=g) * 3
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        quad = ((yy >= size // 2) * 2 + (xx >= size // 2)).flatten()
        feats = []
        for _ in range(n):
            perm = torch.randperm(4, generator=g)
            feats.append(centers[perm[quad]] + torch.randn(size * size, 16, generator=g))
        self.features = torch.stack(feats).reshape(n, size, size, 16)
        self.n, self.size, self.batch_size, self.k = n, size, batch_size, k
        self.files = [f"planted{i}" for i in range(n)]

    def prepare_files(self):
        return self.files

    def graphs(self, index: torch.Tensor) -> list[LayerGraph]:
        out = []
        for s in (self.size, self.size // 2):
            f = self.features[index].permute(0, 3, 1, 2)
            f = torch.nn.functional.adaptive_avg_pool2d(f, s).permute(0, 2, 3, 1).reshape(-1, 16)
            ids = torch.arange(len(index)).repeat_interleave(s * s)
            W = knn_affinity(f, ids, self.k, self.k if len(index) > 1 else 0, threshold=0.1)
            P, deg = random_walk(W)
            out.append(LayerGraph(f"f{s}", (s, s), len(index), W, P, deg, weight=self.size / s))
        return out

    def whole_dataset_graphs(self, device=None):
        return self.graphs(torch.arange(self.n))

    def release_whole_dataset_graphs(self):
        pass  # nothing kept

    def train_dataloader(self):
        return DataLoader(list(range(self.n)), batch_size=self.batch_size,
                          sampler=EpochShuffleSampler(self.n, seed=1))

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return {"index": batch, "graphs": self.graphs(batch)}


def test_fast_solver_converges_in_mini_batch_mode():
    data = PlantedFeatures()
    _, ref = exact_eigenvectors(data.graphs(torch.arange(data.n)), (8, 8), 4)
    L.seed_everything(0, verbose=False)
    solver = FastSolver(n_images=data.n, K=4, base_size=8)
    L.Trainer(max_epochs=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(solver, datamodule=data)
    assert subspace_alignment(solver.eigenvectors(), ref) >= 0.95
    # the table's K leading columns are orthonormal over all pixels of all images
    X = solver.eigenvectors().permute(0, 2, 3, 1).reshape(-1, 4).double()
    torch.testing.assert_close(X.T @ X, torch.eye(4, dtype=torch.float64), atol=1e-4, rtol=0)


def test_fast_solver_solves_a_small_data_set_on_its_whole_graph():
    """Below ``whole_max_tokens`` the mini-batches are not used: the whole-data-set graph is solved
    in the first step (alignment 1 with the exact eigenspace of *that* graph) and the run stops."""
    data = PlantedFeatures()
    _, ref = exact_eigenvectors(data.whole_dataset_graphs(), (8, 8), 4)
    L.seed_everything(0, verbose=False)
    solver = FastSolver(n_images=data.n, K=4, base_size=8, iters=100, whole_max_tokens=data.n * 64)
    trainer = L.Trainer(max_epochs=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(solver, datamodule=data)
    assert bool(solver.whole_solved) and trainer.current_epoch <= 1
    assert subspace_alignment(solver.eigenvectors(), ref) >= 0.999


class NoisyEpochs(PlantedFeatures):
    """All images in one batch, reshuffled, with fresh feature noise every epoch (as SD's
    timesteps give a new graph every epoch)."""

    def __init__(self, **kw):
        super().__init__(batch_size=kw.pop("n", 3), n=kw.pop("n", 3), **kw)
        self.clean = self.features.clone()

    def epoch_graphs(self, epoch: int, index: torch.Tensor) -> list[LayerGraph]:
        g = torch.Generator().manual_seed(100 + epoch)
        self.features = self.clean + 6.0 * torch.randn(self.clean.shape, generator=g)
        return self.graphs(index)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return {"index": batch, "graphs": self.epoch_graphs(self.trainer.current_epoch, batch)}


def test_fast_solver_averages_the_graphs_of_recent_epochs():
    """One batch holding every image, a different graph each epoch: the solution is the exact
    eigenspace of the *mean* operator of the epochs (whatever order the batch came in), not of the
    last epoch's graph alone."""
    from ldsc.spectral import exact_operator, top_eigenvectors

    data, epochs = NoisyEpochs(), 4
    mean = sum(exact_operator(data.epoch_graphs(e, torch.arange(data.n)), (8, 8)) for e in range(epochs)) / epochs
    _, ref = top_eigenvectors(mean, 4)
    _, last = exact_eigenvectors(data.epoch_graphs(epochs - 1, torch.arange(data.n)), (8, 8), 4)
    L.seed_everything(0, verbose=False)
    solver = FastSolver(n_images=data.n, K=4, base_size=8, iters=200, tol=1e-5, average_epochs=epochs)
    L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(solver, datamodule=data)
    Z = solver.eigenvectors()
    assert subspace_alignment(Z, torch.from_numpy(ref.copy())) >= 0.99
    assert subspace_alignment(Z, last) < subspace_alignment(Z, torch.from_numpy(ref.copy())) - 0.01


def metrics(cfg) -> list[dict]:
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def logged(rows, key):
    return [float(r[key]) for r in rows if r.get(key)]


def test_exact_solver_end_to_end_and_the_alignment_monitor(compose):
    cfg = compose([*TINY, "solver=exact", "logger=csv", "trainer.max_epochs=3"])
    solver = run_fit(cfg)
    out = Path(cfg.paths.output_dir)
    res = torch.load(out / "eigvecs.pt", weights_only=False)
    assert res["eigvecs"].shape == (2, 4, 16, 16)
    assert bool(solver.solved) and (solver.eigenvalues[:-1] >= solver.eigenvalues[1:]).all()
    align = logged(metrics(cfg), "train/alignment")
    assert align and align[-1] == pytest.approx(1.0, abs=1e-6)


def test_default_solver_is_fast_and_logs_its_alignment(compose):
    cfg = compose([*TINY, "logger=csv"])
    assert cfg.solver._target_.endswith("FastSolver")
    run_fit(cfg)
    align = logged(metrics(cfg), "train/alignment")
    assert len(align) == 2 and align[-1] >= 0.99


def test_default_solver_solves_a_small_folder_on_its_whole_graph(compose):
    """Three photographs in batches of two: the default config builds the whole-data-set graph
    once, solves it (alignment 1 with the exact reference) and stops after the first epoch; with
    ``whole_max_tokens=0`` the same run goes through the mini-batches instead."""
    over = ["data.names=[astronaut.png,coffee.png,chelsea.png]", *TINY[1:], "data.batch_size=2", "logger=csv",
            "trainer.max_epochs=3"]
    cfg = compose(over)
    solver = run_fit(cfg)
    assert bool(solver.whole_solved) and solver.trainer.current_epoch == 1  # stopped after the first epoch
    assert logged(metrics(cfg), "train/alignment")[-1] >= 0.999
    cfg = compose([*over, "solver.whole_max_tokens=0"], out=Path(cfg.paths.output_dir).parent / "minibatch")
    solver = run_fit(cfg)
    assert not bool(solver.whole_solved) and solver.trainer.current_epoch == 3


def test_alignment_monitor_can_be_switched_off_and_skips_large_runs(compose, tmp_path):
    cfg = compose([*TINY, "logger=csv", "trainer.max_epochs=1", "callbacks.alignment.enabled=false"])
    run_fit(cfg)
    assert not logged(metrics(cfg), "train/alignment")
    cfg = compose([*TINY, "logger=csv", "trainer.max_epochs=1", "callbacks.alignment.max_tokens=100"],
                  out=tmp_path / "big")
    run_fit(cfg)
    assert not logged(metrics(cfg), "train/alignment")


def test_exact_solver_refuses_a_graph_set_too_large(compose):
    cfg = compose([*TINY, "solver=exact", "solver.max_tokens=100"])
    with pytest.raises(ConfigError, match="above the limit of 100: use solver=fast"):
        run_fit(cfg)
