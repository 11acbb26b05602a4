"""`tibia-recon evaluate`: the paper's Table 1 on a held-out canonical data set (Markdown + CSV + PNG).

Rows are registration × autoencoder, as in the paper (Zhou et al. 2025, Table 1 and §3.2):

* registrations: *w/o registration* (identity; autoencoders trained on the unaligned data,
  ``--raw-step2``), *Direct AGS* (``--direct``: a step-1 run in direct mode; each held-out case gets
  its own θ, optimised against that run's frozen prototype as step 1 did for its training cases),
  *STN* (``--step1`` LocNet; ``--step2`` autoencoders) and *mask-robust STN* (``--step3``: its
  LocNet and autoencoders; the ``--step1`` prototype);
* autoencoders: *P* (the prototype, whatever the input), then every autoencoder model folder found
  for that registration (PCA32, PCA16, VAE and VQ-VAE are the paper's; other models are added rows).

For each case the input is aligned by the row's registration (θ), reconstructed by the row's
autoencoder, and compared with the case's healthy image moved by the same θ ("the aligned healthy
target in standard coordinates") with :func:`~TibiaReconstructionLib.metrics.table1_row` (spacing
of the data set's canonical grid). ``masked=True`` is the paper's masked evaluation: the input is the
case's fractured input and visibility mask when the data set has them, else the healthy image with
random block masks (step 3's masking settings, fixed seed); only the mask-robust rows apply.
Rows whose models were not given or not trained are skipped and listed with the reason; no number
is ever filled in that was not computed here. Each row is summarised as mean ± 95% CI
(:func:`~TibiaReconstructionLib.metrics.mean_ci`) next to the paper's published numbers.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import InputError, OutputExistsError

FILES = {"md": "table1.md", "csv": "table1.csv", "png": "table1.png"}
MASK_SEED = 20251209  # block masks of case i come from numpy.random.default_rng([MASK_SEED, i])
FIGURE_CASE = 0       # the case shown in table1.png

REGISTRATIONS = {  # key -> (title as in the paper, where its models come from)
    "raw": ("w/o registration", "--raw-step2"),
    "direct": ("Direct AGS registration", "--direct (+ --direct-step2)"),
    "stn": ("STN registration", "--step1 + --step2"),
    "robust": ("Mask-robust STN registration", "--step3 (+ the --step1 prototype)"),
}
PAPER_AES = ("P", "PCA32", "PCA16", "VAE", "VQ-VAE")
PAPER_KEYS = ("dssim15", "dssim11", "dssim7", "dssim3", "psnr", "rmse", "rmsd")
# Table 1 of the paper, copied verbatim: registration, autoencoder, then in the paper's column order
# D-SSIM 15/11/7/3 (x 1e-2), PSNR (dB), RMSE (x 1e-2), RMSD (mm) as "mean ± 95% CI half width"; N/A as there.
_PAPER_TEXT = """
raw    P      N/A
raw    PCA32  1.66 ± 0.08 | 1.66 ± 0.08 | 1.67 ± 0.08 | 1.71 ± 0.06 | 32.0 ± 0.4 | 2.5 ± 0.3 | 1.6 ± 0.1
raw    PCA16  1.70 ± 0.08 | 1.70 ± 0.08 | 1.69 ± 0.08 | 1.70 ± 0.07 | 31.5 ± 0.4 | 2.7 ± 0.4 | 1.6 ± 0.1
raw    VAE    0.72 ± 0.03 | 0.72 ± 0.03 | 0.73 ± 0.03 | 0.77 ± 0.04 | 33.1 ± 0.4 | 2.3 ± 0.5 | 0.74 ± 0.03
raw    VQ-VAE 0.145 ± 0.009 | 0.146 ± 0.009 | 0.15 ± 0.01 | 0.26 ± 0.01 | 43.8 ± 0.6 | 0.7 ± 0.1 | 0.74 ± 0.02
direct P      1.14 ± 0.05 | 1.13 ± 0.05 | 1.05 ± 0.04 | 0.82 ± 0.03 | 28.3 ± 0.3 | 3.9 ± 0.7 | 2.0 ± 0.9
direct PCA32  1.63 ± 0.08 | 1.63 ± 0.08 | 1.64 ± 0.08 | 1.68 ± 0.06 | 32.3 ± 0.4 | 2.4 ± 0.3 | 1.6 ± 0.1
direct PCA16  1.68 ± 0.08 | 1.68 ± 0.08 | 1.67 ± 0.08 | 1.68 ± 0.07 | 31.8 ± 0.4 | 2.6 ± 0.3 | 1.6 ± 0.1
direct VAE    1.157 ± 0.006 | 1.16 ± 0.06 | 1.17 ± 0.06 | 1.25 ± 0.06 | 40.2 ± 0.3 | 1.00 ± 0.06 | 0.569 ± 0.008
direct VQ-VAE 0.11 ± 0.01 | 0.11 ± 0.01 | 0.12 ± 0.01 | 0.17 ± 0.02 | 45.8 ± 0.3 | 0.52 ± 0.02 | 0.384 ± 0.007
stn    P      0.363 ± 0.005 | 0.36 ± 0.05 | 0.35 ± 0.04 | 0.30 ± 0.03 | 35.7 ± 0.5 | 1.8 ± 0.2 | 0.8 ± 0.3
stn    PCA32  0.26 ± 0.05 | 0.26 ± 0.05 | 0.26 ± 0.04 | 0.26 ± 0.03 | 39.5 ± 0.6 | 1.1 ± 0.1 | 0.7 ± 0.1
stn    PCA16  0.27 ± 0.05 | 0.27 ± 0.05 | 0.27 ± 0.04 | 0.27 ± 0.03 | 38.9 ± 0.5 | 1.2 ± 0.2 | 0.7 ± 0.1
stn    VAE    0.12 ± 0.02 | 0.12 ± 0.02 | 0.12 ± 0.02 | 0.16 ± 0.01 | 42.3 ± 0.4 | 0.8 ± 0.8 | 0.53 ± 0.03
stn    VQ-VAE 0.06 ± 0.01 | 0.06 ± 0.01 | 0.07 ± 0.01 | 0.11 ± 0.01 | 51.2 ± 0.2 | 0.279 ± 0.006 | 0.395 ± 0.005
robust P      N/A
robust PCA32  0.42 ± 0.02 | 0.42 ± 0.02 | 0.41 ± 0.02 | 0.35 ± 0.01 | 36.3 ± 0.5 | 1.6 ± 0.2 | 0.67 ± 0.03
robust PCA16  0.44 ± 0.02 | 0.44 ± 0.02 | 0.42 ± 0.02 | 0.37 ± 0.01 | 36.2 ± 0.5 | 1.6 ± 0.2 | 0.67 ± 0.03
robust VAE    0.143 ± 0.008 | 0.143 ± 0.008 | 0.144 ± 0.008 | 0.159 ± 0.006 | 43.3 ± 0.3 | 0.70 ± 0.04 | 0.52 ± 0.01
robust VQ-VAE 0.30 ± 0.03 | 0.30 ± 0.03 | 0.31 ± 0.03 | 0.35 ± 0.03 | 44.0 ± 0.7 | 0.68 ± 0.05 | 0.60 ± 0.04
"""
PAPER_TABLE1: dict[str, dict[str, tuple[str, ...] | None]] = {}
for _line in _PAPER_TEXT.strip().splitlines():
    _reg, _ae, _values = _line.split(maxsplit=2)
    PAPER_TABLE1.setdefault(_reg, {})[_ae] = None if _values == "N/A" else tuple(_values.split(" | "))
# Markdown columns: metric key, header, display scale
COLUMNS = (("dssim15", "D-SSIM₁₅ ↓", 100.0), ("dssim11", "D-SSIM₁₁ ↓", 100.0), ("dssim7", "D-SSIM₇ ↓", 100.0),
           ("dssim3", "D-SSIM₃ ↓", 100.0), ("psnr", "PSNR ↑", 1.0), ("rmse", "RMSE ↓", 100.0),
           ("rmsd", "RMSD (mm) ↓", 1.0), ("dice", "Dice ↑", 1.0), ("hd95", "HD95 (mm) ↓", 1.0))


# ---------------------------------------------------------------------------------------------
# Models of one registration


@dataclass
class AERow:
    """One autoencoder row: ``model`` None means the prototype (P)."""

    label: str
    name: str
    folder: str
    model: torch.nn.Module | None = None
    mask_robust: bool = False


@dataclass
class Registration:
    key: str
    source: str                                   # the folders it comes from, for the report
    theta_fn: Callable[[torch.Tensor], torch.Tensor] | None  # None: identity (no resampling)
    prototype: torch.Tensor | None
    rows: list[AERow] = field(default_factory=list)
    masking: dict | None = None                   # step 3's block-mask settings (mask-robust rows)

    @property
    def title(self) -> str:
        return REGISTRATIONS[self.key][0]


def _paper_label(config: dict) -> str:
    kind = config.get("type")
    if kind == "pca":
        return f"PCA{config['components']}"
    return {"vae": "VAE", "vqvae": "VQ-VAE"}.get(kind, str(kind))


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "model.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def find_autoencoders(folder) -> list[tuple[str, Path, dict]]:
    """(name, folder, meta) of every finished autoencoder model folder directly inside ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of trained models (a step-2/step-3 output folder).")
    found = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        meta = _read_meta(sub)
        if meta and meta.get("kind") == "autoencoder" and (sub / "model.safetensors").is_file():
            found.append((sub.name, sub, meta))
    return found


