"""The one error type every job shares, Ray-free so the CLI can catch it without importing Ray."""

from __future__ import annotations


class JobError(RuntimeError):
    """A job cannot start or finish; the message is one line naming the cause."""
