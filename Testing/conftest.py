"""Shared fixtures: small volumes with oblique geometry, deterministic random generators."""

import numpy as np
import pytest
import torch

from TibiaReconstructionLib.geometry import Volume, euler_rotation

torch.set_num_threads(1)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def oblique_volume(rng):
    """A 12x10x8 (i, j, k) float32 volume with anisotropic spacing and an oblique direction."""
    direction = euler_rotation((10.0, -20.0, 35.0))[:3, :3]
    return Volume(rng.normal(size=(8, 10, 12)).astype(np.float32), np.array([0.7, 0.9, 2.5]),
                  np.array([-12.0, 30.5, 100.0]), direction)
