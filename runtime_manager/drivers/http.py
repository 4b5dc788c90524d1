"""The HTTP step driver: one pooled aiohttp session for every call of the node."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import aiohttp

from ..config import HttpComponent
from ..core.errors import ComponentError, ResultTooLarge, Timeout
from ..core.flows import Call
from ..logs import short
from .response import OutputProblem, decode_response

log = logging.getLogger("http")
JSON_HEADERS = {"Content-Type": "application/json"}


class HttpPool:
    """The node's one HTTP client session (keep-alive connections to components,
    the load balancer and peers). A dependency: set up first, closed last."""

    name = "http pool"

    def __init__(self, connections: int = 100) -> None:
        self.connections = connections
        self.session: aiohttp.ClientSession | None = None

    async def setup(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.connections, ttl_dns_cache=60)
        self.session = aiohttp.ClientSession(connector=connector)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()

    def kill(self) -> None:
        self.session = None  # its sockets close with the process


@functools.cache
def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=seconds)


def _where(call: Call) -> str:
    return f"step {call.number} ({call.component.name} endpoint {call.endpoint})"


async def _read(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, read no further than one byte past `limit` (the caller says it is too large)."""
    if resp.content_length is not None and resp.content_length <= limit:
        return await resp.read()
    data = bytearray()
    async for chunk in resp.content.iter_chunked(65536):
        data += chunk
        if len(data) > limit:
            break
    return bytes(data)


async def http_call(session: aiohttp.ClientSession, comp: HttpComponent, method: str, call: Call, body: bytes | None) -> Any:
    url = comp.url(call.endpoint)
    timeout = _timeout(comp.timeout_s)
    failure = dict(step=call.number, component=comp.name, endpoint=call.endpoint)
    for attempt in range(comp.retries + 1):
        try:
            async with session.request(
                method, url, data=body, headers=JSON_HEADERS if body is not None else None, timeout=timeout
            ) as resp:
                data = await _read(resp, comp.max_output_bytes)
                if resp.status >= 400:
                    raise ComponentError(
                        f"{_where(call)}: {method} {url} answered HTTP {resp.status}: {short(data, 120)}", **failure
                    )
                try:
                    return decode_response(data, comp.max_output_bytes)
                except OutputProblem as exc:
                    kind = ResultTooLarge if exc.too_large else ComponentError
                    raise kind(f"{_where(call)}: {method} {url}: {exc}", **failure) from None
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
