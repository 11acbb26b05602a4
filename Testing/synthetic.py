"""Small analytic 'tibia-like' volumes for fast tests (not the phantom generator)."""

import numpy as np

from TibiaReconstructionLib.geometry import Volume, apply_affine, euler_rotation


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
