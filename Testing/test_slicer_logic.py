"""The Slicer module's Qt-free logic on a real MRML scene (slicer-core wheel, no Slicer application).

Each test states the property it protects. Geometry is checked in RAS against the library's own
LPS grids through the library's conversion helpers, never by flipping signs here.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import vtk
from vtk.util import numpy_support

import slicer
from slicer_scene import MODULE_DIR, REPO, SlicerScene, ball_mask, oblique_grid
from synthetic import bone_case

from TibiaReconstructionLib import PROCESS_ENVIRONMENT
from TibiaReconstructionLib.errors import BundleError, InputError, OutputExistsError
from TibiaReconstructionLib.geometry import Grid, Volume, apply_affine, euler_rotation, lps_to_ras, ras_to_lps
from TibiaReconstructionLogic import (
    REPORT_ATTRIBUTE,
    MissingDependencyError,
    TibiaReconstructionLogic,
    dependencies,
    mrml,
)

# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture
def sc():
    scene = SlicerScene()
    yield scene
    scene.close()


@pytest.fixture
def logic(sc):
    return TibiaReconstructionLogic(scene=sc.scene)


def ct_array(grid, seed=0):
    """A CT-like int16 array with bone values, so the library accepts it as a CT."""
    rng = np.random.default_rng(seed)
    return (rng.normal(40, 20, size=grid.shape) + 1400.0 * ball_mask(grid, grid.center, 12)).astype(np.int16)


def node_ras(volume_node, ijk):
    """RAS points of continuous indices (n, 3) through the node's own IJKToRAS."""
    return apply_affine(mrml.ijkToRas(volume_node), np.asarray(ijk, float))


def labelmap_in_own_geometry(segmentation_node, segment_id):
    """(array [k, j, i] of the segment's label, imageToWorld 4x4, extent) without any resampling."""
    image = slicer.vtkOrientedImageData()
    assert slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, image, False)
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    ext = image.GetExtent()
    dims = (ext[1] - ext[0] + 1, ext[3] - ext[2] + 1, ext[5] - ext[4] + 1)
    label = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
    return values == label, mrml.arrayFromMatrix(m), ext


def reference_geometry(segmentation_node):
    """(imageToWorld 4x4, extent) of a segmentation's reference image geometry (what its labelmaps use)."""
    text = segmentation_node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    image = slicer.vtkOrientedImageData()
    assert slicer.vtkSegmentationConverter.DeserializeImageGeometry(text, image, False)
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    return mrml.arrayFromMatrix(m), tuple(image.GetExtent())


def fingerprint(volume_node, segmentation_node):
    """Hashes of everything the user gave: CT voxels and geometry, every segment's voxels, names, colours."""
    h = {"ct": hashlib.sha256(np.ascontiguousarray(slicer.util.arrayFromVolume(volume_node)).tobytes()).hexdigest(),
         "ijkToRas": mrml.ijkToRas(volume_node).tobytes().hex(),
         "segments": list(segmentation_node.GetSegmentation().GetSegmentIDs())}
    for sid in h["segments"]:
        arr, matrix, ext = labelmap_in_own_geometry(segmentation_node, sid)
        seg = segmentation_node.GetSegmentation().GetSegment(sid)
        h[sid] = (hashlib.sha256(arr.tobytes()).hexdigest(), matrix.tobytes().hex(), tuple(ext), seg.GetName(),
                  tuple(seg.GetColor()))
    return h


def add_case(sc, ct, tibia, fracture, name="CT"):
    """CT node from a library Volume and a segmentation with 'Tibia' and 'Fracture' on the CT grid."""
    volume_node = sc.addVolume(ct.array, ct.grid, name)
    seg = sc.addSegmentation(volume_node)
    tid = sc.addSegment(seg, "Tibia", tibia.array, ct.grid, (0.9, 0.9, 0.7))
    fid = sc.addSegment(seg, "Fracture", fracture.array, ct.grid, (0.9, 0.2, 0.2))
    return volume_node, seg, tid, fid


def dice(a, b):
    a, b = np.asarray(a) != 0, np.asarray(b) != 0
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


# ---------------------------------------------------------------------------------------------
# MRML volume <-> library Volume


