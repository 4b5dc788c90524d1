"""The last minute of a node, for people: per flow, requests, errors and their
p50/p99 duration; and the last errors, each with its request and reason.

Fed by the engine's `REQUEST_DONE` and `REQUEST_REFUSED` events (on the loop), read by `GET /status`
and the `/ui` page (REST threads): a lock guards both sides. Memory is bounded:
at most `MAX_SAMPLES` results are kept over all flows, and `MAX_ERRORS` errors.
"""

from __future__ import annotations

import threading
import time
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
        self._samples: deque[tuple[float, str, float, bool]] = deque(maxlen=MAX_SAMPLES)  # (when, flow, ms, ok)
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
            self._samples.append((self.clock(), flow, ms, result.ok))
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
            while self._samples and self._samples[0][0] < cutoff:
                self._samples.popleft()
            samples = list(self._samples)
        durations: dict[str, list[float]] = {}
        errors: dict[str, int] = {}
        for _, flow, ms, ok in samples:
            durations.setdefault(flow, []).append(ms)
            errors[flow] = errors.get(flow, 0) + (not ok)
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


def _quantile(ordered: list[float], q: float) -> float:
    """The value below which a share `q` of `ordered` lies (nearest rank)."""
    index = min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))
    return round(ordered[index], 2)
