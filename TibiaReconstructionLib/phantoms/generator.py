"""Synthetic lower-leg CT cases (healthy and fractured tibia) with ground truth, and their files.

A case is fully determined by its seed: independent random streams (numpy SeedSequence children)
drive side, anatomy, scanner, tissue, fracture and the two noise draws, so the healthy part of a
case does not depend on whether it is fractured. All volumes of a case share one LPS grid. Right
legs are the left-leg case mirrored about the plane x = 0 (LPS; x -> -x), arrays and transforms alike.
With ``both_legs`` the other leg (healthy; same shape with bilateral asymmetry, see anatomy.py; placed
beside it, see scanner.place_other_leg) is in the same CT from its own random stream, so the first
leg's anatomy, pose and fracture are those of the one-leg case of the same seed (the grid is wider).

Files written by :func:`write_case` (FMT = nrrd or nii.gz):
  ct.FMT (int16 HU, healthy), labels.FMT (uint8: 1 tibia, 2 fibula, 3 femur, 4 patella, 5 talus),
  tibia_mask.FMT (labels == 1), and for a fractured case fractured_ct.FMT, fractured_labels.FMT,
  fractured_tibia_mask.FMT, fracture_mask.FMT (uint8 0/1), fragments.FMT (tibia fragment ids 1..n),
  plus case.json (seed, side, spacing, fracture type, per-fragment 4x4 LPS healthy->fractured transforms).
With both legs also other_tibia_mask.FMT (labels == 6; the other leg's bones are labelled 6-10) and
case.json "other_leg" (side, tibia label, pose, shape coefficients).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..geometry import Volume, mirror
from ..io import read_volume, write_json, write_volume
from .anatomy import Surface, sample_anatomy, sample_other_leg
from .ct import LABEL_NAMES, OTHER_LABEL_NAMES, OTHER_TIBIA, TIBIA, acquire, build_scene, clean_ct, sample_tissue
from .fractures import EXTRA_FRACTURE_TYPES, FRACTURE_TYPES, SHAFT_BAND, apply_fracture, plan_fracture
from .scanner import sample_scan

FORMATS = ("nrrd", "nii.gz")
CASE_JSON = "case.json"


@dataclass(eq=False)
class PhantomCase:
    """One synthetic case. Volumes are LPS on one grid; ``fragments``: dicts with 'id', 'transform'
    (4x4 LPS, healthy -> fractured position), 'volume_ml'. ``tibia_surface``: the healthy tibia's closed
    surface in LPS mm. ``info``: the sampled parameters (anatomy, pose, tissue, scanner). With both legs:
    ``other_pose`` (4x4, the other leg's left-leg anatomical frame -> LPS; a reflection for a right leg),
    ``other_tibia_surface`` (LPS mm) and ``other_shape_coefficients``; its tibia is ``labels == OTHER_TIBIA``
    (healthy in the fractured labels too)."""

    ct: Volume
    labels: Volume
    side: str
    seed: int
    shape_coefficients: np.ndarray
    tibia_surface: Surface | None = None
    info: dict = field(default_factory=dict)
    fractured_ct: Volume | None = None
    fractured_labels: Volume | None = None
    fracture_mask: Volume | None = None
    fracture_type: str | None = None
    fragments: list[dict] = field(default_factory=list)
    fragment_ids: Volume | None = None
    other_pose: np.ndarray | None = None
    other_tibia_surface: Surface | None = None
    other_shape_coefficients: np.ndarray | None = None

    @property
    def fractured(self) -> bool:
        return self.fractured_ct is not None

    @property
    def both_legs(self) -> bool:
        return self.other_pose is not None

    @property
    def other_tibia(self) -> Volume | None:
        """The other leg's tibia mask (uint8 0/1), or None with one leg."""
        if not self.both_legs:
            return None
        return self.labels.with_array((self.labels.array == OTHER_TIBIA).astype(np.uint8))


def generate_case(seed: int, fractured: bool = True, side: str | None = None, spacing: tuple | None = None,
                  fracture_type: str | None = None, oblique: bool = False, size_limit_mm=None,
                  both_legs: bool = False, shaft_band: tuple[float, float] = SHAFT_BAND) -> PhantomCase:
    """Make one case from ``seed``.

    side: 'left', 'right' or None (random). spacing: (sx, sy, sz) mm along the grid axes, one number
    for isotropic, or None for a random scanner-like spacing (in-plane 0.6-1.0 mm, slices 0.625-3 mm).
    fracture_type: one of FRACTURE_TYPES or EXTRA_FRACTURE_TYPES (never drawn at random), or None (random one of
    FRACTURE_TYPES). oblique: tilted grid axes (direction
    matrix up to 20 deg per Euler angle). size_limit_mm: cap on the grid extent (see scanner.sample_scan).
    both_legs: the healthy other leg in the same CT (module docstring); only ``side``'s leg is fractured.
    shaft_band: where along the tibia shaft fractures lie (fractions of its length from the ankle; the same seed
    draws the same fracture, at its place in the band).
    """
    if side not in (None, "left", "right"):
        raise InputError(f"side must be 'left', 'right' or None (random), got {side!r}.")
    if fracture_type is not None and fracture_type not in FRACTURE_TYPES + EXTRA_FRACTURE_TYPES:
        raise InputError(f"Unknown fracture type {fracture_type!r}; use one of "
                         f"{', '.join(FRACTURE_TYPES + EXTRA_FRACTURE_TYPES)}.")
    seed = int(seed)
    r_side, r_anat, r_scan, r_tissue, r_frac, r_noise, r_noise_f, r_other = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(8))
    drawn_side = "left" if r_side.random() < 0.5 else "right"
    side = side or drawn_side
    anatomy = sample_anatomy(r_anat)
    other = sample_other_leg(r_other, anatomy) if both_legs else None
    scan = sample_scan(r_scan, anatomy, spacing, oblique, size_limit_mm, other, r_other)
    tissue = sample_tissue(r_tissue)
    scene = build_scene(anatomy, scan, other)
    clean = clean_ct(scene, anatomy, tissue, r_tissue, other)
    grid = scan.grid
    info = {"anatomy": anatomy.params, "pose_anatomical_to_lps": scan.pose, "tissue": tissue.to_dict(),
            "tibia_length_mm": anatomy.tibia_z[1] - anatomy.tibia_z[0]}
    case = PhantomCase(
        ct=Volume.on_grid(acquire(clean, grid, tissue, r_noise), grid), labels=Volume.on_grid(scene.labels, grid),
        side="left", seed=seed, shape_coefficients=anatomy.coefficients,
        tibia_surface=anatomy.tibia.transformed(scan.pose), info=info)
    if other is not None:
        info["other_leg"] = {"anatomy": other.params, "tibia_length_mm": other.tibia_z[1] - other.tibia_z[0]}
        case.other_pose = scan.other_pose
        case.other_tibia_surface = other.tibia.transformed(scan.other_pose)
        case.other_shape_coefficients = other.coefficients
    if fractured:
        plan = plan_fracture(r_frac, anatomy, tissue, fracture_type, shaft_band)
        result = apply_fracture(scene, clean, anatomy, plan, tissue, r_frac)
        del clean
        case.fractured_ct = Volume.on_grid(acquire(result.clean, grid, tissue, r_noise_f), grid)
        case.fractured_labels = Volume.on_grid(result.labels, grid)
        case.fracture_mask = Volume.on_grid(result.mask, grid)
        case.fragment_ids = Volume.on_grid(result.fragment_ids, grid)
        case.fracture_type = plan.type
        case.fragments = result.fragments
        info["fracture"] = {"fibula_broken": plan.fibula_cut_z is not None}
    return mirror_case(case) if side == "right" else case


