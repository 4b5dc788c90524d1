"""A node: one process, one event loop, one lifecycle for every part.

`Node` is a small container of services, in the manner of nameko's
`ServiceContainer` and aiohttp's cleanup contexts. The lifecycle contract,
written once, that every service follows:

- `setup()`: acquire what it needs and may fail early (bind a port, compile
  modules, read its state); nothing is served yet. Called in dependency order.
- `start()`: begin working. Called in the same order, after every setup.
- `stop()`: graceful. An entry point stops taking requests and waits, bounded
  by `drain_timeout_s`, until those it took are answered; every other service
  finishes its work and releases what it holds.
- `kill()`: urgent; never raises, never waits.

Services are listed in dependency order: the HTTP pool and the WebAssembly
steps, the MQTT link, the orchestrator runtime, the engine, then the entry
points. A stop first stops every entry point at once (no new requests, the
accepted ones finish and their results go out), then the rest in reverse
order: the engine's workers end, orchestrator modules end and deregister, the
MQTT link flushes and disconnects, the pools close. Only what was set up is
stopped. SIGTERM or Ctrl-C stops; a second signal kills.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .cluster.membership import Membership
from .cluster.mqtt_forward import MqttForwarder
from .cluster.peers import PeerTable
from .cluster.worker_loads import WorkerLoads
from .config import Config, WasmComponent
from .core.engine import FlowEngine
from .core.errors import ConfigError
from .drivers.http import HttpPool
from .observe.recent import RecentActivity
from .reload import changes, merged, natural_order
from .sd_notify import notify, reloading
from .transports.mqtt_entry import MqttEntrypoint, node_topic
from .transports.mqtt_link import MqttLink

if TYPE_CHECKING:  # imported when used: wasmtime (6 MB) and Flask (6 MB) only where needed
    from .drivers.wasm import WasmSteps
    from .observe.metrics import NodeMetrics
    from .orchestrator.runtime import OrchestratorRuntime
    from .transports.rest import RestEntrypoint

log = logging.getLogger("node")


class Service(Protocol):
    """The lifecycle above. An entry point also has `entrypoint = True`."""

    name: str

    async def setup(self) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def kill(self) -> None: ...


@dataclass(frozen=True)
class Parts:
    """Which entry points a node runs (`serve`: all; `rm_mqtt`, `rm_api`: one each)."""

    mqtt: bool = True
    rest: bool = True
    orchestrator: bool = True  # when runtime.conf has an orchestrator section
    publish_status: bool = True  # False: a worker of `serve --processes` other than the first
    reuse_port: bool = False  # REST shares its port with the node's other workers (SO_REUSEPORT)
    worker: int | None = None  # this worker's index, and how many there are, under `serve --processes`
    workers: int = 1
    worker_loads: str | None = None  # the file where workers share their load


class Heartbeat:
    """Logs the engine's counters every `heartbeat_interval_ms`."""

    name = "heartbeat"

    def __init__(self, engine: FlowEngine, interval_ms: int) -> None:
        self.engine, self.interval_s = engine, interval_ms / 1000
        self._task: asyncio.Task | None = None

    async def setup(self) -> None:
        pass

    async def start(self) -> None:
        if self.interval_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._beat(), name="heartbeat")

    async def stop(self) -> None:
        self.kill()

    def kill(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                log.info("heartbeat: %s", self.engine.status())
            except Exception:
                log.exception("heartbeat failed")


class Node:
    def __init__(self, config: Config, parts: Parts = Parts(), reload: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.parts = parts
        self._load_config = reload  # reads the configuration again (SIGHUP); raises ConfigError
        self._reloading = asyncio.Lock()
        self.reloads: dict[str, Any] = {"count": 0, "last": None}
        rt = config.runtime
        self.http = HttpPool(max(100, rt.workers * 2))
        self.wasm: WasmSteps | None = None
        if any(isinstance(c, WasmComponent) for c in config.components.values()):
            self.wasm = _wasm_steps(config)
        # The group as this node sees it; statuses fill it when the node has a broker.
        self.peers = PeerTable(config.node_name, config.nodes, rt.status_interval_ms / 1000, rt.discover)
        self.engine = FlowEngine(config, self.http, self.wasm, self.peers)
        self.recent = RecentActivity(self.engine.events, set(config.flows))  # the last minute, for /status and /ui
        if self.wasm is not None:
            self.wasm.events = self.engine.events
        self.link: MqttLink | None = None
        self.presence: MqttLink | None = None
        self.membership: Membership | None = None
        self.forwarder: MqttForwarder | None = None
        self.orchestrator: OrchestratorRuntime | None = None
        self.mqtt: MqttEntrypoint | None = None
        self.rest: RestEntrypoint | None = None
        self.metrics: NodeMetrics | None = None
        services: list[Service] = [self.http]
        if self.wasm is not None:
            services.append(self.wasm)
        want_orchestrator = parts.orchestrator and rt.orchestrator is not None
        mq = config.mqtt
        client_id = mq.client_id or f"rm-{config.node_name}-{mq.topic}"
        if parts.mqtt or want_orchestrator:
            self.link = MqttLink(mq, client_id, receive_maximum=rt.queue_depth + rt.workers if parts.mqtt else None)
            services.append(self.link)
        if self.link is not None and rt.status_interval_ms > 0:
            self.presence = MqttLink(mq, f"{client_id}-presence", persistent=False, name="presence link")
            services.append(self.presence)
        if want_orchestrator:
            from .orchestrator.runtime import OrchestratorRuntime

            assert self.link is not None
            self.orchestrator = OrchestratorRuntime(config, self.link)
            services.append(self.orchestrator)
        if parts.mqtt and self.link is not None and mq.protocol == "5":
            self.forwarder = MqttForwarder(mq.topic, config.node_name, self.link)
            self.engine.mqtt_forward = self.forwarder.forward
            services.append(self.forwarder)
        services += [self.engine, Heartbeat(self.engine, rt.heartbeat_interval_ms)]
        self.loads: WorkerLoads | None = None
        if parts.worker is not None and parts.worker_loads:
            self.loads = WorkerLoads(Path(parts.worker_loads), parts.worker, parts.workers)
        if self.presence is not None:
            self.membership = Membership(config.node_name, rt.status_prefix, rt.status_interval_ms, self.presence,
                                         self.peers, self.status_for_peers, publish=parts.publish_status,
                                         beat=self._share_load)
            services.append(self.membership)
        if parts.mqtt:
            assert self.link is not None
            self.mqtt = MqttEntrypoint(config, self.engine, self.link)
            services.append(self.mqtt)
        if parts.rest or rt.http_port:
            from .observe.metrics import NodeMetrics  # prometheus_client only where it is served
            from .transports.rest import RestEntrypoint

            self.metrics = NodeMetrics(set(config.flows), self.engine.events, self.status)
            if self.orchestrator is not None:
                self.metrics.watch_orchestrator(self.orchestrator.events)
            served = config if parts.rest else replace(config, rest=replace(config.rest, port=rt.http_port))
            self.rest = RestEntrypoint(served, self.engine, self.status, self.readiness, self.lb_answer,
                                       reuse_port=parts.reuse_port, metrics=self.metrics.render, flows=parts.rest)
            services.append(self.rest)
        self.services = services
        self._set_up: list[Service] = []
        self.started = time.time()
        self.stopping = False

    # ----- lifecycle (on the loop) -----------------------------------------------------
    async def start(self) -> None:
        """Set up every service, then start them, in dependency order. When one
        fails, what was set up is stopped again (reverse order) and the error raised."""
        try:
            for service in self.services:
                await service.setup()
                self._set_up.append(service)
            for service in self.services:
                await service.start()
        except BaseException:
            await self.stop()
            raise
        log.info("node %s running: %s", self.config.node_name, ", ".join(s.name for s in self.services))

    async def stop(self) -> None:
        """Entry points first, all at once; then the rest in reverse order. A
        service that does not stop in time is killed."""
        self.stopping = True
        bound = self.config.runtime.drain_timeout_s + 5
        set_up, self._set_up = self._set_up, []
        entrypoints = [s for s in set_up if getattr(s, "entrypoint", False)]
        await asyncio.gather(*(self._stop_one(s, bound) for s in entrypoints))
        for service in reversed([s for s in set_up if s not in entrypoints]):
            await self._stop_one(service, bound)
        log.info("node %s stopped", self.config.node_name)

    @staticmethod
    async def _stop_one(service: Service, bound: float) -> None:
        try:
            await asyncio.wait_for(service.stop(), bound)
        except Exception as exc:
            log.error("%s did not stop cleanly (%s); killed", service.name, type(exc).__name__ or exc)
            _kill(service)

    def kill(self) -> None:
        """Urgent: every service that was set up, in reverse order. Never raises."""
        set_up, self._set_up = self._set_up, []
        for service in reversed(set_up):
            _kill(service)

    def _summary(self) -> str:
        """One line for the service manager (`systemctl status`)."""
        parts = [s.name for s in self.services if getattr(s, "entrypoint", False)]
        return f"node {self.config.node_name}: {len(self.config.flows)} flows; {', '.join(parts) or 'no entry point'}"

    # ----- reload (on the loop) ------------------------------------------------------------
    async def reload(self) -> dict[str, Any]:
        """Read the configuration directory again and apply what can be applied
        live (see reload.py). A configuration with errors is refused whole: every
        error is logged and the node runs on as it was. Returns what happened, as
        `GET /status` shows it under `config.last_reload`."""
        async with self._reloading:
            reloading()
            outcome = await self._reload()
            notify("READY=1", f"STATUS={self._summary()}")
        outcome["at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.reloads = {"count": self.reloads["count"] + 1, "last": outcome}
        return outcome

    async def _reload(self) -> dict[str, Any]:
        if self._load_config is None:
            log.warning("reload: this node has no configuration directory to read again")
            return {"ok": False, "errors": ["no configuration directory to read again"]}
        log.info("reload: reading %s", self.config.dir)
        try:
            new = await asyncio.get_running_loop().run_in_executor(None, self._load_config)
        except ConfigError as exc:
            for error in exc.errors:
                log.error("reload: %s", error)
            log.error("reload refused: %d error(s) in %s; running on as before", len(exc.errors), self.config.dir)
            return {"ok": False, "errors": exc.errors}
        found = changes(self.config, new)
        wasm = self.wasm
        try:
            if any(isinstance(c, WasmComponent) for c in new.components.values()):
                if wasm is None:  # the first WebAssembly component: start the steps now
                    wasm = _wasm_steps(new)
                    wasm.events = self.engine.events
                    await wasm.setup()
                    await wasm.start()
                    self._set_up.insert(self._set_up.index(self.engine), wasm)
                    self.services.insert(self.services.index(self.engine), wasm)
                else:
                    for name in await wasm.update(new.components.values()):
                        if name not in found.components_changed:
                            found.components_changed.append(name)  # its module file changed
        except Exception as exc:
            log.error("reload refused: a WebAssembly module did not load (%s: %s); running on as before", type(exc).__name__, exc)
            return {"ok": False, "errors": [f"{type(exc).__name__}: {exc}"]}
        self.config = running = merged(self.config, new)
        self.wasm = wasm
        self.engine.reconfigure(running, wasm)
        self.peers.reconfigure(running.nodes)
        self.recent.flows = set(running.flows)
        if self.metrics is not None:
            self.metrics.flows = set(running.flows)
        if "log.level" in found.live:
            logging.getLogger().setLevel(running.log.level)
        log.info("reload: %s", found.summary() if found.any else "configuration unchanged")
        for key in found.needs_restart:
            log.warning("reload: %s changed; it applies at the next start (running on the old value)", key)
        return {"ok": True, **found.to_dict()}

    def readiness(self) -> dict[str, Any]:
        """Whether this node takes requests, and why not (`GET /readyz`; any thread)."""
        reasons = []
        if not self.engine.accepting:
            reasons.append("not accepting requests (starting or stopping)")
        if self.stopping:
            reasons.append("stopping: finishing the requests it took")
        if self.mqtt is not None and self.link is not None and not self.link.connected:
            reasons.append(f"not connected to the MQTT broker ({self.link.last_error or 'connecting'})")
        queue = self.engine.status()
        if queue["queued"] >= queue["queue_depth"]:
            reasons.append(f"queue full ({queue['queue_depth']} requests waiting)")
        return {"ready": not reasons, "reasons": reasons, "node": self.config.node_name}

    def status(self) -> dict[str, Any]:
        """This node as `GET /status` shows it (any thread)."""
        status = self.engine.status()
        status["pid"] = os.getpid()
        if self.parts.worker is not None:
            status["worker"] = {"index": self.parts.worker, "of": self.parts.workers, "supervisor_pid": os.getppid()}
        status["uptime_s"] = round(time.time() - self.started, 1)
        status["entrypoints"] = [s.name for s in self.services if getattr(s, "entrypoint", False)]
        status["config"] = {"dir": str(self.config.dir), "flows": sorted(self.config.flows, key=natural_order),
                            "reloads": self.reloads["count"], "last_reload": self.reloads["last"]}
        if self.link is not None:
            status["mqtt"] = {"connected": self.link.connected, "connections": self.link.connections,
                              "unacked_publishes": self.link.unacked, "last_error": self.link.last_error}
        status["placement"] = {"policy": self.config.load_balancer.policy, "load": round(self.engine.load(), 3),
                               "peers": self.peers.to_dict(time.monotonic())}
        if self.orchestrator is not None:
            status["orchestrator"] = {"runtime": self.orchestrator.runtime_uuid, "name": self.orchestrator.runtime_name,
                                      "registered": self.orchestrator.orchestrated,
                                      "modules": sorted(m.name for m in list(self.orchestrator.modules.values())),
                                      "channel_topics": self.orchestrator.channels.topics}
        status["flows_last_minute"] = self.recent.flows_last_minute()
        status["last_errors"] = self.recent.last_errors()
        return status

    def status_for_peers(self) -> dict[str, Any]:
        """What this node tells its peers in its status (on the loop)."""
        engine, rt = self.engine, self.config.runtime
        in_flight, queued = engine.active, engine.pending() - engine.active
        if self.loads is not None:  # the node's load: every worker's
            others = self.loads.others()
            in_flight, queued = in_flight + others[0], queued + others[1]
        n = self.parts.workers
        doc: dict[str, Any] = {"in_flight": in_flight, "queued": queued, "capacity": rt.workers * n,
                               "queue_depth": rt.queue_depth * n, "processes": n,
                               "load": round((in_flight + queued) / (rt.workers * n), 3), "flows": sorted(self.config.flows),
                               "uptime_s": round(time.time() - self.started, 1), "ready": self.readiness()["ready"]}
        if self.rest is not None and self.rest.flows:  # not the watching endpoints of http_port
            rest = self.config.rest
            doc["rest"] = {"protocol": "http", "ip": rest.host, "port": self.rest.port, "endpoint": rest.endpoint}
        if self.mqtt is not None and self.forwarder is not None:
            doc["mqtt_topic"] = node_topic(self.config.mqtt.topic, self.config.node_name)
        return doc

    def _share_load(self) -> None:
        if self.loads is not None:
            self.loads.write(self.engine.active, self.engine.pending() - self.engine.active)

    def lb_answer(self) -> dict[str, Any]:
        """`GET /lb/id_node`: this node as a load balancer for others (any thread)."""
        assert self.engine.placer is not None
        return self.engine.placer.lb_answer()

    # ----- running as a process -----------------------------------------------------------
    async def serve(self) -> int:
        """Start, run until SIGTERM or SIGINT, stop. A second signal kills. Returns the exit code."""
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()

        def on_signal(sig: signal.Signals) -> None:
            if stopping.is_set():
                log.warning("%s received again: killing", sig.name)
                self.kill()
                logging.shutdown()
                os._exit(1)
            log.info("%s received, stopping", sig.name)
            stopping.set()

        reloads: set[asyncio.Task] = set()

        def on_hangup() -> None:
            if not stopping.is_set():
                task = loop.create_task(self.reload(), name="reload")
                reloads.add(task)
                task.add_done_callback(reloads.discard)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
        try:
            await self.start()
        except Exception as exc:
            log.error("node did not start: %s: %s", type(exc).__name__, exc)
            return 1
        notify("READY=1", f"STATUS={self._summary()}")
        await stopping.wait()
        notify("STOPPING=1", "STATUS=draining")
        await self.stop()
        return 0


def _wasm_steps(config: Config) -> WasmSteps:
    from .drivers.wasm import WasmSteps  # wasmtime only where WebAssembly runs

    rt = config.runtime
    return WasmSteps(config.components.values(), threads=rt.wasm_threads, max_threads=rt.wasm_max_threads)


def _kill(service: Service) -> None:
    try:
        service.kill()
    except Exception:
        log.exception("killing %s failed", service.name)


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is in requirements.txt on Linux
        return asyncio.new_event_loop()


def run(config: Config, parts: Parts = Parts(), reload: Callable[[], Config] | None = None) -> int:
    """Run a node in this process until it is stopped; the process's exit code.
    With `reload`, SIGHUP reads the configuration again."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(Node(config, parts, reload).serve())
