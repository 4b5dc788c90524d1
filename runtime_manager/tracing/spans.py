"""Spans as this node records them: small objects, cheap to make, sent on by
the exporter when sampled.

A span's ids follow W3C trace context: a 16-byte trace id shared by every span
of one request, wherever it runs, and an 8-byte id of its own. A request that
comes with a valid `traceparent` joins that trace (and its sampling decision);
one without starts a trace, sampled with `sampling_ratio` (the decision is
read from the trace id, so every node of a trace decides alike). In a trace
that is not sampled only the request's span is made: it has ids, so the
context (marked "not sampled") goes on to peers and components, and stands
for its children; nothing is exported.
"""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Any

from ..config import TracingConfig
from ..core.lifecycle import Service
from ..core.tracecontext import parse_traceparent
from .otlp import OtlpExporter

log = logging.getLogger("tracing")

# OTLP's SpanKind and status codes
INTERNAL, SERVER, CLIENT, PRODUCER, CONSUMER = 1, 2, 3, 4, 5
STATUS_OK, STATUS_ERROR = 1, 2
_ids = random.Random(os.urandom(16))


def _span_id() -> bytes:
    return (_ids.getrandbits(64) | 1).to_bytes(8, "big")  # never all zero


class Span:
    """One timed operation. `end` it once; `child` makes the spans inside it."""

    __slots__ = ("_tracer", "attributes", "end_ns", "kind", "message", "name", "parent_id", "sampled", "span_id",
                 "start_ns", "status", "trace_id")

    def __init__(self, tracer: Tracer, trace_id: bytes, parent_id: bytes | None, sampled: bool, name: str, kind: int,
                 attributes: dict[str, Any] | None, start_ns: int | None) -> None:
        self._tracer = tracer
        self.trace_id, self.span_id, self.parent_id, self.sampled = trace_id, _span_id(), parent_id, sampled
        self.name, self.kind, self.attributes = name, kind, attributes
        self.start_ns = time.time_ns() if start_ns is None else start_ns
        self.end_ns = 0
        self.status, self.message = 0, ""

    @property
    def traceparent(self) -> str:
        """This span as the parent of what it calls (W3C `traceparent`)."""
        return f"00-{self.trace_id.hex()}-{self.span_id.hex()}-{'01' if self.sampled else '00'}"

    @property
    def trace_hex(self) -> str:
        return self.trace_id.hex()

    def child(self, name: str, kind: int = INTERNAL, attributes: dict[str, Any] | None = None,
              start_ns: int | None = None) -> Span:
        """A span inside this one. In a trace that is not sampled nothing is
        recorded, so the span itself stands for its children: what they call
        gets its context (the trace id, a parent id, "not sampled"), at no cost."""
        if not self.sampled:
            return self
        return Span(self._tracer, self.trace_id, self.span_id, self.sampled, name, kind, attributes, start_ns)

    def set(self, key: str, value: Any) -> None:
        """One more attribute (a copy: attributes may be shared by the spans of one step)."""
        self.attributes = {**(self.attributes or {}), key: value}

    def end(self, error: str | None = None, end_ns: int | None = None) -> None:
        """Its end (with the error that ended it, if one did); sampled spans go to the exporter."""
        if self.end_ns or not self.sampled:
            return
        self.end_ns = time.time_ns() if end_ns is None else end_ns
        if error is not None:
            self.status, self.message = STATUS_ERROR, error[:500]
        self._tracer.exporter.add(self)


class Tracer(Service):
    """A service of the node (core/lifecycle.py): `start` starts the exporter's
    thread, `stop` (after the engine's) sends what is left, bounded."""

    name = "tracing"

    def __init__(self, cfg: TracingConfig, node_id: str, version: str) -> None:
        self.cfg = cfg
        self.threshold = int(cfg.sampling_ratio * (1 << 64))  # sampled when the trace id's low 64 bits are under it
        resource = {"service.name": cfg.service_name, "service.instance.id": node_id, "service.version": version,
                    "host.name": os.uname().nodename, "process.pid": os.getpid()}
        self.exporter = OtlpExporter(cfg.otlp_endpoint, resource, cfg.export_interval_ms / 1000, cfg.max_queue,
                                     headers=cfg.headers)

    async def start(self) -> None:
        self.exporter.start()

    async def stop(self) -> None:
        import asyncio

        await asyncio.get_running_loop().run_in_executor(None, self.exporter.close, 3.0)

    def kill(self) -> None:
        self.exporter.close(0.0)

    def start_trace(self, traceparent: str | None, name: str, kind: int, attributes: dict[str, Any] | None = None,
                    start_ns: int | None = None) -> Span:
        """A span that goes on with `traceparent` (when it is valid), else the root of a new trace."""
        parent = parse_traceparent(traceparent) if traceparent else None
        if parent is not None:
            trace_id, parent_id, sampled = parent
        else:
            trace_id, parent_id = (_ids.getrandbits(128) | 1).to_bytes(16, "big"), None
            sampled = int.from_bytes(trace_id[8:], "big") < self.threshold
        return Span(self, trace_id, parent_id, sampled, name, kind, attributes, start_ns)

    def status(self) -> dict[str, Any]:
        """For `/status`: where spans go and how that goes."""
        return {"otlp_endpoint": self.cfg.otlp_endpoint, "sampling_ratio": self.cfg.sampling_ratio,
                **self.exporter.counts()}
