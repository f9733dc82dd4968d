"""COCO-Stuff label maps and the 27 coarse classes of unsupervised segmentation papers.

The official COCO-Stuff "stuff+things" PNGs (``stuffthingmaps_trainval2017/{train,val}2017/
<image id>.png``) store, per pixel, the category id **minus one**: 0–181 (``0`` = person, …,
``181`` = wood), ``255`` = unlabelled. Eleven of the 0–90 thing ids are unused by COCO.

The coarse 27-class problem ("COCO-Stuff-27", PiCIE/STEGO convention) merges every category
into its COCO supercategory — 12 thing supercategories and 15 stuff supercategories — in this
order (the order STEGO's ``cocostuff27`` class list uses, so per-class tables line up)::

    0 electronic  1 appliance  2 food  3 furniture  4 indoor  5 kitchen  6 accessory  7 animal
    8 outdoor  9 person  10 sports  11 vehicle  12 ceiling  13 floor  14 food(-stuff)
    15 furniture(-stuff)  16 raw-material  17 textile  18 wall  19 window  20 building
    21 ground  22 plant  23 sky  24 solid  25 structural  26 water

Source of the hierarchy: the ``supercategory`` field of the official COCO annotation files —
``instances_val2017.json`` for the 80 things (supercategories person, vehicle, outdoor,
animal, accessory, sports, kitchen, food, furniture, electronic, appliance, indoor) and
``stuff_val2017.json`` of COCO-Stuff (github.com/nightrome/cocostuff, ``labels.md``) for the 91
stuff classes. The table below is written out from those fields.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

IGNORE_INDEX = 255

#: ``(COCO id, name, supercategory)`` for all 182 COCO-Stuff ids; the PNG value is ``id - 1``.
#: Things 1–90 (ids missing from COCO are absent), stuff 92–182.
CATEGORIES: list[tuple[int, str, str]] = [
    (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"),
    (4, "motorcycle", "vehicle"), (5, "airplane", "vehicle"), (6, "bus", "vehicle"),
    (7, "train", "vehicle"), (8, "truck", "vehicle"), (9, "boat", "vehicle"),
    (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"), (13, "stop sign", "outdoor"),
    (14, "parking meter", "outdoor"), (15, "bench", "outdoor"),
    (16, "bird", "animal"), (17, "cat", "animal"), (18, "dog", "animal"), (19, "horse", "animal"),
    (20, "sheep", "animal"), (21, "cow", "animal"), (22, "elephant", "animal"),
    (23, "bear", "animal"), (24, "zebra", "animal"), (25, "giraffe", "animal"),
    (27, "backpack", "accessory"), (28, "umbrella", "accessory"), (31, "handbag", "accessory"),
    (32, "tie", "accessory"), (33, "suitcase", "accessory"),
    (34, "frisbee", "sports"), (35, "skis", "sports"), (36, "snowboard", "sports"),
    (37, "sports ball", "sports"), (38, "kite", "sports"), (39, "baseball bat", "sports"),
    (40, "baseball glove", "sports"), (41, "skateboard", "sports"), (42, "surfboard", "sports"),
    (43, "tennis racket", "sports"),
    (44, "bottle", "kitchen"), (46, "wine glass", "kitchen"), (47, "cup", "kitchen"),
    (48, "fork", "kitchen"), (49, "knife", "kitchen"), (50, "spoon", "kitchen"),
    (51, "bowl", "kitchen"),
    (52, "banana", "food"), (53, "apple", "food"), (54, "sandwich", "food"), (55, "orange", "food"),
    (56, "broccoli", "food"), (57, "carrot", "food"), (58, "hot dog", "food"), (59, "pizza", "food"),
    (60, "donut", "food"), (61, "cake", "food"),
    (62, "chair", "furniture"), (63, "couch", "furniture"), (64, "potted plant", "furniture"),
    (65, "bed", "furniture"), (67, "dining table", "furniture"), (70, "toilet", "furniture"),
    (72, "tv", "electronic"), (73, "laptop", "electronic"), (74, "mouse", "electronic"),
    (75, "remote", "electronic"), (76, "keyboard", "electronic"), (77, "cell phone", "electronic"),
    (78, "microwave", "appliance"), (79, "oven", "appliance"), (80, "toaster", "appliance"),
    (81, "sink", "appliance"), (82, "refrigerator", "appliance"),
    (84, "book", "indoor"), (85, "clock", "indoor"), (86, "vase", "indoor"),
    (87, "scissors", "indoor"), (88, "teddy bear", "indoor"), (89, "hair drier", "indoor"),
    (90, "toothbrush", "indoor"),
    (92, "banner", "textile"), (93, "blanket", "textile"), (94, "branch", "plant"),
    (95, "bridge", "building"), (96, "building-other", "building"), (97, "bush", "plant"),
    (98, "cabinet", "furniture-stuff"), (99, "cage", "structural"),
    (100, "cardboard", "raw-material"), (101, "carpet", "floor"), (102, "ceiling-other", "ceiling"),
    (103, "ceiling-tile", "ceiling"), (104, "cloth", "textile"), (105, "clothes", "textile"),
    (106, "clouds", "sky"), (107, "counter", "furniture-stuff"), (108, "cupboard", "furniture-stuff"),
    (109, "curtain", "textile"), (110, "desk-stuff", "furniture-stuff"), (111, "dirt", "ground"),
    (112, "door-stuff", "furniture-stuff"), (113, "fence", "structural"),
    (114, "floor-marble", "floor"), (115, "floor-other", "floor"), (116, "floor-stone", "floor"),
    (117, "floor-tile", "floor"), (118, "floor-wood", "floor"), (119, "flower", "plant"),
    (120, "fog", "water"), (121, "food-other", "food-stuff"), (122, "fruit", "food-stuff"),
    (123, "furniture-other", "furniture-stuff"), (124, "grass", "plant"), (125, "gravel", "ground"),
    (126, "ground-other", "ground"), (127, "hill", "solid"), (128, "house", "building"),
    (129, "leaves", "plant"), (130, "light", "furniture-stuff"), (131, "mat", "textile"),
    (132, "metal", "raw-material"), (133, "mirror-stuff", "furniture-stuff"), (134, "moss", "plant"),
    (135, "mountain", "solid"), (136, "mud", "ground"), (137, "napkin", "textile"),
    (138, "net", "structural"), (139, "paper", "raw-material"), (140, "pavement", "ground"),
    (141, "pillow", "textile"), (142, "plant-other", "plant"), (143, "plastic", "raw-material"),
    (144, "platform", "ground"), (145, "playingfield", "ground"), (146, "railing", "structural"),
    (147, "railroad", "ground"), (148, "river", "water"), (149, "road", "ground"),
    (150, "rock", "solid"), (151, "roof", "building"), (152, "rug", "textile"),
    (153, "salad", "food-stuff"), (154, "sand", "ground"), (155, "sea", "water"),
    (156, "shelf", "furniture-stuff"), (157, "sky-other", "sky"), (158, "skyscraper", "building"),
    (159, "snow", "ground"), (160, "solid-other", "solid"), (161, "stairs", "furniture-stuff"),
    (162, "stone", "solid"), (163, "straw", "plant"), (164, "structural-other", "structural"),
    (165, "table", "furniture-stuff"), (166, "tent", "building"), (167, "textile-other", "textile"),
    (168, "towel", "textile"), (169, "tree", "plant"), (170, "vegetable", "food-stuff"),
    (171, "wall-brick", "wall"), (172, "wall-concrete", "wall"), (173, "wall-other", "wall"),
    (174, "wall-panel", "wall"), (175, "wall-stone", "wall"), (176, "wall-tile", "wall"),
    (177, "wall-wood", "wall"), (178, "water-other", "water"), (179, "waterdrops", "water"),
    (180, "window-blind", "window"), (181, "window-other", "window"), (182, "wood", "solid"),
]

#: the 27 coarse classes; index = coarse label. Stuff supercategories that share a thing
#: supercategory's name are kept apart (``food-stuff``, ``furniture-stuff``).
COARSE_SUPERCATEGORIES: list[str] = [
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal",
    "outdoor", "person", "sports", "vehicle",
    "ceiling", "floor", "food-stuff", "furniture-stuff", "raw-material", "textile", "wall",
    "window", "building", "ground", "plant", "sky", "solid", "structural", "water",
]
COARSE_NAMES: list[str] = [s.replace("-stuff", " (stuff)") for s in COARSE_SUPERCATEGORIES]


#: name of each PNG value 0–181 (``"unused-<id>"`` for ids COCO does not use)
FINE_NAMES: list[str] = [f"unused-{i + 1}" for i in range(182)]
for _cid, _name, _ in CATEGORIES:
    FINE_NAMES[_cid - 1] = _name


def fine_to_coarse_lut() -> np.ndarray:
    """``(256,)`` uint8 lookup table: PNG value (COCO id − 1) -> coarse class, 255 elsewhere."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    index = {name: i for i, name in enumerate(COARSE_SUPERCATEGORIES)}
    for cid, _, sup in CATEGORIES:
        lut[cid - 1] = index[sup]
    return lut


