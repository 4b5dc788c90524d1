"""The last minute of a node, for people: per flow, requests, errors and their
p50/p99 duration; and the last errors, each with its request and reason.

Fed by the engine's `REQUEST_DONE` and `REQUEST_REFUSED` events (on the loop), read by `GET /status`
and the `/ui` page (REST threads): a lock guards both sides. Memory is bounded:
at most `MAX_SAMPLES` results are kept over all flows (in arrays, 19 bytes
each, made at the start: a tuple each took about 120, 6 MB once full), and
`MAX_ERRORS` errors.
"""

from __future__ import annotations

import threading
import time
from array import array
from collections import deque
from typing import Any

from ..config import Config
from ..core.events import REQUEST_DONE, REQUEST_REFUSED, Events
from ..core.request import FlowRequest
from ..core.result import Result

WINDOW_S = 60.0
MAX_SAMPLES = 50_000
MAX_ERRORS = 20


class RecentActivity:
    def __init__(self, events: Events, flows: set[str], clock: Any = time.monotonic) -> None:
        self.flows = flows  # flow ids of the configuration; others count as "(unknown)"
        self.clock = clock
        self._samples = _Samples(MAX_SAMPLES)
        self._errors: deque[dict[str, Any]] = deque(maxlen=MAX_ERRORS)
        self._lock = threading.Lock()
        events.connect(REQUEST_DONE, self._on_request_done)
        events.connect(REQUEST_REFUSED, self._on_request_refused)

    def reconfigure(self, config: Config) -> None:
        self.flows = set(config.flows)

    def _on_request_done(self, req: FlowRequest, result: Result) -> None:
        flow = result.id_flow if result.id_flow in self.flows else "(unknown)"
        ms = result.elapsed_ms or 0.0
        with self._lock:
            self._samples.add(self.clock(), flow, ms, result.ok)
            if not result.ok:
                self._error(result, req.via)

    def _on_request_refused(self, via: str, result: Result) -> None:
        with self._lock:
            self._error(result, via)

    def _error(self, result: Result, via: str) -> None:
        if result.error is not None:
            self._errors.append({"at": time.strftime("%H:%M:%S"), "flow": result.id_flow,
                                 "request_id": result.request_id, "via": via,
                                 "code": result.code, "message": str(result.error.get("message", ""))[:300]})

    def flows_last_minute(self) -> dict[str, dict[str, Any]]:
        """Per flow: requests and errors in the last minute, p50 and p99 in ms."""
        cutoff = self.clock() - WINDOW_S
        with self._lock:
            held = self._samples.copy()
        durations, errors = _by_flow(held, cutoff)
        out = {}
        for flow, values in durations.items():
            values.sort()
            out[flow] = {"requests": len(values), "errors": errors[flow], "p50_ms": _quantile(values, 0.5),
                         "p99_ms": _quantile(values, 0.99)}
        return out

    def last_errors(self) -> list[dict[str, Any]]:
        """The most recent errors, newest first."""
        with self._lock:
            return list(reversed(self._errors))


class _Samples:
    """The last `size` results as a ring of arrays: when, flow (an index into
    the names seen), duration, ok. Appended in time order."""

    def __init__(self, size: int) -> None:
        self.size, self.next, self.count = size, 0, 0
        self.when = array("d", bytes(8 * size))
        self.ms = array("d", bytes(8 * size))
        self.flow = array("H", bytes(2 * size))
        self.ok = array("b", bytes(size))
        self.names: list[str] = []
        self.index: dict[str, int] = {}

    def add(self, when: float, flow: str, ms: float, ok: bool) -> None:
        i = self.index.get(flow)
        if i is None:
            if len(self.names) >= 65535:  # a flow per reload for ever: start the names again
                self.names.clear()
                self.index.clear()
                self.count = 0
            i = self.index[flow] = len(self.names)
            self.names.append(flow)
        at = self.next
        self.when[at], self.flow[at], self.ms[at], self.ok[at] = when, i, ms, ok
        self.next = (at + 1) % self.size
        self.count = min(self.count + 1, self.size)

    def copy(self) -> tuple[array, array, array, array, list[str]]:
        """What is held, in no particular order (a quick copy: taken under the lock)."""
        n = self.count
        return self.when[:n], self.flow[:n], self.ms[:n], self.ok[:n], list(self.names)


def _by_flow(held: tuple[array, array, array, array, list[str]],
             cutoff: float) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Per flow name: the durations and the errors of the samples from `cutoff` on."""
    when, flow, ms, ok, names = held
    durations: dict[int, list[float]] = {}
    errors: dict[int, int] = {}
    for w, f, m, o in zip(when, flow, ms, ok, strict=True):
        if w >= cutoff:
            durations.setdefault(f, []).append(m)
            errors[f] = errors.get(f, 0) + (not o)
    return {names[f]: v for f, v in durations.items()}, {names[f]: v for f, v in errors.items()}


def _quantile(ordered: list[float], q: float) -> float:
    """The value below which a share `q` of `ordered` lies (nearest rank)."""
    index = min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))
    return round(ordered[index], 2)
