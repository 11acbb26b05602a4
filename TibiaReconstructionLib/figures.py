"""PNG figures for people: prediction contours over CT slices and a 3D view of the surface (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .geometry import Volume
from .io import atomic_path
from .surface import polydata_points, smooth_and_decimate


def _triangles(polydata) -> np.ndarray:
    from vtk.util import numpy_support

    return numpy_support.vtk_to_numpy(polydata.GetPolys().GetConnectivityArray()).reshape(-1, 3)  # triangles


def overlay_png(ct: Volume, path: str | Path, contours: dict, surface=None, title: str = "",
                window_hu=(-400, 1600), overwrite: bool = False) -> Path:
    """Axial, coronal and sagittal CT slices through the centre of the first contour's mask, with each mask
    of ``contours`` ({name: (Volume, colour)}) outlined, plus a 3D view of ``surface`` (LPS polydata).
    Slices are drawn in array index space with the physical aspect ratio (axis-aligned CTs look right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    first = next(iter(contours.values()))[0].array != 0
    center = np.argwhere(first).mean(0).round().astype(int) if first.any() else np.array(ct.array.shape) // 2
    sk, sj, si = ct.spacing[::-1]
    views = [("axial", lambda a: a[center[0]], sj / si), ("coronal", lambda a: a[:, center[1]][::-1], sk / si),
             ("sagittal", lambda a: a[:, :, center[2]][::-1], sk / sj)]
    fig = plt.figure(figsize=(16, 5.5))
    for n, (name, take, aspect) in enumerate(views):
        ax = fig.add_subplot(1, 4, n + 1)
        ax.imshow(take(ct.array), cmap="gray", vmin=window_hu[0], vmax=window_hu[1], aspect=aspect,
                  interpolation="nearest")
        for label, (vol, colour) in contours.items():
            sl = take(vol.array != 0).astype(float)
            if sl.any():
                ax.contour(sl, levels=[0.5], colors=[colour], linewidths=1.0)
            ax.plot([], [], color=colour, label=label)
        ax.set_title(name)
        ax.axis("off")
        if n == 0:
            ax.legend(loc="lower left", fontsize=7, framealpha=0.6)
    if surface is not None and surface.GetNumberOfPolys() > 0:
        ax = fig.add_subplot(1, 4, 4, projection="3d")
        light = smooth_and_decimate(surface, iterations=0, target_reduction=0.8, max_error_mm=1.0) \
            if surface.GetNumberOfPolys() > 20000 else surface
        pts, tri = polydata_points(light), _triangles(light)
        normals = np.cross(pts[tri[:, 1]] - pts[tri[:, 0]], pts[tri[:, 2]] - pts[tri[:, 0]])
        normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
        shade = 0.35 + 0.65 * np.clip(normals @ np.array([-0.4, -0.6, 0.7]), 0, 1)
        ax.add_collection3d(Poly3DCollection(pts[tri], facecolors=np.c_[shade * 0.95, shade * 0.85, shade * 0.6,
                                                                      np.ones_like(shade)], linewidths=0))
        lo, hi = pts.min(0), pts.max(0)
        half = (hi - lo).max() / 2
        mid = (hi + lo) / 2
        ax.set_xlim(mid[0] - half, mid[0] + half)
        ax.set_ylim(mid[1] - half, mid[1] + half)
        ax.set_zlim(mid[2] - half, mid[2] + half)
        ax.view_init(elev=10, azim=-60)
        ax.set_xlabel("L (mm)")
        ax.set_ylabel("P (mm)")
        ax.set_zlabel("S (mm)")
        ax.set_title("predicted surface (LPS)")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path, overwrite) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)