def mirror_case(case: PhantomCase) -> PhantomCase:
    """The case mirrored about the plane x = 0 (LPS): a left leg becomes a right leg and vice versa."""
    h = None

    def flip(v: Volume | None) -> Volume | None:
        nonlocal h
        if v is None:
            return None
        out, h = mirror(v, normal=(1.0, 0.0, 0.0), point=(0.0, 0.0, 0.0))
        return out

    ct = flip(case.ct)
    out = PhantomCase(
        ct=ct, labels=flip(case.labels), side="right" if case.side == "left" else "left", seed=case.seed,
        shape_coefficients=case.shape_coefficients,
        tibia_surface=case.tibia_surface.transformed(h) if case.tibia_surface is not None else None,
        info={**case.info, "mirrored_about_x0": True}, fractured_ct=flip(case.fractured_ct),
        fractured_labels=flip(case.fractured_labels), fracture_mask=flip(case.fracture_mask),
        fracture_type=case.fracture_type, fragment_ids=flip(case.fragment_ids),
        fragments=[{**f, "transform": h @ f["transform"] @ h} for f in case.fragments],
        other_pose=None if case.other_pose is None else h @ case.other_pose,
        other_tibia_surface=case.other_tibia_surface.transformed(h) if case.other_tibia_surface is not None else None,
        other_shape_coefficients=case.other_shape_coefficients)
    return out


