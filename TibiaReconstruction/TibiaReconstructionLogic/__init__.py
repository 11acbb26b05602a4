"""Qt-free logic of the TibiaReconstruction Slicer module.

Imports only slicer (MRML and Segmentations logic), vtk, numpy and the headless library
TibiaReconstructionLib, so it runs in the Slicer application, in its Python console, and in plain
Python with the ``slicer-core`` wheel (the module's tests do that).

    from TibiaReconstructionLogic import TibiaReconstructionLogic
    logic = TibiaReconstructionLogic()  # scene defaults to slicer.mrmlScene
    segmentationNode, modelNode = logic.predict(volumeNode, segmentationNode, tibiaSegmentId, fractureSegmentId)
"""

from .libpath import ensureLibraryImportable

ensureLibraryImportable()

from .dependencies import MissingDependencyError  # noqa: E402
from .job import PredictionCancelled, PredictionJob, PredictionResult  # noqa: E402
from .logic import (  # noqa: E402
    DEFAULT_INTENSITY_NAME,
    DEFAULT_MODEL_NAME,
    DEFAULT_SEGMENTATION_NAME,
    DEVICES,
    REPORT_ATTRIBUTE,
    STL_FRAMES,
    PredictionInputs,
    TibiaReconstructionLogic,
)

__all__ = [
    "DEFAULT_INTENSITY_NAME", "DEFAULT_MODEL_NAME", "DEFAULT_SEGMENTATION_NAME", "DEVICES", "REPORT_ATTRIBUTE",
    "STL_FRAMES", "MissingDependencyError", "PredictionCancelled", "PredictionInputs", "PredictionJob",
    "PredictionResult", "TibiaReconstructionLogic",
]
