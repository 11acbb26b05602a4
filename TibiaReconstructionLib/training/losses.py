"""D-SSIM = (1 - SSIM) / 2 on 3D tensors (N, C, Z, Y, X) with a separable Gaussian window.

Same definition as MONAI's SSIM (Gaussian σ = 1.5, K1 = 0.01, K2 = 0.03, valid region only) but
filtered axis by axis (a banded matrix product along X, 1D convolutions along Y and Z), and with a
reference of batch size 1 (the prototype) filtered once, which is much faster on CPUs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gaussian(win: int, sigma: float, dtype, device) -> torch.Tensor:
    r = torch.arange(win, dtype=dtype, device=device) - (win - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _blur(maps: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Valid Gaussian filtering of (N, K, Z, Y, X) along X, Y and Z."""
    win, nx = len(g), maps.shape[-1]
    band = torch.zeros(nx, nx - win + 1, dtype=maps.dtype, device=maps.device)
    for j in range(nx - win + 1):
        band[j:j + win, j] = g
    maps = maps @ band
    k = maps.shape[1]
    maps = F.conv3d(maps, g.reshape(1, 1, 1, win, 1).expand(k, 1, 1, win, 1), groups=k)
    return F.conv3d(maps, g.reshape(1, 1, win, 1, 1).expand(k, 1, win, 1, 1), groups=k)


def ssim(x: torch.Tensor, y: torch.Tensor, win: int = 7, sigma: float = 1.5, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM per case and channel, shape (N, C); ``y`` may have batch size 1 (broadcast).

    The window shrinks (to an odd size) to fit small tensors.
    """
    win = min([win] + [s - (1 - s % 2) for s in x.shape[2:]])
    n, c = x.shape[:2]
    g = _gaussian(win, sigma, x.dtype, x.device)
    mx, mxx = _blur(torch.cat([x, x * x], dim=1), g).split(c, dim=1)
    my, myy = _blur(torch.cat([y, y * y], dim=1), g).split(c, dim=1)
    mxy = _blur(x * y, g)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mxmy, mx2, my2 = mx * my, mx * mx, my * my
    ssim_map = ((2 * mxmy + c1) * (2 * (mxy - mxmy) + c2)) / ((mx2 + my2 + c1) * (mxx - mx2 + myy - my2 + c2))
    return ssim_map.reshape(n, c, -1).mean(-1)


def dssim(x: torch.Tensor, y: torch.Tensor, win: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """D-SSIM per case (N,), averaged over channels: (1 - SSIM) / 2. ``y`` may have batch size 1."""
    return ((1.0 - ssim(x, y, win, sigma)) / 2.0).mean(1)
