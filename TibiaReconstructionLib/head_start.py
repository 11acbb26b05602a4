"""What a prediction can begin before torch has loaded (the first 1.5-2 s of a command or of the Slicer worker), with
no torch imported here: the inputs checked and the leg side found (:mod:`checks`), the inputs cropped and smoothed for
the model (:func:`prepare.smoothed_crops`), and in threads the CT-sized outputs allocated and the other leg looked
for and fitted to the proximal main fragment (:mod:`contralateral`, about 1-1.5 s on a CT of both legs). The Predictor
takes a :class:`HeadStart` and uses what it holds for the same inputs; it does everything else itself."""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checks import Checked, check_inputs
from .errors import InputError
from .geometry import Grid, Volume, image_volume
from .prepare import SmoothedCrops, smoothed_crops
from .resources import DEFAULT_BUNDLE


def fit_other_leg(ct: Volume, tibia: Volume, fracture: Volume, other_tibia: Volume | str):
    """The other leg's tibia mirrored and fitted to the proximal main fragment (``other_tibia``: its mask on the CT
    grid, or 'auto' to segment it from the CT), a :class:`contralateral.ContralateralResult`; or the InputError that
    says why it cannot be."""
    from .contralateral import contralateral_target  # only when asked for

    try:
        return contralateral_target(ct, tibia, fracture, None if isinstance(other_tibia, str) else other_tibia,
                                    place=False)
    except InputError as error:
        return error


def blank_outputs(grid: Grid, floor_hu: int) -> tuple[Volume, Volume]:
    """A prediction's labelmap (uint8, 0) and intensity (int16, all ``floor_hu``: the bundle's window floor) on the CT
    ``grid``, to be filled in."""
    return image_volume(grid, np.uint8), image_volume(grid, np.int16, floor_hu)


@dataclass(eq=False)
class HeadStart:
    """Work begun for a prediction on ``inputs`` (CT, tibia mask, fracture mask): the checks (None when they failed:
    the Predictor checks again and says what is wrong), the crops (None when not made), for ``other_tibia`` (as the
    Predictor takes it) the other leg's fit running in a thread (:func:`fit_other_leg`; None when not asked for), and
    the blank outputs being allocated for a bundle whose window floor is ``floor_hu``."""

    inputs: tuple[Volume, Volume, Volume]
    crops: SmoothedCrops | None
    other_tibia: Volume | str | None = None
    other_leg: Future | None = None
    checked: Checked | None = None
    outputs: Future | None = None
    floor_hu: int | None = None

    def made_for(self, ct: Volume, tibia: Volume, fracture: Volume) -> bool:
        """Whether it was made for these very volumes."""
        return all(a is b for a, b in zip(self.inputs, (ct, tibia, fracture)))

    def other_leg_for(self, other_tibia: Volume | str | None) -> Future | None:
        """The other leg's fit when it was started for this ``other_tibia`` request, else None."""
        same = self.other_tibia is other_tibia or (isinstance(other_tibia, str) and self.other_tibia == other_tibia)
        return self.other_leg if same else None

    def checked_for(self, side: str) -> Checked | None:
        """The checks when they were made for this ``side`` request, else None."""
        return self.checked if self.checked is not None and self.checked.asked == side else None

    def take_outputs(self, floor_hu: int) -> Future | None:
        """The blank outputs when allocated for this window floor, else None; given once (a second prediction must
        not write into the first one's result)."""
        outputs, self.outputs = (self.outputs, None) if self.floor_hu == floor_hu else (None, self.outputs)
        return outputs


def head_start(ct: Volume, tibia: Volume, fracture: Volume, bundle=None, other_tibia: Volume | str | None = None,
               side: str = "auto") -> HeadStart:
    """Start the other leg's fit (unless ``other_tibia`` is None) and the outputs' allocation in threads, then check
    the inputs for ``side`` and crop them for the bundle's spacing (:func:`crops_ahead`) while those run."""
    pool = ThreadPoolExecutor(2, thread_name_prefix="head-start")
    other_leg = None if other_tibia is None else pool.submit(fit_other_leg, ct, tibia, fracture, other_tibia)
    config = _bundle_config(bundle)
    floor_hu = None
    try:
        floor_hu = round(float(config["window_hu"][0]))
    except (TypeError, KeyError, IndexError, ValueError):
        pass
    outputs = None if floor_hu is None else pool.submit(blank_outputs, ct.grid, floor_hu)
    pool.shutdown(wait=False)
    try:
        checked = check_inputs(ct, tibia, fracture, side)
    except InputError:
        checked = None  # the Predictor says what is wrong
    return HeadStart((ct, tibia, fracture), crops_ahead(ct, tibia, fracture, bundle, config), other_tibia, other_leg,
                     checked, outputs, floor_hu)


def _bundle_config(bundle) -> dict | None:
    """The bundle's config.json, None when it cannot be read."""
    try:
        return json.loads((Path(bundle or DEFAULT_BUNDLE) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def crops_ahead(ct: Volume, tibia: Volume, fracture: Volume, bundle=None, config: dict | None = None
                ) -> SmoothedCrops | None:
    """The Predictor's first step (:func:`prepare.smoothed_crops`) at the spacing that the bundle's config.json
    (``config`` when already read) states; None when that cannot be read or the inputs are refused: then the
    Predictor makes them itself, after its own checks, and says what is wrong."""
    try:
        config = config or _bundle_config(bundle)
        spacing = np.asarray(config["grid"]["spacing"], float)
        if spacing.shape != (3,) or not np.all(spacing > 0):
            return None
        return smoothed_crops(ct, tibia, spacing, fracture)
    except Exception:  # noqa: BLE001 - only a head start: the Predictor redoes this step and reports any problem
        return None
