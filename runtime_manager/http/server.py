"""A small HTTP/1.1 server on the node's loop: httptools (llhttp) parses, the
loop's transports write, and nothing waits in a thread unless the handler
sends it there.

It knows nothing of flows: `handle(request, reply)` is called once per request
on the loop and must call `reply(status, headers, body)` exactly once, then or
later. A connection serves its requests one after another (keep-alive; a
pipelined request waits for the answer before it). What the server answers
itself (a malformed request, a body over `max_body`, too many connections) is
asked of `error_body(status, message, path)` (path: the request's, "" when
unknown), so that every answer is the caller's format. Limits: 64 KiB of request line and headers (400), `max_body` bytes
of body (413; either way the connection closes),
`max_connections` open at once (beyond: 503 and close), `idle_timeout_s`
without a byte between requests (the connection closes; a request being
answered is never cut).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httptools

log = logging.getLogger("http")
MAX_HEAD = 64 * 1024  # request line and headers, bytes
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
           409: "Conflict", 413: "Request Entity Too Large", 422: "Unprocessable Entity", 500: "Internal Server Error",
           502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


@dataclass(slots=True)
class Request:
    method: str
    target: str  # as sent: path and query
    headers: dict[str, str]  # names in lower case
    body: bytes
    remote: str
    http_version: str
    keep_alive: bool
    received: float = field(default_factory=time.perf_counter)

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""


Reply = Callable[[int, list[tuple[str, str]], bytes], None]
Handler = Callable[[Request, Reply], None]


class _Clock:
    """The Date header, made once a second."""

    def __init__(self) -> None:
        self.second, self.value = 0, ""

    def now(self) -> str:
        second = int(time.time())
        if second != self.second:
            self.second, self.value = second, email.utils.formatdate(second, usegmt=True)
        return self.value


class HttpServer:
    def __init__(self, handle: Handler, error_body: Callable[[int, str, str], bytes], *, max_body: int,
                 max_connections: int, idle_timeout_s: float, ident: str = "runtime-manager") -> None:
        self.handle, self.error_body = handle, error_body
        self.max_body, self.max_connections, self.idle_timeout_s = max_body, max_connections, idle_timeout_s
        self.ident = ident.encode("latin-1")
        self.clock = _Clock()
        self.connections: set[_Connection] = set()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def bind(self, host: str, port: int, sock: socket.socket | None = None) -> None:
        """Take the port (raises when it is in use); nothing is accepted before `serve`."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            self.server = await loop.create_server(lambda: _Connection(self), sock=sock, backlog=1024,
                                                   start_serving=False)
        else:
            self.server = await loop.create_server(lambda: _Connection(self), host, port, backlog=1024,
                                                   reuse_address=True, start_serving=False)
        self.port = self.server.sockets[0].getsockname()[1]

    async def serve(self) -> None:
        assert self.server is not None
        await self.server.start_serving()

    def close_listener(self) -> None:
        """No new connections; the open ones are still served."""
        if self.server is not None:
            self.server.close()

    def unsent(self) -> bool:
        return any(c.transport is not None and c.transport.get_write_buffer_size() for c in self.connections)

    def close_all(self) -> None:
        """Close every connection now (answers written already go out first: transports flush on close)."""
        self.close_listener()
        for conn in list(self.connections):
            conn.close()


