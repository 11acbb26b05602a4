"""Assemble a model bundle from training outputs: the step-1 prototype and grid, the step-3
mask-robust LocNet and one autoencoder (from step 3, or any trained autoencoder folder)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..bundle import save_bundle
from ..errors import InputError
from ..geometry import Grid
from ..models import build_autoencoder, build_locnet
from .artifacts import load_model, with_prefix


def export_bundle(step1: str | Path, step3: str | Path, autoencoder: str, out: str | Path,
                  float16: bool = False, overwrite: bool = False, locnet_from: str = "step3") -> Path:
    """Write a bundle to ``out`` from ``step1/`` (prototype, grid), a LocNet and the autoencoder
    ``step3/<autoencoder>/`` (``autoencoder`` may also be a path to a model folder). ``locnet_from``: 'step3'
    (the mask-robust ``step3/locnet/``, the paper's query model) or 'step1' (the step-1 STN's LocNet);
    ``float16``: weights stored at half precision."""
    if locnet_from not in ("step1", "step3"):
        raise InputError(f"locnet_from must be 'step1' or 'step3', got {locnet_from!r}.")
    s1_tensors, s1_meta = load_model(step1)
    if locnet_from == "step1":
        if s1_meta.get("locnet") is None:
            raise InputError(f"{step1} has no LocNet (step 1 ran in 'direct' mode); export the step-3 LocNet.")
        loc_tensors, loc_meta = s1_tensors, {**s1_meta, "source": "step1"}
    else:
        loc_tensors, loc_meta = load_model(Path(step3) / "locnet")
        loc_meta = {**loc_meta, "source": "step3 (mask-robust)"}
    ae_dir = Path(autoencoder) if Path(autoencoder).is_dir() else Path(step3) / autoencoder
    if not ae_dir.is_dir():
        trained = sorted(p.name for p in Path(step3).iterdir() if (p / "model.json").exists() and p.name != "locnet")
        raise InputError(f"No autoencoder {autoencoder!r} in {step3}; trained ones there: {trained}.")
    ae_tensors, ae_meta = load_model(ae_dir)
    locnet = build_locnet(loc_meta["locnet"])
    locnet.load_state_dict(with_prefix(loc_tensors, "locnet"))
    ae = build_autoencoder(ae_meta["autoencoder"])
    ae.load_state_dict(with_prefix(ae_tensors, "autoencoder"))
    grid = Grid.from_dict(s1_meta["grid"])
    training = {"data": s1_meta["data"], "step1": {"mode": s1_meta["mode"], "prototype": s1_meta["prototype"],
                                                   "config": s1_meta["config"]},
                "locnet": {"source": loc_meta["source"], "config": loc_meta["config"], "data": loc_meta["data"]},
                "autoencoder": {"name": ae_meta["name"], "spec": ae_meta["spec"], "data": ae_meta["data"]}}
    metrics = {"step1": s1_meta["metrics"], "locnet": loc_meta["metrics"], "autoencoder": ae_meta["metrics"]}
    prototype: torch.Tensor = s1_tensors["prototype"]
    return save_bundle(out, grid=grid, window_hu=s1_meta["window_hu"], locnet=locnet, autoencoder=ae,
                       prototype=prototype, training=training, metrics=metrics, channels=s1_meta["channels"],
                       float16=float16, overwrite=overwrite)
