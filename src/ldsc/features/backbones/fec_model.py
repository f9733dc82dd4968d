"""FEC — "Neural Clustering based Visual Representation Learning" (Chen, Li, Yang, Wang, CVPR 2024),
the network whose every layer groups pixels explicitly, written here from its definition.

The data flow, on a ``(B, 3, H, W)`` image normalised with ImageNet's mean and std:

* **stem** (``patch_embed.proj``): the image and two coordinate channels (row ``i/(H-1) − ½`` and
  column ``j/(W-1) − ½``) → a 4 × 4, stride-4 convolution → ``(B, C₀, H/4, W/4)``;
* **four stages** of **cluster blocks** (``network.0``, ``.2``, ``.4``, ``.6``), each
  ``x + s₁·mixer(norm₁(x))`` then ``x + s₂·mlp(norm₂(x))`` (GroupNorm with one group, layer scales
  ``s``). The **cluster token mixer**: 1 × 1 projections ``f`` (the similarity space) and ``v``
  (values), split into heads; inside each fold (a tile of the grid; one fold in the classification
  variants) the centres are the average pooling of ``f`` and ``v`` to a ``p × p`` proposal grid;
  every point is compared with every centre by ``σ(β + α·cos(centre, point))`` and **assigned to
  the most similar centre alone**; each centre aggregates its points' values,
  ``(v_centre + Σ v_point) / (1 + points)``; each point receives its centre's aggregate times its
  own similarity; the heads are joined and projected (``proj``);
* **cluster pooling** between stages (``network.1``, ``.3``, ``.5``): centres are the 2 × 2 average
  pooling of the ``conv_f`` projection, every point joins its most similar centre by cosine (over
  the whole image: the grid halves), each centre aggregates like the mixer, and a stride-2
  3 × 3 convolution of the input (``conv_skip``) is added to the GroupNorm of the result;
* **head**: GroupNorm, global average, linear classifier.

Parameter names follow the official checkpoints (``timm`` ``.pth.tar`` files), so they load with
``strict=True``. Aggregation uses ``index_add_`` (no ``torch-scatter``).

Every mixer and pooling layer records what the network grouped with (:class:`ClusterRecord`): its
``f`` and ``v`` vectors per head on its grid, and the index of the centre each point joined.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: the variants of the paper (ImageNet-1k classification): blocks per stage, widths, MLP ratios,
#: proposal grid side per stage, heads and head width per stage
VARIANTS = {
    "small": dict(depths=(3, 4, 5, 2), dims=(32, 64, 196, 320), mlp_ratios=(8, 8, 4, 4), proposals=(4, 4, 2, 2),
                  heads=(4, 4, 8, 8), head_dims=(24, 24, 24, 24)),
    "base": dict(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4), proposals=(4, 4, 2, 2),
                 heads=(4, 4, 8, 8), head_dims=(32, 32, 32, 32)),
    "large": dict(depths=(4, 4, 12, 4), dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4), proposals=(4, 4, 2, 2),
                  heads=(6, 6, 12, 12), head_dims=(32, 32, 32, 32)),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ClusterRecord:
    """What one clustering layer grouped with, for a batch.

    ``f``, ``v``: ``(B, heads, h, w, d)`` on the layer's input grid; ``assign``: ``(B, heads, h, w)``
    the index of the centre each point joined, numbered per image over the layer's centre grid
    (``centres = (ch, cw)``, row-major; with folds, fold by fold)."""

    f: Tensor
    v: Tensor
    assign: Tensor
    centres: tuple[int, int]


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """``(…, M, D) × (…, N, D) → (…, M, N)`` cosine similarities."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(-2, -1)


