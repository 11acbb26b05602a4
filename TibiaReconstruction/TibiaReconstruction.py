"""TibiaReconstruction: predict a patient's healthy tibia from a CT of the fractured tibia (3D Slicer module).

This file holds the Module, its parameter node, the Widget and the self-test. All computation lives in
the Qt-free package ``TibiaReconstructionLogic`` next to this file (testable without the Slicer GUI),
which calls the headless library ``TibiaReconstructionLib``.
"""

import json
import logging
import os
import sys
import tempfile
import time
from typing import Annotated

import numpy as np
import qt
import vtk

import slicer
from slicer import vtkMRMLModelNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # Slicer adds it; a bare script may not
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))

import TibiaReconstructionLogic as logicPackage  # noqa: E402

#
# TibiaReconstruction
#


class TibiaReconstruction(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Tibia Reconstruction")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Surgical Planning")]
        self.parent.dependencies = ["Segmentations", "SegmentEditor"]
        self.parent.contributors = ["TibiaReconstruction contributors"]
        self.parent.helpText = _("""
Predicts the patient's healthy (unfractured) tibia from a CT of the fractured tibia, for surgical planning
and 3D printing.
<ol>
<li>Load the fractured CT and select it as <b>Input CT</b>.</li>
<li>Select a segmentation with a <b>tibia</b> segment (all fragments) and a coarse <b>fracture</b> segment.
Press <b>Edit masks in Segment Editor</b> to create or correct them: paint the fracture zone (all fracture
lines and gaps) with Paint or Draw.</li>
<li>Press <b>Predict</b>. The prediction runs in the background (Cancel stops it). The result is a new
segmentation on the CT's grid and a surface model, both shown over the CT in 2D and 3D. By default displaced
fragments are first moved back onto the knee fragment (<b>Fragment reduction</b>), and the prediction keeps the
patient's own bone where the CT shows it outside the fracture mask (<b>Patient's bone</b>); the model fills the
fracture zone.</li>
<li>Press <b>Export STL</b> to save the surface (LPS for most printing/CAD tools, RAS for Slicer).</li>
</ol>
Console: <code>from TibiaReconstructionLogic import TibiaReconstructionLogic;
seg, model = TibiaReconstructionLogic().predict(volumeNode, segmentationNode, tibiaId, fractureId)</code>.
Research software: not a medical device; check every prediction against the images.
""")
        self.parent.acknowledgementText = _("""
Implements the method of Zhou et al., "Masked Registration and Autoencoding of CT Images for Predictive Tibia
Reconstruction", arXiv:2512.09525 (2025): a mask-robust localisation network aligns the fractured tibia to a
learned prototype and an autoencoder predicts the healthy bone in standard coordinates.
""")


#
# Parameter node
#


