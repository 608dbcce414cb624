"""User-facing errors: one line that says what is wrong and what to do.

The CLI and the Space catch `HcSmoeError` and show its message without a traceback; every other exception
is a bug and keeps its traceback.
"""


class HcSmoeError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class UnsupportedModelError(HcSmoeError):
    """The source is dense, or an MoE family without an architecture spec."""


class SourceError(HcSmoeError):
    """The source checkpoint is missing, unreachable, gated, pickle-only or corrupt."""


class CalibrationError(HcSmoeError):
    """The calibration text cannot be read or is too short."""


class HubAccessError(HcSmoeError):
    """No token, no write access, or a non-empty target repository."""


class OutputError(HcSmoeError):
    """The output directory exists already, or the disk is full."""
