"""Frozen feature extractors. Heavy libraries (diffusers, transformers) are imported only when a
backbone is constructed, so ``import ldsc.backbones`` stays cheap."""

from ldsc.backbones.base import Backbone, LayerFeatures, WeightsNotFoundError
from ldsc.backbones.pixel import PixelBackbone
from ldsc.backbones.sd import StableDiffusionBackbone
from ldsc.backbones.vit import CLIPBackbone, DINOBackbone, MAEBackbone

__all__ = [
    "Backbone",
    "LayerFeatures",
    "WeightsNotFoundError",
    "PixelBackbone",
    "StableDiffusionBackbone",
    "CLIPBackbone",
    "DINOBackbone",
    "MAEBackbone",
]
