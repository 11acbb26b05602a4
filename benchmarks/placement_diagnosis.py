"""Why the distal fragment is put back in the wrong place: a diagnosis of the default bundle's fragment reduction;
not a test.

On ``--n`` held-out fractured phantoms (seeds ``--seed`` ..., both legs, CT grid of ``--spacing`` mm), for every
shaft fracture whose reduction found two fragments (the proximal anchor and the distal fragment), in the canonical
frame of the Predictor (``P``, mm):

1. Placement error: where the reduction put the distal fragment's voxels against where the phantom's true reduction
   puts them (the inverse of its healthy -> fractured transform): the mean distance (mm), by distance from the
   break (along the long axis from the fragment's end next to the anchor), and what is left after the best single
   translation (and that translation, split into along and across the long axis).
2. Model energy: the PCA posterior's negative log-density (up to a constant) of the input with the fragment where
   the reduction put it, where the truth puts it, and not moved: the residual on the visible voxels over the
   noise variance plus the code's squared Mahalanobis norm, after the LocNet's alignment. The lower, the more the
   model prefers that placement.
3. Rigid motions of the whole tibia: the share of the change that the PCA spans when its mean tibia is turned or
   shifted (about the knee), and the code that takes (its norm in standard deviations).

Writes placement.md and placement.csv into ``--out`` with the command, date and machine.

    python benchmarks/placement_diagnosis.py --n 20 --out docs/benchmarks --overwrite
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
import torch
from scipy.spatial.transform import Rotation

from TibiaReconstructionLib.bench import heldout_case, machine_description
from TibiaReconstructionLib.geometry import apply_affine
from TibiaReconstructionLib.io import atomic_path
from TibiaReconstructionLib.models.pca import PCA
from TibiaReconstructionLib.models.sampler import compose_theta, invert_theta, matrix_to_theta
from TibiaReconstructionLib.predict import Predictor
from TibiaReconstructionLib.prepare import resample_crops, smoothed_crops
from TibiaReconstructionLib.refine import find_fragments, reduce_input

TIBIA = 1  # phantoms/ct.py
BREAK_BINS_MM = (0, 10, 20, 40, 80, 1000)
MOTIONS = (("turn 3 deg about the anterior-posterior axis", (0.0, 3.0, 0.0), (0.0, 0.0, 0.0)),
           ("turn 3 deg about the left-right axis", (3.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
           ("twist 10 deg about the long axis", (0.0, 0.0, 10.0), (0.0, 0.0, 0.0)),
           ("shift 4 mm across", (0.0, 0.0, 0.0), (4.0, 0.0, 0.0)),
           ("shift 4 mm along", (0.0, 0.0, 0.0), (0.0, 0.0, 4.0)))


def pca_energy(pca: PCA, aligned: torch.Tensor, visible: torch.Tensor) -> tuple[float, float]:
    """(residual on the visible voxels / noise variance, squared Mahalanobis norm of the code) of one aligned input
    (1, C, Z, Y, X) with its aligned visibility (1, 1, Z, Y, X)."""
    code = pca.encode(aligned, visible)
    pooled = pca._pool(aligned)
    weights = pca._pool(visible).expand_as(pooled).reshape(1, -1)
    residual = pooled.reshape(1, -1) - pca.mean - code @ pca.components
    return (float((weights * residual ** 2).sum() / pca.noise_variance), float((code ** 2 / pca.variances).sum()))


def energy_after(predictor: Predictor, x, visible, fragments, theta, move: np.ndarray, fragment: int) -> float:
    """The model energy (:func:`pca_energy`, both terms) of the input with ``fragment`` moved by ``move`` (4x4 of
    canonical points) and the other fragments left where they are."""
    bundle = predictor.bundle
    moves = np.stack([move if f == fragment else np.eye(4) for f in fragments.ids])
    th = theta.double()
    k = len(fragments.ids)
    standard = compose_theta(invert_theta(th).expand(k, -1, -1),
                             compose_theta(matrix_to_theta(moves, torch.float64), th.expand(k, -1, -1))).float()
    with torch.no_grad():
        moved_x, seen = reduce_input(x, visible, fragments, standard, theta, bundle.sampler)
        theta2 = bundle.locnet(moved_x)
        both = bundle.sampler(torch.cat([moved_x, seen], dim=1), theta2)
        return sum(pca_energy(bundle.autoencoder, both[:, :-1], (both[:, -1:] > 0.5).float()))


def diagnose_case(predictor: Predictor, case) -> dict | None:
    """One CSV row for a two-fragment shaft case, None for the others."""
    if case.fracture_type == "plateau":
        return None
    tibia = case.fractured_labels.with_array((case.fractured_labels.array == TIBIA).astype(np.uint8))
    side = case.side
    run = predictor._run_model(case.fractured_ct, tibia, case.fracture_mask, side)
    placement = run.placement
    if placement is None or len(placement.ids) != 2:
        return None
    grid = predictor.bundle.grid
    crops = smoothed_crops(case.fractured_ct, tibia, grid.spacing, case.fracture_mask)
    canonical = resample_crops(crops, grid, run.p, predictor.bundle.window_hu)
    x = torch.from_numpy(canonical.tensor[None])
    visible = torch.from_numpy(canonical.visible[None, None].astype(np.float32))
    fragments = find_fragments(x[0, -1].numpy(), visible[0, 0].numpy())
    theta, _, _ = predictor.bundle.align_and_reconstruct(x, visible)
    distal = next(f for f in placement.ids if f != placement.anchor)
    ours = placement.moves[placement.ids.index(distal)]
    healthy_to_fractured = next(f["transform"] for f in case.fragments if f["id"] == 2)
    truth = run.p @ np.linalg.inv(healthy_to_fractured) @ np.linalg.inv(run.p)
    points = grid.index_to_physical(np.argwhere(placement.labels == distal)[:, ::-1].astype(float))
    placed, true = apply_affine(ours, points), apply_affine(truth, points)
    error = np.linalg.norm(placed - true, axis=1)
    anchor_z = grid.index_to_physical(np.argwhere(placement.labels == placement.anchor)[:, ::-1].astype(float))[:, 2]
    towards_anchor = 1.0 if np.median(anchor_z) > np.median(true[:, 2]) else -1.0
    from_break = np.abs(true[:, 2] - (true[:, 2].max() if towards_anchor > 0 else true[:, 2].min()))
    shift = (true - placed).mean(0)
    row = {"seed": case.seed, "fracture_type": case.fracture_type,
           "error_mm": error.mean(), "after_translation_mm": np.linalg.norm(placed + shift - true, axis=1).mean(),
           "translation_along_mm": towards_anchor * shift[2], "translation_across_mm": float(np.hypot(*shift[:2]))}
    for lo, hi in zip(BREAK_BINS_MM[:-1], BREAK_BINS_MM[1:]):
        near = (from_break >= lo) & (from_break < hi)
        row[f"error_{lo}_{hi}mm"] = error[near].mean() if near.any() else float("nan")
    for name, move in (("ours", ours), ("truth", truth), ("none", np.eye(4))):
        row[f"energy_{name}"] = energy_after(predictor, x, visible, fragments, theta, move, distal)
    return {k: round(float(v), 3) if isinstance(v, (float, np.floating)) else v for k, v in row.items()}


def rigid_motion_span(predictor: Predictor) -> list[dict]:
    """How much of small rigid motions of the PCA's mean tibia (about its knee) the PCA spans, and at what code."""
    bundle = predictor.bundle
    pca = bundle.autoencoder
    mean = pca.decode(torch.zeros(1, len(pca.variances)))
    grid = bundle.grid
    bone = grid.index_to_physical(np.argwhere(mean[0, -1].numpy() > 0.5)[:, ::-1].astype(float))
    knee = bone[bone[:, 2] > np.percentile(bone[:, 2], 95)].mean(0)
    rows = []
    for name, degrees, shift in MOTIONS:
        rotation = Rotation.from_rotvec(np.deg2rad(degrees)).as_matrix()
        move = np.eye(4)
        move[:3, :3], move[:3, 3] = rotation, knee - rotation @ knee + np.asarray(shift)
        with torch.no_grad():
            moved = bundle.sampler(mean, matrix_to_theta(np.linalg.inv(move)[None]))
            change = (pca._pool(moved) - pca._pool(mean)).reshape(-1)
            code = change @ pca.components.T
        rows.append({"motion": name, "spanned": round(float((code @ pca.components).norm() / change.norm()), 3),
                     "code_sd": round(float((code / pca.variances.sqrt()).norm()), 2)})
    return rows


