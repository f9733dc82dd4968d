"""Tests of ldsc.evaluate (on fake run folders), ldsc.evaluation.cocostuff and experiments/composite.py."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldsc import evaluate
from ldsc.evaluation import cocostuff
from ldsc.export import save_eigenvectors

REPO = Path(__file__).resolve().parents[1]


def fake_run(tmp_path: Path, n_images=4, base=16, img_size=(48, 64), noise=0.02, seed=0):
    """A run folder whose eigenvectors encode planted 3-class label maps, plus those label PNGs.

    Each image is ``img_size`` (h, w) with three grid-aligned regions whose layout differs per
    image; the pseudo-eigenvectors are softmax-like ``0.5/K + 0.5·one_hot(class)`` on the base
    grid, written through the real writer (SVD-ordered)."""
    rng = np.random.default_rng(seed)
    h, w = img_size
    img_dir, lab_dir, run_dir = tmp_path / "images", tmp_path / "labels", tmp_path / "run"
    img_dir.mkdir()
    lab_dir.mkdir()
    K = 4
    files, Z = [], []
    for i in range(n_images):
        lab = np.zeros((base, base), dtype=np.uint8)
        cut = 4 + 2 * i
        lab[:, cut:] = 1
        lab[base // 2:, : base // 2] = 2
        lab[0, 0] = 255 if i == 0 else lab[0, 0]  # an unlabelled pixel (on the base grid)
        big = np.asarray(Image.fromarray(lab).resize((w, h), Image.NEAREST))
        Image.fromarray(big).save(lab_dir / f"img{i}.png")
        rgb = (rng.uniform(0, 255, size=(h, w, 3))).astype(np.uint8)
        path = img_dir / f"img{i}.jpg"
        Image.fromarray(rgb).save(path)
        files.append(str(path))
        onehot = np.eye(K)[np.minimum(lab, 2)]  # (base, base, K)
        z = 0.5 / K + 0.5 * onehot + noise * rng.standard_normal(onehot.shape)
        Z.append(z.transpose(2, 0, 1))
    Z = torch.tensor(np.stack(Z), dtype=torch.float32)
    save_eigenvectors(run_dir, Z, files, {"graph": {"_target_": "ldsc.graphs.knn.KnnGraphBuilder", "pair": "vv"}})
    return run_dir, lab_dir


def test_evaluate_planted_run_scores_miou_one(tmp_path):
    run_dir, lab_dir = fake_run(tmp_path)
    (lab_dir / "classes.json").write_text(json.dumps(["left", "right", "bottom"]))
    m = evaluate.evaluate_run(run_dir, labels=lab_dir, n_figures=1)
    assert m["num_classes"] == 3 and m["clusters"] == 3
    # not 1.0: pixels are scored at 4x the base grid, and the bilinear upsampling blends the two
    # classes along every base-cell boundary (a band ~1/8 of a cell wide is ambiguous)
    assert m["miou"] > 0.95 and m["pixel_accuracy"] > 0.97
    assert set(m["per_class_iou"]) == {"left", "right", "bottom"}
    out = run_dir / "eval"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["miou"] == pytest.approx(m["miou"])
    assert saved["what_where"]["label_accuracy"] > 0.95
    assert (out / "per_class_iou.csv").read_text().startswith("class_id,name,iou,pixels")
    assert np.load(out / "confusion.npy").shape == (3, 3)
    assert (out / "confusion.png").is_file()
    assert len(list((out / "figures").glob("four_panel_*.png"))) == 1


def test_evaluate_cli_without_labels(tmp_path, capsys):
    run_dir, _ = fake_run(tmp_path, n_images=2)
    assert evaluate.main([str(run_dir), "--figures", "0", "--out", str(tmp_path / "ev")]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert "miou" not in m and "position_r2" in m["what_where"]
    assert "what/where" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("no_run_dir", "does not exist"),
    ("no_eigvecs", "eigvecs.pt' does not exist"),
    ("missing_label", "have no label map"),
    ("wrong_size", "must have their image's size"),
    ("no_label_dir", "Label folder"),
    ("rgb_label", "must be single-channel PNGs"),
    ("above_255", "holds class 300"),
    ("truncated_label", "cannot be read"),
    ("all_unlabelled", "is 255 (unlabelled): there is nothing to score"),
    ("image_moved", "of the run cannot be read"),
    ("unwritable_out", "cannot be written"),
])
def test_evaluate_errors_are_one_sentence(tmp_path, capsys, case, message):
    run_dir, lab_dir = fake_run(tmp_path, n_images=2)
    args = [str(run_dir), "--labels", str(lab_dir), "--figures", "0"]
    if case == "no_run_dir":
        args[0] = str(tmp_path / "nope")
    elif case == "no_eigvecs":
        (run_dir / "eigvecs.pt").unlink()
    elif case == "missing_label":
        (lab_dir / "img1.png").unlink()
    elif case == "wrong_size":
        Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(lab_dir / "img1.png")
    elif case == "no_label_dir":
        args[2] = str(tmp_path / "nolabels")
    elif case == "rgb_label":
        Image.fromarray(np.zeros((48, 64, 3), dtype=np.uint8)).save(lab_dir / "img1.png")
    elif case == "above_255":
        Image.fromarray(np.full((48, 64), 300, dtype=np.uint16)).save(lab_dir / "img1.png")
    elif case == "truncated_label":
        data = (lab_dir / "img1.png").read_bytes()
        (lab_dir / "img1.png").write_bytes(data[: len(data) // 2])
    elif case == "all_unlabelled":
        for f in lab_dir.glob("*.png"):
            Image.fromarray(np.full((48, 64), 255, dtype=np.uint8)).save(f)
    elif case == "image_moved":
        (tmp_path / "images").rename(tmp_path / "elsewhere")
    elif case == "unwritable_out":
        (tmp_path / "blocker").write_text("a file, not a folder")
        args += ["--out", str(tmp_path / "blocker" / "eval")]
    assert evaluate.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and err.startswith("ldsc.evaluate: error:")


# ------------------------------------------------------------------------------- COCO-Stuff


def test_cocostuff_fine_to_coarse():
    lut = cocostuff.FINE_TO_COARSE
    name = dict(enumerate(cocostuff.COARSE_SUPERCATEGORIES))
    assert len(cocostuff.CATEGORIES) == 171 and len(cocostuff.COARSE_SUPERCATEGORIES) == 27
    assert name[lut[0]] == "person" and name[lut[2]] == "vehicle"  # person, car
    assert name[lut[55]] == "food" and name[lut[120]] == "food-stuff"  # broccoli, food-other
    assert name[lut[181]] == "solid" and name[lut[156]] == "sky"  # wood, sky-other
    assert lut[11] == 255 and lut[255] == 255  # unused COCO id 12, unlabelled
    assert len(set(lut[lut != 255].tolist())) == 27


def test_cocostuff_dataset_pairs_by_stem(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    Image.fromarray(np.zeros((4, 6, 3), dtype=np.uint8)).save(tmp_path / "img" / "000001.jpg")
    Image.fromarray(np.zeros((4, 6, 3), dtype=np.uint8)).save(tmp_path / "img" / "000002.jpg")
    fine = np.array([[0, 181, 255, 11, 156, 2]] * 4, dtype=np.uint8)
    Image.fromarray(fine).save(tmp_path / "lab" / "000001.png")
    ds = cocostuff.CocoStuff(tmp_path / "img", tmp_path / "lab")
    assert len(ds) == 1 and ds.num_classes == 27
    image, labels = ds[0]
    assert image.size == (6, 4)
    assert labels[0].tolist() == [9, 24, 255, 255, 23, 11]
    raw = cocostuff.CocoStuff(tmp_path / "img", tmp_path / "lab", coarse=False)
    assert raw[0][1][0].tolist() == fine[0].tolist() and raw.class_names[0] == "person"
    with pytest.raises(FileNotFoundError, match="download_coco.sh"):
        cocostuff.CocoStuff(tmp_path / "missing", tmp_path / "lab")


def test_evaluate_with_cocostuff_label_map(tmp_path):
    run_dir, lab_dir = fake_run(tmp_path, n_images=2)
    fine_of = np.array([0, 2, 156], dtype=np.uint8)  # person, car, sky-other
    for p in lab_dir.glob("*.png"):
        lab = np.asarray(Image.open(p))
        Image.fromarray(np.where(lab == 255, 255, fine_of[np.minimum(lab, 2)]).astype(np.uint8)).save(p)
    m = evaluate.evaluate_run(run_dir, labels=lab_dir, label_map="cocostuff27", clusters=3, n_figures=0)
    assert m["num_classes"] == 27
    present = {k: v for k, v in m["per_class_iou"].items() if v is not None}
    assert set(present) == {"person", "vehicle", "sky"} and min(present.values()) > 0.95


# ------------------------------------------------------------------------------- composites


def _composite_module():
    spec = importlib.util.spec_from_file_location("composite", REPO / "experiments" / "composite.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_composite_labels_are_source_ids(tmp_path):
    comp = _composite_module()
    src = tmp_path / "src"
    src.mkdir()
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for i, c in enumerate(colours):
        Image.new("RGB", (50, 40), c).save(src / f"s{i}.png")
    m = comp.build(src, tmp_path / "out", n_sources=4, n_images=3, size=32, grid=2, seed=0)
    assert len(m["composites"]) == 3
    classes = json.loads((tmp_path / "out" / "labels" / "classes.json").read_text())
    assert classes == ["s0", "s1", "s2", "s3"]
    for entry in m["composites"]:
        img = np.asarray(Image.open(tmp_path / "out" / "images" / f"{entry['name']}.png"))
        lab = np.asarray(Image.open(tmp_path / "out" / "labels" / f"{entry['name']}.png"))
        assert img.shape == (32, 32, 3) and lab.shape == (32, 32)
        assert sorted(np.unique(lab).tolist()) == [0, 1, 2, 3]
        for cell in entry["cells"]:  # each cell's pixels have its source's colour
            r, c = cell["cell"]
            block = img[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16].reshape(-1, 3)
            assert (lab[r * 16, c * 16] == cell["source"])
            assert np.abs(block.mean(0) - colours[cell["source"]]).max() < 2


def test_label_maps_are_matched_by_relative_path_not_by_stem(tmp_path):
    """Two images named x.jpg in different subfolders get their own label maps; a flat label
    folder still works for unique names; shared names without mirrored labels are refused."""
    from ldsc.errors import DataError
    from ldsc.evaluate import label_files

    imgs, labels = tmp_path / "imgs", tmp_path / "labels"
    for sub in ("a", "b"):
        (imgs / sub).mkdir(parents=True)
        (imgs / sub / "x.jpg").write_bytes(b"")
        (labels / sub).mkdir(parents=True)
        (labels / sub / "x.png").write_bytes(b"")
    (imgs / "a" / "y.jpg").write_bytes(b"")
    (labels / "y.png").write_bytes(b"")  # unique stem: found in the flat folder
    files = [str(imgs / "a" / "x.jpg"), str(imgs / "b" / "x.jpg"), str(imgs / "a" / "y.jpg")]
    assert label_files(files, labels) == [labels / "a" / "x.png", labels / "b" / "x.png", labels / "y.png"]
    (labels / "b" / "x.png").unlink()
    with pytest.raises(DataError, match="2 images are named 'x'"):
        label_files(files, labels)


@pytest.mark.parametrize("option,value", [("--clusters", "0"), ("--eval-size", "0"), ("--num-classes", "0"),
                                          ("--clusters", "abc")])
def test_evaluate_refuses_bad_numbers_in_one_sentence(tmp_path, capsys, option, value):
    run_dir, _ = fake_run(tmp_path, n_images=2)
    with pytest.raises(SystemExit) as info:
        evaluate.main([str(run_dir), option, value])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ldsc.evaluate: error:") and option in err
