"""Vision transformers from transformers: CLIP, DINO (``ViTModel``) and MAE (``ViTMAEModel``).

All three share one recipe (:class:`VisionTransformerBackbone`): normalise the image with the
model's own mean/std, run the encoder once with position encodings interpolated to the input
size, capture q/k/v of every selected self-attention layer by hooks on its projections, drop
the class token and lay the patch tokens out on their ``(h, w)`` grid. Layers are named
``layer.0`` … ``layer.{L-1}`` in depth order.

The subclasses only say which transformers class to load and which normalisation to fall back
on when the model directory carries no ``preprocessor_config.json``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ldsc.features.backbones.base import Backbone, LayerFeatures, check_capture_options
from ldsc.features.backbones.hooks import QKVCapture, attention_modules, grid_features, select_layers
from ldsc.features.backbones.loading import load_pretrained, read_config_file, resolve_dtype

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionTransformerBackbone(Backbone):
    """A frozen transformers ViT-style image encoder behind the backbone protocol.

    Args:
        model_id: hub id or local directory (``from_pretrained`` layout).
        layers: which self-attention layers to capture: ``None`` = all, indices (``[0, -1]``)
            or glob patterns over ``layer.<i>``.
        heads: ``"keep"`` (q/k/v per head) or ``"mean"`` (averaged over heads).
        token_stride: keep every n-th patch token along each axis.
        input_size: square input side in pixels; ``None`` = the pretrained ``image_size``.
            Must be a multiple of the patch size; other sizes interpolate the position encodings.
        dtype: ``float32``, ``float16`` or ``bfloat16`` — the network is cast to it; features
            are returned in float32.
        cache_dir: Hugging Face cache directory (``None`` = the default one).
        compute_attn: also return the softmax attention between grid tokens (see
            :func:`~ldsc.features.backbones.hooks.grid_features` for how the class token is handled).
    """

    name = "vit"
    #: transformers class to load, and extra ``from_pretrained`` arguments
    model_class_name: str = ""
    load_kwargs: dict = {}
    #: normalisation used when the model directory has no preprocessor_config.json
    default_mean: tuple[float, float, float] = IMAGENET_MEAN
    default_std: tuple[float, float, float] = IMAGENET_STD

    def __init__(
        self,
        model_id: str,
        layers=None,
        heads: str = "keep",
        token_stride: int = 1,
        input_size: int | None = None,
        dtype: str = "float32",
        cache_dir: str | None = None,
        compute_attn: bool = False,
        draws: int = 1,
    ):
        super().__init__()
        check_capture_options(heads, token_stride)
        self.draws = int(draws)
        self.model_id = str(model_id)
        self.head_mode = heads
        self.token_stride = int(token_stride)
        self.compute_attn = bool(compute_attn)
        self.dtype = resolve_dtype(dtype)

        self.model = self.load_model(self.model_id, cache_dir).to(self.dtype)
        config = self.model.config
        self.patch_size = int(config.patch_size)
        self.num_heads = int(config.num_attention_heads)
        self.input_size = int(input_size or config.image_size)
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size {self.input_size} is not a multiple of the patch size {self.patch_size}"
            )

        processor = read_config_file(self.model_id, "preprocessor_config.json", cache_dir) or {}
        mean = processor.get("image_mean", self.default_mean)
        std = processor.get("image_std", self.default_std)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

        found = attention_modules(self.model)
        all_names = [f"layer.{i}" for i in range(len(found))]
        modules = dict(zip(all_names, found.values()))
        self.layer_names = select_layers(all_names, layers)
        self._capture = QKVCapture({n: modules[n] for n in self.layer_names}, stop_early=True)
        self.freeze()

    # -- what subclasses change ------------------------------------------------------------
    def load_model(self, model_id: str, cache_dir: str | None):
        import transformers

        model_class = getattr(transformers, self.model_class_name)
        return load_pretrained(model_class, model_id, cache_dir=cache_dir, **self.load_kwargs)

    def encode(self, pixel_values: Tensor) -> None:
        """Run the encoder once (outputs are read from the hooks)."""
        self.model(pixel_values=pixel_values, interpolate_pos_encoding=True)

    # -- the shared recipe ------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid ``(h, w)`` before ``token_stride``."""
        side = self.input_size // self.patch_size
        return side, side

    def preprocess(self, images: Tensor) -> Tensor:
        """``(B, 3, S, S)`` in [0, 1] → normalised ``(B, 3, input_size, input_size)`` in the model dtype."""
        images = images.to(self.mean.device, torch.float32)
        if tuple(images.shape[-2:]) != (self.input_size, self.input_size):
            images = F.interpolate(
                images, size=(self.input_size, self.input_size), mode="bilinear", antialias=True, align_corners=False
            )
        return ((images - self.mean) / self.std).to(self.dtype)

    def extract(self, images: Tensor, generator: torch.Generator | None = None) -> list[LayerFeatures]:
        pixel_values = self.preprocess(images)
        with self._capture as capture:
            self.encode(pixel_values)
        outputs = capture.take()
        h, w = self.grid
        features = []
        for name in self.layer_names:
            captured = outputs[name]
            features.append(
                grid_features(
                    name,
                    captured,
                    self.num_heads,
                    (h, w),
                    n_prefix=captured["q"].shape[1] - h * w,
                    head_mode=self.head_mode,
                    token_stride=self.token_stride,
                    compute_attn=self.compute_attn,
                )
            )
        return features