def test_volume_node_round_trip_keeps_oblique_geometry_in_ras(sc):
    grid = oblique_grid()
    arr = ct_array(grid)
    node = sc.addVolume(arr, grid)
    vol = mrml.volumeFromNode(node)
    # same LPS grid, voxel for voxel
    assert vol.grid.size == grid.size
    np.testing.assert_allclose(vol.grid.ijk_to_lps, grid.ijk_to_lps, atol=1e-9)
    np.testing.assert_array_equal(vol.array, arr)
    # a voxel sits at the same physical point in Slicer (RAS) and in the library (LPS)
    ijk = np.array([[0, 0, 0], [23, 19, 15], [5.5, 7.25, 3.0]])
    np.testing.assert_allclose(node_ras(node, ijk), lps_to_ras(vol.index_to_physical(ijk)), atol=1e-9)
    # the array is a copy: the library cannot write into the user's CT
    vol.array[0, 0, 0] += 1000
    assert slicer.util.arrayFromVolume(node)[0, 0, 0] == arr[0, 0, 0]
    # and back: a node made from a library Volume has the same IJKToRAS
    back = mrml.addVolumeNode(sc.scene, vol, "back")
    np.testing.assert_allclose(mrml.ijkToRas(back), grid.ijk_to_ras, atol=1e-9)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(back), vol.array)


# ---------------------------------------------------------------------------------------------
# segments -> masks on the CT grid


def test_segments_resampled_onto_an_oblique_ct_land_at_the_same_physical_place(sc, logic):
    ct_grid = oblique_grid(size=(40, 36, 20), spacing=(1.0, 1.2, 2.5))
    volume_node = sc.addVolume(ct_array(ct_grid), ct_grid)
    # the segmentation was made on another, axis-aligned 1 mm grid (e.g. painted on a resampled view)
    centre = ct_grid.center
    seg_grid = Grid((60, 60, 60), np.ones(3), centre - 29.5, np.eye(3))
    seg = sc.addSegmentation(name="Masks on another grid")
    tib_centre, frac_centre = centre + [3.0, -2.0, 1.0], centre + [-6.0, 4.0, 2.0]
    tid = sc.addSegment(seg, "Tibia", ball_mask(seg_grid, tib_centre, 9.0), seg_grid)
    fid = sc.addSegment(seg, "Fracture", ball_mask(seg_grid, frac_centre, 5.0), seg_grid)

    inputs = logic.prepareInputs(volume_node, seg, tid, fid)

    for mask, c, r in ((inputs.tibia, tib_centre, 9.0), (inputs.fracture, frac_centre, 5.0)):
        assert mask.grid.same_as(ct_grid, 1e-6)
        expected = ball_mask(ct_grid, c, r)
        assert dice(mask.array, expected) > 0.85
        idx = np.argwhere(mask.array)[:, ::-1].astype(float)
        centroid = ct_grid.index_to_physical(idx).mean(axis=0)
        assert np.linalg.norm(centroid - c) < 1.0  # mm; a frame mix-up would move it by many mm


def test_masks_are_exact_on_the_ct_grid_and_reading_them_changes_nothing(sc, logic):
    grid = oblique_grid()
    ct = Volume.on_grid(ct_array(grid), grid)
    tibia = ct.with_array(ball_mask(grid, grid.center, 10.0))
    fracture = ct.with_array(ball_mask(grid, grid.center + [0, 0, 3.0], 4.0))  # overlaps the tibia
    volume_node, seg, tid, fid = add_case(sc, ct, tibia, fracture)
    before, nodes_before = fingerprint(volume_node, seg), sc.nodeNames()

    inputs = logic.prepareInputs(volume_node, seg, tid, fid)

    np.testing.assert_array_equal(inputs.tibia.array, tibia.array)
    np.testing.assert_array_equal(inputs.fracture.array, fracture.array)
    np.testing.assert_array_equal(inputs.ct.array, ct.array)
    assert fingerprint(volume_node, seg) == before
    assert sc.nodeNames() == nodes_before  # temporary labelmap, display and colour nodes removed


