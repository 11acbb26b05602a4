"""Closed triangle surfaces from the LLP26 cubic-Lagrange tibia-fibula mesh, evaluated with numpy.

The mesh has 88 elements over 571 nodes: bicubic quads (4x4 nodes on a lattice) and cubic
triangles (10 nodes, ordered row by row: (0,0) (1/3,0) (2/3,0) (1,0) (0,1/3) (1/3,1/3) (2/3,1/3)
(0,2/3) (1/3,2/3) (0,1) in element coordinates). Each surface vertex is a fixed weighted sum of at
most 16 nodes, so a new shape's surface is one sparse product with its node coordinates.
Coordinates are whatever the nodes are in (LLP26: LPS-like left leg, mm).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np
import vtk
from scipy.spatial import cKDTree
from vtk.util.numpy_support import numpy_to_vtk, numpy_to_vtkIdTypeArray, vtk_to_numpy

DATA_FILE = "llp26_tibia_fibula.npz"
BONES = ("tibia", "fibula")


@lru_cache(maxsize=1)
def load_model() -> dict[str, np.ndarray]:
    """The converted LLP26 tibia-fibula arrays (see convert_llp26.py); no pickle involved."""
    with resources.files("TibiaReconstructionLib").joinpath("data", DATA_FILE).open("rb") as f:
        with np.load(f, allow_pickle=False) as d:
            return {k: d[k] for k in d.files}


def _lagrange_1d(t: np.ndarray) -> np.ndarray:
    """Cubic Lagrange basis on nodes 0, 1/3, 2/3, 1; shape (4, len(t))."""
    nodes = np.array([0.0, 1 / 3, 2 / 3, 1.0])
    out = np.ones((4, len(t)))
    for a in range(4):
        for b in range(4):
            if a != b:
                out[a] *= (t - nodes[b]) / (nodes[a] - nodes[b])
    return out


def _quad_basis(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights (points, 16) on an (n+1)^2 lattice and its 2n^2 triangles."""
    t = np.linspace(0.0, 1.0, n + 1)
    l1 = _lagrange_1d(t)
    # point (u index a, v index b) -> row a + (n+1) b ; node (i, j) -> column i + 4 j
    w = np.einsum("ia,jb->baji", l1, l1).reshape((n + 1) ** 2, 16)
    idx = np.arange((n + 1) ** 2).reshape(n + 1, n + 1)
    p00, p10, p01, p11 = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    tris = np.concatenate([np.stack([p00, p10, p11], -1).reshape(-1, 3), np.stack([p00, p11, p01], -1).reshape(-1, 3)])
    return w, tris


