"""Solver accuracy and speed: one JSON line per (case, solver).

    python -m ldsc.bench                                   # every case and solver (slow: the paper)
    python -m ldsc.bench --cases single --solvers fast,exact
    python -m ldsc.bench --cases coco --paper-epochs 10    # cap the paper solver (labelled "capped")

Solvers: ``exact``, ``fast`` (the default solver as configured), ``fast_minibatch`` (the fast
solver forced into its mini-batch regime, ``solver.whole_max_tokens=0``), ``paper`` and ``ncut``.

Cases (graphs built by the app's own configs: backbone, graph builder and data module):

* ``single``: ``single_image.jpg``, 64×64 base grid, pixel layers 64/32/16, ``K = 15``;
  ``paper`` is ``experiment=paper_single`` (conv net, Adam 2e-3, 2,000 steps accumulated over 20).
* ``coco``: the 101 images of ``coco_val2017_first100`` in data-set mode (``experiment=dataset``:
  32×32, pixel layers 32/16, 25 intra + 25 inter neighbours in batches of 40, ``K = 15``);
  ``paper`` is the data-set recipe (AdamW 1e-2, 5 steps a batch, EMA 0.99, 200 epochs) at ``K = 15``.

Every line has ``wall_s`` (the whole fit: graph construction included), ``solver_s`` (time in the
solver's training steps only), ``alignment`` with the exact top-``K`` eigenspace of the whole
data set's graphs (DESIGN §4), ``residual`` (largest ``‖Mu − θu‖`` of the Ritz vectors of the
solution's span under the exact operator, relative to the largest ``θ``), ``peak_rss_mb`` (peak
resident memory during the run, minus what the process held before) and, per epoch, ``history``
``[epoch, solver_s, wall_s, alignment]``. A run stopped early by ``--paper-steps`` /
``--paper-epochs`` / ``--fast-epochs`` below the recipe's own length has ``"capped": true``.
``exact`` is timed on the reference computation itself (whole-data-set graphs + ``eigsh``), which
is exactly what ``solver=exact`` does. ``ncut`` is ncut-pytorch's Nyström normalised cut on the
same image's 64×64 layer features (``pip install ncut-pytorch``; a line says so when it is absent).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from ldsc.run import build_datamodule

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


class PeakRSS:
    """Samples the process's resident memory every ``interval`` seconds; ``peak_mb`` is the peak
    above the resident memory at entry."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self.base = interval, 0, 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.base = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def peak_mb(self) -> float:
        return round((self.peak - self.base) / 2**20, 1)


def make_probe(reference: torch.Tensor | None):
    """A callback timing the solver's training steps and measuring alignment after each epoch."""
    import lightning as L

    from ldsc.spectral import subspace_alignment

    class Probe(L.Callback):
        def __init__(self):
            self.solver_s, self.history, self._t = 0.0, [], None
            self._start, self._excluded = None, 0.0

        def on_train_start(self, trainer, pl_module):
            self._start = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.solver_s += time.perf_counter() - self._t

        def on_train_epoch_end(self, trainer, pl_module):
            t = time.perf_counter()
            if reference is not None:
                a = subspace_alignment(pl_module.eigenvectors(), reference)
                wall = t - self._start - self._excluded
                self.history.append([trainer.current_epoch, round(self.solver_s, 3), round(wall, 2), round(a, 4)])
            self._excluded += time.perf_counter() - t

    return Probe()



def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ldsc.run import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def ritz_residual(M, Z: torch.Tensor) -> float:
    """Largest ``‖Mu − θu‖ / θ_max`` over the Ritz pairs of ``span(Z)`` under the scipy operator ``M``."""
    from ldsc.spectral import flatten_channels

    X = torch.linalg.qr(flatten_channels(Z.double())).Q.numpy()
    MX = M @ X
    theta, E = np.linalg.eigh((X.T @ MX + MX.T @ X) / 2)
    U, MU = X @ E, MX @ E
    return float(np.linalg.norm(MU - U * theta, axis=0).max() / np.abs(theta).max())


def reference(cfg) -> dict:
    """The exact reference of a case, timed: whole-data-set graphs, operator, eigsh."""
    from ldsc.spectral import exact_operator, top_eigenvectors, unflatten_channels

    dm, base = build_datamodule(cfg)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        graphs = [g.to("cpu") for g in dm.whole_dataset_graphs()]
        t1 = time.perf_counter()
        M = exact_operator(graphs, (base, base))
        vals, vecs = top_eigenvectors(M, int(cfg.K))
        t2 = time.perf_counter()
    n = dm.num_images
    Z = unflatten_channels(torch.from_numpy(vecs.copy()), n, base, base)
    return {"M": M, "Z": Z, "graph_s": t1 - t0, "solve_s": t2 - t1, "peak_rss_mb": mem.peak_mb,
            "n_images": n, "base": base, "nnz": int(M.nnz), "eigenvalues": vals}


def run_solver(cfg, ref: dict) -> dict:
    import lightning as L
    from hydra.utils import instantiate

    from ldsc.spectral import subspace_alignment

    L.seed_everything(int(cfg.seed), verbose=False)
    dm, base = build_datamodule(cfg)
    solver = instantiate(cfg.solver, n_images=dm.num_images, K=int(cfg.K), base_size=base)
    probe = make_probe(ref["Z"])
    trainer = L.Trainer(max_epochs=int(cfg.trainer.max_epochs), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        num_sanity_val_steps=0, callbacks=[probe])
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        trainer.fit(solver, datamodule=dm)
        wall = time.perf_counter() - t0
    Z = solver.eigenvectors()
    return {"wall_s": round(wall - probe._excluded, 2), "solver_s": round(probe.solver_s, 3),
            "alignment": round(subspace_alignment(Z, ref["Z"]), 4), "residual": round(ritz_residual(ref["M"], Z), 5),
            "peak_rss_mb": mem.peak_mb, "epochs": trainer.current_epoch, "history": probe.history}


