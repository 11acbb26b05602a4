"""Benchmark of the automatic tibia segmentation (segment.py); not a test.

Accuracy: ``--n`` held-out fractured phantoms (seeds ``--seed`` .. ``--seed + n - 1``, away from the
seeds 1-24, 700000-700010, 800000-800010 and 900000-900010 looked at while tuning segment.py) with
scanner-like random spacing, pose, side and fracture type, segmented without and with the coarse
fracture mask. Scores against the true fractured tibia (all fragments): Dice, mean and 95th
percentile surface distance (mm, boundary voxels), and the volume (ml) of fibula and of femur +
patella + talus wrongly labelled tibia.
Speed: ``segment_tibia`` on a 512x512x400 CT (a phantom at 0.8 x 0.8 x 1.25 mm placed in a 512x512x400
field of view, as a scanner reconstructs it), ``--repeat`` times.
Writes segmentation.md and segmentation.csv into ``--out`` with the command, date and machine.

    python benchmarks/segment_benchmark.py --n 8 --out docs/benchmarks --overwrite
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

from TibiaReconstructionLib.bench import machine_description
from TibiaReconstructionLib.geometry import Volume
from TibiaReconstructionLib.io import atomic_path
from TibiaReconstructionLib.metrics import dice, hd95, mean_ci, mean_surface_distance
from TibiaReconstructionLib.phantoms import generate_case
from TibiaReconstructionLib.segment import segment_tibia

TIBIA, FIBULA = 1, 2
NEIGHBOURS = (3, 4, 5)  # femur, patella, talus
TARGETS = {"dice": 0.95, "msd_mm": 0.7, "time_s": 5.0}
TIMING_SHAPE = (400, 512, 512)  # k, j, i
TIMING_SPACING = (0.8, 0.8, 1.25)
COLUMNS = ("seed", "side", "fracture_type", "spacing_mm", "size", "fracture_mask", "side_found", "dice", "msd_mm",
           "hd95_mm", "fibula_ml", "neighbours_ml", "missed_ml", "extra_ml", "time_s")


def score(case, found, mask_given: bool, seconds: float) -> dict:
    """One CSV row: the segmentation ``found`` of ``case`` against its true fractured tibia."""
    labels = case.fractured_labels.array
    truth, pred = labels == TIBIA, found.tibia.array > 0
    voxel_ml = float(np.prod(case.ct.spacing)) / 1000.0
    return {"seed": case.seed, "side": case.side, "fracture_type": case.fracture_type,
            "spacing_mm": "x".join(f"{s:.3g}" for s in case.ct.spacing),
            "size": "x".join(str(n) for n in case.ct.grid.size), "fracture_mask": "yes" if mask_given else "no",
            "side_found": found.side, "dice": dice(pred, truth),
            "msd_mm": mean_surface_distance(pred, truth, case.ct.spacing),
            "hd95_mm": hd95(pred, truth, case.ct.spacing),
            "fibula_ml": np.count_nonzero(pred & (labels == FIBULA)) * voxel_ml,
            "neighbours_ml": np.count_nonzero(pred & np.isin(labels, NEIGHBOURS)) * voxel_ml,
            "missed_ml": np.count_nonzero(truth & ~pred) * voxel_ml,
            "extra_ml": np.count_nonzero(pred & ~truth) * voxel_ml,
            "time_s": seconds}


def accuracy(n: int, seed: int) -> list[dict]:
    rows = []
    for s in range(seed, seed + n):
        case = generate_case(s)
        for mask in (None, case.fracture_mask):
            t0 = time.perf_counter()
            found = segment_tibia(case.fractured_ct, fracture_mask=mask)
            rows.append(score(case, found, mask is not None, time.perf_counter() - t0))
            print(_row_text(rows[-1]), flush=True)
    return rows


def timing_ct(seed: int) -> tuple[Volume, np.ndarray]:
    """A fractured phantom at TIMING_SPACING placed in a TIMING_SHAPE field of view (air around it,
    cut to it where longer), and its true tibia there."""
    case = generate_case(seed, spacing=TIMING_SPACING)
    src_arr, src_lab = case.fractured_ct.array, case.fractured_labels.array == TIBIA
    ct = np.full(TIMING_SHAPE, -1024, np.int16)
    truth = np.zeros(TIMING_SHAPE, bool)
    src, dst = [], []
    for n, m in zip(src_arr.shape, TIMING_SHAPE):
        a, b = max(0, (n - m) // 2), max(0, (m - n) // 2)
        src.append(slice(a, a + min(n, m)))
        dst.append(slice(b, b + min(n, m)))
    ct[tuple(dst)], truth[tuple(dst)] = src_arr[tuple(src)], src_lab[tuple(src)]
    shift_ijk = np.array([s.start - d.start for s, d in zip(src, dst)], float)[::-1]
    origin = case.ct.index_to_physical(shift_ijk)
    return Volume(ct, case.ct.spacing, origin, case.ct.direction), truth


def speed(seed: int, repeat: int) -> list[dict]:
    ct, truth = timing_ct(seed)
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        found = segment_tibia(ct)
        runs.append({"total_s": time.perf_counter() - t0, **found.timings, "dice": dice(found.tibia.array, truth)})
        print(f"timing {ct.grid.size}: {runs[-1]['total_s']:.2f} s {found.timings}", flush=True)
    return runs


def _row_text(r: dict) -> str:
    return (f"seed {r['seed']} {r['side']:5s} {r['fracture_type']:10s} {r['spacing_mm']:>16s} "
            f"mask {r['fracture_mask']:3s} "
            f"-> {r['side_found']:5s} Dice {r['dice']:.4f} MSD {r['msd_mm']:.3f} mm HD95 {r['hd95_mm']:.2f} mm "
            f"fibula {r['fibula_ml']:.2f} ml neighbours {r['neighbours_ml']:.2f} ml {r['time_s']:.2f} s")


def _summary(rows: list[dict], key: str) -> str:
    v = [r[key] for r in rows]
    m, h = mean_ci(v)
    return f"{m:.4g} ± {h:.2g} (min {min(v):.4g}, max {max(v):.4g})"


def report(rows: list[dict], runs: list[dict], args, started: str, elapsed: float) -> str:
    m = machine_description()
    lines = ["# Automatic tibia segmentation: benchmark", "",
             f"Command: `{' '.join(shlex.quote(a) for a in [sys.executable.split('/')[-1]] + sys.argv)}`  ",
             f"Date: {started}; run time {elapsed / 60:.1f} min  ",
             f"Machine: {m['cpu']}, {m['usable_cpus']} usable CPUs of {m['logical_cpus']}, {m['ram_gib']} GiB RAM, "
             f"GPU {m['gpu']}; load average at the end {os.getloadavg()[0]:.1f} (shared machine); "
             f"{m['os']}, Python {m['python']}; library {m['library']}, git {m['git_commit']}", "",
             f"Cases: {args.n} fractured phantoms, seeds {args.seed}..{args.seed + args.n - 1} (held out: segment.py "
             "was tuned on seeds 1-24, 700000-700010, 800000-800010 and 900000-900010), scanner-like random "
             "spacing, pose, side and fracture "
             "type. Truth: the "
             "fractured tibia label with all fragments. Distances between boundary voxels, in mm. "
             "Mean ± half width of the 95% CI (min, max).", "",
             "| fracture mask | Dice | mean surface distance (mm) | HD95 (mm) | fibula labelled tibia (ml) "
             "| femur+patella+talus labelled tibia (ml) | side correct | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for given in ("no", "yes"):
        sel = [r for r in rows if r["fracture_mask"] == given]
        sides = sum(r["side"] == r["side_found"] for r in sel)
        lines.append(f"| {given} | {_summary(sel, 'dice')} | {_summary(sel, 'msd_mm')} | {_summary(sel, 'hd95_mm')} "
                     f"| {_summary(sel, 'fibula_ml')} | {_summary(sel, 'neighbours_ml')} | {sides}/{len(sel)} "
                     f"| {_summary(sel, 'time_s')} |")
    total = [r["total_s"] for r in runs]
    stages = {k: np.median([r[k] for r in runs]) for k in runs[0] if k not in ("total_s", "dice")}
    dice_no_mask = np.mean([r["dice"] for r in rows if r["fracture_mask"] == "no"])
    msd_no_mask = np.mean([r["msd_mm"] for r in rows if r["fracture_mask"] == "no"])
    size = "x".join(str(n) for n in TIMING_SHAPE[::-1])
    lines += ["", f"Speed on a {size} CT ({' x '.join(map(str, TIMING_SPACING))} "
              f"mm, phantom seed {args.seed + args.n}): median {np.median(total):.2f} s over {len(total)} runs "
              f"(min {min(total):.2f}, max {max(total):.2f}); median per stage (s): "
              + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()) + f"; Dice there {runs[0]['dice']:.4f}.", "",
              "Targets (without fracture mask, mean over cases): "
              f"Dice ≥ {TARGETS['dice']}: "
              f"{'met' if dice_no_mask >= TARGETS['dice'] else 'NOT met'} ({dice_no_mask:.4f}); "
              f"mean surface distance ≤ {TARGETS['msd_mm']} mm: "
              f"{'met' if msd_no_mask <= TARGETS['msd_mm'] else 'NOT met'} ({msd_no_mask:.3f} mm); "
              f"≤ {TARGETS['time_s']} s for 512x512x400: "
              f"{'met' if np.median(total) <= TARGETS['time_s'] else 'NOT met'} ({np.median(total):.2f} s).", "",
              "## Per case", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8, help="number of held-out phantoms (default 8)")
    p.add_argument("--seed", type=int, default=1_000_000, help="first phantom seed (default 1000000)")
    p.add_argument("--repeat", type=int, default=3, help="timing runs on the 512x512x400 CT (default 3)")
    p.add_argument("--out", default="docs/benchmarks", help="output folder (default docs/benchmarks)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    args = p.parse_args(argv)
    out = Path(args.out)
    paths = {"md": out / "segmentation.md", "csv": out / "segmentation.csv"}
    if not args.overwrite and any(q.exists() for q in paths.values()):
        print(f"{paths['md']} or {paths['csv']} exists; pass --overwrite", file=sys.stderr)
        return 1
    started, t0 = datetime.datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    rows = accuracy(args.n, args.seed)
    runs = speed(args.seed + args.n, args.repeat)
    with atomic_path(paths["csv"], args.overwrite) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows({c: _fmt(r[c]) for c in COLUMNS} for r in rows)
    with atomic_path(paths["md"], args.overwrite) as tmp:
        tmp.write_text(report(rows, runs, args, started, time.perf_counter() - t0), encoding="utf-8")
    print(f"wrote {paths['md']} and {paths['csv']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
