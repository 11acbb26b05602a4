"""Which bone pieces form each leg's tibia (helpers of :mod:`segment`; working grid, LPS mm).

Rules, from lower-leg anatomy: the fibula is the long thin bone beside the tibia, posterior and
lateral to it; the femur and patella lie above the fibula's head, the talus near the level where
the fibula ends. The main tibia piece is the thick piece that runs alongside the fibula; other
pieces are the tibia's fragments when they lie in the tibia's height range near a tibia piece
(or in the surgeon's fracture mask) and are not fibula. Below the tibia's plafond only the thin
malleolus remains, so a wide bulge under a waist there is the talus, joined to the tibia through
an ankle joint that thick slices blur (:func:`cut_ankles`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .segment_bones import Pieces

MIN_PIECE_ML = 0.1          # smaller pieces are noise
THICK_MM2 = 250.0           # median axial area of a tibia piece (a fibula's is below)
MAIN_MIN_MM, MAIN_MIN_ML = 50.0, 5.0  # the main tibia piece is at least this long and large
THIN_MM2 = (50.0, 350.0)    # median axial area of a fibula piece (tibia splinters are thinner)
FIBULA_MIN_MM = 50.0        # shortest fibula piece
ANCHOR_MIN_MM = 100.0       # a fibula's longest piece is at least this long
FIBULA_OFFSET_MM = 15.0     # a fibula piece lies at least this far from the tibia (centroid to centroid)
NEAR_TIBIA_MM = 10.0        # a fragment lies within this gap of the tibia (or of another fragment)
ALONGSIDE = 0.6             # pieces touching in this fraction of their shared slices are one bone
ABOVE_FIBULA_MM = 30.0      # pieces centred this far above the fibula's top ...
BESIDE_FIBULA_MM = 15.0     # ... and sharing less height than this with it: femur, patella
START_ABOVE_FIBULA_MM = 12.0  # pieces starting this far above it: slivers of the femur
BELOW_FIBULA_MM = 20.0      # centred below the fibula's bottom + this (or ending 10 mm higher): talus
FRACTURE_FRACTION = 0.3     # pieces with this fraction inside the fracture mask are fragments
TALUS_BULGE, TIBIA_FLARE = 1.15, 1.5  # a talus taken in: wider than the ankle's waist, as the distal tibia is


@dataclass
class LegTibia:
    """One leg's tibia on the working grid: its piece ids, main piece and the fibula's pieces."""

    ids: list[int]
    main: int
    fibula: list[int]
    floor_z: float | None = None  # tibia voxels below this z are the talus (joined through a blurred ankle joint)


def split_legs(p: Pieces, ids: np.ndarray, min_gap_mm: float = 15.0, min_share: float = 0.2) -> list[np.ndarray]:
    """Piece ids grouped by leg, smaller x first: two groups when an empty band at least
    ``min_gap_mm`` wide along x separates bone holding at least ``min_share`` of it on each side."""
    keep = np.zeros(p.n + 1, bool)
    keep[ids] = True
    columns = keep[p.labels].sum(axis=(0, 1))
    total = columns.sum()
    before = np.cumsum(columns) - columns
    empty = np.flatnonzero(columns == 0)
    runs = np.split(empty, np.flatnonzero(np.diff(empty) > 1) + 1) if len(empty) else []
    best = None
    for run in runs:
        share = min(before[run[0]], total - before[run[0]]) / max(total, 1)
        if len(run) * p.spacing >= min_gap_mm and share >= min_share and (best is None or len(run) > len(best)):
            best = run
    if best is None:
        return [ids]
    cut = p.origin[0] + 0.5 * (best[0] + best[-1]) * p.spacing
    x = np.array([p.centroid(i)[0] for i in ids])
    return [ids[x < cut], ids[x >= cut]]


def leg_tibia(p: Pieces, ids: np.ndarray, in_fracture: np.ndarray) -> LegTibia | None:
    """The tibia among one leg's pieces, or None when the leg has no thick long bone.

    ``in_fracture[i]``: fraction of piece i inside the fracture mask (zeros without one).
    """
    ids = ids[p.volume_ml(ids) >= MIN_PIECE_ML]
    med = {i: p.median_area(i) for i in ids}
    thick = [i for i in ids if med[i] >= THICK_MM2]
    if not any(p.length(i) >= MAIN_MIN_MM and p.volume_ml(i) >= MAIN_MIN_ML for i in thick):
        return None
    thin = [i for i in ids if THIN_MM2[0] <= med[i] <= THIN_MM2[1] and p.length(i) >= FIBULA_MIN_MM]
    main = _main_piece(p, thick, _anchor(p, thin, thick, med))
    axis = _axis(p, main)
    refs = [i for i in thick if i != main]
    offsets = {i: _offset(p, i, [main] + refs, axis) for i in ids if i != main}
    beside = _alongside_closure(p, [main], [i for i in ids if i != main])
    fibula = [i for i in thin if i not in beside and not _alongside(p, i, thick)
              and np.hypot(*offsets[i]) >= FIBULA_OFFSET_MM and offsets[i][1] >= 0.0]
    slivers = [i for i in ids if i not in beside and i not in fibula and med[i] <= THIN_MM2[1]]
    fibula = _alongside_closure(p, fibula, slivers) if fibula else []
    outside = _outside_tibia_height(p, ids, fibula, main)
    excluded = _with_attached(p, [i for i in ids if outside[i] and i != main],
                              [i for i in ids if i != main and i not in fibula and not outside[i]])
    candidates = [i for i in ids if i != main and i not in fibula and i not in excluded]
    tibia = _grow(p, main, candidates, in_fracture)
    floor = _ankle_waist(p, p.area[tibia].sum(axis=0))
    return LegTibia(tibia, main, fibula, floor)


def cut_ankles(p: Pieces) -> tuple[np.ndarray, int]:
    """Piece labels with the talus cut off every thick long piece that took it in through an ankle
    joint blurred by thick slices (see :func:`_ankle_waist`): voxels below the waist become a new
    piece. Returns the labels (``p.labels`` itself when nothing was cut) and the number of pieces."""
    labels, n = p.labels, p.n
    for i in range(1, p.n + 1):
        if not p.area[i].any() or p.median_area(i) < THICK_MM2 or p.length(i) < MAIN_MIN_MM:
            continue
        floor = _ankle_waist(p, p.area[i])
        if floor is None:
            continue
        if labels is p.labels:
            labels = labels.copy()
        below = labels[:int(np.ceil((floor - p.origin[2]) / p.spacing))]
        n += 1
        below[below == i] = n
    return labels, n


def _ankle_waist(p: Pieces, area: np.ndarray) -> float | None:
    """The ankle joint's z when a bone with axial areas ``area`` (per slice) took in the talus, else
    None: in the area profile (smoothed over 5 mm) over its lowest 60 mm, the narrowest slice with
    a slice TALUS_BULGE times wider below it (the talus) and one TIBIA_FLARE times wider above it
    (the distal tibia)."""
    area = ndimage.uniform_filter1d(area, max(1, int(round(5.0 / p.spacing))))
    z = p.z(np.arange(len(area)))
    present = np.flatnonzero(area > 0)
    window = present[z[present] <= z[present[0]] + 60.0]
    a = area[window]
    below, above = np.maximum.accumulate(a), np.maximum.accumulate(a[::-1])[::-1]
    waists = np.flatnonzero((below >= TALUS_BULGE * a) & (above >= TIBIA_FLARE * a))
    if not len(waists):
        return None
    return float(z[window[waists[np.argmin(a[waists])]]] - 0.5 * p.spacing)


def _grow(p: Pieces, main: int, candidates: list[int], in_fracture: np.ndarray) -> list[int]:
    """The main piece plus the candidates in the fracture mask or within NEAR_TIBIA_MM of the
    tibia so far, repeatedly (fragments next to fragments join too)."""
    tibia = [main] + [i for i in candidates if in_fracture[i] >= FRACTURE_FRACTION]
    rest = np.zeros(p.n + 1, bool)
    rest[[i for i in candidates if i not in tibia]] = True
    while rest.any():
        near = _near(np.isin(p.labels, tibia), p.spacing, NEAR_TIBIA_MM)
        joined = np.flatnonzero(rest & (np.bincount(p.labels[near], minlength=p.n + 1) > 0))
        if not len(joined):
            break
        tibia += joined.tolist()
        rest[joined] = False
    return tibia


def _near(mask: np.ndarray, spacing: float, distance: float) -> np.ndarray:
    """Voxels within about ``distance`` (mm) of ``mask``, computed on a 2x coarser grid (fast)."""
    even = np.pad(mask, [(0, n % 2) for n in mask.shape])
    k, j, i = (n // 2 for n in even.shape)
    coarse = even.reshape(k, 2, j, 2, i, 2).any(axis=(1, 3, 5))
    near = ndimage.distance_transform_edt(~coarse, sampling=2 * spacing) <= distance + spacing
    return near.repeat(2, 0).repeat(2, 1).repeat(2, 2)[:mask.shape[0], :mask.shape[1], :mask.shape[2]]


def _with_attached(p: Pieces, excluded: list[int], candidates: list[int]) -> list[int]:
    """``excluded`` plus, repeatedly, the candidates that touch an excluded piece and lie within its
    height range (slivers of the femur or the talus)."""
    excluded, rest = set(excluded), set(candidates)
    a, b, _ = p.contacts.T
    while rest:
        joined = {i for i in rest if any(x in excluded and _within(p, i, x)
                                         for x in np.concatenate([b[a == i], a[b == i]]))}
        if not joined:
            break
        excluded |= joined
        rest -= joined
    return sorted(excluded)


def _within(p: Pieces, i: int, x: int) -> bool:
    """True when piece i lies within piece x's height range (one slice of tolerance)."""
    (lo_i, hi_i), (lo_x, hi_x) = p.z_range(i), p.z_range(x)
    return lo_x - p.spacing <= lo_i and hi_i <= hi_x + p.spacing


