import numpy as np
import pytest
import SimpleITK as sitk

from TibiaReconstructionLib.errors import GeometryMismatchError, InputError, OutputExistsError
from TibiaReconstructionLib.geometry import Volume
from TibiaReconstructionLib.io import read_mask, read_volume, write_volume


@pytest.fixture
def ct(oblique_volume):
    return oblique_volume.with_array((oblique_volume.array * 300).astype(np.int16))


@pytest.mark.parametrize("suffix", [".nrrd", ".nii", ".nii.gz", ".mha"])
def test_write_read_round_trip(tmp_path, ct, suffix):
    path = write_volume(ct, tmp_path / f"ct{suffix}")
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, ct.array)
    assert back.array.dtype == ct.array.dtype
    np.testing.assert_allclose(back.spacing, ct.spacing, rtol=1e-6)
    np.testing.assert_allclose(back.origin, ct.origin, atol=1e-4)
    np.testing.assert_allclose(back.direction, ct.direction, atol=1e-5)


def test_a_volume_read_keeps_its_voxels_after_the_reader_s_image_is_gone(tmp_path, rng):
    """The array read lies on the SimpleITK image's own buffer (no copy): it must keep that image alive, stay
    writable, and changing it must not change the file or a second read."""
    import gc

    big = Volume(rng.integers(-1000, 2000, (40, 64, 64)).astype(np.int16), [0.8, 0.8, 1.5], [1.0, 2.0, 3.0])
    path = write_volume(big, tmp_path / "big.nrrd")
    array = read_volume(path).array
    gc.collect()
    others = [np.full(big.array.shape, 7, np.int16) for _ in range(4)]  # would reuse a freed buffer
    np.testing.assert_array_equal(array, big.array)
    assert array.flags.writeable and others[0][0, 0, 0] == 7
    array[0] = 0
    np.testing.assert_array_equal(read_volume(path).array, big.array)


def test_dicom_series_round_trip(tmp_path, ct):
    folder = write_volume(ct, tmp_path / "dicom")
    assert len(list(folder.glob("*.dcm"))) == ct.array.shape[0]
    back = read_volume(folder)
    np.testing.assert_array_equal(back.array, ct.array)
    np.testing.assert_allclose(back.spacing, ct.spacing, rtol=1e-5)
    np.testing.assert_allclose(back.origin, ct.origin, atol=1e-3)
    np.testing.assert_allclose(back.direction, ct.direction, atol=1e-5)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_labels_stay_integer(tmp_path, ct, suffix):
    labels = ct.with_array((np.abs(ct.array) % 3).astype(np.float32))
    back = read_volume(write_volume(labels, tmp_path / f"lab{suffix}", label=True), label=True)
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, labels.array.astype(np.uint8))


def test_intensity_image_as_label_is_refused(tmp_path, ct):
    path = write_volume(ct.with_array(ct.array.astype(np.float32) + 0.5), tmp_path / "x.nrrd")
    with pytest.raises(InputError, match="non-integer"):
        read_volume(path, label=True)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="File not found"):
        read_volume(tmp_path / "nope.nrrd")


@pytest.mark.parametrize("suffix,compress", [(".nrrd", False), (".nrrd", True), (".nii.gz", True), (".nii", False),
                                             (".mha", False), (".mha", True)])
def test_truncated_file_is_clear(tmp_path, ct, suffix, compress):
    path = write_volume(ct, tmp_path / f"ct{suffix}", compress=compress)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="Cannot read"):
        read_volume(path)


def test_garbage_file_is_clear(tmp_path):
    path = tmp_path / "ct.nrrd"
    path.write_bytes(b"this is not an image")
    with pytest.raises(InputError, match="Cannot read"):
        read_volume(path)


def test_2d_and_4d_images_are_refused(tmp_path):
    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkInt16), str(tmp_path / "2d.nrrd"))
    sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkInt16), str(tmp_path / "4d.nrrd"))
    for name in ("2d.nrrd", "4d.nrrd"):
        with pytest.raises(InputError, match="not a 3D scalar volume"):
            read_volume(tmp_path / name)


def test_mask_on_other_grid_names_both(tmp_path, ct):
    shifted = Volume(np.ones(ct.array.shape, np.uint8), ct.spacing, ct.origin + 5.0, ct.direction)
    path = write_volume(shifted, tmp_path / "mask.nrrd", label=True)
    with pytest.raises(GeometryMismatchError, match="not on the CT's voxel grid") as err:
        read_mask(path, reference=ct, name="tibia mask")
    assert "tibia mask" in str(err.value) and "origin" in str(err.value)


def test_existing_output_is_not_overwritten(tmp_path, ct):
    path = write_volume(ct, tmp_path / "ct.nrrd")
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        write_volume(ct.with_array(ct.array * 0), path)
    assert path.read_bytes() == before
    write_volume(ct.with_array(ct.array * 0), path, overwrite=True)
    assert read_volume(path).array.max() == 0
    assert [p.name for p in tmp_path.iterdir()] == ["ct.nrrd"]  # no temporary leftovers


def test_atomic_folder_replaces_whole_or_not_at_all(tmp_path):
    from TibiaReconstructionLib.io import atomic_folder

    target = tmp_path / "bundle"
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("new", encoding="utf-8")
    assert (target / "a.txt").read_text(encoding="utf-8") == "new"
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "a.txt").write_text("half", encoding="utf-8")
            raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text(encoding="utf-8") == "new"  # the old folder is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temporary leftovers
