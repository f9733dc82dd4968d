"""Evaluating eigenvectors of a data set (docs/evaluation.md): data-set k-means, Hungarian mIoU,
what vs where, four-panel figures, tables comparing runs. ``python -m ldsc.evaluate`` is its
command line."""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from ldsc.evaluation import segment
from ldsc.errors import DataError

log = logging.getLogger("ldsc.evaluate")


# --------------------------------------------------------------------------------------------
# inputs


def load_run(run_dir: str | Path) -> dict:
    """``eigvecs.pt`` of a finished run, with a one-sentence error when it is not there."""
    from ldsc.export import load_eigenvectors

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"Run folder '{run_dir}' does not exist.")
    run = load_eigenvectors(run_dir)
    E = torch.as_tensor(run["eigvecs"])
    if E.dim() != 4 or len(run["files"]) != E.shape[0]:
        raise DataError(f"'{run_dir / 'eigvecs.pt'}' holds eigvecs of shape {tuple(E.shape)} for "
                        f"{len(run['files'])} files; expected (n_images, K, H, W) with one file per image.")
    bad = int((~torch.isfinite(E)).sum()) if E.is_floating_point() else 0
    if bad:
        raise DataError(f"'{run_dir / 'eigvecs.pt'}' holds {bad} NaN or infinite values (of {E.numel()}): the file is "
                        f"damaged or the run diverged; export it again (`resume=true`) or re-run.")
    return run


def label_files(files: list[str], labels_dir: str | Path) -> list[Path]:
    """The label PNG of every image: ``<labels_dir>/<its path relative to the images' common
    folder>.png`` (so label folders can mirror image subfolders), else ``<labels_dir>/<stem>.png``
    when no other image has that stem; one sentence when any is missing or ambiguous."""
    from collections import Counter

    labels_dir = Path(labels_dir)
    if not labels_dir.is_dir():
        raise DataError(f"Label folder '{labels_dir}' does not exist.")
    root = Path(os.path.commonpath([str(Path(f).parent) for f in files])) if files else Path(".")
    stems = Counter(Path(f).stem for f in files)
    paths, missing = [], []
    for f in files:
        rel = Path(f).relative_to(root).with_suffix(".png")
        p = labels_dir / rel
        if not p.is_file():
            flat = labels_dir / f"{Path(f).stem}.png"
            if stems[Path(f).stem] > 1:
                raise DataError(f"{stems[Path(f).stem]} images are named '{Path(f).stem}' (e.g. '{f}'): put their "
                                f"label maps at the images' relative paths under '{labels_dir}' (e.g. '{p}').")
            p = flat if flat.is_file() else None
        (paths if p is not None else missing).append(p if p is not None else f)
    if missing:
        rel = Path(missing[0]).relative_to(root).with_suffix(".png")
        raise DataError(f"{len(missing)} of {len(files)} images have no label map in '{labels_dir}' "
                        f"(e.g. '{rel}' for image '{missing[0]}').")
    return paths


def load_labels(files: list[str], label_paths: list[Path], size: int, label_map: str | None, view=None) -> np.ndarray:
    """``(n, size, size)`` uint8 label maps, each checked against its image's size, cut as ``view``
    cut the image (:class:`~ldsc.features.images.ImageView`; default: whole) and resized (nearest)
    the way the data pipeline resized the image."""
    from ldsc.evaluation.cocostuff import read_label_map
    from ldsc.features.images import ImageView, image_size
    from ldsc.evaluation.segment_viz import resize_nearest

    from ldsc.progress import bar

    out = np.empty((len(files), size, size), dtype=np.uint8)
    for i, (f, lp) in enumerate(bar(list(zip(files, label_paths)), desc="label maps", unit="img",
                                    disable=len(files) < 50)):
        lab = read_label_map(lp, label_map)
        try:
            w, h = image_size(f)  # upright, as the run saw it
        except OSError as err:
            raise DataError(f"Image '{f}' of the run cannot be read ({err.strerror or err}); label maps are checked "
                            f"against the images' sizes, so evaluate where the run's images are.") from err
        if lab.shape != (h, w):
            raise DataError(f"Label map '{lp}' is {lab.shape[1]}x{lab.shape[0]} but its image '{f}' is "
                            f"{w}x{h}: label maps must have their image's size.")
        out[i] = resize_nearest((view or ImageView()).labels(lab), (size, size))
    return out


