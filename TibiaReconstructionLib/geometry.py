"""Voxel grids in patient space, 4x4 affines, the one LPS<->RAS conversion, and the transform chain.

Frame: every physical coordinate in this library is LPS (x towards the patient's Left, y
Posterior, z Superior) in millimetres, as in ITK and DICOM. Slicer's RAS enters and leaves only
through :func:`lps_to_ras` / :func:`ras_to_lps` below.

Index order: ``Volume.array[k, j, i]`` is numpy/SimpleITK order, while ``spacing``, ``origin``,
``size`` and the columns of ``direction`` follow (i, j, k). The physical point of index (i, j, k) is
``origin + direction @ (spacing * (i, j, k))``.

Affines are 4x4 numpy arrays acting on column vectors of homogeneous LPS points.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import GeometryMismatchError, InputError

# ---------------------------------------------------------------------------------------------
# Affine helpers


def make_affine(linear: np.ndarray | None = None, translation: Sequence[float] | None = None) -> np.ndarray:
    """4x4 affine from a 3x3 linear part and a translation (identity where omitted)."""
    m = np.eye(4)
    if linear is not None:
        m[:3, :3] = np.asarray(linear, dtype=float)
    if translation is not None:
        m[:3, 3] = np.asarray(translation, dtype=float)
    return m


def translation(offset: Sequence[float]) -> np.ndarray:
    """4x4 translation by ``offset`` (mm)."""
    return make_affine(translation=offset)


def scaling(factors: float | Sequence[float], center: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 scaling by ``factors`` about ``center`` (mm)."""
    s = np.broadcast_to(np.asarray(factors, dtype=float), (3,))
    return about_point(np.diag(s), center)


