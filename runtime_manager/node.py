"""A node: the container of its services, wired once, with one lifecycle.

`Node` builds every part from the configuration and hands each what it works
with (nothing is patched in afterwards): the HTTP client and the WebAssembly
steps, the MQTT links, the orchestrator runtime, forwarding over MQTT, the
placer, the engine, membership and the entry points, and one event bus that
every part emits on and metrics and the status page listen to.

The lifecycle (written once, in core/lifecycle.py) runs in dependency order,
in the manner of nameko's `ServiceContainer` and aiohttp's cleanup contexts:
`start` sets up every service, then starts them; `stop` first stops every
entry point at once (no new requests; the accepted ones finish and their
results go out), then the rest in reverse order: the engine's workers end,
orchestrator modules end and deregister, the MQTT link flushes and
disconnects, the HTTP client closes. Only what was set up is stopped. `kill`
never raises. `reload` reads the configuration again and hands it to every
service through `reconfigure`.

Running a node as a process (signals, the event loop) is `process.py`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from . import __version__, sd_notify
from .cluster.membership import Membership
from .cluster.mqtt_forward import MqttForwarder
from .cluster.peers import PeerTable
from .cluster.placement import Placer
from .cluster.twin import Instance
from .cluster.worker_loads import WorkerLoads
from .config import Config, WasmComponent
from .core.errors import ConfigError
from .core.events import Events
from .core.flows import Publish, walk_steps
from .core.lifecycle import Entrypoint, Service
from .core.topics import node_control_topic, topic_name_problem
from .drivers import StepIO
from .engine import FlowEngine
from .entrypoints.mqtt import MqttEntrypoint
from .entrypoints.takeover import SessionTakeover
from .http.client import HttpClient
from .mqtt.link import MqttLink
from .observe import status as documents
from .observe.loop_watch import LoopWatch
from .observe.recent import RecentActivity
from .reload import changes, merged
from .tracing import Tracer

if TYPE_CHECKING:  # imported when used: wasmtime (6 MB) and Flask (6 MB) only where needed
    from .drivers.wasm import WasmSteps
    from .entrypoints.rest import RestEntrypoint
    from .observe.metrics import NodeMetrics
    from .orchestrator.runtime import OrchestratorRuntime

log = logging.getLogger("node")


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


class Heartbeat(Service):
    """Logs the engine's counters every `heartbeat_interval_ms`."""

    name = "heartbeat"

    def __init__(self, engine: FlowEngine, interval_ms: int) -> None:
        self.engine, self.interval_s = engine, interval_ms / 1000
        self._task: asyncio.Task | None = None

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


def _publishes(config: Config) -> bool:
    """Whether the node publishes for its flows: PUBLISH steps, or a dead-letter topic."""
    return bool(config.runtime.dead_letter_topic) or any(
        isinstance(step, Publish) for flow in config.flows.values() for step in walk_steps(flow.steps))


