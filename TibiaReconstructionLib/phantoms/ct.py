"""Label map and Hounsfield units of a leg on the CT grid, then the scanner's blur and noise.

Labels (as TotalSegmentator): 0 background, 1 tibia, 2 fibula, 3 femur, 4 patella, 5 talus. The tibia
wins every voxel it covers; neighbours keep a one-voxel joint space from tibia and fibula. With both
legs in the CT, the other leg's bones are labelled 5 higher (6 other tibia ... 10 other talus).
Tissue values (HU): cortical bone 1200-1800 (tibial shaft cortex 3-6 mm thinning to about 1 mm at
the plateau and plafond), trabecular bone 150-400 in the metaphyses, fatty marrow -100..0 in the
medullary canal, muscle 35-60, subcutaneous fat -120..-80, air -1000.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.ndimage import binary_dilation, gaussian_filter

from ..geometry import Grid, apply_affine
from .anatomy import Anatomy
from .scanner import ScanGeometry
from .voxelize import Box, ellipsoids_mask, frame_coords, inner_depth, surface_mask

TIBIA, FIBULA, FEMUR, PATELLA, TALUS = 1, 2, 3, 4, 5
LABEL_NAMES = {TIBIA: "tibia", FIBULA: "fibula", FEMUR: "femur", PATELLA: "patella", TALUS: "talus"}
OTHER_LEG = 5  # label offset of the other leg's bones
OTHER_TIBIA = TIBIA + OTHER_LEG
OTHER_LABEL_NAMES = {k + OTHER_LEG: f"other {v}" for k, v in LABEL_NAMES.items()}
AIR = -1000.0
SKIN_MM = 1.5


@dataclass(frozen=True)
class TissueModel:
    """Per-case tissue values (HU), cortical thickness (mm), scanner blur (Gaussian SD, mm) and noise SD (HU)."""

    cortical: float
    trabecular: float
    marrow: float
    muscle: float
    fat: float
    haematoma: float
    cortex_mid_mm: float
    cortex_end_mm: float
    fibula_cortex_mm: float
    blur_in_plane_mm: float
    blur_slice_fraction: float
    noise_sd: float

    def to_dict(self) -> dict:
        return asdict(self)


def sample_tissue(rng: np.random.Generator) -> TissueModel:
    return TissueModel(
        cortical=rng.uniform(1300.0, 1700.0), trabecular=rng.uniform(180.0, 360.0), marrow=rng.uniform(-80.0, -20.0),
        muscle=rng.uniform(40.0, 55.0), fat=rng.uniform(-110.0, -90.0), haematoma=rng.uniform(55.0, 75.0),
        cortex_mid_mm=rng.uniform(3.0, 6.0), cortex_end_mm=rng.uniform(0.8, 1.4),
        fibula_cortex_mm=rng.uniform(1.5, 2.5),
        blur_in_plane_mm=rng.uniform(0.35, 0.7), blur_slice_fraction=rng.uniform(0.3, 0.45),
        noise_sd=rng.uniform(10.0, 30.0))


@dataclass
class Scene:
    """Label map (uint8, k j i), per-label boxes, and each bone voxel's depth below its surface (mm);
    ``other_pose``: the other leg's pose (labels + OTHER_LEG) or None."""

    grid: Grid
    pose: np.ndarray
    labels: np.ndarray
    boxes: dict[int, Box]
    depth: np.ndarray
    other_pose: np.ndarray | None = None


def build_scene(anatomy: Anatomy, scan: ScanGeometry, other: Anatomy | None = None) -> Scene:
    """Voxelise the leg's bones (and ``other``'s at ``scan.other_pose``, labels + OTHER_LEG) onto the grid."""
    grid = scan.grid
    labels = np.zeros(grid.shape, np.uint8)
    boxes: dict[int, Box] = {}
    legs = [(anatomy, scan.pose, 0)] + ([(other, scan.other_pose, OTHER_LEG)] if other is not None else [])
    for leg, pose, offset in legs:
        for label, surface in ((TIBIA, leg.tibia), (FIBULA, leg.fibula)):
            s = surface.transformed(pose)
            box, inside = surface_mask(grid, s.vertices, s.triangles)
            region = labels[box.slices]
            region[inside & (region == 0)] = label + offset
            boxes[label + offset] = box
        for label in (FEMUR, PATELLA, TALUS):
            box, inside = ellipsoids_mask(grid, leg.stubs[LABEL_NAMES[label]], pose)
            region = labels[box.slices]
            if not box.empty:
                region[inside & ~binary_dilation(region > 0, iterations=1)] = label + offset
            boxes[label + offset] = box
    depth = np.zeros(grid.shape, np.float32)
    spacing_kji = grid.spacing[::-1]
    for label, box in boxes.items():
        if box.empty:
            continue
        mask = labels[box.slices] == label
        depth[box.slices][mask] = inner_depth(mask, spacing_kji)[mask]
    return Scene(grid, scan.pose, labels, boxes, depth, scan.other_pose)


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox) -> np.ndarray:
    """Gaussian-correlated noise with unit SD (float32, periodic)."""
    n = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_vox, mode="wrap", truncate=3.0)
    n /= max(float(n[: max(1, min(8, shape[0]))].std()), 1e-6)  # stationary: a few slices give the SD
    return n


