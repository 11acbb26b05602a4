"""A catalogue of bad inputs: each is refused (or warned about) with a message that says what is wrong, where,
and what to do, and none leaves a half-written output behind. Plus bounded fuzzing of the readers.

Decisions recorded here (and in the library's constants):
* fracture mask hiding more than ``predict.MAX_FRACTURE_FRACTION`` (60%) of the tibia: refused;
* voxels coarser than ``predict.MAX_SPACING_MM`` (6 mm, e.g. 10 mm slices): refused; coarser than
  ``predict.WARN_SPACING_MM`` (3 mm): predicted, with a warning in ``Prediction.warnings``;
* tibia mask touching the first/last slice (cut off by the field of view): predicted, with a warning;
* volumes whose voxels need more than ``io.MAX_VOLUME_BYTES`` (4 GiB, env TIBIA_RECON_MAX_VOLUME_GB): refused
  from the header, before any voxel is read.
"""

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from TibiaReconstructionLib import io, predict_cli
from TibiaReconstructionLib.bundle import load_bundle
from TibiaReconstructionLib.checks import MAX_FRACTURE_FRACTION, validate_inputs
from TibiaReconstructionLib.cli import main
from TibiaReconstructionLib.errors import BundleError, GeometryMismatchError, InputError, OutputError, \
    OutputExistsError
from TibiaReconstructionLib.geometry import Volume, euler_rotation
from TibiaReconstructionLib.predict import Predictor
from TibiaReconstructionLib.prepare import read_case_list
from synthetic import bone_case
from tiny_bundle import make_tiny_bundle

