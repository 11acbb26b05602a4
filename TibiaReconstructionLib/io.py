"""Read and write volumes (NRRD, NIfTI, MHA/MHD, DICOM series folders) as LPS :class:`Volume` objects.

Labelmaps are read and written as unsigned integers. Every writer goes through a temporary file
in the target folder and an atomic rename, and refuses to replace an existing file unless asked.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import tempfile
import uuid
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError, OutputExistsError, TibiaReconError
from .geometry import Grid, Volume, check_same_grid

_UMASK = os.umask(0o022)
os.umask(_UMASK)
VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
# The most memory one volume may take once read, checked from its header before any voxel is read.
# Default 4 GiB (a 512x512x4000 int16 CT is 2 GiB); raise it with TIBIA_RECON_MAX_VOLUME_GB.
MAX_VOLUME_BYTES = int(float(os.environ.get("TIBIA_RECON_MAX_VOLUME_GB", "4")) * 2**30)
_DICOM_NAMES = (".dcm", ".dicom", ".ima", "")  # suffixes of files in a DICOM folder that must belong to the series


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
    listed = {Path(f).name for f in files}
    strays = [f.name for f in sorted(folder.iterdir()) if f.is_file() and f.name not in listed
              and not f.name.startswith(".") and f.name.upper() != "DICOMDIR" and f.suffix.lower() in _DICOM_NAMES]
    if strays:
        raise InputError(f"The DICOM folder {folder} holds {len(strays)} file(s) that are not readable slices of its "
                         f"series ({', '.join(strays[:3])}{', ...' if len(strays) > 3 else ''}): truncated, corrupt or "
                         "not DICOM. A slice would be missing from the volume; re-export the series or remove them.")
    first = _header(Path(files[0]))
    _check_memory(folder, (*first.GetSize()[:2], len(files)), first.GetPixelID(), first.GetNumberOfComponents())
    _check_even_slices(folder, files)
    reader.SetFileNames(files)
    return reader.Execute()


def _check_even_slices(folder: Path, files: list[str]) -> None:
    """Refuse a series whose slice positions have a gap or a duplicate (a missing or extra slice)."""
    positions, normal = [], None
    for name in files:
        info = _header(Path(name))
        if normal is None:
            d = np.asarray(info.GetDirection(), float).reshape(info.GetDimension(), info.GetDimension())
            normal = np.cross(d[:3, 0], d[:3, 1])
        positions.append(float(np.asarray(info.GetOrigin()[:3]) @ normal))
    steps = np.diff(np.sort(positions))
    typical = float(np.median(steps))
    worst = int(np.argmax(np.abs(steps - typical)))
    if typical <= 0 or abs(steps[worst] - typical) > 0.1 * typical + 0.01:
        raise InputError(f"The slices of the DICOM series in {folder} are not evenly spaced: slices {worst + 1} and "
                         f"{worst + 2} are {steps[worst]:.3g} mm apart, the others {typical:.3g} mm. A slice is "
                         "missing or duplicated; re-export the complete series.")


def _check_metaimage_header(path: Path) -> None:
    """ITK crashes the process (segmentation fault) on a MetaImage header whose NDims is not a small positive
    number: check NDims and DimSize ourselves first (the header is text up to ElementDataFile)."""
    with path.open("rb") as f:
        head = f.read(1 << 16).decode("latin-1")
    fields = {}
    for line in head.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            break
    ndims = fields.get("ndims", "")
    if not (ndims.isdigit() and 1 <= int(ndims) <= 10):
        raise RuntimeError(f"MetaImage header has NDims = {ndims or '(missing)'}, not a number from 1 to 10")
    sizes = fields.get("dimsize", "").split()
    if len(sizes) != int(ndims) or not all(v.isdigit() and int(v) > 0 for v in sizes):
        raise RuntimeError(f"MetaImage header has DimSize = {' '.join(sizes) or '(missing)'}, not {ndims} positive "
                           "whole numbers")


def _header(path: Path) -> sitk.ImageFileReader:
    """A reader holding the image information (size, type, geometry) of ``path``; reads no voxels."""
    info = sitk.ImageFileReader()
    info.SetFileName(str(path))
    info.LoadPrivateTagsOff()
    info.ReadImageInformation()
    return info


def _check_memory(path: Path, size, pixel_id: int, components: int) -> None:
    """Refuse, before reading, a volume whose voxels would take more than MAX_VOLUME_BYTES of memory."""
    voxel_bytes = sitk.Image([1, 1], pixel_id).GetSizeOfPixelComponent() * max(components, 1)
    needed = int(np.prod([int(s) for s in size], dtype=object)) * voxel_bytes
    if needed > MAX_VOLUME_BYTES:
        dims = "x".join(str(int(s)) for s in size)
        raise InputError(f"{path} is too large: {dims} voxels of {voxel_bytes} bytes need {needed / 2**30:.1f} GiB of "
                         f"memory, above the limit of {MAX_VOLUME_BYTES / 2**30:.1f} GiB. Crop the CT to the lower leg "
                         "(knee to ankle) or resample it; if this machine has the memory, raise the limit with the "
                         "environment variable TIBIA_RECON_MAX_VOLUME_GB.")


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
        if not p.is_dir():
            if volume_suffix(p) in (".mha", ".mhd"):
                _check_metaimage_header(p)
            info = _header(p)
            if info.GetDimension() != 3 or info.GetNumberOfComponents() != 1:
                raise InputError(f"{p} is not a 3D scalar volume (it has {info.GetDimension()} dimensions of size "
                                 f"{info.GetSize()} and {info.GetNumberOfComponents()} components per voxel). "
                                 "Provide one 3D CT or label volume.")
            _check_memory(p, info.GetSize(), info.GetPixelID(), info.GetNumberOfComponents())
        if p.name.lower().endswith(".gz"):
            _check_gzip_complete(p)
        elif volume_suffix(p) == ".nii":
            _check_nifti_size(p)
        image = _read_dicom_series(p) if p.is_dir() else sitk.ReadImage(str(p))
    except InputError:
        raise
    except (RuntimeError, OSError, ValueError, OverflowError) as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise InputError(f"Cannot read {p} as an image: the file is unreadable, truncated or not in a supported "
                         f"format ({', '.join(VOLUME_SUFFIXES)} or a DICOM folder). Reader said: {detail}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{p} is not a 3D scalar volume (it has {image.GetDimension()} dimensions of size "
                         f"{image.GetSize()} and {image.GetNumberOfComponentsPerPixel()} components per voxel). "
                         "Provide one 3D CT or label volume.")
    try:
        volume = Volume.from_sitk(image, share=True)  # the image read is ours alone: no copy of a CT-sized array
    except InputError as exc:
        raise InputError(f"{p} has an unusable geometry: {exc} Fix the file's header (spacing, direction) or "
                         "re-export it.") from None
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
    if label_value is None and vol.array.dtype == np.uint8 and vol.array.max() <= 1:
        return vol  # already 0/1 (the usual mask file): no full-size comparison
    arr = vol.array == label_value if label_value is not None else vol.array != 0
    if label_value is not None and not arr.any() and vol.array.any():
        present = np.unique(vol.array)
        present = present[present != 0]
        raise InputError(f"The {name} ({path}) has no voxel with label {label_value}; its labels are "
                         f"{', '.join(str(v) for v in present[:10])}{', ...' if len(present) > 10 else ''}. "
                         "Pass the tibia's label value.")
    return vol.with_array(arr.view(np.uint8))  # the 0/1 bytes of the new boolean array, not a copy


@contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error delete it."""
    target = Path(path)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} already exists; it was left untouched. Choose another output or pass "
                                "--overwrite (overwrite=True).")
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        suffix = "".join(target.suffixes) or ".tmp"
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        yield Path(tmp)
        os.replace(tmp, target)
    except TibiaReconError:
        raise
    except OSError as exc:
        raise output_error(exc, target) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def output_error(exc: OSError, target: Path) -> OutputError:
    """An OutputError saying why ``target`` could not be written (disk full, not writable, not a folder)."""
    why = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return OutputError(f"The disk is full: could not write {target} ({why}). Nothing was left half-written; free "
                           "some space or choose an output folder on another disk.")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"Cannot write {target}: the folder is not writable ({why}). Choose an output folder you "
                           "can write to.")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return OutputError(f"Cannot write {target}: part of the path is a file, not a folder ({why}). Choose "
                           "another output folder.")
    return OutputError(f"Cannot write {target}: {why}. Check that the output folder exists, is writable and the "
                       "disk is not full.")


