"""Predict the healthy tibia in the patient's own CT grid from a fractured CT, its tibia mask and a
coarse fracture mask.

Pipeline (paper step 4): mirror a right leg -> align the long axis and crop (P, patient ->
canonical) -> resample to the bundle's canonical grid -> y * m_tibia * (1 - m_fracture) ->
mask-robust LocNet -> theta (standard -> canonical) -> aligned -> autoencoder -> reconstruction in
standard coordinates [-> fragments reduced onto the proximal main fragment and reconstructed again, refine.py]
-> back through theta and P -> the CT grid [-> the visible fragments kept where the reduction placed them, the
model filling the fracture zone, fusion.py]. All points are LPS mm.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import ndimage
from vtkmodules.vtkCommonDataModel import vtkPolyData

from .bundle import Bundle, load_bundle
from .checks import SHORT_SHARE, check_inputs, open_end_warning
from .errors import InputError, NoOtherLegError
from .fusion import Fused, fuse_visible_bone
from .geometry import Grid, TransformChain, Volume, apply_affine, check_same_grid, crop_to_mask, invert_affine, \
    resample, upsample_linear
from .head_start import HeadStart, blank_outputs, fit_other_leg
from .hidden_end import hidden_end
from .models.sampler import matrix_to_theta, theta_to_matrix
from .prepare import SmoothedCrops, align_tibia, resample_crops, smoothed_crops
from .refine import Placement, reduce_and_reconstruct
from .resources import DEFAULT_BUNDLE
from .surface import UNCERTAINTY_ARRAY, add_point_array, level_surface, polydata_points
from .template import MAX_FIT_RMS_MM, template_box, template_occupancy

MAX_UNCERTAINTY_MM = 30.0
WORK_FRACTION = 2.0  # the result is resampled at (model spacing / WORK_FRACTION), then interpolated onto the CT
CT_SLAB = 32  # CT slices computed together when the result is interpolated onto the CT
Progress = Callable[[float, str], None]


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("Device 'cuda' was requested but no CUDA GPU is available; use device 'cpu' or 'auto'.")
    if device not in ("cpu", "cuda"):
        raise InputError(f"Unknown device {device!r}; use 'auto', 'cpu' or 'cuda'.")
    return torch.device(device)


@dataclass
class WorkGrid:
    """The prediction on the work grid: along the CT's axes through CT voxel centres, every ``factors`` (i, j, k)
    CT voxels (about 1/WORK_FRACTION of the model's spacing), over the CT index box ``lo``..``hi`` (inclusive,
    (i, j, k)) that the predicted tibia can reach. Occupancy in [0, 1] and intensity (window-mapped HU x
    occupancy), both (k, j, i) and None when nothing was predicted; the occupancy's std (PCA bundles) and the
    fusion with the patient's bone (:mod:`fusion`), when made."""

    grid: Grid
    lo: np.ndarray
    hi: np.ndarray
    factors: np.ndarray
    occupancy: np.ndarray | None
    intensity: np.ndarray | None
    spread: Volume | None
    fused: Fused | None


@dataclass
class Prediction:
    """The predicted healthy tibia on the CT grid, its surface (LPS mm) and how it was obtained."""

    labelmap: Volume
    intensity: Volume
    surface: vtkPolyData
    side: str
    transforms: TransformChain  # patient -> canonical -> standard
    theta: np.ndarray  # 4x4, standard -> canonical (the sampler's convention)
    timings: dict = field(default_factory=dict)
    volumes_ml: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    bundle_name: str = ""
    device: str = "cpu"
    occupancy_std: Volume | None = None  # posterior std of the predicted occupancy, on the work grid (PCA bundles)
    reduction: dict = field(default_factory=dict)  # the fragment reduction before the final pass (refine.py)
    fusion: dict = field(default_factory=dict)  # the patient's visible bone kept in the prediction (fusion.py)

    def report(self) -> dict:
        """JSON-ready summary: side, transforms, volumes, timings, warnings."""
        return {"side": self.side, "bundle": self.bundle_name, "device": self.device, "frame": "LPS mm",
                "theta_standard_to_canonical": self.theta.tolist(), "transforms": self.transforms.to_dict(),
                "patient_to_standard": self.transforms.matrix().tolist(), "volumes_ml": self.volumes_ml,
                "timings_s": self.timings, "warnings": self.warnings, "fragment_reduction": self.reduction,
                "visible_bone": self.fusion,
                "surface": {"points": self.surface.GetNumberOfPoints(), "triangles": self.surface.GetNumberOfPolys()}}


