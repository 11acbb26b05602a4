"""The bundled default model and sample case work together end to end (a broken or swapped bundle fails here;
accuracy figures belong to docs/benchmarks)."""

import numpy as np

from TibiaReconstructionLib import metrics
from TibiaReconstructionLib.bundle import load_bundle
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
