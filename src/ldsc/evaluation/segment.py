"""Segmentation and evaluation of pseudo-eigenvector embeddings (docs/method.md, Evaluation).

Pure functions on arrays/tensors — no Lightning, no Hydra — usable from a notebook:

* :func:`pixel_embedding` — ``(K, H, W)`` eigenvectors -> ``(H·W, K')`` per-pixel rows.
* :func:`kmeans_auto` / :func:`segment_image` — k-means with k chosen by silhouette score.
* :func:`instance_masks` — regions of the embedding that stand out from their surroundings.
* :func:`hungarian_match` / :func:`segmentation_scores` — unsupervised-segmentation metrics
  (one-to-one cluster→class matching, mIoU, pixel accuracy).
* :func:`what_where` — how much of the embedding is "where" (pixel position) vs "what" (label).

Conventions: eigenvectors are those of ``RUN_DIR/eigvecs.pt``, channel 0 first: for the paper's
solver SVD-ordered and scaled by their singular values (``U·Σ``, so Euclidean distances between
rows equal distances between its pseudo-eigenvectors ``Z``); for the LOBPCG and exact solvers
orthonormal eigenvectors in order of decreasing eigenvalue (channel 0: the leading, degree-like
one).
Label maps use ``ignore_index`` (255) for unlabelled pixels.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

IGNORE_INDEX = 255


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# --------------------------------------------------------------------------------------------
# embeddings


#: rows shorter than this fraction of the root-mean-square row norm are not blown up to unit
#: length by ``normalize="rows"`` (see :func:`pixel_embedding`)
ROW_FLOOR = 0.5


def pixel_embedding(eigvecs, drop_first: bool = True, normalize: str = "none") -> np.ndarray:
    """Per-pixel rows of one or several images' eigenvectors.

    Args:
        eigvecs: ``(K, H, W)`` (one image) or ``(B, K, H, W)``.
        drop_first: drop channel 0. With the softmax parametrisation every pixel's ``Z`` sums to
            one, so the leading singular direction is close to the all-ones direction: channel 0
            is the (near-)trivial, almost constant eigenvector and says nothing about grouping.
            (The paper's PCA figure drops it for the same reason.)
        normalize: ``"none"`` (default: keep the singular-value scaling, so leading
            eigenvectors weigh more and distances are those between the solver's ``Z``),
            ``"rows"`` (rows to unit length, as in Ng–Jordan–Weiss spectral clustering — a
            pixel is described by its *direction* in the eigenspace. Each row is divided by
            ``max(‖row‖, ROW_FLOOR · rms)``, ``rms`` the root-mean-square row norm, so rows near
            zero — pixels that no eigenvector but channel 0 describes, e.g. a background — stay
            near the origin and form their own cluster instead of pointing in random directions.
            K eigenvectors of a large graph each light up a few regions, so with ``"none"`` the
            pixels outside them pile into one big cluster; ``"rows"`` is what per-image
            segmentation and instance masks use) or ``"channels"`` (each channel to unit
            variance: all eigenvectors weigh the same).

    Returns:
        ``(H·W, K')`` (or ``(B·H·W, K')``, rows ordered ``(b, y, x)``) float32 array.
    """
    E = _numpy(eigvecs).astype(np.float32)
    if E.ndim == 3:
        E = E[None]
    if E.ndim != 4:
        raise ValueError(f"eigvecs must be (K, H, W) or (B, K, H, W), got shape {E.shape}")
    if drop_first and E.shape[1] > 1:
        E = E[:, 1:]
    X = np.ascontiguousarray(E.transpose(0, 2, 3, 1).reshape(-1, E.shape[1]))
    if normalize == "rows":
        norms = np.linalg.norm(X, axis=1, keepdims=True)
        rms = float(np.sqrt(np.mean(norms**2))) if len(X) else 0.0
        X = X / np.maximum(norms, max(ROW_FLOOR * rms, 1e-12))
    elif normalize == "channels":
        X = (X - X.mean(0)) / np.maximum(X.std(0), 1e-12)
    elif normalize != "none":
        raise ValueError(f"normalize must be 'none', 'rows' or 'channels', got {normalize!r}")
    return X


def pixel_positions(n_images: int, H: int, W: int) -> np.ndarray:
    """``(n_images·H·W, 2)`` pixel-centre coordinates ``(x, y)`` in ``[0, 1]``, rows ``(b, y, x)``."""
    ys, xs = np.meshgrid((np.arange(H) + 0.5) / H, (np.arange(W) + 0.5) / W, indexing="ij")
    xy = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32)
    return np.tile(xy, (n_images, 1))


# --------------------------------------------------------------------------------------------
# k-means


def kmeans_fit(X: np.ndarray, k: int, seed: int = 0, minibatch_above: int = 50_000, n_init: int = 3):
    """A fitted scikit-learn k-means on rows ``X (n, d)``; MiniBatchKMeans above
    ``minibatch_above`` rows (data-set evaluation), exact Lloyd below."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if len(X) > minibatch_above:
        km = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=n_init, batch_size=8192,
                             max_iter=200)
    else:
        km = KMeans(n_clusters=k, random_state=seed, n_init=n_init)
    return km.fit(X)


