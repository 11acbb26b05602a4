"""How the prediction holds up when the scanner or the bone differs from the phantoms'; a benchmark, not a test.

``--n`` held-out fractured phantoms (seeds ``--seed`` .. ``--seed + n - 1``, both legs in the CT, as `tibia-recon
bench accuracy` makes them) are predicted as generated and after changing the CT (the masks stay): ``noise``, extra
Gaussian noise (SD ``--noise-hu``); ``smooth``, a softer reconstruction kernel (Gaussian blur, SD ``--blur-mm`` in
mm); ``weak``, weaker bone (every HU above 100 pulled towards 100 by the factor ``--bone-scale``: cortex about 800 HU
instead of 1400). Each with the default (the other leg found in the CT as template) and from the fractured leg alone.
Scores on the CT grid against the healthy tibia (Dice, RMSD, HD95). Writes scanner_robustness.md and
scanner_robustness.csv into ``--out`` with the command, date and machine.

    python benchmarks/scanner_robustness.py --n 12 --out docs/benchmarks/scanner-robustness --overwrite
"""

from __future__ import annotations

import argparse
import csv
import datetime
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from TibiaReconstructionLib.bench import _inputs, heldout_case, machine_description, score
from TibiaReconstructionLib.io import atomic_path
from TibiaReconstructionLib.metrics import mean_ci
from TibiaReconstructionLib.predict import DEFAULT_BUNDLE, Predictor

TIBIA = 1  # phantoms/ct.py
CHANGES = ("none", "noise", "smooth", "weak")
METHODS = {"default": "auto", "one leg": None}  # Predictor.predict's other_tibia
COLUMNS = ("seed", "fracture_type", "change", "method", "dice", "rmsd_mm", "hd95_mm", "other_leg_used")


def changed_ct(ct, change: str, args, rng: np.random.Generator):
    """The CT (int16 HU, same grid) after ``change``."""
    hu = ct.array.astype(np.float32)
    if change == "noise":
        hu = hu + rng.normal(0.0, args.noise_hu, hu.shape).astype(np.float32)
    elif change == "smooth":
        hu = ndimage.gaussian_filter(hu, args.blur_mm / np.asarray(ct.spacing[::-1]))
    elif change == "weak":
        hu = np.where(hu > 100.0, 100.0 + (hu - 100.0) * args.bone_scale, hu)
    return ct.with_array(np.clip(np.rint(hu), -1024, 3071).astype(np.int16))


def run(args) -> list[dict]:
    predictor = Predictor(args.bundle, "cpu")
    rows = []
    for seed in range(args.seed, args.seed + args.n):
        case = heldout_case(seed, args.spacing)
        ct, tibia, fracture = _inputs(case)
        truth = case.labels.array == TIBIA
        rng = np.random.default_rng(seed)
        for change in CHANGES:
            changed = changed_ct(ct, change, args, rng)
            for method, other in METHODS.items():
                result = predictor.predict(changed, tibia, fracture, other_tibia=other)
                scores = score(result.labelmap.array != 0, truth, ct.spacing)
                rows.append({"seed": seed, "fracture_type": case.fracture_type, "change": change, "method": method,
                             **{k: round(scores[k], 4) for k in ("dice", "rmsd_mm", "hd95_mm")},
                             "other_leg_used": bool(result.fusion.get("other_leg", {}).get("used", False))})
            print(seed, change, [f"{r['method']} {r['rmsd_mm']:.2f}" for r in rows[-len(METHODS):]], flush=True)
    return rows


def report(rows: list[dict], args, seconds: float) -> str:
    command = "python benchmarks/scanner_robustness.py " + shlex.join(sys.argv[1:])
    machine = machine_description()
    lines = ["# Scanner and bone robustness", "",
             f"Generated on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC in {seconds:.0f} s by:",
             "", f"    {command}", "",
             f"{args.n} held-out phantoms (seeds {args.seed}..{args.seed + args.n - 1}, both legs, "
             f"{' x '.join(f'{s:g}' for s in args.spacing)} mm); the CT changed, the masks not: noise = extra Gaussian "
             f"noise SD {args.noise_hu:g} HU; smooth = Gaussian blur SD {args.blur_mm:g} mm (a softer kernel); weak = "
             f"HU above 100 scaled by {args.bone_scale:g} towards 100 (weaker bone). Bundle `{args.bundle}`; "
             f"machine: {machine['cpu']}, {machine['usable_cpus']} CPUs, git {machine['git_commit']}. Mean ± half "
             "width of the 95 % confidence interval; 'other leg used': cases whose prediction took the other leg as "
             "template.", "",
             "| change | method | Dice | RMSD (mm) | HD95 (mm) | other leg used |", "|---|---|---|---|---|---|"]
    for change in CHANGES:
        for method in METHODS:
            sel = [r for r in rows if r["change"] == change and r["method"] == method]
            cells = []
            for key in ("dice", "rmsd_mm", "hd95_mm"):
                mean, half = mean_ci(np.array([r[key] for r in sel], float))
                cells.append(f"{mean:.3f} ± {half:.3f}" if np.isfinite(half) else f"{mean:.3f}")
            used = sum(r["other_leg_used"] for r in sel)
            lines.append(f"| {change} | {method} | {' | '.join(cells)} | {used} of {len(sel)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--seed", type=int, default=500000)
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 2.0))
    parser.add_argument("--noise-hu", type=float, default=80.0)
    parser.add_argument("--blur-mm", type=float, default=1.5)
    parser.add_argument("--bone-scale", type=float, default=0.6)
    parser.add_argument("--out", default="docs/benchmarks/scanner-robustness")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    paths = {"md": out / "scanner_robustness.md", "csv": out / "scanner_robustness.csv"}
    for path in paths.values():
        if path.exists() and not args.overwrite:
            sys.exit(f"{path} exists; pass --overwrite to replace it.")
    start = time.perf_counter()
    rows = run(args)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(paths["csv"], args.overwrite) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with atomic_path(paths["md"], args.overwrite) as tmp:
        Path(tmp).write_text(report(rows, args, time.perf_counter() - start), encoding="utf-8")
    print(f"wrote {paths['md']} and {paths['csv']}")


if __name__ == "__main__":
    main()
