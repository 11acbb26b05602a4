"""The tibia's length when the fracture mask hides its proximal end (canonical mm: z along the tibia, superior).

The model infers the tibia's size from the visible bone. A fracture mask over a whole end of the tibia (a slab over a
tibial plateau fracture) leaves it the shaft only, and it then predicts a typical length: a held-out 442 mm tibia
whose top 35 % was hidden came out 344 mm long (RMSD 22.5 mm). The tibia mask still shows where that end lies (it
holds every fragment, hidden or not), and the proximal end stays where it was: it goes with the knee, as does the
proximal main fragment the prediction is placed on. So when the mask reaches more than HIDDEN_END_MM beyond the
visible bone at the proximal end (and not at the distal end too: then nothing is left to hold the other end), θ is
stretched along the long axis, about the reconstruction's distal end, until the reconstruction reaches the mask's
proximal end; one that ends within TOLERANCE_MM of it, or beyond it, is left as it is. The distal end is no such
guide: it lies wherever the distal fragment was displaced to (held-out phantoms with their distal 30 % hidden:
stretching to it made 3 of 8 worse, by up to 2.2 mm), so a hidden distal end is only reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .geometry import Grid
from .prepare import z_range

HIDDEN_END_MM = 20.0
TOLERANCE_MM = 5.0


@dataclass(frozen=True)
class Stretch:
    """θ stretched (1, 3, 4), by ``factor`` along canonical z, to reach the hidden proximal end."""

    theta: torch.Tensor
    factor: float


def hidden_end(seen: np.ndarray, tibia: tuple[float, float], grid: Grid) -> str | None:
    """'proximal' or 'distal' when the fracture mask hides that end of the tibia: the tibia mask (``tibia``: its
    canonical z range) reaches more than HIDDEN_END_MM beyond the visible bone (``seen``, Z, Y, X on the canonical
    ``grid``) there and not at the other end; else None."""
    visible = z_range(seen > 0.5, grid)
    if visible is None:
        return None
    below, above = visible[0] - tibia[0] > HIDDEN_END_MM, tibia[1] - visible[1] > HIDDEN_END_MM
    return None if below == above else "proximal" if above else "distal"


def stretch_to_tibia(theta: torch.Tensor, recon: torch.Tensor, seen: np.ndarray, tibia: tuple[float, float],
                     grid: Grid) -> Stretch | None:
    """θ (1, 3, 4; standard -> canonical) stretched so that the reconstruction (1, C, Z, Y, X; standard coordinates;
    its last channel the occupancy) reaches the tibia mask's proximal end where the fracture mask hides it
    (:func:`hidden_end`); None when it does not, or the reconstruction already reaches it."""
    occupied = np.argwhere(recon[0, -1].detach().cpu().numpy() > 0.5)
    if hidden_end(seen, tibia, grid) != "proximal" or len(occupied) == 0:
        return None
    m = theta[0].detach().cpu().double().numpy()
    z = grid.index_to_physical(occupied[:, ::-1].astype(float)) @ m[2, :3] + m[2, 3]
    low, high = float(z.min()), float(z.max())
    if high >= tibia[1] - TOLERANCE_MM:
        return None
    factor = (tibia[1] - low) / (high - low)
    stretch = np.eye(4)
    stretch[2, 2], stretch[2, 3] = factor, low * (1.0 - factor)  # z -> low + factor (z - low)
    stretched = (stretch @ np.vstack([m, [0.0, 0.0, 0.0, 1.0]]))[:3]
    return Stretch(torch.as_tensor(stretched[None], dtype=theta.dtype, device=theta.device), float(factor))
