"""A random left lower leg in its anatomical frame: LLP26 tibia + fibula, neighbouring-bone stubs, skin outline.

Anatomical frame (mm, LPS-like for a LEFT leg, as LLP26): x lateral (the fibula side), y posterior,
z superior; origin at the tibia's mid-shaft centre. Right legs are made by mirroring the finished
case (x -> -x), never here.

Shape = LLP26 mean + sum_k b_k sqrt(variance_k) mode_k with b_k ~ N(0, 1) clipped to +-3, then,
because 26 subjects span a narrower population than a clinic sees: global scale (tibia length about
300-440 mm), a separate width scale, sagittal/coronal shaft bowing and a linear torsion about the
long axis. The distal femur, patella and talus are unions of ellipsoids placed from tibia landmarks.

The same person's other leg (:func:`sample_other_leg`) is the same draw with small bilateral
asymmetry, built in the same left-leg frame (the scanner mirrors it). Magnitudes, per side-to-side
difference: tibial length SD 0.9 % (about 3.3 mm; mean absolute 2.7 mm), torsion SD 5 deg (mean
absolute 4 deg), bowing SD 1 mm, width SD 1 %, calf girth SD 3 %, and every LLP26 mode weight
b_k + N(0, 0.15), which moves tibia vertices by about 0.8 mm RMS. Sources: CT studies of healthy adults
report side-to-side tibial length differences of about 2-5 mm and torsion differences of about 4-6 deg
(/work/shared/ANATOMY_DATA.md); limb-bone length asymmetry is under 1 % in most people (Auerbach & Ruff
2006, J Hum Evol 50:203); mirrored contralateral tibiae differ by about 1 mm in surface distance after
alignment (Radzi et al. 2014, Med Eng Phys 36:1618). The shape term is an assumption calibrated to that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter1d

from .mesh import enclosed_volume, load_model, surface_template

SUBDIVISIONS = 8  # surface points per element edge (tibia: about 2200 vertices)


@dataclass(frozen=True)
class Surface:
    """Closed, outward-oriented triangle surface (vertices in mm)."""

    vertices: np.ndarray
    triangles: np.ndarray

    @property
    def volume_mm3(self) -> float:
        return enclosed_volume(self.vertices, self.triangles)

    @property
    def centroid(self) -> np.ndarray:
        """Centre of mass of the enclosed solid (mm)."""
        a, b, c = (self.vertices[self.triangles[:, k]] for k in range(3))
        vol = np.einsum("ij,ij->i", a, np.cross(b, c))
        return (vol[:, None] * (a + b + c)).sum(axis=0) / (4.0 * vol.sum())

    def transformed(self, matrix: np.ndarray) -> "Surface":
        """The surface moved by a 4x4 affine (a reflection also flips the triangle order)."""
        v = self.vertices @ matrix[:3, :3].T + matrix[:3, 3]
        tris = self.triangles if np.linalg.det(matrix[:3, :3]) > 0 else self.triangles[:, ::-1]
        return Surface(v, tris)


@dataclass(frozen=True)
class Ellipsoid:
    """Solid ellipsoid {p : |R^T (p - center) / radii| <= 1} (mm)."""

    center: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))

    def inside(self, points: np.ndarray) -> np.ndarray:
        q = ((points - self.center) @ self.rotation) / self.radii
        return np.einsum("...i,...i->...", q, q) <= 1.0

    def surface_points(self, n: int = 24) -> np.ndarray:
        """Points on the ellipsoid's surface, shape (n * n, 3)."""
        u, v = np.meshgrid(np.linspace(0, 2 * np.pi, n, endpoint=False), np.linspace(0, np.pi, n))
        unit = np.stack([np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v)], -1).reshape(-1, 3)
        return self.center + (unit * self.radii) @ self.rotation.T

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        half = np.sqrt(((self.rotation * self.radii) ** 2).sum(axis=1))
        return self.center - half, self.center + half


