"""Benchmark of the fragment reduction plan (reduction.py); not a test.

``--n`` held-out fractured phantoms (seeds ``--seed`` .. ``--seed + n - 1``, random side, pose and fracture
type, CT grid of ``--spacing`` mm). Input: the fractured tibia mask (all fragments) and the coarse fracture
mask. Target, two conditions: ``oracle``, the phantom's true healthy tibia, and ``model``, the bundle's
prediction (``Predictor``, as `tibia-recon predict` runs it). Each fragment found is matched to the phantom's
fragment that holds most of its voxels; its error is the rigid difference between the plan's matrix and the
true reduction (the inverse of the phantom's healthy -> fractured transform): rotation (degrees) and
translation at the fragment's centroid (mm). 'Fragment 1 fixed' errors compare the moves relative to the
plan's largest fragment (``ReductionPlan.with_first_fixed``), where an error of the target's overall pose
cancels. Writes reduction.md, reduction.csv and reduction.png into ``--out`` with the command, date and machine.

    python benchmarks/reduction_benchmark.py --n 10 --out docs/benchmarks --overwrite
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from TibiaReconstructionLib.bench import machine_description
from TibiaReconstructionLib.geometry import apply_affine
from TibiaReconstructionLib.io import atomic_path
from TibiaReconstructionLib.metrics import mean_ci
from TibiaReconstructionLib.phantoms import generate_case
from TibiaReconstructionLib.reduction import DEFAULT_MIN_FRAGMENT_ML, find_fragments, plan_reduction

TIBIA = 1  # phantoms/ct.py
CONDITIONS = ("oracle", "model")
COLUMNS = ("seed", "fracture_type", "condition", "fragment", "true_fragment", "volume_ml", "needed_rotation_deg",
           "needed_translation_mm", "rotation_error_deg", "translation_error_mm", "fixed1_rotation_error_deg",
           "fixed1_translation_error_mm", "rms_residual_mm", "inlier_fraction", "time_s")
METRICS = (("rotation_error_deg", "rotation error (deg)"), ("translation_error_mm", "translation error (mm)"),
           ("fixed1_rotation_error_deg", "fragment 1 fixed: rotation error (deg)"),
           ("fixed1_translation_error_mm", "fragment 1 fixed: translation error (mm)"),
           ("needed_rotation_deg", "needed rotation (deg)"), ("needed_translation_mm", "needed translation (mm)"),
           ("rms_residual_mm", "residual RMS (mm)"))


def _rigid_error(found: np.ndarray, ideal: np.ndarray, point: np.ndarray) -> tuple[float, float]:
    """(rotation angle in degrees between two 4x4 LPS moves, distance in mm between where they take ``point``)."""
    difference = np.linalg.inv(ideal) @ found
    return (float(np.degrees(Rotation.from_matrix(difference[:3, :3]).magnitude())),
            float(np.linalg.norm(apply_affine(found, point) - apply_affine(ideal, point))))


def score_case(case, target, condition: str, min_ml: float) -> list[dict]:
    """CSV rows, one per fragment of the plan that reduces ``case``'s fractured tibia onto ``target``."""
    tibia = case.fractured_labels.with_array((case.fractured_labels.array == TIBIA).astype(np.uint8))
    t0 = time.perf_counter()
    plan = plan_reduction(tibia, case.fracture_mask, target, min_ml)
    seconds = time.perf_counter() - t0
    ids, _ = find_fragments(tibia, case.fracture_mask, min_ml)  # the plan's fragment ids, on the tibia's box
    start = np.rint(tibia.grid.physical_to_index(ids.origin)[::-1]).astype(int)
    truth_ids = case.fragment_ids.array[tuple(slice(a, a + n) for a, n in zip(start, ids.array.shape))]
    truth = {f["id"]: f["transform"] for f in case.fragments}  # healthy -> fractured, LPS
    matched = {}
    for f in plan.fragments:
        votes = np.bincount(truth_ids[ids.array == f.id], minlength=max(truth) + 1)
        votes[0] = 0
        matched[f.id] = int(np.argmax(votes)) if votes.any() else 0
    first = plan.fragments[0]
    rows = []
    for f in plan.fragments:
        ideal = np.linalg.inv(truth.get(matched[f.id], np.eye(4)))
        rot, shift = _rigid_error(f.matrix, ideal, f.centroid)
        need_rot, need_shift = _rigid_error(np.eye(4), ideal, f.centroid)
        row = {"seed": case.seed, "fracture_type": case.fracture_type, "condition": condition, "fragment": f.id,
               "true_fragment": matched[f.id], "volume_ml": f.volume_ml, "needed_rotation_deg": need_rot,
               "needed_translation_mm": need_shift, "rotation_error_deg": rot, "translation_error_mm": shift,
               "fixed1_rotation_error_deg": "", "fixed1_translation_error_mm": "",
               "rms_residual_mm": f.rms_residual_mm, "inlier_fraction": f.inlier_fraction, "time_s": seconds}
        if f is not first:  # relative to fragment 1: ideal = ideal_1^-1 ideal_f
            ideal_first = np.linalg.inv(truth.get(matched[first.id], np.eye(4)))
            relative = np.linalg.inv(first.matrix) @ f.matrix
            row["fixed1_rotation_error_deg"], row["fixed1_translation_error_mm"] = _rigid_error(
                relative, np.linalg.inv(ideal_first) @ ideal, f.centroid)
        rows.append(row)
        print(f"seed {case.seed} {case.fracture_type:10s} {condition:6s} fragment {f.id} (true {matched[f.id]}) "
              f"{f.volume_ml:6.1f} ml: needed {need_rot:5.1f} deg {need_shift:5.1f} mm; error {rot:5.2f} deg "
              f"{shift:5.2f} mm; residual {f.rms_residual_mm:.2f} mm", flush=True)
    return rows


