"""Error types shared by every layer.

`LowbitError` marks a *user* error: bad input, a spec that does not parse, a file that is not a
model. The command line prints its message as one sentence and exits non-zero without a
traceback. Any other exception is a bug in lowbit and keeps its traceback.
"""

from __future__ import annotations


class LowbitError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""


class SpecError(LowbitError, ValueError):
    """A quantization spec, recipe or preset that is invalid or unknown."""


class CalibrationError(LowbitError, ValueError):
    """Calibration data that cannot produce valid ranges (NaN values, no samples, ...)."""
