"""This node as a runtime that edge orchestrators of the Silverline/ARTS family drive.

Enabled by the `orchestrator` section of runtime.conf (see ../shared/SILVERLINE.md
for the protocol). The node registers itself as a manager and its wasmtime
runtime as a runtime, keeps them alive, and runs the modules it is asked to
create, each in a thread of its own with its own sandbox:

    {realm}/proc/reg/{uuid}                  registration, and the orchestrator's reply
    {realm}/proc/control/{runtime-uuid}      module create/delete in, exited out
    {realm}/proc/keepalive/{runtime-uuid}    keepalives (retained, so `list` sees them at once)
    {realm}/proc/stdio/{module-uuid}         a module's stdout, as it is produced

The ARTS dialect (`dialect: "arts"`) uses one `{realm}/proc/reg` topic, the
types `arts_req`/`arts_resp`, `apis` as a string, `filename` for `file`, and
args/env/channels that may arrive as strings.

Every bad control message is answered with an error (a `resp` on the control
topic) and a log line naming the module; the node keeps serving.
"""

from __future__ import annotations

import json
import logging
import platform
import shlex
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil

from .config import Config, WasmLimits
from .logs import short
from .wasm import ModuleError, load, make_engine, run_module

log = logging.getLogger("orch")
APIS = ["wasm", "wasi", "stdio:out"]
MAX_RESTARTS = 5


class ControlError(Exception):
    """A control message we cannot act on; the message says why."""


