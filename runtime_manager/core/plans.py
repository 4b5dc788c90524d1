"""A flow's plan in words (`check --explain`, `/status`, the status page):
its requests and their targets, bodies, options and blocks, and where each
value comes from."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .flows import Call, Condition, Fail, Flow, Get, IfBlock, Options, ParallelBlock, Post, Publish, Return, SubFlow
from .values import refs_of, show, source_of


def show_condition(cond: Condition) -> str:
    return f"{show(cond.left)} {cond.op}" + (f" {show(cond.right)}" if cond.right is not None else "")


def _show_options(options: Options) -> str:
    parts = []
    if options.retries:
        parts.append(f"retried up to {options.retries} time(s), {options.backoff_ms} ms apart, doubling")
    if options.timeout_ms is not None:
        parts.append(f"{options.timeout_ms} ms an attempt")
    if options.optional:
        parts.append("optional: null when it fails")
    return f"  [{'; '.join(parts)}]" if parts else ""


def describe_call(call: Call) -> str:
    """A request's target in words: component, endpoint id and where it goes."""
    component, endpoint = call.component, call.endpoint
    where = (component.url(endpoint) if hasattr(component, "url")
             else f"module {getattr(getattr(component, 'module', None), 'name', '?')}, export {component.endpoints[endpoint]}")
    return f"{component.name} {endpoint} ({where})"


def explain(flow: Flow, target: Callable[[Call], str] = describe_call) -> list[str]:
    """A flow's plan, a line each: its requests, their bodies, its blocks and
    where each value comes from."""
    lines = [f"flow {flow.id} (line {flow.line}): {len(flow.calls)} request(s)"]

    def sources(args: list[Any], indent: str) -> None:
        seen: set[str] = set()
        for ref in refs_of([a for a in args if a is not None]):
            if show(ref) not in seen:
                seen.add(show(ref))
                lines.append(f"{indent}   {show(ref)}: {source_of(ref)}")

    def walk(nodes: tuple[Any, ...], indent: str) -> None:
        for node in nodes:
            if isinstance(node, Call):
                step = node.step
                kind = "GET" if isinstance(step, Get) else "POST"
                lines.append(f"{indent}{node.number}. {kind} {target(node)}  -> result{node.number}"
                             + _show_options(step.options))
                if isinstance(step, Post):
                    body = show(step.body) if step.body is not None else '{"payload": [' + ", ".join(
                        show(a) for a in step.args) + "]}"
                    lines.append(f"{indent}   body: {body}")
                    sources([*step.args, step.body], indent)
            elif isinstance(node, SubFlow):
                arg = node.step.arg
                lines.append(f"{indent}{node.number}. RUN flow {node.flow_id} with "
                             f"{show(arg) if arg is not None else 'payload'} as its payload  -> result{node.number}"
                             + _show_options(node.step.options))
                sources([arg], indent)
            elif isinstance(node, IfBlock):
                lines.append(f"{indent}IF {show_condition(node.condition)}  (line {node.line})")
                sources([node.condition.left, node.condition.right], indent)
                walk(node.then, indent + "  ")
                if node.otherwise:
                    lines.append(f"{indent}ELSE")
                    walk(node.otherwise, indent + "  ")
                lines.append(f"{indent}END")
            elif isinstance(node, ParallelBlock):
                lines.append(f"{indent}PARALLEL: at once, the block fails when one of them does  (line {node.line})")
                walk(node.items, indent + "  ")
                lines.append(f"{indent}END")
            elif isinstance(node, Publish):
                lines.append(f"{indent}PUBLISH {show(node.value)} to {node.topic} (QoS {node.qos}"
                             f"{', retained' if node.retain else ''})")
                sources([node.value], indent)
            elif isinstance(node, Return):
                lines.append(f"{indent}RETURN {show(node.value)}: the flow's answer")
                sources([node.value], indent)
            elif isinstance(node, Fail):
                lines.append(f"{indent}FAIL {json.dumps(node.message)}: the flow ends with error flow_failed")

    walk(flow.program, "  ")
    if flow.catch is not None:
        lines.append("  ON ERROR: when a step fails (`error`: its code, message and step)")
        walk(flow.catch, "    ")
        lines.append("  END")
    return lines