def euler_rotation(angles_deg: Sequence[float], center: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 rotation R = Rz @ Ry @ Rx by the given angles (degrees) about ``center`` (mm)."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return about_point(rz @ ry @ rx, center)


def about_point(linear: np.ndarray, center: Sequence[float]) -> np.ndarray:
    """4x4 affine applying the 3x3 ``linear`` map with ``center`` kept fixed."""
    c = np.asarray(center, dtype=float)
    return make_affine(linear, c - np.asarray(linear, dtype=float) @ c)


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine to points of shape (..., 3)."""
    p = np.asarray(points, dtype=float)
    return p @ matrix[:3, :3].T + matrix[:3, 3]


def nearest_rigid(matrix: np.ndarray, centroid: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    """The rigid 4x4 map closest to the affine ``matrix`` over a body of points with the given ``centroid`` (3,) and
    ``covariance`` (3, 3): least squares of the two maps' difference over the points, which depends on them only
    through these two moments (the rotation is the polar factor of A C, the centroid goes where the affine puts it)."""
    u, _, vt = np.linalg.svd(matrix[:3, :3] @ covariance)
    r = u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))]) @ vt
    return make_affine(r, apply_affine(matrix, centroid) - r @ centroid)


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a 4x4 affine; raises InputError for a singular one."""
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise InputError("The affine transform is singular (it collapses space) and cannot be inverted.")
    return np.linalg.inv(matrix)


# ---------------------------------------------------------------------------------------------
# The one place where LPS and RAS meet

_LPS_RAS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse


def lps_to_ras(points: np.ndarray) -> np.ndarray:
    """Points (..., 3) from LPS to RAS."""
    return apply_affine(_LPS_RAS_FLIP, points)


def ras_to_lps(points: np.ndarray) -> np.ndarray:
    """Points (..., 3) from RAS to LPS."""
    return apply_affine(_LPS_RAS_FLIP, points)


def affine_lps_to_ras(matrix: np.ndarray) -> np.ndarray:
    """Re-express a 4x4 affine between LPS points as the same map between RAS points."""
    return _LPS_RAS_FLIP @ matrix @ _LPS_RAS_FLIP


def affine_ras_to_lps(matrix: np.ndarray) -> np.ndarray:
    """Inverse of :func:`affine_lps_to_ras` (the same conjugation)."""
    return _LPS_RAS_FLIP @ matrix @ _LPS_RAS_FLIP


def ijk_to_lps_from_ras(ijk_to_ras: np.ndarray) -> np.ndarray:
    """Index->LPS 4x4 matrix from Slicer's index->RAS matrix."""
    return _LPS_RAS_FLIP @ np.asarray(ijk_to_ras, dtype=float)


# ---------------------------------------------------------------------------------------------
# Grids and volumes


def _as_vec3(values: Iterable[float], what: str) -> np.ndarray:
    v = np.asarray(list(values), dtype=float).reshape(-1)
    if v.shape != (3,) or not np.all(np.isfinite(v)):
        raise InputError(f"{what} must be 3 finite numbers, got {v.tolist()}.")
    return v


@dataclass(frozen=True)
class Grid:
    """A 3D voxel grid in LPS: ``size`` (i, j, k), ``spacing`` (mm), ``origin`` (mm), ``direction``."""

    size: tuple[int, int, int]
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        size = tuple(int(s) for s in self.size)
        if len(size) != 3 or min(size) < 1:
            raise InputError(f"A grid needs 3 positive sizes, got {self.size}.")
        spacing = _as_vec3(self.spacing, "spacing")
        if np.any(spacing <= 0):
            raise InputError(f"Voxel spacing must be positive, got {spacing.tolist()} mm.")
        direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise InputError(f"The direction matrix must be orthonormal, got {direction.tolist()}.")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", _as_vec3(self.origin, "origin"))
        object.__setattr__(self, "direction", direction)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Numpy array shape (k, j, i) of a volume on this grid."""
        return self.size[::-1]

    @property
    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix from continuous index (i, j, k) to LPS mm."""
        return make_affine(self.direction * self.spacing, self.origin)

    @property
    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix from continuous index (i, j, k) to RAS mm (Slicer's IJKToRAS)."""
        return _LPS_RAS_FLIP @ self.ijk_to_lps

    def index_to_physical(self, ijk: np.ndarray) -> np.ndarray:
        """Continuous indices (..., 3) in (i, j, k) order to LPS points (..., 3)."""
        return apply_affine(self.ijk_to_lps, ijk)

    def physical_to_index(self, points: np.ndarray) -> np.ndarray:
        """LPS points (..., 3) to continuous indices (..., 3) in (i, j, k) order."""
        rel = np.asarray(points, dtype=float) - self.origin
        return (rel @ self.direction) / self.spacing

    @property
    def center(self) -> np.ndarray:
        """LPS point at the centre of the grid."""
        return self.index_to_physical((np.asarray(self.size) - 1) / 2.0)

    def corners(self) -> np.ndarray:
        """The 8 corner voxel centres in LPS, shape (8, 3)."""
        n = np.asarray(self.size) - 1
        ijk = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])], dtype=float)
        return self.index_to_physical(ijk)

    def same_as(self, other: "Grid", tol_mm: float = 1e-3) -> bool:
        """True if both grids place every voxel within ``tol_mm`` of each other."""
        if self.size != other.size:
            return False
        return bool(np.max(np.abs(self.corners() - other.corners())) <= tol_mm)

    def describe(self) -> str:
        """One-line human description used in error messages."""
        fmt = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"  # noqa: E731
        dirs = ", ".join(fmt(c) for c in self.direction.T)
        return (f"size {self.size[0]}x{self.size[1]}x{self.size[2]}, spacing {fmt(self.spacing)} mm, "
                f"origin {fmt(self.origin)} mm (LPS), axis directions {dirs}")

    def to_dict(self) -> dict:
        return {"size": list(self.size), "spacing": self.spacing.tolist(), "origin": self.origin.tolist(),
                "direction": self.direction.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Grid":
        return cls(tuple(d["size"]), np.asarray(d["spacing"]), np.asarray(d["origin"]), np.asarray(d["direction"]))


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image: ``array[k, j, i]`` on a :class:`Grid` in LPS. Never modified in place by the library."""

    array: np.ndarray
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        arr = np.asarray(self.array)
        if arr.ndim != 3:
            raise InputError(f"A volume must be a 3D array, got {arr.ndim} dimensions with shape {arr.shape}.")
        grid = Grid(arr.shape[::-1], self.spacing, self.origin, self.direction)
        object.__setattr__(self, "array", arr)
        object.__setattr__(self, "spacing", grid.spacing)
        object.__setattr__(self, "origin", grid.origin)
        object.__setattr__(self, "direction", grid.direction)
        object.__setattr__(self, "_grid", grid)

    @property
    def grid(self) -> Grid:
        return self._grid  # type: ignore[attr-defined]

    @classmethod
    def on_grid(cls, array: np.ndarray, grid: Grid) -> "Volume":
        """A volume with ``array`` (shape ``grid.shape``) on ``grid``."""
        if tuple(np.shape(array)) != grid.shape:
            raise InputError(f"Array shape {np.shape(array)} does not match grid shape {grid.shape} (k, j, i).")
        return cls(array, grid.spacing, grid.origin, grid.direction)

    def with_array(self, array: np.ndarray) -> "Volume":
        """A new volume with the same grid and another array."""
        return Volume.on_grid(array, self.grid)

    def index_to_physical(self, ijk: np.ndarray) -> np.ndarray:
        return self.grid.index_to_physical(ijk)

    def physical_to_index(self, points: np.ndarray) -> np.ndarray:
        return self.grid.physical_to_index(points)

    def to_sitk(self, share: bool = False) -> sitk.Image:
        """SimpleITK image sharing nothing with this volume; with ``share``, when the array is the whole buffer of
        an image (:meth:`from_sitk` with ``share``, :func:`image_volume`), that image itself, given this volume's
        geometry: no copy, only to read from (to write a file)."""
        img = _buffer_owner(self.array) if share else None
        if img is None:
            img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        img.SetSpacing(self.spacing.tolist())
        img.SetOrigin(self.origin.tolist())
        img.SetDirection(self.direction.reshape(-1).tolist())
        return img

    @classmethod
    def from_sitk(cls, image: sitk.Image, share: bool = False) -> "Volume":
        """The image as a volume: a copy of its voxels, or with ``share`` (for an image nobody else holds, such
        as one just read from a file) a writable array on the image's own buffer, which keeps the image alive."""
        if image.GetDimension() != 3:
            raise InputError(f"Expected a 3D image, got a {image.GetDimension()}D image of size {image.GetSize()}.")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"Expected a single-channel (scalar) image, got "
                             f"{image.GetNumberOfComponentsPerPixel()} components per voxel.")
        array = np.asarray(_ImageBuffer(image)) if share else sitk.GetArrayFromImage(image)
        return cls(array, np.array(image.GetSpacing()), np.array(image.GetOrigin()),
                   np.array(image.GetDirection()).reshape(3, 3))


