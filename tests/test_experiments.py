"""The reproduction presets (conf/experiment/paper_*.yaml, cocostuff27.yaml), their evaluation
callback, the comparison table and the COCO download script — all offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldsc.errors import DataError
from ldsc.evaluate import metrics_table
from ldsc.run import fit

REPO_ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["paper_single_image_figure", "paper_coco_vv", "paper_coco_qk", "cocostuff27"]
BACKBONES = ["sd", "clip", "dino", "mae", "pixel"]


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("preset", PRESETS)
def test_presets_compose_with_every_backbone(compose, preset, backbone):
    """Each preset names SD by default and stays valid when the backbone is swapped on the
    command line (the COCO-Stuff table and the no-download pixel runs do that)."""
    cfg = compose([f"experiment={preset}", f"backbone={backbone}", "++data.path=/tmp/x.jpg"])
    c = OmegaConf.to_container(cfg, resolve=True)
    assert c["K"] == (100 if preset.startswith("paper_coco") else 15)
    assert c["callbacks"]["evaluate"]["_target_"] == "ldsc.runtime.callbacks.EvaluateRun"
    assert list(c["callbacks"]).index("evaluate") > list(c["callbacks"]).index("export")
    default = compose([f"experiment={preset}", "++data.path=/tmp/x.jpg"])
    assert default.backbone._target_.endswith("StableDiffusionBackbone")
    if preset.startswith("paper_coco"):
        assert cfg.data.limit == 100 and cfg.base_size == 32 and cfg.graph.pair == preset[-2:]
        assert cfg.callbacks.export.grid_vectors == 15
    if preset == "cocostuff27":
        ev = c["callbacks"]["evaluate"]
        assert ev["label_map"] == "cocostuff27" and ev["clusters"] == 27
        assert ev["labels"].endswith("coco/stuffthingmaps_trainval2017/val2017")


#: the official code's settings (github xiao7199/layer_distributed_spectral_clustering: main_cls.py,
#: srun.sh, diffusion_extractor.py, model_seg.py, eval_utils.py) as the reproduction issue lists them
OFFICIAL_DATASET = {
    "backbone": {"model_id": "CompVis/stable-diffusion-v1-4", "resize": 256, "crop": 256, "input_size": 512,
                 "t_min": 0, "t_max": 299, "layers": ["mid_block.*", "up_blocks.*"], "max_grid": 32,
                 "heads": "concat", "latent": "sample", "schedule": "random"},
    "graph": {"k_intra": 50, "k_inter": 50, "threshold": 0.1},
    "K": 100, "base_size": 32, "seed": 12345,
    "solver": {"_target_": "ldsc.solvers.paper.PaperSolver", "steps_per_batch": 5, "ema": 0.99,
               "parametrization": "softmax", "optimizer": {"_target_": "torch.optim.AdamW", "lr": 0.01, "weight_decay": 0.0}},
    "data": {"batch_size": 40, "shuffle": True},
    "trainer": {"max_epochs": 200},
}


def _subset(actual: dict, expected: dict, path: str = "") -> list[str]:
    """Where ``actual`` differs from ``expected`` (keys of ``expected`` only)."""
    wrong = []
    for key, want in expected.items():
        got = actual.get(key)
        if isinstance(want, dict):
            wrong += _subset(got or {}, want, f"{path}{key}.")
        elif got != want:
            wrong.append(f"{path}{key}={got!r} (official: {want!r})")
    return wrong


@pytest.mark.parametrize("preset", ["paper_dataset", "paper_coco_qk", "paper_coco_vv"])
def test_the_paper_presets_hold_the_official_settings(compose, preset):
    c = OmegaConf.to_container(compose([f"experiment={preset}"]), resolve=True)
    assert _subset(c, OFFICIAL_DATASET) == []
    assert c["callbacks"]["evaluate"]["protocol"] == "official"
    assert c["callbacks"]["export"]["grid_vectors"] == 15  # the figures show 15 of the 100
    if preset != "paper_dataset":
        assert c["data"]["limit"] == 100 and c["graph"]["pair"] == preset[-2:]
        assert c["data"]["_target_"].endswith("CocoStuffDataModule") and c["data"]["curated"]
        ev = c["callbacks"]["evaluate"]
        assert ev["label_map"] == "cocostuff27" and ev["clusters"] == 27 and ev["eval_size"] == 256
    # the view the backbone is built with: the official transform, step by step in test_features_view.py
    from ldsc.features.images import ImageView

    assert ImageView.of(c["backbone"]) == ImageView(resize=256, crop=256)


@pytest.mark.parametrize("preset", ["paper_single", "paper_single_image_figure"])
def test_the_single_image_presets_hold_the_published_settings(compose, preset):
    c = OmegaConf.to_container(compose([f"experiment={preset}", "data.path=/tmp/x.jpg"]), resolve=True)
    expected = {"backbone": {"model_id": "CompVis/stable-diffusion-v1-4", "resize": None, "crop": None,
                             "input_size": 512, "t_min": 0, "t_max": 250, "latent": "sample"},
                "K": 15, "base_size": 64}
    assert _subset(c, expected) == []
    if preset == "paper_single":
        assert c["seed"] == 12345 and c["solver"]["steps_per_batch"] == 2000 and c["solver"]["accumulate"] == 20
        assert c["solver"]["optimizer"]["lr"] == 0.002 and c["solver"]["parametrization"] == "convnet"


def test_single_image_figure_preset_runs_with_pixel_backbone(compose, single_image):
    cfg = compose(["experiment=paper_single_image_figure", "backbone=pixel", f"data.path={single_image}",
                   "base_size=16", "K=4", "trainer.max_epochs=1", "logger=none",
                   "trainer.enable_progress_bar=false", "~callbacks.progress", "callbacks.export.figures=false"])
    fit(cfg)
    out = Path(cfg.paths.output_dir) / "eval"
    assert len(list((out / "figures").glob("four_panel_*.png"))) == 1
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_images"] == 1 and "position_r2" in m["what_where"]


# ------------------------------------------------------------------------------- tables


def fake_metrics(folder: Path, backbone: str, pair: str, miou: float | None) -> Path:
    m = {"n_images": 3, "backbone": f"ldsc.features.backbones.x.{backbone}", "graph_pair": pair,
         "what_where": {"position_r2": 0.5, "variance_from_position": 0.25}}
    if miou is not None:
        m.update(miou=miou, pixel_accuracy=0.75)
        m["what_where"].update(label_accuracy=0.6, label_kmeans_miou=0.4, variance_from_label=0.3)
    (folder / "eval").mkdir(parents=True)
    (folder / "eval" / "metrics.json").write_text(json.dumps(m))
    return folder


def test_metrics_table_compares_runs(tmp_path):
    a = fake_metrics(tmp_path / "sd_vv", "StableDiffusionBackbone", "vv", 0.125)
    b = fake_metrics(tmp_path / "dino_qk", "DINOBackbone", "qk", None)
    lines = metrics_table([a, b / "eval" / "metrics.json"]).splitlines()
    assert len(lines) == 4 and lines[0].startswith("| run | backbone | graph | images | matching protocol | mIoU |")
    assert lines[2].startswith("| sd_vv | sd | vv | 3 | dataset | 0.125 | 0.750 | 0.500 | 0.250 | 0.600 | 0.400 | 0.300 |")
    assert lines[3].startswith("| dino_qk | dino | qk | 3 | dataset | – | – | 0.500 | 0.250 | – |")
    with pytest.raises(DataError, match="No metrics.json"):
        metrics_table([tmp_path / "missing"])


def test_metrics_table_script(tmp_path):
    a = fake_metrics(tmp_path / "run", "PixelBackbone", "qk", 0.5)
    res = subprocess.run([sys.executable, str(REPO_ROOT / "experiments" / "metrics_table.py"), str(a)],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "| run | pixel | qk | 3 | dataset | 0.500 |" in res.stdout


# ------------------------------------------------------------------------------- downloads


def fake_archives(folder: Path) -> None:
    """Tiny stand-ins for the two official archives, with their real internal layout."""
    folder.mkdir()
    with zipfile.ZipFile(folder / "val2017.zip", "w") as z:
        for stem in ("000000000139", "000000000285"):
            z.writestr(f"val2017/{stem}.jpg", b"jpeg bytes")
    with zipfile.ZipFile(folder / "stuffthingmaps_trainval2017.zip", "w") as z:
        z.writestr("train2017/000000000009.png", b"train label")
        for stem in ("000000000139", "000000000285"):
            z.writestr(f"val2017/{stem}.png", b"png bytes")


@pytest.mark.skipif(shutil.which("unzip") is None, reason="unzip is not installed")
def test_download_coco_layout_with_a_fake_curl(tmp_path):
    fake_archives(tmp_path / "archives")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    curl = bin_dir / "curl"  # copies the archive named by the URL's last part
    curl.write_text('#!/bin/sh\nfor a; do :; done\nout=""\nwhile [ $# -gt 1 ]; do [ "$1" = -o ] && out=$2; '
                    f'shift; done\ncp "{tmp_path / "archives"}/$(basename "$a")" "$out"\n')
    curl.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    dest = tmp_path / "coco"
    res = subprocess.run(["bash", str(REPO_ROOT / "experiments" / "download_coco.sh"), str(dest)],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (dest / "val2017").iterdir()) == ["000000000139.jpg", "000000000285.jpg"]
    labels = dest / "stuffthingmaps_trainval2017" / "val2017"
    assert sorted(p.name for p in labels.iterdir()) == ["000000000139.png", "000000000285.png"]
    assert not (dest / "stuffthingmaps_trainval2017" / "train2017").exists()
    assert not list(dest.glob("*.zip")) and not list(dest.glob("*.part"))


def test_download_coco_without_tools_says_so(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with bash's basics but no curl/wget/unzip
    bin_dir.mkdir()
    for tool in ("mkdir", "find", "wc", "basename", "dirname"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    res = subprocess.run([shutil.which("bash"), str(REPO_ROOT / "experiments" / "download_coco.sh"),
                          str(tmp_path / "coco")], env={"PATH": str(bin_dir)}, capture_output=True, text=True)
    assert res.returncode != 0
    assert "download_coco.sh: error:" in res.stderr and ("unzip" in res.stderr or "curl" in res.stderr)




def test_gpu_check_dry_run_prints_one_line_per_check(tmp_path):
    """experiments/gpu_check.py, as a lent GPU machine would run it, on tiny models on the CPU:
    every check reports its figures (none an error) and the lines also land in --out."""
    out = tmp_path / "gpu_check.jsonl"
    res = subprocess.run([sys.executable, str(REPO_ROOT / "experiments" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    by_check = {r["check"]: r for r in rows}
    assert set(by_check) == {"store:sd", "store:sdxl", "store:dit", "store:dinov2", "store:fec", "pipeline", "total"}
    for check, row in by_check.items():
        assert "error" not in row, row
        if check.startswith("store:"):
            assert row["images"] == 2 and row["images_per_s"] > 0 and row["layers"] >= 1
    pipe = by_check["pipeline"]
    assert pipe["eigvecs_shape"] == [6, 4, 4, 4] and pipe["residual"] < 1e-2
    assert all(pipe[k] >= 0 for k in ("features_s", "graphs_s", "solve_s", "export_s"))
    assert [json.loads(line)["check"] for line in out.read_text().splitlines()] == [
        "store:sd", "store:sdxl", "store:dit", "store:dinov2", "store:fec", "pipeline"]


def test_bench_startup_prints_the_import_seconds_of_both_sides():
    """`make bench`'s first case: one JSON line with the seconds of ldsc's imports and of
    ncut-pytorch's (skipped with the reason where ncut_pytorch is not installed)."""
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ldsc.bench", "--cases", "startup", "--repeats", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["case"] == "startup"
    secs = line["seconds"]
    assert 0 < secs["python -c pass"] < secs["ldsc: import ldsc.run, lightning"]
    assert secs["ldsc: python -m ldsc.run --help"] > 0
    assert "ncut-pytorch: import ncut_pytorch" in secs or secs["ncut-pytorch"].startswith("skipped")


