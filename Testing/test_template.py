"""The other leg as the template (template.py): moved fragments registered onto it, the prediction filled with it,
and the model's prediction with a warning when it cannot be fitted."""

import numpy as np
import pytest

from TibiaReconstructionLib import fusion
from TibiaReconstructionLib.contralateral import contralateral_target
from TibiaReconstructionLib.errors import GeometryMismatchError, InputError
from TibiaReconstructionLib.geometry import Grid, Volume, apply_affine, bounding_box, crop_to_mask, euler_rotation, \
    resample, translation
from TibiaReconstructionLib.metrics import dice
from TibiaReconstructionLib.predict import Predictor
from TibiaReconstructionLib.refine import Placement
from TibiaReconstructionLib.surface import UNCERTAINTY_ARRAY
from TibiaReconstructionLib.template import mismatch, template_box, template_occupancy
import test_contralateral
import test_fusion
from test_fusion import GRID

exact = test_contralateral.exact  # the fixture: a fractured leg beside its own mirror image
case = test_fusion.case  # the fixture: a fractured bar, its fragments and a model 2 mm off


def test_a_moved_fragment_is_registered_onto_the_template_and_the_template_fills_the_rest(case):
    """The reduction puts the distal piece 2 mm off in y and 1.5 mm off in x; the template (the healthy bar) takes it
    back onto the bar; the fracture zone is the template's, not the model's (2 mm off)."""
    healthy, ct, tibia, fracture, labels, model = case
    off = translation((-3.0 + 1.5, 2.0, 0.0))  # the right move is (-3, 0, 0)
    place = Placement(labels, [1, 2], 2, np.stack([off, np.eye(4)]), np.array([0.8, 0.7]))
    before = healthy.copy()
    out = fusion.fuse_visible_bone(model, GRID, ct, tibia, fracture, bounding_box(tibia.array), place, GRID,
                                   np.eye(4), reassemble_fragments=False, template=healthy.astype(np.float32))
    (fit,) = out.report["template"]
    assert fit["id"] == 1 and fit["kept"] and fit["misfit_after_mm"] < 0.3 < 1.0 < fit["misfit_before_mm"]
    np.testing.assert_array_equal(out.occupancy >= 0.5, healthy)
    np.testing.assert_array_equal(healthy, before)
    # without the template, the same placement pastes the piece where the reduction put it
    plain = fusion.fuse_visible_bone(model, GRID, ct, tibia, fracture, bounding_box(tibia.array), place, GRID,
                                     np.eye(4), reassemble_fragments=False)
    assert dice(plain.occupancy[:18] >= 0.5, healthy[:18]) < 0.8


def test_the_template_is_the_other_tibia_moved_by_the_fit(exact):
    """template_occupancy reads the other tibia through the fit's transform: on the CT grid it is the placed
    labelmap of the contralateral target; template_box covers it."""
    ct, tibia, fracture, other, *_ = exact
    placed = contralateral_target(ct, tibia, fracture, other)
    bone = crop_to_mask(other, other, 2.0)
    occupancy = template_occupancy(bone, placed.transform, ct.grid)
    assert dice(occupancy >= 0.5, placed.labelmap.array != 0) > 0.97
    lo, hi = template_box(bone, placed.transform, ct.grid)
    box = bounding_box(placed.labelmap.array != 0)
    assert np.all(lo <= box[0][::-1]) and np.all(hi >= box[1][::-1])
    assert np.all(hi - lo <= box[1][::-1] - box[0][::-1] + 2)  # and not much more


