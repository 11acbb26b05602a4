"""Read and write volumes (NRRD, NIfTI, MHA/MHD, DICOM series folders) as LPS :class:`Volume` objects.

Labelmaps are read and written as unsigned integers. Every writer goes through a temporary file
in the target folder and an atomic rename, and refuses to replace an existing file unless asked.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import uuid
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputExistsError
from .geometry import Volume, check_same_grid

_UMASK = os.umask(0o022)
os.umask(_UMASK)
VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


def volume_suffix(path: str | os.PathLike) -> str:
    """The file-format suffix of ``path`` ('.nii.gz' counts as one suffix); '' for a folder."""
    name = Path(path).name.lower()
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return ""


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"No DICOM series found in folder {folder}. Point to the folder holding the .dcm "
                         "slices of one CT series.")
    if len(series) > 1:
        raise InputError(f"Folder {folder} holds {len(series)} DICOM series ({', '.join(series)}); put the CT "
                         "series in a folder of its own.")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    if len(files) < 2:
        raise InputError(f"The DICOM series in {folder} has only {len(files)} slice; a CT volume needs several.")
    reader.SetFileNames(files)
    return reader.Execute()


def _check_gzip_complete(path: Path) -> None:
    """ITK reads a truncated .gz silently (zeros at the end): check the stream ends properly first."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error) as exc:
        raise RuntimeError(f"compressed stream is damaged ({exc})") from None


def _check_nifti_size(path: Path) -> None:
    """ITK reads a truncated uncompressed .nii silently: check the file holds all voxels."""
    info = sitk.ImageFileReader()
    info.SetFileName(str(path))
    info.ReadImageInformation()
    probe = sitk.Image([1] * info.GetDimension(), info.GetPixelID(), info.GetNumberOfComponents())
    voxel_bytes = sitk.GetArrayViewFromImage(probe).itemsize * info.GetNumberOfComponents()
    needed = 348 + int(np.prod(info.GetSize())) * voxel_bytes
    if path.stat().st_size < needed:
        raise RuntimeError(f"file is truncated: {path.stat().st_size} bytes, the header promises at least {needed}")


def read_volume(path: str | os.PathLike, label: bool = False) -> Volume:
    """Read a 3D scalar image file or DICOM series folder as a Volume (LPS).

    With ``label=True`` the voxels must be whole numbers >= 0 and come back as uint8/uint16/uint32.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"File not found: {p}. Check the path.")
    try:
        if p.name.lower().endswith(".gz"):
            _check_gzip_complete(p)
        elif volume_suffix(p) == ".nii":
            _check_nifti_size(p)
        image = _read_dicom_series(p) if p.is_dir() else sitk.ReadImage(str(p))
    except InputError:
        raise
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise InputError(f"Cannot read {p} as an image: the file is unreadable, truncated or not in a supported "
                         f"format ({', '.join(VOLUME_SUFFIXES)} or a DICOM folder). Reader said: {detail}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{p} is not a 3D scalar volume (it has {image.GetDimension()} dimensions of size "
                         f"{image.GetSize()} and {image.GetNumberOfComponentsPerPixel()} components per voxel). "
                         "Provide one 3D CT or label volume.")
    volume = Volume.from_sitk(image)
    return as_label(volume, str(p)) if label else volume


def as_label(volume: Volume, name: str = "label volume") -> Volume:
    """The same volume with an unsigned integer array; raises if voxels are not whole numbers >= 0."""
    arr = volume.array
    if arr.dtype == bool:
        return volume.with_array(arr.astype(np.uint8))
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise InputError(f"The {name} has non-integer voxel values; a label map must hold whole numbers "
                             "(0 = background). Was an intensity image given instead of a mask?")
    if arr.size and arr.min() < 0:
        raise InputError(f"The {name} has negative voxel values (min {arr.min()}); labels must be >= 0.")
    top = int(arr.max()) if arr.size else 0
    dtype = np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else np.uint32
    return volume.with_array(arr.astype(dtype, copy=arr.dtype != dtype))


def read_mask(path: str | os.PathLike, reference: Volume | None = None, name: str = "mask",
              label_value: int | None = None) -> Volume:
    """Read a binary mask (voxels == ``label_value``, or all nonzero) checked against ``reference``'s grid."""
    vol = read_volume(path, label=True)
    if reference is not None:
        check_same_grid(reference, vol, "CT", f"{name} ({path})")
    arr = vol.array == label_value if label_value is not None else vol.array != 0
    return vol.with_array(arr.astype(np.uint8))


@contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error delete it."""
    target = Path(path)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} already exists; it was left untouched. Choose another output or pass "
                                "--overwrite (overwrite=True).")
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_volume(volume: Volume, path: str | os.PathLike, label: bool = False, overwrite: bool = False,
                 compress: bool = True) -> Path:
    """Write a Volume to NRRD/NIfTI/MHA (by suffix) or, for a path without suffix, a DICOM series folder."""
    p = Path(path)
    vol = as_label(volume) if label else volume
    if volume_suffix(p) in (".nhdr", ".mhd"):
        raise InputError(f"{p}: detached-header formats (.nhdr, .mhd) are read-only here; write .nrrd or .mha.")
    if not volume_suffix(p):
        return write_dicom_series(vol, p, overwrite=overwrite)
    with atomic_path(p, overwrite) as tmp:
        sitk.WriteImage(vol.to_sitk(), str(tmp), useCompression=compress)
    return p


def write_dicom_series(volume: Volume, folder: str | os.PathLike, overwrite: bool = False,
                       description: str = "TibiaReconstruction") -> Path:
    """Write a CT volume as a DICOM series (one int16 file per k-slice, HU via rescale 1/0) into ``folder``."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise OutputExistsError(f"{folder} already exists and is not empty; choose an empty folder or pass "
                                "--overwrite (overwrite=True).")
    arr = volume.array
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.rint(arr)
    arr = np.clip(arr, -32768, 32767).astype(np.int16)
    image = volume.with_array(arr).to_sitk()
    direction = volume.direction
    series_uid = f"2.25.{uuid.uuid4().int}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp_folder = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    os.chmod(tmp_folder, 0o777 & ~_UMASK)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    orientation = "\\".join(f"{v:.10g}" for v in (*direction[:, 0], *direction[:, 1]))
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        position = volume.index_to_physical(np.array([0.0, 0.0, k]))
        tags = {
            "0008|0060": "CT", "0008|103e": description, "0020|000e": series_uid,
            "0020|000d": series_uid + ".1", "0008|0018": f"{series_uid}.{k + 1}", "0020|0013": str(k + 1),
            "0020|0037": orientation, "0020|0032": "\\".join(f"{v:.10g}" for v in position),
            "0018|0050": f"{volume.spacing[2]:.10g}", "0028|1052": "0", "0028|1053": "1",
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_folder / f"slice{k:05d}.dcm"))
        writer.Execute(sl)
    if folder.exists():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    os.replace(tmp_folder, folder)
    return folder


def write_json(data: dict, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``data`` as indented JSON atomically."""
    with atomic_path(path, overwrite) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    return Path(path)


def _json_default(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"Cannot write {type(obj).__name__} to JSON")
