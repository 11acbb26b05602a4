"""Metrics: analytic cases, cross-checks against skimage and MONAI, anisotropic spacing, errors."""

import numpy as np
import pytest
import torch
from monai.metrics import SSIMMetric, compute_average_surface_distance, compute_hausdorff_distance
from scipy import stats
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from TibiaReconstructionLib import metrics
from TibiaReconstructionLib.errors import GeometryMismatchError, InputError

SPACING = (0.8, 1.0, 2.0)  # (i, j, k) mm; arrays are [k, j, i]


def _pair(rng, shape=(18, 17, 16)):
    a = rng.random(shape)
    b = np.clip(0.7 * a + 0.3 * rng.random(shape), 0, 1)
    return a, b


def _distance_field(shape, spacing_ijk, center_mm):
    """Distance (mm) of every voxel centre [k, j, i] from a point given in (i, j, k) mm."""
    k, j, i = np.indices(shape, dtype=float)
    si, sj, sk = spacing_ijk
    ci, cj, ck = center_mm
    return np.sqrt((i * si - ci) ** 2 + (j * sj - cj) ** 2 + (k * sk - ck) ** 2)


def _box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


# ---------------------------------------------------------------------------------------------
# SSIM / D-SSIM


@pytest.mark.parametrize("window", metrics.DSSIM_WINDOWS)
def test_uniform_ssim_matches_skimage(rng, window):
    a, b = _pair(rng)
    ref = structural_similarity(a, b, win_size=window, data_range=1.0, use_sample_covariance=False)
    assert metrics.ssim(a, b, window, kernel="uniform") == pytest.approx(ref, abs=1e-10)


@pytest.mark.parametrize("window, sigma", [(3, 0.4), (7, 0.9), (11, 1.5), (15, 2.0)])
def test_gaussian_ssim_matches_skimage(rng, window, sigma):
    # skimage's Gaussian filter has radius int(3.5 * sigma + 0.5): these sigmas give `window` taps.
    a, b = _pair(rng)
    ref = structural_similarity(a, b, win_size=window, gaussian_weights=True, sigma=sigma,
                                data_range=1.0, use_sample_covariance=False)
    assert metrics.ssim(a, b, window, sigma=sigma) == pytest.approx(ref, abs=1e-10)


@pytest.mark.parametrize("window", metrics.DSSIM_WINDOWS)
@pytest.mark.parametrize("kernel", ["gaussian", "uniform"])
def test_ssim_matches_monai(rng, window, kernel):
    a, b = _pair(rng)
    m = SSIMMetric(spatial_dims=3, data_range=1.0, kernel_type=kernel, win_size=window, kernel_sigma=1.5)
    ref = float(m(torch.from_numpy(a)[None, None].float(), torch.from_numpy(b)[None, None].float()).mean())
    assert metrics.ssim(a, b, window, kernel=kernel) == pytest.approx(ref, abs=2e-5)


def test_dssim_identical_zero_and_torch_input(rng):
    a, _ = _pair(rng)
    for w in metrics.DSSIM_WINDOWS:
        assert abs(metrics.dssim(a, a.copy(), w)) < 1e-12
    assert abs(metrics.dssim(torch.from_numpy(a), torch.from_numpy(a), 7)) < 1e-12


def test_dssim_constant_volumes_analytic():
    # Zero variance: contrast term is 1, SSIM reduces to the luminance term.
    x, y = 0.2, 0.6
    c1 = 0.01**2
    expected = (1 - (2 * x * y + c1) / (x * x + y * y + c1)) / 2
    got = metrics.dssim(np.full((9, 9, 9), x), np.full((9, 9, 9), y), 3)
    assert got == pytest.approx(expected, rel=1e-12)


def test_dssim_orders_similarity(rng):
    a, b = _pair(rng)
    assert 0 < metrics.dssim(a, b, 7) < metrics.dssim(a, 1 - a, 7) <= 1
    assert metrics.dssim(a, 1 - a, 7) > 0.5  # anti-correlated


def test_dssim_bad_inputs(rng):
    a, _ = _pair(rng, (10, 10, 10))
    with pytest.raises(InputError, match="larger than the volume"):
        metrics.dssim(a, a, 11)
    with pytest.raises(InputError, match="odd"):
        metrics.dssim(a, a, 4)
    with pytest.raises(GeometryMismatchError):
        metrics.dssim(a, a[:-1], 3)
    with pytest.raises(InputError, match="3-D"):
        metrics.dssim(a[0], a[0], 3)
    bad = a.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        metrics.dssim(bad, a, 3)


# ---------------------------------------------------------------------------------------------
# PSNR / RMSE


