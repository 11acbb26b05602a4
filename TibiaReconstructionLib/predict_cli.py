"""`tibia-recon predict`: files in, predicted healthy tibia (labelmap, intensity, STL, report) out."""

from __future__ import annotations

from pathlib import Path

from .errors import OutputExistsError
from .io import read_mask, read_volume, volume_suffix, write_json, write_volume
from .surface import write_stl

OUTPUT_NAMES = ("predicted_tibia_label", "predicted_tibia_intensity", "predicted_tibia_LPS.stl",
                "predicted_tibia_RAS.stl", "report.json")


def output_paths(out: Path, suffix: str) -> dict:
    """The files predict writes into ``out`` (volumes in the input's format)."""
    suffix = suffix or ".nrrd"
    return {"label": out / f"predicted_tibia_label{suffix}", "intensity": out / f"predicted_tibia_intensity{suffix}",
            "stl_lps": out / "predicted_tibia_LPS.stl", "stl_ras": out / "predicted_tibia_RAS.stl",
            "report": out / "report.json"}


def run_predict(ct_path, tibia_path, fracture_path, out, bundle=None, device="auto", side="auto",
                overwrite=False, tibia_label=None, progress=None):
    """Read inputs, predict, write all outputs; returns (Prediction, paths). Nothing is written if any
    output exists and ``overwrite`` is false."""
    from .predict import Predictor

    out = Path(out)
    paths = output_paths(out, volume_suffix(ct_path) if not Path(ct_path).is_dir() else ".nrrd")
    clash = [str(p) for p in paths.values() if p.exists()]
    if clash and not overwrite:
        raise OutputExistsError(f"Output files already exist: {', '.join(clash)}. They were left untouched; choose "
                                "another --out folder or pass --overwrite.")
    ct = read_volume(ct_path)
    tibia = read_mask(tibia_path, ct, "tibia mask", tibia_label)
    fracture = read_mask(fracture_path, ct, "fracture mask")
    result = Predictor(bundle, device).predict(ct, tibia, fracture, side=side, progress=progress)
    write_volume(result.labelmap, paths["label"], label=True, overwrite=overwrite)
    write_volume(result.intensity, paths["intensity"], overwrite=overwrite)
    write_stl(result.surface, paths["stl_lps"], "LPS", overwrite=overwrite)
    write_stl(result.surface, paths["stl_ras"], "RAS", overwrite=overwrite)
    report = result.report()
    report["inputs"] = {"ct": str(ct_path), "tibia_mask": str(tibia_path), "fracture_mask": str(fracture_path)}
    report["outputs"] = {k: str(v) for k, v in paths.items()}
    write_json(report, paths["report"], overwrite=overwrite)
    return result, paths


def _tqdm_progress():
    from tqdm import tqdm

    bar = tqdm(total=100, desc="predict", bar_format="{l_bar}{bar}| {postfix}")

    def update(fraction, message):
        bar.n = int(round(100 * fraction))
        bar.set_postfix_str(message)
        bar.refresh()
        if fraction >= 1.0:
            bar.close()

    return update


def register_cli(sub) -> None:
    p = sub.add_parser("predict", help="predict the healthy tibia from a fractured CT",
                       description="Predict the healthy tibia in the CT's own grid. Writes the labelmap and the "
                                   "intensity volume (same format as the CT), the surface as STL in LPS (ITK, DICOM) "
                                   "and RAS (3D Slicer) coordinates, and report.json (transforms, timings, volumes).")
    p.add_argument("--ct", required=True, help="fractured CT (NRRD, NIfTI, MHA or DICOM folder)")
    p.add_argument("--tibia-mask", required=True, help="tibia mask or label map on the CT grid (all fragments)")
    p.add_argument("--tibia-label", type=int, default=None, help="label value of the tibia in a multi-label map "
                                                                 "(default: every nonzero voxel)")
    p.add_argument("--fracture-mask", required=True, help="coarse fracture-zone mask on the CT grid")
    p.add_argument("--bundle", default=None, help="model bundle folder (default: the bundled model)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--side", default="auto", choices=("auto", "left", "right"), help="which leg (default: auto)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")

    def run(a):
        result, paths = run_predict(a.ct, a.tibia_mask, a.fracture_mask, a.out, a.bundle, a.device, a.side,
                                    a.overwrite, a.tibia_label, _tqdm_progress())
        print(f"side {result.side}; predicted tibia {result.volumes_ml['predicted_tibia']:.1f} ml; "
              f"{sum(result.timings.values()):.2f} s")
        for w in result.warnings:
            print(f"warning: {w}")
        for name, path in paths.items():
            print(f"  {name}: {path}")

    p.set_defaults(func=run)
