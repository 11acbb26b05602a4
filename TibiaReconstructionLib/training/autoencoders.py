"""Training one autoencoder (PCA fit, or VAE/VQ-VAE minibatch training) on aligned canonical tensors.

Shared by step 2 (healthy aligned cases, full MSE) and step 3 (masked inputs, loss on visible
voxels); the caller supplies how a batch is made: ``make_batch(data, indices, rng) -> (input, target,
visible or None)``. Under torchrun the minibatch models train data-parallel; PCA is fitted by rank 0 alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import OutputExistsError
from ..models import PCA, Autoencoder, build_autoencoder, masked_mse
from . import distributed
from .artifacts import MODEL_META, TrainingData, batches, load_model, save_model, with_prefix
from .runner import RunSettings, TrainRun

BatchFn = Callable[[TrainingData, torch.Tensor, np.random.Generator],
                   tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def build_from_spec(spec: dict, data: TrainingData) -> Autoencoder:
    """An untrained autoencoder for a model entry of a step configuration."""
    if spec["type"] == "pca":
        return build_autoencoder({"type": "pca", "in_channels": data.channels, "shape": list(data.grid.shape),
                                  "components": spec["components"], "factor": spec.get("factor", 1)})
    return build_autoencoder({"type": spec["type"], **spec["arch"], "in_channels": data.channels})


def commitment_weight(spec: dict, epoch: int) -> float:
    """VQ-VAE commitment weight β, stepped linearly per epoch from start to max over the warm-up epochs."""
    start, end = spec["commitment"]
    warm = max(int(spec["commitment_warmup_epochs"]), 1)
    return start + (end - start) * min(epoch, warm) / warm


def train_autoencoder(name: str, spec: dict, data: TrainingData, val: TrainingData | None, out: Path,
                      make_batch: BatchFn, common: dict, resume: bool,
                      max_steps: int | None, description: dict, loss_on_visible: bool = True) -> bool:
    """Fit or train the autoencoder ``name`` into ``out``; True when its model file is written.

    The training loss is restricted to the batch's visible voxels when ``loss_on_visible``, else it
    covers the whole target.
    """
    out = Path(out)
    if (out / MODEL_META).exists():
        if resume:
            return True
        raise OutputExistsError(f"{out} already holds a trained model; use --resume to keep it or another output.")
    torch.manual_seed(common["seed"])
    model = build_from_spec(spec, data).to(data.device)
    if isinstance(model, PCA):
        if distributed.is_main():
            model.fit(len(data), lambda i: data.images[i].float())
    else:
        if spec.get("init"):
            model.load_state_dict(with_prefix(load_model(spec["init"])[0], "autoencoder"))
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=spec["weight_decay"])
        settings = RunSettings(common["seed"], spec["epochs"], spec["batch_size"], len(data),
                               common["checkpoint_every"], data.device, common["amp"], max_steps)
        run = TrainRun(out, {"autoencoder": model}, optimizer, settings,
                       {"spec": spec, "common": common, "dataset": data.fingerprint()}, resume, name)

        def step_fn(idx, rng, epoch):
            if spec["type"] == "vqvae":
                model.commitment_weight = commitment_weight(spec, epoch)
            x, target, visible = make_batch(data, idx, rng)
            return model.loss(x, target, visible if loss_on_visible else None)

        def val_fn(epoch):
            return evaluate(model, val, make_batch, common["seed"])

        if not run.run(step_fn, val_fn if val is not None else None):
            return False
    if distributed.is_main():
        metrics = {f"train_{k}": v for k, v in evaluate(model, data, make_batch, common["seed"]).items()}
        if val is not None:
            metrics.update({f"val_{k}": v for k, v in evaluate(model, val, make_batch, common["seed"]).items()})
        meta = {"kind": "autoencoder", "name": name, "autoencoder": dict(model.config), "spec": spec,
                "data": description, "metrics": metrics}
        save_model(out, {f"autoencoder.{k}": v for k, v in model.state_dict().items()}, meta)
    distributed.barrier()
    return True


@torch.no_grad()
def evaluate(model: Autoencoder, data: TrainingData, make_batch: BatchFn, seed: int) -> dict[str, float]:
    """Mean MSE of ``reconstruct`` over ``data`` (reproducible batches): all voxels, and for masked
    batches also the visible and the hidden (masked-out) voxels separately."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    for b, idx in enumerate(batches(len(data), 4)):
        x, target, visible = make_batch(data, idx, np.random.default_rng([seed, b, 0xE7A1]))
        rec = model.reconstruct(x, visible)
        parts = {"mse": masked_mse(rec, target)}
        if visible is not None:
            parts.update(mse_visible=masked_mse(rec, target, visible), mse_hidden=masked_mse(rec, target, 1 - visible))
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v.item() * len(idx)
    model.train(was_training)
    return {k: v / len(data) for k, v in sums.items()}