def test_psnr_rmse_match_skimage(rng):
    a, b = _pair(rng)
    assert metrics.rmse(a, b) == pytest.approx(np.sqrt(mean_squared_error(a, b)), rel=1e-12)
    assert metrics.psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), rel=1e-12)
    assert metrics.psnr(a, b, data_range=2.0) == pytest.approx(metrics.psnr(a, b) + 20 * np.log10(2), rel=1e-12)


def test_psnr_rmse_analytic():
    a = np.zeros((4, 4, 4))
    assert metrics.rmse(a, a + 0.1) == pytest.approx(0.1)
    assert metrics.psnr(a, a + 0.1) == pytest.approx(20.0)
    assert metrics.rmse(a, a) == 0.0
    assert metrics.psnr(a, a) == float("inf")


# ---------------------------------------------------------------------------------------------
# Dice and voxel-boundary surface distances


def test_dice_cases():
    shape = (6, 8, 10)
    a = _box(shape, (0, 0, 0), (6, 8, 4))
    b = _box(shape, (0, 0, 2), (6, 8, 6))  # overlaps half of each
    assert metrics.dice(a, a) == 1.0
    assert metrics.dice(a, b) == pytest.approx(0.5)
    assert metrics.dice(a, np.zeros(shape, bool)) == 0.0
    with pytest.raises(InputError, match="both masks are empty"):
        metrics.dice(np.zeros(shape), np.zeros(shape))


def test_identical_masks_zero_distances():
    m = _box((10, 12, 14), (2, 3, 4), (8, 9, 10))
    d_ab, d_ba = metrics.surface_distances(m, m, SPACING)
    assert d_ab.size > 0 and np.all(d_ab == 0) and np.all(d_ba == 0)
    assert metrics.rmsd(m, m, SPACING) == 0.0
    assert metrics.hd95(m, m, SPACING) == 0.0
    assert metrics.mean_surface_distance(m, m, SPACING) == 0.0


@pytest.mark.parametrize("axis, expected_mm", [(0, 3.0), (2, 1.0)])
def test_one_voxel_shift_measured_in_mm(axis, expected_mm):
    # spacing (i, j, k) = (1, 1, 3): a shift along array axis 0 (k) is 3 mm, along axis 2 (i) 1 mm.
    spacing = (1.0, 1.0, 3.0)
    a = _box((12, 30, 30), (3, 3, 3), (8, 25, 25))
    b = np.roll(a, 1, axis=axis)
    d_ab, d_ba = metrics.surface_distances(a, b, spacing)
    assert max(d_ab.max(), d_ba.max()) == pytest.approx(expected_mm)
    assert metrics.hd95(a, b, spacing) == pytest.approx(expected_mm)


def test_concentric_spheres_anisotropic():
    r1, r2 = 8.0, 11.0
    shape = (16, 32, 40)
    center = (16.0, 16.0, 15.0)  # (i, j, k) mm, inside the 32 x 32 x 32 mm box
    dist = _distance_field(shape, SPACING, center)
    d_ab, d_ba = metrics.surface_distances(dist <= r1, dist <= r2, SPACING)
    d = np.concatenate([d_ab, d_ba])
    tol = max(SPACING)
    assert np.all(np.abs(d - (r2 - r1)) <= tol)
    assert metrics.mean_surface_distance(dist <= r1, dist <= r2, SPACING) == pytest.approx(r2 - r1, abs=0.5)


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # raised inside MONAI
def test_surface_distances_match_monai(rng):
    shape = (16, 32, 40)
    dist_a = _distance_field(shape, SPACING, (15.0, 16.0, 15.0))
    dist_b = _distance_field(shape, SPACING, (18.0, 14.0, 17.0))
    a = (dist_a <= 9.0) & (rng.random(shape) > 0.05)  # ragged surfaces
    b = dist_b <= 7.0
    kji = SPACING[::-1]
    ta, tb = torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]
    ref_hd95 = float(compute_hausdorff_distance(ta, tb, include_background=True, percentile=95, spacing=kji))
    ref_asd = float(compute_average_surface_distance(ta, tb, include_background=True, symmetric=True,
                                                      spacing=kji))
    assert metrics.hd95(a, b, SPACING) == pytest.approx(ref_hd95, rel=1e-5)
    assert metrics.mean_surface_distance(a, b, SPACING) == pytest.approx(ref_asd, rel=1e-5)


def test_empty_mask_raises():
    m = _box((6, 6, 6), (1, 1, 1), (4, 4, 4))
    with pytest.raises(InputError, match="second mask is empty"):
        metrics.hd95(m, np.zeros_like(m), SPACING)
    with pytest.raises(InputError, match="spacing"):
        metrics.rmsd(m, m, (1.0, 0.0, 1.0))


# ---------------------------------------------------------------------------------------------
# Marching-cubes RMSD


