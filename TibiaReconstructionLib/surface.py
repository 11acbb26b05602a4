"""Surfaces with VTK: iso-surfaces of volumes in LPS, affine moves, smoothing, decimation, STL.

Every vtkPolyData returned here has its points in LPS mm unless a function says otherwise; STL
files are written in the frame the caller names and record it as ``SPACE=LPS`` / ``SPACE=RAS`` at the
start of the STL header, which 3D Slicer honours when it loads the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import vtkPoints
from vtkmodules.vtkCommonDataModel import vtkImageData, vtkPolyData
from vtkmodules.vtkFiltersCore import (vtkDecimatePro, vtkFlyingEdges3D, vtkPolyDataNormals, vtkReverseSense,
                                       vtkTriangleFilter, vtkWindowedSincPolyDataFilter)
from vtkmodules.vtkIOGeometry import vtkSTLReader, vtkSTLWriter
from vtkmodules.vtkIOXML import vtkXMLPolyDataWriter

from .errors import InputError, OutputError
from .geometry import Grid, Volume, apply_affine, lps_to_ras
from .io import atomic_path

STL_FRAMES = ("LPS", "RAS")
UNCERTAINTY_ARRAY = "UncertaintyMm"  # point data of a predicted surface: std of the surface position (mm)


def polydata_points(polydata: vtkPolyData) -> np.ndarray:
    """The points of a polydata as an (n, 3) float64 array (a copy)."""
    if polydata.GetPoints() is None:
        return np.zeros((0, 3))
    return numpy_support.vtk_to_numpy(polydata.GetPoints().GetData()).astype(float)


def add_point_array(polydata: vtkPolyData, name: str, values: np.ndarray, active: bool = True,
                    dtype=np.float32) -> None:
    """Attach one value per point (as ``dtype``) as the point-data array ``name``; ``active`` makes it the scalars
    that viewers colour by."""
    values = np.ascontiguousarray(values, dtype=dtype)
    if values.shape != (polydata.GetNumberOfPoints(),):
        raise InputError(f"'{name}' needs one value per surface point ({polydata.GetNumberOfPoints()}), got "
                         f"shape {values.shape}.")
    array = numpy_support.numpy_to_vtk(values, deep=True)
    array.SetName(name)
    polydata.GetPointData().AddArray(array)
    if active:
        polydata.GetPointData().SetActiveScalars(name)


def point_array(polydata: vtkPolyData, name: str) -> np.ndarray:
    """The point-data array ``name`` as numpy (a copy)."""
    array = polydata.GetPointData().GetArray(name)
    if array is None:
        raise InputError(f"The surface has no point array {name!r}.")
    return numpy_support.vtk_to_numpy(array).copy()


def _set_points(polydata: vtkPolyData, points: np.ndarray) -> vtkPolyData:
    out = vtkPolyData()
    out.DeepCopy(polydata)
    vpts = vtkPoints()
    vpts.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(points, dtype=np.float64), deep=True))
    out.SetPoints(vpts)
    return out


def transform_polydata(polydata: vtkPolyData, matrix: np.ndarray) -> vtkPolyData:
    """A copy with points moved by the 4x4 affine; triangles are re-oriented if it reflects space."""
    out = _set_points(polydata, apply_affine(matrix, polydata_points(polydata)))
    if np.linalg.det(matrix[:3, :3]) < 0:
        rev = vtkReverseSense()
        rev.SetInputData(out)
        rev.Update()
        out = rev.GetOutput()
    return out


def isosurface(array: np.ndarray, grid: Grid, level: float) -> vtkPolyData:
    """Flying-edges iso-surface of ``array`` (k, j, i) on ``grid`` at ``level``, points in LPS mm."""
    if array.shape != grid.shape:
        raise InputError(f"Array shape {array.shape} does not match the grid {grid.shape}.")
    image = vtkImageData()
    image.SetDimensions(*grid.size)
    image.SetSpacing(1.0, 1.0, 1.0)  # work in index space, then map with the full index->LPS matrix
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(
        np.ascontiguousarray(array, dtype=np.float32).reshape(-1), deep=True))
    fe = vtkFlyingEdges3D()
    fe.SetInputData(image)
    fe.SetValue(0, float(level))
    fe.ComputeNormalsOff()
    fe.ComputeScalarsOff()  # else every point carries the iso-value in an unnamed array that writers store
    fe.Update()
    return transform_polydata(fe.GetOutput(), grid.ijk_to_lps)


def smooth_and_decimate(polydata: vtkPolyData, iterations: int = 15, pass_band: float = 0.1,
                        target_reduction: float = 0.5, max_error_mm: float = 0.1) -> vtkPolyData:
    """Windowed-sinc smoothing, then decimation that removes up to ``target_reduction`` of the
    triangles while keeping every vertex within ``max_error_mm`` of the smoothed surface; with normals."""
    out = polydata
    if iterations > 0 and out.GetNumberOfPoints() > 0:
        sm = vtkWindowedSincPolyDataFilter()
        sm.SetInputData(out)
        sm.SetNumberOfIterations(iterations)
        sm.SetPassBand(pass_band)
        sm.NormalizeCoordinatesOn()
        sm.BoundarySmoothingOff()
        sm.FeatureEdgeSmoothingOff()
        sm.NonManifoldSmoothingOn()
        sm.Update()
        out = sm.GetOutput()
    if target_reduction > 0 and out.GetNumberOfPolys() > 0:
        dec = vtkDecimatePro()
        dec.SetInputData(out)
        dec.SetTargetReduction(target_reduction)
        dec.PreserveTopologyOn()
        dec.SetMaximumError(max_error_mm)
        dec.SetErrorIsAbsolute(1)
        dec.SetAbsoluteError(max_error_mm)
        dec.Update()
        out = dec.GetOutput()
    normals = vtkPolyDataNormals()
    normals.SetInputData(out)
    normals.ConsistencyOn()
    normals.SplittingOff()
    normals.Update()
    return normals.GetOutput()


def labelmap_surface(labelmap: Volume, smoothing_iterations: int = 15, target_reduction: float = 0.5,
                     max_error_mm: float = 0.1) -> vtkPolyData:
    """Closed, smoothed surface (LPS mm) of the nonzero voxels of a labelmap."""
    return level_surface(labelmap.with_array((labelmap.array != 0).astype(np.float32)), 0.5, smoothing_iterations,
                         target_reduction, max_error_mm)


def level_surface(values: Volume, level: float, smoothing_iterations: int = 15, target_reduction: float = 0.5,
                  max_error_mm: float = 0.1, transform: np.ndarray | None = None) -> vtkPolyData:
    """Closed, smoothed surface (LPS mm) around the voxels of ``values`` (e.g. an occupancy in [0, 1]) at or above
    ``level``, which must be above 0 (the volume is closed by a border of zeros). ``transform``: a 4x4 map of the
    iso-surface's points before smoothing (e.g. from a model's frame into the patient's LPS)."""
    padded_values = np.pad(values.array.astype(np.float32, copy=False), 1)  # closed where it touches the border
    grid = values.grid
    padded = Grid(tuple(np.asarray(grid.size) + 2), grid.spacing, grid.index_to_physical(-np.ones(3)), grid.direction)
    surface = isosurface(padded_values, padded, level)
    if transform is not None:
        surface = transform_polydata(surface, transform)
    return smooth_and_decimate(surface, smoothing_iterations, target_reduction=target_reduction,
                               max_error_mm=max_error_mm)


