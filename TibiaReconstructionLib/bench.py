"""`tibia-recon bench`: reproducible accuracy and speed reports (Markdown + CSV + PNG).

* ``accuracy``: held-out fractured phantoms with both legs in the CT; each bundle's Predictor, two baselines
  built from the same bundle (its prototype decoded instead of the autoencoder output; the prototype fitted
  rigidly to the visible tibia) and the mirrored contralateral leg (no model) are scored against the healthy
  tibia on the CT grid (Dice, RMSD, HD95, mean surface distance), with mean ± 95% CI per method, fracture
  type and fraction of the tibia masked.
* ``speed``: predict end to end, stage by stage, on synthetic CTs of given sizes and thread counts, each
  run in a fresh process (peak RSS); optionally the throughput of one training step of step 1 and step 3.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .errors import InputError, OutputExistsError, TibiaReconError
from .geometry import Grid, Volume, bounding_box, crop, resample
from .io import atomic_path
from .phantoms.fractures import EXTRA_FRACTURE_TYPES, FRACTURE_TYPES
from .models.sampler import rotation_matrices
from .predict import ModelRun, Predictor

SIZE_LIMIT_MM = (420.0, 170.0, 480.0)  # a lower-leg CT of both legs: 420 x 170 mm in-plane, up to 480 mm long
DEFAULT_SEED = 500_000  # far from the seeds used for training data (0, 1, 2, ...)
MASKED_BINS = (0.0, 0.1, 0.2, 0.3, 1.0)  # bins of the fraction of the tibia hidden by the fracture mask
METRICS = (("dice", "Dice"), ("rmsd_mm", "RMSD (mm)"), ("hd95_mm", "HD95 (mm)"), ("msd_mm", "MSD (mm)"))
METHODS = {"model": "model", "one-leg": "model, one leg", "other-leg": "model + other leg mask",
           "no-reassembly": "model, no reassembly", "model-only": "model, no visible bone",
           "single": "model, single pass",
           "prototype": "prototype only",
           "rigid": "mean shape, rigid fit",
           "contralateral": "mirrored contralateral leg"}
ACCURACY_FILES = {"md": "accuracy.md", "csv": "accuracy.csv", "boxplots": "accuracy_boxplots.png",
                  "worst": "accuracy_worst_case.png"}
SPEED_FILES = {"md": "speed.md", "csv": "speed.csv", "training_csv": "speed_training.csv", "plot": "speed.png"}
PREDICT_STAGES = ("start", "read", "load", "check", "model", "other_leg", "resample", "surface", "write")
TRAINING_STEPS = {"step1": "step 1: LocNet + prototype (D-SSIM at 1/2 resolution)",
                  "step3-vae": "step 3: VAE (masked MSE + KL)"}

# ---------------------------------------------------------------------------------------------
# Shared: machine, files, tables


def machine_description() -> dict:
    """CPU model, CPU counts, RAM, GPU and software versions of this machine."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor() or "unknown")
    mem_kb = next((int(line.split()[1]) for line in _read_lines("/proc/meminfo") if line.startswith("MemTotal")), 0)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": usable, "ram_gib": round(mem_kb / 2**20, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "library": __version__, "git_commit": _git_commit(),
            "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []


def _git_commit() -> str:
    """The checkout's commit (with '+changes' if the work tree differs), or 'unknown'."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _machine_lines(m: dict) -> list[str]:
    load = m.get("load_average")
    return [f"- Machine: {m['cpu']}, {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs, "
            f"{m['ram_gib']} GiB RAM, GPU: {m['gpu']}"
            + (f"; load average (1, 5, 15 min) {load[0]}, {load[1]}, {load[2]} (other jobs "
               "on the machine slow every timing)" if load else ""),
            f"- Software: TibiaReconstructionLib {m['library']} (git {m['git_commit']}), torch {m['torch']}, "
            f"Python {m['python']}, {m['os']}"]


def _output_paths(out: Path, names: dict, overwrite: bool) -> dict[str, Path]:
    """The report files in ``out``; refuses, before any work, to replace existing ones unless ``overwrite``."""
    paths = {k: out / v for k, v in names.items()}
    clash = [str(p) for p in paths.values() if p.exists()]
    if clash and not overwrite:
        raise OutputExistsError(f"Benchmark outputs already exist: {', '.join(clash)}. They were left untouched; "
                                "choose another --out folder or pass --overwrite.")
    return paths


def write_csv(rows: list[dict], path: Path, overwrite: bool) -> None:
    """Rows (dicts with the same keys) as a CSV file with a header row."""
    with atomic_path(path, overwrite) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def md_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _write_text(text: str, path: Path, overwrite: bool) -> None:
    with atomic_path(path, overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _save_figure(fig, path: Path, overwrite: bool) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path, overwrite) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _quote(words) -> str:
    return " ".join(shlex.quote(str(w)) for w in words)


def _today() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


# ---------------------------------------------------------------------------------------------
# Accuracy: baselines


class SinglePassPredictor(Predictor):
    """The paper's pipeline: one pass of the model, without the fragment reduction (refine.py)."""

    def __init__(self, bundle, device="auto"):
        super().__init__(bundle, device, reduce_fragments=False)


class NoReassemblyPredictor(Predictor):
    """The Predictor with the moved fragment where the reduction put it, not refitted to meet the anchor by its
    broken face (reassembly.py)."""

    def __init__(self, bundle, device="auto"):
        super().__init__(bundle, device, reassemble_fragments=False)


class ModelOnlyPredictor(Predictor):
    """The Predictor with the fragment reduction but without the patient's visible bone (fusion.py)."""

    def __init__(self, bundle, device="auto"):
        super().__init__(bundle, device, keep_visible_bone=False)


class _BaselinePredictor(SinglePassPredictor):
    """A baseline's output is the prototype, which has no posterior: no uncertainty map. Baselines run a single
    pass: the fragment reduction needs the autoencoder's reconstructions."""

    def _uncertainty(self, run):
        return None


class PrototypePredictor(_BaselinePredictor):
    """Baseline: the Predictor's pipeline with the bundle's prototype (the mean aligned tibia) in place of the
    autoencoder's reconstruction; it is placed by the mask-robust LocNet's θ as the model's output is."""

    def _run_model(self, ct, tibia, fracture, side, open_end=None):
        return replace(super()._run_model(ct, tibia, fracture, side, open_end),
                       recon=self.bundle.prototype[0].float().cpu().numpy())