FUZZ = settings(max_examples=30, deadline=None, database=None, derandomize=True,  # the same examples in every run
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


@pytest.fixture(scope="module")
def predictor(bundle_dir):
    return Predictor(bundle_dir, device="cpu")


@pytest.fixture(scope="module")
def case():
    return bone_case()


@pytest.fixture(scope="module")
def files(tmp_path_factory, case):
    """CT, tibia mask and fracture mask as NRRD files (read-only by convention: tests never write here)."""
    folder = tmp_path_factory.mktemp("inputs")
    ct, tibia, fracture = case
    return {"ct": io.write_volume(ct, folder / "ct.nrrd"),
            "tibia": io.write_volume(tibia, folder / "tibia.nrrd", label=True),
            "fracture": io.write_volume(fracture, folder / "fracture.nrrd", label=True)}


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (hidden ones included) -> sha256 of its bytes; folders -> 'dir'."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def predict_args(files, out, bundle_dir, *extra, side="left", **replace):
    paths = {**files, **replace}
    return ["predict", "--ct", str(paths["ct"]), "--tibia-mask", str(paths["tibia"]), "--fracture-mask",
            str(paths["fracture"]), "--bundle", str(replace.get("bundle", bundle_dir)), "--device", "cpu",
            "--side", side, "--out", str(out), *extra]


def cli_error(capsys, args) -> str:
    """Run the CLI, assert it failed cleanly (exit 1, one line on stderr, no traceback); return that line."""
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("tibia-recon predict: ")
    return lines[0]


def with_array(volume, array):
    return volume.with_array(np.asarray(array))


def rescaled(volume: Volume, factor: float) -> Volume:
    return Volume(volume.array, volume.spacing * factor, volume.origin * factor, volume.direction)


# ---------------------------------------------------------------------------------------------
# masks


def test_empty_tibia_mask(predictor, case):
    ct, tibia, fracture = case
    with pytest.raises(InputError, match="tibia mask is empty.*Segment the tibia"):
        predictor.predict(ct, with_array(tibia, np.zeros_like(tibia.array)), fracture, side="left")


def test_empty_fracture_mask(predictor, case):
    ct, tibia, fracture = case
    with pytest.raises(InputError, match="fracture mask is empty.*Paint a coarse mask"):
        predictor.predict(ct, tibia, with_array(fracture, np.zeros_like(fracture.array)), side="left")


def test_fracture_mask_covering_all_of_the_tibia(predictor, case):
    ct, tibia, _ = case
    with pytest.raises(InputError, match=r"hides 100% of the tibia; at most 60% .*Paint only the fracture zone"):
        predictor.predict(ct, tibia, tibia, side="left")


def _hide(tibia: Volume, fraction: float) -> Volume:
    """A fracture mask over the first ``fraction`` of the tibia's voxels (in array order)."""
    flat = np.flatnonzero(tibia.array)
    mask = np.zeros(tibia.array.size, np.uint8)
    mask[flat[: int(round(fraction * len(flat)))]] = 1
    return tibia.with_array(mask.reshape(tibia.array.shape))


@pytest.mark.parametrize("fraction", [MAX_FRACTURE_FRACTION + 0.05, 0.95])
def test_fracture_mask_above_the_stated_fraction_is_refused(case, fraction):
    ct, tibia, _ = case
    with pytest.raises(InputError, match=f"at most {MAX_FRACTURE_FRACTION:.0%}"):
        validate_inputs(ct, tibia, _hide(tibia, fraction))


def test_fracture_mask_just_below_the_fraction_is_accepted(case):
    ct, tibia, _ = case
    validate_inputs(ct, tibia, _hide(tibia, MAX_FRACTURE_FRACTION - 0.05))


def test_fracture_mask_outside_the_tibia(predictor, case):
    ct, tibia, _ = case
    outside = (tibia.array == 0).astype(np.uint8)
    with pytest.raises(InputError, match="does not overlap the tibia mask.*right segments"):
        predictor.predict(ct, tibia, with_array(tibia, outside), side="left")


@pytest.mark.parametrize("change", ["origin", "spacing", "size", "direction"])
def test_mask_on_another_grid(predictor, case, change):
    ct, tibia, fracture = case
    if change == "origin":
        other = Volume(fracture.array, fracture.spacing, fracture.origin + 2.0, fracture.direction)
    elif change == "spacing":
        other = Volume(fracture.array, fracture.spacing * 1.1, fracture.origin, fracture.direction)
    elif change == "size":
        other = Volume(fracture.array[:-1], fracture.spacing, fracture.origin, fracture.direction)
    else:
        other = Volume(fracture.array, fracture.spacing, fracture.origin, euler_rotation((0, 0, 5))[:3, :3])
    with pytest.raises(GeometryMismatchError) as err:
        predictor.predict(ct, tibia, other, side="left")
    msg = str(err.value)
    assert "fracture mask is not on the CT's voxel grid" in msg and "Resample the fracture mask" in msg


def test_mask_file_on_another_grid_names_the_file(tmp_path, case, files):
    ct, tibia, _ = case
    path = io.write_volume(Volume(tibia.array, tibia.spacing, tibia.origin + 5.0), tmp_path / "moved.nrrd",
                           label=True)
    with pytest.raises(GeometryMismatchError, match="moved.nrrd"):
        io.read_mask(path, ct, "tibia mask")


def test_absent_label_value_lists_the_labels(tmp_path, case):
    ct, tibia, _ = case
    labels = io.write_volume(with_array(tibia, tibia.array * 3), tmp_path / "labels.nrrd", label=True)
    with pytest.raises(InputError, match="no voxel with label 7; its labels are 3. Pass the tibia's label value"):
        io.read_mask(labels, ct, "tibia mask", label_value=7)


def test_ct_given_as_mask(files):
    with pytest.raises(InputError, match="negative voxel values.*labels must be >= 0"):
        io.read_mask(files["ct"])


# ---------------------------------------------------------------------------------------------
# intensities


def test_mr_like_intensities(predictor, case):
    ct, tibia, fracture = case
    mr = np.full(ct.array.shape, 600.0, np.float32)  # muscle
    mr[ct.array > 1000] = 50.0  # cortical bone is dark in MR
    mr[(ct.array < 0)] = 1500.0  # fatty marrow is bright
    with pytest.raises(InputError, match="no voxel is below 0.*MR images are not supported"):
        predictor.predict(with_array(ct, mr), tibia, fracture, side="left")


def test_uncalibrated_ct_without_rescale_intercept(predictor, case):
    ct, tibia, fracture = case
    with pytest.raises(InputError, match="rescale intercept"):
        predictor.predict(with_array(ct, (ct.array.astype(np.int32) + 1024).astype(np.uint16)), tibia, fracture,
                          side="left")


@pytest.mark.parametrize("normalise", ["window01", "zscore"])
def test_already_normalised_data(predictor, case, normalise):
    ct, tibia, fracture = case
    arr = ct.array.astype(np.float32)
    arr = np.clip((arr + 200) / 2000, 0, 1) if normalise == "window01" else (arr - arr.mean()) / arr.std()
    with pytest.raises(InputError, match="does not look like a CT in Hounsfield units.*give the original CT"):
        predictor.predict(with_array(ct, arr), tibia, fracture, side="left")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_voxels(predictor, case, value):
    ct, tibia, fracture = case
    arr = ct.array.astype(np.float32)
    arr[10, 20, 20] = value
    with pytest.raises(InputError, match="NaN or infinite voxels; fix or replace them"):
        predictor.predict(with_array(ct, arr), tibia, fracture, side="left")


# ---------------------------------------------------------------------------------------------
# geometry: voxel size, size, field of view


def test_ten_millimetre_slices_are_refused(predictor):
    ct, tibia, fracture = bone_case(spacing=(1.0, 1.0, 10.0), size=(60, 60, 20), fracture_z=(-15.0, 15.0))
    with pytest.raises(InputError, match=r"\(1, 1, 10\) mm: 10 mm is coarser than the 6 mm.*thinner slices"):
        predictor.predict(ct, tibia, fracture, side="left")


def test_coarse_slices_warn(predictor):
    ct, tibia, fracture = bone_case(spacing=(2.0, 2.0, 4.0), size=(40, 40, 46))
    result = predictor.predict(ct, tibia, fracture, side="left")
    assert any("coarser than 3 mm" in w for w in result.warnings), result.warnings
    assert result.labelmap.array.any()


def test_too_few_slices(predictor):
    ct, tibia, fracture = bone_case(size=(40, 40, 3), fracture_z=(-10.0, 10.0))
    with pytest.raises(InputError, match="only 3 voxel\\(s\\) along its k axis.*whole CT series"):
        predictor.predict(ct, tibia, fracture, side="left")


def test_spacing_in_centimetres(predictor, case):
    ct, tibia, fracture = (rescaled(v, 0.1) for v in case)
    with pytest.raises(InputError, match="tibia mask spans only 15 mm.*spacing \\(0.2, 0.2, 0.3\\) is in mm"):
        predictor.predict(ct, tibia, fracture, side="left")


@pytest.mark.parametrize("shift,end", [(45.0, "top (superior)"), (-45.0, "bottom (inferior)")])
def test_tibia_cut_off_by_the_field_of_view_warns(predictor, shift, end):
    ct, tibia, fracture = bone_case(shift=(0.0, 0.0, shift), fracture_z=(-10.0, 6.0))
    result = predictor.predict(ct, tibia, fracture, side="left")
    assert any(f"touches the {end} slice" in w and "cut off by the field of view" in w for w in result.warnings), \
        result.warnings
    assert result.labelmap.array.any()
    assert "cut off" in json.dumps(result.report()["warnings"])


def test_tibia_inside_the_field_of_view_gives_no_warning(predictor, case):
    assert predictor.predict(*case, side="left").warnings == []


def test_unknown_side(predictor, case):
    with pytest.raises(InputError, match="Unknown side 'middle'; use 'left', 'right' or 'auto'"):
        predictor.predict(*case, side="middle")


def test_unknown_side_is_refused_before_reading(tmp_path):
    with pytest.raises(InputError, match="Unknown side"):
        predict_cli.run_predict(tmp_path / "no.nrrd", tmp_path / "no.nrrd", tmp_path / "no.nrrd", tmp_path / "out",
                                side="up")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# files


def test_2d_4d_and_vector_images(tmp_path):
    sitk.WriteImage(sitk.Image([16, 16], sitk.sitkInt16), str(tmp_path / "slice.nrrd"))
    sitk.WriteImage(sitk.Image([8, 8, 8, 3], sitk.sitkInt16), str(tmp_path / "4d.nii"))
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkVectorUInt8, 3), str(tmp_path / "rgb.mha"))
    for name, what in [("slice.nrrd", "2 dimensions"), ("4d.nii", "4 dimensions"), ("rgb.mha", "3 components")]:
        with pytest.raises(InputError, match=f"not a 3D scalar volume \\(it has .*{what}.*Provide one 3D CT"):
            io.read_volume(tmp_path / name)