class Node:
    def __init__(self, config: Config, parts: Parts = Parts(), reload: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.parts = parts
        self.worker, self.workers = parts.worker, parts.workers
        self._load_config = reload  # reads the configuration again (SIGHUP); raises ConfigError
        self._reloading = asyncio.Lock()
        self._commands: set[asyncio.Task] = set()
        self.reloads: dict[str, Any] = {"count": 0, "last": None}
        rt, mq = config.runtime, config.mqtt
        self.events = Events()  # the node's one bus
        self.http = HttpClient(max_per_host=max(100, rt.workers * 2))
        self.wasm: WasmSteps | None = _wasm_steps(config, self.events) if _runs_wasm(config) else None
        services: list[Service] = [self.http, *([self.wasm] if self.wasm is not None else [])]

        # the broker: the main link (requests, orchestrator), the presence link (statuses)
        want_orchestrator = parts.orchestrator and rt.orchestrator is not None
        client_id = mq.client_id or f"rm-{config.node_name}-{mq.topic}"
        self.link: MqttLink | None = None
        if parts.mqtt or want_orchestrator:
            self.link = MqttLink(mq, client_id, receive_maximum=rt.queue_depth + rt.workers if parts.mqtt else None)
            services.append(self.link)
        # Statuses go out on a link of their own. Not from a REST-only process
        # (`rm_api`): the original runs it beside `rm_mqtt` as one node, whose
        # status the `rm_mqtt` process publishes.
        self.presence: MqttLink | None = None
        if self.link is not None and rt.status_interval_ms > 0:
            # a short keepalive: the broker sends the will of a stopped node within 1.5 of it
            self.presence = MqttLink(replace(mq, keepalive=rt.presence_keepalive_s), f"{client_id}-presence",
                                     persistent=False, name="presence link")
            services.append(self.presence)
        self.orchestrator: OrchestratorRuntime | None = None
        if want_orchestrator:
            from .orchestrator.runtime import OrchestratorRuntime

            assert self.link is not None
            self.orchestrator = OrchestratorRuntime(config, self.link, self.events)
            services.append(self.orchestrator)

        # placement and the engine
        # a peer's silence is judged by its heartbeat (the whole status comes at least that often)
        heartbeat_s = max(rt.status_heartbeat_ms, rt.status_interval_ms) / 1000 if rt.status_interval_ms else 0.0
        self.peers = PeerTable(config.node_name, config.nodes, heartbeat_s, rt.discover, topic=mq.topic,
                               retry_s=max(1.0, 3 * rt.status_interval_ms / 1000))
        self.forwarder: MqttForwarder | None = None
        if parts.mqtt and self.link is not None and mq.protocol == "5":
            self.forwarder = MqttForwarder(mq.topic, config.node_name, self.link, self.events)
            services.append(self.forwarder)
        self.placer = Placer(config, self.http, self.peers,
                             mqtt_forward=self.forwarder.forward if self.forwarder is not None else None)
        self.io = StepIO(http=self.http, wasm=self.wasm)
        self.tracer: Tracer | None = None
        if rt.tracing is not None:  # spans over OTLP/HTTP; started before the engine, stopped after it
            self.tracer = Tracer(rt.tracing, config.node_name, __version__, self.http)
            services.append(self.tracer)
        # PUBLISH steps and dead letters go out on the main link; a process without
        # one (`rm_api`) gets a link of its own when its flows or runtime.conf need it
        self.output: MqttLink | None = None
        if self.link is None and _publishes(config):
            self.output = MqttLink(mq, f"{client_id}-out", persistent=False, name="output link")
            services.append(self.output)
        out = self.link or self.output
        self.engine = FlowEngine(config, self.io, self.placer, self.events, self.tracer,
                                 publish=out.publish if out is not None else None)
        services += [self.engine, Heartbeat(self.engine, rt.heartbeat_interval_ms)]

        # the group, and watching the node
        self.loads: WorkerLoads | None = None
        if parts.worker is not None and parts.worker_loads:
            self.loads = WorkerLoads(Path(parts.worker_loads), parts.worker, parts.workers)
        # a gone member of the shared group: its session taken over by the lowest live member
        self.takeover: SessionTakeover | None = None
        session = None
        if parts.mqtt and self.link is not None and mq.shared_group:
            base = self.link.client_id.rsplit("-w", 1)[0] if parts.worker is not None else self.link.client_id
            ids = [f"{base}-w{k}" for k in range(parts.workers)] if parts.worker is not None else [base]
            session = {"client_ids": ids, "shared_group": mq.shared_group}
            if parts.publish_status:  # one process of a node takes over, not each of its workers
                self.takeover = SessionTakeover(config, self.engine, self.peers)
        self.watch = LoopWatch(self.engine, self.loads,
                               self._sibling_silent if self.takeover is not None and self.loads is not None else None)
        services.append(self.watch)
        self.membership: Membership | None = None
        if self.presence is not None:
            self.membership = Membership(config.node_name, rt.status_prefix, rt.status_interval_ms, self.presence,
                                         self.peers, lambda: documents.status_for_peers(self),
                                         publish=parts.publish_status,
                                         instance=Instance.this(supervised=parts.worker is not None),
                                         on_gone=self.takeover.peer_gone if self.takeover is not None else None,
                                         session=session if parts.publish_status else None, group=rt.group,
                                         heartbeat_ms=rt.status_heartbeat_ms, load_delta=rt.load_report_delta)
            services.append(self.membership)
            # commands to this node over the broker (`reload --all`)
            self.presence.subscribe(node_control_topic(rt.status_prefix, config.node_name), self._on_command, qos=1)
        self.recent = RecentActivity(self.events, set(config.flows))  # the last minute, for /status and /ui
        self.metrics: NodeMetrics | None = None

        # the entry points
        self.mqtt: MqttEntrypoint | None = None
        if parts.mqtt:
            assert self.link is not None
            self.mqtt = MqttEntrypoint(config, self.engine, self.link)
            services.append(self.mqtt)
        if self.takeover is not None:
            services.append(self.takeover)
        self.rest: RestEntrypoint | None = None
        if parts.rest or rt.http_port:
            from .entrypoints.rest import RestEntrypoint
            from .observe.metrics import NodeMetrics  # prometheus_client only where it is served

            self.metrics = NodeMetrics(set(config.flows), self.events, self.status)
            served = config if parts.rest else replace(config, rest=replace(config.rest, port=rt.http_port))
            self.rest = RestEntrypoint(served, self.engine, self.status, self.readiness, self.engine.lb_answer,
                                       reuse_port=parts.reuse_port, metrics=self.metrics.render, flows=parts.rest,
                                       move_module=self.orchestrator.move_threadsafe if self.orchestrator else None)
            services.append(self.rest)
        self.services = services
        self._set_up: list[Service] = []
        self.started = time.time()
        self.stopping = False

    # ----- what the documents read (observe/status.py) --------------------------------------
    @property
    def takes_mqtt(self) -> bool:
        return self.mqtt is not None

    @property
    def forwards_mqtt(self) -> bool:
        return self.mqtt is not None and self.forwarder is not None

    def status(self) -> dict[str, Any]:
        """`GET /status` (any thread)."""
        return documents.node_status(self)

    def readiness(self) -> dict[str, Any]:
        """`GET /readyz` (any thread)."""
        return documents.readiness(self)

    def _sibling_silent(self, index: int) -> None:
        """A worker of this node the supervisor has not brought back: its session taken over."""
        assert self.takeover is not None and self.link is not None
        base = self.link.client_id.rsplit("-w", 1)[0]
        self.takeover.sibling_gone(index, f"{base}-w{index}", back=lambda: index not in self.watch.silent_siblings(
            time.monotonic()))

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
        entrypoints = [s for s in set_up if isinstance(s, Entrypoint)]
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

    def summary(self) -> str:
        """One line for the service manager (`systemctl status`)."""
        names = documents.entrypoint_names(self)
        return f"node {self.config.node_name}: {len(self.config.flows)} flows; {', '.join(names) or 'no entry point'}"

    # ----- commands over the broker (on the loop) ----------------------------------------------
    def _on_command(self, msg: Any) -> None:
        """On this node's control topic: `{"command": "reload", "id": ..., "reply_to":
        topic}` reads the configuration again and answers the outcome on
        `reply_to`; `{"command": "status"}` publishes the whole status again
        (a tool, or a newcomer looking for a twin, wants a fresh one)."""
        try:
            command = orjson.loads(msg.payload)
        except orjson.JSONDecodeError:
            command = None
        if isinstance(command, dict) and command.get("command") == "status":
            if self.membership is not None:
                self.membership.publish_now()
            return
        if not isinstance(command, dict) or command.get("command") != "reload":
            log.warning("a command on '%s' that is not {\"command\": \"reload\"} or \"status\"; ignored", msg.topic)
            return
        reply_to = command.get("reply_to")
        if not isinstance(reply_to, str) or topic_name_problem(reply_to):
            reply_to = None
        log.info("reload asked over the broker (%s)", msg.topic)
        task = asyncio.get_running_loop().create_task(self._reload_and_answer(reply_to, command.get("id")))
        self._commands.add(task)
        task.add_done_callback(self._commands.discard)

    async def _reload_and_answer(self, reply_to: str | None, command_id: Any) -> None:
        outcome = await self.reload()
        if reply_to is not None and self.presence is not None and self.parts.publish_status:
            answer = {"node": self.config.node_name, "id": command_id, "reload": outcome}
            try:
                self.presence.publish(reply_to, orjson.dumps(answer), qos=1)
            except Exception as exc:
                log.warning("could not answer the reload on '%s': %s", reply_to, exc)

    # ----- reload (on the loop) ------------------------------------------------------------
    async def reload(self) -> dict[str, Any]:
        """Read the configuration directory again and apply what can be applied
        live (see reload.py). A configuration with errors is refused whole: every
        error is logged and the node runs on as it was. Returns what happened, as
        `GET /status` shows it under `config.last_reload`."""
        async with self._reloading:
            sd_notify.reloading()
            outcome = await self._reload()
            sd_notify.notify("READY=1", f"STATUS={self.summary()}")
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
        running = merged(self.config, new)
        service: Service | None = None
        try:
            if self.wasm is None and _runs_wasm(running):
                await self._add_wasm(running)  # the first WebAssembly component: start the steps now
            # in dependency order: the WebAssembly steps (the one service that may
            # refuse: a module that does not load) come before anything else changes
            for service in self._set_up:
                await service.reconfigure(running)
        except Exception as exc:
            who = service.name if service is not None else "wasm"
            log.error("reload refused by %s (%s: %s); running on as before", who, type(exc).__name__, exc)
            return {"ok": False, "errors": [f"{who}: {type(exc).__name__}: {exc}"]}
        if self.wasm is not None:
            found.components_changed = sorted({*found.components_changed, *self.wasm.reloaded})
        self.config = running
        self.recent.reconfigure(running)
        if self.metrics is not None:
            self.metrics.reconfigure(running)
        if "log.level" in found.live:
            logging.getLogger().setLevel(running.log.level)
        log.info("reload: %s", found.summary() if found.any else "configuration unchanged")
        for key in found.needs_restart:
            log.warning("reload: %s changed; it applies at the next start (running on the old value)", key)
        return {"ok": True, **found.to_dict()}

    async def _add_wasm(self, config: Config) -> None:
        wasm = _wasm_steps(config, self.events)
        await wasm.setup()
        await wasm.start()
        self._set_up.insert(self._set_up.index(self.engine), wasm)
        self.services.insert(self.services.index(self.engine), wasm)
        self.wasm = self.io.wasm = wasm


def _runs_wasm(config: Config) -> bool:
    return any(isinstance(c, WasmComponent) for c in config.components.values())


def _wasm_steps(config: Config, events: Events) -> WasmSteps:
    from .drivers.wasm import WasmSteps  # wasmtime only where WebAssembly runs

    rt = config.runtime
    return WasmSteps(config.components.values(), events, threads=rt.wasm_threads, max_threads=rt.wasm_max_threads)


def _kill(service: Service) -> None:
    try:
        service.kill()
    except Exception:
        log.exception("killing %s failed", service.name)