class RigidFitPredictor(_BaselinePredictor):
    """Baseline: the bundle's prototype (mean shape) fitted to the visible tibia by a rigid transform
    (rotation + translation; Adam on the squared difference over the visible voxels at a quarter of the
    canonical resolution, from the principal-axis alignment), with no LocNet and no autoencoder."""

    steps = 150

    def _run_model(self, ct, tibia, fracture, side, open_end=None):  # the baseline as it was: no open end
        from .models import AffineGridSampler, coarser_grid, theta_to_matrix
        from .prepare import patient_to_canonical, to_canonical

        grid = self.bundle.grid
        p = patient_to_canonical(tibia, side)
        case = to_canonical(ct, tibia, grid, p, self.bundle.window_hu, fracture)
        f = next(f for f in (4, 2, 1) if all(s % f == 0 for s in grid.size))
        pool = lambda t: torch.nn.functional.avg_pool3d(t, f) if f > 1 else t  # noqa: E731
        x = pool(torch.from_numpy(case.tensor[None]))
        visible = pool(torch.from_numpy(case.visible[None, None].astype(np.float32)))
        target = pool(self.bundle.prototype.float().cpu())
        sampler = AffineGridSampler(coarser_grid(grid, f) if f > 1 else grid)
        params = torch.zeros(6, requires_grad=True)  # rotation vector (rad), translation (10 mm units)
        optimizer = torch.optim.Adam([params], lr=0.02)
        with torch.enable_grad():
            for _ in range(self.steps):
                theta = _rigid_theta(params)
                seen = sampler(visible, theta)
                loss = torch.sum(seen * (sampler(x, theta) - target) ** 2) / seen.sum().clamp_min(1.0)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        theta = _rigid_theta(params.detach())
        return ModelRun(p, theta_to_matrix(theta[0]), self.bundle.prototype[0].float().cpu().numpy(), loss.item(),
                        x, visible)


def _rigid_theta(params: torch.Tensor) -> torch.Tensor:
    """θ (1, 3, 4) of a rotation vector params[:3] (rad) and a translation params[3:] (10 mm units)."""
    return torch.cat([rotation_matrices(params[None, :3])[0], 10.0 * params[3:, None]], dim=1)[None]


class ContralateralBaseline:
    """Baseline without a model: the other leg's tibia mirrored and fitted rigidly to the proximal main fragment
    (:func:`contralateral.contralateral_target`). It is given the case's other tibia mask (ground truth, as every
    method is given the fractured tibia's); see :func:`predict_case`."""

    def predict(self, ct, tibia, fracture, other_tibia):
        from .contralateral import contralateral_target

        if other_tibia is None:
            raise InputError("This case has only one leg in the CT, so there is no contralateral tibia.")
        return contralateral_target(ct, tibia, fracture, other_tibia)


@dataclass
class Method:
    """A benchmarked method: its predictor and how it is given the other leg: 'auto' (looked for in the CT, as
    ``tibia-recon predict`` does by default), 'mask' (the case's other tibia mask, as every method is given the
    fractured tibia's) or None (not at all)."""

    predictor: Predictor | ContralateralBaseline
    other_leg: str | None


def predict_case(method: Method, case, side: str):
    """The method's prediction for a held-out case from its fractured CT, tibia mask and fracture mask (and the
    other leg, see :class:`Method`)."""
    other = {"auto": "auto", "mask": case.other_tibia, None: None}[method.other_leg]
    if method.other_leg == "mask" and other is None:
        raise InputError("This case has only one leg in the CT, so there is no other tibia mask.")
    if isinstance(method.predictor, ContralateralBaseline):
        return method.predictor.predict(*_inputs(case), other)
    return method.predictor.predict(*_inputs(case), side=side, other_tibia=other)


def build_methods(bundles: list[str], methods: list[str], device: str) -> tuple[dict[str, Method], list[dict]]:
    """One :class:`Method` per (bundle, method), named '<bundle folder>: <method>', each bundle loaded once, and the
    contralateral baseline (no bundle) named by its method; and a description of each bundle. The default ('model')
    looks for the other leg in the CT; 'other-leg' and the contralateral baseline are given its mask; the others do
    without it (the fractured leg alone)."""
    from .bundle import load_bundle
    from .predict import resolve_device

    names = [Path(b).name for b in bundles]
    labels = names if len(set(names)) == len(names) else [str(b) for b in bundles]
    kinds = {"model": Predictor, "one-leg": Predictor, "other-leg": Predictor, "no-reassembly": NoReassemblyPredictor,
             "model-only": ModelOnlyPredictor,
             "single": SinglePassPredictor, "prototype": PrototypePredictor, "rigid": RigidFitPredictor}
    other_leg = {"model": "auto", "other-leg": "mask"}
    predictors, info = {}, []
    for label, path in zip(labels, bundles):
        bundle = load_bundle(path, resolve_device(device))
        for method in (m for m in METHODS if m in methods and m != "contralateral"):  # the model first: worst cases
            if method != "model" and bundle.prototype is None:
                raise InputError(f"The bundle {path} has no prototype, so the '{method}' baseline cannot be built; "
                                 "pass --methods model.")
            predictors[f"{label}: {METHODS[method]}"] = Method(kinds[method](bundle, device), other_leg.get(method))
        grid = bundle.grid
        info.append({"path": str(path), "grid": f"{'x'.join(map(str, grid.size))} at "
                                                f"{'/'.join(f'{s:g}' for s in grid.spacing)} mm",
                     "autoencoder": bundle.config["autoencoder"].get("type", "?"),
                     "data": bundle.config["training"].get("data", "not stated")})
    if "contralateral" in methods:
        predictors[METHODS["contralateral"]] = Method(ContralateralBaseline(), "mask")
    return predictors, info


# ---------------------------------------------------------------------------------------------
# Accuracy: cases and scores


def heldout_case(seed: int, spacing, shaft_band: tuple[float, float] | None = None, fracture_type: str | None = None):
    """A fractured phantom with the healthy other leg beside it, on a field of view of both lower legs (see
    SIZE_LIMIT_MM). The fractured leg's anatomy, pose and fracture plan are the one-leg case's of the seed;
    ``shaft_band``: where along the tibia its shaft fracture lies (the generator's band when None);
    ``fracture_type``: that type instead of the seed's random one (the same leg and pose)."""
    from .phantoms import generate_case
    from .phantoms.fractures import SHAFT_BAND

    return generate_case(seed, fractured=True, spacing=tuple(spacing), size_limit_mm=SIZE_LIMIT_MM, both_legs=True,
                         shaft_band=tuple(shaft_band or SHAFT_BAND), fracture_type=fracture_type)


