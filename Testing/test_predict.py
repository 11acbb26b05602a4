import numpy as np
import pytest

from TibiaReconstructionLib import metrics
from TibiaReconstructionLib.errors import GeometryMismatchError, InputError
from TibiaReconstructionLib.geometry import (Grid, Volume, apply_affine, euler_rotation, mirror, moved, resample,
                                            translation)
from TibiaReconstructionLib.head_start import HeadStart, blank_outputs, crops_ahead
from TibiaReconstructionLib.predict import Predictor
from TibiaReconstructionLib.prepare import smoothed_crops
from TibiaReconstructionLib.surface import polydata_points
from synthetic import bone_case, plateau_leg
from tiny_bundle import make_tiny_bundle


def surface_centroid(polydata) -> np.ndarray:
    """Area-weighted centroid (LPS mm) of a triangle surface: unlike the mean of its vertices, it does not depend on
    how smoothing and decimation spread the vertices."""
    from vtkmodules.util.numpy_support import vtk_to_numpy

    tri = polydata_points(polydata)[vtk_to_numpy(polydata.GetPolys().GetConnectivityArray()).reshape(-1, 3)]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    return (tri.mean(1) * area[:, None]).sum(0) / area.sum()


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return Predictor(make_tiny_bundle(tmp_path_factory.mktemp("b") / "bundle"), device="cpu")


@pytest.fixture(scope="module")
def case():
    return bone_case(pose_deg=(3.0, -2.0, 8.0), spacing=(1.5, 1.5, 2.5), size=(48, 48, 72))


@pytest.fixture(scope="module")
def result(predictor, case):
    return predictor.predict(*case, side="left")


def test_prediction_recovers_the_healthy_bone(result, case):
    ct, tibia, fracture = case
    assert result.labelmap.grid.same_as(ct.grid)
    assert metrics.dice(result.labelmap.array, tibia.array) > 0.85  # the masked slab is filled in
    assert result.labelmap.array[fracture.array > 0].mean() > 0.8
    assert result.intensity.array[result.labelmap.array > 0].mean() > 300  # bone HU inside the label


def test_surface_lies_on_the_labelmap_boundary(result, case):
    ct = case[0]
    pts = polydata_points(result.surface)
    assert len(pts) > 100
    # every vertex has both label and background voxels within one voxel: it lies on the boundary
    ijk = np.rint(ct.physical_to_index(pts)).astype(int) + 2
    lab = np.pad(result.labelmap.array, 2)
    near_label, near_background = np.zeros(len(pts), bool), np.zeros(len(pts), bool)
    for dk in (-1, 0, 1):
        for dj in (-1, 0, 1):
            for di in (-1, 0, 1):
                v = lab[ijk[:, 2] + dk, ijk[:, 1] + dj, ijk[:, 0] + di]
                near_label |= v > 0
                near_background |= v == 0
    assert (near_label & near_background).mean() > 0.98


def test_translation_moves_the_prediction(predictor, case, result):
    ct, tibia, fracture = case
    shift = np.array([31.0, -12.5, 40.0])
    res = predictor.predict(*(moved(v, translation(shift)) for v in case), side="left")
    assert metrics.dice(res.labelmap.array, result.labelmap.array) > 0.99
    np.testing.assert_allclose(surface_centroid(res.surface), surface_centroid(result.surface) + shift, atol=0.2)


def test_a_leg_turned_beyond_the_trained_range_is_predicted_as_turned_back(predictor, case):
    """Turned 60 and 100 deg about the vertical axis (exact: the grid turns, the voxels stay), the leg lies outside
    the range the model learned from and both are turned back to the same angle for it: the same voxels come out,
    and the surface turns with the grid."""
    def turned(degrees):
        r = euler_rotation((0.0, 0.0, degrees))
        return [moved(v, r) for v in case], r[:3, :3]

    (a, ra), (b, rb) = turned(60.0), turned(100.0)
    res_a, res_b = predictor.predict(*a, side="left"), predictor.predict(*b, side="left")
    assert "turn -" in res_a.transforms.to_dict()["steps"][0]["name"]
    assert metrics.dice(res_a.labelmap.array, res_b.labelmap.array) > 0.99  # 0.82 when not turned back
    np.testing.assert_allclose(surface_centroid(res_b.surface), rb @ ra.T @ surface_centroid(res_a.surface), atol=0.2)


