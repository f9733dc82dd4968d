"""Segmentation quality, ldsc against ncut-pytorch, on labelled data made here (``make bench-quality``).

The labelled sets are composites (``experiments/composite.py``): 48 mosaics of 2 x 2 patches cut from
8 (then 16) COCO photographs, each pixel labelled by its source photograph. Both methods get the
*same* pixel features (the ``pixel`` backbone, 32 x 32 base grid):

* ``ldsc``: ``python -m ldsc.run experiment=dataset backbone=pixel graph=vv|qk K=15`` — kNN graphs of
  every pixel layer (32², 16², 8²) over the whole data set, the default LOBPCG solve;
* ``ncut-pytorch``: ``Ncut(n_eig=15).fit_transform`` of the finest layer's vectors — v for the
  ``vv`` row, q for the ``qk`` row — with each of its two affinities (``rbf_affinity``, its
  default, and ``cosine_affinity``); it runs in ``--ncut-python`` (a venv with ncut-pytorch).

Every set of eigenvectors is scored by the same code (``ldsc.evaluation.dataset.evaluate_run``)
under each matching protocol (``dataset``, ``official`` with its greedy variant, ``per-image``):
mIoU and pixel accuracy with as many clusters as sources, and the what/where probes (position R²,
source-label probe accuracy). Each method's whole-process seconds are measured one after the other
in this run. One JSON line per (set, graph, method, affinity) goes to ``--out``; the Markdown
table is printed.

    python experiments/bench_quality.py --ncut-python .venv-ncut/bin/python
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from composite import build  # noqa: E402

from ldsc.bench import SHARED, timed  # noqa: E402

PROTOCOLS = ("dataset", "official", "per-image")


def make_sets(sources: str, work: Path, sizes: list[int], n_images: int) -> dict[int, Path]:
    """The composite sets (reused when already written with the same settings)."""
    sets = {}
    for n in sizes:
        folder = work / f"composite{n}"
        manifest = folder / "manifest.json"
        if not (manifest.is_file() and len(json.loads(manifest.read_text())["composites"]) == n_images):
            build(sources, folder, n_sources=n, n_images=n_images, size=256, grid=2, seed=0)
        sets[n] = folder
    return sets


def scores(run_dir: Path, labels: Path, n_classes: int) -> dict:
    """mIoU / pixel accuracy under every protocol (``official``: its greedy variant too) and the
    what/where probes of the eigenvectors in ``run_dir``."""
    from ldsc.evaluation.dataset import evaluate_run

    out: dict = {}
    for protocol in PROTOCOLS:
        m = evaluate_run(run_dir, labels=labels, clusters=n_classes, num_classes=n_classes, n_figures=0,
                         out=run_dir / f"eval_{protocol}", use_wandb=False, protocol=protocol)
        out[protocol] = {"miou": round(m["miou"], 4), "pixel_accuracy": round(m["pixel_accuracy"], 4)}
        if protocol == "official":
            out["official_greedy"] = {k: round(m["greedy"][k], 4) for k in ("miou", "pixel_accuracy")}
        ww = m["what_where"]
        out["what_where"] = {k: round(ww[k], 4) for k in ("position_r2", "label_accuracy") if ww.get(k) is not None}
    return out


def ncut_run_folder(payload: Path, folder: Path) -> Path:
    """ncut-pytorch's eigenvectors written as a run folder ``evaluate_run`` reads."""
    from ldsc.export import save_eigenvectors

    run = torch.load(payload, weights_only=True)
    save_eigenvectors(folder, run["eigvecs"].float(), run["files"], config={})
    return folder


def table(rows: list[dict]) -> str:
    head = ("| sources | graph | method | whole s | mIoU dataset | acc dataset | mIoU official | greedy mIoU "
            "| mIoU per-image | acc per-image | position R² | label probe |")
    lines = [head, "|" + " --- |" * 12]
    for r in rows:
        s = r["scores"]
        lines.append(f"| {r['sources']} | {r['graph']} | {r['method']} | {r['wall_s']:.1f} | "
                     f"{s['dataset']['miou']:.3f} | {s['dataset']['pixel_accuracy']:.3f} | "
                     f"{s['official']['miou']:.3f} | {s['official_greedy']['miou']:.3f} | "
                     f"{s['per-image']['miou']:.3f} | {s['per-image']['pixel_accuracy']:.3f} | "
                     f"{s['what_where'].get('position_r2', float('nan')):.3f} | "
                     f"{s['what_where'].get('label_accuracy', float('nan')):.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", default=str(SHARED / "coco_val2017_first100"), help="folder of source photographs")
    p.add_argument("--work", default="outputs/bench_quality", help="composites and runs are kept here")
    p.add_argument("--sizes", default="8,16", help="sources per set (= classes)")
    p.add_argument("--n-images", type=int, default=48)
    p.add_argument("--graphs", default="vv,qk")
    p.add_argument("--affinities", default="rbf,cosine", help="ncut-pytorch's affinity functions to run")
    p.add_argument("--ncut-python", default=sys.executable, help="the Python that has ncut_pytorch (and ldsc)")
    p.add_argument("--methods", default="ldsc,ncut-pytorch", help="which of ldsc, ncut-pytorch to run")
    p.add_argument("--K", type=int, default=15)
    p.add_argument("--out", default=None, help="append the JSON lines here too")
    a = p.parse_args(argv)
    if not Path(a.sources).is_dir():
        print(f"bench-quality: the source photographs '{a.sources}' are not there (pass --sources DIR).", file=sys.stderr)
        return 1
    work = Path(a.work)
    sets = make_sets(a.sources, work, [int(n) for n in a.sizes.split(",")], a.n_images)
    py = sys.executable
    rows = []
    sink = open(a.out, "a") if a.out else None
    for n, folder in sets.items():
        images, labels = folder / "images", folder / "labels"
        for graph in a.graphs.split(","):
            runs = []
            methods = a.methods.split(",")
            with tempfile.TemporaryDirectory() as tmp:
                run = work / f"runs{n}" / f"ldsc_{graph}"
                if "ldsc" in methods:
                    wall, _ = timed([py, "-m", "ldsc.run", "experiment=dataset", "backbone=pixel", f"data.root={images}",
                                     f"graph={graph}", f"K={a.K}", "logger=none", "callbacks.export.figures=false",
                                     "trainer.enable_progress_bar=false", "overwrite=true", f"store.dir={tmp}/store",
                                     f"hydra.run.dir={run}"])
                    runs.append(("ldsc", None, wall, run))
                for affinity in (a.affinities.split(",") if "ncut-pytorch" in methods else []):
                    role = "v" if graph == "vv" else "q"
                    payload = Path(tmp) / f"ncut_{affinity}.pt"
                    wall, proc = timed([a.ncut_python, "-m", "ldsc.bench", "--ncut-process", f"--root={images}",
                                        "--base=32", f"--K={a.K}", f"--role={role}", f"--affinity={affinity}",
                                        f"--out={payload}"])
                    runs.append(("ncut-pytorch", affinity, wall,
                                 ncut_run_folder(payload, work / f"runs{n}" / f"ncut_{graph}_{affinity}")))
            for method, affinity, wall, run in runs:
                row = {"case": "quality", "sources": n, "images": a.n_images, "graph": graph,
                       "method": method if affinity is None else f"{method} ({affinity})", "wall_s": round(wall, 2),
                       "scores": scores(run, labels, n)}
                rows.append(row)
                line = json.dumps(row)
                print(line, flush=True)
                if sink:
                    sink.write(line + "\n")
                    sink.flush()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
