"""`tibia-recon predict`: files in, predicted healthy tibia (labelmap, intensity, STL, report) out."""

from __future__ import annotations

import importlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .errors import InputError, OutputExistsError
from .geometry import Volume, check_same_grid
from .head_start import head_start
from .io import check_output_folder, read_mask, read_volume, staged_outputs, volume_suffix, write_json, write_volume
from .surface import write_stl, write_vtp

UNCERTAINTY_GRID = ("the posterior standard deviation of the predicted occupancy (0-1) as float32 in the CT's format, "
                    "on a grid along the CT's axes through CT voxel centres, every n-th CT voxel (n the most that "
                    "keeps the spacing at or below half the model's, 1 mm for the default bundle; 1 for coarser CTs), "
                    "over the region the prediction reaches; interpolated linearly it gives the values on the CT's "
                    "voxels (the model resolves nothing finer).")


def output_paths(out: Path, suffix: str, auto_tibia: bool = False) -> dict:
    """The files predict writes into ``out`` (volumes in the input's format): labelmap, intensity, the occupancy's
    posterior standard deviation (on the coarser work grid, see :data:`UNCERTAINTY_GRID`), STL in LPS and RAS, the
    LPS surface as VTK XML with its per-vertex uncertainty (mm), the report; with ``auto_tibia`` also the
    automatically segmented tibia mask it used."""
    suffix = suffix or ".nrrd"
    paths = {"label": out / f"predicted_tibia_label{suffix}", "intensity": out / f"predicted_tibia_intensity{suffix}",
             "uncertainty": out / f"predicted_tibia_uncertainty{suffix}",
             "stl_lps": out / "predicted_tibia_LPS.stl", "stl_ras": out / "predicted_tibia_RAS.stl",
             "vtp_lps": out / "predicted_tibia_LPS.vtp", "report": out / "report.json"}
    if auto_tibia:
        paths["tibia_mask"] = out / f"tibia_mask_auto{suffix}"
    return paths


def run_predict(ct_path, tibia_path, fracture_path, out, bundle=None, device="auto", side="auto",
                overwrite=False, tibia_label=None, progress=None, reduce_fragments=True, keep_visible_bone=True,
                reassemble_fragments=True, other_tibia_path="auto"):
    """Read inputs, predict, write all outputs; returns (Prediction, paths). Without ``tibia_path`` the tibia is
    segmented automatically first and the mask used is saved beside the outputs. ``reduce_fragments``,
    ``keep_visible_bone``, ``reassemble_fragments``: see :class:`~TibiaReconstructionLib.predict.Predictor`;
    ``other_tibia_path``: the healthy other leg's tibia mask, 'auto' to look for it in the CT (the tibia found by
    the automatic segmentation when that ran), or 'none' (or None) not to use it (the ``other_tibia`` of
    :meth:`~TibiaReconstructionLib.predict.Predictor.predict`). All or nothing: nothing is
    written if any output exists and ``overwrite`` is false, if an input is bad, or if writing fails (the
    outputs are written into a hidden staging folder inside ``out`` and renamed into place once complete)."""
    import_in_background(f"{__package__}.predict")  # torch loads while the CT is read (reading releases the GIL)
    out = Path(out)
    paths = output_paths(out, volume_suffix(ct_path) if not Path(ct_path).is_dir() else ".nrrd", tibia_path is None)
    clash = [str(p) for p in paths.values() if p.exists()]
    if clash and not overwrite:
        raise OutputExistsError(f"Output files already exist: {', '.join(clash)}. They were left untouched; choose "
                                "another --out folder or pass --overwrite.")
    if side not in ("auto", "left", "right"):
        raise InputError(f"Unknown side {side!r}; use 'left', 'right' or 'auto'.")
    check_output_folder(out)
    ct, fracture, tibia = read_inputs(ct_path, fracture_path, tibia_path, tibia_label)
    segmentation = None
    if tibia is None:
        from .segment import segment_tibia

        segmentation = segment_tibia(ct, side, fracture)
        tibia = segmentation.tibia
        if side == "auto" and not segmentation.warnings:
            side = segmentation.side  # found from the fibula's position, more reliable than the model's fit
    other = None if other_tibia_path is None or str(other_tibia_path) == "none" else \
        "auto" if str(other_tibia_path) == "auto" else read_mask(other_tibia_path, ct, "other tibia mask")
    if other == "auto" and segmentation is not None:  # it has looked for the other leg's tibia already
        other = segmentation.other_tibia
    # while torch is still loading
    ahead = head_start(ct, tibia, fracture, bundle, other if reduce_fragments and keep_visible_bone else None, side)
    from .predict import Predictor  # waits for the background import if it is still running

    predictor = Predictor(bundle, device, reduce_fragments, keep_visible_bone, reassemble_fragments)
    # the volumes are compressed and written (into the staging folder) while the Predictor finishes the surface
    with staged_outputs(paths, overwrite) as staged, ThreadPoolExecutor(max_workers=2) as pool:
        pending = [] if segmentation is None else write_volumes(pool, staged, tibia_mask=tibia)

        def volumes_ready(labelmap, intensity, occupancy_std):
            pending.extend(write_volumes(pool, staged, labelmap, intensity, occupancy_std))

        result = predictor.predict(ct, tibia, fracture, side=side, progress=progress, ahead=ahead, other_tibia=other,
                                   volumes_ready=volumes_ready)
        for key in paths.keys() - written_paths(result, paths).keys():
            del paths[key]  # not written, so not renamed into place (see io.staged_outputs)
        report = result.report()
        report["inputs"] = {"ct": str(ct_path), "tibia_mask": str(tibia_path or "automatic segmentation"),
                            "fracture_mask": str(fracture_path),
                            "other_tibia_mask": str(other_tibia_path)}
        if segmentation is not None:
            report["segmentation"] = segmentation.report()
            result.warnings.extend(segmentation.warnings)
        report["outputs"] = {k: str(v) for k, v in paths.items()}
        write_surfaces_and_report(result, report, staged, pending)
    return result, paths


