"""The one error type every job shares and the one way an error becomes a line; Ray-free, so the CLI
can catch it without importing Ray."""

from __future__ import annotations

import re

# "ValueError: ...", "ray.exceptions.RayTaskError(JobError): ...": the line a traceback ends with
_EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")


class JobError(RuntimeError):
    """A job cannot start or finish; the message is one line naming the cause."""


def error_line(error: BaseException | str, limit: int | None = None) -> str:
    """One line of an error, at most ``limit`` characters: for a traceback, the last ``SomeError: ...`` line
    (the innermost cause), else its first line.

    A traceback is a ``Traceback (most recent call last)`` header or indented ``File "..."`` frames: Ray's
    task errors (a Tune trial's, a worker's) replace the header with the task's name.
    """
    lines = [line.rstrip() for line in str(error).splitlines() if line.strip()]
    line = lines[0].strip() if lines else (type(error).__name__ if isinstance(error, BaseException) else str(error))
    if any(
        ln.startswith("Traceback (most recent call last)") or ln[:1].isspace() and ln.lstrip().startswith('File "')
        for ln in lines
    ):
        tail = [ln for ln in lines if not ln[0].isspace() and not ln.startswith(("Traceback", "The above"))]
        causes = [ln for ln in tail if _EXCEPTION_LINE.match(ln)]
        if causes or tail:
            line = (causes or tail)[-1].strip()
    return line[:limit]
