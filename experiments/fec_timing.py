"""FEC on this machine: seconds per image of each variant, a single-image run's stage times, and how
strongly graph=assign joins the images of a data set.

Random weights (``backbone.pretrained=false``: the official checkpoints cannot be downloaded here)
at the checkpoints' 224 px: the cost is the real one, the groupings mean nothing. Per variant, the
backbone's capture of every cluster block and pooling (f, v, assignments) over batches of real
photographs, median of ``--repeats`` batches after a warm-up; then ``python -m ldsc.run
experiment=fec_clusters`` on ``single_image.jpg`` per graph type, its ``stages.json``.

``balance``: 16 labelled composites (experiments/composite.py) through FEC-small, ``graph=assign``
with ``graph.inter_weight`` 1, auto and 30, and ``graph=vv``: the share of the eigenvectors'
variance (leading vector dropped) that lies between images — near 1 when the graphs barely join the
images and the eigenvectors mostly tell images apart. A structural property, meaningful with
random weights too.

    python experiments/fec_timing.py --out notes/measurements/fec_cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def photographs(n: int, size: int) -> torch.Tensor:
    from ldsc.features.images import image_tensor

    files = sorted((SHARED / "coco_val2017_first100").glob("*.jpg"))[:n]
    if not files:
        import skimage.data

        files = sorted(Path(skimage.data.__file__).parent.glob("*.png"))[:n]
    return torch.stack([image_tensor(f, size) for f in files])


def per_image(variant: str, batch: int, repeats: int) -> dict:
    from ldsc.features.backbones.fec import FECBackbone

    backbone = FECBackbone(variant=variant, pretrained=False)
    x = photographs(batch, backbone.input_size)
    backbone(x)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        layers = backbone(x)
        times.append((time.perf_counter() - t) / batch)
    return {"case": "per_image", "variant": variant, "params_m": round(sum(p.numel() for p in backbone.model.parameters()) / 1e6, 2),
            "layers": len(layers), "grids": sorted({f.grid[0] for f in layers}, reverse=True),
            "s_per_image": round(statistics.median(times), 4), "batch": batch,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def single_run(graph: str, variant: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "ldsc.run", "experiment=fec_clusters", f"graph={graph}",
                            f"backbone.variant={variant}", "backbone.pretrained=false",
                            f"data.path={SHARED / 'single_image.jpg'}", "logger=none", f"store.dir={tmp}/store",
                            f"hydra.run.dir={tmp}/run"], capture_output=True, text=True)
        wall = time.perf_counter() - t
        if r.returncode:
            raise SystemExit(r.stderr[-2000:])
        stages = json.loads((Path(tmp) / "run" / "stages.json").read_text())
    return {"case": "single_image_run", "variant": variant, "graph": graph, "wall_s": round(wall, 2),
            "stages_s": {k: v.get("seconds") for k, v in stages.items() if isinstance(v, dict)}}


def between_image_share(E: torch.Tensor) -> float:
    """Mean over eigenvectors (the leading one dropped) of the variance of the per-image means over
    the total variance."""
    E = E[:, 1:].double()
    X = E.permute(1, 0, 2, 3).reshape(E.shape[1], E.shape[0], -1)
    return float((X.mean(2).var(1, unbiased=False) / X.var(dim=(1, 2), unbiased=False)).mean())


def balance(n_images: int = 16) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from composite import build

    rows = []
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        build(SHARED / "coco_val2017_first100", Path(tmp) / "composite", n_sources=8, n_images=n_images)
        for name, over in [("assign, inter_weight=1", ["graph=assign", "graph.inter_weight=1"]),
                           ("assign, inter_weight=auto", ["graph=assign"]),
                           ("assign, inter_weight=30", ["graph=assign", "graph.inter_weight=30"]), ("vv", ["graph=vv"])]:
            run = Path(tmp) / name.replace(" ", "").replace(",", "_").replace("=", "")
            r = subprocess.run([sys.executable, "-m", "ldsc.run", "backbone=fec", "backbone.pretrained=false", "data=folder",
                                f"data.root={Path(tmp) / 'composite' / 'images'}", *over, "logger=none",
                                "callbacks.export.figures=false", f"store.dir={tmp}/store", f"hydra.run.dir={run}"],
                               capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(r.stderr[-2000:])
            E = torch.load(run / "eigvecs.pt", weights_only=True)["eigvecs"]
            rows.append({"case": "balance", "graph": name, "images": n_images,
                         "between_image_share": round(between_image_share(E), 3)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="small,base,large")
    p.add_argument("--graphs", default="assign,vv,qk")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", default="per_image,single,balance")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    cases = a.cases.split(",")
    rows = [per_image(v, a.batch, a.repeats) for v in a.variants.split(",")] if "per_image" in cases else []
    rows += [single_run(g, "small") for g in a.graphs.split(",")] if "single" in cases else []
    rows += balance() if "balance" in cases else []
    with open(a.out, "a") if a.out else open("/dev/null", "w") as sink:
        for row in rows:
            line = json.dumps(row)
            print(line, flush=True)
            sink.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
