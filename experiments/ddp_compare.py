"""One process against several: the same `python -m ldsc.run` on one process and on
``--devices`` gloo processes (``trainer=ddp_cpu``), side by side in one run.

    python experiments/ddp_compare.py --root ../shared/data/coco_val2017_first100 --devices 2

Each run gets a fresh feature store. Reported per run: wall seconds (whole process tree), and per
process (``stages.json`` / ``stages.rank<r>.json``): the seconds and peak resident memory of each
stage, and the MB held in graphs and in the solver's state (``held_mb``); plus the alignment of
the several-process eigenvectors with the one-process ones (mean cos² of the principal angles).
One JSON line per run is appended to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ldsc.run", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="folder of images")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--override", nargs="*", default=["graph=vv", "K=15"])
    ap.add_argument("--out", default=str(REPO / "notes" / "measurements" / "ddp_cpu.jsonl"))
    args = ap.parse_args(argv)

    import torch

    from ldsc.spectral import subspace_alignment

    common = ["data=folder", f"data.root={Path(args.root).resolve()}", *args.override,
              "callbacks.export.figures=false"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = []
        for name, extra in [("one", []), ("several", ["trainer=ddp_cpu", f"trainer.devices={args.devices}"])]:
            wall = run([*common, *extra, f"store.dir={tmp / name / 'store'}", f"hydra.run.dir={tmp / name / 'run'}"])
            out = tmp / name / "run"
            files = sorted(out.glob("stages.rank*.json")) or [out / "stages.json"]
            per_process = [json.loads(f.read_text()) for f in files]
            rows.append({"run": name, "processes": len(files), "overrides": [*args.override, *extra],
                         "wall_s": round(wall, 1),
                         "per_process": [{"graphs_s": s["graphs"]["seconds"], "solve_s": s["solve"]["seconds"],
                                          "peak_rss_mb": {k: v["peak_rss_mb"] for k, v in s.items()
                                                          if isinstance(v, dict) and "peak_rss_mb" in v},
                                          "held_mb": s.get("held_mb")} for s in per_process]})
        a = torch.load(tmp / "one" / "run" / "eigvecs.pt", weights_only=True)["eigvecs"]
        b = torch.load(tmp / "several" / "run" / "eigvecs.pt", weights_only=True)["eigvecs"]
        rows[1]["alignment_with_one_process"] = subspace_alignment(b, a)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for r in rows:
            r["root"] = str(args.root)
            print(json.dumps(r), flush=True)
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
