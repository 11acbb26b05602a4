"""MRML nodes <-> library objects. Qt-free: imports only slicer, vtk, numpy and TibiaReconstructionLib.

Frames: Slicer nodes store RAS; the library works in LPS. Every conversion goes through the
library's helpers (``ijk_to_lps_from_ras``, ``Grid.ijk_to_ras``, ``lps_to_ras``); no sign is flipped
here by hand.

Geometry is taken in each volume node's own coordinate frame (its IJKToRAS matrix, without any parent
transform). Everything the module creates for a CT is placed under that CT's parent transform, so it
overlays the CT exactly whatever transform the user has applied, and files exported from it are in the
CT's own (scanner) coordinates.
"""

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

from .libpath import ensureLibraryImportable

ensureLibraryImportable()

from TibiaReconstructionLib.errors import GeometryMismatchError, InputError  # noqa: E402
from TibiaReconstructionLib.geometry import Grid, Volume, ijk_to_lps_from_ras, lps_to_ras  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Matrices


def arrayFromMatrix(vmatrix):
    """vtkMatrix4x4 -> 4x4 numpy array (a copy)."""
    return np.array([[vmatrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def matrixFromArray(array):
    """4x4 numpy array -> new vtkMatrix4x4."""
    vmatrix = vtk.vtkMatrix4x4()
    a = np.asarray(array, dtype=float)
    for r in range(4):
        for c in range(4):
            vmatrix.SetElement(r, c, float(a[r, c]))
    return vmatrix


def ijkToRas(volumeNode):
    """The volume node's IJK -> RAS matrix (its own frame, parent transforms not applied)."""
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return arrayFromMatrix(m)


# ---------------------------------------------------------------------------------------------
# Volumes


def volumeGrid(volumeNode):
    """The library Grid (LPS) of a volume node, from its IJKToRAS matrix."""
    image = volumeNode.GetImageData() if volumeNode is not None else None
    if image is None:
        raise InputError(f"Volume '{volumeNode.GetName() if volumeNode else None}' has no voxel data; load a CT first.")
    ijkToLps = ijk_to_lps_from_ras(ijkToRas(volumeNode))
    linear = ijkToLps[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise InputError(f"Volume '{volumeNode.GetName()}' has a zero voxel spacing {spacing.tolist()}; its geometry is broken.")
    return Grid(tuple(int(n) for n in image.GetDimensions()), spacing, ijkToLps[:3, 3], linear / spacing)


def volumeFromNode(volumeNode):
    """A library Volume (LPS) with a copy of the node's voxels; the node is not modified."""
    grid = volumeGrid(volumeNode)
    image = volumeNode.GetImageData()
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(f"Volume '{volumeNode.GetName()}' has {image.GetNumberOfScalarComponents()} components per "
                         "voxel (colour or vector image); select the grey-value CT.")
    scalars = image.GetPointData().GetScalars()
    array = numpy_support.vtk_to_numpy(scalars).reshape(grid.shape).copy()
    return Volume.on_grid(array, grid)


def addVolumeNode(scene, volume, name, labelmap=False, parentTransformNode=None):
    """A new scalar (or labelmap) volume node holding a copy of ``volume`` with the same geometry."""
    className = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(className, scene.GenerateUniqueName(name))
    array = np.ascontiguousarray(volume.array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = vtk.vtkImageData()
    image.SetDimensions(*volume.grid.size)
    vtkArray = numpy_support.numpy_to_vtk(array.reshape(-1), deep=True)
    image.GetPointData().SetScalars(vtkArray)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(matrixFromArray(volume.grid.ijk_to_ras))
    node.CreateDefaultDisplayNodes()
    if parentTransformNode is not None:
        node.SetAndObserveTransformNodeID(parentTransformNode.GetID())
    return node


# ---------------------------------------------------------------------------------------------
# Segments


def segmentNames(segmentationNode):
    """{segment id: segment name} in display order."""
    segmentation = segmentationNode.GetSegmentation()
    return {segmentation.GetNthSegmentID(i): segmentation.GetNthSegment(i).GetName()
            for i in range(segmentation.GetNumberOfSegments())}


def _removeNode(scene, node):
    """Remove a node and its display and storage nodes from the scene."""
    if node is None or scene is None or node.GetScene() is not scene:
        return
    helpers = []
    if node.IsA("vtkMRMLDisplayableNode"):
        helpers += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if node.IsA("vtkMRMLStorableNode"):
        helpers += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and helper.GetScene() is scene:
            scene.RemoveNode(helper)


def segmentMask(scene, segmentationNode, segmentId, referenceVolumeNode):
    """Binary mask (uint8 0/1, array [k, j, i]) of one segment on the reference volume's voxel grid.

    Uses ``ExportSegmentsToLabelmapNode`` with the volume as reference geometry, so the segment is
    resampled (nearest neighbour) onto the CT grid and transforms between the segmentation and the
    volume are respected. The temporary labelmap and colour table nodes are removed again.
    """
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentId)
    labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__TibiaReconstructionTemp__")
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentationNode, ids, labelmapNode, referenceVolumeNode, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        if not ok or labelmapNode.GetImageData() is None:
            raise InputError(f"Segment '{segmentNames(segmentationNode).get(segmentId, segmentId)}' of "
                             f"'{segmentationNode.GetName()}' could not be converted to a labelmap on the geometry of "
                             f"'{referenceVolumeNode.GetName()}'.")
        image = labelmapNode.GetImageData()
        dims = image.GetDimensions()
        array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
        expected = referenceVolumeNode.GetImageData().GetDimensions()
        if tuple(dims) != tuple(expected):
            raise GeometryMismatchError(f"Exported segment has size {dims}, the CT {expected}.")
        return (array != 0).astype(np.uint8)
    finally:
        displayNode = labelmapNode.GetDisplayNode()
        colorNode = displayNode.GetColorNode() if displayNode is not None else None
        # Only the user-type table created for this export; never a shared default colour table
        if colorNode is not None and colorNode.GetType() == slicer.vtkMRMLColorTableNode.User:
            _removeNode(scene, colorNode)
        _removeNode(scene, labelmapNode)


def segmentVoxelsOutside(segmentationNode, segmentId, referenceVolumeNode, maxSamples=200000):
    """(voxels of the segment, of which outside the reference volume) counted in the segment's own labelmap.

    Voxel centres are mapped through the segmentation's and the volume's transforms into the volume's
    continuous IJK index; a voxel is outside when its centre lies more than half a voxel beyond the
    volume's extent. Large segments are sampled evenly (``maxSamples`` voxels).
    """
    image = slicer.vtkOrientedImageData()
    ok = slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentationNode, segmentId, image, False)
    if not ok or image.GetPointData().GetScalars() is None:
        return 0, 0
    extent = image.GetExtent()
    dims = (extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1)
    if min(dims) < 1:
        return 0, 0
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
    # Binary labelmaps may share one image between segments; a segment owns one label value
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    label = segment.GetLabelValue() if segment is not None else 1
    kji = np.argwhere(values == label)
    total = len(kji)
    if total == 0:
        return 0, 0
    if total > maxSamples:
        kji = kji[np.linspace(0, total - 1, maxSamples).astype(int)]
    ijk = kji[:, ::-1].astype(float) + np.array([extent[0], extent[2], extent[4]], dtype=float)
    imageToSeg = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(imageToSeg)
    pointsSeg = ijk @ arrayFromMatrix(imageToSeg)[:3, :3].T + arrayFromMatrix(imageToSeg)[:3, 3]
    segToVolume = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(
        segmentationNode.GetParentTransformNode(), referenceVolumeNode.GetParentTransformNode(), segToVolume)
    inPoints = vtk.vtkPoints()
    inPoints.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(pointsSeg), deep=True))
    outPoints = vtk.vtkPoints()
    segToVolume.TransformPoints(inPoints, outPoints)
    pointsVolume = numpy_support.vtk_to_numpy(outPoints.GetData()).astype(float)
    rasToIjk = np.linalg.inv(ijkToRas(referenceVolumeNode))
    volumeIjk = pointsVolume @ rasToIjk[:3, :3].T + rasToIjk[:3, 3]
    size = np.array(referenceVolumeNode.GetImageData().GetDimensions(), dtype=float)
    outside = np.any((volumeIjk < -0.5 - 1e-6) | (volumeIjk > size - 0.5 + 1e-6), axis=1)
    fraction = float(outside.mean())
    return total, int(round(fraction * total))


def addSegmentationFromMask(scene, mask, referenceVolumeNode, name, segmentName, color=(0.1, 0.8, 0.95)):
    """A NEW segmentation node with one segment from ``mask`` (array [k, j, i] on the reference volume's grid).

    The segmentation's reference geometry and the segment's binary labelmap both take the reference
    volume's IJKToRAS, so the new segmentation has exactly the CT's geometry; it is placed under the
    CT's parent transform.
    """
    mask = np.asarray(mask)
    dims = referenceVolumeNode.GetImageData().GetDimensions()
    if mask.shape != tuple(dims[::-1]):
        raise GeometryMismatchError(f"The mask has shape {mask.shape} (k, j, i) but the CT '{referenceVolumeNode.GetName()}' "
                                    f"has {tuple(dims[::-1])}.")
    segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
    segmentationNode.CreateDefaultDisplayNodes()
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
    parent = referenceVolumeNode.GetParentTransformNode()
    if parent is not None:
        segmentationNode.SetAndObserveTransformNodeID(parent.GetID())
    segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", segmentName, list(color))
    try:
        setSegmentMask(segmentationNode, segmentId, mask, referenceVolumeNode)
    except Exception:
        scene.RemoveNode(segmentationNode)
        raise
    return segmentationNode, segmentId


def setSegmentMask(segmentationNode, segmentId, mask, referenceVolumeNode):
    """Replace a segment's binary labelmap by ``mask`` (array [k, j, i] on the reference volume's grid)."""
    dims = referenceVolumeNode.GetImageData().GetDimensions()
    mask = np.asarray(mask)
    if mask.shape != tuple(dims[::-1]):
        raise GeometryMismatchError(f"The mask has shape {mask.shape} (k, j, i) but the volume "
                                    f"'{referenceVolumeNode.GetName()}' has {tuple(dims[::-1])}.")
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*dims)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(
        np.ascontiguousarray((mask != 0).astype(np.uint8)).reshape(-1), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    image.SetImageToWorldMatrix(matrixFromArray(ijkToRas(referenceVolumeNode)))
    ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, segmentationNode, segmentId, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE, image.GetExtent())
    if not ok:
        raise RuntimeError(f"Could not store the mask in segment '{segmentId}' of '{segmentationNode.GetName()}'.")


