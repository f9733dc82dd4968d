"""Evaluate a finished run: unsupervised semantic segmentation, what vs where, figures.

    python -m ldsc.evaluate RUN_DIR [--labels DIR] [--label-map cocostuff27] [--clusters C]

Reads ``RUN_DIR/eigvecs.pt`` and writes ``RUN_DIR/eval/`` (or ``--out``):

* ``metrics.json`` — mIoU, pixel accuracy, per-class IoU, cluster→class mapping, what/where
  numbers, timings;
* ``per_class_iou.csv``, ``confusion.npy`` and ``confusion.png``;
* ``figures/four_panel_<i>_<name>.png`` — the paper's per-image figure for the first images.

Method (docs/method.md, Evaluation). The embedding is :func:`ldsc.evaluation.segment.pixel_embedding` (channel 0 dropped;
rows normalised to unit length unless short, ``--normalize rows``, as for per-image
segmentation: on the composite benchmark it raised mIoU from 0.28 to 0.35). k-means with ``C`` clusters (default: the number of classes) is
fitted on *all base-grid pixels of all images* (MiniBatchKMeans above 50k pixels). For scoring,
each image's eigenvectors are upsampled bilinearly to ``--eval-size`` (default ``4 × base``,
at most 320) and every pixel is assigned to its nearest centroid; label maps are resized to the
same square with nearest neighbour. Both follow the data pipeline's geometry: images are
squashed (no crop) to the backbone's square input, so the whole label map is used. Clusters are
matched one-to-one to classes by the Hungarian algorithm over the whole data set, then mIoU and
pixel accuracy come from the confusion matrix. What/where is measured on the base grid with
labels resized to it (nearest), on the eigenvectors as exported (no row normalisation).

Labels: ``--labels DIR`` is a folder of single-channel PNGs named like the images
(``<image path relative to the images' folder>.png``, or ``<stem>.png`` in one flat folder), values = class ids, 255 = unlabelled, each the size of its image.
``--label-map cocostuff27`` converts official COCO-Stuff stuff+things maps to the 27 coarse
classes. Class names come from the label map or from ``DIR/classes.json`` (a list) if present.
Without ``--labels`` only the label-free parts (positions, figures) are computed.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ldsc.errors import LdscError
from ldsc.evaluation.dataset import (TABLE_COLUMNS, evaluate_run, format_summary, label_files, load_labels,  # noqa: F401
                                     load_run, metrics_table)


# --------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ldsc.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="output folder of a finished `python -m ldsc.run` (holds eigvecs.pt)")
    p.add_argument("--labels", help="folder of PNG label maps named like the images (<stem>.png)")
    p.add_argument("--label-map", choices=["cocostuff27"], help="convert labels (official COCO-Stuff "
                   "stuff+things PNGs -> 27 coarse classes)")
    p.add_argument("--clusters", type=int, help="k-means clusters (default: the number of classes)")
    p.add_argument("--num-classes", type=int, help="classes in the labels (default: inferred)")
    p.add_argument("--eval-size", type=int, help="side at which pixels are scored (default: 4x base, <= 320)")
    p.add_argument("--figures", type=int, default=4, help="four-panel figures for the first N images")
    p.add_argument("--out", help="output folder (default: RUN_DIR/eval)")
    p.add_argument("--normalize", choices=["rows", "none", "channels"], default="rows",
                   help="embedding rows for k-means (see ldsc.evaluation.segment.pixel_embedding; default: rows)")
    p.add_argument("--protocol", choices=["dataset", "official", "per-image"], default="dataset",
                   help="how clusters are matched to classes: one Hungarian assignment for the data set "
                        "(dataset), the paper's code (official: SVD components, k-means on the base grid, plus "
                        "the greedy matching), or one per image (per-image: the DiffSeg/DiffCut protocol)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wandb", dest="wandb", action="store_true", default=None,
                   help="log to W&B (default: only if RUN_DIR/wandb exists)")
    p.add_argument("--no-wandb", dest="wandb", action="store_false")
    args = p.parse_args(argv)
    for name, low in (("clusters", 2), ("num_classes", 1), ("eval_size", 8), ("figures", 0)):
        value = getattr(args, name)
        if value is not None and value < low:
            p.error(f"--{name.replace('_', '-')}={value} must be at least {low}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        m = evaluate_run(args.run_dir, labels=args.labels, label_map=args.label_map,
                         clusters=args.clusters, num_classes=args.num_classes,
                         eval_size=args.eval_size, n_figures=args.figures, out=args.out,
                         seed=args.seed, use_wandb=args.wandb, normalize=args.normalize,
                         protocol=args.protocol)
    except LdscError as err:
        print(f"ldsc.evaluate: error: {err}", file=sys.stderr)
        return 1
    print(format_summary(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
