import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from TibiaReconstructionLib.errors import GeometryMismatchError, InputError
from TibiaReconstructionLib.geometry import (Grid, TransformChain, Volume, affine_lps_to_ras, affine_ras_to_lps,
                                             apply_affine, check_same_grid, crop_to_mask, euler_rotation,
                                             invert_affine, lps_to_ras, make_affine, mirror, moved, nearest_rigid,
                                             ras_to_lps, resample, scaling, translation)


def test_index_physical_round_trip(oblique_volume, rng):
    ijk = rng.uniform(-3, 15, size=(50, 3))
    back = oblique_volume.physical_to_index(oblique_volume.index_to_physical(ijk))
    np.testing.assert_allclose(back, ijk, atol=1e-9)


def test_index_to_physical_matches_simpleitk(oblique_volume):
    img = oblique_volume.to_sitk()
    for ijk in [(0, 0, 0), (3, 7, 2), (11, 9, 7)]:
        np.testing.assert_allclose(oblique_volume.index_to_physical(np.array(ijk, float)),
                                   img.TransformIndexToPhysicalPoint(ijk), atol=1e-9)


def test_array_order_is_kji(oblique_volume):
    img = oblique_volume.to_sitk()
    assert img.GetSize() == (12, 10, 8)
    assert img.GetPixel(3, 7, 2) == pytest.approx(float(oblique_volume.array[2, 7, 3]))


def test_ras_lps_round_trip_and_sign(rng):
    p = rng.normal(size=(20, 3)) * 100
    np.testing.assert_allclose(ras_to_lps(lps_to_ras(p)), p)
    np.testing.assert_allclose(lps_to_ras(np.array([10.0, 20.0, 30.0])), [-10.0, -20.0, 30.0])
    m = euler_rotation((5, 10, 15), center=(3, 4, 5)) @ translation((1, 2, 3))
    np.testing.assert_allclose(affine_ras_to_lps(affine_lps_to_ras(m)), m)
    # the RAS version of m moves RAS points as m moves the same points in LPS
    np.testing.assert_allclose(apply_affine(affine_lps_to_ras(m), lps_to_ras(p)), lps_to_ras(apply_affine(m, p)))


def test_ijk_to_ras_is_flipped_ijk_to_lps(oblique_volume):
    ijk = np.array([2.0, 3.0, 4.0])
    np.testing.assert_allclose(apply_affine(oblique_volume.grid.ijk_to_ras, ijk),
                               lps_to_ras(oblique_volume.index_to_physical(ijk)))


def test_transform_chain_compose_and_invert(rng):
    a, b = euler_rotation((10, 0, 30), (5, 5, 5)), scaling(1.1) @ translation((4, -2, 9))
    chain = TransformChain().then("a", a, "mid").then("b", b, "canonical")
    assert chain.source == "patient" and chain.target == "canonical"
    np.testing.assert_allclose(chain.matrix(), b @ a)
    p = rng.normal(size=(10, 3)) * 50
    np.testing.assert_allclose(chain.inverse().apply(chain.apply(p)), p, atol=1e-9)
    assert chain.inverse().source == "canonical"
    restored = TransformChain.from_dict(chain.to_dict())
    np.testing.assert_allclose(restored.matrix(), chain.matrix())


def test_transform_chain_rejects_frame_gap():
    from TibiaReconstructionLib.geometry import TransformStep
    with pytest.raises(InputError, match="starts in frame"):
        TransformChain([TransformStep("a", np.eye(4), "patient", "x"), TransformStep("b", np.eye(4), "y", "z")])


def test_invert_singular_affine_is_clear():
    with pytest.raises(InputError, match="singular"):
        invert_affine(np.diag([1.0, 0.0, 1.0, 1.0]))


def test_mirror_twice_is_identity_and_moves_points_by_reflection(oblique_volume):
    once, h = mirror(oblique_volume)
    twice, h2 = mirror(once, point=oblique_volume.grid.center)
    np.testing.assert_array_equal(twice.array, oblique_volume.array)
    np.testing.assert_allclose(twice.origin, oblique_volume.origin, atol=1e-9)
    np.testing.assert_allclose(twice.direction, oblique_volume.direction, atol=1e-12)
    np.testing.assert_allclose(h2 @ h, np.eye(4), atol=1e-12)
    assert np.linalg.det(once.direction) > 0
    # the value found at the reflected point of the mirrored volume equals the original value
    ijk = np.array([3.0, 7.0, 2.0])
    p = oblique_volume.index_to_physical(ijk)
    ijk_m = np.rint(once.physical_to_index(apply_affine(h, p))).astype(int)
    np.testing.assert_allclose(once.physical_to_index(apply_affine(h, p)), ijk_m, atol=1e-9)
    assert once.array[ijk_m[2], ijk_m[1], ijk_m[0]] == oblique_volume.array[2, 7, 3]


