"""Make the headless library ``TibiaReconstructionLib`` importable inside 3D Slicer.

Three ways the library reaches Slicer, tried in this order:

1. It is already importable (pip-installed into Slicer's Python, or on ``sys.path``).
2. Installed extension: CMake copies ``TibiaReconstructionLib/`` next to the module file, into
   ``lib/Slicer-X.Y/qt-scripted-modules/``, a folder Slicer puts on ``sys.path`` itself.
3. Running from a source checkout (Application Settings > Modules > Additional module paths points at
   ``<repo>/TibiaReconstruction``): the library sits one level up, at ``<repo>/TibiaReconstructionLib``,
   so ``<repo>`` is appended to ``sys.path``.
"""

import os
import sys

LIBRARY_NAME = "TibiaReconstructionLib"


def candidateLibraryRoots():
    """Folders that may hold ``TibiaReconstructionLib/`` (installed layout first, then the source tree)."""
    logicDir = os.path.dirname(os.path.abspath(__file__))  # .../TibiaReconstructionLogic
    moduleDir = os.path.dirname(logicDir)  # qt-scripted-modules (installed) or <repo>/TibiaReconstruction
    return [moduleDir, os.path.dirname(moduleDir)]


def libraryRoot():
    """The folder that holds the importable ``TibiaReconstructionLib`` package (imports it if needed)."""
    module = ensureLibraryImportable()
    return os.path.dirname(os.path.dirname(os.path.abspath(module.__file__)))


def ensureLibraryImportable():
    """Import and return ``TibiaReconstructionLib``, extending ``sys.path`` if necessary.

    Only a missing library is handled here; a library that is present but fails to import (for example
    because one of its own dependencies is missing) raises that error unchanged.
    """
    try:
        import TibiaReconstructionLib
        return TibiaReconstructionLib
    except ModuleNotFoundError as exc:
        if exc.name != LIBRARY_NAME:
            raise
    for root in candidateLibraryRoots():
        if os.path.isfile(os.path.join(root, LIBRARY_NAME, "__init__.py")):
            if root not in sys.path:
                sys.path.append(root)
            import TibiaReconstructionLib
            return TibiaReconstructionLib
    raise ModuleNotFoundError(
        "The TibiaReconstruction module cannot find its library 'TibiaReconstructionLib'. Looked in: "
        + ", ".join(candidateLibraryRoots())
        + ". Install the TibiaReconstruction extension from a build (it installs the library next to the "
        "module), or add the 'TibiaReconstruction' folder of a complete source checkout to "
        "Application Settings > Modules > Additional module paths.",
        name=LIBRARY_NAME,
    )
