"""Both-legs phantoms and the contralateral target (contralateral.py) on coarse (2-3 mm) phantoms."""

import json
from functools import lru_cache

import numpy as np
import pytest
from vtk.util import numpy_support

from TibiaReconstructionLib.cli import main
from TibiaReconstructionLib.contralateral import DISTANCE_ARRAY, contralateral_target
from TibiaReconstructionLib.errors import GeometryMismatchError, InputError
from TibiaReconstructionLib.geometry import Grid, Volume, apply_affine, mirror, resample
from TibiaReconstructionLib.io import read_volume, write_volume
from TibiaReconstructionLib.metrics import dice, rmsd
from TibiaReconstructionLib.phantoms import generate_case, read_case, write_case
from TibiaReconstructionLib.phantoms.ct import OTHER_TIBIA

TIBIA = 1


@lru_cache(maxsize=None)
def case(seed, **kwargs):
    return generate_case(seed, **kwargs)


def both(seed=3, **kwargs):
    return case(seed, spacing=(2.5, 2.5, 2.5), both_legs=True, **kwargs)


def fractured_inputs(c):
    tibia = c.fractured_labels.with_array((c.fractured_labels.array == TIBIA).astype(np.uint8))
    return c.fractured_ct, tibia, c.fracture_mask


def mirrored_onto(c, healthy, other):
    """Dice of the tibia ``healthy`` with the tibia ``other`` mirrored and aligned through the recorded poses
    (other leg's LPS -> its anatomical frame -> the first leg's LPS; nearest neighbour): only the bilateral
    asymmetry is left."""
    to_other = c.other_pose @ np.linalg.inv(c.info["pose_anatomical_to_lps"])  # first leg's LPS -> other's LPS
    moved = resample(c.labels.with_array(other.astype(np.uint8)), c.labels.grid, output_to_input=to_other,
                     interpolation="nearest")
    return dice(moved.array != 0, healthy)


@pytest.fixture(scope="module")
def exact():
    """A fractured left leg (transverse) and, beside it, its own healthy leg mirrored about x = 0 (identity
    direction, nearest neighbour: exact within a voxel): the contralateral target is the truth. Returns CT,
    tibia, fracture mask, other tibia (Volumes), the healthy tibia and the fragment ids (arrays)."""
    c = generate_case(3, spacing=2.0, side="left", fracture_type="transverse")
    right_ct, _ = mirror(c.ct, point=(0.0, 0.0, 0.0))
    right_labels, _ = mirror(c.labels, point=(0.0, 0.0, 0.0))
    corners = np.concatenate([c.ct.grid.corners(), right_ct.grid.corners()])
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    lo = c.ct.origin - np.ceil((c.ct.origin - lo) / 2.0) * 2.0  # on the left leg's lattice
    grid = Grid(tuple(np.rint((hi - lo) / 2.0).astype(int) + 1), c.ct.spacing, lo)
    ct = np.maximum(resample(c.fractured_ct, grid, default_value=-1000).array,
                    resample(right_ct, grid, default_value=-1000).array)
    left = resample(c.fractured_labels, grid, interpolation="nearest").array == TIBIA
    right = resample(right_labels, grid, interpolation="nearest").array == TIBIA
    truth = resample(c.labels, grid, interpolation="nearest").array == TIBIA
    frac = resample(c.fracture_mask, grid, interpolation="nearest")
    ids = resample(c.fragment_ids, grid, interpolation="nearest").array
    ct = Volume.on_grid(ct, grid)
    return ct, ct.with_array(left.astype(np.uint8)), frac, ct.with_array(right.astype(np.uint8)), truth, ids


# ---------------------------------------------------------------------------------------------
# Two-leg phantoms