@pytest.mark.parametrize("suffix,compress", [(".nrrd", False), (".nrrd", True), (".nii", False), (".nii.gz", True),
                                             (".mha", True)])
def test_truncated_files(tmp_path, case, suffix, compress):
    path = io.write_volume(case[0], tmp_path / f"ct{suffix}", compress=compress)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(InputError, match=f"Cannot read {path} as an image: the file is unreadable, truncated"):
        io.read_volume(path)


@pytest.mark.parametrize("content", [b"", b"NRRD0004\n", b"\x00" * 400], ids=["empty", "header_only", "zeros"])
def test_empty_and_garbage_files(tmp_path, content):
    path = tmp_path / "ct.nrrd"
    path.write_bytes(content)
    with pytest.raises(InputError, match="Cannot read .*ct.nrrd as an image"):
        io.read_volume(path)


@pytest.mark.parametrize("field,value", [("NDims", "-1"), ("NDims", "99999"), ("NDims", "1e9"),
                                         ("DimSize", "6 -1 4"), ("DimSize", "6 5")])
def test_a_metaimage_header_that_crashes_itk_is_refused_first(tmp_path, case, field, value):
    """ITK ends the whole process with a segmentation fault on such headers (found by the fuzz test below)."""
    path = io.write_volume(bone_case(size=(6, 5, 4), spacing=(30.0, 30.0, 45.0))[0], tmp_path / "ct.mha",
                           compress=False)
    head, sep, voxels = path.read_bytes().partition(b"ElementDataFile")
    lines = [f"{field} = {value}".encode() if line.startswith(field.encode() + b" ") else line
             for line in head.split(b"\n")]
    path.write_bytes(b"\n".join(lines) + sep + voxels)
    with pytest.raises(InputError, match=f"Cannot read {path} as an image.*{field} = "):
        io.read_volume(path)


