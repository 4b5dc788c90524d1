"""Spans out over OTLP/HTTP: protobuf, in batches, from a thread of its own.

The encoding is written here, field by field, after the OTLP protobuf schema
(opentelemetry-proto: ExportTraceServiceRequest > ResourceSpans > ScopeSpans >
Span), because it is the cost: OpenTelemetry's Python SDK takes about 28 µs to
record a span and as much again to encode it, more than a whole flow of four
steps costs this node; these spans cost a few µs each (bench/RESULTS.md).

The queue is bounded (`max_queue` spans): when the collector is slow or away,
the oldest spans are dropped and counted, never the node's requests. A failed
export is logged once a minute at most.
"""

from __future__ import annotations

import http.client
import logging
import struct
import threading
import time
from collections import deque
from typing import Any, Protocol
from urllib.parse import urlsplit

log = logging.getLogger("tracing")
BATCH = 2048  # spans per export (about 300 KB); a full batch wakes the thread before its interval
LOG_EVERY_S = 60.0


class Span(Protocol):
    """What is sent of a span (spans.py makes them)."""

    trace_id: bytes
    span_id: bytes
    parent_id: bytes | None
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] | None
    status: int
    message: str


# ----- protobuf, the few wire types OTLP spans use ------------------------------------------
def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 as protobuf writes it: ten bytes
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field: `tag` is (field number << 3) | 2."""
    return bytes((tag,)) + _varint(len(payload)) + payload


def _text(value: str) -> bytes:
    return value.encode("utf-8", "replace")


def _any_value(value: Any) -> bytes:
    """AnyValue: string_value = 1, bool_value = 2, int_value = 3, double_value = 4."""
    if isinstance(value, bool):
        return b"\x10" + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + struct.pack("<d", value)
    return _field(0x0A, _text(str(value)))


_attribute_cache: dict[tuple[str, Any, type], bytes] = {}
_name_cache: dict[str, bytes] = {}
_times = struct.Struct("<BQBQ")


def _attribute(key: str, value: Any) -> bytes:
    """A span's attribute field (9: KeyValue, key = 1, value = 2), cached: most
    attributes repeat request after request."""
    cache_key = (key, value, type(value))
    found = _attribute_cache.get(cache_key)
    if found is None:
        found = _field(0x4A, _key_value(key, value))
        if len(_attribute_cache) > 4096:
            _attribute_cache.clear()
        _attribute_cache[cache_key] = found
    return found


def _key_value(key: str, value: Any) -> bytes:
    return _field(0x0A, _text(key)) + _field(0x12, _any_value(value))


def encode_span(span: Span) -> bytes:
    """Span: trace_id 1, span_id 2, parent_span_id 4, name 5, kind 6, start 7 and
    end 8 (fixed64 ns), attributes 9, status 15 (message 2, code 3)."""
    name = _name_cache.get(span.name)
    if name is None:
        name = _field(0x2A, _text(span.name)) + b"\x30"
        if len(_name_cache) > 1024:
            _name_cache.clear()
        _name_cache[span.name] = name
    parts = [b"\x0a\x10", span.trace_id, b"\x12\x08", span.span_id]
    if span.parent_id is not None:
        parts += (b"\x22\x08", span.parent_id)
    parts += (name, _KIND[span.kind], _times.pack(0x39, span.start_ns, 0x41, span.end_ns))
    if span.attributes:
        parts += [_attribute(k, v) for k, v in span.attributes.items()]
    if span.status:
        status = (_field(0x12, _text(span.message)) if span.message else b"") + b"\x18" + bytes((span.status,))
        parts.append(_field(0x7A, status))
    body = b"".join(parts)
    return b"\x12" + _varint(len(body)) + body  # as ScopeSpans' field 2


_KIND = [bytes((k,)) for k in range(6)]


def encode_request(resource: bytes, scope: bytes, spans: list[bytes]) -> bytes:
    """ExportTraceServiceRequest { resource_spans 1 { resource 1, scope_spans 2 { scope 1, spans 2 } } },
    `spans` encoded already (`encode_span`)."""
    scope_spans = _field(0x0A, scope) + b"".join(spans)
    resource_spans = _field(0x0A, resource) + _field(0x12, scope_spans)
    return _field(0x0A, resource_spans)


# ----- the exporter ---------------------------------------------------------------------------
class OtlpExporter:
    """Spans queued by the loop (encoded as they end: bytes hold no references,
    so a second of spans waiting costs the garbage collector nothing), sent by a
    thread every `interval_s` (or as soon as a batch is full) with one
    kept-alive HTTP connection."""

    def __init__(self, endpoint: str, resource: dict[str, Any], interval_s: float, max_queue: int,
                 headers: dict[str, str] | None = None, scope: str = "runtime_manager") -> None:
        url = urlsplit(endpoint)
        self.endpoint = endpoint
        self._https = url.scheme == "https"
        self._host, self._port = url.hostname or "127.0.0.1", url.port or (443 if self._https else 80)
        self._path = (url.path or "/v1/traces") + (f"?{url.query}" if url.query else "")
        self._headers = {"Content-Type": "application/x-protobuf", **(headers or {})}
        self._resource = b"".join(_field(0x0A, _key_value(k, v)) for k, v in resource.items())
        self._scope = _field(0x0A, _text(scope))
        self.interval_s = interval_s
        self.queue: deque[bytes] = deque(maxlen=max_queue)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: http.client.HTTPConnection | None = None
        self.exported = self.failed = self.added = 0
        self.last_error: str | None = None
        self._logged_at = 0.0

    def add(self, span: Span) -> None:
        """From the loop: one ended span (the oldest is dropped when the queue is full)."""
        self.queue.append(encode_span(span))
        self.added += 1
        if len(self.queue) == BATCH:  # once, as it fills (setting an event takes a lock)
            self._wake.set()

    def counts(self) -> dict[str, Any]:
        dropped = max(0, self.added - self.exported - self.failed - len(self.queue))
        return {"spans_exported": self.exported, "spans_failed": self.failed, "spans_dropped": dropped,
                "spans_queued": len(self.queue), "last_error": self.last_error}

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="otlp-export", daemon=True)
            self._thread.start()

    def close(self, timeout_s: float) -> None:
        """Send what is queued (within `timeout_s`), then stop the thread. Never raises."""
        self._stopping.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            self._drain()
        self._drain()  # what is left at the stop
        if self._conn is not None:
            self._conn.close()

    def _drain(self) -> None:
        while self.queue:
            batch = []
            while self.queue and len(batch) < BATCH:
                batch.append(self.queue.popleft())
            self._send(batch)

    def _send(self, spans: list[bytes]) -> None:
        try:
            body = encode_request(self._resource, self._scope, spans)
            for attempt in (1, 2):  # a kept-alive connection the collector closed: once more on a new one
                try:
                    if self._conn is None:
                        kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
                        self._conn = kind(self._host, self._port, timeout=5)
                    self._conn.request("POST", self._path, body, self._headers)
                    resp = self._conn.getresponse()
                    resp.read()
                    break
                except (OSError, http.client.HTTPException):
                    if self._conn is not None:
                        self._conn.close()
                    self._conn = None
                    if attempt == 2:
                        raise
            if resp.status >= 300:
                raise RuntimeError(f"the collector answered HTTP {resp.status}")
            self.exported += len(spans)
        except Exception as exc:
            self.failed += len(spans)
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            now = time.monotonic()
            if now - self._logged_at >= LOG_EVERY_S:
                self._logged_at = now
                log.warning("%d spans could not be sent to %s: %s (said once a minute at most)", len(spans),
                            self.endpoint, self.last_error)