def test_ct_under_a_transform_masks_and_outputs_follow_the_ct(sc, logic):
    grid = oblique_grid()
    volume_node = sc.addVolume(ct_array(grid), grid)
    transform = sc.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "Shift")
    shift_ras = np.eye(4)
    shift_ras[:3, 3] = [15.0, -8.0, 4.0]
    transform.SetMatrixTransformToParent(mrml.matrixFromArray(shift_ras))
    volume_node.SetAndObserveTransformNodeID(transform.GetID())
    # the segmentation is not transformed: painted where the CT is displayed (world coordinates)
    local_centre_lps = grid.center
    world_centre_lps = ras_to_lps(apply_affine(shift_ras, lps_to_ras(local_centre_lps)))
    seg_grid = Grid((50, 50, 50), np.ones(3), world_centre_lps - 24.5, np.eye(3))
    seg = sc.addSegmentation(name="World masks")
    tid = sc.addSegment(seg, "Tibia", ball_mask(seg_grid, world_centre_lps, 8.0), seg_grid)
    fid = sc.addSegment(seg, "Fracture", ball_mask(seg_grid, world_centre_lps, 3.0), seg_grid)

    inputs = logic.prepareInputs(volume_node, seg, tid, fid)
    idx = np.argwhere(inputs.tibia.array)[:, ::-1].astype(float)
    assert np.linalg.norm(grid.index_to_physical(idx).mean(axis=0) - local_centre_lps) < 1.0

    out_seg, segment_id = mrml.addSegmentationFromMask(sc.scene, inputs.tibia.array, volume_node, "out", "s")
    assert out_seg.GetParentTransformNode() is transform


# ---------------------------------------------------------------------------------------------
# library results -> new MRML nodes


def test_new_segmentation_from_a_labelmap_has_exactly_the_ct_geometry(sc):
    grid = oblique_grid()
    volume_node = sc.addVolume(ct_array(grid), grid)
    mask = ball_mask(grid, grid.center + [2.0, 1.0, -3.0], 7.0)
    seg, sid = mrml.addSegmentationFromMask(sc.scene, mask, volume_node, "Predicted", "Healthy tibia")

    arr, image_to_ras, ext = labelmap_in_own_geometry(seg, sid)
    np.testing.assert_allclose(image_to_ras, grid.ijk_to_ras, atol=1e-9)  # the CT's voxel lattice
    # stored on a sub-extent of the CT grid (Slicer crops to the content); placed back it is the mask
    assert min(ext[0::2]) >= 0 and all(ext[2 * a + 1] < grid.size[a] for a in range(3))
    placed = np.zeros(grid.shape, bool)
    placed[ext[4]:ext[5] + 1, ext[2]:ext[3] + 1, ext[0]:ext[1] + 1] = arr
    np.testing.assert_array_equal(placed, mask != 0)
    matrix, extent = reference_geometry(seg)
    np.testing.assert_allclose(matrix, grid.ijk_to_ras, atol=1e-9)
    assert extent == (0, grid.size[0] - 1, 0, grid.size[1] - 1, 0, grid.size[2] - 1)
    # the segmentation's own export on the CT gives the mask back voxel for voxel
    np.testing.assert_array_equal(mrml.segmentMask(sc.scene, seg, sid, volume_node), mask)


def test_model_from_an_lps_surface_lands_on_the_ct_voxels_in_ras(sc):
    grid = oblique_grid()
    volume_node = sc.addVolume(ct_array(grid), grid)
    ijk = np.array([[0, 0, 0], [10, 3, 7], [23, 19, 15]], float)
    points_lps = grid.index_to_physical(ijk)
    poly = vtk.vtkPolyData()
    pts = vtk.vtkPoints()
    pts.SetData(numpy_support.numpy_to_vtk(points_lps, deep=True))
    poly.SetPoints(pts)
    cells = vtk.vtkCellArray()
    cells.InsertNextCell(3, [0, 1, 2])
    poly.SetPolys(cells)
    normals = numpy_support.numpy_to_vtk(np.tile([[0.6, 0.0, 0.8]], (3, 1)), deep=True)
    normals.SetName("Normals")
    poly.GetPointData().SetNormals(normals)

    model = mrml.addModelFromPolyData(sc.scene, poly, "surface", parentTransformNode=volume_node.GetParentTransformNode())

    got = mrml.polyDataPoints(model.GetPolyData())
    np.testing.assert_allclose(got, node_ras(volume_node, ijk), atol=1e-9)  # on the CT's voxels in Slicer
    got_normals = numpy_support.vtk_to_numpy(model.GetPolyData().GetPointData().GetNormals())
    np.testing.assert_allclose(got_normals, lps_to_ras(np.tile([[0.6, 0.0, 0.8]], (3, 1))), atol=1e-9)
    assert mrml.polyDataPoints(poly).tolist() == points_lps.tolist()  # the library's polydata is untouched
    display = model.GetDisplayNode()
    assert display.GetVisibility() and display.GetVisibility2D() and display.GetOpacity() < 1.0


