"""Step 3: a mask-robust LocNet and mask-robust autoencoders, trained on masked aligned cases.

Each training sample starts from an aligned case x̂ (output of step 1) and a visibility mask m:
random boxes (``masking``), or for fractured data sets, with probability ``fracture_fraction``,
the case's own fracture (its fractured tensor aligned with the step-1 θ of its healthy version,
and its aligned visibility). The LocNet sees x̃ = A(x̂·m, θ_r) for a random affine θ_r and learns
θ_true = θ_r⁻¹ with D-SSIM(x̂·m, A(x̃, LocNet(x̃))) + α ||θ_true - LocNet(x̃)||² (θ in the net's
units: linear part, translation / unit). Autoencoders learn x̂ from x̂·m with the loss on the
visible voxels (``loss_region: "visible"``, the paper's eq. 5) or on all voxels ("all"). The
prototype stays as step 1 made it. Outputs: ``out/locnet/`` and ``out/<autoencoder name>/``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, OutputExistsError
from ..models import AffineGridSampler, LocNet, coarser_grid, invert_theta
from .artifacts import MODEL_META, TrainingData, batches, load_model, pool, save_model, with_prefix
from . import distributed
from .autoencoders import train_autoencoder
from .config import resolve_device
from .losses import dssim
from .masking import block_visibility, random_thetas
from .runner import RunSettings, TrainRun


def masked_batch(config: dict, data: TrainingData, idx: torch.Tensor, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input x̂·m or the aligned fractured case, target x̂, visibility m) for the cases ``idx``."""
    mc = config["masking"]
    target = data.batch("images", idx)
    bone = target[:, 1:2] if target.shape[1] > 1 else (target[:, :1] > 0).float()
    visible = block_visibility(bone, rng, tuple(mc["blocks"]), tuple(mc["block_size"]), mc["center"])
    inputs = target * visible
    if data.inputs is not None and mc["fracture_fraction"] > 0:
        use = torch.as_tensor(rng.random(len(idx)) < mc["fracture_fraction"])
        if use.any():
            inputs[use.to(inputs.device)] = data.batch("inputs", idx[use])
            visible[use.to(inputs.device)] = data.batch("visible", idx[use])
    return inputs, target, visible


def train_step3(config: dict, resume: bool = False, max_steps: int | None = None) -> bool:
    """Train the mask-robust LocNet, then each configured autoencoder; True when all are finished."""
    if config["loss_region"] not in ("visible", "all"):
        raise InputError(f"loss_region must be 'visible' or 'all', got {config['loss_region']!r}.")
    device = resolve_device(config)
    data = TrainingData(config["data"], device)
    val = TrainingData(config["val_data"], device) if config.get("val_data") else None
    step1_tensors, step1_meta = load_model(config["step1"])
    if list(step1_meta["grid"]["size"]) != list(data.grid.size):
        raise InputError(f"The step-1 model in {config['step1']} works on grid size {step1_meta['grid']['size']} but "
                         f"the data set {config['data']} has {list(data.grid.size)}; use the aligned set of that run.")
    out = Path(config["out"])
    description = {"train": data.describe(), "val": val.describe() if val else None, "step": "step3",
                   "input": "aligned cases with random box masks"
                            + (" and their own fracture masks" if data.inputs is not None else ""),
                   "loss_region": config["loss_region"], "masking": config["masking"], "augment": config["augment"]}
    if not _train_locnet(config, data, val, step1_tensors, step1_meta, out / "locnet", resume, max_steps, description):
        return False
    common = {k: config[k] for k in ("seed", "checkpoint_every", "amp")}
    common.update(masking=config["masking"], loss_region=config["loss_region"])

    def make_batch(source, idx, rng):
        return masked_batch(config, source, idx, rng)

    for name, spec in config["autoencoders"].items():
        if not train_autoencoder(name, spec, data, val, out / name, make_batch, common, resume, max_steps,
                                 description, loss_on_visible=config["loss_region"] == "visible"):
            return False
    return True


