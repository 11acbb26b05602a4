"""Masking study: block masks vs fracture-shaped masks for the step-3 mask-robust LocNet.

Reads step-3 runs (each with ``locnet/``) and, for each, the per-case CSV that
``tibia-recon evaluate --masked`` wrote for it, and writes ``masking.csv`` and the tables of
``masking.md`` (printed; the prose around them is written by hand).

Registration error (besides the Table-1 metrics of the P and PCA rows): for each held-out case,
θ_ref = the step-1 STN LocNet applied to the case's *healthy* image (the frame the whole pipeline
is trained to reach) and θ = the mask-robust LocNet applied to the masked input; the error is the
mean (and max) over the prototype's bone voxels p (standard frame, occupancy > 0.5) of
|θ p − θ_ref p| in mm. Two inputs: the data set's fractured inputs (its own fracture masks), and
the healthy image under random block masks (the masks of ``tibia-recon evaluate --masked`` on
unfractured sets: numpy seed [MASK_SEED, case index], the run's block settings).

    python benchmarks/masking.py --data data/val --step1 runs/default/step1 \
        --run "label=runs/table1/masking-ff0,runs/table1/masking-eval/ff0" ... --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch

from TibiaReconstructionLib.canonical import CanonicalDataset
from TibiaReconstructionLib.evaluate import MASK_SEED, _load_locnet, _load_step1, format_mean_ci, score
from TibiaReconstructionLib.metrics import mean_ci
from TibiaReconstructionLib.models import AffineGridSampler
from TibiaReconstructionLib.training.masking import block_visibility

METRICS = [("dssim7", "D-SSIM₇ (×10⁻²) ↓", 100.0), ("psnr", "PSNR ↑", 1.0), ("rmse", "RMSE (×10⁻²) ↓", 100.0),
           ("rmsd", "RMSD (mm) ↓", 1.0), ("dice", "Dice ↑", 1.0), ("hd95", "HD95 (mm) ↓", 1.0)]


def bone_points(prototype: torch.Tensor, grid) -> torch.Tensor:
    """(M, 4) homogeneous LPS points of the prototype's bone voxels (occupancy channel > 0.5)."""
    prototype = prototype.reshape(prototype.shape[-4:])  # (C, Z, Y, X), with or without a batch axis
    occ = prototype[1] if prototype.shape[0] > 1 else (prototype[0] > 0.05).float()
    kji = np.argwhere(occ.cpu().numpy() > 0.5)
    pts = grid.index_to_physical(kji[:, ::-1].astype(float))
    return torch.as_tensor(np.concatenate([pts, np.ones((len(pts), 1))], axis=1), dtype=torch.float64)


