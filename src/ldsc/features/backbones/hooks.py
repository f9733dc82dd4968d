"""From captured attention calls to features on the token grid, and picking layers.

:class:`~ldsc.features.backbones.capture.AttentionCapture` records the q/k/v each attention layer
compares; :func:`grid_features` turns one layer's call into
:class:`~ldsc.features.backbones.base.LayerFeatures` on the token grid — the one place where
class/register/text tokens are dropped, tokens sub-sampled, heads averaged and (optionally)
attention probabilities formed. :func:`select_layers` turns a user's ``layers`` option into names.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import Tensor

from ldsc.features.backbones.base import HEAD_MODES, LayerFeatures
from ldsc.features.backbones.capture import AttentionCall

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
    call: AttentionCall,
    grid: tuple[int, int],
    *,
    offset: int = 0,
    head_mode: str = "keep",
    token_stride: int = 1,
    compute_attn: bool = False,
    timestep: Tensor | None = None,
) -> LayerFeatures:
    """One layer's captured attention call → :class:`LayerFeatures` with ``(B, heads, h, w, d)``.

    Args:
        call: the ``(B, heads, N, d)`` q, k, v the layer compared (:class:`AttentionCall`); the
            ``h*w`` image tokens are ``offset … offset + h*w - 1`` in row-major order, the other
            ``N - h*w`` (class, register, distillation or text tokens) are dropped.
        grid: the ``(h, w)`` token grid.
        head_mode: ``"keep"`` (one slice per head), ``"mean"`` (average over heads → 1) or
            ``"concat"`` (the heads' vectors side by side → one vector of ``heads·d``, the width of
            the layer's q/k/v projections: what the paper's code compares). The attention
            probabilities (``compute_attn``) are averaged over heads for ``mean`` and ``concat``.
        token_stride: keep every ``token_stride``-th token along each axis.
        compute_attn: also return the softmax attention ``(B, heads, n, n)`` between the kept
            grid tokens with the model's own logit scale: the network's attention over *all*
            tokens with the rows and columns of dropped tokens removed and each row renormalised,
            so it stays row-stochastic (the random walk restricted to the grid). Renormalising a
            softmax after dropping columns gives the softmax over the remaining keys, so it is
            computed as ``softmax(q kᵀ · scale)`` over the kept tokens directly.
        timestep: optional ``(B,)`` diffusion timesteps to attach.

    Features are returned in float32 whatever dtype the network ran in.
    """
    if head_mode not in HEAD_MODES:
        raise ValueError(f"heads must be one of {', '.join(HEAD_MODES)}, got {head_mode!r}")
    h, w = grid
    batch, _, n_tokens, _ = call.q.shape
    if not (0 <= offset and offset + h * w <= n_tokens and call.k.shape[2] == n_tokens):
        raise ValueError(
            f"layer {name}: {n_tokens} query and {call.k.shape[2]} key tokens do not hold a {h}x{w} grid "
            f"from token {offset} on"
        )
    device = call.q.device
    rows = torch.arange(0, h, token_stride, device=device)
    cols = torch.arange(0, w, token_stride, device=device)
    index = (rows[:, None] * w + cols[None, :]).flatten() + offset
    hs, ws = len(rows), len(cols)

    kept = {role: getattr(call, role).index_select(2, index) for role in "qkv"}  # (B, heads, hs*ws, d)
    if kept["k"].shape[1] != kept["q"].shape[1]:  # grouped keys/values: one per group of query heads
        repeat = kept["q"].shape[1] // kept["k"].shape[1]
        kept["k"], kept["v"] = (kept[r].repeat_interleave(repeat, dim=1) for r in "kv")
    attn = None
    if compute_attn:
        attn = attention_probs(kept["q"], kept["k"], call.scale)
        if head_mode != "keep":
            attn = attn.mean(dim=1, keepdim=True)

    out = {}
    for role, t in kept.items():
        t = t.reshape(batch, t.shape[1], hs, ws, t.shape[-1]).float()
        if head_mode == "mean":
            t = t.mean(dim=1, keepdim=True)
        elif head_mode == "concat":  # (B, heads, h, w, d) -> (B, 1, h, w, heads·d), head by head
            t = t.permute(0, 2, 3, 1, 4).reshape(batch, 1, hs, ws, -1)
        out[role] = t
    return LayerFeatures(name, q=out["q"], k=out["k"], v=out["v"], attn=attn, timestep=timestep)
