"""Reassemble the fracture: move the main moved fragment until its broken face meets the anchor's (patient LPS, mm).

The shape model cannot tell where the distal fragment belongs to within a few millimetres and degrees: tibial length,
torsion and bow vary between people, and the model explains a fragment left a little short, or turned, as a slightly
different tibia. The fragments can: in the healthy bone their broken faces meet without overlapping.

Here the whole tibia mask near the fracture (the fracture zone included, where the broken faces are) is resampled
onto an isotropic GRID_MM grid, smoothed over its own voxel size, and split between the fragments by a watershed of
its distance map seeded with the visible pieces. The broken faces are the fragments' surfaces in the fracture zone,
less where the two touch in the CT (there the split is the watershed's guess). Starting from the reduction's move,
the fragment's rigid motion is fitted so that each face lies on the other fragment's surface, facing it, without
the fragment reaching into the anchor: Adam on a robust contact score (both faces, with sub-voxel distances), from
starts on either side along the long axis, with the contact's width narrowing. A weak prior keeps the motion near the
reduction's where the faces do not decide it (a flat face lets the fragment slide across it or turn about it): a
sideways move of the face's centre by PRIOR_SHIFT_MM, or a turn by PRIOR_TURN_DEG, costs as much as a perfect
contact gains. Where the fibula is broken too (:mod:`fibula`), its distal piece moves with the distal fragment and
its pieces' ends lining up again (within FIBULA_WIDTH_MM) adds up to FIBULA_WEIGHT to the contact: the fibula
tells where the fragment's lateral side belongs, its turn about the tibia's axis and its slide across the break,
which a round shaft's face leaves loose (one leg, 20 held-out phantoms: RMSD 1.55 -> 1.42 mm). The fit is kept only
when the faces meet clearly better than before, without overlap, and the change is of a plausible size.

Points are patient LPS (mm); arrays (Z, Y, X); moves 4x4 maps of patient points from where the fragment lies in
the CT to where it goes in the prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage

from .fibula import BrokenFibula
from .geometry import Grid, Volume, bounding_box, resample
from .models.sampler import rotation_matrices
from .refine import adam_direction, one_thread, signed_distance

GRID_MM = 1.0  # the contact is fitted on an isotropic grid of this spacing
MARGIN_MM = 15.0  # around the fracture zone
SMOOTHING = 0.5  # Gaussian sigma of the resampled mask, in the mask's voxels
TOUCH_VOXELS = 2  # face voxels this close to the other fragment in the CT are left out (the split is a guess there)
BODY_TOUCH_VOXELS = 3  # and body voxels this close to the anchor
FACE_POINTS = 1000  # voxels of each broken face (random subset) that drive the fit
BODY_POINTS = 3000  # fragment voxels near the break that must stay out of the anchor
WIDTHS_MM = (4.0, 2.0, 1.0)  # the contact's width, narrowing
STEPS = 20  # Adam steps per width
STARTS_MM = (-4.0, 4.0)  # starting slides along the long axis
LR_ROTATION = 0.009  # rad per Adam step
LR_TRANSLATION = 0.45  # mm per Adam step
OVERLAP_WEIGHT = 1.0  # per mm of mean depth inside the anchor
PRIOR_SHIFT_MM = 20.0
PRIOR_TURN_DEG = 50.0
MIN_GAIN = 0.05  # the fit is kept when the faces' contact (0..1; with the fibula's share) grows by at least this much,
MAX_OVERLAP_MM = 0.1  # the fragment reaches into the anchor by less than this on average,
MAX_TURN_DEG = 15.0  # and the change turns the fragment and moves its face's centre by no more than these
MAX_SHIFT_MM = 15.0
MIN_FACE_VOXELS = 50
FIBULA_WEIGHT = 0.35  # a broken fibula's ends lined up (1) count this much against the faces' contact (0..1)
FIBULA_WIDTH_MM = 5.0  # the lining up's width: offsets well under it (the ends' own noise) hardly count
END_REACH_MM = 20.0  # fragments hold the knee or the ankle when they reach within this of that end of the tibia


@dataclass
class Fit:
    """The fitted move (4x4; the given one when not kept) and a report: the faces' contact before and after (0..1),
    the mean overlap (mm) before and after, the change's turn (deg) and shift of the face's centre (mm), kept."""

    move: np.ndarray
    report: dict


def contact_grid(tibia: Volume, hidden: np.ndarray) -> tuple[Grid, tuple[slice, ...]] | None:
    """An isotropic GRID_MM grid along the tibia mask's axes over the fracture zone in the tibia plus MARGIN_MM, and
    the index box (k, j, i slices) of the mask that covers it; None when the zone holds no tibia."""
    zone = bounding_box((tibia.array != 0) & hidden)
    if zone is None:
        return None
    margin = np.ceil(MARGIN_MM / tibia.spacing[::-1]).astype(int)
    lo = np.maximum(zone[0] - margin, 0)
    hi = np.minimum(zone[1] + margin, np.asarray(tibia.array.shape) - 1)
    size = np.ceil((hi - lo) * tibia.spacing[::-1] / GRID_MM).astype(int) + 1  # (k, j, i)
    grid = Grid(tuple(size[::-1]), (GRID_MM,) * 3, tibia.index_to_physical(lo[::-1].astype(float)), tibia.direction)
    return grid, tuple(slice(a, b + 2) for a, b in zip(lo, hi))  # one voxel beyond: the grid's far edge


def split_fragments(whole: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The whole tibia (``whole``, bool) split by a watershed of its distance map from ``seeds`` (uint8 labels, 0:
    none): every tibia voxel gets the label of the seed whose basin holds it (touching fragments meet where the
    bone narrows)."""
    depth = ndimage.distance_transform_edt(whole).astype(np.float32)
    basins = sitk.MorphologicalWatershedFromMarkers(sitk.GetImageFromArray(-depth),
                                                    sitk.GetImageFromArray((seeds * whole).astype(np.uint8)),
                                                    markWatershedLine=False, fullyConnected=True)
    return sitk.GetArrayFromImage(basins).astype(np.uint8) * whole


