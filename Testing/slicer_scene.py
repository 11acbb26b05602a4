"""A real MRML scene for headless tests of the module logic, built with the slicer-core wheel.

slicer-core gives the MRML scene, the nodes and the Segmentations/Volumes/Colors logic, but no
application: there is no ``slicer.mrmlScene`` or ``slicer.modules`` until they are set, and the
segmentation converter rules are registered only when a Segmentations logic gets the scene. This
helper does what Slicer's application does at start-up, nothing more.
"""

import os
import sys
import types

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_DIR = os.path.join(REPO, "TibiaReconstruction")
if MODULE_DIR not in sys.path:
    sys.path.insert(0, MODULE_DIR)  # as Slicer does for a scripted module's folder

from TibiaReconstructionLib.geometry import Grid  # noqa: E402


class SlicerScene:
    """A scene with application, colour, volumes and segmentations logic, installed as slicer.mrmlScene."""

    def __init__(self):
        self.scene = slicer.vtkMRMLScene()
        self.appLogic = slicer.vtkSlicerApplicationLogic()
        self.appLogic.SetMRMLScene(self.scene)
        self.colorLogic = slicer.vtkSlicerColorLogic()
        self.colorLogic.SetMRMLApplicationLogic(self.appLogic)
        warnings = vtk.vtkObject.GetGlobalWarningDisplay()
        vtk.vtkObject.GlobalWarningDisplayOff()  # the wheel has no colour files; built-in tables suffice
        try:
            self.colorLogic.SetMRMLScene(self.scene)
        finally:
            vtk.vtkObject.SetGlobalWarningDisplay(warnings)
        self.appLogic.SetColorLogic(self.colorLogic)
        self.volumesLogic = slicer.vtkSlicerVolumesLogic()
        self.volumesLogic.SetMRMLApplicationLogic(self.appLogic)
        self.volumesLogic.SetMRMLScene(self.scene)
        self.segmentationsLogic = slicer.vtkSlicerSegmentationsModuleLogic()  # registers converter rules
        self.segmentationsLogic.SetMRMLApplicationLogic(self.appLogic)
        self.segmentationsLogic.SetMRMLScene(self.scene)
        self._saved = {name: getattr(slicer, name, None) for name in ("mrmlScene", "modules")}
        slicer.mrmlScene = self.scene
        slicer.modules = types.SimpleNamespace(
            segmentations=types.SimpleNamespace(logic=lambda: self.segmentationsLogic),
            volumes=types.SimpleNamespace(logic=lambda: self.volumesLogic),
            colors=types.SimpleNamespace(logic=lambda: self.colorLogic))

    def close(self):
        self.scene.Clear(1)
        for name, value in self._saved.items():
            if value is None:
                if hasattr(slicer, name):
                    delattr(slicer, name)
            else:
                setattr(slicer, name, value)

    # -- fixtures -----------------------------------------------------------------------------

    def nodeNames(self):
        return sorted(self.scene.GetNthNode(i).GetName() or "" for i in range(self.scene.GetNumberOfNodes()))

    def nodesOfClass(self, className):
        nodes = self.scene.GetNodesByClass(className)
        return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]

    def addVolume(self, array, grid, name="CT", labelmap=False):
        """A volume node with ``array`` [k, j, i] on the LPS ``grid`` (IJKToRAS from Grid.ijk_to_ras)."""
        className = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
        node = self.scene.AddNewNodeByClass(className, name)
        image = vtk.vtkImageData()
        image.SetDimensions(*grid.size)
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array).reshape(-1), deep=True))
        node.SetAndObserveImageData(image)
        node.SetIJKToRASMatrix(_matrix(grid.ijk_to_ras))
        node.CreateDefaultDisplayNodes()
        return node

    def addSegmentation(self, referenceVolumeNode=None, name="Masks"):
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.CreateDefaultDisplayNodes()
        if referenceVolumeNode is not None:
            node.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
        return node

    def addSegment(self, segmentationNode, name, mask, grid, color=(1.0, 0.0, 0.0)):
        """A segment whose binary labelmap is ``mask`` [k, j, i] on the LPS ``grid`` (any geometry)."""
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", name, list(color))
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(*grid.size)
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(
            np.ascontiguousarray(np.asarray(mask) != 0, dtype=np.uint8).reshape(-1), deep=True,
            array_type=vtk.VTK_UNSIGNED_CHAR))
        image.SetImageToWorldMatrix(_matrix(grid.ijk_to_ras))
        ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            image, segmentationNode, segmentId, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE, image.GetExtent())
        assert ok, "could not set the segment's labelmap"
        return segmentId


def _matrix(array):
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r][c]))
    return m


def oblique_grid(size=(24, 20, 16), spacing=(0.9, 1.1, 2.5), origin=(-40.0, 25.0, 110.0), angles=(12.0, -18.0, 33.0)):
    """An LPS grid with anisotropic spacing and a rotated direction matrix."""
    from TibiaReconstructionLib.geometry import euler_rotation

    return Grid(size, np.asarray(spacing, float), np.asarray(origin, float), euler_rotation(angles)[:3, :3])


def ball_mask(grid, center_lps, radius_mm):
    """Mask [k, j, i] of the voxels of ``grid`` whose centres lie within ``radius_mm`` of an LPS point."""
    k, j, i = np.indices(grid.shape)
    points = grid.index_to_physical(np.stack([i, j, k], axis=-1).astype(float))
    return (np.linalg.norm(points - np.asarray(center_lps, float), axis=-1) <= radius_mm).astype(np.uint8)
