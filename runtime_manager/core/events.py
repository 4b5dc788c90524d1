"""Named events a node emits at each outcome, and who listens to them.

In the manner of huey's signals: the engine says what happened once, at the
one place it happens (`REQUEST_DONE` with the request and its one result,
`STEP_DONE` with a component's call and how long it took); metrics, and
anything else, listen. A receiver that fails is logged and never reaches the
engine. A node has one bus, made by the node and handed to every part that
emits or listens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("events")

REQUEST_DONE = "request_done"  # (request, result): every request's one result, overloaded ones included
REQUEST_REFUSED = "request_refused"  # (entry point, result): a request that could not be read (bad_request)
STEP_DONE = "step_done"  # (component name, seconds, ok): one call of a component in a flow
WASM_RUN = "wasm_run"  # (component name, outcome): a WebAssembly flow step ended: ok, trap, timeout, out_of_fuel, ...
FORWARDS_SENT = "forwards_sent"  # (requests): a batch of forwards left for a peer over MQTT
MODULE_STARTED = "module_started"  # (module name): an orchestrator module started
MODULE_ENDED = "module_ended"  # (module name, reason): it ended (exited, deleted, killed, ...)
MODULE_REFUSED = "module_refused"  # (why): a create the runtime refused


class Events:
    def __init__(self) -> None:
        self._receivers: dict[str, list[Callable[..., None]]] = {}

    def connect(self, name: str, receiver: Callable[..., None]) -> None:
        self._receivers.setdefault(name, []).append(receiver)

    def emit(self, name: str, *args: Any) -> None:
        for receiver in self._receivers.get(name, ()):
            try:
                receiver(*args)
            except Exception:
                log.exception("a receiver of %s failed", name)
