"""Child processes that must not outlive the process that started them."""

from __future__ import annotations

import signal


def terminate_with_parent() -> None:
    """In a child between fork and exec (``preexec_fn``): SIGTERM it when the process that
    started it dies, even by kill -9, so that `redrive up` leaves no server or service
    running on its data directory behind it (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
