"""LocNet: a small 3D CNN that predicts the affine θ (N, 3, 4), in canonical mm, of a canonical tensor.

θ maps output (standard) points to input points (see :mod:`.sampler`), so ``A(x, LocNet(x))`` is x
moved into standard coordinates. At initialisation θ is the identity for every input.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InputError
from .config import ArchConfig


@dataclass
class LocNetConfig(ArchConfig):
    """Architecture of a LocNet (JSON-able; stored in bundles and checkpoints)."""

    in_channels: int = 2
    channels: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    input_downsample: int = 2          # average-pool the input by this factor first (speed)
    pool_size: list[int] = field(default_factory=lambda: [4, 2, 2])  # adaptive pool (Z, Y, X) before the MLP
    hidden: int = 128
    translation_unit_mm: float = 10.0  # the net outputs translations in these units
    coord_channels: bool = True        # append normalised (x, y, z) coordinate channels to the input


def conv_block(cin: int, cout: int) -> nn.Sequential:
    """Strided 3x3x3 convolution -> instance norm -> leaky ReLU, named as MONAI's Convolution block names them
    (conv, adn.N, adn.A), so bundles trained with that block load unchanged."""
    adn = nn.Sequential(OrderedDict(N=nn.InstanceNorm3d(cout), A=nn.LeakyReLU(0.01)))
    return nn.Sequential(OrderedDict(conv=nn.Conv3d(cin, cout, 3, stride=2, padding=1), adn=adn))


class LocNet(nn.Module):
    """Strided 3D conv blocks -> adaptive average pool -> MLP -> 12 affine parameters (identity at init)."""

    def __init__(self, config: LocNetConfig | dict | None = None) -> None:
        super().__init__()
        cfg = config if isinstance(config, LocNetConfig) else LocNetConfig.from_dict(config or {})
        self.config = cfg
        self.downsample = nn.AvgPool3d(cfg.input_downsample) if cfg.input_downsample > 1 else nn.Identity()
        blocks, prev = [], cfg.in_channels + (3 if cfg.coord_channels else 0)
        for ch in cfg.channels:
            blocks.append(conv_block(prev, ch))
            prev = ch
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool3d(tuple(cfg.pool_size))
        n_pool = prev * cfg.pool_size[0] * cfg.pool_size[1] * cfg.pool_size[2]
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(n_pool, cfg.hidden), nn.LeakyReLU(0.01),
                                  nn.Linear(cfg.hidden, 12))
        last = self.head[-1]
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.copy_(torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]))  # θ = [I | 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """θ (N, 3, 4) in canonical mm for x (N, C, Z, Y, X)."""
        if x.dim() != 5 or x.shape[1] != self.config.in_channels:
            raise InputError(f"LocNet expects (N, {self.config.in_channels}, Z, Y, X) tensors, got {tuple(x.shape)}.")
        h = self.downsample(x)
        if self.config.coord_channels:
            h = torch.cat([h, coordinate_channels(h)], dim=1)
        p = self.head(self.pool(self.features(h)))
        linear = p[:, :9].reshape(-1, 3, 3)
        shift = p[:, 9:].reshape(-1, 3, 1) * self.config.translation_unit_mm
        return torch.cat([linear, shift], dim=2)

    def parameter_vector(self, theta: torch.Tensor) -> torch.Tensor:
        """θ (N, 3, 4) as the net's own 12 output units (linear part, translation / unit): for regression losses."""
        return torch.cat([theta[:, :, :3].reshape(-1, 9), theta[:, :, 3] / self.config.translation_unit_mm], dim=1)


def coordinate_channels(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, Z, Y, X) channels holding the normalised x, y, z coordinates in [-1, 1] of each voxel."""
    n, _, nz, ny, nx = x.shape
    axes = [torch.linspace(-1.0, 1.0, s, dtype=x.dtype, device=x.device) for s in (nz, ny, nx)]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([xx, yy, zz]).unsqueeze(0).expand(n, 3, nz, ny, nx)
