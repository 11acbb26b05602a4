"""`tibia-recon demo`: predict on the bundled sample case and show how good the prediction is."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError
from .resources import DEFAULT_BUNDLE, SAMPLE_CASE

SAMPLE_FILES = {"ct": "ct.nrrd", "tibia": "tibia.nrrd", "fracture": "fracture.nrrd", "truth": "healthy_tibia.nrrd"}


def missing_parts(bundle: Path | None = None) -> list[str]:
    """What the demo needs but this checkout lacks (empty when it can run)."""
    bundle = Path(bundle) if bundle else DEFAULT_BUNDLE
    missing = [f"sample case file {SAMPLE_CASE / f}" for f in SAMPLE_FILES.values() if not (SAMPLE_CASE / f).is_file()]
    for name in ("config.json", "weights.safetensors"):
        if not (bundle / name).is_file():
            missing.append(f"model bundle file {bundle / name}")
    return missing


def run_demo(out: str | Path, bundle=None, device="auto", overwrite=False) -> dict:
    """Predict the sample case into ``out``; write an overlay PNG and accuracy.json; return the accuracy."""
    from . import metrics
    from .figures import overlay_png
    from .io import read_mask, read_volume, write_json
    from .cli import tqdm_progress
    from .predict_cli import run_predict

    missing = missing_parts(bundle)
    if missing:
        raise InputError("The demo cannot run; missing: " + "; ".join(missing))
    out = Path(out)
    f = {k: SAMPLE_CASE / v for k, v in SAMPLE_FILES.items()}
    result, paths = run_predict(f["ct"], f["tibia"], f["fracture"], out, bundle, device, "auto", overwrite,
                                progress=tqdm_progress("predict"))
    ct = read_volume(f["ct"])
    truth = read_mask(f["truth"], ct, "ground-truth healthy tibia")
    fracture = read_mask(f["fracture"], ct, "fracture mask")
    pred, gt = result.labelmap.array != 0, truth.array != 0
    accuracy = {"dice": metrics.dice(pred, gt), "rmsd_mm": metrics.rmsd(pred, gt, ct.spacing),
                "hd95_mm": metrics.hd95(pred, gt, ct.spacing),
                "mean_surface_distance_mm": metrics.mean_surface_distance(pred, gt, ct.spacing),
                "side": result.side, "timings_s": result.timings}
    case_info = SAMPLE_CASE / "case.json"
    if case_info.is_file():
        accuracy["sample_case"] = json.loads(case_info.read_text(encoding="utf-8"))
    write_json(accuracy, out / "accuracy.json", overwrite=overwrite)
    overlay_png(ct, out / "overlay.png", {"predicted healthy tibia": (result.labelmap, "#ffcc00"),
                                          "ground truth": (truth, "#00e0ff"), "fracture mask": (fracture, "#ff3060")},
                result.surface, title=f"Sample case: Dice {accuracy['dice']:.3f}, RMSD {accuracy['rmsd_mm']:.2f} mm, "
                                      f"HD95 {accuracy['hd95_mm']:.2f} mm", overwrite=overwrite)
    accuracy["outputs"] = {**{k: str(v) for k, v in paths.items()}, "overlay": str(out / "overlay.png"),
                           "accuracy": str(out / "accuracy.json")}
    return accuracy


def make_sample_case(seed: int, out: str | Path = SAMPLE_CASE, spacing=(1.2, 1.2, 2.0), fracture_type="oblique",
                     side="right", overwrite: bool = False) -> Path:
    """Write a held-out fractured phantom as the sample case: the fractured CT, its tibia and fracture
    masks, and the healthy tibia label (ground truth, on the same grid), compressed NRRD."""
    from .io import write_json, write_volume
    from .phantoms import generate_case

    case = generate_case(seed, fractured=True, side=side, spacing=spacing, fracture_type=fracture_type,
                         size_limit_mm=(170.0, 170.0, 480.0))
    out = Path(out)
    tibia = lambda labels: labels.with_array((labels.array == 1).astype("uint8"))  # noqa: E731
    write_volume(case.fractured_ct, out / SAMPLE_FILES["ct"], overwrite=overwrite)
    write_volume(tibia(case.fractured_labels), out / SAMPLE_FILES["tibia"], label=True, overwrite=overwrite)
    write_volume(case.fracture_mask, out / SAMPLE_FILES["fracture"], label=True, overwrite=overwrite)
    write_volume(tibia(case.labels), out / SAMPLE_FILES["truth"], label=True, overwrite=overwrite)
    write_json({"source": "synthetic phantom (TibiaReconstructionLib.phantoms), not used in training",
                "seed": seed, "side": case.side, "fracture_type": case.fracture_type,
                "spacing_mm": list(spacing), "coordinates": "LPS mm",
                "fragments": [{"id": f["id"], "transform_healthy_to_fractured": f["transform"]}
                              for f in case.fragments],
                "command": f"tibia-recon demo --make-sample-case {seed}"}, out / "case.json", overwrite=overwrite)
    return out


def register_cli(sub) -> None:
    p = sub.add_parser("demo", help="predict the bundled sample case and report accuracy",
                       description="Run predict on the sample fractured case in Resources/SampleCase with the bundled "
                                   "model; write the outputs, an overlay PNG and accuracy.json against its ground "
                                   "truth.")
    p.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    p.add_argument("--bundle", default=None)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier demo")
    p.add_argument("--make-sample-case", type=int, metavar="SEED", help="instead: (re)make the sample case from "
                                                                        "phantom SEED into Resources/SampleCase")

    def run(a):
        from .cli import print_outputs

        if a.make_sample_case is not None:
            print(f"sample case written to {make_sample_case(a.make_sample_case, overwrite=a.overwrite)}")
            return
        acc = run_demo(a.out, a.bundle, a.device, a.overwrite)
        print(f"Dice {acc['dice']:.3f}  RMSD {acc['rmsd_mm']:.2f} mm  HD95 {acc['hd95_mm']:.2f} mm  "
              f"(side {acc['side']}, {sum(acc['timings_s'].values()):.2f} s)")
        print_outputs(acc["outputs"])

    p.set_defaults(func=run)
