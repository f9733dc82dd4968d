"""The fast (default) and exact solvers, resume mid-solve, and the alignment monitor."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY
from test_planted import PlantedData, fit
from torch.utils.data import DataLoader

from ldsc.errors import ConfigError
from ldsc.graphs.knn import LayerGraph, knn_affinity, random_walk
from ldsc.run import fit as run_fit
from ldsc.solvers.lobpcg import LobpcgSolver
from ldsc.spectral import exact_eigenvectors, subspace_alignment


def test_fast_solver_reaches_the_exact_eigenspace_of_a_planted_graph():
    data = PlantedData()
    _, ref = exact_eigenvectors(data.graphs, (16, 16), 4)
    L.seed_everything(0, verbose=False)
    solver = fit(LobpcgSolver(n_images=1, K=4, base_size=16, tol=1e-5), epochs=4)
    assert subspace_alignment(solver.eigenvectors(), ref) >= 0.999
    assert solver.eigenvectors().shape == (1, 4, 16, 16)


class PlantedFeatures(L.LightningDataModule):
    """``n`` images on a ``size×size`` grid whose quadrants carry one of 4 noisy "semantic" vectors
    (the same 4 across images, in a different quadrant order per image); the whole data set's
    intra+inter kNN graphs at two scales, one batch per epoch (the ``dataset`` scope)."""

    def __init__(self, n: int = 6, size: int = 8, k: int = 6, seed: int = 0):
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
        self.n, self.size, self.k = n, size, k
        self.files = [f"planted{i}" for i in range(n)]
        self.graphs = self.build()

    def prepare_files(self):
        return self.files

    def build(self) -> list[LayerGraph]:
        out = []
        for s in (self.size, self.size // 2):
            f = self.features.permute(0, 3, 1, 2)
            f = torch.nn.functional.adaptive_avg_pool2d(f, s).permute(0, 2, 3, 1).reshape(-1, 16)
            ids = torch.arange(self.n).repeat_interleave(s * s)
            W = knn_affinity(f, ids, self.k, self.k, threshold=0.1)
            P, deg = random_walk(W)
            out.append(LayerGraph(f"f{s}", (s, s), self.n, W, P, deg, weight=self.size / s))
        return out

    def train_dataloader(self):
        return DataLoader([0], batch_size=1)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return {"index": torch.arange(self.n), "graphs": self.graphs}


def fit_planted(solver, epochs: int, ckpt_path=None, save_to=None):
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(solver, datamodule=PlantedFeatures(), ckpt_path=ckpt_path)
    if save_to:
        trainer.save_checkpoint(save_to)
    return trainer


def test_fast_solver_reaches_the_exact_eigenspace_of_data_set_graphs():
    data = PlantedFeatures()
    _, ref = exact_eigenvectors(data.graphs, (8, 8), 4)
    L.seed_everything(0, verbose=False)
    solver = LobpcgSolver(n_images=data.n, K=4, base_size=8, tol=1e-5, iters_per_step=5)
    trainer = fit_planted(solver, epochs=40)
    assert solver.converged() and trainer.current_epoch < 40  # stopped by the tolerance
    assert subspace_alignment(solver.eigenvectors(), ref) >= 0.9999


def test_resume_mid_solve_equals_an_uninterrupted_run(tmp_path):
    """Two steps, a checkpoint, then the rest in a new process-like trainer: the same iterate and
    the same eigenvectors as one uninterrupted run (the iteration's whole state is checkpointed)."""
    L.seed_everything(0, verbose=False)
    whole = LobpcgSolver(n_images=6, K=4, base_size=8, tol=1e-5, iters_per_step=2)
    fit_planted(whole, epochs=6)
    L.seed_everything(0, verbose=False)
    first = LobpcgSolver(n_images=6, K=4, base_size=8, tol=1e-5, iters_per_step=2)
    fit_planted(first, epochs=2, save_to=tmp_path / "mid.ckpt")
    assert int(first.iterations) == 4 and not first.converged()  # really stopped mid-solve
    L.seed_everything(1, verbose=False)  # another seed: the start must come from the checkpoint
    resumed = LobpcgSolver(n_images=6, K=4, base_size=8, tol=1e-5, iters_per_step=2)
    fit_planted(resumed, epochs=6, ckpt_path=tmp_path / "mid.ckpt")
    assert int(resumed.iterations) == int(whole.iterations) > 4
    assert torch.equal(resumed.eigenvectors(), whole.eigenvectors())


def test_a_converged_checkpoint_keeps_the_table_only_and_a_tighter_resume_continues_from_it(tmp_path):
    """Once converged, the checkpoint leaves out the iteration's other blocks (M X, directions);
    a resume with a smaller tolerance rebuilds M X from the table and goes on to the exact eigenspace."""
    L.seed_everything(0, verbose=False)
    done = LobpcgSolver(n_images=6, K=4, base_size=8, tol=1e-2, iters_per_step=2)
    fit_planted(done, epochs=20, save_to=tmp_path / "done.ckpt")
    assert done.converged()
    state = torch.load(tmp_path / "done.ckpt", weights_only=False)["state_dict"]
    assert state["table"].shape == (6 * 64, done.m)
    assert all(state[name].shape == (0, done.m) for name in ("MX", "P", "MP"))
    L.seed_everything(1, verbose=False)
    tight = LobpcgSolver(n_images=6, K=4, base_size=8, tol=1e-6, iters_per_step=2)
    fit_planted(tight, epochs=60, ckpt_path=tmp_path / "done.ckpt")
    assert tight.converged() and int(tight.iterations) > int(done.iterations)
    _, ref = exact_eigenvectors(PlantedFeatures().graphs, (8, 8), 4)
    assert subspace_alignment(tight.eigenvectors(), ref) >= 0.9999


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


def test_default_solver_is_fast_converges_and_logs_its_alignment(compose):
    cfg = compose([*TINY, "logger=csv", "trainer.max_epochs=20"])
    assert cfg.solver._target_.endswith("LobpcgSolver")
    solver = run_fit(cfg)
    assert solver.converged() and solver.trainer.current_epoch < 20
    rows = metrics(cfg)
    assert logged(rows, "train/alignment")[-1] >= 0.999
    assert logged(rows, "train/residual")[-1] <= cfg.solver.tol


@pytest.mark.parametrize("search", ["exact", "cluster", "ivf", "hnsw"])
def test_default_solver_agrees_with_the_exact_solver_on_a_small_folder(compose, tmp_path, search):
    """Three photographs: the default solver's eigenvectors (on graphs from exact or approximate
    neighbour search) span the exact solver's eigenspace of the brute-force graphs."""
    over = ["data.names=[astronaut.png,coffee.png,chelsea.png]", *TINY[1:], "trainer.max_epochs=30"]
    ref = run_fit(compose([*over, "solver=exact", "graph.search=exact"], out=tmp_path / "reference")).eigenvectors()
    cfg = compose([*over, f"graph.search={search}", "graph.nlist=16", "graph.nprobe=8"], out=tmp_path / search)
    fast = run_fit(cfg).eigenvectors()
    assert subspace_alignment(fast, ref) >= 0.99


def test_alignment_monitor_can_be_switched_off_and_skips_large_runs(compose, tmp_path):
    cfg = compose([*TINY, "logger=csv", "trainer.max_epochs=1", "callbacks.alignment.enabled=false"])
    run_fit(cfg)
    assert not logged(metrics(cfg), "train/alignment")
    cfg = compose([*TINY, "logger=csv", "trainer.max_epochs=1", "callbacks.alignment.max_tokens=100"],
                  out=tmp_path / "big")
    run_fit(cfg)
    assert not logged(metrics(cfg), "train/alignment")
    # K so large for the nodes that the reference would outlast the solve (K² x nodes > max_work)
    cfg = compose([*TINY, "logger=csv", "trainer.max_epochs=1", "callbacks.alignment.max_work=1000"],
                  out=tmp_path / "costly")
    run_fit(cfg)
    assert not logged(metrics(cfg), "train/alignment")
    cfg = compose([*TINY, "logger=csv", "trainer.max_epochs=1"], out=tmp_path / "affordable")
    run_fit(cfg)
    assert logged(metrics(cfg), "train/alignment")  # the same run within budget is monitored


def test_exact_solver_refuses_a_graph_set_too_large(compose):
    cfg = compose([*TINY, "solver=exact", "solver.max_tokens=100"])
    with pytest.raises(ConfigError, match="above solver.max_tokens=100: use solver=lobpcg"):
        run_fit(cfg)


@pytest.mark.slow
def test_default_run_on_101_coco_images_aligns_with_the_exact_reference(compose, tmp_path, coco_dir):
    """The issue's benchmark case as a test (`make test-all`): the 101 COCO images, graph=vv, K=15,
    default config, against brute-force graphs + eigsh: alignment >= 0.99."""
    over = ["data=folder", f"data.root={coco_dir}", "graph=vv", "K=15", "logger=none",
            "callbacks.export.figures=false", "callbacks.alignment.enabled=false"]
    ref = run_fit(compose([*over, "solver=exact", "graph.search=exact"], out=tmp_path / "reference")).eigenvectors()
    fast = run_fit(compose(over, out=tmp_path / "default")).eigenvectors()
    assert subspace_alignment(fast, ref) >= 0.99


@pytest.mark.gpu
def test_the_pipeline_on_a_gpu_matches_the_cpu(compose, tmp_path):
    """trainer=gpu: store, graphs and solver on CUDA tensors give the CPU run's eigenspace."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cpu = run_fit(compose(TINY, out=tmp_path / "cpu")).eigenvectors()
    gpu = run_fit(compose([*TINY, "trainer=gpu"], out=tmp_path / "gpu")).eigenvectors()
    assert subspace_alignment(gpu.cpu(), cpu) >= 0.999
