"""Measurements of ``ldsc.LDSC`` (docs/benchmarks.md, "Library"), one JSON line per result.

    python experiments/library_check.py cli --root ../shared/data/coco_val2017_first100
    python experiments/library_check.py quality --sources ../shared/data/coco_val2017_first100 --fitted 100,1000,5000
    python experiments/library_check.py speed --sources ../shared/data/coco_val2017_first100 --fitted 1000 --new 10000

* ``cli``: ``LDSC(K=15, graph="vv").fit`` on the pixel backbone's vectors of the images against
  ``python -m ldsc.run graph=vv`` on the same folder (same settings): subspace alignment.
* ``quality``: fit on ``F`` crops, ``transform`` 200 other crops; the span of the extended vectors
  against the span of a fit on all ``F + 200`` crops restricted to the held-out crops' pixels.
* ``speed``: images/s of a fit of ``F`` crops; then ``N`` new crops embedded in batches (crops
  made, passed through the backbone and embedded batch by batch): seconds, images/s per tenth of
  them (the cost must not grow), and the peak resident memory before and after.

Crops: random crops (10–100 % of the area, aspect 3:4–4:3) of the source images, flipped with
probability 1/2, from a seeded generator (``crop_images``); the pixel backbone with
``n_features=32`` (64-d vectors) at base grid 32 (grids 32, 16, 8).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def sources_of(folder: str) -> list:
    from ldsc.features.images import IMAGE_EXTENSIONS, load_image

    return [load_image(p) for p in sorted(Path(folder).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]


def crop_images(sources: list, n: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    """``(n, 3, size, size)`` random crops (see module docstring) in [0, 1]."""
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        img = sources[int(rng.integers(len(sources)))]
        W, H = img.size
        area = W * H * rng.uniform(0.1, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = int(min(W, max(8, round(math.sqrt(area * aspect)))))
        h = int(min(H, max(8, round(math.sqrt(area / aspect)))))
        x, y = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
        crop = img.crop((x, y, x + w, y + h)).resize((size, size))
        if rng.random() < 0.5:
            crop = crop.transpose(0)  # Image.FLIP_LEFT_RIGHT
        out[i] = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return out


def backbone(n_features: int = 32):
    from ldsc.features.backbones.pixel import PixelBackbone

    bb = PixelBackbone(n_features=n_features)
    bb.set_base_size(32)
    return bb


def layers_of(bb, images: torch.Tensor, batch: int = 256) -> list[torch.Tensor]:
    """The ``v`` vectors of every layer, ``(n, h, w, d)`` each."""
    parts = [[f.v[:, 0] for f in bb(images[s:s + batch])] for s in range(0, images.shape[0], batch)]
    return [torch.cat([p[li] for p in parts]) for li in range(len(parts[0]))]


def cli(args) -> None:
    """LDSC.fit against python -m ldsc.run on the same images and settings."""
    from ldsc import LDSC
    from ldsc.export import load_eigenvectors
    from ldsc.features.images import image_tensor
    from ldsc.spectral import subspace_alignment

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "ldsc.run", "data=folder", f"data.root={args.root}", "graph=vv",
                              "logger=none", "callbacks.export.figures=false", f"hydra.run.dir={tmp}/run",
                              f"store.dir={tmp}/store"], capture_output=True, text=True)
        cli_s = time.perf_counter() - t0
        if res.returncode:
            raise SystemExit(res.stderr[-2000:])
        run = load_eigenvectors(f"{tmp}/run")
    bb = backbone(n_features=256)  # the CLI's pixel backbone settings
    t0 = time.perf_counter()
    images = torch.stack([image_tensor(p, bb.input_size) for p in run["files"]])
    model = LDSC(K=15, graph="vv", progress=False).fit(layers_of(bb, images))
    lib_s = time.perf_counter() - t0
    emit(check="cli", images=len(run["files"]), alignment=round(subspace_alignment(model.eigenvectors_, run["eigvecs"]), 6),
         cli_s=round(cli_s, 1), library_s=round(lib_s, 1), iterations=model.iterations_)


def quality(args) -> None:
    """Extension against a fit that includes the held-out crops."""
    from ldsc import LDSC
    from ldsc.spectral import subspace_alignment

    sources = sources_of(args.sources)
    bb = backbone()
    for F in [int(f) for f in args.fitted.split(",")]:
        rng = np.random.default_rng(args.seed)
        images = crop_images(sources, F + args.held_out, bb.input_size, rng)
        layers = layers_of(bb, images)
        del images
        t0 = time.perf_counter()
        part = LDSC(K=15, graph="vv", progress=False).fit([x[:F] for x in layers])
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        Z_new = part.transform([x[F:] for x in layers])
        transform_s = time.perf_counter() - t0
        del part
        full = LDSC(K=15, graph="vv", progress=False).fit(layers)
        Z_ref = full.eigenvectors_[F:]
        emit(check="quality", fitted=F, held_out=args.held_out, alignment=round(subspace_alignment(Z_new, Z_ref), 4),
             fit_s=round(fit_s, 1), transform_s=round(transform_s, 1), peak_mb=round(peak_mb()))
        del full, layers


def speed(args) -> None:
    """Fit speed, then N new crops embedded batch by batch: time per tenth and peak memory."""
    import gc

    from ldsc import LDSC

    sources = sources_of(args.sources)
    bb = backbone()
    rng = np.random.default_rng(args.seed)
    for F in [int(f) for f in args.fitted.split(",")]:
        layers = layers_of(bb, crop_images(sources, F, bb.input_size, rng))
        t0 = time.perf_counter()
        model = LDSC(K=15, graph="vv", progress=False).fit(layers)
        fit_s = time.perf_counter() - t0
        del layers
        gc.collect()
        fit_peak = peak_mb()
        emit(check="fit_speed", fitted=F, fit_s=round(fit_s, 1), images_per_s=round(F / fit_s, 1),
             iterations=model.iterations_, peak_mb=round(fit_peak))
        if not args.new or F != int(args.fitted.split(",")[0]):
            continue
        n, batch, tenth = args.new, args.batch, max(1, args.new // 10)
        t0 = t_last = time.perf_counter()
        done, marks = 0, []
        while done < n:
            b = min(batch, n - done)
            Z = model.transform(layers_of(bb, crop_images(sources, b, bb.input_size, rng)))
            assert Z.shape[0] == b and torch.isfinite(Z).all()
            done += b
            if done // tenth > len(marks) or done == n:
                now = time.perf_counter()
                marks.append(round(tenth / (now - t_last), 1))
                t_last = now
        total = time.perf_counter() - t0
        emit(check="extend_speed", fitted=F, new=n, seconds=round(total, 1), images_per_s=round(n / total, 1),
             images_per_s_by_tenth=marks, peak_mb_after_fit=round(fit_peak), peak_mb_after_extend=round(peak_mb()),
             extra_mb=round(peak_mb() - fit_peak))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["cli", "quality", "speed"])
    ap.add_argument("--root", help="cli: image folder")
    ap.add_argument("--sources", help="quality/speed: folder of source images for the crops")
    ap.add_argument("--fitted", default="100,1000,5000")
    ap.add_argument("--held-out", type=int, default=200)
    ap.add_argument("--new", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    {"cli": cli, "quality": quality, "speed": speed}[args.what](args)


if __name__ == "__main__":
    main()