def test_zero_spacing_in_the_header(tmp_path):
    path = tmp_path / "flat.nrrd"
    path.write_bytes(b"NRRD0004\ntype: int16\ndimension: 3\nspace: left-posterior-superior\nsizes: 2 2 2\n"
                     b"space directions: (1,0,0) (0,1,0) (0,0,0)\nencoding: raw\nendian: little\n"
                     b"space origin: (0,0,0)\n\n" + b"\x00" * 16)
    with pytest.raises(InputError, match="flat.nrrd"):
        io.read_volume(path)


@pytest.fixture
def dicom_folder(tmp_path, case):
    small = bone_case(size=(12, 12, 10), spacing=(4.0, 4.0, 6.0))[0]
    return io.write_volume(small, tmp_path / "series")


def test_dicom_with_a_truncated_slice(dicom_folder):
    victim = sorted(dicom_folder.glob("*.dcm"))[4]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(InputError, match=f"not readable slices of its series \\({victim.name}\\).*re-export"):
        io.read_volume(dicom_folder)


def test_dicom_with_a_garbage_file(dicom_folder):
    (dicom_folder / "notes.dcm").write_bytes(b"this is not DICOM" * 20)
    with pytest.raises(InputError, match="notes.dcm\\): truncated, corrupt or not DICOM"):
        io.read_volume(dicom_folder)


def test_dicom_with_a_missing_slice(dicom_folder):
    sorted(dicom_folder.glob("*.dcm"))[4].unlink()
    with pytest.raises(InputError, match="not evenly spaced.*12 mm apart, the others 6 mm. A slice is missing"):
        io.read_volume(dicom_folder)


def test_empty_dicom_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="No DICOM series found"):
        io.read_volume(tmp_path / "empty")


def test_huge_volume_is_refused_from_its_header(tmp_path):
    """4000^3 int16 voxels (119 GiB) announced by a header over 16 bytes: refused at once, nothing allocated."""
    path = tmp_path / "huge.nrrd"
    path.write_bytes(b"NRRD0004\ntype: int16\ndimension: 3\nsizes: 4000 4000 4000\nencoding: raw\n"
                     b"endian: little\n\n" + b"\x00" * 16)
    start = time.perf_counter()
    with pytest.raises(InputError, match=r"huge.nrrd is too large: 4000x4000x4000 voxels of 2 bytes need 119.2 GiB "
                                         r"of memory, above the limit of 4.0 GiB.*TIBIA_RECON_MAX_VOLUME_GB"):
        io.read_volume(path)
    assert time.perf_counter() - start < 5