@parameterNodeWrapper
class TibiaReconstructionParameterNode:
    """Everything the user chooses; saved with the scene.

    inputVolume - the fractured CT.
    segmentation - the segmentation holding the tibia and fracture masks.
    tibiaSegmentId, fractureSegmentId - segment IDs in ``segmentation``.
    bundlePath - model bundle folder; empty for the bundled model.
    device - 'auto' (GPU when available), 'cpu' or 'cuda'.
    reduceFragments - reduce displaced fragments onto the proximal main fragment before the final reconstruction.
    keepVisibleBone - keep the patient's visible bone outside the fracture mask in the prediction (needs the reduction).
    reassembleFragments - put the main moved fragment where its broken face meets the proximal one's (with the
        visible bone).
    useOtherLeg - look for the other leg in the CT and, when its tibia fits this patient's, use it, mirrored and
        fitted to the proximal main fragment, as the template (with the visible bone; on by default).
    outputSegmentationName, outputModelName - names of the new result nodes.
    createIntensityVolume - also create a volume with the predicted intensities (HU).
    stlCoordinateSystem - frame of exported STL files.
    outputSegmentation, outputModel - the latest result.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    tibiaSegmentId: str = ""
    fractureSegmentId: str = ""
    bundlePath: str = ""
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    reduceFragments: bool = True
    keepVisibleBone: bool = True
    reassembleFragments: bool = True
    useOtherLeg: bool = True
    outputSegmentationName: str = logicPackage.DEFAULT_SEGMENTATION_NAME
    outputModelName: str = logicPackage.DEFAULT_MODEL_NAME
    createIntensityVolume: bool = False
    stlCoordinateSystem: Annotated[str, Choice(["LPS", "RAS"])] = "LPS"
    outputSegmentation: vtkMRMLSegmentationNode
    outputModel: vtkMRMLModelNode


#
# Logic: the Qt-free logic plus Slicer's parameter-node handling
#


class TibiaReconstructionLogic(ScriptedLoadableModuleLogic, logicPackage.TibiaReconstructionLogic):
    """See TibiaReconstructionLogic/logic.py; this subclass only adds the module's parameter node."""

    def __init__(self, scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        logicPackage.TibiaReconstructionLogic.__init__(self, scene)

    def getParameterNode(self):
        return TibiaReconstructionParameterNode(super().getParameterNode())


#
# Widget
#


class TibiaReconstructionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the GUI to the parameter node and calls the Logic; computes nothing itself."""

    POLL_INTERVAL_MS = 200

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._updatingGui = False
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._onTimer)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TibiaReconstruction.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = TibiaReconstructionLogic()

        self.ui.progressBar.hide()
        self.ui.cancelButton.enabled = False
        self.ui.loadSampleCaseButton.visible = self.logic.sampleCaseFolder() is not None

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Widgets without a parameter-node connector are wired here
        self.ui.tibiaSegmentSelector.connect("currentSegmentChanged(QString)", self._onTibiaSegmentChanged)
        self.ui.fractureSegmentSelector.connect("currentSegmentChanged(QString)", self._onFractureSegmentChanged)
        self.ui.bundlePathLineEdit.connect("currentPathChanged(QString)", self._onBundlePathChanged)

        self.ui.editMasksButton.connect("clicked(bool)", self.onEditMasksButton)
        self.ui.predictButton.connect("clicked(bool)", self.onPredictButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.exportStlButton.connect("clicked(bool)", self.onExportStlButton)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependenciesButton)
        self.ui.loadSampleCaseButton.connect("clicked(bool)", self.onLoadSampleCaseButton)

        self.initializeParameterNode()

    def cleanup(self):
        self._cancelJob()
        self._timer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        self._cancelJob()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onReload(self):
        """Developer reload: also re-import the logic package so edits to it take effect."""
        self._cancelJob()
        for name in list(sys.modules):
            if name == "TibiaReconstructionLogic" or name.startswith("TibiaReconstructionLogic."):
                del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    # -- parameter node ------------------------------------------------------------------------

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        pn = self._parameterNode
        if not pn.inputVolume:
            volumes = [v for v in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                       if not v.IsA("vtkMRMLLabelMapVolumeNode")]
            if volumes:
                pn.inputVolume = volumes[0]
        if not pn.segmentation:
            candidates = [s for s in slicer.util.getNodesByClass("vtkMRMLSegmentationNode")
                          if s.GetAttribute(logicPackage.REPORT_ATTRIBUTE) is None]
            if candidates:
                pn.segmentation = candidates[0]

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None):
        pn = self._parameterNode
        if pn is None or self._updatingGui:
            self._updateButtons()
            return
        self._updatingGui = True
        try:
            segmentation = pn.segmentation
            # Pick the segments by name when the chosen ones are not in the selected segmentation
            if segmentation is not None:
                ids = segmentation.GetSegmentation().GetSegmentIDs()
                if pn.tibiaSegmentId not in ids:
                    pn.tibiaSegmentId = self.logic.findTibiaSegment(segmentation) or ""
                if pn.fractureSegmentId not in ids:
                    pn.fractureSegmentId = self.logic.findFractureSegment(segmentation) or ""
            for selector, segmentId in ((self.ui.tibiaSegmentSelector, pn.tibiaSegmentId),
                                        (self.ui.fractureSegmentSelector, pn.fractureSegmentId)):
                wasBlocked = selector.blockSignals(True)
                selector.setCurrentNode(segmentation)
                selector.setCurrentSegmentID(segmentId)
                selector.blockSignals(wasBlocked)
            if self.ui.bundlePathLineEdit.currentPath != pn.bundlePath:
                wasBlocked = self.ui.bundlePathLineEdit.blockSignals(True)
                self.ui.bundlePathLineEdit.currentPath = pn.bundlePath
                self.ui.bundlePathLineEdit.blockSignals(wasBlocked)
        finally:
            self._updatingGui = False
        self._updateButtons()

    def _onTibiaSegmentChanged(self, segmentId):
        if self._parameterNode and not self._updatingGui:
            self._parameterNode.tibiaSegmentId = segmentId or ""

    def _onFractureSegmentChanged(self, segmentId):
        if self._parameterNode and not self._updatingGui:
            self._parameterNode.fractureSegmentId = segmentId or ""

    def _onBundlePathChanged(self, path):
        if self._parameterNode and not self._updatingGui:
            self._parameterNode.bundlePath = path or ""

    def _updateButtons(self):
        pn = self._parameterNode
        running = self._job is not None
        if pn is None:
            problem = _("No parameter node.")
        else:
            problem = self.logic.inputProblem(pn.inputVolume, pn.segmentation, pn.tibiaSegmentId, pn.fractureSegmentId)
        self.ui.predictButton.enabled = not problem and not running
        self.ui.predictButton.toolTip = problem or _("Predict the healthy tibia (runs in the background).")
        self.ui.cancelButton.enabled = running
        self.ui.editMasksButton.enabled = pn is not None and pn.inputVolume is not None and not running
        hasModel = pn is not None and pn.outputModel is not None
        self.ui.exportStlButton.enabled = hasModel
        self.ui.exportStlButton.toolTip = (_("Save the predicted surface as STL.") if hasModel
                                           else _("Run Predict first, or select a model."))
        if not running and problem and pn is not None:
            self.ui.statusLabel.text = problem

    # -- actions -----------------------------------------------------------------------------

    def onEditMasksButton(self):
        pn = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not open the masks in the Segment Editor."), waitCursor=True):
            segmentation, tibiaId, fractureId = self.logic.prepareMaskSegmentation(pn.inputVolume, pn.segmentation)
            pn.segmentation = segmentation
            pn.tibiaSegmentId = tibiaId
            pn.fractureSegmentId = fractureId
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            editor.setSegmentationNode(segmentation)
            if hasattr(editor, "setSourceVolumeNode"):
                editor.setSourceVolumeNode(pn.inputVolume)
            else:  # Slicer before 5.4
                editor.setMasterVolumeNode(pn.inputVolume)
            editor.setCurrentSegmentID(fractureId)
            editor.setActiveEffectByName("Paint")

    def _confirmInstall(self, message):
        return slicer.util.confirmOkCancelDisplay(message, windowTitle=_("Tibia Reconstruction - Python packages"))

    def onInstallDependenciesButton(self):
        with slicer.util.tryWithErrorDisplay(_("Python packages could not be installed."), waitCursor=True):
            installed = self.logic.setupPythonRequirements(confirm=self._confirmInstall)
            self.ui.statusLabel.text = (_("Installed: {packages}.").format(packages=", ".join(installed)) if installed
                                        else _("All required Python packages are installed."))

    def onPredictButton(self):
        pn = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Prediction could not start."), waitCursor=True):
            self.logic.setupPythonRequirements(confirm=self._confirmInstall)
            self.ui.statusLabel.text = _("Reading the CT and the masks...")
            slicer.app.processEvents()
            self._job = self.logic.startPrediction(pn.inputVolume, pn.segmentation, pn.tibiaSegmentId,
                                                   pn.fractureSegmentId, bundlePath=pn.bundlePath or None,
                                                   device=pn.device, reduceFragments=pn.reduceFragments,
                                                   keepVisibleBone=pn.keepVisibleBone,
                                                   reassembleFragments=pn.reassembleFragments,
                                                   useOtherLeg=pn.useOtherLeg)
            self.ui.progressBar.setValue(0)
            self.ui.progressBar.show()
            self.ui.statusLabel.text = _("Starting the prediction...")
            self._timer.start()
        self._updateButtons()

    def onCancelButton(self):
        self._cancelJob()
        self.ui.statusLabel.text = _("Prediction cancelled.")
        self.ui.progressBar.hide()
        self._updateButtons()

    def _cancelJob(self):
        job, self._job = self._job, None
        self._timer.stop()
        if job is not None:
            job.cancel()
            job.cleanup()

    def _onTimer(self):
        job = self._job
        if job is None:
            self._timer.stop()
            return
        updates = job.poll()
        if updates:
            fraction, message = updates[-1]
            self.ui.progressBar.setValue(int(round(100 * fraction)))
            self.ui.statusLabel.text = message
        if not job.finished:
            return
        self._timer.stop()
        self._job = None
        self.ui.progressBar.hide()
        pn = self._parameterNode
        if job.state == "succeeded":
            with slicer.util.tryWithErrorDisplay(_("The prediction result could not be shown."), waitCursor=True):
                segmentation, model = self.logic.finishPrediction(
                    job, pn.outputSegmentationName, pn.outputModelName,
                    intensityName=logicPackage.DEFAULT_INTENSITY_NAME if pn.createIntensityVolume else None)
                pn.outputSegmentation = segmentation
                pn.outputModel = model
                self._showResult(job.inputs.volumeNode)
                report = self.logic.lastReport or {}
                warnings = report.get("warnings") or []
                otherLeg = (report.get("visible_bone") or {}).get("other_leg") or {}
                self.ui.statusLabel.text = _("Done in {seconds:.0f} s.").format(seconds=job.elapsed) + (
                    " " + _("The other leg's tibia was the template.") if otherLeg.get("used") else "") + (
                    " " + " ".join(warnings) if warnings else "")
        elif job.state == "failed":
            log = job.log()
            job.cleanup()
            self.ui.statusLabel.text = _("Prediction failed.")
            details = {"detailedText": log} if log else {}
            slicer.util.errorDisplay(str(job.error), windowTitle=_("Tibia Reconstruction"), **details)
        else:
            job.cleanup()
        self._updateButtons()

    def _showResult(self, volumeNode):
        slicer.util.setSliceViewerLayers(background=volumeNode, fit=False)
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None and layoutManager.threeDViewCount > 0:
            layoutManager.threeDWidget(0).threeDView().resetFocalPoint()

    def onExportStlButton(self):
        pn = self._parameterNode
        model = pn.outputModel
        frame = pn.stlCoordinateSystem
        dialog = qt.QFileDialog(slicer.util.mainWindow(), _("Export predicted tibia as STL"))
        dialog.setAcceptMode(qt.QFileDialog.AcceptSave)
        dialog.setNameFilter(_("STL files (*.stl)"))
        dialog.setDefaultSuffix("stl")
        dialog.setOption(qt.QFileDialog.DontConfirmOverwrite, True)
        dialog.selectFile(os.path.join(slicer.app.defaultScenePath, f"{model.GetName()}_{frame}.stl"))
        if not dialog.exec_():
            return
        path = dialog.selectedFiles()[0]
        overwrite = False
        if os.path.exists(path):
            if not slicer.util.confirmYesNoDisplay(_("{path} already exists. Replace it?").format(path=path)):
                return
            overwrite = True
        with slicer.util.tryWithErrorDisplay(_("STL export failed."), waitCursor=True):
            self.logic.exportStl(model, path, coordinateSystem=frame, overwrite=overwrite)
            self.ui.statusLabel.text = _("Saved {path} ({frame} coordinates).").format(path=path, frame=frame)

    def onLoadSampleCaseButton(self):
        with slicer.util.tryWithErrorDisplay(_("The sample case could not be loaded."), waitCursor=True):
            volume, segmentation, tibiaId, fractureId, _truth = self.logic.loadSampleCase()
            pn = self._parameterNode
            pn.inputVolume = volume
            pn.segmentation = segmentation
            pn.tibiaSegmentId = tibiaId
            pn.fractureSegmentId = fractureId
            slicer.util.setSliceViewerLayers(background=volume, fit=True)


#
# Self-test
#


def _arrayHash(array):
    import hashlib

    array = np.ascontiguousarray(array)
    return hashlib.sha256(array.tobytes() + str(array.shape).encode() + str(array.dtype).encode()).hexdigest()


class TibiaReconstructionTest(ScriptedLoadableModuleTest):
    """Runs the module on the bundled sample case (Resources/SampleCase)."""

    MIN_SAMPLE_DICE = 0.5

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SampleCasePrediction()
        self.setUp()
        self.test_BackgroundPredictionMatchesAndCancels()
        self.setUp()
        self.test_ClearErrors()

    def _sampleCase(self, logic):
        if logic.sampleCaseFolder() is None:
            self.skipTest("Resources/SampleCase is not available in this installation")
        return logic.loadSampleCase()

    def _inputHashes(self, volume, segmentation):
        hashes = {"ct": _arrayHash(slicer.util.arrayFromVolume(volume)),
                  "ijkToRas": _arrayHash(logicPackage.mrml.ijkToRas(volume))}
        for segmentId in segmentation.GetSegmentation().GetSegmentIDs():
            hashes[segmentId] = _arrayHash(slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume))
        return hashes

    def test_SampleCasePrediction(self):
        from TibiaReconstructionLib.geometry import lps_to_ras

        self.delayDisplay("Loading the sample case")
        logic = TibiaReconstructionLogic()
        volume, segmentation, tibiaId, fractureId, truth = self._sampleCase(logic)
        before = self._inputHashes(volume, segmentation)
        segmentsBefore = list(segmentation.GetSegmentation().GetSegmentIDs())

        self.delayDisplay("Predicting (in this process)")
        progress = []
        outSegmentation, model = logic.predict(volume, segmentation, tibiaId, fractureId,
                                               progress=lambda f, m: progress.append(f))
        result = logic.lastResult
        self.assertTrue(progress and progress[-1] == 1.0)

        # inputs unchanged, no segment added to the user's segmentation
        self.assertEqual(self._inputHashes(volume, segmentation), before)
        self.assertEqual(list(segmentation.GetSegmentation().GetSegmentIDs()), segmentsBefore)

        # new segmentation: the CT's geometry, the Predictor's labelmap
        segmentId = outSegmentation.GetSegmentation().GetNthSegmentID(0)
        image = slicer.vtkOrientedImageData()
        slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(outSegmentation, segmentId, image, False)
        imageToWorld = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(imageToWorld)
        np.testing.assert_allclose(logicPackage.mrml.arrayFromMatrix(imageToWorld), logicPackage.mrml.ijkToRas(volume),
                                   atol=1e-6)
        predicted = slicer.util.arrayFromSegmentBinaryLabelmap(outSegmentation, segmentId, volume)
        np.testing.assert_array_equal(predicted != 0, result.labelmap.array != 0)
        self.assertGreater(int(predicted.sum()), 0)

        # model points = the Predictor's surface, in RAS
        modelPoints = logicPackage.mrml.polyDataPoints(model.GetPolyData())
        np.testing.assert_allclose(modelPoints, lps_to_ras(logicPackage.mrml.polyDataPoints(result.surface)), atol=1e-4)

        if truth is not None:
            a, b = predicted != 0, truth.array != 0
            dice = 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())
            logging.info(f"Sample case Dice against the ground truth: {dice:.3f}")
            self.assertGreater(dice, self.MIN_SAMPLE_DICE)

        self.delayDisplay("Exporting STL in LPS and RAS")
        folder = tempfile.mkdtemp(prefix="TibiaReconstructionTest-")
        for frame, expected in (("LPS", logicPackage.mrml.polyDataPoints(result.surface)), ("RAS", modelPoints)):
            path = logic.exportStl(model, os.path.join(folder, f"tibia_{frame}.stl"), coordinateSystem=frame)
            reader = vtk.vtkSTLReader()
            reader.SetFileName(path)
            reader.Update()
            written = logicPackage.mrml.polyDataPoints(reader.GetOutput())
            np.testing.assert_allclose(written.mean(axis=0), expected.mean(axis=0), atol=1e-2)
            np.testing.assert_allclose(written.min(axis=0), expected.min(axis=0), atol=1e-3)
            with self.assertRaises(FileExistsError):
                logic.exportStl(model, path, coordinateSystem=frame)
        self.assertTrue(json.loads(outSegmentation.GetAttribute(logicPackage.REPORT_ATTRIBUTE)))
        self.delayDisplay("Sample case prediction passed")

    def test_BackgroundPredictionMatchesAndCancels(self):
        self.delayDisplay("Background prediction")
        logic = TibiaReconstructionLogic()
        volume, segmentation, tibiaId, fractureId, _truth = self._sampleCase(logic)
        direct = logic.runPrediction(logic.prepareInputs(volume, segmentation, tibiaId, fractureId))
        job = logic.startPrediction(volume, segmentation, tibiaId, fractureId)
        while not job.finished:
            job.poll()
            slicer.app.processEvents()  # the GUI stays responsive while the worker runs
            time.sleep(0.05)
        self.assertEqual(job.state, "succeeded", str(job.error))
        outSegmentation, _model = logic.finishPrediction(job)
        segmentId = outSegmentation.GetSegmentation().GetNthSegmentID(0)
        background = slicer.util.arrayFromSegmentBinaryLabelmap(outSegmentation, segmentId, volume)
        np.testing.assert_array_equal(background != 0, direct.labelmap.array != 0)

        self.delayDisplay("Cancel")
        job = logic.startPrediction(volume, segmentation, tibiaId, fractureId)
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        job.cancel()
        self.assertEqual(job.state, "cancelled")
        self.assertFalse(job.isProcessRunning())
        job.cleanup()
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Background prediction passed")

    def test_ClearErrors(self):
        from TibiaReconstructionLib.errors import InputError

        logic = TibiaReconstructionLogic()
        volume, segmentation, tibiaId, fractureId, _truth = self._sampleCase(logic)
        with self.assertRaises(InputError):
            logic.predict(None, segmentation, tibiaId, fractureId)
        with self.assertRaises(InputError):
            logic.predict(volume, segmentation, tibiaId, "no-such-segment")
        emptyId = segmentation.GetSegmentation().AddEmptySegment("", "Empty fracture")
        with self.assertRaisesRegex(InputError, "empty"):
            logic.predict(volume, segmentation, tibiaId, emptyId)
        self.delayDisplay("Clear errors passed")
