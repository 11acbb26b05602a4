"""Checks of a prediction's inputs and the leg side from the fibula: all that needs only numpy and SciPy, so that a
command can run it while torch loads (:mod:`head_start`). Points are LPS mm; arrays (k, j, i)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import ndimage

from .errors import InputError
from .fibula import FIBULA_HU, centreline
from .geometry import Grid, Volume, apply_affine, bounding_box, check_same_grid, lattice
from .prepare import Alignment, align_tibia, plateau_axis

MAX_FRACTURE_FRACTION = 0.6  # refuse when more of the tibia than this is hidden by the fracture mask
# Voxel size: coarser than MAX_SPACING_MM along any axis (e.g. 10 mm slices) is refused, because the fracture
# zone and the tibial plateau are then only a few voxels thick; coarser than WARN_SPACING_MM gives a warning.
MAX_SPACING_MM = 6.0
WARN_SPACING_MM = 3.0
MIN_SLICES = 8  # a CT needs at least this many voxels along every axis
MIN_TIBIA_EXTENT_MM = 60.0  # at least this much of the tibia must be in the CT (an adult tibia is 300-450 mm)
# Side from the fibula: bone above FIBULA_HU (:mod:`fibula`'s) within FIBULA_RADIUS_MM of the tibia, at least
# FIBULA_MIN_MM3 of it (:func:`fibula_side`). The fibula lies behind the line through the tibial plateau's widest
# extent (its medial-lateral axis), on its lateral half: which way round that is tells the side whatever way the leg
# is turned in the scanner. On 41 held-out phantoms the fibula lay 16 mm or more to one side of the plateau's
# perpendicular, turned by up to 60 deg either way; its offset along the patient's x alone, the rule before, was as low
# as -1.3 mm (the wrong side) unturned and wrong on most at 30 deg external rotation. The plateau counts when the CT
# shows the tibia's proximal end and its axis is clear (:func:`prepare.plateau_axis`); else the fibula's median offset
# along x must be at least FIBULA_MIN_OFFSET_MM to one side. Either way the fibula must lie that far to one side.
FIBULA_RADIUS_MM = 45.0
FIBULA_MIN_MM3 = 1000.0
FIBULA_MIN_OFFSET_MM = 2.5
# A tibia mask shorter than SHORT_SHARE of a typical tibia (the bundle's: 362 mm for the default, so 260 mm; adult
# tibiae are 300-450 mm, 311-443 on the held-out phantoms, 101-290 with their distal main fragment left out of the
# mask, 27 of 32 such under 260) that the CT does not cut off is missing a fragment, at the end nearer to the middle
# of the fracture mask (painted over the break): :func:`tibia_extent`, :func:`open_end_warning`.
SHORT_SHARE = 0.72


@dataclass
class Checked:
    """What :func:`check_inputs` found: the tibia mask's index box (lo, hi inclusive, (k, j, i)), its voxel count and
    how many of them the fracture mask hides, the warnings (:func:`input_warnings`), the side asked for and the side
    to predict: the one asked for, else the fibula's (:func:`fibula_side`; None when the fibula does not tell), and
    the tibia mask's length and its end nearer to the fracture mask (:func:`tibia_extent`)."""

    box: tuple[np.ndarray, np.ndarray]
    tibia_voxels: int
    hidden_voxels: int
    warnings: list[str]
    asked: str
    side: str | None
    length_mm: float | None = None
    fracture_end: str | None = None


def check_inputs(ct: Volume, tibia: Volume, fracture: Volume, side: str = "auto") -> Checked:
    """Check a prediction's inputs (:func:`validate_inputs`; raises InputError naming the problem) and, for ``side``
    'auto', find the side from the fibula."""
    if side not in ("auto", "left", "right"):
        raise InputError(f"Unknown side {side!r}; use 'left', 'right' or 'auto'.")
    box, tibia_voxels, hidden_voxels = validate_inputs(ct, tibia, fracture)
    aligned = aligned_on_lattice(tibia)
    return Checked(box, tibia_voxels, hidden_voxels, input_warnings(ct, box), side,
                   fibula_side(ct, tibia, aligned=aligned) if side == "auto" else side,
                   *tibia_extent(tibia, fracture, aligned=aligned))


