"""Model bundles: a folder with ``weights.safetensors`` + ``config.json``. Loading executes no code.

config.json: {"format": "tibia-recon-bundle/1", "library_version", "grid" (canonical Grid, LPS mm),
"window_hu", "channels", "side_convention", "locnet": {...architecture}, "autoencoder": {"type", ...},
"prototype": bool, "training": {...}, "metrics": {...}, "weights_dtype"}. Weights are stored as float32 or
float16 (half the size; loaded as float32) and their keys are "locnet.*", "autoencoder.*"
and, if present, "prototype" (1, C, Z, Y, X). Tensors are (N, C, Z, Y, X) on the canonical grid.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .canonical import CHANNEL_NAMES
from .errors import BundleError, InputError, OutputExistsError
from .geometry import Grid
from .hidden_end import stretch_to_tibia
from .io import atomic_folder
from .models import AffineGridSampler, Autoencoder, LocNet, build_autoencoder, build_locnet, invert_theta

FORMAT = "tibia-recon-bundle/1"
CONFIG = "config.json"
WEIGHTS = "weights.safetensors"
SIDE_CONVENTION = "left; right legs are mirrored about the sagittal plane before prediction"
REQUIRED_KEYS = ("format", "library_version", "grid", "window_hu", "channels", "side_convention", "locnet",
                 "autoencoder", "prototype", "training")
TYPICAL_TIBIA_MM = 360.0  # an adult tibia's length (300-450 mm), for bundles without a prototype
MAX_GRID_VOXELS = 2**27  # a canonical grid larger than 512^3 voxels is not a plausible bundle setting
_PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".joblib", ".npy", ".npz", ".tar"}


class Bundle:
    """A loaded bundle: models in eval mode on ``device`` plus the canonical grid and intensity window."""

    def __init__(self, config: dict, grid: Grid, locnet: LocNet, autoencoder: Autoencoder,
                 prototype: torch.Tensor | None, device: str | torch.device = "cpu") -> None:
        self.config = config
        self.grid = grid
        self.window_hu = tuple(config["window_hu"])
        self.channels = list(config["channels"])
        self.device = torch.device(device)
        self.locnet = locnet.to(self.device).eval()
        self.autoencoder = autoencoder.to(self.device).eval()
        self.prototype = None if prototype is None else prototype.to(self.device)
        self.sampler = AffineGridSampler(grid).to(self.device)

    def tibia_length_mm(self) -> float:
        """A typical tibia's length (mm): the prototype's along the canonical z axis, else TYPICAL_TIBIA_MM."""
        if self.prototype is None:
            return TYPICAL_TIBIA_MM
        slices = torch.nonzero((self.prototype[0, -1] > 0.5).any(dim=2).any(dim=1))
        return float((slices.max() - slices.min() + 1) * self.grid.spacing[2]) if len(slices) else TYPICAL_TIBIA_MM

    @torch.no_grad()
    def align_and_reconstruct(self, x: torch.Tensor, visible: torch.Tensor | None = None,
                              tibia_z: tuple[float, float] | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """θ (N, 3, 4) in canonical mm, x aligned to standard coordinates, and its reconstruction there.

        ``x`` (N, C, Z, Y, X) is on the canonical grid (fracture region zeroed); ``visible``
        (N, 1, Z, Y, X) marks its observed voxels (all when None). Voxels that the alignment pulls
        from outside the input count as not visible. ``tibia_z`` (N = 1): the tibia mask's canonical z range;
        where the fracture mask hides the tibia's proximal end, θ is stretched along z to reach it and the input
        reconstructed again (:mod:`hidden_end`).
        """
        x = x.to(self.device, torch.float32)
        theta = self.locnet(x)
        aligned, recon = self.reconstruct(x, visible, theta)
        if tibia_z is not None:
            stretch = stretch_to_tibia(theta, recon, x[0, -1].cpu().numpy(), tibia_z, self.grid)
            if stretch is not None:
                theta = stretch.theta
                aligned, recon = self.reconstruct(x, visible, theta)
        return theta, aligned, recon

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, visible: torch.Tensor | None, theta: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (N, C, Z, Y, X, canonical) aligned to standard coordinates by ``theta`` and its reconstruction
        there; ``visible`` as for :meth:`align_and_reconstruct`."""
        x = x.to(self.device, torch.float32)
        vis = torch.ones_like(x[:, :1]) if visible is None else visible.to(self.device, torch.float32)
        both = self.sampler(torch.cat([x, vis], dim=1), theta)  # one resampling for the image and its visibility
        aligned, vis_aligned = both[:, :-1], (both[:, -1:] > 0.5).float()
        return aligned, self.autoencoder.reconstruct(aligned, vis_aligned)

    @torch.no_grad()
    def reconstruction_std(self, x: torch.Tensor, visible: torch.Tensor, theta: torch.Tensor) -> torch.Tensor | None:
        """Posterior standard deviation (N, C, Z, Y, X) of the reconstruction in standard coordinates for the input
        ``x`` aligned by ``theta`` (as :meth:`align_and_reconstruct` aligns it), or None when the autoencoder has no
        posterior (only PCA has one)."""
        if not hasattr(self.autoencoder, "reconstruction_std"):
            return None
        x, theta = x.to(self.device, torch.float32), theta.to(self.device, torch.float32)
        vis_aligned = (self.sampler(visible.to(self.device, torch.float32), theta) > 0.5).float()
        return self.autoencoder.reconstruction_std(self.sampler(x, theta), vis_aligned)

    @torch.no_grad()
    def to_input_frame(self, standard: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Map tensors from standard coordinates back onto the input's canonical grid (applies θ⁻¹)."""
        return self.sampler(standard.to(self.device), invert_theta(theta.to(self.device).double()).float())


def save_bundle(folder, *, grid: Grid, window_hu, locnet: LocNet, autoencoder: Autoencoder,
                prototype: torch.Tensor | None = None, training: dict | None = None, metrics: dict | None = None,
                channels: list[str] | None = None, float16: bool = False, overwrite: bool = False) -> Path:
    """Write a bundle folder atomically (temporary sibling folder renamed into place); ``float16`` stores the
    weights at half precision."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise OutputExistsError(f"{folder} already exists and is not empty; choose another folder or allow "
                                f"overwriting.")
    c = locnet.config.in_channels
    config = {"format": FORMAT, "library_version": __version__, "grid": grid.to_dict(),
              "window_hu": [float(w) for w in window_hu], "channels": list(channels or CHANNEL_NAMES[:c]),
              "side_convention": SIDE_CONVENTION, "locnet": locnet.config.to_dict(),
              "autoencoder": dict(autoencoder.config), "prototype": prototype is not None,
              "training": training or {}, "metrics": metrics or {},
              "weights_dtype": "float16" if float16 else "float32"}
    weights = {f"locnet.{k}": v for k, v in locnet.state_dict().items()}
    weights.update({f"autoencoder.{k}": v for k, v in autoencoder.state_dict().items()})
    if prototype is not None:
        weights["prototype"] = prototype.detach().reshape(1, c, *grid.shape)
    dtype = torch.float16 if float16 else torch.float32
    weights = {k: v.detach().cpu().to(dtype).contiguous() for k, v in weights.items()}
    _check_consistent(config, grid, {k: list(v.shape) for k, v in weights.items()}, folder)
    with atomic_folder(folder) as tmp:
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / CONFIG).write_text(json.dumps(config, indent=1), encoding="utf-8")
    return folder


def load_bundle(folder, device: str | torch.device = "cpu") -> Bundle:
    """Load and validate a bundle (format, version, keys, shapes); raises BundleError saying what to fix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"No model bundle at {folder}: expected a folder with {CONFIG} and {WEIGHTS}.")
    _refuse_pickles(folder)
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise BundleError(f"The model bundle {folder} lacks {name}; re-export it with `tibia-recon export-bundle`.")
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise BundleError(f"{folder / CONFIG} is not valid JSON ({exc}); re-export the bundle.") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise BundleError(f"{folder} has bundle format {found!r}, but this library (version {__version__}) reads "
                          f"only {FORMAT!r}. Use a matching library version or re-export the bundle.")
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise BundleError(f"{folder / CONFIG} lacks {missing}; re-export the bundle.")
    grid = _check_config_values(config, folder)
    try:  # on the meta device first: shapes only, no memory, so a corrupt config cannot exhaust memory
        with torch.device("meta"):
            expected = _expected_shapes(config, grid, build_locnet(config["locnet"]),
                                        build_autoencoder(config["autoencoder"]))
    except Exception as exc:  # noqa: BLE001 - the config is untrusted data; any failure means it is unusable
        raise BundleError(f"{folder / CONFIG} describes models this library cannot build: {exc}") from None
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
            _check_consistent(config, grid, shapes, folder)
            _check_keys(expected, shapes, folder)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except BundleError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, KeyError, MemoryError) as exc:
        raise BundleError(f"{folder / WEIGHTS} is not a readable safetensors file ({exc}); re-export the bundle.") \
            from None
    # as float32 (float16 bundles), checked with numpy: torch's isfinite is many times slower on the CPU
    tensors = {k: v.float() if torch.is_floating_point(v) else v for k, v in tensors.items()}
    bad = [k for k, v in tensors.items() if not torch.is_floating_point(v) or not np.isfinite(v.numpy()).all()]
    if bad:
        raise BundleError(f"The weights {bad[:5]} in {folder / WEIGHTS} are not finite floating point numbers (NaN, "
                          "infinite or of integer type); the file is corrupt. Re-export the bundle.")
    try:
        locnet = build_locnet(config["locnet"])
        autoencoder = build_autoencoder(config["autoencoder"])
        locnet.load_state_dict({k[len("locnet."):]: v for k, v in tensors.items() if k.startswith("locnet.")})
        autoencoder.load_state_dict({k[len("autoencoder."):]: v for k, v in tensors.items()
                                     if k.startswith("autoencoder.")})
        prototype = tensors["prototype"] if config["prototype"] else None
        return Bundle(config, grid, locnet, autoencoder, prototype, device)
    except (InputError, RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise BundleError(f"The model bundle {folder} cannot be loaded: {exc}. Re-export the bundle.") from None


def _check_config_values(config: dict, folder: Path) -> Grid:
    """The types and ranges of the config's values; returns its canonical grid."""
    where = folder / CONFIG

    def finite(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    window = config["window_hu"]
    if not (isinstance(window, list) and len(window) == 2 and all(finite(w) for w in window) and window[0] < window[1]):
        raise BundleError(f"{where}: 'window_hu' must be two numbers [low, high] in HU with low < high, got "
                          f"{window!r}; re-export the bundle.")
    channels = config["channels"]
    if not (isinstance(channels, list) and channels and all(isinstance(c, str) for c in channels)):
        raise BundleError(f"{where}: 'channels' must be a non-empty list of channel names, got {channels!r}; "
                          "re-export the bundle.")
    for key in ("locnet", "autoencoder", "training"):
        if not isinstance(config[key], dict):
            raise BundleError(f"{where}: {key!r} must be a JSON object, got {config[key]!r}; re-export the bundle.")
    if not isinstance(config["prototype"], bool):
        raise BundleError(f"{where}: 'prototype' must be true or false, got {config['prototype']!r}.")
    try:
        grid = Grid.from_dict(config["grid"])
    except Exception as exc:  # noqa: BLE001 - untrusted data
        raise BundleError(f"{where}: 'grid' is not a valid canonical grid (size, spacing, origin, direction): "
                          f"{exc}; re-export the bundle.") from None
    if math.prod(grid.size) > MAX_GRID_VOXELS:
        raise BundleError(f"{where}: the canonical grid {list(grid.size)} has more than {MAX_GRID_VOXELS} voxels; "
                          "the bundle is corrupt. Re-export it.")
    return grid


def _expected_shapes(config: dict, grid: Grid, locnet: LocNet, autoencoder: Autoencoder) -> dict[str, list[int]]:
    shapes = {f"locnet.{k}": list(v.shape) for k, v in locnet.state_dict().items()}
    shapes.update({f"autoencoder.{k}": list(v.shape) for k, v in autoencoder.state_dict().items()})
    if config["prototype"]:
        shapes["prototype"] = [1, len(config["channels"]), *grid.shape]
    return shapes


def _check_keys(expected: dict[str, list[int]], found: dict[str, list[int]], folder: Path) -> None:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = [f"{k}: expected {expected[k]}, found {found[k]}" for k in sorted(set(expected) & set(found))
             if expected[k] != found[k]]
    problems = ([f"missing weights {missing}"] if missing else []) + (
        [f"unexpected weights {extra}"] if extra else []) + ([f"wrong shapes: {'; '.join(wrong)}"] if wrong else [])
    if problems:
        raise BundleError(f"The weights in {folder / WEIGHTS} do not match its {CONFIG}: " + "; ".join(problems)
                          + ". The bundle is corrupt or mixed from different exports; re-export it.")


def _check_consistent(config: dict, grid: Grid, shapes: dict[str, list[int]], folder: Path) -> None:
    """Channels and grid in the config agree with the model settings."""
    c = len(config["channels"])
    if config["locnet"].get("in_channels", 2) != c or config["autoencoder"].get("in_channels", 2) != c:
        raise BundleError(f"{folder}: the LocNet and autoencoder must take {c} channels as the bundle's channel "
                          f"list says ({config['channels']}).")
    ae_shape = config["autoencoder"].get("shape")
    if ae_shape is not None and list(ae_shape) != list(grid.shape):
        raise BundleError(f"{folder}: the autoencoder works on (Z, Y, X) {ae_shape} but the canonical grid is "
                          f"{list(grid.shape)}.")
    if config["prototype"] and "prototype" not in shapes:
        raise BundleError(f"{folder}: the config announces a prototype but the weights have none; re-export it.")


def _refuse_pickles(folder: Path) -> None:
    checked = (folder / WEIGHTS, folder / CONFIG)  # parsed by safetensors / json, which execute nothing
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p not in checked):
        with open(path, "rb") as f:
            head = f.read(2)
        if path.suffix.lower() in _PICKLE_SUFFIXES or (len(head) == 2 and head[0] == 0x80 and head[1] <= 5) \
                or head == b"PK":
            raise BundleError(f"The bundle {folder} contains {path.name}, which looks like a pickle or archive; "
                              f"loading those can run code, so bundles hold only {WEIGHTS} and JSON. Remove the "
                              f"file or re-export the bundle with `tibia-recon export-bundle`.")
