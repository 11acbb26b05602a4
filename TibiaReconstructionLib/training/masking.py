"""Random block masks and random affines for step 3, in canonical voxels and millimetres."""

from __future__ import annotations

import numpy as np
import torch

from ..geometry import euler_rotation


def block_visibility(occupancy: torch.Tensor, rng: np.random.Generator, blocks: tuple[int, int],
                     block_size: tuple[int, int], center: str = "bone") -> torch.Tensor:
    """Visibility masks (N, 1, Z, Y, X): 1 everywhere except a random number of random boxes.

    Each case gets ``blocks[0]..blocks[1]`` boxes with edges of ``block_size[0]..block_size[1]``
    voxels along each axis, centred on a random bone voxel (``occupancy > 0.5``) or, with
    ``center="uniform"`` or when a case has no bone, anywhere in the grid.
    """
    n, _, *shape = occupancy.shape
    visible = torch.ones(n, 1, *shape, device=occupancy.device)
    for i in range(n):
        bone = torch.nonzero(occupancy[i, 0] > 0.5).cpu().numpy() if center == "bone" else np.zeros((0, 3))
        for _ in range(rng.integers(blocks[0], blocks[1] + 1)):
            c = bone[rng.integers(len(bone))] if len(bone) else rng.integers(0, shape)
            edge = rng.integers(block_size[0], block_size[1] + 1, size=3)
            lo = np.maximum(c - edge // 2, 0)
            hi = np.minimum(lo + edge, shape)
            visible[i, 0, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 0.0
    return visible


def random_thetas(rng: np.random.Generator, n: int, max_angle_deg: float, max_translation_mm: float,
                  scale: tuple[float, float]) -> torch.Tensor:
    """(n, 3, 4) float64 θ: rotation (Euler angles each within ±max), isotropic scale and translation.

    Rotation and scale act about the canonical origin (the grid centre); translations are uniform
    within ±max_translation_mm along each axis.
    """
    out = np.zeros((n, 3, 4))
    for i in range(n):
        r = euler_rotation(rng.uniform(-max_angle_deg, max_angle_deg, size=3))[:3, :3]
        out[i, :, :3] = rng.uniform(*scale) * r
        out[i, :, 3] = rng.uniform(-max_translation_mm, max_translation_mm, size=3)
    return torch.from_numpy(out)
