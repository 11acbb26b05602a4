"""Python packages the prediction needs inside Slicer, checked without importing them, installed only
after the user agreed.

Slicer already ships numpy, vtk and SimpleITK; they are never installed here (a pip-installed VTK
would break Slicer). torch comes from the PyTorch extension's ``PyTorchUtils`` when it is present
(it picks the CUDA or CPU build that fits the machine), otherwise from pip. The remaining packages
are listed in ``Resources/requirements.txt`` of the module.
"""

import importlib.metadata
import os
import re

from .libpath import ensureLibraryImportable

ensureLibraryImportable()

from TibiaReconstructionLib.errors import TibiaReconError  # noqa: E402

TORCH_REQUIREMENT = "torch>=2.0"
FALLBACK_REQUIREMENTS = ["monai>=1.3", "safetensors>=0.4"]
NEVER_INSTALL = {"numpy", "vtk", "simpleitk"}  # shipped with Slicer


class MissingDependencyError(TibiaReconError, RuntimeError):
    """Required Python packages are missing and were not installed."""


def requirementsFile():
    """The module's ``Resources/requirements.txt`` (installed or source layout)."""
    moduleDir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(moduleDir, "Resources", "requirements.txt")


def readRequirements(path=None):
    """Requirement strings from a requirements file (comments, blanks and pip options skipped)."""
    path = path or requirementsFile()
    if not os.path.isfile(path):
        return list(FALLBACK_REQUIREMENTS)
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-"):
                out.append(line)
    return out


def _split(requirement):
    """('name', 'specifier') of a simple requirement string such as 'monai>=1.3'."""
    match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(\[[^\]]*\])?\s*(.*)$", requirement)
    if not match:
        raise ValueError(f"Cannot parse requirement {requirement!r}")
    return match.group(1), match.group(3).split(";", 1)[0].strip()


def isSatisfied(requirement):
    """True if the distribution is installed in a version the requirement accepts (not imported)."""
    name, spec = _split(requirement)
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    if not spec:
        return True
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
    except ImportError:  # no 'packaging': presence is the best we can check
        return True
    try:
        return Version(installed) in SpecifierSet(spec)
    except Exception:
        return True


def missingRequirements(requirements=None):
    """The requirement strings (torch first) that are not satisfied in this Python."""
    reqs = [TORCH_REQUIREMENT] + list(requirements if requirements is not None else readRequirements())
    missing = []
    for req in reqs:
        name, _ = _split(req)
        if name.lower() in NEVER_INSTALL:
            continue
        if not isSatisfied(req):
            missing.append(req)
    return missing


def _defaultInstall(requirements):
    """Install with the PyTorch extension (torch) and slicer.util.pip_install (the rest)."""
    import slicer

    rest = []
    for req in requirements:
        if _split(req)[0].lower() == "torch":
            try:
                import PyTorchUtils  # the PyTorch extension
            except ImportError:
                PyTorchUtils = None
            if PyTorchUtils is not None:
                torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=False, torchVersionRequirement=_split(req)[1] or None)
                if torch is None:
                    raise MissingDependencyError("PyTorch could not be installed by the PyTorch extension; install it "
                                                 "with the 'PyTorch Utils' module, then press Predict again.")
                continue
        rest.append(req)
    if rest:
        slicer.util.pip_install(rest)


def setupPythonRequirements(confirm=None, install=None, requirements=None):
    """Make sure every package the prediction needs is installed; ask before installing anything.

    ``confirm(message) -> bool`` is asked once with the list of packages (the GUI passes a dialog; the
    Logic itself stays Qt-free). Without ``confirm`` nothing is installed. ``install(list_of_requirements)``
    defaults to the PyTorch extension for torch and ``slicer.util.pip_install`` for the rest.
    Returns the list that was installed (empty when everything was present). Raises
    MissingDependencyError when packages are missing and installing was declined or failed.
    """
    missing = missingRequirements(requirements)
    if not missing:
        return []
    listing = ", ".join(missing)
    question = (f"Tibia Reconstruction needs these Python packages, which are not installed yet: {listing}.\n\n"
                "Download and install them now? This may take several minutes (PyTorch is large) and needs an "
                "internet connection.")
    if confirm is None or not confirm(question):
        raise MissingDependencyError(
            f"Prediction cannot run: required Python packages are missing ({listing}) and installing them was "
            "declined. Press Predict again and accept the installation, or install them yourself: torch with the "
            "'PyTorch Utils' module (PyTorch extension), the others from the Python console with "
            f"slicer.util.pip_install({[r for r in missing if _split(r)[0].lower() != 'torch']!r}).")
    try:
        (install or _defaultInstall)(missing)
    except MissingDependencyError:
        raise
    except Exception as exc:
        raise MissingDependencyError(f"Installing {listing} failed: {exc}. Check the internet connection and the "
                                     "Python console log, then try again.") from exc
    still = missingRequirements(requirements)
    if still:
        raise MissingDependencyError(f"These packages are still missing after installation: {', '.join(still)}. "
                                     "Restart Slicer and try again; see the Python console log for pip's messages.")
    return missing
