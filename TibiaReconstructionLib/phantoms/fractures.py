"""Fracture a voxelised tibia: cut it into fragments, displace them rigidly, paint a coarse fracture mask.

Types: 'transverse', 'oblique', 'spiral', 'comminuted' (butterfly wedge plus small free fragments)
shaft fractures and 'plateau' (split of one tibial condyle); only when asked for (never drawn at random, so never
in the training data): 'segmental' (two shaft cuts, a free middle segment) and 'pilon' (a split of the distal
articular end, the ankle's counterpart of 'plateau'). Cuts are defined in the anatomical
frame (see anatomy.py; z along the tibia), motions too; every fragment's recorded transform is the
4x4 LPS affine mapping its healthy position to its fractured position on the same CT grid.
Fragment 1 (the proximal main fragment) stays put. In shaft fractures with a broken fibula (most of
them) the ankle (distal fibula piece and talus) travels with the distal main fragment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import affine_transform, distance_transform_edt

from ..errors import InputError
from ..geometry import Grid, apply_affine, bounding_box
from .anatomy import Anatomy
from .ct import FIBULA, TALUS, TIBIA, Scene, TissueModel, smooth_noise
from .voxelize import Box, box_of_points, frame_coords

FRACTURE_TYPES = ("transverse", "oblique", "spiral", "comminuted", "plateau")  # drawn at random
_TYPE_WEIGHTS = (0.22, 0.2, 0.2, 0.2, 0.18)
EXTRA_FRACTURE_TYPES = ("segmental", "pilon")  # only when asked for: patterns the models never learn from
SHAFT_BAND = (0.25, 0.75)  # shaft fractures lie this far along the tibia (fractions of its length from the ankle)
MIN_FRAGMENT_ML = 0.3  # smaller pieces (or fewer than MIN_FRAGMENT_VOXELS voxels) stay with a main fragment
MIN_FRAGMENT_VOXELS = 30
MAX_PUSH_MM = 10.0
SEGMENT_MM = (60.0, 110.0)  # a segmental fracture's middle segment: this long
PILON_WIDTH_SHARE = 0.6  # the distal tibia's width as a share of the plateau's


def _rotation(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.deg2rad(angle_deg)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def _motion(center: np.ndarray, rotation: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """4x4 rigid motion: rotate about ``center``, then translate by ``shift`` (mm)."""
    m = np.eye(4)
    m[:3, :3] = rotation
    m[:3, 3] = center - rotation @ center + shift
    return m


def _random_unit(rng: np.random.Generator, horizontal: bool = False) -> np.ndarray:
    v = rng.standard_normal(3)
    if horizontal:
        v[2] = 0.0
    return v / np.linalg.norm(v)


@dataclass
class Fragment:
    """One moving piece: its motion in the anatomical frame and the direction it is pushed when it collides."""

    id: int
    motion: np.ndarray
    escape: np.ndarray


@dataclass
class FracturePlan:
    """Cut parameters (anatomical frame) and motions; ``assign`` labels tibia voxels with fragment ids."""

    type: str
    params: dict
    fragments: dict[int, Fragment] = field(default_factory=dict)
    fibula_cut_z: float | None = None  # the fibula breaks at this height; its distal piece follows fragment 2

    def assign(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, depth: np.ndarray,
               main_only: bool = False) -> np.ndarray:
        """Fragment id (1, 2, ...) of tibia voxels at anatomical coordinates (x, y, z) and depth (mm).

        ``main_only``: only the main cut (proximal 1 / distal 2), without wedge and small fragments.
        """
        p = self.params
        if self.type in ("plateau", "pilon"):  # a split-off piece of the top (plateau) or bottom (pilon) end
            side, up = p["side"], (1.0 if self.type == "plateau" else -1.0)
            split = side * (x - p["x_split"]) > np.tan(np.deg2rad(p["split_tilt"])) * up * (z - p["z_end"])
            inside = up * (z - p["z_end"]) > -p["depth"] + p["slope"] * side * (x - p["x_split"])
            return np.where(split & inside, 2, 1).astype(np.uint8)
        dx, dy = x - (p["cx"] + p["gx"] * (z - p["z"])), y - (p["cy"] + p["gy"] * (z - p["z"]))
        if self.type == "segmental":  # above the upper cut 1, below the lower one 2 (the ankle's), between 3
            def above(z_cut: float, tilt: float, towards: list) -> np.ndarray:
                return z - z_cut - np.tan(np.deg2rad(tilt)) * (dx * towards[0] + dy * towards[1]) > 0
            upper, lower = above(p["z"], p["tilt"], p["tilt_dir"]), above(p["z2"], p["tilt2"], p["tilt_dir2"])
            return np.where(upper, 1, np.where(lower, 3, 2)).astype(np.uint8)
        if self.type == "spiral":
            phi = np.mod(np.arctan2(dy, dx) - p["phi0"], 2 * np.pi) / (2 * np.pi)
            height = p["z"] + p["hand"] * p["pitch"] * (phi - 0.5)
            return np.where(z > height, 1, 2).astype(np.uint8)
        zc = z - p["z"] - np.tan(np.deg2rad(p["tilt"])) * (dx * p["tilt_dir"][0] + dy * p["tilt_dir"][1])
        ids = np.where(zc > 0, 1, 2).astype(np.uint8)
        if self.type != "comminuted" or main_only:
            return ids
        r = p["radius"]
        a = dx * p["u"][0] + dy * p["u"][1]
        wedge = (a > -0.3 * r) & (np.abs(zc) < p["wedge_h"] * (a + 0.3 * r) / (1.3 * r))
        ids[wedge] = 3
        small = (~wedge) & (a < -0.2 * r) & (np.abs(zc) < p["band"]) & (depth < p["cortex"] + 1.5)
        angle = np.mod(np.arctan2(dy, dx) - np.arctan2(p["u"][1], p["u"][0]), 2 * np.pi)
        cell = np.minimum(((angle - np.pi / 2) / np.pi * p["n_small"]).astype(int), p["n_small"] - 1)
        ids[small] = 4 + np.clip(cell[small], 0, p["n_small"] - 1)
        return ids


def plan_fracture(rng: np.random.Generator, anatomy: Anatomy, tissue: TissueModel,
                  fracture_type: str | None = None, shaft_band: tuple[float, float] = SHAFT_BAND) -> FracturePlan:
    """Random cut and fragment motions (anatomical frame) of the given or a random fracture type; a shaft fracture
    lies uniformly within ``shaft_band`` of the tibia's length from its distal end."""
    kind = str(rng.choice(FRACTURE_TYPES, p=_TYPE_WEIGHTS))
    if fracture_type is not None:
        if fracture_type not in FRACTURE_TYPES + EXTRA_FRACTURE_TYPES:
            raise InputError(f"Unknown fracture type {fracture_type!r}; use one of "
                             f"{', '.join(FRACTURE_TYPES + EXTRA_FRACTURE_TYPES)}.")
        kind = fracture_type
    z_lo, z_hi = anatomy.tibia_z
    length = z_hi - z_lo
    if kind == "plateau":
        side = 1.0 if rng.random() < 0.75 else -1.0  # lateral condyle (+x, left leg) is the common one
        x_split = anatomy.plateau[0] + side * rng.uniform(0.05, 0.22) * anatomy.plateau_width
        params = {"side": side, "x_split": x_split, "split_tilt": rng.uniform(-5.0, 20.0), "z_end": z_hi,
                  "depth": rng.uniform(35.0, 60.0), "slope": rng.uniform(0.3, 0.9)}
        plan = FracturePlan(kind, params)
        center = np.array([x_split + side * 0.2 * anatomy.plateau_width, anatomy.plateau[1], z_hi - 20.0])
        shift = np.array([side * rng.uniform(2.0, 6.0), rng.uniform(-2.0, 2.0), -rng.uniform(0.0, 5.0)])
        plan.fragments[2] = Fragment(2, _motion(center, _rotation(_random_unit(rng), rng.uniform(2.0, 6.0)), shift),
                                     np.array([side, 0.0, -0.3]))
        return plan
    if kind == "pilon":  # the medial malleolus' side or the lateral (fibular notch) side split off, pushed up
        side = -1.0 if rng.random() < 0.5 else 1.0
        width = PILON_WIDTH_SHARE * anatomy.plateau_width
        x_split = anatomy.plafond[0] + side * rng.uniform(0.05, 0.2) * width
        params = {"side": side, "x_split": x_split, "split_tilt": rng.uniform(-5.0, 15.0), "z_end": z_lo,
                  "depth": rng.uniform(30.0, 50.0), "slope": rng.uniform(0.3, 0.9)}
        plan = FracturePlan(kind, params)
        center = np.array([x_split + side * 0.2 * width, anatomy.plafond[1], z_lo + 15.0])
        shift = np.array([side * rng.uniform(2.0, 5.0), rng.uniform(-2.0, 2.0), rng.uniform(0.0, 4.0)])
        plan.fragments[2] = Fragment(2, _motion(center, _rotation(_random_unit(rng), rng.uniform(2.0, 6.0)), shift),
                                     np.array([side, 0.0, 0.3]))
        return plan

    z_f = z_lo + rng.uniform(*shaft_band) * length
    c_f = anatomy.shaft_center(z_f)
    axis = anatomy.plateau - anatomy.plafond
    g = axis[:2] / axis[2]
    tilt = {"transverse": rng.uniform(0.0, 10.0), "oblique": rng.uniform(30.0, 50.0),
            "comminuted": rng.uniform(0.0, 20.0), "spiral": 0.0}.get(kind)
    if kind == "segmental":  # drawn after the others' (the same seed draws the same fracture of the other types)
        tilt = rng.uniform(0.0, 30.0)
    params = {"z": z_f, "cx": c_f[0], "cy": c_f[1], "gx": g[0], "gy": g[1], "tilt": tilt,
              "tilt_dir": _random_unit(rng, horizontal=True)[:2].tolist()}
    if kind == "segmental":  # z_f is the upper cut; the lower one SEGMENT_MM below it
        params.update(z2=z_f - rng.uniform(*SEGMENT_MM), tilt2=rng.uniform(0.0, 30.0),
                      tilt_dir2=_random_unit(rng, horizontal=True)[:2].tolist())
    if kind == "spiral":
        params.update(phi0=rng.uniform(0, 2 * np.pi), pitch=rng.uniform(40.0, 80.0), hand=float(rng.choice([-1, 1])))
    if kind == "comminuted":
        n_small = int(rng.integers(2, 4))
        params.update(u=_random_unit(rng, horizontal=True)[:2].tolist(), radius=11.0 * anatomy.params["scale"],
                      wedge_h=rng.uniform(15.0, 28.0), band=rng.uniform(4.0, 7.0), cortex=tissue.cortex_mid_mm,
                      n_small=n_small)
    plan = FracturePlan(kind, params)
    fibula_broken = rng.random() < 0.75
    if fibula_broken:
        plan.fibula_cut_z = z_f + rng.uniform(-40.0, 60.0)
        ang, shift_max, rot_max = rng.uniform(0.0, 10.0), 15.0, 20.0
    else:
        ang, shift_max, rot_max = rng.uniform(0.0, 3.0), 3.0, 5.0
    rot = _rotation(_random_unit(rng, horizontal=True), ang) @ _rotation(
        [0, 0, 1], float(np.clip(rng.normal(0.0, rot_max / 2.5), -rot_max, rot_max)))
    direction = _random_unit(rng, horizontal=True)
    direction[1] = max(direction[1], 0.3 * direction[1])  # little anterior shift: the shin is under the skin
    shift = direction * rng.uniform(0.0, shift_max) + np.array([0, 0, -rng.uniform(1.0, 5.0)])
    plan.fragments[2] = Fragment(2, _motion(c_f, rot, shift), np.array([0.0, 0.0, -1.0]))
    if kind == "segmental":  # the middle segment: turned and shifted on its own; the distal fragment moves about
        c_2 = anatomy.shaft_center(params["z2"])  # the lower cut, carrying the ankle as in a single shaft fracture
        plan.fragments[2] = Fragment(2, _motion(c_2, rot, shift), np.array([0.0, 0.0, -1.0]))
        if plan.fibula_cut_z is not None:
            plan.fibula_cut_z = params["z2"] + rng.uniform(-40.0, 60.0)
        out = _random_unit(rng, horizontal=True)
        middle = anatomy.shaft_center(0.5 * (z_f + params["z2"]))
        turn = _rotation(_random_unit(rng), rng.uniform(2.0, 8.0))
        push = out * rng.uniform(1.0, 8.0) - np.array([0.0, 0.0, rng.uniform(0.0, 3.0)])
        plan.fragments[3] = Fragment(3, _motion(middle, turn, push), out)
    if kind == "comminuted":
        u = np.array([*params["u"], 0.0])
        wedge_c = c_f + 0.5 * params["radius"] * u
        plan.fragments[3] = Fragment(3, _motion(wedge_c, _rotation(_random_unit(rng), rng.uniform(5.0, 20.0)),
                                                u * rng.uniform(2.0, 8.0) + rng.normal(0, 1.5, 3)), u)
        base = np.arctan2(u[1], u[0])
        for n in range(params["n_small"]):
            phi = base + np.pi / 2 + (n + 0.5) * np.pi / params["n_small"]
            out = np.array([np.cos(phi), np.sin(phi), 0.0])
            center = c_f + params["radius"] * out
            spin = _rotation(_random_unit(rng), rng.uniform(5.0, 25.0))
            shift = out * rng.uniform(1.0, 5.0) + rng.normal(0, 1.0, 3)
            plan.fragments[4 + n] = Fragment(4 + n, _motion(center, spin, shift), out)
    return plan