def _alongside(p: Pieces, i: int, group: list[int]) -> bool:
    """True when piece i touches the group in at least ALONGSIDE of the slices they share."""
    flags = np.zeros(p.n + 1, bool)
    flags[group] = True
    shared = np.count_nonzero((p.area[i] > 0) & (p.area[group] > 0).any(axis=0))
    return shared > 0 and p.touching_slices(i, flags) >= ALONGSIDE * shared


def _alongside_closure(p: Pieces, group: list[int], candidates: list[int]) -> list[int]:
    """``group`` plus, repeatedly, the candidates lying alongside it (splinters of the same bone)."""
    group, rest = list(group), list(candidates)
    while True:
        joined = [i for i in rest if _alongside(p, i, group)]
        if not joined:
            return group
        group += joined
        rest = [i for i in rest if i not in joined]


def _anchor(p: Pieces, thin: list[int], thick: list[int], med: dict[int, float]) -> int | None:
    """The fibula's longest piece: the longest thin piece of ANCHOR_MIN_MM that does not lie alongside
    a thick piece but beside thicker ones (1.5 times its median area, in half of its slices)."""
    def beside_thicker(i: int) -> bool:
        thicker = [t for t in thick if t != i and med[t] >= 1.5 * med[i]]
        own = p.area[i] > 0
        return bool(thicker) and np.count_nonzero(own & (p.area[thicker] > 0).any(axis=0)) >= 0.5 * own.sum()

    long = [i for i in thin if p.length(i) >= ANCHOR_MIN_MM and not _alongside(p, i, thick) and beside_thicker(i)]
    return max(long, key=p.length) if long else None