def _order(label: str) -> tuple:
    """P, the PCAs by decreasing rank (PCA32, PCA16, ...), VAE, VQ-VAE, then any other model."""
    base = label.split(" (")[0]
    if base == "P":
        return (0, 0, label)
    if base.startswith("PCA") and base[3:].isdigit():
        return (1, -int(base[3:]), label)
    if base in ("VAE", "VQ-VAE"):
        return (2, PAPER_AES.index(base), label)
    return (3, 0, label)


def _check_grid(meta_grid: dict | None, grid, what: str) -> None:
    from .geometry import Grid

    if meta_grid is None:
        return
    other = Grid.from_dict(meta_grid)
    if not other.same_as(grid):
        raise InputError(f"{what} was trained on the canonical grid of size {list(other.size)} and spacing "
                         f"{other.spacing.tolist()} mm, but the evaluation data set has size {list(grid.size)} and "
                         f"spacing {grid.spacing.tolist()} mm; prepare the evaluation set with the same grid.")


def load_autoencoder_rows(folder, grid, channels: int, device: torch.device, mask_robust: bool) -> list[AERow]:
    """The autoencoders in ``folder`` as table rows (loaded, eval mode), in the paper's order."""
    from .models import build_autoencoder
    from .training.artifacts import load_model, with_prefix

    rows = []
    for name, sub, meta in find_autoencoders(folder):
        config = meta["autoencoder"]
        train = (meta.get("data") or {}).get("train") or {}
        _check_grid(train.get("grid"), grid, f"The autoencoder in {sub}")
        if config.get("in_channels", channels) != channels:
            raise InputError(f"The autoencoder in {sub} takes {config.get('in_channels')} channels but the evaluation "
                             f"data set has {channels}.")
        if config.get("type") == "pca" and list(config.get("shape", grid.shape)) != list(grid.shape):
            raise InputError(f"The PCA in {sub} works on (Z, Y, X) {config['shape']} but the evaluation data set "
                             f"has {list(grid.shape)}.")
        tensors, meta = load_model(sub)
        model = build_autoencoder(config)
        model.load_state_dict(with_prefix(tensors, "autoencoder"))
        rows.append(AERow(_paper_label(config), name, str(sub), model.to(device).eval(), mask_robust))
    labels = [r.label for r in rows]
    for r in rows:  # two models of one kind in one folder: tell them apart by folder name
        if labels.count(r.label) > 1:
            r.label = f"{r.label} ({r.name})"
    return sorted(rows, key=lambda r: _order(r.label))