def test_the_template_box_read_on_a_lattice_covers_the_whole_mask_on_a_fine_grid():
    """On a fine grid the box comes from every n-th voxel (about 2 mm), grown by the lattice's diagonal: it holds
    every voxel of the moved mask, a thin spike between the lattice's voxels included (it reaches 2 mm beyond the
    rest, less than the margin), and is at most that margin larger."""
    spacing = np.array([0.4, 0.45, 0.6])
    grid = Grid((90, 80, 120), spacing, (-18.0, -18.0, -36.0))
    kji = np.indices(grid.shape).reshape(3, -1).T
    p = grid.index_to_physical(kji[:, ::-1].astype(float))
    inside = ((p[:, 0] / 12) ** 2 + (p[:, 1] / 9) ** 2 < 1) & (np.abs(p[:, 2]) < 30)
    spike = (np.abs(p[:, 0] - 3.0) < 0.25) & (np.abs(p[:, 1]) < 0.25) & (np.abs(p[:, 2]) < 32)
    bone = Volume.on_grid((inside | spike).reshape(grid.shape).astype(np.uint8), grid)
    transform = euler_rotation((4.0, -3.0, 20.0)) @ translation((5.0, -2.0, 1.0))
    ct = Grid((200, 200, 200), (0.5, 0.5, 0.5), (-50.0, -50.0, -50.0))
    exact = ct.physical_to_index(apply_affine(transform, bone.index_to_physical(
        np.argwhere(bone.array)[:, ::-1].astype(float))))
    lo, hi = template_box(bone, transform, ct)
    assert np.all(lo <= np.floor(exact.min(0))) and np.all(hi >= np.ceil(exact.max(0)))
    margin = np.linalg.norm(np.array([4, 3, 2]) * spacing) / 0.5  # every (5, 4, 3)-th voxel, in CT voxels
    assert np.all(lo >= np.floor(exact.min(0) - margin) - 1) and np.all(hi <= np.ceil(exact.max(0) + margin) + 1)


@pytest.fixture(scope="module")
def default_predictor():
    return Predictor(device="cpu")


def test_the_other_leg_makes_the_prediction_match_the_healthy_tibia(default_predictor, exact):
    """A displaced transverse fracture beside the leg's own mirror image: with the other leg the prediction is the
    healthy tibia within a voxel; the model alone is further off. The report says how the template was fitted."""
    ct, tibia, fracture, other, truth, _ = exact
    alone = default_predictor.predict(ct, tibia, fracture, side="left", other_tibia=None)
    with_other = default_predictor.predict(ct, tibia, fracture, side="left", other_tibia=other)
    assert not with_other.warnings
    score, baseline = dice(with_other.labelmap.array != 0, truth), dice(alone.labelmap.array != 0, truth)
    assert score > 0.99 and 1.0 - score < 0.5 * (1.0 - baseline)  # half the model's error (0.998 vs 0.984 here)
    assert with_other.fusion["other_leg"]["fit"]["rms_mm"] < 1.0
    assert all(f["kept"] for f in with_other.fusion["template"]) and with_other.fusion["template"]
    assert "other_leg" in with_other.timings and "template" not in alone.fusion
    assert with_other.occupancy_std is None and alone.occupancy_std is not None  # the model's posterior only
    assert with_other.fusion["other_leg"]["requested"] == "mask" and "other_leg" not in alone.fusion
    # by default the other leg is looked for in the CT, segmented and used the same way
    found = default_predictor.predict(ct, tibia, fracture, side="left")
    assert found.fusion["other_leg"]["requested"] == "auto" and found.fusion["other_leg"]["used"]
    assert dice(found.labelmap.array != 0, truth) > baseline and not found.warnings  # 0.989 (segmented at 2 mm)


def test_an_unfit_other_tibia_leaves_the_model_prediction_and_a_malformed_one_is_refused(default_predictor, exact):
    ct, tibia, fracture, *_ = exact
    alone = default_predictor.predict(ct, tibia, fracture, side="left", other_tibia=None)
    wrong = default_predictor.predict(ct, tibia, fracture, side="left", other_tibia=tibia)  # the fractured tibia
    assert any(w.startswith("The other leg was not used: The other tibia mask overlaps") for w in wrong.warnings)
    np.testing.assert_array_equal(wrong.labelmap.array, alone.labelmap.array)
    with pytest.raises(InputError, match="other_tibia"):
        default_predictor.predict(ct, tibia, fracture, side="left", other_tibia="left leg")
    with pytest.raises(GeometryMismatchError, match="other tibia mask"):  # refused before the model runs
        default_predictor.predict(ct, tibia, fracture, side="left", other_tibia=Volume.on_grid(
            tibia.array[1:], Grid(tuple(np.array(tibia.grid.size) - [0, 0, 1]), tibia.spacing, tibia.origin)))


