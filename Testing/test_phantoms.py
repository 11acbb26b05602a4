"""The synthetic fractured-tibia CT generator: anatomy, voxelisation, HU model, fractures, files, CLI.

Coarse grids (2-4 mm) keep the whole file fast; each test checks a property a real bug would break.
"""

import argparse
import json
from functools import lru_cache

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt
from scipy.spatial import cKDTree

from TibiaReconstructionLib.errors import InputError
from TibiaReconstructionLib.geometry import apply_affine, bounding_box, mirror, resample
from TibiaReconstructionLib.phantoms import EXTRA_FRACTURE_TYPES, FRACTURE_TYPES, generate_case, read_case, write_case
from TibiaReconstructionLib.phantoms.anatomy import sample_anatomy
from TibiaReconstructionLib.phantoms.cli import register_cli
from TibiaReconstructionLib.phantoms.mesh import enclosed_volume, load_model, surface_template
from TibiaReconstructionLib.phantoms.voxelize import surface_mask

COARSE = (3.0, 3.0, 3.0)


@lru_cache(maxsize=None)
def case(seed, **kwargs):
    return generate_case(seed, **kwargs)


def tibia_volume_ml(volume):
    return float((volume.array == 1).sum() * np.prod(volume.spacing) / 1000.0)


def dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_shape_data_is_plain_npz_and_matches_llp26_mean():
    from importlib import resources
    with resources.files("TibiaReconstructionLib").joinpath("data", "llp26_tibia_fibula.npz").open("rb") as f:
        with np.load(f, allow_pickle=False) as d:
            assert d["modes"].shape == (26, 571, 3) and d["mean"].shape == (571, 3)
    model = load_model()
    for bone, ml, length in (("tibia", 305.0, 366.0), ("fibula", 53.0, 355.0)):
        t = surface_template(bone)
        v = t.vertices(model["mean"])
        assert enclosed_volume(v, t.triangles) / 1000.0 == pytest.approx(ml, rel=0.03)
        assert np.ptp(v[:, 2]) == pytest.approx(length, rel=0.02)
    # the fibula lies lateral (+x) and posterior (+y) of the tibia in the left-leg frame
    tib, fib = surface_template("tibia").vertices(model["mean"]), surface_template("fibula").vertices(model["mean"])
    assert fib[:, 0].mean() > tib[:, 0].mean() + 15 and fib[:, 1].mean() > tib[:, 1].mean() + 10


def test_population_is_wider_than_llp26_and_plausible():
    lengths, volumes = [], []
    for s in range(40):
        a = sample_anatomy(np.random.default_rng(s))
        lengths.append(a.tibia_z[1] - a.tibia_z[0])
        volumes.append(a.tibia.volume_mm3 / 1000.0)
        assert np.all(np.abs(a.coefficients) <= 3.0)
    assert 280 < min(lengths) and max(lengths) < 470
    assert np.ptp(lengths) > 60  # LLP26 alone spans about 362-379 mm
    assert 120 < min(volumes) and max(volumes) < 650


def test_same_seed_same_case_and_other_seed_other_shape():
    a, b = generate_case(3, spacing=COARSE), generate_case(3, spacing=COARSE)
    for name in ("ct", "labels", "fractured_ct", "fractured_labels", "fracture_mask", "fragment_ids"):
        assert np.array_equal(getattr(a, name).array, getattr(b, name).array), name
    assert a.ct.grid.same_as(b.ct.grid)
    assert all(np.array_equal(x["transform"], y["transform"]) for x, y in zip(a.fragments, b.fragments))
    c = case(4, spacing=COARSE)
    assert not np.allclose(a.shape_coefficients, c.shape_coefficients)
    assert abs(a.tibia_surface.volume_mm3 - c.tibia_surface.volume_mm3) > 1000.0
    # the healthy part does not depend on whether the case is fractured
    h = generate_case(3, spacing=COARSE, fractured=False)
    assert np.array_equal(h.ct.array, a.ct.array) and np.array_equal(h.labels.array, a.labels.array)
    assert h.fractured_ct is None and h.fragments == []


def test_volumes_share_one_grid_and_have_the_promised_types():
    c = case(5, spacing=COARSE)
    assert c.ct.array.dtype == np.int16 and c.fractured_ct.array.dtype == np.int16
    for v in (c.labels, c.fractured_labels, c.fracture_mask, c.fragment_ids):
        assert v.array.dtype == np.uint8 and v.grid.same_as(c.ct.grid)
    assert set(np.unique(c.labels.array)) == {0, 1, 2, 3, 4, 5}
    assert set(np.unique(c.fracture_mask.array)) == {0, 1}
    assert c.fracture_type in FRACTURE_TYPES and c.side in ("left", "right")


