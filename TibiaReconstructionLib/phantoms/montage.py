"""A PNG montage of a phantom case for people: axial, coronal and sagittal slices (matplotlib, Agg).

Columns: healthy CT with its tibia contour, fractured CT, fractured CT with the tibia label (yellow)
and fracture mask (red) contours. Slices are index-space planes (i, j, k) through the fracture (or
the tibia) centre; the axial one is the slice through the mask that shows the most fractured tibia.
Orientation is radiological for an axis-aligned LPS grid (patient right on the image left, anterior
up in axial, superior up in coronal and sagittal). Bone window L 400 / W 1800.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..io import atomic_path
from .ct import TIBIA
from .generator import PhantomCase

WINDOW = (-500.0, 1300.0)


def _center(mask: np.ndarray) -> tuple[int, int, int]:
    idx = np.argwhere(mask)
    return tuple(int(v) for v in np.median(idx, axis=0)) if len(idx) else tuple(n // 2 for n in mask.shape)


def save_montage(case: PhantomCase, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the montage PNG of ``case`` to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sp = case.ct.spacing  # (i, j, k)
    focus = case.fracture_mask.array > 0 if case.fractured else case.labels.array == TIBIA
    k, j, i = _center(focus)
    if case.fractured:  # axial: the slice through the mask that shows the most fractured tibia
        seen = ((case.fractured_labels.array == TIBIA) & focus).sum(axis=(1, 2))
        k = int(np.argmax(seen)) if seen.any() else k
    views = [("axial", np.s_[k, :, :], sp[1] / sp[0], False), ("coronal", np.s_[:, j, :], sp[2] / sp[0], True),
             ("sagittal", np.s_[:, :, i], sp[2] / sp[1], True)]
    columns = [("healthy CT", case.ct, case.labels, None)]
    if case.fractured:
        columns += [("fractured CT", case.fractured_ct, None, None),
                    ("tibia label + fracture mask", case.fractured_ct, case.fractured_labels, case.fracture_mask)]
    fig, axes = plt.subplots(3, len(columns), figsize=(4.2 * len(columns), 13), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 2, 2]})
    for r, (view, sl, aspect, flip) in enumerate(views):
        for c, (title, ct, labels, mask) in enumerate(columns):
            ax = axes[r, c]
            origin = "lower" if flip else "upper"
            ax.imshow(ct.array[sl], cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], aspect=aspect, origin=origin,
                      interpolation="nearest")
            if labels is not None:
                ax.contour(labels.array[sl] == TIBIA, [0.5], colors="yellow", linewidths=0.6)
            if mask is not None and np.any(mask.array[sl]):
                ax.contour(mask.array[sl] > 0, [0.5], colors="red", linewidths=0.9)
            ax.set_title(f"{title} - {view}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    kind = case.fracture_type or "healthy"
    fig.suptitle(f"seed {case.seed}, {case.side} leg, {kind}; spacing {sp[0]:.2f} x {sp[1]:.2f} x {sp[2]:.2f} mm, "
                 f"size {case.ct.grid.size[0]}x{case.ct.grid.size[1]}x{case.ct.grid.size[2]}", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    with atomic_path(out, overwrite) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return out
