"""The flows language: parse `flows.conf` with lark into plain dataclasses.

`parse_flows` turns text into `Flow`s (syntax only); `resolve_flows` checks them
against the components and fills in each flow's `calls`, the list the engine
runs. Every problem becomes one `FILE:LINE:COL: message` string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lark import Lark, Token, Transformer
from lark.exceptions import UnexpectedInput

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


Arg = Payload | ResultRef


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
        kw, *words = children
        args: list[Arg] = []
        for word in words:
            match = _RESULT.match(word)
            if word == "payload":
                args.append(Payload())
            elif match:
                args.append(ResultRef(int(match.group(1))))
            else:
                self._error(word, f"unknown argument '{word}' (expected payload or resultN)")
        return Post(tuple(args), kw.line, kw.column)


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
    if expected == {"WORD"}:
        if first == "TO":
            return "a component name and an endpoint id after TO"
        if first == "POST":
            return "payload or resultN after POST"
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
                for arg in step.args:
                    if isinstance(arg, ResultRef) and not 1 <= arg.n < number:
                        errors.append(
                            f"{file}:{step.line}:{step.column}: result{arg.n} refers to a request that has "
                            f"not happened yet (this is request {number} of flow '{flow.id}')"
                        )
            calls.append(Call(number, components[target.component], target.endpoint, step))
        if not calls:
            errors.append(f"{file}:{flow.line}:1: flow '{flow.id}' has no GET or POST")
        resolved[flow.id] = replace(flow, calls=tuple(calls))
    return resolved, errors


def natural_order(name: str) -> tuple[int, int | str]:
    """Flow ids in the order people count them: 2 before 10."""
    return (0, int(name)) if name.isascii() and name.isdigit() else (1, name)
