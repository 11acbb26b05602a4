"""Affine grid sampler, LocNet, prototype and autoencoders on tiny canonical grids."""

import numpy as np
import pytest
import torch

from TibiaReconstructionLib.errors import InputError
from TibiaReconstructionLib.geometry import Grid, Volume, euler_rotation, make_affine, resample, scaling, translation
from TibiaReconstructionLib.models import (PCA, VAE, VQVAE, AffineGridSampler, LocNet, Prototype, build_autoencoder,
                                           compose_theta, identity_theta, invert_theta, masked_mse, matrix_to_theta,
                                           theta_to_matrix)
from TibiaReconstructionLib.models.sampler import sampling_grid

TINY_LOCNET = {"channels": [4, 8], "input_downsample": 1, "pool_size": [2, 1, 1], "hidden": 16}


def canonical_grid(size=(10, 12, 16), spacing=(2.0, 3.0, 2.5)) -> Grid:
    size, spacing = np.asarray(size), np.asarray(spacing, dtype=float)
    return Grid(tuple(size), spacing, -(size - 1) / 2 * spacing)


def smooth_blob(grid: Grid, rng) -> np.ndarray:
    """Random smooth values that are zero on and near the grid border, shape grid.shape."""
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, s) for s in grid.shape], indexing="ij")
    window = np.clip(1 - np.maximum(np.maximum(abs(k), abs(j)), abs(i)) / 0.75, 0, None)
    waves = sum(np.cos(rng.uniform(1, 4) * a + rng.uniform(0, 6)) for a in (k, j, i, k + j, j - i))
    return (window * (2 + waves)).astype(np.float32)


def test_sampler_identity_returns_input(rng):
    grid = canonical_grid()
    x = torch.from_numpy(rng.normal(size=(2, 3, *grid.shape)).astype(np.float32))
    y = AffineGridSampler(grid)(x, identity_theta(2))
    assert torch.allclose(x, y, atol=1e-5)


@pytest.mark.parametrize("oblique", [False, True])
def test_sampler_matches_simpleitk_resampling(rng, oblique):
    grid = canonical_grid()
    if oblique:
        grid = Grid(grid.size, grid.spacing, [5.0, -3.0, 12.0], euler_rotation((20.0, -10.0, 30.0))[:3, :3])
    array = smooth_blob(grid, rng)
    m = translation((3.0, -4.0, 5.0)) @ euler_rotation((8.0, -5.0, 12.0), grid.center) @ scaling(1.07, grid.center)
    expected = resample(Volume.on_grid(array, grid), grid, output_to_input=m, interpolation="linear").array
    got = AffineGridSampler(grid)(torch.from_numpy(array)[None, None], matrix_to_theta(m[None]))[0, 0].numpy()
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_sampler_is_differentiable_in_image_and_theta(rng):
    grid = canonical_grid()
    x = torch.from_numpy(smooth_blob(grid, rng))[None, None].requires_grad_(True)
    theta = matrix_to_theta(make_affine(np.eye(3) * 1.02, [1.0, 0.5, -0.7])[None]).requires_grad_(True)
    AffineGridSampler(grid)(x, theta).pow(2).sum().backward()
    assert x.grad.abs().sum() > 0 and theta.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda t: AffineGridSampler(grid)(x.detach().double(), t).sum(),
                                    theta.detach().double().requires_grad_(True), atol=1e-4)


def test_sampling_grid_equals_torch_affine_grid(rng):
    theta = torch.from_numpy(np.eye(3, 4) + 0.2 * rng.normal(size=(2, 3, 4))).float()
    expected = torch.nn.functional.affine_grid(theta, [2, 1, 5, 6, 7], align_corners=True)
    assert torch.allclose(sampling_grid(theta, (5, 6, 7)), expected, atol=1e-6)


def test_sampler_rejects_wrong_shapes():
    sampler = AffineGridSampler(canonical_grid())
    with pytest.raises(InputError, match="canonical grid"):
        sampler(torch.zeros(1, 1, 4, 4, 4), identity_theta(1))
    with pytest.raises(InputError, match="θ must have shape"):
        sampler(torch.zeros(2, 1, 16, 12, 10), identity_theta(1))


def test_theta_helpers_round_trip():
    m = translation((1.0, 2.0, 3.0)) @ euler_rotation((10.0, 20.0, 30.0)) @ scaling(0.9)
    theta = matrix_to_theta(np.stack([m, np.eye(4)]), torch.float64)
    np.testing.assert_allclose(theta_to_matrix(theta)[0], m)
    np.testing.assert_allclose(theta_to_matrix(invert_theta(theta))[0], np.linalg.inv(m), atol=1e-12)
    np.testing.assert_allclose(theta_to_matrix(compose_theta(theta, invert_theta(theta))), np.eye(4)[None].repeat(2, 0),
                               atol=1e-12)


