"""REST entry point: Flask + Flask-RESTful define the API; an HTTP server on the
node's loop (http/server.py) serves it, the same requests as MQTT.

`POST <rest.endpoint>` (default /startrm) runs a flow and answers its result;
`GET /health` answers {"status": "ok"} (as the original); `GET /livez` says the
process serves, `GET /readyz` whether it takes requests (503 with the reasons
when not); `GET /status` shows the node and its view of its peers;
`GET /lb/id_node` (`rest.lb_endpoint`) makes the node a load balancer for
others in the original protocol; `GET /metrics` serves Prometheus metrics and
`GET /openapi.json` describes all of it (`openapi.py`); `GET /ui` is a live
status page (`ui.html`, which reads `/status` and `/readyz`). With `rest.token` set, every request needs `Authorization: Bearer`.

A flow request is read, admitted (or answered `503 overloaded` at once, when
the engine's queue is full) and answered on the loop, with no thread hop: the
bytes are those the Flask app's StartFlow answers (the same functions build
them; a test compares the two). Every other route runs the Flask app on a pool
of `rest.threads` (+2) threads, so `/health` and `/status` answer whatever the
flows do.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from flask import Flask, Response, request
from flask_restful import Api, Resource
from werkzeug.exceptions import HTTPException

from ..config import Config
from ..core.errors import BadRequest, Overloaded, Timeout
from ..core.lifecycle import Entrypoint, wait_until
from ..core.request import FlowRequest, parse_request
from ..core.result import Result, error_result
from ..engine import FlowEngine
from ..http.server import HttpServer, Reply, call_wsgi, wsgi_environ
from ..http.server import Request as HttpRequest
from ..logs import short
from .openapi import api_description

log = logging.getLogger("api")
UI_PAGE = (Path(__file__).parent / "ui.html").read_bytes()
SPARE_THREADS = 2  # threads beyond rest.threads for the app's routes


def _json(body: dict[str, Any], status: int) -> Response:
    return Response(orjson.dumps(body), status=status, mimetype="application/json")


def _plain_error(code: str, message: str, status: int) -> Response:
    """Errors that are not about a flow request (auth, routing)."""
    return _json({"status": "error", "error": {"code": code, "message": message, "step": None}}, status)


def bearer_ok(header: str, token: str) -> bool:
    """`Authorization: Bearer <token>`: the scheme case-insensitive (RFC 7235), the token compared exactly, in constant time."""
    scheme, _, given = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


UNAUTHORIZED = ("unauthorized", "missing or wrong bearer token", 401)


def read_flow_request(engine: FlowEngine, max_body: int, length: int | None, body: bytes, traceparent: str | None,
                      remote: str | None) -> FlowRequest | tuple[Result, int]:
    """A flow request's body read as both servers read it: the request, or the
    result that refuses it and its HTTP status (413, 400)."""
    if length is not None and length > max_body:
        too_big = BadRequest(f"body of {length} bytes is larger than {max_body}")
        return error_result(None, engine.node, too_big), 413
    try:
        req = parse_request(body, via="rest")
    except BadRequest as exc:
        log.warning("bad request from %s: %s (body: %s)", remote, exc.message, short(body))
        return error_result(None, engine.node, exc), 400
    if engine.tracer is not None:
        req.traceparent = traceparent
    return req


def overloaded(slots: FlowSlots, engine: FlowEngine, req: FlowRequest) -> Result:
    why = "node is stopping" if slots.draining else f"all {slots.size} REST flow slots are busy"  # (a size is given)
    return error_result(req, engine.node, Overloaded(why))


class _Api(Api):
    """Flask-RESTful answers HTTP errors in its own format; hand them back to
    Flask's error handlers, which answer in the contract's."""

    def handle_error(self, e: Exception) -> Response:
        raise e


class FlowSlots:
    """The flow requests REST is answering: counted (a stop waits for them) and,
    while the node stops, refused. `size`: at most that many at once (None: as
    many as the engine admits, which answers `overloaded` past its queue).
    `try_take` never waits."""

    def __init__(self, size: int | None = None) -> None:
        self.size = size
        self.busy = 0
        self.draining = False
        self._lock = threading.Lock()

    def try_take(self) -> bool:
        with self._lock:
            if self.draining or (self.size is not None and self.busy >= self.size):
                return False
            self.busy += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.busy -= 1


def create_app(config: Config, engine: FlowEngine, slots: FlowSlots,
               status: Callable[[], dict[str, Any]] | None = None,
               readiness: Callable[[], dict[str, Any]] | None = None,
               lb_answer: Callable[[], dict[str, Any]] | None = None,
               metrics: Callable[[], bytes] | None = None, flows: bool = True,
               move_module: Callable[[str, str], concurrent.futures.Future[Any]] | None = None) -> Flask:
    """The app factory: configuration as data, the engine handed in. With
    `flows=False` (a node without REST, on runtime.conf http_port) only the
    endpoints for watching the node: no flow requests, no load balancer."""
    app = Flask("runtime_manager")
    rest = config.rest
    app.config["MAX_CONTENT_LENGTH"] = rest.max_body_bytes
    token = rest.token

    def _refused(result: Result, http_status: int) -> Response:
        """A flow request that could not be read: counted like every result."""
        engine.refused_threadsafe("rest", result)
        return _json(result.to_dict(), http_status)

    class StartFlow(Resource):
        def post(self) -> Response:
            body = request.get_data(cache=False) if (request.content_length or 0) <= rest.max_body_bytes else b""
            read = read_flow_request(engine, rest.max_body_bytes, request.content_length, body,
                                     request.headers.get("traceparent"), request.remote_addr)
            if isinstance(read, tuple):
                return _refused(*read)
            req = read
            if not slots.try_take():
                return _json(overloaded(slots, engine, req).to_dict(), 503)
            wait_s = engine.rt.task_timeout_ms / 1000 + 5  # the engine's: a reload may change it
            try:
                result = engine.submit_threadsafe(req).result(timeout=wait_s)
            except concurrent.futures.TimeoutError:
                result = error_result(req, engine.node, Timeout(f"no result within {wait_s:.1f} s"))
            finally:
                slots.give_back()
            return _json(result.to_dict(), result.http_status)

    class Health(Resource):
        def get(self) -> Response:
            return _json({"status": "ok"}, 200)

    class Status(Resource):
        def get(self) -> Response:
            return _json(status() if status else engine.status(), 200)

    class Live(Resource):
        def get(self) -> Response:  # the process serves
            return _json({"status": "alive"}, 200)

    class Ready(Resource):
        def get(self) -> Response:  # it takes requests: 503 with the reasons when not
            body = readiness() if readiness else {"ready": engine.accepting and not slots.draining, "reasons": []}
            return _json(body, 200 if body["ready"] else 503)

    class LoadBalancer(Resource):
        def get(self) -> Response:  # the original protocol: {"id_node": ...}, chosen over the group
            if lb_answer is None:
                return _plain_error("not_ready", "the node is starting", 503)
            return _json(lb_answer(), 200)

    class Metrics(Resource):
        def get(self) -> Response:  # the Prometheus text format
            if metrics is None:
                return _plain_error("not_found", "no metrics on this node", 404)
            return Response(metrics(), status=200, mimetype=None,
                            content_type="text/plain; version=0.0.4; charset=utf-8")

    class Page(Resource):
        def get(self) -> Response:  # the live status page (no data in it: it reads /status)
            return Response(UI_PAGE, status=200, content_type="text/html; charset=utf-8")

    class Description(Resource):
        def get(self) -> Response:  # OpenAPI 3.1 of this node's API
            return _json(api_description(config, flows=flows), 200)

    @app.before_request
    def check_token() -> Response | None:
        if token is None or request.path == "/ui":  # the page holds no data; it asks for the token
            return None
        if not bearer_ok(request.headers.get("Authorization", ""), token):
            return _plain_error(*UNAUTHORIZED)
        return None

    @app.errorhandler(413)
    def too_large(_exc: Exception) -> Response:
        too_big = BadRequest(f"body larger than {rest.max_body_bytes} bytes")
        if request.path == rest.endpoint and flows:
            return _refused(error_result(None, engine.node, too_big), 413)
        return _json(error_result(None, engine.node, too_big).to_dict(), 413)

    @app.errorhandler(404)
    def not_found(_exc: Exception) -> Response:
        return _plain_error("not_found", f"no route {request.path}", 404)

    class MigrateModule(Resource):
        def post(self, module: str) -> Response:  # move an orchestrator module to another runtime
            if move_module is None:
                return _plain_error("not_found", "this node runs no orchestrator runtime (runtime.conf orchestrator)", 404)
            body = request.get_json(silent=True)
            to = body.get("to") if isinstance(body, dict) else None
            if not isinstance(to, str) or not to:
                return _plain_error("bad_request", 'the body must be {"to": "<runtime name or uuid>"}', 400)
            try:
                report = move_module(module, to).result(timeout=120)
            except concurrent.futures.TimeoutError:
                return _plain_error("timeout", "the move did not finish within 120 s", 504)
            if isinstance(report, str):
                return _plain_error("not_found", report, 404)
            return _json(report.as_dict(), 200 if report.moved else 409)

    @app.errorhandler(405)
    def wrong_method(exc: Exception) -> Response:
        answer = _plain_error("method_not_allowed", f"{request.method} not allowed on {request.path}", 405)
        allowed = getattr(exc, "valid_methods", None)
        if allowed:
            answer.headers["Allow"] = ", ".join(allowed)
        return answer

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        return _plain_error("bad_request" if code < 500 else "internal_error", exc.description or exc.name, code)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:  # a bug of ours: JSON all the same, and logged
        log.exception("%s %s failed", request.method, request.path)
        return _plain_error("internal_error", f"{type(exc).__name__}: {short(str(exc), 200)}", 500)

    api = _Api(app)
    if flows:
        api.add_resource(StartFlow, rest.endpoint)
        api.add_resource(LoadBalancer, rest.lb_endpoint)
    api.add_resource(Health, "/health")
    api.add_resource(Status, "/status")
    api.add_resource(Live, "/livez")
    api.add_resource(Ready, "/readyz")
    api.add_resource(Metrics, "/metrics")
    api.add_resource(Description, "/openapi.json")
    api.add_resource(Page, "/ui")
    if flows:  # a control action: not on the watching endpoints of a node without REST
        api.add_resource(MigrateModule, "/modules/<string:module>/migrate")
    return app




JSON_HEADERS = [("Content-Type", "application/json")]


class RestEntrypoint(Entrypoint):
    """An entry point of the node (core/lifecycle.py): an HTTP server on the
    node's loop (http/server.py). A flow request (`POST rest.endpoint`) is read,
    admitted and answered on the loop, as the MQTT entry point does; every other
    route goes to the Flask app (`create_app`, the definition of the API) on a
    pool of `rest.threads` threads. `setup` binds the port (so a port in use
    stops the start), `stop` refuses new flow requests, waits (bounded) for
    those being served to be answered, then closes every connection."""

    name = "rest entry point"

    def __init__(self, config: Config, engine: FlowEngine, status: Callable[[], dict[str, Any]] | None = None,
                 readiness: Callable[[], dict[str, Any]] | None = None,
                 lb_answer: Callable[[], dict[str, Any]] | None = None, reuse_port: bool = False,
                 metrics: Callable[[], bytes] | None = None, flows: bool = True,
                 move_module: Callable[[str, str], concurrent.futures.Future[Any]] | None = None) -> None:
        self.config = config
        self.flows = flows
        if not flows:  # the watching endpoints of a node without REST: not an entry point for flows
            self.name = "http (health, status, metrics)"
        self.reuse_port = reuse_port
        self.engine = engine
        # flow requests wait on the loop, not in threads: as many as the engine admits (its queue_depth)
        self.slots = FlowSlots()
        self.app = create_app(config, engine, self.slots, status, readiness, lb_answer, metrics, flows, move_module)
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.server: HttpServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def port(self) -> int:
        return self.server.port if self.server is not None else self.config.rest.port

    async def setup(self) -> None:
        rest = self.config.rest
        self.loop = asyncio.get_running_loop()
        sock = None
        if self.reuse_port:  # one port for every worker of the node: the kernel spreads connections
            sock = socket.socket(socket.AF_INET6 if ":" in rest.host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((rest.host, rest.port))
        self.server = HttpServer(self._handle, self._error_body, max_body=rest.max_body_bytes,
                                 max_connections=rest.max_connections, idle_timeout_s=rest.idle_timeout_s)
        await self.server.bind(rest.host, rest.port, sock)
        self.pool = concurrent.futures.ThreadPoolExecutor(rest.threads + SPARE_THREADS, thread_name_prefix="rest")

    async def start(self) -> None:
        assert self.server is not None
        await self.server.serve()
        what = self.config.rest.endpoint if self.flows else " (/health, /livez, /readyz, /status, /metrics, /ui)"
        log.info("REST on http://%s:%s%s", self.config.rest.host, self.server.port, what)

    def _error_body(self, status: int, message: str, path: str) -> bytes:
        """What the server answers itself, as the Flask app would: a body over
        rest.max_body_bytes (a flow request's refusal, counted), a malformed
        request or too many connections (the contract's plain errors)."""
        if status == 413:
            flow = self.flows and path == self.config.rest.endpoint
            if not flow:
                message = f"body larger than {self.config.rest.max_body_bytes} bytes"
            result = error_result(None, self.engine.node, BadRequest(message))
            if flow:
                self.engine.refused("rest", result)
            return result.to_json()
        code = "bad_request" if status < 500 else "internal_error" if status == 500 else "overloaded"
        return _plain_error_bytes(code, message)

    # ----- one request (on the loop) ---------------------------------------------------------------
    def _handle(self, req: HttpRequest, reply: Reply) -> None:
        rest = self.config.rest
        if self.flows and req.method == "POST" and req.path == rest.endpoint:
            self._flow(req, reply)
        else:
            self._to_flask(req, reply)

    def _flow(self, http: HttpRequest, reply: Reply) -> None:
        """`POST rest.endpoint`, answered as the Flask app's StartFlow answers it."""
        rest, engine = self.config.rest, self.engine
        if rest.token is not None and not bearer_ok(http.headers.get("authorization", ""), rest.token):
            code, message, status = UNAUTHORIZED
            reply(status, JSON_HEADERS, _plain_error_bytes(code, message))
            return
        length = http.headers.get("content-length")
        read = read_flow_request(engine, rest.max_body_bytes, int(length) if length and length.isdigit() else None,
                                 http.body, http.headers.get("traceparent"), http.remote)
        if isinstance(read, tuple):
            result, status = read
            engine.refused("rest", result)
            reply(status, JSON_HEADERS, result.to_json())
            return
        req = read
        req.received = http.received
        if not self.slots.try_take():
            reply(503, JSON_HEADERS, overloaded(self.slots, engine, req).to_json())
            return

        def done(result: Result) -> None:
            self.slots.give_back()
            reply(result.http_status, JSON_HEADERS, result.to_json())

        engine.accept(req, done)

    def _to_flask(self, req: HttpRequest, reply: Reply) -> None:
        """Any other route: the Flask app, on a thread of the pool."""
        assert self.pool is not None and self.loop is not None
        rest = self.config.rest
        environ = wsgi_environ(req, rest.host, self.port)
        loop = self.loop

        def answered(fut: concurrent.futures.Future[tuple[int, list[tuple[str, str]], bytes]]) -> None:
            try:
                status, headers, body = fut.result()
            except Exception as exc:
                log.exception("%s %s failed", req.method, req.path)
                status, headers = 500, JSON_HEADERS
                body = _plain_error_bytes("internal_error", f"{type(exc).__name__}: {short(str(exc), 200)}")
            try:
                loop.call_soon_threadsafe(reply, status, headers, body)
            except RuntimeError:
                pass  # the loop closed: the node is gone, and the connection with it

        try:
            self.pool.submit(call_wsgi, self.app, environ).add_done_callback(answered)
        except RuntimeError:  # the pool is shut down: the node is stopping
            reply(503, JSON_HEADERS, _plain_error_bytes("overloaded", "node is stopping"))

    # ----- stopping ----------------------------------------------------------------------------------
    async def stop(self) -> None:
        if self.server is None:
            return
        # New flow requests are answered 503 and /readyz says "draining" while the
        # accepted ones finish; then the listener closes.
        self.slots.draining = True
        if not await wait_until(lambda: not self.slots.busy, self.config.runtime.drain_timeout_s):
            log.warning("stop: %d REST requests still unanswered", self.slots.busy)
        self.server.close_listener()
        await wait_until(lambda: self.server is None or not self.server.unsent(), 1.0)
        self.kill()

    def kill(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.close_all()
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _plain_error_bytes(code: str, message: str) -> bytes:
    return orjson.dumps({"status": "error", "error": {"code": code, "message": message, "step": None}})