def test_both_legs_phantom_has_two_similar_but_not_identical_tibiae():
    c = both(side="left")
    assert c.both_legs and c.side == "left"
    labels = set(np.unique(c.labels.array))
    assert labels == set(range(11))
    healthy, other = c.labels.array == TIBIA, c.labels.array == OTHER_TIBIA
    assert np.array_equal(c.other_tibia.array != 0, other)
    x = {k: c.labels.index_to_physical(np.argwhere(m)[:, ::-1].astype(float))[:, 0].mean()
         for k, m in (("left", healthy), ("right", other))}
    assert x["left"] - x["right"] > 80.0  # the right leg lies at smaller LPS x
    # knees 11-20 cm apart (plateau centre to centre, from the surfaces' top 15 mm)
    tops = [s.vertices[s.vertices[:, 2] > s.vertices[:, 2].max() - 15.0].mean(axis=0)
            for s in (c.tibia_surface, c.other_tibia_surface)]
    assert 100.0 < abs(tops[0][0] - tops[1][0]) < 260.0
    assert 0.8 < mirrored_onto(c, healthy, other) < 0.99
    assert abs(c.info["other_leg"]["tibia_length_mm"] - c.info["tibia_length_mm"]) < 12.0
    assert not np.allclose(c.other_shape_coefficients, c.shape_coefficients)
    assert np.linalg.det(c.other_pose[:3, :3]) < 0  # a mirrored (right) leg
    # the other leg is healthy in the fractured labels, and the fracture is only in the chosen leg
    assert np.array_equal(c.fractured_labels.array == OTHER_TIBIA, other)
    assert not np.any(c.fracture_mask.array.astype(bool) & other)


def test_both_legs_keep_the_one_leg_anatomy_and_default_is_unchanged():
    one = case(3, spacing=(2.5, 2.5, 2.5), side="left")
    two = both(side="left")
    assert one.other_pose is None and one.other_tibia is None and set(np.unique(one.labels.array)) == set(range(6))
    assert np.allclose(one.tibia_surface.vertices, two.tibia_surface.vertices)
    assert one.fracture_type == two.fracture_type
    assert two.ct.grid.size[0] > one.ct.grid.size[0]  # the field of view widened to hold both legs
    vol = lambda c: np.count_nonzero(c.labels.array == TIBIA)  # noqa: E731
    assert vol(two) == pytest.approx(vol(one), rel=0.02)


def test_right_fractured_leg_mirrors_the_pair_and_files_round_trip(tmp_path):
    left, right = both(8, side="left"), both(8, side="right")
    assert right.side == "right" and right.both_legs
    mirrored, h = mirror(left.labels, normal=(1.0, 0.0, 0.0), point=(0.0, 0.0, 0.0))
    assert np.array_equal(mirrored.array, right.labels.array)
    assert np.allclose(h @ left.other_pose, right.other_pose)
    meta = write_case(right, tmp_path / "c")
    assert meta["other_leg"]["side"] == "left" and meta["other_leg"]["tibia_label"] == OTHER_TIBIA
    assert meta["labels"]["6"] == "other tibia"
    back = read_case(tmp_path / "c")
    assert back.both_legs and np.allclose(back.other_pose, right.other_pose)
    assert np.allclose(back.other_shape_coefficients, right.other_shape_coefficients)
    mask = read_volume(tmp_path / "c" / meta["files"]["other_tibia_mask"], label=True)
    assert np.array_equal(mask.array, right.other_tibia.array)


# ---------------------------------------------------------------------------------------------
# Contralateral target


def test_exact_mirror_recovers_the_healthy_tibia(exact):
    ct, tibia, frac, other, truth, _ = exact
    before = [v.array.copy() for v in (ct, tibia, frac, other)]
    r = contralateral_target(ct, tibia, frac, other)
    assert r.labelmap.grid.same_as(ct.grid) and r.labelmap.array.dtype == np.uint8
    assert dice(r.labelmap.array, truth) > 0.95
    assert rmsd(r.labelmap.array, truth, ct.spacing) < 1.0
    assert np.linalg.det(r.transform[:3, :3]) < 0 and r.fit["rms_mm"] < 1.0 and r.side == "left"
    assert r.surface.GetNumberOfPolys() > 100
    assert all(np.array_equal(a, v.array) for a, v in zip(before, (ct, tibia, frac, other)))  # inputs unmodified


