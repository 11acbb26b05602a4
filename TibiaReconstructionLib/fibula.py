"""The broken fibula beside a tibial shaft fracture: its two pieces' broken ends as lines (patient LPS, mm).

Where a shaft fracture breaks the fibula too, the fibula's distal piece stays bound to the distal tibia at the ankle
(the syndesmosis) and its proximal piece to the proximal tibia at the knee, so the distal tibial fragment is where it
was before the injury when the two fibula pieces line up again. The fibula's shaft is nearly straight over a few
centimetres: each piece's end is summed up by the centroid and direction of its last END_MM, and the pieces line up
when each centroid lies on the other's line (:func:`offsets`; about 1 mm apart at the true pose on phantoms).

The fibula is bone above FIBULA_HU outside the tibia mask, within RADIUS_MM of the tibia's centre at its height and not
more than MEDIAL_MM medial of it (where the other leg would be), away from the knee and the ankle (JOINT_MARGIN_MM from
the tibia's ends, where femur, patella and talus lie), read on a lattice of about STEP_MM. It counts as broken in two
when it falls into two large pieces one above the other, the upper reaching up towards the knee, the lower down towards
the ankle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .geometry import Volume, apply_affine, bounding_box, crop, invert_affine, lattice

FIBULA_HU = 250.0
RADIUS_MM = 70.0  # from the tibia's centre at the same height
SLAB_MM = 10.0
MEDIAL_MM = 30.0  # and at most this far medial of it (towards the other leg)
JOINT_MARGIN_MM = 25.0
STEP_MM = 2.0
END_MM = 40.0
MIN_PIECE_ML = 1.5
MIN_LENGTH_MM = 80.0  # each piece this long where the fibula is looked for: its end is from the shaft, not the head
REACH_MM = 15.0  # a piece reaches towards a joint when it ends within this of the search's end on that side


@dataclass
class BrokenFibula:
    """The broken ends, where they lie in the CT: the proximal piece's lower end and the distal piece's upper end,
    each as a centroid (3,) and a unit direction (3,, pointing superiorly), patient LPS mm."""

    proximal_centre: np.ndarray
    proximal_direction: np.ndarray
    distal_centre: np.ndarray
    distal_direction: np.ndarray


def _line(points: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid and principal direction (unit, along ``up``) of points (n, 3)."""
    centre = points.mean(0)
    direction = np.linalg.eigh(np.cov((points - centre).T))[1][:, -1]
    return centre, direction * np.sign(direction @ up)


def centreline(tibia: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """The tibia's centre (n, 2; canonical x, y) at ``heights`` (canonical z): the centroid of the tibia's points
    (``tibia``, (m, 3) canonical) in SLAB_MM slabs, interpolated (held beyond the ends)."""
    slab = np.floor((tibia[:, 2] - tibia[:, 2].min()) / SLAB_MM).astype(int)
    counts = np.bincount(slab)
    full = counts > 0
    means = np.stack([np.bincount(slab, w) for w in tibia.T], 1)[full] / counts[full, None]
    return np.stack([np.interp(heights, means[:, 2], means[:, d]) for d in range(2)], 1)


def find_broken_fibula(ct: Volume, tibia: Volume, tibia_box: tuple[np.ndarray, np.ndarray],
                       patient_to_canonical: np.ndarray) -> BrokenFibula | None:
    """The fibula's two pieces' broken ends in ``ct`` (module docstring); None when the fibula is not found broken in
    two. ``tibia``: the tibia mask on the CT grid, ``tibia_box`` its index box (lo, hi inclusive, (k, j, i));
    ``patient_to_canonical``: the 4x4 LPS map to the canonical frame (a left leg, z along the tibia, superior; the
    other leg lies medial, -x)."""
    margin = np.ceil(RADIUS_MM / ct.spacing[::-1]).astype(int)
    part = crop(ct, tibia_box[0] - margin, tibia_box[1] + margin)  # crop keeps the box within the CT
    grid, sub = lattice(part.grid, STEP_MM)
    hu = part.array[sub]
    tib = crop(tibia, tibia_box[0] - margin, tibia_box[1] + margin).array[sub] != 0
    to_canonical = patient_to_canonical @ grid.ijk_to_lps
    tib_points = apply_affine(to_canonical, np.argwhere(tib)[:, ::-1].astype(float))
    if len(tib_points) < 10:
        return None
    top, bottom = tib_points[:, 2].max() - JOINT_MARGIN_MM, tib_points[:, 2].min() + JOINT_MARGIN_MM
    bone = hu > FIBULA_HU
    inner = bounding_box(tib)  # not bone that touches the tibia: the dilation reaches one voxel beyond its box
    near = tuple(slice(max(a - 1, 0), b + 2) for a, b in zip(*inner))
    bone[near] &= ~ndimage.binary_dilation(tib[near])
    kji = np.argwhere(bone)
    points = apply_affine(to_canonical, kji[:, ::-1].astype(float))
    beside = points[:, :2] - centreline(tib_points, points[:, 2])
    keep = ((points[:, 2] > bottom) & (points[:, 2] < top) & (beside[:, 0] > -MEDIAL_MM)
            & (np.linalg.norm(beside, axis=1) < RADIUS_MM))
    kji, points = kji[keep], points[keep]
    if len(kji) == 0:
        return None
    kji = kji - kji.min(0)  # labelled in their own box
    labels = np.zeros(tuple(kji.max(0) + 1), np.int32)
    labels[tuple(kji.T)] = 1
    labels, n = ndimage.label(labels, np.ones((3, 3, 3), bool))
    ids = labels[tuple(kji.T)]
    sizes = np.bincount(ids, minlength=3) * float(np.prod(grid.spacing)) / 1000.0
    sizes[0] = 0.0
    big = np.argsort(sizes)[::-1][:3]
    if sizes[big[1]] < MIN_PIECE_ML or (n > 2 and sizes[big[2]] >= 0.5 * sizes[big[1]]):
        return None  # not in two large pieces, or more than two look alike
    lower, upper = sorted((points[ids == f] for f in big[:2]), key=lambda p: p[:, 2].mean())
    if (upper[:, 2].max() < top - REACH_MM or lower[:, 2].min() > bottom + REACH_MM
            or min(np.ptp(upper[:, 2]), np.ptp(lower[:, 2])) < MIN_LENGTH_MM):
        return None  # a piece that does not reach towards its joint, or too short to give a direction
    to_patient = invert_affine(patient_to_canonical)
    up = to_patient[:3, 2] / np.linalg.norm(to_patient[:3, 2])
    ends = (upper[upper[:, 2] <= upper[:, 2].min() + END_MM], lower[lower[:, 2] >= lower[:, 2].max() - END_MM])
    return BrokenFibula(*_line(apply_affine(to_patient, ends[0]), up), *_line(apply_affine(to_patient, ends[1]), up))
