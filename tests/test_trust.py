"""Trust in daily use: progress in files, one sentence per error, no stub folders, locks released,
no silent overwrites, checked stores and resumes, readable figures, misspelt groups answered."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, TINY, run_cli
from test_features_store import CountingPixel, sample_files

from ldsc.errors import ConfigError, DataError

# -- progress ---------------------------------------------------------------------------------


def test_progress_in_a_file_is_plain_periodic_lines(caplog, monkeypatch):
    from ldsc import progress

    monkeypatch.setenv("LDSC_PROGRESS", "lines")
    monkeypatch.setenv("LDSC_PROGRESS_INTERVAL", "0")
    with caplog.at_level(logging.INFO, logger="ldsc.progress"):
        bar = progress.bar(total=4, desc="features", unit="img")
        assert isinstance(bar, progress.LineProgress)
        for _ in range(4):
            bar.update(1)
        bar.close()
        bar.close()  # closing twice says it once
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("features: 1/4 img (25%)") and "left" in lines[0]
    assert lines[-1].startswith("features: 4/4 img in ") and len(lines) == 5
    assert all("\r" not in ln for ln in lines)


def test_progress_in_a_terminal_is_a_tqdm_bar(monkeypatch):
    from tqdm.auto import tqdm

    from ldsc import progress

    monkeypatch.setenv("LDSC_PROGRESS", "tty")
    bar = progress.bar(total=3, desc="x", disable=True)
    assert isinstance(bar, tqdm)
    bar.close()


# -- the output folder -------------------------------------------------------------------------


def test_the_lock_file_goes_with_the_run_and_a_stale_one_is_taken_over(tmp_path, caplog):
    from ldsc.atomic import folder_lock

    with folder_lock(tmp_path / "run"):
        assert "pid" in (tmp_path / "run" / ".ldsc.lock").read_text()
    assert not (tmp_path / "run" / ".ldsc.lock").exists()
    (tmp_path / "run" / ".ldsc.lock").write_text("pid 999999")  # a killed run's
    with caplog.at_level(logging.INFO, logger="ldsc"), folder_lock(tmp_path / "run"):
        pass
    assert any("taking over the lock" in r.getMessage() and "999999" in r.getMessage() for r in caplog.records)


def test_a_finished_folder_is_not_written_over_without_resume_or_overwrite(compose, tmp_path):
    from ldsc.run import fit

    out = tmp_path / "run"
    fit(compose(TINY, out=out))
    before = (out / "eigvecs.pt").read_bytes()
    with pytest.raises(ConfigError, match="holds an earlier run.*resume=true.*overwrite=true"):
        fit(compose([*TINY, "K=3"], out=out))
    assert (out / "eigvecs.pt").read_bytes() == before
    fit(compose([*TINY, "K=3", "overwrite=true"], out=out))
    assert torch.load(out / "eigvecs.pt", weights_only=True)["eigvecs"].shape[1] == 3


@pytest.mark.parametrize("argv,suggestion", [
    (["grpah=vv"], "graph=vv"), (["grph.k_inter=3"], "graph.k_inter=3"), (["backbon=clip"], "backbone=clip"),
    (["k=4"], "K=4"), (["seeed=1"], "seed=1"),
])
def test_a_misspelt_group_or_key_names_the_closest_valid_one(argv, suggestion):
    from ldsc.run import misspelt_override

    msg = misspelt_override(argv)
    assert msg is not None and f"did you mean {suggestion}?" in msg


@pytest.mark.parametrize("argv,expected", [
    (["backbone=dinov3"], "Unknown backbone 'dinov3': did you mean backbone=dinov2?"),
    (["-m", "graph=qk,vvv"], "Unknown graph 'vvv': did you mean graph=vv?"),
    (["solver=lobpgc"], "did you mean solver=lobpcg?"),
])
def test_an_unknown_option_of_a_group_names_the_closest_and_all_known(argv, expected):
    from ldsc.run import unknown_choice

    msg = unknown_choice(argv)
    assert msg is not None and expected in msg and "known: " in msg


def test_valid_overrides_are_not_taken_for_misspellings():
    from ldsc.run import misspelt_override, unknown_choice

    ok = ["graph=vv", "graph.k_inter=3", "K=4", "+callbacks.evaluate.labels=x", "~callbacks.progress",
          "hydra.run.dir=/tmp/x", "hydra/launcher=slurm", "hydra/launcher=basic", "-m", "trainer.max_epochs=2",
          "experiment=dataset", "overwrite=true", "paths.log_dir=x", "backbone=timm", "graph=qk,vv", "logger=none"]
    assert misspelt_override(ok) is None and unknown_choice(ok) is None


def test_cli_refusal_is_one_sentence_once_and_leaves_no_folder(tmp_path):
    logs = tmp_path / "outputs"
    res = run_cli([*TINY, "K=5000", f"paths.log_dir={logs}"], cwd=tmp_path)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("ldsc: error: K=5000 must be smaller")
    assert (res.stdout + res.stderr).count("K=5000 must be smaller") == 1
    assert not logs.exists(), list(logs.rglob("*"))
    # refused later, after the logger wrote its hyper-parameters: still no run folder
    res = run_cli([*TINY, "logger=csv", "graph.threshold=0.9999", f"paths.log_dir={logs}"], cwd=tmp_path)
    assert res.returncode == 1 and "has no edges" in res.stderr.strip().splitlines()[-1]
    assert not (logs / "runs").exists(), list(logs.rglob("*"))


def test_a_sweep_with_a_refused_job_runs_the_rest_and_exits_nonzero(tmp_path):
    sweep = tmp_path / "sweep"
    res = run_cli(["-m", *TINY, "K=3,5000", f"hydra.sweep.dir={sweep}", f"paths.log_dir={tmp_path}"], cwd=tmp_path)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ldsc: error: 1 of 2 jobs of the sweep were refused") and "(job 1: K=5000)" in last
    assert (sweep / "0_pixel_qk_K3" / "eigvecs.pt").is_file()
    assert not (sweep / "1_pixel_qk_K5000").exists()


# -- the feature store -------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "zeroed header", "missing", "bad meta", "edited meta", "other run"])
def test_a_damaged_or_foreign_store_under_the_key_is_rebuilt_with_a_line(tmp_path, damage, caplog):
    from ldsc.features.store import open_or_build, StoreOptions

    files = sample_files(2)
    bb = CountingPixel()
    bb.set_base_size(8)
    opts = StoreOptions(dir=str(tmp_path / "store"))
    first = open_or_build(opts, files, bb, {"name": "pixel"}, 8, ["v"])
    want = first.vectors(0, "v").clone()
    arr = first.path / "0_v.npy"
    first.release()
    if damage == "truncated":
        arr.write_bytes(arr.read_bytes()[:200])
    elif damage == "zeroed header":
        data = bytearray(arr.read_bytes())
        data[:100] = bytes(100)
        arr.write_bytes(bytes(data))
    elif damage == "missing":
        arr.unlink()
    elif damage == "bad meta":
        (first.path / "meta.json").write_text("{")
    elif damage == "edited meta":
        meta = json.loads((first.path / "meta.json").read_text())
        meta["n_images"] = 7
        (first.path / "meta.json").write_text(json.dumps(meta))
    else:  # another run's store (other settings) moved under this key
        other = open_or_build(opts, files, bb, {"name": "pixel", "sigma_xy": 0.5}, 8, ["v"])
        shutil.rmtree(first.path)
        shutil.copytree(other.path, first.path)
    CountingPixel.calls = 0
    with caplog.at_level(logging.WARNING, logger="ldsc.features.store"):
        again = open_or_build(opts, files, bb, {"name": "pixel"}, 8, ["v"])
    assert CountingPixel.calls == 2, "the store was used as it was"
    assert torch.equal(again.vectors(0, "v"), want)
    assert any("building it again" in r.getMessage() for r in caplog.records)


def test_an_image_rewritten_with_the_same_size_and_time_is_another_store(tmp_path):
    from PIL import Image

    from ldsc.features.store import store_key

    f = tmp_path / "a.bmp"
    a = np.zeros((8, 8, 3), np.uint8)
    Image.fromarray(a).save(f)
    st = f.stat()
    key = store_key({}, 8, ["v"], 1, 0, "float16", [str(f)])
    a[:4] = 255
    Image.fromarray(a).save(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size
    from ldsc.features import store

    store._hashes.clear()  # (a new process)
    assert store_key({}, 8, ["v"], 1, 0, "float16", [str(f)]) != key


def test_a_full_disk_while_the_store_is_written_is_one_sentence_and_leaves_nothing(tmp_path):
    """The arrays' blocks are reserved first, so no page write through the map can fail (SIGBUS):
    simulated with a file-size limit (RLIMIT_FSIZE), under which writes fail with EFBIG."""
    code = f"""
