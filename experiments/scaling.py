"""Data-set scaling: the whole pipeline (`python -m ldsc.run`) on folders of 10^2..10^4 images,
wall time and peak memory per stage, and alignment with an exact reference where affordable.

    python experiments/make_images.py --sources ../shared/data/coco_val2017_first100 --n 10000 --out data/crops10k
    python experiments/scaling.py --source data/crops10k --sizes 300,1000,10000 --reference-sizes 300

For every size N the first N images of ``--source`` are linked into ``<work>/imagesN`` and one run
of the default config (``graph=vv``, K = 15, 32x32 base grid, pixel backbone with
``backbone.n_features=32``: 64-dimensional vectors; ``--n-features 384``: 768, the width of ViT-B,
which ``graph.dim=auto`` reduces by PCA for layers beyond ``graph.max_vectors_gb``) is timed in a
subprocess; its ``stages.json`` gives seconds and peak resident memory per stage (features,
graphs: vectors / search / symmetrise and per layer, solve, export); the run's peak is the
largest of them. For sizes in ``--reference-sizes`` the exact
reference (``solver=exact graph.search=exact``: brute-force neighbours, ``eigsh``) is run too and
the alignment of the default run's eigenvectors with it is reported. One JSON line per run, also
appended to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def link_images(source: Path, n: int, folder: Path) -> Path:
    files = sorted(p for p in source.iterdir() if p.is_file())[:n]
    if len(files) < n:
        raise SystemExit(f"{source} has only {len(files)} images, {n} asked")
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        link = folder / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    return folder


def sample_rss(proc: subprocess.Popen, path: Path, every: float = 1.0) -> None:
    """Write ``seconds resident_MB user_s system_s`` of ``proc`` to ``path`` every ``every`` seconds
    until it exits (a memory and CPU timeline, to see which step of a stage holds the peak)."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    t0 = time.perf_counter()
    with open(path, "w") as f:
        while proc.poll() is None:
            try:
                kb = next(int(line.split()[1]) for line in open(f"/proc/{proc.pid}/status") if line.startswith("VmRSS:"))
                stat = open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()
            except (OSError, StopIteration):
                break
            user, system = int(stat[11]) / tick, int(stat[12]) / tick
            f.write(f"{time.perf_counter() - t0:.1f} {kb / 1024:.0f} {user:.1f} {system:.1f}\n")
            f.flush()
            time.sleep(every)


def run(args: list[str], out_dir: Path, rss_log: Path | None = None) -> dict:
    """One `python -m ldsc.run` in a subprocess: wall seconds, peak RSS (MB) and its stages."""
    import threading

    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ldsc.run", *args, f"hydra.run.dir={out_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = threading.Thread(target=sample_rss, args=(proc, rss_log), daemon=True) if rss_log else None
    if sampler:
        sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t
    if sampler:
        sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {' '.join(args)}\n{stderr[-3000:]}")
    stages = json.loads((out_dir / "stages.json").read_text())
    # each stage resets the kernel's peak-RSS counter, so the process peak is the largest stage peak
    peak = max(v["peak_rss_mb"] for v in stages.values() if isinstance(v, dict) and "peak_rss_mb" in v)
    return {"wall_s": round(wall, 1), "peak_rss_mb": peak, "stages": stages}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True, help="folder of at least max(--sizes) images")
    ap.add_argument("--sizes", default="300,1000,10000")
    ap.add_argument("--reference-sizes", default="300")
    ap.add_argument("--work", default="outputs/scaling")
    ap.add_argument("--out", default=str(REPO / "notes" / "measurements" / "scaling_cpu.jsonl"))
    ap.add_argument("--override", nargs="*", default=[], help="extra overrides for every run")
    ap.add_argument("--n-features", type=int, default=32,
                    help="the pixel backbone's n_features (vectors twice as wide; 384: ViT-B's 768)")
    ap.add_argument("--rss-log", action="store_true",
                    help="also write each run's memory timeline (seconds, resident MB) to <work>/runN.rss")
    ap.add_argument("--reuse-reference", action="store_true",
                    help="keep an exact reference already in <work>/exactN (its graphs do not depend on the search)")
    args = ap.parse_args(argv)

    from ldsc.spectral import subspace_alignment
    import torch

    work = Path(args.work).resolve()
    common = ["data=folder", "graph=vv", "K=15", f"backbone.n_features={args.n_features}", f"store.dir={work / 'store'}",
              "callbacks.alignment.enabled=false", "trainer.max_epochs=50", *args.override]
    refs = {int(s) for s in args.reference_sizes.split(",") if s}
    for n in [int(s) for s in args.sizes.split(",")]:
        images = link_images(Path(args.source), n, work / f"images{n}")
        line = {"images": n, "tokens_base": n * 1024, "threads": torch.get_num_threads(),
                "overrides": common[1:]}
        line.update(run([*common, f"data.root={images}"], work / f"run{n}",
                        work / f"run{n}.rss" if args.rss_log else None))
        if n in refs:
            done = work / f"exact{n}" / "eigvecs.pt"
            ref = {"wall_s": None, "peak_rss_mb": None, "reused": True} if args.reuse_reference and done.exists() else run([*common, f"data.root={images}", "solver=exact", "graph.search=exact",
                       f"solver.max_tokens={n * 1024}", "callbacks.export.figures=false"], work / f"exact{n}")
            Z = torch.load(work / f"run{n}" / "eigvecs.pt", weights_only=True)["eigvecs"]
            R = torch.load(work / f"exact{n}" / "eigvecs.pt", weights_only=True)["eigvecs"]
            line["alignment_with_exact"] = round(subspace_alignment(Z, R), 5)
            line["exact_reference"] = {"wall_s": ref["wall_s"], "peak_rss_mb": ref["peak_rss_mb"]}
        print(json.dumps(line), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
