"""``graph=attn``: the network's own softmax attention as each layer's random walk.

The softmax attention of a layer is already row-stochastic, so it *is* a random-walk matrix
``P`` over the layer's tokens — no kNN, no threshold. For each layer of a batch the builder
averages the attention over heads (or keeps one graph per head) and lays the images' blocks on
the diagonal: tokens of different images are not connected (attention never crosses images).

Where the attention comes from: ``LayerFeatures.attn`` when the backbone captured it
(``backbone.compute_attn=true``: computed from the captured q and k at capture time); otherwise it is computed here as ``softmax(q kᵀ / √d)``
over the layer's grid tokens. For backbones that keep heads (the default) the two are the
same: dropping the class token's column from a softmax and renormalising the row gives the
softmax over the remaining keys. With ``backbone.heads=mean`` the recomputed attention is that
of the head-averaged vectors, not the network's.

Attention matrices are dense (``h·w × h·w`` per image), so only layers with few tokens are
allowed (``max_tokens``). ``P`` is not symmetric, so the graph keeps two things: ``P`` itself
(the paper's objective uses ``P``) and the symmetric affinity ``W = (P + Pᵀ)/2`` with its degrees,
from which :meth:`~ldsc.graphs.knn.LayerGraph.sym` forms ``D^{-1/2} W D^{-1/2}`` for the eigen-solvers
(default, exact) and the alignment monitor, which need a symmetric operator. ``P`` of these
graphs is the network's attention, not ``D⁻¹W``.

Reuse: the paper's single-image runs replace, with probability ``reuse_prob``, a layer's fresh
attention by one from a FIFO buffer of the last ``buffer_size`` attention graphs (of any layer)
— a cheap way to average over more noise draws and timesteps. A buffered graph is about the
tokens of the images it was built from, so reuse only happens for one-image batches (the
single-image mode, where every batch is the same image).
"""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor

from ldsc.features.backbones.base import LayerFeatures
from ldsc.errors import ConfigError
from ldsc.graphs.knn import LayerGraph


def layer_attention(layer: LayerFeatures) -> Tensor:
    """``(B, heads, n, n)`` row-stochastic attention between the ``n = h·w`` grid tokens."""
    if layer.attn is not None:
        return layer.attn.float()
    q, k = layer.vectors("q"), layer.vectors("k")
    b, heads, h, w, d = q.shape
    logits = q.reshape(b, heads, h * w, d).float() @ k.reshape(b, heads, h * w, d).float().transpose(-1, -2)
    return (logits * d**-0.5).softmax(dim=-1)


def block_diagonal(probs: Tensor) -> Tensor:
    """``(B, n, n)`` per-image matrices → ``(B·n, B·n)`` sparse COO, tokens ordered ``(b, token)``."""
    b, n, _ = probs.shape
    offset = (torch.arange(b, device=probs.device) * n).view(b, 1, 1)
    local = torch.arange(n, device=probs.device)
    rows = (offset + local.view(1, n, 1)).expand(b, n, n)
    cols = (offset + local.view(1, 1, n)).expand(b, n, n)
    indices = torch.stack([rows.reshape(-1), cols.reshape(-1)])
    return torch.sparse_coo_tensor(indices, probs.reshape(-1), (b * n, b * n), check_invariants=False).coalesce()