def class_names(labels_dir: str | Path | None, label_map: str | None, num_classes: int) -> list[str]:
    from ldsc.evaluation.cocostuff import LABEL_NAMES

    if label_map in LABEL_NAMES:
        return list(LABEL_NAMES[label_map])
    if labels_dir is not None and (Path(labels_dir) / "classes.json").is_file():
        names = json.loads((Path(labels_dir) / "classes.json").read_text())
        if len(names) >= num_classes:
            return [str(n) for n in names[:num_classes]]
    return [str(i) for i in range(num_classes)]


# --------------------------------------------------------------------------------------------
# the evaluation


def assign_clusters(km, E: torch.Tensor, size: int, normalize: str = "rows") -> np.ndarray:
    """Nearest-centroid cluster of every pixel of every image at ``size × size``:
    ``E (n, K, H, W)`` is upsampled bilinearly one image at a time. Returns ``(n, size, size)``
    uint8 (or int16 above 255 clusters)."""
    import torch.nn.functional as F

    n = E.shape[0]
    dtype = np.uint8 if km.n_clusters <= 255 else np.int16
    from ldsc.progress import bar

    out = np.empty((n, size, size), dtype=dtype)
    for i in bar(range(n), desc="clusters per pixel", unit="img", disable=n < 50):
        up = E[i : i + 1] if E.shape[-1] == size else F.interpolate(
            E[i : i + 1], size=(size, size), mode="bilinear", align_corners=False)
        out[i] = km.predict(segment.pixel_embedding(up, normalize=normalize)).reshape(size, size)
    return out


#: how clusters are matched to classes (docs/evaluation.md, "Protocols"): ``dataset`` — k-means on
#: the pixel embedding at the scoring size, one Hungarian assignment for the whole data set;
#: ``official`` — the paper's code: the eigenvectors' first ``clusters`` principal components
#: scaled by their singular values, k-means on the base grid, nearest upsampling, one Hungarian
#: assignment for the data set (and the greedy many-to-one matching beside it); ``per-image`` —
#: the ``dataset`` clusters matched to classes in every image on its own (DiffSeg, DiffCut)
PROTOCOLS = ("dataset", "official", "per-image")


def official_clusters(E: torch.Tensor, clusters: int, size: int, seed: int = 0) -> np.ndarray:
    """The official code's clusters: the first ``min(clusters, K)`` SVD components of the pixels'
    stacked rows scaled by their singular values (``U S``, uncentred), k-means with ``clusters``
    centres over every base-grid pixel — scikit-learn's ``KMeans(clusters, random_state=seed)`` as the official code calls it
    (full Lloyd iterations at any size, scikit-learn's default ``n_init``), not the mini-batch
    k-means the other protocols use beyond 50,000 pixels — each image's labels upsampled to
    ``size × size`` by nearest neighbour.

    ``E`` is a run's ``eigvecs.pt``, whose channels the export already wrote as ``U S`` of the
    solver's output in singular-value order (:func:`~ldsc.spectral.alignment.svd_order`): the
    official code's SVD step is that one, so its first channels are taken as they are. For the
    eigenvalue-ordered solvers (``lobpcg``, ``exact``) they are the eigenvectors in eigenvalue
    order: orthonormal, every singular value 1, where a second SVD would return an arbitrary
    rotation of them and "the first C components" would be an arbitrary C-dimensional subspace."""
    from sklearn.cluster import KMeans

    from ldsc.evaluation.segment_viz import resize_nearest

    n, K, H, W = E.shape
    feats = E[:, : min(clusters, K)].permute(0, 2, 3, 1).reshape(-1, min(clusters, K)).float().numpy()
    labels = KMeans(n_clusters=clusters, random_state=seed).fit(feats).labels_.reshape(n, H, W)
    dtype = np.uint8 if clusters <= 255 else np.int16
    return np.stack([resize_nearest(labels[i], (size, size)) for i in range(n)]).astype(dtype)