def read_inputs(ct_path, fracture_path, tibia_path=None, tibia_label=None) -> tuple[Volume, Volume, Volume | None]:
    """The CT, the fracture mask and the tibia mask (None without ``tibia_path``), the masks read in threads while the
    CT is read (reading and decompressing release the GIL) and then checked against the CT's grid."""
    with ThreadPoolExecutor(2) as pool:
        fracture = pool.submit(read_mask, fracture_path, None, "fracture mask")
        tibia = None if tibia_path is None else pool.submit(read_mask, tibia_path, None, "tibia mask", tibia_label)
        ct = read_volume(ct_path)
        masks = [(fracture.result(), "fracture mask", fracture_path)]
        if tibia is not None:
            masks.append((tibia.result(), "tibia mask", tibia_path))
    for mask, name, path in masks:
        check_same_grid(ct, mask, "CT", f"{name} ({path})")
    return ct, masks[0][0], masks[1][0] if tibia is not None else None


def import_in_background(module: str) -> None:
    """Start importing ``module`` in a daemon thread; a later import of it waits for that one to finish (and
    raises, in the caller's thread, whatever the import raises)."""
    def load():
        try:
            importlib.import_module(module)
        except BaseException:  # noqa: B036 - reported by the caller's own import
            pass

    threading.Thread(target=load, name=f"import {module}", daemon=True).start()


def written_paths(result, paths: dict) -> dict:
    """The output paths a prediction fills: no uncertainty volume without the model's posterior (a bundle without
    one, or the other leg as the template)."""
    return {k: v for k, v in paths.items() if k != "uncertainty" or result.occupancy_std is not None}


def write_volumes(pool: ThreadPoolExecutor, staged: dict, labelmap=None, intensity=None, occupancy_std=None,
                  tibia_mask=None) -> list:
    """Write the given volumes to their ``staged`` paths in ``pool``'s threads (compression releases the GIL); the
    writes' futures."""
    volumes = [(labelmap, "label", True), (intensity, "intensity", False), (occupancy_std, "uncertainty", False),
               (tibia_mask, "tibia_mask", True)]
    return [pool.submit(write_volume, volume, staged[key], label=label) for volume, key, label in volumes
            if volume is not None]


