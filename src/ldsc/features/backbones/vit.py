"""The recipe every vision transformer backbone shares (``backbone=hf`` and ``backbone=timm``).

A subclass loads its model and sets ``model``, ``patch_size``, ``input_size`` and the
normalisation (:meth:`VisionTransformerBackbone.set_normalisation`), implements
:meth:`~VisionTransformerBackbone.encode` (one forward pass), then calls
:meth:`~VisionTransformerBackbone.find_layers`: one probe pass finds the attention layers in depth
order (``layer.0 … layer.{L-1}``) and the special tokens (class, registers, distillation) that
every layer compares besides the patch grid. Each batch is then resized, normalised, encoded
inside :class:`~ldsc.features.backbones.capture.AttentionCapture`, and every selected layer's call
laid out on the grid with the special tokens (which come first in these models) dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ldsc.features.backbones.base import Backbone, LayerFeatures, check_capture_options
from ldsc.features.backbones.capture import AttentionCapture, find_attention_layers
from ldsc.features.backbones.hooks import grid_features, select_layers
from ldsc.features.backbones.loading import resolve_dtype

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VisionTransformerBackbone(Backbone):
    """Shared options: ``heads`` (``keep`` | ``mean``), ``token_stride``, ``dtype`` (features come
    back in float32), ``compute_attn``, ``draws`` (see ``conf/backbone/hf.yaml``)."""

    #: set by subclasses before :meth:`find_layers`
    model: torch.nn.Module
    patch_size: int = 16

    def __init__(self, heads: str = "keep", token_stride: int = 1, dtype: str = "float32", compute_attn: bool = False,
                 draws: int = 1, resize: int | None = None, crop: int | None = None):
        super().__init__()
        self.set_view(resize, crop)
        check_capture_options(heads, token_stride)
        self.head_mode, self.token_stride = heads, int(token_stride)
        self.compute_attn, self.draws = bool(compute_attn), int(draws)
        self.dtype = resolve_dtype(dtype)

    def set_normalisation(self, mean, std) -> None:
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def check_input_size(self) -> None:
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not a multiple of the patch size {self.patch_size}")

    def find_layers(self, layers, source: str) -> None:
        """Probe pass: the attention layers, the special tokens, the ``layers`` selection."""
        self.freeze()
        probe = torch.zeros(1, 3, self.input_size, self.input_size)
        found = find_attention_layers(self.model, lambda: self.encode(self.preprocess(probe)))
        if not found:
            raise ValueError(f"'{source}' ({type(self.model).__name__}) has no attention layer that calls "
                             f"scaled_dot_product_attention")
        h, w = self.grid
        self.found = {f"layer.{i}": layer for i, layer in enumerate(found)}
        #: tokens each layer compares before the grid: class, registers, distillation
        self.special_tokens = found[0].q_shape[2] - h * w
        if self.special_tokens < 0:
            raise ValueError(f"'{source}': {found[0].q_shape[2]} tokens cannot hold a {h}x{w} grid")
        self.layer_names = select_layers(list(self.found), layers)
        self._capture = AttentionCapture({n: self.found[n].module for n in self.layer_names}, stop_early=True)

    def encode(self, pixel_values: Tensor) -> None:
        """One forward pass of the model (the features are read by the capture)."""
        raise NotImplementedError

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid ``(h, w)`` before ``token_stride``."""
        side = self.input_size // self.patch_size
        return side, side

    def preprocess(self, images: Tensor) -> Tensor:
        """``(B, 3, S, S)`` in [0, 1] → normalised ``(B, 3, input_size, input_size)`` in the model dtype."""
        images = images.to(self.mean.device, torch.float32)
        if tuple(images.shape[-2:]) != (self.input_size, self.input_size):
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        return ((images - self.mean) / self.std).to(self.dtype)

    def extract(self, images: Tensor, generator: torch.Generator | None = None) -> list[LayerFeatures]:
        pixel_values = self.preprocess(images)
        with self._capture as capture:
            self.encode(pixel_values)
        calls = capture.take()
        return [
            grid_features(name, calls[name], self.grid, offset=self.special_tokens, head_mode=self.head_mode,
                          token_stride=self.token_stride, compute_attn=self.compute_attn)
            for name in self.layer_names
        ]

    def describe_layers(self) -> list[dict]:
        """One row per attention layer the model has (captured or not), for ``python -m ldsc.layers``."""
        h, w = self.grid
        return [
            dict(name=name, module=layer.path, grid=f"{h}x{w}", heads=layer.q_shape[1], head_dim=layer.q_shape[3],
                 dropped=self.special_tokens, captured=name in self.layer_names)
            for name, layer in self.found.items()
        ]
