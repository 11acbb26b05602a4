"""Errors the product raises for bad input. Each message says what is wrong and what to do."""


class TibiaReconError(Exception):
    """Base class of every error the library raises on purpose."""


class InputError(TibiaReconError, ValueError):
    """An input (file, volume, mask, argument) cannot be used as given."""


class NoOtherLegError(InputError):
    """The CT shows no other leg to take the contralateral tibia from."""


class GeometryMismatchError(InputError):
    """Two volumes that must share one voxel grid do not."""


class BundleError(TibiaReconError):
    """A model bundle is missing, incomplete, corrupt or of an unsupported version."""


class OutputExistsError(TibiaReconError, FileExistsError):
    """An output path already exists and overwriting was not requested."""


class OutputError(TibiaReconError, OSError):
    """An output cannot be written (folder missing or not writable, disk full); nothing was left half-written."""
