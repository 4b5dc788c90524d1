"""W3C trace context (`traceparent`) as the node reads it and passes it on.

`OUTGOING` holds the `traceparent` of the span a request is in while a step or
a forward runs (a context variable: each request's own, on the one loop); the
HTTP driver, REST forwards and MQTT forwards send it along when it is set.
Nothing is set while tracing is off.
"""

from __future__ import annotations

from contextvars import ContextVar

OUTGOING: ContextVar[str | None] = ContextVar("rm_outgoing_traceparent", default=None)
_HEX = frozenset("0123456789abcdef")


def parse_traceparent(value: str) -> tuple[bytes, bytes, bool] | None:
    """(trace id, parent span id, sampled) from a `traceparent` value, or None
    when it is not one (version 00 as the W3C spec writes it; a later version
    is read by its first four fields, as the spec asks)."""
    if not isinstance(value, str) or len(value) < 55:
        return None
    value = value.strip().lower()
    parts = value.split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    if parts[0] == "ff" or (parts[0] == "00" and len(parts) != 4):
        return None
    if not all(set(p) <= _HEX for p in parts[:4]):
        return None
    trace_id, span_id = bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
    if not any(trace_id) or not any(span_id):
        return None
    return trace_id, span_id, bool(int(parts[3], 16) & 1)
