"""The protocol every frozen feature extractor follows.

A backbone maps a batch of RGB images to a list of :class:`LayerFeatures`, one per selected
attention layer (or per layer *and* diffusion timestep). Each carries the query, key and value
vectors of the layer's tokens on their spatial grid, per head; class/register tokens are
already dropped. Layers may differ in grid size, head count and head width.

Backbones are frozen: they run in eval mode under ``torch.no_grad()``, their parameters never
require gradients, and they are never part of the solver (so never in a checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ldsc.errors import LdscError, SettingError
from ldsc.features.images import ImageView


@dataclass
class LayerFeatures:
    """q/k/v of one layer for a batch of images.

    Attributes:
        name: a stable, human-readable layer name (e.g. ``"encoder.layer.3"``,
            ``"up_blocks.1.attentions.0.transformer_blocks.0.attn1"``).
        q, k, v: ``(B, heads, h, w, d)`` tensors (any may be ``None`` if not captured).
        attn: optional ``(B, heads, h*w, h*w)`` softmax attention probabilities (``graph=attn``).
        timestep: optional ``(B,)`` diffusion timestep the features were computed at.
        assign: optional ``(B, heads, h, w)`` integer index of the cluster each token joined, for
            networks that cluster (FEC), numbered per image over ``centres``.
        centres: the ``(rows, columns)`` grid of those clusters' centres.
    """

    name: str
    q: Tensor | None = None
    k: Tensor | None = None
    v: Tensor | None = None
    attn: Tensor | None = None
    timestep: Tensor | None = None
    assign: Tensor | None = None
    centres: tuple[int, int] | None = None

    def _any(self) -> Tensor:
        for t in (self.q, self.k, self.v):
            if t is not None:
                return t
        raise ValueError(f"layer {self.name} carries no q/k/v tensor")

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid ``(h, w)``."""
        t = self._any()
        return int(t.shape[2]), int(t.shape[3])

    @property
    def batch_size(self) -> int:
        return int(self._any().shape[0])

    @property
    def heads(self) -> int:
        return int(self._any().shape[1])

    def vectors(self, which: str) -> Tensor:
        """The ``(B, heads, h, w, d)`` tensor named ``which`` (``q``, ``k`` or ``v``)."""
        t = getattr(self, which, None)
        if t is None:
            have = ", ".join(n for n in ("q", "k", "v", "attn", "assign") if getattr(self, n) is not None)
            hint = " (cluster assignments come from a clustering network: backbone=fec)" if which == "assign" else ""
            raise SettingError(f"The graph type needs {which!r} from every layer, but layer {self.name} of this backbone "
                               f"gives {have}{hint}.")
        return t


class Backbone(nn.Module):
    """Base class of frozen extractors.

    Subclasses set ``input_size`` (the square side images are resized to before ``forward``)
    and implement :meth:`extract`. ``forward`` receives float images in ``[0, 1]`` of shape
    ``(B, 3, S, S)`` with ``S == input_size``; each backbone applies its own normalisation.
    """

    #: short name used in logs and file names
    name: str = "backbone"
    #: side length images are resized to by the data pipeline
    input_size: int = 224
    #: backbone passes per image into the feature store (each with its own randomness, e.g. SD's
    #: timestep and noise; each draw gives its own graphs, averaged by the solver's operator)
    draws: int = 1
    #: which part of each image the backbone sees (:class:`~ldsc.features.images.ImageView`: the
    #: whole image squashed, unless a backbone is given ``resize`` / ``crop``)
    view: ImageView = ImageView()

    def set_view(self, resize: int | None = None, crop: int | None = None) -> None:
        """``resize`` / ``crop`` of the backbone's settings (see :class:`~ldsc.features.images.ImageView`)."""
        self.view = ImageView(resize, crop)

    def set_base_size(self, base_size: int) -> None:
        """Told the solver's base grid before the run (the ``pixel`` backbone derives its grids from
        it); other backbones ignore it."""

    def pass_bytes(self, batch_size: int) -> int | None:
        """Bytes one pass over ``batch_size`` images holds at its peak, when the backbone can say
        beforehand (the ``pixel`` backbone, whose grids grow with the base grid); ``None``: a
        network whose input size fixes it (its weights dominate)."""
        return None

    def freeze(self) -> "Backbone":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "Backbone":  # noqa: D401 - frozen: always eval
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> list[LayerFeatures]:
        """``images``: ``(B, 3, S, S)`` float in [0, 1]. ``generator`` drives any randomness
        (diffusion noise and timesteps) so that runs reproduce and resume exactly."""
        return self.extract(images, generator=generator)

    def extract(self, images: Tensor, generator: torch.Generator | None = None) -> list[LayerFeatures]:
        raise NotImplementedError

    def describe_layers(self) -> list[dict]:
        """One row per layer the backbone can capture: ``name``, ``grid`` (``"h x w"`` at
        ``input_size``), ``heads``, ``head_dim``, ``dropped`` (special or text tokens the layer
        compares besides the grid), ``captured`` (picked by ``layers``), for ``python -m ldsc.layers``.
        This default runs the backbone once on a grey image and lists what it returns; backbones
        that know their layers without running (or know the ones they skip) override it."""
        x = torch.full((1, 3, self.input_size, self.input_size), 0.5)
        gen = torch.Generator().manual_seed(0)
        return [dict(name=f.name, grid="x".join(map(str, f.grid)), heads=f.heads, head_dim=int(f._any().shape[-1]),
                     dropped=0, captured=True)
                for f in self(x, generator=gen)]

    def state_dict(self, *args, **kwargs):  # the frozen network never goes into checkpoints
        return {}


