import numpy as np
import pytest

from TibiaReconstructionLib.errors import InputError
from TibiaReconstructionLib.geometry import Volume, euler_rotation, mirror, resample
from TibiaReconstructionLib.prepare import canonical_grid, patient_to_canonical, prepare_case, to_canonical
from synthetic import bone_case

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
