"""Canonical data sets on disk, and the three training steps on tiny synthetic data."""

import json

import numpy as np
import pytest
import torch

from TibiaReconstructionLib.canonical import CanonicalDataset, write_canonical_dataset
from TibiaReconstructionLib.errors import InputError, OutputExistsError
from TibiaReconstructionLib.geometry import Grid

SIZE = np.array([8, 8, 16])
GRID = Grid(tuple(SIZE), np.full(3, 8.0), -(SIZE - 1) / 2 * 8.0)


def _cases(n):
    return [{"id": f"case{i}", "side": "left", "patient_to_canonical": np.eye(4)} for i in range(n)]


def test_canonical_dataset_round_trip(tmp_path, rng):
    images = rng.random((3, 2, *GRID.shape)).astype(np.float32)
    inputs = images * 0.5
    visible = (rng.random((3, 1, *GRID.shape)) > 0.3).astype(np.uint8)
    folder = write_canonical_dataset(tmp_path / "set", GRID, (-200, 1800), _cases(3), images, inputs, visible,
                                     extra={"note": "test"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temporary folder left behind
    for in_memory in (True, False):
        ds = CanonicalDataset(folder, in_memory=in_memory)
        assert len(ds) == 3 and ds.fractured and ds.grid.same_as(GRID) and ds.window_hu == (-200.0, 1800.0)
        item = ds[2]
        np.testing.assert_allclose(item["image"].numpy(), images[2], atol=1e-3)
        np.testing.assert_allclose(item["input"].numpy(), inputs[2], atol=1e-3)
        assert torch.equal(item["visible"], torch.from_numpy(visible[2]).float())
        assert ds.cases[1]["id"] == "case1" and ds.manifest["note"] == "test"


def test_canonical_dataset_refuses_overwrite_and_bad_input(tmp_path, rng):
    images = rng.random((2, 2, *GRID.shape)).astype(np.float32)
    folder = write_canonical_dataset(tmp_path / "set", GRID, (-200, 1800), _cases(2), images)
    with pytest.raises(OutputExistsError):
        write_canonical_dataset(folder, GRID, (-200, 1800), _cases(2), images)
    write_canonical_dataset(folder, GRID, (-200, 1800), _cases(2), images * 0, overwrite=True)
    assert CanonicalDataset(folder)[0]["image"].abs().max() == 0
    with pytest.raises(InputError, match="expected F16 \\[3, 2, 16, 8, 8\\]"):
        write_canonical_dataset(tmp_path / "b", GRID, (-200, 1800), _cases(3), images)
    with pytest.raises(InputError, match="both 'inputs' and 'visible'"):
        write_canonical_dataset(tmp_path / "c", GRID, (-200, 1800), _cases(2), images, inputs=images)
    with pytest.raises(InputError, match="lacks \\['patient_to_canonical'\\]"):
        write_canonical_dataset(tmp_path / "d", GRID, (-200, 1800), [{"id": "a", "side": "left"}] * 2, images)


def test_canonical_dataset_rejects_wrong_format(tmp_path, rng):
    folder = write_canonical_dataset(tmp_path / "set", GRID, (-200, 1800), _cases(1),
                                     rng.random((1, 2, *GRID.shape)))
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    manifest["format"] = "something/2"
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(InputError, match="not a canonical data set of format"):
        CanonicalDataset(folder)
    with pytest.raises(InputError, match="needs manifest.json"):
        CanonicalDataset(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------
# Toy data: shifted and rotated copies of one asymmetric ellipsoid "bone" on a 16x16x32 grid at 4 mm

import shutil  # noqa: E402

from safetensors.torch import load_file  # noqa: E402

from TibiaReconstructionLib.bundle import load_bundle  # noqa: E402
import argparse  # noqa: E402

from TibiaReconstructionLib.training.cli import register_cli  # noqa: E402
from TibiaReconstructionLib.geometry import euler_rotation, translation  # noqa: E402
from TibiaReconstructionLib.training import runner  # noqa: E402
from TibiaReconstructionLib.training.config import load_config  # noqa: E402
from TibiaReconstructionLib.training.losses import ssim  # noqa: E402
from TibiaReconstructionLib.training.masking import block_visibility, random_thetas  # noqa: E402
from TibiaReconstructionLib.training.step1_registration import train_step1  # noqa: E402

from TibiaReconstructionLib.training.cli import CONFIG_DIR  # noqa: E402

TINY = CONFIG_DIR / "tiny"
TOY_SIZE = np.array([16, 16, 32])
TOY_GRID = Grid(tuple(TOY_SIZE), np.full(3, 4.0), -(TOY_SIZE - 1) / 2 * 4.0)


def toy_cases(n: int, seed: int = 0, fractured: bool = False):
    """(images, inputs, visible, poses): copies of one bone moved by pose_i = T(shift_i) R(angles_i)."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.arange(s) for s in TOY_GRID.shape], indexing="ij")
    p = TOY_GRID.index_to_physical(np.stack([i, j, k], -1).astype(float))
    images, poses = [], []
    for _ in range(n):
        pose = translation(rng.uniform(-8, 8, 3)) @ euler_rotation(rng.uniform(-8, 8, 3))
        inv = np.linalg.inv(pose)
        q = p @ inv[:3, :3].T + inv[:3, 3]
        shaft = (q[..., 0] / 12) ** 2 + (q[..., 1] / 10) ** 2 + (q[..., 2] / 45) ** 2
        bulb = ((q[..., 0] - 6) / 14) ** 2 + (q[..., 1] / 12) ** 2 + ((q[..., 2] - 40) / 10) ** 2
        occ = np.clip((1 - np.minimum(shaft, bulb)) * 4, 0, 1)
        images.append(np.stack([occ * (0.5 + 0.3 * np.cos(q[..., 2] / 10)), occ]))
        poses.append(pose)
    images = np.array(images, dtype=np.float32)
    if not fractured:
        return images, None, None, np.array(poses)
    visible = np.ones((n, 1, *TOY_GRID.shape), np.uint8)
    for c in range(n):
        z0 = rng.integers(8, 20)
        visible[c, 0, z0:z0 + 5] = 0
    return images, images * visible, visible, np.array(poses)


@pytest.fixture(scope="module")
def toy_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy") / "canonical"
    images, inputs, visible, poses = toy_cases(8, fractured=True)
    write_canonical_dataset(folder, TOY_GRID, (-200, 1800), _cases(8), images, inputs, visible)
    return folder, poses


def _residual_translation_spread(aligned_folder, poses) -> np.ndarray:
    """Spread over cases of pose_i⁻¹ θ_i's translation: 0 when all cases land on one common frame."""
    thetas = [np.vstack([np.array(c["theta"]), [0, 0, 0, 1]]) for c in CanonicalDataset(aligned_folder).cases]
    residual = np.array([np.linalg.inv(p) @ t for p, t in zip(poses, thetas)])
    return residual[:, :3, 3].std(0)


def main(argv: list[str]) -> int:
    """The `tibia-recon` train/export-bundle commands alone (independent of the other commands' modules)."""
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def _step1_config(data, out, **changes):
    config = load_config("step1", TINY / "step1.json", {"data": str(data), "out": str(out)})
    config.update(changes)
    return config


def test_step1_stn_recovers_relative_shifts(toy_set, tmp_path):
    folder, poses = toy_set
    assert train_step1(_step1_config(folder, tmp_path / "s1"))
    spread = _residual_translation_spread(tmp_path / "s1" / "aligned", poses)
    shift_spread = poses[:, :3, 3].std(0)
    assert np.all(spread < 1.6) and np.all(spread < 0.4 * shift_spread), (spread, shift_spread)
    aligned = CanonicalDataset(tmp_path / "s1" / "aligned")
    assert aligned.fractured and aligned.manifest["aligned_by"]["mode"] == "stn"
    assert (tmp_path / "s1" / "curves.png").stat().st_size > 0
    weights = load_file(tmp_path / "s1" / "model.safetensors")
    assert weights["prototype"].shape == (1, 2, *TOY_GRID.shape) and any(k.startswith("locnet.") for k in weights)


def test_step1_direct_ags_recovers_relative_shifts(toy_set, tmp_path):
    folder, poses = toy_set
    assert train_step1(_step1_config(folder, tmp_path / "d1", mode="direct", epochs=5))
    spread = _residual_translation_spread(tmp_path / "d1" / "aligned", poses)
    assert np.all(spread < 1.0), spread
    assert not any(k.startswith("locnet.") for k in load_file(tmp_path / "d1" / "model.safetensors"))


def test_resume_after_interruption_gives_identical_weights(toy_set, tmp_path, monkeypatch):
    folder, _ = toy_set
    config = {"epochs": 6, "checkpoint_every": 3}
    assert train_step1(_step1_config(folder, tmp_path / "full", **config))

    original = runner.TrainRun._one_step

    def crash_at_step_5(self, *args):
        if self.step == 4:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(runner.TrainRun, "_one_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_step1(_step1_config(folder, tmp_path / "part", **config))
    monkeypatch.setattr(runner.TrainRun, "_one_step", original)
    with pytest.raises(OutputExistsError, match="--resume"):
        train_step1(_step1_config(folder, tmp_path / "part", **config))
    with pytest.raises(InputError, match="another configuration"):
        train_step1(_step1_config(folder, tmp_path / "part", **config, lr=0.5), resume=True)
    assert train_step1(_step1_config(folder, tmp_path / "part", **config), resume=True)

    full, part = (load_file(tmp_path / name / "model.safetensors") for name in ("full", "part"))
    assert full.keys() == part.keys() and all(torch.equal(full[k], part[k]) for k in full)
    steps = [line.split(",")[0] for line in (tmp_path / "part" / "log.csv").read_text(encoding="utf-8").splitlines()[1:]]
    assert steps == [str(s) for s in range(1, 7)]


def test_cli_pipeline_steps_resume_and_export(toy_set, tmp_path, capsys):
    folder, _ = toy_set
    s1, s2, s3 = tmp_path / "s1", tmp_path / "s2", tmp_path / "s3"
    # step 1 stopped early and resumed; steps 2 and 3 on its aligned (fractured) set
    assert main(["train", "step1", "--config", str(TINY / "step1.json"), "--data", str(folder), "--out", str(s1),
                 "--max-steps", "3"]) == 0
    assert "stopped at --max-steps" in capsys.readouterr().out and not (s1 / "aligned").exists()
    cfg = tmp_path / "s1.json"
    cfg.write_text(json.dumps({**json.loads((TINY / "step1.json").read_text(encoding="utf-8")), "epochs": 3}))
    shutil.rmtree(s1)
    assert main(["train", "step1", "--config", str(cfg), "--data", str(folder), "--out", str(s1)]) == 0
    assert main(["train", "step2", "--config", str(TINY / "step2.json"), "--data", str(s1 / "aligned"),
                 "--out", str(s2), "--max-steps", "2"]) == 0
    assert main(["train", "step2", "--config", str(TINY / "step2.json"), "--data", str(s1 / "aligned"),
                 "--out", str(s2), "--resume"]) == 0
    images = CanonicalDataset(s1 / "aligned").tensor("images").float()
    zero_mse = images.pow(2).mean().item()  # the MSE of predicting an empty volume
    for name in ("pca4", "vae", "vqvae"):
        assert json.loads((s2 / name / "model.json").read_text(encoding="utf-8"))["metrics"]["train_mse"] < zero_mse
    assert main(["train", "step3", "--config", str(TINY / "step3.json"), "--data", str(s1 / "aligned"),
                 "--step1", str(s1), "--out", str(s3)]) == 0
    locnet_meta = json.loads((s3 / "locnet" / "model.json").read_text(encoding="utf-8"))
    assert "train_translation_error_mm" in locnet_meta["metrics"]
    vae_meta = json.loads((s3 / "vae" / "model.json").read_text(encoding="utf-8"))
    assert {"train_mse", "train_mse_visible", "train_mse_hidden"} <= set(vae_meta["metrics"])
    assert main(["export-bundle", "--step1", str(s1), "--step3", str(s3), "--ae", "vae", "--out",
                 str(tmp_path / "bundle")]) == 0
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.config["autoencoder"]["type"] == "vae" and bundle.config["training"]["data"]["cases"] == 8
    theta, aligned, recon = bundle.align_and_reconstruct(CanonicalDataset(folder)[0]["input"][None])
    assert theta.shape == (1, 3, 4) and aligned.shape == recon.shape == (1, 2, *TOY_GRID.shape)
    with pytest.raises(InputError, match="trained ones there: \\['pca4', 'vae'\\]"):
        main(["export-bundle", "--step1", str(s1), "--step3", str(s3), "--ae", "gan", "--out", str(tmp_path / "b")])
    # the step-1 LocNet can be exported as the query model instead of the mask-robust one
    assert main(["export-bundle", "--step1", str(s1), "--step3", str(s3), "--ae", "pca4", "--locnet", "step1",
                 "--out", str(tmp_path / "bundle1")]) == 0
    b1, step1_weights = load_bundle(tmp_path / "bundle1"), load_file(str(s1 / "model.safetensors"))
    assert b1.config["training"]["locnet"]["source"] == "step1"
    assert all(torch.equal(v, step1_weights[f"locnet.{k}"]) for k, v in b1.locnet.state_dict().items())
    # a LocNet continued from the trained one (at learning rate 0) keeps its weights exactly
    more = tmp_path / "more.json"
    tiny3 = json.loads((TINY / "step3.json").read_text(encoding="utf-8"))
    more.write_text(json.dumps({**tiny3, "autoencoders": {}, "locnet": {**tiny3["locnet"], "epochs": 1, "lr": 0.0,
                                                                       "init": str(s3 / "locnet")}}))
    assert main(["train", "step3", "--config", str(more), "--data", str(s1 / "aligned"), "--step1", str(s1),
                 "--out", str(tmp_path / "s3b")]) == 0
    before, after = (load_file(str(f / "locnet" / "model.safetensors")) for f in (s3, tmp_path / "s3b"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    more.write_text(json.dumps({**tiny3, "locnet": {**tiny3["locnet"], "init": str(s3 / "vae")}}))
    with pytest.raises(InputError, match="not a LocNet"):
        main(["train", "step3", "--config", str(more), "--data", str(s1 / "aligned"), "--step1", str(s1),
              "--out", str(tmp_path / "s3c")])


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"step": "step1", "epochz": 3}), encoding="utf-8")
    with pytest.raises(InputError, match="Unknown setting 'epochz'"):
        load_config("step1", bad, {"data": "d", "out": "o"})
    with pytest.raises(InputError, match="another step"):
        load_config("step2", TINY / "step1.json", {"data": "d", "out": "o"})
    with pytest.raises(InputError, match="needs 'step1'"):
        load_config("step3", TINY / "step3.json", {"data": "d", "out": "o"})
    bad.write_text(json.dumps({"step": "step2", "models": {"x": {"type": "vae", "archh": {}}}}), encoding="utf-8")
    with pytest.raises(InputError, match="models.x."):
        load_config("step2", bad, {"data": "d", "out": "o"})
    for step in ("step1", "step2", "step3"):  # the shipped default configurations are valid
        load_config(step, CONFIG_DIR / f"{step}.json")


def test_block_masks_and_random_affines():
    rng = np.random.default_rng(0)
    occupancy = torch.zeros(3, 1, 40, 30, 30)
    occupancy[:, :, 10:30, 10:20, 10:20] = 1.0
    visible = block_visibility(occupancy, rng, (1, 3), (10, 20), "bone")
    hidden = 1 - visible
    assert visible.shape == occupancy.shape and torch.all(hidden.sum((1, 2, 3, 4)) >= 5 ** 3)
    assert torch.all((hidden * occupancy).sum((1, 2, 3, 4)) > 0)  # boxes sit on the bone
    thetas = random_thetas(rng, 50, 15.0, 25.0, (0.9, 1.1)).numpy()
    scales = np.cbrt(np.linalg.det(thetas[:, :, :3]))
    assert np.all((scales > 0.9 - 1e-9) & (scales < 1.1 + 1e-9)) and np.abs(thetas[:, :, 3]).max() <= 25.0


def test_ssim_matches_monai(rng):
    from monai.metrics import SSIMMetric

    x = torch.from_numpy(rng.random((2, 2, 20, 18, 16)).astype(np.float32))
    y = (x + 0.3 * torch.from_numpy(rng.random(x.shape).astype(np.float32))).clamp(0, 1)
    expected = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=7, kernel_sigma=1.5)(x, y)
    assert torch.allclose(ssim(x, y).mean(1), expected.flatten(), atol=1e-5)


def test_vqvae_commitment_weight_steps_from_half_to_one():
    from TibiaReconstructionLib.training.autoencoders import commitment_weight

    spec = {"commitment": [0.5, 1.0], "commitment_warmup_epochs": 50}
    weights = [commitment_weight(spec, e) for e in (0, 25, 50, 80)]
    assert weights == [0.5, 0.75, 1.0, 1.0]
