"""The Slicer Logic's contralateral target on a real MRML scene (slicer-core wheel, no application)."""

import json

import numpy as np
import pytest
from vtk.util import numpy_support

import slicer
from slicer_scene import SlicerScene

from TibiaReconstructionLib.contralateral import DISTANCE_ARRAY, contralateral_target
from TibiaReconstructionLib.errors import InputError
from TibiaReconstructionLib.geometry import lps_to_ras
from TibiaReconstructionLib.metrics import dice
from TibiaReconstructionLib.phantoms import generate_case
from TibiaReconstructionLogic import REPORT_ATTRIBUTE, TibiaReconstructionLogic, mrml

TIBIA, OTHER_TIBIA = 1, 6


@pytest.fixture
def sc():
    scene = SlicerScene()
    yield scene
    scene.close()


@pytest.fixture(scope="module")
def case():
    return generate_case(5, spacing=(2.5, 2.5, 2.5), both_legs=True, side="right", fracture_type="oblique")


def add_case(sc, c, other=True):
    """CT node and a segmentation with 'Tibia', 'Fracture' (and 'Other tibia') on the fractured CT's grid."""
    ct = c.fractured_ct
    volume = sc.addVolume(ct.array, ct.grid, "CT")
    seg = sc.addSegmentation(volume)
    ids = [sc.addSegment(seg, "Tibia", c.fractured_labels.array == TIBIA, ct.grid),
           sc.addSegment(seg, "Fracture", c.fracture_mask.array, ct.grid)]
    if other:
        ids.append(sc.addSegment(seg, "Other tibia", c.labels.array == OTHER_TIBIA, ct.grid))
    return volume, seg, ids


def test_contralateral_nodes_match_the_library_and_show_the_distance(sc, case):
    logic = TibiaReconstructionLogic(scene=sc.scene)
    volume, seg, (tid, fid, oid) = add_case(sc, case)
    truth = case.labels.array == TIBIA
    prediction = sc.addSegmentation(volume, "Predicted")
    sc.addSegment(prediction, "Healthy tibia", truth, case.ct.grid)
    before = {sid: mrml.segmentMask(sc.scene, seg, sid, volume).copy() for sid in (tid, fid, oid)}
    ct_before = slicer.util.arrayFromVolume(volume).copy()

    cseg, cmodel = logic.contralateral(volume, seg, tid, fid, oid, predictionSegmentationNode=prediction)
    assert cseg is not seg and cmodel.IsA("vtkMRMLModelNode")
    mask = mrml.segmentMask(sc.scene, cseg, cseg.GetSegmentation().GetNthSegmentID(0), volume)
    library = contralateral_target(case.fractured_ct,
                                   case.fractured_labels.with_array((case.fractured_labels.array == TIBIA).astype(
                                       np.uint8)), case.fracture_mask, case.other_tibia)
    assert dice(mask, library.labelmap.array) > 0.99 and dice(mask, truth) > 0.85
    # the model is the library's LPS surface in RAS, coloured by the signed distance to the prediction
    points = mrml.polyDataPoints(cmodel.GetPolyData())
    np.testing.assert_allclose(points, lps_to_ras(mrml.polyDataPoints(library.surface)),
                               atol=1e-6)
    distances = numpy_support.vtk_to_numpy(cmodel.GetPolyData().GetPointData().GetArray(DISTANCE_ARRAY))
    assert len(distances) == len(points) and np.abs(distances).mean() < 3.0
    display = cmodel.GetDisplayNode()
    assert display.GetScalarVisibility() and display.GetActiveScalarName() == DISTANCE_ARRAY
    low, high = display.GetScalarRange()
    assert low == -high and high >= 2.0
    assert display.GetColorNode().IsA("vtkMRMLProceduralColorNode")
    report = json.loads(cmodel.GetAttribute(REPORT_ATTRIBUTE))
    assert report["comparison_with_prediction"]["dice"] > 0.85 and report["side"] == "right"
    # inputs unmodified
    assert np.array_equal(slicer.util.arrayFromVolume(volume), ct_before)
    for sid, arr in before.items():
        assert np.array_equal(mrml.segmentMask(sc.scene, seg, sid, volume), arr)


def test_no_other_leg_is_a_clear_error_and_adds_no_nodes():
    sc = SlicerScene()
    try:
        logic = TibiaReconstructionLogic(scene=sc.scene)
        one = generate_case(5, spacing=(2.0, 2.0, 2.0), side="right", fracture_type="oblique")
        volume, seg, (tid, fid) = add_case(sc, one, other=False)
        n = sc.scene.GetNumberOfNodes()
        with pytest.raises(InputError, match="No other leg was found.*prediction"):
            logic.contralateral(volume, seg, tid, fid)
        assert sc.scene.GetNumberOfNodes() == n
    finally:
        sc.close()
