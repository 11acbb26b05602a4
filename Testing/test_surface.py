import numpy as np
import pytest
import vtk
from vtk.util import numpy_support

from TibiaReconstructionLib.errors import InputError, OutputExistsError
from TibiaReconstructionLib.geometry import Volume, euler_rotation, lps_to_ras, reflection
from TibiaReconstructionLib.surface import (labelmap_surface, polydata_points, read_stl, transform_polydata,
                                            write_stl)


def _sphere_volume(radius=12.0, spacing=(1.0, 1.2, 1.5), direction=None):
    direction = np.eye(3) if direction is None else direction
    vol = Volume(np.zeros((30, 36, 40), np.uint8), np.array(spacing), np.array([5.0, -7.0, 20.0]), direction)
    kji = np.indices(vol.array.shape).reshape(3, -1).T
    pts = vol.index_to_physical(kji[:, ::-1].astype(float))
    center = vol.grid.center
    inside = (np.linalg.norm(pts - center, axis=1) <= radius).reshape(vol.array.shape)
    return vol.with_array(inside.astype(np.uint8)), center


def _signed_volume(pd):
    mp = vtk.vtkMassProperties()
    mp.SetInputData(pd)
    mp.Update()
    return mp.GetVolume()


@pytest.mark.parametrize("direction", [None, euler_rotation((20, -35, 50))[:3, :3]])
def test_labelmap_surface_lies_on_the_sphere(direction):
    vol, center = _sphere_volume(direction=direction)
    surf = labelmap_surface(vol)
    r = np.linalg.norm(polydata_points(surf) - center, axis=1)
    assert surf.GetNumberOfPolys() > 100
    assert abs(r.mean() - 12.0) < 0.6 and r.std() < 0.5  # vertices on the boundary, in physical LPS
    assert abs(_signed_volume(surf) - 4 / 3 * np.pi * 12.0 ** 3) / (4 / 3 * np.pi * 12.0 ** 3) < 0.08
    names = [surf.GetPointData().GetArrayName(i) for i in range(surf.GetPointData().GetNumberOfArrays())]
    assert names == ["Normals"]  # no unnamed iso-value array for writers to store under a random name


def test_reflection_keeps_outward_orientation():
    vol, center = _sphere_volume()
    surf = labelmap_surface(vol)
    mirrored = transform_polydata(surf, reflection((1, 0, 0), (0, 0, 0)))
    n = vtk.vtkPolyDataNormals()
    n.SetInputData(mirrored)
    n.ComputeCellNormalsOn()
    n.ConsistencyOff()
    n.AutoOrientNormalsOff()
    n.Update()
    out = n.GetOutput()
    cell_normals = numpy_support.vtk_to_numpy(out.GetCellData().GetNormals())
    centers_f = vtk.vtkCellCenters()
    centers_f.SetInputData(out)
    centers_f.Update()
    cc = polydata_points(centers_f.GetOutput())
    c_m = center * np.array([-1, 1, 1])
    outward = np.einsum("ij,ij->i", cell_normals, cc - c_m)
    assert np.mean(outward > 0) > 0.99


def test_stl_frames_and_no_overwrite(tmp_path):
    vol, _ = _sphere_volume()
    surf = labelmap_surface(vol)
    lps = write_stl(surf, tmp_path / "s_lps.stl", frame="LPS")
    ras = write_stl(surf, tmp_path / "s_ras.stl", frame="RAS")
    assert lps.read_bytes()[:9] == b"SPACE=LPS" and ras.read_bytes()[:9] == b"SPACE=RAS"  # what Slicer reads
    p_lps, p_ras = polydata_points(read_stl(lps)), polydata_points(read_stl(ras))
    np.testing.assert_allclose(p_ras, lps_to_ras(p_lps), atol=1e-3)
    assert abs(p_lps[:, 0].mean() - polydata_points(surf)[:, 0].mean()) < 1e-3
    with pytest.raises(OutputExistsError):
        write_stl(surf, lps)
    with pytest.raises(InputError, match="frame"):
        write_stl(surf, tmp_path / "x.stl", frame="XYZ")