def backbone_draws(backbone: "Backbone", images: Tensor, index: Tensor, seed: int, draws: int = 1):
    """``(draw, features)`` of a batch, one backbone pass per draw; draw ``r`` is seeded by
    ``(seed, r, the batch's image indices)`` (:func:`ldsc.features.images.batch_seed`), so the same
    images give the same features whoever asks: the store, :class:`ldsc.LDSC`, ``ldsc.extend``."""
    from ldsc.features.images import batch_seed

    for r in range(int(draws)):
        gen = torch.Generator(device=images.device).manual_seed(batch_seed(seed, r, index))
        with torch.no_grad():
            yield r, backbone(images, generator=gen)


#: what ``heads=`` may be: one graph per head, one of the heads' mean, or one of their vectors side
#: by side (see :func:`ldsc.features.backbones.hooks.grid_features`)
HEAD_MODES = ("keep", "mean", "concat")


def check_capture_options(heads: str, token_stride: int) -> None:
    """Validate the capture options shared by the hooked backbones (``heads``, ``token_stride``)."""
    if heads not in HEAD_MODES:
        raise SettingError(f"backbone.heads must be one of {', '.join(HEAD_MODES)}, not {heads!r}.")
    if int(token_stride) < 1:
        raise SettingError(f"backbone.token_stride must be 1 or more, not {token_stride}.")


class WeightsNotFoundError(LdscError, RuntimeError):
    """Raised with one clear sentence when pretrained weights cannot be loaded."""


def weights_error(model_id: str, cache_dir: str | None, err: Exception | None = None) -> WeightsNotFoundError:
    """Build the one-sentence error for weights that cannot be loaded."""
    import os

    cache = cache_dir or os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    return WeightsNotFoundError(f"Could not load weights '{model_id}': {_weights_cause(model_id, cache, err)}")


def _weights_cause(model_id: str, cache: str, err: Exception | None) -> str:
    """Why weights could not be loaded, and what to do, from the error the library raised."""
    import os

    name = type(err).__name__ if err is not None else ""
    text = str(err) if err is not None else ""
    low = text.lower()
    local = os.path.isdir(model_id)
    looks_local = local or model_id.startswith((".", "/", "~"))
    if "GatedRepo" in name or "gated repo" in low or "awaiting a review" in low:
        return (f"it is a gated repository: accept its licence on huggingface.co, log in with `hf auth login`, "
                f"then `hf download {model_id}`.")
    if looks_local and not local:
        return f"the folder '{model_id}' does not exist (backbone.model_id must be a hub id or a folder)."
    if local and not any(os.path.isfile(os.path.join(root, "config.json")) or
                         os.path.isfile(os.path.join(root, "model_index.json"))
                         for root in (model_id, *(os.path.join(model_id, d) for d in ("unet", "vae")))):
        return (f"the folder has no config.json / model_index.json: it is not a model saved by "
                f"save_pretrained (point backbone.model_id at the folder that holds them).")
    if any(s in low for s in ("deserializ", "headertoolarge", "invalid load key", "unable to load weights",
                              "incomplete metadata", "unexpected eof", "truncated", "invalid header")):
        return f"its weights file is corrupt or truncated ({name}); download it again."
    if local and ("no file named" in low or "does not appear to have a file named" in low):
        return f"a file is missing from the folder ({text.splitlines()[0][:200]})."
    if isinstance(err, (TypeError,)) or (isinstance(err, ValueError) and "repo id" not in low and not local):
        return f"{name}: {text.splitlines()[0][:200] if text else 'bad argument'}."
    reason = f" ({name})" if name else ""
    return (f"not found in a local directory or the Hugging Face cache '{cache}'{reason}: on a machine with "
            f"internet run `hf download {model_id}` (or `make weights`), set HF_HOME to where the files are, "
            f"or pass backbone.model_id=/path/to/local/dir.")
