"""Progress on long work: a tqdm bar on a terminal, a few plain lines in a log.

A job's output is either a terminal (a person watching) or a log file (``ray job submit``, a
batch system, ``> run.log``). A bar's carriage returns make a log unreadable, so where the
stream is not a terminal the same work is reported as one line per ``LINE_EVERY`` of it.

When the driver is quiet (``clman.launch.session.divert_stderr``: Ray's output goes to a file),
fd 2 is that file: :func:`terminal` (the saved terminal in :data:`TERMINAL`) is where progress is drawn instead.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TextIO, TypeVar

log = logging.getLogger("clman.progress")

LINE_EVERY = 0.10  # not a terminal: a line per 10% of the work (and one at the end)
T = TypeVar("T")


@dataclass
class Terminal:
    """This process's terminal, saved while a quiet driver sends fd 2 to a file (None otherwise).

    Set and cleared by ``clman.launch.session.divert_stderr`` / ``restore_stderr`` only; read by
    :func:`terminal` and by ``clman.launch.trainer.fit`` (a progress bar per run while it is set).
    """

    saved: TextIO | None = None


TERMINAL = Terminal()


def terminal():
    """The stream a person watches: the saved terminal of a quiet driver, else ``sys.stderr``."""
    return TERMINAL.saved if TERMINAL.saved is not None else sys.stderr


def is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return False


def track(items: Iterable[T], total: int, desc: str, unit: str = "it") -> Iterator[T]:
    """Yield ``items``; a bar on a terminal, else "desc: 30/100 video(s) (30%), 12 s" every 10%."""
    stream = terminal()
    if is_tty(stream):
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit, file=stream, leave=False, dynamic_ncols=True)
        return
    t0, next_line, done = time.monotonic(), LINE_EVERY, 0
    for item in items:
        yield item
        done += 1
        if total and (done / total >= next_line or done == total):
            log.info(
                "%s: %d/%d %s(s) (%.0f%%), %.0f s", desc, done, total, unit, 100 * done / total, time.monotonic() - t0
            )
            while next_line <= done / total:
                next_line += LINE_EVERY
