"""Contralateral target: the patient's other, healthy tibia mirrored across the body's sagittal plane and
fitted rigidly to the fractured tibia's intact proximal fragment (the classical template for reduction
planning when both legs are in the CT), and its difference to the model's prediction. LPS mm throughout.

1. Mirror the other tibia about the plane x = const half-way between the two tibiae's centroids (LPS x
   is the patient's left-right axis, so this is the body's sagittal plane).
2. Initial fit: the mirrored tibia's long (principal) axis onto the fractured tibia's, then its part
   within the proximal fragment's height below the knee end centred on that fragment.
3. Trimmed ICP (point to plane, rigid) of the proximal main fragment's bone surface onto the mirrored
   tibia's surface. The intact pieces are the tibia mask outside the fracture mask; their surface is the
   tibia mask's boundary at least ``FRACTURE_CLEARANCE_MM`` from the fracture mask and off the CT's border,
   so cut faces do not pull the fit. The proximal main fragment is not simply the largest piece reaching the
   knee end: in a plateau fracture the split condyle reaches the knee too, and the fracture mask may cut the
   main fragment into a plateau piece and a shaft piece. So each sizeable piece seeds a fit; the pieces whose
   surface lies on the fitted tibia join it and the fit is redone on them all (one rigid body: the anchor),
   and the anchor that reaches the knee end (the top 15 % of the tibia's length) with the most bone wins.
   Displaced fragments (a distal shaft fragment, a split condyle) do not lie on that fit and do not pull it.
4. Plausibility: the fit is refused (InputError) when its residual is large or the fitted tibia lies away
   from the fractured one, and gives warnings when it is doubtful (see ``_check_fit``).
5. The other tibia resampled through mirror and fit onto the CT grid (labelmap) and its surface.

Steps 1-4 read the masks on a lattice of about ``FIT_MM`` (every n-th CT voxel along each axis): a fine CT
(0.3 mm in-plane) holds ten times more voxels than the fit needs.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage
from vtkmodules.vtkCommonDataModel import vtkPolyData
from vtkmodules.vtkFiltersCore import vtkImplicitPolyDataDistance

from .errors import InputError, NoOtherLegError, OutputExistsError
from .geometry import (Grid, Volume, apply_affine, boundary_distance, bounding_box, check_same_grid, crop,
                       crop_to_mask, invert_affine, lattice, reflection, resample)
from .io import (check_output_folder, read_mask, read_volume, staged_outputs, volume_suffix, write_json,
                 write_volume)
from .surface import add_point_array, labelmap_surface, polydata_points, transform_polydata, write_stl, write_vtp

FRACTURE_CLEARANCE_MM = 3.0  # fragment surface points at least this far from the fracture mask
KNEE_ZONE = 0.15             # the knee end: this top fraction of the tibia's length
MIN_SEPARATION_MM = 40.0     # the two tibiae's centroids lie at least this far apart along x
# The other leg is segmented only when the CT shows at least BESIDE_ML of bone above BESIDE_HU farther than BESIDE_MM
# to the side of the fractured tibia (one-leg phantoms: at most 0.6 ml; with both legs 178-500 ml)
BESIDE_HU, BESIDE_ML, BESIDE_MM, BESIDE_STEP_MM = 300.0, 20.0, 60.0, 3.0
NO_OTHER_LEG = ("No other leg was found in the CT, so there is no contralateral tibia to mirror. Use the model's "
                "prediction (tibia-recon predict), or give the other tibia's mask (--other-tibia-mask) if the "
                "segmentation missed it.")
MAX_OVERLAP = 0.1            # share of the other tibia allowed inside the fractured tibia mask
MIN_FRAGMENT_SHARE = 0.2     # a proximal fragment smaller than this share of the tibia gives a warning
MIN_PIECE_SHARE = 0.01       # intact pieces smaller than this share of the tibia neither seed nor join a fit
MAX_SEEDS = 6                # the largest this many intact pieces each seed a fit
MIN_PIECE_POINTS = 20        # ... and only with at least this many surface points
INLIER_MM = 3.0              # a surface point lies on the fitted tibia when this close to its surface
JOIN_SHARE = 0.7             # a piece joins a fit when this share of its surface points lie on it
NEAR_MM = 15.0               # the fitted tibia's surface should lie this close to the fractured tibia
MAX_RMS_MM = (2.5, 5.0)      # fit RMS above these: warning, refusal
MIN_INLIERS = (0.8, 0.5)     # share of the anchor's surface on the fitted tibia below these: warning, refusal
MIN_NEAR = (0.8, 0.5)        # share of the fitted tibia's surface near the fractured tibia below these: ditto
ICP_ITERATIONS, ICP_TRIM = 80, 0.9
ICP_STOP = (1e-4, 0.01)      # ICP stops when a step rotates less than this (rad) and moves less than this (mm)
MAX_POINTS = 20000           # surface points of the other tibia (evenly strided)
FIT_POINTS = 5000            # ... and of the intact fragments, which the ICP moves
FIT_MM = 1.0                 # the fit reads the masks every n-th voxel along each axis, n = FIT_MM / spacing (>= 1)
SEGMENT_MM = 0.7             # the other leg is segmented on every n-th voxel along each axis, n = SEGMENT_MM / spacing
DISTANCE_ARRAY = "distance_to_prediction_mm"
Progress = Callable[[float, str], None]


@dataclass
class ContralateralResult:
    """The mirrored, fitted other tibia: ``labelmap`` (uint8 0/1 on the CT grid), ``surface`` (LPS mm; with the
    point-data array DISTANCE_ARRAY after a comparison; both None when not placed), ``transform`` (4x4 LPS, other
    tibia -> target; a reflection), ``other_tibia`` (the other leg's tibia mask used), ``side`` (the fractured leg's:
    'left' when it lies at larger LPS x than the other), the mirror plane, the fit's figures, the comparison with a
    prediction, timings and warnings."""

    labelmap: Volume | None
    surface: vtkPolyData | None
    transform: np.ndarray
    other_tibia: Volume
    side: str
    mirror_plane: dict
    fit: dict
    comparison: dict | None = None
    timings: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)

    def report(self) -> dict:
        """JSON-ready summary."""
        volume = None if self.labelmap is None else \
            float(np.count_nonzero(self.labelmap.array)) * float(np.prod(self.labelmap.spacing)) / 1000.0
        return {"method": "mirrored contralateral tibia, rigid fit to the proximal main fragment", "side": self.side,
                "coordinates": "LPS mm; transform maps the other tibia to the target",
                "transform": self.transform.tolist(), "mirror_plane": self.mirror_plane, "fit": self.fit,
                "volume_ml": volume,
                "comparison_with_prediction": self.comparison, "timings_s": self.timings, "warnings": self.warnings}


def contralateral_target(ct: Volume, tibia: Volume, fracture: Volume, other_tibia: Volume | None = None,
                         prediction=None, progress: Progress | None = None, place: bool = True
                         ) -> ContralateralResult:
    """The contralateral target of a fractured tibia (module docstring).

    ``tibia``: the fractured tibia mask (all fragments), ``fracture``: the coarse fracture mask, ``other_tibia``:
    the other leg's tibia mask, all on the CT grid; without ``other_tibia`` it is segmented from the CT.
    ``prediction`` (a predict.Prediction or a predicted labelmap Volume): also compare with it
    (:func:`compare`). ``place``: False skips step 5 (labelmap and surface None; not with ``prediction``), for
    callers that need only the transform. Inputs are not modified. Raises InputError for empty masks, masks off the
    CT grid, or a CT without the other leg.
    """
    report = progress or (lambda f, m: None)
    clock, timings, warnings = time.perf_counter(), {}, []

    def lap(name):
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 4)
        clock = now

    for name, mask in (("tibia mask", tibia), ("fracture mask", fracture)):
        check_same_grid(ct, mask, "CT", name)
        if not np.any(mask.array):
            raise InputError(f"The {name} is empty; " + ("segment the fractured tibia (all fragments)." if name ==
                             "tibia mask" else "paint a coarse mask over the fracture zone."))
    if other_tibia is None:
        report(0.0, "Segmenting the other leg's tibia")
        other_tibia = _segment_other(ct, tibia, fracture)
        lap("segment")
    else:
        check_same_grid(ct, other_tibia, "CT", "other tibia mask")
        if not np.any(other_tibia.array):
            raise InputError("The other tibia mask is empty. Segment the healthy leg's tibia, or leave the mask out "
                             "to segment it automatically.")
    warnings += [f"The {what} touches the CT's first or last slice: it may be cut off by the field of view, "
                 "which weakens the fit." for what, m in (("other tibia", other_tibia), ("fractured tibia", tibia))
                 if _touches_end(m.array)]
    fit_grid, sub = lattice(ct.grid, FIT_MM)
    tib, frac, other = (v.array[sub] != 0 for v in (tibia, fracture, other_tibia))
    sl, grid = _box(fit_grid, tib, int(np.ceil(FRACTURE_CLEARANCE_MM / fit_grid.spacing.min())) + 2)
    sl_o, grid_o = _box(fit_grid, other, 2)
    tib_c, frac_c, other_c = tib[sl], frac[sl], other[sl_o]
    centroids = _centroid(grid, tib_c), _centroid(grid_o, other_c)
    _check_pair(tib, other, (sl, sl_o), centroids)

    report(0.2, "Finding the intact pieces")
    pieces, n_pieces = ndimage.label(tib_c & ~frac_c)
    if n_pieces == 0:
        raise InputError("The fracture mask covers the whole tibia, so no intact fragment is left to fit the "
                         "contralateral tibia to.")
    # ITK's Maurer distance to the mask's boundary voxels: outside it, the distance to the nearest of its voxels (as
    # scipy's distance transform gives it, 5-10 times slower here)
    clear = boundary_distance(frac_c, grid.spacing) >= FRACTURE_CLEARANCE_MM if frac_c.any() else np.ones_like(frac_c)
    source, _, source_kji = _surface_points(grid, tib_c, (pieces > 0) & clear, with_index=True, limit=FIT_POINTS)
    if len(source) < 50:
        raise InputError("Too little intact bone surface outside the fracture mask to fit the contralateral tibia "
                         "to; use the model's prediction instead.")
    source_piece = pieces[tuple(source_kji.T)]
    other_pts, other_normals = _surface_points(grid_o, other_c, other_c)
    lap("fragment")

    report(0.4, "Mirroring and fitting the other tibia")
    xm = 0.5 * (centroids[0][0] + centroids[1][0])
    mirror = reflection((1.0, 0.0, 0.0), (xm, 0.0, 0.0))
    anchor = _fit_anchor(grid, tib_c, pieces, n_pieces, source, source_piece, mirror,
                         _voxel_points(grid_o, other_c), other_pts, other_normals, warnings)
    fragment, frag_share = anchor["mask"], anchor["share"]
    if frag_share < MIN_FRAGMENT_SHARE:
        warnings.append(f"The intact proximal fragment is only {frag_share:.0%} of the tibia: the fit of the "
                        "contralateral tibia rests on little bone; check it against the CT.")
    transform = anchor["transform"]
    checks = _check_fit(anchor, apply_affine(transform, other_pts), _voxel_points(grid, tib_c | frac_c), warnings)
    lap("fit")

    labelmap = surface = None
    if place or prediction is not None:
        report(0.7, "Resampling the target onto the CT grid")
        labelmap, surface = _place(ct, other_tibia.array != 0, transform)
        lap("resample")
    fit = {"rms_mm": anchor["rms"], "iterations": anchor["iterations"], "fragment_points": anchor["points"],
           "proximal_fragment_share": frag_share,
           "fragment_ml": round(float(fragment.sum() * np.prod(fit_grid.spacing)) / 1000.0, 3),
           "anchor_pieces": anchor["pieces"], "hypotheses": anchor["hypotheses"], **checks}
    plane = {"normal": [1.0, 0.0, 0.0], "point": [xm, 0.0, 0.0]}
    side = "left" if centroids[0][0] > centroids[1][0] else "right"  # left legs lie at larger LPS x
    result = ContralateralResult(labelmap, surface, transform, other_tibia, side, plane, fit, timings=timings,
                                 warnings=warnings)
    if prediction is not None:
        report(0.9, "Comparing with the prediction")
        compare(result, prediction)
        lap("compare")
    report(1.0, "Done")
    return result


def compare(result: ContralateralResult, prediction) -> dict:
    """Dice, RMSD, HD95 and mean surface distance (mm) between the target and ``prediction`` (a
    predict.Prediction or a labelmap Volume on the CT grid); sets ``result.comparison`` and adds the
    point-data array DISTANCE_ARRAY to ``result.surface``: each vertex's signed distance (mm) to the
    prediction's surface, positive outside the predicted bone."""
    from . import metrics  # scipy.stats and scikit-image: 0.6 s to import, needed only here

    if isinstance(prediction, Volume):
        labelmap, surface = prediction, None
    else:
        labelmap, surface = prediction.labelmap, prediction.surface
    check_same_grid(result.labelmap, labelmap, "CT", "prediction")
    pred, target = labelmap.array != 0, result.labelmap.array != 0
    if not pred.any():
        raise InputError("The prediction is empty, so there is nothing to compare the contralateral target with.")
    if surface is None:
        surface = labelmap_surface(_bone_crop(labelmap.with_array(pred.astype(np.uint8))))
    lo, hi = bounding_box(pred | target)
    sl = tuple(slice(max(a - 1, 0), b + 2) for a, b in zip(lo, hi))
    spacing = result.labelmap.spacing
    d_ab, d_ba = metrics.surface_distances(target[sl], pred[sl], spacing)
    d = np.concatenate([d_ab, d_ba])
    distance = vtkImplicitPolyDataDistance()
    distance.SetInput(surface)
    signed = np.array([distance.EvaluateFunction(p) for p in polydata_points(result.surface)])
    add_point_array(result.surface, DISTANCE_ARRAY, signed)
    result.comparison = {
        "dice": metrics.dice(target[sl], pred[sl]), "rmsd_mm": float(np.sqrt(np.mean(d ** 2))),
        "hd95_mm": float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))), "msd_mm": float(d.mean()),
        "vertex_distance_mm": {"mean_abs": float(np.abs(signed).mean()), "max_abs": float(np.abs(signed).max()),
                               "p95_abs": float(np.percentile(np.abs(signed), 95))},
        "distance_sign": "positive where the contralateral surface lies outside the predicted bone"}
    return result.comparison


