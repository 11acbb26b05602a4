"""The patient's other leg as the template of the prediction (patient LPS, mm).

When the CT holds the healthy other leg, its tibia mirrored across the body's sagittal plane and fitted to the
fractured tibia's proximal main fragment (:func:`contralateral.contralateral_target`) is the classical target of
reduction planning. The shape model cannot tell a displaced distal fragment's twist and tilt to better than a few
degrees (tibial torsion and bow vary between people, :mod:`reassembly`); the other leg shows this patient's. Here
the template replaces the model's reconstruction where the prediction does not keep the patient's bone, and each
moved fragment is registered rigidly onto it: its intact outer surface (away from the fracture mask, where its
broken faces are) onto the template's surface, by Adam on a robust (Huber) loss of the signed distance, starting
from where the reduction put it. The reassembly (:mod:`reassembly`) then fits the broken faces together from there:
the two legs are alike, not equal, and where the template's length or angles differ from the patient's, the faces
tell (on 42 held-out cases with both legs, RMSD 1.135 mm with the template alone, 1.077 with the reassembly after).

Arrays are (Z, Y, X) on CT-aligned grids; moves are 4x4 maps of patient points from where a fragment lies in the CT
to where it goes in the prediction.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .geometry import Grid, Volume, apply_affine, boundary_distance, invert_affine, lattice, resample
from .reassembly import Field, as_affine, fragment_mask, turn_after
from .refine import adam_direction, one_thread, signed_distance

POINTS = 2000  # outer-surface voxels of a fragment (random subset) that drive its registration
CLEARANCE_VOXELS = 3  # surface voxels this close to the fracture mask are left out (its broken faces are there)
STEPS = 80
LR_ROTATION = 0.005  # rad per Adam step
LR_TRANSLATION = 0.3  # mm per Adam step
HUBER_MM = 2.0
MAX_TURN_DEG = 30.0  # a registration that turns the fragment or moves its centre by more than these is refused
MAX_SHIFT_MM = 40.0
# The template is not used when it does not describe this patient's tibia (the other leg deformed, mis-segmented or
# not the patient's): its fit to the proximal main fragment leaves more than MAX_FIT_RMS_MM, the main moved fragment's
# intact surface lies farther than MAX_FRAGMENT_MISFIT_MM from it once registered (mean), or it differs grossly from
# the model's reconstruction (mean surface distance above MAX_SHAPE_MSD_MM; the model itself can be a few millimetres
# off, where the template is most needed). With the patient's own other leg (21 held-out cases): at most 0.94, 0.54
# and 3.7 mm; with another phantom's (seed + 1): over the first in 13 of 16 fitted, 16 mm for a plateau fracture.
MAX_FIT_RMS_MM = 1.5
MAX_FRAGMENT_MISFIT_MM = 1.0
MAX_SHAPE_MSD_MM = 5.0
SHAPE_LATTICE_MM = 1.5  # that distance is measured on every n-th voxel of the grid, n = SHAPE_LATTICE_MM / spacing


def template_occupancy(bone: Volume, transform: np.ndarray, destination: Grid) -> np.ndarray:
    """The other tibia's mask ``bone`` (any grid, e.g. the CT's cropped to it) moved by ``transform`` (4x4 patient
    map, mirror and fit) as an occupancy in [0, 1] on ``destination`` (linear)."""
    return resample(bone.with_array((bone.array != 0).astype(np.float32)), destination, invert_affine(transform),
                    "linear").array


def template_box(bone: Volume, transform: np.ndarray, grid: Grid, step_mm: float = 2.0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The index box (lo, hi; (i, j, k), inclusive, within ``grid``, the CT's) that the other tibia's mask ``bone``
    covers once moved by ``transform``: of its voxels on a lattice of about ``step_mm`` (every n-th voxel along each
    axis), grown by the lattice's diagonal (a mask voxel lies that close to one on the lattice)."""
    coarse, sub = lattice(bone.grid, step_mm)
    points = coarse.index_to_physical(np.argwhere(bone.array[sub])[:, ::-1].astype(float))
    ijk = grid.physical_to_index(apply_affine(transform, points))
    margin = float(np.linalg.norm(coarse.spacing - bone.spacing)) / grid.spacing
    top = np.asarray(grid.size) - 1
    return (np.clip(np.floor(ijk.min(0) - margin), 0, top).astype(int),
            np.clip(np.ceil(ijk.max(0) + margin), 0, top).astype(int))


