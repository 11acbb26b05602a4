"""Canonical data sets on disk: tensors on the canonical grid, written by `prepare`, read by training.

A data set is a folder with

* ``manifest.json``: {"format": "tibia-recon-canonical/1", "grid": Grid.to_dict(), "window_hu": [lo, hi],
  "channels": [...], "cases": [{"id", "side", "patient_to_canonical": 4x4 LPS mm, ...}, ...], ...}
* ``tensors.safetensors``: "images" float16 (N, C, Z, Y, X) (healthy tibia), and for fractured data
  sets also "inputs" float16 (N, C, Z, Y, X) (fracture region zeroed) and "visible" uint8
  (N, 1, Z, Y, X) (1 - fracture mask).

Channel 0 is the tibia-masked intensity mapped from the HU window to [0, 1], channel 1 the tibia
occupancy in [0, 1]. Arrays are (k, j, i) = (Z, Y, X) on the canonical grid (LPS mm, centred at 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import InputError, OutputExistsError
from .geometry import Grid
from .io import atomic_folder

FORMAT = "tibia-recon-canonical/1"
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
CHANNEL_NAMES = ["intensity: tibia-masked HU, window mapped to [0, 1]", "occupancy: tibia mask in [0, 1]"]
_DTYPES = {"images": ("F16", torch.float16), "inputs": ("F16", torch.float16), "visible": ("U8", torch.uint8)}


def _to_tensor(values, name: str, dtype: torch.dtype) -> torch.Tensor:
    t = values if isinstance(values, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(values))
    if not torch.is_floating_point(t) and dtype.is_floating_point:
        raise InputError(f"'{name}' must hold floating point values in [0, 1], got dtype {t.dtype}.")
    return t.detach().cpu().to(dtype).contiguous()


def _case_to_json(case: dict, index: int) -> dict:
    missing = {"id", "side", "patient_to_canonical"} - set(case)
    if missing:
        raise InputError(f"Case {index} lacks {sorted(missing)}; every case needs 'id', 'side' and "
                         f"'patient_to_canonical' (4x4 LPS mm).")
    out = {k: (v.tolist() if isinstance(v, (np.ndarray, torch.Tensor)) else v) for k, v in case.items()}
    if np.asarray(out["patient_to_canonical"], dtype=float).shape != (4, 4):
        raise InputError(f"Case {case['id']!r}: 'patient_to_canonical' must be a 4x4 matrix.")
    return out


def write_canonical_dataset(folder, grid: Grid, window, cases: Sequence[dict], images, inputs=None, visible=None,
                            *, channels: Sequence[str] | None = None, extra: dict | None = None,
                            overwrite: bool = False) -> Path:
    """Write a canonical data set folder atomically (a temporary sibling folder renamed into place).

    ``images``/``inputs``: (N, C, Z, Y, X) floats in [0, 1] (numpy or torch), stored as float16;
    ``visible``: (N, 1, Z, Y, X), stored as uint8. ``extra`` adds top-level manifest entries.
    An existing non-empty ``folder`` is replaced only with ``overwrite=True``.
    """
    folder = Path(folder)
    if (inputs is None) != (visible is None):
        raise InputError("A fractured data set needs both 'inputs' and 'visible' (or neither).")
    tensors = {"images": _to_tensor(images, "images", torch.float16)}
    if inputs is not None:
        tensors["inputs"] = _to_tensor(inputs, "inputs", torch.float16)
        tensors["visible"] = _to_tensor(visible, "visible", torch.uint8)
    n, c = tensors["images"].shape[:2]
    names = list(channels) if channels is not None else CHANNEL_NAMES[:c]
    manifest = {"format": FORMAT, "grid": grid.to_dict(), "window_hu": [float(w) for w in window],
                "channels": names, "cases": [_case_to_json(case, i) for i, case in enumerate(cases)], **(extra or {})}
    _validate(manifest, {k: (_DTYPES[k][0], list(v.shape)) for k, v in tensors.items()}, folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise OutputExistsError(f"{folder} already exists and is not empty; choose another folder or allow "
                                f"overwriting.")
    with atomic_folder(folder) as tmp:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return folder


def _validate(manifest: dict, tensors: dict[str, tuple[str, list[int]]], where) -> Grid:
    """Check a manifest and the (dtype, shape) of its tensors; return the grid. Raises InputError."""
    if manifest.get("format") != FORMAT:
        raise InputError(f"{where} is not a canonical data set of format {FORMAT!r} (found "
                         f"{manifest.get('format')!r}); re-run `tibia-recon prepare` to make one.")
    for key in ("grid", "window_hu", "channels", "cases"):
        if key not in manifest:
            raise InputError(f"The manifest of {where} lacks {key!r}; re-run `tibia-recon prepare`.")
    grid = Grid.from_dict(manifest["grid"])
    n, c = len(manifest["cases"]), len(manifest["channels"])
    if "images" not in tensors:
        raise InputError(f"{where} has no 'images' tensor.")
    if ("inputs" in tensors) != ("visible" in tensors):
        raise InputError(f"{where} must have both 'inputs' and 'visible' tensors or neither.")
    for key, (dtype, shape) in tensors.items():
        if key not in _DTYPES:
            raise InputError(f"{where} holds an unknown tensor {key!r}; expected {sorted(_DTYPES)}.")
        expected = [n, 1 if key == "visible" else c, *grid.shape]
        if shape != expected or dtype != _DTYPES[key][0]:
            raise InputError(f"Tensor {key!r} of {where} has dtype {dtype} and shape {shape}; expected "
                             f"{_DTYPES[key][0]} {expected} ({n} cases, {c} channels, grid (Z, Y, X) {grid.shape}).")
    return grid


class CanonicalDataset(torch.utils.data.Dataset):
    """A canonical data set folder as a torch Dataset of dicts with float32 tensors.

    Item i: {"index": i, "image": (C, Z, Y, X)} and, for fractured sets, "input" (C, Z, Y, X) and
    "visible" (1, Z, Y, X). ``in_memory=False`` reads each case from the file on demand.
    """

    def __init__(self, folder, in_memory: bool = True) -> None:
        self.folder = Path(folder)
        manifest_path, tensor_path = self.folder / MANIFEST, self.folder / TENSORS
        if not manifest_path.is_file() or not tensor_path.is_file():
            raise InputError(f"{self.folder} is not a canonical data set: it needs {MANIFEST} and {TENSORS}. "
                             f"Make one with `tibia-recon prepare`.")
        try:
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            self._file = safe_open(str(tensor_path), framework="pt")
        except (json.JSONDecodeError, SafetensorError, OSError) as exc:
            raise InputError(f"Cannot read the canonical data set {self.folder}: {exc}") from exc
        shapes = {k: (self._file.get_slice(k).get_dtype(), list(self._file.get_slice(k).get_shape()))
                  for k in self._file.keys()}
        self.grid = _validate(self.manifest, shapes, self.folder)
        self.keys = sorted(shapes)
        self._cache = {k: self._file.get_tensor(k) for k in self.keys} if in_memory else None

    @property
    def cases(self) -> list[dict]:
        return self.manifest["cases"]

    @property
    def window_hu(self) -> tuple[float, float]:
        return tuple(self.manifest["window_hu"])

    @property
    def channels(self) -> list[str]:
        return self.manifest["channels"]

    @property
    def fractured(self) -> bool:
        """True if the set holds fractured inputs and visibility masks besides the healthy images."""
        return "inputs" in self.keys

    def __len__(self) -> int:
        return len(self.cases)

    def tensor(self, key: str, index=slice(None)) -> torch.Tensor:
        """Stored tensor ``key`` ("images", "inputs", "visible") at ``index``, in its stored dtype."""
        if key not in self.keys:
            raise InputError(f"{self.folder} has no {key!r} tensor (it has {self.keys}).")
        if self._cache is not None:
            return self._cache[key][index]
        return self._file.get_slice(key)[index]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        item = {"index": i, "image": self.tensor("images", slice(i, i + 1))[0].float()}
        if self.fractured:
            item["input"] = self.tensor("inputs", slice(i, i + 1))[0].float()
            item["visible"] = self.tensor("visible", slice(i, i + 1))[0].float()
        return item
