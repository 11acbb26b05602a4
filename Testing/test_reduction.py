"""Fragment reduction plan and deviation map (reduction.py, `tibia-recon reduce`) on small synthetic bones.

The healthy bone of synthetic.bone_case is cut by its fracture slab; the distal piece is moved by a known
rigid motion T (healthy -> fractured, LPS). With the healthy bone as prediction the plan must find T^-1.
"""

import json

import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from synthetic import bone_case
from vtk.util import numpy_support

from TibiaReconstructionLib.cli import main
from TibiaReconstructionLib.errors import GeometryMismatchError, InputError
from TibiaReconstructionLib.geometry import Volume, apply_affine, euler_rotation, translation
from TibiaReconstructionLib.io import write_volume
from TibiaReconstructionLib.reduction import (DEVIATION_ARRAY, FRACTURE_FACE_ARRAY, find_fragments,
                                              implicit_distance, plan_reduction, with_deviation)
from TibiaReconstructionLib.surface import labelmap_surface, polydata_points, transform_polydata

SPACING, SIZE, SLAB = (1.5, 1.5, 1.5), (44, 40, 110), (-10.0, 6.0)


def fractured(motion=np.eye(4)):
    """(ct, tibia, fracture, healthy, motion): the distal piece (bone z < -10 mm) moved by ``motion``."""
    ct, bone, _ = bone_case(spacing=SPACING, size=SIZE, fracture_z=SLAB)
    kji = np.indices(bone.array.shape).reshape(3, -1).T
    pts = bone.index_to_physical(kji[:, ::-1].astype(float))
    z = pts[:, 2].reshape(bone.array.shape)
    healthy = bone.array != 0
    distal = healthy & (z < SLAB[0])
    src = np.rint(bone.physical_to_index(apply_affine(np.linalg.inv(motion), pts))[:, ::-1]).astype(int)
    inside = np.all((src >= 0) & (src < np.array(healthy.shape)), axis=1)
    moved = np.zeros(len(pts), bool)
    moved[inside] = distal[tuple(src[inside].T)]
    tibia = (healthy & (z > SLAB[1])) | moved.reshape(healthy.shape)
    fracture = (z >= SLAB[0]) & (z <= SLAB[1])
    return (ct, bone.with_array(tibia.astype(np.uint8)), bone.with_array(fracture.astype(np.uint8)), bone, motion)


def distal_fragment(plan):
    return min(plan.fragments, key=lambda f: f.centroid[2])


def errors(fragment, motion):
    """(rotation error deg, translation error mm at the centroid) of the found reduction against motion^-1."""
    residual = fragment.matrix @ motion
    ideal = apply_affine(np.linalg.inv(motion), fragment.centroid)
    return (np.degrees(Rotation.from_matrix(residual[:3, :3]).magnitude()),
            np.linalg.norm(apply_affine(fragment.matrix, fragment.centroid) - ideal))


def test_displaced_fragment_is_recovered():
    """A distal piece rotated 7 degrees about an oblique axis and shifted 5 mm goes back within 2 deg / 1 mm; the
    proximal piece stays; the reduced surface lies on the healthy one."""
    center = np.array([0.0, 0.0, -45.0])
    motion = translation((3.0, -2.5, 3.0)) @ euler_rotation((4.0, -5.0, 3.0), center)
    _, tibia, fracture, healthy, motion = fractured(motion)
    plan = plan_reduction(tibia, fracture, healthy)
    assert len(plan.fragments) == 2
    rot, shift = errors(distal_fragment(plan), motion)
    assert rot < 2.0 and shift < 1.0, (rot, shift)
    proximal = max(plan.fragments, key=lambda f: f.centroid[2])
    assert proximal.rotation_deg < 0.5 and np.linalg.norm(proximal.translation_mm) < 0.3
    report = distal_fragment(plan).report()
    assert report["deviation_after_mm"]["mean_abs"] < 0.6 and report["deviation_before_mm"]["mean_abs"] > 1.5
    assert report["rms_residual_mm"] < 0.7 and report["inlier_fraction"] > 0.9
    assert 6.0 < report["rotation_deg"] < 8.0 and abs(np.linalg.norm(report["rotation_axis_lps"]) - 1) < 1e-9
    json.dumps(plan.report())  # JSON-ready


def test_undisplaced_fragments_get_the_identity():
    _, tibia, fracture, healthy, _ = fractured()
    plan = plan_reduction(tibia, fracture, healthy)
    for f in plan.fragments:
        assert f.rotation_deg < 0.5 and np.linalg.norm(f.translation_mm) < 0.3, f.report()
        assert f.report()["deviation_after_mm"]["mean_abs"] < 0.3
        relative = plan.with_first_fixed(f)
        assert relative["rotation_deg"] < 0.5 and relative["translation_norm_mm"] < 0.3
    # vertices on the cut faces are flagged and left out of the statistics
    faces = numpy_support.vtk_to_numpy(plan.fragments[0].surface.GetPointData().GetArray(FRACTURE_FACE_ARRAY))
    assert 0 < faces.mean() < 0.5


