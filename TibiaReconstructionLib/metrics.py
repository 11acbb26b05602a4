"""Reconstruction metrics of the paper's Table 1, plus Dice and HD95, and mean ± 95% CI.

Inputs are numpy arrays or torch tensors (detached and copied to float64 numpy here); outputs
are Python floats (or numpy arrays of distances). Volumes are indexed ``array[k, j, i]`` as in
:class:`~TibiaReconstructionLib.geometry.Volume`, and every ``spacing`` argument is in **(i, j, k)
order, millimetres** (``Volume.spacing``); it is reversed internally wherever numpy axes are
scaled. Distances are Euclidean, in mm, computed in the voxel grid scaled by the spacing (an
orthonormal direction matrix and the origin do not change distances, so they are not needed).

Intensity metrics (D-SSIM, PSNR, RMSE) compare voxel values and take no spacing: their windows
are in voxels of the (isotropic, canonical) grid, as in the paper.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy import ndimage, stats
from scipy.spatial import cKDTree
from skimage.measure import marching_cubes

from .errors import GeometryMismatchError, InputError

DSSIM_WINDOWS = (15, 11, 7, 3)
TABLE1_KEYS = ("dssim15", "dssim11", "dssim7", "dssim3", "psnr", "rmse", "rmsd", "dice", "hd95")


def _array(x, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype != bool and not np.all(np.isfinite(a)):
        raise InputError(f"{what} contains NaN or infinite values.")
    return a


def _pair(a, b, ndim: int | None = 3) -> tuple[np.ndarray, np.ndarray]:
    a, b = _array(a, "The first volume"), _array(b, "The second volume")
    if a.shape != b.shape:
        raise GeometryMismatchError(f"The two volumes differ in shape: {a.shape} vs {b.shape}.")
    if ndim is not None and a.ndim != ndim:
        raise InputError(f"Expected {ndim}-D volumes (k, j, i), got shape {a.shape}.")
    return a, b


def _masks(a_mask, b_mask) -> tuple[np.ndarray, np.ndarray]:
    a, b = _pair(a_mask, b_mask)
    return a.astype(bool), b.astype(bool)


def _spacing_kji(spacing: Sequence[float]) -> np.ndarray:
    s = np.asarray(spacing, dtype=float).reshape(-1)
    if s.shape != (3,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise InputError(f"spacing must be 3 positive numbers in (i, j, k) order (mm), got {s.tolist()}.")
    return s[::-1].copy()


# ---------------------------------------------------------------------------------------------
# Intensity metrics


def _window_1d(window: int, kernel: str, sigma: float) -> np.ndarray:
    if kernel == "uniform":
        w = np.ones(window)
    elif kernel == "gaussian":
        x = np.arange(window) - (window - 1) / 2
        w = np.exp(-0.5 * (x / sigma) ** 2)
    else:
        raise InputError(f"kernel must be 'gaussian' or 'uniform', got {kernel!r}.")
    return w / w.sum()


def _local_mean(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable window average over the valid region (windows entirely inside the volume)."""
    r = (len(w) - 1) // 2
    for axis in range(3):
        x = ndimage.correlate1d(x, w, axis=axis)
        x = x[(slice(None),) * axis + (slice(r, x.shape[axis] - r),)]
    return x


