import subprocess
import sys

from TibiaReconstructionLib import __version__
from TibiaReconstructionLib.cli import main
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


def test_info_prints_geometry_and_errors_cleanly(tmp_path, oblique_volume, capsys):
    path = write_volume(oblique_volume, tmp_path / "v.nrrd")
    assert main(["info", str(path)]) == 0
    assert "size 12x10x8" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "missing.nrrd")]) == 1
    assert "File not found" in capsys.readouterr().err