import resource, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_features_store import sample_files
from ldsc.features.backbones.pixel import PixelBackbone
from ldsc.errors import ConfigError
from ldsc.features.store import StoreOptions, open_or_build
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
bb = PixelBackbone(); bb.set_base_size(16)
try:
    open_or_build(StoreOptions(dir={str(tmp_path / 'store')!r}), sample_files(2), bb, {{}}, 16, ["q", "k", "v"])
except ConfigError as e:
    print("REFUSED", e)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "REFUSED Could not write the feature store" in res.stdout and "File too large" in res.stdout
    assert not any(f.is_file() for f in (tmp_path / "store").rglob("*"))


# -- resume ------------------------------------------------------------------------------------


def test_resume_with_other_settings_or_past_max_epochs_is_refused(compose, tmp_path):
    from ldsc.run import fit

    out = tmp_path / "run"
    long = [*TINY, "solver.tol=0", "solver.iters_per_step=1", "trainer.max_epochs=4"]
    fit(compose(long, out=out))
    before = (out / "eigvecs.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"other settings \(graph.k_intra: 25 -> 5\)"):
        fit(compose([*long, "graph.k_intra=5", "resume=true"], out=out))
    with pytest.raises(ConfigError, match="beyond trainer.max_epochs=2"):
        fit(compose([*long, "trainer.max_epochs=2", "resume=true"], out=out))
    assert (out / "eigvecs.pt").read_bytes() == before
    fit(compose([*long, "trainer.max_epochs=6", "resume=true"], out=out))  # the same settings continue


def test_a_full_disk_at_the_checkpoint_is_one_sentence_and_leaves_no_temporary(compose, tmp_path, monkeypatch):
    import lightning as L

    from ldsc.run import fit

    def full(self, path, *a, **k):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(L.Trainer, "save_checkpoint", full)
    with pytest.raises(DataError, match=r"Could not write the checkpoint .*No space left on device"):
        fit(compose(TINY, out=tmp_path / "run"))
    assert not list((tmp_path / "run").rglob("*.tmp"))


# -- images, evaluation, memory -----------------------------------------------------------------


def test_outputs_inside_the_image_folder_are_not_images(tmp_path):
    from ldsc.runtime.data import FolderDataModule

    images = tmp_path / "images"
    images.mkdir()
    for f in sample_files(2):
        shutil.copy(f, images)
    run = images / "outputs" / "runs" / "r1"
    (run / "figures").mkdir(parents=True)
    (run / "eigvecs.pt").write_bytes(b"x")
    shutil.copy(sample_files(1)[0], run / "figures" / "eigenvectors_0000.png")
    (images / "figures").mkdir()  # a run written into the image folder itself
    (images / "stages.json").write_text("{}")
    shutil.copy(sample_files(1)[0], images / "figures" / "eigenvector_grid.png")
    found = [Path(f).name for f in FolderDataModule(str(images)).find_images()]
    assert found == ["astronaut.png", "coffee.png"]


def _finished_run(compose, tmp_path):
    from ldsc.run import fit

    out = tmp_path / "run"
    fit(compose(TINY, out=out))
    return out


def test_evaluate_refuses_nan_and_too_many_clusters_in_one_sentence(compose, tmp_path):
    from PIL import Image

    from ldsc.evaluate import evaluate_run

    out = _finished_run(compose, tmp_path)
    labels = tmp_path / "labels"
    labels.mkdir()
    for f in torch.load(out / "eigvecs.pt", weights_only=True)["files"]:
        w, h = Image.open(f).size
        Image.fromarray(np.zeros((h, w), np.uint8)).save(labels / Path(f).name)
    with pytest.raises(DataError, match="more than the 512 base-grid pixels"):
        evaluate_run(out, labels=labels, clusters=1000, n_figures=0, use_wandb=False)
    state = torch.load(out / "eigvecs.pt", weights_only=True)
    state["eigvecs"][0, 0, 0, 0] = float("nan")
    torch.save(state, out / "eigvecs.pt")
    with pytest.raises(DataError, match="1 NaN or infinite values"):
        evaluate_run(out, labels=labels, n_figures=0, use_wandb=False)


def test_evaluate_does_not_import_lightning(tmp_path):
    code = ("import sys\nfrom ldsc import evaluate\nrc = evaluate.main([sys.argv[1]])\n"
            "print(rc, 'lightning' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing")], capture_output=True, text=True)
    assert res.stdout.split() == ["1", "False"], res.stdout + res.stderr


