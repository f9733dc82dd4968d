"""Which layers each backbone captures at its default settings, how fast it runs, how much memory.

Builds randomly initialised models of the real architectures (``--size tiny``: the test suite's
tiny stand-ins; ``--size base``: the published sizes — SD 1.x / 2.x / XL UNets and VAEs, SD 3.5-medium,
PixArt-α XL and FLUX.1 transformers, ViT-B CLIP / DINO / MAE / DINOv2 (+registers) / DINOv3 / SigLIP,
timm's DINOv2-reg and EVA-02; text encoders stay tiny: only the empty prompt is embedded),
saves them with ``save_pretrained`` (timm: ``save_for_hf``) and loads them through the path a user
takes (``backbone.model_id`` / ``backbone.model_name=local-dir:``), every other setting from
``conf/backbone/<group>.yaml`` (``--size tiny`` also shrinks ``input_size`` to what the tiny model
is made for). Then it feeds real images and prints one JSON line per backbone: the captured
layers with their token grid, heads and head width, the seconds per image (median over
``--repeats`` batches, after one warm-up batch), the graph-building time for ``graph=qk``, and the
process's peak memory (each backbone runs in its own process, under a ``--memory-gb`` cap: a model
that does not fit is reported as such, not swapped).

    python experiments/backbone_report.py                       # tiny models, CPU
    python experiments/backbone_report.py --size base --brief   # real sizes on this CPU (make backbone-report)
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

#: report name → (config group, tiny_models maker)
BACKBONES = {
    "sd": ("sd", "sd"), "sd2": ("sd2", "sd2"), "sdxl": ("sdxl", "sdxl"),
    "sd3": ("dit", "sd3"), "pixart": ("dit", "pixart"), "flux": ("dit", "flux"),
    "clip": ("clip", "clip"), "dino": ("dino", "dino"), "mae": ("mae", "mae"),
    "dinov2": ("dinov2", "dinov2"), "dinov2_reg": ("dinov2_reg", "dinov2_reg"), "dinov3": ("hf", "dinov3"),
    "siglip": ("siglip", "siglip"), "timm_dinov2_reg": ("timm", "timm_dinov2_reg"), "timm_eva02": ("timm", "timm_eva02"),
}


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


def build(name: str, size: str, folder: str, dtype: str = "float32") -> float:
    """Write the random ``name`` model of ``size`` into ``folder``, its weights files in ``dtype``
    (a half-precision run then maps half the bytes: SDXL and SD3 fit this machine so); seconds taken."""
    from safetensors.torch import load_file, save_file

    t = time.perf_counter()
    MAKERS[BACKBONES[name][1]](folder, size=size)
    if dtype != "float32":
        target = getattr(torch, dtype)
        for f in Path(folder).rglob("*.safetensors"):
            tensors = {k: v.to(target) if v.is_floating_point() else v for k, v in load_file(f).items()}
            save_file(tensors, f, metadata={"format": "pt"})
            del tensors
    return time.perf_counter() - t


def report(name: str, size: str, batch: int, repeats: int, device: str, dtype: str, model_dir: str | None = None) -> dict:
    from hydra.utils import instantiate

    group, maker = BACKBONES[name]
    with tempfile.TemporaryDirectory(prefix=f"ldsc-{name}-{size}-") as tmp:
        build_s = None
        if model_dir is None:
            model_dir = tmp
            build_s = build(name, size, tmp)
        source = f"backbone.model_name=local-dir:{model_dir}" if group == "timm" else f"backbone.model_id={model_dir}"
        overrides = [source, f"backbone.dtype={dtype}"]
        if size == "tiny":
            overrides.append(f"backbone.input_size={TINY_INPUT[maker]}")
        from ldsc.layers import compose_backbone  # (the config a run composes)

        cfg = compose_backbone([f"backbone={group}", *overrides])
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
        described = backbone.describe_layers()
        return {
            "backbone": name, "config": f"backbone={group}", "size": size, "device": device, "dtype": dtype,
            "model": type(getattr(backbone, "unet", None) or getattr(backbone, "transformer", None)
                          or getattr(backbone, "model", backbone)).__name__,
            "params_m": round(params / 1e6, 1), "layers_total": len(described),
            "dropped": sorted({int(r["dropped"]) for r in described}),
            "input_size": backbone.input_size, "batch": batch, "n_layers": len(layers),
            "grids": sorted({tuple(lay["grid"]) for lay in layers}, reverse=True),
            "sec_per_image": round(statistics.median(times), 4),
            "graph_sec_per_image": round(statistics.median(graph_times), 4),
            "n_graphs": len(built), "build_s": None if build_s is None else round(build_s, 1), "load_s": round(load_s, 1),
            "torch_threads": torch.get_num_threads(), "layers": layers,
        }


def run_isolated(name: str, args) -> dict:
    """Build the model in one child process, then measure it in another, capped at ``--memory-gb``
    of address space, which reports its peak RSS (the building one's copy of the weights is not
    counted)."""
    import resource
    import subprocess

    import os

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def child(extra, limit_bytes):
        def cap():
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

        cmd = [sys.executable, __file__, *extra, "--size", args.size, "--batch", str(args.batch), "--repeats",
               str(args.repeats), "--device", args.device, "--dtype", args.dtype]
        return subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cap if args.device == "cpu" else None)

    def failed(res, stage):
        tail = (res.stderr.strip().splitlines() or ["?"])[-1][:300]
        memory = any(s in res.stderr for s in ("can't allocate memory", "MemoryError", "not enough memory",
                                               "Cannot allocate memory", "std::bad_alloc"))
        return {"backbone": name, "size": args.size, "device": args.device, "dtype": args.dtype,
                "error": f"does not fit in {args.memory_gb:g} GB of memory ({stage}: {tail})" if memory else f"{stage}: {tail}"}

    with tempfile.TemporaryDirectory(prefix=f"ldsc-report-{name}-") as folder:
        t = time.perf_counter()
        # (building holds the weights and re-reads them: capped by the machine only, not measured)
        res = child(["--build", name, "--model-dir", folder], int(0.95 * physical))
        if res.returncode != 0:
            return failed(res, "building the random model")
        build_s = time.perf_counter() - t
        res = child(["--one", name, "--model-dir", folder], int(args.memory_gb * 2 ** 30))
        lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
        if res.returncode != 0 or not lines:
            return failed(res, "loading and running it")
        row = json.loads(lines[-1])
        row["build_s"] = round(build_s, 1)
        return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child processes of run_isolated
    ap.add_argument("--build", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--memory-gb", type=float, default=20.0, help="address-space cap of each backbone's process")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--size", default="tiny", choices=("tiny", "base"))
    ap.add_argument("--batch", type=int, default=2, help="images per forward pass")
    ap.add_argument("--repeats", type=int, default=3, help="timed batches after one warm-up")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--brief", action="store_true", help="leave out the per-layer list")
    args = ap.parse_args(argv)
    if args.build:  # in the first child: the random model, saved
        build(args.build, args.size, args.model_dir, args.dtype)
        return 0
    if args.one:  # in the second child: one backbone, its peak memory
        import resource

        row = report(args.one, args.size, args.batch, args.repeats, args.device, args.dtype, args.model_dir)
        row["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
        print(json.dumps(row), flush=True)
        return 0
    out = open(args.out, "a") if args.out else None
    for name in args.backbones:
        row = run_isolated(name, args)
        if args.brief:
            row.pop("layers", None)
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
