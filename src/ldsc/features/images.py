"""Reading images: any file PIL opens, as 8-bit RGB tensors at the backbone's input size.

The first stage of the data flow (images -> backbone -> feature store -> graphs -> solver ->
export); deliberately light (PIL, numpy, torch only) so that scripts can read images the way
ldsc does without importing Lightning.
"""

from __future__ import annotations

import os
from pathlib import Path

import hashlib
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from PIL import Image, ImageFile, ImageOps

from ldsc.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")

#: the colour photographs scikit-image ships (files in ``skimage/data``)
SAMPLE_FILES = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
                "retina.jpg", "ihc.png", "hubble_deep_field.jpg")


#: curated image lists shipped with the package (``ldsc/features/lists/``), by name. ``cocostuff27``:
#: the 2,175 COCO val2017 ids on which IIC, PiCIE, STEGO, DiffSeg and DiffCut score COCO-Stuff-27,
#: published as ``Coco164kFull_Stuff_Coarse_7.txt`` in the PiCIE and google/diffseg repositories
#: (sha1 e7f3cea2b2ddf4e8f919c240a05a005e5b203816; docs/evaluation.md)
CURATED_LISTS = {"cocostuff27": "cocostuff27_curated_val2017.txt"}


def curated_ids(name: str) -> list[str]:
    """The image ids (file stems) of the curated list ``name`` (:data:`CURATED_LISTS`), in its order."""
    if name not in CURATED_LISTS:
        raise DataError(f"There is no curated image list {name!r}: choose from {sorted(CURATED_LISTS)}.")
    text = (Path(__file__).parent / "lists" / CURATED_LISTS[name]).read_text()
    return text.split()


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open any image as 8-bit RGB, turned upright by its EXIF orientation tag.

    Grayscale, palette, 16-bit, CMYK and images with alpha (composited on white) are converted.
    Raises :class:`DataError` with one sentence if the file is missing or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Image file '{path}' does not exist.")
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        with Image.open(path) as raw:
            raw.load()
            im = ImageOps.exif_transpose(raw)  # as photo viewers show it (phones store rotated pixels)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                arr = 255 * (arr - arr.min()) / max(arr.max() - arr.min(), 1)
                im = Image.fromarray(arr.astype(np.uint8), "L")
            if im.mode == "P":
                im = im.convert("RGBA")
            if im.mode in ("RGBA", "LA", "PA"):
                rgba = im.convert("RGBA")
                canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(canvas, rgba).convert("RGB")
            return im.convert("RGB")
    except DataError:
        raise
    except Exception as err:  # PIL raises many types for corrupt files
        raise DataError(f"Image file '{path}' cannot be read as an image ({type(err).__name__}: {err}).") from err


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image as :func:`load_image` returns it (EXIF orientation applied),
    read from the header only."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # orientations that swap the sides
            w, h = h, w
    return w, h


def image_tensor(path: str | os.PathLike, size: int) -> torch.Tensor:
    """``(3, size, size)`` float in [0, 1]."""
    im = load_image(path).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def readable_images(paths: Sequence[str], check: bool = True) -> tuple[list[str], list[str]]:
    """Split ``paths`` into ``(readable, unreadable)``, decoding each once (with a progress bar
    for large sets) when ``check`` is true."""
    if not check:
        return list(paths), []
    from ldsc.progress import bar

    good, bad = [], []
    for p in bar(paths, desc="checking images", unit="img", disable=len(paths) < 200, leave=False):
        try:
            load_image(p)
            good.append(p)
        except DataError:
            bad.append(p)
    return good, bad


class ImageFiles(Dataset):
    """A list of image files, each read and resized to ``size``; items are
    ``{"image": (3, size, size), "index": int}``."""

    def __init__(self, files: Sequence[str], size: int):
        self.files, self.size = list(files), int(size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        return {"image": image_tensor(self.files[i], self.size), "index": i}


def batch_seed(seed: int, epoch: int, index: torch.Tensor) -> int:
    """A seed for the backbone's randomness that depends only on the run seed, the epoch and the
    images of the batch (so resumed runs redraw the same noise)."""
    key = f"{seed}:{epoch}:{','.join(map(str, index.tolist()))}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def sample_paths(names: Sequence[str] = SAMPLE_FILES) -> list[str]:
    """Paths of the colour photographs scikit-image ships (nothing to download)."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"scikit-image's sample images {missing} are not in '{folder}'; "
                        f"available: {sorted(p.name for p in folder.iterdir() if p.suffix in IMAGE_EXTENSIONS)}.")
    return [str(folder / n) for n in names]
