"""TibiaReconstructionLogic: MRML nodes in, library Predictor, new MRML nodes out. Qt-free.

Console use (Slicer's Python console)::

    from TibiaReconstructionLogic import TibiaReconstructionLogic
    logic = TibiaReconstructionLogic()            # scene defaults to slicer.mrmlScene
    seg, model = logic.predict(volumeNode, segmentationNode, tibiaSegmentId, fractureSegmentId)
    logic.exportStl(model, "/tmp/tibia.stl", coordinateSystem="LPS")
    # both legs in the CT: the mirrored healthy tibia as target, coloured by its distance to the prediction
    cseg, cmodel = logic.contralateral(volumeNode, segmentationNode, tibiaSegmentId, fractureSegmentId,
                                       predictionSegmentationNode=seg)

Inputs are never modified: masks are read through temporary labelmap nodes that are removed again,
and the result goes into a NEW segmentation node (geometry = the CT's) and a NEW model node.
"""

import json
import os
import re

import vtk

import slicer

from . import contralateral as contralateralNodes
from . import dependencies, mrml
from .job import PredictionJob
from .libpath import ensureLibraryImportable

ensureLibraryImportable()

from TibiaReconstructionLib.errors import GeometryMismatchError, InputError, OutputExistsError  # noqa: E402
from TibiaReconstructionLib.io import json_default  # noqa: E402
from TibiaReconstructionLib.surface import UNCERTAINTY_ARRAY  # noqa: E402

DEFAULT_SEGMENTATION_NAME = "Predicted healthy tibia"
DEFAULT_MODEL_NAME = "Predicted healthy tibia surface"
DEFAULT_INTENSITY_NAME = "Predicted healthy tibia HU"
PREDICTION_COLOR = (0.10, 0.80, 0.95)  # cyan: distinct from bone white and the Segment Editor's default colours
MODEL_OPACITY = 0.6
UNCERTAINTY_RANGE_MM = 2.0  # the uncertainty colour map saturates here
# Share of a segment's voxels allowed outside the CT: tibia outside the CT is bone the model cannot see; a
# fracture mask painted a little beyond the CT's edge is harmless, but mostly outside means a wrong segmentation.
MAX_OUTSIDE_FRACTION = {"tibia": 0.01, "fracture": 0.5}
REPORT_ATTRIBUTE = "TibiaReconstruction.Report"
DEVICES = ("auto", "cpu", "cuda")
STL_FRAMES = ("LPS", "RAS")


class PredictionInputs:
    """The CT and both masks as library Volumes (LPS) on the CT grid, plus the nodes they came from."""

    def __init__(self, ct, tibia, fracture, volumeNode, segmentationNode, tibiaSegmentId, fractureSegmentId):
        self.ct = ct
        self.tibia = tibia
        self.fracture = fracture
        self.volumeNode = volumeNode
        self.segmentationNode = segmentationNode
        self.tibiaSegmentId = tibiaSegmentId
        self.fractureSegmentId = fractureSegmentId


def _nameMatches(name, pattern):
    return re.search(pattern, name or "", re.IGNORECASE) is not None