def _load_step1(folder, grid, device: torch.device, mode: str, option: str):
    from .models import build_locnet
    from .training.artifacts import load_model, with_prefix

    tensors, meta = load_model(folder)
    if meta.get("kind") != "step1":
        raise InputError(f"{folder} ({option}) is not a step-1 output folder (its model.json has kind "
                         f"{meta.get('kind')!r}).")
    if meta["mode"] != mode:
        hint = "--direct" if meta["mode"] == "direct" else "--step1"
        raise InputError(f"{folder} is a step-1 run in {meta['mode']!r} mode; {option} needs a {mode!r} run "
                         f"(pass this one as {hint}).")
    _check_grid(meta["grid"], grid, f"The step-1 model in {folder}")
    prototype = tensors["prototype"].float().to(device)
    locnet = None
    if mode == "stn":
        locnet = build_locnet(meta["locnet"])
        locnet.load_state_dict(with_prefix(tensors, "locnet"))
        locnet = locnet.to(device).eval()
    return prototype, locnet, meta


def _load_locnet(folder, device: torch.device):
    from .models import build_locnet
    from .training.artifacts import load_model, with_prefix

    tensors, meta = load_model(Path(folder) / "locnet")
    locnet = build_locnet(meta["locnet"])
    locnet.load_state_dict(with_prefix(tensors, "locnet"))
    return locnet.to(device).eval(), meta


def fit_direct_thetas(x: torch.Tensor, prototype: torch.Tensor, grid, config: dict, steps: int,
                      progress: bool = True, desc: str = "") -> torch.Tensor:
    """Direct AGS for held-out cases: per-case θ minimising D-SSIM(x̄, A(x_i, θ_i)) with x̄ frozen.

    Same parametrisation, resolution (``loss_downsample``), window and optimiser (AdamW,
    ``direct.lr``) as step 1's direct mode; ``steps`` optimiser steps (step 1 gave each training
    case ``direct.inner_steps`` per epoch). The batch-mean anchor of step 1 is left out: the frozen
    prototype fixes the frame. Cases do not interact (per-case parameters, elementwise optimiser).
    """
    from tqdm import tqdm

    from .models import AffineGridSampler, coarser_grid
    from .training.artifacts import pool
    from .training.losses import dssim
    from .training.step1_registration import ThetaTable

    f, win = int(config["loss_downsample"]), int(config["ssim_window"])
    sampler = AffineGridSampler(coarser_grid(grid, f)).to(x.device)
    pooled, proto = pool(x, f), pool(prototype, f)
    table = ThetaTable(x.shape[0], float(config.get("locnet", {}).get("translation_unit_mm", 10.0))).to(x.device)
    optimizer = torch.optim.AdamW([table.delta], lr=config["direct"]["lr"], weight_decay=0.0)
    for _ in tqdm(range(steps), desc=desc or "direct AGS", leave=False, disable=not progress):
        loss = dssim(sampler(pooled, table.theta(table.delta)), proto, win).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return table.theta(table.delta).detach()


