"""Spans as this node records them: one small object per request, the spans
inside it kept as tuples, sent on by the exporter as one piece when sampled.

A span's ids follow W3C trace context: a 16-byte trace id shared by every span
of one request, wherever it runs, and an 8-byte id of its own. A request that
comes with a valid `traceparent` joins that trace (and its sampling decision);
one without starts a trace, sampled with `sampling_ratio` (the decision is
read from the trace id, so every node of a trace decides alike). In a trace
that is not sampled only the request's span is made: it has ids, so the
context (marked "not sampled") goes on to peers and components, and stands
for its children; nothing is recorded or exported.
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
from ..http.client import HttpClient
from .otlp import OtlpExporter

log = logging.getLogger("tracing")

# OTLP's SpanKind and status codes
INTERNAL, SERVER, CLIENT, PRODUCER, CONSUMER = 1, 2, 3, 4, 5
STATUS_OK, STATUS_ERROR = 1, 2
_ids = random.Random(os.urandom(16))


def _span_id() -> bytes:
    return (_ids.getrandbits(64) | 1).to_bytes(8, "big")  # never all zero


class RequestSpan:
    """A request's span on this node, and the spans inside it (accept,
    placement, a forward, each step, the result). Those are recorded, not made:
    `child_id` gives a span id (its context goes to what the span calls:
    `context_of`), `record` keeps its label, times, attributes and error, and
    `end` sends them all as one piece. In a trace that is not sampled nothing
    is recorded: `child_id` is the request's own span id, which stands for its
    children (what they call gets the trace id, a parent id and "not
    sampled"), at no cost."""

    __slots__ = ("_exporter", "_prefix", "attributes", "children", "ended", "label", "parent_id", "sampled", "span_id",
                 "start_ns", "trace_id")

    def __init__(self, exporter: OtlpExporter, trace_id: bytes, parent_id: bytes | None, sampled: bool,
                 span_label: bytes = b"", start_ns: int | None = None) -> None:
        self._exporter = exporter
        self.trace_id, self.span_id, self.parent_id, self.sampled = trace_id, _span_id(), parent_id, sampled
        self.label = span_label  # `otlp.label`: name, kind and the attributes that repeat
        self.attributes: dict[str, Any] | None = None  # this request's own (its id, the node that ran it)
        self.start_ns = time.time_ns() if start_ns is None else start_ns
        self.children: list[tuple[bytes, bytes, int, int, dict[str, Any] | None, str | None]] = []
        self.ended = False
        self._prefix = f"00-{trace_id.hex()}-"

    @property
    def traceparent(self) -> str:
        """This span as the parent of what it calls (W3C `traceparent`)."""
        return self.context_of(self.span_id)

    @property
    def trace_hex(self) -> str:
        return self.trace_id.hex()

    def child_id(self) -> bytes:
        """The id of a span inside this one (this one's own id when not sampled)."""
        return _span_id() if self.sampled else self.span_id

    def context_of(self, span_id: bytes) -> str:
        """The `traceparent` of span `span_id` of this trace, for what it calls."""
        return f"{self._prefix}{span_id.hex()}-{'01' if self.sampled else '00'}"

    def record(self, span_label: bytes, span_id: bytes, start_ns: int, end_ns: int | None = None,
               attributes: dict[str, Any] | None = None, error: str | None = None) -> None:
        """A span inside this one, ended (now, unless `end_ns`); `span_label`
        comes from `label` (name, kind and the attributes every such span has)."""
        if self.sampled:
            self.children.append((span_label, span_id, start_ns, time.time_ns() if end_ns is None else end_ns,
                                  attributes, error))

    def end(self, error: str | None = None, attributes: dict[str, Any] | None = None) -> None:
        """Its end (with the error that ended it, and attributes known only now);
        when sampled, it and the spans inside it go to the exporter."""
        if self.ended or not self.sampled:
            return
        self.ended = True
        if attributes:
            self.attributes = {**(self.attributes or {}), **attributes}
        self._exporter.add(self, time.time_ns(), error)


class Tracer(Service):
    """A service of the node (core/lifecycle.py): `start` starts the exporter on
    the loop, `stop` (after the engine's, before the HTTP client's) sends what
    is left, bounded."""

    name = "tracing"

    def __init__(self, cfg: TracingConfig, node_id: str, version: str, http: HttpClient) -> None:
        self.cfg, self.http = cfg, http
        self.threshold = int(cfg.sampling_ratio * (1 << 64))  # sampled when the trace id's low 64 bits are under it
        resource = {"service.name": cfg.service_name, "service.instance.id": node_id, "service.version": version,
                    "host.name": os.uname().nodename, "process.pid": os.getpid()}
        self.exporter = OtlpExporter(cfg.otlp_endpoint, resource, cfg.export_interval_ms / 1000, cfg.max_queue,
                                     headers=cfg.headers)

    async def start(self) -> None:
        self.exporter.start(self.http)

    async def stop(self) -> None:
        await self.exporter.close(3.0)

    def kill(self) -> None:
        self.exporter.kill()

    def start_trace(self, traceparent: str | None, start_ns: int | None = None) -> RequestSpan:
        """A request's span that goes on with `traceparent` (when it is valid),
        else the root of a new trace. When it is sampled, the caller gives it its
        `label` (name, kind and the attributes that repeat: `otlp.label`) and
        its own `attributes`."""
        parent = parse_traceparent(traceparent) if traceparent else None
        if parent is not None:
            trace_id, parent_id, sampled = parent
        else:
            trace_id, parent_id = (_ids.getrandbits(128) | 1).to_bytes(16, "big"), None
            sampled = int.from_bytes(trace_id[8:], "big") < self.threshold
        return RequestSpan(self.exporter, trace_id, parent_id, sampled, b"", start_ns)

    def status(self) -> dict[str, Any]:
        """For `/status`: where spans go and how that goes."""
        return {"otlp_endpoint": self.cfg.otlp_endpoint, "sampling_ratio": self.cfg.sampling_ratio,
                **self.exporter.counts()}