class TibiaReconstructionLogic:
    """All computation of the module; usable without the GUI (console, scripts, tests)."""

    def __init__(self, scene=None):
        self._scene = scene
        self._predictors = {}
        self.lastResult = None
        self.lastReport = None
        self.lastContralateral = None

    @property
    def scene(self):
        scene = self._scene if self._scene is not None else getattr(slicer, "mrmlScene", None)
        if scene is None:
            raise RuntimeError("No MRML scene: pass TibiaReconstructionLogic(scene=...) when slicer.mrmlScene is not set.")
        return scene

    # -- segments ---------------------------------------------------------------------------

    @staticmethod
    def findTibiaSegment(segmentationNode):
        """ID of the segment named like 'tibia' (e.g. 'Tibia', 'tibia_left', 'Right tibia'), else None.

        Names mentioning fibula, fracture or a prediction are skipped; an exact name 'tibia' wins.
        """
        return TibiaReconstructionLogic._findSegment(segmentationNode, r"tibia", r"fibul|fractur|predict|healthy")

    @staticmethod
    def findFractureSegment(segmentationNode):
        """ID of the segment named like 'fracture', else None."""
        return TibiaReconstructionLogic._findSegment(segmentationNode, r"fractur", r"predict")

    @staticmethod
    def _findSegment(segmentationNode, want, avoid):
        if segmentationNode is None:
            return None
        candidates = [(sid, name) for sid, name in mrml.segmentNames(segmentationNode).items()
                      if _nameMatches(name, want) and not _nameMatches(name, avoid)]
        if not candidates:
            return None
        exact = [sid for sid, name in candidates if name.strip().lower() == want]
        return exact[0] if exact else candidates[0][0]

    def inputProblem(self, volumeNode, segmentationNode, tibiaSegmentId, fractureSegmentId):
        """A short reason why Predict cannot start yet, or '' when the selection is complete (cheap; for the GUI)."""
        if volumeNode is None:
            return "Select the CT volume."
        if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            return f"'{volumeNode.GetName()}' is a labelmap; select the CT volume."
        if volumeNode.GetImageData() is None:
            return f"Volume '{volumeNode.GetName()}' has no voxel data."
        if segmentationNode is None:
            return "Select the segmentation that holds the tibia and fracture masks."
        names = mrml.segmentNames(segmentationNode)
        if not tibiaSegmentId or tibiaSegmentId not in names:
            return "Select the tibia segment."
        if not fractureSegmentId or fractureSegmentId not in names:
            return "Select the fracture segment (paint it with 'Edit masks in Segment Editor')."
        if tibiaSegmentId == fractureSegmentId:
            return "The tibia and fracture segments must be different segments."
        return ""

    # -- MRML -> library ----------------------------------------------------------------------

    def prepareInputs(self, volumeNode, segmentationNode, tibiaSegmentId, fractureSegmentId):
        """Check the selection and read CT and masks on the CT grid as library Volumes. Raises InputError."""
        if volumeNode is None:
            raise InputError("No CT volume was given. Load the fractured CT and select it as input volume.")
        if not volumeNode.IsA("vtkMRMLScalarVolumeNode") or volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise InputError(f"'{volumeNode.GetName()}' is a {volumeNode.GetClassName()}, not a CT. Select the grey-value "
                             "CT volume as input volume.")
        if volumeNode.GetImageData() is None:
            raise InputError(f"Volume '{volumeNode.GetName()}' has no voxel data; load the CT again.")
        if segmentationNode is None:
            raise InputError("No segmentation was given. Create one with the tibia and a coarse fracture mask "
                             "('Edit masks in Segment Editor').")
        names = mrml.segmentNames(segmentationNode)
        available = ", ".join(f"'{n}' (id {i})" for i, n in names.items()) or "none"
        for role, segmentId in (("tibia", tibiaSegmentId), ("fracture", fractureSegmentId)):
            if not segmentId:
                raise InputError(f"No {role} segment was chosen. Segments in '{segmentationNode.GetName()}': {available}.")
            if segmentId not in names:
                raise InputError(f"Segmentation '{segmentationNode.GetName()}' has no segment with id '{segmentId}' "
                                 f"(chosen as {role} segment). Its segments: {available}.")
        if tibiaSegmentId == fractureSegmentId:
            raise InputError(f"The same segment '{names[tibiaSegmentId]}' was chosen as tibia and as fracture mask; "
                             "choose two different segments.")

        ct = mrml.volumeFromNode(volumeNode)
        masks = {}
        for role, segmentId in (("tibia", tibiaSegmentId), ("fracture", fractureSegmentId)):
            segmentName = names[segmentId]
            total, outside = mrml.segmentVoxelsOutside(segmentationNode, segmentId, volumeNode)
            if total == 0:
                hint = ("Segment the tibia (all fragments), e.g. with Threshold + Islands in the Segment Editor."
                        if role == "tibia" else
                        "Paint a coarse mask over the fracture zone with the Segment Editor (Paint or Draw).")
                raise InputError(f"The {role} segment '{segmentName}' is empty. {hint}")
            if outside > MAX_OUTSIDE_FRACTION[role] * total:
                where = "entirely" if outside >= total else f"{100.0 * outside / total:.0f}% of it"
                raise InputError(
                    f"The {role} segment '{segmentName}' lies {where} outside the CT volume '{volumeNode.GetName()}': "
                    f"the segmentation '{segmentationNode.GetName()}' does not cover this CT (was it made on another "
                    "image, or moved by a transform?). Select the segmentation made on this CT, or redo the masks "
                    "with this CT as source volume.")
            mask = mrml.segmentMask(self.scene, segmentationNode, segmentId, volumeNode)
            if not mask.any():
                raise InputError(f"The {role} segment '{segmentName}' has no voxel inside the CT '{volumeNode.GetName()}' "
                                 "after resampling onto the CT grid; it is too thin or outside the CT.")
            masks[role] = ct.with_array(mask)
        return PredictionInputs(ct, masks["tibia"], masks["fracture"], volumeNode, segmentationNode,
                                tibiaSegmentId, fractureSegmentId)

    # -- prediction ---------------------------------------------------------------------------

    @staticmethod
    def _checkDevice(device):
        if device not in DEVICES:
            raise InputError(f"Unknown device {device!r}; use one of {', '.join(DEVICES)}.")

    def predictor(self, bundlePath=None, device="auto", reduceFragments=True, keepVisibleBone=True,
                  reassembleFragments=True):
        """The library Predictor for a bundle, device, fragment-reduction, visible-bone and reassembly setting
        (loaded once and reused)."""
        self._checkDevice(device)
        key = (str(bundlePath) if bundlePath else None, device, bool(reduceFragments), bool(keepVisibleBone),
               bool(reassembleFragments))
        if key not in self._predictors:
            from TibiaReconstructionLib.predict import Predictor  # imports torch: only when predicting

            self._predictors[key] = Predictor(key[0], device=device, reduce_fragments=key[2],
                                              keep_visible_bone=key[3], reassemble_fragments=key[4])
        return self._predictors[key]

    def runPrediction(self, inputs, bundlePath=None, device="auto", side="auto", progress=None, reduceFragments=True,
                      keepVisibleBone=True, reassembleFragments=True, useOtherLeg=True):
        """Run the library Predictor in this process on prepared inputs (no MRML access)."""
        return self.predictor(bundlePath, device, reduceFragments, keepVisibleBone, reassembleFragments).predict(
            inputs.ct, inputs.tibia, inputs.fracture, side=side, progress=progress,
            other_tibia="auto" if useOtherLeg else None)

    def predict(self, volumeNode, segmentationNode, tibiaSegmentId, fractureSegmentId, bundlePath=None,
                device="auto", progress=None, side="auto", segmentationName=DEFAULT_SEGMENTATION_NAME,
                modelName=DEFAULT_MODEL_NAME, intensityName=None, reduceFragments=True, keepVisibleBone=True,
                reassembleFragments=True, useOtherLeg=True):
        """Predict the healthy tibia and return (new segmentation node, new model node). Blocks until done.

        ``progress(fraction, message)`` is called during the prediction. With ``intensityName`` a volume
        node with the predicted intensities (HU) is created too. ``reduceFragments``: reduce displaced fragments
        onto the proximal main fragment before the final reconstruction (False: the paper's single pass).
        ``keepVisibleBone``: keep the patient's visible bone outside the fracture mask (False: the model everywhere).
        ``reassembleFragments``: put the main moved fragment where its broken face meets the proximal one's (False:
        where the reduction put it). ``useOtherLeg``: look for the other leg in the CT and use its tibia, mirrored and
        fitted to the proximal main fragment, as the template when it fits this patient's (when it is found but does
        not fit, the result's warnings say why; False: the fractured leg alone).
        """
        self._checkDevice(device)
        inputs = self.prepareInputs(volumeNode, segmentationNode, tibiaSegmentId, fractureSegmentId)
        result = self.runPrediction(inputs, bundlePath, device, side, progress, reduceFragments, keepVisibleBone,
                                    reassembleFragments, useOtherLeg)
        return self.createOutputNodes(result, volumeNode, segmentationName, modelName, intensityName)

    def startPrediction(self, volumeNode, segmentationNode, tibiaSegmentId, fractureSegmentId, bundlePath=None,
                        device="auto", side="auto", python=None, reduceFragments=True, keepVisibleBone=True,
                        reassembleFragments=True, useOtherLeg=True):
        """Read the inputs now and start the prediction in a background process; returns a running PredictionJob.

        Poll it (``job.poll()``) or wait for it (``job.wait()``), then call ``finishPrediction(job)``.
        """
        self._checkDevice(device)
        if bundlePath and not os.path.exists(str(bundlePath)):
            raise InputError(f"Model bundle not found: {bundlePath}. Leave the bundle empty to use the bundled model.")
        inputs = self.prepareInputs(volumeNode, segmentationNode, tibiaSegmentId, fractureSegmentId)
        return PredictionJob(inputs, bundlePath, device, side, python=python, reduceFragments=reduceFragments,
                             keepVisibleBone=keepVisibleBone, reassembleFragments=reassembleFragments,
                             useOtherLeg=useOtherLeg).start()

    def finishPrediction(self, job, segmentationName=DEFAULT_SEGMENTATION_NAME, modelName=DEFAULT_MODEL_NAME,
                         intensityName=None, cleanup=True):
        """Output nodes of a finished job (raises its error if it failed or was cancelled)."""
        try:
            result = job.result()
            return self.createOutputNodes(result, job.inputs.volumeNode, segmentationName, modelName, intensityName)
        finally:
            if cleanup:
                job.cleanup()

    def planReduction(self, volumeNode, segmentationNode, tibiaSegmentId, fractureSegmentId, predictionNode,
                      minFragmentMl=None, progress=None, modelName=None):
        """Fragment reduction plan onto the predicted healthy tibia: returns (library ReductionPlan, one NEW model
        node per reduced fragment coloured by its signed deviation from the prediction, mm).

        ``predictionNode``: the predicted tibia's segmentation node (e.g. from ``predict``; its first segment) or
        a labelmap volume node on the CT's grid. Matrices in the plan are LPS (``plan.report()``).
        """
        from TibiaReconstructionLib.reduction import DEFAULT_MIN_FRAGMENT_ML, plan_reduction

        from . import reduction

        inputs = self.prepareInputs(volumeNode, segmentationNode, tibiaSegmentId, fractureSegmentId)
        prediction = inputs.ct.with_array(reduction.predictionMask(self.scene, predictionNode, volumeNode))
        plan = plan_reduction(inputs.tibia, inputs.fracture, prediction,
                              DEFAULT_MIN_FRAGMENT_ML if minFragmentMl is None else minFragmentMl, progress=progress)
        return plan, reduction.createFragmentModels(self.scene, plan, volumeNode, modelName, REPORT_ATTRIBUTE)

    # -- library -> MRML ----------------------------------------------------------------------

    def createOutputNodes(self, result, volumeNode, segmentationName=DEFAULT_SEGMENTATION_NAME,
                          modelName=DEFAULT_MODEL_NAME, intensityName=None):
        """New segmentation node (CT geometry) and model node (RAS surface) from a prediction result."""
        ctGrid = mrml.volumeGrid(volumeNode)
        labelGrid = result.labelmap.grid
        if not labelGrid.same_as(ctGrid, tol_mm=1e-3):
            raise GeometryMismatchError("The predicted labelmap is not on the CT's voxel grid.\n  CT: "
                                        f"{ctGrid.describe()}\n  prediction: {labelGrid.describe()}")
        scene = self.scene
        parent = volumeNode.GetParentTransformNode()
        segmentationNode, segmentId = mrml.addSegmentationFromMask(
            scene, result.labelmap.array != 0, volumeNode, segmentationName or DEFAULT_SEGMENTATION_NAME,
            "Healthy tibia", PREDICTION_COLOR)
        display = segmentationNode.GetDisplayNode()
        display.SetOpacity2DFill(0.25)
        display.SetOpacity2DOutline(1.0)
        display.SetVisibility3D(False)  # the model node shows it in 3D
        modelNode = mrml.addModelFromPolyData(scene, result.surface, modelName or DEFAULT_MODEL_NAME,
                                              PREDICTION_COLOR, MODEL_OPACITY, parent)
        if result.surface.GetPointData().GetArray(UNCERTAINTY_ARRAY) is not None:
            self.showUncertainty(modelNode, False)
        if intensityName:
            mrml.addVolumeNode(scene, result.intensity, intensityName, parentTransformNode=parent)
        report = result.report() if callable(getattr(result, "report", None)) else {}
        report = dict(report, ct=volumeNode.GetName(), segmentation=segmentationNode.GetName())
        text = json.dumps(report, default=json_default)
        segmentationNode.SetAttribute(REPORT_ATTRIBUTE, text)
        modelNode.SetAttribute(REPORT_ATTRIBUTE, text)
        self.lastResult, self.lastReport = result, report
        return segmentationNode, modelNode

    def showUncertainty(self, modelNode, visible=True):
        """Colour the predicted surface by its per-point uncertainty (mm; white 0, red UNCERTAINTY_RANGE_MM and
        above) when ``visible``, else show its plain colour; the colour map is set up either way, so the Models
        module's scalar toggle shows it too."""
        display = modelNode.GetDisplayNode()
        if modelNode.GetPolyData().GetPointData().GetArray(UNCERTAINTY_ARRAY) is None:
            raise InputError(f"'{modelNode.GetName()}' has no per-point uncertainty; it is shown for predictions of "
                             "bundles whose autoencoder has a posterior (PCA).")
        if display.GetColorNode() is None or display.GetActiveScalarName() != UNCERTAINTY_ARRAY:
            colorNode = mrml.colorMapNode(self.scene, "Prediction uncertainty (mm)", UNCERTAINTY_RANGE_MM)
            display.SetActiveScalar(UNCERTAINTY_ARRAY, vtk.vtkAssignAttribute.POINT_DATA)
            display.SetAndObserveColorNodeID(colorNode.GetID())
            display.SetScalarRangeFlag(display.UseColorNodeScalarRange)
        display.SetScalarVisibility(bool(visible))

    # -- contralateral target -----------------------------------------------------------------

    def contralateral(self, volumeNode, segmentationNode, tibiaSegmentId, fractureSegmentId, otherTibiaSegmentId=None,
                      predictionSegmentationNode=None, segmentationName=contralateralNodes.DEFAULT_SEGMENTATION_NAME,
                      modelName=contralateralNodes.DEFAULT_MODEL_NAME):
        """The healthy other leg's tibia mirrored and fitted to the fractured tibia's intact proximal fragment,
        as (new segmentation node, new model node); needs both legs in the CT.

        ``otherTibiaSegmentId``: a segment of ``segmentationNode`` with the other tibia (default: segmented from
        the CT). ``predictionSegmentationNode`` (e.g. from ``predict``): its first segment is compared with the
        target (Dice, RMSD, HD95 in the report attribute) and the model is coloured by each vertex's signed
        distance to it (mm, positive outside the prediction). Raises InputError when the CT has no other leg.
        """
        from TibiaReconstructionLib.contralateral import contralateral_target

        inputs = self.prepareInputs(volumeNode, segmentationNode, tibiaSegmentId, fractureSegmentId)
        other = None
        if otherTibiaSegmentId:
            if otherTibiaSegmentId not in mrml.segmentNames(segmentationNode):
                raise InputError(f"Segmentation '{segmentationNode.GetName()}' has no segment with id "
                                 f"'{otherTibiaSegmentId}' (chosen as the other tibia).")
            other = inputs.ct.with_array(mrml.segmentMask(self.scene, segmentationNode, otherTibiaSegmentId,
                                                          volumeNode))
        prediction = None
        if predictionSegmentationNode is not None:
            segmentation = predictionSegmentationNode.GetSegmentation()
            if segmentation.GetNumberOfSegments() == 0:
                raise InputError(f"The prediction '{predictionSegmentationNode.GetName()}' has no segment to compare.")
            prediction = inputs.ct.with_array(mrml.segmentMask(
                self.scene, predictionSegmentationNode, segmentation.GetNthSegmentID(0), volumeNode))
        result = contralateral_target(inputs.ct, inputs.tibia, inputs.fracture, other, prediction)
        self.lastContralateral = result
        return contralateralNodes.createNodes(self.scene, result, volumeNode, segmentationName, modelName,
                                              REPORT_ATTRIBUTE)

    # -- mask editing -------------------------------------------------------------------------

    def prepareMaskSegmentation(self, volumeNode, segmentationNode=None):
        """Segmentation with a 'Tibia' and a 'Fracture' segment for editing (the Segment Editor shortcut).

        Creates a segmentation on the CT's geometry when none is given, and adds an EMPTY segment for a
        role that has none yet (this is the user's explicit request to edit masks). Existing segments are
        left as they are. Returns (segmentationNode, tibiaSegmentId, fractureSegmentId).
        """
        if volumeNode is None:
            raise InputError("Select the CT volume first; the masks are painted on it.")
        scene = self.scene
        if segmentationNode is None:
            segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                       scene.GenerateUniqueName(f"{volumeNode.GetName()} masks"))
            segmentationNode.CreateDefaultDisplayNodes()
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            parent = volumeNode.GetParentTransformNode()
            if parent is not None:
                segmentationNode.SetAndObserveTransformNodeID(parent.GetID())
        segmentation = segmentationNode.GetSegmentation()
        tibiaId = self.findTibiaSegment(segmentationNode)
        if tibiaId is None:
            tibiaId = segmentation.AddEmptySegment("", "Tibia", [0.95, 0.90, 0.75])
        fractureId = self.findFractureSegment(segmentationNode)
        if fractureId is None:
            fractureId = segmentation.AddEmptySegment("", "Fracture", [0.95, 0.25, 0.20])
        return segmentationNode, tibiaId, fractureId

    # -- export -------------------------------------------------------------------------------

    def exportStl(self, node, path, coordinateSystem="LPS", overwrite=False):
        """Write a model node's surface (or a segmentation's first segment) to STL in 'LPS' or 'RAS'.

        Points are written in the node's own frame (the CT's coordinates), converted to the named
        coordinate system by Slicer's model storage node, which also records it in the STL header.
        An existing file is never replaced unless ``overwrite=True`` (OutputExistsError otherwise).
        """
        from TibiaReconstructionLib.io import atomic_path

        frame = str(coordinateSystem).upper()
        if frame not in STL_FRAMES:
            raise InputError(f"Unknown coordinate system {coordinateSystem!r}; use 'LPS' (ITK, DICOM, most CAD and "
                             "printing tools) or 'RAS' (3D Slicer).")
        if node is None:
            raise InputError("No model to export; run Predict first or select a model.")
        path = str(path)
        if not path.lower().endswith(".stl"):
            raise InputError(f"The STL file name must end with .stl, got {path!r}.")
        if os.path.exists(path) and not overwrite:
            raise OutputExistsError(f"{path} already exists and was left untouched. Choose another file name or "
                                    "pass overwrite=True.")
        modelNode = node
        temporary = None
        if node.IsA("vtkMRMLSegmentationNode"):
            modelNode = temporary = self._segmentSurfaceModel(node)
        elif not node.IsA("vtkMRMLModelNode"):
            raise InputError(f"'{node.GetName()}' is a {node.GetClassName()}; select a model or segmentation to export.")
        polyData = modelNode.GetPolyData()
        if polyData is None or polyData.GetNumberOfPolys() == 0:
            raise InputError(f"'{node.GetName()}' has no surface triangles to export.")
        storage = slicer.vtkMRMLModelStorageNode()
        storage.SetCoordinateSystem(slicer.vtkMRMLStorageNode.CoordinateSystemLPS if frame == "LPS"
                                    else slicer.vtkMRMLStorageNode.CoordinateSystemRAS)
        try:
            with atomic_path(path, overwrite=overwrite) as tmp:
                storage.SetFileName(str(tmp))
                if not storage.WriteData(modelNode):
                    raise OSError(f"Writing {path} failed; check that the folder exists and is writable.")
        finally:
            if temporary is not None:
                # never added to a scene
                temporary.SetAndObservePolyData(None)
        return path

    @staticmethod
    def _segmentSurfaceModel(segmentationNode):
        segmentation = segmentationNode.GetSegmentation()
        if segmentation.GetNumberOfSegments() == 0:
            raise InputError(f"Segmentation '{segmentationNode.GetName()}' has no segment to export.")
        segmentId = segmentation.GetNthSegmentID(0)
        polyData = vtk.vtkPolyData()
        if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentClosedSurfaceRepresentation(
                segmentationNode, segmentId, polyData, False):
            raise InputError(f"Could not build a surface from segment '{segmentation.GetNthSegment(0).GetName()}'.")
        model = slicer.vtkMRMLModelNode()
        model.SetName(segmentationNode.GetName())
        model.SetAndObservePolyData(polyData)
        return model

    # -- dependencies -------------------------------------------------------------------------

    @staticmethod
    def missingPythonRequirements():
        """Requirement strings not installed in this Python (empty when ready to predict)."""
        return dependencies.missingRequirements()

    @staticmethod
    def setupPythonRequirements(confirm=None, install=None):
        """Install missing packages after ``confirm(message)`` returned True; see dependencies.setupPythonRequirements."""
        return dependencies.setupPythonRequirements(confirm=confirm, install=install)

    # -- sample data --------------------------------------------------------------------------

    @staticmethod
    def sampleCaseFolder():
        """The bundled sample case folder (installed extension or source checkout), or None."""
        here = os.path.dirname(os.path.abspath(__file__))
        moduleDir = os.path.dirname(here)
        for root in (moduleDir, os.path.dirname(moduleDir)):
            folder = os.path.join(root, "Resources", "SampleCase")
            if os.path.isfile(os.path.join(folder, "ct.nrrd")):
                return folder
        return None

    def loadSampleCase(self, folder=None):
        """Load the sample case: (CT volume node, segmentation node with 'Tibia' and 'Fracture', tibia id,
        fracture id, ground-truth library Volume or None). Works without the Slicer GUI.

        The folder holds ct.nrrd, tibia.nrrd and fracture.nrrd (masks on the CT grid) and optionally a
        ground-truth mask whose file name contains 'truth' or 'healthy'.
        """
        from TibiaReconstructionLib.io import read_mask, read_volume

        folder = folder or self.sampleCaseFolder()
        if folder is None or not os.path.isfile(os.path.join(folder, "ct.nrrd")):
            raise InputError("The sample case (Resources/SampleCase/ct.nrrd) is not available in this installation.")
        scene = self.scene
        ct = read_volume(os.path.join(folder, "ct.nrrd"))
        volumeNode = mrml.addVolumeNode(scene, ct, "Sample fractured CT")
        segmentationNode, tibiaId = mrml.addSegmentationFromMask(
            scene, read_mask(os.path.join(folder, "tibia.nrrd"), ct, "tibia mask").array, volumeNode,
            "Sample masks", "Tibia", (0.95, 0.90, 0.75))
        fracture = read_mask(os.path.join(folder, "fracture.nrrd"), ct, "fracture mask").array
        fractureId = segmentationNode.GetSegmentation().AddEmptySegment("", "Fracture", [0.95, 0.25, 0.20])
        mrml.setSegmentMask(segmentationNode, fractureId, fracture, volumeNode)
        truth = None
        for name in sorted(os.listdir(folder)):
            lowered = name.lower()
            if lowered.endswith(".nrrd") and ("truth" in lowered or "healthy" in lowered):
                truth = read_mask(os.path.join(folder, name), ct, "ground truth")
                break
        return volumeNode, segmentationNode, tibiaId, fractureId, truth
