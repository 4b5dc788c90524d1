"""Values in flows: what an argument, a body, a condition or RETURN may be
(`payload`, `resultN`, `error`, a field path into one, a JSON literal, a JSON
template with references in it), read once at load, and their value for one
request (`evaluate`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest, ComponentError, FlowFailed, FlowFailure


@dataclass(frozen=True)
class Payload:
    """The request's payload, as an argument of POST."""


@dataclass(frozen=True)
class ResultRef:
    """`resultN`: the response of the N-th request of this flow, from 1."""

    n: int


@dataclass(frozen=True)
class ErrorRef:
    """`error`: inside ON ERROR, the failure being handled ({"code", "message", "step", ...})."""


@dataclass(frozen=True)
class FieldPath:
    """A field inside the payload or an answer: `payload.items[0].id`, `result2.temperature`.
    Split into its steps once, at load."""

    base: Payload | ResultRef | ErrorRef
    steps: tuple[str | int, ...]
    text: str


@dataclass(frozen=True, eq=False)
class Literal:
    """A JSON value written in the flow: `{"unit": "C"}`, `3`, `"text"`."""

    value: Any

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Literal) and other.value == self.value

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, eq=False)
class Template:
    """A JSON value with references in it, filled in for each request:
    `{"temp": result1.temperature, "site": payload.site}`."""

    shape: Any  # dicts and lists whose leaves are JSON values or references

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Template) and other.shape == self.shape

    __hash__ = None  # type: ignore[assignment]


Ref = Payload | ResultRef | ErrorRef | FieldPath
Arg = Payload | ResultRef | ErrorRef | FieldPath | Literal | Template
PATH_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[([0-9]+)\]")


def refs_of(arg: Any) -> list[Ref]:
    """Every reference in an argument (a template's included)."""
    if isinstance(arg, (Payload, ResultRef, ErrorRef, FieldPath)):
        return [arg]
    if isinstance(arg, Template):
        return refs_of(arg.shape)
    if isinstance(arg, dict):
        return [r for v in arg.values() for r in refs_of(v)]
    if isinstance(arg, list):
        return [r for v in arg for r in refs_of(v)]
    return []


def evaluate(arg: Any, payload: Any, results: list[Any], error: Any = None) -> Any:
    """An argument's value for one request (`error`: inside ON ERROR, the
    failure). A field that is not there is the request's fault
    (`bad_request`) in the payload, the component's (`component_error`) in an
    answer; the message names the path."""
    if isinstance(arg, Payload):
        return payload
    if isinstance(arg, ResultRef):
        return results[arg.n - 1]
    if isinstance(arg, FieldPath):
        base = arg.base
        value = payload if isinstance(base, Payload) else error if isinstance(base, ErrorRef) else results[base.n - 1]
        for step in arg.steps:
            if isinstance(step, int):
                if not isinstance(value, list) or step >= len(value):
                    _missing(arg, step, value)
            elif not isinstance(value, dict) or step not in value:
                _missing(arg, step, value)
            value = value[step]
        return value
    if isinstance(arg, ErrorRef):
        return error
    if isinstance(arg, Literal):
        return arg.value
    if isinstance(arg, Template):
        return evaluate(arg.shape, payload, results, error)
    if isinstance(arg, dict):
        return {k: evaluate(v, payload, results, error) for k, v in arg.items()}
    if isinstance(arg, list):
        return [evaluate(v, payload, results, error) for v in arg]
    return arg


def exists(arg: Any, payload: Any, results: list[Any], error: Any = None) -> bool:
    """Whether a reference's value is there (a field path's every step)."""
    try:
        evaluate(arg, payload, results, error)
    except FlowFailure:
        return False
    return True


def _missing(path: FieldPath, step: str | int, value: Any) -> None:
    what = f"no item [{step}]" if isinstance(step, int) else f"no field '{step}'"
    kind = type(value).__name__ if value is not None else "null"
    kind = {"dict": "an object", "list": "a list", "str": "a string", "int": "a number", "float": "a number",
            "bool": "a boolean"}.get(kind, kind)
    message = f"{path.text}: {what} (it is {kind} there)"
    if isinstance(path.base, Payload):
        raise BadRequest(message)
    if isinstance(path.base, ErrorRef):
        raise FlowFailed(f"{message}; the failure being handled does not have it")
    raise ComponentError(f"{message}; the answer of request {path.base.n} does not have it")


def show(arg: Any) -> str:
    """An argument as it is written in flows.conf."""
    if isinstance(arg, Payload):
        return "payload"
    if isinstance(arg, ResultRef):
        return f"result{arg.n}"
    if isinstance(arg, ErrorRef):
        return "error"
    if isinstance(arg, FieldPath):
        return arg.text
    if isinstance(arg, (Literal, Template)):
        return show(arg.value if isinstance(arg, Literal) else arg.shape)
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {show(v)}" for k, v in arg.items()) + "}"
    if isinstance(arg, list):
        return "[" + ", ".join(show(v) for v in arg) + "]"
    return json.dumps(arg)


def source_of(ref: Ref) -> str:
    """Where a reference's value comes from, in words."""
    base = ref.base if isinstance(ref, FieldPath) else ref
    whose = ("the request's payload" if isinstance(base, Payload) else "the failure being handled"
             if isinstance(base, ErrorRef) else f"the answer of request {base.n}")  # type: ignore[union-attr]
    if not isinstance(ref, FieldPath):
        return whose
    steps = "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in ref.steps)
    return f"{steps[1:] if steps.startswith('.') else steps} of {whose}"
