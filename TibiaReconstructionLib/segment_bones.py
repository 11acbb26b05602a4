"""Bone masks and bone pieces on the working grid of :mod:`segment` (helpers, no public API).

The working grid has an identity direction, so its array axes are LPS: ``array[k, j, i]`` with
i along x (patient's left), j along y (posterior) and k along z (superior); spacing is isotropic.
A *piece* is a part of the bone mask that belongs to one bone (or one fragment of it): a 3D
connected component, split further where two bones touch (see :func:`split_pieces`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

PLANE = np.zeros((3, 3, 3), bool)  # 4-connectivity within an axial slice, none across slices
PLANE[1] = ndimage.generate_binary_structure(2, 1)


def fill_holes(mask: np.ndarray, per_slice: bool) -> np.ndarray:
    """``mask`` with enclosed background filled, in 3D or in each axial slice (k) separately.

    Background is kept where it is connected to the array border (in-plane border when per slice).
    """
    structure = PLANE if per_slice else None
    background, _ = ndimage.label(~mask, structure)
    border = [background[:, 0], background[:, -1], background[:, :, 0], background[:, :, -1]]
    if not per_slice:
        border += [background[0], background[-1]]
    outside = np.unique(np.concatenate([b.ravel() for b in border]))
    return ~np.isin(background, outside[outside > 0])


def fill_open_canal(mask: np.ndarray, radius: int, allowed: np.ndarray) -> np.ndarray:
    """``mask`` plus the ``allowed`` voxels of the holes it would enclose in an axial slice if gaps
    up to ``2 * radius`` voxels wide in its outline were closed (a medullary canal opened by a
    fracture); the gaps themselves stay open."""
    r = np.arange(-radius, radius + 1)
    disk = np.zeros((3, len(r), len(r)), bool)
    disk[1] = r[:, None] ** 2 + r[None, :] ** 2 <= radius**2
    closed = ndimage.binary_closing(np.pad(mask, radius + 1), disk)[(slice(radius + 1, -radius - 1),) * 3]
    return mask | (fill_holes(closed, per_slice=True) & ~closed & allowed)


def bone_mask(hu: np.ndarray, low_hu: float, high_hu: float) -> np.ndarray:
    """Solid bone: voxels above ``low_hu`` connected to voxels above ``high_hu``, marrow filled."""
    weak, n = ndimage.label(hu > low_hu)
    keep = np.zeros(n + 1, bool)
    keep[np.unique(weak[hu > high_hu])] = True
    keep[0] = False
    return fill_holes(fill_holes(keep[weak], per_slice=True), per_slice=False)


def split_pieces(mask: np.ndarray, hu: np.ndarray, spacing: float, reach_mm: float = 3.0,
                 ridge_hu: float = 600.0) -> tuple[np.ndarray, int]:
    """Label ``mask`` (k, j, i; isotropic ``spacing`` mm; ``hu`` the image) into pieces: 3D
    components, with touching bones separated.

    Within a component, axial slices are tracked up and down from a start slice where the bones
    are apart (the middle of the slices with the most common number >= 2 of 2D blobs). A voxel of
    a blob that overlaps one piece of the previous slice joins it if it is within ``reach_mm`` (in
    the slice plane) of that piece; other voxels start new pieces. A blob overlapping several
    pieces is divided along the bright cortex between them (:func:`_divide`). A bone may so end
    up in several pieces (side by side where it was split, or one per fragment); :class:`Pieces`
    tells which touch.
    """
    comps, _ = ndimage.label(mask)
    blobs, _ = ndimage.label(mask, PLANE)
    out = np.zeros(mask.shape, np.int32)
    next_id = 1
    for c, box in enumerate(ndimage.find_objects(comps), start=1):
        if box is None:
            continue
        inside = comps[box] == c
        sub = np.where(inside, blobs[box], 0)
        counts = np.array([len(np.unique(s[s > 0])) for s in sub])
        if counts.max() <= 1:
            out[box][inside] = next_id
            next_id += 1
            continue
        tracked, next_id = _track(sub, hu[box] < ridge_hu, _start_slice(counts), reach_mm / spacing, next_id)
        out[box][inside] = tracked[inside]
    return out, next_id - 1


def _start_slice(counts: np.ndarray) -> int:
    mode = np.bincount(counts[counts >= 2]).argmax()
    ks = np.flatnonzero(counts == mode)
    return int(ks[len(ks) // 2])


def _track(sub: np.ndarray, dark: np.ndarray, k0: int, reach: float, next_id: int) -> tuple[np.ndarray, int]:
    """Piece ids of the blobs in ``sub`` (k, j, i), tracked up and down from slice ``k0``;
    ``dark``: voxels darker than cortex."""
    pieces = np.zeros(sub.shape, np.int32)
    pieces[k0], next_id = _new_pieces(sub[k0] > 0, next_id)
    r = np.arange(-int(reach), int(reach) + 1)
    disk = r[:, None] ** 2 + r[None, :] ** 2 <= reach**2
    lut = np.zeros(sub.max() + 1, np.int32)
    hollow: set[int] = set()
    for step in (1, -1):
        for k in range(k0 + step, sub.shape[0] if step > 0 else -1, step):
            if not sub[k].any():
                continue
            w = _window(sub[k] > 0, pieces[k - step] > 0, len(r))
            pieces[k][w], next_id = _track_slice(sub[k][w], pieces[k - step][w], dark[k][w], disk, lut, next_id,
                                                 hollow)
    return pieces, next_id


def _window(a: np.ndarray, b: np.ndarray, pad: int) -> tuple[slice, slice]:
    """Bounding box of ``a | b`` (2D) grown by ``pad`` pixels."""
    rows, cols = np.flatnonzero((a | b).any(axis=1)), np.flatnonzero((a | b).any(axis=0))
    return (slice(max(rows[0] - pad, 0), rows[-1] + pad + 1), slice(max(cols[0] - pad, 0), cols[-1] + pad + 1))


def _track_slice(cur: np.ndarray, prev: np.ndarray, dark: np.ndarray, disk: np.ndarray, lut: np.ndarray,
                 next_id: int, hollow: set[int]) -> tuple[np.ndarray, int]:
    """Piece ids for the blobs ``cur`` given the previous slice's pieces ``prev`` (see :func:`split_pieces`);
    ``hollow``: pieces seen with a dark inside (updated)."""
    both = (cur > 0) & (prev > 0)
    keys = np.unique((cur[both].astype(np.int64) << 32) | prev[both])
    blob, piece = keys >> 32, keys & 0xFFFFFFFF
    links = np.bincount(blob, minlength=len(lut))
    single = links[blob] == 1
    lut[blob[single]] = piece[single]
    near = ndimage.binary_dilation(prev > 0, disk) & (cur > 0)
    out = np.where(near, lut[cur], 0)
    lut[blob] = 0
    shared = links[cur] > 1
    if shared.any():
        out[shared] = _divide(shared, np.where(shared, prev, 0), dark & shared, hollow)[shared]
    fresh = (cur > 0) & (out == 0)
    if fresh.any():
        out[fresh], next_id = _new_pieces(fresh, next_id, flat=True)
    return out, next_id


def _divide(region: np.ndarray, seeds: np.ndarray, dark: np.ndarray, hollow: set[int]) -> np.ndarray:
    """Piece ids for ``region`` (2D), a blob over several pieces of the previous slice (``seeds``:
    their ids where they overlap it). Each dark area (marrow, trabecular bone) goes to the piece
    overlapping most of it, which joins ``hollow``; a piece never hollow and overlapping no dark area
    keeps its overlap (a cortical sliver); other pieces without a dark area end here (another piece
    took their inside: one bone); the bright rest goes to the nearest assigned voxel, so bones
    touching cortex to cortex part along the cortex."""
    areas, n = ndimage.label(ndimage.binary_erosion(dark))  # narrow breaks in a thin cortex do not join areas
    sel = (areas > 0) & (seeds > 0)
    keys, counts = np.unique((areas[sel].astype(np.int64) << 32) | seeds[sel], return_counts=True)
    owner = np.zeros(n + 1, np.int64)
    best = np.zeros(n + 1, np.int64)
    for key, count in zip(keys, counts):
        a = key >> 32
        if count > best[a]:
            best[a], owner[a] = count, key & 0xFFFFFFFF
    assigned = owner[areas]
    hollow.update(int(o) for o in owner[1:] if o)
    cortical = [i for i in np.setdiff1d(np.unique(seeds[seeds > 0]), keys & 0xFFFFFFFF) if int(i) not in hollow]
    bright = np.isin(seeds, cortical)
    assigned[bright] = seeds[bright]
    if not assigned.any():
        assigned = seeds
    _, (jj, ii) = ndimage.distance_transform_edt(assigned == 0, return_indices=True)
    return np.where(region, assigned[jj, ii], 0)


def _new_pieces(region: np.ndarray, next_id: int, flat: bool = False) -> tuple[np.ndarray, int]:
    """Fresh piece ids for the 2D blobs of ``region`` (the region's values only when ``flat``)."""
    blobs, n = ndimage.label(region)
    ids = np.where(blobs > 0, blobs + next_id - 1, 0).astype(np.int32)
    return (ids[region] if flat else ids), next_id + n


@dataclass(frozen=True)
class Pieces:
    """The pieces 1..n of a working-grid label array and their measures (LPS mm).

    ``area[p, k]``: axial area (mm^2) of piece p in slice k; ``cx``, ``cy``: its centroid there
    (NaN where absent); ``contacts``: unique rows (a, b, k), a < b, of pieces touching in slice k
    (in-plane, or piece a or b in slice k under the other in slice k + 1); ``origin``: LPS point of
    voxel (0, 0, 0); ``spacing``: voxel size (mm).
    """

    labels: np.ndarray
    n: int
    spacing: float
    origin: np.ndarray
    area: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    contacts: np.ndarray

    @classmethod
    def measure(cls, labels: np.ndarray, n: int, origin: np.ndarray, spacing: float) -> "Pieces":
        nk = labels.shape[0]
        k, j, i = np.indices(labels.shape, sparse=True)
        key = (labels.astype(np.int64) * nk + k).ravel()
        size = (n + 1) * nk
        count = np.bincount(key, minlength=size).reshape(n + 1, nk)
        with np.errstate(invalid="ignore", divide="ignore"):
            cx = np.bincount(key, np.broadcast_to(i, labels.shape).ravel(), size).reshape(n + 1, nk) / count
            cy = np.bincount(key, np.broadcast_to(j, labels.shape).ravel(), size).reshape(n + 1, nk) / count
        return cls(labels, n, spacing, np.asarray(origin, float), count * spacing**2, origin[0] + cx * spacing,
                   origin[1] + cy * spacing, _contacts(labels, n))

    def volume_ml(self, p) -> np.ndarray:
        return self.area[p].sum(axis=-1) * self.spacing / 1000.0

    def slices(self, p: int) -> np.ndarray:
        return np.flatnonzero(self.area[p] > 0)

    def z(self, k) -> np.ndarray:
        return self.origin[2] + np.asarray(k) * self.spacing

    def z_range(self, p: int) -> tuple[float, float]:
        ks = self.slices(p)
        return float(self.z(ks[0])), float(self.z(ks[-1]))

    def length(self, p: int) -> float:
        lo, hi = self.z_range(p)
        return hi - lo

    def median_area(self, p: int) -> float:
        return float(np.median(self.area[p, self.slices(p)]))

    def centroid(self, p: int) -> np.ndarray:
        """Volume centroid (x, y, z) of piece p."""
        w = self.area[p]
        ks = np.flatnonzero(w)
        return np.array([np.average(self.cx[p, ks], weights=w[ks]), np.average(self.cy[p, ks], weights=w[ks]),
                         np.average(self.z(ks), weights=w[ks])])

    def touching_slices(self, p: int, group: np.ndarray) -> int:
        """Number of slices in which piece p touches any piece flagged in the boolean ``group``."""
        a, b, k = self.contacts.T
        hit = ((a == p) & group[b]) | ((b == p) & group[a])
        return len(np.unique(k[hit]))


def _contacts(labels: np.ndarray, n: int) -> np.ndarray:
    nk = labels.shape[0]
    keys = []
    for a, b in ((labels[:-1], labels[1:]), (labels[:, :-1], labels[:, 1:]), (labels[:, :, :-1], labels[:, :, 1:])):
        sel = (a > 0) & (b > 0) & (a != b)
        k = np.nonzero(sel)[0]
        lo, hi = np.minimum(a[sel], b[sel]), np.maximum(a[sel], b[sel])
        keys.append((lo.astype(np.int64) * (n + 1) + hi) * nk + k)
    keys = np.unique(np.concatenate(keys))
    pair, k = keys // nk, keys % nk
    return np.stack([pair // (n + 1), pair % (n + 1), k], axis=1)
