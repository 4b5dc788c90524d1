"""The flows language: parse `flows.conf` with lark into plain dataclasses.

`parse_flows` turns text into `Flow`s (syntax only); `resolve_flows` checks them
against the components and fills in each flow's `calls`, the list the engine
runs. Every problem becomes one `FILE:LINE:COL: message` string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lark import Lark, Token, Transformer
from lark.exceptions import UnexpectedInput

from .errors import BadRequest, ComponentError

# grammar/flows.lark in the repository; runtime_manager/grammar/ once installed with pip
GRAMMAR = next((p for p in (Path(__file__).resolve().parents[2] / "grammar" / "flows.lark",
                            Path(__file__).resolve().parents[1] / "grammar" / "flows.lark") if p.exists()),
               Path(__file__).resolve().parents[2] / "grammar" / "flows.lark")
_RESULT = re.compile(r"result([0-9]+)\Z")


@dataclass(frozen=True)
class Payload:
    """The request's payload, as an argument of POST."""


@dataclass(frozen=True)
class ResultRef:
    """`resultN`: the response of the N-th request of this flow, from 1."""

    n: int


@dataclass(frozen=True)
class FieldPath:
    """A field inside the payload or an answer: `payload.items[0].id`, `result2.temperature`.
    Split into its steps once, at load."""

    base: Payload | ResultRef
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


Ref = Payload | ResultRef | FieldPath
Arg = Payload | ResultRef | FieldPath | Literal | Template
_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[([0-9]+)\]")


def refs_of(arg: Any) -> list[Ref]:
    """Every reference in an argument (a template's included)."""
    if isinstance(arg, (Payload, ResultRef, FieldPath)):
        return [arg]
    if isinstance(arg, Template):
        return refs_of(arg.shape)
    if isinstance(arg, dict):
        return [r for v in arg.values() for r in refs_of(v)]
    if isinstance(arg, list):
        return [r for v in arg for r in refs_of(v)]
    return []


def evaluate(arg: Any, payload: Any, results: list[Any]) -> Any:
    """An argument's value for one request. A field that is not there is the
    request's fault (`bad_request`) in the payload, the component's
    (`component_error`) in an answer; the message names the path."""
    if isinstance(arg, Payload):
        return payload
    if isinstance(arg, ResultRef):
        return results[arg.n - 1]
    if isinstance(arg, FieldPath):
        value = payload if isinstance(arg.base, Payload) else results[arg.base.n - 1]
        for step in arg.steps:
            if isinstance(step, int):
                if not isinstance(value, list) or step >= len(value):
                    _missing(arg, step, value)
            elif not isinstance(value, dict) or step not in value:
                _missing(arg, step, value)
            value = value[step]
        return value
    if isinstance(arg, Literal):
        return arg.value
    if isinstance(arg, Template):
        return evaluate(arg.shape, payload, results)
    if isinstance(arg, dict):
        return {k: evaluate(v, payload, results) for k, v in arg.items()}
    if isinstance(arg, list):
        return [evaluate(v, payload, results) for v in arg]
    return arg


def _missing(path: FieldPath, step: str | int, value: Any) -> None:
    what = f"no item [{step}]" if isinstance(step, int) else f"no field '{step}'"
    kind = type(value).__name__ if value is not None else "null"
    kind = {"dict": "an object", "list": "a list", "str": "a string", "int": "a number", "float": "a number",
            "bool": "a boolean"}.get(kind, kind)
    message = f"{path.text}: {what} (it is {kind} there)"
    if isinstance(path.base, Payload):
        raise BadRequest(message)
    raise ComponentError(f"{message}; the answer of request {path.base.n} does not have it")


@dataclass(frozen=True)
class Target:
    component: str
    endpoint: str
    line: int
    column: int
    endpoint_column: int


@dataclass(frozen=True)
class Get:
    line: int
    column: int


@dataclass(frozen=True)
class Post:
    args: tuple[Arg, ...]
    line: int
    column: int
    body: Arg | None = None  # `POST BODY <value>`: the body itself, instead of {"payload": [args]}
    simple: bool = field(default=True, compare=False)  # only payload and resultN: the engine's fast path


Step = Target | Get | Post


@dataclass(frozen=True)
class Call:
    """One request of a flow, resolved: `number` is N in `resultN`."""

    number: int
    component: Any  # config.HttpComponent | config.WasmComponent
    endpoint: str
    step: Get | Post


@dataclass(frozen=True)
class Flow:
    id: str
    steps: tuple[Step, ...]
    line: int
    calls: tuple[Call, ...] = field(default=(), compare=False)


_UNKNOWN = object()  # an argument already reported as an error


def _wrap(value: Any) -> Arg:
    """A parsed argument as an Arg: references as they are, JSON with
    references in it a Template, plain JSON a Literal."""
    if isinstance(value, (Payload, ResultRef, FieldPath)):
        return value
    return Template(value) if refs_of(value) else Literal(value)


