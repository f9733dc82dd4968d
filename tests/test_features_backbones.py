"""Pretrained backbones (sd; hf presets clip, dino, mae) on tiny random instances of the real architectures.

The models are saved with ``save_pretrained`` into a session temp dir and loaded through the
backbone classes with ``model_id=<dir>``, exactly as users load hub ids or local folders.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from ldsc.features.backbones.base import WeightsNotFoundError
from ldsc.features.backbones.capture import AttentionCall, AttentionCapture, CaptureError
from ldsc.features.backbones.hooks import attention_probs, grid_features, select_layers
from conftest import require_timm
from tiny_models import TINY_SD_INPUT, TINY_VIT, TINY_VIT_INPUT, tiny_model_dir


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is ~100x faster than an
    oversubscribed OpenMP pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir():
    """``tiny_dir(name)`` → directory of a tiny saved model (built once per session)."""
    return tiny_model_dir


def vit_class(name: str):
    """The ``backbone=<name>`` preset: one class (:class:`HFBackbone`) for every transformers ViT."""
    from ldsc.features.backbones.hf import HFBackbone

    return HFBackbone


def make_sd(tiny_dir, model: str = "sd", **kwargs):
    """``backbone=sd`` on the tiny SD 1.x (``model="sd"``) or 2.x (``"sd2"``) model, ``backbone=sdxl``
    on the tiny SDXL (``"sdxl"``)."""
    from ldsc.features.backbones.sd import StableDiffusionBackbone, StableDiffusionXLBackbone

    kwargs.setdefault("input_size", TINY_SD_INPUT)
    cls = StableDiffusionXLBackbone if model == "sdxl" else StableDiffusionBackbone
    return cls(tiny_dir(model), **kwargs)


def images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_frozen(backbone: nn.Module, features) -> None:
    """No parameter trains; gradients through downstream ops never reach the backbone."""
    assert all(not p.requires_grad for p in backbone.parameters())
    assert not backbone.training
    weight = torch.ones((), requires_grad=True)
    loss = sum((weight * f.q).square().mean() + (weight * f.v).mean() for f in features)
    loss.backward()
    assert weight.grad is not None
    assert all(p.grad is None for p in backbone.parameters())
    assert backbone.state_dict() == {}
    holder = nn.Module()
    holder.backbone, holder.head = backbone, nn.Linear(2, 2)
    assert set(holder.state_dict()) == {"head.weight", "head.bias"}  # never in a checkpoint


# --------------------------------------------------------------------------------------------
# hooks


def test_import_is_cheap():
    code = (
        "import sys, ldsc.features.backbones, ldsc.features.backbones.hf, ldsc.features.backbones.sd, "
        "ldsc.features.backbones.timm_vit, ldsc.features.backbones.hooks;"
        "heavy = [m for m in ('diffusers', 'transformers', 'timm') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


class _Attention(nn.Module):
    """A minimal attention module that hands its q/k/v to scaled_dot_product_attention."""

    def __init__(self, eager: bool = False):
        super().__init__()
        self.qkv, self.eager = nn.Linear(4, 12), eager

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 2).permute(2, 0, 3, 1, 4)
        if self.eager:
            return (q @ k.transpose(-1, -2)).softmax(-1) @ v
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)


def test_capture_records_what_the_layer_compares_and_restores_everything():
    attention = _Attention()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    x = torch.randn(2, 5, 4)
    with AttentionCapture({"a": attention}) as capture:
        out = attention(x)
    call = capture.take()["a"]
    q, k, v = attention.qkv(x).view(2, 5, 3, 2, 2).permute(2, 0, 3, 1, 4)
    assert torch.equal(call.q, q) and torch.equal(call.k, k) and torch.equal(call.v, v) and call.scale == 0.3
    assert torch.allclose(out, attention_probs(call.q, call.k, call.scale) @ call.v, atol=1e-6)
    assert capture.outputs == {}
    with pytest.raises(RuntimeError, match="boom"):
        with capture:
            attention(x)
            raise RuntimeError("boom")
    assert torch.nn.functional.scaled_dot_product_attention is sdpa  # restored, also after an error
    assert not attention._forward_hooks and not attention._forward_pre_hooks


def test_capture_refuses_a_layer_that_never_calls_sdpa():
    eager = _Attention(eager=True)
    with pytest.raises(CaptureError, match="without calling.*'sdpa' attention"):
        with AttentionCapture({"a": eager}):
            eager(torch.randn(1, 3, 4))


def _call(b, heads, n, d, seed=0) -> AttentionCall:
    g = torch.Generator().manual_seed(seed)
    return AttentionCall(*(torch.randn(b, heads, n, d, generator=g) for _ in "qkv"), scale=d ** -0.5)


def test_grid_features_drops_special_tokens_strides_and_averages_heads():
    b, heads, h, w, d, prefix = 2, 3, 4, 6, 5, 1
    call = _call(b, heads, prefix + h * w + 2, d)  # 2 trailing (text) tokens as in joint attention
    full = grid_features("l", call, (h, w), offset=prefix)
    assert full.q.shape == (b, heads, h, w, d)
    assert torch.equal(full.q[1, 2, 3, 5], call.q[1, 2, prefix + 3 * w + 5])
    sub = grid_features("l", call, (h, w), offset=prefix, token_stride=2, head_mode="mean", compute_attn=True)
    assert sub.q.shape == (b, 1, 2, 3, d)
    assert torch.allclose(sub.q[0, 0, 1, 2], call.q[0, :, prefix + 2 * w + 4].mean(0))
    assert sub.attn.shape == (b, 1, 6, 6)
    assert torch.allclose(sub.attn.sum(-1), torch.ones(b, 1, 6))
    cat = grid_features("l", call, (h, w), offset=prefix, head_mode="concat", compute_attn=True)
    assert cat.q.shape == (b, 1, h, w, heads * d)  # the heads side by side, head 0 first
    assert torch.equal(cat.v[1, 0, 3, 5], call.v[1, :, prefix + 3 * w + 5].reshape(-1))
    assert cat.attn.shape == (b, 1, h * w, h * w)
    with pytest.raises(ValueError, match="tokens"):
        grid_features("l", call, (h, w + 1), offset=prefix)
    with pytest.raises(ValueError, match="keep, mean, concat"):
        grid_features("l", call, (h, w), offset=prefix, head_mode="sum")


def keep_tokens(probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Attention ``(..., N, N)`` restricted to the tokens ``index``, rows renormalised."""
    sub = probs.index_select(-2, index).index_select(-1, index)
    return sub / sub.sum(dim=-1, keepdim=True)


