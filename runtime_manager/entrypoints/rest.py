"""REST entry point: Flask + Flask-RESTful on waitress, the same requests as MQTT.

`POST <rest.endpoint>` (default /startrm) runs a flow and answers its result;
`GET /health` answers {"status": "ok"} (as the original); `GET /livez` says the
process serves, `GET /readyz` whether it takes requests (503 with the reasons
when not); `GET /status` shows the node and its view of its peers;
`GET /lb/id_node` (`rest.lb_endpoint`) makes the node a load balancer for
others in the original protocol; `GET /metrics` serves Prometheus metrics and
`GET /openapi.json` describes all of it (`openapi.py`); `GET /ui` is a live
status page (`ui.html`, which reads `/status` and `/readyz`). With `rest.token` set, every request needs `Authorization: Bearer`.

Backpressure: at most `rest.threads` flow requests are served at once; waitress
has two threads more, so a thread is always free for `/health` and for
answering a flow request that cannot be served `503 overloaded` at once. A
waitress thread waits only for a flow the engine has admitted: admission is
decided at once, on the loop.
"""

from __future__ import annotations

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
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask
from werkzeug.exceptions import HTTPException

from ..config import Config
from ..core.errors import BadRequest, Overloaded, Timeout
from ..core.lifecycle import Entrypoint, wait_until
from ..core.request import parse_request
from ..core.result import Result, error_result
from ..engine import FlowEngine
from ..logs import short
from .openapi import api_description

log = logging.getLogger("api")
UI_PAGE = (Path(__file__).parent / "ui.html").read_bytes()
SPARE_THREADS = 2  # waitress threads that never wait for a flow


def _json(body: dict[str, Any], status: int) -> Response:
    return Response(orjson.dumps(body), status=status, mimetype="application/json")


def _plain_error(code: str, message: str, status: int) -> Response:
    """Errors that are not about a flow request (auth, routing)."""
    return _json({"status": "error", "error": {"code": code, "message": message, "step": None}}, status)


class _Api(Api):
    """Flask-RESTful answers HTTP errors in its own format; hand them back to
    Flask's error handlers, which answer in the contract's."""

    def handle_error(self, e: Exception) -> Response:
        raise e


class FlowSlots:
    """How many flow requests REST serves at once; `try_take` never waits."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.busy = 0
        self.draining = False
        self._lock = threading.Lock()

    def try_take(self) -> bool:
        with self._lock:
            if self.busy >= self.size or self.draining:
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
            length = request.content_length
            if length is not None and length > rest.max_body_bytes:
                too_big = BadRequest(f"body of {length} bytes is larger than {rest.max_body_bytes}")
                return _refused(error_result(None, engine.node, too_big), 413)
            body = request.get_data(cache=False)
            try:
                req = parse_request(body, via="rest")
                if engine.tracer is not None:
                    req.traceparent = request.headers.get("traceparent")
            except BadRequest as exc:
                log.warning("bad request from %s: %s (body: %s)", request.remote_addr, exc.message, short(body))
                return _refused(error_result(None, engine.node, exc), 400)
            if not slots.try_take():
                why = "node is stopping" if slots.draining else f"all {slots.size} REST flow slots are busy (rest.threads)"
                return _json(error_result(req, engine.node, Overloaded(why)).to_dict(), 503)
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
        def get(self) -> Response:  # the process serves (a spare waitress thread answers)
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
        scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
        # the scheme is case-insensitive (RFC 7235), the token is compared exactly
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            return _plain_error("unauthorized", "missing or wrong bearer token", 401)
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


class JsonErrorTask(ErrorTask):
    """waitress's own error answers (a body over its limit, a malformed request)
    in the contract's JSON instead of plain text."""

    def execute(self) -> None:
        e = self.request.error
        code = "bad_request" if e.code < 500 else "internal_error"
        body = orjson.dumps({"status": "error", "error": {"code": code, "message": f"{e.reason}: {e.body}", "step": None}})
        self.status = f"{e.code} {e.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class JsonErrorChannel(HTTPChannel):
    error_task_class = JsonErrorTask


class RestEntrypoint(Entrypoint):
    """An entry point of the node (core/lifecycle.py): the app on waitress, whose I/O runs in a thread
    of its own. `setup` binds the port (so a port in use stops the start), `stop`
    refuses new flow requests, waits (bounded) for those being served to be
    answered, then closes every connection."""

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
        self.slots = FlowSlots(config.rest.threads)
        self.app = create_app(config, engine, self.slots, status, readiness, lb_answer, metrics, flows, move_module)
        self.server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server.effective_port) if self.server is not None else self.config.rest.port

    async def setup(self) -> None:
        from waitress.server import create_server

        rest = self.config.rest
        where: dict[str, Any] = {"host": rest.host, "port": rest.port}
        if self.reuse_port:  # one port for every worker of the node: the kernel spreads connections
            sock = socket.socket(socket.AF_INET6 if ":" in rest.host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((rest.host, rest.port))
            where = {"sockets": [sock]}
        self.server = create_server(
            self.app, **where, threads=rest.threads + SPARE_THREADS,
            max_request_body_size=rest.max_body_bytes, ident="runtime-manager",
            connection_limit=rest.max_connections, channel_timeout=rest.idle_timeout_s,
        )
        self.server.channel_class = JsonErrorChannel

    async def start(self) -> None:
        self._thread = threading.Thread(target=self.server.run, name="rest", daemon=True)
        self._thread.start()
        what = self.config.rest.endpoint if self.flows else " (/health, /livez, /readyz, /status, /metrics, /ui)"
        log.info("REST on http://%s:%s%s", self.config.rest.host, self.server.effective_port, what)

    async def stop(self) -> None:
        if self.server is None:
            return
        # New flow requests are answered 503 and /readyz says "draining" while the
        # accepted ones finish; then the listener closes.
        self.slots.draining = True
        if not await wait_until(lambda: not self.slots.busy, self.config.runtime.drain_timeout_s):
            log.warning("stop: %d REST requests still unanswered", self.slots.busy)
        # answers written by the waitress thread: let them leave before the connections close
        self._close_listener()
        await wait_until(lambda: not self._unsent(), 1.0)
        self.kill()

    def kill(self) -> None:
        if self.server is None:
            return
        server, self.server = self.server, None

        def close_all() -> None:  # on waitress's I/O thread, whose loop then ends
            import waitress.wasyncore as wasyncore

            wasyncore.close_all(server._map)

        try:
            server.trigger.pull_trigger(close_all)
        except Exception:
            log.debug("closing REST connections failed", exc_info=True)
        try:
            server.task_dispatcher.shutdown(cancel_pending=True, timeout=1)
        except Exception:
            log.debug("waitress dispatcher shutdown failed", exc_info=True)
        if self._thread is not None:
            self._thread.join(2)

    def _close_listener(self) -> None:
        """Refuse new connections; the open ones are still served."""
        import waitress.wasyncore as wasyncore

        server = self.server

        def close() -> None:
            wasyncore.dispatcher.close(server)  # the listening socket only, not the trigger

        try:
            server.trigger.pull_trigger(close)
        except Exception:
            log.debug("closing the REST listener failed", exc_info=True)

    def _unsent(self) -> bool:
        channels = list(getattr(self.server, "_map", {}).values())
        return any(getattr(ch, "total_outbufs_len", 0) for ch in channels)
