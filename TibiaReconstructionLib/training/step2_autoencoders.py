"""Step 2: autoencoders (PCA, VAE, VQ-VAE) on the aligned healthy cases, plain MSE.

``config["models"]`` maps a name to a model entry ({"type": "pca", "components": 32}, or
{"type": "vae"|"vqvae", "arch": {...}, "epochs", "lr", ...}); each is trained into ``out/<name>/``.
"""

from __future__ import annotations

from pathlib import Path

from .artifacts import TrainingData
from .autoencoders import train_autoencoder
from .config import resolve_device


def train_step2(config: dict, resume: bool = False, max_steps: int | None = None) -> bool:
    """Train every configured model in turn; True when all are finished."""
    device = resolve_device(config)
    data = TrainingData(config["data"], device)
    val = TrainingData(config["val_data"], device) if config.get("val_data") else None
    common = {k: config[k] for k in ("seed", "checkpoint_every", "amp")}
    description = {"train": data.describe(), "val": val.describe() if val else None, "step": "step2",
                   "input": "aligned healthy cases", "loss": "MSE on all voxels"}

    for name, spec in config["models"].items():
        if not train_autoencoder(name, spec, data, val, Path(config["out"]) / name, healthy_batch, common, resume,
                                 max_steps, description):
            return False
    return True


def healthy_batch(data: TrainingData, idx, rng):
    """Input = target = the aligned healthy cases; no mask."""
    x = data.batch("images", idx)
    return x, x, None