def assign_and_aggregate(sim: Tensor, values: Tensor, centre_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Hard assignment of points to centres and the centres' aggregates.

    ``sim``: ``(G, M, N)`` similarity of each centre to each point (G groups: images × heads ×
    folds); ``values``: ``(G, N, D)``; ``centre_values``: ``(G, M, D)``. Returns ``(index (G, N)``
    of the most similar centre, that similarity ``(G, N)``, the aggregates ``(G, M, D)`` =
    ``(centre value + Σ of its points' values) / (1 + its points))``. Sums and counts are kept in
    float32 at least (a half-precision count is not exact beyond 256 or 2,048 points)."""
    best, index = sim.max(dim=1)
    G, M, N = sim.shape
    acc = torch.promote_types(values.dtype, torch.float32)
    flat = (index + torch.arange(G, device=index.device).unsqueeze(1) * M).reshape(-1)
    sums = torch.zeros(G * M, values.shape[-1], dtype=acc, device=values.device)
    sums.index_add_(0, flat, values.reshape(G * N, -1).to(acc))
    counts = torch.zeros(G * M, dtype=acc, device=values.device)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=acc))
    agg = (sums.view(G, M, -1) + centre_values.to(acc)) / (counts.view(G, M, 1) + 1.0)
    return index, best, agg.to(values.dtype)


def to_folds(t: Tensor, fh: int, fw: int) -> Tensor:
    """``(B, C, H, W)`` → ``(B·fh·fw, C, H/fh, W/fw)``: the grid cut into ``fh × fw`` tiles, tile-major."""
    B, C, H, W = t.shape
    if H % fh or W % fw:
        raise ValueError(f"a {H}x{W} grid cannot be cut into {fh}x{fw} folds")
    t = t.view(B, C, fh, H // fh, fw, W // fw).permute(0, 2, 4, 1, 3, 5)
    return t.reshape(B * fh * fw, C, H // fh, W // fw)


def from_folds(t: Tensor, fh: int, fw: int) -> Tensor:
    """The inverse of :func:`to_folds`."""
    G, C, h, w = t.shape
    B = G // (fh * fw)
    return t.view(B, fh, fw, C, h, w).permute(0, 3, 1, 4, 2, 5).reshape(B, C, fh * h, fw * w)


class GroupNorm1(nn.GroupNorm):
    """GroupNorm with one group (normalises over channels and positions of each sample)."""

    def __init__(self, channels: int):
        super().__init__(1, channels)


class PointReducer(nn.Module):
    """The stem: a strided convolution over the image and its two coordinate channels."""

    def __init__(self, in_channels: int, dim: int, patch: int = 4):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x))


class ClusterMixer(nn.Module):
    """The cluster token mixer of a block (see the module docstring)."""

    def __init__(self, dim: int, heads: int, head_dim: int, proposals: int, folds: int = 1):
        super().__init__()
        self.heads, self.head_dim, self.proposals, self.folds = heads, head_dim, proposals, folds
        self.f = nn.Conv2d(dim, heads * head_dim, kernel_size=1)
        self.v = nn.Conv2d(dim, heads * head_dim, kernel_size=1)
        self.proj = nn.Conv2d(heads * head_dim, dim, kernel_size=1)
        self.sim_alpha = nn.Parameter(torch.ones(1))
        self.sim_beta = nn.Parameter(torch.zeros(1))
        #: set to a list to receive one :class:`ClusterRecord` per forward
        self.records: list | None = None

    def forward(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        e, d, p, fo = self.heads, self.head_dim, self.proposals, self.folds
        f = self.f(x).reshape(B * e, d, H, W)  # channels head-major: head j holds j·d … j·d + d − 1
        v = self.v(x).reshape(B * e, d, H, W)
        f_t, v_t = (to_folds(t, fo, fo) for t in (f, v))  # (B·e·fo², d, h, w)
        G, _, h, w = f_t.shape
        centres = F.adaptive_avg_pool2d(f_t, (p, p)).flatten(2).transpose(1, 2)  # (G, M, d)
        centre_values = F.adaptive_avg_pool2d(v_t, (p, p)).flatten(2).transpose(1, 2)
        points, values = f_t.flatten(2).transpose(1, 2), v_t.flatten(2).transpose(1, 2)  # (G, N, d)
        sim = torch.sigmoid(self.sim_beta + self.sim_alpha * cosine_matrix(centres, points))  # (G, M, N)
        index, best, agg = assign_and_aggregate(sim, values, centre_values)
        out = agg.gather(1, index.unsqueeze(-1).expand(-1, -1, d)) * best.unsqueeze(-1)  # dispatch (G, N, d)
        out = from_folds(out.transpose(1, 2).reshape(G, d, h, w), fo, fo).reshape(B, e * d, H, W)
        if self.records is not None:
            # centre ids per image: fold-major (fold (a, b) holds centres (a·fo + b)·p² + …)
            M = p * p
            fold_id = torch.arange(fo * fo, device=x.device).repeat(B * e) * M
            ids = from_folds((index + fold_id.unsqueeze(1)).view(G, 1, h, w).float(), fo, fo).round().long()
            self.records.append(ClusterRecord(f=f.view(B, e, d, H, W).permute(0, 1, 3, 4, 2),
                                              v=v.view(B, e, d, H, W).permute(0, 1, 3, 4, 2),
                                              assign=ids.view(B, e, H, W), centres=(fo * p, fo * p)))
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W), linear over channels
        return self.fc2(self.act(self.fc1(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)


class ClusterBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, heads: int, head_dim: int, proposals: int, folds: int = 1,
                 layer_scale: float = 1e-5):
        super().__init__()
        self.norm1 = GroupNorm1(dim)
        self.token_mixer = ClusterMixer(dim, heads, head_dim, proposals, folds)
        self.norm2 = GroupNorm1(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.layer_scale_1 = nn.Parameter(layer_scale * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.layer_scale_1.view(1, -1, 1, 1) * self.token_mixer(self.norm1(x))
        return x + self.layer_scale_2.view(1, -1, 1, 1) * self.mlp(self.norm2(x))


class ClusterPool(nn.Module):
    """Cluster pooling between stages: the grid halves (see the module docstring)."""

    def __init__(self, in_dim: int, out_dim: int, stride: int = 2, folds: int = 1):
        super().__init__()
        self.stride, self.folds = stride, folds
        self.norm2 = GroupNorm1(out_dim)
        self.conv_f = nn.Conv2d(in_dim, out_dim, kernel_size=1)
        self.conv_v = nn.Conv2d(in_dim, out_dim, kernel_size=1)
        self.conv_skip = nn.Conv2d(in_dim, out_dim, kernel_size=3, padding=1, stride=2)
        self.records: list | None = None

    def forward(self, x: Tensor) -> Tensor:
        identity = self.conv_skip(x)
        v, f = self.conv_v(x), self.conv_f(x)
        B, C, H, W = f.shape
        fo = self.folds
        f_t, v_t = (to_folds(t, fo, fo) for t in (f, v))
        G, _, h, w = f_t.shape
        ch, cw = h // self.stride, w // self.stride
        centres = F.adaptive_avg_pool2d(f_t, (ch, cw)).flatten(2).transpose(1, 2)
        centre_values = F.adaptive_avg_pool2d(v_t, (ch, cw)).flatten(2).transpose(1, 2)
        sim = cosine_matrix(centres, f_t.flatten(2).transpose(1, 2))  # (G, M, N)
        index, _, agg = assign_and_aggregate(sim, v_t.flatten(2).transpose(1, 2), centre_values)
        out = from_folds(agg.transpose(1, 2).reshape(G, C, ch, cw), fo, fo)
        if self.records is not None:
            M = ch * cw
            fold_id = torch.arange(fo * fo, device=x.device).repeat(B) * M
            ids = from_folds((index + fold_id.unsqueeze(1)).view(G, 1, h, w).float(), fo, fo).round().long()
            self.records.append(ClusterRecord(f=f.unsqueeze(1).permute(0, 1, 3, 4, 2),
                                              v=v.unsqueeze(1).permute(0, 1, 3, 4, 2),
                                              assign=ids.view(B, 1, H, W), centres=(fo * ch, fo * cw)))
        return identity + self.norm2(out)


class FEC(nn.Module):
    """The FEC classification network (a variant of :data:`VARIANTS`, or its settings)."""

    def __init__(self, depths, dims, mlp_ratios, proposals, heads, head_dims, folds=(1, 1, 1, 1),
                 num_classes: int = 1000, layer_scale: float = 1e-5):
        super().__init__()
        self.patch_embed = PointReducer(5, dims[0])
        network: list[nn.Module] = []
        for s, depth in enumerate(depths):
            network.append(nn.Sequential(*[ClusterBlock(dims[s], mlp_ratios[s], heads[s], head_dims[s], proposals[s],
                                                        folds[s], layer_scale) for _ in range(depth)]))
            if s < len(depths) - 1:
                network.append(ClusterPool(dims[s], dims[s + 1], stride=2, folds=folds[s + 1]))
        self.network = nn.ModuleList(network)
        self.norm = GroupNorm1(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    @classmethod
    def variant(cls, name: str, **kwargs) -> "FEC":
        if name not in VARIANTS:
            raise ValueError(f"FEC variant must be one of {', '.join(VARIANTS)}, not {name!r}")
        return cls(**VARIANTS[name], **kwargs)

    @staticmethod
    def with_coordinates(x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` → ``(B, 5, H, W)``: the row and column coordinates, each in [−½, ½]."""
        B, _, H, W = x.shape
        rows = torch.arange(H, device=x.device, dtype=x.dtype) / max(H - 1, 1) - 0.5
        cols = torch.arange(W, device=x.device, dtype=x.dtype) / max(W - 1, 1) - 0.5
        grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij")).unsqueeze(0).expand(B, -1, -1, -1)
        return torch.cat([x, grid], dim=1)

    def features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(self.with_coordinates(x))
        for stage in self.network:
            x = stage(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.features(x)).mean((-2, -1)))

    def clustering_layers(self) -> dict[str, nn.Module]:
        """Every mixer and pooling layer by its parameter path (``network.2.1.token_mixer``,
        ``network.1``), in execution order."""
        return {name: m for name, m in self.named_modules() if isinstance(m, (ClusterMixer, ClusterPool))}
