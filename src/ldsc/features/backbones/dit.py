"""Diffusion transformers from diffusers as a frozen backbone (``backbone=dit``): Stable Diffusion 3 /
3.5 (``SD3Transformer2DModel``), PixArt-α/Σ (``PixArtTransformer2DModel``) and FLUX
(``FluxTransformer2DModel``).

One forward pass per batch, as for the UNet (:mod:`ldsc.features.backbones.sd`)::

    image (B,3,S,S) in [0,1] ─ resize to input_size, scale to [-1,1]
      → VAE encoder → latent mean (or a sample), shifted and scaled as the pipeline does
      → noised at timesteps t from a schedule over [t_min, t_max] (of num_train_timesteps):
          rectified flow (SD3, FLUX): x_t = (1 - σ) z + σ ε with σ = t / num_train_timesteps
          DDPM (PixArt): the scheduler's betas, as for Stable Diffusion
      → one transformer pass conditioned on the empty prompt
      → q/k/v of the image tokens of every self- or joint-attention layer.

What each layer compares is read where it hands q, k, v to ``scaled_dot_product_attention``
(:class:`~ldsc.features.backbones.capture.AttentionCapture`): after the QK-normalisation (SD3.5,
FLUX) and the rotary embedding (FLUX) the model applies. Joint attention (SD3's and FLUX's
double-stream blocks, FLUX's single-stream blocks) compares image and text tokens together; the
text tokens are dropped. Whether they come before the image tokens (FLUX) or after them (SD3) is
found at construction, not assumed: a probe batch of two items that differ only in their text
conditioning leaves the image tokens' queries of the first joint layer unchanged and changes the
text tokens'. Cross-attention (PixArt's ``attn2``: keys from the text only) is never captured.

The empty prompt is embedded once, at construction, by the model's own pipeline
(``encode_prompt("")`` of ``StableDiffusion3Pipeline`` / ``FluxPipeline`` / ``PixArtAlphaPipeline``,
loaded without transformer and VAE); the text encoders are then dropped. A pipeline saved without
its T5 encoder (SD3's ``text_encoder_3=None``) gets the pipeline's own zeros for that part.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from ldsc.features.backbones.base import Backbone, LayerFeatures, WeightsNotFoundError
from ldsc.features.backbones.capture import AttentionCapture, find_attention_layers
from ldsc.features.backbones.hooks import grid_features, select_layers
from ldsc.features.backbones.loading import load_pretrained, read_config_file, resolve_dtype
from ldsc.features.backbones.sd import _randn, check_diffusion_options, schedule_timesteps

log = logging.getLogger(__name__)

#: the transformer classes read, and the family that says how to feed each
FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux", "PixArtTransformer2DModel": "pixart"}


class DiffusionTransformerBackbone(Backbone):
    """Frozen SD3 / PixArt / FLUX transformer behind the backbone protocol.

    Args:
        model_id: hub id or local folder in the layout of the diffusers pipelines
            (``transformer/ vae/ scheduler/`` plus the text encoders and tokenizers).
        layers: which attention layers to capture: indices into the self/joint-attention layers
            in execution order, or glob patterns over their module paths
            (``transformer_blocks.*``, ``single_transformer_blocks.1?.attn``); ``None``: all.
        heads, token_stride, dtype, cache_dir, compute_attn, draws: as for ``backbone=sd``.
        input_size: square image side (a multiple of the VAE factor × 2).
        t_min, t_max, schedule, schedule_steps, latent: as for ``backbone=sd``; ``t`` counts in the
            scheduler's ``num_train_timesteps`` (1000).
        guidance: the guidance value fed to guidance-distilled models (FLUX.1-dev's
            ``guidance_embeds``); unused by the others.
    """

    name = "dit"

    def __init__(
        self,
        model_id: str = "stabilityai/stable-diffusion-3.5-medium",
        layers=None,
        heads: str = "keep",
        token_stride: int = 1,
        input_size: int = 1024,
        t_min: int = 0,
        t_max: int = 250,
        schedule: str = "random",
        schedule_steps: int = 100,
        latent: str = "mean",
        guidance: float = 3.5,
        dtype: str = "float32",
        cache_dir: str | None = None,
        compute_attn: bool = False,
        draws: int = 1,
        resize: int | None = None,
        crop: int | None = None,
    ):
        super().__init__()
        self.set_view(resize, crop)
        import diffusers
        from diffusers import AutoencoderKL

        check_diffusion_options(heads, token_stride, schedule, latent, t_min, t_max)
        self.draws = int(draws)
        self.model_id = str(model_id)
        self.input_size = int(input_size)
        self.t_min, self.t_max = int(t_min), int(t_max)
        self.schedule, self.schedule_steps = schedule, int(schedule_steps)
        self.latent, self.guidance = latent, float(guidance)
        self.head_mode, self.token_stride, self.compute_attn = heads, int(token_stride), bool(compute_attn)
        self.dtype = resolve_dtype(dtype)
        #: number of batches processed so far: the state of the deterministic schedules
        self.step = 0

        load = dict(cache_dir=cache_dir)
        kind = self.transformer_class(self.model_id, cache_dir)
        if kind not in FAMILIES:
            raise WeightsNotFoundError(f"'{self.model_id}' holds a {kind}; backbone=dit reads "
                                       f"{', '.join(FAMILIES)} (a UNet: backbone=sd or sdxl).")
        self.family = FAMILIES[kind]
        self.transformer = load_pretrained(getattr(diffusers, kind), self.model_id, subfolder="transformer",
                                           torch_dtype=self.dtype, **load)
        self.vae = load_pretrained(AutoencoderKL, self.model_id, subfolder="vae", torch_dtype=self.dtype, **load)
        self.vae.decoder = None  # only the encoder is used
        self.vae.post_quant_conv = None
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.patch = 2 if self.family == "flux" else int(self.transformer.config.patch_size)  # FLUX packs 2x2 latents
        if self.input_size % (self.vae_factor * self.patch):
            raise ValueError(f"input_size {self.input_size} is not a multiple of {self.vae_factor * self.patch} "
                             f"(VAE factor {self.vae_factor} x patch {self.patch})")
        self._load_scheduler(load)
        self._load_text_conditioning(load)
        self.freeze()
        self._find_layers(layers)

    # -- construction ------------------------------------------------------------------------
    @staticmethod
    def transformer_class(model_id: str, cache_dir: str | None) -> str:
        """The diffusers class named by ``transformer/config.json`` (local folder or cache)."""
        from diffusers import AutoModel

        config = read_config_file(model_id, "transformer/config.json", cache_dir)
        unet = read_config_file(model_id, "unet/config.json", cache_dir) if config is None else None
        if unet is not None:
            return str(unet.get("_class_name", "UNet"))
        if config is None:  # not local: let the library fetch the config (or say why it cannot)
            config = load_pretrained(AutoModel, model_id, subfolder="transformer", weights=False, cache_dir=cache_dir,
                                     method="load_config")
        return str(config.get("_class_name", "an unknown model"))

    def _load_scheduler(self, load: dict) -> None:
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

        self.flow = self.family in ("sd3", "flux")
        cls = FlowMatchEulerDiscreteScheduler if self.flow else DDPMScheduler
        try:  # (a pipeline's DPM-Solver or Euler config: the noising only needs its betas / length)
            self.scheduler = load_pretrained(cls, self.model_id, subfolder="scheduler", weights=False, **load)
        except WeightsNotFoundError:
            self.scheduler = cls()
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        if self.t_max >= self.num_train_timesteps:
            raise ValueError(f"t_max={self.t_max} must be below num_train_timesteps={self.num_train_timesteps}")

    def _load_text_conditioning(self, load: dict) -> None:
        """The empty prompt through the model's own pipeline (text encoders only), then dropped."""
        from diffusers import DiffusionPipeline

        pipe = load_pretrained(DiffusionPipeline, self.model_id, weights=False, transformer=None, vae=None,
                               torch_dtype=self.dtype, **load)
        with torch.no_grad():
            if self.family == "sd3":
                embeds, _, pooled, _ = pipe.encode_prompt("", None, None, device="cpu",
                                                          do_classifier_free_guidance=False)
                self.register_buffer("pooled_embedding", pooled.to(self.dtype), persistent=False)
            elif self.family == "flux":
                embeds, pooled, text_ids = pipe.encode_prompt("", None, device="cpu")
                self.register_buffer("pooled_embedding", pooled.to(self.dtype), persistent=False)
                self.register_buffer("text_ids", text_ids.to(self.dtype), persistent=False)
            else:
                embeds, mask, _, _ = pipe.encode_prompt("", do_classifier_free_guidance=False, device="cpu")
                self.register_buffer("prompt_mask", mask, persistent=False)
        self.register_buffer("prompt_embedding", embeds.to(self.dtype), persistent=False)
        del pipe

    def _find_layers(self, layers) -> None:
        """Self/joint-attention layers (probe pass at a 2x2 token grid), the image tokens' place in
        the joint ones, and the selection."""
        side = 2 * self.patch  # latent side of a 2x2 token grid
        channels = int(self.vae.config.latent_channels)
        z = torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(0)).to(self.dtype).repeat(2, 1, 1, 1)
        t = torch.full((2,), self.t_max, dtype=torch.long)
        # two items that differ only in their text conditioning
        conditioning = self.transformer_inputs(z, t, text_scale=torch.tensor([1.0, -1.0]))
        found = find_attention_layers(self.transformer, lambda: self.transformer(**conditioning))
        kept = [f for f in found if f.q_shape[2] == f.k_shape[2] and not getattr(f.module, "is_cross_attention", False)]
        if not kept:
            raise ValueError(f"'{self.model_id}' has no self-attention layer that calls scaled_dot_product_attention")
        self.found = {f.path: f for f in kept}
        self.text_tokens = {f.path: f.q_shape[2] - 4 for f in kept}
        joint = [f for f in kept if self.text_tokens[f.path] > 0]
        self.image_first = True
        if joint:
            with AttentionCapture({joint[0].path: joint[0].module}, stop_early=True) as capture:
                with torch.no_grad():
                    self.transformer(**conditioning)
            q = capture.take()[joint[0].path].q  # (2, heads, 4 + text, d)
            changed = (q[0] - q[1]).abs().amax(dim=(0, 2)) > 1e-4 * q.abs().amax()
            if bool(changed[:4].any()) == bool(changed[-4:].any()):
                raise RuntimeError(f"'{self.model_id}': cannot tell the image tokens of {joint[0].path} from its text tokens")
            self.image_first = not bool(changed[:4].any())
        self.layer_names = select_layers(list(self.found), layers)
        self._capture = AttentionCapture({n: self.found[n].module for n in self.layer_names}, stop_early=True)

    # -- inputs ------------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        side = self.input_size // (self.vae_factor * self.patch)
        return side, side

    def transformer_inputs(self, z_t: Tensor, t: Tensor, text_scale: Tensor | None = None) -> dict:
        """The transformer's keyword inputs for noised latents ``z_t`` ``(B, C, h, w)`` at timesteps
        ``t``, as the family's pipeline passes them (``text_scale``: per-item factors on the text
        states, for the construction probe only)."""
        batch = z_t.shape[0]
        text = self.prompt_embedding.expand(batch, -1, -1)
        if text_scale is not None:
            text = text * text_scale.view(-1, 1, 1).to(text) + (text_scale.view(-1, 1, 1).to(text) - 1)
        if self.family == "sd3":
            return dict(hidden_states=z_t, encoder_hidden_states=text, timestep=t.to(self.dtype),
                        pooled_projections=self.pooled_embedding.expand(batch, -1))
        if self.family == "flux":
            from diffusers import FluxPipeline

            b, c, h, w = z_t.shape
            guidance = (torch.full((batch,), self.guidance, device=z_t.device)
                        if self.transformer.config.guidance_embeds else None)
            return dict(hidden_states=FluxPipeline._pack_latents(z_t, b, c, h, w), encoder_hidden_states=text,
                        pooled_projections=self.pooled_embedding.expand(batch, -1),
                        timestep=t.to(self.dtype) / self.num_train_timesteps,
                        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, z_t.device, self.dtype),
                        txt_ids=self.text_ids, guidance=guidance)
        added = {"resolution": None, "aspect_ratio": None}
        if self.transformer.use_additional_conditions:
            side = float(self.input_size)
            added = {"resolution": torch.tensor([[side, side]], dtype=self.dtype).expand(batch, -1),
                     "aspect_ratio": torch.ones(batch, 1, dtype=self.dtype)}
        return dict(hidden_states=z_t, encoder_hidden_states=text, timestep=t,
                    encoder_attention_mask=self.prompt_mask.expand(batch, -1), added_cond_kwargs=added)

    def noised_latents(self, images: Tensor, t: Tensor, generator: torch.Generator | None) -> Tensor:
        """VAE latents of ``images`` noised to timesteps ``t`` (rectified flow or DDPM)."""
        device = self.prompt_embedding.device
        x = images.to(device, torch.float32)
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True,
                              align_corners=False)
        posterior = self.vae.encode((2 * x - 1).to(self.dtype)).latent_dist
        noise = _randn(posterior.mean.shape, generator, device, self.dtype)
        z = posterior.mean
        if self.latent == "sample":
            z = z + posterior.std * _randn(z.shape, generator, device, self.dtype)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = ((z - shift) * self.vae.config.scaling_factor).to(self.dtype)
        if self.flow:
            sigma = (t.to(device, torch.float32) / self.num_train_timesteps).view(-1, 1, 1, 1)
            return ((1 - sigma) * z.float() + sigma * noise.float()).to(self.dtype)
        return self.scheduler.add_noise(z, noise, t.to(device))

    # -- forward -----------------------------------------------------------------------------
    def extract(self, images: Tensor, generator: torch.Generator | None = None) -> list[LayerFeatures]:
        batch = images.shape[0]
        t = schedule_timesteps(self.schedule, self.step, batch, self.t_min, self.t_max, self.schedule_steps,
                               generator).to(self.prompt_embedding.device)
        z_t = self.noised_latents(images, t, generator)
        with self._capture as capture:
            self.transformer(**self.transformer_inputs(z_t, t))
        calls = capture.take()
        self.step += 1
        h, w = self.grid
        return [
            grid_features(name, calls[name], (h, w), offset=0 if self.image_first else self.text_tokens[name],
                          head_mode=self.head_mode, token_stride=self.token_stride,
                          compute_attn=self.compute_attn, timestep=t)
            for name in self.layer_names
        ]

    def describe_layers(self) -> list[dict]:
        h, w = self.grid
        return [dict(name=name, grid=f"{h}x{w}", heads=f.q_shape[1], head_dim=f.q_shape[3],
                     dropped=self.text_tokens[name], captured=name in self.layer_names)
                for name, f in self.found.items()]
