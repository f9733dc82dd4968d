"""FEC on this machine: seconds per image of each variant, and a single-image run's stage times.

Random weights (``backbone.pretrained=false``: the official checkpoints cannot be downloaded here)
at the checkpoints' 224 px: the cost is the real one, the groupings mean nothing. Per variant, the
backbone's capture of every cluster block and pooling (f, v, assignments) over batches of real
photographs, median of ``--repeats`` batches after a warm-up; then ``python -m ldsc.run
experiment=fec_clusters`` on ``single_image.jpg`` per graph type, its ``stages.json``.

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="small,base,large")
    p.add_argument("--graphs", default="assign,vv,qk")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    rows = [per_image(v, a.batch, a.repeats) for v in a.variants.split(",")]
    rows += [single_run(g, "small") for g in a.graphs.split(",")]
    with open(a.out, "a") if a.out else open("/dev/null", "w") as sink:
        for row in rows:
            line = json.dumps(row)
            print(line, flush=True)
            sink.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