FINE_TO_COARSE = fine_to_coarse_lut()

#: label conversions by name, as accepted by ``ldsc.evaluate --label-map``
LABEL_MAPS = {"cocostuff27": FINE_TO_COARSE}
LABEL_NAMES = {"cocostuff27": COARSE_NAMES}


def read_label_map(path: str | Path, label_map: str | None = None) -> np.ndarray:
    """Read a PNG label map as ``(H, W)`` uint8, optionally converted by a named
    :data:`LABEL_MAPS` table (e.g. ``"cocostuff27"`` for the official stuff+things PNGs).
    A file that cannot be decoded, has colour channels or holds values above 255 raises
    :class:`~ldsc.errors.DataError` naming the file."""
    from PIL import Image

    from ldsc.errors import DataError

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise DataError(f"Label map '{path}' has mode {im.mode} ({len(im.getbands())} channels); label maps "
                                f"must be single-channel PNGs holding one class id per pixel (255 = unlabelled).")
            labels = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as err:  # truncated or not an image (PIL's errors)
        raise DataError(f"Label map '{path}' cannot be read ({err}); is the file complete?") from err
    if labels.max(initial=0) > 255:
        raise DataError(f"Label map '{path}' holds class {int(labels.max())}; class ids must be 0-254 "
                        f"(255 = unlabelled).")
    labels = labels.astype(np.uint8)
    if label_map is not None:
        if label_map not in LABEL_MAPS:
            raise DataError(f"Unknown label map {label_map!r}; known: {sorted(LABEL_MAPS)}.")
        labels = LABEL_MAPS[label_map][labels]
    return labels