def test_captured_attention_is_the_full_attention_restricted_to_the_grid():
    b, heads, h, w, d, prefix = 2, 3, 4, 6, 5, 1
    call = _call(b, heads, prefix + h * w, d)
    full = attention_probs(call.q, call.k, call.scale)
    f = grid_features("l", call, (h, w), offset=prefix, token_stride=2, compute_attn=True)
    index = (torch.arange(0, h, 2)[:, None] * w + torch.arange(0, w, 2)[None, :]).flatten() + prefix
    assert torch.allclose(f.attn, keep_tokens(full, index), atol=1e-6)


def test_select_layers():
    names = ["layer.0", "layer.1", "layer.2"]
    assert select_layers(names) == names
    assert select_layers(names, [-1, 0]) == ["layer.0", "layer.2"]
    assert select_layers(names, "layer.[12]") == ["layer.1", "layer.2"]
    with pytest.raises(ValueError, match="out of range"):
        select_layers(names, [3])
    with pytest.raises(ValueError, match="selects none"):
        select_layers(names, ["block.*"])


# --------------------------------------------------------------------------------------------
# ViTs: clip, dino, mae


@pytest.mark.parametrize("name", ["clip", "dino", "mae", "dinov2", "dinov2_reg", "dinov3", "siglip",
                                  "timm_dinov2_reg", "timm_eva02"])