def kmeans_auto(
    embedding,
    k_range: tuple[int, int] = (2, 10),
    seed: int = 0,
    max_silhouette_points: int = 4000,
) -> tuple[np.ndarray, int, dict[int, float]]:
    """k-means for every ``k`` in ``k_range`` (inclusive), keeping the ``k`` of best silhouette.

    The silhouette is computed on one seeded random subsample of at most
    ``max_silhouette_points`` rows (the same for every ``k``): it costs ``O(n²)``.

    Args:
        embedding: ``(n, d)`` rows.
    Returns:
        ``(labels (n,) int64, k, scores {k: silhouette})``.
    """
    from sklearn.metrics import silhouette_score

    X = _numpy(embedding).astype(np.float32)
    n = len(X)
    rng = np.random.default_rng(seed)
    sub = rng.choice(n, size=min(n, max_silhouette_points), replace=False)
    lo, hi = int(k_range[0]), int(k_range[1])
    if lo < 2 or hi < lo:
        raise ValueError(f"k_range must satisfy 2 <= lo <= hi, got {k_range}")
    scores: dict[int, float] = {}
    best = None
    for k in range(lo, hi + 1):
        if k >= n:
            break
        labels = kmeans_fit(X, k, seed=seed).labels_
        if len(np.unique(labels[sub])) < 2:  # degenerate (e.g. duplicated rows): no silhouette
            continue
        scores[k] = float(silhouette_score(X[sub], labels[sub]))
        if best is None or scores[k] > scores[best[0]]:
            best = (k, labels)
    if best is None:
        return np.zeros(n, dtype=np.int64), 1, scores
    return best[1].astype(np.int64), best[0], scores


def segment_image(
    eigvecs,
    k: int | None = None,
    k_range: tuple[int, int] = (2, 10),
    drop_first: bool = True,
    normalize: str = "rows",
    seed: int = 0,
) -> np.ndarray:
    """k-means segmentation of one image's ``(K, H, W)`` eigenvectors into an ``(H, W)`` label
    map; ``k`` clusters if given, else chosen by silhouette over ``k_range``.
    See :func:`pixel_embedding` for ``drop_first`` and ``normalize``."""
    E = _numpy(eigvecs)
    H, W = E.shape[-2:]
    X = pixel_embedding(E, drop_first=drop_first, normalize=normalize)
    if k is None:
        labels, _, _ = kmeans_auto(X, k_range=k_range, seed=seed)
    else:
        labels = kmeans_fit(X, k, seed=seed).labels_
    return labels.reshape(H, W).astype(np.int64)


