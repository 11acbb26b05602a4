"""Model bundles: save -> load gives identical outputs; broken bundles give clear BundleErrors."""

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from TibiaReconstructionLib.bundle import FORMAT, load_bundle, save_bundle
from TibiaReconstructionLib.errors import BundleError, OutputExistsError
from TibiaReconstructionLib.geometry import Grid
from TibiaReconstructionLib.models import PCA, VAE, LocNet, identity_theta

SIZE = np.array([8, 8, 16])  # (i, j, k)
GRID = Grid(tuple(SIZE), np.full(3, 8.0), -(SIZE - 1) / 2 * 8.0)
SHAPE = list(GRID.shape)


def tiny_models(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    locnet = LocNet({"channels": [4, 8], "input_downsample": 1, "pool_size": [2, 1, 1], "hidden": 16})
    torch.nn.init.normal_(locnet.head[-1].weight, std=0.01)  # leave the identity, so outputs depend on weights
    if kind == "vae":
        ae = VAE({"channels": [4, 8], "latent_channels": 2})
    else:
        data = torch.rand(6, 2, *SHAPE)
        ae = PCA({"shape": SHAPE, "components": 4}).fit(6, lambda i: data[i])
    return locnet, ae


@pytest.fixture(params=["vae", "pca"])
def bundle_dir(request, tmp_path):
    locnet, ae = tiny_models(request.param)
    folder = save_bundle(tmp_path / "bundle", grid=GRID, window_hu=(-200, 1800), locnet=locnet, autoencoder=ae,
                         prototype=torch.rand(1, 2, *SHAPE), training={"data": "tiny test"}, metrics={"rmse": 0.1})
    return folder, locnet, ae


def test_save_load_gives_identical_outputs(bundle_dir):
    folder, locnet, ae = bundle_dir
    bundle = load_bundle(folder)
    x = torch.rand(2, 2, *SHAPE)
    theta, aligned, recon = bundle.align_and_reconstruct(x)
    locnet.eval(), ae.eval()
    with torch.no_grad():
        expected_theta = locnet(x)
        assert torch.equal(theta, expected_theta)
        assert torch.equal(aligned, bundle.sampler(x, expected_theta))
        vis = (bundle.sampler(torch.ones(2, 1, *SHAPE), expected_theta) > 0.5).float()
        assert torch.equal(recon, ae.reconstruct(aligned, vis))
    assert bundle.grid.same_as(GRID) and bundle.window_hu == (-200.0, 1800.0)
    assert bundle.prototype.shape == (1, 2, *SHAPE) and not bundle.locnet.training
    assert bundle.config["side_convention"].startswith("left")


def test_float16_bundle_is_half_the_size_and_predicts_alike(bundle_dir, tmp_path):
    folder, locnet, ae = bundle_dir
    half = save_bundle(tmp_path / "half", grid=GRID, window_hu=(-200, 1800), locnet=locnet, autoencoder=ae,
                       prototype=load_bundle(folder).prototype, float16=True)
    weights = lambda f: (f / "weights.safetensors").stat().st_size  # noqa: E731
    assert weights(half) < 0.6 * weights(folder)
    assert json.loads((half / "config.json").read_text(encoding="utf-8"))["weights_dtype"] == "float16"
    full, small = load_bundle(folder), load_bundle(half)
    x = torch.rand(2, 2, *SHAPE)
    for a, b in zip(full.align_and_reconstruct(x), small.align_and_reconstruct(x)):
        assert b.dtype == torch.float32 and torch.allclose(a, b, atol=2e-2)


def test_to_input_frame_undoes_alignment():
    locnet, ae = tiny_models("vae")
    from TibiaReconstructionLib.bundle import Bundle
    bundle = Bundle({"window_hu": [-200, 1800], "channels": ["a", "b"]}, GRID, locnet, ae, None)
    x = torch.zeros(1, 2, *SHAPE)
    x[:, :, 6:10, 3:5, 3:5] = 1.0
    theta = identity_theta(1)
    theta[:, 0, 3] = 8.0
    back = bundle.to_input_frame(bundle.sampler(x, theta), theta)
    assert torch.allclose(back[..., 1:-1], x[..., 1:-1], atol=1e-5)


def test_existing_folder_is_not_overwritten(bundle_dir):
    folder, locnet, ae = bundle_dir
    with pytest.raises(OutputExistsError):
        save_bundle(folder, grid=GRID, window_hu=(-200, 1800), locnet=locnet, autoencoder=ae)
    save_bundle(folder, grid=GRID, window_hu=(-200, 1800), locnet=locnet, autoencoder=ae, overwrite=True)
    assert load_bundle(folder).prototype is None


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")


def test_missing_weight_key(bundle_dir):
    folder = bundle_dir[0]
    weights = load_file(folder / "weights.safetensors")
    del weights[next(k for k in weights if k.startswith("autoencoder."))]
    save_file(weights, folder / "weights.safetensors")
    with pytest.raises(BundleError, match="missing weights"):
        load_bundle(folder)


def test_wrong_shape(bundle_dir):
    folder = bundle_dir[0]
    weights = load_file(folder / "weights.safetensors")
    key = next(k for k in weights if k.startswith("locnet.") and weights[k].dim() > 1)
    weights[key] = torch.zeros(3, 3)
    save_file(weights, folder / "weights.safetensors")
    with pytest.raises(BundleError, match="wrong shapes"):
        load_bundle(folder)


def test_wrong_format_version(bundle_dir):
    folder = bundle_dir[0]
    _edit_config(folder, format="tibia-recon-bundle/99")
    with pytest.raises(BundleError, match=f"reads only '{FORMAT}'"):
        load_bundle(folder)


def test_missing_config_key(bundle_dir):
    folder = bundle_dir[0]
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    del config["grid"]
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(BundleError, match="lacks \\['grid'\\]"):
        load_bundle(folder)


def test_grid_disagreeing_with_pca_shape(tmp_path):
    locnet, ae = tiny_models("pca")
    folder = save_bundle(tmp_path / "b", grid=GRID, window_hu=(-200, 1800), locnet=locnet, autoencoder=ae)
    _edit_config(folder, grid=Grid((8, 8, 8), np.full(3, 8.0), np.zeros(3)).to_dict())
    with pytest.raises(BundleError, match="canonical grid"):
        load_bundle(folder)


@pytest.mark.parametrize("name", ["model.pt", "extra.json.bak"])
def test_pickle_file_is_refused(bundle_dir, name):
    folder = bundle_dir[0]
    (folder / name).write_bytes(pickle.dumps({"evil": 1}))
    with pytest.raises(BundleError, match="looks like a pickle"):
        load_bundle(folder)


def test_corrupt_weights_and_missing_folder(bundle_dir, tmp_path):
    folder = bundle_dir[0]
    (folder / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="not a readable safetensors"):
        load_bundle(folder)
    with pytest.raises(BundleError, match="No model bundle"):
        load_bundle(tmp_path / "nowhere")


def test_unknown_autoencoder_type(bundle_dir):
    folder = bundle_dir[0]
    _edit_config(folder, autoencoder={"type": "gan"})
    with pytest.raises(BundleError, match="cannot build"):
        load_bundle(folder)
