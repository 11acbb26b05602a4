"""Automatic tibia segmentation of a lower-leg CT in Hounsfield units, fragments included, so that
the surgeon only marks the fracture. Classical image processing: fast, no training, no GPU.

Pipeline (points in LPS mm): crop the CT to its bone; resample it linearly onto an isotropic
working grid of ``WORK_MM`` with identity direction (array axes along x, y, z); bone mask by
hysteresis threshold with the marrow filled; split the mask into pieces where bones touch (slice
tracking, :mod:`segment_bones`); group the pieces by leg and pick each leg's tibia: the thick
piece beside the fibula plus its fragments, without fibula, femur, patella and talus
(:mod:`segment_legs`); map the tibia back onto the CT grid and refine its surface with the CT's
own voxels (within ``BAND_MM`` of the working surface, at the local half-height of the bone edge).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from .checks import fibula_side
from .errors import InputError, OutputExistsError
from .geometry import Grid, Volume, bounding_box, check_same_grid, crop, resample
from .io import as_label, read_mask, read_volume, volume_suffix, write_json, write_volume
from .segment_bones import Pieces, bone_mask, fill_open_canal, split_pieces
from .segment_legs import LegTibia, cut_ankles, leg_tibia, split_legs

WORK_MM = 1.25              # working grid voxel size
LOW_HU, HIGH_HU = 140.0, 500.0  # bone: above LOW_HU and connected to voxels above HIGH_HU (cortex)
# Touching bones are parted along cortex brighter than RIDGE_HU, or than RIDGE_FRACTION of the CT's cortical level (the
# 99th percentile of its bone) where that is lower: weak bone (osteoporosis, a high tube voltage) or a soft kernel dims
# a thin cortex below a fixed ridge, and the fibula's head then merges into the tibia (held-out phantoms with bone HU x
# 0.6: 8-17 ml of fibula in the other leg's tibia, none with the fraction)
RIDGE_HU, RIDGE_FRACTION, CORTEX_PERCENTILE = 600.0, 0.45, 99.0
BAND_MM = 2.5               # the surface is refined within this depth below the working surface
EDGE_WINDOW_MM = 3.0        # window of the local surface level (half-way between local max and min HU)
CANAL_GAP_MM = 8.0          # fracture gaps up to this wide are bridged to fill the marrow behind them
MARGIN_MM = 5.0             # margin around the bone when cropping
MIN_FRAGMENT_ML = 0.5       # pieces counted as fragments when comparing legs
TOTALSEGMENTATOR_TIBIA = 2  # TotalSegmentator v2 'appendicular_bones' task: 2 = tibia (the 'total' task has none)
SIDES = ("auto", "left", "right")
Progress = Callable[[float, str], None]


@dataclass
class SegmentationResult:
    """The tibia (uint8 0/1 on the CT grid, fragments included), which leg it is, the other leg's
    tibia when both legs are in the CT, timings (s) and warnings."""

    tibia: Volume
    side: str
    other_tibia: Volume | None = None
    timings: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)

    def report(self) -> dict:
        """JSON-ready summary: side, voxel counts and volumes, timings, warnings."""
        voxel_ml = float(np.prod(self.tibia.spacing)) / 1000.0
        counts = {name: None if v is None else int(np.count_nonzero(v.array))
                  for name, v in (("tibia", self.tibia), ("other_tibia", self.other_tibia))}
        return {"side": self.side, **{f"{k}_voxels": v for k, v in counts.items()},
                **{f"{k}_ml": None if v is None else v * voxel_ml for k, v in counts.items()},
                "timings_s": self.timings, "warnings": self.warnings}


def segment_tibia(ct: Volume, side: str = "auto", fracture_mask: Volume | None = None,
                  progress: Progress | None = None, refine_tibia: bool = True) -> SegmentationResult:
    """Segment the tibia (all fragments) of a lower-leg CT in HU.

    ``side``: 'left' or 'right' (the patient's; left = larger LPS x) picks that leg when both legs
    are in the CT; 'auto' picks the leg holding the fracture mask, else the more fragmented tibia.
    ``fracture_mask`` (optional, on the CT grid): pieces mostly inside it join the tibia unless
    they are fibula. ``progress(fraction, message)`` is called along the way. ``refine_tibia``:
    False maps the chosen tibia onto the CT grid without refining its surface (for callers that need
    only the other leg's). Inputs are not modified. Raises InputError for an image that is not a CT
    in HU or shows no tibia.
    """
    report = progress or (lambda f, m: None)
    if side not in SIDES:
        raise InputError(f"Unknown side {side!r}; use 'left', 'right' or 'auto'.")
    clock = _Clock()
    report(0.0, "Checking the CT")
    _check_ct(ct)
    if fracture_mask is not None:
        check_same_grid(ct, fracture_mask, "CT", "fracture mask")
    region = _bone_region(ct)
    clock.lap("check")
    report(0.1, "Resampling to the working grid")
    work = _working_volume(ct, *region)
    clock.lap("resample")
    report(0.3, "Finding the bones")
    bone = bone_mask(work.array, LOW_HU, HIGH_HU)
    labels, n = split_pieces(bone, work.array, WORK_MM, ridge_hu=_ridge_hu(work.array, bone))
    pieces = Pieces.measure(labels, n, work.origin, WORK_MM)
    labels, n = cut_ankles(pieces)
    if n > pieces.n:
        pieces = Pieces.measure(labels, n, work.origin, WORK_MM)
    clock.lap("bones")
    report(0.6, "Identifying the tibia")
    in_fracture = _fracture_fractions(pieces, fracture_mask, work.grid)
    groups = split_legs(pieces, np.arange(1, n + 1))
    legs = [leg_tibia(pieces, ids, in_fracture) for ids in groups]
    chosen, other, chosen_side = _choose_leg(pieces, legs, len(groups), side, in_fracture)
    clock.lap("identify")
    report(0.7, "Refining the tibia surface on the CT grid")
    tibia = _on_ct_grid(ct, _solid(pieces, chosen), work.grid, refine_tibia)
    warnings = []
    if chosen_side is None:  # one leg in the CT
        chosen_side, warnings = _single_leg_side(pieces, chosen, side, fibula_side(ct, tibia))
    other_tibia = None if other is None else _on_ct_grid(ct, _solid(pieces, other), work.grid)
    clock.lap("refine")
    report(1.0, "Done")
    return SegmentationResult(tibia, chosen_side, other_tibia, clock.laps, warnings)


class _Clock:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._t, 4)
        self._t = now


def _check_ct(ct: Volume) -> None:
    arr = ct.array
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(f"The CT has voxel type {arr.dtype}; a CT must hold real numbers (HU).")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise InputError("The CT contains NaN or infinite voxels; fix or replace them (e.g. with -1000 HU) first.")
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0:
        raise InputError(f"The image does not look like a CT in Hounsfield units: it has no negative values "
                         f"(range {lo:.4g}..{hi:.4g}), but air and fat are below 0 HU. Give the original CT, or "
                         "apply the DICOM rescale slope/intercept (often -1024) first; MR and normalised images "
                         "are not supported.")
    if hi <= HIGH_HU:
        raise InputError(f"No bone found: no voxel is above {HIGH_HU:.0f} HU (the CT's maximum is {hi:.4g}), "
                         "but cortical bone is 1200-1900 HU. Check that this is a CT of the lower leg in HU.")


def _bone_region(ct: Volume) -> tuple[np.ndarray, np.ndarray]:
    """LPS box (lo, hi corners, mm) of the voxels above HIGH_HU, found on a ~2 mm subsample and
    grown by MARGIN_MM."""
    stride = np.maximum(1, (2.0 / ct.spacing[::-1]).astype(int))
    kji = np.argwhere(ct.array[::stride[0], ::stride[1], ::stride[2]] > HIGH_HU) * stride
    if not len(kji):  # only specks of bone, missed by the subsample
        stride = np.ones(3, int)
        kji = np.argwhere(ct.array > HIGH_HU)
    points = ct.index_to_physical(kji[:, ::-1].astype(float))
    margin = MARGIN_MM + float(np.max(stride * ct.spacing[::-1]))
    return points.min(axis=0) - margin, points.max(axis=0) + margin


def _working_volume(ct: Volume, lo: np.ndarray, hi: np.ndarray) -> Volume:
    """The CT (float32 HU) over the LPS box lo..hi on an identity-direction grid of WORK_MM voxels
    (air outside the CT)."""
    grid = Grid(tuple(np.ceil((hi - lo) / WORK_MM).astype(int) + 1), np.full(3, WORK_MM), lo)
    kji = ct.physical_to_index(grid.corners())[:, ::-1]
    sub = crop(ct, np.floor(kji.min(axis=0)).astype(int) - 1, np.ceil(kji.max(axis=0)).astype(int) + 1)
    return resample(sub, grid, default_value=-1000.0, dtype=np.float32)


def _ridge_hu(hu: np.ndarray, bone: np.ndarray) -> float:
    """The HU above which cortex parts touching bones (RIDGE_HU, lower in a CT whose bone is dim)."""
    return min(RIDGE_HU, RIDGE_FRACTION * float(np.percentile(hu[bone], CORTEX_PERCENTILE))) if bone.any() else RIDGE_HU


def _fracture_fractions(pieces: Pieces, fracture_mask: Volume | None, grid: Grid) -> np.ndarray:
    """Fraction of each piece's voxels inside the fracture mask (index = piece id)."""
    if fracture_mask is None:
        return np.zeros(pieces.n + 1)
    inside = resample(fracture_mask.with_array((fracture_mask.array != 0).astype(np.uint8)), grid,
                      interpolation="nearest").array > 0
    total = np.bincount(pieces.labels.ravel(), minlength=pieces.n + 1)
    hit = np.bincount(pieces.labels[inside], minlength=pieces.n + 1)
    return hit / np.maximum(total, 1)


def _choose_leg(pieces: Pieces, legs: list[LegTibia | None], n_groups: int, side: str,
                in_fracture: np.ndarray) -> tuple[LegTibia, LegTibia | None, str | None]:
    """The requested (or automatically chosen) leg's tibia, the other leg's and the side; with one leg in the CT,
    that leg, None and None (its side: :func:`_single_leg_side`)."""
    found = [leg for leg in legs if leg is not None]
    if not found:
        raise InputError("No tibia found: the CT has bone but no thick long bone of a lower leg. Check that the "
                         "CT shows the lower leg (knee to ankle) in HU.")
    if n_groups == 2 and len(found) == 2:
        by_side = {"right": legs[0], "left": legs[1]}  # LPS: the patient's left is at larger x
        if side == "auto":
            side = _auto_side(pieces, by_side, in_fracture)
        return by_side[side], by_side["left" if side == "right" else "right"], side
    return found[0], None, None


def _auto_side(pieces: Pieces, by_side: dict[str, LegTibia], in_fracture: np.ndarray) -> str:
    """Both legs in view: the leg with the fracture mask on its tibia, else the more fragmented tibia."""
    marked = {s: float((pieces.volume_ml(leg.ids) * in_fracture[leg.ids]).sum()) for s, leg in by_side.items()}
    if max(marked.values()) > 0:
        return max(marked, key=marked.get)
    fragments = {s: int(np.count_nonzero(pieces.volume_ml(leg.ids) >= MIN_FRAGMENT_ML)) for s, leg in by_side.items()}
    if fragments["left"] == fragments["right"]:
        raise InputError("Both legs are in the CT and neither tibia is visibly more fragmented; pass side='left' "
                         "or 'right' (--side), or give the fracture mask.")
    return max(fragments, key=fragments.get)


def _single_leg_side(pieces: Pieces, leg: LegTibia, side: str, from_fibula: str | None) -> tuple[str, list[str]]:
    """The only leg's side and warnings: the side the fibula tells (``from_fibula``, :func:`checks.fibula_side` on
    the segmented tibia), else its position."""
    if from_fibula is not None:
        guess, why = from_fibula, "the fibula's position"
    else:
        guess, why = ("left" if pieces.centroid(leg.main)[0] > 0 else "right"), "its position (x > 0: left)"
    warnings = []
    if side == "auto" and from_fibula is None:
        warnings.append(f"The fibula did not tell the side, so the leg was taken as the {guess} one from {why}; pass "
                        "side='left' or 'right' if that is wrong.")
    if side != "auto" and side != guess:
        warnings.append(f"Only one leg is in the CT and it looks like a {guess} leg (from {why}), but side "
                        f"'{side}' was requested; its tibia was segmented and labelled '{side}'.")
    return guess if side == "auto" else side, warnings


def _solid(pieces: Pieces, leg: LegTibia) -> np.ndarray:
    """The working-grid mask of the leg's tibia pieces, cut at its ankle floor, with marrow that a
    fracture opened filled (but not other bones)."""
    mask = np.isin(pieces.labels, leg.ids)
    if leg.floor_z is not None:
        mask[pieces.z(np.arange(mask.shape[0])) < leg.floor_z] = False
    return fill_open_canal(mask, max(1, int(round(CANAL_GAP_MM / 2 / pieces.spacing))), pieces.labels == 0)


def _on_ct_grid(ct: Volume, mask: np.ndarray, work: Grid, refine: bool = True) -> Volume:
    """The working-grid tibia ``mask`` as a uint8 volume on the CT grid with (``refine``) its surface
    refined by the CT: within BAND_MM below the working surface, voxels at or below the local edge
    level (:func:`_edge_level`) that connect to the outside through such voxels are peeled off."""
    step = float(work.spacing[0])
    r = np.arange(-int(BAND_MM / step), int(BAND_MM / step) + 1)
    ball = (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) * step**2 <= BAND_MM**2
    field = mask.astype(np.float32) + ndimage.binary_erosion(mask, ball)
    box = np.array(bounding_box(mask))
    corners = np.array([[i, j, k] for i in box[:, 2] for j in box[:, 1] for k in box[:, 0]], dtype=float)
    box_ct = ct.physical_to_index(work.index_to_physical(corners))[:, ::-1]
    lo = np.maximum(np.floor(box_ct.min(axis=0)).astype(int) - 2, 0)
    hi = np.ceil(box_ct.max(axis=0)).astype(int) + 2
    sub = crop(ct, lo, hi)
    f = resample(Volume.on_grid(field, work), sub.grid, default_value=0.0).array
    inside = f >= 0.5
    out = np.zeros(ct.array.shape, np.uint8)
    where = tuple(slice(a, a + n) for a, n in zip(lo, inside.shape))
    if not refine:
        out[where] = inside
        return ct.with_array(out)
    band = np.nonzero(inside & (f < 1.5))
    level, pool = _edge_level(sub)
    dark = sub.array[band] <= level[tuple(c // p for c, p in zip(band, pool))]
    low = np.zeros(inside.shape, bool)
    low[tuple(c[dark] for c in band)] = True
    reach, _ = ndimage.label(low | ~inside)
    outside = np.bincount(reach[~inside], minlength=reach.max() + 1) > 0
    outside[0] = False
    out[where] = inside & ~outside[reach]
    return ct.with_array(out)


def _edge_level(ct: Volume) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Local surface level (HU): half-way between the local maximum and minimum within about
    EDGE_WINDOW_MM, i.e. the half-height of each local bone/soft-tissue step (cortex or trabecular).
    Returned on a grid pooled by 2 along axes finer than 1 mm (speed), with the pooling factors."""
    pool = tuple(int(f) for f in np.where(ct.spacing[::-1] < 1.0, 2, 1))
    size = tuple(int(max(3, 2 * round(0.5 * EDGE_WINDOW_MM / s) + 1)) for s in ct.spacing[::-1] * pool)
    hi = ndimage.maximum_filter(_pool(ct.array, pool, np.maximum), size)
    lo = ndimage.minimum_filter(_pool(ct.array, pool, np.minimum), size)
    return 0.5 * (hi.astype(np.float32) + lo), pool


def _pool(a: np.ndarray, factors: tuple[int, int, int], reduce: np.ufunc) -> np.ndarray:
    """Block-reduce ``a`` by ``factors`` per axis (1 or 2; an odd edge is its own block)."""
    for axis, f in enumerate(factors):
        if f == 2:
            a = np.moveaxis(a, axis, 0)
            even = reduce(a[0:a.shape[0] - 1:2], a[1::2])
            a = np.moveaxis(np.concatenate([even, a[-1:]]) if a.shape[0] % 2 else even, 0, axis)
    return a


# ---------------------------------------------------------------------------------------------
# Tibia masks from label maps (TotalSegmentator or any label file)

LABEL_SOURCES = {"totalsegmentator": TOTALSEGMENTATOR_TIBIA}


def tibia_from_label_map(labels: Volume, label_value: int | None = None, source: str = "totalsegmentator",
                         side: str | None = None) -> Volume:
    """The tibia mask (uint8 0/1, same grid) of a label map: voxels equal to ``label_value``, or
    without one to the tibia's value in ``source``: 'totalsegmentator' = 2, the tibia of its v2
    'appendicular_bones' task (its 'total' task has no tibia class). A map that labels both tibiae
    with one value keeps only the ``side`` ('left' = larger LPS x) leg's when ``side`` is given.
    """
    if label_value is None:
        if source not in LABEL_SOURCES:
            raise InputError(f"Unknown label source {source!r}; give the tibia's label value (--label-value) or use "
                             f"one of {', '.join(LABEL_SOURCES)}.")
        label_value = LABEL_SOURCES[source]
    if side not in (None, "auto", "left", "right"):
        raise InputError(f"Unknown side {side!r}; use 'left', 'right' or leave it out.")
    arr = as_label(labels, "label map").array
    mask = arr == label_value
    if not mask.any():
        present = np.unique(arr)
        raise InputError(f"The label map has no voxel with value {label_value} (values present: "
                         f"{', '.join(str(v) for v in present[:20])}). For TotalSegmentator, run its "
                         "'appendicular_bones' task (tibia = 2); otherwise give the tibia's value (--label-value).")
    if side in ("left", "right"):
        mask = _one_leg(labels, mask, side)
    return labels.with_array(mask.astype(np.uint8))


def _one_leg(grid_volume: Volume, mask: np.ndarray, side: str, min_gap_mm: float = 15.0) -> np.ndarray:
    """Only the ``side`` leg's part of ``mask`` when an empty band of at least ``min_gap_mm`` along x
    splits it into two parts of at least 20% each; else ``mask`` unchanged."""
    kji = np.argwhere(mask)
    x = grid_volume.index_to_physical(kji[:, ::-1].astype(float))[:, 0]
    order = np.sort(x)
    gaps = np.diff(order)
    n = int(np.argmax(gaps)) if len(gaps) else 0
    if not len(gaps) or gaps[n] < min_gap_mm or min(n + 1, len(x) - n - 1) < 0.2 * len(x):
        return mask
    cut = 0.5 * (order[n] + order[n + 1])
    keep = x > cut if side == "left" else x < cut
    out = np.zeros_like(mask)
    out[tuple(kji[keep].T)] = True
    return out


# ---------------------------------------------------------------------------------------------
# Command line: tibia-recon segment


def output_paths(out: Path, suffix: str) -> dict[str, Path]:
    """The files `segment` writes into ``out`` (masks in the CT's format)."""
    suffix = suffix or ".nrrd"
    return {"tibia": out / f"tibia_mask{suffix}", "other_tibia": out / f"other_tibia_mask{suffix}",
            "report": out / "segment.json"}


def run_segment(ct_path, out, side: str = "auto", fracture_path=None, labels_path=None, label_value=None,
                overwrite: bool = False) -> tuple[SegmentationResult, dict[str, Path]]:
    """Read the CT (and masks), segment (or take the tibia from a label map), write the mask(s) and
    segment.json into ``out``. Nothing is written if an output exists and ``overwrite`` is false."""
    out = Path(out)
    paths = output_paths(out, "" if Path(ct_path).is_dir() else volume_suffix(ct_path))
    clash = [str(p) for p in paths.values() if p.exists()]
    if clash and not overwrite:
        raise OutputExistsError(f"Output files already exist: {', '.join(clash)}. They were left untouched; choose "
                                "another --out folder or pass --overwrite.")
    ct = read_volume(ct_path)
    if labels_path is not None:
        labels = read_volume(labels_path, label=True)
        check_same_grid(ct, labels, "CT", f"label map ({labels_path})")
        t0 = time.perf_counter()
        tibia = tibia_from_label_map(labels, label_value, side=None if side == "auto" else side)
        result = SegmentationResult(tibia, "unknown" if side == "auto" else side,
                                    timings={"label_map": round(time.perf_counter() - t0, 4)})
    else:
        fracture = read_mask(fracture_path, ct, "fracture mask") if fracture_path is not None else None
        result = segment_tibia(ct, side, fracture)
    write_volume(result.tibia, paths["tibia"], label=True, overwrite=overwrite)
    written = {"tibia": paths["tibia"], "report": paths["report"]}
    if result.other_tibia is not None:
        write_volume(result.other_tibia, paths["other_tibia"], label=True, overwrite=overwrite)
        written["other_tibia"] = paths["other_tibia"]
    report = result.report()
    report["inputs"] = {"ct": str(ct_path), "fracture_mask": None if fracture_path is None else str(fracture_path),
                        "label_map": None if labels_path is None else str(labels_path), "label_value": label_value}
    report["method"] = "label map" if labels_path is not None else "automatic"
    report["outputs"] = {k: str(v) for k, v in written.items()}
    write_json(report, paths["report"], overwrite=overwrite)
    return result, written


def register_cli(sub) -> None:
    p = sub.add_parser("segment", help="automatic tibia mask (fragments included) of a lower-leg CT",
                       description="Segment the tibia of a lower-leg CT in HU, displaced fragments included and "
                                   "fibula, femur, patella and talus excluded, so that only the fracture needs "
                                   "marking. Writes tibia_mask (same format as the CT), other_tibia_mask when both "
                                   "legs are in the CT, and segment.json (side, voxel counts, timings). With "
                                   "--labels, the tibia is taken from a label map (e.g. TotalSegmentator) instead.")
    p.add_argument("--ct", required=True, help="CT in HU (NRRD, NIfTI, MHA or DICOM folder)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--side", default="auto", choices=SIDES,
                   help="which leg when both are in the CT (patient's left/right; default auto: the fractured one)")
    p.add_argument("--fracture-mask", default=None, help="optional coarse fracture mask on the CT grid")
    p.add_argument("--labels", default=None, help="label map on the CT grid to take the tibia from instead")
    p.add_argument("--label-value", type=int, default=None,
                   help=f"tibia value in --labels (default {TOTALSEGMENTATOR_TIBIA}: TotalSegmentator "
                        "'appendicular_bones')")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")

    def run(a):
        from .cli import print_outputs

        result, paths = run_segment(a.ct, a.out, a.side, a.fracture_mask, a.labels, a.label_value, a.overwrite)
        r = result.report()
        print(f"side {result.side}; tibia {r['tibia_ml']:.1f} ml ({r['tibia_voxels']} voxels); "
              f"{sum(result.timings.values()):.2f} s")
        print_outputs(paths, result.warnings)

    p.set_defaults(func=run)
