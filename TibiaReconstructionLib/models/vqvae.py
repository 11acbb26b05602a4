"""VQ-VAE with a spatial categorical latent, on canonical tensors (N, C, Z, Y, X).

Same encoder/decoder shape as the VAE. Each latent vector (E channels at 1/2^L resolution) is
replaced by its nearest codebook vector (K x E); gradients pass straight through to the encoder.
Loss = MSE + ||sg[z_e] - z_q||² + β ||z_e - sg[z_q]||²; the trainer steps β (``commitment_weight``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .autoencoder import Autoencoder, masked_mse
from .config import ArchConfig
from .vae import ConvDecoder, ConvEncoder, check_divisible


@dataclass
class VQVAEConfig(ArchConfig):
    in_channels: int = 2
    channels: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    embedding_dim: int = 8
    codebook_size: int = 256
    residual_from_level: int = 2


class VQVAE(Autoencoder):
    """Vector-quantised autoencoder; ``reconstruct`` is deterministic."""

    kind = "vqvae"

    def __init__(self, config: VQVAEConfig | dict | None = None) -> None:
        super().__init__()
        cfg = config if isinstance(config, VQVAEConfig) else VQVAEConfig.from_dict(config or {})
        self.arch = cfg
        self.config = {"type": self.kind, **cfg.to_dict()}
        self.encoder = ConvEncoder(cfg.in_channels, cfg.channels, cfg.embedding_dim, cfg.residual_from_level)
        self.decoder = ConvDecoder(cfg.embedding_dim, cfg.channels, cfg.in_channels, cfg.residual_from_level)
        k = cfg.codebook_size
        self.codebook = nn.Parameter(torch.empty(k, cfg.embedding_dim).uniform_(-1.0 / k, 1.0 / k))
        self.commitment_weight = 0.5

    def quantise(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codebook vectors (same shape as z_e (N, E, ...)) and their indices (N, ...)."""
        flat = z_e.movedim(1, -1).reshape(-1, z_e.shape[1])
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.T + self.codebook.pow(2).sum(1)
        idx = dist.argmin(1)
        z_q = self.codebook[idx].reshape(*z_e.shape[:1], *z_e.shape[2:], z_e.shape[1]).movedim(-1, 1)
        return z_q, idx.reshape(z_e.shape[:1] + z_e.shape[2:])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous encoder output z_e (N, E, Z/2^L, Y/2^L, X/2^L)."""
        check_divisible(x, len(self.arch.channels), self.arch.in_channels)
        return self.encoder(x)

    def reconstruct(self, x, visible=None):
        return self.decoder(self.quantise(self.encode(x))[0])

    def loss(self, x, target, visible=None):
        z_e = self.encode(x)
        z_q, _ = self.quantise(z_e)
        codebook = torch.mean((z_q - z_e.detach()) ** 2)
        commitment = torch.mean((z_e - z_q.detach()) ** 2)
        mse = masked_mse(self.decoder(z_e + (z_q - z_e).detach()), target, visible)
        total = mse + codebook + self.commitment_weight * commitment
        return total, {"mse": mse.item(), "codebook": codebook.item(), "commitment": commitment.item()}
