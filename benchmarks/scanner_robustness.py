"""How the prediction holds up when the scanner, the bone or the fracture mask differs from the phantoms'; a
benchmark, not a test.

``--n`` held-out fractured phantoms (seeds ``--seed`` .. ``--seed + n - 1``, both legs in the CT, as `tibia-recon
bench accuracy` makes them) are predicted as generated and after each of ``--changes``. Changes to the CT (the masks
stay): ``noise``, extra Gaussian noise (SD ``--noise-hu``); ``smooth``, a softer reconstruction kernel (Gaussian blur,
SD ``--blur-mm`` in mm); ``weak``, weaker bone (every HU above 100 pulled towards 100 by the factor ``--bone-scale``:
cortex about 900 HU instead of 1500). Changes to the fracture mask, as a surgeon may paint it (the CT stays):
``dilated``, grown by ``--dilate-mm``; ``slab``, every slice across the tibia that the mask touches, whole, 5 mm
beyond; ``proximal``, the mask plus the proximal ``--proximal-fraction`` of the tibia's slices (over the knee end).
Changes to the pose: ``turned_out`` / ``turned_in``, the whole CT and its masks turned by ``--turn-deg`` about the
vertical axis through the fractured tibia, the way that turns the leg's toes out (external rotation) or in (exact: the
grid's direction and origin turn, the voxels stay). Each with the default (the other leg found in the CT as template)
and from the fractured leg alone. Scores on the CT grid against the healthy tibia (Dice, RMSD, HD95; and whether the
side came out right); a mask that hides too much of the tibia is refused (counted).
Writes scanner_robustness.md and scanner_robustness.csv into ``--out`` with the command, date and machine.

    python benchmarks/scanner_robustness.py --n 12 --out docs/benchmarks/scanner-robustness --overwrite
    python benchmarks/scanner_robustness.py --n 12 --changes none dilated slab proximal \
        --out docs/benchmarks/fracture-mask-styles --overwrite
    python benchmarks/scanner_robustness.py --n 12 --changes none turned_out turned_in \
        --out docs/benchmarks/leg-turned --overwrite
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
from TibiaReconstructionLib.errors import InputError
from TibiaReconstructionLib.geometry import euler_rotation, moved
from TibiaReconstructionLib.io import atomic_path
from TibiaReconstructionLib.metrics import mean_ci
from TibiaReconstructionLib.predict import DEFAULT_BUNDLE, Predictor

TIBIA = 1  # phantoms/ct.py
CT_CHANGES = ("noise", "smooth", "weak")
MASK_CHANGES = ("dilated", "slab", "proximal")
POSE_CHANGES = ("turned_out", "turned_in")
SLAB_MARGIN_MM = 5.0
METHODS = {"default": "auto", "one leg": None}  # Predictor.predict's other_tibia
COLUMNS = ("seed", "fracture_type", "change", "method", "status", "hidden_share", "dice", "rmsd_mm", "hd95_mm",
           "other_leg_used", "side_right")


def changed_ct(ct, change: str, args, rng: np.random.Generator):
    """The CT (int16 HU, same grid) after ``change`` (unchanged for a change to the mask)."""
    hu = ct.array.astype(np.float32)
    if change == "noise":
        hu = hu + rng.normal(0.0, args.noise_hu, hu.shape).astype(np.float32)
    elif change == "smooth":
        hu = ndimage.gaussian_filter(hu, args.blur_mm / np.asarray(ct.spacing[::-1]))
    elif change == "weak":
        hu = np.where(hu > 100.0, 100.0 + (hu - 100.0) * args.bone_scale, hu)
    return ct.with_array(np.clip(np.rint(hu), -1024, 3071).astype(np.int16))


def changed_mask(ct, tibia, fracture, change: str, args):
    """The fracture mask (uint8, same grid) after ``change``; slices are taken across the CT axis nearest the body's
    long axis."""
    mask = fracture.array != 0
    axis = int(np.argmax(np.abs(ct.direction[2])))  # (i, j, k) axis along the leg
    dim = 2 - axis  # its array dimension
    if change == "dilated":
        mask = ndimage.distance_transform_edt(~mask, sampling=ct.spacing[::-1]) <= args.dilate_mm
    elif change in ("slab", "proximal"):
        along = np.moveaxis(mask, dim, 0)
        held = np.flatnonzero(np.moveaxis(tibia.array != 0, dim, 0).any(axis=(1, 2)))
        if change == "slab":
            touched = np.flatnonzero(along.any(axis=(1, 2)))
            margin = int(np.ceil(SLAB_MARGIN_MM / ct.spacing[axis]))
            lo, hi = max(touched[0] - margin, 0), touched[-1] + margin
        else:
            n = int(round(args.proximal_fraction * (held[-1] - held[0])))
            superior_up = ct.direction[2, axis] > 0
            lo, hi = (held[-1] - n, held[-1]) if superior_up else (held[0], held[0] + n)
        along = along.copy()
        along[lo:hi + 1] = True
        mask = np.moveaxis(along, 0, dim)
    return fracture.with_array(mask.astype(np.uint8))


def turned(volumes, tibia, side: str, change: str, degrees: float) -> list:
    """``volumes`` (on the CT grid) turned about the vertical (LPS z) axis through the centroid of ``tibia`` (a
    mask on that grid) by ``degrees``, toes out for ``change`` 'turned_out' (anticlockwise seen from above for a
    left leg), in for 'turned_in'; unchanged for another change."""
    if change not in POSE_CHANGES:
        return list(volumes)
    a = degrees * (1 if change == "turned_out" else -1) * (1 if side == "left" else -1)
    kji = np.argwhere(tibia.array != 0)[::20]
    turn = euler_rotation((0.0, 0.0, a), tibia.grid.index_to_physical(kji[:, ::-1].astype(float)).mean(0))
    return [moved(v, turn) for v in volumes]


def run(args) -> list[dict]:
    predictor = Predictor(args.bundle, "cpu")
    rows = []
    for seed in range(args.seed, args.seed + args.n):
        case = heldout_case(seed, args.spacing)
        ct, tibia, fracture = _inputs(case)
        truth = case.labels.array == TIBIA
        rng = np.random.default_rng(seed)
        for change in args.changes:
            changed = changed_ct(ct, change, args, rng)
            mask = changed_mask(ct, tibia, fracture, change, args) if change in MASK_CHANGES else fracture
            changed, posed, mask = turned((changed, tibia, mask), tibia, case.side, change, args.turn_deg)
            hidden = float(np.count_nonzero(mask.array[tibia.array != 0]) / np.count_nonzero(tibia.array))
            base = {"seed": seed, "fracture_type": case.fracture_type, "change": change,
                    "hidden_share": round(hidden, 4)}
            for method, other in METHODS.items():
                try:
                    result = predictor.predict(changed, posed, mask, other_tibia=other)
                except InputError as error:  # a mask that hides too much
                    rows.append({**base, "method": method, "status": f"refused: {error}"[:200], "dice": np.nan,
                                 "rmsd_mm": np.nan, "hd95_mm": np.nan, "other_leg_used": False, "side_right": False})
                    continue
                scores = score(result.labelmap.array != 0, truth, ct.spacing)  # the same voxels, turned or not
                rows.append({**base, "method": method, "status": "ok",
                             **{k: round(scores[k], 4) for k in ("dice", "rmsd_mm", "hd95_mm")},
                             "other_leg_used": bool(result.fusion.get("other_leg", {}).get("used", False)),
                             "side_right": result.side == case.side})
            print(seed, change, [f"{r['method']} {r['rmsd_mm']:.2f}" for r in rows[-len(METHODS):]], flush=True)
    return rows


DESCRIPTIONS = {"none": "none = as generated", "noise": "noise = extra Gaussian noise SD {noise_hu:g} HU",
                "smooth": "smooth = Gaussian blur SD {blur_mm:g} mm (a softer kernel)",
                "weak": "weak = HU above 100 scaled by {bone_scale:g} towards 100 (weaker bone)",
                "dilated": "dilated = the fracture mask grown by {dilate_mm:g} mm",
                "slab": "slab = every slice across the tibia that the fracture mask touches, whole, "
                        f"{SLAB_MARGIN_MM:g} mm beyond",
                "proximal": "proximal = the fracture mask plus the proximal {proximal_fraction:.0%} of the tibia's "
                            "slices",
                "turned_out": "turned_out = the CT and masks turned {turn_deg:g} deg about the vertical axis through "
                              "the tibia, toes out",
                "turned_in": "turned_in = the same, toes in"}


def report(rows: list[dict], args, seconds: float) -> str:
    command = "python benchmarks/scanner_robustness.py " + shlex.join(sys.argv[1:])
    machine = machine_description()
    changes = "; ".join(DESCRIPTIONS[c].format(**vars(args)) for c in args.changes)
    lines = ["# Robustness to the scanner, the bone and the fracture mask", "",
             f"Generated on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC in {seconds:.0f} s by:",
             "", f"    {command}", "",
             f"{args.n} held-out phantoms (seeds {args.seed}..{args.seed + args.n - 1}, both legs, "
             f"{' x '.join(f'{s:g}' for s in args.spacing)} mm), each predicted after one change (to the CT or to "
             f"the fracture mask, the rest as generated): {changes}. Bundle `{args.bundle}`; machine: "
             f"{machine['cpu']}, {machine['usable_cpus']} CPUs, git {machine['git_commit']}. Mean ± half width of the "
             "95 % confidence interval over the predicted cases; 'hidden': the share of the tibia under the fracture "
             "mask (mean); 'refused': masks that hide too much of the tibia to predict; 'other leg used': cases whose "
             "prediction took the other leg as template; 'wrong side': predicted as the other leg side.", "",
             "| change | method | hidden | Dice | RMSD (mm) | HD95 (mm) | refused | other leg used | wrong side |",
             "|---|---|---|---|---|---|---|---|---|"]
    for change in args.changes:
        for method in METHODS:
            sel = [r for r in rows if r["change"] == change and r["method"] == method]
            done = [r for r in sel if r["status"] == "ok"]
            cells = []
            for key in ("dice", "rmsd_mm", "hd95_mm"):
                mean, half = mean_ci(np.array([r[key] for r in done], float)) if done else (np.nan, np.nan)
                cells.append(f"{mean:.3f} ± {half:.3f}" if np.isfinite(half) else f"{mean:.3f}")
            used = sum(r["other_leg_used"] for r in done)
            hidden = np.mean([r["hidden_share"] for r in sel])
            wrong = sum(not r["side_right"] for r in done)
            lines.append(f"| {change} | {method} | {hidden:.0%} | {' | '.join(cells)} | {len(sel) - len(done)} | "
                         f"{used} of {len(done)} | {wrong} |")
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
    parser.add_argument("--dilate-mm", type=float, default=3.0)
    parser.add_argument("--proximal-fraction", type=float, default=0.3)
    parser.add_argument("--turn-deg", type=float, default=30.0)
    parser.add_argument("--changes", nargs="+", default=("none", *CT_CHANGES),
                        choices=("none", *CT_CHANGES, *MASK_CHANGES, *POSE_CHANGES))
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
