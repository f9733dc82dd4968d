"""A folder of N images made from a few real ones by random crops and horizontal flips: data
sets of any size for the scaling benchmarks (the images keep real colour statistics).

    python experiments/make_images.py --sources ../shared/data/coco_val2017_first100 --n 10000 --out data/crops10k

Each image is a random crop (10–100 % of the source's area, aspect 3:4–4:3) of a source image,
flipped with probability 1/2 and saved as a ``--size`` px JPEG; names are ``crop_000000.jpg`` ...
Seeded (``--seed``): the same command writes the same files.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", required=True, help="folder of source images")
    ap.add_argument("--n", type=int, required=True, help="images to write")
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=128, help="side of the written images (px)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from tqdm.auto import tqdm

    from ldsc.features.images import IMAGE_EXTENSIONS, load_image

    sources = sorted(p for p in Path(args.sources).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not sources:
        raise SystemExit(f"no images in {args.sources}")
    images = [load_image(p) for p in sources]
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(args.n), desc="images", unit="img"):
        im = images[rng.integers(len(images))]
        W, H = im.size
        area = W * H * rng.uniform(0.1, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = int(min(W, round(math.sqrt(area * aspect))))
        h = int(min(H, round(math.sqrt(area / aspect))))
        x, y = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
        crop = im.crop((x, y, x + w, y + h)).resize((args.size, args.size), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop.save(out / f"crop_{i:06d}.jpg", quality=90)


if __name__ == "__main__":
    main()
