"""The orchestrator runtime: a service of the node, enabled by the
`orchestrator` section of runtime.conf.

It registers the node as a manager and its wasmtime runtime as a runtime,
keeps them alive, and runs the modules it is asked to create, each in a thread
of its own with its own sandbox (`modules.py`). It speaks over the node's MQTT
link; everything but the modules runs on the node's loop.

Keepalives are not retained (an orchestrator decodes every keepalive, and a
retained one outlives a killed node). For the tools the runtime keeps a
retained presence record of its own, answers a query with a fresh one at once,
and marks it stopped on a clean stop: a live answer says who is alive, the
record says when a silent runtime was last heard from.

Every control message is handled inside one boundary: a message that cannot be
acted on is answered with an error (a `resp` on the control topic) and a log
line naming the module; nothing reaches the link.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
import psutil

from ..config import Config
from ..core import topics
from ..core.events import MODULE_ENDED, MODULE_REFUSED, MODULE_STARTED, Events
from ..core.lifecycle import Service, wait_until
from ..logs import short
from ..mqtt.link import MqttLink
from ..wasm.channels import ModuleChannels
from ..wasm.checkpoint import Checkpoint
from .channels import ChannelRouter
from .checkpoints import Checkpoints
from .control import ControlError, parse_create, topic_level
from .migration import Incoming, Mover, MoveReport
from .modules import ModuleEvents, ModuleRun, module_thread
from .protocol import Dialect, manager_data, runtime_data

log = logging.getLogger("orch")


@dataclass
class RuntimeSeen:
    """Another runtime of the realm, as its presence record says."""

    uuid: str
    name: str
    modules: int
    max_nmodules: int
    heard: float  # time.monotonic() when its record came
    fresh: bool  # an answer, not a retained record (which may be a dead runtime's)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


class OrchestratorRuntime(Service):
    """A service of the node (core/lifecycle.py): `setup` reads (or makes) the
    uuids and sets the link's will; each connection registers; `stop` ends the
    modules, then deregisters. MODULE_STARTED, MODULE_ENDED and MODULE_REFUSED
    go on `events`."""

    name = "orchestrator runtime"

    def __init__(self, config: Config, link: MqttLink, events: Events) -> None:
        assert config.runtime.orchestrator is not None
        self.cfg = config.runtime.orchestrator
        self.dialect = Dialect(self.cfg.realm, self.cfg.dialect == "arts")
        self.module_dir = config.runtime.module_dir.resolve()
        self.state_path = (config.runtime.state_dir or config.dir) / self.cfg.state_file
        self.link = link
        self.runtime_name = self.cfg.name  # as orchestrators know it (`name` is the service's)
        self.ka_interval = float(self.cfg.ka_interval_sec)
        self.drain_timeout_s = config.runtime.drain_timeout_s
        self.manager_uuid = self.runtime_uuid = ""
        self.modules: dict[str, ModuleRun] = {}
        self.channels = ChannelRouter(link)
        self.events = events
        self._ended_ids: collections.OrderedDict[str, None] = collections.OrderedDict()  # the last 1,000 that ended
        self.loop: asyncio.AbstractEventLoop | None = None
        self._awaited: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._keepalive: asyncio.Task | None = None
        self._registering = False
        self.orchestrated = False  # an orchestrator answered our registration
        self.registration = "not yet registered"  # in words, for /status and the page
        self._told_no_reply = False  # "no orchestrator answered" is said once, not at every reconnect
        self._answer_pending = False  # a presence answer to a query is scheduled
        self._stopping = False
        self._process = psutil.Process()
        self._events = ModuleEvents(started=self._started, refused=self._refused, output=self._output, ended=self._ended,
                                    resumed=self._resumed)
        self.mover: Mover | None = None
        self.checkpoints: Checkpoints | None = None
        self._arrivals: dict[str, Incoming] = {}  # module uuid -> the move it is arriving by
        self.moves: collections.deque[dict[str, Any]] = collections.deque(maxlen=20)  # the last moves from here
        self.others: dict[str, RuntimeSeen] = {}  # the realm's other runtimes, from their presence records

    # ----- names --------------------------------------------------------------------
    @property
    def control_topic(self) -> str:
        return self.dialect.control_topic(self.runtime_uuid)

    def _manager_msg(self, action: str) -> dict[str, Any]:
        return self.dialect.message(action, manager_data(self.manager_uuid, self.runtime_name))

    def _runtime_data(self) -> dict[str, Any]:
        return runtime_data(self.dialect, self.runtime_uuid, self.manager_uuid, self.runtime_name,
                            self.cfg.max_nmodules)

    def _load_uuids(self) -> tuple[str, str]:
        """The uuids survive restarts, so an orchestrator re-sends our modules."""
        try:
            state = json.loads(self.state_path.read_text())
            return str(uuid.UUID(state["manager_uuid"])), str(uuid.UUID(state["runtime_uuid"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass
        ids = str(uuid.uuid4()), str(uuid.uuid4())
        try:
            self.state_path.write_text(json.dumps({"manager_uuid": ids[0], "runtime_uuid": ids[1]}, indent=2) + "\n")
        except OSError as exc:
            log.warning("cannot keep the runtime uuids in %s (%s): they change at each start", self.state_path, exc)
        return ids

    def publish(self, topic: str, body: dict[str, Any] | bytes, retain: bool = False,
                on_acked: Any = None) -> None:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.link.publish(topic, payload, qos=1, retain=retain, on_acked=on_acked)

    # ----- lifecycle (on the loop) ------------------------------------------------------
    async def setup(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.manager_uuid, self.runtime_uuid = self._load_uuids()
        if self.dialect.arts:  # ARTS ignores a manager's delete
            will = self.dialect.message("delete", self._runtime_data())
        else:
            will = self._manager_msg("delete")
        self.link.will(self.dialect.reg_topic(self.manager_uuid), json.dumps(will).encode(), qos=1)
        topics = {self.control_topic, self.dialect.reg_topic(self.manager_uuid), self.dialect.reg_topic(self.runtime_uuid)}
        for topic in sorted(topics):
            self.link.subscribe(topic, self._on_message, qos=1)
        self.link.subscribe(self.dialect.query_topic, self._on_query, qos=0)
        self.link.subscribe(self.dialect.presence_topic("+"), self._on_presence, qos=0)
        self.link.on_connected(self._connected)
        self.mover = Mover(self.link, self.dialect.realm, self.runtime_uuid, self.cfg.migrate_timeout_ms / 1000,
                           self.cfg.module_memory_mb, can_take=self._can_take, accept=self._accept, forget=self._forget)
        self.mover.setup()
        self.checkpoints = Checkpoints(self.link, self.dialect.realm, self.runtime_uuid, self.runtime_name,
                                       self.cfg.migrate_timeout_ms / 1000, self.cfg.module_memory_mb, resume=self._accept,
                                       running=lambda m: m in self.modules)
        self.checkpoints.setup()

    async def start(self) -> None:
        log.info("runtime '%s' (%s, manager %s), realm '%s', dialect %s, modules from %s", self.runtime_name, self.runtime_uuid,
                 self.manager_uuid, self.dialect.realm, self.cfg.dialect, self.module_dir)

    async def stop(self, timeout: float = 3.0) -> None:
        """Move the modules away (orchestrator.on_stop: migrate), end the rest,
        then deregister the runtime and the manager."""
        self._stopping = True
        if self.cfg.on_stop == "migrate" and self.modules and self.link.connected:
            await self._move_all_away(self.drain_timeout_s)
        elif self.checkpoints is not None and self.link.connected:
            # the modules kept on the broker go on from where they stop now when the node is back
            kept = [self.checkpoints.take(run, self._create_data(run)) for run in self.modules.values() if run.checkpoints]
            if kept:
                try:
                    await asyncio.wait_for(asyncio.gather(*kept, return_exceptions=True), max(1.0, timeout - 1))
                except TimeoutError:
                    log.warning("not every module's last checkpoint was taken in time")
        if self.checkpoints is not None:
            self.checkpoints.stop()
        running = list(self.modules.values())
        for run in running:
            run.request_stop()
        deadline = time.monotonic() + timeout
        await wait_until(lambda: not self.modules, timeout)  # each ended module reports `exited` first
        for task in list(self._tasks):
            task.cancel()
        if not self.link.connected:
            return
        acked: list[asyncio.Future[None]] = []
        goodbyes: list[tuple[str, dict[str, Any] | bytes, bool]] = [
            (self.dialect.reg_topic(self.runtime_uuid), self.dialect.message("delete", self._runtime_data()), False)]
        if not self.dialect.arts:
            goodbyes.append((self.dialect.reg_topic(self.manager_uuid), self._manager_msg("delete"), False))
        # the keepalive topic is left alone (an empty retained message there breaks
        # the orchestrator's decoder); the tools' record says the runtime stopped
        goodbyes.append((self.dialect.presence_topic(self.runtime_uuid), self._presence("stopped", []), True))
        for topic, body, retain in goodbyes:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.publish(topic, body, retain=retain, on_acked=lambda _ok, f=fut: f.done() or f.set_result(None))
            acked.append(fut)
        try:
            await asyncio.wait_for(asyncio.gather(*acked), max(0.2, deadline - time.monotonic()))
        except TimeoutError:
            log.warning("deregistration not acknowledged by the broker in time")
        log.info("runtime '%s' deregistered", self.runtime_name)

    def kill(self) -> None:
        self._stopping = True
        for run in list(self.modules.values()):
            run.request_stop()
        for task in list(self._tasks):
            task.cancel()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task:
        """A long-lived task with a boundary: an exception is logged, never lost."""
        assert self.loop is not None

        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed", name)

        task = self.loop.create_task(guarded(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ----- registration and keepalive ----------------------------------------------------
    def _connected(self) -> None:
        if not self._registering and not self._stopping:
            self._spawn(self._register(), "orchestrator registration")

    async def _request(self, topic: str, msg: dict[str, Any]) -> dict[str, Any] | None:
        """Publish a registration and wait (bounded) for the reply with its object_id."""
        assert self.loop is not None
        oid = msg["object_id"]
        fut: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self._awaited[oid] = fut
        try:
            self.publish(topic, msg)
            return await asyncio.wait_for(fut, self.cfg.reg_timeout_s)
        except TimeoutError:
            return None
        finally:
            self._awaited.pop(oid, None)

    async def _register(self) -> None:
        """Register the manager, wait (bounded) for its reply, then register the
        runtime. In that order: the Silverline orchestrator links a runtime to its
        manager only when the manager exists already, and only a linked runtime's
        modules are marked killed (and sent again) when the manager's will
        arrives. The runtime's reply is the one that matters: the Silverline
        orchestrator does not answer a manager it already knows; ARTS answers no
        manager at all, so in that dialect only the runtime registers."""
        self._registering = True
        self.registration = "registering"
        try:
            manager_reply = None
            if not self.dialect.arts:
                manager_reply = await self._request(self.dialect.reg_topic(self.manager_uuid),
                                                    self._manager_msg("create"))
            runtime = await self._request(self.dialect.reg_topic(self.runtime_uuid),
                                          self.dialect.message("create", self._runtime_data()))
            self._registered(runtime)
            if not self.dialect.arts and manager_reply is None and runtime is not None:
                log.info("no reply to the manager registration (the orchestrator knows this manager already)")
            self._keepalive_once()
            if self._keepalive is None:
                self._keepalive = self._spawn(self._keepalive_loop(), "orchestrator keepalive")
        finally:
            self._registering = False

    def _registered(self, runtime: dict[str, Any] | None) -> None:
        if runtime is None:
            self.registration = f"no orchestrator answered within {self.cfg.reg_timeout_s:g} s; direct control only"
            level = logging.DEBUG if self._told_no_reply else logging.WARNING
            self._told_no_reply = True
            log.log(level, "no orchestrator answered the registration in realm '%s' within %.1f s: fine when none "
                    "runs (the usual case); modules can still be started on '%s' (python -m runtime_manager run "
                    "--direct). It registers again at every reconnect.", self.dialect.realm, self.cfg.reg_timeout_s,
                    self.control_topic)
            return
        data = runtime.get("data") if isinstance(runtime.get("data"), dict) else {}
        if data.get("result") not in (None, "ok"):
            if self.dialect.arts and "UNIQUE" in str(data.get("details")):
                log.info("ARTS knows this runtime already (%s): registered", short(data.get("details"), 120))
                self.orchestrated = True
                self.registration = "registered (ARTS)"
                return
            log.error("orchestrator refused the registration: %s", short(data, 300))
            self.registration = f"refused by the orchestrator: {short(data.get('details'), 120)}"
            return
        self.orchestrated = True
        self.registration = "registered"
        details = data.get("details") if isinstance(data.get("details"), dict) else {}
        ka = details.get("ka_interval_sec")
        if isinstance(ka, (int, float)) and not isinstance(ka, bool) and 0 <= ka < 86400:
            self.ka_interval = float(ka)
        log.info("registered with the orchestrator; keepalive every %s s", self.ka_interval or "never")

    async def _keepalive_loop(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.2)
            if self.ka_interval > 0 and time.monotonic() - last >= self.ka_interval:
                last = time.monotonic()
                try:
                    self._keepalive_once()
                except Exception:
                    log.exception("keepalive failed")

    def _children(self, sample: bool = True) -> list[dict[str, Any]]:
        """The modules with their CPU over the interval measured since the last
        sample (`sample`: start a new interval) and their memory now."""
        cpu = {t.id: t.user_time + t.system_time for t in self._process.threads()}
        now = time.monotonic()
        children = []
        for m in list(self.modules.values()):
            used = cpu.get(m.thread_id or -1, m.cpu_seen)
            interval = now - m.cpu_seen_at  # measured, not the nominal keepalive interval
            pct = max(0.0, (used - m.cpu_seen) / interval * 100) if interval > 0 else 0.0
            if sample:
                m.cpu_seen, m.cpu_seen_at = used, now
            children.append({"uuid": m.uuid, "name": m.name, "active": _iso(m.active),
                             "cpu_usage_percent": round(pct, 2), "mem_usage": m.memory_bytes})
        return children

    def module_list(self) -> list[dict[str, Any]]:
        """The running modules with their CPU since the last keepalive, their
        memory, and whether they can move with their state, by name (`GET /status`; any thread)."""
        children = self._children(sample=False)
        for child in children:
            run = self.modules.get(child["uuid"])
            if run is not None:
                child.update(moves_with_state=run.why_not_movable is None, why_not=run.why_not_movable,
                             checkpoints=run.checkpoints, last_checkpoint=run.last_checkpoint)
        return sorted(children, key=lambda m: (m["name"], m["uuid"]))

    def _keepalive_once(self) -> None:
        """A keepalive (not retained) and, with the same figures, the presence record."""
        children = self._children()
        data = {"type": "runtime", "uuid": self.runtime_uuid, "name": self.runtime_name, "apis": self.dialect.apis,
                "children": children}
        self.publish(self.dialect.keepalive_topic(self.runtime_uuid), self.dialect.message("update", data))
        self.publish(self.dialect.presence_topic(self.runtime_uuid), self._presence("online", children), retain=True)

    def _presence(self, state: str, children: list[dict[str, Any]]) -> dict[str, Any]:
        return {"uuid": self.runtime_uuid, "name": self.runtime_name, "state": state, "heard": _iso(time.time()),
                "ka_interval_sec": self.ka_interval, "dialect": self.cfg.dialect, "orchestrator": self.orchestrated,
                "manager": self.manager_uuid, "max_nmodules": self.cfg.max_nmodules, "children": children}

    def _on_presence(self, msg: mqtt.MQTTMessage) -> None:
        """The realm's runtimes, for moves by name and a stop that moves its modules."""
        ident = msg.topic.rsplit("/", 1)[-1]
        if ident == self.runtime_uuid:
            return
        try:
            record = json.loads(msg.payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            record = None
        if not isinstance(record, dict) or record.get("state") != "online":
            self.others.pop(ident, None)
            return
        children = record.get("children") if isinstance(record.get("children"), list) else []
        limit = record.get("max_nmodules")
        self.others[ident] = RuntimeSeen(ident, str(record.get("name", "")), len(children),
                                         limit if isinstance(limit, int) and limit > 0 else 16,
                                         time.monotonic(), not msg.retain)
        while len(self.others) > 4096:
            self.others.pop(next(iter(self.others)))

    def runtime_named(self, name_or_uuid: str) -> str | None:
        if name_or_uuid in (self.runtime_uuid, self.runtime_name):
            return self.runtime_uuid
        if name_or_uuid in self.others:
            return name_or_uuid
        return next((r.uuid for r in self.others.values() if r.name == name_or_uuid), None)

    def move_threadsafe(self, module: str, to: str) -> concurrent.futures.Future[MoveReport | str]:
        """A move asked from another thread (REST): the report, or why it cannot be asked."""
        assert self.loop is not None

        async def move() -> MoveReport | str:
            run = self.find_module(module)
            if run is None:
                return f"no module {module!r} runs here"
            target = self.runtime_named(to)
            if target is None:
                return f"no runtime {to!r} is known in realm {self.dialect.realm!r}"
            if run.moving:
                return f"module {module!r} is already moving"
            return await self.move(run, target)

        return asyncio.run_coroutine_threadsafe(move(), self.loop)

    def _on_query(self, _msg: mqtt.MQTTMessage) -> None:
        """A tool asks who is alive: answer with a fresh presence record, at most
        one answer per 100 ms however many queries come (a flood costs nothing)."""
        if self._answer_pending or self._stopping or self.loop is None:
            return
        self._answer_pending = True

        def answer() -> None:
            self._answer_pending = False
            if not self._stopping and self.link.connected:
                self.publish(self.dialect.presence_topic(self.runtime_uuid),
                             self._presence("online", self._children(sample=False)), retain=True)

        self.loop.call_later(0.1, answer)

    # ----- control messages (on the loop: check, then hand to a module thread) -------------
    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(msg.payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            log.error("control message on '%s' is not JSON: %s", msg.topic, short(msg.payload))
            if msg.topic == self.control_topic:
                self._reply(None, None, "error", "the message is not JSON")
            return
        if not isinstance(body, dict):
            log.error("control message on '%s' is not a JSON object: %s", msg.topic, short(body))
            if msg.topic == self.control_topic:
                self._reply(None, None, "error", "the message is not a JSON object")
            return
        kind = str(body.get("type", ""))
        if kind.endswith("resp"):
            fut = self._awaited.get(str(body.get("object_id")))
            if fut is not None and not fut.done():
                fut.set_result(body)
            return
        if msg.topic != self.control_topic or not kind.endswith("req"):
            return  # our own registrations and exited messages come back to us
        action = body.get("action")
        if action == "exited":
            return
        data = body.get("data")
        try:
            if not isinstance(data, dict):
                raise ControlError("'data' must be an object")
            if data.get("type", "module") != "module":
                raise ControlError(f"cannot {action} a {data.get('type')!r} here, only modules")
            if action == "create":
                self._create(body, data)
            elif action == "delete":
                self._delete(body, data)
            else:
                raise ControlError(f"unknown action {action!r} (expected create or delete)")
        except ControlError as exc:
            self._refuse(body, data, str(exc))
        except Exception as exc:
            log.exception("control message on '%s' failed", msg.topic)
            self._refuse(body, data, f"internal error: {type(exc).__name__}: {exc}")

    def _refuse(self, body: dict[str, Any], data: Any, why: str) -> None:
        name = (data.get("name") or data.get("uuid")) if isinstance(data, dict) else None
        log.error("%s of module %s refused: %s", body.get("action") or "message", name or "(unnamed)", why)
        if body.get("action") == "create":
            self.events.emit(MODULE_REFUSED, why)
        if body.get("action") == "delete" and not self.dialect.arts:
            return  # the Silverline orchestrator takes replies to creates only: the log says it
        self._reply(body.get("action"), body.get("object_id"), "error", why)

    def _reply(self, action: Any, object_id: Any, result: str, details: Any) -> None:
        msg = self.dialect.message(action, {"result": result, "details": details}, kind="resp",
                                   object_id=str(object_id))
        if object_id is None:  # a message we could not read: no request to refer to
            msg["object_id"], msg["action"] = None, None
        self.publish(self.control_topic, msg)

    def _create_data(self, run: ModuleRun) -> dict[str, Any]:
        return run.spec.as_create(self.module_dir, self.runtime_uuid, self.dialect.file_key)

    def _checkpoint_every(self, run: ModuleRun) -> float:
        return run.spec.checkpoint_s if run.spec.checkpoint_s is not None else self.cfg.checkpoint_s

    def _create(self, request: dict[str, Any], data: dict[str, Any]) -> None:
        if self.checkpoints is not None and str(data.get("uuid")) in self.checkpoints.resuming:
            log.info("create of module %s, which goes on from its checkpoint here: ignored", data.get("uuid"))
            return
        here = self.modules.get(str(data.get("uuid")))
        if here is not None and here.move_id is not None and data.get("resume") == here.move_id:
            # the create a move announces: the module goes on here already, with its state
            self._reply("create", request.get("object_id"), "ok", {"uuid": here.uuid, "name": here.name,
                                                                   "parent": self.runtime_uuid})
            return
        spec = parse_create(data, self.module_dir, self.dialect.realm, self.cfg.channel_prefix)
        if spec.uuid in self.modules or spec.uuid in self._ended_ids:
            # an orchestrator that reads the control topic forwards a create sent
            # straight to this runtime once more (a short module may have ended by
            # then): the module runs once
            state = "already runs" if spec.uuid in self.modules else "has already run"
            log.info("create of module %s (%s), which %s here: ignored", spec.name, spec.uuid, state)
            return
        if len(self.modules) >= self.cfg.max_nmodules:
            raise ControlError(f"this runtime already runs {self.cfg.max_nmodules} modules (max_nmodules)")
        channels = ModuleChannels(spec.channels, self.channels.send, spec.name)
        try:
            self.channels.attach(channels)
        except ValueError as exc:
            raise ControlError(str(exc)) from None
        run = ModuleRun(spec, str(request.get("object_id")), channels=channels,
                        migratable=self.cfg.migratable and spec.migratable, memory_mb=self.cfg.module_memory_mb)
        self.modules[spec.uuid] = run
        threading.Thread(target=module_thread, args=(run, self._events), name=f"module-{run.name}", daemon=True).start()

    def _delete(self, request: dict[str, Any], data: dict[str, Any]) -> None:
        module_id = data.get("uuid")
        run = self.modules.get(module_id) if isinstance(module_id, str) else None
        if run is None and isinstance(data.get("name"), str):
            run = next((m for m in self.modules.values() if m.name == data["name"]), None)
        if run is None and isinstance(module_id, str) and module_id in self._ended_ids:
            # ARTS forwards a delete for a module we reported ended; the Silverline
            # orchestrator forwards once more a delete a tool sent straight here
            log.debug("delete of module %s, which has already ended", module_id)
            if self.dialect.arts:  # the Silverline orchestrator takes replies to creates only
                self._reply("delete", request.get("object_id"), "ok", {"uuid": module_id, "already": "ended"})
            return
        if run is None:
            raise ControlError(f"no module {module_id or data.get('name')!r} runs here")
        target = request.get("send_to_runtime") or data.get("send_to_runtime")
        if target:
            target = topic_level(target, "'send_to_runtime'")
        if self.dialect.arts:  # the Silverline orchestrator takes replies to creates only
            self._reply("delete", request.get("object_id"), "ok", {"uuid": run.uuid, "name": run.name})
        if isinstance(target, str) and target:
            if run.moving:
                log.info("module %s (%s): already moving; this move is ignored", run.name, run.uuid)
                return
            log.info("module %s (%s): move to runtime %s", run.name, run.uuid, target)
            self._spawn(self.move(run, target, request.get("object_id")), f"move of {run.name}")
            return
        run.request_stop()
        log.info("module %s (%s): delete", run.name, run.uuid)

    # ----- moves (migration.py) --------------------------------------------------------------
    def find_module(self, name_or_uuid: str) -> ModuleRun | None:
        return self.modules.get(name_or_uuid) or next((m for m in self.modules.values() if m.name == name_or_uuid), None)

    async def move(self, run: ModuleRun, target: str, object_id: Any = None) -> MoveReport:
        """Move a module to runtime `target`, with its state when it can; the
        report is published on `{realm}/rm/moved/{module}` and kept for /status."""
        assert self.mover is not None
        run.moving = True
        try:
            if target == self.runtime_uuid:
                report = MoveReport(run.name, run.uuid, self.runtime_uuid, target, moved=False, with_state=False,
                                    why="it already runs on that runtime")
            else:
                code = run.prepared.data if run.prepared is not None and run.prepared.why_not is None else b""
                create = self.dialect.message("create", run.spec.as_create(self.module_dir, target, self.dialect.file_key))
                module = {**create["data"], "create_object_id": create["object_id"]}
                report = await self.mover.move(run, target, module, code,
                                               lambda why: self._restart_elsewhere(run, target, why),
                                               ours=target in self.others)
                if report.moved and report.with_state:
                    await wait_until(run.done.is_set, 2.0)  # its `exited` goes first, as for every move
                    create["data"]["resume"] = report.move_id
                    self.publish(self.dialect.control_topic(target), create)
        finally:
            run.moving = False
        report.object_id = None if object_id is None else str(object_id)
        if report.with_state:
            log.info("module %s (%s) moved to runtime %s with its state: paused %.1f ms, checkpoint %d bytes",
                     run.name, run.uuid, target, report.pause_ms or 0, report.checkpoint_bytes)
        else:
            log.warning("module %s (%s) %s runtime %s without its state: %s", run.name, run.uuid,
                        "started again on" if report.moved else "not moved to", target, report.why)
        self.moves.append(report.as_dict())
        self.publish(topics.moved_topic(self.dialect.realm, run.uuid), report.as_dict())
        return report

    async def _restart_elsewhere(self, run: ModuleRun, target: str, why: str) -> MoveReport:
        """The way a module moves when its state cannot: stopped here, started again there."""
        if run.done.is_set():  # it ended meanwhile: nothing to start again
            return MoveReport(run.name, run.uuid, self.runtime_uuid, target, moved=False, with_state=False,
                              why="it ended before it could move")
        run.restart_at = f"{target} (started again there: {why})"
        run.request_stop()
        await wait_until(run.done.is_set, 2.0)
        data = run.spec.as_create(self.module_dir, target, self.dialect.file_key)
        log.info("module %s handed over to runtime %s (started again there: %s)", run.name, target, why)
        self.publish(self.dialect.control_topic(target), self.dialect.message("create", data))
        return MoveReport(run.name, run.uuid, self.runtime_uuid, target, moved=True, with_state=False, why=why)

    async def _move_all_away(self, bound: float) -> None:
        """Each module that can move with its state goes to the least-loaded
        live runtime of the realm (the ones that answer a query now), all at
        once, within `bound` seconds; what could not move is stopped as usual."""
        asked = time.monotonic()
        self.publish(self.dialect.query_topic, {"query": str(uuid.uuid4())})
        await asyncio.sleep(0.5)  # live runtimes answer within 100 ms
        live = [r for r in self.others.values() if r.fresh and r.heard >= asked and r.modules < r.max_nmodules]
        load = {r.uuid: r.modules for r in live}
        moves = []
        for run in list(self.modules.values()):
            if run.why_not_movable is not None or run.moving:
                log.warning("module %s (%s) is stopped with the node: it cannot move (%s)", run.name, run.uuid,
                            run.why_not_movable or "a move of it is under way")
                continue
            room = [r for r in live if load[r.uuid] < r.max_nmodules]
            if not room:
                log.warning("module %s (%s) is stopped with the node: no live runtime in realm '%s' has room for it",
                            run.name, run.uuid, self.dialect.realm)
                continue
            target = min(room, key=lambda r: (load[r.uuid] / r.max_nmodules, r.name, r.uuid))
            load[target.uuid] += 1
            moves.append(self.move(run, target.uuid))
        if not moves:
            return
        log.info("moving %d module(s) away before stopping", len(moves))
        try:
            await asyncio.wait_for(asyncio.gather(*moves, return_exceptions=True), max(1.0, bound - 0.5))
        except TimeoutError:
            log.warning("not every module moved within the drain timeout (%.0f s); the rest is stopped", bound)

    def _can_take(self, module: dict[str, Any]) -> str | None:
        if self._stopping:
            return "it is stopping"
        if str(module.get("uuid")) in self.modules:
            return "the module already runs there"
        if len(self.modules) >= self.cfg.max_nmodules:
            return f"it already runs {self.cfg.max_nmodules} modules (max_nmodules)"
        return None

    def _accept(self, inc: Incoming, checkpoint: Checkpoint) -> str | None:
        """Start a module that moved here, from its checkpoint (its thread says `resumed`)."""
        why = self._can_take(inc.module)
        if why is not None:
            return why
        try:
            spec = parse_create(inc.module, self.module_dir, self.dialect.realm, self.cfg.channel_prefix,
                                file_needed=False)
            channels = ModuleChannels(spec.channels, self.channels.send, spec.name)
            self.channels.attach(channels)
        except (ControlError, ValueError) as exc:
            return str(exc)
        run = ModuleRun(spec, str(inc.module.get("create_object_id")), channels=channels, code=inc.code,
                        resume_from=checkpoint, move_id=inc.mid, started_at=time.monotonic() - checkpoint.elapsed_s,
                        memory_mb=self.cfg.module_memory_mb)
        self.modules[spec.uuid] = run
        self._ended_ids.pop(spec.uuid, None)
        self._arrivals[spec.uuid] = inc
        threading.Thread(target=module_thread, args=(run, self._events), name=f"module-{run.name}", daemon=True).start()
        return None

    def _forget(self, move_id: str) -> None:
        """The mover gave up on a move that had arrived: the module goes, without a word."""
        for run in list(self.modules.values()):
            if run.move_id == move_id:
                log.warning("module %s (%s): its mover gave up; stopped here", run.name, run.uuid)
                run.silent = True
                run.request_stop()

    # ----- what module threads report (any thread: hop onto the loop) ------------------------
    def _to_loop(self, fn: Any, *args: Any) -> None:
        if self.loop is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:
                pass  # the loop closed: the node is gone

    def _started(self, run: ModuleRun) -> None:
        log.info("module %s (%s) started: %s %s", run.name, run.uuid, run.spec.path.name, " ".join(run.spec.argv))

        def started() -> None:
            self.events.emit(MODULE_STARTED, run.name)
            if self.checkpoints is not None and run.why_not_movable is None:
                self.checkpoints.follow(run, self._create_data(run), self._checkpoint_every(run))
            self._reply("create", run.object_id, "ok", {"uuid": run.uuid, "name": run.name, "parent": self.runtime_uuid})
            self._keepalive_once()  # `list` and orchestrators see it now, not at the next interval

        self._to_loop(started)

    def _refused(self, run: ModuleRun, why: str) -> None:
        def refused() -> None:
            self.modules.pop(run.uuid, None)
            if run.channels is not None:
                self.channels.detach(run.channels)
            self.events.emit(MODULE_REFUSED, why)
            self._reply("create", run.object_id, "error", why)

        self._to_loop(refused)

    def _resumed(self, run: ModuleRun, why: str | None) -> None:
        def resumed() -> None:
            inc = self._arrivals.pop(run.uuid, None)
            if why is None:
                run.arrived = True
                log.info("module %s (%s) arrived from runtime %s and goes on with its state", run.name, run.uuid,
                         inc.source if inc else "?")
                self.events.emit(MODULE_STARTED, run.name)
                self._keepalive_once()
                if self.checkpoints is not None:
                    self.checkpoints.follow(run, self._create_data(run), self._checkpoint_every(run))
            else:
                log.error("module %s (%s) could not go on here: %s", run.name, run.uuid, why)
                if self.modules.get(run.uuid) is run:
                    del self.modules[run.uuid]
                if run.channels is not None:
                    self.channels.detach(run.channels)
            if inc is not None and inc.source and self.mover is not None:
                inc.timings["start_ms"] = round((time.monotonic() - inc.arrived_at) * 1000, 2)
                self.mover.answer(inc.source, inc.mid, "resumed" if why is None else "failed", why=why, **inc.timings)

        self._to_loop(resumed)

    def _output(self, run: ModuleRun, chunk: bytes) -> None:
        self.link.publish_threadsafe(self.dialect.stdio_topic(run.uuid), chunk)

    def _ended(self, run: ModuleRun, status: dict[str, Any]) -> None:
        def ended() -> None:
            if self.modules.get(run.uuid) is run:
                del self.modules[run.uuid]
            if run.channels is not None:
                self.channels.detach(run.channels)
            if run.thread_id is None:
                return  # refused before it started: already answered
            if run.silent or (run.move_id is not None and not run.arrived):
                return  # it never went on here, or its mover took it back
            said = status
            if run.restart_at is not None and said.get("reason") == "deleted":
                said = {**said, "message": f"moved to runtime {run.restart_at}"}
            with_node = self._stopping and status.get("reason") == "deleted" and run.moved_to is None \
                and run.restart_at is None
            if self.checkpoints is not None:
                self.checkpoints.ended(run, keep=with_node)
            self._ended_ids[run.uuid] = None
            self.events.emit(MODULE_ENDED, run.name, str(status.get("reason") or "unknown"))
            while len(self._ended_ids) > 1000:
                self._ended_ids.popitem(last=False)
            if with_node:
                # stopped with the node, not by an orchestrator: no `exited`, so the
                # orchestrator keeps it and re-sends it when the runtime is back
                log.info("module %s (%s) stopped with the node", run.name, run.uuid)
                return
            log.info("module %s (%s) ended: %s", run.name, run.uuid, said)
            self.publish(self.control_topic, self.dialect.message("exited", {"type": "module", "uuid": run.uuid,
                                                                             "name": run.name, "status": said}))
            self._keepalive_once()
            if self.dialect.arts and status.get("reason") != "deleted":
                # ARTS never reads `exited`: ask it to drop the module, or its count only grows
                self.publish(f"{self.dialect.realm}/proc/control", self.dialect.message(
                    "delete", {"type": "module", "uuid": run.uuid, "name": run.name}))

        self._to_loop(ended)
