"""Spans out over OTLP/HTTP: protobuf, in batches, from the node's loop.

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

import asyncio
import logging
import struct
import time
from collections import deque
from typing import Any, Protocol
from urllib.parse import urlsplit

from ..http.client import HttpClient, HttpConnectionError

log = logging.getLogger("tracing")
BATCH = 2048  # spans per export (about 300 KB); a full batch is sent before its interval
LOG_EVERY_S = 60.0
SEND_TIMEOUT_S = 5.0


class RequestSpan(Protocol):
    """What is sent of a request's span (spans.py makes them): its own fields
    and, as (label, span id, start, end, attributes, error), the spans inside it."""

    trace_id: bytes
    span_id: bytes
    parent_id: bytes | None
    label: bytes
    start_ns: int
    attributes: dict[str, Any] | None
    children: list[tuple[bytes, bytes, int, int, dict[str, Any] | None, str | None]]


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


_labels: dict[tuple[str, int, tuple[tuple[str, Any], ...]], bytes] = {}


def label(name: str, kind: int, attributes: dict[str, Any] | None = None) -> bytes:
    """What a span of this name, kind (and these attributes) carries every
    time, encoded once: name 5, kind 6, attributes 9. Spans are recorded with
    it: a step's label is made once per step of the configuration."""
    key = (name, kind, tuple(attributes.items()) if attributes else ())
    found = _labels.get(key)
    if found is None:
        if len(_labels) > 1024:
            _labels.clear()
        found = _labels[key] = (_field(0x2A, _text(name)) + b"\x30" + bytes((kind,))
                                + (encode_attributes(attributes) if attributes else b""))
    return found


def encode_attributes(attributes: dict[str, Any], cached: bool = True) -> bytes:
    """Attributes (field 9); `cached`: values that repeat from request to request."""
    if cached:
        return b"".join([_attribute(k, v) for k, v in attributes.items()])
    return b"".join([_field(0x4A, _key_value(k, v)) for k, v in attributes.items()])


def _status(error: str) -> bytes:
    """Status 15: message 2, code 3 (ERROR)."""
    return _field(0x7A, _field(0x12, _text(error[:500])) + b"\x18\x02")


def encode_spans(span: RequestSpan, end_ns: int, error: str | None) -> bytes:
    """A request's span and the spans inside it, as ScopeSpans' repeated field 2
    (Span: trace_id 1, span_id 2, parent_span_id 4, start 7 and end 8 as
    fixed64 ns, and its label, attributes and status). One call per request.
    The request span's own attributes are its request's (its id): not cached."""
    head = b"\x0a\x10" + span.trace_id + b"\x12\x08"
    parent = b"\x22\x08" + span.span_id
    body = b"".join((head, span.span_id, b"\x22\x08" + span.parent_id if span.parent_id is not None else b"", span.label,
                     encode_attributes(span.attributes, cached=False) if span.attributes else b"",
                     _times.pack(0x39, span.start_ns, 0x41, end_ns), _status(error) if error is not None else b""))
    out = [b"\x12", _varint(len(body)), body]
    for child_label, span_id, start, end, attributes, child_error in span.children:
        body = b"".join((head, span_id, parent, child_label, encode_attributes(attributes) if attributes else b"",
                         _times.pack(0x39, start, 0x41, end), _status(child_error) if child_error is not None else b""))
        out += (b"\x12", _varint(len(body)), body)
    return b"".join(out)


def encode_request(resource: bytes, scope: bytes, spans: list[bytes]) -> bytes:
    """ExportTraceServiceRequest { resource_spans 1 { resource 1, scope_spans 2 { scope 1, spans 2 } } },
    `spans` encoded already (`encode_spans`)."""
    scope_spans = _field(0x0A, scope) + b"".join(spans)
    resource_spans = _field(0x0A, resource) + _field(0x12, scope_spans)
    return _field(0x0A, resource_spans)