def test_tibia_label_is_the_closed_surface_voxelised():
    c = case(6, spacing=(2.0, 2.0, 2.0), fractured=False)
    surf_ml = c.tibia_surface.volume_mm3 / 1000.0
    assert tibia_volume_ml(c.labels) == pytest.approx(surf_ml, rel=0.02)
    # the label's centre of mass is the solid's (right frame, right side, no offset), well within a voxel
    idx = np.argwhere(c.labels.array == 1)[:, ::-1].astype(float)
    centroid = c.labels.index_to_physical(idx).mean(axis=0)
    assert np.linalg.norm(centroid - c.tibia_surface.centroid) < 0.5


def test_fibula_and_neighbours_never_take_tibia_voxels():
    c = case(7, spacing=(2.0, 2.0, 2.0))
    s = c.tibia_surface
    box, inside = surface_mask(c.labels.grid, s.vertices, s.triangles)
    full = np.zeros(c.labels.grid.shape, bool)
    full[box.slices] = inside
    assert np.array_equal(full, c.labels.array == 1)
    # neighbours keep a joint space: no femur/patella/talus voxel touches the tibia face to face
    tib = c.labels.array == 1
    grown = distance_transform_edt(~tib) <= 1.0
    assert not np.any(grown & np.isin(c.labels.array, (3, 4, 5)))
    # and the fractured tibia keeps (nearly) all its voxels: fragments are not overwritten by neighbours
    assert tibia_volume_ml(c.fractured_labels) == pytest.approx(tibia_volume_ml(c.labels), rel=0.05)


@pytest.mark.parametrize("kind", FRACTURE_TYPES + EXTRA_FRACTURE_TYPES)
def test_fragments_reassemble_into_the_healthy_tibia(kind):
    c = case(11, spacing=COARSE, fracture_type=kind)
    assert c.fracture_type == kind
    healthy = c.labels.array == 1
    assert len(c.fragments) >= 2 + (kind in ("comminuted", "segmental"))
    assert [f["id"] for f in c.fragments] == list(range(1, len(c.fragments) + 1))
    assert np.allclose(c.fragments[0]["transform"], np.eye(4))  # the proximal main fragment stays put
    moved = [f for f in c.fragments[1:] if not np.allclose(f["transform"], np.eye(4), atol=1e-3)]
    assert moved, "no fragment was displaced"
    back = np.zeros(healthy.shape, bool)
    for f in c.fragments:
        t = f["transform"]
        assert np.allclose(t[:3, :3] @ t[:3, :3].T, np.eye(3), atol=1e-6) and np.linalg.det(t[:3, :3]) > 0
        piece = c.fragment_ids.with_array((c.fragment_ids.array == f["id"]).astype(np.uint8))
        back |= resample(piece, c.labels.grid, output_to_input=t, interpolation="nearest").array > 0
    assert dice(back, healthy) > 0.9
    assert dice(c.fractured_labels.array == 1, healthy) < 0.99  # something did move
    assert sum(f["volume_ml"] for f in c.fragments) == pytest.approx(tibia_volume_ml(c.labels), rel=1e-6)
    assert np.array_equal(c.fragment_ids.array > 0, c.fractured_labels.array == 1)


def test_a_shaft_band_moves_the_same_fracture_along_the_tibia():
    def where(c):  # the fracture mask's height along the tibia, a fraction of its length from the ankle
        z = c.labels.index_to_physical(np.argwhere(c.labels.array == 1)[:, ::-1].astype(float)) @ c.info[
            "pose_anatomical_to_lps"][:3, 2]
        f = c.labels.index_to_physical(np.argwhere(c.fracture_mask.array != 0)[:, ::-1].astype(float)) @ c.info[
            "pose_anatomical_to_lps"][:3, 2]
        return (np.median(f) - z.min()) / np.ptp(z)

    usual = case(11, spacing=COARSE, fracture_type="transverse")
    high = case(11, spacing=COARSE, fracture_type="transverse", shaft_band=(0.8, 0.85))
    low = case(11, spacing=COARSE, fracture_type="transverse", shaft_band=(0.15, 0.2))
    assert 0.25 - 0.05 < where(usual) < 0.75 + 0.05
    assert 0.8 - 0.05 < where(high) < 0.85 + 0.05 and 0.15 - 0.05 < where(low) < 0.2 + 0.05
    assert np.array_equal(high.ct.array, usual.ct.array)  # the same leg; only the fracture moved
    default = generate_case(11, spacing=COARSE, fracture_type="transverse", shaft_band=(0.25, 0.75))
    assert np.array_equal(default.fracture_mask.array, usual.fracture_mask.array)  # the generator's band


