"""Reassembly (reassembly.py): the moved fragment goes where its broken face meets the anchor's, in patient
coordinates, on an anisotropic CT with an oblique direction; faces split at the bone's narrowing; sub-voxel
distances."""

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from TibiaReconstructionLib import reassembly
from TibiaReconstructionLib.geometry import Grid, Volume, about_point, apply_affine, euler_rotation, translation

CENTRE = np.array([120.0, -80.0, 400.0])  # far from the origin, as in a CT of the lower leg


def frame():
    """The bone's long axis and two unit vectors across it (patient LPS), not along the CT's axes."""
    a = np.array([0.1, 0.05, 1.0])
    a /= np.linalg.norm(a)
    u = np.cross(a, [0.0, 1.0, 0.0])
    u /= np.linalg.norm(u)
    return a, u, np.cross(a, u)


def rotation_about(axis, degrees, centre):
    """4x4 rotation by ``degrees`` about ``axis`` (unit) through ``centre``."""
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.radians(degrees)
    return about_point(np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k, CENTRE)


@pytest.fixture(scope="module")
def fracture():
    """An elliptic shaft (radii 12 and 9 mm, 100 mm long) cut by an oblique plane through CENTRE; the distal piece
    moved by M (8 deg about v, 3 mm across, 8 mm away along the axis: apart) on a 0.9 x 0.9 x 2 mm CT turned 10 deg; the
    fracture zone: within 7 mm of both broken faces. Returns the tibia mask, the zone, the visible pieces, their
    owners (1 anchor, 2 distal), the true move (M inverse) and the axis."""
    a, u, v = frame()
    direction = euler_rotation((10.0, 0.0, 0.0))[:3, :3]
    grid = Grid((64, 64, 70), (0.9, 0.9, 2.0), (0.0, 0.0, 0.0), direction)
    grid = Grid(grid.size, grid.spacing, CENTRE - direction @ (np.array(grid.size) * grid.spacing / 2), direction)
    kji = np.indices(grid.shape).reshape(3, -1).T
    p = grid.index_to_physical(kji[:, ::-1].astype(float))
    move = translation(3.0 * u - 8.0 * a) @ rotation_about(v, 8.0, CENTRE)
    truth = np.linalg.inv(move)
    normal = a + 0.7 * u
    normal /= np.linalg.norm(normal)

    def shaft(q):
        d = q - CENTRE
        return ((d @ u / 12.0) ** 2 + (d @ v / 9.0) ** 2 <= 1.0) & (np.abs(d @ a) <= 50.0)

    side = (p - CENTRE) @ normal
    back = apply_affine(truth, p)  # where a point of the fractured CT was in the healthy bone
    anchor = shaft(p) & (side > 0)
    distal = shaft(back) & ((back - CENTRE) @ normal <= 0)
    zone = (np.abs(side) < 7.0) | (np.abs((back - CENTRE) @ normal) < 7.0)
    shape = grid.shape
    tibia = Volume.on_grid((anchor | distal).reshape(shape).astype(np.uint8), grid)
    hidden = zone.reshape(shape)
    pieces, n = ndimage.label((tibia.array != 0) & ~hidden)
    owner = np.zeros(n + 1, np.int64)
    for label in range(1, n + 1):
        owner[label] = 1 if anchor.reshape(shape)[pieces == label].mean() > 0.5 else 2
    return tibia, hidden, pieces, owner, truth, a


def error_mm(move, truth, tibia, pieces, owner):
    """RMS distance (mm) between the distal fragment's visible voxels placed by ``move`` and by ``truth``."""
    kji = np.argwhere(np.isin(pieces, np.flatnonzero(owner == 2)))
    p = tibia.index_to_physical(kji[:, ::-1].astype(float))
    return float(np.sqrt(np.mean(np.sum((apply_affine(move, p) - apply_affine(truth, p)) ** 2, axis=1))))


def test_a_fragment_left_short_and_tilted_is_reassembled(fracture):
    tibia, hidden, pieces, owner, truth, a = fracture
    # the reduction left it 4 mm short of the anchor and tilted by 3 deg
    start = translation(-4.0 * a) @ rotation_about(frame()[1], 3.0, CENTRE) @ truth
    before = [x.copy() for x in (tibia.array, hidden, pieces, owner, start)]
    moves, report = reassembly.reassemble(tibia, hidden, pieces, owner, {1: np.eye(4), 2: start}, 1, a)
    assert report["kept"] and report["contact_after"] > report["contact_before"]
    assert np.array_equal(moves[1], np.eye(4))  # the anchor stays
    was, now = error_mm(start, truth, tibia, pieces, owner), error_mm(moves[2], truth, tibia, pieces, owner)
    assert was > 4.0 and now < 0.6 * was, (was, now)  # more than 4 mm off before, less than half after
    for x, y in zip(before, (tibia.array, hidden, pieces, owner, start)):
        np.testing.assert_array_equal(x, y)  # inputs untouched


def test_a_fragment_already_in_place_stays_there(fracture):
    tibia, hidden, pieces, owner, truth, a = fracture
    moves, report = reassembly.reassemble(tibia, hidden, pieces, owner, {1: np.eye(4), 2: truth}, 1, a)
    assert error_mm(moves[2], truth, tibia, pieces, owner) < 1.0, report


