"""Progress bars for long steps (training, calibration), shared by every layer.

Bars go to stderr so they never mix with results on stdout, and switch themselves off when
stderr is not a terminal (logs, CI, pipes) or when the environment sets LOWBIT_NO_PROGRESS=1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm


def progress_enabled() -> bool:
    """True when bars should be drawn: stderr is a terminal and LOWBIT_NO_PROGRESS is not set."""
    if os.environ.get("LOWBIT_NO_PROGRESS", "").strip() not in ("", "0"):
        return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None,
             desc: str | None = None, unit: str = "it", leave: bool = False,
             disable: bool | None = None) -> tqdm:
    """A tqdm bar on stderr: iterate over it, or call `.update(n)` inside `with progress(...)`.

    `disable=None` decides automatically (see `progress_enabled`); True/False force it."""
    if disable is None:
        disable = not progress_enabled()
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=disable,
                file=sys.stderr, dynamic_ncols=True)