class CocoStuff:
    """Images paired with their COCO-Stuff label maps by file stem.

    ``CocoStuff("data/coco/val2017", "data/coco/stuffthingmaps_trainval2017/val2017")[i]`` is
    ``(PIL RGB image, (H, W) uint8 labels)``; labels are coarse (27 classes, 255 = unlabelled)
    when ``coarse`` (default), the raw 0–181 ids otherwise. Images without a label map are
    skipped; ``limit`` keeps the first ``limit`` pairs in file-name order.
    """

    def __init__(self, image_dir: str | Path, label_dir: str | Path, coarse: bool = True,
                 limit: int | None = None):
        self.image_dir, self.label_dir = Path(image_dir), Path(label_dir)
        for d, what in ((self.image_dir, "image"), (self.label_dir, "label")):
            if not d.is_dir():
                raise FileNotFoundError(f"COCO-Stuff {what} folder {d} does not exist; "
                                        f"see experiments/download_coco.sh")
        labels = {p.stem: p for p in self.label_dir.glob("*.png")}
        images = sorted(p for p in self.image_dir.iterdir()
                        if p.suffix.lower() in (".jpg", ".jpeg", ".png") and p.stem in labels)
        self.pairs = [(p, labels[p.stem]) for p in images][:limit]
        self.label_map = "cocostuff27" if coarse else None
        self.num_classes = len(COARSE_SUPERCATEGORIES) if coarse else 182
        self.class_names = COARSE_NAMES if coarse else FINE_NAMES

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        from ldsc.features.images import load_image

        image_path, label_path = self.pairs[i]
        return load_image(image_path), read_label_map(label_path, self.label_map)
