"""`tibia-recon predict` end to end on files, with and without a given tibia mask."""

import json

import numpy as np

from TibiaReconstructionLib.cli import main
from TibiaReconstructionLib.io import read_volume, write_volume
from TibiaReconstructionLib.phantoms import generate_case
from TibiaReconstructionLib.segment import segment_tibia
from TibiaReconstructionLib.surface import polydata_points, read_stl
from TibiaReconstructionLib.geometry import ras_to_lps
from tiny_bundle import make_tiny_bundle


def test_predict_without_tibia_mask_segments_it_and_saves_it(tmp_path, capsys):
    case = generate_case(11, fractured=True, spacing=(1.5, 1.5, 2.0), side="left", fracture_type="transverse")
    ct = write_volume(case.fractured_ct, tmp_path / "ct.nrrd")
    frac = write_volume(case.fracture_mask, tmp_path / "fracture.nrrd", label=True)
    bundle = make_tiny_bundle(tmp_path / "bundle")
    out = tmp_path / "out"
    assert main(["predict", "--ct", str(ct), "--fracture-mask", str(frac), "--bundle", str(bundle),
                 "--out", str(out)]) == 0
    used = read_volume(out / "tibia_mask_auto.nrrd")
    expected = segment_tibia(case.fractured_ct, "auto", case.fracture_mask).tibia
    np.testing.assert_array_equal(used.array, expected.array)
    assert used.grid.same_as(case.fractured_ct.grid)
    label = read_volume(out / "predicted_tibia_label.nrrd")
    assert label.grid.same_as(case.fractured_ct.grid) and label.array.any()
    # the two STL files hold the same surface in the two frames
    lps = polydata_points(read_stl(out / "predicted_tibia_LPS.stl"))
    ras = polydata_points(read_stl(out / "predicted_tibia_RAS.stl"))
    np.testing.assert_allclose(ras_to_lps(ras), lps, atol=1e-3)
    assert "tibia_mask" in capsys.readouterr().out
    # --model-only: the model's reconstruction everywhere, no visible bone kept; --no-reassembly: the moved fragment
    # where the reduction put it; with the bundled model (the tiny one's reduction is refused on a real phantom, and
    # then nothing is kept anyway). The report says which.
    runs = {}
    for name, extra in (("default", []), ("model-only", ["--model-only"]), ("no-reassembly", ["--no-reassembly"]),
                        ("one-leg", ["--other-tibia-mask", "none"])):
        runs[name] = tmp_path / name
        assert main(["predict", "--ct", str(ct), "--tibia-mask", str(out / "tibia_mask_auto.nrrd"),
                     "--fracture-mask", str(frac), "--out", str(runs[name])] + extra) == 0
    fused, model, placed, alone = (json.loads((d / "report.json").read_text(encoding="utf-8")) for d in runs.values())
    assert model["visible_bone"] == {} and any(f["pasted"] for f in fused["visible_bone"]["fragments"])
    assert "contact_before" in fused["visible_bone"]["reassembly"] and placed["visible_bone"]["reassembly"] == {}
    labels = [read_volume(d / "predicted_tibia_label.nrrd").array for d in runs.values()]
    assert (labels[0] != labels[1]).any()
    # by default the other leg is looked for: on a CT of one leg none is found, the report says so, no warning, and
    # the prediction is that of --other-tibia-mask none
    assert fused["inputs"]["other_tibia_mask"] == "auto" and alone["inputs"]["other_tibia_mask"] == "none"
    assert fused["visible_bone"]["other_leg"] == {"requested": "auto", "used": False,
                                                  "why_not": fused["visible_bone"]["other_leg"]["why_not"]}
    assert fused["visible_bone"]["other_leg"]["why_not"].startswith("No other leg was found")
    assert not any("other leg" in w for w in fused["warnings"]) and "other_leg" not in alone["visible_bone"]
    np.testing.assert_array_equal(labels[0], labels[3])
