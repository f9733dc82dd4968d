"""Stable Diffusion's UNet self-attention as a frozen backbone (the paper's main network).

One forward pass per batch::

    image (B,3,S,S) in [0,1] ─ resize to input_size, scale to [-1,1]
      → VAE encoder → latent mean (or a sample) × vae.config.scaling_factor
      → DDPM forward noising at timesteps t from a schedule over [t_min, t_max]
      → one UNet pass conditioned on the empty prompt
      → q/k/v of the self-attention (``attn1``) of the selected transformer blocks.

Cross-attention (``attn2``) is never captured: its keys and values come from the text, not the
image. The UNet stops as soon as the last selected layer has run.

The model directory has the layout of the diffusers pipelines on the hub (``vae/``, ``unet/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``). The text encoder and tokenizer are used once,
at construction, to embed the empty prompt and are then dropped; the VAE decoder is dropped too.

Timestep schedules (``schedule``), with ``s`` the number of batches seen so far
(:attr:`StableDiffusionBackbone.step`, 0 at the start) and ``P = schedule_steps``:

* ``random``: every image gets its own ``t`` drawn uniformly from the integers
  ``t_min … t_max`` (the paper's choice).
* ``constant``: every image, every batch: ``t = round((t_min + t_max) / 2)``.
* ``increasing``: ``t`` sweeps linearly from ``t_min`` (batch 0) to ``t_max`` (batch ``P-1``),
  then stays at ``t_max``.
* ``decreasing``: the reverse sweep, ``t_max`` → ``t_min``, then stays at ``t_min``
  (coarse structure first, as in sampling).
* ``cyclic``: a triangle wave, up from ``t_min`` to ``t_max`` in ``P-1`` batches, back down in
  ``P-1`` more, and so on.

The deterministic schedules give all images of a batch the same ``t``. All randomness
(``random`` timesteps, then the noise, then a latent sample if ``latent="sample"``) is drawn
from the ``generator`` passed to ``forward``, in that order, so a run reproduces exactly; a
resumed run must also restore :attr:`step`.
"""

from __future__ import annotations

import logging
import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldsc.features.backbones.base import Backbone, LayerFeatures, WeightsNotFoundError, check_capture_options
from ldsc.features.backbones.capture import AttentionCapture
from ldsc.features.backbones.hooks import grid_features, select_layers
from ldsc.features.backbones.loading import load_pretrained, resolve_dtype

log = logging.getLogger(__name__)

SCHEDULES = ("random", "constant", "increasing", "decreasing", "cyclic")

#: DDPM noise schedule of Stable Diffusion v1, used when the model has no scheduler/ config
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False
)


def schedule_timesteps(
    schedule: str,
    step: int,
    batch_size: int,
    t_min: int,
    t_max: int,
    schedule_steps: int = 100,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The ``(batch_size,)`` int64 timesteps of batch number ``step`` (see the module docstring)."""
    if schedule == "random":
        device = generator.device if generator is not None else "cpu"
        return torch.randint(t_min, t_max + 1, (batch_size,), generator=generator, device=device).cpu()
    if schedule == "constant":
        t = (t_min + t_max) / 2
    elif schedule in ("increasing", "decreasing", "cyclic"):
        period = max(int(schedule_steps) - 1, 1)
        if schedule == "cyclic":
            phase = step % (2 * period)
            frac = phase / period if phase <= period else 2 - phase / period
        else:
            frac = min(step, period) / period
            frac = frac if schedule == "increasing" else 1 - frac
        t = t_min + frac * (t_max - t_min)
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return torch.full((batch_size,), int(round(t)), dtype=torch.long)


def check_diffusion_options(heads: str, token_stride: int, schedule: str, latent: str, t_min: int, t_max: int) -> None:
    """Validate the options every diffusion backbone takes (``sd``, ``sdxl``, ``dit``)."""
    check_capture_options(heads, token_stride)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if latent not in ("mean", "sample"):
        raise ValueError(f"latent must be 'mean' or 'sample', got {latent!r}")
    if not 0 <= int(t_min) <= int(t_max):
        raise ValueError(f"need 0 <= t_min <= t_max, got t_min={t_min}, t_max={t_max}")


def _randn(shape, generator: torch.Generator | None, device, dtype) -> Tensor:
    """Standard normal noise drawn on the generator's device, then moved (so a CPU generator
    reproduces the same numbers whatever device the model is on)."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device).to(device, dtype)


