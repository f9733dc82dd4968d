"""A run on several processes (trainer=ddp_cpu: gloo): the same eigenvectors as one process,
resumable, refused where it cannot work."""

from __future__ import annotations

import os
import shutil
import socket

import pytest
import torch

from ldsc.distributed import shard, shard_bounds


def test_shards_are_contiguous_balanced_and_cover_every_image():
    for n, parts in [(10, 3), (2, 2), (101, 4), (3, 5)]:
        ranges = [shard(n, parts, i) for i in range(parts)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [e - s for s, e in ranges]
        assert max(sizes) - min(sizes) <= 1
        assert shard_bounds(n, parts) == [0] + [e for _, e in ranges]


@pytest.mark.parametrize("method", ["exact", "cluster", "ivf", "hnsw"])
def test_a_share_of_the_queries_finds_the_same_neighbours_as_all_of_them(method):
    from ldsc.graphs.search import inter_image_knn

    g = torch.Generator().manual_seed(0)
    T = 48
    x = torch.nn.functional.normalize(torch.randn(16 * T, 12, generator=g), dim=1)
    kw = dict(list_size=32, nprobe=4)
    idx, sim = inter_image_knn(x, x, T, 8, method, **kw)
    part_idx, part_sim = inter_image_knn(x, x, T, 8, method, queries=(5 * T, 11 * T), **kw)
    assert torch.equal(part_idx, idx[5 * T:11 * T])
    torch.testing.assert_close(part_sim, sim[5 * T:11 * T])
    with pytest.raises(ValueError, match="whole images"):
        inter_image_knn(x, x, T, 8, method, queries=(3, T))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_work(rank: int, port: int, idx, sim, bounds, x, T, out_dir) -> None:
    import torch.distributed as dist

    from ldsc.distributed import all_gather_rows
    from ldsc.graphs.dataset import sharded_symmetric_normalized
    from ldsc.graphs.search import inter_image_knn

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(bounds) - 1)
    try:
        lo, hi = bounds[rank], bounds[rank + 1]
        blocks, degree = sharded_symmetric_normalized(idx[lo:hi], sim[lo:hi], lo, bounds, threshold=0.1)
        q = (rank * (x.shape[0] // T // 2) * T, x.shape[0] if rank else x.shape[0] // T // 2 * T)
        found, _ = inter_image_knn(x, x, T, 8, "cluster", list_size=32, nprobe=4, queries=q, gather=all_gather_rows)
        torch.save({"rows": blocks[0][1].to_dense(), "degree": degree, "found": found}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_symmetrisation_and_search_equal_one_process_on_two_gloo_processes(tmp_path):
    """Each process holds its rows' lists; after the exchange its rows of S are those of the
    single-process S = D^-1/2 (A + Aᵀ)/2 D^-1/2. And the clustered search, each process finding
    the leaves of its own rows only, gives every query the neighbours it gets in one process."""
    import torch.multiprocessing as mp

    from ldsc.graphs.dataset import symmetric_normalized_blocks
    from ldsc.graphs.search import inter_image_knn

    g = torch.Generator().manual_seed(1)
    n, k = 300, 7
    idx = torch.randint(0, n, (n, k), generator=g, dtype=torch.int32)
    idx[idx == torch.arange(n, dtype=torch.int32)[:, None]] = -1  # no self-loops; some empty slots
    sim = torch.rand(n, k, generator=g)
    blocks, degree = symmetric_normalized_blocks(idx.clone(), sim.clone(), threshold=0.1)
    whole = torch.cat([b.to_dense() for _, b in blocks])
    bounds = [0, 140, n]
    T = 48
    x = torch.nn.functional.normalize(torch.randn(15 * T, 12, generator=g), dim=1)
    mp.spawn(_sharded_work, args=(_free_port(), idx, sim, bounds, x, T, str(tmp_path)), nprocs=2)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.testing.assert_close(torch.cat([p["rows"] for p in parts]), whole)
    for p in parts:
        torch.testing.assert_close(p["degree"], degree)
    found, _ = inter_image_knn(x, x, T, 8, "cluster", list_size=32, nprobe=4)
    assert torch.equal(torch.cat([p["found"] for p in parts]), found)


# -- the whole run on two processes ----------------------------------------------------------------

def _args(tmp_path, name, *extra, figures=False):
    """A small folder run: four of scikit-image's sample photographs (no download, so the test
    always runs), copied into ``tmp_path/images`` once."""
    import skimage.data

    folder = tmp_path / "images"
    if not folder.exists():
        folder.mkdir()
        src = os.path.dirname(skimage.data.__file__)
        for image in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"):
            shutil.copy(os.path.join(src, image), folder / image)
    return ["data=folder", f"data.root={folder}", "graph=vv", "K=4", "base_size=16", f"callbacks.export.figures={str(figures).lower()}", f"paths.log_dir={tmp_path / 'logs'}",
            f"hydra.run.dir={tmp_path / name}", *extra]


def test_two_gloo_processes_write_the_eigenvectors_of_one_process_and_evaluate_reads_them(tmp_path):
    from conftest import run_cli

    from ldsc.export import load_eigenvectors
    from ldsc.spectral import subspace_alignment

    one = run_cli(_args(tmp_path, "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_cli(_args(tmp_path, "two", "trainer=ddp_cpu", "trainer.devices=2", "store.rebuild=true", figures=True))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_eigenvectors(tmp_path / "one"), load_eigenvectors(tmp_path / "two")
    assert b["files"] == a["files"] and b["eigvecs"].shape == a["eigvecs"].shape == (4, 4, 16, 16)
    assert subspace_alignment(b["eigvecs"], a["eigvecs"]) >= 0.999
    # each process recorded its own stages (rank 1 held half the rows of every graph)
    import json

    held = [json.loads((tmp_path / "two" / f"stages.rank{r}.json").read_text())["held_mb"] for r in (0, 1)]
    whole = json.loads((tmp_path / "one" / "stages.json").read_text())["held_mb"]
    for h in held:
        assert h["solver"] < 0.6 * whole["solver"] and h["graphs"] < 0.7 * whole["graphs"]
    assert list((tmp_path / "two" / "figures").glob("*.png"))  # written by rank 0 from the gathered rows
    # the evaluation reads the two-process output as it reads any other
    import subprocess
    import sys

    ev = subprocess.run([sys.executable, "-m", "ldsc.evaluate", str(tmp_path / "two"), "--clusters", "3",
                         "--figures", "1"], capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert list((tmp_path / "two").rglob("*.png"))


def test_a_resumed_two_process_run_equals_an_uninterrupted_one(tmp_path):
    from conftest import run_cli

    from ldsc.export import load_eigenvectors

    common = ["trainer=ddp_cpu", "solver.iters_per_step=2", "solver.tol=1e-5"]
    full = run_cli(_args(tmp_path, "full", *common))
    assert full.returncode == 0, full.stderr[-3000:]
    first = run_cli(_args(tmp_path, "split", *common, "trainer.max_epochs=1"))
    assert first.returncode == 0, first.stderr[-3000:]
    state = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # the checkpoint holds the whole table, whatever the number of processes
    assert state["state_dict"]["table"].shape[0] == 4 * 16 * 16
    assert int(state["state_dict"]["iterations"]) == 2
    shutil.copytree(tmp_path / "split", tmp_path / "split_on_one")
    res = run_cli(_args(tmp_path, "split", *common, "resume=true"))
    assert res.returncode == 0, res.stderr[-3000:]
    # both processes mapped their own rows of the graphs the first run stored (no search)
    import json

    for r in (0, 1):
        stages = json.loads((tmp_path / "split" / ("stages.json" if r == 0 else f"stages.rank{r}.json")).read_text())
        assert stages["graphs"]["reused"].endswith(f"rank{r}of2"), stages["graphs"]
    torch.testing.assert_close(load_eigenvectors(tmp_path / "split")["eigvecs"],
                               load_eigenvectors(tmp_path / "full")["eigvecs"])
    # the same checkpoint resumes on one process (sums in another order: equal to rounding)
    from ldsc.spectral import subspace_alignment

    one = run_cli(_args(tmp_path, "split_on_one", "solver.iters_per_step=2", "solver.tol=1e-5", "resume=true"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert subspace_alignment(load_eigenvectors(tmp_path / "split_on_one")["eigvecs"],
                              load_eigenvectors(tmp_path / "full")["eigvecs"]) >= 0.9999


def test_solvers_that_cannot_shard_and_local_sweeps_are_refused_in_one_sentence(tmp_path):
    from conftest import run_cli

    res = run_cli(_args(tmp_path, "exact", "trainer=ddp_cpu", "solver=exact"))
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1].startswith("ldsc: error: solver=ExactSolver runs in one process only")
    res = run_cli(["-m", *_args(tmp_path, "sweep", "trainer=ddp_cpu", "K=3,4")])
    assert res.returncode != 0
    assert "A local sweep (-m) cannot run on several processes" in res.stderr
    assert "Traceback" not in res.stderr


def test_the_slurm_launcher_asks_for_one_task_per_device(compose):
    cfg = compose(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.nodes, launcher.gpus_per_node) == (4, 2, 4)


def test_sigterm_to_a_two_process_run_stops_both_with_a_checkpoint(tmp_path):
    """Lightning's own SIGTERM handler runs a collective inside the handler, which hung the
    processes when it interrupted one of the solver's; ldsc's handler only sets a flag that all
    processes agree on at the next iteration."""
    import signal
    import subprocess
    import sys
    import time

    args = _args(tmp_path, "run", "trainer=ddp_cpu", "solver.tol=0", "solver.iters_per_step=1",
                 "trainer.max_epochs=100000", "logger=none", "trainer.enable_progress_bar=false")
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    proc = subprocess.Popen([sys.executable, "-m", "ldsc.run", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    t = time.time()
    while not ckpt.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t < 180
        time.sleep(0.2)
    time.sleep(1.0)  # well inside the iterations (and their checkpoints' collectives)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("ldsc: error: Stopped by SIGTERM")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["state_dict"]["table"].shape[0] == 4 * 16 * 16 and int(state["state_dict"]["iterations"]) >= 1


def test_the_memory_check_counts_every_process_of_the_machine(tmp_path):
    """Each process needs a bit over 1 GB (mostly the interpreter, torch and Lightning): one
    fits in 1.5 GB, two on the same machine do not, and the refusal says why."""
    from conftest import run_cli

    one = run_cli(_args(tmp_path, "one", "data.memory_limit_gb=1.5"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_cli(_args(tmp_path, "two", "data.memory_limit_gb=1.5", "trainer=ddp_cpu"))
    assert two.returncode != 0
    last = two.stderr.strip().splitlines()[-1]
    assert last.startswith("ldsc: error: This run needs about") and "in each of its 2 processes" in last, last


def test_the_launchers_observer_gives_rank_0_time_to_finish_its_own_stop():
    """Lightning's observer kills rank 0 (SIGKILL) as soon as a launched process exits non-zero;
    when all of them stop together, rank 0 may still be writing its checkpoint or its sentence. The
    patient observer waits first, and still kills a rank 0 that does not finish."""
    import subprocess
    import sys
    import time

    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    from ldsc.distributed import patient_child_observer

    rank0 = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stands in for rank 0
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1); raise SystemExit(143)"])
    observer = _ChildProcessObserver(rank0.pid, [child], sleep_period=0.5)
    observer.start()
    try:
        assert patient_child_observer(grace_s=3.0)  # (the child is still running: nothing to see yet)
        assert not patient_child_observer(grace_s=3.0)  # once
        child.wait()
        time.sleep(1.0)  # the observer has seen the exit; an impatient one would have killed rank 0 by now
        assert rank0.poll() is None
        assert rank0.wait(timeout=30) == -9  # after the grace: killed, as Lightning intends
    finally:
        rank0.kill()