def validate_inputs(ct: Volume, tibia: Volume, fracture: Volume) -> tuple[tuple[np.ndarray, np.ndarray], int, int]:
    """Check the three inputs; raises InputError naming the problem. Returns the tibia's index box (lo, hi
    inclusive, (k, j, i)), its voxel count and the count of its voxels under the fracture mask. The masks are only
    scanned in full to find the box and whether the fracture mask is empty; the rest is counted inside the box."""
    check_same_grid(ct, tibia, "CT", "tibia mask")
    check_same_grid(ct, fracture, "CT", "fracture mask")
    size = np.asarray(ct.grid.size)
    if size.min() < MIN_SLICES:
        raise InputError(f"The CT has only {size.min()} voxel(s) along its {'ijk'[int(np.argmin(size))]} axis (size "
                         f"{'x'.join(str(n) for n in size)}); a CT that holds a tibia has dozens of slices. Load the "
                         "whole CT series, not a single slice or a thin slab.")
    spacing = ", ".join(f"{v:.3g}" for v in ct.spacing)
    if ct.spacing.max() > MAX_SPACING_MM:
        raise InputError(f"The CT's voxels are ({spacing}) mm: {ct.spacing.max():.3g} mm is coarser than the "
                         f"{MAX_SPACING_MM:g} mm this product accepts, so the fracture zone and the tibial plateau "
                         "cannot be resolved. Reconstruct thinner slices (3 mm or less) from the scanner data.")
    arr = ct.array
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(f"The CT has voxel type {arr.dtype}; a CT must hold real numbers (HU).")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise InputError("The CT contains NaN or infinite voxels; fix or replace them (e.g. with -1000 HU) first.")
    hi = float(np.percentile(arr[::4, ::4, ::4], 99.9)) if arr.size > 64 else float(arr.max())
    if hi < 300.0:
        raise InputError(f"The image does not look like a CT in Hounsfield units: its 99.9th percentile is {hi:.4g}, "
                         "but bone is above 300 HU. MR or normalised images are not supported; give the original CT.")
    lo = float(arr.min())
    if lo >= 0:
        raise InputError(f"The image does not look like a CT in Hounsfield units: no voxel is below 0 (minimum "
                         f"{lo:.4g}), but a CT has air (-1000 HU) and fat (about -100 HU). MR images are not "
                         "supported; a CT stored without its rescale intercept (e.g. 0..4095) or with its background "
                         "set to 0 must be converted back to HU first.")
    box = bounding_box(tibia.array)
    if box is None:
        raise InputError("The tibia mask is empty. Segment the tibia (all fragments) or use automatic segmentation.")
    extent = (box[1] - box[0] + 1)[::-1] * ct.spacing
    if extent.max() < MIN_TIBIA_EXTENT_MM:
        raise InputError(f"The tibia mask spans only {extent.max():.0f} mm; at least {MIN_TIBIA_EXTENT_MM:g} mm of the "
                         f"tibia must be in the CT (an adult tibia is 300-450 mm long). Check the mask, and that the "
                         f"CT's voxel spacing ({spacing}) is in mm.")
    if not fracture.array.any():
        raise InputError("The fracture mask is empty. Paint a coarse mask over the fracture zone (all fracture "
                         "lines and gaps) before predicting.")
    inside = tuple(slice(a, b + 1) for a, b in zip(*box))
    tib = tibia.array[inside] != 0
    hidden_voxels = np.count_nonzero(tib & (fracture.array[inside] != 0))
    if hidden_voxels == 0:
        raise InputError("The fracture mask does not overlap the tibia mask at all; it must cover the fracture "
                         "zone of the tibia. Check that the right segments were chosen.")
    tibia_voxels = np.count_nonzero(tib)
    hidden = hidden_voxels / tibia_voxels
    if hidden > MAX_FRACTURE_FRACTION:
        raise InputError(f"The fracture mask hides {hidden:.0%} of the tibia; at most {MAX_FRACTURE_FRACTION:.0%} "
                         "can be predicted reliably. Paint only the fracture zone.")
    return box, int(tibia_voxels), int(hidden_voxels)


def input_warnings(ct: Volume, box: tuple[np.ndarray, np.ndarray]) -> list[str]:
    """Problems that do not stop a prediction but make it less reliable: coarse voxels, a tibia cut off by the
    field of view (its index ``box``, lo and hi in (k, j, i) as :func:`validate_inputs` returns it, touches the
    first or last slice along an axis)."""
    warnings = []
    if ct.spacing.max() > WARN_SPACING_MM:
        warnings.append(f"The CT's voxels are ({', '.join(f'{v:.3g}' for v in ct.spacing)}) mm, coarser than "
                        f"{WARN_SPACING_MM:g} mm: the fracture zone and the tibial plateau are coarsely resolved and "
                        "the prediction is less precise. Use thinner slices if available.")
    superior = int(np.argmax(np.abs(ct.direction[2])))  # the (i, j, k) axis closest to the body's long axis
    for axis in range(3):
        n = ct.grid.size[axis]
        for index, at_end in ((0, box[0][2 - axis] == 0), (n - 1, box[1][2 - axis] == n - 1)):
            if not at_end:
                continue
            if axis == superior:
                up = (index == n - 1) == (ct.direction[2, axis] > 0)
                where = f"the {'top (superior)' if up else 'bottom (inferior)'} slice of the CT"
            else:
                where = "the edge of the CT"
            warnings.append(f"The tibia mask touches {where} ({'ijk'[axis]} = {index}): the tibia is cut off by the "
                            "field of view there, so the prediction beyond the scan is the model's extrapolation. For "
                            "a complete prediction, scan the whole tibia from knee to ankle.")
    return warnings