def cut_field_of_view(case, end: str, fraction: float):
    """The case as a knee CT (``end`` 'knee': the slices holding the proximal ``fraction`` of the fractured tibia's
    length and everything above) or an ankle CT ('ankle': the distal part and below), all its volumes cut alike
    along the CT axis nearest the long axis; None when the fracture mask misses the tibia in what is left."""
    labels = case.fractured_labels
    axis = int(np.argmax(np.abs(labels.direction[2])))  # the (i, j, k) axis nearest superior
    dim = 2 - axis  # as an array axis (k, j, i)
    extent = np.flatnonzero(np.moveaxis(labels.array == 1, dim, 0).any(axis=(1, 2)))
    keep = int(round((extent[-1] - extent[0]) * fraction))
    upward = labels.direction[2, axis] > 0  # higher index = superior
    lo, hi = np.zeros(3, int), np.array(labels.array.shape) - 1
    if (end == "knee") == upward:
        lo[dim] = extent[-1] - keep
    else:
        hi[dim] = extent[0] + keep
    fields = {"ct": case.ct, "labels": case.labels, "fractured_ct": case.fractured_ct, "fractured_labels": labels,
              "fracture_mask": case.fracture_mask, "fragment_ids": case.fragment_ids}
    cut = replace(case, **{k: None if v is None else crop(v, lo, hi) for k, v in fields.items()})
    if not ((cut.fractured_labels.array == 1) & (cut.fracture_mask.array != 0)).any():
        return None
    return cut


def masked_fraction(case) -> float:
    """Fraction of the fractured tibia mask covered by the fracture mask (what predict calls hidden)."""
    tibia = case.fractured_labels.array == 1
    return float((tibia & (case.fracture_mask.array != 0)).sum() / max(int(tibia.sum()), 1))


def masked_bin(fraction: float) -> str:
    """The MASKED_BINS bin of ``fraction`` as a label such as '10-20%'."""
    edges = np.asarray(MASKED_BINS)
    i = int(np.clip(np.searchsorted(edges, fraction, side="right") - 1, 0, len(edges) - 2))
    return f"{edges[i]:.0%}-{edges[i + 1]:.0%}".replace("%-", "-")


def score(pred: np.ndarray, truth: np.ndarray, spacing) -> dict:
    """Dice, RMSD, HD95 and mean surface distance (mm) of two masks on one grid; distances are NaN when
    the prediction is empty. Computed in the masks' joint bounding box (with a one-voxel border)."""
    from . import metrics

    box = bounding_box(pred | truth)
    lo, hi = np.maximum(box[0] - 1, 0), box[1] + 2
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    p, t = pred[sl], truth[sl]
    row = {"dice": metrics.dice(p, t)}
    if not p.any():
        return {**row, "rmsd_mm": float("nan"), "hd95_mm": float("nan"), "msd_mm": float("nan")}
    d_ab, d_ba = metrics.surface_distances(p, t, spacing)
    d = np.concatenate([d_ab, d_ba])
    return {**row, "rmsd_mm": float(np.sqrt(np.mean(d ** 2))),
            "hd95_mm": float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))), "msd_mm": float(d.mean())}


def _inputs(case):
    tibia = case.fractured_labels.with_array((case.fractured_labels.array == 1).astype(np.uint8))
    return case.fractured_ct, tibia, case.fracture_mask


def evaluate_case(case, predictors: dict[str, Method], side_mode: str = "auto") -> list[dict]:
    """One row per method: the case's description and the prediction's scores (or why it was refused)."""
    truth = case.labels.array == 1
    fraction = masked_fraction(case)
    base = {"seed": case.seed, "fracture_type": case.fracture_type, "side": case.side,
            "masked_fraction": round(fraction, 4), "masked_bin": masked_bin(fraction)}
    side = case.side if side_mode == "known" else "auto"
    rows = []
    for name, predictor in predictors.items():
        row = {**base, "method": name, "status": "ok", "predicted_side": "", "seconds": float("nan")}
        try:
            result = predict_case(predictor, case, side)
        except TibiaReconError as exc:
            rows.append({**row, "status": f"refused: {exc}".replace("\n", " "),
                         **{k: float("nan") for k, _ in METRICS}})
            continue
        pred = result.labelmap.array != 0
        row.update(status="ok" if pred.any() else "empty prediction", predicted_side=result.side,
                   seconds=round(sum(result.timings.values()), 3))
        rows.append({**row, **{k: round(v, 5) for k, v in score(pred, truth, case.ct.spacing).items()}})
    return rows


# ---------------------------------------------------------------------------------------------
# Accuracy: report


