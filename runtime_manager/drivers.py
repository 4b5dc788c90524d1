"""Step drivers: how one request of a flow reaches its component.

`call_component(component, step, call, body, io)` is chosen by multipledispatch
on (component kind, step kind). The function form with a private namespace is
used on purpose: the method form is not thread-safe (NOTES.md).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from multipledispatch import dispatch

from .config import HttpComponent, WasmComponent
from .errors import ComponentError, Timeout
from .flows import Call, Get, Post
from .logs import short

log = logging.getLogger("http")
NS: dict[str, Any] = {}
JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass
class StepIO:
    """What drivers share within one engine: the pooled HTTP client and the WASM runner."""

    session: aiohttp.ClientSession
    wasm: Any = None  # wasm.WasmRunner, created when a WASM component exists


def decode_response(data: bytes) -> Any:
    """A response is kept as parsed JSON when it is JSON, otherwise as text."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return data.decode("utf-8", "replace")


@functools.cache
def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=seconds)


def _where(call: Call) -> str:
    return f"step {call.number} ({call.component.name} endpoint {call.endpoint})"


async def _http(comp: HttpComponent, method: str, call: Call, body: bytes | None, io: StepIO) -> Any:
    url = comp.url(call.endpoint)
    timeout = _timeout(comp.timeout_s)
    failure = dict(step=call.number, component=comp.name, endpoint=call.endpoint)
    for attempt in range(comp.retries + 1):
        try:
            async with io.session.request(
                method, url, data=body, headers=JSON_HEADERS if body is not None else None, timeout=timeout
            ) as resp:
                data = await resp.read()
                if resp.status >= 400:
                    raise ComponentError(
                        f"{_where(call)}: {method} {url} answered HTTP {resp.status}: {short(data, 120)}", **failure
                    )
                return decode_response(data)
        except TimeoutError:
            raise Timeout(f"{_where(call)}: {method} {url} gave no answer within {comp.timeout_s} s", **failure) from None
        except aiohttp.ClientConnectionError as exc:
            # Only connection errors are retried: the request may not have arrived.
            if attempt < comp.retries:
                log.warning(
                    "%s: %s %s failed (%s), retry %d of %d",
                    _where(call), method, url, exc or type(exc).__name__, attempt + 1, comp.retries,
                )
                await asyncio.sleep(0.05 * 2**attempt)
                continue
            raise ComponentError(f"{_where(call)}: cannot reach {url}: {exc or type(exc).__name__}", **failure) from None
        except aiohttp.ClientError as exc:
            raise ComponentError(f"{_where(call)}: {method} {url} failed: {exc}", **failure) from None
    raise AssertionError("unreachable")


@dispatch(HttpComponent, Get, object, object, object, namespace=NS)
async def call_component(comp: HttpComponent, step: Get, call: Call, body: bytes | None, io: StepIO) -> Any:
    return await _http(comp, "GET", call, None, io)


@dispatch(HttpComponent, Post, object, object, object, namespace=NS)
async def call_component(comp: HttpComponent, step: Post, call: Call, body: bytes | None, io: StepIO) -> Any:  # noqa: F811
    return await _http(comp, "POST", call, body, io)


@dispatch(WasmComponent, object, object, object, object, namespace=NS)
async def call_component(comp: WasmComponent, step: Get | Post, call: Call, body: bytes | None, io: StepIO) -> Any:  # noqa: F811
    # GET and POST alike: the body (empty for GET) goes to the module's stdin.
    return await io.wasm.call(comp, call, body or b"")
