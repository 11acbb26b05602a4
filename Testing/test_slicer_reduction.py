"""The module logic's fragment reduction on a real MRML scene (slicer-core wheel, no Slicer application)."""

import json

import numpy as np
import pytest
from slicer_scene import SlicerScene
from test_reduction import fractured
from vtk.util import numpy_support

from TibiaReconstructionLib.errors import GeometryMismatchError, InputError
from TibiaReconstructionLib.geometry import Volume, lps_to_ras, translation
from TibiaReconstructionLib.reduction import DEVIATION_ARRAY
from TibiaReconstructionLib.surface import polydata_points
from TibiaReconstructionLogic import REPORT_ATTRIBUTE, TibiaReconstructionLogic, mrml


@pytest.fixture
def sc():
    scene = SlicerScene()
    yield scene
    scene.close()


def case_nodes(sc):
    """(CT node, masks segmentation, tibia id, fracture id, prediction segmentation, healthy Volume)."""
    ct, tibia, fracture, healthy, _ = fractured(translation((0.0, 3.0, 2.0)))
    volumeNode = sc.addVolume(ct.array, ct.grid)
    masks = sc.addSegmentation(volumeNode)
    tibiaId = sc.addSegment(masks, "Tibia", tibia.array, ct.grid)
    fractureId = sc.addSegment(masks, "Fracture", fracture.array, ct.grid)
    prediction = sc.addSegmentation(volumeNode, "Predicted healthy tibia")
    sc.addSegment(prediction, "Healthy tibia", healthy.array, ct.grid)
    return volumeNode, masks, tibiaId, fractureId, prediction, healthy


def test_one_coloured_model_per_reduced_fragment_in_ras(sc):
    volumeNode, masks, tibiaId, fractureId, prediction, _ = case_nodes(sc)
    before = {sid: mrml.segmentMask(sc.scene, masks, sid, volumeNode).copy() for sid in (tibiaId, fractureId)}
    plan, models = TibiaReconstructionLogic(scene=sc.scene).planReduction(volumeNode, masks, tibiaId, fractureId,
                                                                          prediction)
    assert len(models) == len(plan.fragments) == 2
    for fragment, node in zip(plan.fragments, models):
        assert np.allclose(mrml.polyDataPoints(node.GetPolyData()),
                           lps_to_ras(polydata_points(fragment.reduced_surface)), atol=1e-4)
        display = node.GetDisplayNode()
        assert display.GetActiveScalarName() == DEVIATION_ARRAY and display.GetScalarVisibility()
        low, high = display.GetScalarRange()
        assert low == -high and high >= 2.0 and display.GetColorNode() is not None
        deviation = numpy_support.vtk_to_numpy(node.GetPolyData().GetPointData().GetArray(DEVIATION_ARRAY))
        assert len(deviation) == node.GetPolyData().GetNumberOfPoints()
        assert json.loads(node.GetAttribute(REPORT_ATTRIBUTE))["id"] == fragment.id
    distal = min(plan.fragments, key=lambda f: f.centroid[2])
    assert np.allclose(distal.translation_mm, (0.0, -3.0, -2.0), atol=1.0)
    for sid, mask in before.items():  # inputs unmodified
        assert np.array_equal(mrml.segmentMask(sc.scene, masks, sid, volumeNode), mask)


def test_prediction_as_labelmap_and_bad_predictions(sc):
    volumeNode, masks, tibiaId, fractureId, prediction, healthy = case_nodes(sc)
    logic = TibiaReconstructionLogic(scene=sc.scene)
    labelmap = sc.addVolume(healthy.array, healthy.grid, "prediction label", labelmap=True)
    plan, models = logic.planReduction(volumeNode, masks, tibiaId, fractureId, labelmap)
    assert len(models) == 2
    with pytest.raises(InputError, match="No predicted tibia"):
        logic.planReduction(volumeNode, masks, tibiaId, fractureId, None)
    with pytest.raises(InputError, match="select the predicted tibia"):
        logic.planReduction(volumeNode, masks, tibiaId, fractureId, volumeNode)
    empty = sc.addVolume(np.zeros_like(healthy.array), healthy.grid, "empty", labelmap=True)
    with pytest.raises(InputError, match="predicted tibia is empty"):
        logic.planReduction(volumeNode, masks, tibiaId, fractureId, empty)
    shifted = Volume(healthy.array, healthy.spacing, healthy.origin + 4.0, healthy.direction)
    other = sc.addVolume(shifted.array, shifted.grid, "other grid", labelmap=True)
    with pytest.raises(GeometryMismatchError):
        logic.planReduction(volumeNode, masks, tibiaId, fractureId, other)