@dataclass(frozen=True)
class LegOutline:
    """Skin and muscle outline: per height z (mm), an ellipse centre (xc, yc), semi-axes (a, b), fat depth."""

    z: np.ndarray
    xc: np.ndarray
    yc: np.ndarray
    a: np.ndarray
    b: np.ndarray
    fat: np.ndarray

    def lookup(self, z: np.ndarray) -> tuple[np.ndarray, ...]:
        """(xc, yc, a, b, fat) at heights z (nearest table row; the table step is 2 mm)."""
        idx = np.clip(np.rint((z - self.z[0]) / (self.z[1] - self.z[0])), 0, len(self.z) - 1).astype(np.intp)
        return self.xc[idx], self.yc[idx], self.a[idx], self.b[idx], self.fat[idx]

    def boundary_points(self, n_angles: int = 24) -> np.ndarray:
        """Points on the skin surface, shape (len(z) * n_angles, 3)."""
        t = np.linspace(0, 2 * np.pi, n_angles, endpoint=False)
        x = self.xc[:, None] + self.a[:, None] * np.cos(t)
        y = self.yc[:, None] + self.b[:, None] * np.sin(t)
        return np.stack([x, y, np.broadcast_to(self.z[:, None], x.shape)], -1).reshape(-1, 3)


@dataclass(frozen=True)
class Anatomy:
    """One random left lower leg in the anatomical frame (see module docstring)."""

    tibia: Surface
    fibula: Surface
    stubs: dict[str, tuple[Ellipsoid, ...]]  # 'femur', 'patella', 'talus'
    outline: LegOutline
    coefficients: np.ndarray  # the 26 LLP26 mode weights b_k (in SD units)
    params: dict  # scale, width_scale, bow_mm, torsion_deg, girth
    tibia_z: tuple[float, float]  # lowest and highest tibia point (z, mm)
    fibula_z: tuple[float, float]
    plafond: np.ndarray  # centre of the distal articular surface
    plateau: np.ndarray  # centre of the tibial plateau (top)
    plateau_width: float  # medio-lateral width of the plateau (mm)
    scan_z: tuple[float, float]  # the scanned height range (z, mm), talus to distal femur

    def shaft_center(self, z: np.ndarray | float) -> np.ndarray:
        """Approximate centre of the tibial cross-section at height(s) z: linear between plafond and plateau."""
        z = np.asarray(z, dtype=float)
        lo, hi = self.tibia_z
        t = np.clip((z - lo) / (hi - lo), 0.0, 1.0)[..., None]
        c = (1 - t) * self.plafond + t * self.plateau
        return np.concatenate([c[..., :2], z[..., None]], axis=-1)


def _slab_centroid(v: np.ndarray, z: float, half: float = 6.0) -> np.ndarray:
    sel = v[np.abs(v[:, 2] - z) < half]
    return sel.mean(axis=0) if len(sel) else v[np.argmin(np.abs(v[:, 2] - z))]


