"""Solids onto a voxel grid: closed surfaces (VTK stencil) and ellipsoid unions, on bounding boxes.

Work happens on sub-boxes of the grid (``Box``, array order k, j, i) so cost follows the object, not
the field of view. Surfaces are voxelised in continuous index space (i, j, k), which makes oblique
direction matrices free; a voxel is inside when its centre is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import vtk
from scipy.ndimage import distance_transform_edt
from vtk.util.numpy_support import vtk_to_numpy

from ..geometry import Grid, apply_affine
from .anatomy import Ellipsoid
from .mesh import polydata


@dataclass(frozen=True)
class Box:
    """Index box [lo, hi) in array order (k, j, i)."""

    lo: np.ndarray
    hi: np.ndarray

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(int(a), int(b)) for a, b in zip(self.lo, self.hi))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in np.maximum(self.hi - self.lo, 0))

    @property
    def empty(self) -> bool:
        return bool(np.any(self.hi <= self.lo))


def box_of_points(grid: Grid, points: np.ndarray, margin: int = 2) -> Box:
    """Smallest box holding ``points`` (LPS) plus ``margin`` voxels, clipped to the grid (may be empty)."""
    ijk = grid.physical_to_index(points)
    lo = np.floor(ijk.min(axis=0))[::-1].astype(int) - margin
    hi = np.ceil(ijk.max(axis=0))[::-1].astype(int) + margin + 1
    return Box(np.maximum(lo, 0), np.minimum(hi, grid.shape))


def frame_coords(grid: Grid, lps_to_frame: np.ndarray, box: Box) -> list[np.ndarray]:
    """Coordinates (x, y, z; float32 arrays of ``box.shape``) of the box's voxel centres in another frame."""
    m = lps_to_frame @ grid.ijk_to_lps
    k, j, i = (np.arange(a, b, dtype=np.float32) for a, b in zip(box.lo, box.hi))
    k, j, i = k[:, None, None], j[None, :, None], i[None, None, :]
    return [(np.float32(m[c, 0]) * i + np.float32(m[c, 1]) * j) + (np.float32(m[c, 2]) * k + np.float32(m[c, 3]))
            for c in range(3)]


def surface_mask(grid: Grid, vertices: np.ndarray, triangles: np.ndarray) -> tuple[Box, np.ndarray]:
    """Voxels (box, bool array) whose centres lie inside the closed surface (vertices in LPS mm)."""
    box = box_of_points(grid, vertices)
    if box.empty:
        return box, np.zeros(box.shape, bool)
    stencil = vtk.vtkPolyDataToImageStencil()
    stencil.SetInputData(polydata(grid.physical_to_index(vertices), triangles))
    stencil.SetOutputOrigin(0.0, 0.0, 0.0)
    stencil.SetOutputSpacing(1.0, 1.0, 1.0)
    stencil.SetOutputWholeExtent(int(box.lo[2]), int(box.hi[2]) - 1, int(box.lo[1]), int(box.hi[1]) - 1,
                                 int(box.lo[0]), int(box.hi[0]) - 1)
    to_image = vtk.vtkImageStencilToImage()
    to_image.SetInputConnection(stencil.GetOutputPort())
    to_image.SetInsideValue(1)
    to_image.SetOutsideValue(0)
    to_image.SetOutputScalarTypeToUnsignedChar()
    to_image.Update()
    arr = vtk_to_numpy(to_image.GetOutput().GetPointData().GetScalars()).reshape(box.shape)
    return box, arr.astype(bool)


def ellipsoids_mask(grid: Grid, ellipsoids: tuple[Ellipsoid, ...], pose: np.ndarray) -> tuple[Box, np.ndarray]:
    """Voxels inside a union of ellipsoids given in a frame that ``pose`` maps to LPS."""
    corners = []
    for e in ellipsoids:
        lo, hi = e.bounds()
        corners += [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    box = box_of_points(grid, apply_affine(pose, np.array(corners)))
    if box.empty:
        return box, np.zeros(box.shape, bool)
    x, y, z = frame_coords(grid, np.linalg.inv(pose), box)
    pts = np.stack(np.broadcast_arrays(x, y, z), axis=-1)
    inside = np.zeros(box.shape, bool)
    for e in ellipsoids:
        inside |= e.inside(pts)
    return box, inside


def inner_depth(mask: np.ndarray, spacing_kji: np.ndarray, max_depth: float = 12.0) -> np.ndarray:
    """Distance (mm, float32) from each inside voxel centre to the nearest outside voxel centre, capped at
    ``max_depth``; 0 outside. Computed slab by slab on each slab's own in-plane box (exact below the cap),
    which is much cheaper than one transform over the bounding box of a long, tilted bone.
    """
    out = np.zeros(mask.shape, np.float32)
    n_k = mask.shape[0]
    overlap = int(np.ceil(max_depth / spacing_kji[0])) + 1
    step = max(16, 2 * overlap)
    for k0 in range(0, n_k, step):
        k1 = min(k0 + step, n_k)
        a, b = max(k0 - overlap, 0), min(k1 + overlap, n_k)
        if not mask[k0:k1].any():
            continue
        cols = np.flatnonzero(mask[a:b].any(axis=(0, 1)))
        rows = np.flatnonzero(mask[a:b].any(axis=(0, 2)))
        j0, j1 = max(rows[0] - 1, 0), min(rows[-1] + 2, mask.shape[1])
        i0, i1 = max(cols[0] - 1, 0), min(cols[-1] + 2, mask.shape[2])
        sub = np.pad(mask[a:b, j0:j1, i0:i1], 1, mode="edge")  # no surface where the field of view cuts a bone
        d = distance_transform_edt(sub, sampling=spacing_kji)[1 + k0 - a:1 + k1 - a, 1:-1, 1:-1]
        out[k0:k1, j0:j1, i0:i1] = np.minimum(d, max_depth)
    return out
