"""The broken fibula (fibula.py): its two pieces' ends found in a CT of rods (patient LPS, an oblique CT), the other
leg's bones and an intact fibula ignored; the ends' offsets vanish when the distal piece goes back."""

import numpy as np
import pytest

from TibiaReconstructionLib import fibula
from TibiaReconstructionLib.geometry import Grid, Volume, about_point, bounding_box, euler_rotation, translation
from TibiaReconstructionLib.prepare import patient_to_canonical
from TibiaReconstructionLib.reassembly import fibula_offsets

SHIFT = np.array([5.0, -4.0, -3.0])  # the distal fibula piece's displacement (mm)
BREAK_Z = -20.0  # the fibula breaks this far below the CT's centre


def leg_ct(broken: bool = True, other_leg: bool = False):
    """A left lower leg of rods on a 1 x 1 x 2 mm CT turned 8 degrees about z, centred at C: the tibia (radius 12 mm,
    300 mm long, along z), the fibula (radius 6 mm, 26 mm lateral (+x) and 10 mm posterior) broken at BREAK_Z with its
    distal piece shifted by SHIFT; optionally the other leg's tibia and an intact fibula 110 mm medial. Returns the
    CT, the tibia mask and the fibula's healthy axis point (3,)."""
    direction = euler_rotation((0.0, 0.0, 8.0))[:3, :3]
    size = np.array([200, 120, 170])
    spacing = np.array([1.0, 1.0, 2.0])
    centre = np.array([60.0, -40.0, 300.0])
    grid = Grid(tuple(size), tuple(spacing), centre - direction @ (size * spacing / 2), direction)
    grid = Grid(grid.size, grid.spacing, grid.origin + direction @ np.array([-40.0, 0.0, 0.0]), direction)
    p = grid.index_to_physical(np.indices(grid.shape).reshape(3, -1).T[:, ::-1].astype(float)) - centre

    def rod(q, x, y, radius, lo=-150.0, hi=150.0):
        return (np.hypot(q[:, 0] - x, q[:, 1] - y) <= radius) & (q[:, 2] >= lo) & (q[:, 2] <= hi)

    fib_xy = (26.0, 10.0)
    tibia = rod(p, 0.0, 0.0, 12.0)
    bone = tibia | rod(p, *fib_xy, 6.0, hi=140.0) if not broken else (
        tibia | rod(p, *fib_xy, 6.0, lo=BREAK_Z, hi=140.0) | rod(p - SHIFT, *fib_xy, 6.0, hi=BREAK_Z - 1.0))
    if other_leg:
        bone |= rod(p, -110.0, 0.0, 12.0) | rod(p, -136.0, 10.0, 6.0, lo=-150.0, hi=BREAK_Z - 8.0) \
            | rod(p, -136.0, 10.0, 6.0, lo=BREAK_Z, hi=140.0)
    hu = np.where(bone, 1200, 40).astype(np.int16).reshape(grid.shape)
    mask = tibia.astype(np.uint8).reshape(grid.shape)
    return Volume.on_grid(hu, grid), Volume.on_grid(mask, grid), centre + np.array([*fib_xy, 0.0])


def find(ct, tibia):
    return fibula.find_broken_fibula(ct, tibia, bounding_box(tibia.array), patient_to_canonical(tibia, "left"))


def off_line(point, centre, direction):
    d = point - centre
    return float(np.linalg.norm(d - (d @ direction) * direction))


@pytest.mark.parametrize("other_leg", [False, True])
def test_the_broken_fibulas_ends_are_found_where_they_lie(other_leg):
    ct, tibia, axis_point = leg_ct(other_leg=other_leg)
    ct_before = ct.array.copy()
    found = find(ct, tibia)
    assert found is not None
    up = np.array([0.0, 0.0, 1.0])
    # the proximal end on the fibula's axis, above the break; the distal end on the shifted axis, below it
    assert off_line(found.proximal_centre, axis_point, up) < 0.7
    assert off_line(found.distal_centre, axis_point + SHIFT, up) < 0.7
    assert found.proximal_centre[2] > axis_point[2] + BREAK_Z > found.distal_centre[2]
    for d in (found.proximal_direction, found.distal_direction):
        assert np.degrees(np.arccos(d @ up)) < 3.0
    np.testing.assert_array_equal(ct.array, ct_before)


def test_an_intact_fibula_is_not_broken_even_beside_the_other_legs_broken_one():
    ct, tibia, _ = leg_ct(broken=False, other_leg=True)
    assert find(ct, tibia) is None


def test_the_ends_line_up_when_the_distal_piece_goes_back():
    import torch

    ct, tibia, axis_point = leg_ct()
    found = find(ct, tibia)
    back = translation(-SHIFT)
    twist = about_point(euler_rotation((0.0, 0.0, 10.0))[:3, :3], axis_point - np.array([26.0, 10.0, 0.0]))
    moves = torch.from_numpy(np.stack([np.eye(4), back, twist @ back]).astype(np.float32))
    offsets = fibula_offsets(found, moves[:, :3, :3], moves[:, :3, 3]).numpy()
    across = float(np.hypot(*SHIFT[:2]))
    assert offsets[1] < 0.5 and abs(offsets[0] - across) < 1.0, offsets  # back in line; as far apart as shifted
    assert offsets[2] > 3.0, offsets  # turned 10 degrees about the tibia's axis: 28 mm away, out of line again
