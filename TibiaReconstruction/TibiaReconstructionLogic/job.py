"""A prediction running in the background, in a separate Python process (as SlicerMONAIAuto3DSeg does).

Why a process and not a thread: the user interface never waits for PyTorch (no shared interpreter
lock), Cancel stops the computation at once (the process is killed), and a crash or an out-of-memory
error in the model cannot take Slicer down.

Qt-free: the GUI calls ``poll()`` from a QTimer; scripts call ``wait()``.
"""

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import vtk

from .libpath import ensureLibraryImportable, libraryRoot

ensureLibraryImportable()

from TibiaReconstructionLib import PROCESS_ENVIRONMENT  # noqa: E402
from TibiaReconstructionLib import errors as libErrors  # noqa: E402
from TibiaReconstructionLib.geometry import Grid, Volume  # noqa: E402

WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")


class PredictionCancelled(libErrors.TibiaReconError):
    """The user cancelled the prediction."""


class PredictionResult:
    """What the worker returned: same attributes as the library's Prediction (labelmap, intensity, surface)."""

    def __init__(self, labelmap, intensity, surface, report):
        self.labelmap = labelmap
        self.intensity = intensity
        self.surface = surface
        self._report = report

    def report(self):
        return self._report


def pythonExecutable():
    """The Python to run the worker: PythonSlicer inside Slicer, this interpreter elsewhere."""
    import slicer

    app = getattr(slicer, "app", None)
    if app is None:
        return sys.executable
    exe = shutil.which("PythonSlicer")
    if exe is None:
        folder = os.path.dirname(sys.executable)
        for name in ("PythonSlicer.exe", "PythonSlicer"):
            candidate = os.path.join(folder, name)
            if os.path.isfile(candidate):
                return candidate
        raise RuntimeError("Cannot find the PythonSlicer executable to run the prediction in the background. Use "
                           "TibiaReconstructionLogic().predict(...) from the Python console instead.")
    return exe


