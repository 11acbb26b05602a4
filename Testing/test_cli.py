import os
import subprocess
import sys

from TibiaReconstructionLib import __version__
from TibiaReconstructionLib.cli import _COMMANDS, build_parser, main
from TibiaReconstructionLib.io import write_volume


def test_version():
    out = subprocess.run([sys.executable, "-m", "TibiaReconstructionLib.cli", "--version"], capture_output=True,
                         text=True, check=True)
    assert __version__ in out.stdout


def test_help_lists_every_command(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for command in ("info", "phantoms", "montage", "prepare", "train", "export-bundle", "evaluate", "predict",
                    "reduce", "segment", "contralateral", "demo", "bench"):
        assert f"    {command} " in out or f"    {command}\n" in out, command


def test_a_command_line_imports_only_its_command():
    for command in _COMMANDS:  # the map names the module that registers each command
        assert command in build_parser(command)._subparsers._group_actions[0].choices
    code = "import sys; from TibiaReconstructionLib.cli import build_parser; build_parser('predict'); print(*sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "TibiaReconstructionLib.predict_cli" in loaded
    assert not {"TibiaReconstructionLib.evaluate", "TibiaReconstructionLib.phantoms", "TibiaReconstructionLib.bench",
                "TibiaReconstructionLib.metrics", "TibiaReconstructionLib.contralateral"} & set(loaded)


def test_the_predictor_loads_without_all_of_vtk_or_the_other_leg_s_fit():
    """Importing all of VTK takes about a second, a fifth of the time a prediction may take: the Predictor imports
    only the VTK modules it uses, and the contralateral fit only when the other leg is asked for."""
    code = "import sys, TibiaReconstructionLib.predict; print(*sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(run.stdout.split())
    assert "TibiaReconstructionLib.template" in loaded
    assert not {"vtk", "vtkmodules.all", "TibiaReconstructionLib.contralateral", "TibiaReconstructionLib.segment"} \
        & loaded


def test_the_command_turns_numpy_s_huge_pages_off_before_numpy_loads():
    """Set by the command's module, numpy's huge pages must be off before anything imports numpy (it reads the
    setting once); a user's own setting wins."""
    code = "import TibiaReconstructionLib.cli, numpy; print(numpy._core.multiarray._get_madvise_hugepage())"
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert run.stdout.split() == ["False"]
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, "NUMPY_MADVISE_HUGEPAGE": "1"})
    assert run.stdout.split() == ["True"]


def test_info_prints_geometry_and_errors_cleanly(tmp_path, oblique_volume, capsys):
    path = write_volume(oblique_volume, tmp_path / "v.nrrd")
    assert main(["info", str(path)]) == 0
    assert "size 12x10x8" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "missing.nrrd")]) == 1
    assert "File not found" in capsys.readouterr().err