# --------------------------------------------------------------------------------------------
# instance masks


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean ``(H, W)`` mask."""
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    return [lab == i for i in range(1, n + 1)]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def region_contrast(X: np.ndarray, mask: np.ndarray, ring: int) -> float:
    """How much a region stands out from its surroundings in the embedding, in ``[-1, 1]``.

    A silhouette computed against the region's own centroid ``μ``: ``a`` = mean distance of the
    region's pixels to ``μ``, ``b`` = mean distance to ``μ`` of the pixels in a ``ring``-pixel band
    around the region; returns ``(b − a) / max(a, b)`` (0 when the band is empty, i.e. the region
    fills the image).

    Args:
        X: ``(H, W, d)`` embedding; mask: ``(H, W)`` bool.
    """
    from scipy import ndimage

    band = ndimage.binary_dilation(mask, iterations=ring) & ~mask
    if not band.any() or not mask.any():
        return 0.0
    inside = X[mask]
    mu = inside.mean(0)
    a = float(np.linalg.norm(inside - mu, axis=1).mean())
    b = float(np.linalg.norm(X[band] - mu, axis=1).mean())
    return (b - a) / max(a, b, 1e-12)


def _touched_borders(mask: np.ndarray) -> int:
    return int(mask[0].any()) + int(mask[-1].any()) + int(mask[:, 0].any()) + int(mask[:, -1].any())


def instance_masks(
    eigvecs,
    lobe_threshold: float = 1.0,
    kmeans_ks: Sequence[int] = (2, 3, 4, 5, 6, 8),
    min_area: float = 0.005,
    max_area: float = 0.5,
    max_borders: int = 2,
    area_scale: float = 0.02,
    nms_iou: float = 0.5,
    max_masks: int = 20,
    min_score: float = 0.2,
    drop_first: bool = True,
    normalize: str = "rows",
    seed: int = 0,
) -> list[tuple[np.ndarray, float]]:
    """Regions of one image's embedding that stand out from their surroundings ("instances").

    1. **Candidates**, from two sources that complement each other:
       * *eigenvector lobes* — each eigenvector (channel ≥ 1), robustly standardised (median,
         MAD), thresholded at ``+lobe_threshold`` and ``−lobe_threshold``; an object is often a
         lobe of one eigenvector;
       * *k-means regions* — k-means partitions of the whole embedding for each ``k`` in
         ``kmeans_ks``, a coarse-to-fine hierarchy that catches objects spread over eigenvectors.
       Every candidate is split into 8-connected components.
    2. **Filters** — area between ``min_area`` and ``max_area`` (fractions of the image, at least
       4 pixels); touching more than ``max_borders`` image borders is background.
    3. **Score** = :func:`region_contrast` (a silhouette of the region against a band around
       it, width 5 % of the image side) × area prior ``1 − exp(−area / area_scale)``, which
       discounts specks without favouring large regions once they exceed ~``area_scale``.
    4. **Non-maximum suppression** — greedily keep the best-scoring masks whose IoU with every
       kept mask is below ``nms_iou``; at most ``max_masks``; scores below ``min_score`` are
       dropped (white noise scores < 0.1, blobs of smooth noise ~0.3, objects 0.4–0.9).

    Args:
        eigvecs: ``(K, H, W)`` eigenvectors of one image; ``drop_first``/``normalize`` as in
            :func:`pixel_embedding`.
    Returns:
        list of ``(mask (H, W) bool, score float)``, best first.
    """
    E = _numpy(eigvecs).astype(np.float32)
    if E.ndim != 3:
        raise ValueError(f"eigvecs must be (K, H, W), got shape {E.shape}")
    K, H, W = E.shape
    n = H * W
    X = pixel_embedding(E, drop_first=drop_first, normalize=normalize).reshape(H, W, -1)
    X = X / max(float(np.sqrt((X.reshape(n, -1).var(0)).sum())), 1e-12)  # scale-free

    candidates: list[np.ndarray] = []
    for c in range(X.shape[-1]):
        v = X[..., c]
        med = np.median(v)
        mad = 1.4826 * np.median(np.abs(v - med))
        if mad < 1e-12:
            continue
        z = (v - med) / mad
        candidates += _components(z > lobe_threshold) + _components(z < -lobe_threshold)
    flat = X.reshape(n, -1)
    for k in kmeans_ks:
        if k >= n:
            continue
        labels = kmeans_fit(flat, int(k), seed=seed, n_init=1).labels_.reshape(H, W)
        for c in range(int(k)):
            candidates += _components(labels == c)

    lo, hi = max(4, min_area * n), max_area * n
    ring = max(1, round(0.05 * max(H, W)))
    scored = []
    for m in candidates:
        area = int(m.sum())
        if area < lo or area > hi or _touched_borders(m) > max_borders:
            continue
        score = region_contrast(X, m, ring) * (1.0 - np.exp(-area / (area_scale * n)))
        if score >= min_score:
            scored.append((m, float(score)))
    scored.sort(key=lambda t: -t[1])

    kept: list[tuple[np.ndarray, float]] = []
    for m, s in scored:
        if all(mask_iou(m, k) < nms_iou for k, _ in kept):
            kept.append((m, s))
            if len(kept) >= max_masks:
                break
    return kept


# --------------------------------------------------------------------------------------------
# matching and metrics


def _valid_pairs(pred, target, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    p = _numpy(pred).reshape(-1).astype(np.int64)
    t = _numpy(target).reshape(-1).astype(np.int64)
    if p.shape != t.shape:
        raise ValueError(f"pred has {p.size} pixels but target has {t.size}")
    keep = t != ignore_index
    return p[keep], t[keep]


def hungarian_match(
    pred, target, n_pred: int, n_target: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """One-to-one assignment of predicted clusters to target classes maximising matched pixels.

    ``scipy.optimize.linear_sum_assignment`` on the ``(n_pred, n_target)`` co-occurrence matrix
    of pixels whose target is not ``ignore_index``.

    Args:
        pred: cluster ids in ``[0, n_pred)``, any shape; target: class ids in ``[0, n_target)``
            or ``ignore_index``, same number of elements.
    Returns:
        ``mapping (n_pred,)`` int64: ``mapping[c]`` is the class of cluster ``c``, or −1 for
        clusters left unmatched (when ``n_pred > n_target``).
    """
    from scipy.optimize import linear_sum_assignment

    p, t = _valid_pairs(pred, target, ignore_index)
    if p.size and (p.min() < 0 or p.max() >= n_pred):
        raise ValueError(f"pred ids must lie in [0, {n_pred}), got [{p.min()}, {p.max()}]")
    if t.size and (t.min() < 0 or t.max() >= n_target):
        raise ValueError(f"target ids must lie in [0, {n_target}) or be {ignore_index}, "
                         f"got [{t.min()}, {t.max()}]")
    counts = np.bincount(p * n_target + t, minlength=n_pred * n_target).reshape(n_pred, n_target)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    mapping = np.full(n_pred, -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def segmentation_scores(
    pred,
    target,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    n_pred: int | None = None,
    match: bool = True,
) -> dict:
    """mIoU and pixel accuracy of a (cluster) prediction against a label map.

    With ``match=True`` (unsupervised segmentation), clusters are first mapped to classes by
    :func:`hungarian_match`; pixels of unmatched clusters count as wrong (a false negative of
    their true class, a false positive of no class). The confusion matrix comes from
    ``torchmetrics``' ``MulticlassConfusionMatrix`` with one extra "unmatched" column.

    mIoU is the mean IoU over classes with a non-empty union (present in the target or the
    prediction); absent classes have IoU ``nan`` in ``per_class_iou``.

    Args:
        pred: cluster ids (``match=True``, in ``[0, n_pred)``, ``n_pred`` defaults to
            ``num_classes``) or class ids (``match=False``); target: class ids or ``ignore_index``.
    Returns:
        dict with ``miou``, ``pixel_accuracy``, ``per_class_iou`` (list of ``num_classes``),
        ``confusion`` (``(num_classes, num_classes)`` int64 array, rows = target, columns =
        prediction), ``mapping`` (cluster → class, or ``None``) and ``unmatched_pixels``.
    """
    from torchmetrics.classification import MulticlassConfusionMatrix

    p, t = _valid_pairs(pred, target, ignore_index)
    mapping = None
    if match:
        n_pred = num_classes if n_pred is None else int(n_pred)
        mapping = hungarian_match(p, t, n_pred, num_classes, ignore_index)
        p = mapping[p]
    elif p.size and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"pred ids must lie in [0, {num_classes}) when match=False")
    p = np.where(p < 0, num_classes, p)  # unmatched -> extra column
    metric = MulticlassConfusionMatrix(num_classes=num_classes + 1)
    conf = metric(torch.from_numpy(p), torch.from_numpy(t)).numpy().astype(np.int64)
    conf = conf[:num_classes]  # rows: true classes (the extra row is empty)
    tp = np.diag(conf[:, :num_classes]).astype(np.float64)
    union = conf.sum(1) + conf[:, :num_classes].sum(0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    total = conf.sum()
    return {
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
        "per_class_iou": [float(x) for x in iou],
        "confusion": conf[:, :num_classes],
        "mapping": mapping,
        "unmatched_pixels": int(conf[:, num_classes].sum()),
    }


def _iou_scores(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, total: int) -> dict:
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return {"miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
            "per_class_iou": [float(x) for x in iou]}


def per_image_scores(pred, target, num_classes: int, n_pred: int, ignore_index: int = IGNORE_INDEX) -> dict:
    """The per-image matching protocol of the training-free diffusion segmenters (DiffSeg, DiffCut):
    every image's own one-to-one assignment of its predicted segments to classes (Hungarian,
    maximising the image's matched pixels), the counts then summed over the images.

    Per image, with ``h[c, s]`` its pixels of class ``c`` predicted as segment ``s`` (pixels whose
    target is ``ignore_index`` left out) and ``c ↔ s(c)`` its assignment: class ``c`` gains
    ``tp = h[c, s(c)]``, ``fn = Σ_s h[c, s] − tp`` (all of its row when it got no segment) and
    ``fp = Σ_c' h[c', s(c)] − tp``; segments assigned to no class add nothing but the ``fn`` of
    their pixels' classes. Over the data set, ``IoU_c = Σtp / (Σtp + Σfp + Σfn)`` (``nan`` when the
    class never appears nor is predicted), mIoU their mean, accuracy ``Σtp / pixels``. Far more
    lenient than one assignment for the whole data set (:func:`segmentation_scores`): each image
    relabels its segments freely.

    Args:
        pred: ``(n, ...)`` segment ids in ``[0, n_pred)`` per image; target: ``(n, ...)`` class ids.
    Returns:
        dict with ``miou``, ``pixel_accuracy``, ``per_class_iou``.
    """
    from scipy.optimize import linear_sum_assignment

    pred, target = _numpy(pred), _numpy(target)
    if pred.shape[0] != target.shape[0]:
        raise ValueError(f"pred has {pred.shape[0]} images but target has {target.shape[0]}")
    tp, fp, fn = (np.zeros(num_classes) for _ in range(3))
    total = 0
    for p_img, t_img in zip(pred, target):
        p, t = _valid_pairs(p_img, t_img, ignore_index)
        if p.size and (p.min() < 0 or p.max() >= n_pred):
            raise ValueError(f"pred ids must lie in [0, {n_pred}), got [{p.min()}, {p.max()}]")
        h = np.bincount(t * n_pred + p, minlength=num_classes * n_pred).reshape(num_classes, n_pred)
        rows, cols = linear_sum_assignment(h, maximize=True)
        matched = h[rows, cols]
        tp[rows] += matched
        fn += h.sum(1)
        fn[rows] -= matched
        fp[rows] += h[:, cols].sum(0) - matched
        total += p.size
    return _iou_scores(tp, fp, fn, total)


def greedy_mapping(pred, target, n_pred: int, n_target: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Many-to-one matching: every cluster to the class most of its pixels have (clusters with
    no labelled pixel: −1). The "greedy" variant some unsupervised segmentation codes report."""
    p, t = _valid_pairs(pred, target, ignore_index)
    counts = np.bincount(p * n_target + t, minlength=n_pred * n_target).reshape(n_pred, n_target)
    return np.where(counts.sum(1) > 0, counts.argmax(1), -1).astype(np.int64)