def test_moved_volume_carries_each_voxel_centre_by_the_map_and_back(oblique_volume, rng):
    """A grid moved by a rigid map: every voxel centre lands where the map takes it, the voxels stay, and moving by
    the inverse gives the original grid back."""
    rigid = euler_rotation((25.0, -40.0, 70.0), (10.0, -5.0, 30.0)) @ translation((4.0, -7.5, 12.0))
    turned = moved(oblique_volume, rigid)
    assert turned.array is oblique_volume.array
    ijk = rng.uniform(0, 5, size=(20, 3))
    expected = apply_affine(rigid, oblique_volume.index_to_physical(ijk))
    np.testing.assert_allclose(turned.index_to_physical(ijk), expected, atol=1e-9)
    back = moved(turned, invert_affine(rigid))
    assert back.grid.same_as(oblique_volume.grid, tol_mm=1e-9)


def test_resample_identity_grid_is_exact(oblique_volume):
    out = resample(oblique_volume, oblique_volume.grid)
    np.testing.assert_allclose(out.array, oblique_volume.array, atol=1e-5)


def test_resample_with_translation_shifts_content():
    arr = np.zeros((10, 10, 10), np.float32)
    arr[5, 5, 5] = 1.0
    vol = Volume(arr, np.ones(3), np.zeros(3))
    # output point p samples input at p + (2, 0, 0): the bright voxel appears at i = 3
    out = resample(vol, vol.grid, output_to_input=translation((2.0, 0.0, 0.0)))
    assert np.unravel_index(np.argmax(out.array), out.array.shape) == (5, 5, 3)


def test_resample_onto_other_grid_keeps_physical_positions(oblique_volume):
    grid = Grid((20, 20, 20), np.full(3, 1.0), oblique_volume.grid.center - 10, np.eye(3))
    smooth = oblique_volume.with_array(np.fromfunction(
        lambda k, j, i: (0.3 * i + 0.2 * j - 0.5 * k), oblique_volume.array.shape).astype(np.float32))
    out = resample(smooth, grid, default_value=np.nan)
    # a linear function of index is a linear function of position: check at inside points
    ijk_out = np.argwhere(np.isfinite(out.array))[:, ::-1].astype(float)
    assert len(ijk_out) > 100
    ijk_in = smooth.physical_to_index(grid.index_to_physical(ijk_out))
    inside = np.all((ijk_in >= 0) & (ijk_in <= np.array(smooth.grid.size) - 1), axis=1)  # ITK clamps at edges
    ijk_out, ijk_in = ijk_out[inside], ijk_in[inside]
    expected = 0.3 * ijk_in[:, 0] + 0.2 * ijk_in[:, 1] - 0.5 * ijk_in[:, 2]
    got = out.array[tuple(ijk_out[:, ::-1].astype(int).T)]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_crop_to_mask_keeps_physical_positions(oblique_volume):
    mask = np.zeros(oblique_volume.array.shape, np.uint8)
    mask[3:5, 4:6, 5:9] = 1
    cropped = crop_to_mask(oblique_volume, oblique_volume.with_array(mask), margin_mm=0.0)
    assert cropped.array.shape == (2, 2, 4)
    np.testing.assert_allclose(cropped.origin, oblique_volume.index_to_physical(np.array([5.0, 4.0, 3.0])))
    np.testing.assert_array_equal(cropped.array, oblique_volume.array[3:5, 4:6, 5:9])


def test_crop_to_empty_mask_is_clear(oblique_volume):
    with pytest.raises(InputError, match="mask is empty"):
        crop_to_mask(oblique_volume, oblique_volume.with_array(np.zeros_like(oblique_volume.array)))


def test_grid_mismatch_names_both_geometries(oblique_volume):
    other = Volume(oblique_volume.array, oblique_volume.spacing * 2, oblique_volume.origin, oblique_volume.direction)
    with pytest.raises(GeometryMismatchError) as err:
        check_same_grid(oblique_volume, other, "CT", "fracture mask")
    msg = str(err.value)
    assert "fracture mask" in msg and "CT" in msg and "1.4" in msg and "0.7" in msg


@pytest.mark.parametrize("bad", [dict(spacing=[1, 0, 1]), dict(direction=np.ones((3, 3))), dict(array=np.zeros((4, 4)))])
def test_volume_rejects_bad_geometry(bad):
    kwargs = dict(array=np.zeros((2, 3, 4)), spacing=[1, 1, 1], origin=[0, 0, 0], direction=np.eye(3))
    kwargs.update(bad)
    with pytest.raises(InputError):
        Volume(**kwargs)