def level_distance(occupancy: np.ndarray) -> np.ndarray:
    """Signed distance (mm, negative inside) to the 0.5 level of ``occupancy`` (Z, Y, X) on a GRID_MM grid: within a
    voxel of the level ITK's iso-contour distance (the level placed between voxel centres by linear interpolation),
    farther out the distance to the boundary voxels less half a voxel."""
    coarse = signed_distance(occupancy, np.full(3, GRID_MM))
    image = sitk.GetImageFromArray(occupancy.astype(np.float32))
    image.SetSpacing((GRID_MM,) * 3)
    far = 1e3
    try:
        near = -sitk.GetArrayFromImage(sitk.IsoContourDistance(image, levelSetValue=0.5, farValue=far))
    except RuntimeError:  # ITK refuses a level crossed where the occupancy is flat to its precision
        return coarse
    return np.where(np.abs(near) < far, near, coarse).astype(np.float32)


def turn_after(move: torch.Tensor, centre: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``move`` (4x4 map of patient points) followed by each parameter set's (S, 6) turn (rotation vector, rad) about
    ``centre`` (3,) and shift (mm): the combined maps' rotations (S, 3, 3) and shifts (S, 3)."""
    turn = rotation_matrices(params[:, :3])
    return turn @ move[:3, :3], (turn @ (move[:3, 3] - centre)[:, None])[..., 0] + centre + params[:, 3:]


def as_affine(r: torch.Tensor, t: torch.Tensor) -> np.ndarray:
    """A 4x4 (float64) map of one rotation (3, 3) and shift (3,)."""
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = r.double().numpy(), t.double().numpy()
    return out


class Field:
    """A signed distance (mm, Z, Y, X on ``grid``) to a surface and, with ``directions``, its direction (unit,
    patient axes), sampled (differentiably) at patient points moved rigidly."""

    def __init__(self, sdf: np.ndarray, grid: Grid, directions: bool = True) -> None:
        channels = [sdf[None]]
        if directions:
            grad = np.asarray(grid.direction) @ np.stack(np.gradient(sdf, *grid.spacing[::-1])[::-1]).reshape(3, -1)
            grad /= np.maximum(np.linalg.norm(grad, axis=0), 1e-6)
            channels.append(grad.reshape(3, *sdf.shape))
        self.volume = torch.from_numpy(np.concatenate(channels).astype(np.float32))
        normalise = np.diag([*(2.0 / np.maximum(np.asarray(grid.size, float) - 1.0, 1.0)), 1.0])
        normalise[:3, 3] = -1.0  # index 0 -> -1, size - 1 -> 1 (grid_sample, align_corners)
        self.to_normalised = torch.from_numpy((normalise @ np.linalg.inv(grid.ijk_to_lps)).astype(np.float32))

    def __call__(self, points: torch.Tensor, r: torch.Tensor | None = None, t: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Signed distance (S, n) and direction (S, n, 3; (S, n, 0) without directions) at patient points (n, 3)
        moved by each of S rigid maps p -> r p + t (r (S, 3, 3), t (S, 3); the identity when None)."""
        if r is None:
            r, t = torch.eye(3)[None], torch.zeros(1, 3)
        lin = self.to_normalised[:3, :3] @ r  # moved, then normalised, in one product
        flow = points @ lin.transpose(1, 2) + (t @ self.to_normalised[:3, :3].T + self.to_normalised[:3, 3])[:, None]
        values = F.grid_sample(self.volume.expand(len(flow), -1, -1, -1, -1), flow[:, :, None, None],
                               mode="bilinear", padding_mode="border", align_corners=True)[..., 0, 0]
        return values[:, 0], values[:, 1:].transpose(1, 2)


def fibula_offsets(fibula: BrokenFibula, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """How far apart the broken ends' lines lie (mm) with the distal piece moved by p -> r p + t (torch (S, 3, 3) and
    (S, 3), the distal tibial fragment's moves): the mean of the distal end's centroid's distance from the proximal
    end's line and the proximal end's centroid's distance from the distal end's line, (S,)."""
    cp, up, cd, ud = (torch.from_numpy(np.asarray(v, np.float32)) for v in
                      (fibula.proximal_centre, fibula.proximal_direction, fibula.distal_centre,
                       fibula.distal_direction))
    moved, turned = r @ cd + t, r @ ud

    def off_line(p: torch.Tensor, c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        d = p - c
        return (d - (d * u).sum(-1, keepdim=True) * u).norm(dim=-1)

    return 0.5 * (off_line(moved, cp, up) + off_line(cp, moved, turned))


def fit_contact(anchor: np.ndarray, fragment: np.ndarray, hidden: np.ndarray, grid: Grid, move: np.ndarray,
                axis: np.ndarray, fibula: BrokenFibula | None = None) -> Fit | None:
    """Fit the fragment's move (module docstring). ``anchor`` and ``fragment``: occupancies (Z, Y, X) in [0, 1] on
    ``grid`` where they lie in the CT; ``hidden``: the fracture zone (bool) there; ``move``: where the reduction puts
    the fragment; ``axis``: the tibia's long axis (unit, patient); ``fibula``: the broken fibula, whose distal piece
    moves with the fragment and whose ends line up again when it is where it belongs (:mod:`fibula`). None when
    either shows too little broken face."""
    near = ndimage.binary_dilation(hidden, iterations=2)
    solid = [anchor > 0.5, fragment > 0.5]
    rims = [m & ~ndimage.binary_erosion(m) & near & ~ndimage.binary_dilation(o, iterations=TOUCH_VOXELS)
            for m, o in (solid, solid[::-1])]
    if min(int(r.sum()) for r in rims) < MIN_FACE_VOXELS:
        return None
    rng = np.random.default_rng(0)
    fields = [Field(level_distance(anchor), grid), Field(level_distance(fragment), grid)]

    def points(mask: np.ndarray, n: int) -> torch.Tensor:
        kji = np.argwhere(mask)
        kji = kji[rng.choice(len(kji), n, replace=False)] if len(kji) > n else kji
        return torch.from_numpy(grid.index_to_physical(kji[:, ::-1].astype(float)).astype(np.float32))

    faces, normals = [], []
    for field, rim in zip(fields, rims):  # boundary voxel centres, moved onto their surface
        p = points(rim, FACE_POINTS)
        d, n = field(p)
        faces.append(p - d[0, :, None] * n[0])
        normals.append(n[0])
    touching = ndimage.binary_dilation(solid[0], iterations=BODY_TOUCH_VOXELS)
    body = points(solid[1] & ndimage.binary_dilation(hidden, iterations=3) & ~touching, BODY_POINTS)
    if len(body) == 0:  # all of it touches the anchor in the CT: its face, at least, must stay out
        body = faces[1]
    m0 = torch.from_numpy(move.astype(np.float32))
    centre = (faces[1] @ m0[:3, :3].T + m0[:3, 3]).mean(0)
    a = torch.from_numpy(np.asarray(axis, np.float32))
    across = torch.eye(3) - torch.outer(a, a)

    def terms(params: torch.Tensor, width: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The faces' contact (S,; 0..1: each face on the other fragment's surface and facing it, within ``width``),
        the fragment's mean depth inside the anchor (S,; mm) and the broken fibula's ends' offset (S,; mm; zeros
        without one), with the fragment moved by each parameter set (S, 6) after the reduction's move."""
        r, t = turn_after(m0, centre, params)  # the fragment's move, CT -> prediction: the reduction's, then these
        rb, tb = r.transpose(1, 2), -(r.transpose(1, 2) @ t[..., None])[..., 0]  # and back
        shares = []
        # the anchor's face taken into the fragment's frame; the fragment's face moved into the anchor's
        for other, p, n, rr, tt in zip(fields[::-1], faces, normals, (rb, r), (tb, t)):
            d, g = other(p, rr, tt)
            facing = torch.relu(-(n * (g @ rr)).sum(-1))  # the face's normal, turned, against the other's: -(r n).g
            shares.append((facing * torch.exp(-0.5 * (d / width) ** 2)).mean(-1))
        overlap = torch.relu(-fields[0](body, r, t)[0]).mean(-1)
        offset = torch.zeros(len(params)) if fibula is None else fibula_offsets(fibula, r, t)
        return 0.5 * (shares[0] + shares[1]), overlap, offset

    def gain(contact: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """What the fit gains: the faces' contact and, with a broken fibula, its ends lined up (within a few mm)."""
        if fibula is None:
            return contact
        return contact + FIBULA_WEIGHT * torch.exp(-0.5 * (offset / FIBULA_WIDTH_MM) ** 2)

    def energy(params: torch.Tensor, width: float) -> torch.Tensor:
        contact, overlap, offset = terms(params, width)
        prior = ((params[:, 3:] @ across).pow(2).sum(1) / PRIOR_SHIFT_MM ** 2
                 + params[:, :3].pow(2).sum(1) / np.radians(PRIOR_TURN_DEG) ** 2)
        return OVERLAP_WEIGHT * overlap + prior - gain(contact, offset)

    lr = torch.tensor([LR_ROTATION] * 3 + [LR_TRANSLATION] * 3)
    params = torch.cat([torch.zeros(len(STARTS_MM), 3), torch.tensor(STARTS_MM)[:, None] * a], 1)
    moments = torch.zeros(2, *params.shape)
    step = 0
    with torch.enable_grad(), one_thread():
        params.requires_grad_(True)
        for width in WIDTHS_MM:  # all starts at once
            for _ in range(STEPS):
                step += 1
                (grad,) = torch.autograd.grad(energy(params, width).sum(), params)
                with torch.no_grad():
                    params -= lr * adam_direction(moments, grad, step)
    with torch.no_grad():
        params = params.detach()
        params = params[int(torch.argmin(energy(params, WIDTHS_MM[-1])))]
        contact, overlap, offset = terms(torch.stack([torch.zeros(6), params]), WIDTHS_MM[-1])
        gained = float(torch.diff(gain(contact, offset))[0])  # after the fit less before
        fitted = as_affine(*(v[0] for v in turn_after(m0, centre, params[None])))
    turn = float(np.degrees(float(params[:3].norm())))
    shift = float(params[3:].norm())
    kept = bool(gained >= MIN_GAIN and overlap[1] <= MAX_OVERLAP_MM and turn <= MAX_TURN_DEG and shift <= MAX_SHIFT_MM)
    report = {"contact_before": round(float(contact[0]), 3), "contact_after": round(float(contact[1]), 3),
              "overlap_before_mm": round(float(overlap[0]), 3), "overlap_after_mm": round(float(overlap[1]), 3),
              "turn_deg": round(turn, 2), "shift_mm": round(shift, 2), "kept": kept}
    if fibula is not None:
        report.update(fibula_offset_before_mm=round(float(offset[0]), 2),
                      fibula_offset_after_mm=round(float(offset[1]), 2))
    return Fit(fitted if kept else np.array(move, float), report)


def fragment_mask(pieces: np.ndarray, owner: np.ndarray, fragment: int) -> np.ndarray:
    """Where the visible pieces (``pieces``, their labels) belong to ``fragment`` (``owner``: each piece's fragment
    id)."""
    return np.isin(pieces, np.flatnonzero(owner == fragment))


def _holds_both_ends(tibia: Volume, pieces: np.ndarray, owner: np.ndarray, anchor: int, fragment: int,
                     axis: np.ndarray) -> bool:
    """Whether ``anchor``'s pieces reach the tibia's proximal end and ``fragment``'s its distal end (within END_REACH_MM
    along ``axis``, superior), as the fibula's pieces do the knee and the ankle."""
    heights = {}
    for fid in (anchor, fragment):
        kji = np.argwhere(fragment_mask(pieces, owner, fid))
        if len(kji) == 0:
            return False
        heights[fid] = tibia.index_to_physical(kji[:, ::-1].astype(float)) @ axis
    whole = tibia.index_to_physical(np.argwhere(tibia.array != 0)[:, ::-1].astype(float)) @ axis
    return heights[anchor].max() > whole.max() - END_REACH_MM and heights[fragment].min() < whole.min() + END_REACH_MM


def reassemble(tibia: Volume, hidden: np.ndarray, pieces: np.ndarray, owner: np.ndarray, moves: dict[int, np.ndarray],
               anchor: int, axis: np.ndarray, fibula: BrokenFibula | None = None) -> tuple[dict[int, np.ndarray], dict]:
    """Refit the move of the largest moved fragment onto the anchor by contact (module docstring). ``tibia``: the
    tibia mask on a lattice of the CT; ``hidden``: the fracture mask and ``pieces`` the visible pieces' labels on it;
    ``owner``: each piece's fragment id (0: none); ``moves``: each fragment's move; ``axis``: the tibia's long axis
    (unit, patient, superior); ``fibula``: the broken fibula (:func:`fibula.find_broken_fibula`), used when that
    fragment holds the ankle and the anchor the knee. Returns the moves (a new dict; only that fragment's may change)
    and a report (empty when no fragment moves or the fracture zone holds no tibia)."""
    moved = [f for f in moves if f != anchor]
    found = contact_grid(tibia, hidden) if moved else None
    if found is None:
        return dict(moves), {}
    grid, box = found
    counts = np.bincount(pieces.ravel(), minlength=len(owner))
    fid = max(moved, key=lambda f: counts[owner == f].sum())
    if fibula is not None and not _holds_both_ends(tibia, pieces, owner, anchor, fid, axis):
        fibula = None
    part = pieces[box]
    label = owner[part]
    seeds = np.where(label == anchor, 1, np.where(label == fid, 2, np.where(part > 0, 3, 0)))
    corner = tibia.index_to_physical(np.array([s.start for s in box[::-1]], float))
    near = Volume(tibia.array[box], tibia.spacing, corner, tibia.direction)

    def onto(values: np.ndarray, interpolation: str) -> np.ndarray:
        return resample(near.with_array(values.astype(np.float32)), grid, None, interpolation).array

    occupancy = ndimage.gaussian_filter(onto(near.array != 0, "linear"), SMOOTHING * tibia.spacing[::-1] / GRID_MM)
    parts = split_fragments(occupancy > 0.5, np.rint(onto(seeds, "nearest")).astype(np.uint8))
    # each fragment's occupancy: the tibia's where that fragment is the nearest part (outside the bone too)
    nearest = parts[tuple(ndimage.distance_transform_edt(parts == 0, return_distances=False, return_indices=True))]
    fit = fit_contact(occupancy * (nearest == 1), occupancy * (nearest == 2), onto(hidden[box], "nearest") > 0.5, grid,
                      moves[fid], axis, fibula)
    out = dict(moves)
    if fit is None:
        return out, {"fragment": fid, "kept": False, "reason": "too little broken face"}
    out[fid] = fit.move
    return out, {"fragment": fid, **fit.report}
