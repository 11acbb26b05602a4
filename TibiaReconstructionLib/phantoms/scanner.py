"""Where the leg (or both legs) lies in the scanner and the CT voxel grid (LPS mm, left leg; right legs are
mirrored later)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..geometry import Grid, apply_affine, euler_rotation, make_affine
from .anatomy import Anatomy

SLICE_THICKNESSES = (0.625, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)


@dataclass(frozen=True)
class ScanGeometry:
    """``pose``: 4x4 affine from the anatomical frame to LPS; ``grid``: the CT grid in LPS; ``other_pose``:
    the other leg's 4x4 from its (left-leg) anatomical frame to LPS, a reflection, or None for one leg."""

    pose: np.ndarray
    grid: Grid
    other_pose: np.ndarray | None = None


def _spacing(rng: np.random.Generator, spacing) -> np.ndarray:
    in_plane = rng.uniform(0.6, 1.0)
    slice_mm = rng.choice(SLICE_THICKNESSES)
    if spacing is None:
        return np.array([in_plane, in_plane, slice_mm])
    s = np.broadcast_to(np.asarray(spacing, dtype=float), (3,)).copy()
    if np.any(~np.isfinite(s)) or np.any(s <= 0):
        raise InputError(f"spacing must be positive numbers (mm), got {spacing!r}.")
    return s


def sample_scan(rng: np.random.Generator, anatomy: Anatomy, spacing=None, oblique: bool = False,
                size_limit_mm=None, other: Anatomy | None = None,
                other_rng: np.random.Generator | None = None) -> ScanGeometry:
    """Random pose and a grid. Pose: tilts about x and y N(0, 4 deg) clipped to +-10 deg, rotation about the
    long axis N(0, 7 deg) clipped to +-15 deg, random table position.

    The grid covers the scanned height range (talus to distal femur) and the whole skin outline with
    10-40 mm of air, square in-plane like a reconstruction field of view. ``oblique`` tilts the grid
    axes (up to 20 deg per Euler angle). ``size_limit_mm`` (one number or three, along the grid axes
    i, j, k) caps the grid extent; a capped axis is centred on the tibia (both tibiae with two legs),
    so neighbours (and, for a small cap, tibia ends) may be cut off as in a short scan.
    ``other``: the other leg (a left leg in its frame), placed by :func:`place_other_leg` with draws
    from ``other_rng`` (``rng``'s draws stay the same) and held whole in-plane by the grid.
    """
    sp = _spacing(rng, spacing)
    angles = np.clip(rng.normal(0.0, [4.0, 4.0, 7.0]), [-10.0, -10.0, -15.0], [10.0, 10.0, 15.0])
    offset = np.array([rng.uniform(60.0, 130.0), rng.uniform(-20.0, 40.0), rng.uniform(-650.0, -350.0)])
    pose = make_affine(euler_rotation(angles)[:3, :3], offset)
    tilt = rng.uniform(-20.0, 20.0, size=3)
    direction = euler_rotation(tilt)[:3, :3] if oblique else np.eye(3)

    lo_z, hi_z = anatomy.scan_z
    skin = anatomy.outline.boundary_points()
    skin = skin[(skin[:, 2] >= lo_z) & (skin[:, 2] <= hi_z)]
    q_skin = apply_affine(pose, skin) @ direction  # coordinates along the grid axes
    q_tib = apply_affine(pose, anatomy.tibia.vertices) @ direction
    q_ends = apply_affine(pose, anatomy.shaft_center(np.array([lo_z, hi_z]))) @ direction
    other_pose = None
    if other is not None:
        other_pose = place_other_leg(other_rng, anatomy, pose, other)
        q_tib = np.concatenate([q_tib, apply_affine(other_pose, other.tibia.vertices) @ direction])
    lo = q_skin.min(axis=0)
    hi = q_skin.max(axis=0)
    lo[2], hi[2] = min(q_ends[:, 2].min(), q_tib[:, 2].min() - 3.0), max(q_ends[:, 2].max(), q_tib[:, 2].max() + 3.0)
    if other is not None:  # the other leg's skin within the scanned height range
        q_other = apply_affine(other_pose, other.outline.boundary_points()) @ direction
        q_other = q_other[(q_other[:, 2] >= lo[2]) & (q_other[:, 2] <= hi[2])]
        lo[:2], hi[:2] = np.minimum(lo[:2], q_other[:, :2].min(axis=0)), np.maximum(hi[:2], q_other[:, :2].max(axis=0))
    margin = rng.uniform(10.0, 40.0)
    fov = max(hi[0] - lo[0], hi[1] - lo[1]) + 2.0 * margin
    center = 0.5 * (lo + hi) + np.append(rng.uniform(-0.4, 0.4, size=2) * margin, 0.0)
    extent = np.array([fov, fov, hi[2] - lo[2]])
    if size_limit_mm is not None:
        limit = np.broadcast_to(np.asarray(size_limit_mm, dtype=float), (3,))
        if np.any(limit <= 0):
            raise InputError(f"size_limit_mm must be positive, got {size_limit_mm!r}.")
        tib_center = 0.5 * (q_tib.min(axis=0) + q_tib.max(axis=0))
        capped = extent > limit
        center = np.where(capped, tib_center, center)
        extent = np.minimum(extent, limit)
    size = np.maximum(np.ceil(extent / sp).astype(int) + 1, 2)
    corner = center - 0.5 * (size - 1) * sp
    return ScanGeometry(pose, Grid(tuple(int(n) for n in size), sp, direction @ corner, direction), other_pose)