class AttentionGraphBuilder:
    """Builds one attention graph per layer (per head with ``heads="separate"``).

    Args:
        heads: ``"mean"`` (average the attention over heads: still row-stochastic) or
            ``"separate"`` (one graph per head).
        buffer_size: attention graphs kept for reuse (FIFO).
        reuse_prob: probability of replacing a layer's attention by a buffered one
            (one-image batches only; see the module docstring). 0 disables reuse.
        max_tokens: the largest ``h·w`` per image allowed (graphs are dense within an image).
        seed: seed of the generator behind the reuse decisions (runs reproduce).

    Callable as ``builder(features, base_size) -> list[LayerGraph]``.
    """

    #: attention graphs are built per image from the store, never kept in the graph store
    rebuild = True

    def __init__(
        self,
        heads: str = "mean",
        buffer_size: int = 7,
        reuse_prob: float = 0.75,
        max_tokens: int = 1024,
        seed: int = 0,
    ):
        if heads not in ("mean", "separate"):
            raise ValueError(f"heads must be 'mean' or 'separate' for attention graphs, not {heads!r}")
        if not 0.0 <= float(reuse_prob) <= 1.0:
            raise ValueError(f"reuse_prob must be in [0, 1], got {reuse_prob}")
        self.heads = heads
        self.reuse_prob = float(reuse_prob)
        self.max_tokens = int(max_tokens)
        self.buffer: deque[LayerGraph] = deque(maxlen=max(int(buffer_size), 0))
        self.generator = torch.Generator().manual_seed(int(seed))
        self.timings: dict = {}
        self.layer_timings: list = []

    #: the vector kinds the feature store must hold (attention is recomputed from q and k)
    kinds = ["k", "q"]

    def graphs_of(self, layer: LayerFeatures, base_size: int) -> list[LayerGraph]:
        """The fresh attention graph(s) of one layer."""
        h, w = layer.grid
        if h * w > self.max_tokens:
            raise ConfigError(
                f"graph=attn: layer {layer.name} has {h}x{w}={h * w} tokens per image, more than "
                f"graph.max_tokens={self.max_tokens}; attention graphs are dense, so select layers with "
                f"smaller grids (backbone.layers, backbone.max_grid, backbone.token_stride) or raise graph.max_tokens."
            )
        probs = layer_attention(layer)  # (B, heads, n, n)
        per_head = [probs.mean(dim=1)] if self.heads == "mean" else list(probs.unbind(dim=1))
        graphs = []
        for j, p in enumerate(per_head):
            P = block_diagonal(p)
            name = layer.name if len(per_head) == 1 else f"{layer.name}/head{j}"
            W = ((P + P.t()) * 0.5).coalesce()  # symmetric part: what the eigen-solvers' operator needs
            degree = torch.sparse.sum(W, dim=1).to_dense()
            graphs.append(LayerGraph(name, (h, w), layer.batch_size, W=W, P=P, degree=degree, weight=base_size / h))
        return graphs

    # -- the GraphBuilder protocol (ldsc.graphs.base) --------------------------------------------
    def dataset_graphs(self, store, base_size: int, progress: bool = True, device=None) -> list[LayerGraph]:
        """Every image's attention graphs, built like one batch holding them all (dense per image,
        no search)."""
        return self(store.features(range(store.n_images)), base_size)

    def memory_estimate(self, n_images: int, layers, draws: int, base_size: int, shards: int = 1) -> None:
        """No estimate: attention graphs are bounded per image by ``max_tokens``."""
        return None

    def search_method(self, n_tokens: int, device=None) -> str:
        return "exact"

    def stored_parts(self, graphs: list) -> list:
        """Attention graphs are cheap to form again: none is kept in the graph store."""
        return []

    def from_stored(self, parts: list, store, base_size: int) -> list:
        raise NotImplementedError("attention graphs are never stored")

    def describe(self) -> str:
        return f"graph=attn with graph.heads={self.heads}"

    def __call__(self, features: list[LayerFeatures], base_size: int) -> list[LayerGraph]:
        fresh = [g for layer in features for g in self.graphs_of(layer, base_size)]
        out = []
        for graph in fresh:
            reuse = bool(torch.rand((), generator=self.generator) < self.reuse_prob)
            candidates = [g for g in self.buffer if g.n_images == graph.n_images == 1]
            if reuse and candidates:
                pick = int(torch.randint(len(candidates), (), generator=self.generator))
                out.append(candidates[pick].to(graph.P.device))
            else:
                out.append(graph)
        self.buffer.extend(fresh)
        return out
