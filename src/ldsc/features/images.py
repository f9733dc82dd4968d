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

from ldsc.errors import DataError, LdscError, SettingError

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
    except LdscError:  # (also a signal's RunInterrupted raised while decoding: not a bad image)
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


class ImageView:
    """Which part of an image the backbone sees, and how it becomes its square input.

    * default (``resize=None, crop=None``): the whole image, squashed to the input size (the
      aspect ratio is not kept), so eigenvectors cover every pixel;
    * ``resize=r``: first scale the image so that its shorter side is ``r`` (aspect kept);
    * ``crop=c``: then cut out the centred ``c × c`` square (at most the shorter side), and resize
      that to the input size. ``resize=256, crop=256`` with a 512 input is the paper's data-set
      code (resize 256, centre crop 256, upsampled to 512); label maps are cut the same way
      (:meth:`labels`) and figures show the same square (:meth:`visible`).
    """

    def __init__(self, resize: int | None = None, crop: int | None = None):
        for name, value in (("resize", resize), ("crop", crop)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SettingError(f"backbone.{name} must be a positive number of pixels or null, not {value!r}.")
        if resize is not None and crop is not None and crop > resize:
            raise SettingError(f"backbone.crop={crop} is larger than backbone.resize={resize} (the shorter side after "
                               f"resizing): the centre crop must fit inside the resized image.")
        self.resize, self.crop = resize, crop

    @classmethod
    def of(cls, backbone_config) -> "ImageView":
        """The view recorded in a run's backbone settings (a dict or DictConfig; missing keys: the default)."""
        get = getattr(backbone_config, "get", None)
        if get is None:
            return cls()
        return cls(get("resize"), get("crop"))

    @property
    def squashes(self) -> bool:
        """Whether this is the default view (the whole image, aspect ratio not kept)."""
        return self.resize is None and self.crop is None

    def __eq__(self, other) -> bool:
        return isinstance(other, ImageView) and (self.resize, self.crop) == (other.resize, other.crop)

    def __repr__(self) -> str:
        return f"ImageView(resize={self.resize}, crop={self.crop})"

    def _resized_size(self, w: int, h: int) -> tuple[int, int]:
        if self.resize is None:
            return w, h
        # the shorter side becomes `resize`, the longer one keeps the ratio (rounded down, as torchvision does)
        if w <= h:
            return self.resize, int(self.resize * h / w)
        return int(self.resize * w / h), self.resize

    def _crop_box(self, w: int, h: int) -> tuple[int, int, int, int]:
        """The centred square, in the coordinates of the image of size ``(w, h)``."""
        side = min(self.crop, w, h)
        left, top = int(round((w - side) / 2.0)), int(round((h - side) / 2.0))
        return left, top, left + side, top + side

    def box(self, w: int, h: int) -> tuple[float, float, float, float]:
        """The region ``(left, top, right, bottom)`` of a ``w × h`` image the backbone sees, in
        that image's pixel coordinates (the whole image unless cropped)."""
        if self.crop is None:
            return 0.0, 0.0, float(w), float(h)
        rw, rh = self._resized_size(w, h)
        left, top, right, bottom = self._crop_box(rw, rh)
        sx, sy = w / rw, h / rh
        return left * sx, top * sy, right * sx, bottom * sy

    def image(self, im: Image.Image, size: int) -> Image.Image:
        """``im`` as the backbone's ``size × size`` input."""
        if self.squashes:
            return im.resize((size, size), Image.BICUBIC)
        im = im.resize(self._resized_size(*im.size), Image.BILINEAR) if self.resize is not None else im
        if self.crop is not None:
            im = im.crop(self._crop_box(*im.size))
        return im if im.size == (size, size) else im.resize((size, size), Image.BILINEAR)

    def labels(self, labels: np.ndarray) -> np.ndarray:
        """A ``(h, w)`` label map cut the way :meth:`image` cuts its image (nearest neighbour), at the
        resolution of the crop (the whole map when not cropped: callers resize it as they need)."""
        if self.crop is None:
            return labels
        h, w = labels.shape
        if self.resize is not None:
            rw, rh = self._resized_size(w, h)
            labels = np.asarray(Image.fromarray(labels).resize((rw, rh), Image.NEAREST))
        left, top, right, bottom = self._crop_box(labels.shape[1], labels.shape[0])
        return labels[top:bottom, left:right]

    def visible(self, im: Image.Image) -> Image.Image:
        """The part of ``im`` the backbone sees, at the image's own resolution (for figures)."""
        if self.crop is None:
            return im
        left, top, right, bottom = self.box(*im.size)
        width, height = round(right - left), round(bottom - top)
        left, top = round(left), round(top)
        return im.crop((left, top, left + width, top + height))


def image_tensor(path: str | os.PathLike, size: int, view: ImageView | None = None) -> torch.Tensor:
    """``(3, size, size)`` float in [0, 1]: the image as ``view`` (default: squashed whole) shows it."""
    im = (view or ImageView()).image(load_image(path), size)
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
    """A list of image files, each read and brought to ``size`` as ``view`` says (default: squashed
    whole); items are ``{"image": (3, size, size), "index": int}``."""

    def __init__(self, files: Sequence[str], size: int, view: ImageView | None = None):
        self.files, self.size, self.view = list(files), int(size), view or ImageView()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        return {"image": image_tensor(self.files[i], self.size, self.view), "index": i}


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
