"""A request's one result: a small typed object that knows its HTTP status and
its wire form (the contract's result object, docs/architecture.md "Requests and results")."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from .errors import HTTP_STATUS, FlowFailure
from .request import FlowRequest


@dataclass(slots=True)
class Placement:
    """Where a request ran and why: `asked` (lb, policy, least_loaded, local_first,
    none), `chosen` (home or "node N"), `reason` in words, and the peers `tried`
    before (each with why it did not run there)."""

    asked: str
    chosen: str = "home"
    reason: str = ""
    tried: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"asked": self.asked, "chosen": self.chosen, "reason": self.reason}
        if self.tried:
            body["tried"] = self.tried
        return body


class _NoAnswer:
    """The answer of a flow without RETURN: its result is every request's answer."""

    def __repr__(self) -> str:
        return "NO_ANSWER"


NO_ANSWER: Any = _NoAnswer()


@dataclass(slots=True)
class Result:
    request_id: str | None
    id_flow: str | None
    node: str
    results: list[Any] | None = None  # set when ok
    error: dict[str, Any] | None = None  # {"code", "message", "step", ...} when not
    elapsed_ms: float | None = None
    placement: Placement | None = None
    trace_id: str | None = None  # while tracing is on: the trace this request's spans are in
    answer: Any = NO_ANSWER  # the flow's RETURN: sent as "result" instead of "results"

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def status(self) -> str:
        return "ok" if self.error is None else "error"

    @property
    def code(self) -> str | None:
        return None if self.error is None else str(self.error.get("code"))

    @property
    def http_status(self) -> int:
        return 200 if self.error is None else HTTP_STATUS.get(self.code or "", 500)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"request_id": self.request_id, "id_flow": self.id_flow, "status": self.status,
                                "node": self.node}
        if self.error is None:
            if self.answer is NO_ANSWER:
                body["results"] = self.results
            else:
                body["result"] = self.answer
        else:
            body["error"] = self.error
        if self.elapsed_ms is not None:
            body["elapsed_ms"] = self.elapsed_ms
        if self.placement is not None:
            body["placement"] = self.placement.to_dict()
        if self.trace_id is not None:
            body["trace_id"] = self.trace_id
        return body

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())


def _elapsed_ms(req: FlowRequest) -> float:
    return round((time.perf_counter() - req.received) * 1000, 3)


def ok_result(req: FlowRequest, node: str, results: list[Any], placement: Placement | None,
              answer: Any = NO_ANSWER) -> Result:
    return Result(req.request_id, req.id_flow, node, results=results, elapsed_ms=_elapsed_ms(req), placement=placement,
                  answer=answer)


def error_result(req: FlowRequest | None, node: str, failure: FlowFailure, placement: Placement | None = None,
                 request_id: str | None = None) -> Result:
    """The result of a failed request; `req` is None when the request could not be
    read at all (then the id comes from `request_id` or from the failure)."""
    if req is None:
        rid = request_id or getattr(failure, "request_id", None) or None
        return Result(rid, None, node, error=failure.to_dict())
    return Result(req.request_id, req.id_flow, node, error=failure.to_dict(), elapsed_ms=_elapsed_ms(req),
                  placement=placement)


def peer_result(req: FlowRequest, answer: dict[str, Any], peer: str, placement: Placement) -> Result:
    """A peer's answer (already checked to be a result) as this node's result.
    `node` is the peer this node sent it to, whatever the answer claims."""
    error = answer.get("error") if answer.get("status") == "error" else None
    if answer.get("status") == "error" and not isinstance(error, dict):
        error = {"code": "forward_failed", "message": f"node {peer} answered an error without details", "step": None}
    results = answer.get("results")
    return Result(req.request_id, req.id_flow, peer,
                  results=results if isinstance(results, list) else None, error=error,
                  elapsed_ms=_elapsed_ms(req), placement=placement,
                  answer=answer["result"] if error is None and "result" in answer else NO_ANSWER)