def test_vit_shapes_and_options(tiny_dir, name):
    heads, d, side = TINY_VIT["num_attention_heads"], 16, TINY_VIT_INPUT // TINY_VIT["patch_size"]
    # every model defaults to its own size (the dino preset's 480 is the yaml's, not the class's)
    backbone = make_backbone(tiny_dir, name, input_size=None)
    assert backbone.input_size == TINY_VIT_INPUT
    assert backbone.name == {"clip": "clip_vision_model", "dino": "vit", "mae": "vit_mae", "dinov2": "dinov2",
                             "dinov2_reg": "dinov2_with_registers", "dinov3": "dinov3_vit",
                             "siglip": "siglip_vision_model"}.get(name, "timm")
    features = backbone(images(2, TINY_VIT_INPUT))
    assert [f.name for f in features] == ["layer.0", "layer.1"]
    for f in features:
        for t in (f.q, f.k, f.v):
            assert t.shape == (2, heads, side, side, d) and t.dtype == torch.float32
        assert f.attn is None and f.timestep is None

    # larger input: interpolated position encodings (timm: resampled on load, rotary: any size);
    # mean heads; strided tokens; one layer
    other = make_backbone(tiny_dir, name, input_size=48, heads="mean", token_stride=2, layers=[-1])
    (f,) = other(images(1, 48))
    assert f.name == "layer.1" and f.q.shape == (1, 1, 3, 3, d) and f.grid == (3, 3)
    # images of another size are resized to input_size
    assert other(images(1, 40))[0].q.shape == (1, 1, 3, 3, d)


def assert_capture_reproduces_eager_attention(backbone, x, **forward):
    """softmax(q kᵀ · scale) of the q, k the backbone captures (all tokens) equals the model's own
    attention probabilities from its eager implementation (``output_attentions``), layer by layer,
    and the features' ``attn`` is that attention restricted to the grid: a wrong head split, a
    forgotten norm or rotary step, or a special token left in fails here."""
    features = backbone(x)
    pixel_values = backbone.preprocess(x)
    with torch.no_grad(), AttentionCapture({n: backbone.found[n].module for n in backbone.found}) as capture:
        backbone.encode(pixel_values)
    calls = capture.take()
    model = backbone.model
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            options = dict(backbone.forward_options)
            if backbone.masked:
                options["noise"] = torch.arange(16.0).expand(x.shape[0], -1)
            reference = model(pixel_values=pixel_values, output_attentions=True, **options).attentions
    finally:
        model.set_attn_implementation("sdpa")
    assert len(reference) == len(calls)
    h, w = backbone.grid
    grid = torch.arange(h * w) + backbone.special_tokens
    for i, f in enumerate(features):
        call = calls[f"layer.{i}"]
        assert torch.allclose(attention_probs(call.q, call.k, call.scale), reference[i], atol=1e-5), f.name
        assert torch.allclose(f.attn, keep_tokens(reference[i], grid), atol=1e-5), f.name


#: backbone=hf checkpoints (tiny stand-ins of the presets, and DINOv3 by id) → special tokens to drop
HF = {"clip": 1, "dino": 1, "mae": 1, "dinov2": 1, "dinov2_reg": 5, "dinov3": 5, "siglip": 0}
#: backbone=timm checkpoints → special tokens (class + registers)
TIMM = {"timm_dinov2_reg": 5, "timm_eva02": 1}


def make_backbone(tiny_dir, name: str, **kwargs):
    """``backbone=hf`` or ``backbone=timm`` on the tiny ``name`` model, loaded the way users load it."""
    if name in TIMM:
        require_timm()
        from ldsc.features.backbones.timm_vit import TimmBackbone

        return TimmBackbone(f"local-dir:{tiny_dir(name)}", **kwargs)
    kwargs.setdefault("input_size", TINY_VIT_INPUT)  # (the class's default, None, is the model's own size)
    return vit_class(name)(tiny_dir(name), **kwargs)


