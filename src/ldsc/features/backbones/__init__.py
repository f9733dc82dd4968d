"""Frozen feature extractors. Heavy libraries (diffusers, transformers) are imported only when a
backbone is constructed, so ``import ldsc.features.backbones`` stays cheap."""

from ldsc.features.backbones.base import Backbone, LayerFeatures, WeightsNotFoundError
from ldsc.features.backbones.hf import HFBackbone
from ldsc.features.backbones.pixel import PixelBackbone
from ldsc.features.backbones.sd import StableDiffusionBackbone
from ldsc.features.backbones.timm_vit import TimmBackbone

__all__ = [
    "Backbone",
    "LayerFeatures",
    "WeightsNotFoundError",
    "PixelBackbone",
    "StableDiffusionBackbone",
    "HFBackbone",
    "TimmBackbone",
]