def write_report(out: Path, rows: list[dict], span: list[dict], args, seconds: float, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0]) if rows else []
    with atomic_path(out / "placement.csv", overwrite) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    mean = {k: float(np.nanmean([r[k] for r in rows])) for k in columns[2:]} if rows else {}
    preferred = sum(r["energy_ours"] < r["energy_truth"] for r in rows)
    machine = machine_description()
    bins = [f"{lo}-{hi}" if hi < 1000 else f">{lo}" for lo, hi in zip(BREAK_BINS_MM[:-1], BREAK_BINS_MM[1:])]
    lines = ["# Where the distal fragment goes: a diagnosis", "",
             f"Generated by `benchmarks/placement_diagnosis.py` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
             "UTC. Reproduce with:", "", "    " + shlex.join(["python", *sys.argv]), "",
             f"- {len(rows)} two-fragment shaft fractures among held-out phantoms {args.seed}..{args.seed + args.n - 1} "
             f"({args.spacing[0]:g} x {args.spacing[1]:g} x {args.spacing[2]:g} mm); bundle `{args.bundle}`; "
             f"library {machine['library']} (git {machine['git_commit']}), torch {machine['torch']}; run time "
             f"{seconds:.0f} s.",
             "- Errors in mm on the canonical grid, between where the reduction put the distal fragment's voxels and "
             "where the phantom's true reduction puts them; model energy: the PCA posterior's residual over the noise "
             "variance plus the code's squared Mahalanobis norm (lower = preferred by the model).", "",
             "## Placement error by distance from the break (mm)", "",
             "| seed | type | " + " | ".join(bins) + " | mean | after the best translation | that translation along / "
             "across the long axis (+ = towards the anchor) |",
             "|---|---|" + "---|" * (len(bins) + 3)]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['fracture_type']} | "
                     + " | ".join(f"{r[f'error_{lo}_{hi}mm']:.1f}" for lo, hi in zip(BREAK_BINS_MM[:-1], BREAK_BINS_MM[1:]))
                     + f" | {r['error_mm']:.1f} | {r['after_translation_mm']:.1f} | "
                       f"{r['translation_along_mm']:+.1f} / {r['translation_across_mm']:.1f} |")
    if rows:
        lines.append("| mean | | " + " | ".join(f"{mean[f'error_{lo}_{hi}mm']:.1f}" for lo, hi in
                                               zip(BREAK_BINS_MM[:-1], BREAK_BINS_MM[1:]))
                     + f" | {mean['error_mm']:.1f} | {mean['after_translation_mm']:.1f} | |")
    lines += ["", "## Model energy of three placements of the distal fragment", "",
              f"The model prefers the reduction's placement to the true one in {preferred} of {len(rows)} cases.", "",
              "| seed | type | not moved | the reduction's | the truth's |", "|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['fracture_type']} | {r['energy_none']:.0f} | {r['energy_ours']:.0f} | "
              f"{r['energy_truth']:.0f} |" for r in rows]
    lines += ["", "## Rigid motions of the whole tibia in the PCA", "",
              "| motion of the mean tibia (about its knee) | share of the change in the PCA's span | code (SD) |",
              "|---|---|---|"]
    lines += [f"| {s['motion']} | {s['spanned']:.2f} | {s['code_sd']:.1f} |" for s in span]
    with atomic_path(out / "placement.md", overwrite) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="Resources/Models/default")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--seed", type=int, default=500000)
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 2.0))
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    predictor = Predictor(args.bundle, "cpu")
    if not isinstance(predictor.bundle.autoencoder, PCA):
        parser.error("the diagnosis needs a PCA bundle (its posterior energy)")
    rows = []
    for seed in range(args.seed, args.seed + args.n):
        row = diagnose_case(predictor, heldout_case(seed, args.spacing))
        if row is not None:
            rows.append(row)
            print(seed, row["fracture_type"], f"error {row['error_mm']:.1f} mm, energy ours {row['energy_ours']:.0f} "
                  f"truth {row['energy_truth']:.0f}", flush=True)
    write_report(Path(args.out), rows, rigid_motion_span(predictor), args, time.perf_counter() - t0, args.overwrite)
    print(f"  md: {Path(args.out) / 'placement.md'}\n  csv: {Path(args.out) / 'placement.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