def displacement(theta: torch.Tensor, ref: torch.Tensor, pts: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and max |θ p − θ_ref p| (mm) over the points, per case."""
    d = torch.einsum("nij,mj->nmi", theta.double() - ref.double(), pts).norm(dim=2)
    return d.mean(1).numpy(), d.max(1).values.numpy()


@torch.no_grad()
def registration_errors(data: CanonicalDataset, step1, locnet, masking: dict, batch: int = 4,
                        p_row: bool = False) -> dict[str, dict]:
    """Per-case registration errors (see the module docstring); with ``p_row`` also the Table-1
    metrics of the prototype against the healthy image moved by θ of the fractured input (what
    ``evaluate --masked`` reports as the mask-robust P row), under "P"."""
    prototype, ref_net, _ = step1
    pts = bone_points(prototype, data.grid)
    sampler = AffineGridSampler(data.grid)
    proto = prototype.reshape(prototype.shape[-4:]).double().numpy()
    out = {"fractured": {"mean": [], "max": []}, "block-masked": {"mean": [], "max": []}, "P": {}}
    for a in range(0, len(data), batch):
        sl = slice(a, min(a + batch, len(data)))
        healthy = data.tensor("images", sl).float()
        ref = ref_net(healthy)
        bone = healthy[:, 1:2] if healthy.shape[1] > 1 else (healthy[:, :1] > 0).float()
        vis = torch.cat([block_visibility(bone[k:k + 1], np.random.default_rng([MASK_SEED, i]),
                                          tuple(masking["blocks"]), tuple(masking["block_size"]), masking["center"])
                         for k, i in enumerate(range(sl.start, sl.stop))])
        for kind, x in (("fractured", data.tensor("inputs", sl).float()), ("block-masked", healthy * vis)):
            theta = locnet(x)
            mean, mx = displacement(theta, ref, pts)
            out[kind]["mean"] += mean.tolist()
            out[kind]["max"] += mx.tolist()
            if p_row and kind == "fractured":
                for target in sampler(healthy, theta).double().numpy():
                    for key, v in score(proto, target, data.grid.spacing)[0].items():
                        out["P"].setdefault(key, []).append(v)
    return out


def read_eval(folder: Path) -> dict[str, dict[str, list[float]]]:
    """{row label: {metric: per-case values}} of the mask-robust rows of an evaluate CSV ("P", or the
    autoencoder's paper label and model folder name, e.g. "PCA32 (pca32x2)")."""
    rows: dict[str, dict[str, list[float]]] = {}
    with open(folder / "table1.csv", encoding="utf-8", newline="") as fh:
        for r in csv.DictReader(fh):
            if r["registration"] != "Mask-robust STN registration":
                continue
            label = "P" if r["autoencoder"] == "P" else f"{r['autoencoder'].split(' (')[0]} ({Path(r['model']).name})"
            for key, _, _ in METRICS:
                if r[key] != "":
                    rows.setdefault(label, {}).setdefault(key, []).append(float(r[key]))
    return rows


def cell(values, scale: float = 1.0) -> str:
    m, h = mean_ci(values)
    return format_mean_ci(m, h, scale)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--step1", required=True)
    ap.add_argument("--run", action="append", required=True,
                    help="label=STEP3_FOLDER[,EVAL_FOLDER] (EVAL_FOLDER: its `evaluate --masked` report)")
    ap.add_argument("--models", nargs="*", default=None,
                    help="model folder names to report besides P (default: every autoencoder in each report)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    data = CanonicalDataset(args.data)
    step1 = _load_step1(args.step1, data.grid, torch.device("cpu"), "stn", "--step1")
    csv_rows, reg_lines, rec_lines = [], [], []
    per_case: dict[str, dict[str, list[float]]] = {}
    runs = [("step-1 LocNet (not mask-robust)", None, None)]
    for spec in args.run:
        label, folders = spec.split("=", 1)
        parts = folders.split(",")
        runs.append((label, Path(parts[0]), Path(parts[1]) if len(parts) > 1 else None))
    for label, step3, evaldir in runs:
        if step3 is None:
            locnet, masking, lc = step1[1], {"blocks": [1, 3], "block_size": [10, 20], "center": "bone"}, None
        else:
            locnet, meta = _load_locnet(step3, torch.device("cpu"))
            masking, lc = meta["config"]["masking"], meta["config"]["locnet"]
        errs = registration_errors(data, step1, locnet, masking, p_row=step3 is None)
        ff = "–" if lc is None else f"{masking['fracture_fraction']:g}"
        epochs = "–" if lc is None else str(lc["epochs"])
        reg_lines.append(f"| {label} | {ff} | {epochs} | " + " | ".join(
            cell(errs[k][s]) for k in ("fractured", "block-masked") for s in ("mean", "max")) + " |")
        row = {"run": label, "step3": str(step3 or args.step1), "fracture_fraction": ff, "locnet_epochs": epochs}
        for k in ("fractured", "block-masked"):
            for s in ("mean", "max"):
                m, h = mean_ci(errs[k][s])
                row[f"reg_err_{s}_mm_{k}"], row[f"reg_err_{s}_mm_{k}_ci95"] = f"{m:.4f}", f"{h:.4f}"
        evals = read_eval(evaldir) if evaldir is not None else ({"P": errs["P"]} if errs["P"] else {})
        per_case[label] = {**{f"reg {k}": errs[k]["mean"] for k in ("fractured", "block-masked")},
                           **{f"{ae} {k}": v for ae, vals in evals.items() for k, v in vals.items()}}
        if evals:
            for ae, values in evals.items():
                if args.models is not None and ae != "P" and ae.split(" (")[-1].rstrip(")") not in args.models:
                    continue
                rec_lines.append(f"| {label} | {ae} | " + " | ".join(cell(values[k], s) for k, _, s in METRICS)
                                 + f" | {len(values['rmsd'])} |")
                for k, _, _ in METRICS:
                    m, h = mean_ci(values[k])
                    slug = ae.split(" (")[-1].rstrip(")") if " (" in ae else ae
                    row[f"{slug}_{k}"], row[f"{slug}_{k}_ci95"] = f"{m:.6g}", f"{h:.3g}"
        csv_rows.append(row)
    out = Path(args.out)
    keys = list(dict.fromkeys(k for r in csv_rows for k in r))
    with open(out / "masking.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(csv_rows)
    print("| LocNet | fracture_fraction | epochs | mean error, fractured (mm) | max error, fractured (mm) "
          "| mean error, block-masked (mm) | max error, block-masked (mm) |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(reg_lines))
    print()
    print("| Run | Autoencoding | " + " | ".join(t for _, t, _ in METRICS) + " | n |")
    print("|---|---|" + "---|" * len(METRICS) + "---|")
    print("\n".join(rec_lines))
    labels = [label for label, _, _ in runs[1:]]
    ref = labels[0]
    print()
    print(f"Paired differences to '{ref}' (same 40 cases; mean ± 95% CI of the per-case difference; "
          "negative = lower than the reference):")
    print()
    keys = [k for k in per_case[ref] if k.startswith("reg ") or k.split(" ")[-1] in ("rmsd", "dice", "dssim7")]
    print("| Run | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for label in labels[1:]:
        cells = []
        for k in keys:
            if k not in per_case[label] or len(per_case[label][k]) != len(per_case[ref][k]):
                cells.append("–")
                continue
            d = np.asarray(per_case[label][k]) - np.asarray(per_case[ref][k])
            m, h = mean_ci(d)
            cells.append(format_mean_ci(m, h, 100.0 if k.endswith("dssim7") else 1.0))
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(json.dumps({"csv": str(out / "masking.csv")}))


if __name__ == "__main__":
    main()
