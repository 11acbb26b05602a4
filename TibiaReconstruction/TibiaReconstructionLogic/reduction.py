"""The fragment reduction plan as MRML nodes: one NEW model node per reduced fragment, coloured by its signed
deviation from the predicted surface (mm; blue inside, white on, red outside the predicted bone). Qt-free; the
library plan is in LPS, the nodes in RAS (converted by mrml.py)."""

import json

import numpy as np

import slicer

from . import mrml
from .libpath import ensureLibraryImportable

ensureLibraryImportable()

from TibiaReconstructionLib.errors import InputError  # noqa: E402
from TibiaReconstructionLib.geometry import check_same_grid  # noqa: E402
from TibiaReconstructionLib.io import json_default  # noqa: E402
from TibiaReconstructionLib.reduction import DEVIATION_ARRAY, FRACTURE_FACE_ARRAY  # noqa: E402
from TibiaReconstructionLib.surface import point_array  # noqa: E402

DEFAULT_MODEL_NAME = "Reduced fragment"
MIN_COLOR_RANGE_MM = 2.0


def predictionMask(scene, predictionNode, volumeNode):
    """The predicted tibia (uint8 array [k, j, i] on the CT grid) from a segmentation node (its first segment,
    resampled onto the CT) or a labelmap volume node on the CT's grid."""
    if predictionNode is None:
        raise InputError("No predicted tibia was given. Run Predict first and select its segmentation.")
    name = predictionNode.GetName()
    if predictionNode.IsA("vtkMRMLSegmentationNode"):
        segmentation = predictionNode.GetSegmentation()
        if segmentation.GetNumberOfSegments() == 0:
            raise InputError(f"The prediction '{name}' has no segment; run Predict first.")
        return mrml.segmentMask(scene, predictionNode, segmentation.GetNthSegmentID(0), volumeNode)
    if predictionNode.IsA("vtkMRMLLabelMapVolumeNode"):
        volume = mrml.volumeFromNode(predictionNode)
        check_same_grid(mrml.volumeGrid(volumeNode), volume.grid, "CT", f"prediction '{name}'")
        return (volume.array != 0).astype(np.uint8)
    raise InputError(f"'{name}' is a {predictionNode.GetClassName()}; select the predicted tibia's segmentation or "
                     "labelmap.")


def createFragmentModels(scene, plan, volumeNode, modelName=DEFAULT_MODEL_NAME,
                         reportAttribute="TibiaReconstruction.Report"):
    """One NEW model node per reduced fragment of a library ReductionPlan (under the CT's parent transform), with
    DeviationMm as active scalars on one shared colour scale and the fragment's JSON report in
    ``reportAttribute``. Returns the model nodes in fragment order."""
    deviations = np.concatenate([np.abs(point_array(f.reduced_surface, DEVIATION_ARRAY))
                                 [point_array(f.reduced_surface, FRACTURE_FACE_ARRAY) == 0]
                                 for f in plan.fragments])  # outer surfaces: fracture faces lie inside by nature
    limit = max(MIN_COLOR_RANGE_MM, float(np.percentile(deviations, 95)) if len(deviations) else 0.0)
    colorNode = mrml.colorMapNode(scene, "Fragment deviation", limit, mrml.BLUE_WHITE_RED)
    nodes = []
    for fragment in plan.fragments:
        node = mrml.addModelFromPolyData(scene, fragment.reduced_surface, f"{modelName or DEFAULT_MODEL_NAME} "
                                         f"{fragment.id}", opacity=1.0,
                                         parentTransformNode=volumeNode.GetParentTransformNode())
        display = node.GetDisplayNode()
        display.SetActiveScalarName(DEVIATION_ARRAY)
        display.SetAndObserveColorNodeID(colorNode.GetID())
        display.SetScalarRangeFlag(slicer.vtkMRMLDisplayNode.UseManualScalarRange)
        display.SetScalarRange(-limit, limit)
        display.SetScalarVisibility(True)
        report = dict(fragment.report(), with_fragment_1_fixed=plan.with_first_fixed(fragment), ct=volumeNode.GetName())
        node.SetAttribute(reportAttribute, json.dumps(report, default=json_default))
        nodes.append(node)
    return nodes