def test_deviation_is_signed_distance_to_the_prediction():
    """Zero on the prediction's own surface; +shift on the side moved outwards, -shift on the other side."""
    _, _, _, healthy, _ = fractured()
    surface = labelmap_surface(healthy)
    distance = implicit_distance(surface)
    same = numpy_support.vtk_to_numpy(with_deviation(surface, distance).GetPointData().GetArray(DEVIATION_ARRAY))
    assert np.abs(same).max() < 1e-6
    shifted = with_deviation(transform_polydata(surface, translation((3.0, 0.0, 0.0))), distance)
    dev = numpy_support.vtk_to_numpy(shifted.GetPointData().GetArray(DEVIATION_ARRAY))
    assert shifted.GetPointData().GetScalars().GetName() == DEVIATION_ARRAY
    normals = numpy_support.vtk_to_numpy(surface.GetPointData().GetNormals())
    lateral, medial = normals[:, 0] > 0.95, normals[:, 0] < -0.95
    assert abs(np.median(dev[lateral]) - 3.0) < 0.3 and abs(np.median(dev[medial]) + 3.0) < 0.3


def test_translated_fragment_deviates_by_the_shift_before_reduction():
    motion = translation((0.0, 0.0, -4.0))
    _, tibia, fracture, healthy, motion = fractured(motion)
    plan = plan_reduction(tibia, fracture, healthy)
    distal = distal_fragment(plan)
    before = numpy_support.vtk_to_numpy(distal.surface.GetPointData().GetArray(DEVIATION_ARRAY))
    # the distal tip (its lowest vertices) moved 4 mm straight out of the healthy bone
    tip = polydata_points(distal.surface)[:, 2] < polydata_points(distal.surface)[:, 2].min() + 1.0
    assert abs(np.median(before[tip]) - 4.0) < 0.6
    rot, shift = errors(distal, motion)
    assert rot < 2.0 and shift < 1.0, (rot, shift)


def test_inputs_are_not_modified():
    _, tibia, fracture, healthy, _ = fractured(translation((2.0, 0.0, 0.0)))
    copies = [v.array.copy() for v in (tibia, fracture, healthy)]
    plan_reduction(tibia, fracture, healthy)
    for volume, copy in zip((tibia, fracture, healthy), copies):
        assert np.array_equal(volume.array, copy)


def test_connectivity_and_minimum_size():
    """Two cubes touching at one corner are two fragments with 6-connectivity, one with 26; pieces below the
    minimum size are discarded and reported."""
    arr = np.zeros((12, 12, 12), np.uint8)
    arr[1:5, 1:5, 1:5] = 1
    arr[5:9, 5:9, 5:9] = 1
    arr[10, 10, 10] = 1  # a single voxel: 0.001 ml
    tibia = Volume(arr, np.ones(3), np.zeros(3))
    fracture = tibia.with_array(np.zeros_like(arr))
    fracture.array[0, 0, 0] = 1
    ids, discarded = find_fragments(tibia, fracture, min_fragment_ml=0.01, connectivity=6)
    assert ids.array.max() == 2 and discarded == [pytest.approx(0.001)]
    ids, _ = find_fragments(tibia, fracture, min_fragment_ml=0.01, connectivity=26)
    assert ids.array.max() == 1
    with pytest.raises(InputError, match="Connectivity"):
        find_fragments(tibia, fracture, connectivity=18)


def test_bad_inputs_give_specific_errors():
    _, tibia, fracture, healthy, _ = fractured()
    empty = tibia.with_array(np.zeros_like(tibia.array))
    with pytest.raises(InputError, match="tibia mask is empty"):
        plan_reduction(empty, fracture, healthy)
    with pytest.raises(InputError, match="fracture mask is empty"):
        plan_reduction(tibia, empty, healthy)
    with pytest.raises(InputError, match="predicted tibia is empty"):
        plan_reduction(tibia, fracture, empty)
    with pytest.raises(InputError, match="No fragment of at least 1000 ml"):
        plan_reduction(tibia, fracture, healthy, min_fragment_ml=1000)
    moved = Volume(healthy.array, healthy.spacing, healthy.origin + 5.0, healthy.direction)
    with pytest.raises(GeometryMismatchError, match="predicted tibia"):
        plan_reduction(tibia, fracture, moved)
    with pytest.raises(InputError, match="minimum fragment size"):
        plan_reduction(tibia, fracture, healthy, min_fragment_ml=-1)


def test_cli_writes_everything_and_refuses_to_overwrite(tmp_path, capsys):
    ct, tibia, fracture, healthy, _ = fractured(translation((0.0, 3.0, 0.0)))
    files = {name: write_volume(v, tmp_path / f"{name}.nrrd", label=name != "ct")
             for name, v in (("ct", ct), ("tibia", tibia), ("fracture", fracture), ("pred", healthy))}
    out = tmp_path / "out"
    args = ["reduce", "--ct", str(files["ct"]), "--tibia-mask", str(files["tibia"]), "--fracture-mask",
            str(files["fracture"]), "--prediction", str(files["pred"]), "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "reduction.json").read_text(encoding="utf-8"))
    assert [f["id"] for f in report["fragments"]] == [1, 2]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["reduction.json", "deviation.png"] + [f"fragment_{i}_{s}_{f}.stl" for i in (1, 2)
                                                                   for s in ("fractured", "reduced")
                                                                   for f in ("LPS", "RAS")])
    assert (out / "fragment_2_reduced_RAS.stl").read_bytes()[:9] == b"SPACE=RAS"
    assert (out / "deviation.png").read_bytes()[:4] == b"\x89PNG"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "already exist" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    (out / "fragment_7_reduced_LPS.stl").write_bytes(b"old")  # left by an earlier run with more fragments
    assert main(args + ["--overwrite"]) == 0
    assert not (out / "fragment_7_reduced_LPS.stl").exists()
    assert main(args[:-2] + ["--out", str(tmp_path / "o2"), "--min-fragment-ml", "5000"]) == 1
    assert "No fragment of at least 5000 ml" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