# ---------------------------------------------------------------------------------------------
# Steps


def _segment_other(ct: Volume, tibia: Volume, fracture: Volume) -> Volume:
    """The other leg's tibia (a mask on the CT grid) from the automatic segmentation (``tibia``: the fractured
    tibia's mask). When the CT's first axis runs along LPS x, only its part beyond the plane half-way between the two
    legs is segmented (half the work), on a lattice (:func:`_segment_on_lattice`); else the whole CT, and of the two
    tibiae found the one apart from ``tibia``."""
    from .segment import segment_tibia

    split = _bone_beside(ct, tibia.array)
    if split is None:
        raise NoOtherLegError(NO_OTHER_LEG)
    x_split, side = split
    along_x = float(ct.direction[0, 0])
    if abs(along_x) > 0.99:  # index i runs along x: keep the columns on the other leg's side of the plane
        i_split = int(np.clip(round((x_split - ct.origin[0]) / (ct.spacing[0] * along_x)), 0, ct.grid.size[0] - 1))
        lo, hi = (i_split, ct.grid.size[0] - 1) if side * along_x > 0 else (0, i_split)
        part = crop(ct, (0, 0, lo), (ct.grid.size[2] - 1, ct.grid.size[1] - 1, hi))
        out = np.zeros(ct.array.shape, np.uint8)
        out[:, :, lo:hi + 1] = _segment_on_lattice(part)
        return ct.with_array(out)
    seg = segment_tibia(ct, "auto", fracture, refine_tibia=False)
    if seg.other_tibia is None:
        raise NoOtherLegError(NO_OTHER_LEG)
    tib = tibia.array != 0
    a, b = seg.tibia.array != 0, seg.other_tibia.array != 0
    return seg.other_tibia if np.count_nonzero(a & tib) >= np.count_nonzero(b & tib) else seg.tibia


