"""Fragment reduction plan: rigidly move each fragment of a fractured tibia onto the predicted healthy tibia.

Coordinates are LPS mm throughout (see geometry.py). Inputs are a tibia mask and a coarse fracture mask on
the fractured CT's grid, and the predicted healthy tibia as a labelmap on the same grid.

1. Fragments: the connected components of ``tibia AND NOT fracture`` (6-connectivity, i.e. voxels that share
   a face, by default, so that pieces touching only at an edge or corner stay apart; 26 on request) of at
   least ``min_fragment_ml``, numbered 1, 2, ... by decreasing volume.
2. Registration: each fragment's surface vertices that lie away from the fracture mask and from the rest of
   the tibia (the fragment's intact outer surface, not its fracture faces) are registered rigidly onto the
   predicted surface with VTK's point-to-surface ICP (``vtkIterativeClosestPointTransform``, rigid body,
   starting from the identity since fragments lie near their place). A fragment matches only part of the
   prediction, so ICP runs in rounds with a shrinking distance cut-off: each round uses only the points
   within the cut-off of the predicted surface (at least the closest ``MIN_INLIER_FRACTION`` of them).
3. Deviation map: the signed distance (mm, positive outside the predicted tibia) from every vertex of a
   fragment's surface, before and after reduction, to the predicted surface, as point data ``DeviationMm``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import vtk
from scipy import ndimage
from scipy.spatial.transform import Rotation
from vtk.util import numpy_support

from .errors import InputError
from .geometry import Volume, apply_affine, bounding_box, check_same_grid, crop
from .surface import add_point_array, labelmap_surface, point_array, polydata_points, transform_polydata

DEFAULT_MIN_FRAGMENT_ML = 0.5
CONNECTIVITIES = (6, 26)
DEVIATION_ARRAY = "DeviationMm"  # signed distance to the predicted surface, mm, positive outside
FRACTURE_FACE_ARRAY = "FractureFace"  # 1 within 1.5 voxels of the fracture mask or of tibia outside the fragment
MIN_INLIER_FRACTION = 0.3  # each ICP round uses at least this share of the closest points
MAX_REGISTRATION_POINTS = 2000
ICP_ITERATIONS = 50
ICP_STOP_MM = 0.01  # an ICP round stops when an iteration moves the points by less (RMS)


@dataclass
class FragmentReduction:
    """One fragment: where it is, the rigid move that reduces it (4x4 LPS, fractured -> reduced) and its fit."""

    id: int
    voxels: int
    volume_ml: float
    centroid: np.ndarray  # LPS mm, fractured position (voxel centroid)
    matrix: np.ndarray  # 4x4 LPS, fractured position -> reduced position
    rms_residual_mm: float  # over the registration points within the final cut-off
    mean_residual_mm: float
    inlier_fraction: float  # share of the registration points within the final cut-off
    registration_points: int
    surface: vtk.vtkPolyData  # fractured position, LPS, with DEVIATION_ARRAY and FRACTURE_FACE_ARRAY
    reduced_surface: vtk.vtkPolyData  # reduced position, LPS, with the same arrays
    warnings: list = field(default_factory=list)

    @property
    def rotation_deg(self) -> float:
        return motion(self.matrix, self.centroid)["rotation_deg"]

    @property
    def translation_mm(self) -> np.ndarray:
        """Movement (LPS mm) of the fragment's centroid."""
        return np.asarray(motion(self.matrix, self.centroid)["translation_mm"])

    def report(self) -> dict:
        outer = point_array(self.surface, FRACTURE_FACE_ARRAY) == 0
        return {"id": self.id, "voxels": self.voxels, "volume_ml": self.volume_ml,
                "centroid_lps_mm": self.centroid.tolist(), "matrix_fractured_to_reduced_lps": self.matrix.tolist(),
                **motion(self.matrix, self.centroid),
                "rms_residual_mm": self.rms_residual_mm, "mean_residual_mm": self.mean_residual_mm,
                "inlier_fraction": self.inlier_fraction, "registration_points": self.registration_points,
                "deviation_before_mm": _deviation_stats(point_array(self.surface, DEVIATION_ARRAY)[outer]),
                "deviation_after_mm": _deviation_stats(point_array(self.reduced_surface, DEVIATION_ARRAY)[outer]),
                "warnings": self.warnings}


