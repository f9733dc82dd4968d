"""The protocol every frozen feature extractor follows.

A backbone maps a batch of RGB images to a list of :class:`LayerFeatures`, one per selected
attention layer (or per layer *and* diffusion timestep). Each carries the query, key and value
vectors of the layer's tokens on their spatial grid, per head; class/register tokens are
already dropped. Layers may differ in grid size, head count and head width.

Backbones are frozen: they run in eval mode under ``torch.no_grad()``, their parameters never
require gradients, and they are never part of the solver (so never in a checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ldsc.errors import LdscError


@dataclass
class LayerFeatures:
    """q/k/v of one layer for a batch of images.

    Attributes:
        name: a stable, human-readable layer name (e.g. ``"encoder.layer.3"``,
            ``"up_blocks.1.attentions.0.transformer_blocks.0.attn1"``).
        q, k, v: ``(B, heads, h, w, d)`` tensors (any may be ``None`` if not captured).
        attn: optional ``(B, heads, h*w, h*w)`` softmax attention probabilities (``graph=attn``).
        hidden: optional ``(B, 1, h, w, d)`` block output (``graph=hidden``).
        timestep: optional ``(B,)`` diffusion timestep the features were computed at.
    """

    name: str
    q: Tensor | None = None
    k: Tensor | None = None
    v: Tensor | None = None
    attn: Tensor | None = None
    hidden: Tensor | None = None
    timestep: Tensor | None = None
    meta: dict = field(default_factory=dict)

    def _any(self) -> Tensor:
        for t in (self.q, self.k, self.v, self.hidden):
            if t is not None:
                return t
        raise ValueError(f"layer {self.name} carries no q/k/v/hidden tensor")

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
        """The ``(B, heads, h, w, d)`` tensor named ``which`` (``q``, ``k``, ``v`` or ``hidden``)."""
        t = getattr(self, which, None)
        if t is None:
            raise ValueError(
                f"layer {self.name} has no {which!r} vectors; this backbone captured "
                f"{[n for n in ('q', 'k', 'v', 'hidden', 'attn') if getattr(self, n) is not None]}"
            )
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

    def set_base_size(self, base_size: int) -> None:
        """Told the solver's base grid before the run (the ``pixel`` backbone derives its grids from
        it); other backbones ignore it."""

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

    def state_dict(self, *args, **kwargs):  # the frozen network never goes into checkpoints
        return {}


def check_capture_options(heads: str, token_stride: int) -> None:
    """Validate the capture options shared by the hooked backbones (``heads``, ``token_stride``)."""
    if heads not in ("keep", "mean"):
        raise ValueError(f"heads must be 'keep' or 'mean', got {heads!r}")
    if int(token_stride) < 1:
        raise ValueError(f"token_stride must be >= 1, got {token_stride}")


class WeightsNotFoundError(LdscError, RuntimeError):
    """Raised with one clear sentence when pretrained weights cannot be loaded."""


def weights_error(model_id: str, cache_dir: str | None, err: Exception | None = None) -> WeightsNotFoundError:
    """Build the one-sentence error for weights that cannot be loaded."""
    import os

    cache = cache_dir or os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    reason = f" ({type(err).__name__})" if err is not None else ""
    return WeightsNotFoundError(
        f"Could not load weights '{model_id}' from a local directory or the Hugging Face cache "
        f"'{cache}'{reason}: on a machine with internet run "
        f"`hf download {model_id}` (or `make weights`), set HF_HOME to where the files "
        f"are, or pass backbone.model_id=/path/to/local/dir."
    )
