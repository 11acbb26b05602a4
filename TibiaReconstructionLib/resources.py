"""Where the shipped resources lie (``Resources/`` beside the package): the default model bundle and the sample
fractured case. Imports nothing heavy, so that commands can find them before torch is loaded."""

from pathlib import Path

RESOURCES = Path(__file__).resolve().parent.parent / "Resources"
DEFAULT_BUNDLE = RESOURCES / "Models" / "default"
SAMPLE_CASE = RESOURCES / "SampleCase"