# ---------------------------------------------------------------------------------------------
# Surfaces


def polyDataPoints(polyData):
    """Points of a polydata as an (n, 3) float64 array (a copy)."""
    if polyData is None or polyData.GetPoints() is None:
        return np.zeros((0, 3))
    return numpy_support.vtk_to_numpy(polyData.GetPoints().GetData()).astype(float)


def polyDataLpsToRas(polyDataLps):
    """A copy of an LPS polydata with points (and normals) in RAS.

    LPS -> RAS negates two axes, a rotation by 180 degrees: triangle orientation is unchanged.
    """
    out = vtk.vtkPolyData()
    out.DeepCopy(polyDataLps)
    points = vtk.vtkPoints()
    points.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(lps_to_ras(polyDataPoints(polyDataLps))), deep=True))
    out.SetPoints(points)
    for data in (out.GetPointData(), out.GetCellData()):
        normals = data.GetNormals()
        if normals is not None:
            rasNormals = numpy_support.numpy_to_vtk(
                np.ascontiguousarray(lps_to_ras(numpy_support.vtk_to_numpy(normals).astype(float))), deep=True)
            rasNormals.SetName(normals.GetName() or "Normals")
            data.SetNormals(rasNormals)
    return out


WHITE_TO_RED = ((0.0, (1.0, 1.0, 1.0)), (0.5, (1.0, 0.6, 0.1)), (1.0, (0.85, 0.1, 0.1)))  # values >= 0
BLUE_WHITE_RED = ((-1.0, (0.15, 0.35, 0.95)), (0.0, (1.0, 1.0, 1.0)), (1.0, (0.95, 0.2, 0.15)))  # signed values