# ---------------------------------------------------------------------------------------------
# STL export


def _closed_surface_model(sc, centre_ras=(10.0, 20.0, 30.0)):
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(*centre_ras)
    sphere.SetRadius(5.0)
    sphere.Update()
    model = sc.scene.AddNewNodeByClass("vtkMRMLModelNode", "sphere")
    model.SetAndObservePolyData(sphere.GetOutput())
    return model, mrml.polyDataPoints(sphere.GetOutput())


def _read_stl_points(path):
    reader = vtk.vtkSTLReader()
    reader.SetFileName(str(path))
    reader.Update()
    return mrml.polyDataPoints(reader.GetOutput())


def _same_point_set(a, b, atol=1e-4):
    a, b = np.unique(np.round(a, 3), axis=0), np.unique(np.round(b, 3), axis=0)
    return a.shape == b.shape and np.allclose(a, b, atol=atol)


def test_stl_export_writes_the_stated_frame_and_never_overwrites_silently(sc, logic, tmp_path):
    model, points_ras = _closed_surface_model(sc)
    lps_path = logic.exportStl(model, tmp_path / "tibia_LPS.stl", coordinateSystem="LPS")
    ras_path = logic.exportStl(model, tmp_path / "tibia_RAS.stl", coordinateSystem="RAS")
    assert _same_point_set(_read_stl_points(lps_path), ras_to_lps(points_ras))
    assert _same_point_set(_read_stl_points(ras_path), points_ras)
    assert b"SPACE=LPS" in open(lps_path, "rb").read(80)  # Slicer reads the frame back from the header

    before = open(lps_path, "rb").read()
    with pytest.raises(OutputExistsError):
        logic.exportStl(model, lps_path, coordinateSystem="RAS")
    assert open(lps_path, "rb").read() == before
    logic.exportStl(model, lps_path, coordinateSystem="RAS", overwrite=True)
    assert _same_point_set(_read_stl_points(lps_path), points_ras)
    with pytest.raises(InputError):
        logic.exportStl(model, tmp_path / "x.stl", coordinateSystem="XYZ")
    assert sorted(os.listdir(tmp_path)) == ["tibia_LPS.stl", "tibia_RAS.stl"]  # no temporary files left


def test_stl_export_of_a_segmentation_uses_its_surface(sc, logic, tmp_path):
    grid = oblique_grid()
    volume_node = sc.addVolume(ct_array(grid), grid)
    seg, _ = mrml.addSegmentationFromMask(sc.scene, ball_mask(grid, grid.center, 8.0), volume_node, "s", "ball")
    path = logic.exportStl(seg, tmp_path / "ball.stl", coordinateSystem="LPS")
    centre = _read_stl_points(path).mean(axis=0)
    assert np.linalg.norm(centre - grid.center) < 1.0  # LPS centre of the ball


# ---------------------------------------------------------------------------------------------
# bad inputs give clear, actionable errors


@pytest.fixture
def case(sc):
    grid = oblique_grid()
    ct = Volume.on_grid(ct_array(grid), grid)
    return add_case(sc, ct, ct.with_array(ball_mask(grid, grid.center, 9.0)),
                    ct.with_array(ball_mask(grid, grid.center, 3.0)))


def test_missing_volume_or_segmentation_or_segment(sc, logic, case):
    volume_node, seg, tid, fid = case
    with pytest.raises(InputError, match="No CT volume"):
        logic.prepareInputs(None, seg, tid, fid)
    with pytest.raises(InputError, match="No segmentation"):
        logic.prepareInputs(volume_node, None, tid, fid)
    with pytest.raises(InputError, match=r"no segment with id 'nope'.*'Tibia'.*'Fracture'"):
        logic.prepareInputs(volume_node, seg, tid, "nope")
    with pytest.raises(InputError, match="No fracture segment"):
        logic.prepareInputs(volume_node, seg, tid, "")
    with pytest.raises(InputError, match="same segment"):
        logic.prepareInputs(volume_node, seg, tid, tid)
    label = sc.addVolume(np.zeros(oblique_grid().shape, np.uint8), oblique_grid(), "labels", labelmap=True)
    with pytest.raises(InputError, match="not a CT"):
        logic.prepareInputs(label, seg, tid, fid)