def replace_folder(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``, replacing ``dst`` if it exists (renames only; no partial ``dst``).
    ``src`` (usually a 0700 temporary folder) gets the usual folder permissions first."""
    os.chmod(src, 0o777 & ~_UMASK)
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", dir=dst.parent))
        os.replace(dst, old / dst.name)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces ``folder`` whole, on error it is removed.
    (Callers check for an existing ``folder`` themselves: this always replaces.)"""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield tmp
        replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output_folder(out: Path) -> None:
    """Refuse, before any work, an output folder that cannot be created or written."""
    existing = out
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"Cannot write the outputs to {out}: {existing} is a file, not a folder. Choose another "
                          "--out folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"Cannot write the outputs to {out}: the folder {existing} is not writable. Choose an "
                          "--out folder you can write to.")


@contextmanager
def staged_outputs(paths: dict, overwrite: bool = False) -> Iterator[dict]:
    """All-or-nothing output files in one folder: yields {key: staging path} (a hidden folder beside the
    outputs) to write; on success renames them all into ``paths``, on any error removes the staging folder
    and the folders this created. Files that appeared meanwhile are not replaced unless ``overwrite``. ``paths``
    is read again when the block ends: an output found unneeded meanwhile is deleted from it, not written."""
    out = Path(next(iter(paths.values()))).parent
    made = [d for d in (out, *out.parents) if not d.exists()]  # folders this creates, deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tibia-recon-outputs-", dir=out))
    except OSError as exc:
        raise output_error(exc, out) from None
    try:
        yield {key: staging / Path(path).name for key, path in paths.items()}
        clash = [str(p) for p in paths.values() if Path(p).exists()]
        if clash and not overwrite:
            raise OutputExistsError(f"Output files appeared while working: {', '.join(clash)}. They were left "
                                    "untouched; choose another --out folder or pass --overwrite.")
        for key, path in paths.items():
            try:
                os.replace(staging / Path(path).name, path)
            except OSError as exc:
                raise output_error(exc, Path(path)) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    shutil.rmtree(staging, ignore_errors=True)


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
        try:
            sitk.WriteImage(vol.to_sitk(share=True), str(tmp), useCompression=compress)
        except RuntimeError as exc:
            raise OutputError(f"Could not write {p}: {_write_failure_hint(p)} (writer said: "
                              f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc})") from None
    return p