def test_a_fine_ct_gives_the_same_fit_and_the_placing_can_be_left_out(exact):
    """The same case at 0.5 mm along x (each voxel split in four): the fit reads the masks on a lattice of about
    FIT_MM and lands where the 2 mm fit does; place=False gives the transform without the labelmap and surface."""
    ct, tibia, frac, other, *_ = exact
    coarse = contralateral_target(ct, tibia, frac, other)
    fine_grid = Grid((ct.grid.size[0] * 4, *ct.grid.size[1:]), ct.spacing * [0.25, 1, 1],
                     ct.origin - [0.75, 0.0, 0.0])
    fine = [resample(v, fine_grid, interpolation="nearest") for v in (ct, tibia, frac, other)]
    r = contralateral_target(*fine, place=False)
    assert r.labelmap is None and r.surface is None and r.report()["volume_ml"] is None
    pts = fine[3].index_to_physical(np.argwhere(fine[3].array)[::50, ::-1].astype(float))
    gap = np.linalg.norm(apply_affine(r.transform, pts) - apply_affine(coarse.transform, pts), axis=1)
    assert np.sqrt(np.mean(gap ** 2)) < 1.0
    assert r.fit["fragment_ml"] == pytest.approx(coarse.fit["fragment_ml"], rel=0.05)
    assert r.other_tibia is fine[3]  # the given mask, neither copied nor changed


def test_both_legs_on_an_oblique_grid_are_segmented_whole(exact):
    """The other leg is found in a CT whose axes are turned 20 deg about z (no half of it to crop): the whole CT is
    segmented, the other tibia found and the fit as good as on the straight grid."""
    ct, tibia, frac, other, *_ = exact
    turn = np.radians(20.0)
    direction = np.array([[np.cos(turn), -np.sin(turn), 0.0], [np.sin(turn), np.cos(turn), 0.0], [0.0, 0.0, 1.0]])
    centre = ct.grid.index_to_physical((np.asarray(ct.grid.size) - 1) / 2.0)
    size = np.asarray(ct.grid.size) + [0, 40, 0]
    grid = Grid(tuple(size), ct.spacing, centre - direction @ ((size - 1) / 2.0 * ct.spacing), direction)
    turned = [resample(ct, grid, default_value=-1000.0)] + [resample(v, grid, interpolation="nearest")
                                                             for v in (tibia, frac, other)]
    r = contralateral_target(*turned[:3], place=False)
    assert r.fit["rms_mm"] < 1.5
    assert dice(r.other_tibia.array != 0, turned[3].array != 0) > 0.9


def test_a_fine_ct_s_other_leg_is_segmented_on_a_lattice_as_at_full_resolution(exact, monkeypatch):
    """At 0.25 mm along x the other leg's half of the CT is segmented on every 2nd voxel (SEGMENT_MM) and mapped
    back onto the CT grid: the mask and the fit agree with segmenting every voxel."""
    from TibiaReconstructionLib import contralateral

    ct, tibia, frac, other, *_ = exact
    grid = Grid((ct.grid.size[0] * 8, *ct.grid.size[1:]), ct.spacing * [0.125, 1, 1], ct.origin - [0.875, 0.0, 0.0])
    fine = [resample(ct, grid)] + [resample(v, grid, interpolation="nearest") for v in (tibia, frac, other)]
    on_lattice = contralateral_target(*fine[:3], place=False)
    monkeypatch.setattr(contralateral, "SEGMENT_MM", 0.1)  # every voxel
    full = contralateral_target(*fine[:3], place=False)
    assert on_lattice.other_tibia.grid.same_as(grid)
    assert dice(on_lattice.other_tibia.array != 0, full.other_tibia.array != 0) > 0.98
    assert dice(on_lattice.other_tibia.array != 0, fine[3].array != 0) > 0.97
    pts = fine[3].index_to_physical(np.argwhere(fine[3].array)[::50, ::-1].astype(float))
    gap = np.linalg.norm(apply_affine(on_lattice.transform, pts) - apply_affine(full.transform, pts), axis=1)
    assert np.sqrt(np.mean(gap ** 2)) < 0.5