class _ToDataclasses(Transformer):
    def __init__(self, file: str, errors: list[str]) -> None:
        super().__init__()
        self.file = file
        self.errors = errors

    def _error(self, tok: Token, message: str) -> None:
        self.errors.append(f"{self.file}:{tok.line}:{tok.column}: {message}")

    def start(self, children: list) -> list[Flow]:
        return children[0] if children else []

    def flows(self, children: list) -> list[Flow]:
        return children

    def flow(self, children: list) -> Flow:
        ident, *steps = children
        return Flow(id=str(ident), steps=tuple(steps), line=ident.line)

    def target(self, children: list) -> Target:
        kw, comp, endpoint = children
        return Target(str(comp), str(endpoint), kw.line, kw.column, endpoint.column)

    def get(self, children: list) -> Get:
        return Get(children[0].line, children[0].column)

    def post(self, children: list) -> Post:
        kw, *rest = children
        if rest and isinstance(rest[0], Token) and rest[0].type == "BODY":
            return Post((), kw.line, kw.column, body=_wrap(rest[1]), simple=False)
        args = tuple(_wrap(a) for a in rest if a is not _UNKNOWN)
        return Post(args, kw.line, kw.column, simple=all(isinstance(a, (Payload, ResultRef)) for a in args))

    def word(self, children: list) -> object:
        word = children[0]
        return self._error(word, f"unknown argument '{word}' (expected payload, resultN, a field path such as "
                          f"payload.id or result1.items[0], or a JSON value)") or _UNKNOWN

    def path(self, children: list) -> Ref:
        tok = children[0]
        text = str(tok)
        head = re.match(r"payload|result([0-9]+)", text)
        assert head is not None  # the grammar's PATH
        base: Payload | ResultRef = Payload() if head.group(1) is None else ResultRef(int(head.group(1)))
        steps = tuple(int(m.group(2)) if m.group(2) is not None else m.group(1)
                      for m in _STEP.finditer(text, head.end()))
        return FieldPath(base, steps, text) if steps else base

    def object(self, children: list) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for item in children:
            if isinstance(item, tuple):
                key_tok, value = item
                key = self._json(key_tok)
                if key in out:
                    self._error(key_tok, f"key {key_tok} is given twice in this object")
                out[str(key)] = value
        return out

    def pair(self, children: list) -> tuple[Token, Any]:
        return children[0], children[2]

    def array(self, children: list) -> list[Any]:
        return [c for c in children if not (isinstance(c, Token) and c.type in ("LSQB", "RSQB", "COMMA"))]

    def _json(self, tok: Token) -> Any:
        try:
            return json.loads(str(tok))
        except ValueError as exc:
            self._error(tok, f"not a JSON value: {tok} ({exc.msg})")
            return None

    def string(self, children: list) -> Any:
        return self._json(children[0])

    def number(self, children: list) -> Any:
        return self._json(children[0])

    def true(self, _children: list) -> bool:
        return True

    def false(self, _children: list) -> bool:
        return False

    def null(self, _children: list) -> None:
        return None


_parser: Lark | None = None


def _lark() -> Lark:
    global _parser
    if _parser is None:
        _parser = Lark(GRAMMAR.read_text(), parser="lalr", maybe_placeholders=False)
    return _parser


def _describe_expected(expected: set[str], line_text: str) -> str:
    first = line_text.split()[0] if line_text.split() else ""
    if {"TO", "GET", "POST"} & expected:
        return "TO, GET or POST"
    if "PATH" in expected and first == "POST":
        return "payload, resultN, a field path or a JSON value after POST"
    symbols = {"COLON": "':'", "COMMA": "','", "RBRACE": "'}'", "RSQB": "']'", "STRING": "a \"key\""}
    if expected and expected <= set(symbols):
        return " or ".join(symbols[e] for e in sorted(expected))
    if "PATH" in expected:
        return "a JSON value or a field path"
    if expected == {"WORD"}:
        if first == "TO":
            return "a component name and an endpoint id after TO"
        return "a word"
    if expected <= {"_NL", "$END"}:
        return "end of line"
    if "FLOW_ID" in expected:
        return "a flow id"
    return ", ".join(sorted(expected))


def _syntax_message(err: UnexpectedInput, text: str) -> str:
    lines = text.splitlines()
    line_text = lines[err.line - 1] if 0 < err.line <= len(lines) else ""
    rest = line_text[err.column - 1 :].split()
    found = rest[0] if rest else ""
    expected = set(getattr(err, "expected", None) or getattr(err, "allowed", None) or ())
    want = _describe_expected(expected, line_text)
    if not found:
        return f"unexpected end of line (expected {want})"
    if want == "TO, GET or POST":
        lone_id = re.fullmatch(r"[A-Za-z0-9_-]+", found) and line_text.split() == [found]
        hint = " (a new flow needs a blank line before its id)" if lone_id else ""
        return f"unknown instruction '{found}' (expected {want}){hint}"
    if want == "a flow id":
        return f"unexpected '{found}' (expected a flow id: digits or a name, then its steps)"
    return f"unexpected '{found}' (expected {want})"


