"""The GPU check: every newer backbone at its real size (random weights, bf16) into the feature store,
then the whole pipeline on the GPU for 100 images — one JSON line per check.

    python experiments/gpu_check.py                 # on a GPU: real sizes, bf16 (under 8 minutes on one H200)
    python experiments/gpu_check.py --dry-run       # anywhere: tiny models, CPU, float32 (the test suite runs this)
    make gpu-check

Checks (``--checks`` picks some):

* ``store:<backbone>`` for ``sd`` (SD 1.x UNet + VAE at 512 px), ``sdxl`` (SDXL at 1024 px), ``dit``
  (SD 3.5-medium's MMDiT at 1024 px), ``dinov2`` (DINOv2 ViT-B/14 at 518 px) and ``fec`` (FEC-large
  at 224 px, from an official-layout ``.pth.tar``): the published
  architecture with random weights (text encoders tiny: only the empty prompt is embedded),
  saved with ``save_pretrained`` and loaded through ``backbone.model_id`` as a user loads it,
  then ``--store-images`` images written into a feature store (the ``qk`` graph's kinds, float16)
  after one warm-up batch. Reports images/s, peak GPU memory, layers, token grids, store size.
* ``pipeline``: 100 images through DINOv2-B at 518 px, then :class:`ldsc.LDSC` on the GPU (graphs
  — the exact search runs there —, LOBPCG) and the export of ``eigvecs.pt``; seconds per stage,
  LOBPCG iterations, residual, peak GPU memory.

Images: random crops and flips of scikit-image's photographs (no data set needed on the GPU
machine). Random weights give the real layer layout and cost, not meaningful eigenvectors.

On the lent GPU machine (python3 there has torch, transformers, timm; see notes/plan.md for the
wheels of diffusers, faiss-cpu, hydra-core and omegaconf that travel in ``.whl``)::

    PYTHONPATH=src:tests python3 experiments/gpu_check.py --out $OUT/gpu_check.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the model builders live beside the tests that use them
sys.path.insert(0, str(REPO / "src"))

#: backbone → (maker in tests/tiny_models.py, backbone class path, real input size, images into the store)
STORE_CHECKS = {
    "sd": ("sd", "ldsc.features.backbones.sd.StableDiffusionBackbone", 512, 64),
    "sdxl": ("sdxl", "ldsc.features.backbones.sd.StableDiffusionXLBackbone", 1024, 16),
    "dit": ("sd3", "ldsc.features.backbones.dit.DiffusionTransformerBackbone", 1024, 16),
    "dinov2": ("dinov2", "ldsc.features.backbones.hf.HFBackbone", 518, 128),
    "fec": ("fec", "ldsc.features.backbones.fec.FECBackbone", 224, 256),  # FEC-large (dry run: small at 64 px)
}
CHECKS = [f"store:{name}" for name in STORE_CHECKS] + ["pipeline"]


def make_images(folder: Path, n: int, side: int = 640, seed: int = 0) -> list[str]:
    """``n`` JPEGs: random crops (30–100 % of the area) and flips of scikit-image's photographs."""
    import numpy as np
    from PIL import Image
    from skimage import data

    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        img = sources[i % len(sources)]
        h, w = img.shape[:2]
        frac = rng.uniform(0.3, 1.0)
        ch, cw = max(16, int(h * frac ** 0.5)), max(16, int(w * frac ** 0.5))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = img[y:y + ch, x:x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        path = folder / f"crop_{i:04d}.jpg"
        Image.fromarray(np.ascontiguousarray(crop)).resize((side, side)).save(path, quality=90)
        files.append(str(path))
    return files


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_gb(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def load_backbone(name: str, model_dir: str, dry: bool, dtype: str):
    import importlib

    maker, target, size, _ = STORE_CHECKS[name]
    module, _, cls = target.rpartition(".")
    from tiny_models import TINY_INPUT

    if name == "fec":  # an official-layout .pth.tar of random weights, loaded strictly as a user loads one
        return getattr(importlib.import_module(module), cls)(variant="small" if dry else "large", checkpoint=model_dir,
                                                            input_size=64 if dry else size, dtype=dtype)
    options = dict(dtype=dtype, input_size=TINY_INPUT[maker] if dry else size)
    if name in ("sd", "sdxl"):
        options["max_grid"] = None if dry else (32 if name == "sd" else 64)
    return getattr(importlib.import_module(module), cls)(model_dir, **options)


def fec_checkpoint(folder: Path, dry: bool) -> str:
    """FEC-large (dry run: small) with random weights, saved as the official checkpoints are."""
    from ldsc.features.backbones.fec_model import FEC

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fec.pth.tar"
    torch.save({"epoch": 0, "state_dict": FEC.variant("small" if dry else "large").state_dict()}, path)
    return str(path)


def store_check(name: str, files: list[str], work: Path, dry: bool, device: str, dtype: str, batch: int) -> dict:
    from tiny_models import MAKERS

    from ldsc.features.store import build_store

    maker = STORE_CHECKS[name][0]
    t = time.perf_counter()
    model_dir = fec_checkpoint(work / "model_fec", dry) if name == "fec" else \
        MAKERS[maker](str(work / f"model_{name}"), size="tiny" if dry else "base")
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    backbone = load_backbone(name, model_dir, dry, dtype).to(device)
    load_s = time.perf_counter() - t
    n = min(len(files), STORE_CHECKS[name][3] if not dry else 2)
    reset_peak(device)
    from ldsc.features.images import image_tensor

    warm = torch.stack([image_tensor(f, backbone.input_size) for f in files[:batch]]).to(device)
    with torch.no_grad():  # warm-up: kernels chosen, memory pools filled
        layers = backbone(warm, generator=torch.Generator(device=device).manual_seed(0))
    sync(device)
    t = time.perf_counter()
    store = build_store(work / f"store_{name}", files[:n], backbone, ["q", "k"], batch_size=batch, device=device,
                        progress=False)
    sync(device)
    seconds = time.perf_counter() - t
    size = sum(f.stat().st_size for f in (work / f"store_{name}").iterdir())
    grids = sorted({tuple(layer.grid) for layer in layers}, reverse=True)
    row = dict(check=f"store:{name}", model=type(getattr(backbone, "unet", None) or getattr(backbone, "transformer", None)
                                                 or backbone.model).__name__,
               params_m=round(sum(p.numel() for p in backbone.parameters()) / 1e6, 1), input_size=backbone.input_size,
               dtype=dtype, images=n, batch=batch, images_per_s=round(n / seconds, 2), seconds=round(seconds, 2),
               peak_gpu_gb=peak_gb(device), layers=len(layers), grids=[list(g) for g in grids],
               store_gb=round(size / 2 ** 30, 3), build_s=round(build_s, 1), load_s=round(load_s, 1))
    del store, backbone, layers, warm
    return row


def pipeline_check(files: list[str], work: Path, dry: bool, device: str, dtype: str, batch: int) -> dict:
    from tiny_models import MAKERS

    from ldsc import LDSC
    from ldsc.estimator import extract_features
    from ldsc.export import save_eigenvectors

    model_dir = MAKERS["dinov2"](str(work / "model_pipeline"), size="tiny" if dry else "base")
    backbone = load_backbone("dinov2", model_dir, dry, dtype).to(device)
    reset_peak(device)
    stages = {}
    sync(device)
    t = time.perf_counter()
    model = LDSC(K=15 if not dry else 4, graph="qk", device=device, progress=False)
    features = extract_features(files, backbone, None, model.builder.kinds, batch_size=batch, progress=False)
    sync(device)
    stages["features_s"] = round(time.perf_counter() - t, 2)
    model.fit(features)
    stages.update(model.timings_)
    t = time.perf_counter()
    save_eigenvectors(work / "export", model.eigenvectors_, files)
    stages["export_s"] = round(time.perf_counter() - t, 2)
    return dict(check="pipeline", images=len(files), backbone="dinov2", input_size=backbone.input_size, dtype=dtype,
                grid=list(features[0].grid), layers=len(features), K=model.K, base_size=model.base_size_,
                iterations=model.iterations_, residual=model.residual_, **stages,
                total_s=round(sum(v for k, v in stages.items() if k.endswith("_s")), 2), peak_gpu_gb=peak_gb(device),
                eigvecs_shape=list(model.eigenvectors_.shape))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny models on the CPU in float32 (a check of the script)")
    ap.add_argument("--checks", nargs="+", default=CHECKS, choices=CHECKS)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 in a dry run")
    ap.add_argument("--batch", type=int, default=None, help="images per backbone pass (default 8; 2 in a dry run)")
    ap.add_argument("--pipeline-images", type=int, default=100)
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    dtype = args.dtype or ("float32" if args.dry_run else "bfloat16")
    batch = args.batch or (2 if args.dry_run else 8)
    card = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    started = time.perf_counter()
    out = open(args.out, "a") if args.out else None
    with tempfile.TemporaryDirectory(prefix="ldsc-gpu-check-") as tmp:
        work = Path(tmp)
        n_images = 6 if args.dry_run else max(args.pipeline_images, max(c[3] for c in STORE_CHECKS.values()))
        files = make_images(work / "images", n_images, side=96 if args.dry_run else 640)
        for check in args.checks:
            t = time.perf_counter()
            try:
                if check == "pipeline":
                    row = pipeline_check(files[: 6 if args.dry_run else args.pipeline_images], work, args.dry_run,
                                         device, dtype, batch)
                else:
                    row = store_check(check.split(":", 1)[1], files, work, args.dry_run, device, dtype, batch)
            except Exception as err:  # noqa: BLE001 - one check failing must not hide the others' figures
                row = dict(check=check, error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
            row.update(device=card, wall_s=round(time.perf_counter() - t, 1), dry_run=args.dry_run)
            line = json.dumps(row)
            print(line, flush=True)
            if out:
                out.write(line + "\n")
                out.flush()
    print(json.dumps({"check": "total", "device": card, "wall_s": round(time.perf_counter() - started, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