def test_a_backbone_pass_that_cannot_fit_is_refused_before_it_starts(compose, single_image):
    from ldsc.run import fit

    cfg = compose(["data=single", f"data.path={single_image}", "base_size=2048", *SMALL[2:]])
    with pytest.raises(ConfigError, match="backbone pass over a batch of 1 image.*base grid 2048x2048"):
        fit(cfg)


def test_the_memory_estimate_counts_the_intra_image_similarity_block():
    from ldsc.graphs.memory import estimate_dataset_graph_bytes

    layers = [{"grid": [128, 128], "heads": 1, "dim": 8}]
    small = estimate_dataset_graph_bytes(1, layers, 8, chunk_elements=2**24)
    whole = estimate_dataset_graph_bytes(1, layers, 8, chunk_elements=2**30)  # one T x T block
    assert whole["build"] - small["build"] >= 3 * 4 * (128 * 128) ** 2 - 3 * 4 * 2**24


# -- figures -----------------------------------------------------------------------------------


def test_figures_keep_the_image_shape_and_share_one_labelled_colour_scale(tmp_path):
    from PIL import Image

    from ldsc.evaluation import figures as viz

    wide = Image.new("RGB", (200, 100))
    E = torch.randn(2, 5, 16, 16)
    fig = viz.eigenvector_panel(wide, E[0], n_vectors=4)
    shown = [ax for ax in fig.axes if ax.images]
    assert all(abs(ax.get_aspect() - 0.5) < 1e-9 for ax in shown[1:])  # drawn 2:1, like the input
    assert {im.get_cmap().name for ax in shown[2:] for im in ax.images} == {viz.CMAP}
    assert any(ax.get_ylabel().startswith("eigenvector value") for ax in fig.axes)  # the colour bar
    grid = viz.eigenvector_grid([wide, wide], E, n_vectors=4, names=["a.jpg", "b.jpg"])
    assert [ax.get_ylabel() for ax in grid.axes[:10:5]] == ["a.jpg", "b.jpg"]
    assert {im.get_cmap().name for ax in grid.axes for im in ax.images if im.get_array().ndim == 2} == {viz.CMAP}
    assert len(grid.axes) == 2 * 5 + 1


