"""Automatic tibia segmentation (segment.py) on coarse (1.5 mm) phantoms: anatomy, fragments, sides,
both legs, label maps, bad input and the `segment` command."""

import json

import numpy as np
import pytest

from TibiaReconstructionLib.cli import main
from TibiaReconstructionLib.errors import GeometryMismatchError, InputError
from TibiaReconstructionLib.geometry import Grid, Volume, euler_rotation, mirror, moved, resample
from TibiaReconstructionLib.io import read_volume, write_volume
from TibiaReconstructionLib.metrics import dice
from TibiaReconstructionLib.phantoms import generate_case
from TibiaReconstructionLib.segment import segment_tibia, tibia_from_label_map

TIBIA, FIBULA, FEMUR, PATELLA, TALUS = 1, 2, 3, 4, 5
NEIGHBOURS = {"femur": FEMUR, "patella": PATELLA, "talus": TALUS}
SPACING = 1.5  # mm; coarse enough for speed, fine enough to keep the tibia-fibula contact sharp


@pytest.fixture(scope="module")
def case():
    """A fractured left leg at 1.5 mm: comminuted shaft (main fragments, a wedge and small pieces)."""
    return generate_case(3, spacing=SPACING, side="left", fracture_type="comminuted")


@pytest.fixture(scope="module")
def result(case):
    return segment_tibia(case.fractured_ct)


@pytest.fixture(scope="module")
def two_legs(case):
    """Both legs in one CT (identity direction): the fractured left leg at x > 0 and the right leg
    (mirror image about x = 0) at x < 0, intact; plus each leg's tibia on that grid."""
    right_ct, _ = mirror(case.ct, point=(0.0, 0.0, 0.0))
    right_labels, _ = mirror(case.labels, point=(0.0, 0.0, 0.0))
    corners = np.concatenate([case.ct.grid.corners(), right_ct.grid.corners()])
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    grid = Grid(tuple(np.rint((hi - lo) / case.ct.spacing).astype(int) + 1), case.ct.spacing, lo)
    ct = np.maximum(resample(case.fractured_ct, grid, default_value=-1000).array,
                    resample(right_ct, grid, default_value=-1000).array)
    left = resample(case.fractured_labels, grid, interpolation="nearest").array
    right = resample(right_labels, grid, interpolation="nearest").array
    assert not np.any((left > 0) & (right > 0))
    frac = resample(case.fracture_mask, grid, interpolation="nearest")
    return Volume.on_grid(ct, grid), left == TIBIA, right == TIBIA, frac


def test_fractured_tibia_found(case, result):
    truth = case.fractured_labels.array == TIBIA
    assert result.tibia.grid.same_as(case.ct.grid)
    assert result.tibia.array.dtype == np.uint8 and set(np.unique(result.tibia.array)) <= {0, 1}
    assert dice(result.tibia.array, truth) > 0.95
    assert result.side == "left" and result.other_tibia is None
    assert set(result.timings) >= {"bones", "identify", "refine"}


def test_fibula_never_tibia(case, result):
    fibula = case.fractured_labels.array == FIBULA
    assert np.count_nonzero(result.tibia.array[fibula]) < 0.02 * np.count_nonzero(fibula)  # contact voxels only


def test_fibula_parted_from_dim_bone(case):
    """Weak bone (HU above 100 scaled by 0.6: cortex about 900 HU) dims the cortex between tibia and fibula towards
    the fixed ridge; the fibula must still be parted (a 600 HU ridge took in 14 % of it)."""
    hu = case.fractured_ct.array.astype(np.float32)
    dim = case.fractured_ct.with_array(np.rint(np.where(hu > 100, 100 + 0.6 * (hu - 100), hu)).astype(np.int16))
    tibia = segment_tibia(dim).tibia.array != 0
    fibula = case.fractured_labels.array == FIBULA
    assert np.count_nonzero(tibia[fibula]) < 0.02 * np.count_nonzero(fibula)
    assert dice(tibia, case.fractured_labels.array == TIBIA) > 0.95


