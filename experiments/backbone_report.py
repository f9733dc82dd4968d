"""Which layers each backbone captures at its default settings, and how fast it runs.

Builds randomly initialised models of the real architectures (``--size tiny``: the test suite's
tiny stand-ins; ``--size base``: the published sizes — ViT-B/16 CLIP, ViT-B/8 DINO, ViT-B/16
MAE, the SD v1 UNet + VAE), saves them with ``save_pretrained`` and loads them through the same
``backbone.model_id`` path a user takes, with every other setting from ``conf/backbone/<name>.yaml``
(``--size tiny`` also shrinks ``input_size`` to what the tiny model is made for). Then it feeds
real images and prints one JSON line per backbone: the captured layers with their token grid,
heads and head width, and the seconds per image (median over ``--repeats`` batches, after one
warm-up batch), plus the graph-building time for ``graph=qk``.

    python experiments/backbone_report.py                       # tiny models, CPU
    python experiments/backbone_report.py --size base --device cuda --dtype bfloat16

Random weights give the real layer layout and the real cost; they do not give meaningful
eigenvectors (that needs the pretrained weights, see docs/data-and-backbones.md, "Getting the weights").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the model builders live beside the tests that use them

from tiny_models import MAKERS, TINY_INPUT  # noqa: E402

BACKBONES = ("sd", "clip", "dino", "mae")


def compose_backbone(name: str, overrides: list[str]):
    """The user's config for ``backbone=name`` (plus overrides), from ``conf/``."""
    from hydra import compose, initialize_config_dir

    from ldsc.run import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[f"backbone={name}", *overrides])
    return cfg


def images(n: int, size: int) -> torch.Tensor:
    """``n`` real photographs (../shared/data if present, else scikit-image's) as ``(n,3,size,size)``."""
    from ldsc.runtime.data import image_tensor

    shared = REPO.parent / "shared" / "data" / "coco_val2017_first100"
    if shared.is_dir():
        files = sorted(shared.glob("*.jpg"))[:n]
    else:
        from skimage import data

        files = [Path(data.data_dir) / f for f in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")][:n]
    return torch.stack([image_tensor(f, size) for f in files])


def report(name: str, size: str, batch: int, repeats: int, device: str, dtype: str) -> dict:
    from hydra.utils import instantiate

    with tempfile.TemporaryDirectory(prefix=f"ldsc-{name}-{size}-") as tmp:
        t = time.perf_counter()
        model_dir = MAKERS[name](tmp, size=size)
        build_s = time.perf_counter() - t
        overrides = [f"backbone.model_id={model_dir}", f"backbone.dtype={dtype}"]
        if size == "tiny":
            overrides.append(f"backbone.input_size={TINY_INPUT[name]}")
        cfg = compose_backbone(name, overrides)
        t = time.perf_counter()
        backbone = instantiate(cfg.backbone).to(device)
        load_s = time.perf_counter() - t
        graphs = instantiate(cfg.graph)
        x = images(batch, backbone.input_size).to(device)
        gen = torch.Generator(device=device).manual_seed(0)
        times, graph_times = [], []
        for i in range(repeats + 1):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                feats = backbone(x, generator=gen)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t_backbone = time.perf_counter() - t
            t = time.perf_counter()
            built = graphs(feats, 32)
            t_graph = time.perf_counter() - t
            if i:  # the first batch is a warm-up
                times.append(t_backbone / batch)
                graph_times.append(t_graph / batch)
        params = sum(p.numel() for p in backbone.parameters())
        layers = [{"name": f.name, "grid": list(f.grid), "heads": int(f.q.shape[1]), "head_dim": int(f.q.shape[-1]),
                   "timestep": None if f.timestep is None else f.timestep.tolist()} for f in feats]
        return {
            "backbone": name, "size": size, "device": device, "dtype": dtype, "params_m": round(params / 1e6, 1),
            "input_size": backbone.input_size, "batch": batch, "n_layers": len(layers),
            "grids": sorted({tuple(lay["grid"]) for lay in layers}, reverse=True),
            "sec_per_image": round(statistics.median(times), 4),
            "graph_sec_per_image": round(statistics.median(graph_times), 4),
            "n_graphs": len(built), "build_s": round(build_s, 1), "load_s": round(load_s, 1),
            "torch_threads": torch.get_num_threads(), "layers": layers,
        }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    ap.add_argument("--size", default="tiny", choices=("tiny", "base"))
    ap.add_argument("--batch", type=int, default=2, help="images per forward pass")
    ap.add_argument("--repeats", type=int, default=3, help="timed batches after one warm-up")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--brief", action="store_true", help="leave out the per-layer list")
    args = ap.parse_args(argv)
    for name in args.backbones:
        row = report(name, args.size, args.batch, args.repeats, args.device, args.dtype)
        if args.brief:
            row.pop("layers")
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