@pytest.mark.parametrize("name", list(HF))
def test_hf_capture_reproduces_the_models_attention(tiny_dir, name):
    backbone = make_backbone(tiny_dir, name, compute_attn=True)
    assert backbone.special_tokens == HF[name]
    assert_capture_reproduces_eager_attention(backbone, images(2, TINY_VIT_INPUT))


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_capture_reproduces_the_models_attention(tiny_dir, name):
    """timm's own non-fused path computes the probabilities and passes them through ``attn_drop``:
    they must equal softmax(q kᵀ · scale) of the q, k captured from its fused path (after the fused
    qkv split, QK-norm and, for EVA-02, the rotary embedding)."""
    backbone = make_backbone(tiny_dir, name, compute_attn=True)
    assert backbone.special_tokens == TIMM[name]
    x = images(2, TINY_VIT_INPUT)
    features = backbone(x)
    with torch.no_grad(), AttentionCapture({n: backbone.found[n].module for n in backbone.found}) as capture:
        backbone.model.forward_features(backbone.preprocess(x))
    calls = capture.take()
    reference, handles = {}, []
    for n, layer in backbone.found.items():
        layer.module.fused_attn = False
        handles.append(layer.module.attn_drop.register_forward_hook(
            lambda m, a, o, n=n: reference.__setitem__(n, o)))
    try:
        with torch.no_grad():
            backbone.model.forward_features(backbone.preprocess(x))
    finally:
        for n, layer in backbone.found.items():
            layer.module.fused_attn = True
        for handle in handles:
            handle.remove()
    grid = torch.arange(16) + backbone.special_tokens
    for f in features:
        call = calls[f.name]
        assert torch.allclose(attention_probs(call.q, call.k, call.scale), reference[f.name], atol=1e-5), f.name
        assert torch.allclose(f.attn, keep_tokens(reference[f.name], grid), atol=1e-5), f.name


@pytest.mark.parametrize("name", [*HF, *TIMM])
def test_vit_tokens_come_back_in_grid_order(tiny_dir, name):
    """Changing one patch of the image changes layer 0's queries at that grid cell only
    (q is a token-wise function of the patch embedding): for MAE this proves no shuffle, for the
    register models that no register is left in the grid (it would shift every cell)."""
    backbone = make_backbone(tiny_dir, name, layers=[0])
    x = images(1, TINY_VIT_INPUT)
    y = x.clone()
    y[:, :, 8:16, 16:24] = 1 - y[:, :, 8:16, 16:24]  # patch (row 1, col 2)
    changed = (backbone(x)[0].q - backbone(y)[0].q).abs().amax(dim=(0, 1, 4)) > 1e-6
    assert changed.nonzero().tolist() == [[1, 2]]


@pytest.mark.parametrize("name", ["clip", "dino", "mae"])
def test_vit_frozen_and_not_in_checkpoints(tiny_dir, name):
    backbone = vit_class(name)(tiny_dir(name), input_size=TINY_VIT_INPUT)
    backbone.train()
    assert_frozen(backbone, backbone(images(1, TINY_VIT_INPUT)))


def test_vit_normalisation_from_preprocessor_or_defaults(tiny_dir):
    from ldsc.features.backbones.hf import IMAGENET_MEAN

    openai = (0.48145466, 0.4578275, 0.40821073)
    assert torch.allclose(vit_class("clip")(tiny_dir("clip")).mean.flatten(), torch.tensor(openai))
    assert not os.path.exists(os.path.join(tiny_dir("dino"), "preprocessor_config.json"))
    assert torch.allclose(vit_class("dino")(tiny_dir("dino")).mean.flatten(), torch.tensor(IMAGENET_MEAN))
    fallback = vit_class("dino")(tiny_dir("dino"), image_mean=openai, image_std=(0.5, 0.5, 0.5))
    assert torch.allclose(fallback.mean.flatten(), torch.tensor(openai))


def test_vit_bfloat16_and_early_stop(tiny_dir):
    full = vit_class("dino")(tiny_dir("dino"))
    first = vit_class("dino")(tiny_dir("dino"), layers=[0])  # the forward stops after layer 0
    x = images(2, TINY_VIT_INPUT)
    assert torch.equal(first(x)[0].q, full(x)[0].q)
    low = vit_class("dino")(tiny_dir("dino"), dtype="bfloat16")
    assert next(low.model.parameters()).dtype == torch.bfloat16
    f = low(x)[0]
    assert f.q.dtype == torch.float32 and torch.allclose(f.q, full(x)[0].q, atol=0.1, rtol=0.1)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vit_class("dino")(tiny_dir("dino"), input_size=36)


# --------------------------------------------------------------------------------------------
# Stable Diffusion


