import numpy as np
import pytest

from TibiaReconstructionLib.errors import InputError
from TibiaReconstructionLib.geometry import Volume, apply_affine, crop, euler_rotation, invert_affine, mirror, resample
from TibiaReconstructionLib.prepare import (PLATEAU_TURN_DEG, align_tibia, canonical_grid, patient_to_canonical,
                                           plateau_axis, prepare_case, resample_crops, smoothed_crops, to_canonical)
from synthetic import bone_case, plateau_leg

GRID = canonical_grid((24, 24, 56), 3.0)


def _dice(a, b):
    return 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))


def test_long_axis_goes_to_z_and_bump_stays_lateral():
    ct, tib, _ = bone_case(pose_deg=(12.0, -8.0, 30.0), shift=(5.0, -3.0, 4.0))
    p = patient_to_canonical(tib, "left")
    np.testing.assert_allclose(np.linalg.det(p[:3, :3]), 1.0, atol=1e-9)
    pose = euler_rotation((12.0, -8.0, 30.0))
    axis = pose[:3, :3] @ np.array([0.0, 0.0, 1.0])
    np.testing.assert_allclose(np.abs(p[:3, :3] @ axis), [0, 0, 1], atol=0.05)  # the bump tilts the principal axis ~2 deg
    case = to_canonical(ct, tib, GRID, p)
    occ = case.tensor[1]
    k_proximal = occ.shape[0] * 3 // 4
    ii = np.argwhere(occ[k_proximal:] > 0.5)[:, 2]
    assert ii.mean() > (occ.shape[2] - 1) / 2  # the lateral bump is at +x in canonical space


def test_canonical_occupancy_maps_back_to_the_mask():
    ct, tib, _ = bone_case(pose_deg=(5.0, 10.0, -20.0))
    case = prepare_case(ct, tib, "left", GRID)
    back = resample(Volume.on_grid(case.tensor[1], GRID), tib.grid, case.patient_to_canonical)
    assert _dice(back.array > 0.5, tib.array > 0) > 0.9
    assert case.tensor.shape == (2,) + GRID.shape and case.tensor.dtype == np.float32
    assert 0.0 <= case.tensor.min() and case.tensor.max() <= 1.0


def test_right_leg_equals_mirrored_left_leg():
    ct, tib, frac = bone_case(pose_deg=(0.0, 6.0, 15.0))
    ct_r, _ = mirror(ct, point=(7.0, 0.0, 0.0))
    tib_r, _ = mirror(tib, point=(7.0, 0.0, 0.0))
    frac_r, _ = mirror(frac, point=(7.0, 0.0, 0.0))
    left = prepare_case(ct, tib, "left", GRID, fracture=frac)
    right = prepare_case(ct_r, tib_r, "right", GRID, fracture=frac_r)
    np.testing.assert_allclose(right.tensor, left.tensor, atol=0.02)
    np.testing.assert_array_equal(right.visible, left.visible)


def test_fracture_region_is_zeroed():
    ct, tib, frac = bone_case()
    case = prepare_case(ct, tib, "left", GRID, fracture=frac)
    assert case.visible is not None and (case.visible == 0).any()
    assert np.all(case.tensor[:, case.visible == 0] == 0)
    healthy = prepare_case(ct, tib, "left", GRID)
    assert case.tensor[1].sum() < healthy.tensor[1].sum()


def test_inputs_not_modified():
    ct, tib, frac = bone_case()
    before = [v.array.copy() for v in (ct, tib, frac)]
    prepare_case(ct, tib, "right", GRID, fracture=frac)
    for b, v in zip(before, (ct, tib, frac)):
        np.testing.assert_array_equal(b, v.array)


def test_bad_side_and_empty_mask():
    ct, tib, _ = bone_case()
    with pytest.raises(InputError, match="side"):
        patient_to_canonical(tib, "up")
    with pytest.raises(InputError, match="tibia mask has 0 voxels"):
        patient_to_canonical(tib.with_array(np.zeros_like(tib.array)), "left")


def _ends(tibia, p):
    """The tibia mask's lowest and highest canonical z (mm) under P."""
    z = apply_affine(p, tibia.index_to_physical(np.argwhere(tibia.array != 0)[:, ::-1].astype(float)))[:, 2]
    return z.min(), z.max()