def write_stl(polydata: vtkPolyData, path: str | os.PathLike, frame: str = "LPS", overwrite: bool = False) -> Path:
    """Write an LPS polydata as binary STL with points in ``frame`` ('LPS' or 'RAS')."""
    if frame not in STL_FRAMES:
        raise InputError(f"Unknown STL frame {frame!r}; use 'LPS' (ITK, DICOM) or 'RAS' (3D Slicer).")
    if polydata.GetNumberOfPolys() == 0:
        raise InputError("The surface is empty, so there is nothing to write to STL.")
    # LPS -> RAS flips two axes (a rotation by 180 degrees), so triangle orientation is kept
    out = polydata if frame == "LPS" else _set_points(polydata, lps_to_ras(polydata_points(polydata)))
    tri = vtkTriangleFilter()
    tri.SetInputData(out)
    tri.Update()
    with atomic_path(path, overwrite) as tmp:
        writer = vtkSTLWriter()
        writer.SetFileName(str(tmp))
        writer.SetInputData(tri.GetOutput())
        writer.SetFileTypeToBinary()
        writer.SetHeader(f"SPACE={frame} TibiaReconstruction surface, mm")  # 3D Slicer reads SPACE=
        if not writer.Write():
            raise OutputError(f"Could not write STL {path}; check that the folder is writable and the disk is not "
                              "full.")
    return Path(path)


def write_vtp(polydata: vtkPolyData, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a polydata as VTK XML PolyData (points as they are, LPS mm here, with their point data, e.g.
    per-vertex uncertainty or distances, which STL cannot hold); atomic, never overwrites unless asked."""
    path = Path(path)
    with atomic_path(path, overwrite) as tmp:
        writer = vtkXMLPolyDataWriter()
        writer.SetFileName(str(tmp))
        writer.SetInputData(polydata)
        writer.SetCompressionLevel(1)  # zlib's fastest: 2.5x faster than VTK's default (5), files 1 % larger
        if not writer.Write():
            raise OutputError(f"Could not write {path}; check that the folder is writable and the disk not full.")
    return path


def read_stl(path: str | os.PathLike) -> vtkPolyData:
    """Read an STL file (points in whatever frame it was written in)."""
    if not Path(path).is_file():
        raise InputError(f"STL file not found: {path}.")
    reader = vtkSTLReader()
    reader.SetFileName(str(path))
    reader.Update()
    return reader.GetOutput()