class _ImageBuffer:
    """A SimpleITK image's voxel buffer as numpy sees it (``__array_interface__``, writable): the array made from
    it holds this object, and so the image, for as long as it lives."""

    def __init__(self, image: sitk.Image) -> None:
        self.image = image
        view = sitk.GetArrayViewFromImage(image)
        self.__array_interface__ = {**view.__array_interface__, "data": (view.__array_interface__["data"][0], False)}


def _buffer_owner(array: np.ndarray) -> sitk.Image | None:
    """The SimpleITK image whose whole buffer ``array`` is, or None."""
    owner = array.base
    if not isinstance(owner, _ImageBuffer):
        return None
    same = owner.__array_interface__
    return owner.image if (array.__array_interface__["data"][0] == same["data"][0] and array.shape == same["shape"]
                           and array.dtype.str == same["typestr"] and array.flags.c_contiguous) else None


_PIXEL_TYPES = {np.dtype(np.uint8): sitk.sitkUInt8, np.dtype(np.int16): sitk.sitkInt16,
                np.dtype(np.float32): sitk.sitkFloat32}


def image_volume(grid: Grid, dtype: np.dtype, fill: float = 0) -> Volume:
    """A new volume on ``grid``, all ``fill``, whose array is the buffer of a SimpleITK image (uint8, int16 or
    float32), so that writing it to a file needs no copy (:meth:`Volume.to_sitk` with ``share``)."""
    image = sitk.Image([int(n) for n in grid.size], _PIXEL_TYPES[np.dtype(dtype)])  # zero-filled
    array = np.asarray(_ImageBuffer(image))
    if fill:
        array.fill(fill)
    return Volume.on_grid(array, grid)