def _deform(points: np.ndarray, z_lo: float, z_hi: float, bow: np.ndarray, torsion_rad: float) -> np.ndarray:
    """Bow (mm, x and y, zero at the tibia ends) and twist (rad, linear in z, zero at mid-height) about the z axis."""
    t = np.clip((points[:, 2] - z_lo) / (z_hi - z_lo), 0.0, 1.0)
    ang = torsion_rad * (t - 0.5)
    c, s = np.cos(ang), np.sin(ang)
    x, y = points[:, 0], points[:, 1]
    out = np.stack([c * x - s * y, s * x + c * y, points[:, 2]], -1)
    out[:, :2] += np.sin(np.pi * t)[:, None] * bow
    return out


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one left lower leg (see module docstring for the sampled variation)."""
    b = np.clip(rng.standard_normal(len(load_model()["variances"])), -3.0, 3.0)
    params = {"scale": float(np.clip(rng.normal(1.0, 0.07), 0.85, 1.2)),
              "width_scale": float(np.clip(rng.normal(1.0, 0.05), 0.88, 1.12)),
              "bow_mm": np.clip(rng.normal(0.0, 3.0, size=2), -8.0, 8.0).tolist(),
              "torsion_deg": float(np.clip(rng.normal(0.0, 7.0), -18.0, 18.0)),
              "girth": float(rng.uniform(0.85, 1.3))}
    return _build_anatomy(rng, b, params)


def sample_other_leg(rng: np.random.Generator, anatomy: Anatomy) -> Anatomy:
    """The same person's other leg with bilateral asymmetry (module docstring), as a LEFT leg in its own
    anatomical frame; its skin outline reaches 60 mm further up and down so a scan of the first leg's
    height range never ends the other leg early. Draws only from ``rng``."""
    p = anatomy.params
    b = np.clip(anatomy.coefficients + rng.normal(0.0, 0.15, size=anatomy.coefficients.shape), -3.0, 3.0)
    params = {"scale": p["scale"] * float(1.0 + np.clip(rng.normal(0.0, 0.009), -0.03, 0.03)),
              "width_scale": p["width_scale"] * float(1.0 + np.clip(rng.normal(0.0, 0.01), -0.03, 0.03)),
              "bow_mm": (np.asarray(p["bow_mm"]) + np.clip(rng.normal(0.0, 1.0, size=2), -3.0, 3.0)).tolist(),
              "torsion_deg": p["torsion_deg"] + float(np.clip(rng.normal(0.0, 5.0), -12.0, 12.0)),
              "girth": p["girth"] * float(1.0 + np.clip(rng.normal(0.0, 0.03), -0.08, 0.08))}
    return _build_anatomy(rng, b, params, outline_margin=70.0)


def _build_anatomy(rng: np.random.Generator, b: np.ndarray, params: dict, outline_margin: float = 10.0) -> Anatomy:
    """The leg of LLP26 mode weights ``b`` and global ``params`` (scale, width_scale, bow_mm, torsion_deg,
    girth); neighbouring bones and skin are drawn from ``rng``."""
    model = load_model()
    nodes = model["mean"] + np.einsum("k,knd->nd", b * np.sqrt(model["variances"]), model["modes"])
    tib_t, fib_t = surface_template("tibia", SUBDIVISIONS), surface_template("fibula", SUBDIVISIONS)
    tib, fib = tib_t.vertices(nodes), fib_t.vertices(nodes)
    # anatomical frame: origin at the tibia's mid-shaft centre
    z_lo, z_hi = tib[:, 2].min(), tib[:, 2].max()
    origin = _slab_centroid(tib, 0.5 * (z_lo + z_hi))
    origin[2] = 0.5 * (z_lo + z_hi)
    tib, fib = tib - origin, fib - origin
    z_lo, z_hi = z_lo - origin[2], z_hi - origin[2]

    scale, width, girth = params["scale"], params["width_scale"], params["girth"]
    s = np.array([scale * width, scale * width, scale])
    tib, fib = tib * s, fib * s
    z_lo, z_hi = z_lo * scale, z_hi * scale
    bow, torsion = np.asarray(params["bow_mm"]), np.deg2rad(params["torsion_deg"])
    tib = _deform(tib, z_lo, z_hi, bow, torsion)
    fib = _deform(fib, z_lo, z_hi, bow, torsion)
    tibia, fibula = Surface(tib, tib_t.triangles), Surface(fib, fib_t.triangles)

    # landmarks
    top = tib[tib[:, 2] > z_hi - 15.0]
    plateau_c = np.array([0.5 * (top[:, 0].min() + top[:, 0].max()), 0.5 * (top[:, 1].min() + top[:, 1].max()), z_hi])
    plateau_w = float(top[:, 0].max() - top[:, 0].min())
    plateau_d = float(top[:, 1].max() - top[:, 1].min())
    low = tib[tib[:, 2] < z_lo + 30.0]
    low_c = low.mean(axis=0)
    near = low[np.hypot(low[:, 0] - low_c[0], low[:, 1] - low_c[1]) < 8.0]
    plafond = np.array([low_c[0], low_c[1], near[:, 2].min() if len(near) else z_lo + 10.0])

    stubs = _stubs(rng, tib, fib, plateau_c, plateau_w, plateau_d, plafond, scale)
    scan_lo = min(e.bounds()[0][2] for e in stubs["talus"]) - rng.uniform(5.0, 25.0)
    scan_hi = z_hi + rng.uniform(45.0, 90.0) * scale
    stub_pts = np.concatenate([e.surface_points() for parts in stubs.values() for e in parts])
    outline = _outline(rng, np.concatenate([tib, fib, stub_pts]),
                       (scan_lo - outline_margin, scan_hi + outline_margin), (z_lo, z_hi), plafond[2], girth, scale)
    return Anatomy(
        tibia=tibia, fibula=fibula, stubs=stubs, outline=outline, coefficients=b, params=dict(params),
        tibia_z=(float(z_lo), float(z_hi)), fibula_z=(float(fib[:, 2].min()), float(fib[:, 2].max())),
        plafond=plafond, plateau=plateau_c, plateau_width=plateau_w, scan_z=(float(scan_lo), float(scan_hi)))


def _stubs(rng, tib, fib, plateau, width, depth, plafond, scale) -> dict[str, tuple[Ellipsoid, ...]]:
    """Distal femur (two condyles, metaphysis, shaft), patella and talus (body, head) as ellipsoids."""
    gap = rng.uniform(4.0, 7.0)
    s = scale * rng.uniform(0.93, 1.07)
    cond_r = np.array([0.19 * width, 0.55 * depth, 24.0 * s])
    femur = []
    for side in (-1.0, 1.0):
        c = plateau[:2] + np.array([side * 0.24 * width, 0.08 * depth])
        comp = tib[np.hypot(tib[:, 0] - c[0], tib[:, 1] - c[1]) < 10.0]
        z_c = comp[:, 2].max() if len(comp) else plateau[2]
        femur.append(Ellipsoid(np.array([c[0], c[1], z_c + gap + cond_r[2]]), cond_r))
    fz = max(e.center[2] for e in femur)
    femur.append(Ellipsoid(np.array([plateau[0], plateau[1] + 0.02 * depth, fz + 18.0 * s]),
                           np.array([0.46 * width, 0.5 * depth, 30.0 * s])))
    femur.append(Ellipsoid(np.array([plateau[0] - 0.05 * width, plateau[1] - 0.05 * depth, fz + 250.0 * s]),
                           np.array([14.0 * s, 14.0 * s, 230.0 * s])))
    front = plateau[1] + 0.08 * depth - cond_r[1]
    patella = (Ellipsoid(np.array([plateau[0] + 0.05 * width, front - 13.0 * s, fz + 12.0 * s]),
                         np.array([21.0, 10.0, 22.0]) * s, _rot_x(np.deg2rad(rng.uniform(-15.0, 5.0)))),)
    fib_low = fib[fib[:, 2] < fib[:, 2].min() + 25.0].mean(axis=0)
    tz = plafond[2] - rng.uniform(3.0, 5.0) - 14.0 * s
    body = np.array([0.55 * plafond[0] + 0.45 * fib_low[0] - 3.0 * s, plafond[1] + 3.0 * s, tz])
    talus = (Ellipsoid(body, np.array([15.0, 22.0, 14.0]) * s),
             Ellipsoid(body + np.array([-4.0, -24.0, -5.0]) * s, np.array([12.0, 15.0, 10.0]) * s))
    return {"femur": tuple(femur), "patella": patella, "talus": talus}


def _rot_x(a: float) -> np.ndarray:
    return np.array([[1.0, 0.0, 0.0], [0.0, np.cos(a), -np.sin(a)], [0.0, np.sin(a), np.cos(a)]])


def _outline(rng, bones, z_range, tib_z, ankle_z, girth, scale) -> LegOutline:
    """Skin ellipse per 2 mm of height around all bones: thin over the anteromedial tibia, calf muscles
    posterior, and below the ankle joint the start of the foot (heel and dorsum)."""
    z = np.arange(z_range[0], z_range[1] + 2.0, 2.0)
    stats = np.full((len(z), 4), np.nan)  # x_min, x_max, y_min, y_max of the bones near each height
    for i, zz in enumerate(z):
        sel = bones[np.abs(bones[:, 2] - zz) < 8.0]
        if len(sel):
            stats[i] = sel[:, 0].min(), sel[:, 0].max(), sel[:, 1].min(), sel[:, 1].max()
    have = ~np.isnan(stats[:, 0])
    x_min, x_max, y_min, y_max = (np.interp(z, z[have], stats[have, c]) for c in range(4))
    t = (z - tib_z[0]) / (tib_z[1] - tib_z[0])  # 0 ankle, 1 knee
    # calf bulk: largest in the upper third of the leg, slim above the ankle, wide again at the knee
    calf = np.interp(t, [-0.2, 0.0, 0.15, 0.45, 0.7, 0.9, 1.0, 1.3], [28, 24, 26, 46, 58, 52, 44, 52]) * girth * scale
    front = rng.uniform(4.0, 8.0)  # skin over the anterior tibial crest
    medial = rng.uniform(6.0, 12.0)
    lateral = rng.uniform(14.0, 24.0) * girth
    a = 0.5 * (x_max - x_min + medial + lateral) + 0.15 * calf
    xc = 0.5 * (x_min - medial + x_max + lateral)
    foot = np.clip(ankle_z - z, 0.0, None)  # mm below the ankle joint
    b = np.maximum(np.maximum(0.5 * calf + 22.0 * scale, 0.55 * a), 0.5 * (y_max - y_min) + 8.0) + 0.7 * foot
    yc = np.minimum(y_min - front + b, 0.5 * (y_min + y_max)) - 0.4 * foot
    fat = rng.uniform(3.0, 9.0) * girth ** 2 * np.interp(t, [0.0, 0.5, 1.0], [0.7, 1.0, 1.1])
    sm = lambda v: gaussian_filter1d(v, 4.0, mode="nearest")  # noqa: E731  (8 mm smoothing)
    return LegOutline(z, sm(xc), sm(yc), sm(a), sm(b), sm(fat))