@dataclass
class ModelRun:
    """The model's result for one leg side: P (patient -> canonical), θ (4x4, standard -> canonical), the
    reconstruction (C, Z, Y, X) in standard coordinates, its misfit, the model's (reduced) inputs (x, visible),
    the fragment reduction's report, where it placed the fragments (None without a reduction) and by how much P
    turns the leg back about its long axis (degrees, :func:`prepare.align_tibia`)."""

    p: np.ndarray
    theta: np.ndarray
    recon: np.ndarray
    misfit: float
    x: torch.Tensor
    visible: torch.Tensor
    reduction: dict = field(default_factory=dict)
    placement: Placement | None = None
    turned_deg: float = 0.0


class Predictor:
    """Loads a model bundle once and predicts healthy tibiae from fractured CTs."""

    def __init__(self, bundle: str | Path | Bundle | None = None, device: str = "auto",
                 reduce_fragments: bool = True, keep_visible_bone: bool = True,
                 reassemble_fragments: bool = True) -> None:
        """``reduce_fragments``: register the fragments onto a first reconstruction, reduce them onto the proximal
        main fragment and reconstruct again (:mod:`refine`); False gives the paper's single pass.
        ``keep_visible_bone``: where the CT shows the tibia outside the fracture mask, the prediction keeps the
        patient's own bone, moved where the reduction placed it (:mod:`fusion`; needs ``reduce_fragments``); False
        gives the model's reconstruction everywhere. ``reassemble_fragments``: with the visible bone kept, the main
        moved fragment goes where its broken face meets the anchor's, when they clearly do (:mod:`reassembly`);
        False keeps the reduction's placement."""
        self.device = resolve_device(device)
        self.reduce_fragments = reduce_fragments
        self.keep_visible_bone = keep_visible_bone
        self.reassemble_fragments = reassemble_fragments
        self.bundle_path = "(in memory)" if isinstance(bundle, Bundle) else str(bundle or DEFAULT_BUNDLE)
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle or DEFAULT_BUNDLE, self.device)
        self._crop_cache = None

    def _crops(self, ct: Volume, tibia: Volume, fracture: Volume) -> SmoothedCrops:
        """Cropped, anti-aliased inputs; computed once per set of inputs and shared by both candidate sides."""
        key = (id(ct), id(tibia), id(fracture))
        if self._crop_cache is None or self._crop_cache[0] != key:
            self._crop_cache = (key, smoothed_crops(ct, tibia, self.bundle.grid.spacing, fracture))
        return self._crop_cache[1]

    def _use_crops(self, ahead: HeadStart | None) -> None:
        """Take the crops made beforehand (``ahead``, made for the inputs at hand), when made for the bundle's
        spacing."""
        crops = None if ahead is None else ahead.crops
        if crops is not None and np.allclose(crops.spacing, self.bundle.grid.spacing):
            self._crop_cache = (tuple(id(v) for v in ahead.inputs), crops)

    def _run_model(self, ct: Volume, tibia: Volume, fracture: Volume, side: str, open_end: str | None = None
                   ) -> ModelRun:
        """The model for one leg side. Where the CT cuts the tibia off (a knee or an ankle CT), or a fragment is
        missing from the tibia mask at ``open_end`` (:func:`checks.tibia_extent`), the intact end goes where a typical
        tibia's lies on the canonical grid and the canonical voxels beyond the CT (the mask's open end) are not
        visible."""
        length = self.bundle.tibia_length_mm()
        alignment = align_tibia(tibia, side, length, limit_turn=True, open_end=open_end)
        p = alignment.matrix
        case = resample_crops(self._crops(ct, tibia, fracture), self.bundle.grid, p, self.bundle.window_hu,
                              alignment.field)
        x = torch.from_numpy(case.tensor[None])
        visible = torch.from_numpy(case.visible[None, None].astype(np.float32))
        tibia_z = None if alignment.cut else case.tibia_z  # a CT that cuts the tibia off does not show its length
        theta, aligned, recon = self.bundle.align_and_reconstruct(x, visible, tibia_z)
        report, placement = {}, None
        if self.reduce_fragments:
            whole = int(round(length / self.bundle.grid.spacing[2])) if alignment.cut else None
            theta, recon, x, visible, report, placement = reduce_and_reconstruct(self.bundle, x, visible, theta, recon,
                                                                                 whole_slices=whole, tibia_z=tibia_z)
            aligned = self.bundle.sampler(x.to(self.device), theta)
        end = None if tibia_z is None else hidden_end(case.tensor[-1], tibia_z, self.bundle.grid)
        if end is not None:
            report = {**report, "hidden_end": {**report.get("hidden_end", {}), "end": end}}
        return ModelRun(p, theta_to_matrix(theta[0]), recon[0].float().cpu().numpy(), self._misfit(aligned, recon),
                        x, visible, report, placement, alignment.turned_deg)

    def _uncertainty(self, run: ModelRun) -> np.ndarray | None:
        """Posterior standard deviation of the reconstruction's occupancy (Z, Y, X) in standard coordinates,
        or None when the bundle's autoencoder has no posterior (only PCA has one)."""
        std = self.bundle.reconstruction_std(run.x, run.visible, matrix_to_theta(run.theta)[None])
        return None if std is None else std[0, -1].float().cpu().numpy()

    def _misfit(self, aligned: torch.Tensor, recon: torch.Tensor) -> float:
        """How badly the aligned input matches the model (prototype, else its own reconstruction) where
        the input has bone: the lower, the more plausible the leg side."""
        ref = self.bundle.prototype if self.bundle.prototype is not None else recon
        seen = (aligned[:, -1:] > 0.5).float()
        return float(torch.sum((aligned - ref.to(aligned)) ** 2 * seen) / torch.clamp(seen.sum(), min=1.0))

    def predict(self, ct: Volume, tibia_mask: Volume, fracture_mask: Volume, side: str = "auto",
                progress: Progress | None = None, ahead: HeadStart | None = None,
                other_tibia: Volume | str | None = "auto",
                volumes_ready: Callable[[Volume, Volume, Volume | None], None] | None = None) -> Prediction:
        """Predict the healthy tibia. ``side``: 'left', 'right' or 'auto' (from the fibula's position, see
        :func:`checks.fibula_side`; without a clear fibula, the side whose mirror image the model aligns better).
        ``ahead``: work begun for these three inputs before torch loaded (:mod:`head_start`: the command and the
        Slicer worker do), used only for these very inputs: the crops when made for the bundle's spacing, the other
        leg's fit when started for this ``other_tibia``. ``other_tibia``: the healthy other
        leg's tibia mask on the CT grid, 'auto' (the default) to look for the other leg in the CT and segment it, or
        None not to use it: mirrored and fitted to the proximal main fragment, it becomes the template
        (:mod:`template`; with the visible bone kept; no uncertainty map then, the model's posterior does not describe
        it). When it cannot be used (the CT shows no other leg, or its tibia does not fit this patient's, see
        :func:`template.mismatch`), the prediction is the model's; a warning says why unless 'auto' found no other
        leg; the report's ``fusion["other_leg"]`` says what was used. ``volumes_ready``: called with the labelmap,
        the intensity and the uncertainty (None without one) as soon as they are final, while the surface is still
        being built (the command starts writing them then). Inputs are not modified."""
        report = progress or (lambda f, m: None)
        t = {}
        t0 = time.perf_counter()
        report(0.0, "Checking inputs")
        if isinstance(other_tibia, str) and other_tibia != "auto":
            raise InputError(f"Unknown other_tibia {other_tibia!r}; give the other tibia's mask or 'auto'.")
        if isinstance(other_tibia, Volume):
            check_same_grid(ct, other_tibia, "CT", "other tibia mask")
        ahead = ahead if ahead is not None and ahead.made_for(ct, tibia_mask, fracture_mask) else None
        checked = (ahead and ahead.checked_for(side)) or check_inputs(ct, tibia_mask, fracture_mask, side)
        box, tibia_voxels, hidden_voxels = checked.box, checked.tibia_voxels, checked.hidden_voxels
        warnings = list(checked.warnings)
        t["check"] = time.perf_counter() - t0
        floor_hu = round(self.bundle.window_hu[0])
        with ThreadPoolExecutor(2) as pool:  # beside the model: the other leg looked for and fitted, the outputs made
            fitting = None
            if other_tibia is not None and self.keep_visible_bone and self.reduce_fragments:
                fitting = (ahead and ahead.other_leg_for(other_tibia)) or pool.submit(
                    fit_other_leg, ct, tibia_mask, fracture_mask, other_tibia)
            blank = (ahead and ahead.take_outputs(floor_hu)) or pool.submit(blank_outputs, ct.grid, floor_hu)
            t0 = time.perf_counter()
            report(0.1, "Aligning and reconstructing" + (" and looking for the other leg" if fitting else ""))
            sides = (checked.side,) if checked.side else ("left", "right")
            length = self.bundle.tibia_length_mm()  # a short mask the CT does not cut off misses a fragment
            short = checked.length_mm is not None and checked.length_mm < SHORT_SHARE * length
            open_end = checked.fracture_end if short else None
            if short:
                warnings.append(open_end_warning(checked.length_mm, open_end))
            try:
                self._use_crops(ahead)
                candidates = {s: self._run_model(ct, tibia_mask, fracture_mask, s, open_end) for s in sides}
            finally:
                self._crop_cache = None  # never reuse crops across calls (ids can be recycled)
            chosen = min(candidates, key=lambda s: candidates[s].misfit)
            run = candidates[chosen]
            if "hidden_end" in run.reduction:
                end = run.reduction["hidden_end"]["end"]
                warnings.append(f"The fracture mask hides the tibia's {end} end, so the model cannot see how long the "
                                "tibia is; " + ("the prediction was made to reach the tibia mask's proximal end. "
                                                if end == "proximal" else "its length is the model's guess. ")
                                + "Paint the fracture mask over the fracture zone only, leaving the intact ends "
                                  "visible.")
            p, theta, recon = run.p, run.theta, run.recon
            t["model"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            fitted = None if fitting is None else fitting.result()
            t["other_leg"] = time.perf_counter() - t0  # what the other leg took beyond the model

        other, why_not, quiet = None, None, False
        if fitted is not None and run.placement is not None:
            other, why_not, quiet = self._other_leg(fitted, other_tibia, chosen, warnings)
        elif isinstance(other_tibia, Volume):
            why_not = ("it serves as the template of the visible fragments, which needs the fragment reduction and the "
                       "visible bone kept")

        report(0.6, "Mapping the prediction into the CT grid")
        t0 = time.perf_counter()
        turn = f", turn {run.turned_deg:+.1f} deg about it" if run.turned_deg else ""
        chain = TransformChain().then(f"mirror, align long axis{turn}, centre", p, "canonical") \
            .then("inverse theta (LocNet)", invert_affine(theta), "standard")
        fuse = None
        # the other tibia's mask cropped to it, once: a CT-sized array is slow to scan
        bone = None if other is None else crop_to_mask(other.other_tibia, other.other_tibia, float(ct.spacing.max()))
        if self.keep_visible_bone and run.placement is not None:
            fuse = lambda occ, grid: fuse_visible_bone(  # noqa: E731
                occ, grid, ct, tibia_mask, fracture_mask, box, run.placement, self.bundle.grid, p,
                self.reassemble_fragments, None if bone is None else template_occupancy(bone, other.transform, grid))
        with ThreadPoolExecutor(1) as pool:  # the model's posterior (torch) while the visible bone is fused
            posterior = None if other is not None else pool.submit(self._uncertainty, run)  # none for a template
            work = self._to_work_grid(recon, chain.matrix(), ct, fuse,
                                      None if bone is None else template_box(bone, other.transform, ct.grid))
            if other is not None and "template" not in work.fused.report:  # refused: the model's shape, its posterior
                why_not = work.fused.report["template_refused"]
                other, posterior = None, pool.submit(self._uncertainty, run)
            std = None if posterior is None else posterior.result()
        if why_not is not None and not quiet:
            warnings.append(f"The other leg was not used: {why_not.rstrip('.')}.")
        # the surface (VTK, which releases the GIL) is built while the work grid is interpolated onto the CT
        with ThreadPoolExecutor(1) as pool:
            building = pool.submit(self._surface_of, work, recon, chain.matrix(), std)
            work = replace(work, spread=self._spread(std, work, chain.matrix()))
            labelmap, intensity = self._work_to_ct(work, *blank.result())
            t["resample"] = time.perf_counter() - t0
            if volumes_ready is not None:
                volumes_ready(labelmap, intensity, work.spread)
            report(0.8, "Building the surface")
            t0 = time.perf_counter()
            surface = building.result()
        t["surface"] = time.perf_counter() - t0  # what the surface took beyond the resampling
        fused, occupancy_std = work.fused, work.spread
        report(1.0, "Done")
        voxel_ml = float(np.prod(ct.spacing)) / 1000.0
        volumes = {"predicted_tibia": float(np.count_nonzero(labelmap.array)) * voxel_ml,
                   "input_tibia": tibia_voxels * voxel_ml, "fracture_mask_in_tibia": hidden_voxels * voxel_ml}
        if side == "auto" and len(candidates) == 2:
            fits = sorted(c.misfit for c in candidates.values())
            if fits[1] < 1.2 * fits[0]:
                warnings.append("The leg side was chosen automatically with low margin; pass side='left' or "
                                "'right' if known.")
        fusion = {} if fused is None else dict(fused.report)
        if other_tibia is not None and (why_not is not None or other is not None):
            fusion["other_leg"] = {"requested": "auto" if isinstance(other_tibia, str) else "mask",
                                   "used": other is not None, "why_not": why_not}
            if other is not None:
                fusion["other_leg"].update(fit=other.fit, transform_other_to_target_lps=other.transform.tolist(),
                                           warnings=other.warnings)
        return Prediction(labelmap, intensity, surface, chosen, chain, theta, t, volumes, warnings,
                          self.bundle_path, str(self.device), occupancy_std, run.reduction, fusion)

    @staticmethod
    def _other_leg(other, other_tibia: Volume | str, side: str, warnings: list) -> tuple:
        """The fitted other leg (:func:`head_start.fit_other_leg`'s result) and None when it can be the template; or
        None and why it cannot be used; and whether that goes without a warning ('auto' found no other leg in the
        CT)."""
        if isinstance(other, InputError):
            return None, str(other), isinstance(other, NoOtherLegError) and isinstance(other_tibia, str)
        if other.fit["rms_mm"] > MAX_FIT_RMS_MM:
            return None, (f"its mirrored tibia fits the intact proximal fragment with a {other.fit['rms_mm']:.1f} mm "
                          f"RMS residual (at most {MAX_FIT_RMS_MM:g} mm for a template): the legs differ"), False
        if other.side != side:
            return None, (f"it lies on the {other.side} side of the fractured tibia by position, but the prediction "
                          f"is for a {side} leg"), False
        warnings.extend(f"Other leg: {w}" for w in other.warnings)
        return other, None, False

    def _surface_of(self, work: WorkGrid, recon: np.ndarray, patient_to_standard: np.ndarray,
                    std: np.ndarray | None) -> vtkPolyData:
        """The predicted surface (LPS mm): of the fused occupancy on the work grid, else of the model's
        reconstruction (C, Z, Y, X; standard coordinates); with a PCA bundle's ``std``, each point's uncertainty (mm;
        0 on the patient's bone where it lies: seen, not predicted)."""
        fused = work.fused
        if fused is None:  # the model's occupancy, its surface moved from its frame into the patient's
            occupancy, to_patient = Volume.on_grid(recon[-1], self.bundle.grid), invert_affine(patient_to_standard)
        else:
            occupancy, to_patient = Volume.on_grid(fused.occupancy, fused.grid), None
        surface = level_surface(occupancy, 0.5, smoothing_iterations=10, target_reduction=0.3, transform=to_patient)
        if std is not None:
            points = polydata_points(surface)
            uncertainty = self._surface_uncertainty_mm(recon[-1], std, apply_affine(patient_to_standard, points))
            if fused is not None:
                ijk = np.rint(fused.grid.physical_to_index(points)).astype(int)
                ijk = np.clip(ijk, 0, np.asarray(fused.grid.size) - 1)
                uncertainty[fused.fixed[tuple(ijk[:, ::-1].T)]] = 0.0
            add_point_array(surface, UNCERTAINTY_ARRAY, uncertainty)
        return surface

    def _to_work_grid(self, recon: np.ndarray, patient_to_standard: np.ndarray, ct: Volume,
                      fuse: Callable[[np.ndarray, Grid], Fused] | None = None,
                      cover: tuple[np.ndarray, np.ndarray] | None = None) -> WorkGrid:
        """Resample the reconstruction (C, Z, Y, X) in standard coordinates onto the work grid (:class:`WorkGrid`,
        without its spread), over the CT box that the predicted tibia can reach. ``fuse`` (occupancy, its grid: the
        work grid) puts the patient's visible bone into the occupancy; the box also covers ``cover`` (a CT index box,
        (i, j, k) lo, hi)."""
        grid: Grid = self.bundle.grid
        occ = recon[-1]
        inside = np.argwhere(occ > 0.25)
        lo, hi = self._reach(inside, patient_to_standard, ct) if len(inside) else (np.zeros(3, int),
                                                                                    np.array(ct.grid.size) - 1)
        if cover is not None:
            lo = np.maximum(np.minimum(lo, cover[0] - 2), 0)
            hi = np.minimum(np.maximum(hi, cover[1] + 2), np.array(ct.grid.size) - 1)
        factors = np.maximum(1, np.floor(grid.spacing.min() / WORK_FRACTION / ct.spacing)).astype(int)  # (i, j, k)
        work = Grid(tuple((hi - lo) // factors + 2), ct.spacing * factors, ct.index_to_physical(lo.astype(float)),
                    ct.direction)

        def onto_work(values: np.ndarray) -> np.ndarray:
            return resample(Volume.on_grid(values.astype(np.float32), grid), work, patient_to_standard).array

        if len(inside) == 0:
            return WorkGrid(work, lo, hi, factors, None, None, None, None)
        occ_work, int_work = onto_work(occ), onto_work(recon[0])  # intensity channel: window-mapped HU x occupancy
        fused = None
        if fuse is not None:
            fused = fuse(occ_work, work)
            occ_work = fused.occupancy
            lo_hu, hi_hu = self.bundle.window_hu
            int_work = np.where(fused.owned, np.clip((fused.hu - lo_hu) / (hi_hu - lo_hu), 0, 1) * occ_work, int_work)
        return WorkGrid(work, lo, hi, factors, occ_work, int_work, None, fused)

    def _spread(self, std: np.ndarray | None, work: WorkGrid, patient_to_standard: np.ndarray) -> Volume | None:
        """The occupancy's std (Z, Y, X; standard coordinates), which is as smooth as the model, interpolated linearly
        onto the work grid; 0 where the patient's bone is kept where it lies, everywhere when nothing was predicted.
        None without ``std``."""
        if std is None:
            return None
        if work.occupancy is None:
            return Volume.on_grid(np.zeros(work.grid.shape, np.float32), work.grid)
        spread = resample(Volume.on_grid(std.astype(np.float32), self.bundle.grid), work.grid, patient_to_standard)
        if work.fused is not None:
            spread.array[work.fused.fixed] = 0.0
        return spread

    def _work_to_ct(self, work: WorkGrid, labelmap: Volume, intensity: Volume) -> tuple[Volume, Volume]:
        """The labelmap and intensity (HU) on the CT grid (:func:`head_start.blank_outputs` for the bundle's window
        floor, filled in place and returned): the work grid's occupancy and intensity interpolated linearly onto the
        CT voxels of its box."""
        lo_hu, hi_hu = self.bundle.window_hu
        if work.occupancy is None:
            return labelmap, intensity
        lo, hi = work.lo, work.hi
        shape = tuple((hi - lo + 1)[::-1])
        factors = work.factors[::-1]
        box = tuple(slice(lo[a], hi[a] + 1) for a in (2, 1, 0))
        box_label, box_hu = labelmap.array[box], intensity.array[box]
        slab = -(-CT_SLAB // factors[0]) * factors[0]  # whole work slices per slab
        for k in range(0, shape[0], slab):  # slabs of CT slices: torch uses all threads, temporaries stay small
            n = min(slab, shape[0] - k)
            rows = slice(k // factors[0], (k + n - 1) // factors[0] + 2)  # the work slices the slab lies between
            o, w = (torch.from_numpy(upsample_linear(v[rows], factors, (n, *shape[1:])))
                    for v in (work.occupancy, work.intensity))
            label = o >= 0.5
            # HU = window floor + (intensity / occupancy) x window width inside the tibia
            hu = torch.round((w / o.clamp_min(1e-6)).clamp_(0, 1).mul_(hi_hu - lo_hu).add_(lo_hu))
            box_label[k:k + n] = label.numpy()
            box_hu[k:k + n] = torch.where(label, hu, lo_hu).to(torch.int16).numpy()
        return labelmap, intensity

    def _reach(self, inside: np.ndarray, patient_to_standard: np.ndarray, ct: Volume) -> tuple[np.ndarray, np.ndarray]:
        """The CT index box (lo, hi inclusive, (i, j, k)) holding the canonical voxels ``inside`` ((k, j, i), standard
        coordinates) plus two model voxels, clipped to the CT."""
        grid: Grid = self.bundle.grid
        box_std = np.array([inside.min(0), inside.max(0)])[:, ::-1].astype(float)  # (i, j, k) corners
        corners = np.array([[box_std[a, 0], box_std[b, 1], box_std[c, 2]] for a in (0, 1) for b in (0, 1)
                            for c in (0, 1)])
        ijk = ct.physical_to_index(apply_affine(invert_affine(patient_to_standard), grid.index_to_physical(corners)))
        margin = np.ceil(2.0 * grid.spacing.max() / ct.spacing) + 1
        lo = np.clip(np.floor(ijk.min(0) - margin), 0, np.array(ct.grid.size) - 1).astype(int)
        hi = np.clip(np.ceil(ijk.max(0) + margin), 0, np.array(ct.grid.size) - 1).astype(int)
        return lo, hi

    def _surface_uncertainty_mm(self, occ: np.ndarray, std: np.ndarray, points_std: np.ndarray) -> np.ndarray:
        """Standard deviation (mm) of the surface position at ``points_std`` (standard coordinates, mm): the
        occupancy's std divided by the occupancy's gradient magnitude (first order: how far the 0.5 level moves
        when the occupancy changes by one std), kept below MAX_UNCERTAINTY_MM by a floor on the gradient."""
        grid: Grid = self.bundle.grid
        slope = np.sqrt(sum(g ** 2 for g in np.gradient(occ, *grid.spacing[::-1])))
        field = std / np.maximum(slope, std / MAX_UNCERTAINTY_MM + 1e-6)
        ijk = grid.physical_to_index(points_std)
        return ndimage.map_coordinates(field, ijk[:, ::-1].T, order=1, mode="nearest")
