"""A lean HTTP/1.1 client for the node's calls to components, load balancers and peers.

Why not aiohttp's client: a flow of four calls spent about 60 % of the node's
CPU in it (bench/profile.py); this client does what those calls need and no
more, over asyncio protocols with httptools (the C parser uvicorn uses) reading
the answers:

- keep-alive connections, pooled per (scheme, host, port), at most
  `max_per_host` at once per host (more calls wait their turn), idle ones
  closed after `idle_s`; a connection the server closed while idle is never
  used again;
- `Content-Length` and chunked answers (httptools); a body is read up to
  `limit` bytes and one more (the caller says it is too large), and the
  connection is then closed rather than drained;
- a timeout over the whole call (connecting, sending, the answer);
- TLS for `https` (the system's trust store);
- every failure is one of two exceptions: `HttpConnectionError` (no answer
  arrived: refused, reset, closed; the request may not have reached the
  server) and `HttpProtocolError` (an answer that is not HTTP); a timeout is
  TimeoutError. A connection that failed in any way is closed, never reused.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools

from ..core.deadlines import DueTimes
from ..core.lifecycle import Service

USER_AGENT = b"runtime-manager"


class HttpConnectionError(ConnectionError):
    """No (complete) answer: the connection failed or closed first."""


class HttpProtocolError(Exception):
    """The server's answer is not HTTP/1.1 as we can read it."""


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case
    truncated: bool = False  # the body went on past `limit` (only limit + 1 bytes are here)


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; one request at a time."""

    def __init__(self, key: tuple[str, str, int]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        self.idle_since = time.monotonic()
        self._answer: asyncio.Future[Response] | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._status = 0
        self._headers: dict[str, str] = {}
        self._header_name = b""
        self._body = bytearray()
        self._limit = 0
        self._done = False
        self._keep_alive = False

    # ----- asyncio.Protocol --------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses
        self.loop = asyncio.get_running_loop()  # asked once: each ask is a system call (getpid) on Python 3.11

    def data_received(self, data: bytes) -> None:
        if self._parser is None or self._answer is None or self._answer.done():
            self.close()  # bytes nobody asked for: the connection is not safe to reuse
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(HttpProtocolError("the server switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(HttpProtocolError(f"not an HTTP answer: {exc}"))

    def eof_received(self) -> bool | None:
        self.closed = True
        if self._answer is not None and not self._answer.done() and self._status and \
                "content-length" not in self._headers and "chunked" not in self._headers.get("transfer-encoding", ""):
            self._finish(truncated=False)  # an answer without a length ends with the connection
            self._done = False
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(HttpConnectionError(f"connection closed before the answer ({exc or 'closed by the server'})"))

    # ----- httptools callbacks ------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if name:
            self._header_name = name
            self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")
        else:  # a header value in several pieces
            key = self._header_name.decode("latin-1").lower()
            self._headers[key] = self._headers.get(key, "") + value.decode("latin-1")

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        self._status = self._parser.get_status_code()
        self._keep_alive = self._parser.should_keep_alive()  # asked now: the parser forgets it once the answer is done

    def on_body(self, body: bytes) -> None:
        room = self._limit + 1 - len(self._body)
        if room > 0:
            self._body += body[:room]
        if len(self._body) > self._limit:
            self._finish(truncated=True)

    def on_message_complete(self) -> None:
        self._finish(truncated=False)

    # ----- one request ------------------------------------------------------------------
    def send(self, request: bytes, limit: int) -> asyncio.Future[Response]:
        assert self.transport is not None and self.loop is not None
        self._answer = self.loop.create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._status, self._headers, self._body, self._limit, self._done = 0, {}, bytearray(), limit, False
        self._keep_alive = False
        self.transport.write(request)
        return self._answer

    def reusable(self) -> bool:
        return (not self.closed and self._done and self._keep_alive and self.transport is not None
                and not self.transport.is_closing())

    def _finish(self, truncated: bool) -> None:
        if self._answer is None or self._answer.done():
            return
        self._done = not truncated  # a truncated body leaves bytes on the wire: never reused
        self._answer.set_result(Response(self._status, bytes(self._body), self._headers, truncated))
        if truncated:
            self.close()

    def _fail(self, exc: Exception) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class HttpClient(Service):
    """Pooled keep-alive connections; `request` is the one way in. A service of
    the node (core/lifecycle.py): set up first, closed last."""

    name = "http client"

    def __init__(self, max_per_host: int = 100, idle_s: float = 30.0) -> None:
        self.max_per_host, self.idle_s = max_per_host, idle_s
        self._idle: dict[tuple[str, str, int], collections.deque[_Connection]] = {}
        self._turns: dict[tuple[str, str, int], asyncio.Semaphore] = {}
        self._targets: dict[str, _Target] = {}
        self._tls: ssl.SSLContext | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop it is used on (see `_running_loop`)
        self._answers_due: DueTimes[asyncio.Future[Response]] = DueTimes(_expire)  # one timer for all answers

    async def request(self, method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                      timeout: float = 30.0, limit: int = 64 * 1024 * 1024) -> Response:
        """Send one request and read its answer (body up to `limit` + 1 bytes), all
        within `timeout` seconds. Raises HttpConnectionError, HttpProtocolError,
        TimeoutError, or ValueError for a URL it cannot call."""
        if self._closed:
            raise HttpConnectionError("the HTTP client is closed")
        target = self._targets.get(url) or self._target(url)
        request = target.encode(method, body, headers)
        turns = self._turns.get(target.key)
        if turns is None:
            turns = self._turns[target.key] = asyncio.Semaphore(self.max_per_host)
        loop = self._running_loop()
        deadline = loop.time() + timeout
        # The usual call takes a free turn and a kept connection at once and only
        # waits for the answer: a deadline on that wait is all it needs (one timer
        # serves every answer waited for). Waiting for a turn or for a new
        # connection gets a timeout of its own.
        if turns.locked():
            async with asyncio.timeout_at(deadline):
                await turns.acquire()
        else:
            await turns.acquire()
        try:
            conn = self._kept(target.key)
            if conn is None:
                async with asyncio.timeout_at(deadline):
                    conn = await self._connect(target.key)
            answer = conn.send(request, limit)
            self._answers_due.add(answer, loop, deadline)
            try:
                response = await answer
            except BaseException:  # failed, timed out or cancelled: the connection is in an unknown state
                conn.close()
                raise
            finally:
                self._answers_due.remove(answer)
            if conn.reusable():
                conn.idle_since = time.monotonic()
                self._idle.setdefault(target.key, collections.deque()).append(conn)
            else:
                conn.close()
            return response
        finally:
            turns.release()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop the client is used on, asked of asyncio once (each ask is a
        system call on Python 3.11), again only once that loop has closed. Its
        turns (asyncio.Semaphore) bind it to one loop at a time anyway."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
            self._answers_due = DueTimes(_expire)  # its timer was the old loop's
        return loop

    def _target(self, url: str) -> _Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"cannot call {url!r}: an http:// or https:// URL with a host is needed")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname if port in (80, 443) else f"{parts.hostname}:{port}"
        if ":" in parts.hostname:
            host = f"[{parts.hostname}]:{port}"  # an IPv6 address
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        target = _Target((parts.scheme, parts.hostname, port), path, host.encode("idna" if not host.isascii() else "ascii"))
        if len(self._targets) >= 1024:  # the URLs of a node's config are few; anything else is not kept for long
            self._targets.clear()
        self._targets[url] = target
        return target

    def _kept(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have been closed by the server
            if conn.closed or conn.transport is None or conn.transport.is_closing() or now - conn.idle_since > self.idle_s:
                conn.close()
                continue
            return conn
        return None

    async def _connect(self, key: tuple[str, str, int]) -> _Connection:
        scheme, host, port = key
        tls = None
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        loop = asyncio.get_running_loop()
        try:
            _transport, conn = await loop.create_connection(lambda: _Connection(key), host, port, ssl=tls,
                                                            server_hostname=host if tls else None)
        except OSError as exc:  # refused, unreachable, name unknown, TLS handshake failed
            raise HttpConnectionError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        return conn

    async def close(self) -> None:
        self.kill()

    async def stop(self) -> None:
        self.kill()

    def kill(self) -> None:
        """Close every kept connection; calls after this fail at once."""
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

    @property
    def idle_connections(self) -> int:
        return sum(len(d) for d in self._idle.values())


def _expire(answer: asyncio.Future[Response]) -> None:
    if not answer.done():
        answer.set_exception(TimeoutError())


@dataclass
class _Target:
    """A URL taken apart once: its pool key, the request target and the Host header."""

    key: tuple[str, str, int]
    path: str
    host: bytes
    heads: dict[str, bytes] = field(default_factory=dict)  # method -> request line, Host and User-Agent

    def encode(self, method: str, body: bytes | None, headers: dict[str, str] | None) -> bytes:
        head = self.heads.get(method)
        if head is None:
            head = self.heads[method] = (f"{method} {self.path} HTTP/1.1\r\n".encode("latin-1") + b"Host: " + self.host
                                         + b"\r\nUser-Agent: " + USER_AGENT + b"\r\n")
        lines = [head]
        for name, value in (headers or {}).items():
            if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
                raise ValueError(f"header {name!r} holds a line break")
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        if body is not None:
            lines.append(b"Content-Length: %d\r\n" % len(body))
        elif method in ("POST", "PUT", "PATCH"):
            lines.append(b"Content-Length: 0\r\n")
        lines.append(b"\r\n")
        if body:
            lines.append(body)
        return b"".join(lines)
