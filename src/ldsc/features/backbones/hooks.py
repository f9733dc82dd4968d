"""Capture the query, key and value projections of attention layers with forward hooks.

Attention modules in diffusers and transformers compute ``q``, ``k`` and ``v`` with three
linear projections (``to_q/to_k/to_v`` in diffusers' ``Attention``, ``q_proj/k_proj/v_proj``
or ``query/key/value`` in transformers). Hooking the *outputs* of these projections gives the
vectors the attention itself uses, whatever attention kernel (eager, SDPA, flash) runs after.

Example::

    with QKVCapture({"layer.0": model.layers[0].attention}) as capture:
        model(pixel_values)
    q = capture.outputs["layer.0"]["q"]          # (B, N, heads * d), as the projection returned it

:func:`grid_features` then turns one layer's captured projections into
:class:`~ldsc.features.backbones.base.LayerFeatures` on the token grid — the one place where heads are
split, class tokens dropped, tokens sub-sampled and (optionally) attention probabilities formed.
"""

from __future__ import annotations

import fnmatch
import functools

import torch
from torch import Tensor, nn

from ldsc.features.backbones.base import LayerFeatures

#: child-module names of the q/k/v projections, per library convention
PROJECTION_NAMES: tuple[tuple[str, str, str], ...] = (
    ("to_q", "to_k", "to_v"),  # diffusers Attention
    ("q_proj", "k_proj", "v_proj"),  # transformers CLIP, ViT/ViTMAE (>= 5.0)
    ("query", "key", "value"),  # transformers ViT/ViTMAE (4.x)
)


def qkv_projections(attention: nn.Module) -> dict[str, nn.Module]:
    """The ``{"q": ..., "k": ..., "v": ...}`` projection modules (direct children) of one
    attention module; ``{}`` if it has none."""
    for names in PROJECTION_NAMES:
        if all(isinstance(getattr(attention, n, None), nn.Module) for n in names):
            return {role: getattr(attention, n) for role, n in zip("qkv", names)}
    return {}


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{module path: module}`` of every module with q/k/v projections, in definition order."""
    return {name: m for name, m in model.named_modules() if qkv_projections(m)}


def select_layers(names: list[str], spec=None) -> list[str]:
    """The layer names picked by ``spec``, kept in network order.

    ``spec``: ``None`` (all); an int or list of ints (indices into ``names``, negative counting
    from the end); a glob pattern or list of patterns matched against the names
    (``"up_blocks.*"``). Raises if nothing (or an unknown index) is selected.
    """
    if spec is None:
        return list(names)
    items = [spec] if isinstance(spec, (int, str)) else list(spec)
    picked: set[str] = set()
    for item in items:
        if isinstance(item, int):
            if not -len(names) <= item < len(names):
                raise ValueError(f"layer index {item} out of range: the network has {len(names)} layers")
            picked.add(names[item])
        else:
            picked.update(n for n in names if fnmatch.fnmatchcase(n, str(item)))
    if not picked:
        raise ValueError(f"layers={items} selects none of the network's layers {names}")
    return [n for n in names if n in picked]


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once everything wanted is captured."""


