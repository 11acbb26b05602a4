"""Small analytic 'tibia-like' volumes for fast tests (not the phantom generator)."""

import numpy as np

from TibiaReconstructionLib.geometry import Grid, Volume, apply_affine, crop, euler_rotation


def bone_case(pose_deg=(0.0, 0.0, 0.0), shift=(0.0, 0.0, 0.0), spacing=(2.0, 2.0, 3.0), size=(40, 40, 60),
              direction=None, fracture_z=(-10.0, 6.0)):
    """A CT (HU), tibia mask and fracture mask of an elongated, asymmetric 'bone' (LPS mm).

    The bone is a 150 mm long ellipsoid with a bump on its lateral (+x) proximal side, posed by an Euler
    rotation and shift; the fracture mask is a slab across the shaft between ``fracture_z`` (bone frame).
    """
    direction = np.eye(3) if direction is None else direction
    sp = np.asarray(spacing, float)
    origin = -(np.asarray(size) - 1) / 2.0 * sp
    origin = direction @ origin
    grid_vol = Volume(np.zeros(size[::-1], np.int16), sp, origin, direction)
    kji = np.indices(grid_vol.array.shape).reshape(3, -1).T
    pts = grid_vol.index_to_physical(kji[:, ::-1].astype(float))
    pose = euler_rotation(pose_deg)
    pose[:3, 3] = shift
    local = apply_affine(np.linalg.inv(pose), pts)  # bone frame
    x, y, z = local.T
    shaft = (x / 14) ** 2 + (y / 11) ** 2 + (z / 75) ** 2 <= 1
    bump = ((x - 12) / 9) ** 2 + (y / 8) ** 2 + ((z - 55) / 14) ** 2 <= 1
    bone = (shaft | bump).reshape(grid_vol.array.shape)
    canal = ((x / 6) ** 2 + (y / 5) ** 2 + (z / 50) ** 2 <= 1).reshape(bone.shape)
    ct = np.where(bone, 1400, 40).astype(np.int16)
    ct[canal] = -50
    frac = ((z >= fracture_z[0]) & (z <= fracture_z[1])).reshape(bone.shape) & bone
    return (grid_vol.with_array(ct), grid_vol.with_array(bone.astype(np.uint8)),
            grid_vol.with_array(frac.astype(np.uint8)))


def plateau_leg(turn_deg: float, side: str = "left", slices: int = 90) -> tuple[Volume, Volume]:
    """A CT (HU) and tibia mask of a leg: a round shaft under an elliptic plateau (38 x 24 mm) whose wide axis lies
    ``turn_deg`` from +x towards +y (posterior) for a left leg, and a fibula 30 mm from the shaft's axis, 52 deg
    behind the plateau axis' lateral half; a right leg is its mirror image. ``slices``: the scan's first slices only
    (the plateau is in slices 80-87)."""
    grid = Grid((120, 120, 90), (1.5, 1.5, 4.0), (-89.25, -89.25, -180.0), np.eye(3))  # symmetric about x = 0
    p = grid.index_to_physical(np.indices(grid.shape).reshape(3, -1).T[:, ::-1].astype(float))
    if side == "right":
        p[:, 0] = -p[:, 0]
    t, behind = np.radians(turn_deg), np.radians(turn_deg + 52.0)
    u = p[:, 0] * np.cos(t) + p[:, 1] * np.sin(t)
    v = -p[:, 0] * np.sin(t) + p[:, 1] * np.cos(t)
    plateau = ((u / 38.0) ** 2 + (v / 24.0) ** 2 <= 1.0) & (p[:, 2] > 140.0) & (p[:, 2] <= 170.0)
    tibia = ((np.hypot(u, v) <= 12.0) & (np.abs(p[:, 2]) <= 170.0)) | plateau
    fibula = (np.hypot(p[:, 0] - 30.0 * np.cos(behind), p[:, 1] - 30.0 * np.sin(behind)) <= 6.0) & (
        np.abs(p[:, 2]) <= 150.0)
    part = (0, 0, 0), (slices - 1, 119, 119)
    ct = Volume.on_grid(np.where(tibia | fibula, 1200, 40).astype(np.int16).reshape(grid.shape), grid)
    return crop(ct, *part), crop(ct.with_array(tibia.astype(np.uint8).reshape(grid.shape)), *part)