def test_every_image_gets_its_figure_up_to_the_documented_cap(tmp_path):
    from ldsc.export import write_figures

    files = sample_files(3)
    E = torch.randn(3, 4, 8, 8)
    paths = write_figures(tmp_path, E, files, max_images=None, n_vectors=2, grid_vectors=2)
    assert len(list((tmp_path / "figures").glob("eigenvectors_*.png"))) == 3 and len(paths) == 4
    shutil.rmtree(tmp_path / "figures")
    write_figures(tmp_path, E, files, max_images=2, n_vectors=2, grid_vectors=2)
    assert len(list((tmp_path / "figures").glob("eigenvectors_*.png"))) == 2


# -- weights -------------------------------------------------------------------------------------


def test_an_unreachable_hub_means_the_local_cache_only(monkeypatch, tmp_path, caplog):
    from transformers import ViTModel

    from ldsc.features.backbones import loading
    from ldsc.features.backbones.base import WeightsNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    loading.hub_reachable.cache_clear()
    assert loading.hub_reachable() is False
    with caplog.at_level(logging.INFO, logger="ldsc.features.backbones.loading"), pytest.raises(WeightsNotFoundError):
        loading.load_pretrained(ViTModel, "nobody/no-such-model", cache_dir=str(tmp_path))
    assert any("cannot be reached" in r.getMessage() for r in caplog.records)
    loading.hub_reachable.cache_clear()


def test_a_misspelt_nested_key_names_the_closest_setting_of_its_group():
    from ldsc.run import misspelt_nested_key

    msg = misspelt_nested_key(["graph=vv", "graph.kinter=3"])
    assert msg is not None and "did you mean graph.k_inter=3?" in msg
    msg = misspelt_nested_key(["trainer.max_epoch=3"])
    assert msg is not None and "did you mean trainer.max_epochs=3?" in msg
    assert misspelt_nested_key(["graph.k_inter=3", "callbacks.export.figures=false", "trainer.max_epochs=2",
                                "experiment=cocostuff27", "callbacks.evaluate.clusters=27"]) is None
    assert misspelt_nested_key(["data=folder", "data.root=/x"]) is None  # a mandatory (???) value exists