def ncut_baseline(cfg, ref: dict) -> dict:
    """ncut-pytorch (Nyström normalised cut) on the finest layer's query vectors of the same image."""
    try:
        from ncut_pytorch import Ncut
    except ImportError as err:
        return {"skipped": f"ncut-pytorch is not installed ({err}); pip install ncut-pytorch"}
    from ldsc.graphs import head_vectors
    from ldsc.spectral import subspace_alignment, unflatten_channels

    dm, base = build_datamodule(cfg)
    files = dm.prepare_files()
    from ldsc.data import image_tensor

    images = torch.stack([image_tensor(f, dm.backbone.input_size) for f in files])
    with torch.no_grad():
        layer = next(f for f in dm.backbone(images) if f.grid == (base, base))
    x = head_vectors(layer.vectors("q"), "concat")[0]
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        eig = Ncut(n_eig=int(cfg.K), device="cpu").fit_transform(x)
        dt = time.perf_counter() - t0
    Z = unflatten_channels(eig.double(), len(files), base, base)
    return {"wall_s": round(dt, 3), "solver_s": round(dt, 3), "alignment": round(subspace_alignment(Z, ref["Z"]), 4),
            "residual": round(ritz_residual(ref["M"], Z), 5), "peak_rss_mb": mem.peak_mb,
            "note": "its own graph (Nyström RBF affinity of the 64x64 layer's features), not the 3-layer operator"}


def case_overrides(case: str, args) -> list[str]:
    if case == "single":
        return ["experiment=single_image", f"data.path={args.image}", "K=15"]
    if case == "coco":
        return ["experiment=dataset", f"data.root={args.coco}", "K=15", "backbone.divisors=[1,2]"]
    raise SystemExit(f"unknown case {case!r}: choose from single, coco")


def solver_overrides(case: str, solver: str, args) -> tuple[list[str], bool]:
    """Overrides for one solver of one case, and whether the run is capped below its recipe."""
    if solver == "fast":  # small data sets: the whole-data-set graph, solved once (one epoch)
        epochs = args.fast_epochs or (1 if case == "single" else 8)
        return ["solver=fast", f"trainer.max_epochs={epochs}"], False
    if solver == "fast_minibatch":  # the fast solver's regime for data sets too large for that
        epochs = args.fast_epochs or 8
        return ["solver=fast", "solver.whole_max_tokens=0", f"trainer.max_epochs={epochs}"], False
    if solver == "paper":
        if case == "single":
            steps = args.paper_steps or 2000
            return ["solver=paper_single", "trainer.max_epochs=1", f"solver.steps_per_batch={steps}"], steps < 2000
        epochs = args.paper_epochs or 200
        return ["solver=paper", f"trainer.max_epochs={epochs}"], epochs < 200
    raise SystemExit(f"unknown solver {solver!r}: choose from fast, fast_minibatch, paper, exact, ncut")


def emit(line: dict) -> None:
    print(json.dumps(line), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="single,coco")
    p.add_argument("--solvers", default="exact,fast,fast_minibatch,paper,ncut")
    p.add_argument("--image", default=str(SHARED / "single_image.jpg"))
    p.add_argument("--coco", default=str(SHARED / "coco_val2017_first100"))
    p.add_argument("--paper-steps", type=int, default=None, help="cap the single-image paper run (default 2000)")
    p.add_argument("--paper-epochs", type=int, default=None, help="cap the data-set paper run (default 200)")
    p.add_argument("--fast-epochs", type=int, default=None, help="epochs of the fast solver (default 1 / 8)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--reference-cache", default=None,
                   help="folder to keep each case's exact reference in, so later runs skip recomputing it")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")
    solvers = args.solvers.split(",")
    for case in args.cases.split(","):
        base_cfg = compose(case_overrides(case, args))
        cache = Path(args.reference_cache) / f"{case}.pt" if args.reference_cache else None
        if cache is not None and cache.is_file():
            ref = torch.load(cache, weights_only=False)
        else:
            ref = reference(base_cfg)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save({k: v for k, v in ref.items() if k != "graphs"}, cache)
        info = {"case": case, "images": ref["n_images"], "base": ref["base"], "K": int(base_cfg.K),
                "threads": torch.get_num_threads()}
        if "exact" in solvers:
            emit({**info, "solver": "exact", "wall_s": round(ref["graph_s"] + ref["solve_s"], 2),
                  "solver_s": round(ref["solve_s"], 3), "graph_s": round(ref["graph_s"], 2), "alignment": 1.0,
                  "residual": round(ritz_residual(ref["M"], ref["Z"]), 7), "peak_rss_mb": ref["peak_rss_mb"],
                  "operator_nnz": ref["nnz"]})
        for solver in solvers:
            if solver == "exact":
                continue
            if solver == "fast_minibatch" and case == "single":
                continue  # one image is always one whole batch
            if solver == "ncut":
                if case == "single":
                    emit({**info, "solver": "ncut-pytorch", **ncut_baseline(base_cfg, ref)})
                continue
            over, capped = solver_overrides(case, solver, args)
            cfg = compose(case_overrides(case, args) + over)
            emit({**info, "solver": solver, "capped": capped, **run_solver(cfg, ref)})


if __name__ == "__main__":
    main(sys.argv[1:])
