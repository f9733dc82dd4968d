"""Tests of ldsc.evaluation.segment: k-means/silhouette, instance masks, Hungarian mIoU, what/where."""

import numpy as np
import pytest
import torch

from ldsc.evaluation import segment


def planted_eigvecs(H=32, W=32, seed=0):
    """(K=4, H, W) eigenvectors of an image with a background and two regions, plus labels."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((H, W), dtype=np.int64)
    labels[4:14, 4:14] = 1
    labels[18:30, 12:28] = 2
    centres = np.array([[1.0, 0.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0], [1.0, 0.0, 2.0, 0.0]])
    E = centres[labels] + 0.05 * rng.standard_normal((H, W, 4))
    return torch.from_numpy(E.transpose(2, 0, 1).astype(np.float32)), labels


# -------------------------------------------------------------------------------- embeddings


def test_pixel_embedding_shapes_and_drop_first():
    E = torch.randn(2, 5, 6, 7)
    X = segment.pixel_embedding(E)
    assert X.shape == (2 * 6 * 7, 4)
    # row order (b, y, x), channel 1 first after dropping channel 0
    assert np.isclose(X[1 * 42 + 3 * 7 + 4, 0], E[1, 1, 3, 4].item())
    assert segment.pixel_embedding(E[0], drop_first=False).shape == (42, 5)
    rows = segment.pixel_embedding(E, normalize="rows")
    norms = np.linalg.norm(rows, axis=1)
    raw = np.linalg.norm(X, axis=1)
    long = raw >= segment.ROW_FLOOR * np.sqrt(np.mean(raw**2))
    assert long.mean() > 0.8 and np.allclose(norms[long], 1, atol=1e-5)
    assert (norms[~long] < 1).all()  # short rows are not blown up to unit length
    with pytest.raises(ValueError, match="normalize"):
        segment.pixel_embedding(E, normalize="bogus")


def test_pixel_positions_order():
    P = segment.pixel_positions(2, 4, 8)
    assert P.shape == (64, 2)
    assert np.allclose(P[0], [1 / 16, 1 / 8]) and np.allclose(P[8 + 3], [7 / 16, 3 / 8])
    assert np.allclose(P[32:], P[:32])


# -------------------------------------------------------------------------------- k-means


def test_kmeans_auto_picks_planted_number_of_blobs():
    rng = np.random.default_rng(0)
    centres = rng.uniform(-10, 10, size=(4, 3))
    X = np.concatenate([c + 0.3 * rng.standard_normal((150, 3)) for c in centres])
    labels, k, scores = segment.kmeans_auto(X, k_range=(2, 8), seed=0)
    assert k == 4
    assert set(scores) == set(range(2, 9)) and scores[4] == max(scores.values())
    truth = np.repeat(np.arange(4), 150)
    assert segment.segmentation_scores(labels, truth, 4)["miou"] == pytest.approx(1.0)


def test_kmeans_auto_is_seeded():
    X = np.random.default_rng(1).standard_normal((300, 2))
    a = segment.kmeans_auto(X, seed=3)
    b = segment.kmeans_auto(X, seed=3)
    assert a[1] == b[1] and np.array_equal(a[0], b[0])


def test_segment_image_recovers_planted_regions():
    E, truth = planted_eigvecs()
    seg = segment.segment_image(E, seed=0)
    assert seg.shape == truth.shape
    assert segment.segmentation_scores(seg, truth, 3, n_pred=int(seg.max()) + 1)["miou"] > 0.99
    assert segment.segment_image(E, k=2).max() == 1


# -------------------------------------------------------------------------------- instances


def test_instance_masks_recover_planted_bright_square():
    rng = np.random.default_rng(0)
    E = 0.1 * rng.standard_normal((6, 48, 48)).astype(np.float32)
    E[0] += 1.0  # trivial channel
    square = np.zeros((48, 48), dtype=bool)
    square[10:22, 26:40] = True
    E[2][square] += 3.0
    masks = segment.instance_masks(E)
    assert masks, "no instance found"
    best, score = masks[0]
    assert best.dtype == bool and best.shape == (48, 48)
    assert segment.mask_iou(best, square) > 0.9
    assert score > 0 and all(s <= score for _, s in masks)
    for i, (a, _) in enumerate(masks):  # non-maximum suppression
        for b, _ in masks[i + 1:]:
            assert segment.mask_iou(a, b) < 0.5


def test_instance_masks_drop_background_touching_many_borders():
    E, truth = planted_eigvecs()
    masks = segment.instance_masks(E)
    background = truth == 0
    assert all(segment.mask_iou(m, background) < 0.5 for m, _ in masks)
    ious = [max(segment.mask_iou(m, truth == c) for m, _ in masks) for c in (1, 2)]
    assert min(ious) > 0.9


def test_region_contrast_sign():
    X = np.zeros((20, 20, 2), dtype=np.float32)
    X[5:10, 5:10, 0] = 1.0
    m = np.zeros((20, 20), dtype=bool)
    m[5:10, 5:10] = True
    assert segment.region_contrast(X + 0.01, m, 2) > 0.9
    X2 = np.random.default_rng(0).standard_normal((20, 20, 2))
    assert segment.region_contrast(X2, m, 2) < 0.3


# -------------------------------------------------------------------------------- metrics


def test_permuted_label_map_scores_one_after_matching():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, size=(40, 40))
    target[:3] = 255  # unlabelled rows are ignored
    perm = np.array([3, 0, 4, 1, 2])
    pred = np.where(target == 255, rng.integers(0, 5, size=target.shape), perm[np.minimum(target, 4)])
    mapping = segment.hungarian_match(pred, target, 5, 5)
    assert np.array_equal(mapping[perm], np.arange(5))
    s = segment.segmentation_scores(pred, target, 5)
    assert s["miou"] == pytest.approx(1.0) and s["pixel_accuracy"] == pytest.approx(1.0)
    assert s["confusion"].sum() == (target != 255).sum()


def test_hand_built_confusion_gives_hand_computed_miou():
    # target rows, prediction columns (already class ids, no matching):
    #   [[3, 1],
    #    [2, 4]]  -> IoU0 = 3/(4+5-3) = 1/2, IoU1 = 4/(6+5-4) = 4/7
    target = np.array([0] * 4 + [1] * 6)
    pred = np.array([0, 0, 0, 1, 0, 0, 1, 1, 1, 1])
    s = segment.segmentation_scores(pred, target, 2, match=False)
    assert np.array_equal(s["confusion"], [[3, 1], [2, 4]])
    assert s["per_class_iou"] == pytest.approx([1 / 2, 4 / 7])
    assert s["miou"] == pytest.approx((1 / 2 + 4 / 7) / 2)
    assert s["pixel_accuracy"] == pytest.approx(7 / 10)
    # agrees with torchmetrics' own Jaccard index
    from torchmetrics.classification import MulticlassJaccardIndex

    tm = MulticlassJaccardIndex(num_classes=2, average="macro")(torch.tensor(pred), torch.tensor(target))
    assert s["miou"] == pytest.approx(float(tm))


def test_extra_clusters_are_unmatched_and_count_as_wrong():
    target = np.array([0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 1, 1, 2, 2])  # 3 clusters, 2 classes
    s = segment.segmentation_scores(pred, target, 2, n_pred=3)
    assert sorted(s["mapping"].tolist()) == [-1, 0, 1]
    assert s["unmatched_pixels"] == 2
    assert s["pixel_accuracy"] == pytest.approx(4 / 6)
    assert s["per_class_iou"] == pytest.approx([1.0, 0.5])


def test_absent_class_is_nan_and_excluded():
    s = segment.segmentation_scores(np.array([0, 0, 1]), np.array([0, 0, 1]), 3, match=False)
    assert np.isnan(s["per_class_iou"][2]) and s["miou"] == pytest.approx(1.0)


def test_bad_ids_raise_one_sentence():
    with pytest.raises(ValueError, match="target ids"):
        segment.hungarian_match(np.array([0, 1]), np.array([0, 7]), 2, 2)


# -------------------------------------------------------------------------------- what / where


def test_what_where_position_embedding():
    P = segment.pixel_positions(3, 16, 16)
    X = np.concatenate([P, 0.01 * np.random.default_rng(0).standard_normal((len(P), 2))], 1)
    r = segment.what_where(X, P, seed=0)
    assert r["position_r2"] > 0.99
    assert r["variance_from_position"] > 0.9
    assert "label_accuracy" not in r


def test_what_where_label_embedding():
    rng = np.random.default_rng(0)
    P = segment.pixel_positions(4, 16, 16)
    y = rng.integers(0, 5, size=len(P))
    y[:50] = 255
    X = np.eye(5)[np.minimum(y, 4)] + 0.01 * rng.standard_normal((len(P), 5))
    r = segment.what_where(X, P, y, seed=0)
    assert r["label_accuracy"] > 0.99 and r["label_chance"] < 0.4
    assert r["label_kmeans_miou"] > 0.99
    assert r["variance_from_label"] > 0.9
    assert r["position_r2"] < 0.1 and r["variance_from_position"] < 0.2
    assert r["n_classes"] == 5 and r["n_train"] + r["n_test"] == len(P) - 50