def mismatch(template: np.ndarray, model_occupancy: np.ndarray, destination: Grid, registered: list[dict]
             ) -> str | None:
    """Why the template (occupancy on ``destination``) does not describe the patient's tibia, or None: the main
    moved fragment (most surface points among ``registered``, :func:`place_on_template`'s report) lies farther than
    MAX_FRAGMENT_MISFIT_MM from it, or it differs from the model's reconstruction (``model_occupancy``, same grid) by
    more than MAX_SHAPE_MSD_MM mean surface distance (on a lattice of about SHAPE_LATTICE_MM: a millimetre-scale
    limit needs no finer grid, and a fine CT's grid makes the distance maps slow)."""
    if registered:
        main = max(registered, key=lambda f: f["points"])
        if main["misfit_after_mm"] > MAX_FRAGMENT_MISFIT_MM:
            return (f"the moved fragment's intact surface lies {main['misfit_after_mm']:.1f} mm (mean) from the "
                    f"mirrored other tibia once registered onto it (at most {MAX_FRAGMENT_MISFIT_MM:g} mm): the legs "
                    "differ")
    coarse, sub = lattice(destination, SHAPE_LATTICE_MM)
    a, b = template[sub] >= 0.5, model_occupancy[sub] >= 0.5
    if not a.any() or not b.any():
        return "the mirrored other tibia or the model's reconstruction is empty on the prediction's grid"
    da, db = boundary_distance(a, coarse.spacing), boundary_distance(b, coarse.spacing)
    msd = float(np.mean(np.abs(np.concatenate([db[da == 0], da[db == 0]]))))
    if msd > MAX_SHAPE_MSD_MM:
        return (f"the mirrored other tibia differs from the model's reconstruction of the fractured one by "
                f"{msd:.1f} mm (mean surface distance; at most {MAX_SHAPE_MSD_MM:g} mm)")
    return None


def register_onto(field: Field, points: np.ndarray, move: np.ndarray, depth_mm: float = 0.0) -> tuple[np.ndarray, dict]:
    """The rigid move (4x4) that lays ``points`` (n, 3; patient, where the fragment lies in the CT; ``depth_mm``
    inside its surface) onto the surface whose signed distance ``field`` samples, starting from ``move``; and the
    mean distance (mm) before and after, the change's turn (deg) and its shift of the points' centre (mm)."""
    p = torch.from_numpy(points.astype(np.float32))
    m = torch.from_numpy(move.astype(np.float32))
    centre = (p @ m[:3, :3].T + m[:3, 3]).mean(0)

    params = torch.zeros(1, 6)
    moments = torch.zeros(2, 1, 6)
    lr = torch.tensor([LR_ROTATION] * 3 + [LR_TRANSLATION] * 3)
    with torch.enable_grad(), one_thread():
        params.requires_grad_(True)
        for step in range(1, STEPS + 1):
            d = field(p, *turn_after(m, centre, params))[0] + depth_mm
            loss = F.huber_loss(d, torch.zeros_like(d), delta=HUBER_MM)
            (grad,) = torch.autograd.grad(loss, params)
            with torch.no_grad():
                params -= lr * adam_direction(moments, grad, step)
    with torch.no_grad():
        params = params.detach()
        r, t = turn_after(m, centre, torch.cat([torch.zeros(1, 6), params]))
        before, after = (field(p, r, t)[0] + depth_mm).abs().mean(-1).tolist()
    return as_affine(r[1], t[1]), {"misfit_before_mm": round(before, 2), "misfit_after_mm": round(after, 2),
                    "turn_deg": round(float(np.degrees(float(params[0, :3].norm()))), 2),
                    "shift_mm": round(float(params[0, 3:].norm()), 2)}


def place_on_template(template: np.ndarray, destination: Grid, tibia: Volume, hidden: np.ndarray, pieces: np.ndarray,
                      owner: np.ndarray, moves: dict[int, np.ndarray], anchor: int
                      ) -> tuple[dict[int, np.ndarray], list[dict]]:
    """Register every moved fragment onto the template (module docstring). ``template``: its occupancy on
    ``destination``; ``tibia``: the tibia mask on a lattice of the CT, ``hidden`` the fracture mask and ``pieces`` the
    visible pieces' labels on it, ``owner`` each piece's fragment id (0: none); ``moves``: each fragment's move.
    Returns the moves (a new dict; the anchor's unchanged) and a report per registered fragment (id, mean distance
    before and after, turn, shift, kept: a registration that does not bring the fragment closer, or moves it
    implausibly far, is not kept)."""
    out, report = dict(moves), []
    moved = [f for f in moves if f != anchor]
    if not moved or not template.any():
        return out, report
    field = Field(signed_distance(template, destination.spacing), destination, directions=False)
    near_break = ndimage.binary_dilation(hidden, iterations=CLEARANCE_VOXELS)
    rng = np.random.default_rng(0)
    for fid in moved:
        piece = fragment_mask(pieces, owner, fid)
        kji = np.argwhere(piece & ~ndimage.binary_erosion(piece) & ~near_break)
        surface = len(kji)  # before the subset: which fragment shows most surface (mismatch's main fragment)
        if surface < 50:
            continue
        kji = kji[rng.choice(surface, POINTS, replace=False)] if surface > POINTS else kji
        fitted, fit = register_onto(field, tibia.grid.index_to_physical(kji[:, ::-1].astype(float)), moves[fid],
                                    0.5 * float(tibia.spacing.min()))  # a boundary voxel lies half a voxel inside
        fit["kept"] = bool(fit["misfit_after_mm"] < fit["misfit_before_mm"] and fit["turn_deg"] <= MAX_TURN_DEG
                           and fit["shift_mm"] <= MAX_SHIFT_MM)
        if fit["kept"]:
            out[fid] = fitted
        report.append({"id": fid, "points": surface, **fit})
    return out, report
