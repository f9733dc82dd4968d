"""graph=attn: softmax attention as the random walk, with the reuse buffer."""

from __future__ import annotations

import pytest
import torch

from ldsc.graphs.attention import AttentionGraphBuilder, block_diagonal, layer_attention
from ldsc.features.backbones.capture import AttentionCall
from ldsc.features.backbones.hooks import grid_features
from ldsc.errors import ConfigError


def call_of(raw: dict, heads: int) -> AttentionCall:
    """The attention call of ``(B, N, heads * d)`` projections: split by head, scale 1/√d."""
    q, k, v = (raw[r].view(raw[r].shape[0], raw[r].shape[1], heads, -1).transpose(1, 2) for r in "qkv")
    return AttentionCall(q, k, v, scale=q.shape[-1] ** -0.5)


def features(batch=2, heads=3, h=3, w=4, d=5, prefix=1, seed=0, name="layer.0", attn=True):
    g = torch.Generator().manual_seed(seed)
    raw = {r: torch.randn(batch, prefix + h * w, heads * d, generator=g) for r in "qkv"}
    return grid_features(name, call_of(raw, heads), (h, w), offset=prefix, compute_attn=attn)


def test_attention_graph_is_the_head_averaged_block_diagonal_attention():
    layer = features()
    (graph,) = AttentionGraphBuilder(reuse_prob=0.0)([layer], base_size=24)
    assert graph.grid == (3, 4) and graph.n_images == 2 and graph.weight == 24 / 3
    P = graph.P.to_dense()
    assert P.shape == (24, 24)
    assert torch.allclose(P.sum(1), torch.ones(24))
    assert torch.allclose(P[:12, :12], layer.attn[0].mean(0)) and torch.allclose(P[12:, 12:], layer.attn[1].mean(0))
    assert P[:12, 12:].abs().max() == 0  # no edges across images
    W = graph.W.to_dense()  # the symmetric part, for the eigen-solvers
    assert torch.allclose(W, (P + P.T) / 2) and torch.allclose(graph.degree, W.sum(1))
    S = graph.sym().to_dense()
    assert torch.allclose(S, S.T)
    heads = AttentionGraphBuilder(heads="separate", reuse_prob=0.0)([layer], base_size=24)
    assert [g.name for g in heads] == ["layer.0/head0", "layer.0/head1", "layer.0/head2"]


def test_attention_is_the_networks_attention_restricted_to_the_grid():
    """Both ways of getting a layer's attention (at capture time, or later from q and k) equal an
    independent reference: the attention over *all* tokens (class token included) computed by
    hand, the class token's row and column dropped, each row renormalised."""
    batch, heads, h, w, d, prefix = 2, 3, 3, 4, 5, 1
    g = torch.Generator().manual_seed(0)
    raw = {r: torch.randn(batch, prefix + h * w, heads * d, generator=g) for r in "qkv"}
    q = raw["q"].view(batch, -1, heads, d).transpose(1, 2)
    k = raw["k"].view(batch, -1, heads, d).transpose(1, 2)
    full = torch.exp(q @ k.transpose(-1, -2) / d**0.5)
    full = full / full.sum(-1, keepdim=True)  # (B, heads, 13, 13), the network's attention
    grid = full[:, :, prefix:, prefix:]
    reference = grid / grid.sum(-1, keepdim=True)
    captured = grid_features("l", call_of(raw, heads), (h, w), offset=prefix, compute_attn=True)
    bare = grid_features("l", call_of(raw, heads), (h, w), offset=prefix, compute_attn=False)
    assert bare.attn is None
    assert torch.allclose(captured.attn, reference, atol=1e-5)
    assert torch.allclose(layer_attention(bare), reference, atol=1e-5)


def test_block_diagonal_layout():
    probs = torch.arange(8.0).view(2, 2, 2)
    dense = block_diagonal(probs).to_dense()
    assert torch.equal(dense, torch.tensor([[0.0, 1, 0, 0], [2, 3, 0, 0], [0, 0, 4, 5], [0, 0, 6, 7]]))


def test_reuse_buffer_is_seeded_and_single_image_only():
    def run(seed, batch=1):
        builder = AttentionGraphBuilder(buffer_size=3, reuse_prob=0.6, seed=seed)
        out = []
        for step in range(8):
            graphs = builder([features(batch=batch, seed=step, name=f"layer.{step % 2}")], base_size=12)
            out.append(graphs[0].P.to_dense())
        return out, builder

    a, builder = run(0)
    b, _ = run(0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len(builder.buffer) == 3
    fresh = [AttentionGraphBuilder(reuse_prob=0.0)([features(seed=s, batch=1)], 12)[0].P.to_dense() for s in range(8)]
    reused = [i for i in range(8) if not torch.equal(a[i], fresh[i])]
    assert reused and reused[0] > 0  # some layers were replaced, never before anything was buffered
    for i in reused:
        assert any(torch.equal(a[i], fresh[j]) for j in range(max(0, i - 3), i))  # from the last 3
    multi, _ = run(0, batch=2)  # batches of several images never reuse
    assert all(torch.equal(m, AttentionGraphBuilder(reuse_prob=0.0)([features(seed=s, batch=2)], 12)[0].P.to_dense())
               for s, m in enumerate(multi))


def test_too_many_tokens_is_a_clear_error():
    with pytest.raises(ConfigError, match="max_tokens"):
        AttentionGraphBuilder(max_tokens=10)([features()], base_size=12)
