"""Composite images with known ground truth, for measuring segmentation without COCO-Stuff.

Each composite is a ``grid × grid`` mosaic of square patches cut from *different* source
photographs; its label map says, per pixel, **which source image** the patch came from. The class
of a pixel is the source image's id (0..N−1), the same in every composite, and every source
appears in several composites at different cells, so that

* data-set-level Hungarian matching is meaningful (one class = one source photograph's look);
* position says nothing about the class (sources rotate through the cells), so a "where"
  embedding cannot score well by layout alone — it separates the ``qk``/``vv`` pathways.

Sources are assigned in rounds: each round is a seeded permutation of all N sources split into
groups of ``grid²`` (so N must be a multiple of ``grid²``), each group one composite with a
random cell order. Patches are random square crops (50–80 % of the source's short side).

    python experiments/composite.py --sources ../shared/data/coco_val2017_first100 \\
        --n-sources 8 --n-images 24 --out data/composite
    python -m ldsc.run experiment=dataset data.root=data/composite/images ...
    python -m ldsc.evaluate RUN_DIR --labels data/composite/labels

Writes ``OUT/images/composite_XXX.png``, ``OUT/labels/composite_XXX.png`` (uint8 source ids),
``OUT/labels/classes.json`` (source file stems, the class names) and ``OUT/manifest.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

EXTENSIONS = (".jpg", ".jpeg", ".png")


def random_patch(image: Image.Image, side: int, rng: np.random.Generator,
                 scale: tuple[float, float] = (0.5, 0.8)) -> tuple[Image.Image, list[int]]:
    """A random square crop of ``scale`` × the short side, resized to ``side``; returns the
    patch and its box ``[left, top, right, bottom]``."""
    w, h = image.size
    c = max(1, int(round(min(w, h) * rng.uniform(*scale))))
    x0 = int(rng.integers(0, w - c + 1))
    y0 = int(rng.integers(0, h - c + 1))
    box = [x0, y0, x0 + c, y0 + c]
    return image.crop(box).resize((side, side), Image.BICUBIC), box


def make_composite(sources: list[Image.Image], ids: list[int], size: int, grid: int,
                   rng: np.random.Generator) -> tuple[Image.Image, np.ndarray, list[dict]]:
    """Tile one patch of each of ``sources`` (``grid²`` of them, in cell order) into a
    ``size × size`` image. Returns ``(image, labels (size, size) uint8 = ids, cells)``."""
    if len(sources) != grid * grid:
        raise ValueError(f"a {grid}x{grid} composite needs {grid * grid} sources, got {len(sources)}")
    if size % grid:
        raise ValueError(f"size {size} must be a multiple of grid {grid}")
    side = size // grid
    canvas = Image.new("RGB", (size, size))
    labels = np.zeros((size, size), dtype=np.uint8)
    cells = []
    for cell, (src, cid) in enumerate(zip(sources, ids)):
        r, c = divmod(cell, grid)
        patch, box = random_patch(src, side, rng)
        canvas.paste(patch, (c * side, r * side))
        labels[r * side:(r + 1) * side, c * side:(c + 1) * side] = cid
        cells.append({"cell": [r, c], "source": int(cid), "crop": box})
    return canvas, labels, cells


def assignments(n_sources: int, n_images: int, per_image: int, rng: np.random.Generator) -> list[list[int]]:
    """Source ids of each composite: rounds of seeded permutations split into groups, each
    group shuffled into a random cell order."""
    if n_sources % per_image:
        raise ValueError(f"--n-sources ({n_sources}) must be a multiple of grid² ({per_image})")
    groups: list[list[int]] = []
    while len(groups) < n_images:
        perm = rng.permutation(n_sources)
        groups += [list(map(int, rng.permutation(perm[i:i + per_image])))
                   for i in range(0, n_sources, per_image)]
    return groups[:n_images]


def build(sources_dir: str | Path, out: str | Path, n_sources: int = 8, n_images: int = 24,
          size: int = 256, grid: int = 2, seed: int = 0) -> dict:
    """Write the composite data set (see the module docstring); returns the manifest."""
    files = sorted(p for p in Path(sources_dir).iterdir() if p.suffix.lower() in EXTENSIONS)
    if len(files) < n_sources:
        raise SystemExit(f"composite: '{sources_dir}' has {len(files)} images, fewer than --n-sources {n_sources}.")
    files = files[:n_sources]
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    images = [Image.open(p).convert("RGB") for p in files]
    rng = np.random.default_rng(seed)
    manifest = {"sources": [str(p) for p in files], "size": size, "grid": grid, "seed": seed,
                "composites": []}
    for j, ids in enumerate(assignments(n_sources, n_images, grid * grid, rng)):
        img, lab, cells = make_composite([images[i] for i in ids], ids, size, grid, rng)
        name = f"composite_{j:03d}"
        img.save(out / "images" / f"{name}.png")
        Image.fromarray(lab).save(out / "labels" / f"{name}.png")
        manifest["composites"].append({"name": name, "cells": cells})
    (out / "labels" / "classes.json").write_text(json.dumps([p.stem for p in files], indent=1))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", required=True, help="folder of source photographs")
    p.add_argument("--out", required=True, help="output folder (images/, labels/, manifest.json)")
    p.add_argument("--n-sources", type=int, default=8, help="source images = classes")
    p.add_argument("--n-images", type=int, default=24, help="composites to write")
    p.add_argument("--size", type=int, default=256, help="composite side in pixels")
    p.add_argument("--grid", type=int, default=2, help="cells per side")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    m = build(a.sources, a.out, a.n_sources, a.n_images, a.size, a.grid, a.seed)
    print(f"wrote {len(m['composites'])} composites of {a.n_sources} sources to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
