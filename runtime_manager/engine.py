"""The flow engine: runs flows for requests, knowing nothing of MQTT or REST.

One asyncio event loop (uvloop when installed) in its own thread runs a fixed
set of worker coroutines over a bounded queue. Entry points hand requests over
from their own threads with `submit` (fire and forget, a callback gets the
result) or `run` (wait for the result). A full queue answers `overloaded` at
once instead of growing. Every failure of one request is caught at that
request's boundary, logged with the request named and turned into an error
result, so one bad request never stops a worker.

Lifecycle, as every moving part here: `start`, `stop` (graceful: stop taking
requests, finish those accepted, bounded), `kill` (urgent).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

from .config import Config, WasmComponent
from .drivers import StepIO, call_component
from .errors import FlowFailure, InternalError, Overloaded, Timeout, UnknownFlow
from .flows import Flow, Payload, Post
from .placement import Placement
from .request import FlowRequest, error_result, ok_result

log = logging.getLogger("flow")

Done = Callable[[dict[str, Any]], None]


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is in requirements.txt on Linux
        return asyncio.new_event_loop()


class FlowEngine:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.node = config.node_name
        self.rt = config.runtime
        self.loop = _new_loop()
        self._thread = threading.Thread(target=self._run_loop, name="flow-engine", daemon=True)
        self._queue: asyncio.Queue[tuple[FlowRequest, Done]] | None = None
        self._workers: list[asyncio.Task] = []
        self._accepting = False
        self.active = 0
        self.counts = {"accepted": 0, "ok": 0, "error": 0, "overloaded": 0}
        self.io: StepIO | None = None
        self.placement: Placement | None = None

    # ----- lifecycle -------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._setup(), self.loop)
        fut.result(timeout=30)
        self._accepting = True
        log.info("engine started: %d workers, queue of %d, node %s", self.rt.workers, self.rt.queue_depth, self.node)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def _setup(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.rt.queue_depth)
        connector = aiohttp.TCPConnector(limit=max(100, self.rt.workers * 2), ttl_dns_cache=60)
        session = aiohttp.ClientSession(connector=connector)
        self.io = StepIO(session=session)
        if any(isinstance(c, WasmComponent) for c in self.config.components.values()):
            from .wasm import WasmRunner

            self.io.wasm = WasmRunner(self.config.components.values(), threads=self.rt.wasm_threads)
        self.placement = Placement(self.config, session)
        self._workers = [self.loop.create_task(self._worker(i)) for i in range(self.rt.workers)]
        if self.rt.heartbeat_interval_ms > 0:
            self._workers.append(self.loop.create_task(self._heartbeat()))

    def stop(self, timeout: float | None = None) -> bool:
        """Stop taking requests, finish the accepted ones (bounded wait), close.
        Returns True when every accepted request was finished."""
        drained = self.drain(timeout)
        self.close()
        return drained

    def drain(self, timeout: float | None = None) -> bool:
        """Stop taking requests and wait (bounded) for the accepted ones to finish."""
        if not self._thread.is_alive():
            return True
        self._stop_accepting()
        timeout = self.rt.drain_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        drained = False
        while time.monotonic() < deadline:
            if self.pending() == 0:
                drained = True
                break
            time.sleep(0.01)
        if not drained:
            log.warning("stop: %d requests still unfinished after %.1f s", self.pending(), timeout)
        return drained

    def close(self) -> None:
        if self._thread.is_alive():
            self._shutdown()

    def kill(self) -> None:
        if not self._thread.is_alive():
            return
        self._accepting = False
        self._shutdown()

    def _stop_accepting(self) -> None:
        # Through the loop, so that requests handed over before this call are
        # still accepted (call_soon_threadsafe keeps order).
        flipped = threading.Event()

        def flip() -> None:
            self._accepting = False
            flipped.set()

        self.loop.call_soon_threadsafe(flip)
        flipped.wait(5)

    def _shutdown(self) -> None:
        async def close() -> None:
            for task in self._workers:
                task.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)
            if self.io is not None:
                await self.io.session.close()
                if self.io.wasm is not None:
                    self.io.wasm.close()

        try:
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=5)
        except (concurrent.futures.TimeoutError, RuntimeError):
            log.warning("engine did not close in time")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        log.info("engine stopped: %s", self.counts)

    # ----- taking requests (any thread) --------------------------------------
    def pending(self) -> int:
        return (self._queue.qsize() if self._queue else 0) + self.active

    @property
    def accepting(self) -> bool:
        return self._accepting

    def accept(self, req: FlowRequest, done: Done) -> None:
        """Queue a request; on the engine thread only (entry points whose I/O runs on `loop`)."""
        self._enqueue(req, done)

    def submit(self, req: FlowRequest, done: Done) -> None:
        """Hand a request over from any thread; `done(result)` is called on the
        engine thread with its one result."""
        self.loop.call_soon_threadsafe(self._enqueue, req, done)

    def run(self, req: FlowRequest, timeout: float | None = None) -> dict[str, Any]:
        """Run a request and wait for its result (for threads like Flask's)."""
        fut: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        self.submit(req, fut.set_result)
        wait = timeout if timeout is not None else self.rt.task_timeout_ms / 1000 + 5
        try:
            return fut.result(timeout=wait)
        except concurrent.futures.TimeoutError:
            return error_result(req, self.node, Timeout(f"no result within {wait:.1f} s"))

    def _enqueue(self, req: FlowRequest, done: Done) -> None:
        assert self._queue is not None
        if not self._accepting:
            self._finish(done, error_result(req, self.node, Overloaded("node is shutting down")))
            return
        try:
            self._queue.put_nowait((req, done))
        except asyncio.QueueFull:
            self.counts["overloaded"] += 1
            log.warning("request %s (flow %s): queue full (%d), answered overloaded", req.request_id, req.id_flow, self.rt.queue_depth)
            self._finish(done, error_result(req, self.node, Overloaded(f"queue full ({self.rt.queue_depth} requests waiting)")))
            return
        self.counts["accepted"] += 1

    def _finish(self, done: Done, result: dict[str, Any]) -> None:
        try:
            done(result)
        except Exception:
            log.exception("request %s: delivering the result failed", result.get("request_id"))

    # ----- running requests (engine thread) ----------------------------------
    async def _worker(self, n: int) -> None:
        assert self._queue is not None
        while True:
            req, done = await self._queue.get()
            self.active += 1
            try:
                result = await self.handle(req)
            finally:
                self.active -= 1
            self.counts[result["status"]] += 1
            self._finish(done, result)

    async def handle(self, req: FlowRequest) -> dict[str, Any]:
        """One request to one result; never raises. Placement, forwarding and the
        flow together are bounded by task_timeout_ms."""
        placement: dict[str, Any] = {}
        timeout_s = self.rt.task_timeout_ms / 1000
        try:
            try:
                async with asyncio.timeout(timeout_s):  # no extra task per request, unlike wait_for
                    return await self._place_and_run(req, placement)
            except TimeoutError:
                raise Timeout(f"request for flow '{req.id_flow}' did not finish within {timeout_s:g} s (task_timeout_ms)") from None
        except FlowFailure as failure:
            log.warning("request %s (flow %s) failed: %s: %s", req.request_id, req.id_flow, failure.code, failure.message)
            return error_result(req, self.node, failure, placement or None)
        except Exception as exc:
            log.exception("request %s (flow %s): unexpected error", req.request_id, req.id_flow)
            return error_result(req, self.node, InternalError(f"{type(exc).__name__}: {exc}"), placement or None)

    async def _place_and_run(self, req: FlowRequest, placement: dict[str, Any]) -> dict[str, Any]:
        assert self.placement is not None
        node, decided = await self.placement.choose(req)
        placement.update(decided)
        if node is not None:
            forwarded = await self.placement.forward(node, req, placement)
            if forwarded is not None:
                return forwarded
        flow = self.config.flows.get(req.id_flow)
        if flow is None:
            raise UnknownFlow(f"flow '{req.id_flow}' is not defined in flows.conf")
        results = await self.run_flow(flow, req.payload)
        return ok_result(req, self.node, results, placement)

    async def run_flow(self, flow: Flow, payload: Any) -> list[Any]:
        """Run the calls of one flow in order; response N becomes resultN."""
        assert self.io is not None
        results: list[Any] = []
        for call in flow.calls:
            body = None
            if isinstance(call.step, Post):
                args = [payload if isinstance(a, Payload) else results[a.n - 1] for a in call.step.args]
                body = orjson.dumps({"payload": args})
            results.append(await call_component(call.component, call.step, call, body, self.io))
        return results

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.rt.heartbeat_interval_ms / 1000)
            log.info("heartbeat: %s", self.status())

    def status(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "accepting": self._accepting,
            "in_flight": self.active,
            "queued": self._queue.qsize() if self._queue else 0,
            "queue_depth": self.rt.queue_depth,
            "workers": self.rt.workers,
            **self.counts,
        }