def _train_locnet(config: dict, data: TrainingData, val: TrainingData | None, step1_tensors: dict,
                  step1_meta: dict, out: Path, resume: bool, max_steps: int | None, description: dict) -> bool:
    lc, aug = config["locnet"], config["augment"]
    if (out / MODEL_META).exists():
        if resume:
            return True
        raise OutputExistsError(f"{out} already holds a trained LocNet; use --resume to keep it or another output.")
    torch.manual_seed(config["seed"])
    if lc["init"]:  # continue from a trained (step-3) LocNet
        tensors, meta = load_model(lc["init"])
        if meta.get("kind") != "locnet":
            raise InputError(f"locnet.init {lc['init']} holds a model of kind {meta.get('kind')!r}, not a LocNet; "
                             "give the locnet/ folder of a step-3 run.")
        locnet = LocNet({**meta["locnet"], "in_channels": data.channels})
        locnet.load_state_dict(with_prefix(tensors, "locnet"))
    elif lc["init_from_step1"]:
        if step1_meta.get("locnet") is None:
            raise InputError(f"{config['step1']} has no LocNet (step 1 ran in 'direct' mode); set "
                             f"locnet.init_from_step1 to false.")
        locnet = LocNet({**step1_meta["locnet"], "in_channels": data.channels})
        locnet.load_state_dict(with_prefix(step1_tensors, "locnet"))
    else:
        locnet = LocNet({**lc["arch"], "in_channels": data.channels})
    locnet.to(data.device)
    f, win = int(lc["loss_downsample"]), int(lc["ssim_window"])
    sampler = AffineGridSampler(data.grid).to(data.device)
    small = AffineGridSampler(coarser_grid(data.grid, f)).to(data.device)

    def losses(source: TrainingData, idx: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        inputs, target, visible = masked_batch(config, source, idx, rng)
        theta_r = random_thetas(rng, len(idx), aug["max_angle_deg"], aug["max_translation_mm"], tuple(aug["scale"]))
        theta_true = invert_theta(theta_r).float().to(source.device)
        theta_r = theta_r.float().to(source.device)
        with torch.no_grad():
            x_t = sampler(inputs, theta_r)
            seen = (small(small(pool(visible, f), theta_r), theta_true) > 0.5).float()
        theta = locnet(x_t)
        image = dssim(pool(target, f) * seen, small(pool(x_t, f), theta), win).mean()
        params = ((locnet.parameter_vector(theta) - locnet.parameter_vector(theta_true)) ** 2).mean()
        shift = (theta[:, :, 3] - theta_true[:, :, 3]).norm(dim=1).mean()
        return image + lc["alpha"] * params, {"dssim": image.item(), "theta_mse": params.item(),
                                              "translation_error_mm": shift.item()}

    def evaluate(source: TrainingData) -> dict[str, float]:
        parts = [losses(source, idx, np.random.default_rng([config["seed"], b, 0x7A1]))[1]
                 for b, idx in enumerate(batches(len(source), lc["batch_size"]))]
        return {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}

    optimizer = torch.optim.AdamW(locnet.parameters(), lr=lc["lr"], weight_decay=lc["weight_decay"])
    settings = RunSettings(config["seed"], lc["epochs"], lc["batch_size"], len(data), config["checkpoint_every"],
                           data.device, config["amp"], max_steps)
    fingerprint = {"locnet": lc, "masking": config["masking"], "augment": aug, "seed": config["seed"],
                   "dataset": data.fingerprint()}
    run = TrainRun(out, {"locnet": locnet}, optimizer, settings, fingerprint, resume, "step3 locnet")
    if not run.run(lambda idx, rng, epoch: losses(data, idx, rng), (lambda e: evaluate(val)) if val else None):
        return False
    if distributed.is_main():
        locnet.eval()
        with torch.no_grad():
            metrics = {f"{name}_{k}": v for name, source in (("train", data), ("val", val)) if source is not None
                       for k, v in evaluate(source).items()}
        meta = {"kind": "locnet", "locnet": locnet.config.to_dict(), "mask_robust": True, "config": config,
                "data": description, "metrics": metrics}
        save_model(out, {f"locnet.{k}": v for k, v in locnet.state_dict().items()}, meta)
    distributed.barrier()
    return True
