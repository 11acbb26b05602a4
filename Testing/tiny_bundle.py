"""A tiny but real model bundle for fast tests: an identity LocNet and a PCA fitted on synthetic bones."""

import numpy as np
import torch

from TibiaReconstructionLib.bundle import save_bundle
from TibiaReconstructionLib.models import PCA, LocNet
from TibiaReconstructionLib.prepare import canonical_grid, prepare_case
from synthetic import bone_case

GRID = canonical_grid((24, 24, 56), 3.0)
POSES = [(0, 0, 0), (4, -3, 10), (-5, 2, -12), (2, 5, 20), (-3, -4, -6), (6, 1, 4)]


def make_tiny_bundle(folder):
    """Save the bundle into ``folder`` and return its path."""
    torch.manual_seed(0)
    cases = [prepare_case(*bone_case(pose_deg=p)[:2], "left", GRID).tensor for p in POSES]
    data = torch.from_numpy(np.stack(cases))
    pca = PCA({"shape": list(GRID.shape), "components": 4}).fit(len(cases), lambda i: data[i])
    locnet = LocNet({"channels": [4, 8], "input_downsample": 1, "pool_size": [2, 1, 1], "hidden": 16})
    return save_bundle(folder, grid=GRID, window_hu=(-200, 1800), locnet=locnet, autoencoder=pca,
                       prototype=data.mean(0, keepdim=True), training={"data": "6 synthetic bones (tests)"})