def run(args) -> tuple[list[dict], dict]:
    predictor = None
    if "model" in args.conditions:
        from TibiaReconstructionLib.predict import Predictor

        predictor = Predictor(args.bundle)
    rows, found = [], {"true_fragments": 0, "matched": 0}
    for seed in range(args.seed, args.seed + args.n):
        case = generate_case(seed, fractured=True, spacing=tuple(args.spacing))
        voxel_ml = float(np.prod(case.fractured_ct.spacing)) / 1000.0
        big = {f["id"] for f in case.fragments
               if np.count_nonzero((case.fragment_ids.array == f["id"]) & (case.fracture_mask.array == 0)) * voxel_ml
               >= args.min_fragment_ml}
        for condition in args.conditions:
            if condition == "oracle":
                target = case.labels.with_array((case.labels.array == TIBIA).astype(np.uint8))
            else:
                tibia = case.fractured_labels.with_array((case.fractured_labels.array == TIBIA).astype(np.uint8))
                target = predictor.predict(case.fractured_ct, tibia, case.fracture_mask).labelmap
            case_rows = score_case(case, target, condition, args.min_fragment_ml)
            rows += case_rows
            if condition == args.conditions[0]:
                found["true_fragments"] += len(big)
                found["matched"] += len(big & {r["true_fragment"] for r in case_rows})
    return rows, found


def _summary(values) -> str:
    v = [float(x) for x in values if x != ""]
    if not v:
        return "-"
    m, h = mean_ci(v)
    return (f"{m:.2f} ± {h:.2f}" if np.isfinite(h) else f"{m:.2f}") + f" (median {np.median(v):.2f})"