def _block_order(name: str) -> tuple[int, int]:
    """Execution order of UNet blocks: down blocks, mid block, up blocks (named_modules lists
    the up blocks before the mid block)."""
    match = re.match(r"(down_blocks|mid_block|up_blocks)(?:\.(\d+))?", name)
    if match is None:
        return (3, 0)
    return ({"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[match.group(1)], int(match.group(2) or 0))


class StableDiffusionBackbone(Backbone):
    """Frozen Stable Diffusion (v1 layout) behind the backbone protocol.

    Args:
        model_id: hub id or local directory with ``vae/ unet/ text_encoder/ tokenizer/ scheduler/``.
        layers: which ``attn1`` layers to capture: indices into the UNet's self-attention layers
            in execution order, or glob patterns over their names
            (``up_blocks.1.attentions.0.transformer_blocks.0.attn1``). Default: mid and up blocks.
        max_grid: skip layers whose token grid side exceeds this at ``input_size`` (``None``:
            no limit). 32 drops SD's 64×64 layers at 512 px, as the paper does.
        heads: ``"keep"`` (a graph per head), ``"mean"`` (average q/k/v over heads) or ``"concat"``
            (the heads side by side, as the paper's code compares them).
        token_stride: keep every n-th token along each axis.
        input_size: square image side fed to the VAE (multiple of 8 × 2^(UNet levels - 1)).
        t_min, t_max: timestep range (inclusive), in DDPM training steps.
        schedule: ``random | constant | increasing | decreasing | cyclic`` (module docstring).
        schedule_steps: batches per sweep for the deterministic schedules.
        latent: ``"mean"`` (the VAE posterior mean) or ``"sample"`` (a draw from it).
        dtype: ``float32 | float16 | bfloat16``; features are returned in float32.
        cache_dir: Hugging Face cache directory (``None``: the default).
        compute_attn: also compute ``softmax(q kᵀ/√d)`` between the grid tokens (from the captured q and k; nothing extra is captured).
        resize, crop: which part of the image is fed (:class:`~ldsc.features.images.ImageView`):
            ``null``/``null`` squashes the whole image to ``input_size``; the paper's data-set
            code resizes the shorter side to 256, crops the centred 256 × 256 and upsamples to 512.
    """

    name = "sd"

    def __init__(
        self,
        model_id: str = "CompVis/stable-diffusion-v1-4",
        layers=("mid_block.*", "up_blocks.*"),
        max_grid: int | None = 32,
        heads: str = "keep",
        token_stride: int = 1,
        input_size: int = 512,
        t_min: int = 0,
        t_max: int = 250,
        schedule: str = "random",
        schedule_steps: int = 100,
        latent: str = "mean",
        dtype: str = "float32",
        cache_dir: str | None = None,
        compute_attn: bool = False,
        draws: int = 1,
        resize: int | None = None,
        crop: int | None = None,
    ):
        super().__init__()
        self.draws = int(draws)
        self.set_view(resize, crop)
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        check_diffusion_options(heads, token_stride, schedule, latent, t_min, t_max)
        self.model_id = str(model_id)
        self.input_size = int(input_size)
        self.t_min, self.t_max = int(t_min), int(t_max)
        self.schedule, self.schedule_steps = schedule, int(schedule_steps)
        self.latent = latent
        self.head_mode = heads
        self.token_stride = int(token_stride)
        self.compute_attn = bool(compute_attn)
        self.dtype = resolve_dtype(dtype)
        #: number of batches processed so far: the state of the deterministic schedules
        self.step = 0

        load = dict(cache_dir=cache_dir)
        self.vae = load_pretrained(AutoencoderKL, self.model_id, subfolder="vae", torch_dtype=self.dtype, **load)
        if self.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            # SDXL's VAE overflows in float16 (its config says so): loaded again in float32
            self.vae = load_pretrained(AutoencoderKL, self.model_id, subfolder="vae", torch_dtype=torch.float32, **load)
        self.vae.decoder = None  # only the encoder is used
        self.vae.post_quant_conv = None
        self.unet = load_pretrained(UNet2DConditionModel, self.model_id, subfolder="unet", torch_dtype=self.dtype, **load)
        try:
            self.scheduler = load_pretrained(DDPMScheduler, self.model_id, subfolder="scheduler", weights=False, **load)
        except WeightsNotFoundError:
            log.info("no scheduler config in '%s': using Stable Diffusion v1's DDPM noise schedule", self.model_id)
            self.scheduler = DDPMScheduler(**SD_SCHEDULER_CONFIG)
        if self.t_max >= self.scheduler.config.num_train_timesteps:
            raise ValueError(f"t_max={t_max} must be below num_train_timesteps={self.scheduler.config.num_train_timesteps}")
        prediction = self.scheduler.config.get("prediction_type", "epsilon")
        if prediction != "epsilon":  # SD 2.x 768-v: the model predicts v, but the noise is added the same way
            log.info("'%s' predicts %s; its inputs are noised as any DDPM's (only its output, unused here, differs)",
                     self.model_id, prediction)
        self.load_text_conditioning(load)

        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if self.input_size % self.vae_factor:
            raise ValueError(f"input_size {self.input_size} is not a multiple of the VAE factor {self.vae_factor}")
        attn1 = self.self_attention_layers(self.unet)
        picked = select_layers(list(attn1), layers)
        self.grids = {name: self.layer_grid(name) for name in attn1}
        self.layer_names = [n for n in picked if max_grid is None or max(self.grids[n]) <= int(max_grid)]
        if not self.layer_names:
            raise ValueError(
                f"no layer selected: layers={layers} picked {len(picked)} layers, none with a grid <= {max_grid} "
                f"at input_size {self.input_size} (grids: {sorted(set(self.grids[n] for n in picked))})"
            )
        self._attn1 = {n: attn1[n] for n in self.layer_names}
        self._capture = AttentionCapture(self._attn1, stop_early=True)
        self.freeze()

    # -- construction helpers ----------------------------------------------------------------
    def load_text_conditioning(self, load: dict) -> None:
        """Embed the empty prompt once (``prompt_embedding``: ``(1, L, D)`` text-encoder states,
        padded to the tokenizer length); the text encoder is not kept."""
        from transformers import CLIPTextModel

        states = self._encode_empty_prompt(CLIPTextModel, "text_encoder", "tokenizer", load)
        self.register_buffer("prompt_embedding", states[0].to(self.dtype), persistent=False)

    def _encode_empty_prompt(self, encoder_class, encoder_dir: str, tokenizer_dir: str, load: dict, **options):
        """The outputs of ``encoder_dir``'s text encoder on the empty prompt."""
        from transformers import CLIPTokenizer

        tokenizer = load_pretrained(CLIPTokenizer, self.model_id, subfolder=tokenizer_dir, weights=False, **load)
        text_encoder = load_pretrained(encoder_class, self.model_id, subfolder=encoder_dir, **load)
        ids = tokenizer(
            "", padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            return text_encoder(ids, **options)

    def unet_conditioning(self, batch: int) -> dict:
        """The UNet's keyword inputs besides the latents and timesteps, for a batch of ``batch``."""
        return {"encoder_hidden_states": self.prompt_embedding.expand(batch, -1, -1)}

    @staticmethod
    def self_attention_layers(unet: nn.Module) -> dict[str, nn.Module]:
        """``{name: module}`` of every ``attn1`` self-attention of the UNet, in execution order."""
        found = [
            (name, m)
            for name, m in unet.named_modules()
            if name.split(".")[-1] == "attn1" and hasattr(m, "to_q") and not getattr(m, "is_cross_attention", False)
        ]
        found.sort(key=lambda item: _block_order(item[0]))  # stable: keeps order within a block
        return dict(found)

    def layer_grid(self, name: str) -> tuple[int, int]:
        """Token grid ``(h, w)`` of layer ``name`` at ``input_size``: the latent halved (rounding
        up, as the stride-2 convolutions do) once per UNet level below the block's."""
        kind, index = _block_order(name)
        n_down = len(self.unet.down_blocks)
        level = {0: index, 1: n_down - 1, 2: len(self.unet.up_blocks) - 1 - index}[kind]
        side = self.input_size // self.vae_factor
        for _ in range(level):
            side = math.ceil(side / 2)
        return side, side

    def describe_layers(self) -> list[dict]:
        """Every ``attn1`` of the UNet in execution order, with its grid at ``input_size``; those
        left out by ``layers`` or ``max_grid`` are listed as not captured."""
        return [
            dict(name=name, grid="x".join(map(str, self.grids[name])), heads=int(module.heads),
                 head_dim=int(module.inner_dim // module.heads), dropped=0, captured=name in self._attn1)
            for name, module in self.self_attention_layers(self.unet).items()
        ]

    # -- forward -------------------------------------------------------------------------------
    def timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """``(B,)`` timesteps of the current batch (does not advance :attr:`step`)."""
        return schedule_timesteps(
            self.schedule, self.step, batch_size, self.t_min, self.t_max, self.schedule_steps, generator
        )

    def extract(self, images: Tensor, generator: torch.Generator | None = None) -> list[LayerFeatures]:
        device = self.prompt_embedding.device
        batch = images.shape[0]
        x = images.to(device, torch.float32)
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True, align_corners=False)
        x = (2 * x - 1).to(self.vae.dtype)

        t = self.timesteps(batch, generator).to(device)
        posterior = self.vae.encode(x).latent_dist
        noise = _randn(posterior.mean.shape, generator, device, self.dtype)
        if self.latent == "sample":
            z = posterior.mean + posterior.std * _randn(posterior.mean.shape, generator, device, posterior.mean.dtype)
        else:
            z = posterior.mean
        z = (z * self.vae.config.scaling_factor).to(self.dtype)
        z_t = self.scheduler.add_noise(z, noise, t)

        with self._capture as capture:
            self.unet(z_t, t, **self.unet_conditioning(batch))
        calls = capture.take()
        self.step += 1

        return [
            grid_features(name, calls[name], self.grids[name], head_mode=self.head_mode,
                          token_stride=self.token_stride, compute_attn=self.compute_attn, timestep=t)
            for name in self._attn1
        ]


class StableDiffusionXLBackbone(StableDiffusionBackbone):
    """Stable Diffusion XL's UNet self-attention (``backbone=sdxl``).

    As :class:`StableDiffusionBackbone`, with SDXL's conditioning for the empty prompt, computed
    once at construction as the SDXL pipelines compute it: the penultimate hidden states of both
    text encoders (``text_encoder``: CLIP ViT-L, ``text_encoder_2``: OpenCLIP ViT-bigG) concatenated
    along the feature axis (``encoder_hidden_states``), the pooled projection of ``text_encoder_2``
    (``text_embeds``) and the six "time ids" (original size, crop corner, target size: here
    ``input_size, input_size, 0, 0, input_size, input_size`` — an uncropped square image). The model
    folder has the layout of ``stabilityai/stable-diffusion-xl-base-1.0``.
    """

    name = "sdxl"

    def __init__(self, model_id: str = "stabilityai/stable-diffusion-xl-base-1.0", layers=("mid_block.*", "up_blocks.*"),
                 max_grid: int | None = 64, input_size: int = 1024, **kwargs):
        super().__init__(model_id, layers=layers, max_grid=max_grid, input_size=input_size, **kwargs)

    def load_text_conditioning(self, load: dict) -> None:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        first = self._encode_empty_prompt(CLIPTextModel, "text_encoder", "tokenizer", load, output_hidden_states=True)
        second = self._encode_empty_prompt(CLIPTextModelWithProjection, "text_encoder_2", "tokenizer_2", load,
                                           output_hidden_states=True)
        states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        side = float(self.input_size)
        time_ids = torch.tensor([[side, side, 0.0, 0.0, side, side]])
        self.register_buffer("prompt_embedding", states.to(self.dtype), persistent=False)
        self.register_buffer("pooled_embedding", second.text_embeds.to(self.dtype), persistent=False)
        self.register_buffer("time_ids", time_ids.to(self.dtype), persistent=False)

    def unet_conditioning(self, batch: int) -> dict:
        return {
            "encoder_hidden_states": self.prompt_embedding.expand(batch, -1, -1),
            "added_cond_kwargs": {"text_embeds": self.pooled_embedding.expand(batch, -1),
                                  "time_ids": self.time_ids.expand(batch, -1)},
        }
