"""Runs one prediction in a separate Python process (started by job.PredictionJob).

Usage: ``python worker.py WORK_DIR``. WORK_DIR holds ``inputs.json`` (grid, bundle, device, side, reduce_fragments,
keep_visible_bone, reassemble_fragments, other_tibia: 'auto' or null) and ``ct.npy``, ``tibia.npy``, ``fracture.npy`` (arrays [k, j, i] on that
grid, LPS). The worker writes ``labelmap.npy``, ``intensity.npy``, ``surface.vtp`` (points in LPS mm) and
``outputs.json`` (grids and the Predictor's report) and prints one JSON object per line on stdout: ``{"progress": f,
"message": m}``, then ``{"done": true}`` or ``{"error": type, "message": text}``.

Geometry goes through JSON (exact decimal round trip of every float) and voxels through .npy, so the
result is bit-identical to calling the Predictor in the Slicer process. Imports only the library,
numpy and vtk; never slicer or Qt.
"""

import json
import os
import sys
import traceback


def emit(**message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def run(workDir):
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import vtk

    from TibiaReconstructionLib import PROCESS_SWITCH_INTERVAL_S
    from TibiaReconstructionLib.geometry import Grid, Volume
    from TibiaReconstructionLib.io import json_default
    from TibiaReconstructionLib.head_start import head_start
    from TibiaReconstructionLib.predict_cli import import_in_background

    sys.setswitchinterval(PROCESS_SWITCH_INTERVAL_S)  # this process's threads wait less for each other
    import_in_background("TibiaReconstructionLib.predict")  # torch loads while the inputs are read and cropped
    with open(os.path.join(workDir, "inputs.json"), encoding="utf-8") as f:
        config = json.load(f)
    grid = Grid.from_dict(config["grid"])
    ct = Volume.on_grid(np.load(os.path.join(workDir, "ct.npy")), grid)
    tibia = Volume.on_grid(np.load(os.path.join(workDir, "tibia.npy")), grid)
    fracture = Volume.on_grid(np.load(os.path.join(workDir, "fracture.npy")), grid)
    emit(progress=0.0, message="Preparing the inputs")
    other = config.get("other_tibia")
    wants_other = config.get("reduce_fragments", True) and config.get("keep_visible_bone", True)
    ahead = head_start(ct, tibia, fracture, config.get("bundle") or None, other if wants_other else None,
                       config.get("side", "auto"))

    emit(progress=0.0, message="Loading the model")
    from TibiaReconstructionLib.predict import Predictor

    predictor = Predictor(config.get("bundle") or None, device=config.get("device", "auto"),
                          reduce_fragments=config.get("reduce_fragments", True),
                          keep_visible_bone=config.get("keep_visible_bone", True),
                          reassemble_fragments=config.get("reassemble_fragments", True))
    with ThreadPoolExecutor(2) as pool:  # the volumes are saved while the Predictor finishes the surface
        saving = []

        def volumes_ready(labelmap, intensity, occupancy_std):
            saving.extend(pool.submit(np.save, os.path.join(workDir, name), np.ascontiguousarray(volume.array))
                          for name, volume in (("labelmap.npy", labelmap), ("intensity.npy", intensity)))

        result = predictor.predict(ct, tibia, fracture, side=config.get("side", "auto"), ahead=ahead,
                                   other_tibia=other, volumes_ready=volumes_ready,
                                   progress=lambda fraction, message: emit(progress=float(fraction),
                                                                           message=str(message)))
        for job in saving:
            job.result()
    writer = vtk.vtkXMLPolyDataWriter()
    writer.SetFileName(os.path.join(workDir, "surface.vtp"))
    writer.SetInputData(result.surface)
    writer.SetDataModeToBinary()
    if not writer.Write():
        raise RuntimeError("Could not write the predicted surface to " + workDir)
    outputs = {"labelmap_grid": result.labelmap.grid.to_dict(), "intensity_grid": result.intensity.grid.to_dict(),
               "report": result.report()}
    tmp = os.path.join(workDir, "outputs.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(outputs, f, default=json_default)
    os.replace(tmp, os.path.join(workDir, "outputs.json"))


def main(argv):
    if len(argv) != 2:
        sys.stderr.write(__doc__)
        return 64
    try:
        run(argv[1])
    except Exception as exc:  # reported to the parent, which raises it in Slicer
        from TibiaReconstructionLib.errors import TibiaReconError

        traceback.print_exc(file=sys.stderr)
        kind = type(exc).__name__ if isinstance(exc, TibiaReconError) else "RuntimeError"
        emit(error=kind, message=str(exc) if isinstance(exc, TibiaReconError) else f"{type(exc).__name__}: {exc}")
        return 2
    emit(done=True)
    return 0


if __name__ == "__main__":
    code = main(sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # every result file is written and closed: skip unloading torch and VTK (about 0.6 s)