def test_empty_segments_are_named_in_the_error(sc, logic, case):
    volume_node, seg, tid, fid = case
    empty = seg.GetSegmentation().AddEmptySegment("", "Fracture (new)")
    with pytest.raises(InputError, match=r"fracture segment 'Fracture \(new\)' is empty.*Paint"):
        logic.prepareInputs(volume_node, seg, tid, empty)
    with pytest.raises(InputError, match=r"tibia segment 'Fracture \(new\)' is empty"):
        logic.prepareInputs(volume_node, seg, empty, fid)


def test_segmentation_that_does_not_cover_the_ct_is_refused(sc, logic, case):
    volume_node, seg, tid, fid = case
    grid = oblique_grid()
    far = Grid((20, 20, 20), np.ones(3), grid.center + [300.0, 0.0, 0.0], np.eye(3))  # 30 cm away
    other = sc.addSegmentation(name="Masks of another scan")
    o_tid = sc.addSegment(other, "Tibia", np.ones(far.shape, np.uint8), far)
    o_fid = sc.addSegment(other, "Fracture", ball_mask(far, far.center, 4.0), far)
    with pytest.raises(InputError, match=r"lies entirely outside the CT.*does not cover"):
        logic.prepareInputs(volume_node, other, o_tid, o_fid)
    # a tibia half outside the CT is refused too (the prediction would miss bone)
    face_centre = grid.index_to_physical(np.array([0.0, (grid.size[1] - 1) / 2, (grid.size[2] - 1) / 2]))
    box = Grid((24, 24, 24), np.ones(3), face_centre - 11.5, np.eye(3))
    h_tid = sc.addSegment(seg, "Half tibia", ball_mask(box, face_centre, 8.0), box)
    with pytest.raises(InputError, match=r"'Half tibia' lies [4-6]\d% of it outside the CT"):
        logic.prepareInputs(volume_node, seg, h_tid, fid)
    # a fracture mask painted partly beyond the CT's edge is harmless: its inside part is used
    inputs = logic.prepareInputs(volume_node, seg, tid, h_tid)
    assert 0 < inputs.fracture.array.sum() < ball_mask(box, face_centre, 8.0).sum()


def test_input_problem_enables_predict_only_for_a_complete_selection(logic, case):
    volume_node, seg, tid, fid = case
    assert logic.inputProblem(volume_node, seg, tid, fid) == ""
    assert "CT volume" in logic.inputProblem(None, seg, tid, fid)
    assert "segmentation" in logic.inputProblem(volume_node, None, tid, fid)
    assert "tibia segment" in logic.inputProblem(volume_node, seg, "", fid)
    assert "fracture segment" in logic.inputProblem(volume_node, seg, tid, "gone")
    assert "different" in logic.inputProblem(volume_node, seg, tid, tid)


# ---------------------------------------------------------------------------------------------
# segment selection and the Segment Editor shortcut


def test_find_tibia_and_fracture_segments_by_name(sc):
    seg = sc.addSegmentation()
    ids = {name: seg.GetSegmentation().AddEmptySegment("", name)
           for name in ("Fibula", "Tibia fracture zone", "Right tibia", "Femur")}
    assert TibiaReconstructionLogic.findTibiaSegment(seg) == ids["Right tibia"]
    assert TibiaReconstructionLogic.findFractureSegment(seg) == ids["Tibia fracture zone"]
    exact = seg.GetSegmentation().AddEmptySegment("", "tibia")
    assert TibiaReconstructionLogic.findTibiaSegment(seg) == exact
    other = sc.addSegmentation(name="bones")
    other.GetSegmentation().AddEmptySegment("", "Fibula")
    assert TibiaReconstructionLogic.findTibiaSegment(other) is None
    assert TibiaReconstructionLogic.findTibiaSegment(None) is None