@dataclass
class ReductionPlan:
    """Every fragment's reduction onto the predicted healthy tibia (LPS mm) and how it was found."""

    fragments: list[FragmentReduction]
    prediction_surface: vtk.vtkPolyData  # LPS
    min_fragment_ml: float
    connectivity: int
    cutoff_mm: float
    discarded: list = field(default_factory=list)  # volumes (ml) of components below min_fragment_ml
    timings: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)

    def with_first_fixed(self, fragment: FragmentReduction) -> dict:
        """The move of ``fragment`` when fragment 1 (the largest) is held in place and the prediction moves with
        it: matrix (4x4 LPS, fractured -> reduced), rotation and centroid translation. Errors of the prediction's
        pose that move all fragments alike cancel here."""
        matrix = np.linalg.inv(self.fragments[0].matrix) @ fragment.matrix
        return {"matrix_lps": matrix.tolist(), **motion(matrix, fragment.centroid)}

    def report(self) -> dict:
        """JSON-ready summary; matrices map LPS points of the fractured position to the reduced position."""
        return {"frame": "LPS mm; each matrix maps a fragment's fractured position to its reduced position",
                "deviation": f"point data '{DEVIATION_ARRAY}': signed distance (mm) to the predicted surface, "
                             "positive outside; statistics over the fragment's outer surface (fracture faces "
                             "excluded)",
                "connectivity": self.connectivity, "min_fragment_ml": self.min_fragment_ml,
                "icp_final_cutoff_mm": self.cutoff_mm,
                "fragments": [dict(f.report(), with_fragment_1_fixed=self.with_first_fixed(f)) for f in self.fragments],
                "discarded_components": {"count": len(self.discarded), "volume_ml": float(sum(self.discarded))},
                "timings_s": self.timings, "warnings": self.warnings}


def motion(matrix: np.ndarray, point: np.ndarray) -> dict:
    """Rotation (degrees, unit axis in LPS) of a rigid 4x4 LPS matrix and the translation (mm) it gives ``point``."""
    rotvec = Rotation.from_matrix(matrix[:3, :3]).as_rotvec()
    angle = float(np.linalg.norm(rotvec))
    shift = apply_affine(matrix, point) - point
    return {"rotation_deg": float(np.degrees(angle)),
            "rotation_axis_lps": (rotvec / angle if angle > 1e-12 else np.zeros(3)).tolist(),
            "translation_mm": shift.tolist(), "translation_norm_mm": float(np.linalg.norm(shift))}


def find_fragments(tibia: Volume, fracture: Volume, min_fragment_ml: float = DEFAULT_MIN_FRAGMENT_ML,
                   connectivity: int = 6) -> tuple[Volume, list[float]]:
    """Fragment ids (uint16, 1 = largest) of ``tibia AND NOT fracture`` on the tibia's bounding box (a cropped
    grid, LPS) and the volumes (ml) of the components discarded as smaller than ``min_fragment_ml``."""
    if connectivity not in CONNECTIVITIES:
        raise InputError(f"Connectivity must be 6 (faces) or 26 (faces, edges, corners), got {connectivity}.")
    if not np.isfinite(min_fragment_ml) or min_fragment_ml < 0:
        raise InputError(f"The minimum fragment size must be a number >= 0 ml, got {min_fragment_ml}.")
    box = bounding_box(tibia.array != 0)
    if box is None:
        raise InputError("The tibia mask is empty. Segment the tibia (all fragments) first.")
    tib = crop(tibia, *box)
    frac = crop(fracture, *box)
    if not (fracture.array != 0).any():
        raise InputError("The fracture mask is empty. Paint a coarse mask over the fracture zone (all fracture lines "
                         "and gaps) so that the fragments can be told apart.")
    structure = ndimage.generate_binary_structure(3, 1 if connectivity == 6 else 3)
    labels, n = ndimage.label((tib.array != 0) & (frac.array == 0), structure)
    voxel_ml = float(np.prod(tibia.spacing)) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    order = np.argsort(-counts, kind="stable")
    kept = [int(c) for c in order if counts[c] > 0 and counts[c] * voxel_ml >= min_fragment_ml]
    if not kept:
        largest = f"the largest piece has {counts.max() * voxel_ml:.2f} ml" if n else "nothing of the tibia is " \
                                                                                    "outside the fracture mask"
        raise InputError(f"No fragment of at least {min_fragment_ml:g} ml lies outside the fracture mask ({largest}). "
                         "Check that the fracture mask covers only the fracture zone, or lower the minimum fragment "
                         "size.")
    lut = np.zeros(n + 1, np.uint16)
    lut[np.asarray(kept) + 1] = np.arange(1, len(kept) + 1)
    discarded = [float(counts[c] * voxel_ml) for c in order[len(kept):]]  # sorted by size: the rest
    return tib.with_array(lut[labels]), discarded