def test_the_displaced_distal_fragment_does_not_pull_the_target(exact):
    """Displacing the distal fragment 16 mm further does not move the target: only the proximal fragment counts."""
    ct, tibia, frac, other, truth, ids = exact
    r = contralateral_target(ct, tibia, frac, other)
    distal = ids == 2
    moved = np.roll(distal, 8, axis=2)  # 16 mm along +x
    tibia2 = tibia.with_array(((tibia.array != 0) & ~distal | moved).astype(np.uint8))
    r2 = contralateral_target(ct, tibia2, frac, other)
    tibia_ml = np.count_nonzero(tibia.array) * np.prod(ct.spacing) / 1000.0
    assert r2.fit["fragment_ml"] == r.fit["fragment_ml"] < tibia_ml
    assert dice(r2.labelmap.array, r.labelmap.array) > 0.99


def test_asymmetric_other_leg_gives_a_close_target_and_comparison():
    c = both(13, side="right", fracture_type="oblique")
    ct, tibia, frac = fractured_inputs(c)
    truth = c.labels.array == TIBIA
    r = contralateral_target(ct, tibia, frac, c.other_tibia, prediction=c.labels.with_array(truth.astype(np.uint8)))
    assert dice(r.labelmap.array, truth) > 0.88
    cmp = r.comparison
    assert cmp["dice"] == pytest.approx(dice(r.labelmap.array, truth), abs=1e-9)
    assert 0.0 < cmp["rmsd_mm"] < 4.0 and cmp["hd95_mm"] >= cmp["msd_mm"]
    d = numpy_support.vtk_to_numpy(r.surface.GetPointData().GetArray(DISTANCE_ARRAY))
    assert len(d) == r.surface.GetNumberOfPoints() and np.abs(d).mean() < 3.0
    json.dumps(r.report())


def test_signed_distance_is_positive_outside_the_prediction(exact):
    ct, tibia, frac, other, truth, _ = exact
    from scipy.ndimage import binary_erosion

    smaller = ct.with_array(binary_erosion(truth, iterations=2).astype(np.uint8))
    r = contralateral_target(ct, tibia, frac, other, prediction=smaller)
    d = numpy_support.vtk_to_numpy(r.surface.GetPointData().GetArray(DISTANCE_ARRAY))
    assert np.median(d) > 2.0  # the target is about 4 mm (two voxels) bigger than the prediction
    assert r.comparison["dice"] < 0.95


def test_refusals(exact):
    ct, tibia, frac, other, _, _ = exact
    empty = ct.with_array(np.zeros(ct.grid.shape, np.uint8))
    with pytest.raises(InputError, match="other tibia mask is empty"):
        contralateral_target(ct, tibia, frac, empty)
    with pytest.raises(InputError, match="tibia mask is empty"):
        contralateral_target(ct, empty, frac, other)
    with pytest.raises(InputError, match="overlaps the fractured tibia"):
        contralateral_target(ct, tibia, frac, tibia)
    shifted = Volume(other.array, other.spacing, other.origin + 1.0, other.direction)
    with pytest.raises(GeometryMismatchError):
        contralateral_target(ct, tibia, frac, shifted)


