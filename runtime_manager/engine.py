"""The flow engine: runs flows for requests, knowing nothing of MQTT or REST.

It lives on the node's one event loop: a fixed set of worker coroutines over a
bounded queue. Entry points hand requests over with `accept` (on the loop) or
`submit_threadsafe` (from another thread, such as a REST worker); either way a
request is admitted at once or answered `overloaded` at once, never parked in
front of the queue. Every failure of one request is caught at that request's
boundary, logged with the request named and turned into an error result, so
one bad request never stops a worker.

Each request takes the path entry point -> placement (home or a peer) ->
flow steps (drivers) -> one `Result`, bounded as a whole by `task_timeout_ms`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson

from .cluster.placement import Placer
from .config import Config
from .core.deadlines import Deadlines
from .core.errors import FlowFailure, InternalError, Overloaded, Timeout, UnknownFlow
from .core.events import REQUEST_DONE, REQUEST_REFUSED, Events
from .core.flows import Flow
from .core.lifecycle import Service, wait_until
from .core.request import FlowRequest
from .core.result import Placement, Result, error_result, ok_result
from .core.tracecontext import OUTGOING
from .drivers import StepIO
from .program import FlowRunner, Outcome, Publisher
from .tracing.otlp import label
from .tracing.spans import CLIENT, CONSUMER, INTERNAL, SERVER, RequestSpan, Tracer

log = logging.getLogger("flow")

Done = Callable[[Result], None]


class FlowEngine(Service):
    """A service of the node (core/lifecycle.py): `setup` makes the queue,
    `start` starts the workers, `stop` stops taking requests and lets the
    accepted ones finish (bounded by `drain_timeout_s`), `kill` cancels.

    What it works with is handed in by the node: `io`, what the step drivers
    share (the HTTP client, the WebAssembly steps); `placer`, where a request
    runs; `events`, the node's one bus (REQUEST_DONE for every result,
    REQUEST_REFUSED for every request that could not be read, STEP_DONE for
    every component call); `tracer`, the node's spans (None: tracing off)."""

    name = "engine"

    def __init__(self, config: Config, io: StepIO, placer: Placer, events: Events, tracer: Tracer | None = None,
                 publish: Publisher | None = None) -> None:
        self.config = config
        self.tracer = tracer  # None: tracing is off
        self.publish = publish  # the node's MQTT link (PUBLISH steps, dead letters); None: this process has none
        self.runner = FlowRunner(io, events, publish)
        self.node = config.node_name
        self.rt = config.runtime
        self.io, self.placer, self.events = io, placer, events
        self.loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[tuple[FlowRequest, Done]] | None = None
        self._workers: list[asyncio.Task] = []
        self._deadlines = Deadlines()  # the workers' requests' task_timeout_ms, one timer for all
        self._accepting = False
        self.active = 0
        self.counts: Counter[str] = Counter(accepted=0, ok=0, error=0, overloaded=0, bad_request=0)
        self.by_entrypoint: Counter[str] = Counter()

    # ----- lifecycle (on the loop) ---------------------------------------------
    async def setup(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(maxsize=self.rt.queue_depth)

    async def reconfigure(self, config: Config) -> None:
        """A reload (on the loop): new requests use `config` (flows, timeouts,
        placement) from now on; those already taken finish on the one they
        started with."""
        self.config, self.rt = config, config.runtime
        self.placer.reconfigure(config)

    async def start(self) -> None:
        assert self.loop is not None
        self._workers = [self.loop.create_task(self._worker(), name=f"flow-worker-{i}") for i in range(self.rt.workers)]
        self._accepting = True
        log.info("engine started: %d workers, queue of %d, node %s", self.rt.workers, self.rt.queue_depth, self.node)

    async def stop(self) -> None:
        """Stop taking requests, finish the accepted ones (bounded), end the workers."""
        await self.drain()
        self.kill()
        log.info("engine stopped: %s", dict(self.counts))

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop taking requests and wait (bounded) for the accepted ones to finish.
        Returns True when every accepted request finished."""
        self._accepting = False
        timeout = self.rt.drain_timeout_s if timeout is None else timeout
        if not await wait_until(lambda: not self.pending(), timeout):
            log.warning("stop: %d requests still unfinished after %.1f s", self.pending(), timeout)
            return False
        return True

    def kill(self) -> None:
        self._accepting = False
        for task in self._workers:
            task.cancel()
        self._workers = []

    # ----- taking requests ---------------------------------------------------------
    def pending(self) -> int:
        return (self._queue.qsize() if self._queue else 0) + self.active

    @property
    def accepting(self) -> bool:
        return self._accepting

    def accept(self, req: FlowRequest, done: Done) -> None:
        """Admit a request or answer it at once (on the loop). `done(result)` is
        called exactly once, on the loop."""
        if not self._accepting or self._queue is None:
            self._finish(req, done, error_result(req, self.node, Overloaded("node is not taking requests (stopping)")))
            return
        try:
            self._queue.put_nowait((req, done))
        except asyncio.QueueFull:
            self.counts["overloaded"] += 1
            log.warning("request %s (flow %s): queue full (%d), answered overloaded", req.request_id, req.id_flow, self.rt.queue_depth)
            self._finish(req, done, error_result(req, self.node, Overloaded(f"queue full ({self.rt.queue_depth} requests waiting)")))
            return
        self.counts["accepted"] += 1
        self.by_entrypoint[req.via] += 1

    def submit_threadsafe(self, req: FlowRequest) -> concurrent.futures.Future[Result]:
        """From any other thread: the future gets the result (`overloaded` at once
        when the request cannot be admitted)."""
        fut: concurrent.futures.Future[Result] = concurrent.futures.Future()

        def done(result: Result) -> None:
            if not fut.done():
                fut.set_result(result)

        if self.loop is None or self.loop.is_closed():
            done(error_result(req, self.node, Overloaded("node is not running")))
            return fut
        try:
            self.loop.call_soon_threadsafe(self.accept, req, done)
        except RuntimeError:  # the loop closed meanwhile
            done(error_result(req, self.node, Overloaded("node is not running")))
        return fut

    def refused(self, via: str, result: Result) -> None:
        """An entry point could not read a request (`bad_request`) and answered it
        itself: counted, and told to whoever listens, like every other result."""
        self.counts["bad_request"] += 1
        self.by_entrypoint[via] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request %s via %s refused: %s", result.request_id, via, (result.error or {}).get("message"))
        self.events.emit(REQUEST_REFUSED, via, result)

    def refused_threadsafe(self, via: str, result: Result) -> None:
        """`refused` from any other thread (a REST worker)."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self.refused, via, result)
            except RuntimeError:
                pass  # the loop closed meanwhile: nobody is left to count it

    def _finish(self, req: FlowRequest, done: Done, result: Result, span: RequestSpan | None = None) -> None:
        if span is not None:
            result.trace_id = span.trace_hex
        if log.isEnabledFor(logging.DEBUG):  # one line per request
            where = result.placement.chosen if result.placement is not None else "home"
            log.debug("request %s flow %s via %s ran %s: %s in %.1f ms%s", req.request_id, req.id_flow, req.via, where,
                      result.code or "ok", (time.perf_counter() - req.received) * 1000,
                      f" (trace {result.trace_id})" if result.trace_id else "")
        self.events.emit(REQUEST_DONE, req, result)
        if result.error is not None and self.rt.dead_letter_topic and result.node == self.node:
            self._dead_letter(req, result)
        handing = time.time_ns() if span is not None else 0
        try:
            done(result)
        except Exception:
            log.exception("request %s: delivering the result failed", req.request_id)
        if span is not None and span.sampled:
            span.record(RESULT_SPAN, span.child_id(), handing)
            span.end(error=f"{result.code}: {(result.error or {}).get('message', '')}" if result.error else None,
                     attributes={"rm.node": result.node})

    def _dead_letter(self, req: FlowRequest, result: Result) -> None:
        """A request that ended in an error, with its error, to runtime.conf
        `dead_letter_topic` (QoS 1). A failure to publish is logged, never the request's."""
        topic = self.rt.dead_letter_topic
        if self.publish is None or topic is None:
            return
        letter = {"request": {"request_id": req.request_id, "id_flow": req.id_flow, "payload": req.payload,
                              "via": req.via},
                  "error": result.error, "node": self.node, "at": round(time.time(), 3)}
        if result.trace_id is not None:
            letter["trace_id"] = result.trace_id
        try:
            self.publish(topic, orjson.dumps(letter, option=orjson.OPT_NON_STR_KEYS), 1, False)
        except Exception as exc:
            log.error("request %s: its dead letter could not be published on %r: %s", req.request_id, topic, exc)

    # ----- running requests (on the loop) ------------------------------------------
    async def _worker(self) -> None:
        assert self._queue is not None
        while True:
            req, done = await self._queue.get()
            self.active += 1
            span = self._request_span(req) if self.tracer is not None else None
            try:
                result = await self.handle(req, span)
            finally:
                self.active -= 1
            self.counts[result.status] += 1
            self._finish(req, done, result, span)

    def _request_span(self, req: FlowRequest) -> RequestSpan:
        """The request's span, from its arrival (it joins the trace it came with),
        and its wait in the queue (`accept`), ended now."""
        assert self.tracer is not None
        now = time.time_ns()
        arrived = now - int((time.perf_counter() - req.received) * 1e9)
        kind = SERVER if req.via == "rest" else CONSUMER if req.via == "mqtt" else INTERNAL
        span = self.tracer.start_trace(req.traceparent, start_ns=arrived)
        if span.sampled:  # what it is called and carries: made only when it is sent
            span.label = label(f"flow {req.id_flow}", kind, {"rm.flow": req.id_flow, "rm.via": req.via,
                                                             "rm.forwarded": req.is_load_balancing})
            span.attributes = {"rm.request_id": req.request_id}
        span.record(ACCEPT_SPAN, span.child_id(), arrived, now)
        return span

    async def handle(self, req: FlowRequest, span: RequestSpan | None = None) -> Result:
        """One request to one result; never raises. Placement, forwarding and the
        flow together are bounded by task_timeout_ms. `span`: the request's, when
        tracing is on (placement, a forward and each step get one inside it)."""
        placement: Placement | None = None
        config, placer = self.config, self.placer  # a reload meanwhile does not change this request
        timeout_s = config.runtime.task_timeout_ms / 1000
        assert self.loop is not None
        task = asyncio.current_task(self.loop)  # the loop given: asking asyncio for it is a system call on 3.11
        assert task is not None
        self._deadlines.start(task, self.loop, timeout_s)
        try:
            try:
                placing = time.time_ns() if span is not None else 0
                placement, peer = await placer.decide(req, self.home_load())
                if span is not None and span.sampled:
                    span.record(PLACEMENT_SPAN, span.child_id(), placing, attributes={
                        "rm.placement.asked": placement.asked,
                        "rm.placement.chosen": placement.chosen if peer is None else f"node {peer.id}",
                        "rm.placement.reason": placement.reason})
                if peer is not None:
                    forwarded = await self._forward(placer, peer, req, placement, self._deadlines.due(task), span)
                    if forwarded is not None:
                        return forwarded
                flow = config.flows.get(req.id_flow)
                if flow is None:
                    raise UnknownFlow(f"flow '{req.id_flow}' is not defined in flows.conf")
                if flow.plain:  # TO, GET and POST only: the list, as the original's flows always ran
                    return ok_result(req, self.node, await self.runner.run_plain(flow, req.payload, span), placement)
                outcome = await self.runner.run(flow, req.payload, span, config.flows)
                return ok_result(req, self.node, outcome.results, placement, outcome.answer)
            except asyncio.CancelledError:
                if not self._deadlines.expired(task):
                    raise  # the node is stopping
                raise Timeout(f"request for flow '{req.id_flow}' did not finish within {timeout_s:g} s (task_timeout_ms)") from None
            finally:
                self._deadlines.end(task)
        except FlowFailure as failure:
            log.warning("request %s (flow %s) failed: %s: %s%s", req.request_id, req.id_flow, failure.code, failure.message,
                        f" (trace {span.trace_hex})" if span is not None else "")
            return error_result(req, self.node, failure, placement)
        except Exception as exc:
            log.exception("request %s (flow %s): unexpected error", req.request_id, req.id_flow)
            return error_result(req, self.node, InternalError(f"{type(exc).__name__}: {exc}"), placement)

    async def _forward(self, placer: Placer, peer: Any, req: FlowRequest, placement: Placement, deadline: float,
                       span: RequestSpan | None) -> Result | None:
        """`placer.forward`, in a span of its own whose context travels to the peer."""
        if span is None:
            return await placer.forward(peer, req, placement, deadline)
        forwarding, started = span.child_id(), time.time_ns()
        token = OUTGOING.set(span.context_of(forwarding))
        attributes: dict[str, Any] = {"rm.peer": peer.id}
        forwarded, error = None, None
        try:
            forwarded = await placer.forward(peer, req, placement, deadline)
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            OUTGOING.reset(token)
            if error is None and forwarded is None:
                error = "ran at home instead: " + "; ".join(placement.tried)
            elif forwarded is not None:
                attributes["rm.peer.answered"] = forwarded.node
                error = f"{forwarded.code}" if forwarded.error else None
            span.record(label(f"forward to node {peer.id}", CLIENT), forwarding, started, attributes=attributes,
                        error=error)
        return forwarded

    async def run_flow(self, flow: Flow, payload: Any, span: RequestSpan | None = None) -> Outcome:
        """Run one flow of this configuration for `payload` (program.py)."""
        return await self.runner.run(flow, payload, span, self.config.flows)

    def load(self) -> float:
        """Flows in flight and queued per worker (what placement compares)."""
        return self.pending() / self.rt.workers

    def home_load(self) -> float:
        """The load a request being placed sees: what else runs and waits here."""
        return max(0, self.pending() - 1) / self.rt.workers

    def lb_answer(self) -> dict[str, Any]:
        """`GET /lb/id_node`: this node as a load balancer for others (any thread).
        The question is no flow of this node: everything pending here counts."""
        return self.placer.lb_answer(self.pending() / self.rt.workers)

    def status(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "accepting": self._accepting,
            "in_flight": self.active,
            "queued": self._queue.qsize() if self._queue else 0,
            "queue_depth": self.rt.queue_depth,
            "workers": self.rt.workers,
            **self.counts,
            "by_entrypoint": dict(self.by_entrypoint),
        }


ACCEPT_SPAN, PLACEMENT_SPAN, RESULT_SPAN = label("accept", INTERNAL), label("placement", INTERNAL), label("result", INTERNAL)
