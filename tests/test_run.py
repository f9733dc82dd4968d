"""End-to-end runs through the real entry point: outputs, configs, multirun, resume, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SMALL, TINY, run_cli

from ldsc.errors import ConfigError, DataError
from ldsc.run import config_dir, fit


def all_config_choices():
    root = Path(config_dir())
    for group in ("backbone", "graph", "data", "solver", "trainer", "logger", "callbacks", "experiment"):
        for f in sorted((root / group).glob("*.yaml")):
            yield group, f.stem


@pytest.mark.parametrize("group,name", list(all_config_choices()))
def test_every_config_composes(compose, group, name):
    # fill the keys some choices require (???) so every file is composed and fully resolved
    cfg = compose([f"{group}={name}", "++data.root=/tmp", "++data.path=/tmp/x.jpg"])
    from omegaconf import OmegaConf

    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.K > 0 and cfg.seed is not None


def test_run_writes_eigenvectors_figures_checkpoint_and_metrics(compose, tmp_path):
    cfg = compose([*TINY, "logger=csv", "callbacks.export.figures=true"])
    fit(cfg)
    out = Path(cfg.paths.output_dir)
    res = torch.load(out / "eigvecs.pt", weights_only=False)
    assert res["eigvecs"].shape == (2, 4, 16, 16)
    s = res["singular_values"]  # the default solver exports orthonormal eigenvectors (by eigenvalue)
    assert torch.allclose(s, torch.ones_like(s), atol=1e-4), "eigenvectors must be orthonormal over all pixels"
    assert [Path(f).name for f in res["files"]] == ["astronaut.png", "coffee.png"]
    assert res["config"]["K"] == 4
    assert json.loads((out / "files.json").read_text()) == res["files"]
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "figures" / "eigenvector_grid.png").is_file()
    assert len(list((out / "figures").glob("eigenvectors_*.png"))) == 2
    metrics = (out / "csv" / "metrics.csv").read_text()
    assert "train/mean_eigenvalue" in metrics and "train/residual" in metrics
    import csv

    rows = [r for r in csv.DictReader(metrics.splitlines()) if r.get("train/mean_eigenvalue")]
    assert rows and float(rows[-1]["train/mean_eigenvalue"]) > 0  # the mean of the K largest eigenvalues


def test_checkpoint_holds_no_backbone(compose):
    cfg = compose(TINY)
    solver = fit(cfg)
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    keys = set(ckpt["state_dict"])
    # exactly the solver's own state (its table and solver buffers), nothing of the backbone
    assert "table" in keys and keys == set(solver.state_dict()), keys
    assert not any("backbone" in k or "model" in k for k in keys), keys


def test_resumed_run_equals_uninterrupted_run(compose, tmp_path):
    full = compose([*TINY, "trainer.max_epochs=3"], out=tmp_path / "full")
    fit(full)
    first = compose([*TINY, "trainer.max_epochs=1"], out=tmp_path / "split")
    fit(first)
    resumed = compose([*TINY, "trainer.max_epochs=3", "resume=true"], out=tmp_path / "split")
    fit(resumed)
    a = torch.load(tmp_path / "full" / "eigvecs.pt", weights_only=False)["eigvecs"]
    b = torch.load(tmp_path / "split" / "eigvecs.pt", weights_only=False)["eigvecs"]
    torch.testing.assert_close(a, b)
    # and a different seed gives a different result (the comparison above is not vacuous)
    other = compose([*TINY, "trainer.max_epochs=3", "seed=7"], out=tmp_path / "other")
    fit(other)
    c = torch.load(tmp_path / "other" / "eigvecs.pt", weights_only=False)["eigvecs"]
    assert not torch.allclose(a, c)


def test_single_image_mode_uses_64_grid_and_no_inter_edges(compose, single_image):
    """One image: the 64x64 base grid, and each layer's graph holds only its k_intra nearest
    tokens per node: about k_intra entries a row once symmetrised (with k_inter lists as well,
    every row would hold at least k_intra + k_inter)."""
    from ldsc.run import build_datamodule

    cfg = compose([*SMALL, "data=single", f"data.path={single_image}", "K=3", "trainer.max_epochs=1",
                   "base_size=null", "data.batch_size=1"])
    dm, base = build_datamodule(cfg)
    assert base == 64
    k = int(cfg.graph.k_intra)
    for g in dm.dataset_graphs():
        rows = torch.cat([(b.crow_indices()[1:] - b.crow_indices()[:-1]) for _, b in g.blocks])
        assert 0 < rows.float().mean() <= 1.5 * k < k + int(cfg.graph.k_inter), g.name  # (threshold drops some)
    solver = fit(cfg)
    assert solver.eigenvectors().shape == (1, 3, 64, 64)
    assert torch.load(Path(cfg.paths.output_dir) / "eigvecs.pt", weights_only=False)["eigvecs"].shape == (1, 3, 64, 64)


@pytest.mark.parametrize("overrides,error,pattern", [
    (["data=folder", "data.root=/nonexistent/dir"], DataError, "does not exist"),
    (["data=single"], ConfigError, r"data.path is not set: pass data.path=/path/to/image.jpg"),
    (["graph.search=bogus"], ConfigError, "graph.search must be one of"),
    (["graph.reduce=bogus", "graph.dim=8"], ConfigError, "graph.reduce must be one of"),
    (["data=single", "data.path=/nonexistent.jpg"], DataError, "does not exist"),
    (["data=single", "data.path=/tmp"], DataError, "is a folder, not an image: use data=folder"),
    (["data=folder", "data.root=/tmp", "data.limit=0"], ConfigError, "data.limit=0 must be at least 1"),
    (["K=256"], ConfigError, "must be smaller than the 16x16=256 pixels"),
    (["K=2.5"], ConfigError, r"K must be a whole number, not 2\.5"),
    (["K=abc"], ConfigError, "K must be a whole number, not 'abc'"),
    (["K=0"], ConfigError, "K=0 must be at least 1"),
    (["graph.k_intra=-3"], ConfigError, "graph.k_intra=-3 must be at least 0"),
    (["graph.k_intra=0", "graph.k_inter=0"], ConfigError, "both 0: the graphs would have no edges"),
    (["graph.threshold=2"], ConfigError, r"graph.threshold=2 must be in \[-1.0, 1.0\)"),
    (["graph.heads=bogus"], ConfigError, "graph.heads must be one of"),
    (["data.batch_size=0"], ConfigError, "data.batch_size=0 must be at least 1"),
    (["trainer.max_epochs=0"], ConfigError, "trainer.max_epochs=0 must be at least 1"),
    (["solver.tol=-1"], ConfigError, "solver.tol=-1 must be at least 0.0"),
    (["graph.threshold=0.999"], ConfigError, "has no edges with graph.threshold=0.999"),
    (["numpy_hugepages=maybe"], ConfigError, "numpy_hugepages must be true, false or null"),
])
def test_bad_inputs_give_one_sentence(compose, overrides, error, pattern):
    cfg = compose([*SMALL, *overrides])
    with pytest.raises(error, match=pattern):
        fit(cfg)


def test_empty_folder_and_corrupt_images(compose, tmp_path, single_image):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="contains no images"):
        fit(compose([*SMALL, "data=folder", f"data.root={empty}"]))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "broken.jpg").write_bytes(b"not a jpeg at all")
    (mixed / "truncated.jpg").write_bytes(single_image.read_bytes()[:2000])
    from PIL import Image

    Image.open(single_image).convert("L").save(mixed / "gray.png")
    Image.open(single_image).convert("CMYK").save(mixed / "cmyk.jpg")
    Image.open(single_image).convert("RGBA").save(mixed / "rgba.png")
    Image.open(single_image).convert("P").save(mixed / "palette.png")
    cfg = compose([*SMALL, "data=folder", f"data.root={mixed}", "trainer.max_epochs=1"])
    fit(cfg)
    files = torch.load(Path(cfg.paths.output_dir) / "eigvecs.pt", weights_only=False)["files"]
    assert sorted(Path(f).name for f in files) == ["cmyk.jpg", "gray.png", "palette.png", "rgba.png"]


def test_cli_bad_input_exits_nonzero_with_one_line(tmp_path):
    res = run_cli(["data=folder", f"data.root={tmp_path / 'missing'}", f"hydra.run.dir={tmp_path / 'out'}",
                   "logger=none"])
    assert res.returncode != 0
    assert "ldsc: error: Image folder" in res.stderr and "does not exist" in res.stderr
    assert "Traceback" not in res.stderr


def test_an_output_folder_that_cannot_be_created_is_one_sentence(tmp_path):
    """Checked before Hydra creates the folder (it would otherwise end in Hydra's traceback)."""
    from ldsc.run import unwritable_output

    (tmp_path / "blocker").write_text("a file where a folder should be")
    res = run_cli([f"hydra.run.dir={tmp_path / 'blocker' / 'run'}"])
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip() == (f"ldsc: error: The output folder '{tmp_path / 'blocker' / 'run'}' cannot be "
                                  f"created: '{tmp_path / 'blocker'}' is a file, not a folder.")
    assert unwritable_output([f"hydra.run.dir={tmp_path / 'new' / 'run'}"]) is None
    assert unwritable_output([f"paths.log_dir={tmp_path / 'blocker'}"]) is not None


def test_cli_unknown_choice_lists_valid_ones(tmp_path):
    res = run_cli(["backbone=nonexistent", f"hydra.run.dir={tmp_path}"])
    assert res.returncode != 0
    assert "pixel" in res.stderr and "nonexistent" in res.stderr


def test_console_script_finds_the_configs_from_any_folder(tmp_path):
    """``ldsc-run`` (the installed console script) resolves ``conf/`` like ``python -m ldsc.run``."""
    import subprocess
    import sys

    script = Path(sys.executable).with_name("ldsc-run")
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    res = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "backbone: clip, dino, dinov2, dinov2_reg, dit, fec, hf, mae, pixel, sd, sd2, sd_paper, sd_paper_single, sdxl, siglip, timm" in res.stdout


def test_cli_multirun_gives_each_job_its_own_directory(tmp_path):
    res = run_cli(["-m", "graph=qk,vv", "K=3,4", *[o for o in TINY if not o.startswith("K=")],
                   "trainer.max_epochs=1", f"hydra.sweep.dir={tmp_path / 'sweep'}"], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    outs = sorted((tmp_path / "sweep").glob("*/eigvecs.pt"))
    assert len(outs) == 4
    names = sorted(p.parent.name for p in outs)
    assert names == ["0_pixel_qk_K3", "1_pixel_qk_K4", "2_pixel_vv_K3", "3_pixel_vv_K4"]
    assert torch.load(outs[1], weights_only=False)["eigvecs"].shape[1] == 4


def test_wandb_logger_runs_offline(compose, tmp_path):
    pytest.importorskip("wandb")
    cfg = compose([*TINY, "logger=wandb", "trainer.max_epochs=1", "callbacks.export.figures=true",
                   "callbacks.export.max_images=1"])
    fit(cfg)
    runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert len(list(runs[0].glob("files/media/images/*.png"))) == 2  # one per-image panel + the grid


def test_a_run_prints_each_message_once_and_no_noise(tmp_path):
    """Lightning's lines are not doubled by Hydra's handler; no cloud-logging tip, no
    "GPU available: False", no warning about the solver having no optimiser."""
    res = run_cli([*TINY, f"hydra.run.dir={tmp_path / 'run'}", f"paths.log_dir={tmp_path / 'logs'}"])
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout + res.stderr
    messages = [ln.split("] - ", 1)[-1].removeprefix("INFO: ") for ln in out.splitlines() if ln.strip()]
    doubled = {m for m in messages if messages.count(m) > 1}
    assert not doubled, doubled
    for noise in ("litlogger", "configure_optimizers", "GPU available", "LeafSpec", "faiss.loader"):
        assert noise not in out, noise
    assert "eigenvectors written to" in out


def test_hydra_full_error_shows_the_traceback_behind_the_sentence(tmp_path):
    args = ["data=folder", f"data.root={tmp_path / 'missing'}", f"hydra.run.dir={tmp_path / 'out'}", "logger=none"]
    assert "Traceback" not in run_cli(args).stderr
    full = run_cli(args, env_extra={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr and "DataError" in full.stderr


def test_a_gpu_trainer_without_a_gpu_is_one_sentence(compose):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    with pytest.raises(ConfigError, match="trainer.accelerator=gpu but torch sees no CUDA GPU"):
        fit(compose([*SMALL, "trainer=gpu"]))


def _wait_for(predicate, seconds: float = 180.0) -> bool:
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_figures_drawn_in_the_background_arrive_after_the_run_has_returned(tmp_path):
    """figures=background (the default): the run returns once eigvecs.pt is written; a separate
    process draws the figures from it and says so in run.log; no half-written file is ever seen."""
    out = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("callbacks.export.figures")]
    r = run_cli([*args, f"hydra.run.dir={out}", f"store.dir={tmp_path / 'store'}"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "eigvecs.pt").is_file()
    assert "figures: drawn in the background by process" in r.stdout + r.stderr
    log = out / "run.log"
    assert _wait_for(lambda: "figures written to" in log.read_text()), log.read_text()[-2000:]
    names = sorted(p.name for p in (out / "figures").iterdir())
    assert names == ["eigenvector_grid.png", "eigenvectors_0000_astronaut.png", "eigenvectors_0001_coffee.png"]
    from PIL import Image

    assert Image.open(out / "figures" / "eigenvector_grid.png").size[0] > 500


def test_in_a_slurm_job_the_figures_are_drawn_before_the_run_returns(tmp_path):
    out = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("callbacks.export.figures")]
    r = run_cli([*args, f"hydra.run.dir={out}", f"store.dir={tmp_path / 'store'}"], env_extra={"SLURM_JOB_ID": "42"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "drawn before the run returns (a SLURM job ends its processes with it)" in r.stdout + r.stderr
    assert len(list((out / "figures").glob("*.png"))) == 3


def test_ldsc_export_draws_a_finished_runs_figures_and_refuses_a_folder_without_one(tmp_path):
    import subprocess
    import sys

    from ldsc.export import save_eigenvectors

    import skimage.data
    from PIL import Image

    img = tmp_path / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(img)
    save_eigenvectors(tmp_path / "run", torch.randn(1, 4, 8, 8), [str(img)], keep_order=True)
    r = subprocess.run([sys.executable, "-m", "ldsc.export", str(tmp_path / "run"), "--n-vectors=3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in (tmp_path / "run" / "figures").iterdir()] == ["eigenvectors_0000_astronaut.png"]
    r = subprocess.run([sys.executable, "-m", "ldsc.export", str(tmp_path / "nothing")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1
    assert "figures not drawn" in r.stderr and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_setting_an_experiment_adds_is_known_with_that_experiment_only():
    from ldsc.run import misspelt_override

    assert misspelt_override(["experiment=cocostuff27", "labels_dir=/data/labels"]) is None
    assert "'labels_dir' is neither a config group nor a setting" in misspelt_override(["labels_dir=/data/labels"])