def ssim(a, b, window: int, data_range: float = 1.0, kernel: str = "gaussian", sigma: float = 1.5) -> float:
    """Mean SSIM of two 3-D volumes (Wang et al. 2004; K1 = 0.01, K2 = 0.03).

    ``window`` is the odd window edge in voxels. The Gaussian window (default, σ = 1.5 voxels,
    truncated to ``window`` taps and renormalised) is what the paper's Table 1 implies: its
    D-SSIM at windows 15 and 11 are equal, which a uniform window would not give. Local
    statistics use population (co)variances and the mean is over the valid region (windows
    entirely inside the volume), as MONAI's SSIMMetric and skimage with
    ``use_sample_covariance=False``. Computed with separable filters in float64.
    """
    a, b = _pair(a, b)
    if not (isinstance(window, (int, np.integer)) and window >= 1 and window % 2 == 1):
        raise InputError(f"The SSIM window must be a positive odd number of voxels, got {window!r}.")
    if window > min(a.shape):
        raise InputError(f"The SSIM window ({window} voxels) is larger than the volume {a.shape}.")
    if data_range <= 0:
        raise InputError(f"data_range must be positive, got {data_range}.")
    w = _window_1d(int(window), kernel, sigma)
    x, y = a.astype(np.float64), b.astype(np.float64)
    mu_x, mu_y = _local_mean(x, w), _local_mean(y, w)
    var_x = _local_mean(x * x, w) - mu_x**2
    var_y = _local_mean(y * y, w) - mu_y**2
    cov = _local_mean(x * y, w) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def dssim(a, b, window: int, data_range: float = 1.0, kernel: str = "gaussian", sigma: float = 1.5) -> float:
    """D-SSIM = (1 − SSIM) / 2, in [0, 1]; 0 for identical volumes. See :func:`ssim`."""
    return (1.0 - ssim(a, b, window, data_range, kernel, sigma)) / 2.0


def rmse(a, b) -> float:
    """Root mean squared voxel difference, in the units of the values."""
    a, b = _pair(a, b, ndim=None)
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, 20·log10(data_range / RMSE); ``inf`` for identical inputs."""
    if data_range <= 0:
        raise InputError(f"data_range must be positive, got {data_range}.")
    e = rmse(a, b)
    return float("inf") if e == 0 else float(20.0 * np.log10(data_range / e))


# ---------------------------------------------------------------------------------------------
# Overlap and surface metrics


def dice(a_mask, b_mask) -> float:
    """Dice coefficient 2|A∩B| / (|A| + |B|) of two masks (nonzero = inside); 0 if one is empty.

    Raises InputError when both masks are empty (Dice is undefined).
    """
    a, b = _masks(a_mask, b_mask)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        raise InputError("Dice is undefined: both masks are empty.")
    return float(2.0 * np.logical_and(a, b).sum() / total)


def _boundary_points(mask: np.ndarray, spacing_kji: np.ndarray, what: str) -> np.ndarray:
    if not mask.any():
        raise InputError(f"{what} is empty, so it has no surface to measure distances to.")
    edge = mask & ~ndimage.binary_erosion(mask)  # 6-connected erosion; the array border counts as outside
    return np.argwhere(edge) * spacing_kji


def _nearest(points_a: np.ndarray, points_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d_ab = cKDTree(points_b).query(points_a)[0]
    d_ba = cKDTree(points_a).query(points_b)[0]
    return d_ab, d_ba


def surface_distances(a_mask, b_mask, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) between the boundary voxels of two masks, in both directions.

    The boundary of a mask is its voxels with a 6-neighbour outside (the array border counts as
    outside), as in MONAI's ``get_mask_edges``. Returns ``(d_ab, d_ba)``: for each boundary voxel
    centre of A the distance to the nearest boundary voxel centre of B, and vice versa. ``spacing``
    is (i, j, k) in mm. Raises InputError when either mask is empty.
    """
    a, b = _masks(a_mask, b_mask)
    s = _spacing_kji(spacing)
    return _nearest(_boundary_points(a, s, "The first mask"), _boundary_points(b, s, "The second mask"))


def mean_surface_distance(a_mask, b_mask, spacing: Sequence[float]) -> float:
    """Symmetric mean surface distance (mm): mean over both directions' distances pooled."""
    return float(np.mean(np.concatenate(surface_distances(a_mask, b_mask, spacing))))


def rmsd(a_mask, b_mask, spacing: Sequence[float]) -> float:
    """Symmetric root mean square surface distance (mm) between two masks' boundary voxels."""
    d = np.concatenate(surface_distances(a_mask, b_mask, spacing))
    return float(np.sqrt(np.mean(d**2)))


