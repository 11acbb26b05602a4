"""Synthetic lower-leg CTs with healthy and fractured tibiae, for training and testing (LPS mm).

Anatomy from the LLP26 statistical shape model (musculoskeletal-models, MPL-2.0), converted once to
``TibiaReconstructionLib/data/llp26_tibia_fibula.npz`` by ``convert_llp26.py``.
"""

from .fractures import EXTRA_FRACTURE_TYPES, FRACTURE_TYPES
from .generator import FORMATS, PhantomCase, generate_case, mirror_case, read_case, write_case

__all__ = ["EXTRA_FRACTURE_TYPES", "FORMATS", "FRACTURE_TYPES", "PhantomCase", "generate_case", "mirror_case", "read_case",
           "write_case"]