def _main_piece(p: Pieces, thick: list[int], anchor: int | None) -> int:
    """The thick piece with most volume beside the fibula's anchor piece (else the largest one)."""
    thick = [i for i in thick if p.length(i) >= MAIN_MIN_MM and p.volume_ml(i) >= MAIN_MIN_ML]
    if anchor is not None:
        beside = p.area[thick][:, p.area[anchor] > 0].sum(axis=1)
        if beside.max() > 0:
            return thick[int(np.argmax(beside))]
    return thick[int(np.argmax(p.volume_ml(thick)))]


def _axis(p: Pieces, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre and unit direction (z > 0) of the line through piece i's slice centroids (area-weighted)."""
    ks = p.slices(i)
    pts = np.stack([p.cx[i, ks], p.cy[i, ks], p.z(ks)], axis=1)
    w = p.area[i, ks] / p.area[i, ks].sum()
    center = w @ pts
    _, _, vt = np.linalg.svd((pts - center) * np.sqrt(w)[:, None], full_matrices=False)
    u = vt[0] if vt[0][2] >= 0 else -vt[0]
    return center, u


def _offset(p: Pieces, i: int, refs: list[int], axis: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Median in-plane offset (dx, dy; mm) of piece i from the largest other thick piece in each of
    its slices; from the main piece's axis line where it shares no slice with one."""
    ks = p.slices(i)
    refs = [r for r in refs if r != i]
    area = p.area[refs][:, ks]
    valid = area.max(axis=0) > 0
    if valid.any():
        best = np.asarray(refs)[np.argmax(area[:, valid], axis=0)]
        kv = ks[valid]
        return np.array([np.median(p.cx[i, kv] - p.cx[best, kv]), np.median(p.cy[i, kv] - p.cy[best, kv])])
    center, u = axis
    c = p.centroid(i)
    point = center + u * (c[2] - center[2]) / u[2]
    return (c - point)[:2]


def _outside_tibia_height(p: Pieces, ids: np.ndarray, fibula: list[int], main: int) -> dict[int, bool]:
    """Pieces starting above the fibula's head, or centred above it and hardly beside the fibula
    (femur, patella), or ending or centred near the fibula's lower end and not reaching far up
    (talus); without a fibula, pieces centred outside the main piece's height range."""
    if not fibula:
        lo, hi = p.z_range(main)
        return {i: bool(not lo <= p.centroid(i)[2] <= hi) for i in ids}
    lo = min(p.z_range(f)[0] for f in fibula)
    hi = max(p.z_range(f)[1] for f in fibula)
    out = {}
    for i in ids:
        (bottom, top), centre = p.z_range(i), p.centroid(i)[2]
        beside = min(top, hi) - max(bottom, lo)  # height shared with the fibula (mm)
        above = bottom > hi + START_ABOVE_FIBULA_MM or (centre > hi + ABOVE_FIBULA_MM and beside < BESIDE_FIBULA_MM)
        below = top < lo + BELOW_FIBULA_MM + 10.0 or (centre < lo + BELOW_FIBULA_MM and top < lo + 60.0)
        out[i] = bool(above or below)
    return out