@pytest.mark.parametrize("kind", FRACTURE_TYPES + EXTRA_FRACTURE_TYPES)
def test_fracture_mask_covers_every_fracture_surface(kind):
    c = case(11, spacing=COARSE, fracture_type=kind)
    grid, ids, mask = c.ct.grid, c.fragment_ids.array, c.fracture_mask.array
    healthy_pos, fractured_idx = {}, {}
    for f in c.fragments:
        kji = np.argwhere(ids == f["id"])
        fractured_idx[f["id"]] = kji
        pts = grid.index_to_physical(kji[:, ::-1].astype(float))
        healthy_pos[f["id"]] = apply_affine(np.linalg.inv(f["transform"]), pts)
    step = float(grid.spacing.max()) * 1.5  # moved voxel centres land off the healthy lattice
    n_surface = 0
    for fid, pos in healthy_pos.items():
        others = np.concatenate([p for g, p in healthy_pos.items() if g != fid])
        near = cKDTree(others).query(pos)[0] <= step  # voxels facing another fragment across a cut
        covered = mask[tuple(fractured_idx[fid][near].T)]
        n_surface += near.sum()
        assert covered.mean() >= 0.99, f"fragment {fid}: {covered.mean():.3f} of its cut surface is masked"
    assert n_surface > 20
    # coarse, not the whole bone: it reaches into soft tissue but leaves most of the tibia unmasked
    assert np.any(mask.astype(bool) & (c.fractured_labels.array == 0))
    assert (mask.astype(bool) & (ids > 0)).sum() < 0.6 * (ids > 0).sum()


def test_right_leg_is_the_mirrored_left_leg():
    left = case(8, spacing=COARSE, side="left")
    right = case(8, spacing=COARSE, side="right")
    assert (left.side, right.side) == ("left", "right")
    for name in ("ct", "labels", "fractured_labels", "fracture_mask"):
        mirrored, h = mirror(getattr(left, name), normal=(1.0, 0.0, 0.0), point=(0.0, 0.0, 0.0))
        assert mirrored.grid.same_as(getattr(right, name).grid)
        assert np.array_equal(mirrored.array, getattr(right, name).array), name
    for fl, fr in zip(left.fragments, right.fragments):
        assert np.allclose(h @ fl["transform"] @ h, fr["transform"])
    assert np.linalg.det(right.ct.direction) > 0
    # anatomy: the fibula is lateral, i.e. at larger x (patient left) for a left leg, smaller x for a right leg
    for c, sign in ((left, 1), (right, -1)):
        lab = c.labels
        x = {k: lab.index_to_physical(np.argwhere(lab.array == k)[:, ::-1].astype(float))[:, 0].mean() for k in (1, 2)}
        assert sign * (x[2] - x[1]) > 10.0
        assert sign * x[1] > 0


def test_oblique_grid_keeps_the_anatomy():
    straight = case(9, spacing=(2.0, 2.0, 2.0), fractured=False)
    tilted = case(9, spacing=(2.0, 2.0, 2.0), fractured=False, oblique=True)
    assert not np.allclose(tilted.ct.direction, np.eye(3), atol=0.05)
    assert tibia_volume_ml(tilted.labels) == pytest.approx(tibia_volume_ml(straight.labels), rel=0.02)
    assert tibia_volume_ml(tilted.labels) == pytest.approx(tilted.tibia_surface.volume_mm3 / 1000.0, rel=0.02)
    # same leg in the same place: resampling the tilted labels onto the straight grid gives the same tibia
    onto = resample(tilted.labels, straight.labels.grid, interpolation="nearest")
    assert dice(onto.array == 1, straight.labels.array == 1) > 0.85


def test_spacing_argument_and_size_limit():
    c = case(10, spacing=(2.5, 2.0, 3.0), fractured=False, size_limit_mm=(150.0, 150.0, 600.0))
    assert np.allclose(c.ct.spacing, (2.5, 2.0, 3.0))
    extent = (np.array(c.ct.grid.size) - 1) * c.ct.spacing
    assert np.all(extent <= np.array([150.0, 150.0, 600.0]) + 3.0)
    r = case(10, fractured=False, size_limit_mm=(1.0, 1.0, 1.0))  # random scanner-like spacing
    assert 0.6 <= r.ct.spacing[0] <= 1.0 and r.ct.spacing[0] == r.ct.spacing[1] and 0.6 <= r.ct.spacing[2] <= 3.0
    with pytest.raises(InputError):
        generate_case(1, spacing=(1.0, -1.0, 1.0))
    with pytest.raises(InputError):
        generate_case(1, fracture_type="greenstick")
    with pytest.raises(InputError):
        generate_case(1, side="middle")