class CLIPBackbone(VisionTransformerBackbone):
    """OpenAI CLIP image encoder (``CLIPVisionModel``; a full ``CLIPModel`` checkpoint loads too)."""

    name = "clip"
    model_class_name = "CLIPVisionModel"
    default_mean = OPENAI_CLIP_MEAN
    default_std = OPENAI_CLIP_STD


class DINOBackbone(VisionTransformerBackbone):
    """DINO ViT (``ViTModel``, e.g. ``facebook/dino-vitb8``); the pooler is not loaded."""

    name = "dino"
    model_class_name = "ViTModel"
    load_kwargs = {"add_pooling_layer": False}

    def __init__(self, model_id: str, input_size: int | None = 480, **kwargs):
        """``input_size`` 480 (60×60 tokens of ViT-B/8) as in the paper; position encodings are
        interpolated from the pretrained 224."""
        super().__init__(model_id, input_size=input_size, **kwargs)


class MAEBackbone(VisionTransformerBackbone):
    """Masked-autoencoder ViT encoder (``ViTMAEModel``) with masking switched off.

    ``ViTMAEModel`` always shuffles the patch tokens by ``argsort(noise)`` and keeps the first
    ``(1 - mask_ratio)`` of them. With ``mask_ratio = 0`` every token is kept, and passing
    ``noise = arange(N)`` makes the shuffle the identity, so the encoder sees (and the hooks
    capture) the tokens in grid order; construction checks this on the model's own
    ``random_masking``. It also keeps the global RNG untouched (the model would otherwise draw
    ``torch.rand``).
    """

    name = "mae"
    model_class_name = "ViTMAEModel"
    load_kwargs = {"mask_ratio": 0.0}  # overrides the checkpoint's config (0.75 for pretraining)

    def __init__(self, model_id: str, **kwargs):
        super().__init__(model_id, **kwargs)
        n = self.grid[0] * self.grid[1]
        tokens = torch.arange(n, dtype=torch.float32).view(1, n, 1)
        kept, _, ids_restore = self.model.embeddings.random_masking(tokens, noise=self._noise(1, n, "cpu"))
        if not (torch.equal(kept.flatten(), tokens.flatten()) and torch.equal(ids_restore.flatten(), torch.arange(n))):
            raise RuntimeError("ViTMAE does not keep its tokens in grid order with mask_ratio=0 and ordered noise")

    @staticmethod
    def _noise(batch: int, n: int, device) -> Tensor:
        """Increasing "noise": ``argsort`` keeps the tokens in their order."""
        return torch.arange(n, dtype=torch.float32, device=device).expand(batch, -1)

    def encode(self, pixel_values: Tensor) -> None:
        h, w = self.grid
        noise = self._noise(pixel_values.shape[0], h * w, pixel_values.device)
        self.model(pixel_values=pixel_values, noise=noise, interpolate_pos_encoding=True)
