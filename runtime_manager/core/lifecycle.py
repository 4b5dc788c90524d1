"""The lifecycle every part of a node follows, written once.

A node (`node.py`) is a small container of services, in the manner of nameko's
`ServiceContainer` and aiohttp's cleanup contexts. Each service subclasses
`Service` and overrides what it needs; what it does not override does nothing.

- `setup()`: acquire what it needs; may fail early (bind a port, compile
  modules, read its state). Nothing is served yet. Called in dependency order,
  on the node's loop.
- `start()`: begin working. Called in the same order, after every `setup`.
- `reconfigure(config)`: a reload. Take from the new configuration what this
  service applies while running; requests already taken finish on the old one.
  Raise to refuse the reload: services are reconfigured in dependency order and
  a refusal stops the ones after it from seeing the new configuration.
- `stop()`: graceful. An `Entrypoint` stops taking requests and waits, bounded
  by `drain_timeout_s`, until those it took are answered; any other service
  finishes its work and releases what it holds. Only what was set up is
  stopped: entry points first, all at once, then the rest in reverse order.
- `kill()`: urgent. Never raises, never waits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


class Service:
    """A part of a node with the lifecycle above (every step a no-op here)."""

    name = "service"

    async def setup(self) -> None:
        """Acquire what the service needs; raise when it cannot."""

    async def start(self) -> None:
        """Begin working."""

    async def reconfigure(self, config: Any) -> None:
        """Apply what can be applied live of a reloaded configuration."""

    async def stop(self) -> None:
        """Finish the work taken, release what is held."""

    def kill(self) -> None:
        """Stop at once; never raises."""


class Entrypoint(Service):
    """A service that takes requests from outside (MQTT, REST). A node stops
    every entry point first, all at once, before anything they use."""

    name = "entry point"


async def wait_until(done: Callable[[], bool], timeout_s: float, step_s: float = 0.01) -> bool:
    """Wait (on the loop) until `done()` holds or `timeout_s` has passed;
    whether it holds. The drains of every service use it."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(step_s)
    return True
