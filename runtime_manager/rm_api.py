"""REST entry point (Flask + Flask-RESTful on waitress): the same requests as MQTT.

    python -m runtime_manager.rm_api --config-dir config_files

`POST <rest.endpoint>` (default /startrm) runs a flow and answers its result;
`GET /health` answers {"status": "ok"}; `GET /status` shows the engine's
counters. With `rest.token` set, every request needs `Authorization: Bearer`.
"""

from __future__ import annotations

import hmac
import logging
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
from flask import Flask, Response, request
from flask_restful import Api, Resource

if __package__ in (None, ""):  # run as `python runtime_manager/rm_api.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime_manager.cli import base_parser, load_or_exit, wait_for_signal
from runtime_manager.config import Config
from runtime_manager.engine import FlowEngine
from runtime_manager.errors import HTTP_STATUS, BadRequest, Overloaded
from runtime_manager.logs import short
from runtime_manager.request import error_result, parse_request

log = logging.getLogger("api")


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


def create_app(config: Config, engine: FlowEngine) -> Flask:
    """The app factory: configuration as data, the engine handed in."""
    app = Flask("runtime_manager")
    rest = config.rest
    app.config["MAX_CONTENT_LENGTH"] = rest.max_body_bytes
    token = rest.token

    class StartFlow(Resource):
        def post(self) -> Response:
            length = request.content_length
            if length is not None and length > rest.max_body_bytes:
                too_big = BadRequest(f"body of {length} bytes is larger than {rest.max_body_bytes}")
                return _json(error_result(None, engine.node, too_big), 413)
            body = request.get_data(cache=False)
            try:
                req = parse_request(body)
            except BadRequest as exc:
                log.warning("bad request from %s: %s (body: %s)", request.remote_addr, exc.message, short(body))
                return _json(error_result(None, engine.node, exc), 400)
            if not engine.accepting:
                return _json(error_result(req, engine.node, Overloaded("node is shutting down")), 503)
            result = engine.run(req)
            status = 200 if result["status"] == "ok" else HTTP_STATUS.get(result["error"]["code"], 500)
            return _json(result, status)

    class Health(Resource):
        def get(self) -> Response:
            return _json({"status": "ok"}, 200)

    class Status(Resource):
        def get(self) -> Response:
            return _json(engine.status(), 200)

    @app.before_request
    def check_token() -> Response | None:
        if token is None:
            return None
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return _plain_error("unauthorized", "missing or wrong bearer token", 401)
        return None

    @app.errorhandler(413)
    def too_large(_exc: Exception) -> Response:
        return _json(error_result(None, engine.node, BadRequest(f"body larger than {rest.max_body_bytes} bytes")), 413)

    @app.errorhandler(404)
    def not_found(_exc: Exception) -> Response:
        return _plain_error("not_found", f"no route {request.path}", 404)

    @app.errorhandler(405)
    def wrong_method(_exc: Exception) -> Response:
        return _plain_error("method_not_allowed", f"{request.method} not allowed on {request.path}", 405)

    api = _Api(app)
    api.add_resource(StartFlow, rest.endpoint)
    api.add_resource(Health, "/health")
    api.add_resource(Status, "/status")
    return app


class RestEntrypoint:
    """The app on waitress, a production WSGI server, in a thread of its own."""

    def __init__(self, config: Config, engine: FlowEngine) -> None:
        from waitress.server import create_server

        self.config = config
        self.engine = engine
        self.app = create_app(config, engine)
        self.server = create_server(
            self.app, host=config.rest.host, port=config.rest.port, threads=config.rest.threads,
            max_request_body_size=config.rest.max_body_bytes * 2 + 1024 * 1024, ident="runtime-manager",
        )
        self._thread = threading.Thread(target=self.server.run, name="rest", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("REST on http://%s:%s%s", self.config.rest.host, self.server.effective_port, self.config.rest.endpoint)

    def stop(self) -> None:
        self.engine.stop()  # waiting requests get their results before the server closes
        self.server.close()

    def kill(self) -> None:
        self.engine.kill()
        self.server.close()


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("Runtime manager, REST entry point: runs flows posted to comm.conf rest.endpoint.")
    parser.add_argument("--port", type=int, help="overrides comm.conf rest.port")
    args = parser.parse_args(argv)
    config = load_or_exit(args)
    if args.port:
        config = replace(config, rest=replace(config.rest, port=args.port))
    engine = FlowEngine(config)
    engine.start()
    entry = RestEntrypoint(config, engine)
    entry.start()
    wait_for_signal(log)
    entry.stop()
    log.info("stopped")


if __name__ == "__main__":
    main()
