"""What every autoencoder (PCA, VAE, VQ-VAE) offers, on aligned canonical tensors (N, C, Z, Y, X)."""

from __future__ import annotations

import torch
from torch import nn


def masked_mse(pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the voxels where ``visible`` (N, 1, Z, Y, X) is 1 (all voxels when None).

    Voxels with ``visible == 0`` contribute nothing, whatever ``pred`` and ``target`` hold there.
    """
    if visible is None:
        return torch.mean((pred - target) ** 2)
    v = visible.to(pred.dtype)
    sq = torch.where(v > 0, (pred - target) ** 2, torch.zeros((), dtype=pred.dtype, device=pred.device)) * v
    return sq.sum() / (v.expand_as(pred).sum().clamp_min(1.0))


class Autoencoder(nn.Module):
    """Base class: ``reconstruct`` (deterministic in eval mode) and ``loss`` (total, parts)."""

    kind: str = ""
    config: dict

    def reconstruct(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction x' of x; ``visible`` (N, 1, ...) marks observed voxels (used by PCA, ignored by nets)."""
        raise NotImplementedError

    def loss(self, x: torch.Tensor, target: torch.Tensor,
             visible: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss of reconstructing ``target`` from ``x``, MSE restricted to ``visible`` voxels."""
        raise NotImplementedError