def build_registrations(args, grid, channels: int, device: torch.device, masked: bool
                        ) -> tuple[list[Registration], list[tuple[str, str, str]], list[str]]:
    """The registrations to evaluate, the skipped rows (registration, autoencoder, reason) and notes."""
    regs: list[Registration] = []
    skipped: list[tuple[str, str, str]] = []
    notes: list[str] = []

    def skip_all(key: str, reason: str, labels=PAPER_AES) -> None:
        skipped.extend((REGISTRATIONS[key][0], label, reason) for label in labels)

    def skip_missing(reg: Registration, folder: str | None, option: str, what: str = "") -> None:
        present = {r.label.split(" (")[0] for r in reg.rows}
        for label in PAPER_AES:
            if label == "P" or label in present:
                continue
            why = f"no {option} given{what}" if folder is None else f"no trained {label} model in {folder}"
            if label.startswith("PCA") and folder is not None:
                why = f"no trained PCA with {label[3:]} components in {folder}"
            skipped.append((reg.title, label, why))

    not_applicable = "not applicable to masked inputs (only the mask-robust STN registration applies, as in the paper)"
    # w/o registration
    if masked:
        skip_all("raw", not_applicable)
    elif args.raw_step2 is None:
        skip_all("raw", "no --raw-step2 given (autoencoders trained on the unaligned data)")
    else:
        reg = Registration("raw", f"identity; autoencoders in {args.raw_step2}", None, None,
                           load_autoencoder_rows(args.raw_step2, grid, channels, device, False))
        skipped.append((reg.title, "P", "not defined: there is no prototype without registration (N/A in the paper)"))
        skip_missing(reg, args.raw_step2, "--raw-step2")
        regs.append(reg)
    # Direct AGS
    if masked:
        skip_all("direct", not_applicable)
    elif args.direct is None:
        skip_all("direct", "no --direct given (a step-1 run in direct mode)")
    else:
        prototype, _, meta = _load_step1(args.direct, grid, device, "direct", "--direct")
        config = meta["config"]
        steps = args.direct_steps if args.direct_steps is not None else \
            int(config["epochs"]) * int(config["direct"]["inner_steps"])
        if steps < 1:
            raise InputError(f"--direct-steps must be at least 1, got {steps}.")

        def direct_theta(x: torch.Tensor, _c=config, _p=prototype, _s=steps) -> torch.Tensor:
            with torch.enable_grad():
                return fit_direct_thetas(x, _p, grid, _c, _s, desc="direct AGS θ")

        rows = [AERow("P", "prototype", str(args.direct))]
        if args.direct_step2 is not None:
            rows += load_autoencoder_rows(args.direct_step2, grid, channels, device, False)
        reg = Registration("direct", f"prototype of {args.direct}; per-case θ fitted with {steps} AdamW steps "
                                     f"(lr {config['direct']['lr']}) at 1/{config['loss_downsample']} resolution"
                           + (f"; autoencoders in {args.direct_step2}" if args.direct_step2 else ""),
                           direct_theta, prototype, rows)
        skip_missing(reg, args.direct_step2, "--direct-step2", " (autoencoders trained on the direct-AGS-aligned set)")
        regs.append(reg)
    # STN (always loaded: its prototype is also the mask-robust rows' P)
    prototype, locnet, meta = _load_step1(args.step1, grid, device, "stn", "--step1")
    _note_overlap(args.step1, args.data, notes)
    if masked:
        skip_all("stn", not_applicable)
    else:
        rows = [AERow("P", "prototype", str(args.step1))]
        if args.step2 is not None:
            rows += load_autoencoder_rows(args.step2, grid, channels, device, False)
        reg = Registration("stn", f"LocNet and prototype of {args.step1}"
                           + (f"; autoencoders in {args.step2}" if args.step2 else ""), locnet, prototype, rows)
        skip_missing(reg, args.step2, "--step2")
        regs.append(reg)
    # Mask-robust STN
    if args.step3 is None:
        skip_all("robust", "no --step3 given")
    elif not (Path(args.step3) / "locnet" / "model.json").is_file():
        skip_all("robust", f"no trained mask-robust LocNet in {Path(args.step3) / 'locnet'}")
    else:
        robust_locnet, loc_meta = _load_locnet(args.step3, device)
        rows = [AERow("P", "prototype", str(args.step1))]
        rows += load_autoencoder_rows(args.step3, grid, channels, device, True)
        reg = Registration("robust", f"mask-robust LocNet and autoencoders of {args.step3}; prototype of {args.step1}",
                           robust_locnet, prototype, rows, loc_meta["config"]["masking"])
        skip_missing(reg, args.step3, "--step3")
        regs.append(reg)
    return regs, skipped, notes


