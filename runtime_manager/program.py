"""Running one flow's steps: the engine hands over a flow and a payload, and
gets back every request's answer (`Outcome.results`) or the answer the flow
chose (`RETURN`).

A plain flow (TO, GET and POST only, the language of the original FRACTAL
files) runs as a list, one request after another, as fast as before. Any
other runs its program: conditions (`IfBlock`), requests at once
(`ParallelBlock`), requests with options (retries, timeouts, optional), other
flows (`SubFlow`), `PUBLISH`, `RETURN`, `FAIL`, and the flow's `ON ERROR`
block when a step fails. `resultN` is the answer of the N-th request written
in the flow, null when it did not run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from .config import WasmComponent
from .core.errors import BadRequest, FlowFailed, FlowFailure, Timeout
from .core.events import STEP_DONE, Events
from .core.flows import Call, Condition, Fail, Flow, Get, IfBlock, Node, ParallelBlock, Post, Publish, Request, Return, SubFlow
from .core.result import NO_ANSWER
from .core.tracecontext import OUTGOING
from .core.values import Payload, evaluate, exists, refs_of
from .drivers import StepIO, call_component
from .tracing.otlp import label
from .tracing.spans import CLIENT, INTERNAL, RequestSpan

log = logging.getLogger("flow")

# (topic, payload, qos, retain): publishes on the node's MQTT link; raises ValueError for what MQTT cannot carry
Publisher = Callable[[str, bytes, int, bool], None]


@dataclass(slots=True)
class Outcome:
    """What a flow run gives: every request's answer, and the flow's own answer when it chose one."""

    results: list[Any]
    answer: Any = NO_ANSWER


@dataclass(slots=True)
class _Run:
    """One run of one flow (a sub-flow has its own)."""

    flow: Flow
    payload: Any
    results: list[Any]
    flows: dict[str, Flow]  # the configuration's, for RUN
    span: RequestSpan | None
    error: dict[str, Any] | None = None  # inside ON ERROR: the failure
    answer: Any = NO_ANSWER
    depth: int = 0
    ended: bool = field(default=False)

    def value(self, arg: Any) -> Any:
        return evaluate(arg, self.payload, self.results, self.error)


class FlowRunner:
    """Runs flows for the engine. `io`: what the step drivers share; `events`:
    STEP_DONE for every component call; `publish`: the node's MQTT link, for
    PUBLISH (None in a process without one: PUBLISH fails the step)."""

    def __init__(self, io: StepIO, events: Events, publish: Publisher | None = None) -> None:
        self.io, self.events, self.publish = io, events, publish

    async def run(self, flow: Flow, payload: Any, span: RequestSpan | None, flows: dict[str, Flow]) -> Outcome:
        if flow.plain:
            return Outcome(await self.run_plain(flow, payload, span))
        return await self._run(_Run(flow, payload, [None] * flow.size, flows, span))

    # ----- a plain flow: the requests in order ---------------------------------------------
    async def run_plain(self, flow: Flow, payload: Any, span: RequestSpan | None = None) -> list[Any]:
        """Run the calls of a plain flow in order; response N becomes resultN."""
        results: list[Any] = []
        for call in flow.calls:
            assert isinstance(call, Call)
            body = _body(call, payload, results, None)
            if span is not None:
                results.append(await self._traced_step(call, body, span))
                continue
            started, ok = time.perf_counter(), False
            try:
                results.append(await call_component(call.component, call.step, call, body, self.io))
                ok = True
            finally:
                self.events.emit(STEP_DONE, call.component.name, time.perf_counter() - started, ok)
        return results

    async def _traced_step(self, call: Call, body: bytes | None, span: RequestSpan) -> Any:
        """One step in a span of its own; an HTTP component gets its context (`traceparent`)."""
        step, started_ns = span.child_id(), time.time_ns()
        token = OUTGOING.set(span.context_of(step))
        started, ok, error = time.perf_counter(), False, None
        try:
            answer = await call_component(call.component, call.step, call, body, self.io)
            ok = True
            return answer
        except FlowFailure as failure:
            error = f"{failure.code}: {failure.message}"
            raise
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            OUTGOING.reset(token)
            span.record(_step_label(call), step, started_ns, error=error)
            self.events.emit(STEP_DONE, call.component.name, time.perf_counter() - started, ok)

    # ----- a program ------------------------------------------------------------------------
    async def _run(self, run: _Run) -> Outcome:
        flow = run.flow
        try:
            await self._block(flow.program, run)
        except FlowFailure as failure:
            if flow.catch is None:
                raise
            await self._catch(run, failure)
        return Outcome(run.results, run.answer)

    async def _catch(self, run: _Run, failure: FlowFailure) -> None:
        """ON ERROR: run with `error` set. Its RETURN answers the request, its
        FAIL is the request's error; otherwise the failure stands."""
        run.error = {**failure.to_dict(), "flow": run.flow.id}
        run.ended = False
        assert run.flow.catch is not None
        try:
            await self._block(run.flow.catch, run)
        except FlowFailed:
            raise  # FAIL in ON ERROR: the error the flow chose
        except FlowFailure as inner:
            log.warning("flow %s: its ON ERROR failed too (%s: %s); the first failure stands", run.flow.id,
                        inner.code, inner.message)
            raise failure from None
        if run.answer is NO_ANSWER:
            raise failure

    async def _block(self, nodes: tuple[Node, ...], run: _Run) -> None:
        for node in nodes:
            if run.ended:
                return
            if isinstance(node, (Call, SubFlow)):
                await self._request(node, run)
            elif isinstance(node, IfBlock):
                await self._block(node.then if self._holds(node.condition, run) else node.otherwise, run)
            elif isinstance(node, ParallelBlock):
                await self._parallel(node, run)
            elif isinstance(node, Publish):
                self._publish(node, run)
            elif isinstance(node, Return):
                run.answer, run.ended = run.value(node.value), True
            elif isinstance(node, Fail):
                raise FlowFailed(f"{node.message} (FAIL on line {node.line} of flow '{run.flow.id}')")

    async def _request(self, node: Request, run: _Run) -> None:
        """One request with its options: each attempt within TIMEOUT, RETRY
        with BACKOFF (doubling), OPTIONAL turning a last failure into null."""
        options = node.options
        for attempt in range(options.retries + 1):
            try:
                if options.timeout_ms is None:
                    run.results[node.number - 1] = await self._attempt(node, run)
                else:
                    try:
                        async with asyncio.timeout(options.timeout_ms / 1000):
                            run.results[node.number - 1] = await self._attempt(node, run)
                    except TimeoutError:
                        raise Timeout(f"request {node.number} ({_what(node)}) gave no answer within "
                                      f"{options.timeout_ms} ms (its TIMEOUT)", step=node.number,
                                      **_where(node)) from None
                return
            except BadRequest:
                raise  # the request's own fault: another attempt gives the same
            except FlowFailure as failure:
                if attempt < options.retries:
                    delay = options.backoff_ms * 2**attempt / 1000
                    log.warning("flow %s: request %d (%s) failed (%s: %s), attempt %d of %d in %.0f ms", run.flow.id,
                                node.number, _what(node), failure.code, failure.message, attempt + 2,
                                options.retries + 1, delay * 1000)
                    await asyncio.sleep(delay)
                    continue
                if options.optional:
                    log.info("flow %s: optional request %d (%s) failed (%s: %s): result%d is null", run.flow.id,
                             node.number, _what(node), failure.code, failure.message, node.number)
                    run.results[node.number - 1] = None
                    return
                raise

    async def _attempt(self, node: Request, run: _Run) -> Any:
        if isinstance(node, SubFlow):
            return await self._sub_flow(node, run)
        body = _body(node, run.payload, run.results, run.error)
        if run.span is not None:
            return await self._traced_step(node, body, run.span)
        started, ok = time.perf_counter(), False
        try:
            answer = await call_component(node.component, node.step, node, body, self.io)
            ok = True
            return answer
        finally:
            self.events.emit(STEP_DONE, node.component.name, time.perf_counter() - started, ok)

    async def _sub_flow(self, node: SubFlow, run: _Run) -> Any:
        """RUN: the other flow of this configuration, its payload the value given
        (this flow's without one); its answer, or its list of answers."""
        flow = run.flows.get(node.flow_id)
        if flow is None:  # checked at load; a reload cannot take it away from a running request
            raise FlowFailed(f"request {node.number}: flow '{node.flow_id}' is not defined")
        payload = run.payload if node.step.arg is None else run.value(node.step.arg)
        if flow.plain:
            return await self.run_plain(flow, payload, run.span)
        outcome = await self._run(_Run(flow, payload, [None] * flow.size, run.flows, run.span, depth=run.depth + 1))
        return outcome.results if outcome.answer is NO_ANSWER else outcome.answer

    async def _parallel(self, block: ParallelBlock, run: _Run) -> None:
        """The block's requests at once; the first failure cancels the others
        and fails the block (an OPTIONAL request's failure is its null)."""
        tasks = [asyncio.ensure_future(self._request(node, run)) for node in block.items
                 if isinstance(node, (Call, SubFlow))]
        try:
            _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        failed = next((t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None), None)
        if failed is not None:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            raise failed.exception()  # type: ignore[misc]

    def _publish(self, node: Publish, run: _Run) -> None:
        if self.publish is None:
            raise FlowFailed(f"PUBLISH on line {node.line}: this process has no MQTT link (comm.conf mqtt)")
        data = orjson.dumps(run.value(node.value), option=orjson.OPT_NON_STR_KEYS)
        try:
            self.publish(node.topic, data, node.qos, node.retain)
        except ValueError as exc:
            raise FlowFailed(f"PUBLISH on line {node.line}: {exc}") from None

    def _holds(self, cond: Condition, run: _Run) -> bool:
        if cond.op == "exists":
            return exists(cond.left, run.payload, run.results, run.error)
        if cond.op == "missing":
            return not exists(cond.left, run.payload, run.results, run.error)
        left, right = run.value(cond.left), run.value(cond.right)
        try:
            return compare(left, cond.op, right)
        except TypeError as exc:
            where = f"the condition on line {cond.line} of flow '{run.flow.id}'"
            message = f"{where}: {exc}"
            if any(isinstance(r, Payload) or getattr(r, "base", None) == Payload()
                   for r in refs_of([cond.left, cond.right])):
                raise BadRequest(message) from None
            raise FlowFailed(message) from None