def test_nothing_to_reassemble_without_a_moved_fragment_or_a_fracture_zone(fracture):
    tibia, hidden, pieces, owner, truth, a = fracture
    out, report = reassembly.reassemble(tibia, hidden, pieces, owner, {1: np.eye(4)}, 1, a)
    assert report == {} and list(out) == [1] and np.array_equal(out[1], np.eye(4))
    moves = {1: np.eye(4), 2: truth}
    out, report = reassembly.reassemble(tibia, np.zeros_like(hidden), pieces, owner, moves, 1, a)
    assert report == {} and out is not moves and np.array_equal(out[2], truth)


def test_the_watershed_splits_touching_fragments_at_the_narrowing():
    whole = np.zeros((40, 12, 12), bool)
    whole[2:18, 1:11, 1:11] = True
    whole[22:38, 1:11, 1:11] = True
    whole[18:22, 5:7, 5:7] = True  # a thin bridge where the two pieces touch
    seeds = np.zeros(whole.shape, np.uint8)
    seeds[4, 5, 5], seeds[35, 5, 5] = 1, 2
    parts = reassembly.split_fragments(whole, seeds)
    assert (parts[2:18][whole[2:18]] == 1).all() and (parts[22:38][whole[22:38]] == 2).all()
    assert (parts[~whole] == 0).all()


def test_level_distance_finds_a_plane_between_voxel_centres(monkeypatch):
    x = np.arange(30.0)
    level = 12.3
    occupancy = np.clip(level + 0.5 - x, 0.0, 1.0)  # the share of each 1 mm voxel on the inside of x = level
    volume = np.broadcast_to(occupancy[None, None], (6, 6, 30)).astype(np.float32)
    d = reassembly.level_distance(volume)[3, 3]
    expected = x - level
    near = np.abs(expected) < 1
    assert np.abs(d[near] - expected[near]).max() < 0.1  # at the level: to a fraction of a voxel, negative inside
    assert np.abs(d[~near] - expected[~near]).max() <= 0.5 + 1e-6  # farther out: to half a voxel

    def refuse(*args, **kwargs):
        raise RuntimeError("Gradient norm is lower than pixel precision")

    monkeypatch.setattr(sitk, "IsoContourDistance", refuse)  # ITK can refuse: the voxel-exact distance then
    d = reassembly.level_distance(volume)[3, 3]
    assert np.abs(d - expected).max() <= 0.5 + 1e-6


def test_a_broken_fibula_turns_back_a_fragment_the_faces_leave_turned(fracture):
    from TibiaReconstructionLib.fibula import BrokenFibula

    tibia, hidden, pieces, owner, truth, a = fracture
    _, u, _ = frame()
    # the fibula 25 mm beside the shaft, broken 15 mm below the fracture; its distal piece moved with the fragment
    healthy = CENTRE + 25.0 * u
    moved = np.linalg.inv(truth)
    broken = BrokenFibula(healthy + 20.0 * a, a, moved[:3, :3] @ (healthy - 35.0 * a) + moved[:3, 3], moved[:3, :3] @ a)
    start = rotation_about(a, 12.0, CENTRE) @ truth  # the reduction left it turned 12 deg about the long axis
    alone, report_alone = reassembly.reassemble(tibia, hidden, pieces, owner, {1: np.eye(4), 2: start}, 1, a)
    moves, report = reassembly.reassemble(tibia, hidden, pieces, owner, {1: np.eye(4), 2: start}, 1, a, broken)

    def turn_about_axis(move):  # degrees, of the fragment's remaining error about the long axis
        r = (move @ np.linalg.inv(truth))[:3, :3]
        return float(np.degrees(np.arcsin(np.clip(np.cross(u, r @ u) @ a, -1.0, 1.0))))

    assert "fibula_offset_before_mm" not in report_alone and turn_about_axis(alone[2]) > 10.0  # the faces alone
    assert report["kept"] and report["fibula_offset_after_mm"] < 0.5 * report["fibula_offset_before_mm"], report
    assert turn_about_axis(moves[2]) < 6.0, report  # more than half of the turn undone
    assert error_mm(moves[2], truth, tibia, pieces, owner) < 2.0


def test_the_fibula_is_left_out_when_the_moved_fragment_does_not_hold_the_ankle(fracture):
    from TibiaReconstructionLib.fibula import BrokenFibula

    tibia, hidden, pieces, owner, truth, a = fracture
    broken = BrokenFibula(CENTRE + 20.0 * a, a, CENTRE - 20.0 * a + 9.0 * frame()[1], a)  # far out of line
    # the distal fragment as anchor: the moved one is then the proximal fragment, which the fibula does not follow
    moves, report = reassembly.reassemble(tibia, hidden, pieces, owner, {2: np.eye(4), 1: np.linalg.inv(truth)}, 2, a,
                                          broken)
    assert report["fragment"] == 1 and "fibula_offset_before_mm" not in report
    _, with_it = reassembly.reassemble(tibia, hidden, pieces, owner, {1: np.eye(4), 2: truth}, 1, a, broken)
    assert with_it["fibula_offset_before_mm"] > 2.0  # the same fibula is used when the distal fragment moves
