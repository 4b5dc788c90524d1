"""SIGHUP from the first moment: a reload asked for while a node starts.

By default SIGHUP ends a process. A node takes it from its first lines on
(`take_early`, before anything heavy is imported): one that comes before the
node runs is remembered, and the node reloads once it has started
(`process.serve` asks `pending`). From then on the event loop handles it.
"""

from __future__ import annotations

import signal
from typing import Any

_pending = False


def _remember(_sig: int, _frame: Any) -> None:
    global _pending
    _pending = True


def take_early() -> None:
    """Remember a SIGHUP instead of dying of it (call as early as possible)."""
    signal.signal(signal.SIGHUP, _remember)


def pending() -> bool:
    """Whether a SIGHUP came before the node ran (and forget it)."""
    global _pending
    was, _pending = _pending, False
    return was