def evaluate_run(
    run_dir: str | Path,
    labels: str | Path | None = None,
    label_map: str | None = None,
    clusters: int | None = None,
    num_classes: int | None = None,
    eval_size: int | None = None,
    n_figures: int = 4,
    out: str | Path | None = None,
    seed: int = 0,
    use_wandb: bool | None = None,
    normalize: str = "rows",
    protocol: str = "dataset",
) -> dict:
    """Evaluate ``run_dir`` (see the module docstring); returns the metrics written to
    ``<out>/metrics.json``."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    run = load_run(run_dir)
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "eval"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"The evaluation folder '{out}' cannot be written ({err.strerror or err}); "
                        f"choose another with --out.") from err
    E = torch.as_tensor(run["eigvecs"]).float()
    files = [str(f) for f in run["files"]]
    n, K, H, W = E.shape
    size = int(eval_size or min(4 * max(H, W), 320))

    Y = None
    cfg = run.get("config") or {}
    from ldsc.features.images import ImageView

    view = ImageView.of(cfg.get("backbone"))  # the part of each image the run saw
    log.info("evaluating %d image(s) of %s (K=%d, base grid %dx%d%s)", n, run_dir, K, H, W,
             "" if view.squashes else f", images seen as resize {view.resize} / centre crop {view.crop}")
    if labels is not None:
        Y = load_labels(files, label_files(files, labels), size, label_map, view)
        present = np.unique(Y[Y != segment.IGNORE_INDEX])
        if present.size == 0:
            raise DataError(f"Every pixel of the label maps in '{labels}' is {segment.IGNORE_INDEX} (unlabelled): "
                            f"there is nothing to score.")
        inferred = int(present.max()) + 1 if present.size else 1
        if label_map is not None:
            from ldsc.evaluation.cocostuff import LABEL_NAMES

            inferred = len(LABEL_NAMES[label_map])
        num_classes = int(num_classes or inferred)
        if present.size and present.max() >= num_classes:
            raise DataError(f"Label maps in '{labels}' contain class {int(present.max())} but "
                            f"--num-classes is {num_classes}.")
    timings["load_s"] = time.perf_counter() - t0

    metrics: dict = {"run_dir": str(run_dir), "n_images": n, "K": K, "base_size": [H, W],
                     "eval_size": size, "labels": str(labels) if labels else None,
                     "label_map": label_map, "view": {"resize": view.resize, "crop": view.crop}}
    for key in ("backbone", "graph", "solver"):
        target = (cfg.get(key) or {}).get("_target_") if isinstance(cfg.get(key), dict) else None
        if target:
            metrics[key] = target
    if isinstance(cfg.get("graph"), dict) and "pair" in cfg["graph"]:
        metrics["graph_pair"] = cfg["graph"]["pair"]

    X = segment.pixel_embedding(E)
    if protocol not in PROTOCOLS:
        raise DataError(f"--protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}.")
    if Y is not None:
        t = time.perf_counter()
        C = int(clusters or num_classes)
        if C > n * H * W:
            raise DataError(f"--clusters={C} is more than the {n * H * W} base-grid pixels of the run's {n} image(s): "
                            f"use at most {n * H * W}.")
        log.info("k-means: %d clusters over %d pixels (protocol %s)", C, n * H * W, protocol)
        if protocol == "official":
            pred = official_clusters(E, C, size, seed)
        else:
            km = segment.kmeans_fit(segment.pixel_embedding(E, normalize=normalize), C, seed=seed)
            pred = assign_clusters(km, E, size, normalize)
        timings["kmeans_s"] = time.perf_counter() - t
        t = time.perf_counter()
        names = class_names(labels, label_map, num_classes)
        metrics.update({"protocol": protocol, "clusters": C, "num_classes": num_classes,
                        "normalize": None if protocol == "official" else normalize})
        if protocol == "per-image":
            scores = segment.per_image_scores(pred, Y, num_classes, n_pred=C)
        else:
            scores = segment.segmentation_scores(pred, Y, num_classes, n_pred=C)
        metrics.update({
            "miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"],
            "per_class_iou": {nm: (None if np.isnan(v) else v) for nm, v in zip(names, scores["per_class_iou"])},
        })
        if protocol == "official":  # the greedy (many-to-one) matching, reported beside
            mapping = segment.greedy_mapping(pred, Y, C, num_classes)
            greedy = segment.segmentation_scores(np.maximum(mapping, 0)[pred], Y, num_classes, match=False)
            metrics["greedy"] = {"miou": greedy["miou"], "pixel_accuracy": greedy["pixel_accuracy"],
                                 "mapping": mapping.tolist()}
        timings["metrics_s"] = time.perf_counter() - t
    if Y is not None and protocol != "per-image":
        pixels = scores["confusion"].sum(1)
        metrics.update({"mapping": scores["mapping"].tolist(), "unmatched_pixels": scores["unmatched_pixels"]})
        np.save(out / "confusion.npy", scores["confusion"])
        with open(out / "per_class_iou.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["class_id", "name", "iou", "pixels"])
            for i, (nm, v) in enumerate(zip(names, scores["per_class_iou"])):
                w.writerow([i, nm, "" if np.isnan(v) else f"{v:.4f}", int(pixels[i])])
        from ldsc.evaluation.segment_viz import confusion_figure

        confusion_figure(scores["confusion"], names, out / "confusion.png",
                         title=f"mIoU {scores['miou']:.3f}, accuracy {scores['pixel_accuracy']:.3f}")

    t = time.perf_counter()
    from ldsc.evaluation.segment_viz import resize_nearest

    log.info("what/where probes")
    y_base = None
    if Y is not None:
        y_base = np.stack([resize_nearest(y, (H, W)) for y in Y]).reshape(-1)
    metrics["what_where"] = segment.what_where(X, segment.pixel_positions(n, H, W), y_base, seed=seed)
    timings["what_where_s"] = time.perf_counter() - t

    t = time.perf_counter()
    figures = write_four_panels(E, files, out / "figures", n_figures, seed, view)
    timings["figures_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    metrics["timings"] = {k: round(v, 3) for k, v in timings.items()}
    metrics["figures"] = [str(p) for p in figures]
    metrics["out"] = str(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    if use_wandb is None:
        use_wandb = (run_dir / "wandb").is_dir()
    if use_wandb:
        log_to_wandb(run_dir, out, metrics)
    return metrics


def write_four_panels(E: torch.Tensor, files: list[str], fig_dir: Path, n_figures: int, seed: int,
                      view=None) -> list[Path]:
    """The paper's four-panel figure for the first ``n_figures`` images (of the part ``view`` saw)."""
    from ldsc.features.images import ImageView, load_image
    from ldsc.progress import bar
    from ldsc.evaluation.segment_viz import four_panel_figure

    paths = []
    for i in bar(range(min(n_figures, len(files))), desc="four-panel figures", unit="fig"):
        e = E[i].numpy()
        masks = segment.instance_masks(e, seed=seed)
        seg = segment.segment_image(e, seed=seed)
        p = fig_dir / f"four_panel_{i:04d}_{Path(files[i]).stem}.png"
        img = (view or ImageView()).visible(load_image(files[i]))
        paths.append(four_panel_figure(img, e, masks, seg, p, title=Path(files[i]).name))
    return paths