def test_sampler_translation_moves_content_by_physical_mm():
    grid = canonical_grid(size=(8, 8, 8), spacing=(2.0, 2.0, 2.0))
    x = torch.zeros(1, 1, *grid.shape)
    x[0, 0, 4, 4, 4] = 1.0  # (i, j, k) = (4, 4, 4)
    shifted = AffineGridSampler(grid)(x, matrix_to_theta(translation((2.0, 0.0, 0.0))[None]))
    # out(p) = x(p + 2 mm along x = i): the bright voxel appears one voxel lower in i
    assert shifted[0, 0, 4, 4, 3] == pytest.approx(1.0)


def test_locnet_is_identity_at_init(rng):
    net = LocNet({"in_channels": 2, **TINY_LOCNET})
    theta = net(torch.from_numpy(rng.random((3, 2, 16, 12, 10)).astype(np.float32)))
    assert torch.equal(theta, identity_theta(3))


def test_locnet_coordinate_channels_and_bad_input():
    net = LocNet({"in_channels": 1, **TINY_LOCNET, "coord_channels": False, "input_downsample": 2})
    assert net(torch.zeros(1, 1, 16, 12, 12)).shape == (1, 3, 4)
    with pytest.raises(InputError, match="LocNet expects"):
        net(torch.zeros(1, 2, 16, 12, 12))


def test_prototype_expands():
    proto = Prototype(2, (4, 3, 2), init=torch.ones(2, 4, 3, 2))
    assert proto.expand(3).shape == (3, 2, 4, 3, 2) and proto().requires_grad


def test_masked_mse_ignores_masked_voxels(rng):
    target = torch.from_numpy(rng.random((2, 2, 8, 8, 8)).astype(np.float32))
    pred = torch.from_numpy(rng.random((2, 2, 8, 8, 8)).astype(np.float32))
    visible = torch.from_numpy((rng.random((2, 1, 8, 8, 8)) > 0.5).astype(np.float32))
    changed = torch.where(visible.bool().expand_as(pred), pred, torch.full_like(pred, 1e6))
    assert masked_mse(pred, target, visible) == masked_mse(changed, target, visible)
    assert masked_mse(pred, target) == torch.mean((pred - target) ** 2)


def test_pca_full_rank_reconstructs_training_cases(rng):
    data = torch.from_numpy(rng.random((6, 2, 8, 4, 4)).astype(np.float32))
    pca = PCA({"shape": [8, 4, 4], "components": 5}).fit(6, lambda i: data[i])
    assert torch.allclose(pca.reconstruct(data), data, atol=1e-4)
    assert torch.allclose(pca.reconstruct(data, torch.ones(6, 1, 8, 4, 4)), data, atol=1e-3)


def test_pca_masked_encoding_uses_visible_voxels_only(rng):
    basis = torch.from_numpy(rng.normal(size=(3, 2 * 8 * 4 * 4)).astype(np.float32))
    codes = torch.from_numpy(rng.normal(size=(20, 3)).astype(np.float32))
    data = (codes @ basis).reshape(20, 2, 8, 4, 4)
    pca = PCA({"shape": [8, 4, 4], "components": 3}).fit(20, lambda i: data[i])
    visible = torch.ones(1, 1, 8, 4, 4)
    visible[..., :4, :, :] = 0
    corrupted = data[:1].clone()
    corrupted[:, :, :4] = 0.0  # the masked half is zeroed, as a fracture region is
    assert torch.allclose(pca.reconstruct(corrupted, visible), data[:1], atol=1e-3)
    _, parts = pca.loss(corrupted, data[:1], visible)
    assert parts["mse"] < 1e-6


def test_pooled_pca_reconstructs_smooth_cases_on_the_full_grid(rng):
    """A factor-2 PCA stores 8x fewer values but returns full-grid tensors; cases that vary linearly in
    space (smooth anatomy in the limit) come back exactly away from the grid's border layer, where trilinear
    upsampling cannot extrapolate, and its masked encoding still ignores hidden voxels."""
    k, j, i = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (8, 4, 4)), indexing="ij")
    coef = torch.from_numpy(rng.normal(size=(12, 2, 4)).astype(np.float32))
    data = (coef[..., 0, None, None, None] * k + coef[..., 1, None, None, None] * j
            + coef[..., 2, None, None, None] * i + coef[..., 3, None, None, None])
    pca = PCA({"shape": [8, 4, 4], "components": 8, "factor": 2}).fit(12, lambda n: data[n])
    assert pca.components.shape == (8, 2 * 4 * 2 * 2)
    rec = pca.reconstruct(data)
    assert rec.shape == data.shape
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
    assert torch.allclose(rec[inner], data[inner], atol=1e-3)
    visible = torch.ones(1, 1, 8, 4, 4)
    visible[..., :4, :, :] = 0
    corrupted = data[:1].clone()
    corrupted[:, :, :4] = 5.0
    assert torch.allclose(pca.reconstruct(corrupted, visible)[inner], data[:1][inner], atol=1e-2)
    with pytest.raises(InputError, match="divide"):
        PCA({"shape": [8, 4, 6], "components": 3, "factor": 4})