def signed_distance(points: np.ndarray, distance: vtk.vtkImplicitPolyDataDistance) -> np.ndarray:
    """Signed distance (mm, positive outside) of LPS points (n, 3) to the closed surface behind ``distance``."""
    out = vtk.vtkDoubleArray()
    distance.FunctionValue(numpy_support.numpy_to_vtk(np.ascontiguousarray(points, dtype=np.float64), deep=True), out)
    return numpy_support.vtk_to_numpy(out).astype(float)


def implicit_distance(surface: vtk.vtkPolyData) -> vtk.vtkImplicitPolyDataDistance:
    """Signed-distance function of a closed LPS surface (negative inside)."""
    distance = vtk.vtkImplicitPolyDataDistance()
    distance.SetInput(surface)
    return distance


def with_deviation(polydata: vtk.vtkPolyData, distance: vtk.vtkImplicitPolyDataDistance) -> vtk.vtkPolyData:
    """A copy of ``polydata`` with point data DEVIATION_ARRAY (signed distance, mm) as active scalars."""
    out = vtk.vtkPolyData()
    out.DeepCopy(polydata)
    add_point_array(out, DEVIATION_ARRAY, signed_distance(polydata_points(polydata), distance), dtype=np.float64)
    return out


def plan_reduction(tibia: Volume, fracture: Volume, prediction: Volume,
                   min_fragment_ml: float = DEFAULT_MIN_FRAGMENT_ML, connectivity: int = 6,
                   cutoff_mm: float | None = None, progress=None) -> ReductionPlan:
    """Reduce every fragment of the fractured tibia onto the predicted healthy tibia (all three masks on one
    grid, LPS). ``cutoff_mm``: the final ICP distance cut-off (default: 1.5 x the coarsest voxel spacing, at
    least 2 mm). ``progress(fraction, message)`` is called as fragments are done. Inputs are not modified."""
    check_same_grid(tibia, fracture, "tibia mask", "fracture mask")
    check_same_grid(tibia, prediction, "tibia mask", "predicted tibia")
    report = progress or (lambda fraction, message: None)
    timings = {}
    t0 = time.perf_counter()
    report(0.0, "finding fragments")
    fragments, discarded = find_fragments(tibia, fracture, min_fragment_ml, connectivity)
    pred_box = bounding_box(prediction.array != 0)
    if pred_box is None:
        raise InputError("The predicted tibia is empty (no nonzero voxel), so there is nothing to reduce the "
                         "fragments onto. Check the prediction labelmap.")
    timings["fragments"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    report(0.05, "surface of the prediction")
    target = labelmap_surface(crop(prediction, *pred_box))
    distance = implicit_distance(target)
    locator = vtk.vtkCellLocator()
    locator.SetDataSet(target)
    locator.SetNumberOfCellsPerBucket(1)
    locator.BuildLocator()
    timings["prediction_surface"] = time.perf_counter() - t0
    cutoff = float(cutoff_mm) if cutoff_mm is not None else max(2.0, 1.5 * float(tibia.spacing.max()))
    if not np.isfinite(cutoff) or cutoff <= 0:
        raise InputError(f"The ICP distance cut-off must be a positive number of mm, got {cutoff_mm}.")
    t0 = time.perf_counter()
    start = np.rint(tibia.grid.physical_to_index(fragments.origin)[::-1]).astype(int)  # (k, j, i) of the crop
    box = tuple(slice(a, a + n) for a, n in zip(start, fragments.array.shape))
    obstacles = fragments.with_array((tibia.array[box] != 0) | (fracture.array[box] != 0))
    n = int(fragments.array.max())
    results = []
    for fid in range(1, n + 1):
        report(0.1 + 0.9 * (fid - 1) / n, f"fragment {fid} of {n}")
        results.append(_reduce_fragment(fid, fragments, obstacles, target, distance, locator, cutoff))
    timings["registration"] = time.perf_counter() - t0
    report(1.0, "done")
    warnings = [f"fragment {f.id}: {w}" for f in results for w in f.warnings]
    return ReductionPlan(results, target, float(min_fragment_ml), connectivity, cutoff, discarded, timings, warnings)


def _reduce_fragment(fid: int, fragments: Volume, obstacles: Volume, target: vtk.vtkPolyData,
                     distance: vtk.vtkImplicitPolyDataDistance, locator: vtk.vtkCellLocator,
                     cutoff: float) -> FragmentReduction:
    """Surface, outer-surface points, ICP and deviation maps of fragment ``fid`` (``obstacles``: tibia or fracture
    voxels, on the grid of ``fragments``)."""
    mine = fragments.array == fid
    voxels = int(mine.sum())
    lo, hi = bounding_box(mine)
    margin = 3  # voxels around the fragment: room for the surface and for the distance to obstacles
    piece = crop(fragments.with_array(mine.astype(np.uint8)), lo - margin, hi + margin)
    surface = labelmap_surface(piece)
    points = polydata_points(surface)
    # distance (mm) from each vertex to the nearest tibia-or-fracture voxel that is not this fragment
    near = crop(obstacles, lo - margin, hi + margin).array & (piece.array == 0)
    free = ndimage.distance_transform_edt(~near, sampling=piece.spacing[::-1]) if near.any() else \
        np.full(piece.array.shape, np.inf)
    ijk = piece.grid.physical_to_index(points)
    kji = np.clip(np.rint(ijk[:, ::-1]).astype(int), 0, np.asarray(piece.array.shape) - 1)
    face = free[tuple(kji.T)] <= 1.5 * float(piece.spacing.max())
    warnings = []
    outer = points[~face]
    if len(outer) < 20:
        warnings.append("almost all of its surface touches the fracture mask; registered with its fracture faces, "
                        "so its reduction is unreliable")
        outer = points
    sample = np.unique(np.linspace(0, len(outer) - 1, MAX_REGISTRATION_POINTS).astype(int))
    matrix, residuals = _register(outer[sample], target, distance, locator, cutoff)
    inliers = np.abs(residuals) <= cutoff
    if inliers.mean() < 0.5:
        warnings.append(f"only {inliers.mean():.0%} of its outer surface lies within {cutoff:.1f} mm of the "
                        "predicted surface after reduction; check its fit")
    add_point_array(surface, FRACTURE_FACE_ARRAY, face, active=False, dtype=np.uint8)
    close = np.abs(residuals[inliers]) if inliers.any() else np.abs(residuals)
    ijk_all = np.argwhere(mine)[:, ::-1].astype(float)
    return FragmentReduction(
        id=fid, voxels=voxels, volume_ml=voxels * float(np.prod(fragments.spacing)) / 1000.0,
        centroid=fragments.grid.index_to_physical(ijk_all.mean(axis=0)), matrix=matrix,
        rms_residual_mm=float(np.sqrt(np.mean(close ** 2))), mean_residual_mm=float(np.mean(close)),
        inlier_fraction=float(inliers.mean()), registration_points=int(len(residuals)),
        surface=with_deviation(surface, distance),
        reduced_surface=with_deviation(transform_polydata(surface, matrix), distance), warnings=warnings)


def _register(points: np.ndarray, target: vtk.vtkPolyData, distance: vtk.vtkImplicitPolyDataDistance,
              locator: vtk.vtkCellLocator, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Rigid 4x4 (LPS) moving ``points`` onto ``target`` and the final signed residuals (mm) of the points.

    ICP rounds with cut-offs of all, 4, 2 and 1 x ``cutoff``; each round keeps the points within the cut-off
    of the surface, or the closest MIN_INLIER_FRACTION of them when fewer are that close."""
    matrix = np.eye(4)
    for factor in (np.inf, 4.0, 2.0, 1.0):
        moved = apply_affine(matrix, points)
        dist = np.abs(signed_distance(moved, distance))
        keep = dist <= max(factor * cutoff, float(np.quantile(dist, MIN_INLIER_FRACTION)))
        matrix = _icp(moved[keep], target, locator) @ matrix
    return matrix, signed_distance(apply_affine(matrix, points), distance)


def _icp(points: np.ndarray, target: vtk.vtkPolyData, locator: vtk.vtkCellLocator) -> np.ndarray:
    """VTK's rigid point-to-surface ICP from the identity: 4x4 moving ``points`` (LPS) onto ``target``."""
    source = vtk.vtkPolyData()
    vpts = vtk.vtkPoints()
    vpts.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(points, dtype=np.float64), deep=True))
    source.SetPoints(vpts)
    icp = vtk.vtkIterativeClosestPointTransform()
    icp.SetSource(source)
    icp.SetTarget(target)
    icp.SetLocator(locator)
    icp.GetLandmarkTransform().SetModeToRigidBody()
    icp.SetMaximumNumberOfLandmarks(len(points))
    icp.SetMaximumNumberOfIterations(ICP_ITERATIONS)
    icp.StartByMatchingCentroidsOff()
    icp.CheckMeanDistanceOn()
    icp.SetMeanDistanceModeToRMS()
    icp.SetMaximumMeanDistance(ICP_STOP_MM)
    icp.Update()
    m = icp.GetMatrix()
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _deviation_stats(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {"mean_abs": None, "rms": None, "max_abs": None, "vertices": 0}
    a = np.abs(values)
    return {"mean_abs": float(a.mean()), "rms": float(np.sqrt(np.mean(a ** 2))), "max_abs": float(a.max()),
            "vertices": int(len(a))}