def test_right_leg_equals_mirrored_left_leg(predictor, case, result):
    mirrored = [mirror(v)[0] for v in case]
    h = mirror(case[0])[1]
    res = predictor.predict(*mirrored, side="right")
    expected = mirror(result.labelmap)[0]
    assert metrics.dice(res.labelmap.array, expected.array) > 0.98
    np.testing.assert_allclose(surface_centroid(res.surface), apply_affine(h, surface_centroid(result.surface)),
                               atol=0.3)


def test_auto_side_finds_the_mirrored_leg(predictor, case):
    mirrored = [mirror(v)[0] for v in case]
    assert predictor.predict(*mirrored, side="auto").side == "right"
    assert predictor.predict(*case, side="auto").side == "left"


def test_oblique_ct_gives_the_same_surface_as_its_axis_aligned_copy(predictor):
    rot = euler_rotation((0.0, 0.0, 25.0))[:3, :3]
    oblique = bone_case(pose_deg=(0.0, 0.0, 25.0), spacing=(1.5, 1.5, 2.5), size=(48, 48, 72), direction=rot)
    grid = Grid((56, 56, 72), np.array([1.5, 1.5, 2.5]), oblique[0].grid.center - np.array([41.25, 41.25, 88.75]))
    straight = [resample(v, grid, interpolation="nearest", default_value=0 if n else -1000)
                for n, v in enumerate(oblique)]
    a = predictor.predict(*oblique, side="left")
    b = predictor.predict(*straight, side="left")
    pa, pb = polydata_points(a.surface), polydata_points(b.surface)
    from scipy.spatial import cKDTree
    d = cKDTree(pb).query(pa)[0]
    assert np.sqrt(np.mean(d ** 2)) < 1.5  # mm, voxel size 1.5 x 1.5 x 2.5


def test_uncertainty_comes_on_the_ct_lattice_over_the_prediction(predictor):
    """On a CT finer than half the model's spacing the occupancy's std comes on a coarser grid: the CT's axes, voxel
    centres on CT voxel centres a whole number of CT voxels apart, covering every predicted voxel."""
    ct, tibia, fracture = bone_case(pose_deg=(3.0, -2.0, 8.0), spacing=(0.7, 0.7, 1.2), size=(116, 116, 150))
    res = predictor.predict(ct, tibia, fracture, side="left")
    std = res.occupancy_std
    corner = ct.physical_to_index(std.origin[None])[0]
    np.testing.assert_allclose(std.direction, ct.direction)
    np.testing.assert_allclose(std.spacing / ct.spacing, [2, 2, 1])  # tiny bundle: 3 mm, so at most 1.5 mm
    np.testing.assert_allclose(corner, np.round(corner), atol=1e-6)
    predicted = std.physical_to_index(ct.index_to_physical(np.argwhere(res.labelmap.array)[:, ::-1].astype(float)))
    assert predicted.min() >= 0 and np.all(predicted.max(0) <= np.array(std.grid.size) - 1)
    assert std.array.dtype == np.float32 and std.array.max() > 0


def test_inputs_are_not_modified(predictor, case):
    before = [v.array.copy() for v in case]
    predictor.predict(*case, side="left")
    for b, v in zip(before, case):
        np.testing.assert_array_equal(b, v.array)


def test_crops_made_beforehand_are_used_only_at_the_bundle_spacing_and_for_the_same_inputs(predictor, case, result):
    ct, tibia, fracture = case
    spacing = predictor.bundle.grid.spacing
    ahead = predictor.predict(*case, side="left", ahead=HeadStart(case, smoothed_crops(ct, tibia, spacing, fracture)))
    np.testing.assert_array_equal(ahead.labelmap.array, result.labelmap.array)
    # crops for another spacing would give another canonical input: they are ignored, not used
    wrong = smoothed_crops(ct, tibia, 2.0 * spacing, fracture)
    other = predictor.predict(*case, side="left", ahead=HeadStart(case, wrong))
    np.testing.assert_array_equal(other.labelmap.array, ahead.labelmap.array)
    # as are crops made for other volumes: a shifted tibia mask's crops would move the input
    moved = Volume(np.roll(tibia.array, 6, axis=0), tibia.spacing, tibia.origin, tibia.direction)
    elsewhere = HeadStart((ct, moved, fracture), smoothed_crops(ct, moved, spacing, fracture))
    np.testing.assert_array_equal(predictor.predict(*case, side="left", ahead=elsewhere).labelmap.array,
                                  ahead.labelmap.array)