def test_sd_layers_grids_and_shapes(tiny_dir):
    backbone = make_sd(tiny_dir, layers=None, max_grid=None)
    features = backbone(images(2, TINY_SD_INPUT), generator=torch.Generator().manual_seed(0))
    grids = {f.name: f.grid for f in features}
    assert grids == {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1": (8, 8),
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1": (4, 4),
        "mid_block.attentions.0.transformer_blocks.0.attn1": (2, 2),
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1": (4, 4),
        "up_blocks.1.attentions.1.transformer_blocks.0.attn1": (4, 4),
        "up_blocks.2.attentions.0.transformer_blocks.0.attn1": (8, 8),
        "up_blocks.2.attentions.1.transformer_blocks.0.attn1": (8, 8),
    }
    assert list(grids) == backbone.layer_names  # execution order: down, mid, up
    for f in features:
        assert f.q.shape[:2] == (2, 2) and f.q.shape == f.k.shape == f.v.shape
        assert f.q.shape[-1] == (8 if f.grid == (8, 8) else 16)
        assert f.timestep.shape == (2,)

    default = make_sd(tiny_dir, max_grid=4)  # mid and up blocks, no 8x8 layers (SD's 64x64 at 512 px)
    assert default.layer_names == [
        "mid_block.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn1",
    ]
    (f, *_) = make_sd(tiny_dir, layers=["up_blocks.2.*"], heads="mean", token_stride=2)(images(1, TINY_SD_INPUT))
    assert f.q.shape == (1, 1, 4, 4, 8)
    # heads=concat (the paper's code): exactly the layer's to_q / to_k / to_v projections of its input
    concat = make_sd(tiny_dir, layers=["up_blocks.2.*"], heads="concat")
    module = concat.unet.get_submodule(concat.layer_names[0])
    seen = {}
    hooks = [getattr(module, f"to_{r}").register_forward_hook(lambda m, a, out, r=r: seen.__setitem__(r, out))
             for r in "qkv"]
    try:
        (f, *_) = concat(images(1, TINY_SD_INPUT), torch.Generator().manual_seed(0))
    finally:
        for hk in hooks:
            hk.remove()
    assert f.q.shape == (1, 1, 8, 8, 16)
    for r in "qkv":
        assert torch.allclose(getattr(f, r).reshape(1, 64, 16), seen[r].float(), atol=1e-5)
    with pytest.raises(ValueError, match="no layer selected"):
        make_sd(tiny_dir, layers=["up_blocks.2.*"], max_grid=4)


def test_sd_never_hooks_cross_attention(tiny_dir):
    backbone = make_sd(tiny_dir, layers=None, max_grid=None)
    hooked = {id(m) for m in backbone._capture.layers.values()}
    for name, module in backbone.unet.named_modules():
        if name.endswith("attn2"):
            assert module.is_cross_attention
            assert id(module) not in hooked
    assert all(n.endswith("attn1") for n in backbone.layer_names)


@pytest.mark.parametrize("variant", ["sd", "sd2", "sdxl"])
def test_sd_hooks_reproduce_the_attention_output(tiny_dir, variant):
    """softmax(q kᵀ·scale) v from the captured q, k, v, heads merged and through ``to_out``,
    equals the output of every ``attn1`` module."""
    backbone = make_sd(tiny_dir, layers=None, max_grid=None, compute_attn=True, model=variant)
    unet = backbone.unet
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 200])
    modules = backbone._attn1
    outputs = {}
    handles = [m.register_forward_hook(lambda m, a, o, n=n: outputs.__setitem__(n, o)) for n, m in modules.items()]
    with torch.no_grad(), AttentionCapture(modules) as capture:
        unet(latents, t, **backbone.unet_conditioning(2))
    for handle in handles:
        handle.remove()
    for name, module in modules.items():
        call = capture.outputs[name]
        assert call.q.shape[1] == module.heads and call.scale == module.scale
        probs = attention_probs(call.q, call.k, call.scale)
        merged = (probs @ call.v).transpose(1, 2).flatten(2)
        with torch.no_grad():
            out = module.to_out[1](module.to_out[0](merged))
        assert torch.allclose(out, outputs[name], atol=1e-5), name


def test_sd2_reads_its_v_prediction_scheduler_and_noises_as_ddpm(tiny_dir):
    """SD 2.x (768-v) predicts v; its inputs are noised as any DDPM's: the same betas give the same
    noised latents as SD 1.x's schedule, whatever the prediction type."""
    sd2 = make_sd(tiny_dir, model="sd2", max_grid=4)
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    sd1 = make_sd(tiny_dir, max_grid=4)
    z, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([5, 250])
    assert torch.allclose(sd2.scheduler.add_noise(z, noise, t), sd1.scheduler.add_noise(z, noise, t))
    assert {n.split(".attentions")[0] for n in sd2.layer_names} == {"mid_block", "up_blocks.1"}