def test_rmsd_surfaces_concentric_spheres_anisotropic():
    shape = (16, 32, 40)
    dist = _distance_field(shape, SPACING, (16.0, 16.0, 15.0))
    # Signed-distance-like fields: the 0.5 isosurface is the sphere of radius r.
    vol_a = np.clip(0.5 + (8.0 - dist) / 4, 0, 1)
    vol_b = np.clip(0.5 + (11.0 - dist) / 4, 0, 1)
    assert metrics.rmsd_surfaces(vol_a, vol_b, 0.5, SPACING) == pytest.approx(3.0, abs=0.15)
    assert metrics.rmsd_surfaces(vol_a, vol_a.copy(), 0.5, SPACING) == 0.0


@pytest.mark.parametrize("axis, expected_mm", [(0, 2.0), (1, 1.0), (2, 0.8)])
def test_rmsd_surfaces_slab_shift_in_mm(axis, expected_mm):
    # A slab across `axis` shifted by one voxel: both faces move by that axis's spacing exactly.
    profile = np.array([0, 0, 0.2, 0.8, 1, 1, 0.7, 0.1, 0, 0, 0, 0])
    shape = [12, 12, 12]
    vol = np.broadcast_to(profile.reshape([-1 if d == axis else 1 for d in range(3)]), shape).copy()
    shifted = np.roll(vol, 1, axis=axis)
    assert metrics.rmsd_surfaces(vol, shifted, 0.5, SPACING) == pytest.approx(expected_mm, abs=1e-9)


def test_rmsd_surfaces_no_surface_raises():
    vol = np.zeros((8, 8, 8))
    vol[2:6, 2:6, 2:6] = 1.0
    with pytest.raises(InputError, match="no surface"):
        metrics.rmsd_surfaces(vol, np.zeros_like(vol), 0.5, SPACING)


# ---------------------------------------------------------------------------------------------
# Confidence intervals


def test_mean_ci_matches_scipy_interval(rng):
    v = rng.normal(2.0, 0.5, size=12)
    mean, half = metrics.mean_ci(v)
    lo, hi = stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
    assert mean == pytest.approx(v.mean())
    assert half == pytest.approx((hi - lo) / 2)
    assert metrics.mean_ci([1.0, 3.0]) == pytest.approx((2.0, stats.t.ppf(0.975, 1) * np.sqrt(2) / np.sqrt(2)))


def test_mean_ci_edge_cases():
    mean, half = metrics.mean_ci([4.2])
    assert mean == 4.2 and np.isnan(half)
    mean, half = metrics.mean_ci([30.0, float("inf")])
    assert mean == float("inf") and np.isnan(half)
    with pytest.raises(InputError):
        metrics.mean_ci([])
    with pytest.raises(InputError, match="NaN"):
        metrics.mean_ci([1.0, float("nan")])


# ---------------------------------------------------------------------------------------------
# Table 1 row


def _case(radius, shape=(16, 20, 24), spacing=(1.0, 1.0, 1.5)):
    dist = _distance_field(shape, spacing, (11.5, 9.5, 11.0))
    occupancy = np.clip(0.5 + (radius - dist) / 3, 0, 1)
    intensity = occupancy * np.clip(0.3 + dist / 20, 0, 1)
    return np.stack([intensity, occupancy]), spacing


def test_table1_row_identical_and_shifted():
    target, spacing = _case(6.0)
    row = metrics.table1_row(target, target.copy(), spacing)
    assert tuple(row) == metrics.TABLE1_KEYS
    assert all(row[f"dssim{w}"] == pytest.approx(0, abs=1e-12) for w in metrics.DSSIM_WINDOWS)
    assert row["psnr"] == float("inf") and row["rmse"] == 0.0
    assert row["rmsd"] == 0.0 and row["dice"] == 1.0 and row["hd95"] == 0.0

    pred, _ = _case(7.5)
    row = metrics.table1_row(torch.from_numpy(pred), torch.from_numpy(target), spacing)
    assert row["rmsd"] == pytest.approx(1.5, abs=0.2)
    assert 0.5 < row["dice"] < 1.0
    assert 0 < row["dssim3"] < 0.5 and np.isfinite(row["psnr"]) and row["rmse"] > 0
    assert row["rmse"] == pytest.approx(metrics.rmse(pred[0], target[0]))


def test_table1_row_single_channel_and_errors():
    target, spacing = _case(6.0)
    row = metrics.table1_row(target[:1], target[:1], spacing)
    assert row["dice"] == 1.0 and row["rmsd"] == 0.0
    with pytest.raises(InputError, match="channels"):
        metrics.table1_row(np.concatenate([target, target]), np.concatenate([target, target]), spacing)
    empty = target.copy()
    empty[1] = 0.0
    with pytest.raises(InputError, match="no surface"):
        metrics.table1_row(empty, target, spacing)
