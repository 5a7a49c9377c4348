"""A progress line for long listings: count and rate on a terminal, nothing anywhere else.

``counted(items, label)`` passes ``items`` through unchanged. When the stream (stderr by default)
is a terminal it redraws one line, ``s3datafs: listing: 123,456 objects (41,000/s)``, at most every
``_REDRAW`` seconds (the clock is read once per ``_CHECK_EVERY`` items, so the cost per item is a
counter increment), and clears it when the iteration ends, however it ends. Logs, pipes and files
get nothing: a background job's log is not a terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")
_REDRAW = 0.25  # seconds
_CHECK_EVERY = 1000  # items between clock reads


def counted(items: Iterable[T], label: str, stream: TextIO | None = None) -> Iterator[T]:
    """``items`` unchanged, with a progress line on ``stream`` if it is a terminal."""
    out = stream if stream is not None else sys.stderr
    if not _is_terminal(out):
        yield from items
        return
    started = last = time.monotonic()
    count = 0
    try:
        for item in items:
            count += 1
            if count % _CHECK_EVERY == 0:
                now = time.monotonic()
                if now - last >= _REDRAW:
                    last = now
                    _draw(out, label, count, now - started)
            yield item
    finally:
        out.write("\r\033[K")
        out.flush()


def _draw(out: TextIO, label: str, count: int, elapsed: float) -> None:
    rate = count / elapsed if elapsed > 0 else 0.0
    out.write(f"\r\033[Ks3datafs: {label}: {count:,} objects ({rate:,.0f}/s)")
    out.flush()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False