def test_hounsfield_units_of_each_tissue():
    c = case(12, spacing=(1.1, 1.1, 1.5), fractured=False)
    ct, lab, sp = c.ct.array.astype(float), c.labels.array, c.ct.spacing[::-1]
    lo, hi = bounding_box(lab == 1)
    box = tuple(slice(a, b + 1) for a, b in zip(lo, hi))
    ct_t, tib = ct[box], lab[box] == 1
    depth = distance_transform_edt(tib, sampling=sp)
    height = np.linspace(0.0, 1.0, tib.shape[0])[:, None, None]  # 0 distal .. 1 proximal (the grid is axial)
    shaft = (np.abs(height - 0.5) < 0.1) & tib
    cortex = ct_t[shaft & (depth > 1.0) & (depth < 2.5)]
    assert 1200 <= np.median(cortex) <= 1800
    marrow = ct_t[shaft & (depth > c.info["tissue"]["cortex_mid_mm"] + 2.5)]
    assert marrow.size > 20 and -100 <= np.median(marrow) <= 0
    metaphysis = (height > 0.92) & tib & (depth > 6.0)
    assert 150 <= np.median(ct_t[metaphysis]) <= 400
    soft = ct[(lab == 0) & (ct > -300) & (ct < 300)]
    hist, edges = np.histogram(soft, bins=np.arange(-300, 301, 5))
    centres = 0.5 * (edges[1:] + edges[:-1])
    muscle = centres[np.argmax(np.where(centres > -20, hist, 0))]
    fat = centres[np.argmax(np.where(centres < -40, hist, 0))]
    assert 35 - 5 <= muscle <= 60 + 5 and -120 - 5 <= fat <= -80 + 5
    assert np.median(ct[0, :5, :5]) < -900  # air in the field-of-view corner


def test_write_and_read_case_roundtrip(tmp_path):
    c = case(13, spacing=(4.0, 4.0, 4.0))
    meta = write_case(c, tmp_path / "case", fmt="nii.gz")
    on_disk = json.loads((tmp_path / "case" / "case.json").read_text(encoding="utf-8"))
    assert on_disk["side"] == c.side and on_disk["fracture_type"] == c.fracture_type and on_disk["seed"] == 13
    assert sorted(meta["files"]) == sorted(["ct", "labels", "tibia_mask", "fractured_ct", "fractured_labels",
                                            "fractured_tibia_mask", "fracture_mask", "fragments"])
    back = read_case(tmp_path / "case")
    assert np.array_equal(back.ct.array, c.ct.array) and back.ct.grid.same_as(c.ct.grid)
    assert np.array_equal(back.fracture_mask.array, c.fracture_mask.array)
    for a, b in zip(back.fragments, c.fragments):
        assert np.allclose(a["transform"], b["transform"])
    from TibiaReconstructionLib.io import read_volume
    mask = read_volume(tmp_path / "case" / meta["files"]["fractured_tibia_mask"], label=True)
    assert np.array_equal(mask.array, (c.fractured_labels.array == 1).astype(np.uint8))
    with pytest.raises(Exception):
        write_case(c, tmp_path / "case", fmt="nii.gz")  # never overwrites silently


def run_cli(argv):
    """`tibia-recon` with only the phantom subcommands (the full shell is tested in test_cli.py)."""
    parser = argparse.ArgumentParser(prog="tibia-recon")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_writes_dataset_manifest_and_montage(tmp_path):
    out = tmp_path / "ds"
    assert run_cli(["phantoms", "--n", "2", "--out", str(out), "--seed", "20", "--spacing", "4", "4", "4",
                    "--workers", "2", "--side", "right", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert [e["seed"] for e in manifest["cases"]] == [20, 21]
    for e in manifest["cases"]:
        assert e["side"] == "right" and e["fracture_type"] in FRACTURE_TYPES
        assert all((out / p).is_file() for p in e["files"].values())
    from TibiaReconstructionLib.prepare import read_case_list  # the data-set reader accepts the manifest
    listed = read_case_list(out / "manifest.json")
    assert [c.side for c in listed] == ["right", "right"] and all(c.fracture_mask.is_file() for c in listed)
    # worker processes give exactly what an in-process call gives
    again = generate_case(21, side="right", spacing=(4.0, 4.0, 4.0))
    assert np.array_equal(read_case(out / manifest["cases"][1]["folder"]).fractured_ct.array, again.fractured_ct.array)
    png = tmp_path / "m.png"
    assert run_cli(["montage", str(out / manifest["cases"][0]["folder"]), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError, match="already exists"):
        run_cli(["phantoms", "--n", "1", "--out", str(out), "--spacing", "4", "4", "4", "--quiet"])
