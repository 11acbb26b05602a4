"""Patient space -> canonical tensors: mirror right legs, align the tibia's long axis, crop, resample.

The canonical frame is a left-leg frame in mm (x lateral, y posterior, z superior) centred on the
tibia: its long axis (first principal axis of the mask voxels, pointing superiorly) lies along +z
and the middle of its extent along that axis is the origin; on prediction, a leg turned about that axis further
than the training phantoms' legs is also turned back (:func:`align_tibia`). One 4x4 LPS affine P maps patient
points to canonical points (reflection for a right leg, then a rotation and translation); it is
the only thing prediction needs to go back. Canonical tensors follow the layout of
:mod:`TibiaReconstructionLib.canonical`: (C, Z, Y, X) with channel 0 = tibia-masked intensity
normalised from ``window_hu`` to [0, 1] and channel 1 = tibia occupancy in [0, 1].
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import Grid, Volume, block_mean, bounding_box, check_same_grid, crop, grown_box, invert_affine, \
    make_affine, reflection, resample

DEFAULT_WINDOW_HU = (-200.0, 1800.0)
SIDES = ("left", "right")
CUT_ZONE_MM = 30.0  # an end of the tibia is cut off by the field of view when its mask lies on the CT's outer faces
MIN_CUT_MM2 = 100.0  # within this of the end, over at least this area (a shaft's cross-section is 300-500 mm²)
# The plateau: the top PLATEAU_MM of the tibia; its medial-lateral axis (where it is widest) counts when it is at least
# PLATEAU_MIN_RATIO times as wide as deep (41 held-out phantoms: 1.31-2.03)
PLATEAU_MM = 25.0
PLATEAU_MIN_RATIO = 1.2
# On the canonical frame the plateau's axis lies 0-40 deg from x (towards +y, posterior) on the phantoms the models
# learn from (41 held-out ones: 0.2-39.6, mean 21.9, SD 9.1): a leg turned further about its long axis in the
# scanner is turned back to PLATEAU_TURN_DEG[1] on prediction (:func:`align_tibia`'s ``limit_turn``)
PLATEAU_TURN_DEG = (0.0, 21.9, 40.0)  # lowest, typical, highest


def canonical_grid(size: Sequence[int] = (64, 64, 224), spacing: float | Sequence[float] = 2.0) -> Grid:
    """A canonical grid: identity direction, centred on the origin of the canonical frame."""
    size = tuple(int(s) for s in size)
    sp = np.broadcast_to(np.asarray(spacing, dtype=float), (3,)).copy()
    return Grid(size, sp, -(np.asarray(size) - 1) / 2.0 * sp, np.eye(3))


def _rotation_onto_z(axis: np.ndarray) -> np.ndarray:
    """Smallest rotation (3x3) taking unit vector ``axis`` onto +z."""
    a = axis / np.linalg.norm(axis)
    z = np.array([0.0, 0.0, 1.0])
    v, c = np.cross(a, z), float(a @ z)
    if np.linalg.norm(v) < 1e-12:
        return np.eye(3) if c > 0 else np.diag([1.0, -1.0, -1.0])
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)


def mirror_for_side(side: str, center: np.ndarray) -> np.ndarray:
    """4x4 LPS map that turns a ``side`` leg into a left leg: identity, or the sagittal reflection
    (x -> -x) about the plane through ``center``."""
    if side not in SIDES:
        raise InputError(f"Unknown leg side {side!r}; use 'left' or 'right'.")
    return np.eye(4) if side == "left" else reflection((1.0, 0.0, 0.0), center)


@dataclass
class Alignment:
    """P (4x4 LPS map, patient -> canonical), which ends of the tibia are cut off: by the CT's field of view (the
    mask lies on the grid's outer faces, over at least MIN_CUT_MM2, within CUT_ZONE_MM of that end) or, as
    :func:`align_tibia` is told, by a fragment missing from the mask; by how much P turns the leg back about its long
    axis (degrees, :func:`align_tibia`'s ``limit_turn``); and the part of the mask's grid whose voxels the model may
    take as seen (None: all of it, nothing is cut off)."""

    matrix: np.ndarray
    cut_distal: bool = False
    cut_proximal: bool = False
    turned_deg: float = 0.0
    field: Grid | None = None

    @property
    def cut(self) -> bool:
        return self.cut_distal or self.cut_proximal


def align_tibia(tibia: Volume, side: str, length_mm: float | None = None, limit_turn: bool = False,
                open_end: str | None = None) -> Alignment:
    """P from the tibia mask (see module doc) and where the field of view cuts the tibia off. With ``length_mm`` (a
    typical tibia's length) and only one end cut off, the canonical origin lies ``length_mm`` / 2 from the intact
    end rather than in the middle of the visible part (a knee or an ankle CT shows part of the tibia: centred on
    that part, its intact end would land far from where a whole tibia's end lies on the canonical grid).
    ``limit_turn``: where the CT shows the plateau and its axis (:func:`plateau_axis`) lies outside the range of
    PLATEAU_TURN_DEG, P also turns the leg about the canonical z axis to put it at the typical angle (a leg turned
    out or in by 30 deg beyond the training phantoms' range: RMSD up to 8 mm, not so turned 0.7); a leg turned by
    90 deg or more from the typical angle (past facing sideways) is taken as turned the other way. ``open_end``
    ('distal' or 'proximal'): the mask ends there in the shaft, a fragment missing from it
    (:func:`checks.tibia_extent`): that end counts as cut off, and the grid's voxels beyond the mask's end there as
    not seen."""
    box = bounding_box(tibia.array)
    idx = np.zeros((0, 3), int) if box is None else np.argwhere(crop(tibia, *box).array != 0) + box[0]
    if len(idx) < 10:
        raise InputError(f"The tibia mask has {len(idx)} voxels; it must cover the tibia. Check that the right "
                         "segment/label was chosen.")
    step = max(1, len(idx) // 200_000)  # a subsample is plenty for the principal axis
    idx = idx[::step]
    pts = tibia.index_to_physical(idx[:, ::-1].astype(float))
    centroid = pts.mean(axis=0)
    mirror = mirror_for_side(side, centroid)
    pts = pts @ mirror[:3, :3].T + mirror[:3, 3]
    centroid = pts.mean(axis=0)
    _, vecs = np.linalg.eigh(np.cov((pts - centroid).T))
    axis = vecs[:, -1] * (1.0 if vecs[2, -1] >= 0 else -1.0)  # long axis, pointing superiorly
    rot = _rotation_onto_z(axis)
    along = (pts - centroid) @ axis
    lo, hi = float(along.min()), float(along.max())
    # mask voxels on the grid's outer faces across the long axis (the first or last slice, not a side of the field
    # of view), each counting its face's area
    last = np.asarray(tibia.array.shape) - 1
    across = np.abs(axis @ mirror[:3, :3] @ tibia.direction)[::-1] > np.cos(np.radians(45.0))  # (k, j, i)
    face_mm2 = np.prod(tibia.spacing) / tibia.spacing[::-1] * across
    on_face = ((idx == 0) | (idx == last)) @ face_mm2 * step
    cut_distal = bool(on_face[along < lo + CUT_ZONE_MM].sum() >= MIN_CUT_MM2)
    cut_proximal = bool(on_face[along > hi - CUT_ZONE_MM].sum() >= MIN_CUT_MM2)
    field = tibia.grid if cut_distal or cut_proximal else None
    if open_end is not None and not (cut_distal if open_end == "distal" else cut_proximal):
        end = along < lo + CUT_ZONE_MM if open_end == "distal" else along > hi - CUT_ZONE_MM
        field = _field_up_to(tibia, box, idx[end], np.abs(axis @ mirror[:3, :3] @ tibia.direction)[::-1])
        cut_distal, cut_proximal = cut_distal or open_end == "distal", cut_proximal or open_end == "proximal"
    middle = (lo + hi) / 2.0
    if length_mm is not None and cut_distal != cut_proximal:
        half = max(length_mm, hi - lo) / 2.0
        middle = lo + half if cut_proximal else hi - half
    center = centroid + axis * middle
    turned = 0.0
    plateau = None if not limit_turn or cut_proximal else plateau_axis((pts - center) @ rot.T)
    if plateau is not None:  # an axis, not a direction: its angle within 90 deg of the typical one
        lowest, typical, highest = PLATEAU_TURN_DEG
        angle = (np.degrees(np.arctan2(plateau[1], plateau[0])) - typical + 90.0) % 180.0 - 90.0 + typical
        if not lowest <= angle <= highest:
            turned = typical - angle
            rot = _rotation_about_z(turned) @ rot
    return Alignment(make_affine(rot, -rot @ center) @ mirror, cut_distal, cut_proximal, round(float(turned), 2), field)


def _field_up_to(tibia: Volume, box: tuple[np.ndarray, np.ndarray], end: np.ndarray, along: np.ndarray) -> Grid:
    """The mask's grid cut at its index box's face that the voxels ``end`` ((n, 3) k, j, i: those at the open end)
    lie on, across the index axis most along the long axis (``along``: each (k, j, i) axis' share of it)."""
    a = int(np.argmax(along))
    lo, hi = np.zeros(3, int), np.asarray(tibia.array.shape) - 1
    if abs(end[:, a].mean() - box[0][a]) < abs(end[:, a].mean() - box[1][a]):
        lo[a] = box[0][a]
    else:
        hi[a] = box[1][a]
    return crop(tibia, lo, hi).grid


def plateau_axis(points: np.ndarray) -> np.ndarray | None:
    """The unit (x, y) direction in which the top PLATEAU_MM of the tibia (points (n, 3) mm, long axis along z,
    superior up) is widest: the plateau's medial-lateral axis; None when it is less than PLATEAU_MIN_RATIO times as
    wide as deep."""
    top = points[points[:, 2] > points[:, 2].max() - PLATEAU_MM, :2]
    if len(top) < 10:
        return None
    variances, vectors = np.linalg.eigh(np.cov((top - top.mean(0)).T))
    if variances[1] < PLATEAU_MIN_RATIO ** 2 * max(variances[0], 1e-9):
        return None
    return vectors[:, 1]


def _rotation_about_z(angle_deg: float) -> np.ndarray:
    """3x3 rotation by ``angle_deg`` about +z (x towards y)."""
    a = np.radians(angle_deg)
    return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])


def patient_to_canonical(tibia: Volume, side: str) -> np.ndarray:
    """4x4 LPS affine P from patient points to the canonical frame, from the tibia mask (see module doc)."""
    return align_tibia(tibia, side).matrix


def field_of_view(grid: Grid, field: Grid, transform: np.ndarray) -> np.ndarray:
    """Which voxels (Z, Y, X bool) of the canonical ``grid`` lie inside the CT grid ``field``, with patient ->
    canonical ``transform``."""
    to_field = np.linalg.inv(field.ijk_to_lps) @ invert_affine(transform) @ grid.ijk_to_lps
    axes = [np.arange(n, dtype=float) for n in grid.size]
    inside = np.ones(grid.shape, bool)
    for row, limit in zip(to_field[:3], field.size):  # each field index is affine in the grid's (i, j, k)
        index = (row[0] * axes[0][None, None, :] + row[1] * axes[1][None, :, None] + row[2] * axes[2][:, None, None]
                 + row[3])
        inside &= (index > -0.5) & (index < limit - 0.5)
    return inside


def _antialias(volume: Volume, target_spacing: np.ndarray, binary: bool = False) -> Volume:
    """Low-pass filter (float32; ``binary``: of volume != 0) before downsampling to ``target_spacing``: block
    averages over the integer number of voxels that fit in the target spacing (one cheap pass that shrinks the
    image), then a recursive (IIR) Gaussian for the rest of the blur, along each axis that gets coarser."""
    factors = [max(1, int(np.floor(t / s + 1e-6))) for s, t in zip(volume.spacing, target_spacing)]
    img = block_mean(volume, factors, binary).to_sitk()
    spacing = np.asarray(img.GetSpacing())
    sigma = np.sqrt(np.maximum(target_spacing.max() ** 2 - spacing ** 2, 0.0)) / 2.355
    for axis in range(3):
        if sigma[axis] >= 0.25 * spacing[axis]:
            img = sitk.RecursiveGaussian(img, float(sigma[axis]), False, sitk.RecursiveGaussianImageFilter.ZeroOrder,
                                         axis)
    return Volume.from_sitk(img)


@dataclass
class CanonicalCase:
    """Canonical tensor (C, Z, Y, X) float32, its visibility mask (Z, Y, X) or None, P (4x4) and the canonical z range
    (mm) of the tibia mask, hidden voxels included (None when not computed)."""

    tensor: np.ndarray
    visible: np.ndarray | None
    patient_to_canonical: np.ndarray
    tibia_z: tuple[float, float] | None = None


@dataclass
class SmoothedCrops:
    """CT, tibia and fracture masks (float32) cropped to the tibia box and pre-filtered for the canonical
    ``spacing`` (i, j, k mm); independent of P, so several candidate transforms can reuse them."""

    ct: Volume
    tibia: Volume
    fracture: Volume | None
    spacing: np.ndarray


def smoothed_crops(ct: Volume, tibia: Volume, spacing: np.ndarray, fracture: Volume | None = None,
                   margin_mm: float = 15.0) -> SmoothedCrops:
    """Crop to the tibia's box (+ margin) and anti-alias for resampling to ``spacing`` (mm)."""
    check_same_grid(ct, tibia, "CT", "tibia mask")
    if fracture is not None:
        check_same_grid(ct, fracture, "CT", "fracture mask")

    box = grown_box(tibia, margin_mm)  # once for the three: a scan of a CT-sized mask
    if box is None:
        raise InputError("The tibia mask is empty, so there is nothing to crop to. Segment the tibia (all fragments).")

    def prepared(volume: Volume, binary: bool) -> Volume:
        return _antialias(crop(volume, *box), spacing, binary)

    return SmoothedCrops(prepared(ct, False), prepared(tibia, True),
                         None if fracture is None else prepared(fracture, True), np.asarray(spacing, float))


def z_range(mask: np.ndarray, grid: Grid) -> tuple[float, float] | None:
    """The canonical z (mm) of the first and last slices (Z, Y, X on ``grid``) that hold ``mask``; None when empty."""
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    if len(slices) == 0:
        return None
    ends = grid.index_to_physical(np.array([[0.0, 0.0, slices[0]], [0.0, 0.0, slices[-1]]]))
    return float(ends[0, 2]), float(ends[1, 2])


def resample_crops(crops: SmoothedCrops, grid: Grid, transform: np.ndarray,
                   window_hu: Sequence[float] = DEFAULT_WINDOW_HU, unseen_outside: Grid | None = None
                   ) -> CanonicalCase:
    """Canonical tensors from smoothed crops with patient->canonical ``transform`` (see :func:`to_canonical`). With
    ``unseen_outside`` (the CT's grid, when it cuts the tibia off), the voxels outside it are not visible either: the
    scan says nothing about the tibia there, as the fracture mask says nothing about the bone in it."""
    lo, hi = float(window_hu[0]), float(window_hu[1])
    back = invert_affine(transform)
    ct_c = resample(crops.ct, grid, back, default_value=lo, dtype=np.float32).array
    occ = np.clip(resample(crops.tibia, grid, back, dtype=np.float32).array, 0.0, 1.0)
    intensity = np.clip((ct_c - lo) / (hi - lo), 0.0, 1.0) * occ
    tensor = np.stack([intensity, occ]).astype(np.float32)
    visible = None
    if crops.fracture is not None:
        visible = (resample(crops.fracture, grid, back, dtype=np.float32).array < 0.5).astype(np.uint8)
    if unseen_outside is not None:
        inside = field_of_view(grid, unseen_outside, transform)
        visible = (inside if visible is None else inside & (visible != 0)).astype(np.uint8)
    if visible is not None:
        tensor = tensor * visible[None]
    return CanonicalCase(tensor, visible, transform, z_range(occ > 0.5, grid))


def to_canonical(ct: Volume, tibia: Volume, grid: Grid, transform: np.ndarray,
                 window_hu: Sequence[float] = DEFAULT_WINDOW_HU, fracture: Volume | None = None,
                 margin_mm: float = 15.0) -> CanonicalCase:
    """Resample a CT and its tibia mask into the canonical ``grid`` with patient->canonical ``transform``.

    With a fracture mask, the fracture region is zeroed in both channels (the query input
    y * m_tibia * (1 - m_fracture)) and the visibility mask is returned.
    """
    return resample_crops(smoothed_crops(ct, tibia, grid.spacing, fracture, margin_mm), grid, transform, window_hu)


def prepare_case(ct: Volume, tibia: Volume, side: str, grid: Grid, window_hu: Sequence[float] = DEFAULT_WINDOW_HU,
                 fracture: Volume | None = None) -> CanonicalCase:
    """Canonical tensors of one case, with P computed from its own tibia mask."""
    return to_canonical(ct, tibia, grid, patient_to_canonical(tibia, side), window_hu, fracture)


# ---------------------------------------------------------------------------------------------
# Data sets: a list of cases (CT + tibia label [+ fractured version]) -> one canonical data set


@dataclass
class CaseFiles:
    """Files of one case. Paths are absolute; ``label_value`` selects the tibia in a multi-label map."""

    id: str
    ct: Path
    tibia: Path
    side: str
    label_value: int | None = None
    fractured_ct: Path | None = None
    fractured_tibia: Path | None = None
    fracture_mask: Path | None = None


def read_case_list(path: str | Path) -> list[CaseFiles]:
    """Cases from a JSON manifest ({"cases": [...]}) or a CSV with a header row.

    Keys/columns: id, ct, tibia (mask or label map), side (left/right), optional label_value, and for
    fractured cases fractured_ct, fractured_tibia, fracture_mask. Relative paths are relative to the
    list's folder and must stay inside it.
    """
    import csv

    path = Path(path)
    if not path.is_file():
        raise InputError(f"Case list not found: {path}.")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = data.get("cases", []) if isinstance(data, dict) else None
        elif path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        else:
            raise InputError(f"{path}: a case list must be .json or .csv.")
    except (ValueError, csv.Error) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise InputError(f"{path} is not a readable case list ({exc}); it must be a JSON manifest "
                         "{\"cases\": [...]} or a CSV with a header row.") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise InputError(f"{path}: a JSON case list must be an object {{\"cases\": [{{\"id\": ..., \"ct\": ..., "
                         "\"tibia\": ..., \"side\": ...}, ...]}.")
    if not rows:
        raise InputError(f"{path} lists no cases.")
    root = path.parent.resolve()

    def resolve(value, row_id, key):
        if value in (None, ""):
            return None
        try:
            p = (root / str(value)).resolve()
        except (OSError, ValueError) as exc:
            raise InputError(f"Case {row_id!r}: {key} path {value!r} is not a valid path ({exc}).") from None
        if root not in p.parents and p != root:
            raise InputError(f"Case {row_id!r}: {key} path {value!r} leaves the data set folder {root}; refused.")
        return p

    cases = []
    for n, row in enumerate(rows):
        cid = str(row.get("id") or f"case{n:04d}")
        missing = [k for k in ("ct", "tibia", "side") if not row.get(k)]
        if missing:
            raise InputError(f"Case {cid!r} in {path} lacks {', '.join(missing)}.")
        lv = row.get("label_value")
        if str(row["side"]).lower() not in SIDES:
            raise InputError(f"Case {cid!r} in {path} has side {row['side']!r}; use 'left' or 'right'.")
        try:
            lv = int(lv) if lv not in (None, "") else None
        except (TypeError, ValueError):
            raise InputError(f"Case {cid!r} in {path} has label_value {lv!r}; it must be a whole number.") from None
        cases.append(CaseFiles(cid, resolve(row["ct"], cid, "ct"), resolve(row["tibia"], cid, "tibia"),
                               str(row["side"]).lower(), lv,
                               resolve(row.get("fractured_ct"), cid, "fractured_ct"),
                               resolve(row.get("fractured_tibia"), cid, "fractured_tibia"),
                               resolve(row.get("fracture_mask"), cid, "fracture_mask")))
    return cases


def _prepare_volumes(entry: dict, ct: Volume, tibia: Volume, side: str, grid: Grid, window,
                     fractured: tuple[Volume, Volume, Volume] | None = None):
    """Canonical tensors of one case (healthy; plus fractured input and visibility when given)."""
    if fractured is None:
        c = prepare_case(ct, tibia, side, grid, window)
        entry["patient_to_canonical"] = c.patient_to_canonical.tolist()
        return entry, c.tensor.astype(np.float16), None, None
    fct, ftib, frac = fractured
    p = patient_to_canonical(ftib, side)  # as at query time: from the fractured tibia
    healthy = to_canonical(ct, tibia, grid, p, window)
    broken = to_canonical(fct, ftib, grid, p, window, frac)
    entry["patient_to_canonical"] = p.tolist()
    return entry, healthy.tensor.astype(np.float16), broken.tensor.astype(np.float16), broken.visible[None]


def _prepare_one(args):
    from .io import read_mask, read_volume

    case, grid, window = args
    ct = read_volume(case.ct)
    tibia = read_mask(case.tibia, ct, "tibia label", case.label_value)
    entry = {"id": case.id, "side": case.side, "ct": str(case.ct)}
    fractured = None
    if case.fractured_ct is not None:
        fct = read_volume(case.fractured_ct)
        fractured = (fct, read_mask(case.fractured_tibia or case.tibia, fct, "fractured tibia label", case.label_value),
                     read_mask(case.fracture_mask, fct, "fracture mask"))
    return _prepare_volumes(entry, ct, tibia, case.side, grid, window, fractured)


def _prepare_phantom(args):
    """Generate one fractured phantom in memory (coarse scanner-like spacing) and prepare it."""
    from .phantoms import generate_case

    seed, grid, window = args
    rng = np.random.default_rng([seed, 7])
    spacing = (float(rng.uniform(1.0, 1.6)),) * 2 + (float(rng.uniform(1.0, 3.0)),)
    c = generate_case(seed, fractured=True, spacing=spacing)
    entry = {"id": f"phantom{seed:06d}", "side": c.side, "seed": seed, "spacing": list(spacing),
             "fracture_type": c.fracture_type}
    return _prepare_volumes(entry, c.ct, c.labels.with_array((c.labels.array == 1).astype(np.uint8)), c.side, grid,
                            window,
        (c.fractured_ct, c.fractured_labels.with_array((c.fractured_labels.array == 1).astype(np.uint8)),
         c.fracture_mask))


def prepare_dataset(cases: list[CaseFiles] | range, out: str | Path, grid: Grid, window_hu=DEFAULT_WINDOW_HU,
                    workers: int = 1, overwrite: bool = False, progress: bool = True) -> Path:
    """Prepare every case into one canonical data set folder (see :mod:`canonical`).

    ``cases`` is a list of case files, or a range of seeds of fractured phantoms generated in memory.
    """
    from multiprocessing import get_context

    from tqdm import tqdm

    from .canonical import write_canonical_dataset

    if isinstance(cases, range):
        worker, fractured = _prepare_phantom, True
    else:
        worker, kinds = _prepare_one, {c.fractured_ct is not None for c in cases}
        if len(kinds) > 1:
            raise InputError("Mixing fractured and healthy-only cases in one data set is not supported; prepare "
                             "them separately.")
        fractured = kinds.pop()
    jobs = [(c, grid, tuple(window_hu)) for c in cases]
    if workers > 1:
        with get_context("spawn").Pool(workers) as pool:
            results = list(tqdm(pool.imap(worker, jobs), total=len(jobs), desc="prepare", disable=not progress))
    else:
        results = [worker(j) for j in tqdm(jobs, desc="prepare", disable=not progress)]
    images = np.stack([r[1] for r in results])
    inputs = np.stack([r[2] for r in results]) if fractured else None
    visible = np.stack([r[3] for r in results]) if fractured else None
    return write_canonical_dataset(out, grid, tuple(window_hu), [r[0] for r in results], images, inputs, visible,
                                   overwrite=overwrite)


def register_cli(sub) -> None:
    p = sub.add_parser("prepare", help="turn CTs + tibia labels (phantoms or real data) into canonical tensors",
                       description="Mirror right legs to left, align the tibia's long axis, crop and resample to "
                                   "the canonical grid, normalise tibia-masked HU to [0, 1]. Input: a JSON "
                                   "manifest (as `tibia-recon phantoms` writes) or a CSV with columns id, ct, "
                                   "tibia, side[, label_value, fractured_ct, fractured_tibia, fracture_mask].")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("cases", nargs="?", help="manifest.json or cases.csv")
    src.add_argument("--phantoms", type=int, metavar="N", help="instead: generate N fractured phantoms in memory "
                                                               "(seeds --seed .. --seed+N-1)")
    p.add_argument("--seed", type=int, default=0, help="first phantom seed (with --phantoms)")
    p.add_argument("--out", required=True, help="output data set folder")
    p.add_argument("--grid-size", type=int, nargs=3, default=(64, 64, 224), metavar=("X", "Y", "Z"))
    p.add_argument("--spacing", type=float, default=2.0, help="canonical voxel size in mm (default 2)")
    p.add_argument("--window", type=float, nargs=2, default=DEFAULT_WINDOW_HU, metavar=("LO", "HI"),
                   help="HU window mapped to [0, 1] (default -200 1800)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--overwrite", action="store_true")

    def run(a):
        cases = range(a.seed, a.seed + a.phantoms) if a.phantoms else read_case_list(a.cases)
        out = prepare_dataset(cases, a.out, canonical_grid(a.grid_size, a.spacing), a.window,
                              a.workers, a.overwrite)
        print(f"canonical data set written to {out}")

    p.set_defaults(func=run)