def place_other_leg(rng: np.random.Generator, anatomy: Anatomy, pose: np.ndarray, other: Anatomy,
                    skin_gap_mm: float = 5.0) -> np.ndarray:
    """4x4 from the other leg's (left-leg) anatomical frame to LPS: the first leg's ``pose`` mirrored about
    a sagittal plane (x = const), so both legs lie supine and roughly parallel, with its own small pose
    (rotations about its mid-shaft N(0, 2 deg) clipped to +-5 deg, shifts N(0, 5 mm) in y and N(0, 8 mm)
    in z clipped to +-15 mm), on the patient's right (smaller x) of the first leg. Knee (plateau) centres
    lie U(110, 200) mm apart along x, more where needed to keep the skins ``skin_gap_mm`` apart at every
    height (assumption: a supine patient with the legs side by side and the knees 10-20 cm apart)."""
    delta = make_affine(euler_rotation(np.clip(rng.normal(0.0, 2.0, size=3), -5.0, 5.0))[:3, :3],
                        np.clip(rng.normal(0.0, [0.0, 5.0, 8.0]), -15.0, 15.0))
    mirrored = np.diag([-1.0, 1.0, 1.0, 1.0]) @ pose @ delta
    knees = rng.uniform(110.0, 200.0)
    x1 = apply_affine(pose, anatomy.plateau)[0]
    x2 = apply_affine(mirrored, other.plateau)[0]
    # skin clearance per 4 mm of height: the other leg's largest x must stay below the first leg's smallest x
    a = apply_affine(pose, anatomy.outline.boundary_points())
    b = apply_affine(mirrored, other.outline.boundary_points())
    za, zb = np.floor(a[:, 2] / 4.0).astype(int), np.floor(b[:, 2] / 4.0).astype(int)
    common = np.intersect1d(za, zb)
    min_a = np.array([a[za == z, 0].min() for z in common])
    max_b = np.array([b[zb == z, 0].max() for z in common])
    shift = min((x1 - knees) - x2, np.min(min_a - max_b) - skin_gap_mm) if len(common) else (x1 - knees) - x2
    return make_affine(np.eye(3), [shift, 0.0, 0.0]) @ mirrored