def _tri_basis(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights (points, 10) on the triangular lattice of order n and its n^2 triangles."""
    lattice = [(i, j) for j in range(4) for i in range(4 - j)]  # node order of the cubic triangle
    pts = [(a, b) for b in range(n + 1) for a in range(n + 1 - b)]
    uv = np.array(pts, dtype=float) / n
    # P3 Lagrange basis from the Vandermonde matrix of the 10 lattice nodes
    def mono(x: np.ndarray) -> np.ndarray:
        u, v = x[:, 0], x[:, 1]
        return np.stack([u ** p * v ** q for p in range(4) for q in range(4 - p)], -1)
    coeff = np.linalg.inv(mono(np.array(lattice, dtype=float) / 3.0))
    w = mono(uv) @ coeff
    index = {p: k for k, p in enumerate(pts)}
    tris = []
    for b in range(n):
        for a in range(n - b):
            tris.append((index[(a, b)], index[(a + 1, b)], index[(a, b + 1)]))
            if a + b < n - 1:
                tris.append((index[(a + 1, b)], index[(a + 1, b + 1)], index[(a, b + 1)]))
    return w, np.array(tris)


@dataclass(frozen=True)
class SurfaceTemplate:
    """A closed, consistently oriented triangulation whose vertices are sparse node combinations."""

    node_index: np.ndarray  # (V, 16) int
    node_weight: np.ndarray  # (V, 16) float
    triangles: np.ndarray  # (T, 3) int

    def vertices(self, nodes: np.ndarray) -> np.ndarray:
        """Surface vertices (V, 3) for node coordinates (571, 3)."""
        return np.einsum("vk,vkd->vd", self.node_weight, nodes[self.node_index])


@lru_cache(maxsize=4)
def surface_template(bone: str, subdivisions: int = 6) -> SurfaceTemplate:
    """The triangulated surface of ``bone`` ('tibia' or 'fibula') with ``subdivisions`` per element edge."""
    model = load_model()
    quad_w, quad_t = _quad_basis(subdivisions)
    tri_w, tri_t = _tri_basis(subdivisions)
    rows_i, rows_w, tris, offset = [], [], [], 0
    for e in np.flatnonzero(model["element_bone"] == BONES.index(bone)):
        nodes = model["element_nodes"][e]
        w, t = (quad_w, quad_t) if model["element_is_quad"][e] else (tri_w, tri_t)
        k = w.shape[1]
        rows_i.append(np.pad(np.broadcast_to(nodes[:k], (len(w), k)), ((0, 0), (0, 16 - k))))
        rows_w.append(np.pad(w, ((0, 0), (0, 16 - k))))
        tris.append(t + offset)
        offset += len(w)
    index, weight, tris = np.concatenate(rows_i), np.concatenate(rows_w), np.concatenate(tris)
    # merge the copies of vertices shared by neighbouring elements (found on the mean shape)
    pts = np.einsum("vk,vkd->vd", weight, model["mean"][index])
    pairs = cKDTree(pts).query_pairs(1e-4, output_type="ndarray")
    rep = np.arange(len(pts))
    for a, b in sorted(map(tuple, np.sort(pairs, axis=1)), reverse=True):
        rep[b] = rep[a]
    while np.any(rep[rep] != rep):
        rep = rep[rep]
    keep, new_id = np.unique(rep, return_inverse=True)
    tris = new_id[tris]
    tris = tris[(tris[:, 0] != tris[:, 1]) & (tris[:, 1] != tris[:, 2]) & (tris[:, 0] != tris[:, 2])]
    tris = _orient_outward(pts[keep], tris)
    return SurfaceTemplate(index[keep], weight[keep], tris)


def _orient_outward(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Consistently ordered triangles with outward normals (checked: closed manifold)."""
    edges = np.sort(np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    if np.any(counts != 2):
        raise RuntimeError("The evaluated LLP26 surface is not closed; the mesh topology was misread.")
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputData(polydata(vertices, triangles))
    normals.ConsistencyOn()
    normals.AutoOrientNormalsOn()
    normals.SplittingOff()
    normals.Update()
    out = normals.GetOutput()
    return vtk_to_numpy(out.GetPolys().GetConnectivityArray()).reshape(-1, 3).astype(np.int64)


def polydata(vertices: np.ndarray, triangles: np.ndarray) -> vtk.vtkPolyData:
    """A vtkPolyData of a triangle surface (vertices in mm)."""
    pd = vtk.vtkPolyData()
    points = vtk.vtkPoints()
    points.SetData(numpy_to_vtk(np.ascontiguousarray(vertices, dtype=np.float64), deep=True))
    pd.SetPoints(points)
    cells = vtk.vtkCellArray()
    offsets = np.arange(0, 3 * len(triangles) + 1, 3, dtype=np.int64)
    cells.SetData(numpy_to_vtkIdTypeArray(offsets, deep=True),
                  numpy_to_vtkIdTypeArray(np.ascontiguousarray(triangles, dtype=np.int64).ravel(), deep=True))
    pd.SetPolys(cells)
    return pd


def enclosed_volume(vertices: np.ndarray, triangles: np.ndarray) -> float:
    """Volume (mm^3) enclosed by a closed, consistently oriented triangle surface (divergence theorem)."""
    a, b, c = (vertices[triangles[:, k]] for k in range(3))
    return float(abs(np.einsum("ij,ij->i", a, np.cross(b, c)).sum()) / 6.0)
