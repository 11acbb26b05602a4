"""Fragment reduction before the final reconstruction (refine.py) on small synthetic canonical tensors."""

import numpy as np
import pytest
import torch

from TibiaReconstructionLib import refine
from TibiaReconstructionLib.bundle import load_bundle
from TibiaReconstructionLib.geometry import Grid, apply_affine
from TibiaReconstructionLib.models import AffineGridSampler
from TibiaReconstructionLib.models.sampler import identity_theta, matrix_to_theta, theta_to_matrix
from TibiaReconstructionLib.prepare import canonical_grid
from tiny_bundle import make_tiny_bundle

GRID = canonical_grid((24, 24, 64), 2.0)
GAP = (26, 30)  # k slices of the fracture mask


def bone() -> np.ndarray:
    """An asymmetric rod along z (Z, Y, X): wider at the top (knee), a bump on one side at the bottom (ankle) and
    an elliptic cross-section, so that every rigid motion of a piece of it changes its surface."""
    k, j, i = np.meshgrid(*(np.arange(n, dtype=float) for n in GRID.shape), indexing="ij")
    x, y = i - 11.5, j - 11.5
    radius = 4.0 + 3.0 * (k > 52) + 0.04 * k
    rod = (x / 1.3) ** 2 + y ** 2 <= radius ** 2
    ankle = (k < 12) & ((x - 5) ** 2 + (y - 2) ** 2 <= 9)
    return ((rod | ankle) & (k > 3) & (k < 60)).astype(np.float32)


def motion(angle_deg: float, axis, shift, center) -> np.ndarray:
    """4x4 rigid map: rotate by ``angle_deg`` about ``axis`` through ``center`` (mm), then shift (mm)."""
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.deg2rad(angle_deg)
    r = np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = np.asarray(center) - r @ center + np.asarray(shift)
    return m


