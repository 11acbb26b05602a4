"""Run the TibiaReconstruction module's self-test inside 3D Slicer, from a source checkout.

    Slicer --python-script Testing/run_in_slicer.py                 # with the main window
    Slicer --no-main-window --python-script Testing/run_in_slicer.py

Loads the module from this repository (no installation needed), runs TibiaReconstructionTest on the
bundled sample case (Resources/SampleCase), prints one line per test and exits with status 0 when all
passed, 1 otherwise. Missing Python packages (torch, monai, safetensors) are offered for installation
first; in Slicer's testing mode (--testing) they are installed without asking.
"""

import os
import sys
import time
import traceback
import unittest

import qt

import slicer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_DIR = os.path.join(REPO, "TibiaReconstruction")
MODULE_NAME = "TibiaReconstruction"


def loadModuleFromSource():
    """Register and load the scripted module from MODULE_DIR unless Slicer already has it."""
    if MODULE_DIR not in sys.path:
        sys.path.insert(0, MODULE_DIR)
    if hasattr(slicer.modules, MODULE_NAME.lower()):
        print(f"{MODULE_NAME} is already loaded from {os.path.dirname(slicer.modules.tibiareconstruction.path)}")
        return
    factoryManager = slicer.app.moduleManager().factoryManager()
    factoryManager.registerModule(qt.QFileInfo(os.path.join(MODULE_DIR, MODULE_NAME + ".py")))
    factoryManager.loadModules([MODULE_NAME])
    if not hasattr(slicer.modules, MODULE_NAME.lower()):
        raise RuntimeError(f"Slicer could not load {MODULE_NAME} from {MODULE_DIR}; see the Python console log.")
    print(f"Loaded {MODULE_NAME} from {MODULE_DIR}")


def ensurePythonPackages():
    import TibiaReconstruction

    logic = TibiaReconstruction.TibiaReconstructionLogic()
    missing = logic.missingPythonRequirements()
    if missing:
        print("Missing Python packages: " + ", ".join(missing))
        logic.setupPythonRequirements(confirm=lambda message: slicer.util.confirmOkCancelDisplay(message))


def main():
    started = time.time()
    try:
        loadModuleFromSource()
        ensurePythonPackages()
        import TibiaReconstruction

        suite = unittest.TestLoader().loadTestsFromTestCase(TibiaReconstruction.TibiaReconstructionTest)
        result = unittest.TextTestRunner(stream=sys.stdout, verbosity=2).run(suite)
        ok = result.wasSuccessful() and result.testsRun > 0
        print(f"TibiaReconstruction self-test: {result.testsRun} run, {len(result.failures)} failed, "
              f"{len(result.errors)} errors, {len(result.skipped)} skipped in {time.time() - started:.0f} s: "
              f"{'PASSED' if ok else 'FAILED'}")
    except Exception:
        traceback.print_exc()
        ok = False
    sys.stdout.flush()
    slicer.util.exit(0 if ok else 1)


main()