def _cell(values) -> str:
    from .metrics import mean_ci

    v = np.asarray([float(x) for x in values], dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return "–"
    mean, half = mean_ci(v)
    return f"{mean:.3f}" if not np.isfinite(half) else f"{mean:.3f} ± {half:.3f}"


def summary_table(rows: list[dict], group: str | None) -> str:
    """Markdown table of mean ± 95% CI per (group value, method); distances over non-empty predictions."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    groups = [None] if group is None else sorted({r[group] for r in rows}, key=_group_order)
    table = []
    for g in groups:
        for m in methods:
            sel = [r for r in rows if r["method"] == m and (g is None or r[group] == g)]
            if not sel:
                continue
            scored = [r for r in sel if not str(r["status"]).startswith("refused")]
            wrong_side = sum(r["predicted_side"] != r["side"] for r in scored)
            table.append(([g] if g is not None else []) + [m, len(scored), len(sel) - len(scored), wrong_side]
                         + [_cell(r[k] for r in scored) for k in [*dict(METRICS), "seconds"]])
    header = ([group.replace("_", " ")] if group else []) + ["method", "n", "refused", "wrong side"] \
        + [t for _, t in METRICS] + ["time (s)"]
    return md_table(header, table)


def _group_order(value: str):
    """Masked-fraction bins in numeric order, other groups alphabetically."""
    head = value.split("-")[0]
    return (0, float(head), "") if head.replace(".", "").isdigit() else (1, 0.0, value)


def _worst_rows(rows: list[dict], method: str, k: int = 5) -> list[dict]:
    scored = [r for r in rows if r["method"] == method and np.isfinite(float(r["dice"]))]
    return sorted(scored, key=lambda r: float(r["dice"]))[:k]


def accuracy_markdown(rows: list[dict], setup: dict, files: dict) -> str:
    """The accuracy report (see module doc)."""
    first = rows[0]["method"]
    worst = _worst_rows(rows, first)
    lines = [
        "# Accuracy benchmark", "",
        f"Generated by `tibia-recon bench accuracy` on {setup['date']}. Reproduce with:", "",
        f"    {setup['command']}", "",
        "## Setup", "",
        f"- Cases: {setup['n']} held-out fractured phantoms with the healthy other leg in the CT "
        "(`TibiaReconstructionLib.phantoms.generate_case(..., both_legs=True)`), "
        f"seeds {setup['seed']}..{setup['seed'] + setup['n'] - 1} (training data uses small seeds), voxel spacing "
        f"{' x '.join(f'{s:g}' for s in setup['spacing'])} mm, field of view at most "
        f"{' x '.join(f'{s:g}' for s in SIZE_LIMIT_MM)} mm; random side and pose; "
        + (f"every fracture a {setup['fracture_type']} one (`--fracture-type`)."
           + (" A pattern the models never learned from: the generator draws it only when asked for."
              if setup["fracture_type"] in EXTRA_FRACTURE_TYPES else "")
           if setup.get("fracture_type") else "random fracture type."),
        *([f"- Field of view: a {setup['field_of_view']} CT: every volume (CT, masks, ground truth) cut to the slices "
           f"that hold the {'proximal' if setup['field_of_view'] == 'knee' else 'distal'} "
           f"{setup['fraction']:.0%} of the fractured tibia's length and beyond, so the tibia is cut off by the scan "
           f"(`TibiaReconstructionLib.bench.cut_field_of_view`); scored on that grid. Skipped, the fracture outside "
           f"the scan: {', '.join(str(s) for s in setup['skipped']) or 'none'}."]
          if setup["field_of_view"] != "legs" else []),
        *([f"- Shaft fractures (transverse, oblique, spiral, comminuted) between {setup['shaft_band'][0]:.0%} and "
           f"{setup['shaft_band'][1]:.0%} of the tibia's length from the ankle (the generator's and the training "
           "data's band: 25-75 %)."] if setup.get("shaft_band") is not None else []),
        "- Input to every method: the fractured CT (both legs), the fractured tibia mask (label 1, all fragments) "
        f"and the coarse fracture mask; leg side {'given' if setup['side'] == 'known' else 'chosen automatically'}; "
        "*model + other leg mask* and the contralateral baseline also get the other leg's tibia mask (label 6); "
        "*model* looks for the other leg in the CT itself, as `tibia-recon predict` does by default.",
        "- Ground truth: the same phantom's healthy tibia (label 1 before fracturing), on the CT grid.",
        "- Metrics on the CT grid in patient space (mm), between the predicted labelmap and the ground truth: "
        "Dice; RMSD (root mean square), HD95 (95th-percentile Hausdorff) and MSD (mean) of the symmetric "
        "distances between the two masks' boundary voxels (`TibiaReconstructionLib.metrics`). Mean ± half "
        "width of the 95% Student-t confidence interval; distances average over non-empty predictions. "
        "'refused': cases the Predictor refused (e.g. more than 60% of the tibia masked); 'wrong side': "
        "predictions that took the leg for the other side; time: prediction without file input/output.",
        "- Methods: *model, one leg* = the bundle's Predictor from the fractured leg alone (LocNet + autoencoder, then "
        "displaced fragments reduced onto the proximal main fragment and reconstructed again: "
        "`TibiaReconstructionLib.refine`; the main moved fragment refitted to where its broken face meets the proximal "
        "one's, and a broken fibula's pieces line up: `TibiaReconstructionLib.reassembly`, "
        "`TibiaReconstructionLib.fibula`; the visible fragments outside the fracture mask kept where they "
        "were placed: `TibiaReconstructionLib.fusion`; `--other-tibia-mask none`); *model* = the default: the same, "
        "with the other leg's tibia, found and segmented in the CT, as template when it fits this patient "
        "(`TibiaReconstructionLib.template`): mirrored and fitted to the proximal main fragment, it fills the "
        "prediction where the patient's bone is not kept and receives the moved fragments, registered onto it and "
        "then reassembled; *model + other leg mask* = the same given the other tibia's mask "
        "(`--other-tibia-mask MASK`); "
        "*model, no reassembly* = *model, one leg* with the fragments where the reduction placed them "
        "(`--no-reassembly`); "
        "*model, no visible bone* = the model's reconstruction everywhere (`--model-only`); *model, single pass* = "
        "the paper's pipeline, one pass without the reduction and without the visible bone (`--single-pass`); "
        "*prototype only* = the single pass with the bundle's prototype (mean aligned tibia) in place of the "
        "reconstruction; *mean shape, rigid fit* = the prototype fitted rigidly to the visible tibia (no LocNet, no "
        "autoencoder); "
        "*mirrored contralateral leg* = the healthy other tibia mirrored across the sagittal plane and fitted "
        "rigidly to the intact proximal fragment (no model; `tibia-recon contralateral`).",
    ]
    lines += [f"- Bundle `{b['path']}`: canonical grid {b['grid']}, autoencoder {b['autoencoder']}, "
              f"training data: {b['data']}" for b in setup["bundles"]]
    lines += _machine_lines(setup["machine"]) + [f"- Run time: {setup['seconds']:.0f} s", ""]
    lines += ["## All cases", "", summary_table(rows, None), "",
              "## By fracture type", "", summary_table(rows, "fracture_type"), "",
              "## By fraction of the tibia masked", "", summary_table(rows, "masked_bin"), "",
              f"![Dice and RMSD per method]({files['boxplots'].name})", "",
              f"## Where it fails: the {len(worst)} lowest-Dice cases of *{first}*", ""]
    lines += [md_table(["seed", "fracture type", "side", "masked", "Dice", "RMSD (mm)", "status"],
                       [[r["seed"], r["fracture_type"], r["side"], f"{float(r['masked_fraction']):.0%}",
                         f"{float(r['dice']):.3f}", f"{float(r['rmsd_mm']):.2f}", r["status"]] for r in worst]), ""]
    if "worst" in files:
        lines += [f"The worst case (seed {worst[0]['seed']}): prediction (yellow), ground truth (cyan) and fracture "
                  "mask (red) over the fractured CT, and the predicted surface.", "",
                  f"![worst case]({files['worst'].name})", ""]
    return "\n".join(lines)


def accuracy_boxplots(rows: list[dict], path: Path, overwrite: bool) -> None:
    """Box plots of Dice and RMSD per method."""
    plt = _pyplot()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(5 + 2.2 * len(methods), 5))
    for ax, (key, title) in zip(axes, METRICS[:2]):
        data = [[float(r[key]) for r in rows if r["method"] == m and np.isfinite(float(r[key]))] for m in methods]
        ax.boxplot([d if d else [np.nan] for d in data], showmeans=True)
        ax.set_xticks(range(1, len(methods) + 1), [m.replace(": ", ":\n") for m in methods], fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{len({r['seed'] for r in rows})} held-out fractured phantoms")
    fig.tight_layout()
    _save_figure(fig, path, overwrite)


def worst_case_figure(row: dict, predictor: Method, spacing, side_mode: str, path: Path, overwrite: bool) -> None:
    """Regenerate the case of ``row``, predict it again and draw prediction, truth and fracture mask over it."""
    from .figures import overlay_png

    case = heldout_case(int(row["seed"]), spacing)
    ct, _, fracture = _inputs(case)
    result = predict_case(predictor, case, case.side if side_mode == "known" else "auto")
    truth = case.labels.with_array((case.labels.array == 1).astype(np.uint8))
    overlay_png(ct, path, {"predicted healthy tibia": (result.labelmap, "#ffcc00"), "ground truth": (truth, "#00e0ff"),
                           "fracture mask": (fracture, "#ff3060")}, result.surface,
                title=f"{row['method']}, seed {row['seed']} ({row['fracture_type']}, {row['side']}, "
                      f"{float(row['masked_fraction']):.0%} masked): Dice {float(row['dice']):.3f}, "
                      f"RMSD {float(row['rmsd_mm']):.2f} mm", overwrite=overwrite)


def run_accuracy(bundles: list[str], out, n: int = 40, seed: int = DEFAULT_SEED, spacing=(1.0, 1.0, 2.0),
                 methods=tuple(METHODS), side: str = "auto", device: str = "auto",
                 overwrite: bool = False, progress: bool = True, field_of_view: str = "legs",
                 fraction: float = 0.5, shaft_band: tuple[float, float] | None = None,
                 fracture_type: str | None = None) -> dict[str, Path]:
    """Run the accuracy benchmark and write its report files into ``out``; returns their paths. ``field_of_view``
    'knee' or 'ankle': each case cut to that end's ``fraction`` of the tibia (:func:`cut_field_of_view`); cases
    whose fracture then lies outside the scan are skipped. ``shaft_band``, ``fracture_type``: see
    :func:`heldout_case`."""
    from tqdm import tqdm

    if n < 1:
        raise InputError(f"--n must be at least 1, got {n}.")
    if field_of_view != "legs" and not 0.1 <= fraction <= 1.0:
        raise InputError(f"--fov-fraction must be between 0.1 and 1, got {fraction:g}.")
    if shaft_band is not None and not 0.0 <= shaft_band[0] <= shaft_band[1] <= 1.0:
        raise InputError(f"--shaft-band must be two fractions 0 <= LO <= HI <= 1, got {shaft_band}.")
    out = Path(out)
    paths = _output_paths(out, ACCURACY_FILES, overwrite)
    command = ["tibia-recon", "bench", "accuracy", *[w for b in bundles for w in ("--bundle", b)], "--n", n,
               "--seed", seed, "--spacing", *spacing, "--methods", *methods, "--side", side, "--device", device,
               *(["--field-of-view", field_of_view, "--fov-fraction", fraction] if field_of_view != "legs" else []),
               *(["--shaft-band", *shaft_band] if shaft_band is not None else []),
               *(["--fracture-type", fracture_type] if fracture_type else []),
               "--out", out]
    start = time.perf_counter()
    predictors, bundle_info = build_methods(bundles, list(methods), device)
    rows, skipped = [], []
    for s in tqdm(range(seed, seed + n), desc="bench accuracy", disable=not progress):
        case = heldout_case(s, spacing, shaft_band, fracture_type)
        if field_of_view != "legs":
            case = cut_field_of_view(case, field_of_view, fraction)
        if case is None:
            skipped.append(s)
            continue
        rows += evaluate_case(case, predictors, side)
    if not rows:
        raise InputError(f"No case has its fracture inside the {field_of_view} CT's field of view; raise "
                         "--fov-fraction or --n.")
    first = next(iter(predictors))
    setup = {"date": _today(), "command": _quote(command), "n": n, "seed": seed, "spacing": list(spacing),
             "side": side, "machine": machine_description(), "seconds": time.perf_counter() - start,
             "bundles": bundle_info, "field_of_view": field_of_view, "fraction": fraction, "skipped": skipped,
             "shaft_band": shaft_band, "fracture_type": fracture_type}
    write_csv(rows, paths["csv"], overwrite)
    accuracy_boxplots(rows, paths["boxplots"], overwrite)
    worst = _worst_rows(rows, first, 1)
    if worst:
        worst_case_figure(worst[0], predictors[first], spacing, side, paths["worst"], overwrite)
    else:
        paths.pop("worst")
    _write_text(accuracy_markdown(rows, setup, paths), paths["md"], overwrite)
    return paths


# ---------------------------------------------------------------------------------------------
# Speed: synthetic CTs of given sizes


def parse_size(text: str) -> tuple[int, int, int]:
    """'512x512x400' -> (512, 512, 400) voxels along i, j, k."""
    try:
        size = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 8:
        raise InputError(f"A CT size must look like 512x512x400 (i x j x k voxels, each at least 8), got {text!r}.")
    return size


def sized_case(base, size) -> tuple[Volume, Volume, Volume]:
    """The fractured CT (int16), tibia mask and fracture mask of phantom ``base`` resampled onto a grid of
    ``size`` voxels covering the same field of view."""
    g = base.fractured_ct.grid
    spacing = (np.asarray(g.size) - 1) * g.spacing / (np.asarray(size) - 1)
    grid = Grid(tuple(size), spacing, g.origin, g.direction)
    ct, tibia, fracture = _inputs(base)
    return (resample(ct, grid, default_value=-1000.0, dtype=np.int16),
            resample(tibia, grid, interpolation="nearest"), resample(fracture, grid, interpolation="nearest"))


def write_speed_inputs(base, size, folder: Path) -> dict[str, str]:
    """Write the sized case as NRRD (CT uncompressed, as scanners export raw data; masks compressed)."""
    from .io import write_volume

    ct, tibia, fracture = sized_case(base, size)
    folder.mkdir(parents=True, exist_ok=True)
    write_volume(ct, folder / "ct.nrrd", compress=False)
    write_volume(tibia, folder / "tibia.nrrd", label=True)
    write_volume(fracture, folder / "fracture.nrrd", label=True)
    return {"ct": str(folder / "ct.nrrd"), "tibia": str(folder / "tibia.nrrd"),
            "fracture": str(folder / "fracture.nrrd"), "spacing": [round(float(s), 4) for s in ct.spacing]}


# ---------------------------------------------------------------------------------------------
# Speed: measurements, each in a fresh process


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def _set_threads(n: int) -> None:
    import SimpleITK as sitk

    torch.set_num_threads(n)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)


def _measure_predict(job: dict) -> dict:
    """Read, load the bundle, predict and write the outputs, timing each stage; ``start`` is the time from launching
    the process to the command's code imported (``job['ready'] - job['launched']``, wall-clock seconds)."""
    from .io import read_mask, read_volume
    from .predict_cli import _write_outputs, output_paths, written_paths

    t = {"start": job["ready"] - job["launched"]}
    t0 = time.perf_counter()
    ct = read_volume(job["ct"])
    tibia = read_mask(job["tibia"], ct, "tibia mask")
    fracture = read_mask(job["fracture"], ct, "fracture mask")
    t["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    predictor = Predictor(job["bundle"], job["device"])
    t["load"] = time.perf_counter() - t0
    result = predictor.predict(ct, tibia, fracture, side="auto")
    t.update({"other_leg": 0.0, **result.timings})
    t0 = time.perf_counter()
    paths = written_paths(result, output_paths(Path(job["out"]), ".nrrd"))
    _write_outputs(result, result.report(), paths, overwrite=True)
    t["write"] = time.perf_counter() - t0
    return {**{f"{k}_s": round(t[k], 4) for k in PREDICT_STAGES},
            "total_s": round(sum(t[k] for k in PREDICT_STAGES), 4), "device": str(predictor.device)}


def _vae_config(bundle) -> dict:
    """The bundle's VAE, or else the recipe's VAE ([8, 16, 32, 64]) with as many levels as the grid allows."""
    cfg = bundle.config["autoencoder"]
    if cfg.get("type") == "vae":
        return cfg
    levels = 0
    while levels < 4 and all(s % 2 ** (levels + 1) == 0 for s in bundle.grid.size):
        levels += 1
    return {"type": "vae", "in_channels": len(bundle.channels), "channels": [8, 16, 32, 64][:max(levels, 1)]}


def _training_step(job: dict, bundle, device: torch.device):
    """A closure doing one optimiser step of ``job['step']`` on a batch of random tensors, and its model."""
    import torch.nn.functional as F

    from .models import AffineGridSampler, Prototype, build_autoencoder, build_locnet, coarser_grid
    from .training.losses import dssim

    c, shape, batch = len(bundle.channels), bundle.grid.shape, job["batch"]
    x = torch.rand(batch, c, *shape, device=device)
    if job["step"] == "step1":
        coarse = coarser_grid(bundle.grid, 2)
        locnet = build_locnet(bundle.config["locnet"]).to(device)
        prototype = Prototype(c, coarse.shape).to(device)
        sampler = AffineGridSampler(coarse).to(device)
        optimizer = torch.optim.AdamW([*locnet.parameters(), *prototype.parameters()], lr=1e-3)
        loss_fn = lambda: dssim(sampler(F.avg_pool3d(x, 2), locnet(x)), prototype(), 7).mean()  # noqa: E731
        description = json.dumps(bundle.config["locnet"])
    else:
        cfg = _vae_config(bundle)
        vae = build_autoencoder(cfg).to(device).train()
        visible = (torch.rand(batch, 1, *shape, device=device) > 0.2).float()
        target = torch.rand_like(x)
        optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
        loss_fn = lambda: vae.loss(x * visible, target, visible)[0]  # noqa: E731
        description = json.dumps(cfg)

    def step():
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step, description


def _measure_training(job: dict) -> dict:
    """Throughput of ``job['steps']`` optimiser steps after one warm-up step (fp32, random data)."""
    from .bundle import load_bundle
    from .predict import resolve_device

    device = resolve_device(job["device"])
    bundle = load_bundle(job["bundle"], "cpu")
    step, description = _training_step(job, bundle, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step()
    sync()
    t0 = time.perf_counter()
    for _ in range(job["steps"]):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / job["steps"]
    return {"s_per_step": round(seconds, 4), "cases_per_s": round(job["batch"] / seconds, 3), "device": str(device),
            "grid": "x".join(map(str, bundle.grid.size)), "model": description}


def _worker(job_json: str, ready: float) -> None:
    """Entry point of a measurement process: run one job, print its result as JSON on the last line. ``ready``: the
    wall-clock time when the process had imported what `tibia-recon predict` imports."""
    job = {**json.loads(job_json), "ready": ready}
    _set_threads(job["threads"])
    before = _peak_rss_mib()
    result = _measure_predict(job) if job["kind"] == "predict" else _measure_training(job)
    print(json.dumps({**result, "rss_after_imports_mib": round(before, 1), "peak_rss_mib": round(_peak_rss_mib(), 1)}))


def _measurement_env(threads: int) -> dict:
    """The environment of a measurement process: this library first on the path, ``threads`` threads everywhere."""
    n = str(threads)
    root = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": n,
            "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}


def time_command(job: dict) -> float:
    """Wall-clock seconds of `tibia-recon predict` on the job's files, from launching its process to its exit, with
    ``job['threads']`` threads; its outputs go to ``job['out']`` + '-command'."""
    argv = [sys.executable, "-m", "TibiaReconstructionLib.cli", "predict", "--ct", job["ct"], "--tibia-mask",
            job["tibia"], "--fracture-mask", job["fracture"], "--bundle", job["bundle"], "--device", job["device"],
            "--out", job["out"] + "-command"]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=_measurement_env(job["threads"]))
    seconds = time.perf_counter() - t0
    _check_process(proc, f"`tibia-recon predict` with {job['threads']} thread(s)")
    return seconds


def _check_process(proc: subprocess.CompletedProcess, what: str) -> None:
    """Raise, with the last lines of its stderr, when a measurement process failed."""
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.strip().splitlines()[-3:])
        raise TibiaReconError(f"{what} failed (exit {proc.returncode}): {tail}")


def run_measurement(job: dict) -> dict:
    """Run one job in a fresh Python process with ``job['threads']`` threads; its result dict."""
    n = str(job["threads"])
    env = _measurement_env(job["threads"])
    code = ("import sys, time; from TibiaReconstructionLib.cli import build_parser; build_parser('predict'); "
            "import TibiaReconstructionLib.predict; ready = time.time(); "
            "from TibiaReconstructionLib.bench import _worker; _worker(sys.argv[1], ready)")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps({**job, "launched": time.time()})],
                          capture_output=True, text=True, env=env)
    _check_process(proc, f"The {job['kind']} measurement with {n} thread(s)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Speed: report


def _median_rows(rows: list[dict], keys: list[str], values: list[str]) -> list[dict]:
    """Rows grouped by ``keys`` with the median of each of ``values`` (over repeats)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return [{**dict(zip(keys, g)), **{v: float(np.median([float(r[v]) for r in rs])) for v in values},
             "runs": len(rs)} for g, rs in groups.items()]


def speed_markdown(rows: list[dict], train_rows: list[dict], setup: dict) -> str:
    """The speed report: stage timings and peak memory per CT size and thread count; training throughput."""
    lines = ["# Speed benchmark", "", f"Generated by `tibia-recon bench speed` on {setup['date']}. Reproduce with:",
             "", f"    {setup['command']}", "", "## Setup", ""]
    lines += _machine_lines(setup["machine"])
    lines += [f"- Bundle `{setup['bundle']}`, device {setup['device']}; every measurement runs in a fresh Python "
              "process (torch, SimpleITK and OpenMP limited to the given threads); peak RSS is that process's "
              "maximum resident memory (`getrusage`), including about "
              f"{setup['import_rss_mib']:.0f} MiB for the imported libraries.", ""]
    if rows:
        med = _median_rows(rows, ["size", "threads"],
                           [f"{s}_s" for s in PREDICT_STAGES] + ["total_s", "command_s", "peak_rss_mib"])
        spacing = {r["size"]: r["spacing_mm"] for r in rows}
        lines += ["## predict, end to end", "",
                  f"Input: fractured phantom seed {setup['seed']} (oblique fracture, left leg"
                  + (", the healthy right leg beside it, which predict finds and uses" if setup.get("both_legs") else "")
                  + "), generated at "
                  f"{'/'.join(f'{s:g}' for s in setup['spacing'])} mm and resampled onto each CT size over the same "
                  f"field of view (int16 NRRD, uncompressed); outputs as `tibia-recon predict` writes them "
                  "(compressed NRRD labelmap, intensity and uncertainty, two STL, a VTP, report.json). Side: automatic "
                  "(from the fibula's position; the model runs for both sides only when no fibula is found). Median "
                  "of the runs, in seconds; *start*: from launching Python to the code of `tibia-recon predict` "
                  "imported (torch, SimpleITK, VTK...); *read*: CT and masks; *load*: model bundle; "
                  "*check* (with the side from the fibula), *model*, *other_leg* (looking for the other leg; with both "
                  "legs, segmenting and fitting it), *resample*, *surface*: `Prediction.timings` (the other leg is "
                  "looked for while the model runs and the surface built while the prediction is resampled onto the "
                  "CT grid: *other_leg* and *surface* are only what they take beyond that); *write*: "
                  "all outputs; *total*: their sum. *command*: the same prediction as the command itself runs it "
                  "(`tibia-recon predict` in its own process, from launch to exit); while torch loads it reads the CT "
                  "and the masks together, checks them, finds the side, cuts and smooths the crops, allocates the "
                  "outputs and starts looking for the other leg (`head_start`), and it compresses the volumes while "
                  "it finishes the surface, so it can take less than the stages' sum.", "",
                  md_table(["CT size", "spacing (mm)", "threads", *PREDICT_STAGES, "total", "command",
                            "peak RSS (MiB)", "runs"],
                           [[r["size"], spacing[r["size"]], r["threads"],
                             *[f"{r[f'{s}_s']:.2f}" for s in PREDICT_STAGES], f"{r['total_s']:.2f}",
                             f"{r['command_s']:.2f}", f"{r['peak_rss_mib']:.0f}", r["runs"]] for r in med]), "",
                  f"![time and memory vs CT size]({SPEED_FILES['plot']})", ""]
    if train_rows:
        med = _median_rows(train_rows, ["step", "threads"], ["s_per_step", "cases_per_s", "peak_rss_mib"])
        models = {r["step"]: r["model"] for r in train_rows}
        lines += ["## Training throughput", "",
                  f"One AdamW step (forward + backward, fp32) on a batch of {setup['batch']} random tensors on the "
                  f"bundle's canonical grid ({train_rows[0]['grid']}); the mean of {setup['training_steps']} timed "
                  "steps after one warm-up step. No data loading, augmentation or masking is included.", "",
                  md_table(["step", "threads", "s / step", "cases / s", "peak RSS (MiB)"],
                           [[TRAINING_STEPS[r["step"]], r["threads"], f"{r['s_per_step']:.3f}",
                             f"{r['cases_per_s']:.2f}", f"{r['peak_rss_mib']:.0f}"] for r in med]), ""]
        lines += [f"- {TRAINING_STEPS[k]}: `{v}`" for k, v in models.items()] + [""]
    return "\n".join(lines)


def speed_plot(rows: list[dict], path: Path, overwrite: bool) -> None:
    """Total predict time and peak RSS vs CT size (megavoxels), one line per thread count."""
    plt = _pyplot()
    med = _median_rows(rows, ["size", "threads", "megavoxels"], ["total_s", "peak_rss_mib"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for threads in sorted({r["threads"] for r in med}):
        sel = sorted((r for r in med if r["threads"] == threads), key=lambda r: r["megavoxels"])
        for ax, key in zip(axes, ("total_s", "peak_rss_mib")):
            ax.plot([r["megavoxels"] for r in sel], [r[key] for r in sel], "o-", label=f"{threads} thread(s)")
    for ax, label in zip(axes, ("predict end to end (s)", "peak RSS (MiB)")):
        ax.set_xlabel("CT size (million voxels)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save_figure(fig, path, overwrite)


def run_speed(bundle: str, out, sizes=("256x256x200", "512x512x400", "512x512x800"), threads=(1, 2),
              repeat: int = 1, training: bool = False, training_steps: int = 3, batch: int = 4,
              seed: int = DEFAULT_SEED, spacing=(1.0, 1.0, 2.0), device: str = "auto", overwrite: bool = False,
              progress: bool = True, both_legs: bool = False) -> dict[str, Path]:
    """Run the speed benchmark and write its report files into ``out``; returns their paths. ``both_legs``: the
    phantom has the healthy other leg beside the fractured one (which predict then finds and uses)."""
    from tqdm import tqdm

    from .phantoms import generate_case

    parsed = [parse_size(s) for s in sizes]
    if not parsed and not training:
        raise InputError("Nothing to measure: give --sizes and/or --training.")
    if min([*threads, repeat, training_steps, batch]) < 1:
        raise InputError("--threads, --repeat, --training-steps and --batch must be at least 1.")
    out = Path(out)
    paths = _output_paths(out, SPEED_FILES, overwrite)
    command = ["tibia-recon", "bench", "speed", "--bundle", bundle, "--sizes", *sizes, "--threads", *threads,
               "--repeat", repeat, *(["--training", "--training-steps", training_steps, "--batch", batch]
                                     if training else []), "--seed", seed, "--spacing", *spacing,
               *(["--both-legs"] if both_legs else []), "--device", device, "--out", out]
    rows, train_rows = [], []
    bar = tqdm(total=len(parsed) * len(threads) * repeat + (2 * len(threads) if training else 0), desc="bench speed",
               disable=not progress)
    with tempfile.TemporaryDirectory(prefix="tibia-recon-bench-") as tmp:
        base = generate_case(seed, fractured=True, side="left", spacing=tuple(spacing), fracture_type="oblique",
                             size_limit_mm=SIZE_LIMIT_MM, both_legs=both_legs) if parsed else None
        for size in parsed:
            name = "x".join(map(str, size))
            inputs = write_speed_inputs(base, size, Path(tmp) / name)
            for n in threads:
                for r in range(repeat):
                    job = {"kind": "predict", **inputs, "bundle": bundle, "device": device, "threads": n,
                           "out": str(Path(tmp) / name / f"out-{n}-{r}")}
                    rows.append({"size": name, "megavoxels": round(float(np.prod(size)) / 1e6, 3),
                                 "spacing_mm": "x".join(f"{s:g}" for s in inputs["spacing"]), "threads": n,
                                 "repeat": r, **run_measurement(job), "command_s": round(time_command(job), 4)})
                    shutil.rmtree(job["out"], ignore_errors=True)
                    shutil.rmtree(job["out"] + "-command", ignore_errors=True)
                    bar.update()
            shutil.rmtree(Path(tmp) / name)
        for step in (TRAINING_STEPS if training else ()):
            for n in threads:
                job = {"kind": "train", "step": step, "bundle": bundle, "device": device, "threads": n,
                       "steps": training_steps, "batch": batch}
                train_rows.append({"step": step, "threads": n, "batch": batch, **run_measurement(job)})
                bar.update()
    bar.close()
    measured = rows or train_rows
    setup = {"date": _today(), "command": _quote(command), "machine": machine_description(), "bundle": bundle,
             "device": measured[0]["device"], "seed": seed, "spacing": list(spacing), "batch": batch,
             "both_legs": both_legs,
             "training_steps": training_steps,
             "import_rss_mib": float(np.median([r["rss_after_imports_mib"] for r in measured]))}
    if rows:
        write_csv(rows, paths["csv"], overwrite)
        speed_plot(rows, paths["plot"], overwrite)
    if train_rows:
        write_csv(train_rows, paths["training_csv"], overwrite)
    _write_text(speed_markdown(rows, train_rows, setup), paths["md"], overwrite)
    return {k: p for k, p in paths.items() if p.exists()}


# ---------------------------------------------------------------------------------------------
# Command line


def register_cli(sub) -> None:
    p = sub.add_parser("bench", help="accuracy and speed benchmarks as reproducible reports",
                       description="Benchmarks that write a Markdown report, CSV data and PNG figures (default into "
                                   "docs/benchmarks), each stating the exact command, machine, date and version.")
    kinds = p.add_subparsers(dest="bench", metavar="KIND", required=True)

    a = kinds.add_parser("accuracy", help="predict held-out fractured phantoms and score against the healthy tibia",
                         description="Generate N held-out fractured phantoms with both legs (seeds S..S+N-1), "
                                     "predict each with every bundle, with two baselines from the same bundle "
                                     "(prototype only; mean shape, rigid fit) and with the mirrored contralateral "
                                     "leg, and score against the healthy tibia on the CT grid "
                                     "(Dice, RMSD, HD95, mean surface distance). Writes accuracy.md, accuracy.csv "
                                     "(one row per case and method), accuracy_boxplots.png and "
                                     "accuracy_worst_case.png.")
    a.add_argument("--bundle", action="append", required=True, help="model bundle folder (repeat to compare)")
    a.add_argument("--n", type=int, default=40, help="number of cases (default 40)")
    a.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"first phantom seed (default {DEFAULT_SEED})")
    a.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 2.0), metavar=("I", "J", "K"),
                   help="CT voxel spacing in mm (default 1 1 2)")
    a.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                   help="model and/or baselines (default: all)")
    a.add_argument("--side", choices=("auto", "known"), default="auto",
                   help="leg side: chosen by the Predictor (default) or given")
    a.add_argument("--field-of-view", choices=("legs", "knee", "ankle"), default="legs",
                   help="the CT's extent: both lower legs whole (default), or cut to a knee or an ankle CT that shows "
                        "--fov-fraction of the tibia")
    a.add_argument("--fov-fraction", type=float, default=0.5,
                   help="with a knee or ankle CT: the fraction of the tibia's length it shows (default 0.5)")
    a.add_argument("--shaft-band", type=float, nargs=2, metavar=("LO", "HI"),
                   help="shaft fractures between these fractions of the tibia's length from the ankle (default: the "
                        "generator's 0.25 0.75, where the training data's lie)")
    a.add_argument("--fracture-type", choices=FRACTURE_TYPES + EXTRA_FRACTURE_TYPES, default=None,
                   help="every case's fracture of this type (default: each seed's random one); segmental and pilon "
                        "are patterns the models never learned from")

    s = kinds.add_parser("speed", help="time predict by stage and peak memory per CT size and thread count",
                         description="Time predict end to end (read, load, check, model, resample, surface, write) "
                                     "and its peak memory on synthetic CTs of the given sizes, each run in a fresh "
                                     "process, for each thread count. Writes speed.md, speed.csv, speed.png and, "
                                     "with --training, speed_training.csv.")
    s.add_argument("--bundle", required=True, help="model bundle folder")
    s.add_argument("--sizes", nargs="*", default=["256x256x200", "512x512x400", "512x512x800"],
                   help="CT sizes IxJxK (default 256x256x200 512x512x400 512x512x800; none: training only)")
    s.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default 1 2)")
    s.add_argument("--repeat", type=int, default=1, help="runs per size and thread count (median reported)")
    s.add_argument("--training", action="store_true", help="also time one training step of step 1 and step 3")
    s.add_argument("--training-steps", type=int, default=3, help="timed training steps (default 3)")
    s.add_argument("--batch", type=int, default=4, help="training batch size (default 4)")
    s.add_argument("--seed", type=int, default=DEFAULT_SEED, help="phantom seed of the synthetic CT")
    s.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 2.0), metavar=("I", "J", "K"),
                   help="spacing (mm) the phantom is generated at before resampling to each size (default 1 1 2)")
    s.add_argument("--both-legs", action="store_true",
                   help="the phantom with the healthy other leg beside the fractured one (default: one leg)")
    for q in (a, s):
        q.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
        q.add_argument("--out", default="docs/benchmarks", help="report folder (default docs/benchmarks)")
        q.add_argument("--overwrite", action="store_true", help="replace an earlier report")

    def run(args):
        if args.bench == "accuracy":
            paths = run_accuracy(args.bundle, args.out, args.n, args.seed, tuple(args.spacing), tuple(args.methods),
                                 args.side, args.device, args.overwrite, field_of_view=args.field_of_view,
                                 fraction=args.fov_fraction, shaft_band=args.shaft_band,
                                 fracture_type=args.fracture_type)
        else:
            paths = run_speed(args.bundle, args.out, tuple(args.sizes), tuple(args.threads), args.repeat,
                              args.training, args.training_steps, args.batch, args.seed, tuple(args.spacing),
                              args.device, args.overwrite, both_legs=args.both_legs)
        for name, path in paths.items():
            print(f"  {name}: {path}")

    p.set_defaults(func=run)