def _table(rows: list[dict], group_keys: tuple) -> list[str]:
    head = [k.replace("_", " ") for k in group_keys] + ["n"] + [name for _, name in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups = sorted({tuple(r[k] for k in group_keys) for r in rows})
    for g in groups:
        sel = [r for r in rows if tuple(r[k] for k in group_keys) == g]
        lines.append("| " + " | ".join(str(x) for x in g) + f" | {len(sel)} | "
                     + " | ".join(_summary(r[key] for r in sel) for key, _ in METRICS) + " |")
    return lines


def report(rows: list[dict], found: dict, args, started: str, elapsed: float) -> str:
    m = machine_description()
    moved = [dict(r, fragments="moved (true fragment ≠ 1)") for r in rows if r["true_fragment"] != 1]
    every = [dict(r, fragments="all") for r in rows]
    lines = ["# Fragment reduction plan: benchmark", "",
             f"Command: `{' '.join(shlex.quote(a) for a in [sys.executable.split('/')[-1]] + sys.argv)}`  ",
             f"Date: {started}; run time {elapsed / 60:.1f} min  ",
             f"Machine: {m['cpu']}, {m['usable_cpus']} usable CPUs of {m['logical_cpus']}, {m['ram_gib']} GiB RAM, "
             f"GPU {m['gpu']}; load average at the end {os.getloadavg()[0]:.1f} (shared machine); "
             f"{m['os']}, Python {m['python']}; library {m['library']}, git {m['git_commit']}", "",
             f"Cases: {args.n} held-out fractured phantoms, seeds {args.seed}..{args.seed + args.n - 1}, spacing "
             f"{' x '.join(f'{s:g}' for s in args.spacing)} mm, random side, pose and fracture type. Input: the "
             "fractured tibia mask (all fragments) and the coarse fracture mask. Fragments: 6-connected pieces of "
             f"at least {args.min_fragment_ml:g} ml outside the fracture mask, each matched to the phantom fragment "
             "holding most of its voxels. Target: *oracle* = the true healthy tibia; *model* = the prediction of "
             f"the bundle `{args.bundle or 'Resources/Models/default'}`. Error of a fragment: the rigid difference "
             "between the plan's move and the true reduction (inverse of the phantom's healthy -> fractured "
             "transform), as a rotation angle and the distance at the fragment's centroid. 'Fragment 1 fixed': "
             "the same for the moves relative to the plan's largest fragment (blank for that fragment). Needed: "
             "the true reduction's size (the error of doing nothing). Mean ± half width of the 95% Student-t CI "
             "(median).",
             "", f"Phantom fragments of at least {args.min_fragment_ml:g} ml outside the fracture mask found as "
             f"their own fragment: {found['matched']} of {found['true_fragments']}.", "",
             "## By condition", ""]
    lines += _table(every + moved, ("condition", "fragments"))
    lines += ["", "![needed move vs remaining error per moved fragment](reduction.png)", ""]
    lines += ["", "## Moved fragments by fracture type", ""]
    lines += _table(moved, ("condition", "fracture_type"))
    lines += ["", "## Per fragment", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], path: Path, overwrite: bool) -> None:
    """Scatter of each moved fragment's needed move against the plan's remaining error (rotation, translation),
    one colour per condition; points below the diagonal are better than leaving the fragment where it is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moved = [r for r in rows if r["true_fragment"] != 1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, (needed, error, unit) in zip(axes, (("needed_rotation_deg", "rotation_error_deg", "deg"),
                                                ("needed_translation_mm", "translation_error_mm", "mm"))):
        for condition, colour in zip(CONDITIONS, ("tab:green", "tab:blue")):
            pts = [(r[needed], r[error]) for r in moved if r["condition"] == condition]
            if pts:
                ax.scatter(*zip(*pts), color=colour, label=f"target: {condition}")
        top = max([max(r[needed], r[error]) for r in moved] + [1.0])
        ax.plot([0, top], [0, top], "k--", lw=0.8, label="error = needed move")
        ax.set(xlabel=f"needed {error.split('_')[0]} ({unit})", ylabel=f"remaining error ({unit})")
        ax.legend(fontsize=8)
    fig.suptitle("Moved fragments: the plan's remaining error against the move it had to find")
    fig.tight_layout()
    with atomic_path(path, overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10, help="number of held-out phantoms (default 10)")
    p.add_argument("--seed", type=int, default=3_000_000, help="first phantom seed (default 3000000)")
    p.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 2.0), help="CT spacing, mm (default 1 1 2)")
    p.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    p.add_argument("--bundle", default=None, help="model bundle for the 'model' condition (default: the bundled one)")
    p.add_argument("--min-fragment-ml", type=float, default=DEFAULT_MIN_FRAGMENT_ML)
    p.add_argument("--out", default="docs/benchmarks", help="output folder (default docs/benchmarks)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    args = p.parse_args(argv)
    out = Path(args.out)
    paths = {"md": out / "reduction.md", "csv": out / "reduction.csv", "png": out / "reduction.png"}
    if not args.overwrite and any(q.exists() for q in paths.values()):
        print(f"{paths['md']} or {paths['csv']} exists; pass --overwrite", file=sys.stderr)
        return 1
    started, t0 = datetime.datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    rows, found = run(args)
    with atomic_path(paths["csv"], args.overwrite) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows({c: _fmt(r[c]) for c in COLUMNS} for r in rows)
    figure(rows, paths["png"], args.overwrite)
    with atomic_path(paths["md"], args.overwrite) as tmp:
        tmp.write_text(report(rows, found, args, started, time.perf_counter() - t0), encoding="utf-8")
    print(f"wrote {paths['md']}, {paths['csv']} and {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
