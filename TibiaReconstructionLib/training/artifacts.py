"""Trained-model files of the training steps, and the in-memory training data.

A model folder holds ``model.safetensors`` (tensors) and ``model.json`` (architecture, settings,
metrics); ``model.json`` is written last, so its presence marks a finished model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..canonical import CanonicalDataset
from ..errors import InputError

MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"


def save_model(folder, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``model.safetensors`` then ``model.json`` into ``folder`` (each via a temporary file + rename)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{MODEL_WEIGHTS}.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, folder / MODEL_WEIGHTS)
    tmp = folder / f".{MODEL_META}.tmp"
    tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    os.replace(tmp, folder / MODEL_META)
    return folder


def load_model(folder) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a model folder written by :func:`save_model`."""
    folder = Path(folder)
    if not (folder / MODEL_META).is_file() or not (folder / MODEL_WEIGHTS).is_file():
        raise InputError(f"{folder} holds no finished model ({MODEL_META} + {MODEL_WEIGHTS}); train it first.")
    try:
        with safe_open(str(folder / MODEL_WEIGHTS), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads((folder / MODEL_META).read_text(encoding="utf-8"))
    except (SafetensorError, json.JSONDecodeError, OSError) as exc:
        raise InputError(f"Cannot read the model in {folder}: {exc}") from exc
    return tensors, meta


def with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` under ``prefix.``, with the prefix removed."""
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


class TrainingData:
    """A canonical data set held in memory (float16), served as float32 batches on a device."""

    def __init__(self, folder, device: torch.device) -> None:
        self.dataset = CanonicalDataset(folder, in_memory=True)
        self.grid = self.dataset.grid
        self.device = device
        self.images = self.dataset.tensor("images")
        self.inputs = self.dataset.tensor("inputs") if self.dataset.fractured else None
        self.visible = self.dataset.tensor("visible") if self.dataset.fractured else None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def batch(self, key: str, idx: torch.Tensor) -> torch.Tensor:
        return getattr(self, key)[idx].to(self.device).float()

    def fingerprint(self) -> dict:
        """What identifies the data for resuming: folder, case ids and the tensor file size."""
        f = self.dataset.folder
        return {"folder": str(f.resolve()), "cases": [c["id"] for c in self.dataset.cases],
                "bytes": (f / "tensors.safetensors").stat().st_size}

    def describe(self) -> dict:
        return {"folder": str(self.dataset.folder.resolve()), "cases": len(self), "fractured": self.dataset.fractured,
                "grid": self.grid.to_dict(), "window_hu": list(self.dataset.window_hu),
                "channels": self.dataset.channels}


def pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool (N, C, Z, Y, X) by ``factor`` (identity for 1)."""
    return F.avg_pool3d(x, factor) if factor > 1 else x


def batches(n: int, size: int):
    """Consecutive index tensors covering range(n)."""
    for a in range(0, n, size):
        yield torch.arange(a, min(a + size, n))