class _Connection(asyncio.Protocol):
    __slots__ = ("_active_at", "_busy", "_closing", "_head_size", "_headers", "_idle", "_loop", "_parser", "_pending",
                 "_size", "_too_big", "_url", "body", "remote", "server", "transport")

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self._size = self._head_size = 0
        self._too_big = False  # this request was refused (too large): the rest of it is not read
        self._closing = False  # an answer of the server's own went out: nothing more is read or answered
        self._busy = False  # a request is being answered: the next waits (read paused)
        self._pending: list[Request] = []
        self._idle: asyncio.TimerHandle | None = None
        self._active_at = 0.0  # the loop's time of the last bytes in or answer out
        self._loop: asyncio.AbstractEventLoop | None = None
        self.remote = ""

    # ----- the connection ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else ""
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if len(self.server.connections) >= self.server.max_connections:
            self._answer_and_close(503, f"too many connections (rest.max_connections: {self.server.max_connections})")
            return
        self.server.connections.add(self)
        self._note_activity()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing() or self._closing:
            return  # closing: what is still coming is read and dropped (see _answer_and_close)
        self._note_activity()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._answer_and_close(400, "protocol upgrades are not served")
        except httptools.HttpParserError as exc:
            if self._too_big:
                return
            self._answer_and_close(400, f"malformed HTTP request: {exc}")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _note_activity(self) -> None:
        """Something happened on the connection: it may now stay idle for
        `idle_timeout_s`. One timer a connection, moved on only when it fires
        before its time (moving it at every request cost two timer handles each)."""
        assert self._loop is not None
        self._active_at = self._loop.time()
        if self._idle is None:
            self._idle = self._loop.call_at(self._active_at + self.server.idle_timeout_s, self._idle_out)

    def _idle_out(self) -> None:
        assert self._loop is not None
        self._idle = None
        if self.transport is None:
            return
        if self._busy:  # an answer is coming: the client waits for it, not the other way round
            self._note_activity()
            return
        due = self._active_at + self.server.idle_timeout_s
        if due > self._loop.time():  # active since the timer was set: wait for the rest
            self._idle = self._loop.call_at(due, self._idle_out)
            return
        self.close()

    def _answer_and_close(self, status: int, message: str) -> None:
        """Answer, then close gently: the answer and end of our side go out, and
        what the client still sends is read and dropped for a moment, so that
        closing with unread data does not reset the connection before the client
        has read the answer."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._closing:
            return
        self._too_big = self._closing = True
        body = self.server.error_body(status, message, self._url.decode("latin-1").split("?", 1)[0])
        transport.write(self._head(status, [("Content-Type", "application/json")], len(body), False) + body)
        if transport.can_write_eof():
            transport.write_eof()
            asyncio.get_running_loop().call_later(1.0, transport.close)
        else:
            transport.close()

    # ----- httptools' callbacks --------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url, self._headers, self.body, self._size, self._too_big, self._head_size = b"", {}, [], 0, False, 0

    def _head_grows(self, n: int) -> bool:
        """Count the request line and headers; past MAX_HEAD the request is refused (400) and the connection closed."""
        self._head_size += n
        if self._head_size > MAX_HEAD and not self._too_big:
            self._answer_and_close(400, f"request line and headers larger than {MAX_HEAD // 1024} KiB")
        return not self._too_big

    def on_url(self, url: bytes) -> None:
        if self._head_grows(len(url)):
            self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head_grows(len(name) + len(value) + 4):
            return
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def on_headers_complete(self) -> None:
        if self._too_big:
            return
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.server.max_body:
            self._answer_and_close(413, f"body of {length} bytes is larger than {self.server.max_body}")
        elif self._headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits a second for it before a large body

    def on_body(self, body: bytes) -> None:
        if self._too_big:
            return
        self._size += len(body)
        if self._size > self.server.max_body:
            self._answer_and_close(413, f"body larger than {self.server.max_body} bytes")
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self._too_big or self._closing or self.transport is None:
            return
        parser = self._parser
        req = Request(parser.get_method().decode("latin-1"), self._url.decode("latin-1"), self._headers,
                      b"".join(self.body), self.remote, parser.get_http_version(), parser.should_keep_alive())
        if self._busy:
            self._pending.append(req)
            self.transport.pause_reading()
            return
        self._dispatch(req)

    # ----- answers, in order ------------------------------------------------------------------------
    def _dispatch(self, req: Request) -> None:
        self._busy = True
        answered = False

        def reply(status: int, headers: list[tuple[str, str]], body: bytes) -> None:
            nonlocal answered
            if answered:
                return
            answered = True
            self._write(req, status, headers, body)

        try:
            self.server.handle(req, reply)
        except Exception:
            log.exception("%s %s: the handler failed", req.method, req.path)
            body = self.server.error_body(500, "the request could not be handled", req.path)
            reply(500, [("Content-Type", "application/json")], body)

    def _write(self, req: Request, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        transport = self.transport
        self._busy = False
        if transport is None or transport.is_closing() or self._closing:
            return
        keep = req.keep_alive and not any(k.lower() == "connection" and v.lower() == "close" for k, v in headers)
        data = self._head(status, headers, len(body), keep) + (body if req.method != "HEAD" else b"")
        transport.write(data)
        if not keep:
            transport.close()
            return
        self._note_activity()
        if self._pending:
            nxt = self._pending.pop(0)
            if not self._pending:
                transport.resume_reading()
            self._dispatch(nxt)

    def _head(self, status: int, headers: list[tuple[str, str]], length: int, keep: bool) -> bytes:
        lines = [b"HTTP/1.1 %d %s\r\nServer: %s\r\nDate: %s\r\n" % (
            status, REASONS.get(status, "Unknown").encode(), self.server.ident, self.server.clock.now().encode())]
        for name, value in headers:
            low = name.lower()
            if low in ("content-length", "connection", "server", "date", "transfer-encoding"):
                continue
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        lines.append(b"Content-Length: %d\r\n" % length)
        if not keep:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)


def wsgi_environ(req: Request, server_name: str, port: int) -> dict[str, Any]:
    """A request as a WSGI app reads it (PEP 3333)."""
    import io
    import sys
    from urllib.parse import unquote

    environ: dict[str, Any] = {
        "REQUEST_METHOD": req.method, "SCRIPT_NAME": "", "PATH_INFO": unquote(req.path, "latin-1"),
        "QUERY_STRING": req.query, "SERVER_NAME": server_name, "SERVER_PORT": str(port),
        "SERVER_PROTOCOL": f"HTTP/{req.http_version}", "REMOTE_ADDR": req.remote, "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(req.body), "wsgi.errors": sys.stderr,
        "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
        "CONTENT_LENGTH": str(len(req.body)) if req.body or "content-length" in req.headers else "",
    }
    for name, value in req.headers.items():
        if name == "content-type":
            environ["CONTENT_TYPE"] = value
        elif name != "content-length":
            environ["HTTP_" + name.upper().replace("-", "_")] = value
    return environ


def call_wsgi(app: Callable[..., Any], environ: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
    """Run a WSGI app for one request (in a thread): its status, headers and body."""
    answer: dict[str, Any] = {}
    written: list[bytes] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        answer["status"], answer["headers"] = int(status.split(" ", 1)[0]), headers
        return written.append

    chunks = app(environ, start_response)
    try:
        body = b"".join(written) + b"".join(chunks)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    return answer["status"], answer["headers"], body