def compare(left: Any, op: str, right: Any) -> bool:
    """A condition's comparison, on JSON values: equality as JSON has it (true
    is not 1), order between two numbers or two strings, `in` a list, a string
    (a part of it) or an object (a key of it). Raises TypeError for values that
    do not compare."""
    if op == "==":
        return _same(left, right)
    if op == "!=":
        return not _same(left, right)
    if op == "in":
        if isinstance(right, list):
            return any(_same(left, item) for item in right)
        if isinstance(right, str) and isinstance(left, str):
            return left in right
        if isinstance(right, dict) and isinstance(left, str):
            return left in right
        raise TypeError(f"cannot look for {_kind(left)} in {_kind(right)}")
    numbers = _number(left) and _number(right)
    if not numbers and not (isinstance(left, str) and isinstance(right, str)):
        raise TypeError(f"cannot order {_kind(left)} and {_kind(right)} with {op}")
    if op == "<":
        return left < right
    if op == ">":
        return left > right
    if op == "<=":
        return left <= right
    return left >= right


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _number(a) and _number(b):
        return a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if _number(value):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    return "a list" if isinstance(value, list) else "an object"


def _body(call: Call, payload: Any, results: list[Any], error: Any) -> bytes | None:
    step = call.step
    if not isinstance(step, Post):
        return None
    if step.simple:  # payload and resultN only: the flows of the original, as fast as before
        return orjson.dumps({"payload": [payload if isinstance(a, Payload) else results[a.n - 1]  # type: ignore[union-attr]
                                         for a in step.args]})
    if step.body is not None:
        return orjson.dumps(evaluate(step.body, payload, results, error))
    return orjson.dumps({"payload": [evaluate(a, payload, results, error) for a in step.args]})