@pytest.mark.parametrize("name", sorted(NEIGHBOURS))
def test_neighbouring_bones_excluded(case, result, name):
    bone = case.fractured_labels.array == NEIGHBOURS[name]
    assert np.count_nonzero(result.tibia.array[bone]) < 0.02 * np.count_nonzero(bone)


def test_every_fragment_kept(case, result):
    ids = case.fragment_ids.array
    assert ids.max() >= 4  # two main fragments, a wedge, small pieces
    for f in range(1, ids.max() + 1):
        piece = ids == f
        assert np.count_nonzero(result.tibia.array[piece]) > 0.6 * np.count_nonzero(piece), f"fragment {f}"


def test_right_leg_is_mirrored_left(case, result):
    right_ct, _ = mirror(case.fractured_ct)
    right = segment_tibia(right_ct)
    expected, _ = mirror(result.tibia)
    assert right.side == "right"
    assert right.tibia.grid.same_as(expected.grid)
    assert dice(right.tibia.array, expected.array) > 0.98


@pytest.mark.parametrize("turn_deg", [45.0, 70.0])
def test_a_leg_turned_out_keeps_its_side(case, result, turn_deg):
    """Turned out (toes to the patient's left for this left leg) about the vertical axis through its tibia, the fibula
    comes to lie behind the tibia or medial of it in the patient's frame; the side still comes out left (from the
    fibula's place relative to the plateau's axis, not the patient's x) and the tibia is the same voxels."""
    ct = case.fractured_ct
    centre = ct.grid.index_to_physical(np.argwhere(result.tibia.array != 0)[::20, ::-1].astype(float)).mean(0)
    turned = segment_tibia(moved(ct, euler_rotation((0.0, 0.0, turn_deg), centre)))
    assert turned.side == "left" and not turned.warnings
    assert dice(turned.tibia.array, result.tibia.array) > 0.95


def test_oblique_grid(case):
    oblique = generate_case(3, spacing=SPACING, side="left", fracture_type="comminuted", oblique=True)
    assert not np.allclose(oblique.ct.direction, np.eye(3))
    found = segment_tibia(oblique.fractured_ct)
    assert dice(found.tibia.array, oblique.fractured_labels.array == TIBIA) > 0.95


@pytest.mark.parametrize("side", ["left", "right"])
def test_both_legs_requested_side(two_legs, side):
    ct, left, right, _ = two_legs
    found = segment_tibia(ct, side=side)
    wanted, other = (left, right) if side == "left" else (right, left)
    assert found.side == side
    assert dice(found.tibia.array, wanted) > 0.95
    assert dice(found.other_tibia.array, other) > 0.95


def test_unrefined_chosen_tibia_leaves_the_other_leg_as_it_was(two_legs):
    """refine_tibia=False (the contralateral target needs only the other leg's tibia) skips the chosen tibia's
    surface refinement: the other tibia is the same, the chosen one a little fuller but the same bone."""
    ct, left, _, frac = two_legs
    full = segment_tibia(ct, fracture_mask=frac)
    quick = segment_tibia(ct, fracture_mask=frac, refine_tibia=False)
    np.testing.assert_array_equal(quick.other_tibia.array, full.other_tibia.array)
    assert quick.side == full.side == "left"
    assert np.count_nonzero(quick.tibia.array) > np.count_nonzero(full.tibia.array)  # not peeled to the edge level
    assert dice(quick.tibia.array, left) > 0.9


def test_both_legs_auto_side(two_legs):
    ct, _, _, frac = two_legs
    assert segment_tibia(ct).side == "left"  # the fractured, more fragmented tibia
    assert segment_tibia(ct, fracture_mask=frac).side == "left"
    on_right = resample(mirror(frac, point=(0.0, 0.0, 0.0))[0], ct.grid, interpolation="nearest")
    assert segment_tibia(ct, fracture_mask=on_right).side == "right"  # the leg holding the fracture mask