def log_to_wandb(run_dir: Path, out: Path, metrics: dict) -> None:
    """Log scalars and figures to W&B (offline unless ``WANDB_MODE`` says otherwise), resuming
    the training run's id when ``RUN_DIR/wandb`` holds one."""
    import wandb

    run_id = None
    wdir = run_dir / "wandb"
    if wdir.is_dir():
        runs = sorted(p.name for p in wdir.iterdir() if p.is_dir() and "run-" in p.name)
        run_id = runs[-1].rsplit("-", 1)[-1] if runs else None
    wandb.init(project="ldsc", dir=str(out), id=run_id, resume="allow" if run_id else None,
               mode=os.environ.get("WANDB_MODE", "offline"), job_type="evaluate")
    scalars = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    scalars.update({f"eval/{k}": v for k, v in metrics["what_where"].items()})
    images = [wandb.Image(p, caption=Path(p).stem) for p in metrics["figures"]]
    if (out / "confusion.png").is_file():
        images.append(wandb.Image(str(out / "confusion.png"), caption="confusion"))
    wandb.log({**scalars, "eval/figures": images})
    wandb.finish()


# --------------------------------------------------------------------------------------------
# comparing runs


#: columns of :func:`metrics_table`: (header, key in metrics.json or in its what_where)
TABLE_COLUMNS = [
    ("mIoU", "miou"), ("pixel acc.", "pixel_accuracy"),
    ("where: position R²", "position_r2"), ("where: var. from position", "variance_from_position"),
    ("what: label probe acc.", "label_accuracy"), ("what: label k-means mIoU", "label_kmeans_miou"),
    ("what: var. from label", "variance_from_label"),
]


