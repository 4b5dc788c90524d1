"""Step drivers: how one request of a flow reaches its component.

`call_component(component, step, call, body, io)` is chosen by multipledispatch
on (component kind, step kind). The function form with a private namespace is
used on purpose: the method form is not thread-safe (docs/dependency-notes.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from multipledispatch import dispatch

from ..config import HttpComponent, WasmComponent
from ..core.flows import Call, Get, Post
from ..http.client import HttpClient
from .http import http_call

if TYPE_CHECKING:  # wasmtime is imported only by nodes that run WebAssembly
    from .wasm import WasmSteps

NS: dict[str, Any] = {}


@dataclass
class StepIO:
    """What drivers share within one node: the pooled HTTP client and the WASM steps."""

    http: HttpClient
    wasm: WasmSteps | None = None


@dispatch(HttpComponent, Get, object, object, object, namespace=NS)
async def call_component(comp: HttpComponent, step: Get, call: Call, body: bytes | None, io: StepIO) -> Any:
    return await http_call(io.http, comp, "GET", call, None)


@dispatch(HttpComponent, Post, object, object, object, namespace=NS)
async def call_component(comp: HttpComponent, step: Post, call: Call, body: bytes | None, io: StepIO) -> Any:  # noqa: F811
    return await http_call(io.http, comp, "POST", call, body)


@dispatch(WasmComponent, object, object, object, object, namespace=NS)
async def call_component(comp: WasmComponent, step: Get | Post, call: Call, body: bytes | None, io: StepIO) -> Any:  # noqa: F811
    # GET and POST alike: the body (empty for GET) goes to the module's stdin.
    assert io.wasm is not None
    return await io.wasm.call(comp, call, body or b"")