@dataclass
class ModuleRun:
    uuid: str
    name: str
    path: Path
    argv: list[str]
    env: dict[str, str]
    dirs: list[tuple[str, str]]
    repeat: int = 1
    limit_s: float | None = None
    fault_crash: str = "ignore"
    channels: list[Any] = field(default_factory=list)
    request_id: str = ""
    stop: threading.Event = field(default_factory=threading.Event)
    wakeup: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    active: float = field(default_factory=time.time)
    thread_id: int | None = None
    memory_bytes: int = 0
    cpu_seen: float = 0.0


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def _decode_maybe(value: Any) -> Any:
    """ARTS sends args, env and channels as strings: JSON when it parses."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


class RuntimeNode:
    def __init__(self, config: Config) -> None:
        assert config.runtime.orchestrator is not None
        self.config = config
        self.cfg = config.runtime.orchestrator
        self.realm = self.cfg.realm
        self.arts = self.cfg.dialect == "arts"
        self.module_dir = config.runtime.module_dir.resolve()
        self.state_path = config.dir / self.cfg.state_file
        self.manager_uuid, self.runtime_uuid = self._load_uuids()
        self.name = self.cfg.name
        self.ka_interval = float(self.cfg.ka_interval_sec)
        self.modules: dict[str, ModuleRun] = {}
        self._lock = threading.Lock()
        self._replies: dict[str, dict[str, Any]] = {}
        self._reply_ready = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._registering = threading.Lock()
        self._ka_thread: threading.Thread | None = None
        self._process = psutil.Process()
        from .rm_mqtt import make_client

        self.client, self._connect_kwargs = make_client(config.mqtt, f"rm-{self.name}-runtime")
        self.client.max_inflight_messages_set(100)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.will_set(self.reg_topic(self.manager_uuid), json.dumps(self._manager_msg("delete")), qos=1)

    # ----- names and messages -----------------------------------------------------
    @property
    def control_topic(self) -> str:
        return f"{self.realm}/proc/control/{self.runtime_uuid}"

    def reg_topic(self, ident: str) -> str:
        return f"{self.realm}/proc/reg" if self.arts else f"{self.realm}/proc/reg/{ident}"

    def _type(self, kind: str) -> str:
        return f"arts_{kind}" if self.arts else kind

    def _message(self, action: str, data: dict[str, Any], kind: str = "req", object_id: str | None = None) -> dict[str, Any]:
        return {"object_id": object_id or str(uuid.uuid4()), "action": action, "type": self._type(kind), "data": data}

    def _manager_msg(self, action: str) -> dict[str, Any]:
        return self._message(action, {"type": "manager", "uuid": self.manager_uuid, "name": self.name})

    def runtime_data(self) -> dict[str, Any]:
        return {
            "type": "runtime", "uuid": self.runtime_uuid, "name": self.name, "runtime_type": "linux/wasmtime",
            "max_nmodules": self.cfg.max_nmodules, "apis": " ".join(APIS) if self.arts else list(APIS),
            "platform": {"cpu": {"arch": platform.machine()}}, "metadata": {}, "parent": self.manager_uuid,
        }

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

    def publish(self, topic: str, body: dict[str, Any] | bytes, retain: bool = False) -> mqtt.MQTTMessageInfo:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.client.publish(topic, payload, qos=1, retain=retain)

    # ----- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        mq = self.config.mqtt
        log.info("runtime '%s' (%s, manager %s), realm '%s', dialect %s, modules from %s",
                 self.name, self.runtime_uuid, self.manager_uuid, self.realm, self.cfg.dialect, self.module_dir)
        self.client.connect_async(mq.host, mq.port, mq.keepalive, **self._connect_kwargs)
        self.client.loop_start()

    def stop(self, timeout: float = 3.0) -> None:
        """Stop every module, deregister the runtime and the manager, disconnect."""
        self._stopping.set()
        with self._lock:
            running = list(self.modules.values())
        for m in running:
            m.stop.set()
            m.wakeup.set()
        deadline = time.monotonic() + timeout
        for m in running:
            m.done.wait(max(0.0, deadline - time.monotonic()))
        infos = [
            self.publish(self.reg_topic(self.runtime_uuid), self._message("delete", self.runtime_data())),
            self.publish(self.reg_topic(self.manager_uuid), self._manager_msg("delete")),
            self.publish(f"{self.realm}/proc/keepalive/{self.runtime_uuid}", b"", retain=True),
        ]
        for info in infos:
            try:
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                break
        self.client.disconnect()
        self.client.loop_stop()
        log.info("runtime '%s' deregistered", self.name)

    def kill(self) -> None:
        self._stopping.set()
        self.client.loop_stop()

    # ----- registration and keepalive ----------------------------------------------
    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        topics = {self.control_topic, self.reg_topic(self.manager_uuid), self.reg_topic(self.runtime_uuid)}
        client.subscribe([(t, 1) for t in topics])
        threading.Thread(target=self._register, name="orch-register", daemon=True).start()

    def _request(self, topic: str, msg: dict[str, Any]) -> dict[str, Any] | None:
        """Publish a registration and wait (bounded) for the reply with its object_id."""
        oid = msg["object_id"]
        with self._lock:
            self._replies.pop(oid, None)
        self.publish(topic, msg)
        with self._reply_ready:
            self._reply_ready.wait_for(lambda: oid in self._replies or self._stopping.is_set(), self.cfg.reg_timeout_s)
            return self._replies.pop(oid, None)

    def _register(self) -> None:
        if not self._registering.acquire(blocking=False):
            return
        try:
            manager = self._request(self.reg_topic(self.manager_uuid), self._manager_msg("create"))
            runtime = self._request(self.reg_topic(self.runtime_uuid), self._message("create", self.runtime_data()))
            if manager is None or runtime is None:
                log.error("no registration reply from an orchestrator on '%s' within %.1f s; serving direct control "
                          "messages on '%s' anyway", self.reg_topic(self.runtime_uuid), self.cfg.reg_timeout_s, self.control_topic)
            else:
                data = runtime.get("data") if isinstance(runtime.get("data"), dict) else {}
                if data.get("result") not in (None, "ok"):
                    log.error("orchestrator refused the registration: %s", short(data, 300))
                details = data.get("details") if isinstance(data.get("details"), dict) else {}
                ka = details.get("ka_interval_sec")
                if isinstance(ka, (int, float)) and not isinstance(ka, bool) and ka >= 0:
                    self.ka_interval = float(ka)
                log.info("registered with the orchestrator; keepalive every %s s", self.ka_interval or "never")
            self._keepalive_once()
            if self._ka_thread is None:
                self._ka_thread = threading.Thread(target=self._keepalive_loop, name="orch-keepalive", daemon=True)
                self._ka_thread.start()
        finally:
            self._registering.release()

    def _keepalive_loop(self) -> None:
        last = time.monotonic()
        while not self._stopping.wait(0.2):
            if self.ka_interval > 0 and time.monotonic() - last >= self.ka_interval:
                last = time.monotonic()
                self._keepalive_once()

    def _children(self) -> list[dict[str, Any]]:
        cpu = {t.id: t.user_time + t.system_time for t in self._process.threads()}
        children = []
        with self._lock:
            running = list(self.modules.values())
        for m in running:
            used = cpu.get(m.thread_id or -1, m.cpu_seen)
            pct = max(0.0, (used - m.cpu_seen) / self.ka_interval * 100) if self.ka_interval else 0.0
            m.cpu_seen = used
            children.append({"uuid": m.uuid, "name": m.name, "active": _iso(m.active),
                             "cpu_usage_percent": round(pct, 2), "mem_usage": m.memory_bytes})
        return children

    def _keepalive_once(self) -> None:
        data = {"type": "runtime", "uuid": self.runtime_uuid, "name": self.name,
                "apis": " ".join(APIS) if self.arts else list(APIS), "children": self._children()}
        self.publish(f"{self.realm}/proc/keepalive/{self.runtime_uuid}", self._message("update", data), retain=True)

    # ----- control messages (paho thread: validate, then hand to a module thread) -------
    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(msg.payload)
        except (ValueError, UnicodeDecodeError):
            log.error("control message on '%s' is not JSON: %s", msg.topic, short(msg.payload))
            return
        if not isinstance(body, dict):
            log.error("control message on '%s' is not a JSON object: %s", msg.topic, short(body))
            return
        kind = str(body.get("type", ""))
        if kind.endswith("resp"):
            with self._reply_ready:
                self._replies[str(body.get("object_id"))] = body
                self._reply_ready.notify_all()
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
            name = data.get("name") or data.get("uuid") if isinstance(data, dict) else None
            log.error("%s of module %s refused: %s", action or "message", name or "(unnamed)", exc)
            self._reply(body, "error", str(exc))

    def _reply(self, request: dict[str, Any], result: str, details: Any) -> None:
        self.publish(self.control_topic, self._message(str(request.get("action")), {"result": result, "details": details},
                                                       kind="resp", object_id=str(request.get("object_id"))))

    def _confined(self, name: Any, what: str, want_dir: bool = False) -> Path:
        if not isinstance(name, str) or not name:
            raise ControlError(f"{what} must be a non-empty string")
        path = (self.module_dir / name).resolve()
        if not path.is_relative_to(self.module_dir):
            raise ControlError(f"{what} {name!r} leaves the module directory")
        if want_dir and not path.is_dir():
            raise ControlError(f"{what} {name!r} is not a directory in the module directory")
        if not want_dir and not path.is_file():
            raise ControlError(f"{what} {name!r} not found in the module directory")
        return path

    def _create(self, request: dict[str, Any], data: dict[str, Any]) -> None:
        module_id = data.get("uuid")
        if not isinstance(module_id, str) or not module_id:
            raise ControlError("module 'uuid' is missing")
        file = data.get("file", data.get("filename"))
        if file is None:
            raise ControlError("module 'file' is missing")
        path = self._confined(file, "file")
        args = _decode_maybe(data.get("args"))
        if args is None or args == [] or args == "":
            args = {}
        if isinstance(args, str):
            args = {"argv": shlex.split(args)}
        if not isinstance(args, dict):
            raise ControlError(f"'args' must be an object, got {short(args, 60)}")
        engine = args.get("engine", "wasmtime")
        if engine not in ("wasmtime", "", None):
            raise ControlError(f"engine {engine!r} is not available here (this runtime has wasmtime)")
        argv = _decode_maybe(args.get("argv", []))
        if isinstance(argv, str):
            argv = shlex.split(argv)
        if not isinstance(argv, list) or not all(isinstance(a, (str, int, float)) for a in argv):
            raise ControlError("'args.argv' must be a list of strings")
        env = _decode_maybe(args.get("env", data.get("env", [])))
        if isinstance(env, str):
            env = env.split()
        if isinstance(env, dict):
            env = [f"{k}={v}" for k, v in env.items()]
        if not isinstance(env, list) or not all(isinstance(e, str) and "=" in e for e in env):
            raise ControlError("'args.env' must be a list of \"K=V\" strings")
        dirs = args.get("dirs", []) or []
        if not isinstance(dirs, list):
            raise ControlError("'args.dirs' must be a list of directories")
        preopens = [(str(self._confined(d, "directory", want_dir=True)), d) for d in dirs]
        repeat = args.get("repeat", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 0:
            raise ControlError("'args.repeat' must be a whole number")
        limit = args.get("limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
            raise ControlError("'args.limit' must be a number of seconds greater than 0")
        fault = args.get("fault_crash", "ignore") or "ignore"
        if fault not in ("ignore", "restart"):
            raise ControlError("'args.fault_crash' must be ignore or restart")
        channels = _decode_maybe(data.get("channels", [])) or []
        run = ModuleRun(
            uuid=module_id, name=str(data.get("name") or path.stem), path=path, argv=[str(a) for a in argv],
            env=dict(e.split("=", 1) for e in env), dirs=preopens, repeat=max(1, repeat),
            limit_s=float(limit) if limit else None, fault_crash=fault, channels=channels if isinstance(channels, list) else [],
            request_id=str(request.get("object_id")),
        )
        with self._lock:
            if module_id in self.modules:
                raise ControlError(f"module {module_id} is already running")
            if len(self.modules) >= self.cfg.max_nmodules:
                raise ControlError(f"this runtime already runs {self.cfg.max_nmodules} modules (max_nmodules)")
            self.modules[module_id] = run
        threading.Thread(target=self._run, args=(run, request), name=f"module-{run.name}", daemon=True).start()

    def _delete(self, request: dict[str, Any], data: dict[str, Any]) -> None:
        module_id = data.get("uuid")
        with self._lock:
            run = self.modules.get(module_id) if isinstance(module_id, str) else None
            if run is None and isinstance(data.get("name"), str):
                run = next((m for m in self.modules.values() if m.name == data["name"]), None)
        if run is None:
            raise ControlError(f"no module {module_id or data.get('name')!r} runs here")
        target = request.get("send_to_runtime") or data.get("send_to_runtime")
        run.stop.set()
        run.wakeup.set()
        self._reply(request, "ok", {"uuid": run.uuid, "name": run.name})
        if isinstance(target, str) and target:
            self._migrate(run, target)

    def _migrate(self, run: ModuleRun, target: str) -> None:
        """ARTS migration: the module starts again on the runtime named by send_to_runtime."""
        data = {"type": "module", "uuid": run.uuid, "name": run.name, "parent": target,
                "file" if not self.arts else "filename": str(run.path.relative_to(self.module_dir)),
                "args": {"argv": run.argv, "env": [f"{k}={v}" for k, v in run.env.items()],
                         "dirs": [guest for _, guest in run.dirs], "repeat": run.repeat, "limit": run.limit_s,
                         "fault_crash": run.fault_crash}, "channels": run.channels}
        run.done.wait(2.0)
        log.info("module %s handed over to runtime %s", run.name, target)
        self.publish(f"{self.realm}/proc/control/{target}", self._message("create", data))

    # ----- running a module (its own thread) --------------------------------------
    def _run(self, run: ModuleRun, request: dict[str, Any]) -> None:
        run.thread_id = threading.get_native_id()
        engine = make_engine(False)  # its own, so a delete can interrupt just this module
        try:
            loaded = load(run.path, engine=engine)
        except ModuleError as exc:
            with self._lock:
                self.modules.pop(run.uuid, None)
            run.done.set()
            log.error("create of module %s refused: %s", run.name, exc)
            self._reply(request, "error", f"cannot load {run.path.name}: {exc}")
            return
        self._reply(request, "ok", {"uuid": run.uuid, "name": run.name, "parent": self.runtime_uuid})
        log.info("module %s (%s) started: %s %s", run.name, run.uuid, run.path.name, " ".join(run.argv))
        watcher = threading.Thread(target=self._watch, args=(run, engine), name=f"watch-{run.name}", daemon=True)
        watcher.start()
        stdio = f"{self.realm}/proc/stdio/{run.uuid}"

        def out(chunk: bytes) -> None:
            run.active = time.time()
            self.publish(stdio, bytes(chunk))

        status = {"code": 0, "reason": "exited", "message": "finished"}
        restarts, done_runs = 0, 0
        while done_runs < run.repeat:
            outcome = run_module(loaded, "_start", b"", WasmLimits(memory_mb=64), argv=[run.name, *run.argv], env=run.env,
                                 dirs=run.dirs, stop=run.stop, stdout=out, deadline_ticks=1)
            run.memory_bytes = outcome.memory_bytes
            stderr = outcome.stderr.decode("utf-8", "replace").strip()[:300]
            if outcome.trap in ("deleted", "timeout"):
                message = "stopped by a delete" if outcome.trap == "deleted" else f"stopped after args.limit {run.limit_s} s"
                status = {"code": -1, "reason": outcome.trap, "message": message}
                break
            if outcome.trap is not None:
                status = {"code": -1, "reason": "trap", "message": outcome.trap + (f"; stderr: {stderr}" if stderr else "")}
                if run.fault_crash == "restart" and restarts < MAX_RESTARTS and not run.stop.is_set():
                    restarts += 1
                    log.warning("module %s trapped (%s); restart %d of %d", run.name, outcome.trap, restarts, MAX_RESTARTS)
                    continue
                break
            code = outcome.exit_code or 0
            status = {"code": code, "reason": "exited", "message": f"exit code {code}" + (f"; stderr: {stderr}" if stderr else "")}
            done_runs += 1
            if code != 0:
                break
        run.done.set()
        run.wakeup.set()
        with self._lock:
            self.modules.pop(run.uuid, None)
        log.info("module %s (%s) ended: %s", run.name, run.uuid, status)
        self.publish(self.control_topic, self._message("exited", {"type": "module", "uuid": run.uuid, "name": run.name,
                                                                   "status": status}))

    @staticmethod
    def _watch(run: ModuleRun, engine: Any) -> None:
        """Interrupt the module on a delete or when args.limit runs out."""
        run.wakeup.wait(run.limit_s)
        if not run.done.is_set():
            engine.increment_epoch()
            engine.increment_epoch()
