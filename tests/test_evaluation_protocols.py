"""The matching protocols of the evaluation (``--protocol dataset | official | per-image``): each
one's numbers equal a step-by-step implementation written here from its definition."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from test_evaluation_dataset import fake_run

from ldsc.evaluation import dataset as evaluation
from ldsc.evaluation import segment


def _best_assignment(h: np.ndarray) -> list[tuple[int, int]]:
    """(class, segment) pairs of the one-to-one assignment maximising matched pixels, by trying
    every permutation (tiny cases only)."""
    n_cls, n_seg = h.shape
    best, pairs = -1, []
    for perm in itertools.permutations(range(n_seg), min(n_cls, n_seg)):
        rows = range(len(perm)) if n_cls <= n_seg else None
        if rows is None:  # more classes than segments: choose which classes get one
            for cls in itertools.combinations(range(n_cls), n_seg):
                for p in itertools.permutations(range(n_seg)):
                    v = sum(h[c, s] for c, s in zip(cls, p))
                    if v > best:
                        best, pairs = v, list(zip(cls, p))
            return pairs
        v = sum(h[c, s] for c, s in zip(rows, perm))
        if v > best:
            best, pairs = v, list(zip(rows, perm))
    return pairs


def _per_image_by_hand(pred, target, n_cls, n_seg, ignore=255):
    tp, fp, fn = np.zeros(n_cls), np.zeros(n_cls), np.zeros(n_cls)
    total = 0
    for p, t in zip(pred, target):
        h = np.zeros((n_cls, n_seg))
        for a, b in zip(t.ravel(), p.ravel()):
            if a != ignore:
                h[a, b] += 1
                total += 1
        assigned = dict(_best_assignment(h))
        for c in range(n_cls):
            if c in assigned:
                s = assigned[c]
                tp[c] += h[c, s]
                fn[c] += h[c].sum() - h[c, s]
                fp[c] += h[:, s].sum() - h[c, s]
            else:
                fn[c] += h[c].sum()
    iou = [tp[c] / (tp[c] + fp[c] + fn[c]) if tp[c] + fp[c] + fn[c] else np.nan for c in range(n_cls)]
    return np.nanmean(iou), tp.sum() / total, iou


@pytest.mark.parametrize("n_seg", [3, 4, 2])
def test_per_image_matching_equals_the_step_by_step_definition(n_seg):
    rng = np.random.default_rng(n_seg)
    target = rng.integers(0, 3, size=(3, 9, 7))
    target[2][target[2] == 1] = 0  # class 1 absent from the last image
    # each image's segments: its classes under its own relabelling, 30 % of the pixels random
    # (a clear best assignment per image: no ties for the order of the search to break)
    pred = np.stack([rng.permutation(n_seg)[t % n_seg] for t in target])
    noise = rng.random(target.shape) < 0.3
    pred[noise] = rng.integers(0, n_seg, size=int(noise.sum()))
    target[0, 0, :3] = 255  # unlabelled pixels
    got = segment.per_image_scores(pred, target, 3, n_pred=n_seg)
    miou, acc, iou = _per_image_by_hand(pred, target, 3, n_seg)
    assert got["miou"] == pytest.approx(miou) and got["pixel_accuracy"] == pytest.approx(acc)
    assert np.allclose(got["per_class_iou"], iou, equal_nan=True)


def test_per_image_matching_is_more_lenient_than_one_assignment_for_the_data_set():
    """Two images whose segment ids mean different classes: each image alone is perfect, one
    assignment for both cannot be."""
    target = np.array([[[0, 0, 1, 1]], [[0, 0, 1, 1]]])
    pred = np.array([[[0, 0, 1, 1]], [[1, 1, 0, 0]]])
    assert segment.per_image_scores(pred, target, 2, n_pred=2)["miou"] == 1.0
    assert segment.segmentation_scores(pred, target, 2, n_pred=2)["miou"] < 0.5


def test_greedy_mapping_sends_each_cluster_to_its_most_frequent_class():
    target = np.array([0, 0, 1, 1, 1, 2, 255])
    pred = np.array([0, 0, 0, 1, 1, 2, 3])
    assert segment.greedy_mapping(pred, target, 4, 3).tolist() == [0, 1, 2, -1]


def test_the_official_protocol_equals_its_step_by_step_definition(tmp_path):
    """SVD of the stacked eigenvector rows -> the first C components scaled by their singular values
    -> k-means (sklearn, the same seed) on the base grid -> nearest upsampling -> one Hungarian
    assignment for the data set (by permutations here) and the greedy matching."""
    from sklearn.cluster import KMeans

    from ldsc.evaluation.segment_viz import resize_nearest

    run_dir, lab_dir = fake_run(tmp_path, n_images=3, base=8, noise=0.2)
    m = evaluation.evaluate_run(run_dir, labels=lab_dir, clusters=3, n_figures=0, protocol="official", eval_size=16)
    assert m["protocol"] == "official"
    saved = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert saved["protocol"] == "official" and "greedy" in saved

    E = torch.load(run_dir / "eigvecs.pt", weights_only=True)["eigvecs"].double().numpy()
    n, K, H, W = E.shape
    X = E.transpose(0, 2, 3, 1).reshape(-1, K)
    U, S, _ = np.linalg.svd(X, full_matrices=False)
    feats = (U[:, :3] * S[:3]).astype(np.float32)
    labels = KMeans(n_clusters=3, random_state=0).fit(feats).labels_.reshape(n, H, W)
    pred = np.stack([resize_nearest(labels[i], (16, 16)) for i in range(n)])
    files = json.loads((run_dir / "files.json").read_text())
    Y = evaluation.load_labels(files, evaluation.label_files(files, lab_dir), 16, None)
    h = np.zeros((3, 3))
    for a, b in zip(Y.ravel(), pred.ravel()):
        if a != 255:
            h[a, b] += 1
    pairs = _best_assignment(h)
    tp = np.array([h[c, s] for c, s in sorted(pairs)])
    iou = tp / (h.sum(1) + np.array([h[:, s].sum() for _, s in sorted(pairs)]) - tp)
    assert m["miou"] == pytest.approx(iou.mean(), abs=1e-9)
    assert m["pixel_accuracy"] == pytest.approx(tp.sum() / h.sum(), abs=1e-9)
    greedy = h.argmax(0)  # cluster -> its most frequent class
    g_conf = np.zeros((3, 3))
    for s in range(3):
        g_conf[:, greedy[s]] += h[:, s]
    g_tp = np.diag(g_conf)
    g_iou = [g_tp[c] / (g_conf[c].sum() + g_conf[:, c].sum() - g_tp[c]) for c in range(3)
             if g_conf[c].sum() + g_conf[:, c].sum() > 0]
    assert m["greedy"]["miou"] == pytest.approx(np.mean(g_iou), abs=1e-9)
    assert m["greedy"]["mapping"] == greedy.tolist()


def test_every_protocol_is_named_in_the_metrics_and_the_table(tmp_path):
    run_dir, lab_dir = fake_run(tmp_path, n_images=3, base=8)
    outs = []
    for protocol in evaluation.PROTOCOLS:
        out = tmp_path / f"eval_{protocol}"
        m = evaluation.evaluate_run(run_dir, labels=lab_dir, clusters=3, n_figures=0, protocol=protocol, out=out)
        assert m["protocol"] == protocol and 0 <= m["miou"] <= 1
        outs.append(out / "metrics.json")
    table = evaluation.metrics_table(outs)
    assert "matching protocol" in table.splitlines()[0]
    assert all(f"| {p} |" in table for p in evaluation.PROTOCOLS)
    with pytest.raises(evaluation.DataError, match="--protocol"):
        evaluation.evaluate_run(run_dir, labels=lab_dir, clusters=3, n_figures=0, protocol="lenient")


def test_the_official_protocol_keeps_the_leading_eigenvectors_of_an_eigenvalue_ordered_run(tmp_path):
    """LOBPCG/exact runs export orthonormal eigenvectors in eigenvalue order (every singular value
    1): the official protocol clusters the leading C of them, not an arbitrary rotation that a
    second SVD of tied singular values would return."""
    from sklearn.cluster import KMeans

    from ldsc.export import save_eigenvectors

    rng = np.random.default_rng(0)
    n, K, H, W, C = 2, 6, 8, 8, 2
    Q, _ = np.linalg.qr(rng.normal(size=(n * H * W, K)))  # orthonormal columns
    Z = torch.from_numpy(Q).float().reshape(n, H, W, K).permute(0, 3, 1, 2)
    E = save_eigenvectors(tmp_path / "run", Z, [f"img{i}.png" for i in range(n)], keep_order=True)
    pred = evaluation.official_clusters(E, C, H)
    lead = E[:, :C].permute(0, 2, 3, 1).reshape(-1, C).numpy()
    want = KMeans(n_clusters=C, random_state=0).fit(lead).labels_.reshape(n, H, W)
    assert np.array_equal(pred, want)