def _file_names(fmt: str, fractured: bool, both_legs: bool = False) -> dict[str, str]:
    names = ["ct", "labels", "tibia_mask"] + (["other_tibia_mask"] if both_legs else [])
    if fractured:
        names += ["fractured_ct", "fractured_labels", "fractured_tibia_mask", "fracture_mask", "fragments"]
    return {n: f"{n}.{fmt}" for n in names}


def write_case(case: PhantomCase, folder: str | os.PathLike, fmt: str = "nrrd", overwrite: bool = False) -> dict:
    """Write a case's volumes and case.json into ``folder``; returns the case.json content (paths relative)."""
    if fmt not in FORMATS:
        raise InputError(f"Unknown format {fmt!r}; use one of {', '.join(FORMATS)}.")
    folder = Path(folder)
    files = _file_names(fmt, case.fractured, case.both_legs)
    volumes = {"ct": case.ct, "labels": case.labels, "tibia_mask": case.labels.with_array(
        (case.labels.array == TIBIA).astype(np.uint8))}
    if case.both_legs:
        volumes["other_tibia_mask"] = case.other_tibia
    if case.fractured:
        volumes.update(fractured_ct=case.fractured_ct, fractured_labels=case.fractured_labels,
                       fractured_tibia_mask=case.fractured_labels.with_array(
                           (case.fractured_labels.array == TIBIA).astype(np.uint8)),
                       fracture_mask=case.fracture_mask, fragments=case.fragment_ids)
    for name, vol in volumes.items():
        write_volume(vol, folder / files[name], label=not name.endswith("ct"), overwrite=overwrite)
    meta = {
        "format_version": 1, "seed": case.seed, "side": case.side, "fractured": case.fractured,
        "fracture_type": case.fracture_type, "grid": case.ct.grid.to_dict(),
        "spacing": case.ct.spacing.tolist(), "labels": {str(k): v for k, v in LABEL_NAMES.items()},
        "files": files, "coordinates": "LPS mm; each fragment transform maps healthy to fractured positions",
        "fragments": [{"id": f["id"], "transform": np.asarray(f["transform"]).tolist(), "volume_ml": f["volume_ml"]}
                      for f in case.fragments],
        "shape_coefficients": np.asarray(case.shape_coefficients).tolist(), "info": case.info,
    }
    if case.both_legs:
        meta["labels"].update({str(k): v for k, v in OTHER_LABEL_NAMES.items()})
        meta["other_leg"] = {"side": "right" if case.side == "left" else "left", "tibia_label": OTHER_TIBIA,
                             "pose_anatomical_to_lps": np.asarray(case.other_pose).tolist(),
                             "shape_coefficients": np.asarray(case.other_shape_coefficients).tolist()}
    write_json(meta, folder / CASE_JSON, overwrite=overwrite)
    return meta


def read_case(folder: str | os.PathLike) -> PhantomCase:
    """Read a case written by :func:`write_case` (volumes and case.json; no surface)."""
    folder = Path(folder)
    path = folder / CASE_JSON
    if not path.is_file():
        raise InputError(f"{folder} is not a phantom case folder: {CASE_JSON} is missing.")
    meta = json.loads(path.read_text(encoding="utf-8"))
    files = meta["files"]

    def vol(name: str, label: bool) -> Volume | None:
        return read_volume(folder / files[name], label=label) if name in files else None

    other = meta.get("other_leg")
    return PhantomCase(
        ct=vol("ct", False), labels=vol("labels", True), side=meta["side"], seed=meta["seed"],
        shape_coefficients=np.asarray(meta["shape_coefficients"]), info=meta.get("info", {}),
        fractured_ct=vol("fractured_ct", False), fractured_labels=vol("fractured_labels", True),
        fracture_mask=vol("fracture_mask", True), fracture_type=meta["fracture_type"],
        fragment_ids=vol("fragments", True),
        fragments=[{**f, "transform": np.asarray(f["transform"])} for f in meta["fragments"]],
        other_pose=None if other is None else np.asarray(other["pose_anatomical_to_lps"]),
        other_shape_coefficients=None if other is None else np.asarray(other["shape_coefficients"]))