def test_mismatch_names_a_fragment_that_does_not_fit_and_a_template_unlike_the_model():
    grid = Grid((40, 30, 60), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    k, j, i = np.indices(grid.shape)

    def rod(x0):  # radius 8 mm, 48 mm long, along z
        return (((i - x0) ** 2 + (j - 15) ** 2 < 64) & (k > 5) & (k < 54)).astype(np.float32)

    fragment = {"id": 2, "points": 500, "misfit_after_mm": 0.4}
    assert mismatch(rod(10), rod(10), grid, [fragment]) is None
    assert mismatch(rod(10), rod(16), grid, []) is None  # 6 mm apart (mean surface distance 3 mm): alike enough
    assert "differs from the model's reconstruction" in mismatch(rod(10), rod(22), grid, [fragment])  # 12 mm: 6 mm
    small = {"id": 3, "points": 60, "misfit_after_mm": 2.0}  # a small piece's misfit does not decide
    assert mismatch(rod(10), rod(10), grid, [fragment, small]) is None
    bad = dict(fragment, misfit_after_mm=1.4)
    assert "1.4 mm (mean)" in mismatch(rod(10), rod(10), grid, [bad, small])
    fine = Grid((80, 60, 120), (0.5, 0.5, 0.5), (-0.25, -0.25, -0.25))  # the same rods on 0.5 mm voxels, read on
    k, j, i = (np.indices(fine.shape) - 0.5) / 2  # every 3rd (SHAPE_LATTICE_MM): the same verdicts
    assert mismatch(rod(10), rod(16), fine, []) is None
    assert "fractured one by 6.0 mm" in mismatch(rod(10), rod(22), fine, [])


def test_another_persons_leg_is_not_used(default_predictor, exact):
    """The other tibia 10 % larger (not this patient's): refused with a warning, the model's prediction unchanged."""
    ct, tibia, fracture, other, *_ = exact
    alone = default_predictor.predict(ct, tibia, fracture, side="left", other_tibia=None)
    centre = other.index_to_physical(np.argwhere(other.array)[:, ::-1].astype(float)).mean(0)
    shrink = translation(centre) @ np.diag([1 / 1.1, 1 / 1.1, 1 / 1.1, 1.0]) @ translation(-centre)
    larger = resample(other, other.grid, output_to_input=shrink, interpolation="nearest")
    result = default_predictor.predict(ct, tibia, fracture, side="left", other_tibia=larger)
    assert any(w.startswith("The other leg was not used") for w in result.warnings), result.warnings
    np.testing.assert_array_equal(result.labelmap.array, alone.labelmap.array)
    assert "template" not in result.fusion and result.occupancy_std is not None
    assert not result.fusion["other_leg"]["used"] and "RMS residual" in result.fusion["other_leg"]["why_not"]


def test_the_command_uses_the_other_leg_by_default_and_writes_no_uncertainty_then(exact, tmp_path):
    """`tibia-recon predict` on a CT of both legs: the other leg is found and is the template; the outputs hold no
    uncertainty volume (the model's posterior does not describe the template) and the report says what was used."""
    import json

    from TibiaReconstructionLib.cli import main
    from TibiaReconstructionLib.io import write_volume

    ct, tibia, fracture, *_ = exact
    files = [write_volume(v, tmp_path / f"{name}.nrrd", label=name != "ct")
             for name, v in (("ct", ct), ("tibia", tibia), ("fracture", fracture))]
    out = tmp_path / "out"
    assert main(["predict", "--ct", str(files[0]), "--tibia-mask", str(files[1]), "--fracture-mask", str(files[2]),
                 "--side", "left", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["visible_bone"]["other_leg"]["used"] and report["inputs"]["other_tibia_mask"] == "auto"
    assert "uncertainty" not in report["outputs"] and not list(out.glob("*uncertainty*"))
    assert (out / "predicted_tibia_label.nrrd").exists() and (out / "predicted_tibia_LPS.stl").exists()


def test_a_template_refused_for_its_shape_leaves_the_models_posterior(default_predictor, exact, monkeypatch):
    """When the fusion refuses the fitted template (unlike the patient's tibia), the prediction is the model's and
    comes with the model's uncertainty, as without the other leg: on the work grid and on the surface points."""
    ct, tibia, fracture, other, *_ = exact
    alone = default_predictor.predict(ct, tibia, fracture, side="left", other_tibia=None)
    monkeypatch.setattr(fusion, "mismatch", lambda *args: "it differs from the model's reconstruction (test)")
    result = default_predictor.predict(ct, tibia, fracture, side="left", other_tibia=other)
    assert not result.fusion["other_leg"]["used"] and "(test)" in result.fusion["other_leg"]["why_not"]
    assert dice(result.labelmap.array != 0, alone.labelmap.array != 0) > 0.999
    std = result.occupancy_std
    assert std is not None and std.array.max() == pytest.approx(alone.occupancy_std.array.max(), rel=0.05)
    assert result.surface.GetPointData().GetArray(UNCERTAINTY_ARRAY) is not None