def run_name(m: dict) -> tuple[str, str]:
    """``(backbone, graph)`` of an evaluated run, from its recorded config targets."""
    cls = str(m.get("backbone") or "?").rsplit(".", 1)[-1]
    backbone = {"StableDiffusionBackbone": "sd"}.get(cls, cls.replace("Backbone", "").lower() or "?")
    return backbone, str(m.get("graph_pair") or "?")


def metrics_table(paths, digits: int = 3) -> str:
    """One markdown table comparing evaluated runs, e.g. ``graph=qk`` against ``graph=vv`` (what
    vs where) or several backbones (COCO-Stuff-27).

    Args:
        paths: ``metrics.json`` files, or run / eval folders holding one (``RUN/eval/metrics.json``).
    Returns:
        a markdown table, one row per run: backbone, graph, images, then the
        :data:`TABLE_COLUMNS` that at least one run has (``–`` where a run lacks one).
    """
    rows = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            p = p / "metrics.json" if (p / "metrics.json").is_file() else p / "eval" / "metrics.json"
        if not p.is_file():
            raise DataError(f"No metrics.json at '{p}': run `python -m ldsc.evaluate RUN_DIR` first.")
        m = json.loads(p.read_text())
        rows.append((p, m, {**m, **m.get("what_where", {})}))
    cols = [(h, k) for h, k in TABLE_COLUMNS if any(isinstance(r[2].get(k), (int, float)) for r in rows)]
    lines = ["| run | backbone | graph | images | matching protocol | " + " | ".join(h for h, _ in cols) + " |",
             "|---|---|---|---:|---|" + "---:|" * len(cols)]
    for p, m, flat in rows:
        run = p.parent.parent.name if p.parent.name == "eval" else p.parent.name
        backbone, graph = run_name(m)
        vals = [f"{flat[k]:.{digits}f}" if isinstance(flat.get(k), (int, float)) else "–" for _, k in cols]
        lines.append(f"| {run} | {backbone} | {graph} | {m.get('n_images', '–')} | {m.get('protocol', 'dataset')} | "
                     + " | ".join(vals) + " |")
    return "\n".join(lines)


def format_summary(m: dict) -> str:
    """A short human-readable report of :func:`evaluate_run`'s metrics."""
    lines = [f"{m['n_images']} image(s), K={m['K']}, base grid {m['base_size'][0]}x{m['base_size'][1]}"]
    if "miou" in m:
        lines.append(f"k-means C={m['clusters']} vs {m['num_classes']} classes at {m['eval_size']}px, "
                     f"{m.get('protocol', 'dataset')} matching: mIoU {m['miou']:.4f}  pixel accuracy {m['pixel_accuracy']:.4f}")
        if "greedy" in m:
            lines.append(f"greedy (many-to-one) matching: mIoU {m['greedy']['miou']:.4f}  "
                         f"pixel accuracy {m['greedy']['pixel_accuracy']:.4f}")
        width = max(len(k) for k in m["per_class_iou"])
        for name, v in m["per_class_iou"].items():
            lines.append(f"  {name:<{width}}  {'   n/a' if v is None else f'{v:6.3f}'}")
    ww = m["what_where"]
    lines.append("what/where: " + ", ".join(f"{k} {v:.3f}" for k, v in ww.items() if isinstance(v, float)))
    lines.append(f"wrote {m['out']}/metrics.json in {m['timings']['total_s']:.1f} s")
    return "\n".join(lines)