def test_memory_limit_applies_to_files_and_dicom(monkeypatch, files, dicom_folder):
    monkeypatch.setattr(io, "MAX_VOLUME_BYTES", 1000)
    with mock.patch.object(sitk, "ReadImage", side_effect=AssertionError("voxels read")):
        with pytest.raises(InputError, match="40x40x60 voxels of 2 bytes.*limit of 0.0 GiB"):
            io.read_volume(files["ct"])
    with pytest.raises(InputError, match="series is too large: 12x12x10 voxels"):
        io.read_volume(dicom_folder)


# ---------------------------------------------------------------------------------------------
# bundles


def _bundle_copy(bundle_dir, tmp_path) -> Path:
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    edit(config)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")


@pytest.mark.parametrize("problem,match", [
    ("missing_key", r"config.json lacks \['window_hu'\]; re-export"),
    ("wrong_version", r"bundle format 'tibia-recon-bundle/2', but this library .* reads only"),
    ("bad_window", r"'window_hu' must be two numbers \[low, high\]"),
    ("bad_grid", r"'grid' is not a valid canonical grid"),
    ("huge_pca", r"do not match its config.json: wrong shapes"),
    ("not_json", r"is not valid JSON"),
    ("json_list", r"has bundle format None"),
], ids=lambda v: v if v.isidentifier() else "")
def test_bundle_with_a_bad_config(bundle_dir, tmp_path, problem, match):
    folder = _bundle_copy(bundle_dir, tmp_path)
    edits = {"missing_key": lambda c: c.pop("window_hu"),
             "wrong_version": lambda c: c.update(format="tibia-recon-bundle/2"),
             "bad_window": lambda c: c.update(window_hu=[1800, "x"]),
             "bad_grid": lambda c: c["grid"].update(spacing=[0, 3, 3]),
             # a million components: building that for real would need hundreds of GB; the check is on shapes only
             "huge_pca": lambda c: c["autoencoder"].update(components=10**6)}
    if problem in edits:
        _edit_config(folder, edits[problem])
    else:
        (folder / "config.json").write_text("{not json" if problem == "not_json" else "[1, 2]", encoding="utf-8")
    with pytest.raises(BundleError, match=match):
        load_bundle(folder)