def hd95(a_mask, b_mask, spacing: Sequence[float]) -> float:
    """95th-percentile Hausdorff distance (mm): the larger of the two directed 95th percentiles
    (linear interpolation), as MONAI's ``compute_hausdorff_distance(percentile=95)``."""
    d_ab, d_ba = surface_distances(a_mask, b_mask, spacing)
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def _surface_vertices(vol: np.ndarray, level: float, spacing_kji: np.ndarray, what: str) -> np.ndarray:
    if not vol.min() < level < vol.max():
        raise InputError(f"{what} has no surface at level {level}: its values span [{vol.min()}, {vol.max()}].")
    verts, _, _, _ = marching_cubes(vol.astype(np.float64), level=level, spacing=tuple(spacing_kji))
    return verts


def rmsd_surfaces(vol_a, vol_b, level: float, spacing: Sequence[float]) -> float:
    """The paper's RMSD (mm): root mean square of symmetric nearest-vertex distances between the
    marching-cubes isosurfaces of two volumes at ``level``.

    Both surfaces are extracted with skimage's marching cubes on the grid scaled by ``spacing``
    ((i, j, k), mm); the distances of every vertex of one surface to the nearest vertex of the
    other, both directions pooled, are root-mean-squared. Raises InputError when a volume does
    not cross ``level``.
    """
    a, b = _pair(vol_a, vol_b)
    s = _spacing_kji(spacing)
    d = np.concatenate(_nearest(_surface_vertices(a, level, s, "The first volume"),
                                _surface_vertices(b, level, s, "The second volume")))
    return float(np.sqrt(np.mean(d**2)))


# ---------------------------------------------------------------------------------------------
# Aggregation


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half width of its two-sided Student-t confidence interval.

    The half width is t_{(1+confidence)/2, n−1} · s / √n with the sample standard deviation s.
    With one value, or with an infinite value (e.g. PSNR of a perfect reconstruction), the half
    width is NaN. Raises InputError for no values or NaN values.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise InputError("mean_ci needs at least one value.")
    if np.any(np.isnan(v)):
        raise InputError("mean_ci got NaN values; a metric failed upstream.")
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be in (0, 1), got {confidence}.")
    mean = float(np.mean(v))
    if v.size == 1 or not np.all(np.isfinite(v)):
        return mean, float("nan")
    t = stats.t.ppf((1 + confidence) / 2, v.size - 1)
    return mean, float(t * np.std(v, ddof=1) / np.sqrt(v.size))


# ---------------------------------------------------------------------------------------------
# One row of Table 1


def table1_row(pred, target, spacing: Sequence[float], occupancy_level: float = 0.5,
               intensity_level: float = 0.05) -> dict[str, float]:
    """All metrics for one case, keyed by :data:`TABLE1_KEYS`.

    ``pred`` and ``target`` are (C, k, j, i) in the canonical layout: channel 0 normalised
    intensity in [0, 1], channel 1 (optional) tibia occupancy in [0, 1]. D-SSIM (windows
    15/11/7/3), PSNR and RMSE use channel 0 with data range 1. The surface metrics use occupancy
    at ``occupancy_level`` — or, with one channel, intensity at ``intensity_level``: ``rmsd`` is
    :func:`rmsd_surfaces` (mm), ``dice`` and ``hd95`` (mm) use the masks ``field > level``.
    ``spacing`` is (i, j, k) in mm. Raises InputError when a surface is empty.
    """
    p, t = _pair(pred, target, ndim=4)
    if p.shape[0] not in (1, 2):
        raise InputError(f"Expected 1 or 2 channels (intensity[, occupancy]), got shape {p.shape}.")
    field_p, field_t, level = (p[1], t[1], occupancy_level) if p.shape[0] == 2 else (p[0], t[0], intensity_level)
    row = {f"dssim{w}": dssim(p[0], t[0], w) for w in DSSIM_WINDOWS}
    row["psnr"] = psnr(p[0], t[0])
    row["rmse"] = rmse(p[0], t[0])
    row["rmsd"] = rmsd_surfaces(field_p, field_t, level, spacing)
    row["dice"] = dice(field_p > level, field_t > level)
    row["hd95"] = hd95(field_p > level, field_t > level, spacing)
    return row