def test_inputs_unchanged(case):
    ct, frac = case.fractured_ct, case.fracture_mask
    before = ct.array.copy(), frac.array.copy(), ct.origin.copy(), ct.direction.copy()
    segment_tibia(ct, fracture_mask=frac)
    assert np.array_equal(ct.array, before[0]) and np.array_equal(frac.array, before[1])
    assert np.array_equal(ct.origin, before[2]) and np.array_equal(ct.direction, before[3])


def test_no_bone_is_an_input_error():
    arr = np.full((30, 40, 40), 40, np.int16)
    arr[:, :, :5] = -1000
    with pytest.raises(InputError, match="No bone found"):
        segment_tibia(Volume(arr, np.ones(3), np.zeros(3)))


def test_no_leg_bone_is_an_input_error():
    arr = np.full((30, 40, 40), 40, np.int16)
    arr[:, :, :5] = -1000
    arr[10:14, 20:24, 20:24] = 1500  # a calcification, not a long bone
    with pytest.raises(InputError, match="No tibia found"):
        segment_tibia(Volume(arr, np.ones(3), np.zeros(3)))


def test_not_hounsfield_is_an_input_error(case):
    raw = case.ct.with_array((case.ct.array.astype(np.int32) + 1024).astype(np.uint16))
    with pytest.raises(InputError, match="Hounsfield"):
        segment_tibia(raw)


def test_bad_side_and_mask_grid(case):
    with pytest.raises(InputError, match="side"):
        segment_tibia(case.ct, side="both")
    small = Volume(np.zeros((4, 4, 4), np.uint8), np.ones(3), np.zeros(3))
    with pytest.raises(GeometryMismatchError):
        segment_tibia(case.ct, fracture_mask=small)


def test_label_map_totalsegmentator_and_any_value(case):
    labels = case.labels.array
    ts = np.select([labels == TIBIA, labels == FIBULA, labels == PATELLA], [2, 3, 1], 0).astype(np.uint8)
    assert np.array_equal(tibia_from_label_map(case.labels.with_array(ts)).array, labels == TIBIA)
    assert np.array_equal(tibia_from_label_map(case.labels, label_value=TIBIA).array, labels == TIBIA)
    with pytest.raises(InputError, match="no voxel with value 7"):
        tibia_from_label_map(case.labels, label_value=7)
    with pytest.raises(InputError, match="label-value"):
        tibia_from_label_map(case.labels, source="my-atlas")


def test_label_map_both_legs_by_side(two_legs):
    ct, left, right, _ = two_legs
    both = ct.with_array((left | right).astype(np.uint8))
    assert np.array_equal(tibia_from_label_map(both, 1, side="left").array, left)
    assert np.array_equal(tibia_from_label_map(both, 1, side="right").array, right)
    assert np.array_equal(tibia_from_label_map(both, 1).array, left | right)


def test_cli_segment(case, tmp_path, capsys):
    ct_path = tmp_path / "ct.nii.gz"
    write_volume(case.fractured_ct, ct_path)
    out = tmp_path / "out"
    assert main(["segment", "--ct", str(ct_path), "--out", str(out)]) == 0
    mask = read_volume(out / "tibia_mask.nii.gz", label=True)
    assert mask.grid.same_as(case.ct.grid)
    assert dice(mask.array, case.fractured_labels.array == TIBIA) > 0.95
    report = json.loads((out / "segment.json").read_text(encoding="utf-8"))
    assert report["side"] == "left" and report["tibia_voxels"] == int(mask.array.sum())
    assert not (out / "other_tibia_mask.nii.gz").exists()
    assert main(["segment", "--ct", str(ct_path), "--out", str(out)]) == 1  # no overwrite
    assert "already exist" in capsys.readouterr().err


def test_cli_segment_from_label_map(case, tmp_path):
    ct_path, labels_path = tmp_path / "ct.nrrd", tmp_path / "labels.nrrd"
    write_volume(case.ct, ct_path)
    write_volume(case.labels, labels_path, label=True)
    out = tmp_path / "out"
    assert main(["segment", "--ct", str(ct_path), "--labels", str(labels_path), "--label-value", "1",
                 "--out", str(out)]) == 0
    assert np.array_equal(read_volume(out / "tibia_mask.nrrd").array, case.labels.array == TIBIA)