@pytest.mark.parametrize("problem,match", [
    ("missing_weight", "missing weights"), ("wrong_shape", "wrong shapes"), ("nan", "not finite"),
    ("garbage", "not a readable safetensors file"), ("no_weights", "lacks weights.safetensors"),
    ("pickle", "looks like a pickle or archive"),
], ids=lambda v: v if v.isidentifier() else "")
def test_bundle_with_bad_weights(bundle_dir, tmp_path, problem, match):
    folder = _bundle_copy(bundle_dir, tmp_path)
    weights = load_file(folder / "weights.safetensors")
    if problem == "missing_weight":
        del weights["autoencoder.variances"]
        save_file(weights, folder / "weights.safetensors")
    elif problem == "wrong_shape":
        key = next(k for k in weights if k.startswith("locnet.") and weights[k].dim() > 1)
        weights[key] = torch.zeros(2, 2)
        save_file(weights, folder / "weights.safetensors")
    elif problem == "nan":
        weights["autoencoder.mean"][5] = float("nan")
        save_file(weights, folder / "weights.safetensors")
    elif problem == "garbage":
        (folder / "weights.safetensors").write_bytes(os.urandom(2000))
    elif problem == "no_weights":
        (folder / "weights.safetensors").unlink()
    else:
        (folder / "extra.ckpt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(BundleError, match=match):
        load_bundle(folder)


def test_bundle_path_is_a_file(tmp_path):
    (tmp_path / "model.zip").write_bytes(b"PK")
    with pytest.raises(BundleError, match="No model bundle at .*model.zip: expected a folder"):
        load_bundle(tmp_path / "model.zip")


# ---------------------------------------------------------------------------------------------
# outputs and the CLI


def test_cli_predict_leaves_the_inputs_untouched(tmp_path, files, bundle_dir, capsys):
    inputs = {name: hashlib.sha256(Path(p).read_bytes()).hexdigest() for name, p in files.items()}
    bundle_before = snapshot(bundle_dir)
    assert main(predict_args(files, tmp_path / "out", bundle_dir)) == 0
    assert {name: hashlib.sha256(Path(p).read_bytes()).hexdigest() for name, p in files.items()} == inputs
    assert snapshot(bundle_dir) == bundle_before
    assert sorted(snapshot(tmp_path / "out")) == sorted(p.name for p in predict_cli.output_paths(
        tmp_path / "out", ".nrrd").values())  # exactly the outputs, no temporary leftovers


def test_cli_never_overwrites_existing_outputs(tmp_path, files, bundle_dir, capsys):
    out = tmp_path / "out"
    assert main(predict_args(files, out, bundle_dir)) == 0
    capsys.readouterr()
    before = snapshot(out)
    line = cli_error(capsys, predict_args(files, out, bundle_dir, side="right"))
    assert "already exist" in line and "left untouched" in line and "--overwrite" in line
    assert snapshot(out) == before
    assert main(predict_args(files, out, bundle_dir, "--overwrite")) == 0  # the positive control
    assert sorted(snapshot(out)) == sorted(before)


def test_cli_one_existing_output_blocks_all(tmp_path, files, bundle_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("mine", encoding="utf-8")
    (out / "notes.txt").write_text("also mine", encoding="utf-8")
    before = snapshot(out)
    assert "report.json" in cli_error(capsys, predict_args(files, out, bundle_dir))
    with pytest.raises(OutputExistsError, match="report.json. They were left untouched"):
        predict_cli.run_predict(files["ct"], files["tibia"], files["fracture"], out, bundle_dir, "cpu", "left")
    assert snapshot(out) == before


def test_output_folder_under_a_regular_file(tmp_path, files, bundle_dir, capsys):
    blocker = tmp_path / "results.txt"
    blocker.write_text("a file, not a folder", encoding="utf-8")
    line = cli_error(capsys, predict_args(files, blocker / "out", bundle_dir))
    assert "results.txt is a file, not a folder. Choose another --out folder" in line
    assert blocker.read_text(encoding="utf-8") == "a file, not a folder"
    with pytest.raises(OutputError, match="part of the path is a file, not a folder"):
        io.write_volume(bone_case(size=(4, 4, 4))[0], blocker / "x.nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.txt"]


def test_read_only_output_folder(tmp_path, files, bundle_dir, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user (root) can write into read-only folders; "
                        "test_output_folder_under_a_regular_file covers an unwritable output instead")
        assert "is not writable" in cli_error(capsys, predict_args(files, locked / "out", bundle_dir))
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_writing_a_volume(tmp_path, case, monkeypatch):
    def half_then_full(image, path, *args, **kwargs):
        Path(path).write_bytes(b"NRRD0004\npartial")
        _disk_full()

    monkeypatch.setattr(sitk, "WriteImage", half_then_full)
    with pytest.raises(OutputError, match="The disk is full: could not write .*ct.nrrd.*free some space"):
        io.write_volume(case[0], tmp_path / "ct.nrrd")
    assert list(tmp_path.iterdir()) == []  # neither the target nor its temporary file


def test_full_disk_during_cli_predict_leaves_nothing(tmp_path, files, bundle_dir, capsys, monkeypatch):
    def half_then_full(image, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        _disk_full()

    monkeypatch.setattr(sitk, "WriteImage", half_then_full)
    line = cli_error(capsys, predict_args(files, tmp_path / "new" / "out", bundle_dir))
    assert "The disk is full" in line
    assert list(tmp_path.iterdir()) == []  # not even the folders it would have created


def test_full_disk_on_the_last_output_keeps_the_old_outputs(tmp_path, files, bundle_dir, capsys, monkeypatch):
    """All or nothing: with --overwrite, a failure while writing report.json leaves every old output as it was."""
    out = tmp_path / "out"
    assert main(predict_args(files, out, bundle_dir, side="right")) == 0
    before = snapshot(out)

    def json_then_full(data, path, overwrite=False):
        with io.atomic_path(path, overwrite) as tmp:
            tmp.write_text("{\"side\": ", encoding="utf-8")
            _disk_full()

    monkeypatch.setattr(predict_cli, "write_json", json_then_full)
    assert "The disk is full" in cli_error(capsys, predict_args(files, out, bundle_dir, "--overwrite"))
    assert snapshot(out) == before


def test_stl_writer_failure_is_an_output_error(tmp_path, monkeypatch):
    from TibiaReconstructionLib import surface as surface_module
    from TibiaReconstructionLib.surface import labelmap_surface, write_stl

    surface = labelmap_surface(bone_case(size=(10, 10, 12), spacing=(6.0, 6.0, 8.0))[1], 0, 0.0)

    class FailingWriter(surface_module.vtkSTLWriter):
        def Write(self):
            return 0

    monkeypatch.setattr(surface_module, "vtkSTLWriter", FailingWriter)
    with pytest.raises(OutputError, match="Could not write STL .*disk is not full"):
        write_stl(surface, tmp_path / "t.stl")
    assert list(tmp_path.iterdir()) == []


def test_cli_errors_are_one_line_with_exit_code_1(tmp_path, files, bundle_dir, case, capsys, monkeypatch):
    out = tmp_path / "out"
    moved = io.write_volume(Volume(case[2].array, case[2].spacing, case[2].origin + 4.0), tmp_path / "moved.nrrd",
                            label=True)
    empty = io.write_volume(with_array(case[1], np.zeros_like(case[1].array)), tmp_path / "empty.nrrd", label=True)
    broken = _bundle_copy(bundle_dir, tmp_path)
    (broken / "weights.safetensors").write_bytes(b"\x00" * 64)
    cases = [
        (dict(ct=tmp_path / "missing.nrrd"), "File not found"),
        (dict(fracture=moved), "not on the CT's voxel grid"),  # a multi-line message, joined into one line
        (dict(tibia=empty), "tibia mask is empty"),
        (dict(bundle=broken), "not a readable safetensors file"),
    ]
    for replace, expected in cases:
        assert expected in cli_error(capsys, predict_args(files, out, bundle_dir, **replace))
        assert not out.exists()
    monkeypatch.setattr(Predictor, "predict", mock.Mock(side_effect=RuntimeError("boom")))
    line = cli_error(capsys, predict_args(files, out, bundle_dir))
    assert "internal error: RuntimeError: boom" in line and "TIBIA_RECON_TRACEBACK=1" in line
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# case lists


@pytest.fixture
def dataset(tmp_path, files):
    root = tmp_path / "dataset"
    root.mkdir()
    shutil.copy(files["ct"], root / "ct.nrrd")
    shutil.copy(files["tibia"], root / "tibia.nrrd")
    (tmp_path / "secret.nrrd").write_bytes(b"outside")
    return root


def _case_list(root: Path, **row) -> Path:
    entry = {"id": "c1", "ct": "ct.nrrd", "tibia": "tibia.nrrd", "side": "left", **row}
    path = root / "cases.json"
    path.write_text(json.dumps({"cases": [entry]}), encoding="utf-8")
    return path


@pytest.mark.parametrize("ct", ["../secret.nrrd", "sub/../../secret.nrrd", "/etc/hostname", "link.nrrd"])
def test_case_list_paths_cannot_escape_the_data_set(dataset, ct):
    (dataset / "link.nrrd").symlink_to(dataset.parent / "secret.nrrd")
    with pytest.raises(InputError, match=f"Case 'c1': ct path '{ct}' leaves the data set folder .*refused"):
        read_case_list(_case_list(dataset, ct=ct))
    assert read_case_list(_case_list(dataset))[0].ct == (dataset / "ct.nrrd").resolve()  # the positive control


@pytest.mark.parametrize("content,match", [
    ("{\"cases\": [", "is not a readable case list"), ("[1, 2]", "must be an object"),
    (json.dumps({"cases": [{"id": "c1", "ct": "ct.nrrd", "tibia": "tibia.nrrd", "side": "up"}]}),
     "side 'up'; use 'left' or 'right'"),
    (json.dumps({"cases": [{"id": "c1", "ct": "ct.nrrd", "tibia": "tibia.nrrd", "side": "left", "label_value": "x"}]}),
     "label_value 'x'; it must be a whole number"),
    (json.dumps({"cases": [{"id": "c1", "ct": "ct.nrrd", "side": "left"}]}), "Case 'c1' in .* lacks tibia"),
], ids=["not_json", "json_list", "bad_side", "bad_label_value", "missing_tibia"])
def test_malformed_case_lists(dataset, content, match):
    path = dataset / "cases.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=match):
        read_case_list(path)


# ---------------------------------------------------------------------------------------------
# fuzzing: the readers raise their own error type, never another one


_SEEDS: dict = {}


def _seed_files() -> dict:
    """Valid small files (uncompressed and compressed) to mutate, made once."""
    if not _SEEDS:
        ct = bone_case(size=(6, 5, 4), spacing=(30.0, 30.0, 45.0))[0]
        with tempfile.TemporaryDirectory() as d:
            for suffix in (".nrrd", ".nii", ".mha", ".nii.gz"):
                for compress in (False, True):
                    path = io.write_volume(ct, Path(d) / f"ct{int(compress)}{suffix}", compress=compress)
                    _SEEDS[(suffix, compress)] = path.read_bytes()
    return _SEEDS


@st.composite
def mutated_file(draw):
    suffix, compress = draw(st.sampled_from(sorted(_seed_files())))
    data = bytearray(_seed_files()[(suffix, compress)])
    kind = draw(st.sampled_from(["random", "truncate", "flip", "header_digits"]))
    if kind == "random":
        data = bytearray(draw(st.binary(max_size=800)))
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    else:  # change numbers in the header (sizes, spacing, offsets) to other, possibly huge, ones
        head = min(len(data), 400)
        for _ in range(draw(st.integers(1, 4))):
            digits = [i for i in range(head) if chr(data[i]).isdigit()] or [0]
            i = draw(st.sampled_from(digits))
            data[i:i + 1] = draw(st.sampled_from([b"0", b"9", b"99999", b"-1", b"1e9"]))
    return suffix, bytes(data)


@FUZZ
@given(mutated_file())
def test_fuzz_read_volume(monkeypatch, sample):
    suffix, data = sample
    monkeypatch.setattr(io, "MAX_VOLUME_BYTES", 64 << 20)  # a mutated header must not make a test allocate GBs
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"fuzz{suffix}"
        path.write_bytes(data)
        try:
            volume = io.read_volume(path)
        except InputError as exc:
            assert str(path) in str(exc) or "voxel" in str(exc)
        else:
            assert volume.array.ndim == 3


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True)
                     | st.text(max_size=8), lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=8)


@st.composite
def mutated_config(draw, original: str):
    config = json.loads(original)
    kind = draw(st.sampled_from(["replace", "replace_nested", "delete", "truncate"]))
    if kind == "truncate":
        return original[: draw(st.integers(0, len(original)))]
    if kind == "replace_nested":
        section = draw(st.sampled_from(["grid", "locnet", "autoencoder"]))
        key = draw(st.sampled_from(sorted(config[section])))
        config[section][key] = draw(_JSON | st.lists(st.integers(-3, 10**7), min_size=1, max_size=4))
    else:
        key = draw(st.sampled_from(sorted(config)))
        if kind == "delete":
            del config[key]
        else:
            config[key] = draw(_JSON)
    return json.dumps(config)


@FUZZ
@given(data=st.data())
def test_fuzz_load_bundle_config(bundle_dir, data):
    original = (bundle_dir / "config.json").read_text(encoding="utf-8")
    text = data.draw(mutated_config(original))
    with tempfile.TemporaryDirectory() as d:
        folder = Path(shutil.copytree(bundle_dir, Path(d) / "bundle"))
        (folder / "config.json").write_text(text, encoding="utf-8")
        try:
            load_bundle(folder)
        except BundleError:
            pass


@FUZZ
@given(data=st.data())
def test_fuzz_load_bundle_weights(bundle_dir, data):
    weights = bytearray((bundle_dir / "weights.safetensors").read_bytes())
    kind = data.draw(st.sampled_from(["random", "truncate", "flip_header", "flip_anywhere"]))
    if kind == "random":
        weights = bytearray(data.draw(st.binary(max_size=2000)))
    elif kind == "truncate":
        weights = weights[: data.draw(st.integers(0, len(weights)))]
    else:
        top = 8 + int.from_bytes(weights[:8], "little") if kind == "flip_header" else len(weights)
        for _ in range(data.draw(st.integers(1, 8))):
            weights[data.draw(st.integers(0, top - 1))] = data.draw(st.integers(0, 255))
    with tempfile.TemporaryDirectory() as d:
        folder = Path(shutil.copytree(bundle_dir, Path(d) / "bundle"))
        (folder / "weights.safetensors").write_bytes(bytes(weights))
        try:
            bundle = load_bundle(folder)
        except BundleError:
            pass
        else:
            assert all(torch.isfinite(p).all() for p in bundle.autoencoder.state_dict().values())