def write_surfaces_and_report(result, report: dict, staged: dict, pending: list) -> None:
    """Write the surfaces and the report to their ``staged`` paths, then wait for the ``pending`` volume writes
    (raising the first error among them)."""
    write_stl(result.surface, staged["stl_lps"], "LPS")
    write_vtp(result.surface, staged["vtp_lps"])
    write_stl(result.surface, staged["stl_ras"], "RAS")
    write_json(report, staged["report"])
    for job in pending:
        job.result()


def _write_outputs(result, report: dict, paths: dict, overwrite: bool) -> None:
    """Write every output of a finished prediction (``paths``: as :func:`written_paths` gives them) all together or
    not at all (the volumes in two more threads while the surfaces are written)."""
    with staged_outputs(paths, overwrite) as staged, ThreadPoolExecutor(max_workers=2) as pool:
        write_surfaces_and_report(result, report, staged, write_volumes(pool, staged, result.labelmap, result.intensity,
                                                                        result.occupancy_std))


def register_cli(sub) -> None:
    from .cli import add_case_arguments

    p = sub.add_parser("predict", help="predict the healthy tibia from a fractured CT",
                       description="Predict the healthy tibia in the CT's own grid. Writes the labelmap and the "
                                   "intensity volume (same format and grid as the CT), the surface as STL in LPS (ITK, "
                                   "DICOM) and RAS (3D Slicer) coordinates and as VTK XML (LPS) with its per-point "
                                   "uncertainty (mm), report.json (transforms, timings, volumes) and, for a PCA "
                                   f"bundle, the uncertainty volume: {UNCERTAINTY_GRID}")
    add_case_arguments(p, "fractured CT (NRRD, NIfTI, MHA or DICOM folder)",
                       "tibia mask or label map on the CT grid, all fragments (default: segment the tibia "
                       "automatically and save the mask)", tibia_required=False)
    p.add_argument("--bundle", default=None, help="model bundle folder (default: the bundled model)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--side", default="auto", choices=("auto", "left", "right"), help="which leg (default: auto)")
    p.add_argument("--single-pass", action="store_true",
                   help="one pass of the model, as in the paper: no reduction of displaced fragments onto the "
                        "proximal main fragment before the final reconstruction (and so no visible bone kept)")
    p.add_argument("--model-only", action="store_true",
                   help="the model's reconstruction everywhere: do not keep the patient's visible bone outside the "
                        "fracture mask in the prediction")
    p.add_argument("--no-reassembly", action="store_true",
                   help="keep the moved fragment where the reduction put it: do not refit it to where its broken "
                        "face meets the proximal main fragment's")
    p.add_argument("--other-tibia-mask", default="auto", metavar="MASK|auto|none",
                   help="the healthy other leg's tibia mask on the CT grid; 'auto' (default): look for the other leg "
                        "in the CT and segment it; 'none': do not use it. Mirrored and fitted to the proximal main "
                        "fragment, it becomes the template that fills the prediction and that the moved fragments "
                        "are registered onto; when it does not fit this patient's tibia, a warning says why and the "
                        "model's prediction is written")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")

    def run(a):
        from .cli import print_outputs, tqdm_progress

        progress = tqdm_progress("predict")
        try:
            result, paths = run_predict(a.ct, a.tibia_mask, a.fracture_mask, a.out, a.bundle, a.device, a.side,
                                        a.overwrite, a.tibia_label, progress, not a.single_pass, not a.model_only,
                                        not a.no_reassembly, a.other_tibia_mask)
        except BaseException:
            progress.bar.leave = False
            progress.bar.close()
            raise
        print(f"side {result.side}; predicted tibia {result.volumes_ml['predicted_tibia']:.1f} ml; "
              f"{sum(result.timings.values()):.2f} s")
        print_outputs(paths, result.warnings)

    p.set_defaults(func=run)
