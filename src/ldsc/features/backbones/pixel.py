"""The ``pixel`` backbone: classical normalised-cut affinities from colour and position.

No weights, no download. For each grid in ``grids`` the image is area-averaged to that grid and
converted to CIE Lab. Token vectors are random Fourier features, so that the cosine similarity of
two tokens approximates a Gaussian kernel ``exp(-|a - b|² / 2)`` of their (scaled) attributes:

* ``q = k`` — features of ``(L, a, b) / sigma_color`` and ``(x, y) / sigma_xy``: groups by colour
  *and* place (a "where"-like graph);
* ``v`` — features of the colour alone: groups by colour anywhere (a "what"-like graph).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ldsc.features.backbones.base import Backbone, LayerFeatures


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB in [0, 1], ``(B, 3, H, W)`` -> CIE Lab (D65), ``(B, 3, H, W)``; L in [0, 100]."""
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = rgb.new_tensor([[0.412453, 0.357580, 0.180423],
                        [0.212671, 0.715160, 0.072169],
                        [0.019334, 0.119193, 0.950227]])
    xyz = torch.einsum("ij,bjhw->bihw", m, lin)
    xyz = xyz / rgb.new_tensor([0.950456, 1.0, 1.088754])[None, :, None, None]
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    L = 116 * f[:, 1] - 16
    a = 500 * (f[:, 0] - f[:, 1])
    b = 200 * (f[:, 1] - f[:, 2])
    return torch.stack([L, a, b], 1)


def fourier_features(x: Tensor, omega: Tensor) -> Tensor:
    """``(..., c)`` attributes -> ``(..., 2D)`` unit vectors whose dot products average
    ``cos(ω·(a − b))`` over the ``D`` frequencies ``omega (c, D)``: a Gaussian kernel estimate."""
    proj = x @ omega
    return torch.cat([proj.cos(), proj.sin()], -1) / math.sqrt(omega.shape[1])


class PixelBackbone(Backbone):
    """Colour/position affinities at a few pyramid scales (see module docstring).

    Args:
        divisors: layers at ``base_size // d`` for each ``d`` (``[1, 2, 4]`` at a 64 base grid
            gives 64, 32 and 16); used unless ``grids`` is given.
        grids: explicit token grid side of each "layer" (e.g. ``[32, 16]``).
        input_size: side images are resized to before pooling; ``None``: twice the base grid.
        sigma_color: kernel width in Lab units.
        sigma_xy: kernel width in units of the image side.
        n_features: random frequencies per kernel (vectors have ``2·n_features`` entries).
        seed: seed of the random frequencies (fixed: the backbone is deterministic).
    """

    name = "pixel"

    def __init__(self, divisors=(1, 2, 4), grids=None, input_size: int | None = None, sigma_color: float = 8.0,
                 sigma_xy: float = 0.15, n_features: int = 256, seed: int = 0, draws: int = 1,
                 resize: int | None = None, crop: int | None = None):
        super().__init__()
        self.draws = int(draws)
        self.set_view(resize, crop)
        self.divisors = [int(d) for d in divisors]
        self.explicit_grids = [int(g) for g in grids] if grids else None
        self.explicit_input = input_size
        self.set_base_size(32)
        self.sigma_color, self.sigma_xy = float(sigma_color), float(sigma_xy)
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("omega_qk", torch.randn(5, n_features, generator=gen), persistent=False)
        self.register_buffer("omega_v", torch.randn(3, n_features, generator=gen), persistent=False)

    def set_base_size(self, base_size: int) -> None:
        self.grids = self.explicit_grids or sorted({max(1, base_size // d) for d in self.divisors}, reverse=True)
        if min(self.grids) < 1:
            raise ValueError(f"pixel backbone grids must be positive sides, got {self.grids}")
        self.input_size = int(self.explicit_input or 2 * max(base_size, max(self.grids)))

    def pass_bytes(self, batch_size: int) -> int:
        """Every layer's ``q = k`` and ``v`` (float32, ``2·n_features`` each), the largest layer's
        transients (projections, cosines, sines: about four more of its vectors), the input and
        the float16 copies written to the store."""
        D = int(self.omega_qk.shape[1])
        layers = sum(g * g for g in self.grids) * 2 * D * 4 * 2
        transient = 4 * max(self.grids) ** 2 * D * 4 * 2
        return int(batch_size * (layers * 1.25 + transient + 3 * self.input_size ** 2 * 4))

    def extract(self, images: Tensor, generator: torch.Generator | None = None) -> list[LayerFeatures]:
        images = images.to(self.omega_qk.device, torch.float32)
        B = images.shape[0]
        layers = []
        for g in self.grids:
            small = F.adaptive_avg_pool2d(images, (g, g))
            lab = rgb_to_lab(small).permute(0, 2, 3, 1) / self.sigma_color  # (B, g, g, 3)
            coords = (torch.arange(g, device=images.device, dtype=torch.float32) + 0.5) / g
            yy, xx = torch.meshgrid(coords, coords, indexing="ij")
            xy = torch.stack([xx, yy], -1).expand(B, g, g, 2) / self.sigma_xy
            qk = fourier_features(torch.cat([lab, xy], -1), self.omega_qk)[:, None]  # (B,1,g,g,2D)
            v = fourier_features(lab, self.omega_v)[:, None]
            layers.append(LayerFeatures(name=f"pixel{g}", q=qk, k=qk, v=v))
        return layers