def check_same_grid(a: Volume | Grid, b: Volume | Grid, name_a: str, name_b: str, tol_mm: float = 1e-3) -> None:
    """Raise GeometryMismatchError naming both geometries unless ``a`` and ``b`` share one grid."""
    ga = a.grid if isinstance(a, Volume) else a
    gb = b.grid if isinstance(b, Volume) else b
    if not ga.same_as(gb, tol_mm):
        raise GeometryMismatchError(
            f"The {name_b} is not on the {name_a}'s voxel grid.\n  {name_a}: {ga.describe()}\n  {name_b}: "
            f"{gb.describe()}\nResample the {name_b} onto the {name_a} (nearest neighbour for labels) or "
            f"export it with the {name_a} as reference geometry.")


# ---------------------------------------------------------------------------------------------
# Resampling, cropping, mirroring

_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}


def upsample_linear(array: np.ndarray, factors, shape) -> np.ndarray:
    """Linear interpolation of ``array`` (k, j, i) onto a grid ``factors`` (k, j, i) times finer along each axis
    that starts at the same first voxel: output voxel n sits at input index n / factor. ``shape``: the output
    size, at most (input size - 1) * factor + 1 per axis. Separable and multi-threaded (torch), so much cheaper
    than a general resample; axes with factor 1 are not interpolated (they go to torch as channels)."""
    import torch  # only the prediction needs it; the Slicer module imports this file without torch
    import torch.nn.functional as F

    full = tuple((n - 1) * f + 1 for n, f in zip(array.shape, factors))
    if any(s > n for s, n in zip(shape, full)):
        raise InputError(f"upsample_linear: output {tuple(shape)} is larger than {full}, the most that input "
                         f"{array.shape} with factors {tuple(factors)} covers.")
    order = sorted(range(3), key=lambda a: factors[a] > 1)  # axes kept as they are first, then the interpolated
    moving = [a for a in order if factors[a] > 1]
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(order)
    if moving:
        kept = x.shape[:3 - len(moving)]
        x = F.interpolate(x.reshape(1, -1, *x.shape[3 - len(moving):]), size=[full[a] for a in moving],
                          mode=("linear", "bilinear", "trilinear")[len(moving) - 1], align_corners=True)
        x = x.reshape(*kept, *x.shape[2:])
    out = x.permute(np.argsort(order).tolist())
    return out[:shape[0], :shape[1], :shape[2]].numpy()


def block_mean(volume: Volume, factors: Sequence[int], binary: bool = False, slab: int = 16) -> Volume:
    """Means (float32) of ``volume`` (``binary``: of volume != 0) over blocks of ``factors`` (i, j, k) voxels, on
    the grid of ``factors`` times larger voxels centred on the blocks (as SimpleITK's BinShrink: trailing voxels
    that fill no block are dropped). Slab by slab with strided adds: no full-size temporary or copy."""
    fi, fj, fk = (int(f) for f in factors)
    arr = volume.array
    shape = tuple(n // f for n, f in zip(arr.shape, (fk, fj, fi)))
    out = np.zeros(shape, np.float32)
    step = max(1, slab // fk)
    for k in range(0, shape[0], step):
        rows = slice(k * fk, min(shape[0], k + step) * fk)
        block = arr[rows, :shape[1] * fj, :shape[2] * fi]
        block = block != 0 if binary else block
        part = out[k:k + step]
        for a, b, c in np.ndindex(fk, fj, fi):
            np.add(part, block[a::fk, b::fj, c::fi], out=part)
    out *= 1.0 / (fi * fj * fk)
    first = volume.index_to_physical((np.array([fi, fj, fk], float) - 1) / 2)
    return Volume(out, volume.spacing * [fi, fj, fk], first, volume.direction)


def resample(volume: Volume, grid: Grid, output_to_input: np.ndarray | None = None,
             interpolation: str = "linear", default_value: float = 0.0, dtype: np.dtype | None = None) -> Volume:
    """Resample ``volume`` onto ``grid`` with SimpleITK.

    ``output_to_input`` is a 4x4 LPS affine mapping points of the output grid to points of the input
    volume (ITK's convention); identity when None. Outside the input, voxels get ``default_value``.
    """
    if interpolation not in _INTERPOLATORS:
        raise InputError(f"Unknown interpolation {interpolation!r}; use one of {sorted(_INTERPOLATORS)}.")
    src = volume.to_sitk()
    if src.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64) and interpolation != "nearest":
        src = sitk.Cast(src, sitk.sitkFloat32)
    tx = sitk.AffineTransform(3)
    if output_to_input is not None:
        tx.SetMatrix(np.asarray(output_to_input)[:3, :3].reshape(-1).tolist())
        tx.SetTranslation(np.asarray(output_to_input)[:3, 3].tolist())
    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in grid.size])
    f.SetOutputSpacing(grid.spacing.tolist())
    f.SetOutputOrigin(grid.origin.tolist())
    f.SetOutputDirection(grid.direction.reshape(-1).tolist())
    f.SetTransform(tx)
    f.SetInterpolator(_INTERPOLATORS[interpolation])
    f.SetDefaultPixelValue(float(default_value))
    out = sitk.GetArrayFromImage(f.Execute(src))
    target = dtype if dtype is not None else volume.array.dtype
    if np.issubdtype(target, np.integer) and interpolation != "nearest":
        out = np.rint(out)
    return Volume.on_grid(out.astype(target, copy=False), grid)


