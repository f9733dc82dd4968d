"""End-to-end runs of ``ldsc.run`` with the pretrained backbones (tiny random stand-ins).

Each of the paper's backbones × graph runs in single-image mode (the real demo image) and in
data-set mode (a folder of four COCO images), in-process through ``fit`` like ``test_run.py``; every
newer one (DINOv2 with and without registers, DINOv3, SigLIP through ``backbone=hf``; timm's DINOv2
with registers and EVA-02) runs once each way; one run goes through ``python -m ldsc.run`` in a
subprocess, and every ``-m backbone=... graph=...`` sweep combination is composed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import SMALL, require_timm, run_cli
from tiny_models import TINY_INPUT, tiny_model_dir

from ldsc.run import fit

BACKBONES = ["sd", "clip", "dino", "mae"]
#: the newer ones: config group (a preset, or hf / timm with the model named) per tiny model
NEWER = {"sd2": "sd2", "sdxl": "sdxl", "sd3": "dit", "flux": "dit", "pixart": "dit", "dinov2": "dinov2", "dinov2_reg": "dinov2_reg", "dinov3": "hf", "siglip": "siglip",
         "timm_dinov2_reg": "timm", "timm_eva02": "timm"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine: an OpenMP pool only oversubscribes
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def four_images(tmp_path, coco_dir) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for f in sorted(coco_dir.glob("*.jpg"))[:4]:
        shutil.copy(f, folder / f.name)
    return folder


def backbone_overrides(name: str) -> list[str]:
    group = NEWER.get(name, name)
    if group == "timm":
        require_timm()
        return ["backbone=timm", f"backbone.model_name=local-dir:{tiny_model_dir(name)}"]
    if group == "sdxl":  # (the tiny SDXL's 2x2 layers: 4 random tokens, too few for a graph above the threshold)
        return [f"backbone={group}", f"backbone.model_id={tiny_model_dir(name)}", f"backbone.input_size={TINY_INPUT[name]}",
                "backbone.layers=[up_blocks.1.*]"]
    return [f"backbone={group}", f"backbone.model_id={tiny_model_dir(name)}", f"backbone.input_size={TINY_INPUT[name]}"]


def eigvecs(cfg) -> dict:
    return torch.load(Path(cfg.paths.output_dir) / "eigvecs.pt", weights_only=False)


@pytest.mark.parametrize("graph", ["qk", "vv"])
@pytest.mark.parametrize("name", BACKBONES)
def test_single_image_run(compose, single_image, name, graph):
    cfg = compose([*SMALL, *backbone_overrides(name), f"graph={graph}", "data=single", f"data.path={single_image}",
                   "data.batch_size=1", "K=3", "trainer.max_epochs=1"])
    fit(cfg)
    assert eigvecs(cfg)["eigvecs"].shape == (1, 3, 16, 16)


@pytest.mark.parametrize("graph", ["qk", "vv"])
@pytest.mark.parametrize("name", BACKBONES)
def test_dataset_run(compose, four_images, name, graph):
    cfg = compose([*SMALL, *backbone_overrides(name), f"graph={graph}", "data=folder", f"data.root={four_images}",
                   "data.batch_size=2", "K=3", "trainer.max_epochs=1"])
    fit(cfg)
    out = eigvecs(cfg)
    assert out["eigvecs"].shape == (4, 3, 16, 16)
    assert sorted(Path(f).name for f in out["files"]) == sorted(p.name for p in four_images.iterdir())


@pytest.mark.parametrize("name", list(NEWER))
def test_newer_backbones_single_image_and_dataset_runs(compose, single_image, four_images, tmp_path, name):
    single = compose([*SMALL, *backbone_overrides(name), "graph=vv", "data=single", f"data.path={single_image}",
                      "data.batch_size=1", "K=3", "trainer.max_epochs=1"], out=tmp_path / "single")
    fit(single)
    assert torch.isfinite(eigvecs(single)["eigvecs"]).all()
    dataset = compose([*SMALL, *backbone_overrides(name), "graph=qk", "data=folder", f"data.root={four_images}",
                       "data.batch_size=2", "K=3", "trainer.max_epochs=1"])
    fit(dataset)
    out = eigvecs(dataset)
    assert out["eigvecs"].shape == (4, 3, 16, 16) and torch.isfinite(out["eigvecs"]).all()


@pytest.mark.parametrize("name", ["sd", "dino"])
def test_attention_graph_run(compose, single_image, name):
    cfg = compose([*SMALL, *backbone_overrides(name), "graph=attn", "data=single", f"data.path={single_image}",
                   "data.batch_size=1", "K=3", "trainer.max_epochs=2"])
    fit(cfg)
    assert eigvecs(cfg)["eigvecs"].shape == (1, 3, 16, 16)


def test_cli_run_with_a_local_model_dir(tmp_path, single_image):
    out = tmp_path / "out"
    res = run_cli([*SMALL, *backbone_overrides("sd"), "graph=vv", "data=single", f"data.path={single_image}",
                   "data.batch_size=1", "K=3", "trainer.max_epochs=1", f"hydra.run.dir={out}"],
                  env_extra={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert torch.load(out / "eigvecs.pt", weights_only=False)["eigvecs"].shape == (1, 3, 16, 16)


def test_cli_missing_weights_is_one_sentence(tmp_path):
    res = run_cli(["backbone=dino", "backbone.model_id=nobody-here/no-such-model", "data=samples",
                   "data.names=[astronaut.png]", "logger=none", f"hydra.run.dir={tmp_path}"])
    assert res.returncode != 0
    assert "ldsc: error: Could not load weights 'nobody-here/no-such-model'" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("graph", ["qk", "vv", "attn"])
@pytest.mark.parametrize("name", [*BACKBONES, "sd2", "sdxl", "dit", "dinov2", "dinov2_reg", "siglip", "timm"])
def test_sweep_combinations_compose(compose, name, graph):
    """Every job of ``python -m ldsc.run -m backbone=sd,clip,dino,mae graph=qk,vv[,attn]`` composes
    to importable targets with the documented defaults."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    cfg = compose([f"backbone={name}", f"graph={graph}"])
    OmegaConf.to_container(cfg, resolve=True)
    target = get_class(cfg.backbone._target_)
    get_class(cfg.graph._target_)
    if name == "timm":
        assert target.name == "timm" and cfg.backbone.model_name == "vit_base_patch14_reg4_dinov2.lvd142m"
        return
    assert target.name == {"sd": "sd", "sd2": "sd", "sdxl": "sdxl", "dit": "dit"}.get(name, "hf")  # every ViT: one class
    defaults = {"sd": ("CompVis/stable-diffusion-v1-4", 512), "sd2": ("stabilityai/stable-diffusion-2-1", 768),
                "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", 1024),
                "dit": ("stabilityai/stable-diffusion-3.5-medium", 1024), "clip": ("openai/clip-vit-base-patch16", None),
                "dino": ("facebook/dino-vitb8", 480), "mae": ("facebook/vit-mae-base", None),  # None: the model's 224
                "dinov2": ("facebook/dinov2-base", 518), "dinov2_reg": ("facebook/dinov2-with-registers-base", 518),
                "siglip": ("google/siglip-base-patch16-224", None)}
    assert (cfg.backbone.model_id, cfg.backbone.input_size) == defaults[name]
