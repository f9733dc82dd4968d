"""Frozen feature extractors. Heavy libraries (diffusers, transformers) are imported only when a
backbone is constructed, so ``import ldsc.features.backbones`` stays cheap."""

from ldsc.features.backbones.base import Backbone, LayerFeatures, WeightsNotFoundError
from ldsc.features.backbones.pixel import PixelBackbone
from ldsc.features.backbones.sd import StableDiffusionBackbone
from ldsc.features.backbones.vit import CLIPBackbone, DINOBackbone, MAEBackbone

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