def test_upsample_linear_matches_trilinear_interpolation(rng):
    """Separable upsampling equals trilinear interpolation (scipy) at input index n / factor."""
    from scipy import ndimage

    from TibiaReconstructionLib.geometry import upsample_linear

    array = rng.random((4, 5, 6)).astype(np.float32)
    for factors, shape in (((1, 3, 2), (4, 13, 11)), ((2, 1, 3), (7, 5, 16)), ((2, 2, 2), (7, 9, 11))):
        out = upsample_linear(array, factors, shape)
        positions = np.meshgrid(*(np.arange(n) / f for n, f in zip(shape, factors)),
                                indexing="ij")
        expected = ndimage.map_coordinates(array, positions, order=1)
        assert out.shape == shape
        np.testing.assert_allclose(out, expected, atol=1e-6)
    np.testing.assert_array_equal(upsample_linear(array, (1, 1, 1), array.shape), array)
    with pytest.raises(InputError, match="larger"):
        upsample_linear(array, (1, 3, 2), (4, 14, 11))


def test_block_mean_matches_simpleitk_binshrink_on_an_oblique_grid(oblique_volume, rng):
    """Values and geometry as SimpleITK's BinShrink of the float32 image (of volume != 0 for ``binary``), with
    trailing voxels that fill no block dropped, slabs smaller than a block's depth included."""
    import SimpleITK as sitk

    from TibiaReconstructionLib.geometry import block_mean

    labels = oblique_volume.with_array(rng.integers(0, 3, oblique_volume.array.shape).astype(np.uint8))
    for volume, binary in ((oblique_volume, False), (labels, True)):
        reference = volume.with_array((volume.array != 0).astype(np.float32) if binary else volume.array)
        for factors, slab in (((3, 2, 1), 16), ((1, 4, 3), 2), ((5, 1, 2), 1)):
            shrunk = block_mean(volume, factors, binary, slab)
            expected = Volume.from_sitk(sitk.BinShrink(sitk.Cast(reference.to_sitk(), sitk.sitkFloat32), factors))
            assert shrunk.array.dtype == np.float32 and shrunk.grid.same_as(expected.grid, 1e-9)
            np.testing.assert_allclose(shrunk.array, expected.array, rtol=1e-6, atol=1e-6)


def test_boundary_distance_is_the_distance_to_the_nearest_boundary_voxel_on_an_anisotropic_grid():
    from scipy import ndimage

    from TibiaReconstructionLib.geometry import boundary_distance

    mask = np.zeros((9, 12, 14), bool)
    mask[2:7, 3:10, 4:11] = True
    spacing = (0.7, 1.3, 2.5)  # (i, j, k)
    boundary = mask & ~ndimage.binary_erosion(mask)
    points = np.argwhere(boundary) * np.array(spacing[::-1])
    every = np.argwhere(np.ones_like(mask)) * np.array(spacing[::-1])
    nearest = np.sqrt(((every[:, None, :] - points[None]) ** 2).sum(-1)).min(1).reshape(mask.shape)
    expected = np.where(mask, -nearest, nearest)
    np.testing.assert_allclose(boundary_distance(mask, spacing), expected, atol=1e-4)


def test_nearest_rigid_is_the_least_squares_rigid_map_over_the_points(rng):
    """A rigid map comes back unchanged; for a rigid map with 2 % scaling and a shear, the result is rigid, sends the
    body's centroid where the affine does, and fits the affine over the points better than nearby rigid maps (a
    transposed or sign-flipped rotation would not)."""
    points = rng.normal(size=(500, 3)) * [5.0, 8.0, 60.0] + [120.0, -40.0, 300.0]  # a long body far from the origin
    centroid, covariance = points.mean(0), np.cov(points.T)
    rigid = make_affine(Rotation.from_rotvec([0.05, -0.1, 0.2]).as_matrix(), [3.0, -2.0, 5.0])
    np.testing.assert_allclose(nearest_rigid(rigid, centroid, covariance), rigid, atol=1e-9)
    strain = np.array([[1.02, 0.01, 0.0], [0.0, 0.99, 0.015], [0.0, 0.0, 1.01]])
    affine = rigid @ make_affine(strain, centroid - strain @ centroid)
    fitted = nearest_rigid(affine, centroid, covariance)
    np.testing.assert_allclose(fitted[:3, :3] @ fitted[:3, :3].T, np.eye(3), atol=1e-9)
    assert np.linalg.det(fitted[:3, :3]) > 0
    np.testing.assert_allclose(apply_affine(fitted, centroid), apply_affine(affine, centroid), atol=1e-9)

    def misfit(m):
        return float(np.sum((apply_affine(m, points) - apply_affine(affine, points)) ** 2))

    best = misfit(fitted)
    for _ in range(20):
        turn = Rotation.from_rotvec(rng.normal(size=3) * 0.01).as_matrix()
        other = make_affine(turn @ fitted[:3, :3], apply_affine(affine, centroid) - turn @ fitted[:3, :3] @ centroid)
        assert misfit(other) > best
