"""A node as a process: its event loop, its signals, its exit code.

SIGTERM or Ctrl-C stops the node (entry points drain first); a second one
kills it. SIGHUP reads the configuration again. The service manager hears of
each step (`sd_notify`: READY, RELOADING, STOPPING).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Callable

from . import hangup
from .config import Config
from .node import Node, Parts
from .sd_notify import notify

log = logging.getLogger("node")


async def serve(node: Node) -> int:
    """Start `node`, run it until SIGTERM or SIGINT, stop it. Returns the exit code."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if stopping.is_set():
            log.warning("%s received again: killing", sig.name)
            node.kill()
            logging.shutdown()
            os._exit(1)
        log.info("%s received, stopping", sig.name)
        stopping.set()

    reloads: set[asyncio.Task] = set()

    def on_hangup() -> None:
        if not stopping.is_set():
            task = loop.create_task(node.reload(), name="reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        await node.start()
    except Exception as exc:
        log.error("node did not start: %s: %s", type(exc).__name__, exc)
        return 1
    settle_garbage_collector()
    notify("READY=1", f"STATUS={node.summary()}")
    if hangup.pending():
        log.info("SIGHUP received while starting: reading the configuration again now")
        on_hangup()
    await stopping.wait()
    notify("STOPPING=1", "STATUS=draining")
    await node.stop()
    return 0


# Young collections once this many more containers (dicts, lists, objects) are
# alive than at the last one; the older generations as in CPython.
YOUNG_COLLECTION_THRESHOLD = 20_000


def settle_garbage_collector() -> None:
    """Once the node has started: what it has built so far (modules, its
    configuration, compiled flows and modules) is set aside from the cyclic
    garbage collector for good (`gc.freeze`), and young collections run less
    often. A request's objects are freed by their reference counts, not by the
    collector; at CPython's default threshold (700) a burst of requests made it
    run every few requests, each time looking at everything still queued."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, old)


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is in requirements.txt on Linux
        return asyncio.new_event_loop()


def run(config: Config, parts: Parts | None = None, reload: Callable[[], Config] | None = None) -> int:
    """Run a node in this process until it is stopped; the process's exit code.
    With `reload`, SIGHUP reads the configuration again."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(serve(Node(config, parts or Parts(), reload)))