def parse_flows(text: str, file: str = "flows.conf") -> tuple[list[Flow], list[str]]:
    """Parse flows.conf text. Returns the flows and every error found."""
    if not text.endswith("\n"):
        text += "\n"
    errors: list[str] = []
    parsed = None
    remaining = text
    while parsed is None:
        try:
            parsed = _lark().parse(remaining)
        except UnexpectedInput as err:
            errors.append(f"{file}:{err.line}:{err.column}: {_syntax_message(err, text)}")
            # Go on from the next blank line, so one run reports the first error
            # of every flow; the lines before it become empty (numbers are kept).
            lines = remaining.split("\n")
            nxt = next((i for i in range(err.line, len(lines)) if not lines[i].strip()), len(lines))
            remaining = "\n" * nxt + "\n".join(lines[nxt:])
    if errors:
        return [], errors
    tree = parsed
    flows = _ToDataclasses(file, errors).transform(tree)
    return flows, errors


def resolve_flows(
    flows: list[Flow], components: dict[str, Any], file: str = "flows.conf"
) -> tuple[dict[str, Flow], list[str]]:
    """Check flows against the components; fill in each flow's calls."""
    errors: list[str] = []
    resolved: dict[str, Flow] = {}
    for flow in flows:
        if flow.id in resolved:
            first = resolved[flow.id].line
            errors.append(f"{file}:{flow.line}:1: duplicate flow id '{flow.id}' (first defined on line {first})")
            continue
        calls: list[Call] = []
        target: Target | None = None
        for step in flow.steps:
            if isinstance(step, Target):
                component = components.get(step.component)
                if component is None:
                    known = ", ".join(sorted(components)) or "none"
                    errors.append(
                        f"{file}:{step.line}:{step.column + 3}: unknown component '{step.component}' "
                        f"in flow '{flow.id}' (known: {known})"
                    )
                    target = None
                elif step.endpoint not in component.endpoints:
                    known = ", ".join(sorted(component.endpoints)) or "none"
                    errors.append(
                        f"{file}:{step.line}:{step.endpoint_column}: component '{step.component}' has no "
                        f"endpoint '{step.endpoint}' (known: {known})"
                    )
                    target = None
                else:
                    target = step
                continue
            if target is None:
                if not any(isinstance(s, Target) for s in flow.steps[: flow.steps.index(step)]):
                    kind = "GET" if isinstance(step, Get) else "POST"
                    errors.append(f"{file}:{step.line}:{step.column}: {kind} before any TO in flow '{flow.id}'")
                calls.append(Call(len(calls) + 1, None, "", step))
                continue
            number = len(calls) + 1
            if isinstance(step, Post):
                for ref in refs_of([*step.args, step.body]):
                    base = ref.base if isinstance(ref, FieldPath) else ref
                    if isinstance(base, ResultRef) and not 1 <= base.n < number:
                        errors.append(
                            f"{file}:{step.line}:{step.column}: result{base.n} refers to a request that has "
                            f"not happened yet (this is request {number} of flow '{flow.id}')"
                        )
            calls.append(Call(number, components[target.component], target.endpoint, step))
        if not calls:
            errors.append(f"{file}:{flow.line}:1: flow '{flow.id}' has no GET or POST")
        resolved[flow.id] = replace(flow, calls=tuple(calls))
    return resolved, errors


def show(arg: Any) -> str:
    """An argument as it is written in flows.conf."""
    if isinstance(arg, Payload):
        return "payload"
    if isinstance(arg, ResultRef):
        return f"result{arg.n}"
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
    whose = "the request's payload" if isinstance(base, Payload) else f"the answer of request {base.n}"
    if not isinstance(ref, FieldPath):
        return whose
    steps = "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in ref.steps)
    return f"{steps[1:] if steps.startswith('.') else steps} of {whose}"


def explain(flow: Flow, target: Callable[[Call], str]) -> list[str]:
    """A flow's plan, a line each: its requests, their bodies, where each value comes from."""
    lines = [f"flow {flow.id} (line {flow.line}): {len(flow.calls)} request(s)"]
    for call in flow.calls:
        step = call.step
        if isinstance(step, Get):
            lines.append(f"  {call.number}. GET {target(call)}  -> result{call.number}")
            continue
        body = show(step.body) if step.body is not None else '{"payload": [' + ", ".join(show(a) for a in step.args) + "]}"
        lines.append(f"  {call.number}. POST {target(call)}  -> result{call.number}")
        lines.append(f"     body: {body}")
        seen: set[str] = set()
        for ref in refs_of([*step.args, step.body]):
            if show(ref) not in seen:
                seen.add(show(ref))
                lines.append(f"     {show(ref)}: {source_of(ref)}")
    return lines


def natural_order(name: str) -> tuple[int, int | str]:
    """Flow ids in the order people count them: 2 before 10."""
    return (0, int(name)) if name.isascii() and name.isdigit() else (1, name)
