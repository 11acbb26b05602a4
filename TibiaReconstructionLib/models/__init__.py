"""Models on the canonical grid: affine grid sampler, LocNet, prototype and the autoencoders.

Build models from their JSON-able configs with :func:`build_locnet` and :func:`build_autoencoder`.
"""

from __future__ import annotations

import importlib

from ..errors import InputError
from .autoencoder import Autoencoder, masked_mse
from .locnet import LocNet, LocNetConfig
from .pca import PCA
from .prototype import Prototype
from .sampler import (AffineGridSampler, coarser_grid, compose_theta, identity_theta, invert_theta, matrix_to_theta,
                      theta_to_matrix)

# The VAE and VQ-VAE are built from MONAI blocks, and importing MONAI takes seconds (it pulls in matplotlib, scipy.stats
# and scikit-image): they are imported when first used, so that predicting with a PCA bundle never pays for it.
_LAZY = {"VAE": ".vae", "VQVAE": ".vqvae"}
AUTOENCODERS = {"pca": "PCA", "vae": "VAE", "vqvae": "VQVAE"}  # config "type" -> class name


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_locnet(config: dict) -> LocNet:
    """A LocNet from its architecture dict (see :class:`LocNetConfig`)."""
    return LocNet(LocNetConfig.from_dict(config))


def build_autoencoder(config: dict) -> Autoencoder:
    """An autoencoder from {"type": "pca"|"vae"|"vqvae", ...architecture}."""
    kind = config.get("type")
    if kind not in AUTOENCODERS:
        raise InputError(f"Unknown autoencoder type {kind!r}; use one of {sorted(AUTOENCODERS)}.")
    return (PCA if kind == "pca" else __getattr__(AUTOENCODERS[kind]))(config)


__all__ = ["AUTOENCODERS", "AffineGridSampler", "Autoencoder", "LocNet", "LocNetConfig", "PCA", "Prototype", "VAE",
           "VQVAE", "build_autoencoder", "build_locnet", "coarser_grid", "compose_theta", "identity_theta",
           "invert_theta", "masked_mse", "matrix_to_theta", "theta_to_matrix"]