def test_one_leg_ct_says_to_use_the_prediction(monkeypatch):
    """A quick look finds no bone beside the fractured leg, so the segmentation (seconds on a fine CT) is not run."""
    import TibiaReconstructionLib.segment as segment

    c = case(3, spacing=(2.0, 2.0, 2.0), side="left", fracture_type="transverse")
    with pytest.raises(InputError, match="No other leg was found.*prediction"):
        contralateral_target(*fractured_inputs(c))
    monkeypatch.setattr(segment, "segment_tibia", lambda *a, **k: pytest.fail("segmented a one-leg CT"))
    with pytest.raises(InputError, match="No other leg was found"):
        contralateral_target(*fractured_inputs(c))
    two = case(5, spacing=(2.0, 2.0, 2.0), both_legs=True, side="left", fracture_type="transverse")
    with pytest.raises(pytest.fail.Exception, match="segmented"):  # with both legs it does segment
        contralateral_target(*fractured_inputs(two))


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_end_to_end_with_segmentation_and_prediction(tmp_path, capsys):
    c = case(5, spacing=(2.0, 2.0, 2.0), both_legs=True, side="left", fracture_type="transverse")
    ct, tibia, frac = fractured_inputs(c)
    files = {"ct": write_volume(ct, tmp_path / "ct.nrrd"), "tibia": write_volume(tibia, tmp_path / "t.nrrd"),
             "frac": write_volume(frac, tmp_path / "f.nrrd"),
             "pred": write_volume(c.labels.with_array((c.labels.array == TIBIA).astype(np.uint8)), tmp_path / "p.nrrd")}
    out = tmp_path / "out"
    argv = ["contralateral", "--ct", str(files["ct"]), "--tibia-mask", str(files["tibia"]), "--fracture-mask",
            str(files["frac"]), "--prediction", str(files["pred"]), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "vs prediction Dice" in printed
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["contralateral_tibia_label.nrrd", "contralateral_tibia_LPS.stl",
                            "contralateral_tibia_RAS.stl", "contralateral.json", "contralateral_vs_prediction_LPS.vtp",
                            "other_tibia_mask_auto.nrrd"])
    report = json.loads((out / "contralateral.json").read_text(encoding="utf-8"))
    assert report["comparison_with_prediction"]["dice"] > 0.85
    assert report["inputs"]["other_tibia_mask"] == "automatic segmentation"
    label = read_volume(out / "contralateral_tibia_label.nrrd", label=True)
    assert label.grid.same_as(ct.grid) and dice(label.array, c.labels.array == TIBIA) > 0.85
    auto = read_volume(out / "other_tibia_mask_auto.nrrd", label=True)
    assert dice(auto.array, c.labels.array == OTHER_TIBIA) > 0.9
    assert (out / "contralateral_tibia_LPS.stl").read_bytes()[:9] == b"SPACE=LPS"
    # never overwrites, and a one-leg CT is a one-line error that writes nothing
    assert main(argv) == 1 and "already exist" in capsys.readouterr().err
    one = case(3, spacing=(2.0, 2.0, 2.0), side="left", fracture_type="transverse")
    ct1, tibia1, frac1 = fractured_inputs(one)
    paths = [write_volume(v, tmp_path / f"one_{n}.nrrd") for n, v in (("ct", ct1), ("t", tibia1), ("f", frac1))]
    assert main(["contralateral", "--ct", str(paths[0]), "--tibia-mask", str(paths[1]), "--fracture-mask",
                 str(paths[2]), "--out", str(tmp_path / "one")]) == 1
    assert "No other leg was found" in capsys.readouterr().err
    assert not (tmp_path / "one").exists()