def test_an_other_leg_fit_begun_beforehand_is_used_only_for_the_same_request(predictor, case):
    from concurrent.futures import Future

    begun = Future()
    begun.set_result(InputError("the fit begun beforehand"))
    used = predictor.predict(*case, side="left", ahead=HeadStart(case, None, "auto", begun))
    assert used.fusion["other_leg"]["why_not"] == "the fit begun beforehand"
    ct, tibia, fracture = case
    other = Volume(tibia.array[:, :, ::-1].copy(), tibia.spacing, tibia.origin, tibia.direction)
    for ahead, request in ((HeadStart(case, None, "auto", begun), other), (HeadStart(case, None, other, begun), "auto"),
                           (HeadStart((ct, tibia, fracture.with_array(fracture.array.copy())), None, "auto", begun),
                            "auto")):
        fresh = predictor.predict(*case, side="left", ahead=ahead, other_tibia=request)
        assert fresh.fusion.get("other_leg", {}).get("why_not") != "the fit begun beforehand"


def test_checks_made_beforehand_are_used_for_the_same_side_request_only(predictor, case):
    from TibiaReconstructionLib.checks import check_inputs

    checked = check_inputs(*case, side="auto")
    checked.warnings.append("a warning from the checks made beforehand")
    used = predictor.predict(*case, side="auto", ahead=HeadStart(case, None, checked=checked))
    assert "a warning from the checks made beforehand" in used.warnings
    other = predictor.predict(*case, side="left", ahead=HeadStart(case, None, checked=checked))
    assert "a warning from the checks made beforehand" not in other.warnings


def test_outputs_allocated_beforehand_go_to_one_prediction_only(predictor, case, result):
    from concurrent.futures import Future

    floor = round(predictor.bundle.window_hu[0])
    allocated = Future()
    allocated.set_result(blank_outputs(case[0].grid, floor))
    ahead = HeadStart(case, None, outputs=allocated, floor_hu=floor)
    first, second = (predictor.predict(*case, side="left", ahead=ahead) for _ in range(2))
    assert first.labelmap.array is allocated.result()[0].array  # written into the arrays allocated beforehand
    np.testing.assert_array_equal(first.labelmap.array, result.labelmap.array)
    np.testing.assert_array_equal(first.intensity.array, result.intensity.array)
    assert not np.shares_memory(first.labelmap.array, second.labelmap.array)
    other_floor = HeadStart(case, None, outputs=allocated, floor_hu=floor + 1)  # another bundle's window: not used
    assert predictor.predict(*case, side="left", ahead=other_floor).labelmap.array is not allocated.result()[0].array


def test_the_volumes_are_handed_over_final_before_the_surface(predictor, case, result):
    """``volumes_ready`` gets the result's own labelmap, intensity and uncertainty, already filled in, once."""
    calls = []
    ready = predictor.predict(*case, side="left", volumes_ready=lambda *volumes: calls.append(
        [None if v is None else (v, v.array.copy()) for v in volumes]))
    assert len(calls) == 1
    (label, label_then), (hu, hu_then), std = calls[0]
    assert label is ready.labelmap and hu is ready.intensity
    assert (std is None) == (ready.occupancy_std is None) and (std is None or std[0] is ready.occupancy_std)
    np.testing.assert_array_equal(label_then, result.labelmap.array)  # final when handed over
    np.testing.assert_array_equal(hu_then, result.intensity.array)


def test_the_command_prepares_the_crops_at_the_bundle_spacing(predictor, case, tmp_path):
    ct, tibia, fracture = case
    folder = predictor.bundle_path
    crops = crops_ahead(ct, tibia, fracture, folder)
    np.testing.assert_allclose(crops.spacing, predictor.bundle.grid.spacing)
    expected = smoothed_crops(ct, tibia, predictor.bundle.grid.spacing, fracture)
    np.testing.assert_array_equal(crops.ct.array, expected.ct.array)
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    assert crops_ahead(ct, tibia, fracture, tmp_path) is None  # the Predictor then says what is wrong
    elsewhere = Volume(fracture.array, fracture.spacing, fracture.origin + 3.0, fracture.direction)
    assert crops_ahead(ct, tibia, elsewhere, folder) is None  # not on the CT's grid: left to the Predictor