def boundary_distance(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Signed distance (mm, float32; negative inside) of every voxel of ``mask`` (Z, Y, X, bool) from the nearest
    boundary voxel of the mask (its voxels with an outside neighbour: 0 there), for voxel ``spacing`` (i, j, k);
    ITK's exact Euclidean, multi-threaded signed Maurer distance."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=bool).view(np.uint8))
    image.SetSpacing([float(v) for v in spacing])
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return sitk.GetArrayFromImage(distance)


def bounding_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Index box (lo, hi inclusive) in (k, j, i) array order of the nonzero voxels, or None if empty. One pass
    over the array finds the k slices with a nonzero voxel, a second over those slices the j and i extent."""
    k = np.flatnonzero(np.any(mask, axis=(1, 2)))
    if len(k) == 0:
        return None
    plane = np.any(mask[k[0]:k[-1] + 1], axis=0)
    j, i = np.flatnonzero(np.any(plane, axis=1)), np.flatnonzero(np.any(plane, axis=0))
    return np.array([k[0], j[0], i[0]]), np.array([k[-1], j[-1], i[-1]])


def crop(volume: Volume, lo_kji: Sequence[int], hi_kji: Sequence[int]) -> Volume:
    """Sub-volume of array indices lo..hi (inclusive, (k, j, i) order) with its origin moved accordingly."""
    lo = np.maximum(np.asarray(lo_kji, dtype=int), 0)
    hi = np.minimum(np.asarray(hi_kji, dtype=int), np.asarray(volume.array.shape) - 1)
    arr = volume.array[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1]
    return Volume(arr, volume.spacing, volume.index_to_physical(lo[::-1].astype(float)), volume.direction)


def grown_box(mask: Volume, margin_mm: float) -> tuple[np.ndarray, np.ndarray] | None:
    """The index box (lo, hi, (k, j, i); not clipped to the grid) of ``mask``'s nonzero voxels grown by ``margin_mm``
    on each side, or None for an empty mask."""
    box = bounding_box(mask.array)
    if box is None:
        return None
    margin = np.ceil(margin_mm / mask.spacing[::-1]).astype(int)
    return box[0] - margin, box[1] + margin


def crop_to_mask(volume: Volume, mask: Volume, margin_mm: float = 10.0) -> Volume:
    """Crop ``volume`` to the bounding box of ``mask`` (same grid) grown by ``margin_mm`` on each side."""
    check_same_grid(volume, mask, "volume", "mask")
    box = grown_box(mask, margin_mm)
    if box is None:
        raise InputError("The mask is empty, so there is nothing to crop to. Provide a mask with at least one voxel.")
    return crop(volume, *box)


def lattice(grid: Grid, step_mm: float) -> tuple[Grid, tuple[slice, ...]]:
    """The lattice of every n-th voxel of ``grid`` along each axis (n = step_mm / spacing, at least 1; it starts at
    the first voxel) and the array slices (Z, Y, X) that read it."""
    step = np.maximum(1, np.floor(step_mm / grid.spacing + 1e-6)).astype(int)  # (i, j, k)
    size = (np.asarray(grid.size) - 1) // step + 1
    return (Grid(tuple(size), grid.spacing * step, grid.origin, grid.direction),
            tuple(slice(None, None, s) for s in step[::-1]))


def moved(volume: Volume, rigid: np.ndarray) -> Volume:
    """The same voxels on a grid moved by ``rigid`` (4x4 LPS, a rotation and a translation): each voxel centre goes
    where ``rigid`` maps it; nothing is resampled (a patient turned or shifted in the scanner)."""
    rigid = np.asarray(rigid, dtype=float)
    return Volume(volume.array, volume.spacing, apply_affine(rigid, volume.origin[None])[0],
                  rigid[:3, :3] @ volume.direction)


def reflection(normal: Sequence[float] = (1.0, 0.0, 0.0), point: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 LPS reflection about the plane through ``point`` with unit ``normal``."""
    n = _as_vec3(normal, "plane normal")
    n = n / np.linalg.norm(n)
    return about_point(np.eye(3) - 2.0 * np.outer(n, n), _as_vec3(point, "plane point"))


def mirror(volume: Volume, normal: Sequence[float] = (1.0, 0.0, 0.0),
           point: Sequence[float] | None = None) -> tuple[Volume, np.ndarray]:
    """Mirror a volume about a plane (default: the sagittal plane x = const through the grid centre).

    Returns the mirrored volume and the 4x4 LPS reflection H that maps original points to mirrored
    points (H is its own inverse). The array is flipped along the index axis most aligned with the
    normal, so the direction matrix keeps a positive determinant; voxel values are not interpolated.
    """
    h = reflection(normal, volume.grid.center if point is None else point)
    n = _as_vec3(normal, "plane normal")
    axis_i = int(np.argmax(np.abs(n @ volume.direction)))  # index axis in (i, j, k) order
    flip = np.ones(3)
    flip[axis_i] = -1.0
    new_direction = h[:3, :3] @ volume.direction @ np.diag(flip)
    far = np.zeros(3)
    far[axis_i] = volume.grid.size[axis_i] - 1
    new_origin = apply_affine(h, volume.index_to_physical(far))
    arr = np.flip(volume.array, axis=2 - axis_i)
    return Volume(arr, volume.spacing, new_origin, new_direction), h


# ---------------------------------------------------------------------------------------------
# The transform chain


@dataclass(frozen=True)
class TransformStep:
    """One named 4x4 affine mapping points of frame ``source`` to points of frame ``target`` (mm)."""

    name: str
    matrix: np.ndarray
    source: str
    target: str


class TransformChain:
    """An ordered list of affine steps; each step's target frame is the next step's source frame."""

    def __init__(self, steps: Sequence[TransformStep] = ()) -> None:
        self.steps: tuple[TransformStep, ...] = tuple(steps)
        for a, b in zip(self.steps, self.steps[1:]):
            if a.target != b.source:
                raise InputError(f"Transform step {b.name!r} starts in frame {b.source!r} but the previous step "
                                 f"{a.name!r} ends in {a.target!r}.")

    @property
    def source(self) -> str:
        return self.steps[0].source if self.steps else ""

    @property
    def target(self) -> str:
        return self.steps[-1].target if self.steps else ""

    def then(self, name: str, matrix: np.ndarray, target: str) -> "TransformChain":
        """A new chain with one more step from the current target frame to ``target``."""
        m = np.asarray(matrix, dtype=float)
        if m.shape != (4, 4):
            raise InputError(f"Transform {name!r} must be a 4x4 matrix, got shape {m.shape}.")
        return TransformChain(self.steps + (TransformStep(name, m, self.target or "patient", target),))

    def matrix(self) -> np.ndarray:
        """The composed 4x4 affine from ``source`` to ``target``."""
        m = np.eye(4)
        for step in self.steps:
            m = step.matrix @ m
        return m

    def inverse(self) -> "TransformChain":
        """The chain that maps ``target`` back to ``source``, step by step."""
        return TransformChain([TransformStep(f"inverse {s.name}", invert_affine(s.matrix), s.target, s.source)
                               for s in reversed(self.steps)])

    def apply(self, points: np.ndarray) -> np.ndarray:
        return apply_affine(self.matrix(), points)

    def to_dict(self) -> dict:
        return {"frame_convention": "LPS mm; each matrix maps points of 'source' to points of 'target'",
                "steps": [{"name": s.name, "source": s.source, "target": s.target, "matrix": s.matrix.tolist()}
                          for s in self.steps]}

    @classmethod
    def from_dict(cls, d: dict) -> "TransformChain":
        return cls([TransformStep(s["name"], np.asarray(s["matrix"], dtype=float), s["source"], s["target"])
                    for s in d["steps"]])