def test_sdxl_conditions_on_both_text_encoders_empty_prompt(tiny_dir):
    """The added conditioning SDXL's pipelines give the empty prompt: both encoders' penultimate
    hidden states side by side, the second encoder's pooled projection, the size/crop time ids."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    backbone = make_sd(tiny_dir, model="sdxl", max_grid=None)
    folder = tiny_dir("sdxl")
    ids = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")("", padding="max_length", max_length=16,
                                                                      return_tensors="pt").input_ids
    with torch.no_grad():
        first = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")(ids, output_hidden_states=True)
        second = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")(
            ids, output_hidden_states=True)
    expected = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    assert torch.allclose(backbone.prompt_embedding, expected, atol=1e-6)
    assert torch.allclose(backbone.pooled_embedding, second.text_embeds, atol=1e-6)
    assert backbone.time_ids.tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]
    assert not any(n.startswith("text") for n, _ in backbone.named_modules())
    conditioning = backbone.unet_conditioning(3)
    assert conditioning["added_cond_kwargs"]["time_ids"].shape == (3, 6)
    features = backbone(images(2, TINY_SD_INPUT), generator=torch.Generator().manual_seed(0))
    assert [f.grid for f in features] == [(2, 2)] * 6 + [(4, 4)] * 2  # mid and up blocks; no 8x8 attention
    half = make_sd(tiny_dir, model="sdxl", dtype="float16")  # its VAE asks for float32
    assert half.vae.dtype == torch.float32 and half.unet.dtype == torch.float16


def test_sd_timestep_schedules():
    from ldsc.features.backbones.sd import schedule_timesteps

    def sequence(schedule, steps=7, **kw):
        return [schedule_timesteps(schedule, s, 1, 0, 100, 5, **kw).item() for s in range(steps)]

    assert sequence("constant") == [50] * 7
    assert sequence("increasing") == [0, 25, 50, 75, 100, 100, 100]
    assert sequence("decreasing") == [100, 75, 50, 25, 0, 0, 0]
    assert sequence("cyclic", steps=10) == [0, 25, 50, 75, 100, 75, 50, 25, 0, 25]
    draws = [schedule_timesteps("random", 0, 64, 10, 20, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert draws[0].min() >= 10 and draws[0].max() <= 20 and len(draws[0].unique()) > 5
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    with pytest.raises(ValueError):
        schedule_timesteps("sometimes", 0, 1, 0, 10)


def test_sd_schedule_state_and_reproducibility(tiny_dir):
    x = images(2, TINY_SD_INPUT)
    increasing = make_sd(tiny_dir, max_grid=4, schedule="increasing", t_min=0, t_max=90, schedule_steps=4)
    seen = [increasing(x)[0].timestep.tolist() for _ in range(5)]
    assert seen == [[0, 0], [30, 30], [60, 60], [90, 90], [90, 90]] and increasing.step == 5

    def run(seed, **kw):
        backbone = make_sd(tiny_dir, max_grid=4, **kw)
        return backbone(x, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    for fa, fb in zip(a, b):
        assert torch.equal(fa.q, fb.q) and torch.equal(fa.timestep, fb.timestep)
    assert not torch.equal(a[0].v, c[0].v)
    s1, s2 = run(3, latent="sample"), run(3, latent="sample")
    assert torch.equal(s1[0].k, s2[0].k) and not torch.equal(s1[0].k, run(3)[0].k)


def test_sd_parts_and_frozen(tiny_dir, tmp_path):
    backbone = make_sd(tiny_dir, max_grid=4)
    backbone.train()
    assert backbone.prompt_embedding.shape == (1, 16, 32)
    assert backbone.vae.decoder is None
    assert not any(n.startswith("text") for n, _ in backbone.named_modules())
    assert_frozen(backbone, backbone(images(1, TINY_SD_INPUT), generator=torch.Generator().manual_seed(0)))

    # a model folder without scheduler/ falls back to SD's DDPM schedule
    no_scheduler = tmp_path / "sd"
    no_scheduler.mkdir()
    for part in ("vae", "unet", "text_encoder", "tokenizer"):
        os.symlink(os.path.join(tiny_dir("sd"), part), no_scheduler / part)
    from ldsc.features.backbones.sd import StableDiffusionBackbone

    other = StableDiffusionBackbone(str(no_scheduler), input_size=TINY_SD_INPUT, max_grid=4)
    assert torch.allclose(other.scheduler.alphas_cumprod, backbone.scheduler.alphas_cumprod)


# --------------------------------------------------------------------------------------------
# missing weights


@pytest.mark.parametrize("name", ["sd", "sdxl", "dit", "hf"])
@pytest.mark.parametrize("model_id", ["nobody-here/no-such-model", "/no/such/local/dir"])
def test_missing_weights_fail_fast_with_one_sentence(monkeypatch, tmp_path, name, model_id):
    from ldsc.features.backbones.dit import DiffusionTransformerBackbone
    from ldsc.features.backbones.sd import StableDiffusionBackbone, StableDiffusionXLBackbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    cls = {"sd": StableDiffusionBackbone, "sdxl": StableDiffusionXLBackbone, "dit": DiffusionTransformerBackbone,
           "hf": vit_class("hf")}[name]
    with pytest.raises(WeightsNotFoundError) as info:
        cls(model_id, cache_dir=str(tmp_path))
    message = str(info.value)
    assert f"'{model_id}'" in message and "\n" not in message
    if model_id.startswith("/"):
        assert "does not exist" in message
    else:  # a hub id: where it was looked for and how to get it
        assert str(tmp_path) in message and "hf download" in message
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("cause,expected", [
    ("empty folder", "not a model saved by save_pretrained"),
    ("corrupt weights", "corrupt or truncated"),
    ("gated", "gated repository"),
])
def test_weight_loading_errors_name_their_cause(tiny_dir, tmp_path, monkeypatch, cause, expected):
    import shutil

    model_id = tmp_path / "clip"
    if cause == "empty folder":
        model_id.mkdir()
    else:
        shutil.copytree(tiny_dir("clip"), model_id)
    if cause == "corrupt weights":
        weights, = model_id.glob("*.safetensors")
        weights.write_bytes(weights.read_bytes()[:64])
    if cause == "gated":
        from transformers import CLIPVisionModel

        def gated(*args, **kwargs):  # what transformers raises for a gated repository without access
            raise OSError("You are trying to access a gated repo.\nMake sure to have access to it at "
                          "https://huggingface.co/openai/x.")
        monkeypatch.setattr(CLIPVisionModel, "from_pretrained", gated)
    with pytest.raises(WeightsNotFoundError, match=expected):
        vit_class("clip")(str(model_id))


@pytest.mark.parametrize("model_name,options,expected", [
    ("vit_no_such_model", {}, "is not a timm model name"),
    ("local-dir:/no/such/folder", {}, "the folder does not exist"),
    ("vit_small_patch16_224", {"checkpoint": "/no/such/weights.pth"}, "is not a file"),
    ("vit_small_patch16_224.augreg_in21k", {}, r"hf download timm/vit_small_patch16_224.augreg_in21k"),
])
def test_timm_weights_that_cannot_be_loaded_are_one_sentence(monkeypatch, tmp_path, model_name, options, expected):
    require_timm()
    from huggingface_hub import constants

    from ldsc.features.backbones.timm_vit import TimmBackbone

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match=expected) as info:
        TimmBackbone(model_name, **options)
    assert "\n" not in str(info.value)


def test_timm_local_checkpoint_file_is_loaded(tmp_path):
    """``checkpoint=`` a weights file for the named architecture: the saved weights are used (the
    features differ from another random draw's and equal a second load's)."""
    from safetensors.torch import save_file

    timm = require_timm()
    from ldsc.features.backbones.timm_vit import TimmBackbone

    torch.manual_seed(1)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    save_file(source.state_dict(), tmp_path / "weights.safetensors")
    a = TimmBackbone("vit_tiny_patch16_224", checkpoint=str(tmp_path / "weights.safetensors"), input_size=32, layers=[0])
    b = TimmBackbone("vit_tiny_patch16_224", checkpoint=str(tmp_path / "weights.safetensors"), input_size=32, layers=[0])
    assert torch.equal(a.model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    x = images(1, 32)
    assert a.grid == (2, 2) and torch.equal(a(x)[0].q, b(x)[0].q)


# --------------------------------------------------------------------------------------------
# diffusion transformers: SD3, FLUX, PixArt


def make_dit(tiny_dir, name: str, **kwargs):
    from ldsc.features.backbones.dit import DiffusionTransformerBackbone

    kwargs.setdefault("input_size", TINY_SD_INPUT)
    return DiffusionTransformerBackbone(tiny_dir(name), **kwargs)


@pytest.mark.parametrize("name,image_first,layers", [
    ("sd3", True, ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn"]),
    ("flux", False, ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]),
    ("pixart", True, ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]),
])
def test_dit_capture_reproduces_the_models_attention(tiny_dir, name, image_first, layers):
    """For every captured layer, softmax(q kᵀ · scale) v of the captured q, k, v (heads merged),
    restricted to the image tokens, is what the model passes on: the input of its output projection
    (``to_out[0]``), or, for FLUX's single-stream blocks (no output projection), the attention's own
    output. A forgotten QK-norm or rotary step, a wrong head split or text tokens taken for image
    tokens fail here. Cross-attention (PixArt's attn2) is not captured, and the image tokens'
    place in the joint layers (FLUX: after the text) is found, not assumed."""
    backbone = make_dit(tiny_dir, name)
    assert backbone.layer_names == layers and backbone.image_first == image_first
    x = images(2, TINY_SD_INPUT)
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([100, 200])
    z_t = backbone.noised_latents(x, t, gen)
    passed_on, handles = {}, []
    for n in layers:
        module = backbone.found[n].module
        if getattr(module, "to_out", None) is not None:
            handles.append(module.to_out[0].register_forward_hook(lambda m, a, o, n=n: passed_on.__setitem__(n, a[0])))
        else:
            handles.append(module.register_forward_hook(lambda m, a, o, n=n: passed_on.__setitem__(n, o)))
    try:
        with torch.no_grad(), AttentionCapture({n: backbone.found[n].module for n in layers}) as capture:
            backbone.transformer(**backbone.transformer_inputs(z_t, t))
    finally:
        for handle in handles:
            handle.remove()
    n_image = 16
    for n in layers:
        call = capture.outputs[n]
        out = (attention_probs(call.q, call.k, call.scale) @ call.v.float()).transpose(1, 2).flatten(2)
        offset = 0 if image_first else backbone.text_tokens[n]
        reference = passed_on[n]
        if reference.shape[1] != n_image:  # (the whole sequence: FLUX's single-stream output)
            reference = reference[:, offset:offset + n_image]
        assert torch.allclose(out[:, offset:offset + n_image], reference, atol=1e-5), n
    features = backbone(x, generator=torch.Generator().manual_seed(0))
    for f, n in zip(features, layers):
        assert f.grid == (4, 4) and f.timestep.shape == (2,)


def test_dit_noising_follows_each_family(tiny_dir):
    """Rectified flow (SD3, FLUX): x_t = (1 - t/1000) z + (t/1000) ε; PixArt: the DDPM's add_noise.
    The same generator gives the same timesteps, noise and features (runs reproduce)."""
    sd3 = make_dit(tiny_dir, "sd3", layers=[0])
    assert sd3.flow and sd3.num_train_timesteps == 1000
    x, t = images(1, TINY_SD_INPUT), torch.tensor([0])
    clean = sd3.noised_latents(x, t, torch.Generator().manual_seed(0))
    assert torch.allclose(sd3.noised_latents(x, torch.tensor([999]), torch.Generator().manual_seed(0)),
                          0.001 * clean + 0.999 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0)),
                          atol=1e-5)
    pixart = make_dit(tiny_dir, "pixart", layers=[0])
    assert not pixart.flow
    a = pixart(x, generator=torch.Generator().manual_seed(3))
    b = pixart(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0].q, b[0].q) and torch.equal(a[0].timestep, b[0].timestep)


def test_dit_refuses_a_unet_folder_in_one_sentence(tiny_dir):
    with pytest.raises(WeightsNotFoundError, match="holds a UNet2DConditionModel; backbone=dit reads"):
        make_dit(tiny_dir, "sd")