@pytest.mark.parametrize("factors", [(2, 2, 3), (1, 3, 1), (2, 1, 2)])
def test_the_work_grid_goes_onto_the_ct_slab_by_slab_as_in_one_piece(predictor, factors):
    """Slabs of CT slices (a whole number of work slices each) give the labelmap and HU of interpolating the whole
    work grid at once; nothing is written outside the box."""
    from TibiaReconstructionLib.geometry import upsample_linear
    from TibiaReconstructionLib.predict import CT_SLAB, WorkGrid

    rng = np.random.default_rng(3)
    lo, hi = np.array([3, 2, 5]), np.array([40, 30, 5 + 2 * CT_SLAB + 7])  # (i, j, k): a slab and a part over
    ct = Volume(np.zeros((hi[2] + 4, 36, 44), np.int16), [1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    shape = tuple((hi - lo + 1)[::-1])
    work_shape = tuple((np.array(shape) - 1) // np.array(factors[::-1]) + 2)
    occupancy = rng.random(work_shape).astype(np.float32)
    intensity = (occupancy * rng.random(work_shape)).astype(np.float32)
    labelmap, hu = predictor._work_to_ct(WorkGrid(None, lo, hi, np.array(factors), occupancy, intensity, None, None),
                                         *blank_outputs(ct.grid, round(predictor.bundle.window_hu[0])))
    whole = upsample_linear(occupancy, factors[::-1], shape)
    weighted = upsample_linear(intensity, factors[::-1], shape)
    lo_hu, hi_hu = predictor.bundle.window_hu
    box = tuple(slice(lo[a], hi[a] + 1) for a in (2, 1, 0))
    expected = whole >= 0.5
    near_half = np.abs(whole - 0.5) < 1e-5
    np.testing.assert_array_equal(labelmap.array[box][~near_half], expected[~near_half])
    expected_hu = np.clip(weighted / np.maximum(whole, 1e-6), 0, 1) * (hi_hu - lo_hu) + lo_hu
    inside = expected & ~near_half
    assert np.abs(hu.array[box][inside] - expected_hu[inside]).max() <= 0.51
    assert np.all(hu.array[box][~expected & ~near_half] == round(lo_hu))
    assert labelmap.array.sum() == labelmap.array[box].sum() and np.all(np.delete(hu.array, box[0], 0) == round(lo_hu))


def test_mask_on_another_grid_is_a_clear_error(predictor, case):
    ct, tibia, fracture = case
    other = Volume(fracture.array, fracture.spacing, fracture.origin + 3.0, fracture.direction)
    with pytest.raises(GeometryMismatchError, match="fracture mask"):
        predictor.predict(ct, tibia, other)


@pytest.mark.parametrize("problem,match", [
    ("empty_tibia", "tibia mask is empty"), ("empty_fracture", "fracture mask is empty"),
    ("fracture_everywhere", "hides"), ("fracture_outside", "does not overlap"),
    ("mr_like", "does not look like a CT"), ("nan", "NaN"), ("side", "Unknown side")])
def test_bad_inputs_are_refused_clearly(predictor, case, problem, match):
    ct, tibia, fracture = case
    side = "left"
    if problem == "empty_tibia":
        tibia = tibia.with_array(np.zeros_like(tibia.array))
    elif problem == "empty_fracture":
        fracture = fracture.with_array(np.zeros_like(fracture.array))
    elif problem == "fracture_everywhere":
        fracture = tibia
    elif problem == "fracture_outside":
        fracture = fracture.with_array((tibia.array == 0).astype(np.uint8) * 0)
        fracture.array[0, 0, 0] = 1
    elif problem == "mr_like":
        ct = ct.with_array((ct.array.astype(np.float32) + 1000) / 2400)
    elif problem == "nan":
        arr = ct.array.astype(np.float32)
        arr[3, 3, 3] = np.nan
        ct = ct.with_array(arr)
    else:
        side = "middle"
    with pytest.raises(InputError, match=match):
        predictor.predict(ct, tibia, fracture, side=side)


def test_fibula_side_reads_the_side_from_the_fibula():
    """The fibula lies lateral: the patient's left (+x LPS) of a left tibia, the right of a right one; a CT
    without a fibula beside the tibia gives no answer (the Predictor then compares both sides)."""
    from TibiaReconstructionLib.phantoms import generate_case
    from TibiaReconstructionLib.phantoms.ct import FIBULA, TIBIA
    from TibiaReconstructionLib.checks import fibula_side

    for side in ("left", "right"):
        case = generate_case(7, side=side, spacing=(1.5, 1.5, 3.0))
        tibia = case.fractured_labels.with_array((case.fractured_labels.array == TIBIA).astype(np.uint8))
        assert fibula_side(case.fractured_ct, tibia) == side
    no_fibula = np.where(case.fractured_labels.array == FIBULA, 40, case.fractured_ct.array)
    assert fibula_side(case.fractured_ct.with_array(no_fibula), tibia) is None


@pytest.mark.parametrize("lateral_mm", [5.0, -5.0])
def test_a_fibula_mostly_behind_the_tibia_still_gives_the_side(lateral_mm):
    """A leg turned in the scanner puts the fibula nearly behind the tibia: 5 mm to one side of it is enough (the
    fibula's side was right on all 89 held-out phantoms looked at; the model's misfit, the fallback, was not)."""
    from TibiaReconstructionLib.checks import fibula_side

    grid = Grid((100, 100, 90), (1.0, 1.0, 4.0), (-50.0, -50.0, -180.0), np.eye(3))
    p = grid.index_to_physical(np.indices(grid.shape).reshape(3, -1).T[:, ::-1].astype(float))
    tibia = (np.hypot(p[:, 0], p[:, 1]) <= 12.0) & (np.abs(p[:, 2]) <= 170.0)
    fibula = (np.hypot(p[:, 0] - lateral_mm, p[:, 1] - 26.0) <= 6.0) & (np.abs(p[:, 2]) <= 160.0)
    ct = Volume.on_grid(np.where(tibia | fibula, 1200, 40).astype(np.int16).reshape(grid.shape), grid)
    assert fibula_side(ct, ct.with_array(tibia.astype(np.uint8).reshape(grid.shape))) == (
        "left" if lateral_mm > 0 else "right")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("turn_deg", [-40.0, 0.0, 40.0, 70.0])
def test_the_side_follows_the_plateau_however_the_leg_is_turned(side, turn_deg):
    """The fibula lies behind the plateau's widest (medial-lateral) axis, on its lateral half: that tells the side
    however far the leg is turned about its long axis, even turned out so far that the fibula lies behind or medial
    of the tibia in the patient's frame (70 deg here: its offset along x points to the other side)."""
    from TibiaReconstructionLib.checks import fibula_side

    assert fibula_side(*plateau_leg(turn_deg, side)) == side


def test_a_fragment_missing_from_the_tibia_mask_is_warned_about_and_predicted(predictor, case, monkeypatch):
    """A tibia mask without the fragment below the fracture ends in the shaft: too short for a tibia (the bundle's is
    150 mm), and the CT does not cut it off. The prediction says a fragment is missing at the distal end and predicts
    beyond it as where the CT ends there (as on a knee CT), closer to the whole bone than when taken as a whole
    tibia; without the fragment above the fracture, the proximal end."""
    from TibiaReconstructionLib import checks

    ct, tibia, fracture = case
    k = np.arange(tibia.array.shape[0])[:, None, None]
    broken = np.flatnonzero(fracture.array.any(axis=(1, 2)))
    without_distal = tibia.with_array((tibia.array * (k >= broken[0])).astype(np.uint8))
    without_proximal = tibia.with_array((tibia.array * (k <= broken[-1])).astype(np.uint8))
    assert checks.tibia_extent(without_distal, fracture)[1] == "distal"
    assert checks.tibia_extent(without_proximal, fracture)[1] == "proximal"
    length, _ = checks.tibia_extent(tibia, fracture)
    assert length > checks.SHORT_SHARE * predictor.bundle.tibia_length_mm()  # the whole bone is long enough
    res = predictor.predict(ct, without_distal, fracture, side="left")
    assert any("a fragment is probably missing from the tibia mask, at its distal end" in w for w in res.warnings)
    monkeypatch.setattr(checks, "tibia_extent", lambda *args, **kwargs: (None, None))
    as_whole = predictor.predict(ct, without_distal, fracture, side="left")
    assert not any("fragment is probably missing" in w for w in as_whole.warnings)
    dice = metrics.dice(res.labelmap.array, tibia.array)
    assert dice > 0.9 and dice > metrics.dice(as_whole.labelmap.array, tibia.array) + 0.02  # 0.915 against 0.87


def test_the_visible_bone_is_kept_and_the_model_fills_the_fracture_zone(predictor, case, result):
    from scipy import ndimage

    ct, tibia, fracture = case
    model_only = Predictor(predictor.bundle, device="cpu", keep_visible_bone=False).predict(*case, side="left")
    assert model_only.fusion == {} and all(f["pasted"] for f in result.fusion["fragments"])
    zone = fracture.array > 0
    near_bone = ndimage.distance_transform_edt(tibia.array == 0, ct.spacing[::-1]) <= 3.0
    # the proximal piece (the anchor, with the bump) stays put: there the prediction is the patient's bone exactly
    above = np.arange(zone.shape[0])[:, None, None] > np.argwhere(zone)[:, 0].max() + 2
    seen = near_bone & above
    assert (result.labelmap.array[seen] == tibia.array[seen]).all()
    assert (model_only.labelmap.array[seen] != tibia.array[seen]).sum() > 50  # the model alone is smoother
    np.testing.assert_array_equal(result.labelmap.array[zone], model_only.labelmap.array[zone])