def fractured(displacement: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The bone with its distal piece (below the gap) moved by ``displacement`` (4x4, canonical mm): input x
    (1, 2, Z, Y, X) with the gap hidden, visibility (1, 1, Z, Y, X) and the distal piece's healthy mask."""
    healthy = bone()
    distal = healthy.copy()
    distal[GAP[0]:] = 0
    sampler = AffineGridSampler(GRID)
    back = matrix_to_theta(np.linalg.inv(displacement))[None]
    moved = sampler(torch.from_numpy(distal)[None, None], back)[0, 0].numpy()
    occ = np.maximum(np.where(np.arange(GRID.shape[0])[:, None, None] >= GAP[0], healthy, 0), moved)
    visible = np.ones(GRID.shape, np.float32)
    visible[GAP[0]:GAP[1]] = 0
    occ = occ * visible
    x = torch.from_numpy(np.stack([0.6 * occ, occ]))[None]
    return x, torch.from_numpy(visible)[None, None], distal > 0.5


def test_fragments_anchor_is_the_knee_piece_and_small_pieces_are_hidden():
    x, visible, distal = fractured(np.eye(4))
    occ = x[0, 1].numpy().copy()
    occ[20, 2, 2] = 1.0  # a one-voxel chip
    found = refine.find_fragments(occ, visible[0, 0].numpy())
    assert len(found.ids) == 2
    assert not np.any((found.labels == found.anchor) & distal)  # the anchor is the proximal piece
    assert found.small[20, 2, 2] and found.labels[20, 2, 2] == 0
    whole = bone()
    one = refine.find_fragments(whole, np.ones_like(whole))  # one piece: nothing to reduce, only to place
    assert one.ids == [one.anchor] and np.array_equal(one.labels > 0, whole > 0.5)
    assert refine.find_fragments(whole, np.zeros_like(whole)) is None


def test_the_anchor_is_the_largest_knee_piece_not_the_largest_piece_nor_a_split_condyle():
    whole = bone()
    k, j, i = np.meshgrid(*(np.arange(n) for n in GRID.shape), indexing="ij")
    high = np.ones(GRID.shape, np.float32)
    high[44:47] = 0.0  # a shaft fracture just below the knee: the distal piece is the larger one
    found = refine.find_fragments(whole * high, high)
    sizes = {f: int((found.labels == f).sum()) for f in found.ids}
    assert len(found.ids) == 2 and sizes[found.anchor] < max(sizes.values())
    assert (found.labels[50:] == found.anchor).sum() > 0  # the knee piece
    split = np.ones(GRID.shape, np.float32)
    split[(k >= 47) & (i >= 9) & (i <= 10)] = 0.0  # a condyle split off the plateau, lateral of i = 10 ...
    split[(k >= 44) & (k <= 46) & (i > 10)] = 0.0  # ... and below it
    found = refine.find_fragments(whole * split, split)
    condyle = (k >= 47) & (i > 10) & (whole > 0.5)
    in_knee = lambda m: int((m & (k >= 52)).sum())  # noqa: E731 - the top 15 % of the bone
    main = (found.labels == found.anchor)
    assert len(found.ids) == 2 and in_knee(condyle) > in_knee(main)  # the condyle holds more of the knee zone
    assert not (main & condyle).any() and main[10:40].any()  # yet the anchor is the main piece with the shaft


def test_on_a_knee_ct_a_split_condyle_counts_as_small_as_on_the_whole_tibia():
    whole = bone()
    k, j, i = np.meshgrid(*(np.arange(n) for n in GRID.shape), indexing="ij")
    split = np.ones(GRID.shape, np.float32)
    split[(k >= 51) & (i == 13)] = 0.0  # a small condyle split off the plateau, lateral of i = 13
    split[(k == 50) & (i > 13)] = 0.0
    assert len(refine.find_fragments(whole * split, split).ids) == 1  # under MIN_FRAGMENT_SHARE of the whole tibia
    knee_ct = split * (k >= 32)  # the scan shows the upper half: the condyle is a larger share of what is seen
    seen = refine.find_fragments(whole * knee_ct, knee_ct)
    assert len(seen.ids) == 2
    known = refine.find_fragments(whole * knee_ct, knee_ct, whole_slices=56)  # told how long the whole tibia is
    assert known.ids == [known.anchor] and known.small[(k >= 51) & (i > 13) & (whole > 0.5)].all()


def test_registration_recovers_a_known_displacement():
    center = GRID.index_to_physical(np.array([11.5, 11.5, 15.0]))
    displacement = motion(7.0, (1.0, 0.3, 0.0), (2.5, -2.0, -1.5), center)
    x, visible, distal = fractured(displacement)
    fragments = refine.find_fragments(x[0, 1].numpy(), visible[0, 0].numpy())
    healthy = torch.from_numpy(np.stack([0.6 * bone(), bone()]))[None]
    motions, _, _, misfit = refine.register_fragments(fragments, identity_theta(1), healthy, GRID)
    reductions = refine.reduction_motions(motions, fragments.ids, fragments.anchor)
    points = GRID.index_to_physical(np.argwhere(distal)[:, ::-1].astype(float))
    moved = apply_affine(displacement, points)
    n = next(i for i, f in enumerate(fragments.ids) if f != fragments.anchor)
    reduced = apply_affine(theta_to_matrix(reductions[n]), moved)
    assert np.linalg.norm(moved - points, axis=1).mean() > 3.0  # the displacement is real
    assert np.linalg.norm(reduced - points, axis=1).mean() < 1.0
    anchor = theta_to_matrix(reductions[fragments.ids.index(fragments.anchor)])
    np.testing.assert_allclose(anchor, np.eye(4), atol=1e-6)
    assert misfit.max() < 1.0  # both fragments lie on the healthy bone's surface once registered


def test_reduce_input_with_identity_motions_keeps_the_input():
    x, visible, _ = fractured(np.eye(4))
    fragments = refine.find_fragments(x[0, 1].numpy(), visible[0, 0].numpy())
    identity = identity_theta(len(fragments.ids))
    reduced, seen = refine.reduce_input(x, visible, fragments, identity, identity_theta(1), AffineGridSampler(GRID))
    torch.testing.assert_close(seen, visible)
    torch.testing.assert_close(reduced, x * visible, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return load_bundle(make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "b"))


def test_a_bone_in_one_piece_is_only_placed_onto_itself(tiny_bundle):
    grid: Grid = tiny_bundle.grid
    occ = np.zeros(grid.shape, np.float32)
    occ[10:45, 9:15, 9:15] = 1.0
    x = torch.from_numpy(np.stack([0.5 * occ, occ]))[None]
    visible = torch.ones_like(x[:, :1])
    shift = np.eye(4)
    shift[:3, 3] = (0.0, 3.0, 0.0)  # the reconstruction lies 3 mm off the input, along y
    recon = AffineGridSampler(grid)(x, matrix_to_theta(np.linalg.inv(shift))[None])
    theta = identity_theta(1)
    out = refine.reduce_and_reconstruct(tiny_bundle, x, visible, theta, recon)
    assert out[1] is recon and out[2] is x and out[3] is visible
    assert out[4]["fragments"] == 1 and out[4]["rounds"] == []
    # θ now maps the reconstruction back onto the input: a standard point p is read at p - 3 mm along y
    np.testing.assert_allclose(theta_to_matrix(out[0][0])[:3, 3], (0.0, -3.0, 0.0), atol=0.6)
    np.testing.assert_allclose(theta_to_matrix(out[0][0])[:3, :3], np.eye(3), atol=0.02)
    placement = out[5]  # the one fragment stays where it is, and lies on the reconstruction once it is placed
    assert placement.ids == [placement.anchor]
    np.testing.assert_allclose(placement.moves[0], np.eye(4), atol=1e-5)
    assert placement.misfit_mm[0] < 1.0


def test_an_implausible_reduction_keeps_the_single_pass(tiny_bundle, monkeypatch):
    occ = np.zeros(tiny_bundle.grid.shape, np.float32)
    occ[5:25, 9:15, 9:15] = occ[30:50, 9:15, 9:15] = 1.0  # two pieces of a bar
    seen = np.ones_like(occ)
    seen[25:30] = 0.0  # the fracture gap
    x = torch.from_numpy(np.stack([0.5 * occ, occ]))[None]
    visible = torch.from_numpy(seen)[None, None]
    theta, _, recon = tiny_bundle.align_and_reconstruct(x, visible)
    flipped = motion(90.0, (1.0, 0.0, 0.0), (0.0, 0.0, 0.0), np.zeros(3))  # a fragment turned over: a failed fit
    fake = torch.stack([torch.eye(3, 4), matrix_to_theta(flipped)])

    def register(fragments, *args, **kwargs):
        motions = fake if fragments.ids[0] != fragments.anchor else fake.flip(0)
        return motions, torch.zeros(2, 3), torch.zeros(2, 6), np.zeros(2)

    monkeypatch.setattr(refine, "register_fragments", register)
    out = refine.reduce_and_reconstruct(tiny_bundle, x, visible, theta, recon)
    assert out[0] is theta and out[1] is recon and out[2] is x and out[3] is visible
    assert "implausibly large" in out[4]["refused"]  # also placed on the other piece, a flip is refused
    assert out[5] is None  # no placement: the visible bone is not fused into a refused reduction


def shaft_and_knee_piece(bundle):
    """A long shaft piece and a short knee piece on ``bundle``'s grid: occupancy, visibility, x, visible and the
    model's first pass (θ, reconstruction)."""
    occ = np.zeros(bundle.grid.shape, np.float32)
    occ[5:38, 9:15, 9:15] = occ[42:50, 8:16, 8:16] = 1.0
    seen = np.ones_like(occ)
    seen[38:42] = 0.0
    x = torch.from_numpy(np.stack([0.5 * occ, occ]))[None]
    visible = torch.from_numpy(seen)[None, None]
    theta, _, recon = bundle.align_and_reconstruct(x, visible)
    return occ, seen, x, visible, theta, recon


def test_an_implausible_reduction_onto_the_knee_piece_falls_back_to_placing_on_the_largest_fragment(
        tiny_bundle, monkeypatch):
    occ, seen, x, visible, theta, recon = shaft_and_knee_piece(tiny_bundle)
    verdicts = iter([True])  # the first reduction (onto the knee piece) is implausible, every later one is not
    monkeypatch.setattr(refine, "_implausible", lambda angle, shift: next(verdicts, False))
    out = refine.reduce_and_reconstruct(tiny_bundle, x, visible, theta, recon)
    report, placement = out[4], out[5]
    assert "knee_piece_refused" in report and "refused" not in report and report["rounds"] == []  # placed only
    assert placement is not None and placement.labels[20, 12, 12] == placement.anchor  # the shaft piece
    assert refine.find_fragments(occ, seen).anchor == placement.labels[45, 12, 12]  # first tried: the knee piece


def test_a_split_off_condyle_does_not_anchor_the_prediction(tiny_bundle):
    """A plateau fracture whose mask hides the shaft's half of the plateau leaves one condyle as the only visible bone
    at the knee: it holds half the plateau, not the knee, so the single pass is placed on the largest fragment (the
    shaft). A knee piece across the whole plateau still anchors."""
    occ = np.zeros(tiny_bundle.grid.shape, np.float32)
    occ[5:50, 9:15, 9:15] = occ[42:50, 8:16, 8:16] = 1.0  # shaft and plateau
    seen = np.ones_like(occ)
    seen[38:42] = 0.0  # the fracture below the condyle
    seen[38:50, :, :12] = 0.0  # and the shaft's half of the plateau
    fragments = refine.find_fragments(occ, seen)
    condyle, shaft = fragments.labels[45, 12, 13], fragments.labels[20, 12, 12]
    assert fragments.anchor == condyle and fragments.plateau_share == pytest.approx(0.5)
    x = torch.from_numpy(np.stack([0.5 * occ, occ]))[None]
    visible = torch.from_numpy(seen)[None, None]
    theta, _, recon = tiny_bundle.align_and_reconstruct(x, visible)
    out = refine.reduce_and_reconstruct(tiny_bundle, x, visible, theta, recon)
    report, placement = out[4], out[5]
    assert "knee_piece_split" in report and report["rounds"] == []
    assert placement is not None and placement.anchor == shaft
    occ, seen, *_ = shaft_and_knee_piece(tiny_bundle)
    assert refine.find_fragments(occ, seen).plateau_share == pytest.approx(1.0)


def test_the_rounds_reduce_onto_the_largest_fragment_and_the_knee_piece_still_anchors_the_prediction(
        tiny_bundle, monkeypatch):
    """A short knee piece registers less steadily than a long shaft piece: the rounds move the fragments relative to
    the largest one (unless the CT cuts the tibia off); the final placement is still on the knee piece, which stays
    where it lies in the CT."""
    grid: Grid = tiny_bundle.grid
    _, _, x, visible, theta, recon = shaft_and_knee_piece(tiny_bundle)
    tilt = motion(6.0, (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), grid.index_to_physical(np.array([11.5, 11.5, 45.0])))

    def register(fragments, *args, **kwargs):  # the knee piece fits the reconstruction tilted, the shaft as it is
        motions = identity_theta(len(fragments.ids)).clone()
        motions[fragments.ids.index(fragments.anchor)] = matrix_to_theta(tilt)
        return motions, torch.zeros(len(fragments.ids), 3), torch.zeros(len(fragments.ids), 6), np.zeros(2)

    reduced = []
    reduce_input = refine.reduce_input
    monkeypatch.setattr(refine, "register_fragments", register)
    monkeypatch.setattr(refine, "reduce_input", lambda x, v, fragments, reductions, *a: (
        reduced.append((fragments, reductions)), reduce_input(x, v, fragments, reductions, *a))[1])
    out = refine.reduce_and_reconstruct(tiny_bundle, x, visible, theta, recon)
    fragments, reductions = reduced[0]
    knee, shaft = (fragments.ids.index(int(fragments.labels[k, 12, 12])) for k in (45, 20))
    assert fragments.ids[knee] == fragments.anchor
    np.testing.assert_allclose(theta_to_matrix(reductions[shaft]), np.eye(4), atol=1e-5)  # the largest stays
    np.testing.assert_allclose(theta_to_matrix(reductions[knee]), tilt, atol=1e-4)  # the knee piece is moved
    placement = out[5]
    assert placement.anchor == fragments.anchor
    np.testing.assert_allclose(placement.moves[placement.ids.index(placement.anchor)], np.eye(4), atol=1e-5)
    reduced.clear()  # on a CT that cuts the tibia off (told by whole_slices), the rounds stay relative to the anchor
    refine.reduce_and_reconstruct(tiny_bundle, x, visible, theta, recon, whole_slices=1)
    fragments, reductions = reduced[0]
    np.testing.assert_allclose(theta_to_matrix(reductions[knee]), np.eye(4), atol=1e-5)
    np.testing.assert_allclose(theta_to_matrix(reductions[shaft]), np.linalg.inv(tilt), atol=1e-4)