def _segment_on_lattice(part: Volume) -> np.ndarray:
    """The tibia mask (uint8, on ``part``'s grid) that the automatic segmentation finds in the CT ``part`` read on a
    lattice of about SEGMENT_MM (on a fine CT, a quarter of the voxels or fewer: the template is used on a grid about
    that fine); each voxel takes the value of its nearest lattice voxel (of two, the next: a quarter of a lattice
    voxel's shift on average, which the fit to the patient's fragment takes up)."""
    from .segment import segment_tibia

    coarse, sub = lattice(part.grid, SEGMENT_MM)
    found = segment_tibia(Volume.on_grid(part.array[sub], coarse), "auto").tibia.array
    for axis, (cut, n) in enumerate(zip(sub, part.array.shape)):
        if cut.step > 1:
            found = np.take(found, np.minimum((np.arange(n) + cut.step // 2) // cut.step, found.shape[axis] - 1), axis)
    return found


def _bone_beside(ct: Volume, tib: np.ndarray) -> tuple[float, float] | None:
    """A quick look for the other leg before segmenting it: bone (above BESIDE_HU) farther than BESIDE_MM to one side
    (LPS x) of the centroid of the tibia mask ``tib`` (nonzero voxels on the CT grid), read on a lattice of about
    BESIDE_STEP_MM. The LPS x half-way between that centroid and the bone's median, and the side (+1 or -1 along x)
    the bone lies on; None when there is less than BESIDE_ML of it."""
    look, sub = lattice(ct.grid, BESIDE_STEP_MM)
    t = tib[sub] != 0
    if not t.any():
        return None
    x = look.index_to_physical(np.argwhere(ct.array[sub] > BESIDE_HU)[:, ::-1].astype(float))[:, 0]
    x_tib = _centroid(look, t)[0]
    plus, minus = x[x > x_tib + BESIDE_MM], x[x < x_tib - BESIDE_MM]
    far = plus if len(plus) >= len(minus) else minus
    if len(far) * float(np.prod(look.spacing)) / 1000.0 < BESIDE_ML:
        return None
    return 0.5 * (x_tib + float(np.median(far))), 1.0 if far is plus else -1.0


def _check_pair(tib: np.ndarray, other: np.ndarray, boxes: tuple, centroids: tuple) -> None:
    """Refuse an other tibia mask that overlaps the fractured one or lies beside it (``boxes``: each mask's array
    slices, from :func:`_box`; ``centroids``: theirs, LPS)."""
    both = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(*boxes))
    overlap = np.count_nonzero(tib[both] & other[both]) if all(c.start < c.stop for c in both) else 0
    if overlap > MAX_OVERLAP * min(np.count_nonzero(tib[boxes[0]]), np.count_nonzero(other[boxes[1]])):
        raise InputError("The other tibia mask overlaps the fractured tibia mask: it must be the healthy leg's tibia, "
                         "not the fractured one.")
    dx = abs(centroids[0][0] - centroids[1][0])
    if dx < MIN_SEPARATION_MM:
        raise InputError(f"The two tibiae lie only {dx:.0f} mm apart left to right (LPS x), so they are not the two "
                         f"legs of one patient (expected at least {MIN_SEPARATION_MM:.0f} mm). Check the masks.")


def _box(grid: Grid, mask: np.ndarray, margin: int) -> tuple[tuple[slice, ...], Grid]:
    """Array slices of ``mask``'s bounding box grown by ``margin`` voxels (within the grid), and that box's grid."""
    lo, hi = bounding_box(mask)
    lo, hi = np.maximum(lo - margin, 0), np.minimum(hi + margin, np.asarray(grid.shape) - 1)
    sub = Grid(tuple((hi - lo + 1)[::-1]), grid.spacing, grid.index_to_physical(lo[::-1].astype(float)), grid.direction)
    return tuple(slice(a, b + 1) for a, b in zip(lo, hi)), sub


def _touches_end(mask: np.ndarray) -> bool:
    return bool(mask[0].any() or mask[-1].any())


def _voxel_points(grid: Grid, mask: np.ndarray, limit: int = 4 * MAX_POINTS) -> np.ndarray:
    """LPS centres of (at most about ``limit``, evenly strided) voxels of ``mask``."""
    kji = np.argwhere(mask)
    kji = kji[::max(1, len(kji) // limit)]
    return grid.index_to_physical(kji[:, ::-1].astype(float))


def _centroid(grid: Grid, mask: np.ndarray) -> np.ndarray:
    return _voxel_points(grid, mask).mean(axis=0)


def _surface_points(grid: Grid, mask: np.ndarray, keep: np.ndarray, with_index: bool = False,
                    limit: int = MAX_POINTS) -> tuple:
    """LPS centres of ``mask``'s boundary voxels (6-neighbour outside) within ``keep``, off the array border
    (about ``limit`` of them, evenly strided), and the outward unit normals there (LPS; from the gradient of the
    mask smoothed by 1.5 voxels); with ``with_index`` also their (k, j, i) indices."""
    edge = mask & ~ndimage.binary_erosion(mask) & keep
    for axis in range(3):
        idx = [slice(None)] * 3
        for end in (0, -1):
            idx[axis] = end
            edge[tuple(idx)] = False
    kji = np.argwhere(edge)
    kji = kji[::max(1, len(kji) // limit)]
    smooth = ndimage.gaussian_filter(mask.astype(np.float32), 1.5)
    # central differences at the points only (they lie off the array border): np.gradient's, without three
    # gradient volumes of the box's size
    grad_kji = np.stack([0.5 * (smooth[tuple((kji + e).T)] - smooth[tuple((kji - e).T)]) for e in np.eye(3, dtype=int)],
                        axis=1)
    normals = -(grad_kji[:, ::-1] / grid.spacing) @ grid.direction.T  # d/d(index) -> d/d(LPS), outward
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-9)
    points = grid.index_to_physical(kji[:, ::-1].astype(float))
    return (points, normals, kji) if with_index else (points, normals)


def _long_axis(points: np.ndarray) -> np.ndarray:
    """Unit principal axis of ``points``, pointing superior (+z, towards the knee)."""
    axis = np.linalg.svd(points - points.mean(axis=0), full_matrices=False)[2][0]
    return axis if axis[2] >= 0 else -axis


def _fit_anchor(grid: Grid, tib: np.ndarray, pieces: np.ndarray, n_pieces: int, source: np.ndarray,
                source_piece: np.ndarray, mirror: np.ndarray, other_vox: np.ndarray, other_pts: np.ndarray,
                other_normals: np.ndarray, warnings: list) -> dict:
    """The proximal main fragment and the fit of the mirrored other tibia to it (module docstring, step 3).

    Each of the largest intact pieces seeds a fit (axis alignment, then ICP); the pieces with at least
    JOIN_SHARE of their surface points within INLIER_MM of the fitted tibia join it, and the fit is redone on
    them all until the set stays put. Of these anchors, one that reaches the knee end with the most voxels
    wins; so once an anchor reaches the knee, smaller seeds that do not are not tried (they could win only by
    taking in its pieces, which it would have taken in too). Returns its voxel mask, share of the tibia, piece ids,
    4x4 transform (other tibia -> target), RMS, iterations, surface points used, share of them within INLIER_MM, and
    a summary of every hypothesis tried."""
    tib_pts = _voxel_points(grid, tib)
    axis = _long_axis(tib_pts)
    t_tib = tib_pts @ axis
    top, length = t_tib.max(), np.ptp(t_tib)
    ids = np.arange(1, n_pieces + 1)
    sizes = ndimage.sum_labels(np.ones(pieces.shape, np.int32), pieces, ids).astype(int)
    n_points = np.bincount(source_piece, minlength=n_pieces + 1)[1:]
    usable = (sizes >= MIN_PIECE_SHARE * np.count_nonzero(tib)) & (n_points >= MIN_PIECE_POINTS)
    if not usable.any():
        usable = n_points == n_points.max()
    kji = np.argwhere(pieces)
    t = grid.index_to_physical(kji[:, ::-1].astype(float)) @ axis
    top_piece = ndimage.maximum(t, pieces[tuple(kji.T)], ids)
    at_knee = np.asarray(top_piece) >= top - KNEE_ZONE * length
    seeds = [int(i) for i in ids[usable][np.argsort(-sizes[usable])][:MAX_SEEDS]]
    mirrored_vox = apply_affine(mirror, other_vox)

    def fit(members, start):
        """ICP of the members' surface onto the mirrored tibia placed by ``start``; the 4x4 other -> target."""
        sel = np.isin(source_piece, members)
        placed = start @ mirror
        m, rms, n_iter = _icp(source[sel], apply_affine(placed, other_pts), other_normals @ placed[:3, :3].T)
        return invert_affine(m) @ placed, rms, n_iter, int(sel.sum())

    def on_surface(transform):
        """Distance (mm) of every intact surface point to the fitted tibia's surface points."""
        return _tree(apply_affine(transform, other_pts)).query(source)[0]

    hypotheses, seen = [], {}
    for seed in seeds:
        if not at_knee[seed - 1] and any(h["reaches_knee"] for h in hypotheses):
            continue  # smaller than a fit that reaches the knee, it could win only by taking in that fit's pieces
        members = (seed,)
        frag_vox = _voxel_points(grid, pieces == seed)
        start = _initial_fit(tib_pts, frag_vox, mirrored_vox)
        transform, rms, n_iter, n_src = fit(members, start)
        for _ in range(4):
            d = on_surface(transform)
            share = np.array([np.mean(d[source_piece == i] <= INLIER_MM) if n_points[i - 1] else 0.0 for i in ids])
            grown = tuple(int(i) for i in ids[usable & (share >= JOIN_SHARE)])
            grown = tuple(sorted(set(grown) | {seed}))
            if grown == members:
                break
            members = grown
            if members in seen:
                break
            transform, rms, n_iter, n_src = fit(members, transform @ invert_affine(mirror))
        if members in seen:
            hypotheses[seen[members]]["seeds"].append(seed)
            continue
        d = on_surface(transform)
        sel = np.isin(source_piece, members)
        voxels = int(sizes[np.asarray(members) - 1].sum())
        seen[members] = len(hypotheses)
        hypotheses.append({"seeds": [seed], "pieces": members, "voxels": voxels,
                           "reaches_knee": bool(at_knee[np.asarray(members) - 1].any()), "rms_mm": rms,
                           "inlier_share": float(np.mean(d[sel] <= INLIER_MM)), "transform": transform,
                           "iterations": n_iter, "points": n_src})
    best = max(hypotheses, key=lambda h: (h["reaches_knee"], h["voxels"]))
    if not best["reaches_knee"]:
        warnings.append("No intact piece of the tibia reaches the knee end; the contralateral tibia was fitted to "
                        "the largest consistent intact bone.")
    mask = np.isin(pieces, best["pieces"])
    summary = [{k: (list(h[k]) if k == "pieces" else h[k]) for k in ("seeds", "pieces", "voxels", "reaches_knee",
                                                                    "rms_mm", "inlier_share")} for h in hypotheses]
    return {"mask": mask, "share": float(best["voxels"] / np.count_nonzero(tib)), "pieces": list(best["pieces"]),
            "transform": best["transform"], "rms": best["rms_mm"], "iterations": best["iterations"],
            "points": best["points"], "inlier_share": best["inlier_share"], "hypotheses": summary}


def _check_fit(anchor: dict, target_pts: np.ndarray, tibia_pts: np.ndarray, warnings: list) -> dict:
    """Refuse (InputError) an implausible fit, warn about a doubtful one: the fit's RMS, the share of the
    anchor's surface on the fitted tibia, and the share of the fitted tibia's surface within NEAR_MM of the
    fractured tibia or the fracture mask (``tibia_pts``). Returns those figures."""
    near = float(np.mean(_tree(tibia_pts).query(target_pts, distance_upper_bound=NEAR_MM)[0] <= NEAR_MM))
    rms, inliers = anchor["rms"], anchor["inlier_share"]
    figures = {"inlier_share": inliers, "near_tibia_share": near}
    problems = []
    if rms > MAX_RMS_MM[1]:
        problems.append(f"the fit's RMS residual is {rms:.1f} mm (limit {MAX_RMS_MM[1]:g} mm)")
    if inliers < MIN_INLIERS[1]:
        problems.append(f"only {inliers:.0%} of the intact fragment's surface lies on the fitted tibia")
    if near < MIN_NEAR[1]:
        problems.append(f"only {near:.0%} of the fitted tibia's surface lies within {NEAR_MM:g} mm of the "
                        "fractured tibia")
    if problems:
        raise InputError("The mirrored contralateral tibia could not be fitted plausibly to the fractured tibia: "
                         + "; ".join(problems) + ". Check the masks (the other tibia must be the healthy leg's, the "
                         "fracture mask must cover the fracture) or use the model's prediction instead.")
    if rms > MAX_RMS_MM[0]:
        warnings.append(f"The contralateral fit's RMS residual is {rms:.1f} mm: the legs may be asymmetric or the "
                        "fit poor; check it against the CT.")
    if inliers < MIN_INLIERS[0]:
        warnings.append(f"Only {inliers:.0%} of the intact fragment's surface lies within {INLIER_MM:g} mm of the "
                        "fitted contralateral tibia; check the fit against the CT.")
    if near < MIN_NEAR[0]:
        warnings.append(f"Only {near:.0%} of the fitted contralateral tibia's surface lies within {NEAR_MM:g} mm of "
                        "the fractured tibia; check the fit against the CT.")
    return figures


def _tree(points: np.ndarray):
    """A k-d tree of ``points`` (scipy.spatial takes 0.2 s to import: only once a fit is made, not for a CT of one
    leg)."""
    from scipy.spatial import cKDTree

    return cKDTree(points)


def _rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest rotation (3x3) taking unit vector ``a`` to unit vector ``b``."""
    v, c = np.cross(a, b), float(a @ b)
    k = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + k + k @ k / (1.0 + c) if c > -0.999 else -np.eye(3)


def _initial_fit(tibia_pts: np.ndarray, fragment_pts: np.ndarray, mirrored_pts: np.ndarray) -> np.ndarray:
    """4x4 rigid move of the mirrored tibia: long axis onto the fractured tibia's, and its part within the
    fragment's height below the knee end centred on the fragment."""
    a_t, a_m = _long_axis(tibia_pts), _long_axis(mirrored_pts)
    rot = np.eye(4)
    rot[:3, :3] = _rotation_between(a_m, a_t)
    c = mirrored_pts.mean(axis=0)
    rot[:3, 3] = c - rot[:3, :3] @ c
    moved = apply_affine(rot, mirrored_pts)
    reach = (tibia_pts @ a_t).max() - (fragment_pts @ a_t).min()
    t = moved @ a_t
    part = moved[t >= t.max() - reach]
    rot[:3, 3] += fragment_pts.mean(axis=0) - part.mean(axis=0)
    return rot


def _small_rotation(w: np.ndarray) -> np.ndarray:
    """Rotation matrix of the rotation vector ``w`` (rad)."""
    angle = float(np.linalg.norm(w))
    if angle < 1e-12:
        return np.eye(3)
    k = np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]]) / angle
    return np.eye(3) + np.sin(angle) * k + (1.0 - np.cos(angle)) * k @ k


def _icp(source: np.ndarray, target: np.ndarray, normals: np.ndarray) -> tuple[np.ndarray, float, int]:
    """Rigid 4x4 taking ``source`` points onto the surface sampled by ``target`` points with unit ``normals``
    (trimmed point-to-plane ICP: the ICP_TRIM closest matches count); the RMS point-to-point distance over
    those matches (mm) and the iterations used. Returns the pose of lowest RMS met, so it never diverges."""
    tree = _tree(target)
    m = np.eye(4)
    best = (np.inf, m, 0)
    for iteration in range(1, ICP_ITERATIONS + 1):
        p = apply_affine(m, source)
        d, idx = tree.query(p)
        keep = d <= np.quantile(d, ICP_TRIM)
        rms = float(np.sqrt(np.mean(d[keep] ** 2)))  # of the pose m
        if rms < best[0]:
            best = (rms, m, iteration)
        p, q, n = p[keep], target[idx[keep]], normals[idx[keep]]
        a = np.concatenate([np.cross(p, n), n], axis=1)
        x = np.linalg.lstsq(a, np.einsum("ij,ij->i", q - p, n), rcond=None)[0]
        step = np.eye(4)
        step[:3, :3], step[:3, 3] = _small_rotation(x[:3]), x[3:]
        m = step @ m
        if np.linalg.norm(x[:3]) < ICP_STOP[0] and np.linalg.norm(x[3:]) < ICP_STOP[1]:
            break
    d = tree.query(apply_affine(m, source))[0]
    rms = float(np.sqrt(np.mean(d[d <= np.quantile(d, ICP_TRIM)] ** 2)))
    if rms <= best[0]:
        return m, rms, iteration
    return best[1], best[0], iteration  # point to plane steps can run away on a small, flat piece: keep the best


def _bone_crop(mask: Volume) -> Volume:
    """``mask`` cropped to its nonzero voxels and at least two voxels around them."""
    return crop_to_mask(mask, mask, 2.0 * float(mask.spacing.max()))


def _place(ct: Volume, other: np.ndarray, transform: np.ndarray) -> tuple[Volume, vtkPolyData]:
    """The other tibia moved by ``transform``: a labelmap on the CT grid (linear interpolation of the mask,
    threshold 0.5, on the box it lands in) and its surface (LPS)."""
    source = _bone_crop(ct.with_array(other.astype(np.float32)))
    corners = apply_affine(transform, source.grid.corners())
    ijk = ct.grid.physical_to_index(corners)
    lo = np.maximum(np.floor(ijk.min(axis=0)).astype(int) - 1, 0)[::-1]
    hi = np.minimum(np.ceil(ijk.max(axis=0)).astype(int) + 1, np.asarray(ct.grid.size) - 1)[::-1]
    out = np.zeros(ct.grid.shape, np.uint8)
    if np.all(hi >= lo):
        box = crop(ct.with_array(out), lo, hi).grid
        moved = resample(source, box, output_to_input=invert_affine(transform), default_value=0.0)
        out[tuple(slice(a, b + 1) for a, b in zip(lo, hi))] = moved.array >= 0.5
    labelmap = ct.with_array(out)
    if not out.any():
        raise InputError("The fitted contralateral tibia lies outside the CT; check the masks.")
    surface = transform_polydata(labelmap_surface(source.with_array((source.array >= 0.5).astype(np.uint8))),
                                 transform)
    return labelmap, surface


# ---------------------------------------------------------------------------------------------
# Command line: tibia-recon contralateral


def output_paths(out: Path, suffix: str, auto_other: bool = False, compared: bool = False) -> dict[str, Path]:
    """The files `contralateral` writes into ``out`` (volumes in the CT's format)."""
    suffix = suffix or ".nrrd"
    paths = {"label": out / f"contralateral_tibia_label{suffix}", "stl_lps": out / "contralateral_tibia_LPS.stl",
             "stl_ras": out / "contralateral_tibia_RAS.stl", "report": out / "contralateral.json"}
    if compared:
        paths["distances"] = out / "contralateral_vs_prediction_LPS.vtp"
    if auto_other:
        paths["other_tibia_mask"] = out / f"other_tibia_mask_auto{suffix}"
    return paths


def run_contralateral(ct_path, tibia_path, fracture_path, out, other_path=None, prediction_path=None,
                      tibia_label=None, overwrite: bool = False) -> tuple[ContralateralResult, dict[str, Path]]:
    """Read inputs, build the contralateral target (and compare it with a predicted labelmap), write all
    outputs together or none (nothing is written if an output exists and ``overwrite`` is false)."""
    out = Path(out)
    suffix = ".nrrd" if Path(ct_path).is_dir() else volume_suffix(ct_path)
    paths = output_paths(out, suffix, other_path is None, prediction_path is not None)
    clash = [str(p) for p in paths.values() if p.exists()]
    if clash and not overwrite:
        raise OutputExistsError(f"Output files already exist: {', '.join(clash)}. They were left untouched; choose "
                                "another --out folder or pass --overwrite.")
    check_output_folder(out)
    ct = read_volume(ct_path)
    tibia = read_mask(tibia_path, ct, "tibia mask", tibia_label)
    fracture = read_mask(fracture_path, ct, "fracture mask")
    other = read_mask(other_path, ct, "other tibia mask") if other_path is not None else None
    prediction = read_mask(prediction_path, ct, "prediction") if prediction_path is not None else None
    result = contralateral_target(ct, tibia, fracture, other, prediction)
    report = result.report()
    report["inputs"] = {"ct": str(ct_path), "tibia_mask": str(tibia_path), "fracture_mask": str(fracture_path),
                        "other_tibia_mask": str(other_path or "automatic segmentation"),
                        "prediction": None if prediction_path is None else str(prediction_path)}
    report["outputs"] = {k: str(v) for k, v in paths.items()}
    with staged_outputs(paths, overwrite) as staged:
        write_volume(result.labelmap, staged["label"], label=True)
        write_stl(result.surface, staged["stl_lps"], "LPS")
        write_stl(result.surface, staged["stl_ras"], "RAS")
        if "distances" in staged:
            write_vtp(result.surface, staged["distances"])
        if "other_tibia_mask" in staged:
            write_volume(result.other_tibia, staged["other_tibia_mask"], label=True)
        write_json(report, staged["report"])
    return result, paths


def register_cli(sub) -> None:
    from .cli import add_case_arguments

    p = sub.add_parser("contralateral", help="the mirrored healthy other leg as target; its difference to a prediction",
                       description="When both legs are in the CT: mirror the healthy other tibia across the body's "
                                   "sagittal plane and fit it rigidly to the fractured tibia's intact proximal "
                                   "fragment. Writes contralateral_tibia_label (same format as the CT), the surface as "
                                   "STL in LPS and RAS, and contralateral.json (transform, fit, warnings); with "
                                   "--prediction also Dice/RMSD/HD95 against it in the report and "
                                   "contralateral_vs_prediction_LPS.vtp (the surface with each vertex's signed "
                                   "distance to the prediction, mm). Coordinates LPS mm.")
    add_case_arguments(p, "CT with both legs (NRRD, NIfTI, MHA or DICOM folder)",
                       "fractured tibia mask on the CT grid, all fragments")
    p.add_argument("--other-tibia-mask", default=None,
                   help="the healthy leg's tibia mask on the CT grid (default: segment it automatically and save it)")
    p.add_argument("--prediction", default=None,
                   help="predicted tibia labelmap on the CT grid (predicted_tibia_label of `predict`) to compare")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")

    def run(a: argparse.Namespace) -> None:
        from .cli import print_outputs

        result, paths = run_contralateral(a.ct, a.tibia_mask, a.fracture_mask, a.out, a.other_tibia_mask,
                                          a.prediction, a.tibia_label, a.overwrite)
        line = f"contralateral tibia {result.report()['volume_ml']:.1f} ml; fit RMS {result.fit['rms_mm']:.2f} mm"
        if result.comparison is not None:
            c = result.comparison
            line += f"; vs prediction Dice {c['dice']:.3f}, RMSD {c['rmsd_mm']:.2f} mm, HD95 {c['hd95_mm']:.2f} mm"
        print(line)
        print_outputs(paths, result.warnings)

    p.set_defaults(func=run)
