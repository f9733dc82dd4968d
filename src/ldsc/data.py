"""Images in, per-batch layer graphs out.

Datasets only read and resize images (that is all worker processes do). The
:class:`ImageDataModule` runs the frozen backbone and the graph builder on the training device in
``on_after_batch_transfer``, under ``torch.no_grad()``, and hands the solver
``{"index": (B,), "graphs": list[LayerGraph]}``.

Images are resized to the backbone's square ``input_size`` without cropping (aspect ratio is not
kept), so the eigenvectors cover the whole image; figures and evaluation resize back.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, Dataset, Sampler

from ldsc.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")

#: the colour photographs scikit-image ships (files in ``skimage/data``)
SAMPLE_FILES = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
                "retina.jpg", "ihc.png", "hubble_deep_field.jpg")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open any image as 8-bit RGB.

    Grayscale, palette, 16-bit, CMYK and images with alpha (composited on white) are converted.
    Raises :class:`DataError` with one sentence if the file is missing or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Image file '{path}' does not exist.")
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        with Image.open(path) as im:
            im.load()
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


def image_tensor(path: str | os.PathLike, size: int) -> torch.Tensor:
    """``(3, size, size)`` float in [0, 1]."""
    im = load_image(path).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def readable_images(paths: Sequence[str], check: bool = True) -> tuple[list[str], list[str]]:
    """Split ``paths`` into ``(readable, unreadable)``, decoding each once (with a progress bar
    for large sets) when ``check`` is true."""
    if not check:
        return list(paths), []
    from tqdm.auto import tqdm

    good, bad = [], []
    for p in tqdm(paths, desc="checking images", disable=len(paths) < 200, leave=False):
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


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation each epoch, a pure function of ``(seed, epoch)``, so a run resumed from a
    checkpoint sees the same batches as an uninterrupted one. Lightning calls ``set_epoch``."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def batch_seed(seed: int, epoch: int, index: torch.Tensor) -> int:
    """A seed for the backbone's randomness that depends only on the run seed, the epoch and the
    images of the batch (so resumed runs redraw the same noise)."""
    key = f"{seed}:{epoch}:{','.join(map(str, index.tolist()))}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


class ImageDataModule(L.LightningDataModule):
    """Streams images through a frozen backbone and builds the batch's layer graphs.

    Subclasses implement :meth:`find_images`. ``run.py`` calls :meth:`attach` with the backbone,
    the graph builder and the base grid before fitting.

    Args:
        batch_size: images per batch (graphs connect images within a batch).
        num_workers: image-reading worker processes.
        shuffle: reshuffle the batches every epoch (data-set mode needs it: DESIGN §4).
        check_images: decode every image once at set-up and skip unreadable ones with a warning.
        limit: use only the first ``limit`` images (sorted by name).
    """

    def __init__(self, batch_size: int = 40, num_workers: int = 0, shuffle: bool = True,
                 check_images: bool = True, limit: int | None = None):
        super().__init__()
        self.batch_size, self.num_workers, self.shuffle = int(batch_size), int(num_workers), shuffle
        self.check_images, self.limit = check_images, limit
        self.files: list[str] | None = None
        self.backbone = None
        self.graph_builder = None
        self._whole_graphs = None  # (key, graphs) of the last whole_dataset_graphs call
        self.base_size: int | None = None
        self.seed = 0

    # -- what subclasses provide -------------------------------------------------------------
    def find_images(self) -> list[str]:
        raise NotImplementedError

    # -- wiring ------------------------------------------------------------------------------
    def attach(self, backbone, graph_builder, base_size: int, seed: int = 0) -> None:
        self.backbone, self.graph_builder, self.base_size, self.seed = backbone, graph_builder, base_size, seed
        backbone.set_base_size(base_size)

    def prepare_files(self) -> list[str]:
        """Find, limit and check the images once; returns the file list (index -> path)."""
        if self.files is None:
            files = self.find_images()
            if self.limit is not None:
                files = files[: int(self.limit)]
            good, bad = readable_images(files, self.check_images)
            if bad:
                log.warning("skipped %d of %d images that could not be read (first: %s)", len(bad), len(files), bad[0])
            if not good:
                raise DataError(f"None of the {len(files)} images found by {type(self).__name__} could be read.")
            self.files = good
        return self.files

    @property
    def num_images(self) -> int:
        return len(self.prepare_files())

    def setup(self, stage: str | None = None) -> None:
        self.prepare_files()

    def train_dataloader(self) -> DataLoader:
        files = self.prepare_files()
        ds = ImageFiles(files, self.backbone.input_size if self.backbone is not None else 224)
        return DataLoader(ds, batch_size=min(self.batch_size, len(ds)),
                          sampler=EpochShuffleSampler(len(ds), self.seed, self.shuffle),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def graphs_for(self, images: torch.Tensor, index: torch.Tensor, epoch: int = 0) -> list:
        """Run the frozen backbone and the graph builder on one batch (pure glue, no grad)."""
        if self.backbone is None or self.graph_builder is None:
            raise RuntimeError("call attach(backbone, graph_builder, base_size) before using the data module")
        backbone = self.backbone.to(images.device)
        gen = torch.Generator(device=images.device).manual_seed(batch_seed(self.seed, epoch, index))
        with torch.no_grad():
            features = backbone(images, generator=gen)
            return self.graph_builder(features, self.base_size)

    def whole_dataset_graphs(self, device=None, max_tokens: int | None = None, epoch: int = 0) -> list:
        """The layer graphs of *every* image in one batch: intra- and inter-image neighbours over
        the whole data set (DESIGN §4), the graphs the exact reference is defined on.

        Args:
            device: where to run the backbone and build the graphs (default CPU).
            max_tokens: refuse (:class:`~ldsc.errors.ConfigError`, one sentence) when the largest
                layer would have more than this many tokens: the kNN search is quadratic in it.
            epoch: passed to the backbone's randomness (diffusion noise), as for a batch.
        """
        from ldsc.errors import ConfigError

        files = self.prepare_files()
        if self.backbone is None or self.graph_builder is None:
            raise RuntimeError("call attach(backbone, graph_builder, base_size) before using the data module")
        tokens = len(files) * self.base_size**2
        if max_tokens is not None and tokens > max_tokens:
            raise ConfigError(
                f"The whole-data-set graph of {len(files)} images at {self.base_size}x{self.base_size} has {tokens} "
                f"base-grid nodes, above the limit of {max_tokens}: use solver=fast, fewer images (data.limit) or "
                f"a smaller base_size, or raise the limit.")
        key = (str(device), int(epoch), len(files))
        if self._whole_graphs is not None and self._whole_graphs[0] == key:  # monitor and solver share one build
            return self._whole_graphs[1]
        ds = ImageFiles(files, self.backbone.input_size)
        images = torch.stack([ds[i]["image"] for i in range(len(ds))])
        if device is not None:
            images = images.to(device)
        graphs = self.graphs_for(images, torch.arange(len(ds)), epoch)
        self._whole_graphs = (key, graphs)
        return graphs

    def release_whole_dataset_graphs(self) -> None:
        """Drop the graphs kept by :meth:`whole_dataset_graphs` (they can be large)."""
        self._whole_graphs = None

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        solver = self.trainer.lightning_module if self.trainer is not None else None
        if solver is not None and len(batch["index"]) < self.num_images and solver.uses_whole_graph():
            return {"index": batch["index"], "graphs": None}  # it solves the whole-data-set graph instead
        graphs = self.graphs_for(batch["image"], batch["index"], epoch)
        return {"index": batch["index"], "graphs": graphs}


class FolderDataModule(ImageDataModule):
    """Every image in ``root`` (recursively, sorted by path)."""

    def __init__(self, root: str, recursive: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.root = root

    def find_images(self) -> list[str]:
        root = Path(os.path.expanduser(str(self.root)))
        if not root.exists():
            raise DataError(f"Image folder '{root}' does not exist.")
        if not root.is_dir():
            raise DataError(f"'{root}' is a file, not a folder: use data=single data.path={root} for one image.")
        files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise DataError(f"Image folder '{root}' contains no images (looked for {', '.join(IMAGE_EXTENSIONS)}).")
        return files


class SingleImageDataModule(ImageDataModule):
    """One image file."""

    def __init__(self, path: str, **kwargs):
        kwargs.setdefault("batch_size", 1)
        super().__init__(**kwargs)
        self.path = path

    def find_images(self) -> list[str]:
        path = Path(os.path.expanduser(str(self.path)))
        if not path.is_file():
            raise DataError(f"Image file '{path}' does not exist.")
        load_image(path)  # one sentence if it cannot be read
        return [str(path)]


class SamplesDataModule(ImageDataModule):
    """The colour photographs bundled with scikit-image: runs with nothing downloaded."""

    def __init__(self, names: Sequence[str] = SAMPLE_FILES, **kwargs):
        super().__init__(**kwargs)
        self.names = list(names)

    def find_images(self) -> list[str]:
        import skimage.data

        folder = Path(skimage.data.__file__).parent
        missing = [n for n in self.names if not (folder / n).is_file()]
        if missing:
            raise DataError(f"scikit-image's sample images {missing} are not in '{folder}'; "
                            f"available: {sorted(p.name for p in folder.iterdir() if p.suffix in IMAGE_EXTENSIONS)}.")
        return [str(folder / n) for n in self.names]


class CocoDataModule(FolderDataModule):
    """A folder of COCO images (``val2017`` by default; ``make data`` downloads it)."""

    def find_images(self) -> list[str]:
        root = Path(os.path.expanduser(str(self.root)))
        if not root.exists():
            raise DataError(f"COCO image folder '{root}' does not exist: run `make data` (needs internet) "
                            f"or pass data.root=/path/to/val2017.")
        return super().find_images()
