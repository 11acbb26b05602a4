"""The patient's visible bone in the prediction (fusion.py): pasted where the reduction puts it, the fracture zone
left to the model, badly fitting fragments left out."""

import numpy as np
import pytest

from TibiaReconstructionLib import fusion
from TibiaReconstructionLib.geometry import Grid, Volume, bounding_box, make_affine, translation
from TibiaReconstructionLib.refine import Placement

GRID = Grid((24, 24, 40), (1.0, 1.0, 1.0), (-12.0, -12.0, -20.0))  # patient = canonical here (P = identity)
SHIFT_MM = 3.0  # the distal fragment lies 3 mm off along x in the fractured CT


def bar() -> np.ndarray:
    b = np.zeros(GRID.shape, bool)
    b[4:36, 8:16, 8:16] = True
    return b


@pytest.fixture
def case():
    """The healthy bar, a fractured CT of it (distal piece k < 18 moved SHIFT_MM along x, fracture zone k 18..21
    masked), the fragment labels on the canonical grid and the model's occupancy: the healthy bar 2 mm off along y."""
    healthy = bar()
    fracture = np.zeros(GRID.shape, np.uint8)
    fracture[18:22] = 1
    moved = np.zeros_like(healthy)
    moved[:18, :, int(SHIFT_MM):] = healthy[:18, :, :-int(SHIFT_MM)]
    tibia = np.where(np.arange(40)[:, None, None] < 18, moved, healthy)
    labels = np.zeros(GRID.shape, np.int64)
    labels[:18][tibia[:18] & (fracture[:18] == 0)] = 1
    labels[22:][tibia[22:] & (fracture[22:] == 0)] = 2
    model = np.roll(healthy, 2, axis=1).astype(np.float32)
    ct = np.where(tibia, 1200, -50).astype(np.int16)
    return healthy, Volume.on_grid(ct, GRID), Volume.on_grid(tibia.astype(np.uint8), GRID), \
        Volume.on_grid(fracture, GRID), labels, model


def placement(labels, distal_misfit=0.8):
    back = translation((-SHIFT_MM, 0.0, 0.0))  # where the reduction puts the distal fragment: back by 3 mm along x
    return Placement(labels, [1, 2], 2, np.stack([back, np.eye(4)]), np.array([distal_misfit, 0.7]))


def fuse(case, place):
    """Fused with the given placement as it is (reassembly, which would refit it, has its own tests)."""
    _, ct, tibia, fracture, _, model = case
    return fusion.fuse_visible_bone(model, GRID, ct, tibia, fracture, bounding_box(tibia.array), place, GRID,
                                    np.eye(4), reassemble_fragments=False)


def test_visible_fragments_are_pasted_where_the_reduction_puts_them(case):
    healthy, ct, tibia, fracture, labels, model = case
    before = [v.array.copy() for v in (ct, tibia, fracture)] + [labels.copy(), model.copy()]
    out = fuse(case, placement(labels))
    kept = out.occupancy >= 0.5
    outside = np.ones(GRID.shape, bool)
    outside[18:22] = False  # the fracture zone, where the model stays
    assert (kept[outside] == healthy[outside]).all()  # the model's 2 mm error is gone outside the fracture zone
    assert (kept[18:22] == (model[18:22] >= 0.5)).all()
    assert not out.owned[18:22].any() and out.owned[healthy & outside].all()
    assert abs(out.hu[kept & out.owned].mean() - 1200) < 1  # the pasted bone keeps the patient's HU
    # seen where it lies: the anchor's bone; the distal piece is where the reduction put it, not seen there
    assert not (out.fixed & ~out.owned).any()
    assert out.fixed[22:][healthy[22:]].all() and not out.fixed[:18][healthy[:18]].any()
    assert [f["pasted"] for f in out.report["fragments"]] == [True, True]
    for a, b in zip(before, [ct.array, tibia.array, fracture.array, labels, model]):
        np.testing.assert_array_equal(a, b)  # inputs untouched


