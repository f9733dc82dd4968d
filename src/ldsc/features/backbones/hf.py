"""Any transformers vision transformer by id: CLIP, DINO, MAE, DINOv2 (with registers), DINOv3,
SigLIP / SigLIP 2, ViT, DeiT, … through one class.

Nothing here is keyed by a model's name. From the checkpoint's ``config.json``:

* the model class: the vision tower of a composite checkpoint (CLIP, SigLIP: ``vision_config``) or
  the model itself, via transformers' own ``AutoModel`` mapping of the config type;
* the patch size and pretrained image size (so the token grid at any input size);
* ``mask_ratio`` (masked autoencoders): set to 0 and the tokens kept in order.

From one probe pass at construction (:func:`~ldsc.features.backbones.capture.find_attention_layers`):
the self-attention layers, in depth order, named ``layer.0 … layer.{L-1}``, and the number of
special tokens each compares besides the patch grid (class token, registers, distillation
token): ``N - h·w``. The model's ``config.num_register_tokens`` (where it has one) is checked
against it. Special tokens come first in every transformers ViT.

Each batch: resize to ``input_size``, normalise with the model's ``preprocessor_config.json``
mean/std (or ``image_mean``/``image_std``, else ImageNet's), one forward pass with position
encodings interpolated where the model takes ``interpolate_pos_encoding`` (rotary models such as
DINOv3 need nothing), and the q/k/v each layer hands to ``scaled_dot_product_attention`` — after
any QK-norm or rotary step the model applies — captured by
:class:`~ldsc.features.backbones.capture.AttentionCapture`. The model is loaded with its ``sdpa``
attention implementation for that reason.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from ldsc.features.backbones.base import WeightsNotFoundError
from ldsc.features.backbones.loading import load_pretrained, read_config_file
from ldsc.features.backbones.vit import IMAGENET_MEAN, IMAGENET_STD, VisionTransformerBackbone


def vision_config(config):
    """The vision part of a checkpoint's config: ``config.vision_config`` of a composite
    image–text model (CLIP, SigLIP), the config itself otherwise."""
    return getattr(config, "vision_config", None) or config


def patch_side(config) -> int:
    patch = config.patch_size
    return int(patch[0] if isinstance(patch, (list, tuple)) else patch)


def image_side(config) -> int | None:
    size = getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size) if size else None


class HFBackbone(VisionTransformerBackbone):
    """A frozen transformers vision transformer behind the backbone protocol.

    Args:
        model_id: hub id or local directory (``from_pretrained`` layout).
        layers: which self-attention layers to capture: ``None`` = all, indices (``[0, -1]``)
            or glob patterns over ``layer.<i>``.
        heads: ``"keep"`` (q/k/v per head) or ``"mean"`` (averaged over heads).
        token_stride: keep every n-th patch token along each axis.
        input_size: square input side in pixels; ``None`` = the pretrained ``image_size``.
            Must be a multiple of the patch size.
        dtype: ``float32 | float16 | bfloat16`` (features are returned in float32).
        cache_dir: Hugging Face cache directory (``None`` = the default one).
        compute_attn: also return the softmax attention between grid tokens.
        draws: backbone passes per image (a ViT is deterministic: 1).
        image_mean, image_std: normalisation when the model folder has no
            ``preprocessor_config.json`` (``None``: ImageNet's).
    """

    name = "hf"

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
        image_mean=None,
        image_std=None,
        resize: int | None = None,
        crop: int | None = None,
    ):
        super().__init__(heads, token_stride, dtype, compute_attn, draws, resize, crop)
        self.model_id = str(model_id)
        self.model = self.load_model(self.model_id, cache_dir).to(self.dtype)
        config = vision_config(self.model.config)
        self.name = str(config.model_type)  # clip_vision_model, vit, vit_mae, dinov2, siglip_vision_model, …
        self.patch_size = patch_side(config)
        self.input_size = int(input_size or image_side(config) or 224)
        self.check_input_size()
        self.masked = getattr(config, "mask_ratio", None) is not None
        forward_args = inspect.signature(self.model.forward).parameters
        self.forward_options = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in forward_args else {}
        processor = read_config_file(self.model_id, "preprocessor_config.json", cache_dir) or {}
        self.set_normalisation(processor.get("image_mean", image_mean or IMAGENET_MEAN),
                               processor.get("image_std", image_std or IMAGENET_STD))
        self.find_layers(layers, self.model_id)
        registers = int(getattr(config, "num_register_tokens", 0) or 0)
        if self.special_tokens < registers:
            raise ValueError(f"'{self.model_id}': the layers compare {self.special_tokens} tokens besides the "
                             f"{self.grid[0]}x{self.grid[1]} grid, fewer than the {registers} registers of its config")

    # -- loading ---------------------------------------------------------------------------
    def load_model(self, model_id: str, cache_dir: str | None):
        """The vision model named by the checkpoint's config, with ``sdpa`` attention."""
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        config = vision_config(load_pretrained(AutoConfig, model_id, cache_dir=cache_dir, weights=False))
        try:
            model_class = MODEL_MAPPING[type(config)]
        except KeyError:
            raise WeightsNotFoundError(f"'{model_id}' is a {type(config).__name__}, which transformers maps to no "
                                       f"vision model class (backbone=hf reads vision transformers)") from None
        options = {"attn_implementation": "sdpa"}
        init = inspect.signature(model_class.__init__).parameters
        if "add_pooling_layer" in init:  # the pooler is not used (and often not in the checkpoint)
            options["add_pooling_layer"] = False
        if getattr(config, "mask_ratio", None) is not None:  # masked autoencoder: keep every token
            options["mask_ratio"] = 0.0
        return load_pretrained(model_class, model_id, cache_dir=cache_dir, **options)

    # -- the forward pass ----------------------------------------------------------------------
    def encode(self, pixel_values: Tensor) -> None:
        """One forward pass (the features are read by the capture)."""
        options = dict(self.forward_options)
        if self.masked:  # increasing "noise": the masking's argsort keeps the tokens in grid order
            h, w = self.grid
            options["noise"] = torch.arange(h * w, dtype=torch.float32, device=pixel_values.device).expand(
                pixel_values.shape[0], -1)
        self.model(pixel_values=pixel_values, **options)