def test_bench_quality_scores_every_protocol_on_labelled_composites(tmp_path):
    """`make bench-quality` on a small set (ldsc's side; ncut-pytorch's runs where it is installed):
    one JSON line per run with mIoU and accuracy under every matching protocol, and the table."""
    from conftest import COCO_DIR

    if not COCO_DIR.is_dir():
        pytest.skip(f"the COCO images are not in {COCO_DIR}")
    out = tmp_path / "quality.jsonl"
    r = subprocess.run([sys.executable, str(REPO_ROOT / "experiments" / "bench_quality.py"), f"--sources={COCO_DIR}",
                        f"--work={tmp_path / 'work'}", "--sizes=4", "--n-images=4", "--graphs=vv", "--methods=ldsc",
                        "--K=4", f"--out={out}"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (row["sources"], row["graph"], row["method"]) == (4, "vv", "ldsc") and row["wall_s"] > 0
    for protocol in ("dataset", "official", "official_greedy", "per-image"):
        assert 0 < row["scores"][protocol]["miou"] <= 1 and 0 < row["scores"][protocol]["pixel_accuracy"] <= 1
    # per image, each image's segments are matched on their own: never below the data-set matching's accuracy
    assert row["scores"]["per-image"]["pixel_accuracy"] >= row["scores"]["dataset"]["pixel_accuracy"]
    assert r.stdout.strip().splitlines()[-1].startswith("| 4 | vv | ldsc |")
    assert len(list((tmp_path / "work" / "composite4" / "labels").glob("composite_*.png"))) == 4