def _write_failure_hint(path: Path) -> str:
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return "check that the folder exists and is writable and that the disk is not full"
    if free < 64 * 2**20:
        return f"the disk is full ({free / 2**20:.0f} MiB free); free some space or choose another folder"
    return "check that the folder is writable and that the disk is not full"


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
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp_folder = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        os.chmod(tmp_folder, 0o777 & ~_UMASK)
    except OSError as exc:
        raise output_error(exc, folder) from None
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    orientation = "\\".join(f"{v:.10g}" for v in (*direction[:, 0], *direction[:, 1]))
    try:
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
    except (RuntimeError, OSError) as exc:
        shutil.rmtree(tmp_folder, ignore_errors=True)
        if isinstance(exc, OSError):
            raise output_error(exc, folder) from None
        raise OutputError(f"Could not write the DICOM series {folder}: {_write_failure_hint(folder)}.") from None
    if folder.exists():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    os.replace(tmp_folder, folder)
    return folder


def write_json(data: dict, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``data`` as indented JSON atomically."""
    with atomic_path(path, overwrite) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=json_default), encoding="utf-8")
    return Path(path)


def json_default(obj):
    """``json.dumps(default=...)`` for the library's values: numpy arrays and scalars, paths, grids."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Grid):
        return obj.to_dict()
    raise TypeError(f"Cannot write {type(obj).__name__} to JSON")
