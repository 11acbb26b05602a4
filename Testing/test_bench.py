"""Smoke tests of `tibia-recon bench` with the tiny bundle, coarse phantoms and one small CT size."""

import csv
import math

import numpy as np
import pytest

from TibiaReconstructionLib import metrics
from TibiaReconstructionLib.bench import (ACCURACY_FILES, METHODS, PREDICT_STAGES, TRAINING_STEPS,
                                          _measure_training, cut_field_of_view, masked_bin, parse_size, score)
from TibiaReconstructionLib.cli import main
from TibiaReconstructionLib.errors import InputError
from TibiaReconstructionLib.phantoms.generator import PhantomCase
from synthetic import bone_case
from tiny_bundle import make_tiny_bundle

PNG = b"\x89PNG"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return str(make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "bundle"))


@pytest.fixture(scope="module")
def accuracy(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    rc = main(["bench", "accuracy", "--bundle", bundle, "--n", "2", "--spacing", "3", "3", "3", "--device", "cpu",
               "--out", str(out)])
    return rc, out


def test_accuracy_writes_report_csv_and_figures(accuracy):
    rc, out = accuracy
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(ACCURACY_FILES.values())
    for name in ("accuracy_boxplots.png", "accuracy_worst_case.png"):
        assert (out / name).read_bytes()[:4] == PNG
    md = (out / "accuracy.md").read_text(encoding="utf-8")
    for part in ("tibia-recon bench accuracy --bundle", "--n 2 --seed 500000", "## By fracture type",
                 "## By fraction of the tibia masked", "Machine:", "TibiaReconstructionLib 0.1.0", "± "):
        assert part in md


def test_accuracy_csv_has_one_plausible_row_per_case_and_method(accuracy):
    rows = read_csv(accuracy[1] / "accuracy.csv")
    assert len(rows) == 2 * len(METHODS)
    assert {"seed", "fracture_type", "side", "masked_fraction", "masked_bin", "method", "status", "predicted_side",
            "dice", "rmsd_mm", "hd95_mm", "msd_mm"} <= set(rows[0])
    assert {r["seed"] for r in rows} == {"500000", "500001"}
    assert {r["method"] for r in rows} == {f"bundle: {m}" for k, m in METHODS.items() if k != "contralateral"} | {
        METHODS["contralateral"]}
    for r in rows:
        assert r["status"] == "ok"
        assert 0.0 <= float(r["dice"]) <= 1.0
        assert 0.0 <= float(r["msd_mm"]) <= float(r["rmsd_mm"]) < 500.0
        assert math.isfinite(float(r["hd95_mm"])) and 0.0 < float(r["masked_fraction"]) <= 0.6


def test_accuracy_refuses_to_overwrite_its_report(accuracy, bundle, capsys):
    rc = main(["bench", "accuracy", "--bundle", bundle, "--n", "1", "--out", str(accuracy[1])])
    assert rc == 1
    assert "already exist" in capsys.readouterr().err


def test_accuracy_on_a_fracture_type_asked_for(bundle, tmp_path):
    """--fracture-type gives every case that fracture (here one the models never learned from), and says so."""
    rc = main(["bench", "accuracy", "--bundle", bundle, "--n", "1", "--spacing", "3", "3", "3", "--methods", "model",
               "--fracture-type", "pilon", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    assert {r["fracture_type"] for r in read_csv(tmp_path / "accuracy.csv")} == {"pilon"}
    md = (tmp_path / "accuracy.md").read_text(encoding="utf-8")
    assert "--fracture-type pilon" in md and "every fracture a pilon one" in md and "never learned from" in md


def test_speed_writes_stage_timings_and_memory(bundle, tmp_path):
    rc = main(["bench", "speed", "--bundle", bundle, "--sizes", "48x48x96", "--threads", "1", "--spacing", "3", "3",
               "3", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speed.csv", "speed.md", "speed.png"]
    (row,) = read_csv(tmp_path / "speed.csv")
    assert row["size"] == "48x48x96" and row["threads"] == "1" and row["device"] == "cpu"
    stages = [float(row[f"{s}_s"]) for s in PREDICT_STAGES]
    assert all(0.0 <= t < 120.0 for t in stages)
    assert float(row["total_s"]) == pytest.approx(sum(stages), abs=1e-3)
    # start (launch to the command's code) and the command (launch to exit) are timed in separate processes: on a
    # tiny CT the two are alike and either may be the larger
    assert 0.0 < float(row["start_s"]) < 120.0 and 0.0 < float(row["command_s"]) < 120.0
    assert 100.0 < float(row["rss_after_imports_mib"]) <= float(row["peak_rss_mib"])
    assert (tmp_path / "speed.png").read_bytes()[:4] == PNG
    md = (tmp_path / "speed.md").read_text(encoding="utf-8")
    assert "| 48x48x96 |" in md and "tibia-recon bench speed --bundle" in md


@pytest.mark.parametrize("step", list(TRAINING_STEPS))
def test_training_throughput_of_one_step(bundle, step):
    result = _measure_training({"step": step, "bundle": bundle, "device": "cpu", "steps": 1, "batch": 2})
    assert result["grid"] == "24x24x56"
    assert result["s_per_step"] > 0 and result["cases_per_s"] == pytest.approx(2 / result["s_per_step"], rel=0.01)


def test_score_matches_the_metrics_module():
    truth = np.zeros((20, 16, 12), bool)
    truth[4:15, 3:12, 2:9] = True
    pred = np.roll(truth, 2, axis=0)
    spacing = (0.8, 0.9, 2.0)
    s = score(pred, truth, spacing)
    assert s["dice"] == pytest.approx(metrics.dice(pred, truth))
    assert s["rmsd_mm"] == pytest.approx(metrics.rmsd(pred, truth, spacing))
    assert s["hd95_mm"] == pytest.approx(metrics.hd95(pred, truth, spacing))
    assert s["msd_mm"] == pytest.approx(metrics.mean_surface_distance(pred, truth, spacing))
    empty = score(np.zeros_like(truth), truth, spacing)
    assert empty["dice"] == 0.0 and math.isnan(empty["rmsd_mm"])


def test_sizes_and_bins():
    assert parse_size("512x512x400") == (512, 512, 400)
    for bad in ("512x512", "axbxc", "4x64x64"):
        with pytest.raises(InputError):
            parse_size(bad)
    assert [masked_bin(f) for f in (0.0, 0.05, 0.1, 0.25, 0.6)] == ["0-10%", "0-10%", "10-20%", "20-30%", "30-100%"]


def test_a_knee_or_ankle_ct_is_the_case_cut_across_the_tibia_at_the_asked_fraction():
    # a bone along the patient's axis, scanned feet first (k runs downward): the cut must follow the anatomy
    flip = np.diag([1.0, -1.0, -1.0])
    ct, tibia, fracture = bone_case(spacing=(2.0, 2.0, 2.0), size=(30, 30, 90), direction=flip,
                                    fracture_z=(30.0, 40.0))  # the fracture in the proximal half
    case = PhantomCase(ct, tibia, "left", 0, np.zeros(1), fractured_ct=ct, fractured_labels=tibia,
                       fracture_mask=fracture)
    height = lambda v: v.index_to_physical(np.argwhere(v.array == 1)[:, ::-1].astype(float))[:, 2]  # noqa: E731
    top, bottom = height(tibia).max(), height(tibia).min()
    knee = cut_field_of_view(case, "knee", 0.5)
    assert abs(height(knee.labels).min() - (top + bottom) / 2) <= 2.0 and height(knee.labels).max() == top
    assert all(v.array.shape == knee.ct.array.shape for v in (knee.labels, knee.fractured_ct, knee.fracture_mask))
    assert np.allclose(knee.ct.direction, flip) and case.ct.array.shape == (90, 30, 30)  # the case is not changed
    assert cut_field_of_view(case, "ankle", 0.4) is None  # the fracture lies above the ankle CT
    ankle = cut_field_of_view(case, "ankle", 0.8)
    assert height(ankle.labels).min() == bottom
    assert abs(height(ankle.labels).max() - (bottom + 0.8 * (top - bottom))) <= 2.0