@dataclass
class FractureResult:
    """Fractured HU (float32, before the scanner), labels, tibia fragment ids, fracture mask; fragment records."""

    clean: np.ndarray
    labels: np.ndarray
    fragment_ids: np.ndarray
    mask: np.ndarray
    fragments: list[dict]


class _Mover:
    """Voxels of one structure that move rigidly: a box, a mask in it, the LPS transform and what to write."""

    def __init__(self, box: Box, mask: np.ndarray, label: int, fragment_id: int, transform: np.ndarray) -> None:
        tight = bounding_box(mask)
        if tight is not None:  # shrink the box to the mask plus one empty voxel (interpolation edge)
            lo, hi = np.maximum(tight[0] - 1, 0), np.minimum(tight[1] + 2, mask.shape)
            box, mask = Box(box.lo + lo, box.lo + hi), mask[tuple(slice(a, b) for a, b in zip(lo, hi))]
        self.box, self.mask, self.label, self.fragment_id, self.transform = box, mask, label, fragment_id, transform


def _lps(pose: np.ndarray, motion: np.ndarray) -> np.ndarray:
    return pose @ motion @ np.linalg.inv(pose)


def _voxel_points(grid: Grid, box: Box, mask: np.ndarray, stride: int = 1) -> np.ndarray:
    kji = np.argwhere(mask)[::stride] + box.lo
    return grid.index_to_physical(kji[:, ::-1].astype(float))


