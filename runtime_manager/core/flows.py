"""The flows language: parse `flows.conf` with lark into plain dataclasses.

`parse_flows` turns text into `Flow`s (syntax only); `resolve_flows` checks them
against the components, each other and the node's rules, and fills in each
flow's requests (`calls`) and what the engine runs (`program`, `catch`; see
program.py). Every problem becomes one `FILE:LINE:COL: message` string. The
values steps use are in values.py; a flow's plan in words in plans.py.
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

from .topics import topic_name_problem
from .values import PATH_STEP, Arg, ErrorRef, FieldPath, Literal, Payload, Ref, ResultRef, Template, refs_of, show

# grammar/flows.lark in the repository; runtime_manager/grammar/ once installed with pip
GRAMMAR = next((p for p in (Path(__file__).resolve().parents[2] / "grammar" / "flows.lark",
                            Path(__file__).resolve().parents[1] / "grammar" / "flows.lark") if p.exists()),
               Path(__file__).resolve().parents[2] / "grammar" / "flows.lark")
_RESULT = re.compile(r"result([0-9]+)\Z")


@dataclass(frozen=True)
class Target:
    component: str
    endpoint: str
    line: int
    column: int
    endpoint_column: int


@dataclass(frozen=True)
class Options:
    """A request's options: `RETRY n` (attempts after the first), `BACKOFF d`
    (the wait before the first retry, doubled each time), `TIMEOUT d` (each
    attempt's), `OPTIONAL` (a failure gives null instead of failing the flow)."""

    retries: int = 0
    backoff_ms: int = 100
    timeout_ms: int | None = None
    optional: bool = False


PLAIN = Options()


@dataclass(frozen=True)
class Get:
    line: int
    column: int
    options: Options = PLAIN


@dataclass(frozen=True)
class Post:
    args: tuple[Arg, ...]
    line: int
    column: int
    body: Arg | None = None  # `POST BODY <value>`: the body itself, instead of {"payload": [args]}
    simple: bool = field(default=True, compare=False)  # only payload and resultN: the engine's fast path
    options: Options = PLAIN


@dataclass(frozen=True)
class RunFlow:
    """`RUN <flow> [value]`: another flow, with a value as its payload (this
    flow's payload without one); its answer is this request's result."""

    flow_id: str
    arg: Arg | None
    line: int
    column: int
    id_column: int
    options: Options = PLAIN


@dataclass(frozen=True)
class Publish:
    """`PUBLISH <topic> <value> [QOS n] [RETAIN]`: a value to an MQTT topic."""

    topic: str
    value: Arg
    line: int
    column: int
    topic_column: int
    qos: int = 0
    retain: bool = False


@dataclass(frozen=True)
class Return:
    """`RETURN <value>`: the flow's answer, instead of every request's."""

    value: Arg
    line: int
    column: int


@dataclass(frozen=True)
class Fail:
    """`FAIL ["message"]`: the flow ends with this error (code flow_failed)."""

    message: str
    line: int
    column: int


@dataclass(frozen=True)
class Condition:
    """`<value> <op> <value>`, `<value> in <value>`, `<value> exists`, `<value> missing`."""

    left: Arg
    op: str  # ==, !=, <, >, <=, >=, in, exists, missing
    right: Arg | None
    line: int
    column: int


@dataclass(frozen=True)
class IfBlock:
    condition: Condition
    then: tuple[Any, ...]  # steps as written; resolved, the nodes the engine runs
    otherwise: tuple[Any, ...]
    line: int
    column: int


@dataclass(frozen=True)
class ParallelBlock:
    items: tuple[Any, ...]
    line: int
    column: int


@dataclass(frozen=True)
class CatchBlock:
    items: tuple[Any, ...]
    line: int
    column: int


Step = Target | Get | Post | RunFlow | Publish | Return | Fail | IfBlock | ParallelBlock | CatchBlock


@dataclass(frozen=True)
class Call:
    """One request of a flow, resolved: `number` is N in `resultN`."""

    number: int
    component: Any  # config.HttpComponent | config.WasmComponent
    endpoint: str
    step: Get | Post

    @property
    def options(self) -> Options:
        return self.step.options


@dataclass(frozen=True)
class SubFlow:
    """`RUN`, resolved: request `number` of this flow runs flow `flow_id`."""

    number: int
    flow_id: str
    step: RunFlow

    @property
    def options(self) -> Options:
        return self.step.options


Request = Call | SubFlow
# What the engine runs: requests, IfBlock / ParallelBlock holding nodes, Publish, Return, Fail.
Node = Call | SubFlow | IfBlock | ParallelBlock | Publish | Return | Fail


@dataclass(frozen=True)
class Flow:
    id: str
    steps: tuple[Step, ...]
    line: int
    calls: tuple[Request, ...] = field(default=(), compare=False)  # every request, in the order written
    program: tuple[Node, ...] = field(default=(), compare=False)  # what runs, blocks and all
    catch: tuple[Node, ...] | None = field(default=None, compare=False)  # ON ERROR's nodes
    plain: bool = field(default=True, compare=False)  # only TO, GET and POST without options: run as a list

    @property
    def size(self) -> int:
        """How many results a run has (resultN of every request written, null when it did not run)."""
        return len(self.calls)


@dataclass(frozen=True)
class FlowRules:
    """What resolving checks flows against, beyond components: the flow's time
    (`task_timeout_ms`, every TIMEOUT within it) and where PUBLISH may go
    (`publish_problem(topic)`: why not, or None)."""

    task_timeout_ms: int = 30000
    publish_problem: Callable[[str], str | None] = field(default=lambda topic: None)


MAX_DEPTH = 8  # blocks inside blocks
MAX_RETRIES = 10


_UNKNOWN = object()  # an argument already reported as an error


def _wrap(value: Any) -> Arg:
    """A parsed argument as an Arg: references as they are, JSON with
    references in it a Template, plain JSON a Literal."""
    if isinstance(value, (Payload, ResultRef, FieldPath)):
        return value
    return Template(value) if refs_of(value) else Literal(value)


@dataclass(frozen=True)
class _Option:
    name: str
    value: Any
    token: Token


@dataclass(frozen=True)
class _Else:
    items: tuple[Any, ...]


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
        return Flow(id=str(ident), steps=tuple(s for s in steps if not isinstance(s, Token)), line=ident.line)

    def target(self, children: list) -> Target:
        kw, comp, endpoint = children
        return Target(str(comp), str(endpoint), kw.line, kw.column, endpoint.column)

    def get(self, children: list) -> Get:
        kw, *options = children
        return Get(kw.line, kw.column, self._options(options))

    def post(self, children: list) -> Post:
        kw, *rest = children
        options = self._options([c for c in rest if isinstance(c, _Option)])
        rest = [c for c in rest if not isinstance(c, _Option)]
        if rest and isinstance(rest[0], Token) and rest[0].type == "BODY":
            return Post((), kw.line, kw.column, body=_wrap(rest[1]), simple=False, options=options)
        args = tuple(_wrap(a) for a in rest if a is not _UNKNOWN)
        return Post(args, kw.line, kw.column, simple=all(isinstance(a, (Payload, ResultRef)) for a in args),
                    options=options)

    def run(self, children: list) -> RunFlow:
        kw, ident, *rest = children
        options = self._options([c for c in rest if isinstance(c, _Option)])
        args = [c for c in rest if not isinstance(c, _Option) and c is not _UNKNOWN]
        return RunFlow(str(ident), _wrap(args[0]) if args else None, kw.line, kw.column, ident.column, options)

    def publish(self, children: list) -> Publish:
        kw, topic, value, *opts = children
        qos, retain = 0, False
        for opt in opts:
            if opt.name == "qos":
                qos = opt.value
            else:
                retain = True
        return Publish(str(topic), _wrap(value) if value is not _UNKNOWN else Literal(None), kw.line, kw.column,
                       topic.column, qos, retain)

    def answer(self, children: list) -> Return:
        kw, value = children
        return Return(_wrap(value) if value is not _UNKNOWN else Literal(None), kw.line, kw.column)

    def fail(self, children: list) -> Fail:
        kw, *message = children
        text = self._json(message[0]) if message else None
        return Fail(str(text) if text is not None else "the flow failed", kw.line, kw.column)

    def if_block(self, children: list) -> IfBlock:
        kw, condition, *rest = children
        rest = [c for c in rest if not isinstance(c, Token)]
        otherwise: tuple[Any, ...] = ()
        if rest and isinstance(rest[-1], _Else):
            otherwise = rest.pop().items
        items = tuple(rest)
        return IfBlock(condition, items, otherwise, kw.line, kw.column)

    def else_branch(self, children: list) -> _Else:
        return _Else(tuple(c for c in children if not isinstance(c, Token)))

    def parallel(self, children: list) -> ParallelBlock:
        kw, *items = children
        return ParallelBlock(tuple(c for c in items if not isinstance(c, Token)), kw.line, kw.column)

    def catch(self, children: list) -> CatchBlock:
        kw, *items = children
        return CatchBlock(tuple(c for c in items if not isinstance(c, Token)), kw.line, kw.column)

    def _condition(self, left: Any, op: Token | str, right: Any) -> Condition:
        tok = op if isinstance(op, Token) else None
        return Condition(_wrap(left) if left is not _UNKNOWN else Literal(None), str(op),
                         None if right is None else _wrap(right) if right is not _UNKNOWN else Literal(None),
                         tok.line if tok else 0, tok.column if tok else 0)

    def compare(self, children: list) -> Condition:
        return self._condition(children[0], children[1], children[2])

    def within(self, children: list) -> Condition:
        return self._condition(children[0], children[1], children[2])

    def exists(self, children: list) -> Condition:
        return self._condition(children[0], children[1], None)

    def missing(self, children: list) -> Condition:
        return self._condition(children[0], children[1], None)

    # options: each a small (name, value, token) until `_options` puts them together
    def retry(self, children: list) -> _Option:
        kw, number = children
        value = self._json(number)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_RETRIES:
            self._error(number, f"RETRY takes a whole number from 0 to {MAX_RETRIES}, not {number}")
            value = 0
        return _Option("retries", value, kw)

    def backoff(self, children: list) -> _Option:
        kw, duration = children
        return _Option("backoff_ms", self._duration(duration, 0, 60_000), kw)

    def timeout(self, children: list) -> _Option:
        kw, duration = children
        return _Option("timeout_ms", self._duration(duration, 1, 24 * 3600_000), kw)

    def optional(self, children: list) -> _Option:
        return _Option("optional", True, children[0])

    def qos(self, children: list) -> _Option:
        kw, number = children
        value = self._json(number)
        if value not in (0, 1, 2) or isinstance(value, bool):
            self._error(number, f"QOS is 0, 1 or 2, not {number}")
            value = 0
        return _Option("qos", value, kw)

    def retain(self, children: list) -> _Option:
        return _Option("retain", True, children[0])

    def _duration(self, tok: Token, low: int, high: int) -> int:
        text = str(tok)
        ms = int(text[:-2]) if text.endswith("ms") else int(text[:-1]) * 1000
        if not low <= ms <= high:
            self._error(tok, f"{text} is out of range ({low} ms to {high // 1000} s)")
            return max(low, min(ms, high))
        return ms

    def _options(self, options: list[_Option]) -> Options:
        seen: dict[str, Any] = {}
        for opt in options:
            if opt.name in seen:
                self._error(opt.token, f"{opt.token} is given twice for this request")
            seen[opt.name] = opt.value
        return replace(PLAIN, **seen) if seen else PLAIN

    def word(self, children: list) -> object:
        word = children[0]
        return self._error(word, f"unknown argument '{word}' (expected payload, resultN, a field path such as "
                          f"payload.id or result1.items[0], or a JSON value)") or _UNKNOWN

    def path(self, children: list) -> Ref:
        tok = children[0]
        text = str(tok)
        head = re.match(r"payload|error|result([0-9]+)", text)
        assert head is not None  # the grammar's PATH
        base: Payload | ResultRef | ErrorRef = (ResultRef(int(head.group(1))) if head.group(1) is not None
                                                else ErrorRef() if head.group(0) == "error" else Payload())
        steps = tuple(int(m.group(2)) if m.group(2) is not None else m.group(1)
                      for m in PATH_STEP.finditer(text, head.end()))
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


_INSTRUCTIONS = "TO, GET, POST, IF, PARALLEL, RUN, PUBLISH, RETURN, FAIL or ON ERROR"


def _describe_expected(expected: set[str], line_text: str) -> str:
    first = line_text.split()[0] if line_text.split() else ""
    if {"TO", "GET", "POST"} & expected:
        return _INSTRUCTIONS
    if "PATH" in expected and first == "POST":
        return "payload, resultN, a field path or a JSON value after POST"
    symbols = {"COLON": "':'", "COMMA": "','", "RBRACE": "'}'", "RSQB": "']'", "STRING": "a \"key\""}
    if expected and expected <= set(symbols):
        return " or ".join(symbols[e] for e in sorted(expected))
    if {"COMPARE", "IN", "EXISTS"} <= expected:
        return "==, !=, <, >, <=, >=, in, exists or missing after the value"
    if "DURATION" in expected:
        return "a time such as 200ms or 2s"
    if "PATH" in expected:
        return "a JSON value or a field path"
    if expected == {"WORD"}:
        if first == "TO":
            return "a component name and an endpoint id after TO"
        if first == "RUN":
            return "the id of the flow to run"
        if first == "PUBLISH":
            return "a topic and a value after PUBLISH"
        return "a word"
    if expected <= {"_NL", "$END"} or (expected and expected <= {"_NL", "$END", "RETRY", "BACKOFF", "TIMEOUT",
                                                                  "OPTIONAL", "QOS", "RETAIN"}):
        return "end of line"
    if "FLOW_ID" in expected:
        return "a flow id"
    return ", ".join(sorted(expected))


_BLOCK_WORDS = {"END", "ELSE", "IF", "PARALLEL", "RUN", "PUBLISH", "RETURN", "FAIL", "ON"}


def _syntax_message(err: UnexpectedInput, text: str) -> str:
    lines = text.splitlines()
    line_text = lines[err.line - 1] if 0 < err.line <= len(lines) else ""
    rest = line_text[err.column - 1 :].split()
    found = rest[0] if rest else ""
    expected = set(getattr(err, "expected", None) or getattr(err, "allowed", None) or ())
    want = _describe_expected(expected, line_text)
    if not found:
        if "END" in expected and not line_text.strip():
            return ("a blank line inside a block (a blank line ends a flow: IF, PARALLEL and ON ERROR blocks end "
                    "with END)")
        return f"unexpected end of line (expected {want})"
    if want.startswith(_INSTRUCTIONS.split(",")[0]) and "GET" in want:
        if found in ("END", "ELSE") and found not in expected:
            return f"{found} without a block to {'end' if found == 'END' else 'continue'} (IF, PARALLEL or ON ERROR)"
        lone_id = (re.fullmatch(r"[A-Za-z0-9_-]+", found) and line_text.split() == [found]
                   and found not in _BLOCK_WORDS and not line_text[:1].isspace())
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


def resolve_flows(flows: list[Flow], components: dict[str, Any], file: str = "flows.conf",
                  rules: FlowRules | None = None) -> tuple[dict[str, Flow], list[str]]:
    """Check flows against the components, each other and `rules`; fill in
    each flow's requests (`calls`), what runs (`program`, `catch`) and whether
    it is a plain list of requests."""
    rules = rules or FlowRules()
    errors: list[str] = []
    resolved: dict[str, Flow] = {}
    ids = {flow.id for flow in flows}
    runs: dict[str, list[RunFlow]] = {}
    for flow in flows:
        if flow.id in resolved:
            first = resolved[flow.id].line
            errors.append(f"{file}:{flow.line}:1: duplicate flow id '{flow.id}' (first defined on line {first})")
            continue
        resolver = _Resolver(file, flow, components, rules, ids, errors)
        program, catch = resolver.resolve()
        if not any(isinstance(s, (Get, Post, RunFlow, Publish, Return, Fail)) for s in walk_steps(flow.steps)):
            errors.append(f"{file}:{flow.line}:1: flow '{flow.id}' has no GET or POST")
        plain = catch is None and all(isinstance(n, Call) and n.step.options == PLAIN for n in program)
        resolved[flow.id] = replace(flow, calls=tuple(resolver.calls), program=tuple(program), catch=catch,
                                    plain=plain)
        runs[flow.id] = resolver.runs
    errors += _cycles(runs, file)
    return resolved, errors


class _Resolver:
    """One flow's steps to the nodes the engine runs, checked on the way: the
    targets, which resultN exist on every path to each step, where `error` may
    be used, what a PARALLEL block may hold, timeouts, PUBLISH topics."""

    def __init__(self, file: str, flow: Flow, components: dict[str, Any], rules: FlowRules, ids: set[str],
                 errors: list[str]) -> None:
        self.file, self.flow, self.components, self.rules, self.ids, self.errors = file, flow, components, rules, ids, errors
        self.calls: list[Request] = []
        self.runs: list[RunFlow] = []
        self.where: dict[int, str | None] = {}  # request number -> the block it is in (None: the flow itself)
        self.bad_target = False  # a TO already reported: the requests after it are not reported again

    def error(self, line: int, column: int, message: str) -> None:
        self.errors.append(f"{self.file}:{line}:{column}: {message}")

    def resolve(self) -> tuple[list[Node], tuple[Node, ...] | None]:
        steps = list(self.flow.steps)
        catches = [s for s in steps if isinstance(s, CatchBlock)]
        for extra in catches[1:]:
            self.error(extra.line, extra.column, f"a second ON ERROR in flow '{self.flow.id}' (one per flow)")
        if catches and steps[-1] is not catches[0]:
            self.error(catches[0].line, catches[0].column, "ON ERROR must come last in a flow")
        main = [s for s in steps if not isinstance(s, CatchBlock)]
        program, _, _ = self.block(main, None, frozenset(), 0, None, False)
        catch = None
        if catches:  # its target, until a TO of its own: the flow's last one before it
            target = next((s for s in reversed(main) if isinstance(s, Target)), None)
            where = f"in ON ERROR (line {catches[0].line})"
            nodes, _, _ = self.block(list(catches[0].items), self.target(target, report=False) if target else None,
                                     frozenset(), 1, where, True)
            catch = tuple(nodes)
        return program, catch

    def block(self, items: list[Any], target: Target | None, avail: frozenset[int], depth: int, where: str | None,
              in_catch: bool, parallel: ParallelBlock | None = None) -> tuple[list[Node], frozenset[int], bool]:
        """(nodes, the results known after the block, whether it always ends the flow)."""
        nodes: list[Node] = []
        produced: set[int] = set()  # in a PARALLEL block: known only after it
        ended: str | None = None
        for step in items:
            if ended is not None:
                self.error(step.line, step.column, f"this step can never run: the flow has ended before it ({ended})")
                break
            if isinstance(step, Target):
                target = self.target(step)
                continue
            if isinstance(step, (Get, Post, RunFlow)):
                number = len(self.calls) + 1
                self.check_refs(_args_of(step), step, avail, in_catch, parallel, produced, number)
                self.check_options(step)
                node: Request
                if isinstance(step, RunFlow):
                    if step.flow_id not in self.ids:
                        known = ", ".join(sorted(self.ids, key=natural_order)) or "none"
                        self.error(step.line, step.id_column, f"RUN: unknown flow '{step.flow_id}' (known: {known})")
                    self.runs.append(step)
                    node = SubFlow(number, step.flow_id, step)
                else:
                    if target is None and not self.bad_target:
                        kind = "GET" if isinstance(step, Get) else "POST"
                        self.error(step.line, step.column, f"{kind} before any TO in flow '{self.flow.id}'")
                    node = Call(number, self.components[target.component] if target is not None else None,
                                target.endpoint if target is not None else "", step)
                self.calls.append(node)
                self.where[number] = where
                nodes.append(node)
                if parallel is not None:
                    produced.add(number)
                else:
                    avail = avail | {number}
                continue
            if parallel is not None:
                self.error(step.line, step.column, f"only TO, GET, POST and RUN go in a PARALLEL block "
                                                   f"(line {parallel.line}): its requests run at once")
                continue
            if isinstance(step, Publish):
                self.check_refs([step.value], step, avail, in_catch)
                problem = topic_name_problem(step.topic) or self.rules.publish_problem(step.topic)
                if problem:
                    self.error(step.line, step.topic_column, f"PUBLISH: topic '{step.topic}' {problem}")
                nodes.append(step)
            elif isinstance(step, (Return, Fail)):
                if isinstance(step, Return):
                    self.check_refs([step.value], step, avail, in_catch)
                nodes.append(step)
                ended = f"{'RETURN' if isinstance(step, Return) else 'FAIL'} on line {step.line}"
            elif isinstance(step, IfBlock):
                if depth >= MAX_DEPTH:
                    self.error(step.line, step.column, f"blocks nest {MAX_DEPTH} deep at most")
                    continue
                cond = step.condition
                self.check_refs([cond.left, cond.right], step, avail, in_catch)
                then, then_avail, then_ends = self.block(list(step.then), target, avail, depth + 1,
                                                         f"inside IF (line {step.line})", in_catch)
                other, other_avail, other_ends = self.block(list(step.otherwise), target, avail, depth + 1,
                                                            f"in the ELSE of IF (line {step.line})", in_catch)
                nodes.append(replace(step, then=tuple(then), otherwise=tuple(other)))
                if then_ends and other_ends:
                    ended = f"both branches of IF on line {step.line} end it"
                avail = other_avail if then_ends else then_avail if other_ends else then_avail & other_avail
            elif isinstance(step, ParallelBlock):
                if depth >= MAX_DEPTH:
                    self.error(step.line, step.column, f"blocks nest {MAX_DEPTH} deep at most")
                    continue
                inner, avail, _ = self.block(list(step.items), target, avail, depth + 1, where, in_catch, step)
                if not any(isinstance(n, (Call, SubFlow)) for n in inner):
                    self.error(step.line, step.column, "a PARALLEL block without requests (GET, POST or RUN)")
                nodes.append(replace(step, items=tuple(inner)))
            elif isinstance(step, CatchBlock):
                self.error(step.line, step.column, "ON ERROR goes at the end of a flow, not inside a block")
        return nodes, avail | produced, ended is not None

    def target(self, step: Target, report: bool = True) -> Target | None:
        component = self.components.get(step.component)
        if not report:
            return step if component is not None and step.endpoint in component.endpoints else None
        if component is None:
            self.bad_target = True
            known = ", ".join(sorted(self.components)) or "none"
            self.error(step.line, step.column + 3,
                       f"unknown component '{step.component}' in flow '{self.flow.id}' (known: {known})")
            return None
        if step.endpoint not in component.endpoints:
            self.bad_target = True
            known = ", ".join(sorted(component.endpoints)) or "none"
            self.error(step.line, step.endpoint_column,
                       f"component '{step.component}' has no endpoint '{step.endpoint}' (known: {known})")
            return None
        return step

    def check_options(self, step: Get | Post | RunFlow) -> None:
        timeout = step.options.timeout_ms
        if timeout is not None and timeout > self.rules.task_timeout_ms:
            self.error(step.line, step.column, f"TIMEOUT {timeout} ms is longer than the flow may take "
                                               f"(runtime.conf task_timeout_ms: {self.rules.task_timeout_ms})")

    def check_refs(self, args: list[Any], step: Any, avail: frozenset[int], in_catch: bool,
                   parallel: ParallelBlock | None = None, produced: set[int] | None = None,
                   number: int | None = None) -> None:
        seen: set[str] = set()
        for ref in refs_of([a for a in args if a is not None]):
            base = ref.base if isinstance(ref, FieldPath) else ref
            if isinstance(base, ErrorRef):
                if not in_catch and "error" not in seen:
                    seen.add("error")
                    self.error(step.line, step.column, f"{show(ref)}: `error` is known only inside ON ERROR")
                continue
            if not isinstance(base, ResultRef) or base.n in avail or f"result{base.n}" in seen:
                continue
            seen.add(f"result{base.n}")
            n = base.n
            if parallel is not None and produced is not None and n in produced:
                message = (f"result{n} comes from the same PARALLEL block (line {parallel.line}): its requests "
                           "run at once, so none can use another's answer")
            elif 1 <= n <= len(self.calls):
                where = self.where.get(n)
                if in_catch and where is None:
                    message = (f"result{n} may not exist in ON ERROR: the failure may have come before request "
                               f"{n} (use `error`, or RETURN what is known)")
                else:
                    message = f"result{n} may not exist here: request {n} runs only {where or 'before the failure'}"
            elif number is not None:
                message = (f"result{n} refers to a request that has not happened yet (this is request {number} "
                           f"of flow '{self.flow.id}')")
            else:
                message = f"result{n} refers to a request that has not happened yet"
            self.error(step.line, step.column, message)


def _args_of(step: Get | Post | RunFlow) -> list[Any]:
    if isinstance(step, Post):
        return [*step.args, step.body]
    if isinstance(step, RunFlow):
        return [step.arg]
    return []


def walk_steps(steps: tuple[Any, ...]) -> list[Any]:
    """Every step, those inside blocks included, in the order written."""
    out: list[Any] = []
    for step in steps:
        out.append(step)
        if isinstance(step, IfBlock):
            out += walk_steps(step.then) + walk_steps(step.otherwise)
        elif isinstance(step, (ParallelBlock, CatchBlock)):
            out += walk_steps(step.items)
    return out


def _cycles(runs: dict[str, list[RunFlow]], file: str) -> list[str]:
    """Flows that would RUN each other for ever, each circle reported once, at
    the RUN that closes it."""
    errors: list[str] = []
    state: dict[str, int] = {}
    reported: set[frozenset[str]] = set()

    def visit(flow_id: str, path: list[str]) -> None:
        state[flow_id] = 1
        for step in runs.get(flow_id, []):
            nxt = step.flow_id
            if state.get(nxt) == 1:
                circle = [*path[path.index(nxt):], nxt]
                if frozenset(circle) not in reported:
                    reported.add(frozenset(circle))
                    errors.append(f"{file}:{step.line}:{step.id_column}: RUN {nxt}: flows would run each other "
                                  f"for ever ({' -> '.join(circle)})")
            elif nxt in runs and state.get(nxt) is None:
                visit(nxt, [*path, nxt])
        state[flow_id] = 2

    for flow_id in runs:
        if flow_id not in state:
            visit(flow_id, [flow_id])
    return errors


def natural_order(name: str) -> tuple[int, int | str]:
    """Flow ids in the order people count them: 2 before 10."""
    return (0, int(name)) if name.isascii() and name.isdigit() else (1, name)