def test_a_tibia_cut_off_by_the_scan_keeps_its_intact_end_where_a_whole_tibias_lies():
    ct, tib, _ = bone_case(pose_deg=(4.0, -3.0, 20.0), spacing=(2.0, 2.0, 2.0), size=(40, 40, 90))  # 150 mm bone
    whole = align_tibia(tib, "left", 150.0)
    assert not whole.cut and np.allclose(whole.matrix, patient_to_canonical(tib, "left"))
    lo, hi = _ends(tib, whole.matrix)
    assert abs(lo + 75) < 4 and abs(hi - 75) < 4
    # a knee CT: the slices above the bone's middle; an ankle CT: those below
    for part, end in ((crop(tib, (45, 0, 0), (89, 39, 39)), "distal"),
                      (crop(tib, (0, 0, 0), (44, 39, 39)), "proximal")):
        cut = align_tibia(part, "left", 150.0)
        assert (cut.cut_distal, cut.cut_proximal) == (end == "distal", end == "proximal")
        lo, hi = _ends(part, cut.matrix)
        intact = hi if end == "distal" else -lo
        assert abs(intact - 75) < 4  # as on the whole bone, not in the middle of the part seen
        lo, hi = _ends(part, align_tibia(part, "left").matrix)  # without a length: centred on the part seen
        assert abs(hi + lo) < 4
        assert abs(_ends(part, align_tibia(part, "left", 60.0).matrix)[1] + lo) < 4  # never shorter than seen


def test_a_bone_along_the_side_of_the_field_of_view_is_not_cut_off():
    _, tib, _ = bone_case(spacing=(2.0, 2.0, 2.0), size=(40, 40, 90))
    side = crop(tib, (0, 0, 0), (89, 39, 21))  # the field of view's edge through the bone, along its whole length
    assert tib.array[:, :, 21].any() and not align_tibia(side, "left", 150.0).cut


def test_voxels_beyond_the_scan_are_not_visible():
    ct, tib, frac = bone_case(spacing=(2.0, 2.0, 2.0), size=(40, 40, 90))
    part = [crop(v, (45, 0, 0), (89, 39, 39)) for v in (ct, tib, frac)]
    cut = align_tibia(part[1], "left", 150.0)
    grid = canonical_grid((24, 24, 60), 3.0)
    crops = smoothed_crops(*part[:2], grid.spacing, part[2])
    seen = resample_crops(crops, grid, cut.matrix, unseen_outside=part[0].grid)
    plain = resample_crops(crops, grid, cut.matrix)
    kji = np.argwhere(np.ones(grid.shape, bool))
    ijk = part[0].physical_to_index(apply_affine(invert_affine(cut.matrix),
                                                 grid.index_to_physical(kji[:, ::-1].astype(float))))
    beyond = np.maximum(-0.5 - ijk, ijk - (np.asarray(part[0].grid.size) - 0.5)).max(axis=1).reshape(grid.shape)
    assert (beyond > 1).any() and not seen.visible[beyond > 1].any()  # a CT voxel or more beyond the scan: unseen
    inside = beyond < -1
    np.testing.assert_array_equal(seen.visible[inside], plain.visible[inside])  # inside: as before
    z = ijk[:, 2].reshape(grid.shape)
    assert plain.visible[z < -1.5].all()  # (without the field of view, the empty space below counted as seen)
    assert not seen.tensor[:, ~seen.visible.astype(bool)].any()


def _plateau_angle(tibia: Volume, p: np.ndarray) -> float:
    """Where the plateau's wide axis lies on the canonical frame of P (degrees from +x towards +y, -90..90)."""
    pts = apply_affine(p, tibia.index_to_physical(np.argwhere(tibia.array != 0)[:, ::-1].astype(float)))
    axis = plateau_axis(pts)
    return float((np.degrees(np.arctan2(axis[1], axis[0])) + 90.0) % 180.0 - 90.0)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("turn_deg", [-50.0, 70.0, 105.0])
def test_a_leg_turned_beyond_the_trained_range_is_turned_back_for_the_model(side, turn_deg):
    """A plateau turned out (70 deg, or 105: past facing sideways) or in (-50 deg) in the scanner comes onto the
    canonical frame at the training phantoms' typical angle, turned back the short way; one inside their range, or a
    scan without the plateau, is left as it lies."""
    lowest, typical, highest = PLATEAU_TURN_DEG
    turned = plateau_leg(turn_deg, side)[1]
    alignment = align_tibia(turned, side, limit_turn=True)
    assert abs(_plateau_angle(turned, alignment.matrix) - typical) < 2.0
    assert abs(alignment.turned_deg - (typical - turn_deg)) < 2.0
    np.testing.assert_allclose(np.linalg.det(alignment.matrix[:3, :3]), 1.0 if side == "left" else -1.0, atol=1e-9)
    as_it_lies = _plateau_angle(turned, align_tibia(turned, side).matrix)  # training data: as it lies
    assert abs((as_it_lies - turn_deg + 90.0) % 180.0 - 90.0) < 2.0
    for leg in (plateau_leg(20.0, side)[1], plateau_leg(70.0, side, slices=82)[1]):
        alignment = align_tibia(leg, side, limit_turn=True)
        assert alignment.turned_deg == 0.0
        np.testing.assert_allclose(alignment.matrix, align_tibia(leg, side).matrix)
    assert lowest <= 20.0 <= highest
