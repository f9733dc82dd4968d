"""timm vision transformers by name: ViT, DINOv2 with registers, EVA-02, DeiT, … (``backbone=timm``).

timm's attention modules fuse q, k and v into one projection (``attn.qkv``), may normalise q and k
(``q_norm`` / ``k_norm``) and, in EVA, rotate them (rotary embeddings) before they compare them.
With ``fused_attn`` on (set here on every module that has the switch), each hands the final
per-head q, k, v to ``scaled_dot_product_attention``, where
:class:`~ldsc.features.backbones.capture.AttentionCapture` reads them — no split of the fused
projection is re-implemented here.

Weights: ``model_name`` as timm knows it (``vit_base_patch14_reg4_dinov2.lvd142m``; fetched into,
or read from, the Hugging Face cache), ``hf-hub:<repo>``, or ``local-dir:<folder>`` (a folder
written by ``timm.models.save_for_hf``); ``checkpoint=`` a local weights file for ``model_name``'s
architecture. The token grid comes from the model's patch embedding, the special tokens to drop
(class, registers) from ``model.num_prefix_tokens``, the normalisation from its pretrained config.
"""

from __future__ import annotations

import contextlib
import logging
import os

from torch import Tensor

from ldsc.features.backbones.base import WeightsNotFoundError
from ldsc.features.backbones.loading import hub_reachable, weights_error
from ldsc.features.backbones.vit import IMAGENET_MEAN, IMAGENET_STD, VisionTransformerBackbone

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _hub_offline_unless_reachable(model_name: str):
    """timm downloads through huggingface_hub, which retries for ~20 s on a machine without
    internet; like :func:`~ldsc.features.backbones.loading.load_pretrained`, ask the cache only then."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    if not offline and not model_name.startswith("local-dir:") and not hub_reachable():
        log.info("the Hugging Face hub cannot be reached: looking for '%s' in the local cache only", model_name)
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = offline


def hub_repo(model_name: str) -> str:
    """The Hugging Face repository timm fetches ``model_name``'s weights from."""
    timm = import_timm()

    if model_name.startswith("hf-hub:"):
        return model_name.split(":", 1)[1]
    cfg = timm.models.get_pretrained_cfg(model_name)
    return (getattr(cfg, "hf_hub_id", None) if cfg is not None else None) or f"timm/{model_name}"


def constants_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def import_timm():
    """``timm``, or one sentence saying why it cannot be used here: it is an optional dependency
    (``pip install "ldsc-spectral[timm]"``), and it imports torchvision, whose build must match
    the installed torch (PyPI's torchvision wheels need a CUDA torch)."""
    try:
        import timm
    except ImportError as err:
        raise WeightsNotFoundError(f"backbone=timm needs the timm package, which is not installed ({err}): "
                                   f"pip install \"ldsc-spectral[timm]\" (with a torchvision built for your torch).") from err
    except RuntimeError as err:  # torchvision's compiled operators do not match this torch
        raise WeightsNotFoundError(f"backbone=timm needs timm, which cannot be imported here: its torchvision does not "
                                   f"match the installed torch {__import__('torch').__version__} ({str(err)[:80]}); "
                                   f"install the torchvision built for it.") from err
    return timm


class TimmBackbone(VisionTransformerBackbone):
    """A frozen timm vision transformer behind the backbone protocol.

    Args:
        model_name: timm model name (``vit_base_patch14_reg4_dinov2.lvd142m``), ``hf-hub:<repo>``
            or ``local-dir:<folder>``.
        checkpoint: a local weights file (``.safetensors`` / ``.pth``) for ``model_name``'s
            architecture, instead of the pretrained tag's; ``None``: the tag's weights.
        layers, heads, token_stride, dtype, compute_attn, draws: as for ``backbone=hf``.
        input_size: square input side; ``None``: the model's pretrained size. Another size is
            built into the model (``img_size``), which resamples its position embeddings on load.
    """

    name = "timm"

    def __init__(
        self,
        model_name: str = "vit_base_patch14_reg4_dinov2.lvd142m",
        checkpoint: str | None = None,
        layers=None,
        heads: str = "keep",
        token_stride: int = 1,
        input_size: int | None = None,
        dtype: str = "float32",
        compute_attn: bool = False,
        draws: int = 1,
        resize: int | None = None,
        crop: int | None = None,
    ):
        super().__init__(heads, token_stride, dtype, compute_attn, draws, resize, crop)
        self.model_name = str(model_name)
        self.model = self.load_model(self.model_name, checkpoint, input_size).to(self.dtype)
        for module in self.model.modules():  # each attention hands its q/k/v to scaled_dot_product_attention
            if hasattr(module, "fused_attn"):
                module.fused_attn = True
        patch, img = self.model.patch_embed.patch_size, self.model.patch_embed.img_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.input_size = int(img[0] if isinstance(img, (tuple, list)) else img)
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        self.set_normalisation(cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))
        self.find_layers(layers, self.model_name)
        prefix = int(getattr(self.model, "num_prefix_tokens", 0))
        if self.special_tokens != prefix:
            raise ValueError(f"timm model '{self.model_name}': its layers compare {self.special_tokens} tokens besides "
                             f"the {self.grid[0]}x{self.grid[1]} grid, not its {prefix} prefix tokens")

    @staticmethod
    def load_model(model_name: str, checkpoint: str | None, input_size: int | None):
        timm = import_timm()

        options = {}
        if input_size:
            options["img_size"] = int(input_size)
        if checkpoint:
            if not os.path.isfile(checkpoint):
                raise WeightsNotFoundError(f"backbone.checkpoint '{checkpoint}' is not a file.")
            options["pretrained_cfg_overlay"] = {"file": str(checkpoint)}
        if model_name.startswith("local-dir:") and not os.path.isdir(model_name.split(":", 1)[1]):
            raise WeightsNotFoundError(f"Could not load timm model '{model_name}': the folder does not exist.")
        try:
            with _hub_offline_unless_reachable(model_name):
                return timm.create_model(model_name, pretrained=True, **options)
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise WeightsNotFoundError(f"'{model_name}' is not a timm model name (see timm.list_models(), "
                                           f"or use hf-hub:<repo> / local-dir:<folder>).") from err
            raise weights_error(model_name, None, err) from err
        except (OSError, ValueError) as err:
            if model_name.startswith("local-dir:") or "Entry" not in type(err).__name__:
                raise weights_error(model_name, None, err) from err
            raise WeightsNotFoundError(
                f"Could not load the weights of timm model '{model_name}': not in the Hugging Face cache "
                f"'{constants_cache()}' ({type(err).__name__}): on a machine with internet run "
                f"`hf download {hub_repo(model_name)}`, set HF_HOME to where the files are, or pass "
                f"backbone.checkpoint=/path/to/weights.safetensors.") from err

    def encode(self, pixel_values: Tensor) -> None:
        self.model.forward_features(pixel_values)
