"""Step 1: jointly learn the prototype x̄ and a LocNet (or one θ per case: "direct AGS") by D-SSIM.

Minimises Σ D-SSIM(x̄, A(x_i, θ_i)) with θ_i = LocNet(x_i) ("stn") or free per-case parameters
("direct", the paper's baseline: ``inner_steps`` optimiser steps per batch). The loss is computed
on the canonical grid average-pooled by ``loss_downsample`` (θ is in mm, so it is the same θ),
plus anchors on the batch-mean θ: ``anchor_linear`` x ||mean linear part - I||² and
``anchor_translation`` x ||mean translation / unit||². Without them the frame drifts as a whole
and shrinks (a smaller bone in a mostly empty volume has a lower D-SSIM).

Outputs in ``out``: ``model.safetensors``/``model.json`` (LocNet + prototype on the full canonical
grid) and ``aligned/`` (and, with a validation set, ``aligned_val/``): canonical data sets of the
aligned cases, each with its θ (canonical mm, output point -> input point) in the manifest.

Under torchrun, "stn" trains data-parallel (:mod:`.distributed`); "direct" runs in one process only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..canonical import write_canonical_dataset
from ..errors import InputError
from ..models import AffineGridSampler, LocNet, Prototype, coarser_grid
from .artifacts import TrainingData, batches, pool, save_model
from . import distributed
from .config import resolve_device
from .losses import dssim
from .runner import RunSettings, TrainRun

_IDENTITY_VECTOR = torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0])


class ThetaTable(nn.Module):
    """Free per-case affines for direct AGS: θ_i = [I + Δ_lin | unit * Δ_t], Δ = 0 at start."""

    def __init__(self, n: int, translation_unit_mm: float = 10.0) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(n, 12))
        self.unit = translation_unit_mm

    def theta(self, delta: torch.Tensor) -> torch.Tensor:
        lin = torch.eye(3, dtype=delta.dtype, device=delta.device) + delta[:, :9].reshape(-1, 3, 3)
        return torch.cat([lin, delta[:, 9:, None] * self.unit], dim=2)


def train_step1(config: dict, resume: bool = False, max_steps: int | None = None) -> bool:
    """Run step 1 as configured; True when finished (outputs written), False when stopped at ``max_steps``."""
    if config["mode"] not in ("stn", "direct"):
        raise InputError(f"Step 1 mode must be 'stn' or 'direct', got {config['mode']!r}.")
    device = resolve_device(config)
    if config["mode"] == "direct" and distributed.world() > 1:
        raise InputError("Step 1 in 'direct' mode (one θ per case) runs in one process; start it without torchrun.")
    data = TrainingData(config["data"], device)
    val = TrainingData(config["val_data"], device) if config.get("val_data") else None
    out, f, win = Path(config["out"]), int(config["loss_downsample"]), int(config["ssim_window"])
    loss_sampler = AffineGridSampler(coarser_grid(data.grid, f)).to(device)
    pooled = torch.cat([pool(data.batch("images", idx), f).cpu() for idx in batches(len(data), 16)])
    prototype = Prototype(data.channels, tuple(pooled.shape[2:]), init=pooled.mean(0)).to(device)
    direct = config["mode"] == "direct"
    torch.manual_seed(config["seed"])
    locnet = LocNet({**config["locnet"], "in_channels": data.channels}).to(device)
    identity = _IDENTITY_VECTOR.to(device)

    def loss_of(theta: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        aligned = loss_sampler(pooled[idx].to(device), theta)
        d = dssim(aligned, prototype(), win).mean()
        drift = (locnet.parameter_vector(theta).mean(0) - identity) ** 2
        anchor = config["anchor_linear"] * drift[:9].sum() + config["anchor_translation"] * drift[9:].sum()
        return d + anchor, {"dssim": d.item(), "anchor": anchor.item()}

    settings = RunSettings(config["seed"], config["epochs"], config["batch_size"], len(data),
                           config["checkpoint_every"], device, config["amp"], max_steps)
    fingerprint = {"config": config, "dataset": data.fingerprint()}
    proto_group = {"params": list(prototype.parameters()), "lr": config["lr_prototype"], "weight_decay": 0.0}
    if direct:
        table = ThetaTable(len(data), locnet.config.translation_unit_mm).to(device)
        optimizer = torch.optim.AdamW([proto_group])
        run = TrainRun(out, {"prototype": prototype, "thetas": table}, optimizer, settings, fingerprint, resume,
                       "step1 direct")

        def step_fn(idx, rng, epoch):
            delta = table.delta.detach()[idx].clone().requires_grad_(True)
            inner = torch.optim.AdamW([delta], lr=config["direct"]["lr"], weight_decay=0.0)
            for _ in range(config["direct"]["inner_steps"]):
                loss, parts = loss_of(table.theta(delta), idx)
                inner.zero_grad(), optimizer.zero_grad()
                loss.backward()
                inner.step(), optimizer.step()
            with torch.no_grad():
                table.delta[idx] = delta.detach()
            return None, {"loss": loss.item(), **parts}
    else:
        optimizer = torch.optim.AdamW([{"params": list(locnet.parameters()), "lr": config["lr"],
                                        "weight_decay": config["weight_decay"]}, proto_group])
        run = TrainRun(out, {"locnet": locnet, "prototype": prototype}, optimizer, settings, fingerprint, resume,
                       "step1 stn")

        def step_fn(idx, rng, epoch):
            return loss_of(locnet(data.batch("images", idx)), idx)

    def val_fn(epoch):
        losses = []
        for idx in batches(len(val), config["batch_size"]):
            x = val.batch("images", idx)
            aligned = loss_sampler(pool(x, f), locnet(x))
            losses.append(dssim(aligned, prototype(), win))
        return {"dssim": torch.cat(losses).mean().item()}

    if not run.run(step_fn, val_fn if (val is not None and not direct) else None):
        return False
    if distributed.is_main():
        locnet.eval()
        with torch.no_grad():
            thetas = torch.cat([table.theta(table.delta[idx]) if direct else locnet(data.batch("images", idx))
                                for idx in batches(len(data), config["batch_size"])]).cpu()
            val_thetas = None if val is None or direct else torch.cat(
                [locnet(val.batch("images", idx)) for idx in batches(len(val), config["batch_size"])]).cpu()
        write_step1_outputs(config, data, val, locnet, prototype, thetas, val_thetas, direct, out)
    distributed.barrier()
    return True


@torch.no_grad()
def write_aligned(config: dict, data: TrainingData, thetas: torch.Tensor, folder: Path) -> torch.Tensor:
    """Write ``data`` moved by its per-case θ as a canonical data set (θ in each case); return the images (on
    the CPU). Resampled on the training device."""
    sampler = AffineGridSampler(data.grid).to(data.device)
    aligned = {"images": [], "inputs": [], "visible": []}
    for idx in batches(len(data), 8):
        th = thetas[idx].to(data.device)
        aligned["images"].append(sampler(data.batch("images", idx), th).half().cpu())
        if data.inputs is not None:
            aligned["inputs"].append(sampler(data.batch("inputs", idx), th).half().cpu())
            aligned["visible"].append((sampler(data.batch("visible", idx), th) > 0.5).to(torch.uint8).cpu())
    images = torch.cat(aligned["images"])
    cases = [{**case, "theta": th.tolist()} for case, th in zip(data.dataset.cases, thetas.double())]
    fractured = data.inputs is not None
    write_canonical_dataset(folder, data.grid, data.dataset.window_hu, cases, images,
                            torch.cat(aligned["inputs"]) if fractured else None,
                            torch.cat(aligned["visible"]) if fractured else None, channels=data.dataset.channels,
                            extra={"aligned_by": {"step": "step1", "mode": config["mode"],
                                                  "run": str(folder.parent.resolve()),
                                                  "theta": "per case, canonical mm, output point -> input point"}},
                            overwrite=True)
    return images


@torch.no_grad()
def write_step1_outputs(config: dict, data: TrainingData, val: TrainingData | None, locnet: LocNet,
                        prototype: Prototype, thetas: torch.Tensor, val_thetas: torch.Tensor | None, direct: bool,
                        out: Path) -> None:
    """``aligned/`` (and ``aligned_val/``) data sets and the model file with the full-grid prototype."""
    images = write_aligned(config, data, thetas, out / "aligned")
    f, win = int(config["loss_downsample"]), int(config["ssim_window"])
    full_prototype = prototype.tensor.detach().cpu() if f == 1 else images.float().mean(0, keepdim=True)
    reference = full_prototype.to(data.device)

    def dssim_to_prototype(aligned: torch.Tensor) -> float:  # on the training device (minutes on a CPU at 1.5 mm)
        return torch.cat([dssim(aligned[idx].to(data.device).float(), reference, win).cpu()
                          for idx in batches(len(aligned), 8)]).mean().item()

    metrics = {"train_dssim_to_prototype": dssim_to_prototype(images)}
    if val_thetas is not None:
        metrics["val_dssim_to_prototype"] = dssim_to_prototype(write_aligned(config, val, val_thetas,
                                                                             out / "aligned_val"))
    tensors = {"prototype": full_prototype}
    if not direct:
        tensors.update({f"locnet.{k}": v for k, v in locnet.state_dict().items()})
    meta = {"kind": "step1", "mode": config["mode"], "locnet": None if direct else locnet.config.to_dict(),
            "prototype": "learned jointly" if f == 1 else
            f"mean of the aligned images (learned jointly at 1/{f} resolution for the loss)",
            "grid": data.grid.to_dict(), "window_hu": list(data.dataset.window_hu),
            "channels": data.dataset.channels, "data": data.describe(), "config": config, "metrics": metrics}
    save_model(out, tensors, meta)