def test_prepare_mask_segmentation_adds_only_what_is_missing(sc, logic, case):
    volume_node, seg, tid, fid = case
    # a new segmentation on the CT geometry with both segments
    new, ntid, nfid = logic.prepareMaskSegmentation(volume_node)
    names = mrml.segmentNames(new)
    assert names[ntid] == "Tibia" and names[nfid] == "Fracture"
    matrix, extent = reference_geometry(new)
    np.testing.assert_allclose(matrix, mrml.ijkToRas(volume_node), atol=1e-9)
    assert extent == tuple(volume_node.GetImageData().GetExtent())
    # an existing segmentation with a tibia gets only a fracture segment
    only_tibia = sc.addSegmentation(volume_node, "Tibia only")
    keep = only_tibia.GetSegmentation().AddEmptySegment("", "Left tibia")
    same, t2, f2 = logic.prepareMaskSegmentation(volume_node, only_tibia)
    assert same is only_tibia and t2 == keep
    assert list(mrml.segmentNames(only_tibia).values()) == ["Left tibia", "Fracture"]
    with pytest.raises(InputError):
        logic.prepareMaskSegmentation(None)


# ---------------------------------------------------------------------------------------------
# dependencies and the library's location


def test_setup_requirements_asks_first_and_explains_a_refusal(monkeypatch):
    wanted = ["tibia-recon-not-a-real-package>=1.0", "vtk>=999"]  # vtk is Slicer's own: never installed
    assert dependencies.missingRequirements(wanted) == ["tibia-recon-not-a-real-package>=1.0"]
    installs, questions = [], []

    with pytest.raises(MissingDependencyError, match=r"declined.*tibia-recon-not-a-real-package"):
        dependencies.setupPythonRequirements(confirm=lambda q: questions.append(q) or False,
                                             install=installs.append, requirements=wanted)
    assert installs == [] and "tibia-recon-not-a-real-package" in questions[0]
    with pytest.raises(MissingDependencyError, match="declined"):
        dependencies.setupPythonRequirements(confirm=None, install=installs.append, requirements=wanted)
    assert installs == []

    def fake_install(reqs):
        installs.append(reqs)
        monkeypatch.setattr(dependencies, "isSatisfied", lambda r: True)

    assert dependencies.setupPythonRequirements(confirm=lambda q: True, install=fake_install,
                                                requirements=wanted) == ["tibia-recon-not-a-real-package>=1.0"]
    assert installs == [["tibia-recon-not-a-real-package>=1.0"]]
    # nothing missing: nothing asked
    assert dependencies.setupPythonRequirements(confirm=lambda q: pytest.fail("asked"), requirements=[]) == []


def test_requirements_file_lists_what_the_prediction_imports():
    reqs = {dependencies._split(r)[0].lower() for r in dependencies.readRequirements()}
    assert {"monai", "safetensors"} <= reqs
    assert not reqs & dependencies.NEVER_INSTALL
    assert dependencies.missingRequirements() == []  # this environment can predict


def test_module_finds_the_library_in_a_source_checkout(tmp_path):
    """Run from source (module folder added in Slicer's settings): the repo root is found and used."""
    import sysconfig

    # -S: no site processing, so neither the editable install's .pth hook nor PYTHONPATH can provide the
    # library; third-party packages come from the plain site-packages folder as in Slicer's Python
    code = ("import sys; sys.path += sys.argv[1:]; "
            "assert 'TibiaReconstructionLib' not in sys.modules; "
            "from TibiaReconstructionLogic import TibiaReconstructionLogic; import TibiaReconstructionLib as m; "
            "print(m.__file__)")
    out = subprocess.run([sys.executable, "-S", "-c", code, sysconfig.get_paths()["purelib"], MODULE_DIR],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={"PATH": os.environ.get("PATH", "")})
    assert out.returncode == 0, out.stderr
    assert os.path.realpath(out.stdout.strip()) == os.path.realpath(
        os.path.join(REPO, "TibiaReconstructionLib", "__init__.py"))


# ---------------------------------------------------------------------------------------------
# end to end with a tiny model bundle


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """The project's tiny but real bundle (safetensors + JSON): identity LocNet, PCA fitted on synthetic bones."""
    from tiny_bundle import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


