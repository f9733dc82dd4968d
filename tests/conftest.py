"""Shared fixtures: real data (skipped when absent), quiet W&B, Hydra composition."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED.exists():  # a checkout elsewhere: ../shared relative to the working directory
    SHARED = Path.cwd().parent / "shared" / "data"
SINGLE_IMAGE = SHARED / "single_image.jpg"
COCO_DIR = SHARED / "coco_val2017_first100"


@pytest.fixture
def single_image() -> Path:
    if not SINGLE_IMAGE.is_file():
        pytest.skip(f"real test image {SINGLE_IMAGE} is absent (it lives in ../shared/data, outside the repo)")
    return SINGLE_IMAGE


@pytest.fixture
def coco_dir() -> Path:
    if not COCO_DIR.is_dir():
        pytest.skip(f"real test images {COCO_DIR} are absent (they live in ../shared/data, outside the repo)")
    return COCO_DIR


@pytest.fixture(autouse=True)
def quiet_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


@pytest.fixture
def compose(tmp_path):
    """``compose(overrides) -> cfg`` with paths pointing into ``tmp_path``; Hydra state is cleared after."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from ldsc.run import config_dir

    def _compose(overrides=(), out: Path | None = None):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
        out = Path(out or tmp_path / "run")
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(out)
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
            cfg.paths.log_dir = str(tmp_path / "logs")
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


#: overrides that make any run tiny: 16x16 base grid, K=4, two epochs, no logger, no figures
SMALL = ["data.batch_size=2", "base_size=16", "K=4", "trainer.max_epochs=2", "logger=none",
         "trainer.enable_progress_bar=false", "~callbacks.progress", "callbacks.export.figures=false"]
#: a tiny run on two of scikit-image's photographs
TINY = ["data.names=[astronaut.png,coffee.png]", *SMALL]


def run_cli(args, cwd=None, timeout=300, env_extra=None):
    """Run ``python -m ldsc.run ARGS`` in a subprocess; returns the CompletedProcess."""
    import subprocess
    import sys

    env = dict(os.environ, HYDRA_FULL_ERROR="0", WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "ldsc.run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def require_timm():
    """Skip (with the reason) where timm cannot be imported: it is an optional dependency, and it
    imports torchvision, which PyPI builds for CUDA torches only — so a CPU-torch CI has none.
    The timm tests run where timm imports (`make test-timm`)."""
    from ldsc.features.backbones.base import WeightsNotFoundError
    from ldsc.features.backbones.timm_vit import import_timm

    try:
        return import_timm()
    except WeightsNotFoundError as err:
        pytest.skip(str(err))