def colorMapNode(scene, name, maxValue, stops=WHITE_TO_RED):
    """A NEW procedural colour node; ``stops``: (position in units of ``maxValue``, RGB) pairs."""
    node = scene.AddNewNodeByClass("vtkMRMLProceduralColorNode", scene.GenerateUniqueName(name))
    function = vtk.vtkColorTransferFunction()
    for position, rgb in stops:
        function.AddRGBPoint(position * maxValue, *rgb)
    node.SetAndObserveColorTransferFunction(function)
    return node


def addModelFromPolyData(scene, polyDataLps, name, color=(0.1, 0.8, 0.95), opacity=0.6, parentTransformNode=None):
    """A NEW model node with the LPS surface converted to RAS, shown in 3D and as outline in slice views."""
    modelNode = scene.AddNewNodeByClass("vtkMRMLModelNode", scene.GenerateUniqueName(name))
    modelNode.SetAndObservePolyData(polyDataLpsToRas(polyDataLps))
    modelNode.CreateDefaultDisplayNodes()
    display = modelNode.GetDisplayNode()
    display.SetColor(*color)
    display.SetOpacity(opacity)
    display.SetScalarVisibility(False)
    display.SetVisibility(True)
    display.SetVisibility2D(True)
    display.SetSliceIntersectionThickness(2)
    display.SetSliceIntersectionOpacity(1.0)
    if parentTransformNode is not None:
        modelNode.SetAndObserveTransformNodeID(parentTransformNode.GetID())
    return modelNode
