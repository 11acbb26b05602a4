"""Training configurations: JSON files merged over per-step defaults; unknown keys are errors.

Paths in a configuration ("data", "val_data", "out", "step1") are relative to the current
working directory; the command line can override them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..errors import InputError
from . import distributed

_COMMON = {"seed": 0, "device": "auto", "threads": 0, "amp": True, "checkpoint_every": 100,
           "data": None, "val_data": None, "out": None}

_LOCNET_ARCH = {"channels": [8, 16, 32, 64], "input_downsample": 2, "pool_size": [4, 2, 2], "hidden": 128,
                "translation_unit_mm": 10.0, "coord_channels": True}

DEFAULTS = {
    "step1": {**_COMMON, "mode": "stn", "epochs": 40, "batch_size": 4, "lr": 1e-3, "lr_prototype": 1e-2,
              "weight_decay": 1e-4, "ssim_window": 7, "loss_downsample": 2, "anchor_linear": 1.0,
              "anchor_translation": 0.01,
              "locnet": _LOCNET_ARCH, "direct": {"inner_steps": 50, "lr": 1e-2}},
    "step2": {**_COMMON, "models": {}},
    "step3": {**_COMMON, "step1": None, "loss_region": "visible",
              "locnet": {"arch": _LOCNET_ARCH, "init_from_step1": True, "init": None, "epochs": 12, "batch_size": 4, "lr": 5e-4,
                         "weight_decay": 1e-4, "alpha": 1.0, "ssim_window": 7, "loss_downsample": 2},
              "masking": {"blocks": [1, 3], "block_size": [10, 20], "center": "bone", "fracture_fraction": 0.5},
              "augment": {"max_angle_deg": 15.0, "max_translation_mm": 25.0, "scale": [0.9, 1.1]},
              "autoencoders": {}},
}

# Per-model defaults inside step2 "models" and step3 "autoencoders".
MODEL_DEFAULTS = {
    "pca": {"type": "pca", "components": 32, "factor": 1},
    "vae": {"type": "vae", "arch": {}, "epochs": 30, "batch_size": 4, "lr": 1e-3, "weight_decay": 1e-5,
            "init": None},
    "vqvae": {"type": "vqvae", "arch": {}, "epochs": 30, "batch_size": 4, "lr": 1e-3, "weight_decay": 1e-5,
              "commitment": [0.5, 1.0], "commitment_warmup_epochs": 10, "init": None},
}
# Keys whose value is a free-form dict (architectures): merged but not checked key by key here.
_FREE = {"arch", "locnet"}


def _merge(defaults: dict, given: dict, where: str) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        if key not in defaults:
            raise InputError(f"Unknown setting {where}{key!r}; known: {sorted(defaults)}.")
        if isinstance(defaults[key], dict) and isinstance(value, dict) and key not in _FREE and defaults[key]:
            out[key] = _merge(defaults[key], value, f"{where}{key}.")
        elif isinstance(defaults[key], dict) and isinstance(value, dict):
            out[key] = {**defaults[key], **value}
        else:
            out[key] = value
    return out


def _models(given: dict, where: str) -> dict:
    out = {}
    for name, spec in given.items():
        kind = spec.get("type")
        if kind not in MODEL_DEFAULTS:
            raise InputError(f"{where}{name!r} has type {kind!r}; use one of {sorted(MODEL_DEFAULTS)}.")
        out[name] = _merge(MODEL_DEFAULTS[kind], spec, f"{where}{name}.")
    return out


def load_config(step: str, path=None, overrides: dict | None = None) -> dict:
    """The full configuration of ``step`` from a JSON file (or defaults), with non-None ``overrides``."""
    given = {}
    if path is not None:
        try:
            given = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise InputError(f"Configuration file not found: {path}") from exc
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not valid JSON: {exc}") from exc
    given = {k: v for k, v in given.items() if not k.startswith("_")}  # "_comment" keys
    if given.pop("step", step) != step:
        raise InputError(f"{path} is a configuration for another step; use one made for {step}.")
    config = _merge(DEFAULTS[step], given, "")
    for key in ("models", "autoencoders"):
        if key in config:
            config[key] = _models(config[key], f"{key}.")
    config.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for key in ("data", "out") + (("step1",) if step == "step3" else ()):
        if not config.get(key):
            raise InputError(f"The {step} configuration needs {key!r} (set it in the file or on the command line).")
    return config


def resolve_device(config: dict) -> torch.device:
    """The torch device for config["device"] ("auto" takes CUDA when available); applies "threads"; joins
    torchrun's process group if launched by torchrun (then a CUDA device is this process's GPU)."""
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    name = config["device"]
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("The configuration asks for a CUDA device but none is available; set \"device\": \"cpu\".")
    return distributed.init(torch.device(name))
