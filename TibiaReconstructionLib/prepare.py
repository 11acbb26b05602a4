"""Patient space -> canonical tensors: mirror right legs, align the tibia's long axis, crop, resample.

The canonical frame is a left-leg frame in mm (x lateral, y posterior, z superior) centred on the
tibia: its long axis (first principal axis of the mask voxels, pointing superiorly) lies along +z
and the middle of its extent along that axis is the origin. One 4x4 LPS affine P maps patient
points to canonical points (reflection for a right leg, then a rotation and translation); it is
the only thing prediction needs to go back. Canonical tensors follow the layout of
:mod:`TibiaReconstructionLib.canonical`: (C, Z, Y, X) with channel 0 = tibia-masked intensity
normalised from ``window_hu`` to [0, 1] and channel 1 = tibia occupancy in [0, 1].
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import Grid, Volume, check_same_grid, crop_to_mask, invert_affine, make_affine, \
    reflection, resample

DEFAULT_WINDOW_HU = (-200.0, 1800.0)
SIDES = ("left", "right")


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


def patient_to_canonical(tibia: Volume, side: str) -> np.ndarray:
    """4x4 LPS affine P from patient points to the canonical frame, from the tibia mask (see module doc)."""
    idx = np.argwhere(tibia.array != 0)
    if len(idx) < 10:
        raise InputError(f"The tibia mask has {len(idx)} voxels; it must cover the tibia. Check that the right "
                         "segment/label was chosen.")
    step = max(1, len(idx) // 200_000)  # a subsample is plenty for the principal axis
    pts = tibia.index_to_physical(idx[::step, ::-1].astype(float))
    centroid = pts.mean(axis=0)
    mirror = mirror_for_side(side, centroid)
    pts = pts @ mirror[:3, :3].T + mirror[:3, 3]
    centroid = pts.mean(axis=0)
    _, vecs = np.linalg.eigh(np.cov((pts - centroid).T))
    axis = vecs[:, -1] * (1.0 if vecs[2, -1] >= 0 else -1.0)  # long axis, pointing superiorly
    rot = _rotation_onto_z(axis)
    along = (pts - centroid) @ axis
    center = centroid + axis * (along.min() + along.max()) / 2.0
    return make_affine(rot, -rot @ center) @ mirror


def _antialias(volume: Volume, target_spacing: np.ndarray) -> Volume:
    """Gaussian pre-filter before downsampling to ``target_spacing`` (no-op where not coarser)."""
    sigma = np.sqrt(np.maximum((target_spacing.max() ** 2 - volume.spacing ** 2), 0.0)) / 2.355
    if np.all(sigma < 0.25 * volume.spacing):
        return volume
    img = sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)
    return Volume.from_sitk(sitk.DiscreteGaussian(img, (sigma ** 2).tolist(), 32, 0.01, True))


@dataclass
class CanonicalCase:
    """Canonical tensor (C, Z, Y, X) float32, its visibility mask (Z, Y, X) or None, and P (4x4)."""

    tensor: np.ndarray
    visible: np.ndarray | None
    patient_to_canonical: np.ndarray


def to_canonical(ct: Volume, tibia: Volume, grid: Grid, transform: np.ndarray,
                 window_hu: Sequence[float] = DEFAULT_WINDOW_HU, fracture: Volume | None = None,
                 margin_mm: float = 15.0) -> CanonicalCase:
    """Resample a CT and its tibia mask into the canonical ``grid`` with patient->canonical ``transform``.

    With a fracture mask, the fracture region is zeroed in both channels (the query input
    y * m_tibia * (1 - m_fracture)) and the visibility mask is returned.
    """
    check_same_grid(ct, tibia, "CT", "tibia mask")
    if fracture is not None:
        check_same_grid(ct, fracture, "CT", "fracture mask")
    lo, hi = float(window_hu[0]), float(window_hu[1])
    ct_box = crop_to_mask(ct, tibia, margin_mm)
    tib_box = crop_to_mask(tibia.with_array((tibia.array != 0).astype(np.float32)), tibia, margin_mm)
    back = invert_affine(transform)
    ct_c = resample(_antialias(ct_box.with_array(ct_box.array.astype(np.float32)), grid.spacing), grid, back,
                    default_value=lo, dtype=np.float32).array
    occ = resample(_antialias(tib_box, grid.spacing), grid, back, dtype=np.float32).array
    occ = np.clip(occ, 0.0, 1.0)
    intensity = np.clip((ct_c - lo) / (hi - lo), 0.0, 1.0) * occ
    tensor = np.stack([intensity, occ]).astype(np.float32)
    visible = None
    if fracture is not None:
        frac_box = crop_to_mask(fracture.with_array((fracture.array != 0).astype(np.float32)), tibia, margin_mm)
        frac = resample(_antialias(frac_box, grid.spacing), grid, back, dtype=np.float32).array
        visible = (frac < 0.5).astype(np.uint8)
        tensor = tensor * visible[None]
    return CanonicalCase(tensor, visible, transform)


def prepare_case(ct: Volume, tibia: Volume, side: str, grid: Grid, window_hu: Sequence[float] = DEFAULT_WINDOW_HU,
                 fracture: Volume | None = None) -> CanonicalCase:
    """Canonical tensors of one case, with P computed from its own tibia mask."""
    return to_canonical(ct, tibia, grid, patient_to_canonical(tibia, side), window_hu, fracture)