class PredictionJob:
    """One background prediction. States: 'created', 'running', 'succeeded', 'failed', 'cancelled'."""

    def __init__(self, inputs, bundlePath=None, device="auto", side="auto", python=None, workDir=None,
                 reduceFragments=True, keepVisibleBone=True, reassembleFragments=True, useOtherLeg=True):
        self.inputs = inputs
        self.reduceFragments = bool(reduceFragments)
        self.keepVisibleBone = bool(keepVisibleBone)
        self.reassembleFragments = bool(reassembleFragments)
        self.useOtherLeg = bool(useOtherLeg)
        self.bundlePath = str(bundlePath) if bundlePath else None
        self.device = device
        self.side = side
        self.python = python
        self.workDir = workDir
        self._ownsWorkDir = workDir is None
        self.state = "created"
        self.fraction = 0.0
        self.message = ""
        self.error = None
        self.startTime = None
        self.endTime = None
        self._process = None
        self._lines = queue.Queue()
        self._reader = None
        self._result = None
        self._finalMessage = None

    # -- life cycle -------------------------------------------------------------------------

    def start(self):
        if self.state != "created":
            raise RuntimeError("A prediction job can be started only once.")
        if self.workDir is None:
            self.workDir = tempfile.mkdtemp(prefix="TibiaReconstruction-")
        os.makedirs(self.workDir, exist_ok=True)
        try:
            self._launch()
        except Exception:
            self.cleanup()  # no half-written temporary folder is left behind
            raise
        self.state = "running"
        self.message = "Starting"
        self._reader = threading.Thread(target=self._readOutput, name="TibiaReconstructionJobReader", daemon=True)
        self._reader.start()
        return self

    def _launch(self):
        np.save(os.path.join(self.workDir, "ct.npy"), np.ascontiguousarray(self.inputs.ct.array))
        np.save(os.path.join(self.workDir, "tibia.npy"), np.ascontiguousarray(self.inputs.tibia.array))
        np.save(os.path.join(self.workDir, "fracture.npy"), np.ascontiguousarray(self.inputs.fracture.array))
        with open(os.path.join(self.workDir, "inputs.json"), "w", encoding="utf-8") as f:
            json.dump({"grid": self.inputs.ct.grid.to_dict(), "bundle": self.bundlePath, "device": self.device,
                       "side": self.side, "reduce_fragments": self.reduceFragments,
                       "keep_visible_bone": self.keepVisibleBone,
                       "reassemble_fragments": self.reassembleFragments,
                       "other_tibia": "auto" if self.useOtherLeg else None}, f)
        env = {**PROCESS_ENVIRONMENT, **os.environ}  # the worker's torch and numpy settings; the user's own win
        env["PYTHONPATH"] = os.pathsep.join([libraryRoot()] + [p for p in [env.get("PYTHONPATH")] if p])
        env["PYTHONUNBUFFERED"] = "1"
        kwargs = {}
        if os.name == "posix":
            kwargs["start_new_session"] = True  # its own process group: cancel kills everything it started
        elif hasattr(subprocess, "CREATE_NO_WINDOW"):
            kwargs["creationflags"] = subprocess.CREATE_NO_WINDOW
        command = [self.python or pythonExecutable(), "-u", WORKER_SCRIPT, self.workDir]
        self._stderr = open(os.path.join(self.workDir, "stderr.txt"), "wb")
        self.startTime = time.time()
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._stderr,
                                         stdin=subprocess.DEVNULL, env=env, **kwargs)

    def _readOutput(self):
        for raw in iter(self._process.stdout.readline, b""):
            self._lines.put(raw.decode("utf-8", errors="replace").strip())
        self._process.stdout.close()
        self._lines.put(None)  # end of output

    def isProcessRunning(self):
        """True while the worker process exists and has not exited."""
        return self._process is not None and self._process.poll() is None

    @property
    def finished(self):
        return self.state in ("succeeded", "failed", "cancelled")

    @property
    def elapsed(self):
        if self.startTime is None:
            return 0.0
        return (self.endTime or time.time()) - self.startTime

    def poll(self):
        """Drain the worker's messages; returns [(fraction, message), ...] received since the last call and
        updates ``state`` when the process has ended. Never blocks."""
        updates = []
        if self.state != "running":
            return updates
        ended = False
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                ended = True
                break
            self._handleLine(line, updates)
        if ended:
            self._process.wait()
            self._finish()
        return updates

    def _handleLine(self, line, updates):
        try:
            message = json.loads(line)
        except ValueError:
            return  # stray output from a library; ignore
        if not isinstance(message, dict):
            return
        if "progress" in message:
            self.fraction = float(message["progress"])
            self.message = str(message.get("message", ""))
            updates.append((self.fraction, self.message))
        elif "error" in message or "done" in message:
            self._finalMessage = message

    def _finish(self):
        self.endTime = time.time()
        self._closeStderr()
        code = self._process.returncode
        final = self._finalMessage or {}
        if self.state == "cancelled":
            return
        if code == 0 and final.get("done"):
            try:
                self._result = self._loadResult()
                self.state = "succeeded"
                self.fraction, self.message = 1.0, "Done"
            except Exception as exc:
                self.state, self.error = "failed", RuntimeError(f"Could not read the prediction result: {exc}")
            return
        self.state = "failed"
        if "error" in final:
            errorClass = getattr(libErrors, final["error"], None)
            if not (isinstance(errorClass, type) and issubclass(errorClass, Exception)):
                errorClass = RuntimeError
            self.error = errorClass(final.get("message", "The prediction failed."))
        else:
            self.error = RuntimeError(f"The prediction process stopped unexpectedly (exit code {code}). Last lines of "
                                      f"its log:\n{self.log(20)}")

    def _closeStderr(self):
        stream = getattr(self, "_stderr", None)
        if stream is not None and not stream.closed:
            stream.close()

    def log(self, lines=50):
        """The last lines the worker wrote to stderr (tracebacks, warnings)."""
        path = os.path.join(self.workDir or "", "stderr.txt")
        if not os.path.isfile(path):
            return ""
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def cancel(self):
        """Stop the worker now. The job ends in state 'cancelled'; no result is produced."""
        if self.state != "running":
            return
        self.state = "cancelled"
        self.message = "Cancelled"
        self.endTime = time.time()
        try:
            if os.name == "posix":
                os.killpg(self._process.pid, signal.SIGKILL)
            else:
                self._process.kill()
        except (ProcessLookupError, PermissionError, OSError):
            pass
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._closeStderr()

    def wait(self, timeout=None, progress=None, interval=0.05):
        """Block until the job ends (scripts and tests; the GUI polls instead). Returns the state."""
        deadline = None if timeout is None else time.time() + timeout
        while self.state == "running":
            for fraction, message in self.poll():
                if progress is not None:
                    progress(fraction, message)
            if self.state != "running":
                break
            if deadline is not None and time.time() > deadline:
                raise TimeoutError(f"The prediction did not finish within {timeout} s.")
            time.sleep(interval)
        return self.state

    def result(self):
        """The PredictionResult of a succeeded job; raises the job's error otherwise."""
        if self.state == "succeeded":
            return self._result
        if self.state == "failed":
            raise self.error
        if self.state == "cancelled":
            raise PredictionCancelled("The prediction was cancelled.")
        raise RuntimeError(f"The prediction is not finished (state '{self.state}').")

    def _loadResult(self):
        with open(os.path.join(self.workDir, "outputs.json"), encoding="utf-8") as f:
            outputs = json.load(f)
        labelmap = Volume.on_grid(np.load(os.path.join(self.workDir, "labelmap.npy")),
                                  Grid.from_dict(outputs["labelmap_grid"]))
        intensity = Volume.on_grid(np.load(os.path.join(self.workDir, "intensity.npy")),
                                   Grid.from_dict(outputs["intensity_grid"]))
        reader = vtk.vtkXMLPolyDataReader()
        reader.SetFileName(os.path.join(self.workDir, "surface.vtp"))
        reader.Update()
        surface = vtk.vtkPolyData()
        surface.DeepCopy(reader.GetOutput())
        return PredictionResult(labelmap, intensity, surface, outputs["report"])

    def cleanup(self):
        """Delete the temporary folder (inputs and outputs of the worker). Cancels a running job first."""
        if self.state == "running":
            self.cancel()
        self._closeStderr()
        if self._ownsWorkDir and self.workDir and os.path.isdir(self.workDir):
            shutil.rmtree(self.workDir, ignore_errors=True)

    def __del__(self):
        try:
            if self.state == "running":
                self.cancel()
        except Exception:
            pass