# --------------------------------------------------------------------------------------------
# what vs where


def _heldout_r2(F_train, Y_train, F_test, Y_test, alpha: float) -> float:
    """Mean over outputs of the held-out R² of a ridge regression ``F -> Y``."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score

    model = Ridge(alpha=alpha).fit(F_train, Y_train)
    return float(r2_score(Y_test, model.predict(F_test), multioutput="variance_weighted"))


def _one_hot(ids: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((len(ids), n), dtype=np.float32)
    out[np.arange(len(ids)), ids] = 1.0
    return out


def what_where(
    embedding,
    positions,
    labels=None,
    ignore_index: int = IGNORE_INDEX,
    position_bins: int = 8,
    test_fraction: float = 0.3,
    max_points: int = 20_000,
    ridge_alpha: float = 1e-3,
    seed: int = 0,
) -> dict:
    """How much of an embedding is "where" (pixel position) versus "what" (semantic label).

    All numbers are measured on a seeded held-out split (``test_fraction`` of at most
    ``max_points`` random rows; rows with ``ignore_index`` labels are dropped when labels are
    given). Decoding (embedding → attribute):

    * ``position_r2`` — R² of a ridge regression from the embedding to ``(x, y)``;
    * ``label_accuracy`` — accuracy of a linear probe (multinomial logistic regression) from the
      embedding to the label, with ``label_chance`` = the majority-class rate;
    * ``label_kmeans_miou`` — k-means with as many clusters as classes, Hungarian-matched mIoU.

    Explaining (attribute → embedding, comparable on one scale; variance-weighted over the
    embedding's channels as given, so with the default ``U·Σ`` scaling leading eigenvectors
    count more):

    * ``variance_from_position`` — held-out R² of the embedding predicted from the position
      cell (``position_bins × position_bins`` one-hot: any function of position at that
      resolution), i.e. the share of embedding variance that position explains;
    * ``variance_from_label`` — the same from the label one-hot.

    The paper's claim: ``qk`` eigenvectors are "where" (high position numbers), ``vv`` are "what"
    (high label numbers).

    Args:
        embedding: ``(n, d)``; positions: ``(n, 2)`` ``(x, y)`` in ``[0, 1]``; labels: ``(n,)``
            class ids (or ``ignore_index``), or ``None``.
    Returns:
        dict of floats (label entries only when labels are given) plus ``n_train``/``n_test``.
    """
    X = _numpy(embedding).astype(np.float64)
    P = _numpy(positions).astype(np.float64)
    if len(X) != len(P):
        raise ValueError(f"embedding has {len(X)} rows but positions has {len(P)}")
    keep = np.arange(len(X))
    y = None
    if labels is not None:
        y = _numpy(labels).reshape(-1).astype(np.int64)
        if len(y) != len(X):
            raise ValueError(f"embedding has {len(X)} rows but labels has {len(y)}")
        keep = keep[y != ignore_index]
    rng = np.random.default_rng(seed)
    keep = rng.permutation(keep)[:max_points]
    n_test = max(1, int(round(test_fraction * len(keep))))
    test, train = keep[:n_test], keep[n_test:]
    if len(train) < 2:
        raise ValueError(f"what_where needs at least 3 usable rows, got {len(keep)}")

    mu, sd = X[train].mean(0), X[train].std(0) + 1e-12
    Xs = (X - mu) / sd
    cells = np.clip((P * position_bins).astype(np.int64), 0, position_bins - 1)
    cell_id = cells[:, 1] * position_bins + cells[:, 0]
    C = _one_hot(cell_id, position_bins**2)
    out = {
        "position_r2": _heldout_r2(Xs[train], P[train], Xs[test], P[test], ridge_alpha),
        "variance_from_position": _heldout_r2(C[train], X[train], C[test], X[test], ridge_alpha),
        "n_train": int(len(train)),
        "n_test": int(len(test)),
    }
    if y is not None:
        from sklearn.linear_model import LogisticRegression

        classes, yc = np.unique(y[keep], return_inverse=True)
        y_compact = np.full(len(X), -1, dtype=np.int64)
        y_compact[keep] = yc
        n_cls = len(classes)
        ytr, yte = y_compact[train], y_compact[test]
        out["label_chance"] = float(np.mean(yte == np.bincount(ytr, minlength=n_cls).argmax()))
        if len(np.unique(ytr)) > 1:
            probe = LogisticRegression(max_iter=500).fit(Xs[train], ytr)
            out["label_accuracy"] = float((probe.predict(Xs[test]) == yte).mean())
        else:
            out["label_accuracy"] = 1.0
        L = _one_hot(y_compact[keep], n_cls)
        Lfull = np.zeros((len(X), n_cls), dtype=np.float32)
        Lfull[keep] = L
        out["variance_from_label"] = _heldout_r2(Lfull[train], X[train], Lfull[test], X[test],
                                                  ridge_alpha)
        if n_cls >= 2:
            km = kmeans_fit(Xs[keep], n_cls, seed=seed).labels_
            out["label_kmeans_miou"] = segmentation_scores(km, y_compact[keep], n_cls)["miou"]
        out["n_classes"] = int(n_cls)
    return out