def _note_overlap(step1, data, notes: list[str]) -> None:
    """A note when evaluation case ids were also step-1 training cases (from step1/aligned)."""
    manifest = Path(step1) / "aligned" / "manifest.json"
    try:
        train_ids = {c["id"] for c in json.loads(manifest.read_text(encoding="utf-8"))["cases"]}
        ids = {c["id"] for c in json.loads((Path(data) / "manifest.json").read_text(encoding="utf-8"))["cases"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return
    common = ids & train_ids
    if common:
        notes.append(f"{len(common)} of the {len(ids)} evaluation case ids are also case ids of the step-1 training "
                     f"set ({manifest.parent}); this is not a held-out evaluation for those cases.")


# ---------------------------------------------------------------------------------------------
# Scoring


def score(pred: np.ndarray, target: np.ndarray, spacing) -> tuple[dict[str, float], str]:
    """:func:`metrics.table1_row`, or when one metric cannot be computed (e.g. an empty surface), the
    others with NaN for it and a status naming why."""
    from . import metrics

    try:
        return metrics.table1_row(pred, target, spacing), "ok"
    except InputError:
        pass
    two = pred.shape[0] == 2
    field_p, field_t, level = (pred[1], target[1], 0.5) if two else (pred[0], target[0], 0.05)
    calls = {**{f"dssim{w}": (lambda w=w: metrics.dssim(pred[0], target[0], w)) for w in metrics.DSSIM_WINDOWS},
             "psnr": lambda: metrics.psnr(pred[0], target[0]), "rmse": lambda: metrics.rmse(pred[0], target[0]),
             "rmsd": lambda: metrics.rmsd_surfaces(field_p, field_t, level, spacing),
             "dice": lambda: metrics.dice(field_p > level, field_t > level),
             "hd95": lambda: metrics.hd95(field_p > level, field_t > level, spacing)}
    row, failed = {}, []
    for key in metrics.TABLE1_KEYS:
        try:
            row[key] = calls[key]()
        except InputError as exc:
            row[key] = float("nan")
            failed.append(f"{key}: {exc}")
    return row, "not computed: " + "; ".join(failed)


def _occupancy(x: torch.Tensor) -> torch.Tensor:
    return x[:, 1:2] if x.shape[1] > 1 else (x[:, :1] > 0).float()


def _inputs(dataset, cases: slice, masked: bool, masking: dict | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(input, visibility, healthy target, kind of input) of the cases ``cases`` on the unaligned grid."""
    from .training.masking import block_visibility

    idx = torch.arange(cases.start, cases.stop)
    healthy = dataset.tensor("images", cases).float()
    if not masked:
        return healthy, torch.ones_like(healthy[:, :1]), healthy, "healthy"
    if dataset.fractured:
        return dataset.tensor("inputs", cases).float(), dataset.tensor("visible", cases).float(), healthy, "fractured"
    bone = _occupancy(healthy)
    visible = torch.cat([block_visibility(bone[k:k + 1], np.random.default_rng([MASK_SEED, int(i)]),
                                          tuple(masking["blocks"]), tuple(masking["block_size"]), masking["center"])
                         for k, i in enumerate(idx.tolist())])
    return healthy * visible, visible, healthy, "block-masked"


def _fmt_float(v: float) -> str:
    return "" if v is None else repr(float(v))


@torch.no_grad()
def evaluate_rows(dataset, regs: list[Registration], masked: bool, device: torch.device, batch_size: int = 4,
                  progress: bool = True) -> tuple[list[dict], dict]:
    """Score every case for every row; returns the CSV rows and the figure data of :data:`FIGURE_CASE`."""
    from tqdm import tqdm

    from .models import AffineGridSampler

    grid = dataset.grid
    spacing = grid.spacing
    sampler = AffineGridSampler(grid).to(device)
    n = len(dataset)
    rows: list[dict] = []
    figure: dict = {}
    for reg in regs:
        bar = tqdm(total=n * len(reg.rows), desc=f"evaluate {reg.title}", disable=not progress)
        for a in range(0, n, batch_size):
            idx = torch.arange(a, min(a + batch_size, n))
            x, visible, healthy, kind = _inputs(dataset, slice(a, len(idx) + a), masked, reg.masking)
            x, visible, healthy = x.to(device), visible.to(device), healthy.to(device)
            if reg.theta_fn is None:
                theta = torch.eye(3, 4, device=device).expand(len(idx), 3, 4)
                aligned, target, seen = x, healthy, visible
            else:
                theta = reg.theta_fn(x).float()
                aligned, target = sampler(x, theta), sampler(healthy, theta)
                seen = (sampler(visible, theta) > 0.5).float()
            bone = _occupancy(healthy) > 0.5
            hidden = ((bone & (visible < 0.5)).sum((1, 2, 3, 4)) / bone.sum((1, 2, 3, 4)).clamp_min(1)).cpu()
            shift = theta[:, :, 3].norm(dim=1).cpu()
            scale = torch.linalg.det(theta[:, :, :3].double()).abs().pow(1 / 3).cpu()
            target_np = target.cpu().double().numpy()
            if FIGURE_CASE in idx.tolist():
                k = idx.tolist().index(FIGURE_CASE)
                figure[reg.key] = {"title": reg.title, "input": aligned[k].cpu().numpy(),
                                   "target": target_np[k], "preds": {}}
            for ae in reg.rows:
                if ae.model is None:
                    pred = reg.prototype.expand(len(idx), *reg.prototype.shape[1:])
                else:
                    pred = ae.model.reconstruct(aligned, seen if ae.mask_robust else None)
                pred_np = pred.float().cpu().double().numpy()
                if reg.key in figure and FIGURE_CASE in idx.tolist():
                    figure[reg.key]["preds"][ae.label] = pred_np[idx.tolist().index(FIGURE_CASE)]
                for k, i in enumerate(idx.tolist()):
                    values, status = score(pred_np[k], target_np[k], spacing)
                    case = dataset.cases[i]
                    rows.append({"registration": reg.title, "autoencoder": ae.label, "model": ae.folder,
                                 "case_index": i, "case_id": case.get("id", ""), "input": kind,
                                 "hidden_bone_fraction": f"{float(hidden[k]):.4f}",
                                 "theta_translation_mm": f"{float(shift[k]):.3f}",
                                 "theta_scale": f"{float(scale[k]):.4f}",
                                 **{key: _fmt_float(values[key]) for key in values}, "status": status})
                    bar.update(1)
        bar.close()
    return rows, figure


# ---------------------------------------------------------------------------------------------
# Report


def format_mean_ci(mean: float, half: float, scale: float = 1.0) -> str:
    """'m ± h' with h to 2 significant digits and m to the same decimals; 'inf' / no CI when not finite."""
    if math.isinf(mean):
        return "inf" if mean > 0 else "-inf"
    mean, half = mean * scale, half * scale
    if not math.isfinite(half) or half <= 0:
        return f"{mean:.4g}"
    decimals = min(max(0, 1 - math.floor(math.log10(half))), 8)
    return f"{mean:.{decimals}f} ± {half:.{decimals}f}"


def summarise(rows: list[dict]) -> list[dict]:
    """Per (registration, autoencoder): n, the number of cases with each metric, and mean ± CI strings."""
    from .metrics import TABLE1_KEYS, mean_ci

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["registration"], r["autoencoder"]), []).append(r)
    out = []
    for (reg, ae), sel in groups.items():
        item = {"registration": reg, "autoencoder": ae, "n": len(sel), "cells": {}, "values": {}}
        for key in TABLE1_KEYS:
            v = np.array([float(r[key]) for r in sel if r[key] != ""], dtype=float)
            v = v[~np.isnan(v)]
            if v.size == 0:
                item["cells"][key], item["values"][key] = None, (float("nan"), float("nan"), 0)
                continue
            mean, half = mean_ci(v)
            item["values"][key] = (mean, half, int(v.size))
        out.append(item)
    return out


def _cell(item: dict, key: str, scale: float) -> str:
    mean, half, count = item["values"][key]
    if count == 0:
        return "not computed"
    text = format_mean_ci(mean, half, scale)
    return text if count == item["n"] else f"{text} (n={count})"


def _registration_key(title: str) -> str:
    return next(k for k, (t, _) in REGISTRATIONS.items() if t == title)


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def table_markdown(summary: list[dict]) -> str:
    """Table 1 laid out as in the paper: blocks per registration, our row followed by the paper's."""
    header = ["Registration", "Autoencoding", "source", *[h for _, h, _ in COLUMNS], "n"]
    lines, last = [], None
    for item in summary:
        reg = item["registration"]
        first = reg != last
        last = reg
        lines.append([f"**{reg}**" if first else "", item["autoencoder"], "this run",
                      *[_cell(item, key, scale) for key, _, scale in COLUMNS], item["n"]])
        paper = PAPER_TABLE1[_registration_key(reg)]
        label = item["autoencoder"]
        if label in paper:
            values = paper[label]
            cells = ["N/A"] * len(PAPER_KEYS) if values is None else [f"*{v}*" for v in values]
            lines.append(["", "", "*paper*", *cells, "–", "–", "*56*"])
    return _md_table(header, lines)


def report_markdown(setup: dict, summary: list[dict], skipped: list[tuple[str, str, str]], notes: list[str],
                    files: dict) -> str:
    m = setup["machine"]
    block = "masked inputs, the paper's lower block" if setup["masked"] else "unmasked inputs"
    lines = [
        "# Table 1: reconstruction performance on a held-out set", "",
        f"Generated by `tibia-recon evaluate` on {setup['date']} with TibiaReconstructionLib {m['library']} "
        f"(git {m['git_commit']}). Reproduce with:", "",
        f"    {setup['command']}", "",
        f"- Machine: {m['cpu']}, {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs, {m['ram_gib']} GiB "
        f"RAM, GPU: {m['gpu']}; evaluated on device `{setup['device']}`",
        f"- Software: torch {m['torch']}, Python {m['python']}, {m['os']}",
        f"- Run time: {setup['seconds']:.0f} s", "",
        "## Setup", "",
        f"- Data: `{setup['data']}`: {setup['n']} cases, canonical grid (Z, Y, X) {setup['grid_shape']} at "
        f"{' x '.join(f'{s:g}' for s in setup['spacing'])} mm (i, j, k), {setup['channels']} channel(s)"
        + (", with fractured inputs and visibility masks" if setup["fractured"] else "") + ".",
        f"- Inputs: {block}: {setup['input_text']}",
        "- Per case and row: θ from the row's registration (w/o registration: identity); the input moved to "
        "standard coordinates by θ is reconstructed by the row's autoencoder (P: the prototype, whatever the "
        "input; mask-robust autoencoders get the visibility moved by θ, step-2 autoencoders the plain aligned "
        "input); the reconstruction is compared with the case's healthy image moved by the same θ.",
        "- Metrics (`TibiaReconstructionLib.metrics.table1_row`): D-SSIM = (1 − SSIM)/2 with Gaussian windows "
        "15/11/7/3 voxels and PSNR, RMSE on channel 0 (intensity in [0, 1], data range 1); RMSD (mm) between "
        "the marching-cubes surfaces of the occupancy channel at 0.5 (intensity at 0.05 with one channel); Dice "
        "and HD95 (mm) of those masks; spacing of the data set's grid. Mean ± half width of the 95% Student-t "
        "confidence interval over cases. **D-SSIM and RMSE are shown ×10⁻²** (as in the paper); the CSV holds "
        "the raw values.",
        "- Models:",
    ]
    lines += [f"  - {r['title']}: {r['source']}" for r in setup["registrations"]]
    lines += ["", f"## Table 1 ({block})", "", table_markdown(summary), "",
              "*paper*: Zhou et al. 2025, Table 1, copied verbatim (1 mm, 128×128×256 real CTs, 56 validation "
              "samples; Dice and HD95 are not in the paper). The data, grid and training budgets differ, so the "
              "comparison is indicative only. The paper's caption says its mask-robust block was evaluated on "
              "randomly masked samples, while §3.2 says it was applied to the non-masked evaluation set; its numbers "
              "are shown with both unmasked and masked runs here.", ""]
    lines += ["## Rows not evaluated", ""]
    if skipped:
        grouped: dict[tuple[str, str], list[str]] = {}
        for reg, ae, why in skipped:
            grouped.setdefault((reg, why), []).append(ae)
        lines += _md_table(["Registration", "Autoencoding", "why"],
                           [[reg, ", ".join(aes), why] for (reg, why), aes in grouped.items()]).splitlines()
    else:
        lines.append("None: every row of the paper's table was evaluated.")
    lines.append("")
    failed = setup["failed"]
    if failed or notes:
        lines += ["## Notes", ""]
        lines += [f"- {note}" for note in notes]
        if failed:
            lines.append(f"- {failed} case × row results lack some metric (see the `status` column of "
                         f"{files['csv'].name}); their means use the other cases (n shown in the cell).")
        lines.append("")
    lines += ["## Qualitative comparison", "",
              f"Coronal slice (intensity channel, through the centre of the ground-truth tibia) of case "
              f"{setup['figure_case']!r}: the input in standard coordinates, the prototype, each autoencoder's "
              "reconstruction and the ground truth, one row per registration.", "",
              f"![qualitative comparison]({files['png'].name})", ""]
    return "\n".join(lines)


def qualitative_figure(figure: dict, regs: list[Registration], spacing, case_id: str, path: Path,
                       overwrite: bool) -> None:
    """Coronal slices: input, prototype, each autoencoder, ground truth; one row per registration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_path

    labels = []
    for reg in regs:
        for ae in reg.rows:
            if ae.label != "P" and ae.label not in labels:
                labels.append(ae.label)
    columns = ["Input", "Prototype", *labels, "Ground truth"]
    keys = [r.key for r in regs if r.key in figure]
    some = figure[keys[0]]["target"]
    nz, nx = some.shape[1], some.shape[3]
    aspect = float(spacing[2] / spacing[0])  # mm per voxel along Z over X
    panel_w = 1.7
    panel_h = min(max(panel_w * nz * aspect / nx, 1.0), 6.0)
    fig, axes = plt.subplots(len(keys), len(columns), figsize=(panel_w * len(columns), panel_h * len(keys) + 0.6),
                             squeeze=False)
    for r, key in enumerate(keys):
        data = figure[key]
        target = data["target"]
        occ = target[1] if target.shape[0] > 1 else (target[0] > 0.05).astype(float)
        weights = occ.sum((0, 2))
        y = int(round(float((weights * np.arange(len(weights))).sum() / weights.sum()))) if weights.sum() > 0 \
            else target.shape[2] // 2
        panels = {"Input": data["input"], "Ground truth": target, "Prototype": data["preds"].get("P")}
        panels.update({label: data["preds"].get(label) for label in labels})
        for c, name in enumerate(columns):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            vol = panels.get(name)
            image = np.full((nz, nx), np.nan) if vol is None else vol[0][:, y, :]
            ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, origin="lower", aspect=aspect, interpolation="nearest")
            if vol is None:
                ax.text(0.5, 0.5, "N/A", ha="center", va="center", transform=ax.transAxes, color="0.4")
                ax.set_facecolor("0.92")
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(data["title"].replace(" registration", "\nregistration"), fontsize=8)
    fig.suptitle(f"Case {case_id!r}: coronal slices in standard coordinates (x to the right, z up)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path, overwrite) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _write_csv(rows: list[dict], path: Path, overwrite: bool) -> None:
    import csv

    from .io import atomic_path

    with atomic_path(path, overwrite) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _command(args) -> str:
    import shlex

    words = ["tibia-recon", "evaluate", "--data", args.data, "--step1", args.step1]
    for option in ("step2", "step3", "direct", "direct_step2", "raw_step2", "direct_steps"):
        value = getattr(args, option)
        if value is not None:
            words += [f"--{option.replace('_', '-')}", value]
    words += ["--out", args.out, "--device", args.device, "--batch-size", args.batch_size]
    words += ["--masked"] if args.masked else []
    words += ["--overwrite"] if args.overwrite else []
    return " ".join(shlex.quote(str(w)) for w in words)


def run_evaluate(args, progress: bool = True) -> dict[str, Path]:
    """Evaluate as ``args`` (the parsed command line) say and write the report files; returns their paths."""
    import datetime

    from .bench import machine_description
    from .canonical import CanonicalDataset

    out = Path(args.out)
    paths = {k: out / v for k, v in FILES.items()}
    clash = [str(p) for p in paths.values() if p.exists()]
    if clash and not args.overwrite:
        raise OutputExistsError(f"Evaluation outputs already exist: {', '.join(clash)}. They were left untouched; "
                                "choose another --out folder or pass --overwrite.")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is available; use --device cpu.")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    start = time.perf_counter()
    dataset = CanonicalDataset(args.data)
    if len(dataset) == 0:
        raise InputError(f"The data set {args.data} has no cases.")
    channels = int(dataset.tensor("images", slice(0, 1)).shape[1])
    regs, skipped, notes = build_registrations(args, dataset.grid, channels, device, args.masked)
    if "aligned_by" in dataset.manifest:
        notes.append(f"The data set {args.data} was written by step 1 (already aligned); `evaluate` expects the "
                     "unaligned output of `tibia-recon prepare`, so its registrations are applied a second time.")
    if not any(reg.rows for reg in regs):
        raise InputError("No row of Table 1 can be evaluated with the given folders: " +
                         "; ".join(f"{r} {a}: {why}" for r, a, why in skipped[:6]))
    rows, figure = evaluate_rows(dataset, regs, args.masked, device, args.batch_size, progress)
    summary = summarise(rows)
    kinds = sorted({r["input"] for r in rows})
    if not args.masked:
        input_text = "the healthy images (channel 0 tibia-masked intensity, channel 1 occupancy)."
    elif dataset.fractured:
        input_text = "each case's fractured input with its visibility mask (1 − fracture mask) from the data set."
    else:
        masking = next(reg.masking for reg in regs if reg.key == "robust")
        input_text = (f"the healthy images with random block masks as step 3 was trained with ({masking['blocks'][0]}"
                      f"–{masking['blocks'][1]} boxes of {masking['block_size'][0]}–{masking['block_size'][1]} "
                      f"voxels, centred {'on bone' if masking['center'] == 'bone' else 'anywhere'}); case i uses "
                      f"`numpy.random.default_rng([{MASK_SEED}, i])` (`training.masking.block_visibility`).")
    setup = {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "command": _command(args),
             "machine": machine_description(), "device": str(device), "seconds": time.perf_counter() - start,
             "data": args.data, "n": len(dataset), "grid_shape": list(dataset.grid.shape),
             "spacing": dataset.grid.spacing.tolist(), "channels": channels, "fractured": dataset.fractured,
             "masked": args.masked, "input_text": input_text, "inputs": kinds,
             "registrations": [{"title": r.title, "source": r.source} for r in regs],
             "failed": sum(r["status"] != "ok" for r in rows),
             "figure_case": dataset.cases[FIGURE_CASE].get("id", FIGURE_CASE)}
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(rows, paths["csv"], args.overwrite)
    qualitative_figure(figure, regs, dataset.grid.spacing, setup["figure_case"], paths["png"], args.overwrite)
    setup["seconds"] = time.perf_counter() - start
    from .io import atomic_path

    with atomic_path(paths["md"], args.overwrite) as tmp:
        tmp.write_text(report_markdown(setup, summary, skipped, notes, paths), encoding="utf-8")
    return paths


def register_cli(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="the paper's Table 1 (registration x autoencoder) on a held-out canonical set",
        description="Score every registration x autoencoder combination of the paper's Table 1 whose models are "
                    "given on a held-out canonical data set (unaligned, from `tibia-recon prepare`): D-SSIM at "
                    "windows 15/11/7/3, PSNR, RMSE, RMSD (mm), Dice and HD95 (mm) between each reconstruction "
                    "and the healthy image in standard coordinates, as mean ± 95% CI, next to the paper's "
                    "numbers. Rows whose models are missing are listed as not evaluated. Writes table1.md, "
                    "table1.csv (one row per case and row) and table1.png (coronal slices of one case).")
    p.add_argument("--data", required=True, help="held-out canonical data set folder (from `tibia-recon prepare`)")
    p.add_argument("--step1", required=True,
                   help="step-1 output folder of an STN run (LocNet + prototype): the STN rows and the prototype")
    p.add_argument("--step2", help="step-2 output folder: autoencoders for the STN rows")
    p.add_argument("--step3", help="step-3 output folder: mask-robust LocNet and autoencoders")
    p.add_argument("--direct", help="step-1 output folder of a direct-AGS run: the direct AGS rows")
    p.add_argument("--direct-step2", dest="direct_step2",
                   help="step-2 output folder of autoencoders trained on the --direct run's aligned set")
    p.add_argument("--direct-steps", dest="direct_steps", type=int,
                   help="optimiser steps fitting each held-out case's direct-AGS θ (default: the --direct run's "
                        "epochs x inner steps, what each of its training cases got)")
    p.add_argument("--raw-step2", dest="raw_step2",
                   help="step-2 output folder of autoencoders trained on the unaligned data: the w/o registration rows")
    p.add_argument("--out", required=True, help="report folder (e.g. docs/benchmarks)")
    p.add_argument("--masked", action="store_true",
                   help="masked inputs (the paper's lower block): the data set's fractured inputs, or random block "
                        "masks with a fixed seed; only the mask-robust rows apply")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="torch device (default auto)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=4, help="cases per batch (default 4)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")

    def run(args):
        paths = run_evaluate(args)
        for name, path in paths.items():
            print(f"  {name}: {path}")

    p.set_defaults(func=run)