def fractured_case():
    """An oblique, anisotropic synthetic CT with tibia and fracture masks (library Volumes, LPS)."""
    return bone_case(pose_deg=(8, -5, 20), spacing=(3.0, 3.0, 4.0), size=(24, 24, 44),
                     direction=euler_rotation((5.0, 10.0, 15.0))[:3, :3])


def test_predict_end_to_end_matches_the_library_and_keeps_inputs(sc, logic, tiny_bundle, tmp_path):
    from TibiaReconstructionLib.predict import Predictor

    ct, tibia, fracture = fractured_case()
    volume_node, seg, tid, fid = add_case(sc, ct, tibia, fracture)
    before = fingerprint(volume_node, seg)
    direct = Predictor(tiny_bundle, device="cpu").predict(ct, tibia, fracture)
    progress = []

    out_seg, model = logic.predict(volume_node, seg, tid, fid, bundlePath=tiny_bundle, device="cpu",
                                   progress=lambda f, m: progress.append((f, m)))

    assert progress and progress[-1][0] == 1.0
    # inputs unchanged; nothing added to the user's segmentation
    assert fingerprint(volume_node, seg) == before
    assert out_seg is not seg and out_seg.GetSegmentation().GetNumberOfSegments() == 1
    # the new segmentation: the CT's geometry in RAS, the Predictor's labelmap voxel for voxel
    sid = out_seg.GetSegmentation().GetNthSegmentID(0)
    _, image_to_ras, _ = labelmap_in_own_geometry(out_seg, sid)
    np.testing.assert_allclose(image_to_ras, ct.grid.ijk_to_ras, atol=1e-9)
    reference, extent = reference_geometry(out_seg)
    np.testing.assert_allclose(reference, ct.grid.ijk_to_ras, atol=1e-9)
    assert extent == (0, ct.grid.size[0] - 1, 0, ct.grid.size[1] - 1, 0, ct.grid.size[2] - 1)
    arr = mrml.segmentMask(sc.scene, out_seg, sid, volume_node)
    assert arr.any()
    np.testing.assert_array_equal(arr, direct.labelmap.array != 0)
    assert dice(arr, tibia.array) > 0.5  # a sanity check that the tiny model predicts a bone where the bone is
    # the model's points are the Predictor's surface, in RAS
    np.testing.assert_allclose(mrml.polyDataPoints(model.GetPolyData()),
                               lps_to_ras(mrml.polyDataPoints(direct.surface)), atol=1e-6)
    # the surface bounds the labelmap: its centre is the predicted voxels' centre (RAS)
    voxel_centre_ras = node_ras(volume_node, np.argwhere(arr)[:, ::-1]).mean(axis=0)
    assert np.linalg.norm(mrml.polyDataPoints(model.GetPolyData()).mean(axis=0) - voxel_centre_ras) < 4.0
    # STL in both frames holds the same surface
    lps_points = _read_stl_points(logic.exportStl(model, tmp_path / "t_LPS.stl", "LPS"))
    ras_points = _read_stl_points(logic.exportStl(model, tmp_path / "t_RAS.stl", "RAS"))
    assert _same_point_set(lps_points, mrml.polyDataPoints(direct.surface), atol=1e-3)
    assert _same_point_set(ras_points, lps_to_ras(mrml.polyDataPoints(direct.surface)), atol=1e-3)
    report = json.loads(out_seg.GetAttribute(REPORT_ATTRIBUTE))
    assert report["ct"] == "CT" and "timings_s" in report
    # the per-point uncertainty travels with the model (PCA bundle) and colours it on request
    from TibiaReconstructionLib.surface import UNCERTAINTY_ARRAY, point_array

    shown = model.GetPolyData().GetPointData().GetArray(UNCERTAINTY_ARRAY)
    np.testing.assert_allclose([shown.GetValue(i) for i in range(shown.GetNumberOfTuples())],
                               point_array(direct.surface, UNCERTAINTY_ARRAY), rtol=1e-6)
    assert not model.GetDisplayNode().GetScalarVisibility()
    logic.showUncertainty(model)
    assert model.GetDisplayNode().GetScalarVisibility()
    assert model.GetDisplayNode().GetActiveScalarName() == UNCERTAINTY_ARRAY


