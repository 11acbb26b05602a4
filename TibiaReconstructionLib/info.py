"""`tibia-recon info`: print the geometry and intensity range of volume files."""

from __future__ import annotations

import numpy as np

from .io import read_volume


def describe_file(path: str) -> str:
    vol = read_volume(path)
    arr = vol.array
    return (f"{path}\n  {vol.grid.describe()}\n  dtype {arr.dtype}, min {np.min(arr):.6g}, "
            f"max {np.max(arr):.6g}, mean {np.mean(arr):.6g}")


def register_cli(sub) -> None:
    p = sub.add_parser("info", help="print the geometry (LPS) and value range of volume files",
                       description="Print size, spacing, origin and direction (LPS) and the value range of "
                                   "NRRD/NIfTI/MHA files or DICOM series folders.")
    p.add_argument("paths", nargs="+", help="volume files or DICOM folders")
    p.set_defaults(func=lambda a: print("\n".join(describe_file(x) for x in a.paths)))
