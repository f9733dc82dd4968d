"""Frozen feature extractors. Heavy libraries (diffusers, transformers) are imported only by the
modules that need them, so ``import ldsc.backbones`` stays cheap."""

from ldsc.backbones.base import Backbone, LayerFeatures, WeightsNotFoundError

__all__ = ["Backbone", "LayerFeatures", "WeightsNotFoundError"]
