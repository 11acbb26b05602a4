"""Keep the patient's own bone where the CT shows it: fuse the visible fragments into the model's prediction.

The model reconstructs the whole tibia at its own resolution (2 mm), smoothly and with an error of about a
millimetre even where the bone is plainly visible. Outside the fracture mask the CT shows the real surface. Here
each visible piece of the tibia (6-connected, outside the fracture mask, on the prediction's work grid: along the
CT's axes at about half the model's spacing) is matched to the fragment of the model's reduction
(:class:`refine.Placement`) that holds it, moved rigidly to where the reduction put that fragment (the rigid map
nearest to the reduction's move; the anchor stays put; the main moved fragment where its broken face meets the
anchor's, when they clearly do: :mod:`reassembly`)
and pasted into the prediction: within OWN_MM of a pasted piece, outside the fracture mask (moved with its
fragment) and nearer to a pasted piece than to a fragment left to the model, the prediction becomes the patient's
bone; elsewhere, above all in the fracture zone, it stays the model's. Pieces of fragments that fit the
reconstruction worse than MAX_MISFIT_MM, or too small to match, are left to the model. With the other leg's tibia as
the template (:mod:`template`), the template takes the model's place and the moved fragments are registered onto it,
then reassembled from there.

All arrays are (k, j, i) on CT-aligned grids; moves are 4x4 LPS maps of patient points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .geometry import Grid, Volume, apply_affine, boundary_distance, bounding_box, crop, invert_affine, nearest_rigid, \
    resample
from .fibula import find_broken_fibula
from .reassembly import fragment_mask, reassemble
from .refine import Placement
from .template import mismatch, place_on_template

# The prediction becomes the patient's bone this close to a pasted piece (outside the fracture mask moved with it). The
# model's shape farther out stays: where the reassembly turned a fragment away from where the model placed it, the
# model's copy of that fragment is left as a ghost beside the patient's bone beyond this distance (a distal fragment
# turned 6 deg: RMSD 5.2 mm). From the fractured leg alone, 20 held-out cases each at 1 x 1 x 2 mm (seeds 500000-19 /
# 700000-19), RMSD 5 mm: 1.422 / 1.432; 10: 1.267 / 1.395; 20: 1.202 / 1.313; 30: 1.219 / 1.183 but split condyles
# left to the model lose bone (500007 1.02 -> 1.23 mm) and with the other leg 1.022 -> 1.040 (20: 0.997).
OWN_MM = 20.0
PIECE_MARGIN_MM = 5.0  # a moved piece carries the fracture mask this close to it along
MAX_MISFIT_MM = 3.0  # fragments whose surface lies farther than this (mean) from the reconstruction are not pasted
MIN_PIECE_ML = 0.2  # smaller visible pieces are left to the model
VOTES = 400  # voxels per piece looked up on the canonical grid to find its fragment


@dataclass
class Fused:
    """The prediction with the patient's bone in it, on ``grid`` (the destination): occupancy in [0, 1], HU of the
    pasted bone (valid where ``owned`` and occupancy >= 0.5), the voxels taken from the patient (``owned``), those of
    them from the fragment that stays put (``fixed``: the patient's bone where it is, not placed by the reduction),
    and a report (per fragment: id, anchor, misfit in mm, visible volume in ml, whether it was pasted; and the share
    of the predicted tibia's voxels that are the patient's bone)."""

    grid: Grid
    occupancy: np.ndarray
    hu: np.ndarray
    owned: np.ndarray
    fixed: np.ndarray
    report: dict


def patient_moves(placement: Placement, patient_to_canonical: np.ndarray) -> dict[int, np.ndarray]:
    """Each fragment's move (fragment id -> 4x4) as a map of patient LPS points: P⁻¹ M P."""
    back = invert_affine(patient_to_canonical)
    return {fid: back @ move @ patient_to_canonical for fid, move in zip(placement.ids, placement.moves)}


def rigid_moves(moves: dict[int, np.ndarray], pieces: np.ndarray, owner: np.ndarray, source: Grid
                ) -> dict[int, np.ndarray]:
    """Each fragment's move made rigid in the patient: the reduction moves fragments rigidly in the model's standard
    frame, which θ maps to the patient with some scaling and shear (up to about 1 %), but a fragment is a rigid body.
    The rigid map nearest to the move over the fragment's visible voxels (``pieces`` on ``source``, read every
    second voxel; ``owner``: each piece's fragment id) replaces it; fragments that show no voxels keep theirs."""
    labels = pieces[::2, ::2, ::2]
    half = Grid(tuple(labels.shape[::-1]), source.spacing * 2, source.origin, source.direction)
    out = dict(moves)
    for fid, move in moves.items():
        kji = np.argwhere(np.isin(labels, np.flatnonzero(owner == fid)))
        if len(kji) >= 4 and not np.allclose(move, np.eye(4), atol=1e-6):
            points = half.index_to_physical(kji[:, ::-1].astype(float))
            out[fid] = nearest_rigid(move, points.mean(0), np.cov(points.T))
    return out


def _fragment_of_pieces(pieces: np.ndarray, n: int, source: Grid, placement: Placement, canonical: Grid,
                        patient_to_canonical: np.ndarray) -> np.ndarray:
    """For each piece 1..n (labels on ``source``), the placement's fragment id that most of a sample of its voxels
    falls in on the canonical grid (0: none)."""
    owner = np.zeros(n + 1, np.int64)
    rng = np.random.default_rng(0)
    objects = ndimage.find_objects(pieces)
    for label, where in enumerate(objects, start=1):
        kji = np.argwhere(pieces[where] == label) + [s.start for s in where]
        if len(kji) > VOTES:
            kji = kji[rng.choice(len(kji), VOTES, replace=False)]
        points = source.index_to_physical(kji[:, ::-1].astype(float))
        ijk = np.rint(canonical.physical_to_index(apply_affine(patient_to_canonical, points))).astype(int)
        inside = np.all((ijk >= 0) & (ijk < canonical.size), axis=1)
        votes = np.bincount(placement.labels[tuple(ijk[inside][:, ::-1].T)], minlength=1)
        votes[0] = 0
        owner[label] = int(np.argmax(votes)) if votes.any() else 0
    return owner


def _within(mask: np.ndarray, spacing_kji: np.ndarray, distance_mm: float) -> np.ndarray:
    """Voxels within about ``distance_mm`` of ``mask`` (Z, Y, X): the distance is taken on blocks of 2x2x2 voxels
    (a block counts when any of its voxels does), which is 8 times cheaper and exact to a block; ITK's Maurer
    distance (multi-threaded, exact Euclidean) to the blocks' boundary."""
    padded = np.pad(mask, [(0, n % 2) for n in mask.shape])
    blocks = np.zeros(tuple(n // 2 for n in padded.shape), bool)
    for corner in np.ndindex(2, 2, 2):
        blocks |= padded[corner[0]::2, corner[1]::2, corner[2]::2]
    near = boundary_distance(blocks, 2.0 * spacing_kji[::-1]) <= distance_mm
    k, j, i = near.shape
    doubled = np.broadcast_to(near[:, None, :, None, :, None], (k, 2, j, 2, i, 2)).reshape(2 * k, 2 * j, 2 * i)
    return doubled[:mask.shape[0], :mask.shape[1], :mask.shape[2]]


def _on_lattice(values: np.ndarray, offset: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The part of ``values`` (a source on the destination's lattice, starting ``offset`` source voxels before
    it) that covers the destination of ``shape``; zero where the source does not reach."""
    out = np.zeros(shape, values.dtype)
    lo = np.maximum(offset, 0)
    hi = np.minimum(offset + np.asarray(shape), values.shape)
    if np.all(hi > lo):
        out[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset))] = values[tuple(slice(a, b) for a, b in
                                                                                          zip(lo, hi))]
    return out


def _moved_piece(piece: np.ndarray, hu: np.ndarray, hidden: np.ndarray, source: Grid, destination: Grid,
                 move: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray, np.ndarray]:
    """A piece (bool on ``source``) moved by ``move`` (4x4 LPS) onto the part of ``destination`` it reaches (grown
    by PIECE_MARGIN_MM): that part's slices, the piece's occupancy there, its HU and the fracture mask next to it (in
    that part), moved with it."""
    margin = np.ceil(PIECE_MARGIN_MM / source.spacing[::-1]).astype(int) + 1  # (k, j, i)
    lo, hi = bounding_box(piece)
    lo, hi = np.maximum(lo - margin, 0), np.minimum(hi + margin, np.asarray(piece.shape) - 1)
    part = tuple(slice(a, b + 1) for a, b in zip(lo, hi))
    origin = source.index_to_physical(lo[::-1].astype(float))
    box = Grid(tuple((hi - lo + 1)[::-1]), source.spacing, origin, source.direction)
    corners = destination.physical_to_index(apply_affine(move, box.corners()))[:, ::-1]  # (k, j, i)
    size = np.asarray(destination.shape)
    d_lo = np.clip(np.floor(corners.min(0)).astype(int) - 1, 0, size - 1)
    d_hi = np.clip(np.ceil(corners.max(0)).astype(int) + 1, 0, size - 1)
    reach = Grid(tuple((d_hi - d_lo + 1)[::-1]), destination.spacing,
                 destination.index_to_physical(d_lo[::-1].astype(float)), destination.direction)
    back = invert_affine(move)  # a point of the prediction -> where the fragment shows it on the CT

    def moved(values: np.ndarray, interpolation: str = "linear") -> np.ndarray:
        return resample(Volume.on_grid(values, box), reach, back, interpolation, dtype=np.float32).array

    occ = moved(piece[part].astype(np.float32))
    values = moved(np.where(piece[part], hu[part], 0).astype(np.float32)) / np.maximum(occ, 1e-3)
    return (tuple(slice(a, b + 1) for a, b in zip(d_lo, d_hi)), occ, values,
            moved(hidden[part].astype(np.uint8), "nearest") > 0)


def fuse_visible_bone(model_occupancy: np.ndarray, destination: Grid, ct: Volume, tibia: Volume, fracture: Volume,
                      tibia_box: tuple[np.ndarray, np.ndarray], placement: Placement, canonical: Grid,
                      patient_to_canonical: np.ndarray, reassemble_fragments: bool = True,
                      template: np.ndarray | None = None) -> Fused:
    """Fuse the visible fragments (module docstring) into ``model_occupancy`` (on ``destination``: along the CT's axes
    through CT voxel centres, every n-th voxel along each axis). The masks are read on that lattice too. ``tibia_box``:
    the tibia mask's index box (lo, hi inclusive, (k, j, i)) on the CT; ``canonical``: the grid of ``placement.labels``;
    ``patient_to_canonical``: the 4x4 LPS map P; ``reassemble_fragments``: refit the main moved fragment's move by the
    contact of the broken faces and, without a template, a broken fibula's ends lining up
    (:func:`reassembly.reassemble`, :mod:`fibula`; its report is the report's "reassembly"); ``template``: the other
    leg's tibia fitted to the anchor, as an occupancy on ``destination`` (:mod:`template`): it replaces
    ``model_occupancy`` and the moved fragments are registered onto it before the reassembly (the report's "template"; a
    registered fragment is pasted when it lies within MAX_MISFIT_MM of the template rather than of the reconstruction),
    unless :func:`template.mismatch` finds it unlike the patient's tibia (the report's "template_refused" says why; the
    fusion is then made without it). Inputs are not modified."""
    step = np.maximum(np.rint(destination.spacing / ct.spacing), 1).astype(int)[::-1]  # (k, j, i)
    start = np.rint(ct.grid.physical_to_index(destination.origin)[::-1]).astype(int)
    end = start + step * (np.asarray(destination.shape) - 1)
    # the source: the tibia's box and the destination's, on the destination's lattice, inside the CT
    lo = start - step * np.ceil((start - np.minimum(tibia_box[0] - step, start)) / step).astype(int)
    lo = np.where(lo < 0, lo + step * np.ceil(-lo / step).astype(int), lo)
    hi = np.maximum(tibia_box[1] + step, end)
    offset = (start - lo) // step  # the destination's first voxel in source voxels

    def source_volume(volume: Volume) -> Volume:
        part = crop(volume, lo, hi)
        return Volume(part.array[::step[0], ::step[1], ::step[2]], part.spacing * step[::-1], part.origin,
                      part.direction)

    tib = source_volume(tibia)
    source = tib.grid
    hidden = source_volume(fracture).array != 0
    pieces, n = ndimage.label((tib.array != 0) & ~hidden)
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)
    owner = _fragment_of_pieces(pieces, n, source, placement, canonical, patient_to_canonical)
    voxel_ml = float(np.prod(source.spacing)) / 1000.0
    owner[sizes * voxel_ml < MIN_PIECE_ML] = 0
    moves = rigid_moves(patient_moves(placement, patient_to_canonical), pieces, owner, source)
    misfits = dict(zip(placement.ids, placement.misfit_mm))
    on_template, refused = [], None
    if template is not None:  # the other leg gives the fragments' pose; the broken faces then refine it
        registered, on_template = place_on_template(template, destination, tib, hidden, pieces, owner, moves,
                                                    placement.anchor)
        refused = mismatch(template, model_occupancy, destination, on_template)
        if refused is None:
            moves = registered
            misfits.update((f["id"], f["misfit_after_mm"]) for f in on_template if f["kept"])
        else:
            template = None
    reassembly = {}
    if reassemble_fragments:
        axis = invert_affine(patient_to_canonical)[:3, :3] @ np.array([0.0, 0.0, 1.0])
        # the other leg, when it is the template, tells the fragment's turn better than a broken fibula does; and
        # with no fragment moved there is nothing for the fibula to place
        fibula = find_broken_fibula(ct, tibia, tibia_box, patient_to_canonical) \
            if template is None and any(f != placement.anchor for f in moves) else None
        moves, reassembly = reassemble(tib, hidden, pieces, owner, moves, placement.anchor, axis / np.linalg.norm(axis),
                                       fibula)
    hu_source = source_volume(ct).array
    pasted = np.zeros(destination.shape, np.float32)
    hu = np.zeros(destination.shape, np.float32)
    covered = np.zeros(destination.shape, bool)
    still = np.zeros(destination.shape, bool)  # where the pasted bone comes from a fragment that stays put
    left = np.zeros(destination.shape, np.float32)  # visible fragments left to the model, where they are placed
    fragments = []
    for fid, misfit in misfits.items():
        piece = fragment_mask(pieces, owner, fid)
        seen = bool(piece.any())
        keep = seen and misfit <= MAX_MISFIT_MM
        fragments.append({"id": fid, "anchor": fid == placement.anchor, "misfit_mm": round(float(misfit), 2),
                          "visible_ml": round(float(piece.sum() * voxel_ml), 2), "pasted": keep})
        if not seen:
            continue
        stays = bool(np.allclose(moves[fid], np.eye(4), atol=1e-4))
        if stays:  # the anchor: copied, not resampled
            where = (slice(None),) * 3
            occ = _on_lattice(piece.astype(np.float32), offset, destination.shape)
            values = _on_lattice(hu_source, offset, destination.shape).astype(np.float32)
            hidden_here = _on_lattice(hidden, offset, destination.shape)
        else:
            where, occ, values, hidden_here = _moved_piece(piece, hu_source, hidden, source, destination, moves[fid])
        if not keep:
            np.maximum(left[where], occ, out=left[where])
            continue
        better = occ > pasted[where]
        np.copyto(pasted[where], occ, where=better)
        np.copyto(hu[where], values, where=better)
        np.copyto(still[where], stays, where=better)
        covered[where] |= hidden_here
    owned = np.zeros(destination.shape, bool)
    if any(f["pasted"] for f in fragments):
        owned = _within(pasted >= 0.5, destination.spacing[::-1], OWN_MM) & ~covered
        if (left >= 0.5).any():  # the model's copy of a fragment left to it keeps the voxels nearer to that fragment
            spacing = destination.spacing
            owned &= boundary_distance(pasted >= 0.5, spacing) <= boundary_distance(left >= 0.5, spacing)
    occupancy = np.where(owned, pasted, model_occupancy if template is None else template).astype(np.float32)
    kept = occupancy >= 0.5
    report = {"fragments": fragments, "reassembly": reassembly,
              **({"template": on_template} if template is not None else {}),
              **({"template_refused": refused} if refused is not None else {}),
              "patient_bone_share": round(float((kept & owned).sum() / max(kept.sum(), 1)), 4)}
    return Fused(destination, occupancy, hu, owned, owned & still, report)
