"""A fracture mask over a whole end of the tibia (hidden_end.py): θ stretched along the tibia until the reconstruction
reaches the tibia mask's proximal end; nothing done for a hidden distal end, when no end (or both) is hidden, or when
the reconstruction reaches it."""

import numpy as np
import pytest
import torch

from TibiaReconstructionLib.geometry import Grid, apply_affine
from TibiaReconstructionLib.hidden_end import HIDDEN_END_MM, hidden_end, stretch_to_tibia
from TibiaReconstructionLib.models.sampler import identity_theta, theta_to_matrix
from TibiaReconstructionLib.prepare import z_range

GRID = Grid((8, 8, 100), (2.0, 2.0, 2.0), (-7.0, -7.0, -99.0))  # canonical z from -99 to 99 mm


def bar(z_lo: float, z_hi: float) -> np.ndarray:
    """A bar (Z, Y, X) over the slices whose centres lie in z_lo..z_hi (mm)."""
    z = GRID.index_to_physical(np.stack([np.zeros(100), np.zeros(100), np.arange(100.0)], 1))[:, 2]
    out = np.zeros(GRID.shape, np.float32)
    out[(z >= z_lo) & (z <= z_hi), 2:6, 2:6] = 1.0
    return out


def recon_of(occupancy: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack([occupancy, occupancy]))[None]


def test_z_range_is_the_first_and_last_slice_holding_the_mask():
    assert z_range(bar(-41, 61) > 0, GRID) == (-41.0, 61.0)
    assert z_range(np.zeros(GRID.shape, bool), GRID) is None


def test_a_hidden_top_stretches_the_reconstruction_to_the_tibia_masks_top_about_its_bottom():
    """The tibia mask spans -81..81 mm; the bone above 21 mm is hidden; the model reconstructed -81..41 (a typical,
    shorter tibia). θ is stretched so that standard z = 41 lands on 81 and z = -81 stays (factor 162 / 122)."""
    tibia, seen = (-81.0, 81.0), bar(-81, 21)
    assert hidden_end(seen, tibia, GRID) == "proximal"
    theta = identity_theta(1, torch.float64)
    stretch = stretch_to_tibia(theta, recon_of(bar(-81, 41)), seen, tibia, GRID)
    assert stretch.factor == pytest.approx(162 / 122)
    moved = apply_affine(theta_to_matrix(stretch.theta[0]), np.array([[3.0, -2.0, 41.0], [3.0, -2.0, -81.0]]))
    np.testing.assert_allclose(moved, [[3.0, -2.0, 81.0], [3.0, -2.0, -81.0]], atol=1e-9)  # only z changes
    # a reconstruction that already reaches the top (within the tolerance) is left alone
    assert stretch_to_tibia(theta, recon_of(bar(-81, 79)), seen, tibia, GRID) is None


def test_the_stretch_acts_along_the_canonical_axis_and_keeps_thetas_rotation():
    tibia, seen = (-81.0, 81.0), bar(-81, 31)
    turn = np.eye(4)
    turn[:2, :2] = [[0.0, -1.0], [1.0, 0.0]]  # 90 degrees about z, 10 mm down
    turn[2, 3] = -10.0
    stretch = stretch_to_tibia(torch.from_numpy(turn[:3][None]), recon_of(bar(-71, 51)), seen, tibia, GRID)
    assert stretch.factor == pytest.approx(162 / 122)  # the reconstruction lies at -81..41 in canonical z
    m = theta_to_matrix(stretch.theta[0])
    np.testing.assert_allclose(m[:2], turn[:2], atol=1e-12)
    assert apply_affine(m, np.array([[0.0, 0.0, 51.0]]))[0, 2] == pytest.approx(81.0)


def test_a_hidden_distal_end_is_reported_not_stretched_to():
    """The distal end in the CT is where the distal fragment was displaced to, not where the healthy tibia ends."""
    tibia, seen = (-81.0, 81.0), bar(-31, 81)
    assert hidden_end(seen, tibia, GRID) == "distal"
    assert stretch_to_tibia(identity_theta(1, torch.float64), recon_of(bar(-51, 81)), seen, tibia, GRID) is None


def test_nothing_is_stretched_when_no_end_or_both_ends_are_hidden():
    tibia = (-81.0, 81.0)
    short = recon_of(bar(-41, 41))
    theta = identity_theta(1, torch.float64)
    near = HIDDEN_END_MM - 4.0  # hidden by less than HIDDEN_END_MM at each end: a fracture mask near the ends
    for seen in (bar(-81, 81), bar(-81 + near, 81 - near), bar(-41, 41)):  # the last: both ends hidden
        assert hidden_end(seen, tibia, GRID) is None
        assert stretch_to_tibia(theta, short, seen, tibia, GRID) is None
