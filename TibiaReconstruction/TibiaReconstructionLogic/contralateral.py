"""The contralateral target as MRML nodes: a NEW segmentation (CT geometry) and a NEW model node, the model
coloured by each vertex's signed distance to the prediction (mm, blue inside - white - red outside the
predicted bone) when one was compared. Qt-free; the library result is in LPS, nodes in RAS (via mrml.py)."""

import json

import slicer

from . import mrml
from .libpath import ensureLibraryImportable

ensureLibraryImportable()

from TibiaReconstructionLib.contralateral import DISTANCE_ARRAY  # noqa: E402
from TibiaReconstructionLib.io import json_default  # noqa: E402

DEFAULT_SEGMENTATION_NAME = "Contralateral tibia"
DEFAULT_MODEL_NAME = "Contralateral tibia surface"
CONTRALATERAL_COLOR = (0.95, 0.65, 0.15)  # orange: apart from the prediction's cyan and bone white
MODEL_OPACITY = 0.8
MIN_COLOR_RANGE_MM = 2.0


def createNodes(scene, result, volumeNode, segmentationName=DEFAULT_SEGMENTATION_NAME, modelName=DEFAULT_MODEL_NAME,
                reportAttribute="TibiaReconstruction.Report"):
    """(new segmentation node, new model node) of a library ContralateralResult on ``volumeNode``'s grid,
    both under the CT's parent transform, with the JSON report in ``reportAttribute``."""
    segmentationNode, _ = mrml.addSegmentationFromMask(
        scene, result.labelmap.array != 0, volumeNode, segmentationName or DEFAULT_SEGMENTATION_NAME,
        "Contralateral tibia", CONTRALATERAL_COLOR)
    segmentationNode.GetDisplayNode().SetVisibility3D(False)  # the model node shows it in 3D
    modelNode = mrml.addModelFromPolyData(scene, result.surface, modelName or DEFAULT_MODEL_NAME, CONTRALATERAL_COLOR,
                                          MODEL_OPACITY, volumeNode.GetParentTransformNode())
    if result.comparison is not None:
        limit = max(MIN_COLOR_RANGE_MM, result.comparison["vertex_distance_mm"]["p95_abs"])
        display = modelNode.GetDisplayNode()
        display.SetActiveScalarName(DISTANCE_ARRAY)
        colorNode = mrml.colorMapNode(scene, "Contralateral distance", limit, mrml.BLUE_WHITE_RED)
        display.SetAndObserveColorNodeID(colorNode.GetID())
        display.SetScalarRangeFlag(slicer.vtkMRMLDisplayNode.UseManualScalarRange)
        display.SetScalarRange(-limit, limit)
        display.SetScalarVisibility(True)
    text = json.dumps(dict(result.report(), ct=volumeNode.GetName()), default=json_default)
    segmentationNode.SetAttribute(reportAttribute, text)
    modelNode.SetAttribute(reportAttribute, text)
    return segmentationNode, modelNode
