"""Errors as small exception classes, each with the contract's error code.

A `FlowFailure` ends one request: the engine turns it into a result with
`status: error`; the entry points map `http_status` onto their answer.
A `ConfigError` stops start-up and lists every problem found.
"""

from __future__ import annotations

from typing import Any


class FlowFailure(Exception):
    code = "internal_error"
    http_status = 500

    def __init__(
        self,
        message: str,
        *,
        step: int | None = None,
        component: str | None = None,
        endpoint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.step = step
        self.component = component
        self.endpoint = endpoint

    def to_dict(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message, "step": self.step}
        if self.component is not None:
            error["component"] = self.component
            error["endpoint"] = self.endpoint
        return error


class InternalError(FlowFailure):
    """A bug of ours, caught at the request's boundary (and logged with its traceback)."""

    code = "internal_error"
    http_status = 500


class BadRequest(FlowFailure):
    code = "bad_request"
    http_status = 400


class UnknownFlow(FlowFailure):
    code = "unknown_flow"
    http_status = 404


class ComponentError(FlowFailure):
    code = "component_error"
    http_status = 502


class Timeout(FlowFailure):
    code = "timeout"
    http_status = 504


class Overloaded(FlowFailure):
    code = "overloaded"
    http_status = 503


class WasmTrap(FlowFailure):
    code = "wasm_trap"
    http_status = 502


class ForwardFailed(FlowFailure):
    code = "forward_failed"
    http_status = 502


class FlowFailed(FlowFailure):
    """A flow that ended itself with an error: `FAIL "..."`, or a value its
    steps needed that was not there (a field of `error`, a comparison of
    values that do not compare)."""

    code = "flow_failed"
    http_status = 422


class ResultTooLarge(FlowFailure):
    """A result (or a step's output) larger than what may be sent on."""

    code = "result_too_large"
    http_status = 502


# Codes that mean "the flow itself failed": a peer answering with one of these
# ran the request, so its answer is the result (docs/architecture.md, load balancing rule 4).
class TooLargeToForward(ValueError):
    """A request larger than the broker between this node and a peer takes: it is
    not sent there (the peer is not to blame; the next is tried, then home)."""


FLOW_ERROR_CODES = frozenset(
    {BadRequest.code, UnknownFlow.code, ComponentError.code, Timeout.code, WasmTrap.code, FlowFailed.code}
)

HTTP_STATUS = {cls.code: cls.http_status for cls in FlowFailure.__subclasses__()}


class ConfigError(Exception):
    """The configuration directory has problems; `errors` lists every one."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors
