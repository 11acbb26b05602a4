"""Fragment-wise reduction before the final reconstruction, on the canonical grid (mm).

A displaced fracture shows the model pieces of bone that no single healthy tibia fits, and the LocNet and the
autoencoder return a compromise between them. This step reads the fragments off the visible input (connected pieces of
tibia outside the fracture mask), registers each one rigidly onto the model's reconstruction, moves every fragment by
its motion relative to the largest fragment (the steadiest reference; the anchor below when the CT cuts the tibia off)
and runs the model again on the reduced input. The fracture mask travels with every fragment and stays hidden; pieces
too small to register are hidden too. After ROUNDS rounds (none when the tibia is in one piece or the first
reconstruction already fits its fragments) the anchor, the proximal main fragment (the largest piece that holds much of
the knee, so the shaft's piece rather than a split-off condyle), is registered once more and θ corrected by its motion:
the prediction lies on the knee fragment, in the patient's frame of the knee, and every other fragment is placed
relative to it. A knee piece that holds only part of the plateau (a split-off condyle, the shaft's plateau hidden by
the fracture mask) is no such frame: the single pass is then placed on the largest fragment.

θ maps standard points to canonical points (see models/sampler.py); fragment motions are rigid maps of
standard points. Tensors are (N, C, Z, Y, X) with N = 1.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .geometry import Grid, boundary_distance
from .hidden_end import stretch_to_tibia
from .models.sampler import (compose_theta, invert_theta, normalised_to_physical, rotation_matrices,
                             theta_to_matrix)

MIN_FRAGMENT_SHARE = 0.15  # smaller pieces of the visible tibia are hidden (not moved) while others are reduced
KNEE_ZONE = 0.15  # the anchor holds the knee: much of the bone in this top fraction of the tibia's length
KNEE_SHARE = 0.5  # of the knee pieces (at least this share of the most knee-zone bone of any piece), the largest
PLATEAU_ZONE = 0.05  # the anchor holds the plateau: at least PLATEAU_SHARE of the tibia mask's bone in this top
PLATEAU_SHARE = 0.7  # fraction of its length (a split-off condyle holds about half of it at most), else see below
HUBER_MM = 2.0  # surface distances beyond this count linearly in the registration
MAX_POINTS = 2500  # surface voxels per fragment that drive its registration (random subset)
STEPS = 50  # Adam steps of the first registration; later ones start from the previous motions
WARM_STEPS = 20
ROUNDS = 3  # registration + reduction + reconstruction rounds (more rounds pull harder towards the model's shape)
LR_ROTATION = 0.01  # rad per Adam step
LR_TRANSLATION = 0.5  # mm per Adam step
MAX_ROTATION_DEG = 45.0  # a reduction beyond this (or MAX_SHIFT_MM) is implausible: the single pass is kept
MAX_SHIFT_MM = 50.0
MIN_ROTATION_DEG = 1.0  # a reduction smaller than this (and MIN_TRANSLATION_MM) leaves the case as it was
MIN_TRANSLATION_MM = 1.0


@dataclass
class Placement:
    """Where the visible fragments lie in the prediction: their labels (Z, Y, X) on the canonical grid (0: none),
    ids (ascending) and the anchor's id as in :class:`Fragments`, each one's rigid move (K, 4, 4) of canonical
    points from the input to its place in the prediction (the anchor's is the identity), and how well each fits
    the final reconstruction there (K,): the mean distance in mm of its outer surface from the reconstruction's."""

    labels: np.ndarray
    ids: list[int]
    anchor: int
    moves: np.ndarray
    misfit_mm: np.ndarray


@dataclass
class Fragments:
    """Fragment labels (Z, Y, X) int on the canonical grid (0: none), their ids (ascending), the anchor's id, the
    hidden small pieces (Z, Y, X) bool, the outer-surface voxels that drive the registration: indices
    (n, 3) in (k, j, i) order and each one's fragment (index into ``ids``), and the anchor's share of the tibia
    mask's bone (hidden or not) in the top PLATEAU_ZONE of its length."""

    labels: np.ndarray
    ids: list[int]
    anchor: int
    small: np.ndarray
    surface: np.ndarray
    surface_owner: np.ndarray
    plateau_share: float


def find_fragments(occupancy: np.ndarray, visible: np.ndarray, whole_slices: int | None = None) -> Fragments | None:
    """Fragments of the visible tibia (occupancy > 0.5 outside the fracture mask) on the canonical grid: the
    pieces of at least MIN_FRAGMENT_SHARE of it (at least the largest piece), or None when no bone is visible.
    ``whole_slices``: the whole tibia's length in slices when the CT shows only part of it (a typical tibia's); the
    share and the knee zone are then of a tibia that long, not of the part seen."""
    bone = (occupancy > 0.5) & (visible > 0.5)
    labels, n = ndimage.label(bone)
    if n == 0:
        return None
    k = np.flatnonzero((occupancy > 0.5).any(axis=(1, 2)))
    length = max(k[-1] - k[0] + 1, whole_slices or 0)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    whole = sizes.sum() * length / (k[-1] - k[0] + 1)
    keep = np.flatnonzero(sizes >= min(MIN_FRAGMENT_SHARE * whole, sizes.max())) + 1
    lut = np.zeros(n + 1, np.int64)
    lut[keep] = keep
    small = bone & (lut[labels] == 0)
    labels = lut[labels]
    knee = labels[max(k[-1] - int(KNEE_ZONE * length), 0):k[-1] + 1]
    in_knee = np.bincount(knee.ravel(), minlength=n + 1)
    in_knee[0] = 0
    # the knee pieces: those with at least KNEE_SHARE of the most knee-zone bone any piece has (a split condyle and
    # the main piece with the other condyle, but not the distal piece of a high shaft fracture); the largest one
    candidates = np.flatnonzero(in_knee >= KNEE_SHARE * in_knee.max()) if in_knee.any() else keep
    anchor = int(candidates[np.argmax(sizes[candidates - 1])])
    top = slice(max(k[-1] + 1 - max(int(PLATEAU_ZONE * length), 1), 0), k[-1] + 1)
    plateau_share = float(np.count_nonzero(labels[top] == anchor) / max(np.count_nonzero(occupancy[top] > 0.5), 1))
    ids = [int(i) for i in keep]
    return Fragments(labels, ids, anchor, small, *_surface_voxels(labels, ids, small, visible), plateau_share)


def _motions(w: torch.Tensor, t: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Rigid maps (K, 3, 4) of standard points: rotate by ``w`` about ``centers`` (K, 3), then shift by ``t``."""
    r = rotation_matrices(w)
    return torch.cat([r, (centers - (r @ centers[..., None])[..., 0] + t)[..., None]], dim=2)


def signed_distance(occupancy: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Signed distance (mm, negative inside) to the 0.5 level of ``occupancy`` (Z, Y, X; ``spacing`` (i, j, k)),
    from voxel centres: ITK's signed Maurer distance to the bone's boundary voxels, less half a voxel (a boundary
    voxel lies half a voxel inside the level, its empty neighbour half a voxel outside)."""
    inside = occupancy > 0.5
    if not inside.any():
        return np.full(occupancy.shape, 1e3, np.float32)
    return (boundary_distance(inside, spacing) - 0.5 * float(np.min(spacing))).astype(np.float32)


def _surface_voxels(labels: np.ndarray, ids: list[int], small: np.ndarray, visible: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Indices (n, 3) in (k, j, i) order of each fragment's outer surface voxels (bone voxels with a visible empty
    face neighbour; fracture faces are left out), at most MAX_POINTS per fragment, and their fragment index."""
    structure = ndimage.generate_binary_structure(3, 1)
    near_empty = ndimage.binary_dilation((visible > 0.5) & (labels == 0) & ~small, structure)
    rng = np.random.default_rng(0)
    voxels, owner = [], []
    for n, fid in enumerate(ids):
        kji = np.argwhere((labels == fid) & near_empty)
        if len(kji) > MAX_POINTS:
            kji = kji[rng.choice(len(kji), MAX_POINTS, replace=False)]
        voxels.append(kji)
        owner.append(np.full(len(kji), n))
    return np.concatenate(voxels), np.concatenate(owner)


def register_fragments(fragments: Fragments, theta: torch.Tensor, recon: torch.Tensor, grid: Grid,
                       start: torch.Tensor | None = None, steps: int = STEPS
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """Rigid motions (K, 3, 4) of standard points, one per fragment (in ``fragments.ids`` order), the fragments'
    centres (K, 3) in standard coordinates, their parameters (K, 6: rotation vector in rad, shift in mm) to
    ``start`` a later registration from, and how well each fits (K,): the mean distance (mm) of its moved surface
    voxels from the reconstruction's surface. The motions lay each fragment's outer surface (as θ aligns it) onto
    the surface of the reconstruction ``recon`` (1, C, Z, Y, X): ``steps`` of Adam on a robust (Huber) loss of the
    signed distance."""
    device = recon.device
    points = grid.index_to_physical(fragments.surface[:, ::-1].astype(float))
    owner = fragments.surface_owner
    inverse = invert_theta(theta.double()).float()[0]
    standard = torch.as_tensor(points, dtype=torch.float32, device=device) @ inverse[:, :3].T + inverse[:, 3]
    k = len(fragments.ids)
    owner_t = torch.as_tensor(owner, device=device)
    counts = torch.bincount(owner_t, minlength=k).to(standard.dtype)
    centers = torch.zeros(k, 3, device=device).index_add_(0, owner_t, standard) / counts[:, None]
    weight = 1.0 / counts[owner_t]
    sdf = torch.as_tensor(signed_distance(recon[0, -1].float().cpu().numpy(), grid.spacing), device=device)
    half = 0.5 * float(np.min(grid.spacing))  # a bone voxel on the surface lies half a voxel inside it
    to_normalised = torch.as_tensor(np.linalg.inv(normalised_to_physical(grid)), dtype=torch.float32,
                                    device=device)
    params = (torch.zeros(k, 6, device=device) if start is None else start.to(device)).clone().requires_grad_(True)
    lr = torch.tensor([LR_ROTATION] * 3 + [LR_TRANSLATION] * 3, device=device)
    moments = torch.zeros(2, k, 6, device=device)

    def surface_distances(params: torch.Tensor) -> torch.Tensor:
        """Signed distance (mm) of every moved surface voxel from the reconstruction's surface, minus its own."""
        m = (to_normalised[:3, :3] @ _motions(params[:, :3], params[:, 3:], centers))[owner_t]  # -> normalised
        flow = (m[:, :, :3] @ standard[:, :, None])[:, :, 0] + m[:, :, 3] + to_normalised[:3, 3]
        return F.grid_sample(sdf[None, None], flow.view(1, -1, 1, 1, 3), mode="bilinear", padding_mode="border",
                             align_corners=True).view(-1) + half

    with torch.enable_grad(), one_thread():
        for step in range(1, steps + 1):
            d = surface_distances(params)
            loss = torch.sum(weight * F.huber_loss(d, torch.zeros_like(d), reduction="none", delta=HUBER_MM))
            (grad,) = torch.autograd.grad(loss, params)
            with torch.no_grad():
                params -= lr * adam_direction(moments, grad, step)
    params = params.detach()
    misfit = torch.zeros(k, dtype=torch.float64, device=device).index_add_(
        0, owner_t, (weight * surface_distances(params).abs()).double())
    return _motions(params[:, :3], params[:, 3:], centers), centers, params, misfit.cpu().numpy()


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread inside: for loops of small tensor operations (a few thousand points), where threads
    that wait for each other cost more than they share (on 2 cores: 0.28-0.40 s instead of 0.46-0.57 s for the
    fragments' registration)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def adam_direction(moments: torch.Tensor, grad: torch.Tensor, step: int, betas=(0.9, 0.999), eps=1e-8
                   ) -> torch.Tensor:
    """Adam's update direction (Kingma & Ba), updating the running ``moments`` (2, ...) in place. Written out
    because the first torch.optim optimizer of a process imports torch._dynamo, about 1 s on 2 CPU cores."""
    moments[0].mul_(betas[0]).add_(grad, alpha=1 - betas[0])
    moments[1].mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    mean = moments[0] / (1 - betas[0] ** step)
    var = moments[1] / (1 - betas[1] ** step)
    return mean / (var.sqrt() + eps)


def reduction_motions(motions: torch.Tensor, ids: list[int], anchor: int) -> torch.Tensor:
    """Each fragment's motion relative to the anchor's, (K, 3, 4) maps of standard points: the anchor's becomes
    the identity."""
    a = motions[ids.index(anchor)][None].expand_as(motions)
    return compose_theta(invert_theta(a.double()), motions.double()).float()


def motion_sizes(reductions: torch.Tensor, centers: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Rotation angle (degrees) of each reduction and how far it moves its fragment's centre (mm)."""
    r = reductions[:, :, :3].double()
    angle = torch.rad2deg(torch.arccos(((torch.diagonal(r, dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1)))
    c = centers.double()
    shift = ((r @ c[..., None])[..., 0] + reductions[:, :, 3].double() - c).norm(dim=1)
    return angle.cpu().numpy(), shift.cpu().numpy()


def _implausible(angle: np.ndarray, shift: np.ndarray) -> bool:
    """Whether any motion turns by more than MAX_ROTATION_DEG or moves its fragment's centre by more than
    MAX_SHIFT_MM (a failed fit rather than a fracture's displacement)."""
    return bool((angle > MAX_ROTATION_DEG).any() or (shift > MAX_SHIFT_MM).any())


def reduce_input(x: torch.Tensor, visible: torch.Tensor, fragments: Fragments, reductions: torch.Tensor,
                 theta: torch.Tensor, sampler) -> tuple[torch.Tensor, torch.Tensor]:
    """The input with every fragment moved by its reduction: x (1, C, Z, Y, X) and visibility (1, 1, Z, Y, X) on
    the canonical grid. Each standard-frame reduction D becomes θ D θ⁻¹ on the canonical grid; the hidden region
    (fracture mask and small pieces) is moved with every fragment and stays hidden. The anchor stays put."""
    labels = torch.as_tensor(fragments.labels, device=x.device)[None, None]
    hidden = (1.0 - visible).clamp(0, 1)
    hidden = torch.maximum(hidden, torch.as_tensor(fragments.small, dtype=x.dtype, device=x.device)[None, None])
    moved_x = x * (labels == fragments.anchor).to(x.dtype)
    moved_hidden = hidden
    for n, fid in enumerate(fragments.ids):
        if fid == fragments.anchor:
            continue
        forward = compose_theta(theta.double(), compose_theta(reductions[n][None].double(),
                                                              invert_theta(theta.double())))
        back = invert_theta(forward).float()  # output canonical point -> where the fragment was
        moved = sampler(torch.cat([x * (labels == fid).to(x.dtype), hidden], dim=1), back)
        moved_x = moved_x + moved[:, :-1]
        moved_hidden = torch.maximum(moved_hidden, moved[:, -1:])
    seen = (moved_hidden < 0.5).to(x.dtype)
    return moved_x.clamp(0, 1) * seen, seen


def reduce_and_reconstruct(bundle, x: torch.Tensor, visible: torch.Tensor, theta: torch.Tensor,
                           recon: torch.Tensor, rounds: int = ROUNDS, whole_slices: int | None = None,
                           tibia_z: tuple[float, float] | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict, Placement | None]:
    """Fragment registration, reduction and reconstruction (module docstring) from the model's first pass (θ,
    reconstruction) on input x (1, C, Z, Y, X) and visibility (1, 1, Z, Y, X); then θ is corrected so that the
    reconstruction lies on the anchor as registered (also when the tibia is in one piece). Returns θ, the
    reconstruction, the reduced x and visibility, a report (number of fragments, the anchor's share of the
    visible bone, each round's reduction and the final placement: rotation in degrees and shift of each
    fragment's centre in mm) and where the fragments lie in the prediction (:class:`Placement`). The inputs come
    back unchanged, with no placement, when no bone is visible. When the knee piece holds less than PLATEAU_SHARE
    of the plateau (a split-off condyle beside the main piece's plateau hidden by the fracture mask: placed on it, a
    held-out plateau case came out turned by 12 deg, RMSD 16.6 mm; 2.1 mm on the largest) or reducing onto it is
    implausible, and another fragment is larger, the single pass is placed on the largest fragment instead, without
    reduction rounds (on a held-out plateau case that drifted when reduced onto the shaft: Dice 0.881 -> 0.943); the
    report says why ("knee_piece_split", "knee_piece_refused"); when even that is implausible, the single pass comes
    back unplaced (the report says so under "refused"). ``whole_slices``: as for :func:`find_fragments`.
    ``tibia_z``: the tibia mask's canonical z range; where the fracture mask hides the tibia's proximal end, each
    reconstruction and the final θ are stretched along the tibia to reach it (:mod:`hidden_end`; the report's
    "hidden_end" says by how much at the end)."""
    x = x.to(recon.device)
    visible = visible.to(recon.device)
    fragments = find_fragments(x[0, -1].cpu().numpy(), visible[0, 0].cpu().numpy(), whole_slices)
    report = {"fragments": 0 if fragments is None else len(fragments.ids), "rounds": []}
    if fragments is None:
        return theta, recon, x, visible, report, None
    largest = max(fragments.ids, key=lambda f: int((fragments.labels == f).sum()))
    # the rounds move the fragments relative to the largest one, the steadiest reference: a short knee piece
    # registered onto the reconstruction tilts easily, and its tilt, carried over to a long distal fragment, grew
    # from round to round (shaft fractures just below the knee: 20-40 mm reductions). Not on a CT that cuts the
    # tibia off, whose anchor may be a stub at the scan's edge (an ankle CT: one case of 12 went 2.5 -> 15 mm)
    reference = largest if whole_slices is None else fragments.anchor
    if largest != fragments.anchor and fragments.plateau_share < PLATEAU_SHARE:
        report["knee_piece_split"] = (f"the knee piece holds {fragments.plateau_share:.0%} of the plateau, the rest "
                                      "hidden or split off: a split-off condyle rather than the knee; the single pass "
                                      "is placed on the largest fragment instead, without reduction")
        out = _reduce_onto(bundle, replace(fragments, anchor=largest), x, visible, theta, recon, 0, report, largest)
    else:
        out = _reduce_onto(bundle, fragments, x, visible, theta, recon, rounds, report, reference, tibia_z)
        if "refused" in report and largest != fragments.anchor:
            report = {"fragments": len(fragments.ids), "rounds": [],
                      "knee_piece_refused": report["refused"] + "; the single pass is placed on the largest fragment "
                                                                "instead, without reduction"}
            out = _reduce_onto(bundle, replace(fragments, anchor=largest), x, visible, theta, recon, 0, report,
                               largest)
    theta, recon, x, visible, placement = out
    # the placement moves the reconstruction onto the anchor, which can pull it back from the hidden end
    stretch = None if tibia_z is None else stretch_to_tibia(theta, recon, x[0, -1].cpu().numpy(), tibia_z, bundle.grid)
    if stretch is not None:
        theta = stretch.theta
        report["hidden_end"] = {"end": "proximal", "stretch": round(stretch.factor, 4)}
    return theta, recon, x, visible, report, placement


def _reduce_onto(bundle, fragments: Fragments, x: torch.Tensor, visible: torch.Tensor, theta: torch.Tensor,
                 recon: torch.Tensor, rounds: int, report: dict, reference: int,
                 tibia_z: tuple[float, float] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Placement | None]:
    """The rounds and the final placement of :func:`reduce_and_reconstruct` onto ``fragments.anchor``: θ, the
    reconstruction, the reduced x and visibility and the placement (the inputs and None when refused); fills in
    ``report``. ``reference``: the fragment the rounds move the others relative to; ``tibia_z``: for each round's
    reconstruction (:meth:`bundle.Bundle.align_and_reconstruct`)."""
    report["anchor_share"] = round(float((fragments.labels == fragments.anchor).sum() / (fragments.labels > 0).sum()),
                                   4)
    x_in, visible_in, theta_in, recon_in, params = x, visible, theta, recon, None
    for _ in range(rounds if len(fragments.ids) > 1 else 0):
        motions, centers, params, _ = register_fragments(fragments, theta, recon, bundle.grid, params,
                                                         STEPS if params is None else WARM_STEPS)
        reductions = reduction_motions(motions, fragments.ids, reference)
        angle, shift = motion_sizes(reductions, centers)
        report["rounds"].append({"rotation_deg": np.round(angle, 2).tolist(), "shift_mm": np.round(shift, 2).tolist()})
        if (angle < MIN_ROTATION_DEG).all() and (shift < MIN_TRANSLATION_MM).all():
            break
        if _implausible(angle, shift):
            report["refused"] = (f"a fragment would move by {angle.max():.0f} deg / {shift.max():.0f} mm, beyond "
                                 f"{MAX_ROTATION_DEG:g} deg / {MAX_SHIFT_MM:g} mm: the single-pass result is kept")
            return theta_in, recon_in, x_in, visible_in, None
        x, visible = reduce_input(x_in, visible_in, fragments, reductions, theta, bundle.sampler)
        theta, _, recon = bundle.align_and_reconstruct(x, visible, tibia_z)
    motions, centers, _, misfit = register_fragments(fragments, theta, recon, bundle.grid, params,
                                                     STEPS if params is None else WARM_STEPS)
    n = fragments.ids.index(fragments.anchor)
    angle, shift = motion_sizes(motions[n:n + 1], centers[n:n + 1])
    report["placement"] = {"rotation_deg": round(float(angle[0]), 2), "shift_mm": round(float(shift[0]), 2)}
    if _implausible(angle, shift):
        report["refused"] = "the reconstruction's placement on the anchor fragment is implausibly large: not applied"
        return theta, recon, x, visible, None
    placed = compose_theta(theta.double(), invert_theta(motions[n:n + 1].double()))
    # fragment point c (canonical) -> standard θ⁻¹c -> onto the reconstruction M c' -> canonical by the placed θ
    k = len(fragments.ids)
    moves = compose_theta(placed.expand(k, -1, -1), compose_theta(motions.double(),
                                                                  invert_theta(theta.double()).expand(k, -1, -1)))
    return placed.float(), recon, x, visible, Placement(fragments.labels, fragments.ids, fragments.anchor,
                                                       theta_to_matrix(moves), misfit)