def _what(node: Request) -> str:
    if isinstance(node, SubFlow):
        return f"flow {node.flow_id}"
    return f"{node.component.name} endpoint {node.endpoint}"


def _where(node: Request) -> dict[str, Any]:
    if isinstance(node, SubFlow):
        return {}
    return {"component": node.component.name, "endpoint": node.endpoint}


_step_labels: dict[int, tuple[Call, bytes]] = {}


def _step_label(call: Call) -> bytes:
    """A step's span name, kind and attributes, encoded once per step of the
    configuration (they are the same for every request)."""
    found = _step_labels.get(id(call))
    if found is not None and found[0] is call:
        return found[1]
    comp = call.component
    attributes: dict[str, Any] = {"rm.step": call.number, "rm.component": comp.name, "rm.endpoint": call.endpoint}
    if isinstance(comp, WasmComponent):
        kind = INTERNAL
        attributes.update({"rm.wasm.module": comp.module.name, "rm.wasm.timeout_ms": comp.limits.timeout_ms,
                           "rm.wasm.memory_mb": comp.limits.memory_mb})
        if comp.limits.fuel is not None:
            attributes["rm.wasm.fuel"] = comp.limits.fuel
    else:
        kind = CLIENT
        attributes.update({"http.request.method": "GET" if isinstance(call.step, Get) else "POST",
                           "url.full": comp.url(call.endpoint)})
    if len(_step_labels) > 4096:  # reloads made new steps: the old ones go
        _step_labels.clear()
    encoded = label(f"step {call.number} {comp.name}", kind, attributes)
    _step_labels[id(call)] = (call, encoded)
    return encoded