def test_pca_posterior_std_matches_the_gaussian_posterior_and_grows_when_voxels_are_hidden(rng):
    data = torch.from_numpy(0.2 + rng.random(size=(20, 2, 8, 4, 4)).astype(np.float32))  # all above BONE_LEVEL
    pca = PCA({"shape": [8, 4, 4], "components": 4}).fit(20, lambda i: data[i])
    visible = torch.ones(1, 1, 8, 4, 4)
    visible[..., :3, :, :] = 0
    x = data[:1]
    std = pca.reconstruction_std(x, visible)
    # the same posterior written out with numpy: s2 = residual variance on the visible voxels (all are "bone" here)
    w = pca.components.double().numpy()
    seen = visible.expand(1, 2, 8, 4, 4).reshape(-1).double().numpy()
    recon = pca.reconstruct(x, visible).double().numpy().reshape(-1)
    s2 = np.mean(((x.double().numpy().reshape(-1) - recon) ** 2)[seen > 0])
    cov = s2 * np.linalg.inv((w * seen) @ w.T + np.diag(s2 / pca.variances.double().numpy()))
    expected = np.sqrt(np.einsum("kd,kl,ld->d", w, cov, w))
    np.testing.assert_allclose(std.reshape(-1).numpy(), expected, rtol=1e-3, atol=1e-6)
    assert std.shape == x.shape
    # a shape mode that lives only in the hidden slab cannot be pinned down by the visible voxels
    basis = torch.zeros(2, 2, 8, 4, 4)
    basis[0, :, :3] = 1.0
    basis[1, :, 3:] = 1.0
    codes = torch.from_numpy(rng.normal(size=(20, 2)).astype(np.float32))
    shaped = 0.5 + torch.einsum("nk,kczyx->nczyx", codes, basis) + 0.01 * data
    model = PCA({"shape": [8, 4, 4], "components": 2}).fit(20, lambda i: shaped[i])
    spread = model.reconstruction_std(shaped[:1], visible)
    assert spread[:, :, :3].min() > 10 * spread[:, :, 3:].max()


def test_pca_needs_enough_cases():
    with pytest.raises(InputError, match="at least 5"):
        PCA({"shape": [2, 2, 2], "components": 4}).fit(3, lambda i: torch.zeros(2, 2, 2, 2))


@pytest.mark.parametrize("kind", ["vae", "vqvae"])
def test_network_autoencoders_shapes_gradients_and_determinism(rng, kind):
    cfg = {"type": kind, "channels": [4, 8]}
    cfg.update({"latent_channels": 2} if kind == "vae" else {"embedding_dim": 4, "codebook_size": 8})
    model = build_autoencoder(cfg)
    assert isinstance(model, VAE if kind == "vae" else VQVAE)
    x = torch.from_numpy(rng.random((2, 2, 16, 8, 8)).astype(np.float32))
    loss, parts = model.loss(x, x, torch.ones(2, 1, 16, 8, 8))
    loss.backward()
    assert "mse" in parts and all(p.grad is not None for p in model.encoder.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.reconstruct(x), model.reconstruct(x))
        assert model.reconstruct(x).shape == x.shape
    with pytest.raises(InputError, match="divisible by 4"):
        model.reconstruct(torch.zeros(1, 2, 10, 8, 8))


@pytest.mark.parametrize("kind", ["vae", "vqvae"])
def test_network_autoencoder_loss_ignores_masked_voxels(rng, kind):
    torch.manual_seed(0)
    cfg = {"type": kind, "channels": [4, 8]}
    model = build_autoencoder(cfg)
    x = torch.from_numpy(rng.random((1, 2, 16, 8, 8)).astype(np.float32))
    visible = torch.ones(1, 1, 16, 8, 8)
    visible[..., 4:10, :, :] = 0
    other = x.clone()
    other[:, :, 4:10] = 5.0
    torch.manual_seed(1)
    a, _ = model.loss(x, x, visible)
    torch.manual_seed(1)
    b, _ = model.loss(x, other, visible)
    assert torch.equal(a, b)


def test_unknown_autoencoder_type():
    with pytest.raises(InputError, match="Unknown autoencoder type"):
        build_autoencoder({"type": "gan"})


def test_locnet_block_is_monai_convolution_with_the_same_names():
    """The LocNet's plain-torch block (MONAI takes seconds to import) computes what MONAI's Convolution block
    computes with the same state dict, so bundles trained with MONAI's block load and predict unchanged."""
    from monai.networks.blocks import Convolution

    from TibiaReconstructionLib.models.locnet import conv_block

    torch.manual_seed(0)
    ours = conv_block(5, 8)
    theirs = Convolution(3, 5, 8, strides=2, kernel_size=3, norm="INSTANCE", act="LEAKYRELU")
    assert set(ours.state_dict()) == set(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 9, 10, 11)
    torch.testing.assert_close(ours(x), theirs(x))
