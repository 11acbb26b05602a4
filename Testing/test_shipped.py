"""The bundled default model and sample case work together end to end (a broken or swapped bundle fails here;
accuracy figures belong to docs/benchmarks)."""

import numpy as np

from TibiaReconstructionLib import metrics
from TibiaReconstructionLib.bench import score
from TibiaReconstructionLib.bundle import load_bundle
from TibiaReconstructionLib.geometry import crop
from TibiaReconstructionLib.io import read_mask, read_volume
from TibiaReconstructionLib.predict import DEFAULT_BUNDLE, UNCERTAINTY_ARRAY, Predictor
from TibiaReconstructionLib.surface import point_array

SAMPLE = DEFAULT_BUNDLE.parent.parent / "SampleCase"


def test_default_bundle_is_small_and_predicts_the_sample_case():
    size_mb = sum(f.stat().st_size for f in DEFAULT_BUNDLE.iterdir() if f.is_file()) / 1e6
    assert size_mb <= 30.0
    bundle = load_bundle(DEFAULT_BUNDLE)
    ct = read_volume(SAMPLE / "ct.nrrd")
    result = Predictor(bundle, "cpu").predict(ct, read_mask(SAMPLE / "tibia.nrrd"),
                                               read_mask(SAMPLE / "fracture.nrrd"))
    truth = read_mask(SAMPLE / "healthy_tibia.nrrd").array != 0
    assert metrics.dice(result.labelmap.array != 0, truth) > 0.85
    uncertainty = point_array(result.surface, UNCERTAINTY_ARRAY)
    assert np.all(np.isfinite(uncertainty)) and uncertainty.min() >= 0 and uncertainty.max() > 0
    assert result.occupancy_std.array.max() > 0 and np.allclose(result.occupancy_std.direction, ct.direction)


def test_a_knee_ct_of_the_sample_case_is_predicted_where_the_tibia_lies():
    """The sample cut to a knee CT (its distal third left out of the scan): the intact knee end is aligned as a
    whole tibia's would be (centred on the part seen, the old alignment put it 7 mm RMSD off: Dice 0.87)."""
    volumes = [read_volume(SAMPLE / "ct.nrrd")] + [read_mask(SAMPLE / f"{name}.nrrd")
                                                    for name in ("tibia", "fracture", "healthy_tibia")]
    k = np.flatnonzero(volumes[1].array.any(axis=(1, 2)))
    ct, tibia, fracture, truth = (crop(v, (65, 0, 0), np.array(v.array.shape) - 1) for v in volumes)
    assert k[0] < 65 < k[-1] and (tibia.array & fracture.array).any()  # the scan cuts the tibia, shows the fracture
    result = Predictor(DEFAULT_BUNDLE, "cpu").predict(ct, tibia, fracture)
    assert any("cut off by the field of view" in w for w in result.warnings)
    scores = score(result.labelmap.array != 0, truth.array != 0, ct.spacing)
    assert scores["dice"] > 0.95 and scores["rmsd_mm"] < 2.0


def test_a_fracture_mask_over_the_proximal_end_leaves_the_tibia_as_long_as_its_mask():
    """The sample's fracture mask plus its top 30 % (a slab over the plateau): the model sees no knee end, but the
    tibia mask shows where it lies, and the prediction reaches it (the model alone stopped 24 mm short: RMSD 7.9 mm)."""
    ct, tibia, fracture = (read_volume(SAMPLE / "ct.nrrd"), read_mask(SAMPLE / "tibia.nrrd"),
                           read_mask(SAMPLE / "fracture.nrrd"))
    k = np.flatnonzero(tibia.array.any(axis=(1, 2)))
    assert ct.direction[2, 2] > 0.99  # slices run from the ankle up
    hidden = fracture.array.copy()
    hidden[k[-1] - int(0.3 * (k[-1] - k[0])):] = 1
    result = Predictor(DEFAULT_BUNDLE, "cpu").predict(ct, tibia, fracture.with_array(hidden), other_tibia=None)
    assert result.reduction["hidden_end"]["end"] == "proximal"
    assert any("hides the tibia's proximal end" in w for w in result.warnings)
    top = np.flatnonzero(result.labelmap.array.any(axis=(1, 2)))[-1]
    assert (k[-1] - top) * ct.spacing[2] <= 4.0
    truth = read_mask(SAMPLE / "healthy_tibia.nrrd").array != 0
    assert score(result.labelmap.array != 0, truth, ct.spacing)["rmsd_mm"] < 5.5
