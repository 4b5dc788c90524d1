"""Fake component service, load balancer and peer node, all on one port.

For people (what Postman or curl users point at) and for the tests:

    python test/mock_services.py --port 6000 --lb-answer null

Routes (any method unless said):
  /LB/id_node      the load balancer: {"id_node": <--lb-answer>}; --lb-answer takes
                   null, a node id, or one of: http500, garbage (non-JSON), noid ({})
  /nodo<N>         a peer node: answers a result object as a runtime manager would
  /fail            HTTP 500
  /flaky           HTTP 503 to the first `flaky_failures` calls (set by /_control), then a component
  /hang            never answers (sleeps an hour)
  /text            plain text, not JSON
  /slow            answers after --slow-ms (default 1000)
  /zeros?n=N       N zero bytes as text (not JSON)
  /big?n=N         a JSON string of N characters
  /_control        POST {"lb_answer": ..., "delay_ms": ..., "slow_ms": ...} changes behaviour at run time
  /_stats          GET: how many calls each path had
  anything else    a component: {"endpoint": "<path>", "method": "...", "payload": <body's payload>}; a
                   JSON object without "payload" is echoed field by field beside endpoint and method
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import threading
from typing import Any

from aiohttp import web


class MockServices:
    def __init__(self, port: int = 0, host: str = "127.0.0.1", lb_answer: Any = None, delay_ms: int = 0) -> None:
        self.host, self.port = host, port
        self.lb_answer = lb_answer
        self.delay_ms = delay_ms
        self.slow_ms = 1000
        self.flaky_failures = 0  # /flaky answers HTTP 503 to this many calls first
        self.in_flight = 0
        self.peak_in_flight = 0
        self.calls: collections.Counter[str] = collections.Counter()
        self.bodies: list[tuple[str, Any]] = []
        self.traceparents: list[str] = []  # the W3C trace context of each call that carried one
        self.keep_bodies = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{path:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        self.calls[path] += 1
        if "traceparent" in request.headers:
            self.traceparents.append(request.headers["traceparent"])
        raw = await request.read()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        if self.keep_bodies:
            self.bodies.append((path, body))
        if path == "_control":
            for key in ("lb_answer", "delay_ms", "slow_ms", "flaky_failures"):
                if isinstance(body, dict) and key in body:
                    setattr(self, key, body[key])
            return web.json_response({"lb_answer": self.lb_answer, "delay_ms": self.delay_ms, "slow_ms": self.slow_ms})
        if path == "_stats":
            return web.json_response(dict(self.calls))
        if path.endswith("id_node"):
            if self.lb_answer == "http500":
                return web.Response(status=500, text="load balancer broke")
            if self.lb_answer == "garbage":
                return web.Response(text="<html>not json</html>", content_type="text/html")
            if self.lb_answer == "noid":
                return web.json_response({})
            return web.json_response({"id_node": self.lb_answer})
        if path.startswith("nodo"):
            req = body if isinstance(body, dict) else {}
            return web.json_response(
                {
                    "request_id": req.get("request_id"),
                    "id_flow": req.get("id_flow"),
                    "status": "ok",
                    "node": path[4:],
                    "results": [{"ran_on": path, "payload": req.get("payload"), "forwarded": req.get("is_load_balancing")}],
                }
            )
        if path == "fail":
            return web.Response(status=500, text="component exploded")
        if path == "flaky" and self.calls[path] <= self.flaky_failures:
            return web.Response(status=503, text=f"flaky: call {self.calls[path]} of {self.flaky_failures} failing")
        if path == "hang":
            await asyncio.sleep(3600)
        if path == "text":
            return web.Response(text="plain text answer")
        if path == "zeros":
            return web.Response(body=b"\0" * int(request.query.get("n", "0")), content_type="text/plain")
        if path == "big":
            return web.json_response("x" * int(request.query.get("n", "0")))
        if path == "slow":
            await asyncio.sleep(self.slow_ms / 1000)
        elif self.delay_ms:
            await asyncio.sleep(self.delay_ms / 1000)
        if isinstance(body, dict) and "payload" not in body:  # a body of its own (POST BODY): its fields echoed
            return web.json_response({"endpoint": path, "method": request.method, **body})
        payload = body.get("payload") if isinstance(body, dict) else body
        return web.json_response({"endpoint": path, "method": request.method, "payload": payload})

    # ----- run in a background thread (tests) ---------------------------------
    def start(self) -> MockServices:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.2)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
            self._loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="mock-services", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("mock services did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        loop = self._loop
        async def cleanup() -> None:
            await self._runner.cleanup()  # type: ignore[union-attr]
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        fut = asyncio.run_coroutine_threadsafe(cleanup(), loop)
        try:
            fut.result(5)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread:
                self._thread.join(5)
            self._loop = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _lb_answer(text: str) -> Any:
    if text == "null":
        return None
    return int(text) if text.isdigit() else text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6000)
    parser.add_argument("--lb-answer", default="null", help="null, a node id, http500, garbage or noid")
    parser.add_argument("--delay-ms", type=int, default=0, help="delay of every component answer")
    parser.add_argument("--slow-ms", type=int, default=1000, help="delay of /slow")
    args = parser.parse_args()
    services = MockServices(args.port, args.host, _lb_answer(args.lb_answer), args.delay_ms)
    services.keep_bodies = False
    services.slow_ms = args.slow_ms
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(f"mock services on http://{args.host}:{args.port} (load balancer answers {args.lb_answer})", flush=True)
    web.run_app(services.app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