def test_a_fragment_is_pasted_rigidly_when_its_move_stretches_it(case):
    """The reduction's moves are rigid in the model's frame, not quite in the patient's: a move that also stretches the
    distal fragment by 12 % along the bar (about its centre) pastes it at its rigid place, the healthy bar's length."""
    healthy, *_, labels, model = case
    place = placement(labels)
    centre = GRID.index_to_physical(np.argwhere(labels == 1)[:, ::-1].astype(float)).mean(0)
    stretch = np.diag([1.0, 1.0, 1.12])
    place.moves[0] = place.moves[0] @ make_affine(stretch, centre - stretch @ centre)
    kept = fuse(case, place).occupancy >= 0.5
    np.testing.assert_array_equal(kept[:18], healthy[:18])


def test_rigid_moves_keep_rigid_ones_and_fragments_without_voxels():
    pieces = np.zeros((20, 6, 6), np.int32)
    pieces[2:8, 2:4, 2:4], pieces[12:18, 2:4, 2:4] = 1, 2
    owner = np.array([0, 1, 2])
    grid = Grid((6, 6, 20), (0.5, 0.5, 2.0), (10.0, -5.0, 40.0))
    skew = make_affine([[1.0, 0.05, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.1]], [1.0, 2.0, 3.0])
    moves = {1: np.eye(4), 2: translation((0.0, 4.0, 0.0)), 3: skew}
    out = fusion.rigid_moves(moves, pieces, owner, grid)
    assert out is not moves and moves[3] is skew
    for fid in (1, 2, 3):
        np.testing.assert_allclose(out[fid], moves[fid], atol=1e-9)


def test_a_fragment_that_fits_badly_is_left_to_the_model(case):
    healthy, *_, labels, model = case
    out = fuse(case, placement(labels, distal_misfit=fusion.MAX_MISFIT_MM + 1.0))
    assert [f["pasted"] for f in out.report["fragments"]] == [False, True]
    kept = out.occupancy >= 0.5
    assert (kept[:14] == (model[:14] >= 0.5)).all()  # far from the anchor: the model
    assert (kept[22:] == healthy[22:]).all()  # the anchor: the patient's bone


def test_within_reaches_the_distance_up_to_a_block_on_an_anisotropic_grid():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    mask = np.zeros((31, 60, 41), bool)  # odd sizes: the last block is padded
    mask[tuple(rng.integers(0, n, 4) for n in mask.shape)] = True
    spacing_kji = np.array([2.5, 0.7, 1.1])
    distance = ndimage.distance_transform_edt(~mask, spacing_kji)
    near = fusion._within(mask, spacing_kji, 12.0)
    block = float(np.linalg.norm(2.0 * spacing_kji))  # how far a block's voxels lie from each other at most
    assert near.shape == mask.shape
    assert near[distance <= 12.0 - block].all() and near[mask].all()
    assert not near[distance > 12.0 + block].any()


def test_the_reassembly_gets_the_broken_fibula_unless_the_other_leg_is_the_template(case, monkeypatch):
    _, ct, tibia, fracture, labels, model = case
    found, seen = object(), []
    monkeypatch.setattr(fusion, "find_broken_fibula", lambda *args: found)
    monkeypatch.setattr(fusion, "reassemble", lambda *args: (seen.append(args[-1]), (dict(args[4]), {}))[1])
    monkeypatch.setattr(fusion, "place_on_template", lambda *args: (args[6], []))  # the template accepted as it is
    monkeypatch.setattr(fusion, "mismatch", lambda *args: None)
    args = (model, GRID, ct, tibia, fracture, bounding_box(tibia.array), placement(labels), GRID, np.eye(4))
    fusion.fuse_visible_bone(*args)
    fusion.fuse_visible_bone(*args, template=model)
    assert seen[0] is found and seen[1] is None
