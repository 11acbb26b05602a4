"""`tibia-recon reduce`: fracture masks and predicted tibia in, fragment reduction plan and deviation map out."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import OutputExistsError
from .io import atomic_path, check_output_folder, read_mask, read_volume, staged_outputs, write_json
from .reduction import DEFAULT_MIN_FRAGMENT_ML, DEVIATION_ARRAY, ReductionPlan, plan_reduction
from .surface import point_array, polydata_points, write_stl

FRAGMENT_PATTERN = "fragment_*_*_[LR][PA]S.stl"  # the per-fragment STL files of an earlier run


def output_paths(out: Path, fragment_ids) -> dict:
    """The files reduce writes into ``out``: the report, the deviation figure and, per fragment, its surface
    before (fractured) and after (reduced) in LPS and RAS."""
    paths = {"report": out / "reduction.json", "figure": out / "deviation.png"}
    for fid in fragment_ids:
        for state in ("fractured", "reduced"):
            for frame in ("LPS", "RAS"):
                paths[f"fragment_{fid}_{state}_{frame}"] = out / f"fragment_{fid}_{state}_{frame}.stl"
    return paths


def _existing(out: Path) -> list[str]:
    fixed = [p for p in output_paths(out, ()).values() if p.exists()]
    return [str(p) for p in fixed + (sorted(out.glob(FRAGMENT_PATTERN)) if out.is_dir() else [])]


def run_reduce(ct_path, tibia_path, fracture_path, prediction_path, out, min_fragment_ml=DEFAULT_MIN_FRAGMENT_ML,
               overwrite=False, tibia_label=None, progress=None) -> tuple[ReductionPlan, dict]:
    """Read inputs, plan the reduction, write all outputs together or none. Nothing is written if outputs of
    an earlier run exist in ``out`` and ``overwrite`` is false; with ``overwrite`` they are replaced and fragment
    files of that run that this one does not write are removed."""
    out = Path(out)
    clash = _existing(out)
    if clash and not overwrite:
        raise OutputExistsError(f"Output files already exist: {', '.join(clash)}. They were left untouched; choose "
                                "another --out folder or pass --overwrite.")
    check_output_folder(out)
    ct = read_volume(ct_path)
    tibia = read_mask(tibia_path, ct, "tibia mask", tibia_label)
    fracture = read_mask(fracture_path, ct, "fracture mask")
    prediction = read_mask(prediction_path, ct, "predicted tibia")
    plan = plan_reduction(tibia, fracture, prediction, min_fragment_ml, progress=progress)
    paths = output_paths(out, [f.id for f in plan.fragments])
    report = plan.report()
    report["inputs"] = {"ct": str(ct_path), "tibia_mask": str(tibia_path), "fracture_mask": str(fracture_path),
                        "prediction": str(prediction_path)}
    report["outputs"] = {k: str(v) for k, v in paths.items()}
    stale = [p for p in out.glob(FRAGMENT_PATTERN) if p not in paths.values()] if out.is_dir() else []
    with staged_outputs(paths, overwrite) as staged:
        for f in plan.fragments:
            for state, surface in (("fractured", f.surface), ("reduced", f.reduced_surface)):
                for frame in ("LPS", "RAS"):
                    write_stl(surface, staged[f"fragment_{f.id}_{state}_{frame}"], frame)
        deviation_png(plan, staged["figure"])
        write_json(report, staged["report"])
    for path in stale:  # only reached with overwrite: fragments of the earlier run that this run does not have
        path.unlink(missing_ok=True)
    return plan, paths


def deviation_png(plan: ReductionPlan, path, overwrite: bool = False) -> Path:
    """Fragments before and after reduction, coloured by their signed deviation (mm) from the predicted surface
    (grey), in coronal (x-z) and sagittal (y-z) projections of LPS coordinates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = polydata_points(plan.prediction_surface)
    target = target[:: max(1, len(target) // 20000)]
    states = (("fractured", [f.surface for f in plan.fragments]),
              ("reduced", [f.reduced_surface for f in plan.fragments]))
    values = np.concatenate([point_array(s, DEVIATION_ARRAY)
                             for _, surfaces in states for s in surfaces])
    limit = max(2.0, float(np.percentile(np.abs(values), 98)))
    fig, axes = plt.subplots(1, 4, figsize=(12, 7), sharey=True, layout="constrained")
    for column, (ax, (state, surfaces), (axis, name)) in enumerate(zip(
            axes, [states[0], states[0], states[1], states[1]], [(0, "x (L)"), (1, "y (P)")] * 2)):
        ax.scatter(target[:, axis], target[:, 2], s=0.3, c="0.8", linewidths=0, rasterized=True)
        for surface in surfaces:
            pts = polydata_points(surface)
            dev = point_array(surface, DEVIATION_ARRAY)
            order = np.argsort(np.abs(dev))  # largest deviations drawn on top
            sc = ax.scatter(pts[order, axis], pts[order, 2], s=0.6, c=dev[order], cmap="coolwarm", vmin=-limit,
                            vmax=limit, linewidths=0, rasterized=True)
        ax.set_aspect("equal")
        ax.set_xlabel(f"{name}, LPS mm")
        ax.set_title(f"{state}, {'coronal' if axis == 0 else 'sagittal'}")
    axes[0].set_ylabel("z (S), LPS mm")
    fig.colorbar(sc, ax=axes, shrink=0.7, label="deviation from the predicted surface (mm, + outside)")
    fig.suptitle(f"{len(plan.fragments)} fragment(s); grey: predicted healthy tibia")
    with atomic_path(path, overwrite) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)


def register_cli(sub) -> None:
    from .cli import add_case_arguments

    p = sub.add_parser("reduce", help="fragment reduction plan onto the predicted healthy tibia",
                       description="Split the fractured tibia outside the fracture mask into fragments (connected "
                                   "pieces, faces touching), register each rigidly onto the predicted healthy tibia "
                                   "and write reduction.json (per fragment: volume, 4x4 LPS matrix fractured -> "
                                   "reduced, rotation, centroid translation, residuals, deviation), each fragment's "
                                   "surface before and after reduction as STL in LPS and RAS, and deviation.png "
                                   "(fragments coloured by signed distance to the prediction).")
    add_case_arguments(p, "fractured CT (NRRD, NIfTI, MHA or DICOM folder): the reference grid",
                       "tibia mask or label map on the CT grid, all fragments")
    p.add_argument("--prediction", required=True,
                   help="predicted healthy tibia labelmap on the CT grid (predicted_tibia_label of `predict`)")
    p.add_argument("--min-fragment-ml", type=float, default=DEFAULT_MIN_FRAGMENT_ML,
                   help=f"smallest piece reduced as a fragment, ml (default {DEFAULT_MIN_FRAGMENT_ML})")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier reduce in --out")

    def run(a):
        from .cli import print_outputs, tqdm_progress

        progress = tqdm_progress("reduce")
        try:
            plan, paths = run_reduce(a.ct, a.tibia_mask, a.fracture_mask, a.prediction, a.out, a.min_fragment_ml,
                                     a.overwrite, a.tibia_label, progress)
        except BaseException:
            progress.bar.leave = False
            progress.bar.close()
            raise
        for f in plan.fragments:
            print(f"fragment {f.id}: {f.volume_ml:.1f} ml, rotate {f.rotation_deg:.1f} deg, move "
                  f"{np.linalg.norm(f.translation_mm):.1f} mm, residual RMS {f.rms_residual_mm:.2f} mm")
        print_outputs(paths, plan.warnings)

    p.set_defaults(func=run)
