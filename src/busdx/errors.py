"""Exceptions raised by busdx.

Every error a user can fix derives from :class:`BusdxError` and from the matching built-in
exception, so ``except ValueError`` still catches a :class:`DataError`. The CLI turns any
``BusdxError`` into a one-line message and exit code 2; anything else is a bug and keeps its
traceback.
"""

__all__ = [
    "BoxError",
    "BusdxError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ExportError",
    "ImageDecodeError",
    "ImageTooLargeError",
    "RunDirError",
    "SingleClassError",
    "UnknownModelError",
    "WeightsError",
    "first_line",
]


class BusdxError(Exception):
    """Base class of every error that the user can fix."""


class ConfigError(BusdxError, ValueError):
    """A config file or override is malformed, unknown or out of range."""


class DataError(BusdxError, ValueError):
    """A dataset folder or split file cannot be used as given."""


class SingleClassError(DataError):
    """A metric or a split needs both classes but only one is present."""


class ImageDecodeError(DataError):
    """A file cannot be decoded as an image."""


class ImageTooLargeError(ImageDecodeError):
    """An image has more pixels than the limit (a decompression bomb, or simply too big)."""


class BoxError(DataError):
    """A lesion box is malformed, has no area, or does not lie inside its image."""


class UnknownModelError(BusdxError, LookupError):
    """A model or weights name is not in the registry."""


class WeightsError(BusdxError, OSError):
    """A weights file is missing or does not match its checksum."""


class CheckpointError(BusdxError, OSError):
    """A run directory or model file is missing, incomplete or not a busdx model."""


class ExportError(BusdxError, RuntimeError):
    """An exported model does not meet its accuracy guard."""


class RunDirError(BusdxError, FileExistsError):
    """An output directory already holds a run."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