# ----- the exporter ---------------------------------------------------------------------------
class OtlpExporter:
    """Spans queued as they end (encoded at once: bytes hold no references, so
    a second of spans waiting costs the garbage collector nothing) and sent on
    the node's loop, through its HTTP client, every `interval_s` or as soon as
    a batch is full. On the loop, not in a thread of its own: a thread wanting
    the GIL while the loop works costs more switches than the sending itself
    (bench/RESULTS.md)."""

    def __init__(self, endpoint: str, resource: dict[str, Any], interval_s: float, max_queue: int,
                 headers: dict[str, str] | None = None, scope: str = "runtime_manager") -> None:
        url = urlsplit(endpoint)
        self.endpoint = url._replace(path="/v1/traces").geturl() if not url.path else endpoint  # OTLP's default path
        self._headers = {"Content-Type": "application/x-protobuf", **(headers or {})}
        self._resource = b"".join(_field(0x0A, _key_value(k, v)) for k, v in resource.items())
        self._scope = _field(0x0A, _text(scope))
        self.interval_s = interval_s
        self.max_queue = max_queue
        self.queue: deque[tuple[int, bytes]] = deque()  # (spans, the request's spans encoded)
        self.queued = 0  # spans in the queue
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._http: HttpClient | None = None
        self.exported = self.failed = self.dropped = 0
        self.last_error: str | None = None
        self._logged_at = -LOG_EVERY_S

    def add(self, span: RequestSpan, end_ns: int, error: str | None) -> None:
        """From the loop: a request's span and those inside it, ended (the
        oldest are dropped when the queue is full)."""
        n = 1 + len(span.children)
        self.queue.append((n, encode_spans(span, end_ns, error)))
        self.queued += n
        while self.queued > self.max_queue and len(self.queue) > 1:
            gone, _ = self.queue.popleft()
            self.queued -= gone
            self.dropped += gone
        if self.queued >= BATCH and self._wake is not None and not self._wake.is_set():  # once, as a batch fills
            self._wake.set()

    def counts(self) -> dict[str, Any]:
        return {"spans_exported": self.exported, "spans_failed": self.failed, "spans_dropped": self.dropped,
                "spans_queued": self.queued, "last_error": self.last_error}

    def start(self, http: HttpClient) -> None:
        """Begin sending (on the running loop) through `http`."""
        if self._task is None:
            self._http, self._wake = http, asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="otlp-export")

    async def close(self, timeout_s: float) -> None:
        """Send what is queued (within `timeout_s`), then stop. Never raises."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        try:
            async with asyncio.timeout(timeout_s):
                await self._drain()
        except TimeoutError:
            pass

    def kill(self) -> None:
        """Stop at once, sending nothing more; never raises."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            full_only = True
            try:
                async with asyncio.timeout(self.interval_s):
                    await self._wake.wait()
            except TimeoutError:
                full_only = False  # the interval is up: everything goes
            self._wake.clear()
            await self._drain(full_only)

    async def _drain(self, full_only: bool = False) -> None:
        """Send what is queued in batches; with `full_only`, full batches only
        (spans that end while a batch is sent wait for the next: a request per
        few spans would cost more than the spans)."""
        while self.queued >= (BATCH if full_only else 1):
            batch, n = [], 0
            while self.queue and n < BATCH:
                count, blob = self.queue.popleft()
                batch.append(blob)
                n += count
            self.queued -= n
            await self._send(batch, n)

    async def _send(self, blobs: list[bytes], n: int) -> None:
        assert self._http is not None
        try:
            body = encode_request(self._resource, self._scope, blobs)
            try:
                resp = await self._http.request("POST", self.endpoint, body, self._headers, timeout=SEND_TIMEOUT_S,
                                                limit=64 * 1024)
            except HttpConnectionError:  # a kept-alive connection the collector closed: once more
                resp = await self._http.request("POST", self.endpoint, body, self._headers, timeout=SEND_TIMEOUT_S,
                                                limit=64 * 1024)
            if resp.status >= 300:
                raise RuntimeError(f"the collector answered HTTP {resp.status}")
            self.exported += n
        except asyncio.CancelledError:
            self.failed += n
            raise
        except Exception as exc:
            self.failed += n
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            now = time.monotonic()
            if now - self._logged_at >= LOG_EVERY_S:
                self._logged_at = now
                log.warning("%d spans could not be sent to %s: %s (said once a minute at most)", n,
                            self.endpoint, self.last_error)