def test_phantoms_cli_both_legs(tmp_path):
    out = tmp_path / "ds"
    assert main(["phantoms", "--n", "1", "--out", str(out), "--seed", "30", "--spacing", "4", "4", "4",
                 "--both-legs", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    entry = manifest["cases"][0]
    assert manifest["both_legs"] and manifest["labels"]["6"] == "other tibia"
    mask = read_volume(out / entry["other_tibia"], label=True)
    assert np.count_nonzero(mask.array) > 0
    back = read_case(out / entry["folder"])
    assert back.both_legs and np.array_equal(back.other_tibia.array, mask.array)
    again = generate_case(30, spacing=(4.0, 4.0, 4.0), both_legs=True)
    assert np.array_equal(back.fractured_ct.array, again.fractured_ct.array)
    assert apply_affine(back.other_pose, np.zeros(3)).shape == (3,)


# ---------------------------------------------------------------------------------------------
# Plateau fractures and implausible fits


def test_plateau_fracture_anchors_on_the_main_fragment_not_the_split_condyle():
    """Benchmark case 500019 (right plateau fracture, both legs) at 2 mm: the fracture mask cuts the main
    fragment into a shaft and a small plateau piece, and the split, displaced condyle also reaches the knee
    end and was the largest piece there; fitting to it alone put the target 41 mm off (112 mm at 1 mm
    spacing). The anchor must be the main fragment's pieces (shaft and plateau piece) without the condyle."""
    from TibiaReconstructionLib.bench import heldout_case

    c = heldout_case(500019, (2.0, 2.0, 2.0))
    assert c.fracture_type == "plateau"
    ct, tibia, frac = fractured_inputs(c)
    truth = c.labels.array == TIBIA
    r = contralateral_target(ct, tibia, frac, c.other_tibia)
    assert dice(r.labelmap.array, truth) > 0.88
    assert rmsd(r.labelmap.array, truth, ct.spacing) < 3.0
    ids = c.fragment_ids.array
    anchor = (tibia.array != 0) & (frac.array == 0) & (r.labelmap.array != 0)
    assert np.count_nonzero(anchor & (ids == 1)) > 0.5 * np.count_nonzero(ids == 1)
    assert len(r.fit["hypotheses"]) >= 2 and r.fit["proximal_fragment_share"] > 0.4
    assert r.fit["inlier_share"] > 0.9 and r.fit["near_tibia_share"] > 0.9 and not r.warnings


def test_an_implausible_fit_is_refused_and_a_doubtful_one_warned(exact):
    from TibiaReconstructionLib.contralateral import _check_fit

    ct, tibia, frac, other, _, _ = exact
    r = contralateral_target(ct, tibia, frac, other)
    assert r.fit["near_tibia_share"] > 0.95 and not r.warnings
    pts = ct.grid.index_to_physical(np.argwhere(tibia.array != 0)[:, ::-1].astype(float))
    good = {"rms": 1.0, "inlier_share": 0.95}
    assert _check_fit(good, pts + 2.0, pts, [])["near_tibia_share"] == 1.0
    with pytest.raises(InputError, match="within 15 mm of the fractured tibia"):
        _check_fit(good, pts + np.array([60.0, 0.0, 0.0]), pts, [])  # the target beside the fractured tibia
    with pytest.raises(InputError, match="RMS residual is 423.7 mm"):
        _check_fit({"rms": 423.66, "inlier_share": 0.0}, pts, pts, [])  # the old, diverged ICP on case 500019
    warnings = []
    _check_fit({"rms": 3.0, "inlier_share": 0.7}, pts, pts, warnings)
    assert len(warnings) == 2 and "RMS residual is 3.0 mm" in warnings[0]


def test_icp_keeps_its_best_pose():
    """Point-to-plane steps on a small, flat patch can run away; the ICP returns the best pose it met."""
    from TibiaReconstructionLib.contralateral import _icp

    rng = np.random.default_rng(0)
    target = np.c_[rng.uniform(-50, 50, (4000, 2)), np.zeros(4000)]  # a plane: sliding along it is free
    normals = np.tile([0.0, 0.0, 1.0], (4000, 1))
    source = target[:300] + np.array([0.0, 0.0, 5.0])
    m, rms, _ = _icp(source, target, normals)
    d = np.linalg.norm(apply_affine(m, source)[:, None, :2] - target[None, :, :2], axis=2).min(axis=1)
    assert rms < 1.0 and np.abs(apply_affine(m, source)[:, 2]).max() < 1.0 and np.median(d) < 3.0