def _resolve_collisions(grid: Grid, pose: np.ndarray, movers: list[_Mover], plan: FracturePlan,
                        fixed: np.ndarray) -> None:
    """Push each moving tibia fragment along its escape direction until it overlaps placed ones by < 0.5%."""
    occupied = fixed.copy()
    shape = np.array(grid.shape)
    for m in movers:
        if m.fragment_id == 0:
            continue
        frag = plan.fragments[m.fragment_id]
        pts = _voxel_points(grid, m.box, m.mask, stride=max(1, int(m.mask.sum() // 20000)))
        for _ in range(int(MAX_PUSH_MM) + 1):
            m.transform = _lps(pose, frag.motion)
            kji = np.rint(grid.physical_to_index(apply_affine(m.transform, pts))[:, ::-1]).astype(int)
            ok = np.all((kji >= 0) & (kji < shape), axis=1)
            hits = occupied[tuple(kji[ok].T)].sum()
            if hits <= 0.005 * len(pts):
                break
            frag.motion[:3, 3] += 1.0 * frag.escape / np.linalg.norm(frag.escape)
        occupied[tuple(kji[ok].T)] = True


def _paint(grid: Grid, m: _Mover, source_hu: np.ndarray, clean: np.ndarray, labels: np.ndarray,
           fragment_ids: np.ndarray) -> None:
    """Resample one mover (mask: nearest neighbour; HU: mask-normalised linear) at its fractured position."""
    lo, hi = m.box.lo, m.box.hi
    corners = np.array([[i, j, k] for i in (lo[2], hi[2] - 1) for j in (lo[1], hi[1] - 1) for k in (lo[0], hi[0] - 1)])
    dest = box_of_points(grid, apply_affine(m.transform, grid.index_to_physical(corners.astype(float))), margin=1)
    if dest.empty:
        return
    # destination (k, j, i) index -> source (k, j, i) index, both relative to their boxes
    ijk = np.linalg.inv(grid.ijk_to_lps) @ np.linalg.inv(m.transform) @ grid.ijk_to_lps
    perm = np.eye(4)[[2, 1, 0, 3]]
    kji = perm @ ijk @ perm
    offset = kji[:3, :3] @ dest.lo + kji[:3, 3] - lo
    mask_f = m.mask.astype(np.float32)
    inside = affine_transform(m.mask.view(np.uint8), kji[:3, :3], offset, output_shape=dest.shape, order=0) > 0
    w = affine_transform(mask_f, kji[:3, :3], offset, output_shape=dest.shape, order=1, cval=0.0)
    hu = affine_transform(source_hu[m.box.slices] * mask_f, kji[:3, :3], offset, output_shape=dest.shape, order=1,
                          cval=0.0)
    region = clean[dest.slices]
    region[inside] = hu[inside] / np.maximum(w[inside], 1e-3)
    labels[dest.slices][inside] = m.label
    if m.label == TIBIA:
        fragment_ids[dest.slices][inside] = m.fragment_id


def _surface_points(grid: Grid, box: Box, ids: np.ndarray, transforms: dict[int, np.ndarray]) -> np.ndarray:
    """Fractured positions (LPS) of every cut-surface voxel, with points across each gap to the other side."""
    pts = []
    for axis in range(3):
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[axis], b[axis] = slice(0, -1), slice(1, None)
        ia, ib = ids[tuple(a)], ids[tuple(b)]
        cut = (ia > 0) & (ib > 0) & (ia != ib)
        for near, far, offset in ((ia, ib, 0), (ib, ia, 1)):
            kji = np.argwhere(cut)
            f, g = near[cut], far[cut]
            kji[:, axis] += offset
            p = grid.index_to_physical((kji + box.lo)[:, ::-1].astype(float))
            for fid in np.unique(f):
                for gid in np.unique(g[f == fid]):
                    sel = (f == fid) & (g == gid)
                    pf, pg = apply_affine(transforms[fid], p[sel]), apply_affine(transforms[gid], p[sel])
                    pts += [pf + t * (pg - pf) for t in (0.0, 0.25, 0.5)]
    return np.concatenate(pts) if pts else np.zeros((0, 3))


def apply_fracture(scene: Scene, clean: np.ndarray, anatomy: Anatomy, plan: FracturePlan, tissue: TissueModel,
                   rng: np.random.Generator) -> FractureResult:
    """Cut, move and repaint the tibia (and the ankle where it follows); build the coarse fracture mask."""
    grid, pose = scene.grid, scene.pose
    to_anat = np.linalg.inv(pose)
    tbox = scene.boxes[TIBIA]
    tib = scene.labels[tbox.slices] == TIBIA
    x, y, z = (np.broadcast_to(c, tbox.shape) for c in frame_coords(grid, to_anat, tbox))
    ids = np.zeros(tbox.shape, np.uint8)
    args = (x[tib], y[tib], z[tib], scene.depth[tbox.slices][tib])
    ids[tib] = plan.assign(*args)
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    counts = np.bincount(ids[tib], minlength=256)
    tiny = np.flatnonzero((counts > 0) & (counts < max(MIN_FRAGMENT_ML / voxel_ml, MIN_FRAGMENT_VOXELS)))
    tiny = tiny[tiny > 2]
    if len(tiny):  # pieces too small to matter rejoin the main fragment on their side of the cut
        main = plan.assign(*args, main_only=True)
        sub = ids[tib]
        sel = np.isin(sub, tiny)
        sub[sel] = main[sel]
        ids[tib] = sub
    present = [int(f) for f in np.unique(ids[tib])]
    if present != list(range(1, len(present) + 1)):  # number the fragments 1..n
        lut = np.zeros(256, np.uint8)
        lut[present] = np.arange(1, len(present) + 1)
        ids = lut[ids]
        plan.fragments = {int(lut[f]): Fragment(int(lut[f]), fr.motion, fr.escape)
                          for f, fr in plan.fragments.items() if f in present}
        present = list(range(1, len(present) + 1))
    movers = [_Mover(tbox, ids == f, TIBIA, f, np.eye(4)) for f in present if f != 1]
    if plan.fibula_cut_z is not None and 2 in present:
        motion = plan.fragments[2].motion
        for label in (FIBULA, TALUS):
            box = scene.boxes[label]
            if box.empty:
                continue
            mask = scene.labels[box.slices] == label
            if label == FIBULA:
                mask &= np.broadcast_to(frame_coords(grid, to_anat, box)[2], box.shape) < plan.fibula_cut_z
            movers.append(_Mover(box, mask, label, 0, _lps(pose, motion)))
    fixed = np.zeros(grid.shape, bool)
    fixed[tbox.slices] = ids == 1
    _resolve_collisions(grid, pose, [m for m in movers if m.label == TIBIA], plan, fixed)
    for m in movers:
        if m.fragment_id == 0:
            m.transform = _lps(pose, plan.fragments[2].motion)
    transforms = {1: np.eye(4), **{m.fragment_id: m.transform for m in movers if m.label == TIBIA}}

    out = clean.copy()
    labels = scene.labels.copy()
    fragment_ids = np.zeros(grid.shape, np.uint8)
    fragment_ids[tbox.slices][ids == 1] = 1
    for m in movers:  # vacate: the space a piece leaves fills with blood and soft tissue
        region, lab = out[m.box.slices], labels[m.box.slices]
        fill = tissue.haematoma if m.label == TIBIA else tissue.muscle
        region[m.mask] = fill + 6.0 * rng.standard_normal(int(m.mask.sum())).astype(np.float32)
        lab[m.mask] = 0
        fragment_ids[m.box.slices][m.mask] = 0
    for m in sorted(movers, key=lambda m: m.label != TIBIA, reverse=True):  # the ankle first, the tibia on top
        _paint(grid, m, clean, out, labels, fragment_ids)

    mask = _fracture_mask(grid, _surface_points(grid, tbox, ids, transforms), rng, out, labels, tissue)
    fragments = [{"id": f, "transform": transforms[f], "volume_ml": float((ids == f).sum() * voxel_ml)}
                 for f in sorted(transforms)]
    return FractureResult(out, labels, fragment_ids, mask, fragments)


def _fracture_mask(grid: Grid, points: np.ndarray, rng: np.random.Generator, hu: np.ndarray,
                   labels: np.ndarray, tissue: TissueModel) -> np.ndarray:
    """Coarse, irregular mask: within 5-9 mm (+- a smooth 1.5-2.5 mm wobble) of the fracture surfaces and gaps.

    Also soaks the soft tissue near the fracture with haematoma (written into ``hu``).
    """
    mask = np.zeros(grid.shape, np.uint8)
    radius, wobble = rng.uniform(5.0, 9.0), rng.uniform(1.5, 2.5)
    reach = max(radius + wobble, 12.0)
    radius = max(radius, wobble + 1.5 * float(grid.spacing.max()))
    if len(points) == 0:
        return mask
    margin = int(np.ceil(reach / grid.spacing.min())) + 1
    box = box_of_points(grid, points, margin=margin)
    seeds = np.ones(box.shape, bool)
    kji = np.rint(grid.physical_to_index(points)[:, ::-1]).astype(int) - box.lo
    kji = kji[np.all((kji >= 0) & (kji < box.shape), axis=1)]
    seeds[tuple(kji.T)] = False
    dist = distance_transform_edt(seeds, sampling=grid.spacing[::-1])
    noise = np.clip(smooth_noise(rng, box.shape, 4.0 / grid.spacing[::-1]), -1.0, 1.0)
    mask[box.slices] = dist < radius + wobble * noise
    soft = (labels[box.slices] == 0) & (hu[box.slices] > -300.0)
    w = (0.85 * np.clip(1.0 - dist / reach, 0.0, 1.0)).astype(np.float32)
    region = hu[box.slices]
    region[soft] = (1.0 - w[soft]) * region[soft] + w[soft] * tissue.haematoma
    return mask
