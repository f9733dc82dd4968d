"""``backbone.resize`` / ``backbone.crop``: which part of each image the backbone sees. The paper's
data-set code resizes the shorter side to 256, cuts the centred 256 x 256 square and upsamples it to
512; label maps and figures must be cut the same way, or every score compares the wrong pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, run_cli
from PIL import Image

from ldsc.evaluation.cocostuff import COARSE_NAMES, FINE_TO_COARSE
from ldsc.features.images import ImageView, image_tensor


def test_resize_then_centre_crop_step_by_step():
    """A 400 x 300 image: the shorter side 300 -> 256 makes it 341 x 256 (the longer side rounded
    down); the centred 256-square starts at round(85 / 2) = 42; then up to 512."""
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
    view = ImageView(resize=256, crop=256)
    step = im.resize((341, 256), Image.BILINEAR).crop((42, 0, 298, 256)).resize((512, 512), Image.BILINEAR)
    assert np.array_equal(np.asarray(view.image(im, 512)), np.asarray(step))
    # the region of the original the backbone saw, in its own pixels
    left, top, right, bottom = view.box(400, 300)
    assert (top, bottom) == (0, 300) and right - left == pytest.approx(300, abs=0.5)
    assert left == pytest.approx(42 * 400 / 341)
    assert view.visible(im).size == (300, 300)
    # portrait: the longer side is the height
    assert view.image(im.transpose(Image.Transpose.ROTATE_90), 64).size == (64, 64)
    assert ImageView(crop=100).box(400, 300) == (150.0, 100.0, 250.0, 200.0)  # crop without resize
    # the default squashes the whole image, as before
    assert ImageView().squashes and ImageView().box(400, 300) == (0.0, 0.0, 400.0, 300.0)
    assert np.array_equal(np.asarray(ImageView().image(im, 64)), np.asarray(im.resize((64, 64), Image.BICUBIC)))


def test_label_maps_are_cut_where_the_image_is_cut(tmp_path):
    """Three vertical bands (red | green | blue, labels 0 | 1 | 2) of a 96 x 48 image: resize 32,
    crop 32 keeps the right half of red, all of green and the left half of blue — in the image
    the backbone sees and in the label map alike."""
    img = np.zeros((48, 96, 3), dtype=np.uint8)
    lab = np.zeros((48, 96), dtype=np.uint8)
    for band in range(3):
        img[:, 32 * band: 32 * (band + 1), band] = 255
        lab[:, 32 * band: 32 * (band + 1)] = band
    Image.fromarray(img).save(tmp_path / "bands.png")
    view = ImageView(resize=32, crop=32)
    seen = image_tensor(tmp_path / "bands.png", 32, view)  # (3, 32, 32)
    cut = view.labels(lab)
    assert cut.shape == (32, 32)
    assert cut[0].tolist() == [0] * 5 + [1] * 22 + [2] * 5 or cut[0].tolist() == [0] * 6 + [1] * 21 + [2] * 5
    colour = seen.argmax(0)
    edges = np.flatnonzero(np.diff(cut[0].astype(int))) + 1
    inside = np.ones(32, dtype=bool)
    for e in edges:  # the bilinear edges of the image are half a pixel wide
        inside[max(0, e - 1): e + 1] = False
    assert (colour[:, inside].numpy() == cut[:, inside]).all()
    with pytest.raises(ValueError, match="larger than backbone.resize"):
        ImageView(resize=128, crop=256)
    with pytest.raises(ValueError, match="positive number of pixels"):
        ImageView(resize=0)


def _coarse_id(name: str) -> int:
    """An official stuff+things id whose COCO-Stuff-27 class is ``name``."""
    return int(np.flatnonzero(FINE_TO_COARSE == COARSE_NAMES.index(name))[0])


def test_a_cropped_run_scores_only_the_labels_inside_the_crop(tmp_path):
    """96 x 48 images: person | sky | grass-like plant | person in four 24-px bands. With
    ``backbone.resize=48 backbone.crop=48`` the backbone sees the middle 48 px (sky and plant):
    person pixels are not scored; without the crop they are."""
    images, labels = tmp_path / "val2017", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    classes = [("person", (200, 60, 40)), ("sky", (40, 90, 210)), ("plant", (40, 160, 60)), ("person", (200, 60, 40))]
    rng = np.random.default_rng(0)
    for i in range(3):
        img = np.zeros((48, 96, 3), dtype=np.uint8)
        lab = np.zeros((48, 96), dtype=np.uint8)
        for band, (name, rgb) in enumerate(classes):
            img[:, 24 * band: 24 * (band + 1)] = np.array(rgb) + rng.integers(0, 20, 3)
            lab[:, 24 * band: 24 * (band + 1)] = _coarse_id(name)
        Image.fromarray(img).save(images / f"{i:012d}.jpg")
        Image.fromarray(lab).save(labels / f"{i:012d}.png")
    scored = {}
    for crop in (True, False):
        out = tmp_path / f"run_{crop}"
        view = ["backbone.resize=48", "backbone.crop=48"] if crop else []
        r = run_cli(["experiment=cocostuff27", "backbone=pixel", f"data.root={images}", f"labels_dir={labels}",
                     "data.curated=false", "data.num_workers=0", "callbacks.evaluate.clusters=3", *view, *SMALL,
                     f"hydra.run.dir={out}", f"store.dir={tmp_path / 'store'}"])
        assert r.returncode == 0, r.stderr[-3000:]
        metrics = json.loads((out / "eval" / "metrics.json").read_text())
        assert metrics["view"] == ({"resize": 48, "crop": 48} if crop else {"resize": None, "crop": None})
        rows = (out / "eval" / "per_class_iou.csv").read_text().splitlines()[1:]
        scored[crop] = {r.split(",")[1] for r in rows if int(r.split(",")[3]) > 0}  # classes with labelled pixels
        panel = Image.open(next((out / "eval" / "figures").glob("four_panel_*.png")))
        assert panel.size[0] > 0
    assert scored[True] == {"sky", "plant"}
    assert scored[False] == {"person", "sky", "plant"}
