"""U-Net-shaped VAE with a spatial latent (no encoder->decoder skips), on canonical tensors (N, C, Z, Y, X).

The encoder halves the resolution ``len(channels)`` times (strided convs, instance norm, residual
units on the coarser levels); the latent has ``latent_channels`` channels at 1/2^L resolution. The
decoder mirrors it with transposed convs and ends in a sigmoid (both channels live in [0, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from ..errors import InputError
from .autoencoder import Autoencoder, masked_mse
from .config import ArchConfig


@dataclass
class VAEConfig(ArchConfig):
    in_channels: int = 2
    channels: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    latent_channels: int = 8
    residual_from_level: int = 2   # levels >= this (0-based) get a residual unit in encoder and decoder
    beta: float = 1e-2             # KL weight (KL averaged per latent element)


def _down(cin: int, cout: int) -> nn.Module:
    return Convolution(3, cin, cout, strides=2, kernel_size=3, norm="INSTANCE", act="LEAKYRELU")


def _up(cin: int, cout: int, conv_only: bool = False) -> nn.Module:
    return Convolution(3, cin, cout, strides=2, kernel_size=3, norm="INSTANCE", act="LEAKYRELU",
                       is_transposed=True, conv_only=conv_only)


def _res(ch: int) -> nn.Module:
    return ResidualUnit(3, ch, ch, subunits=1, norm="INSTANCE", act="LEAKYRELU")


class ConvEncoder(nn.Module):
    """(N, C, Z, Y, X) -> (N, out_channels, Z/2^L, Y/2^L, X/2^L)."""

    def __init__(self, in_channels: int, channels: list[int], out_channels: int, residual_from_level: int) -> None:
        super().__init__()
        layers, prev = [], in_channels
        for level, ch in enumerate(channels):
            layers.append(_down(prev, ch))
            if level >= residual_from_level:
                layers.append(_res(ch))
            prev = ch
        layers.append(Convolution(3, prev, out_channels, kernel_size=1, conv_only=True))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """(N, latent, Z/2^L, ...) -> (N, out_channels, Z, Y, X) in [0, 1]."""

    def __init__(self, latent_channels: int, channels: list[int], out_channels: int, residual_from_level: int) -> None:
        super().__init__()
        layers = [Convolution(3, latent_channels, channels[-1], kernel_size=1, norm="INSTANCE", act="LEAKYRELU")]
        for level in range(len(channels) - 1, 0, -1):
            if level >= residual_from_level:
                layers.append(_res(channels[level]))
            layers.append(_up(channels[level], channels[level - 1]))
        last = _up(channels[0], out_channels, conv_only=True)
        nn.init.constant_(last.conv.bias, -4.0)  # start near the mostly empty background: sigmoid(-4) = 0.018
        layers += [last, nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def check_divisible(x: torch.Tensor, levels: int, in_channels: int) -> None:
    """Raise InputError unless x is (N, in_channels, Z, Y, X) with Z, Y, X divisible by 2^levels."""
    f = 2 ** levels
    if x.dim() != 5 or x.shape[1] != in_channels or any(s % f for s in x.shape[2:]):
        raise InputError(f"This autoencoder expects (N, {in_channels}, Z, Y, X) tensors with Z, Y, X divisible by "
                         f"{f} ({levels} downsampling levels), got {tuple(x.shape)}. Choose a canonical grid size "
                         f"divisible by {f} or fewer levels.")


class VAE(Autoencoder):
    """Variational autoencoder with a spatial Gaussian latent; ``reconstruct`` decodes the mean in eval mode."""

    kind = "vae"

    def __init__(self, config: VAEConfig | dict | None = None) -> None:
        super().__init__()
        cfg = config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config or {})
        self.arch = cfg
        self.config = {"type": self.kind, **cfg.to_dict()}
        self.encoder = ConvEncoder(cfg.in_channels, cfg.channels, 2 * cfg.latent_channels, cfg.residual_from_level)
        self.decoder = ConvDecoder(cfg.latent_channels, cfg.channels, cfg.in_channels, cfg.residual_from_level)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance (N, E, Z/2^L, Y/2^L, X/2^L) of q(z | x)."""
        check_divisible(x, len(self.arch.channels), self.arch.in_channels)
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-20.0, 10.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def reconstruct(self, x, visible=None):
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.decode(z)

    def loss(self, x, target, visible=None):
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        mse = masked_mse(self.decode(z), target, visible)
        kl = 0.5 * torch.mean(mu ** 2 + logvar.exp() - 1.0 - logvar)
        return mse + self.arch.beta * kl, {"mse": mse.item(), "kl": kl.item()}
