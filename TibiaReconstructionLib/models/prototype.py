"""The tibia prototype x̄: one learnable tensor (1, C, Z, Y, X) on the canonical grid."""

from __future__ import annotations

import torch
from torch import nn


class Prototype(nn.Module):
    """Learnable prototype x̄ (1, C, Z, Y, X); ``prototype()`` returns it, ``expand(n)`` a batch of n views."""

    def __init__(self, channels: int, shape: tuple[int, int, int], init: torch.Tensor | None = None) -> None:
        super().__init__()
        value = torch.zeros(1, channels, *shape) if init is None else init.detach().float().reshape(1, channels, *shape)
        self.tensor = nn.Parameter(value.clone())

    def forward(self) -> torch.Tensor:
        return self.tensor

    def expand(self, n: int) -> torch.Tensor:
        return self.tensor.expand(n, *self.tensor.shape[1:])