def _interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights spreading n_in samples over n_out points."""
    x = np.linspace(0.0, n_in - 1.0, n_out)
    return np.stack([np.interp(x, np.arange(n_in), np.eye(n_in)[c]) for c in range(n_in)], 1).astype(np.float32)


class _CoarseNoise:
    """Smooth unit-SD noise with features of about ``cell_mm``: coarse random values, linearly interpolated.

    Separable interpolation (two small products up front, one per slab) keeps it cheap on large grids.
    """

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int, int], spacing_kji: np.ndarray,
                 cell_mm: float = 12.0) -> None:
        coarse = tuple(max(2, int(np.ceil(n * s / cell_mm)) + 1) for n, s in zip(shape, spacing_kji))
        c = rng.standard_normal(coarse).astype(np.float32)
        wk, wj, wi = (_interpolation_matrix(n, m) for n, m in zip(shape, coarse))
        self._wk = wk
        self._plane = np.einsum("kab,ja,ib->kji", c, wj, wi, optimize=True)  # (coarse k, j, i)

    def slab(self, box: Box) -> np.ndarray:
        (k0, j0, i0), (k1, j1, i1) = box.lo, box.hi
        return np.tensordot(self._wk[k0:k1], self._plane[:, j0:j1, i0:i1], axes=1)


def soft_tissue(anatomy: Anatomy, grid: Grid, pose: np.ndarray, tissue: TissueModel,
                rng: np.random.Generator, out: np.ndarray | None = None) -> np.ndarray:
    """Skin (1.5 mm), subcutaneous fat and muscle (float32 HU) inside the leg outline, with smooth texture,
    written into ``out`` (default: a new volume of air); voxels outside the outline keep their values.

    Works slab by slab (16 slices), each on the in-plane box that holds the skin outline there.
    """
    if out is None:
        out = np.full(grid.shape, AIR, np.float32)
    texture = _CoarseNoise(rng, grid.shape, grid.spacing[::-1])
    to_anat = np.linalg.inv(pose)
    skin_kji = grid.physical_to_index(apply_affine(pose, anatomy.outline.boundary_points(48)))[:, ::-1]
    reach = int(np.ceil(4.0 / grid.spacing[2])) + 1
    step = 16
    for k0 in range(0, grid.shape[0], step):
        k1 = min(k0 + step, grid.shape[0])
        near = skin_kji[(skin_kji[:, 0] >= k0 - reach) & (skin_kji[:, 0] <= k1 + reach)]
        if not len(near):
            continue
        lo = np.maximum(np.floor(near[:, 1:].min(axis=0)).astype(int) - 3, 0)
        hi = np.minimum(np.ceil(near[:, 1:].max(axis=0)).astype(int) + 4, grid.shape[1:])
        box = Box(np.array([k0, *lo]), np.array([k1, *hi]))
        if box.empty:
            continue
        x, y, z = frame_coords(grid, to_anat, box)
        xc, yc, a, b, fat = anatomy.outline.lookup(z)
        dx, dy = x - xc, y - yc
        outer = (dx / a) ** 2 + (dy / b) ** 2
        dermis = (dx / (a - SKIN_MM)) ** 2 + (dy / (b - SKIN_MM)) ** 2
        muscle = (dx / np.maximum(a - fat, 1.0)) ** 2 + (dy / np.maximum(b - fat, 1.0)) ** 2
        tex = texture.slab(box)
        hu = np.where(muscle <= 1.0, tissue.muscle + 5.0 * tex, tissue.fat + 8.0 * tex)
        hu = np.where(dermis <= 1.0, hu, tissue.muscle + 10.0)
        out[box.slices] = np.where(outer <= 1.0, hu, out[box.slices])
    return out


def _bone_profile(label: int, s: np.ndarray, tissue: TissueModel) -> tuple[np.ndarray, np.ndarray]:
    """Cortical thickness (mm) and trabecular weight (0 marrow .. 1 trabecular) along a bone's height s (0..1)."""
    if label == TIBIA:
        mid = _smoothstep(0.08, 0.33, s) * _smoothstep(0.92, 0.67, s)
        thick = tissue.cortex_end_mm + (tissue.cortex_mid_mm - tissue.cortex_end_mm) * mid
        trab = 1.0 - _smoothstep(0.12, 0.3, s) * _smoothstep(0.88, 0.7, s)
    elif label == FIBULA:
        mid = _smoothstep(0.05, 0.25, s) * _smoothstep(0.95, 0.75, s)
        thick = 1.0 + (tissue.fibula_cortex_mm - 1.0) * mid
        trab = 1.0 - mid
    elif label == FEMUR:  # s: 0 at the joint line, 1 at the shaft
        thick = 1.2 + 2.8 * s
        trab = 1.0 - s
    else:
        thick, trab = np.full_like(s, 1.0), np.ones_like(s)
    return thick, trab


