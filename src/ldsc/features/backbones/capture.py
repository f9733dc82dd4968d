"""Capture the queries, keys and values an attention layer actually compares.

Modern attention modules do more between their projections and the comparison ``q kᵀ`` than a
linear map: DINOv3 and FLUX rotate q and k by position (rotary embeddings), SD3, FLUX, EVA and
DiTs normalise them (QK-norm), SD3/FLUX concatenate the text tokens' q/k/v with the image
tokens' (joint attention), timm and some transformers models fuse q, k and v into one
projection. Hooking the projections would miss all of that. What every one of these modules
does hand over, whatever the library (transformers' ``sdpa`` attention, diffusers' attention
processors and its native dispatch, timm's fused attention), is one call of
:func:`torch.nn.functional.scaled_dot_product_attention` with ``(B, heads, N, d)`` tensors: exactly
the vectors the model compares, after every norm and rotation, split by head.

:class:`AttentionCapture` records that call. Forward hooks on the selected attention modules say
which layer is running (a pre-hook sets it, a post-hook clears it); while the context manager is
active, ``torch.nn.functional.scaled_dot_product_attention`` is wrapped by a recorder that stores
the q, k, v (and scale) of the running layer and then calls the original function, so the model
computes exactly what it computes without us. On exit the function and the hooks are restored.

Example::

    with AttentionCapture({"layer.0": model.encoder.layer[0].attention}) as capture:
        model(pixel_values)
    q = capture.outputs["layer.0"].q          # (B, heads, N, d), N includes class/text tokens

The libraries call the function through the module attribute at call time
(``torch.nn.functional.scaled_dot_product_attention(...)`` / ``F.scaled_dot_product_attention``),
which is what makes the wrapper see the call. A layer that finishes without calling it (an
attention implementation other than ``sdpa``: "eager", flash-attn kernels, xformers) is an error
naming the layer, never a silent empty capture.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class AttentionCall:
    """What one attention layer handed to ``scaled_dot_product_attention``.

    ``q``: ``(B, heads, Nq, d)``; ``k``, ``v``: ``(B, heads_kv, Nk, d)`` (detached); ``scale``: the
    logit scale the model used (``1/√d`` when it passed none)."""

    q: Tensor
    k: Tensor
    v: Tensor
    scale: float


class CaptureError(RuntimeError):
    """A selected layer ran without handing its q/k/v to ``scaled_dot_product_attention``."""


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once every wanted layer is captured."""


def _arguments(args, kwargs) -> tuple[Tensor, Tensor, Tensor, float | None]:
    names = ("query", "key", "value")
    q, k, v = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
    scale = kwargs.get("scale", args[6] if len(args) > 6 else None)
    return q, k, v, scale


class AttentionCapture:
    """Context manager recording the q/k/v that named attention modules compare.

    Args:
        layers: ``{layer name: attention module}`` (the module whose forward performs one
            attention: transformers' ``*Attention`` / ``*SelfAttention``, diffusers' ``Attention``,
            timm's ``Attention``).
        stop_early: end the network's forward pass (by an exception the context manager
            swallows) once the last selected layer has run, so later layers are not computed.

    ``outputs[name]`` is the :class:`AttentionCall` of the layer's last run. Entering clears them.
    Not re-entrant, and not for use from several threads at once (the wrapper is process-wide
    while active).
    """

    def __init__(self, layers: dict[str, nn.Module], stop_early: bool = False):
        self.layers = dict(layers)
        self.stop_early = stop_early
        self.outputs: dict[str, AttentionCall] = {}
        self._running: list[str] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._original = None

    # -- hooks -------------------------------------------------------------------------------
    def _enter_layer(self, name: str, module, args) -> None:
        self._running.append(name)

    def _leave_layer(self, name: str, module, args, output) -> None:
        self._running.pop()
        if name not in self.outputs:
            raise CaptureError(
                f"attention layer {name} ({type(module).__name__}) ran without calling "
                f"torch.nn.functional.scaled_dot_product_attention, so its q/k/v cannot be read; load the "
                f"model with its 'sdpa' attention implementation"
            )
        if self.stop_early and len(self.outputs) == len(self.layers):
            raise _StopForward

    def _record(self, original, *args, **kwargs):
        if self._running:
            name = self._running[-1]
            if name not in self.outputs:  # the layer's first call (a module calls it once)
                q, k, v, scale = _arguments(args, kwargs)
                self.outputs[name] = AttentionCall(
                    q.detach(), k.detach(), v.detach(),
                    float(scale) if scale is not None else float(q.shape[-1]) ** -0.5,
                )
        return original(*args, **kwargs)

    # -- context -----------------------------------------------------------------------------
    def __enter__(self) -> "AttentionCapture":
        if self._original is not None:
            raise RuntimeError("AttentionCapture is already active")
        self.outputs, self._running = {}, []
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(functools.partial(self._enter_layer, name)))
            self._handles.append(module.register_forward_hook(functools.partial(self._leave_layer, name)))
        self._original = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = functools.partial(self._record, self._original)
        return self

    def take(self) -> dict[str, AttentionCall]:
        """Hand over the recorded calls and forget them (no tensors outlive the batch)."""
        outputs, self.outputs = self.outputs, {}
        return outputs

    def __exit__(self, exc_type, exc, tb) -> bool:
        F.scaled_dot_product_attention = self._original
        self._original = None
        for handle in self._handles:
            handle.remove()
        self._handles, self._running = [], []
        return exc_type is _StopForward  # swallow only our own early stop


@dataclass
class FoundLayer:
    """An attention layer found by :func:`find_attention_layers`: its module path and the shapes
    of the q and k it compared in the probe pass (``(B, heads, N, d)``)."""

    path: str
    module: nn.Module
    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]


def find_attention_layers(model: nn.Module, forward) -> list[FoundLayer]:
    """Every module of ``model`` that performs an attention, found by running ``forward()`` once.

    During the pass, forward hooks on all modules keep the stack of running modules; each call of
    ``scaled_dot_product_attention`` is attributed to the innermost running module (the attention
    module whose own code made the call — its q/k/v projections have returned by then). Layers
    come back in execution order (which for a UNet is down, mid, up — not the order
    ``named_modules`` lists them in), each once, with the shapes it compared.
    """
    running: list[str] = []
    found: dict[str, FoundLayer] = {}
    modules = dict(model.named_modules())
    handles = []

    def leave(module, args, output) -> None:  # (a hook that returned a value would replace the output)
        running.pop()

    for path, module in modules.items():
        handles.append(module.register_forward_pre_hook(functools.partial(lambda p, m, a: running.append(p), path)))
        handles.append(module.register_forward_hook(leave))
    original = F.scaled_dot_product_attention

    def record(*args, **kwargs):
        if running and running[-1] not in found:
            q, k, _, _ = _arguments(args, kwargs)
            found[running[-1]] = FoundLayer(running[-1], modules[running[-1]], tuple(q.shape), tuple(k.shape))
        return original(*args, **kwargs)

    F.scaled_dot_product_attention = record
    try:
        with torch.no_grad():
            forward()
    finally:
        F.scaled_dot_product_attention = original
        for handle in handles:
            handle.remove()
    return list(found.values())
