"""`tibia-recon phantoms` (make a synthetic data set) and `tibia-recon montage` (look at one case)."""

from __future__ import annotations

import argparse
import multiprocessing
import os
from pathlib import Path

from tqdm import tqdm

from ..errors import InputError
from ..io import write_json

MANIFEST = "manifest.json"


def case_folder_name(index: int) -> str:
    return f"case_{index:05d}"


def _make_one(job: tuple) -> dict:
    """Generate and write one case (runs in a worker process); returns its manifest entry."""
    from .generator import generate_case, write_case

    index, seed, out, fractured, side, spacing, fmt, overwrite, both_legs = job
    case = generate_case(seed, fractured=fractured, side=side, spacing=spacing, both_legs=both_legs)
    name = case_folder_name(index)
    meta = write_case(case, Path(out) / name, fmt=fmt, overwrite=overwrite)
    files = {k: f"{name}/{v}" for k, v in meta["files"].items()}
    entry = {"id": name, "index": index, "seed": seed, "folder": name, "side": case.side,
             "fractured": case.fractured, "fracture_type": case.fracture_type, "spacing": meta["spacing"],
             "size": meta["grid"]["size"], "files": files, "case_json": f"{name}/case.json",
             # the keys `tibia-recon prepare` reads (paths relative to the manifest)
             "ct": files["ct"], "tibia": files["tibia_mask"]}
    if case.both_legs:
        entry["other_tibia"] = files["other_tibia_mask"]
    if case.fractured:
        entry.update(fractured_ct=files["fractured_ct"], fractured_tibia=files["fractured_tibia_mask"],
                     fracture_mask=files["fracture_mask"])
    return entry


def make_dataset(n: int, out: str | os.PathLike, seed: int = 0, fractured: bool = True, side: str = "random",
                 spacing: tuple | None = None, fmt: str = "nrrd", workers: int = 1, overwrite: bool = False,
                 progress: bool = True, both_legs: bool = False) -> dict:
    """Write ``n`` cases (case seed = ``seed`` + index) into ``out`` plus manifest.json; returns the manifest.

    Each manifest case has id, seed, side, fracture_type, files (all volumes, relative paths) and the keys
    `tibia-recon prepare` reads: ct, tibia, and for fractured cases fractured_ct, fractured_tibia, fracture_mask;
    with ``both_legs`` (the healthy other leg in every CT) also other_tibia.
    """
    from .ct import LABEL_NAMES, OTHER_LABEL_NAMES

    if n < 1:
        raise InputError(f"--n must be at least 1, got {n}.")
    if side not in ("left", "right", "random"):
        raise InputError(f"--side must be left, right or random, got {side!r}.")
    out = Path(out)
    if (out / MANIFEST).exists() and not overwrite:
        raise InputError(f"{out / MANIFEST} already exists; choose another --out folder or pass --overwrite.")
    jobs = [(i, seed + i, str(out), fractured, None if side == "random" else side, spacing, fmt, overwrite, both_legs)
            for i in range(n)]
    workers = max(1, min(workers, n))
    bar = tqdm(total=n, desc="phantoms", unit="case", disable=not progress)
    if workers == 1:
        entries = []
        for job in jobs:
            entries.append(_make_one(job))
            bar.update()
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            entries = []
            for entry in pool.imap(_make_one, jobs):
                entries.append(entry)
                bar.update()
    bar.close()
    manifest = {"format_version": 1, "generator": "TibiaReconstructionLib.phantoms", "seed": seed, "n": n,
                "fractured": fractured, "both_legs": both_legs, "format": fmt, "coordinates": "LPS mm",
                "labels": {str(k): v for k, v in {**LABEL_NAMES, **(OTHER_LABEL_NAMES if both_legs else {})}.items()},
                "cases": entries}
    write_json(manifest, out / MANIFEST, overwrite=overwrite)
    return manifest


def _run_phantoms(args: argparse.Namespace) -> int:
    make_dataset(args.n, args.out, seed=args.seed, fractured=args.fractured, side=args.side,
                 spacing=tuple(args.spacing) if args.spacing else None, fmt=args.format, workers=args.workers,
                 overwrite=args.overwrite, progress=not args.quiet, both_legs=args.both_legs)
    print(f"wrote {args.n} cases and {MANIFEST} to {args.out}")
    return 0


def _run_montage(args: argparse.Namespace) -> int:
    from .generator import read_case
    from .montage import save_montage

    path = save_montage(read_case(args.case_dir), args.out, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser(
        "phantoms", help="make synthetic lower-leg CTs (healthy and fractured tibia) with ground truth",
        description="Make N synthetic lower-leg CT cases from the LLP26 shape model: one folder per case "
                    "(ct, labels, tibia_mask and, when fractured, fractured_ct, fractured_labels, "
                    "fractured_tibia_mask, fracture_mask, fragments, case.json) plus manifest.json. "
                    "Case i uses seed S + i, so any case can be remade alone. Coordinates LPS mm.")
    p.add_argument("--n", type=int, required=True, help="number of cases")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the first case (default 0)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--fractured", dest="fractured", action="store_true", default=True,
                       help="fractured cases with their healthy ground truth (default)")
    group.add_argument("--healthy", dest="fractured", action="store_false", help="healthy cases only")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"),
                   help="voxel spacing in mm along the grid axes (default: random scanner-like, in-plane "
                        "0.6-1.0 mm, slices 0.625-3 mm; use about 2 mm for training sets)")
    p.add_argument("--format", choices=("nrrd", "nii.gz"), default="nrrd", help="volume file format")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    p.add_argument("--side", choices=("left", "right", "random"), default="random",
                   help="leg side (with --both-legs: the fractured leg's; default random)")
    p.add_argument("--both-legs", action="store_true",
                   help="put the healthy other leg (same shape with bilateral asymmetry, knees 11-20 cm apart) in "
                        "the same CT; its bones are labelled 6-10 and other_tibia_mask is written")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_phantoms)

    m = sub.add_parser("montage", help="PNG montage of a phantom case (axial/coronal/sagittal)",
                       description="Write a PNG with axial, coronal and sagittal slices of a phantom case folder: "
                                   "healthy CT, fractured CT, and the fractured CT with tibia label and fracture "
                                   "mask contours.")
    m.add_argument("case_dir", help="a case folder written by `tibia-recon phantoms`")
    m.add_argument("--out", required=True, help="PNG file to write")
    m.add_argument("--overwrite", action="store_true", help="replace an existing PNG")
    m.set_defaults(func=_run_montage)