def test_background_jobs_match_the_library_report_its_errors_and_cancel_at_once(sc, logic, tiny_bundle, tmp_path,
                                                                                monkeypatch):
    """The GUI's path: a worker process, started with the library's process settings (PROCESS_ENVIRONMENT). Two jobs
    run side by side to keep the test short."""
    import time

    from TibiaReconstructionLib.predict import Predictor

    ct, tibia, fracture = fractured_case()
    volume_node, seg, tid, fid = add_case(sc, ct, tibia, fracture)
    (tmp_path / "not-a-bundle").mkdir()
    job = logic.startPrediction(volume_node, seg, tid, fid, bundlePath=tiny_bundle, device="cpu",
                                reduceFragments=False, keepVisibleBone=False, reassembleFragments=False,
                                useOtherLeg=True)
    bad = logic.startPrediction(volume_node, seg, tid, fid, bundlePath=tmp_path / "not-a-bundle", device="cpu")
    direct = Predictor(tiny_bundle, device="cpu", reduce_fragments=False).predict(ct, tibia, fracture)
    with open(os.path.join(job.workDir, "inputs.json"), encoding="utf-8") as f:
        settings = json.load(f)
    assert settings["reduce_fragments"] is False and settings["keep_visible_bone"] is False  # the GUI's settings
    assert settings["reassemble_fragments"] is False and settings["other_tibia"] == "auto"

    # success: the same labelmap and surface as the library called directly
    seen = []
    assert job.wait(timeout=120, progress=lambda f, m: seen.append(f)) == "succeeded", job.log()
    assert seen and seen[-1] == 1.0
    work_dir = job.workDir
    out_seg, model = logic.finishPrediction(job)
    assert not os.path.exists(work_dir)  # temporary files removed
    sid = out_seg.GetSegmentation().GetNthSegmentID(0)
    np.testing.assert_array_equal(mrml.segmentMask(sc.scene, out_seg, sid, volume_node), direct.labelmap.array != 0)
    np.testing.assert_allclose(mrml.polyDataPoints(model.GetPolyData()),
                               lps_to_ras(mrml.polyDataPoints(direct.surface)), atol=1e-9)

    # a library error in the worker comes back as that library error, with its message
    assert bad.wait(timeout=120) == "failed"
    assert isinstance(bad.error, BundleError) and "config.json" in str(bad.error)
    nodes = sc.scene.GetNumberOfNodes()
    with pytest.raises(BundleError):
        logic.finishPrediction(bad)

    # cancel: the worker is gone at once, no node is created
    for key in PROCESS_ENVIRONMENT:
        monkeypatch.delenv(key, raising=False)  # Slicer's own environment has none of them
    job = logic.startPrediction(volume_node, seg, tid, fid, bundlePath=tiny_bundle, device="cpu")
    assert job.isProcessRunning()
    if os.path.exists(f"/proc/{job._process.pid}/environ"):
        with open(f"/proc/{job._process.pid}/environ", "rb") as f:
            environment = dict(v.split("=", 1) for v in f.read().decode().split("\0") if "=" in v)
        assert {k: environment.get(k) for k in PROCESS_ENVIRONMENT} == PROCESS_ENVIRONMENT
    t0 = time.time()
    job.cancel()
    assert job.state == "cancelled" and not job.isProcessRunning() and time.time() - t0 < 5.0
    with pytest.raises(Exception, match="cancelled"):
        logic.finishPrediction(job)
    assert sc.scene.GetNumberOfNodes() == nodes


def test_bad_bundle_path_and_device_are_refused_before_starting(logic, case, tmp_path):
    volume_node, seg, tid, fid = case
    from TibiaReconstructionLogic import PredictionJob

    job = PredictionJob(logic.prepareInputs(volume_node, seg, tid, fid), python=str(tmp_path / "no-python"))
    with pytest.raises(OSError):
        job.start()
    assert not os.path.exists(job.workDir)  # nothing left in the temporary folder
    with pytest.raises(InputError, match="not found"):
        logic.startPrediction(volume_node, seg, tid, fid, bundlePath=tmp_path / "missing")
    with pytest.raises(InputError, match="Unknown device"):
        logic.predict(volume_node, seg, tid, fid, device="tpu")


def test_default_scene_is_slicer_mrmlScene(sc):
    assert TibiaReconstructionLogic().scene is sc.scene