@dataclass
class LatticeTibia:
    """The tibia mask read at about a step (the lattice's grid, the slices that read a volume on the CT's grid there,
    the mask there, bool) and aligned there (long axis to z, superior up, no mirroring: x stays the patient's x)."""

    grid: Grid
    sub: tuple[slice, ...]
    mask: np.ndarray
    alignment: Alignment

    def points(self, mask: np.ndarray) -> np.ndarray:
        """The voxels of ``mask`` (on the lattice) as points (n, 3) on the aligned frame (mm)."""
        kji = np.argwhere(mask)
        return apply_affine(self.alignment.matrix, self.grid.index_to_physical(kji[:, ::-1].astype(float)))

    @cached_property
    def tibia_points(self) -> np.ndarray:
        """The tibia mask's voxels as points (:meth:`points`), made once."""
        return self.points(self.mask)


def aligned_on_lattice(tibia: Volume, step_mm: float = 2.0) -> LatticeTibia:
    """The tibia mask read at about ``step_mm`` and aligned there (:class:`LatticeTibia`)."""
    grid, sub = lattice(tibia.grid, step_mm)
    tib = tibia.array[sub] != 0
    return LatticeTibia(grid, sub, tib, align_tibia(Volume.on_grid(tib.astype(np.uint8), grid), "left"))


def fibula_side(ct: Volume, tibia: Volume, step_mm: float = 2.0, aligned: LatticeTibia | None = None
                ) -> str | None:
    """The leg side from where the fibula lies: bone (> FIBULA_HU) outside the tibia, beside its middle half
    (within FIBULA_RADIUS_MM), is the fibula; its offset from the tibia is taken as the median both from the tibia's
    long axis and from its centre at each height (an angulated fragment pulls the one towards the middle, a displaced
    shaft the other). With the plateau in view (module constants), the fibula lies behind the plateau's
    medial-lateral axis on the lateral side: seen from above (LPS, superior up) it is turned anticlockwise from the
    axis' half towards it for a left leg, clockwise for a right one; both offsets must agree, the smaller turn counts.
    Without the plateau, lateral is the patient's left (+x) for a left leg; the offset farther to one side counts.
    None when too little bone is found or it is not clearly to one side; the CT is read at about ``step_mm``
    spacing (``aligned``: :func:`aligned_on_lattice`'s for that spacing, when already made)."""
    aligned = aligned or aligned_on_lattice(tibia, step_mm)
    bone = (ct.array[aligned.sub] > FIBULA_HU) & ~ndimage.binary_dilation(aligned.mask, iterations=2)
    if not bone.any():
        return None
    pts, tib_pts = aligned.points(bone), aligned.tibia_points
    lo, hi = np.percentile(tib_pts[:, 2], [25, 75])
    band = (pts[:, 2] > lo) & (pts[:, 2] < hi)
    offsets = []
    for centre in (np.zeros(2), centreline(tib_pts, pts[:, 2])):
        beside = pts[:, :2] - centre
        near = band & (np.hypot(beside[:, 0], beside[:, 1]) < FIBULA_RADIUS_MM)
        if np.count_nonzero(near) * np.prod(aligned.grid.spacing) < FIBULA_MIN_MM3:
            return None
        offsets.append(np.median(beside[near], axis=0))
    axis = None if aligned.alignment.cut_proximal else plateau_axis(tib_pts)
    if axis is None:
        turn = max((f[0] for f in offsets), key=abs)  # > 0: towards the patient's left
    else:  # the 2-D cross product of the axis' half towards the fibula and the fibula's offset
        turns = [float(np.sign(axis @ f) * (axis[0] * f[1] - axis[1] * f[0])) for f in offsets]
        turn = min(turns, key=abs) if turns[0] * turns[1] > 0 else 0.0
    if abs(turn) < FIBULA_MIN_OFFSET_MM:
        return None
    return "left" if turn > 0 else "right"


def tibia_extent(tibia: Volume, fracture: Volume, step_mm: float = 2.0, aligned: LatticeTibia | None = None
                 ) -> tuple[float | None, str | None]:
    """The tibia mask's length along its long axis (mm; None when the CT cuts it off, :func:`input_warnings` says
    so) and its end nearer to the middle of the fracture mask ('distal' or 'proximal'; None when the fracture mask
    misses the tibia); read at about ``step_mm`` (``aligned``: as for :func:`fibula_side`)."""
    aligned = aligned or aligned_on_lattice(tibia, step_mm)
    if aligned.alignment.cut:
        return None, None
    z = aligned.tibia_points[:, 2]
    hidden = aligned.mask & (fracture.array[aligned.sub] != 0)
    if not hidden.any():
        return float(np.ptp(z)), None
    middle = float(np.median(aligned.points(hidden)[:, 2]))
    return float(np.ptp(z)), "distal" if middle - z.min() < z.max() - middle else "proximal"


def open_end_warning(length_mm: float, end: str | None) -> str:
    """What a prediction says when the tibia mask is too short (module constants) and so seems to miss a fragment
    at ``end``."""
    where = (f", at its {end} end next to the fracture mask; the prediction beyond that end is the model's"
             if end else "")
    return (f"The tibia mask spans only {length_mm:.0f} mm along the tibia, less than an adult tibia (300-450 mm), and "
            f"the CT does not cut it off: a fragment is probably missing from the tibia mask{where}. Add every "
            "fragment to the tibia mask.")
