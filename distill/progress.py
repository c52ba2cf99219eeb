"""Progress bars on a terminal; plain lines, now and then, anywhere else (a log file, a pipe).

A bar redrawn with carriage returns fills a log with thousands of copies of itself, so when
standard error is not a terminal the bar prints a plain line at most every ``LOG_EVERY``
seconds instead. ``DISTILL_PROGRESS=bar`` or ``=off`` forces either way.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm

__all__ = ["LOG_EVERY", "progress"]

#: Seconds between two progress lines when the output is not a terminal.
LOG_EVERY = 60.0


def progress(iterable: Any = None, *, show: bool = True, **options: Any) -> tqdm:
    """A ``tqdm`` bar (same arguments), drawn on a terminal and logged as lines elsewhere."""
    mode = os.environ.get("DISTILL_PROGRESS", "")
    if not show or mode == "off":
        return tqdm(iterable, disable=True, **options)
    if mode == "bar" or sys.stderr.isatty():
        return tqdm(iterable, **options)
    # Not a terminal: each refresh writes a new line ending in "\n", and rarely.
    return tqdm(iterable, mininterval=LOG_EVERY, maxinterval=LOG_EVERY * 10, ncols=100, ascii=True,
                bar_format="{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:3.0f}%), {elapsed} elapsed{postfix}\n",
                **options)