class QKVCapture:
    """Context manager that records the q/k/v projection outputs of named attention modules.

    Args:
        layers: ``{layer name: attention module}``.
        extra: optional ``{layer name: module}`` whose *output* is recorded under the key
            ``"out"`` (used by tests to compare against the module's own result).
        stop_early: abort the network's forward pass (by an exception that the context
            manager swallows) as soon as every layer's q, k and v are recorded, so the layers
            after the last selected one are not computed.

    On entry it registers one forward hook per projection and clears :attr:`outputs`; on exit
    (also after an exception) it removes every hook. ``outputs[name][role]`` holds the detached
    tensor of the last call, ``role`` in ``"q"``, ``"k"``, ``"v"`` (and ``"out"``).
    """

    def __init__(
        self,
        layers: dict[str, nn.Module],
        extra: dict[str, nn.Module] | None = None,
        stop_early: bool = False,
    ):
        self.stop_early = stop_early
        self._n_wanted = 3 * len(layers)
        self._n_seen = 0
        self.targets: list[tuple[str, str, nn.Module]] = []
        for name, attention in layers.items():
            projections = qkv_projections(attention)
            if not projections:
                raise ValueError(f"{name} ({type(attention).__name__}) has no q/k/v projections {PROJECTION_NAMES}")
            for role, projection in projections.items():
                self.targets.append((name, role, projection))
        for name, module in (extra or {}).items():
            self.targets.append((name, "out", module))
        self.outputs: dict[str, dict[str, Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _record(self, name: str, role: str, module: nn.Module, inputs, output) -> None:
        if isinstance(output, tuple):  # transformers attention modules return (output, weights)
            output = output[0]
        store = self.outputs.setdefault(name, {})
        if role != "out" and role not in store:
            self._n_seen += 1
        store[role] = output.detach()
        if self.stop_early and self._n_seen == self._n_wanted:
            raise _StopForward

    def __enter__(self) -> "QKVCapture":
        self.outputs = {}
        self._n_seen = 0
        for name, role, module in self.targets:
            hook = functools.partial(self._record, name, role)
            self._handles.append(module.register_forward_hook(hook))
        return self

    def take(self) -> dict[str, dict[str, Tensor]]:
        """Hand over the recorded outputs and forget them (so no tensors outlive the batch)."""
        outputs, self.outputs = self.outputs, {}
        return outputs

    def __exit__(self, exc_type, exc, tb) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return exc_type is _StopForward  # swallow only our own early stop


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``(B, N, heads * d)`` → ``(B, heads, N, d)``."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def attention_probs(q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
    """Softmax attention ``softmax(q kᵀ · scale)`` over the last-but-one axis of ``k``.

    ``q``, ``k``: ``(..., N, d)`` → ``(..., N, N)``, rows sum to one. ``scale`` defaults to
    ``1/√d``. Computed in float32 for stability.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return logits.softmax(dim=-1)


def grid_features(
    name: str,
    captured: dict[str, Tensor],
    heads: int,
    grid: tuple[int, int],
    *,
    n_prefix: int = 0,
    scale: float | None = None,
    head_mode: str = "keep",
    token_stride: int = 1,
    compute_attn: bool = False,
    timestep: Tensor | None = None,
) -> LayerFeatures:
    """One layer's captured projections → :class:`LayerFeatures` with ``(B, heads, h, w, d)``.

    Args:
        captured: ``{"q", "k", "v"}`` → ``(B, n_prefix + h*w, heads * d)`` projection outputs,
            the ``n_prefix`` class/register tokens first, then the grid in row-major order.
        heads: number of attention heads the projections hold.
        grid: the ``(h, w)`` token grid.
        scale: attention logit scale (default ``1/√d``), only used for ``compute_attn``.
        head_mode: ``"keep"`` (one slice per head) or ``"mean"`` (average over heads → 1).
        token_stride: keep every ``token_stride``-th token along each axis.
        compute_attn: also return the softmax attention ``(B, heads, n, n)`` between the kept
            grid tokens: the network's attention over *all* tokens (class tokens included) with
            the rows and columns of dropped tokens removed and each row renormalised, so it stays
            row-stochastic (the random walk restricted to the grid). Renormalising a softmax
            after dropping columns gives the softmax over the remaining keys, so it is computed
            as ``softmax(q kᵀ · scale)`` over the kept tokens directly.
        timestep: optional ``(B,)`` diffusion timesteps to attach.

    Features are returned in float32 whatever dtype the network ran in.
    """
    if head_mode not in ("keep", "mean"):
        raise ValueError(f"heads must be 'keep' or 'mean', got {head_mode!r}")
    h, w = grid
    qkv = {role: split_heads(captured[role], heads) for role in "qkv"}  # (B, heads, N, d)
    batch, _, n_tokens, _ = qkv["q"].shape
    if n_tokens != n_prefix + h * w:
        raise ValueError(
            f"layer {name}: {n_tokens} tokens do not form {n_prefix} prefix tokens + a {h}x{w} grid"
        )
    device = qkv["q"].device
    rows = torch.arange(0, h, token_stride, device=device)
    cols = torch.arange(0, w, token_stride, device=device)
    index = (rows[:, None] * w + cols[None, :]).flatten() + n_prefix
    hs, ws = len(rows), len(cols)

    kept = {role: t.index_select(2, index) for role, t in qkv.items()}  # (B, heads, hs*ws, d)
    attn = None
    if compute_attn:
        attn = attention_probs(kept["q"], kept["k"], scale)
        if head_mode == "mean":
            attn = attn.mean(dim=1, keepdim=True)

    out = {}
    for role, t in kept.items():
        t = t.reshape(batch, heads, hs, ws, t.shape[-1]).float()
        out[role] = t.mean(dim=1, keepdim=True) if head_mode == "mean" else t
    return LayerFeatures(name, q=out["q"], k=out["k"], v=out["v"], attn=attn, timestep=timestep)
