"""``python -m ldsc.extend`` (src/ldsc/extend.py): new images into a finished run, and what it refuses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from ldsc.features.images import sample_paths
from ldsc.spectral import subspace_alignment


def extend_cli(args, cwd):
    env = dict(os.environ, HYDRA_FULL_ERROR="0", WANDB_MODE="offline", HF_HUB_OFFLINE="1", LDSC_PROGRESS="lines")
    return subprocess.run([sys.executable, "-m", "ldsc.extend", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run of the default solver on 6 of the sample photographs (graph=vv)."""
    tmp = tmp_path_factory.mktemp("extend")
    folder = tmp / "fitted"
    folder.mkdir()
    for p in sample_paths()[:6]:
        shutil.copy(p, folder)
    res = run_cli(["data=folder", f"data.root={folder}", "graph=vv", "logger=none", "callbacks.export.figures=false",
                   f"hydra.run.dir={tmp / 'run'}", f"store.dir={tmp / 'store'}", "backbone.n_features=32"], cwd=tmp)
    assert res.returncode == 0, res.stderr[-2000:]
    return tmp


def test_a_run_writes_the_model_that_extend_reads(finished_run):
    from ldsc import LDSC

    model = LDSC.load(finished_run / "run" / "fit.safetensors")
    run = torch.load(finished_run / "run" / "eigvecs.pt", weights_only=True)
    assert torch.equal(model.eigenvectors_, run["eigvecs"])
    assert len(model.graphs_) == 3 and model.graphs_[0].x is not None  # vectors read back from the run's store


def test_new_images_are_embedded_with_the_runs_eigenvectors(finished_run):
    new = finished_run / "new"
    new.mkdir(exist_ok=True)
    for p in sample_paths()[6:] + sample_paths()[:2]:  # two unseen photographs, two of the run's again
        shutil.copy(p, new)
    res = extend_cli([finished_run / "run", "data=folder", f"data.root={new}"], cwd=finished_run)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "extend: 4/4 img" in res.stderr + res.stdout
    out = torch.load(finished_run / "run" / "extend" / "eigvecs.pt", weights_only=True)
    assert out["eigvecs"].shape == (4, 15, 32, 32) and torch.isfinite(out["eigvecs"]).all()
    assert out["config"]["extends"] == str(finished_run / "run")
    assert (finished_run / "run" / "extend" / "figures").is_dir()
    # the run's own images, embedded again, land on their fitted eigenvectors
    run = torch.load(finished_run / "run" / "eigvecs.pt", weights_only=True)
    names = [Path(f).name for f in out["files"]]
    for name in ("astronaut.png", "coffee.png"):
        i, j = names.index(name), [Path(f).name for f in run["files"]].index(name)
        assert subspace_alignment(out["eigvecs"][i:i + 1], run["eigvecs"][j:j + 1]) > 0.85
    # a second extension into the same folder is refused without overwrite=true
    again = extend_cli([finished_run / "run", "data=folder", f"data.root={new}"], cwd=finished_run)
    assert again.returncode == 1 and "overwrite=true" in again.stderr
    assert again.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("args, message", [
    (["graph.k_intra=5"], "its graph settings are fixed"),
    (["backbone=clip"], "its backbone settings are fixed"),
    (["K=4"], "its K settings are fixed"),
    (["data.root"], "is not a key=value setting"),
])
def test_settings_that_change_the_graphs_are_refused_in_one_sentence(finished_run, args, message):
    res = extend_cli([finished_run / "run", *args], cwd=finished_run)
    assert res.returncode == 1 and message in res.stderr, res.stderr
    assert res.stderr.strip().count("\n") == 0


def test_a_folder_that_is_not_a_finished_run_is_one_sentence(tmp_path):
    res = extend_cli([tmp_path, "data=folder", f"data.root={tmp_path}"], cwd=tmp_path)
    assert res.returncode == 1 and "has no fit.safetensors" in res.stderr
    res = extend_cli([tmp_path / "nothing"], cwd=tmp_path)
    assert res.returncode == 1 and "is not a folder" in res.stderr
    res = extend_cli([], cwd=tmp_path)
    assert res.returncode == 1 and "no run folder given" in res.stderr
