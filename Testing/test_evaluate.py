"""`tibia-recon evaluate`: the paper's Table 1 from tiny trained runs (steps 1-3 with the tiny configs)."""

import argparse
import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from TibiaReconstructionLib.canonical import CanonicalDataset, write_canonical_dataset
from TibiaReconstructionLib.errors import InputError, OutputExistsError
from TibiaReconstructionLib.evaluate import PAPER_TABLE1, format_mean_ci, register_cli
from TibiaReconstructionLib.metrics import TABLE1_KEYS, mean_ci, table1_row
from TibiaReconstructionLib.models import AffineGridSampler, build_locnet
from TibiaReconstructionLib.training.config import load_config
from TibiaReconstructionLib.training.step1_registration import train_step1
from TibiaReconstructionLib.training.step2_autoencoders import train_step2
from TibiaReconstructionLib.training.step3_mask_robust import train_step3
from test_training import TINY, TOY_GRID, toy_cases

N_VAL = 5


def _cases(prefix, n):
    return [{"id": f"{prefix}{i}", "side": "left", "patient_to_canonical": np.eye(4)} for i in range(n)]


def _config(step, path, overrides, **changes):
    config = load_config(step, path, overrides)
    config.update(changes)
    return config


def _short(models: dict) -> dict:
    """The tiny configuration's models, trained for one epoch."""
    return {name: {**spec, "epochs": 1} if "epochs" in spec else spec for name, spec in models.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny trained run: steps 1 (STN and direct), 2 and 3 on 8 toy cases, held-out sets of 5 cases,
    and 'w/o registration' models: a full-rank PCA fitted on the unaligned held-out set itself."""
    root = tmp_path_factory.mktemp("evaluate")
    images, inputs, visible, _ = toy_cases(8, seed=0, fractured=True)
    write_canonical_dataset(root / "train", TOY_GRID, (-200, 1800), _cases("train", 8), images, inputs, visible)
    images, inputs, visible, _ = toy_cases(N_VAL, seed=1, fractured=True)
    write_canonical_dataset(root / "val", TOY_GRID, (-200, 1800), _cases("val", N_VAL), images, inputs, visible)
    write_canonical_dataset(root / "val_healthy", TOY_GRID, (-200, 1800), _cases("val", N_VAL), images)
    paths = {"train": root / "train", "val": root / "val", "val_healthy": root / "val_healthy"}
    for name in ("s1", "d1", "s2", "s3", "raw"):
        paths[name] = root / name
    assert train_step1(_config("step1", TINY / "step1.json", {"data": str(root / "train"), "out": str(paths["s1"])},
                               epochs=10))
    assert train_step1(_config("step1", TINY / "step1.json", {"data": str(root / "train"), "out": str(paths["d1"])},
                               mode="direct", epochs=2))
    aligned = str(paths["s1"] / "aligned")
    s2 = _config("step2", TINY / "step2.json", {"data": aligned, "out": str(paths["s2"])})
    assert train_step2({**s2, "models": _short(s2["models"])})
    s3 = _config("step3", TINY / "step3.json", {"data": aligned, "out": str(paths["s3"]), "step1": str(paths["s1"])})
    s3["locnet"]["epochs"] = 1
    assert train_step3({**s3, "autoencoders": _short(s3["autoencoders"])})
    raw = _config("step2", TINY / "step2.json", {"data": str(root / "val"), "out": str(paths["raw"])})
    assert train_step2({**raw, "models": {"pca_full": {"type": "pca", "components": N_VAL - 1}}})
    return paths


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args) or 0


def _read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _select(rows, registration, autoencoder):
    return sorted((r for r in rows if r["registration"] == registration and r["autoencoder"] == autoencoder),
                  key=lambda r: int(r["case_index"]))


@pytest.fixture(scope="module")
def unmasked(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("table") / "report"
    assert main(["evaluate", "--data", str(runs["val"]), "--step1", str(runs["s1"]), "--step2", str(runs["s2"]),
                 "--step3", str(runs["s3"]), "--raw-step2", str(runs["raw"]), "--direct", str(runs["d1"]),
                 "--direct-steps", "5", "--out", str(out), "--device", "cpu"]) == 0
    return out


def test_writes_files_and_skips_missing_rows(runs, unmasked):
    md = (unmasked / "table1.md").read_text(encoding="utf-8")
    rows = _read_csv(unmasked / "table1.csv")
    assert (unmasked / "table1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the evaluated rows: one CSV row per case and table row
    evaluated = {(r["registration"], r["autoencoder"]) for r in rows}
    assert evaluated == {("w/o registration", "PCA4"), ("Direct AGS registration", "P"),
                         ("STN registration", "P"), ("STN registration", "PCA4"), ("STN registration", "VAE"),
                         ("STN registration", "VQ-VAE"), ("Mask-robust STN registration", "P"),
                         ("Mask-robust STN registration", "PCA4"), ("Mask-robust STN registration", "VAE")}
    assert len(rows) == N_VAL * len(evaluated) and {r["input"] for r in rows} == {"healthy"}
    assert set(TABLE1_KEYS) <= set(rows[0])
    for r in rows:  # a metric that cannot be computed (e.g. an empty surface) is NaN and named, never made up
        missing = [k for k in TABLE1_KEYS if np.isnan(float(r[k]))]
        assert (r["status"] == "ok") == (not missing)
        assert all(f"{k}:" in r["status"] for k in missing)
    # skipped rows are listed with the reason, never filled in
    skipped = md.split("## Rows not evaluated")[1].split("##")[0]
    assert "| w/o registration | P | not defined: there is no prototype without registration" in skipped
    assert f"| STN registration | PCA32 | no trained PCA with 32 components in {runs['s2']} |" in skipped
    assert f"| Mask-robust STN registration | VQ-VAE | no trained VQ-VAE model in {runs['s3']} |" in skipped
    assert "| Direct AGS registration | PCA32, PCA16, VAE, VQ-VAE | no --direct-step2 given" in skipped
    table = md.split("## Table 1")[1].split("## Rows not evaluated")[0]
    assert "PCA32" not in table and "PCA16" not in table
    # header: command, version, machine, date; the paper's numbers next to ours
    assert "tibia-recon evaluate --data" in md and "TibiaReconstructionLib 0.1.0" in md and "- Machine:" in md
    assert "*0.363 ± 0.005*" in table and "*51.2 ± 0.2*" in table  # paper: STN P D-SSIM15, STN VQ-VAE PSNR
    assert "case ids of the step-1 training set" not in md  # held-out ids


def test_prototype_row_matches_independent_metrics(runs, unmasked):
    rows = _select(_read_csv(unmasked / "table1.csv"), "STN registration", "P")
    weights = load_file(runs["s1"] / "model.safetensors")
    meta = json.loads((runs["s1"] / "model.json").read_text(encoding="utf-8"))
    locnet = build_locnet(meta["locnet"])
    locnet.load_state_dict({k[7:]: v for k, v in weights.items() if k.startswith("locnet.")})
    data = CanonicalDataset(runs["val"])
    images = data.tensor("images").float()
    with torch.no_grad():
        targets = AffineGridSampler(data.grid)(images, locnet.eval()(images))
    assert len(rows) == N_VAL
    for row, target in zip(rows, targets):
        expected = table1_row(weights["prototype"][0], target, data.grid.spacing)
        for key in TABLE1_KEYS:
            assert float(row[key]) == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    # the table's cells are mean ± 95% CI of those values (D-SSIM shown x 1e-2)
    md = (unmasked / "table1.md").read_text(encoding="utf-8")
    cells = next(line for line in md.splitlines() if line.startswith("| **STN registration** | P |")).split(" | ")
    assert cells[3] == format_mean_ci(*mean_ci([float(r["dssim15"]) for r in rows]), 100.0)
    assert cells[9] == format_mean_ci(*mean_ci([float(r["rmsd"]) for r in rows]))


def test_identity_registration_full_rank_pca_is_near_perfect_on_its_training_cases(unmasked):
    rows = _select(_read_csv(unmasked / "table1.csv"), "w/o registration", "PCA4")
    assert len(rows) == N_VAL
    for r in rows:
        assert r["status"] == "ok" and float(r["theta_translation_mm"]) == 0.0
        assert all(float(r[f"dssim{w}"]) < 1e-5 for w in (15, 11, 7, 3))
        assert float(r["psnr"]) > 60 and float(r["rmse"]) < 1e-3
        assert float(r["rmsd"]) < 0.05 and float(r["dice"]) > 0.99 and float(r["hd95"]) == 0.0


def test_masked_uses_fractured_inputs_or_fixed_block_masks(runs, tmp_path):
    base = ["--step1", str(runs["s1"]), "--step2", str(runs["s2"]), "--step3", str(runs["s3"]), "--masked",
            "--device", "cpu"]
    assert main(["evaluate", "--data", str(runs["val"]), "--out", str(tmp_path / "frac"), *base]) == 0
    rows = _read_csv(tmp_path / "frac" / "table1.csv")
    assert {r["registration"] for r in rows} == {"Mask-robust STN registration"}
    assert {r["input"] for r in rows} == {"fractured"} and len(rows) == 3 * N_VAL
    visible = CanonicalDataset(runs["val"]).tensor("visible").float()
    bone = CanonicalDataset(runs["val"]).tensor("images")[:, 1:2].float() > 0.5
    hidden = ((bone & (visible < 0.5)).sum((1, 2, 3, 4)) / bone.sum((1, 2, 3, 4))).numpy()
    np.testing.assert_allclose([float(r["hidden_bone_fraction"]) for r in _select(rows, rows[0]["registration"], "P")],
                               hidden, atol=1e-4)
    md = (tmp_path / "frac" / "table1.md").read_text(encoding="utf-8")
    assert "| STN registration | P, PCA32, PCA16, VAE, VQ-VAE | not applicable to masked inputs" in md
    assert "## Table 1 (masked inputs" in md

    for name in ("blocks1", "blocks2"):  # no fractured inputs: block masks, the same in every run
        assert main(["evaluate", "--data", str(runs["val_healthy"]), "--out", str(tmp_path / name), *base]) == 0
    first, second = (_read_csv(tmp_path / n / "table1.csv") for n in ("blocks1", "blocks2"))
    assert {r["input"] for r in first} == {"block-masked"}
    assert all(float(r["hidden_bone_fraction"]) > 0 for r in first)
    assert [r["dssim7"] for r in first] == [r["dssim7"] for r in second]


def test_refusals(runs, unmasked, tmp_path, capsys):
    with pytest.raises(OutputExistsError, match="--overwrite"):
        main(["evaluate", "--data", str(runs["val"]), "--step1", str(runs["s1"]), "--out", str(unmasked)])
    with pytest.raises(InputError, match="'direct' mode.*pass this one as --direct"):
        main(["evaluate", "--data", str(runs["val"]), "--step1", str(runs["d1"]), "--out", str(tmp_path / "a")])
    with pytest.raises(InputError, match="'stn' mode.*pass this one as --step1"):
        main(["evaluate", "--data", str(runs["val"]), "--step1", str(runs["s1"]), "--direct", str(runs["s1"]),
              "--out", str(tmp_path / "b")])
    with pytest.raises(InputError, match="No row of Table 1 can be evaluated"):
        main(["evaluate", "--data", str(runs["val"]), "--step1", str(runs["s1"]), "--masked",
              "--out", str(tmp_path / "c")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_registered_in_the_command_and_number_format():
    from TibiaReconstructionLib.cli import build_parser

    args = build_parser().parse_args(["evaluate", "--data", "d", "--step1", "s", "--out", "o", "--masked"])
    assert args.masked and args.step2 is None and callable(args.func)
    assert format_mean_ci(0.016634, 0.000812, 100) == "1.663 ± 0.081"
    assert format_mean_ci(32.04, 0.43) == "32.04 ± 0.43" and format_mean_ci(float("inf"), float("nan")) == "inf"
    assert all(len(v) == 7 for block in PAPER_TABLE1.values() for v in block.values() if v is not None)
