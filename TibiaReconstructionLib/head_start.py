"""What a prediction can begin before torch has loaded (the first 1.5-2 s of a command or of the Slicer worker), with
no torch imported here: the inputs cropped and smoothed for the model (:func:`prepare.smoothed_crops`) and, in a
thread, the other leg looked for and fitted to the proximal main fragment (:mod:`contralateral`, about 1-1.5 s on a
CT of both legs). The Predictor takes a :class:`HeadStart` and uses what it holds for the same inputs; it redoes and
checks everything else itself."""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .geometry import Volume
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


@dataclass(eq=False)
class HeadStart:
    """Work begun for a prediction on ``inputs`` (CT, tibia mask, fracture mask): their crops (None when they could
    not be made: the Predictor then makes them and says what is wrong) and, for ``other_tibia`` (as the Predictor
    takes it), the other leg's fit running in a thread (:func:`fit_other_leg`; None when not asked for)."""

    inputs: tuple[Volume, Volume, Volume]
    crops: SmoothedCrops | None
    other_tibia: Volume | str | None = None
    other_leg: Future | None = None

    def made_for(self, ct: Volume, tibia: Volume, fracture: Volume) -> bool:
        """Whether it was made for these very volumes."""
        return all(a is b for a, b in zip(self.inputs, (ct, tibia, fracture)))

    def other_leg_for(self, other_tibia: Volume | str | None) -> Future | None:
        """The other leg's fit when it was started for this ``other_tibia`` request, else None."""
        same = self.other_tibia is other_tibia or (isinstance(other_tibia, str) and self.other_tibia == other_tibia)
        return self.other_leg if same else None


def head_start(ct: Volume, tibia: Volume, fracture: Volume, bundle=None, other_tibia: Volume | str | None = None
               ) -> HeadStart:
    """Start the other leg's fit in a thread (unless ``other_tibia`` is None), then crop the inputs (:func:`crops_ahead`)
    while it runs."""
    other_leg = None
    if other_tibia is not None:
        pool = ThreadPoolExecutor(1, thread_name_prefix="other-leg")
        other_leg = pool.submit(fit_other_leg, ct, tibia, fracture, other_tibia)
        pool.shutdown(wait=False)
    return HeadStart((ct, tibia, fracture), crops_ahead(ct, tibia, fracture, bundle), other_tibia, other_leg)


def crops_ahead(ct: Volume, tibia: Volume, fracture: Volume, bundle=None) -> SmoothedCrops | None:
    """The Predictor's first step (:func:`prepare.smoothed_crops`) at the spacing that the bundle's config.json
    states; None when that cannot be read or the inputs are refused: then the Predictor makes them itself, after its
    own checks, and says what is wrong."""
    try:
        config = json.loads((Path(bundle or DEFAULT_BUNDLE) / "config.json").read_text(encoding="utf-8"))
        spacing = np.asarray(config["grid"]["spacing"], float)
        if spacing.shape != (3,) or not np.all(spacing > 0):
            return None
        return smoothed_crops(ct, tibia, spacing, fracture)
    except Exception:  # noqa: BLE001 - only a head start: the Predictor redoes this step and reports any problem
        return None