def bone_intensity(scene: Scene, anatomy: Anatomy, tissue: TissueModel, rng: np.random.Generator,
                   out: np.ndarray, other: bool = False) -> None:
    """Write cortical shell, trabecular bone and marrow (HU) into ``out`` at every bone voxel of the leg
    (``other``: of the other leg, whose anatomy ``anatomy`` then is)."""
    grid = scene.grid
    h = float(np.mean(grid.spacing))
    to_anat = np.linalg.inv(scene.other_pose if other else scene.pose)
    ranges = {TIBIA: anatomy.tibia_z, FIBULA: anatomy.fibula_z,
              FEMUR: (anatomy.plateau[2] + 40.0, anatomy.plateau[2] + 100.0)}
    offset = OTHER_LEG if other else 0
    for label in LABEL_NAMES:
        box = scene.boxes[label + offset]
        if box.empty:
            continue
        inside = scene.labels[box.slices] == label + offset
        z = np.broadcast_to(frame_coords(grid, to_anat, box)[2], box.shape)[inside]
        lo, hi = ranges.get(label, (0.0, 1.0))
        s = np.clip((z - lo) / (hi - lo), 0.0, 1.0)
        thick, trab = _bone_profile(label, s, tissue)
        d = scene.depth[box.slices][inside]
        cortex = np.clip((thick - d + h) / h, 0.0, 1.0)  # fraction of the voxel inside the cortical shell
        tex = smooth_noise(rng, box.shape, 0.8)[inside]
        interior = trab * (tissue.trabecular + 50.0 * tex) + (1.0 - trab) * (tissue.marrow + 10.0 * tex)
        region = out[box.slices]
        region[inside] = cortex * (tissue.cortical + 40.0 * tex) + (1.0 - cortex) * interior


def clean_ct(scene: Scene, anatomy: Anatomy, tissue: TissueModel, rng: np.random.Generator,
             other: Anatomy | None = None) -> np.ndarray:
    """The noise-free, unblurred HU volume (float32, k j i); ``other``: the other leg's anatomy (same tissue
    model), drawn after the first leg."""
    hu = soft_tissue(anatomy, scene.grid, scene.pose, tissue, rng)
    bone_intensity(scene, anatomy, tissue, rng, hu)
    if other is not None:
        soft_tissue(other, scene.grid, scene.other_pose, tissue, rng, hu)
        bone_intensity(scene, other, tissue, rng, hu, other=True)
    return hu


def _gaussian_weights(sigma: float, truncate: float) -> np.ndarray:
    """The 1D kernel scipy.ndimage.gaussian_filter uses for ``sigma`` (voxels)."""
    if sigma <= 1e-15:
        return np.ones(1)
    r = int(truncate * sigma + 0.5)
    w = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return w / w.sum()


def acquire(clean: np.ndarray, grid: Grid, tissue: TissueModel, rng: np.random.Generator) -> np.ndarray:
    """The scanner: white noise through the Gaussian point-spread function, so the noise is correlated like
    reconstructed CT noise and has SD ``tissue.noise_sd`` afterwards; int16 HU."""
    sp = grid.spacing[::-1]
    psf_vox = np.array([tissue.blur_slice_fraction * sp[0], tissue.blur_in_plane_mm, tissue.blur_in_plane_mm]) / sp
    gain = np.sqrt(np.prod([np.sum(_gaussian_weights(s, 3.0) ** 2) for s in psf_vox]))
    img = rng.standard_normal(clean.shape, dtype=np.float32)
    img *= np.float32(tissue.noise_sd / gain)
    img += clean
    img = gaussian_filter(img, psf_vox, truncate=3.0)
    np.rint(img, out=img)
    np.clip(img, -1024, 3071, out=img)
    return img.astype(np.int16)
