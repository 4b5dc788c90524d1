"""Command-line tools for people, in the spirit of Silverline's manage.py:

    {program} run  --runtime node1 --file echo.wasm --argv a b
    {program} list
    {program} stop --module <name or uuid>
    {program} migrate --module <name or uuid> --to <runtime name or uuid>
    {program} resume --module <name or uuid> --on <runtime name or uuid>

They speak MQTT to the broker of comm.conf, in the realm of runtime.conf's
orchestrator section (or --realm). Runtimes are found by asking: every runtime
answers a query on `{{realm}}/rm/query` with a fresh presence record; the records
they keep retained say when a runtime that did not answer was last heard from.

When the runtime is registered with a Silverline orchestrator, `run` and `stop`
go through it (`{{realm}}/proc/control`), so it knows the module and does not
forward it a second time; `--direct` sends straight to the runtime's control
topic. ARTS never forwards a create that names its runtime, so with ARTS they
go straight to the runtime.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import paho.mqtt.client as mqtt

from .cli import add_config_dir, program
from .config import Config, load_config, resolve_config_dir
from .core import topics
from .mqtt.link import make_client
from .orchestrator.checkpoints import read_record
from .orchestrator.migration import chunks, frame, unframe


class Session:
    """One MQTT connection with a collecting subscriber."""

    def __init__(self, config: Config, topics: list[str]) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []  # topic, payload, retained (sent on subscribing)
        self.cond = threading.Condition()
        subscribed = threading.Event()
        mq = config.mqtt
        # the node's own client settings (protocol, credentials, TLS), on a session of its own
        self.client, connect = make_client(mq, f"rm-tool-{uuid.uuid4().hex[:8]}", persistent=False)
        self.client.on_connect = lambda c, *a: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        try:
            self.client.connect(mq.host, mq.port, 30, **connect)
        except OSError as exc:
            raise SystemExit(f"cannot reach the broker at {mq.host}:{mq.port}: {exc}") from None
        self.client.loop_start()
        if not subscribed.wait(10):
            raise SystemExit(f"could not subscribe at {mq.host}:{mq.port}")

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))
            self.cond.notify_all()

    def publish(self, topic: str, body: dict[str, Any] | bytes, qos: int = 1, retain: bool = False) -> None:
        payload = body if isinstance(body, bytes) else json.dumps(body)
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(10)

    def wait(self, pred: Any, timeout: float) -> Any:
        """The first message (topic, payload, retained) for which `pred` is true, or None."""
        found: list[Any] = []

        def seen() -> bool:
            found[:] = [m for m in self.messages if pred(m)][:1]
            return bool(found)

        with self.cond:
            self.cond.wait_for(seen, timeout)
        return found[0] if found else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Runtime:
    """What a runtime's presence record says, and whether it answered now."""

    uuid: str
    name: str
    state: str  # "online" or "stopped", as the runtime last said
    heard: str  # ISO time of its last record
    answered: bool  # it answered this query: alive now
    orchestrator: bool = False  # registered with an orchestrator
    dialect: str = "silverline"
    children: list[dict[str, Any]] = field(default_factory=list)

    @property
    def via_orchestrator(self) -> bool:
        return self.answered and self.orchestrator and self.dialect == "silverline"

    def liveness(self, now: float) -> str:
        if self.answered:
            return "online"
        ago = _ago(self.heard, now)
        if self.state == "stopped":
            return f"stopped at {self.heard}{ago}"
        return f"not answering: last heard {self.heard}{ago}"


def _ago(iso: str, now: float) -> str:
    try:
        seconds = now - datetime.fromisoformat(iso).timestamp()
    except (TypeError, ValueError):
        return ""
    if seconds < 120:
        return f" ({seconds:.0f} s ago)"
    if seconds < 7200:
        return f" ({seconds / 60:.0f} min ago)"
    return f" ({seconds / 3600:.1f} h ago)" if seconds < 172800 else f" ({seconds / 86400:.0f} days ago)"


def _runtime(payload: bytes, answered: bool) -> Runtime | None:
    try:
        d = json.loads(payload)
    except ValueError:
        return None  # an empty retained message: a record cleared
    if not isinstance(d, dict) or not isinstance(d.get("uuid"), str):
        return None
    children = [c for c in d.get("children") or [] if isinstance(c, dict)]
    return Runtime(d["uuid"], str(d.get("name", "")), str(d.get("state", "online")), str(d.get("heard", "")), answered,
                   bool(d.get("orchestrator")), str(d.get("dialect", "silverline")), children)


def discover(config: Config, realm: str, wait_s: float, name: str | None = None) -> dict[str, Runtime]:
    """The runtimes of the realm (uuid -> Runtime): the retained records, then the
    answers to a query gathered for `wait_s`, or until a runtime `name` answered."""
    session = Session(config, [topics.presence_topic(realm)])
    try:
        session.publish(topics.query_topic(realm), {"query": str(uuid.uuid4())}, qos=0)

        def found() -> dict[str, Runtime]:
            runtimes: dict[str, Runtime] = {}
            for _topic, payload, retained in session.messages:
                rt = _runtime(payload, answered=not retained)
                if rt is not None:
                    if rt.uuid in runtimes and runtimes[rt.uuid].answered and not rt.answered:
                        continue
                    runtimes[rt.uuid] = rt
            return runtimes

        with session.cond:
            session.cond.wait_for(lambda: name is not None and any(
                r.answered and name in (r.name, r.uuid) for r in found().values()), wait_s)
            return found()
    finally:
        session.close()


def find_runtime(config: Config, realm: str, name: str, wait_s: float) -> Runtime:
    return find_runtime_in(discover(config, realm, wait_s, name), name, realm)


def _route(runtime: Runtime, realm: str, direct: bool, forced: bool) -> str:
    """Where a create or delete for `runtime` goes: its orchestrator when it has
    one that forwards (Silverline), unless told otherwise."""
    if forced or (runtime.via_orchestrator and not direct):
        return topics.control_topic(realm)
    return topics.control_topic(realm, runtime.uuid)


def cmd_run(config: Config, realm: str, args: argparse.Namespace) -> int:
    module_id = str(uuid.uuid4())
    name = args.name or args.file.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    module_args: dict[str, Any] = {"argv": args.argv, "env": args.env, "dirs": args.dirs, "repeat": args.repeat,
                                   "engine": "wasmtime", "fault_crash": args.fault_crash}
    if args.limit:
        module_args["limit"] = args.limit
    runtime = find_runtime(config, realm, args.runtime, args.wait)
    topic = _route(runtime, realm, args.direct, args.via_orchestrator)
    control = topics.control_topic(realm, runtime.uuid)
    stdio = topics.stdio_topic(realm, module_id)
    session = Session(config, [stdio, topics.control_topic(realm, "+")])  # it may move: its end comes from anywhere
    data = {"type": "module", "uuid": module_id, "name": name, "parent": runtime.uuid, "file": args.file,
            "apis": ["wasm", "wasi"], "args": module_args, "channels": _channels(args.channel)}
    session.publish(topic, {"object_id": str(uuid.uuid4()), "action": "create", "type": "req", "data": data})
    seen, status = 0, None
    deadline = time.monotonic() + args.timeout
    try:
        while status is None and time.monotonic() < deadline:
            with session.cond:
                session.cond.wait_for(lambda n=seen: len(session.messages) > n, 0.5)
                new, seen = session.messages[seen:], len(session.messages)
            for topic_, payload, _retained in new:
                if topic_ == stdio:
                    sys.stdout.write(payload.decode("utf-8", "replace"))
                    sys.stdout.flush()
                    continue
                try:
                    msg = json.loads(payload)
                except ValueError:
                    continue
                d = msg.get("data") if isinstance(msg, dict) else None
                if not isinstance(d, dict):
                    continue
                if msg.get("action") == "exited" and d.get("uuid") == module_id:
                    status = d.get("status", {})
                    if isinstance(status, dict) and str(status.get("message", "")).startswith("moved to runtime"):
                        print(f"module {name} {status['message']}; following it", file=sys.stderr)
                        status = None
                elif topic_ == control and str(msg.get("type", "")).endswith("resp") and d.get("result") == "error":
                    print(f"refused: {d.get('details')}", file=sys.stderr)
                    return 2
    finally:
        session.close()
    if status is None:
        print(f"module {module_id}: no exited message within {args.timeout} s", file=sys.stderr)
        return 3
    print(f"module {name} ({module_id}) {status.get('reason')}: {status.get('message')}", file=sys.stderr)
    code = status.get("code", 1)
    return code if isinstance(code, int) and 0 <= code < 256 else 1


def _channels(specs: list[str]) -> list[dict[str, str]]:
    """`--channel PATH:MODE:TOPIC` as the create's channels."""
    channels = []
    for spec in specs:
        parts = spec.split(":", 2)
        if len(parts) != 3 or parts[1] not in ("r", "w", "rw"):
            raise SystemExit(f"--channel {spec!r}: expected PATH:MODE:TOPIC with MODE r, w or rw")
        channels.append({"path": parts[0], "mode": parts[1], "topic": parts[2]})
    return channels


def cmd_list(config: Config, realm: str, args: argparse.Namespace) -> int:
    runtimes = discover(config, realm, args.wait)
    now = time.time()
    if args.json:
        print(json.dumps([{"uuid": r.uuid, "name": r.name, "alive": r.answered, "state": r.state, "heard": r.heard,
                           "orchestrator": r.orchestrator, "dialect": r.dialect, "modules": r.children}
                          for r in sorted(runtimes.values(), key=lambda r: (r.name, r.uuid))], indent=2))
        return 0
    if not runtimes:
        print(f"no runtimes in realm {realm!r}")
        return 0
    for r in sorted(runtimes.values(), key=lambda r: (not r.answered, r.name, r.uuid)):
        orchestrated = f", {r.dialect} orchestrator" if r.orchestrator else ", no orchestrator"
        modules = f", {len(r.children)} module(s)" if r.answered else ""
        print(f"{r.name}  {r.uuid}  {r.liveness(now)}{orchestrated if r.answered else ''}{modules}")
        for child in r.children if r.answered else []:
            print(f"    {child.get('name', '?')}  {child.get('uuid')}  cpu {child.get('cpu_usage_percent')}%  "
                  f"mem {child.get('mem_usage')}  last active {child.get('active')}")
    return 0


def cmd_stop(config: Config, realm: str, args: argparse.Namespace) -> int:
    runtimes = discover(config, realm, args.wait)
    for r in runtimes.values():
        if not r.answered or (args.runtime and args.runtime not in (r.uuid, r.name)):
            continue
        for child in r.children:
            if args.module not in (child.get("uuid"), child.get("name")):
                continue
            control = topics.control_topic(realm, r.uuid)
            session = Session(config, [control])
            session.publish(_route(r, realm, args.direct, False), {
                "object_id": str(uuid.uuid4()), "action": "delete", "type": "arts_req" if r.dialect == "arts" else "req",
                "data": {"type": "module", "uuid": child["uuid"]}})
            wanted = str(child["uuid"]).encode()
            with session.cond:
                ok = session.cond.wait_for(lambda s=session, w=wanted: any(b'"exited"' in p and w in p
                                                                        for _, p, _r in s.messages), args.timeout)
            session.close()
            print(f"module {child.get('name')} ({child['uuid']}) on {r.name}: {'stopped' if ok else 'delete sent'}")
            return 0 if ok else 3
    print(f"no module {args.module!r} on the runtimes that answered in realm {realm!r}", file=sys.stderr)
    return 2


def _find_module(runtimes: dict[str, Runtime], module: str, runtime: str | None) -> tuple[Runtime, dict[str, Any]]:
    for r in runtimes.values():
        if not r.answered or (runtime and runtime not in (r.uuid, r.name)):
            continue
        for child in r.children:
            if module in (child.get("uuid"), child.get("name")):
                return r, child
    raise SystemExit(f"no module {module!r} on the runtimes that answered (`list` shows them)")


def _describe_move(report: dict[str, Any], names: dict[str, str]) -> str:
    source, target = names.get(report["source"], report["source"]), names.get(report["target"], report["target"])
    what = f"module {report['module']} ({report['uuid']})"
    if report.get("with_state"):
        return (f"{what} moved from {source} to {target} with its state: paused {report.get('pause_ms')} ms, "
                f"checkpoint {report.get('checkpoint_bytes')} bytes")
    if report.get("moved"):
        return f"{what} started again on {target}, without its state: {report.get('why')}"
    return f"{what} stayed on {source}: {report.get('why')}"


def cmd_migrate(config: Config, realm: str, args: argparse.Namespace) -> int:
    """A delete with `send_to_runtime`, as orchestrators send it; then the source's report."""
    runtimes = discover(config, realm, args.wait)  # every runtime's answer: the module's and the target's
    source, child = _find_module(runtimes, args.module, args.runtime)
    target = find_runtime_in(runtimes, args.to, realm)
    module = str(child["uuid"])
    session = Session(config, [topics.moved_topic(realm, module)])
    try:
        session.publish(_route(source, realm, args.direct, False), {
            "object_id": str(uuid.uuid4()), "action": "delete", "type": "arts_req" if source.dialect == "arts" else "req",
            "data": {"type": "module", "uuid": module, "name": child.get("name")}, "send_to_runtime": target.uuid})
        with session.cond:
            session.cond.wait_for(lambda: session.messages, args.timeout)
            reports = [json.loads(p) for _t, p, _r in session.messages]
    finally:
        session.close()
    if not reports:
        print(f"no report of the move within {args.timeout:g} s (is {source.name} running?)", file=sys.stderr)
        return 3
    report = reports[0]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_describe_move(report, {r.uuid: r.name for r in runtimes.values()}))
    return 0 if report.get("moved") else 1


def cmd_resume(config: Config, realm: str, args: argparse.Namespace) -> int:
    """A module's last checkpoint (retained on the broker) sent to a runtime as a move is."""
    runtimes = discover(config, realm, args.wait, args.on)
    target = find_runtime_in(runtimes, args.on, realm)
    records = Session(config, [topics.checkpoint_topic(realm, "+", "+")])
    try:
        time.sleep(min(args.wait, 1.0))  # the retained records come at once
        with records.cond:
            kept = [(t, p) for t, p, retained in records.messages if retained and p]
    finally:
        records.close()
    found = []
    for topic, payload in kept:
        try:
            header, _ = unframe(payload)
        except ValueError:
            continue
        module = header.get("module") if isinstance(header.get("module"), dict) else {}
        if args.module in (module.get("uuid"), module.get("name")):
            found.append((str(header.get("at", "")), topic, payload, header))
    if not found:
        raise SystemExit(f"no checkpoint of module {args.module!r} is kept in realm {realm!r}")
    _at, topic, payload, header = max(found, key=lambda f: f[0])
    module = header["module"]
    holder = runtimes.get(str(header.get("runtime")))
    if holder is not None and holder.answered and any(c.get("uuid") == module["uuid"] for c in holder.children):
        raise SystemExit(f"module {module.get('name')} ({module['uuid']}) runs on {holder.name}: "
                         f"move it with `migrate` instead")
    try:
        _header, code, blob = read_record(payload)
    except ValueError as exc:
        raise SystemExit(f"the checkpoint of module {args.module!r} cannot be used: {exc}") from None
    me = f"tool-{uuid.uuid4().hex[:12]}"
    session = Session(config, [topics.migrate_topic(realm, me)])
    mid = str(uuid.uuid4())
    try:
        def answer(*kinds: str) -> Any:
            def match(m: tuple[str, bytes, bool]) -> bool:
                try:
                    head, _ = unframe(m[1])
                except ValueError:
                    return False
                return head.get("id") == mid and head.get("kind") in kinds
            found = session.wait(match, args.timeout)
            return unframe(found[1])[0] if found else None

        create_oid = str(uuid.uuid4())
        offer = {"kind": "offer", "id": mid, "from": me, "module": {**module, "parent": target.uuid,
                                                                    "create_object_id": create_oid},
                 "code_sha256": hashlib.sha256(code).hexdigest()}
        session.publish(topics.migrate_topic(realm, target.uuid), frame(offer, zlib.compress(code, 1)))
        got = answer("ready", "refused")
        if got is None or got.get("kind") != "ready":
            print(f"runtime {target.name} " + ("did not answer" if got is None else f"refused: {got.get('why')}"),
                  file=sys.stderr)
            return 1
        for part in chunks(mid, blob):
            session.publish(topics.migrate_topic(realm, target.uuid), part)
        got = answer("resumed", "failed")
        if got is None or got.get("kind") != "resumed":
            session.publish(topics.migrate_topic(realm, target.uuid), frame({"kind": "abort", "id": mid}))
            print(f"runtime {target.name} " + ("did not answer" if got is None else f"failed: {got.get('why')}"),
                  file=sys.stderr)
            return 1
        # as after a move: orchestrators learn where it runs; the old record goes
        session.publish(topics.control_topic(realm, target.uuid), {
            "object_id": create_oid, "action": "create", "type": "arts_req" if target.dialect == "arts" else "req",
            "data": {**module, "parent": target.uuid, "resume": mid}})
        if header.get("runtime") != target.uuid:
            session.publish(topic, b"", retain=True)
    finally:
        session.close()
    print(f"module {module.get('name')} ({module['uuid']}) goes on on {target.name} from its checkpoint of "
          f"{header.get('at')} ({len(blob)} bytes)")
    return 0


def find_runtime_in(runtimes: dict[str, Runtime], name: str, realm: str) -> Runtime:
    named = [r for r in runtimes.values() if name in (r.name, r.uuid)]
    alive = [r for r in named if r.answered]
    if alive:
        return alive[0]
    if named:
        raise SystemExit(f"runtime {name!r} in realm {realm!r} is {named[0].liveness(time.time())}")
    raise SystemExit(f"no runtime named {name!r} in realm {realm!r} (is it running? `list` shows the runtimes)")


def main(tool: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"{program()} {tool}", description=(__doc__ or "").format(program=program()),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_dir(parser, "for the broker (comm.conf) and the realm (runtime.conf)")
    parser.add_argument("--realm", help="overrides runtime.conf orchestrator.realm (default realm)")
    parser.add_argument("--wait", type=float, default=1.0, help="seconds to wait for runtimes to answer")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the module to end")
    if tool in ("run", "stop", "migrate"):
        parser.add_argument("--direct", action="store_true",
                            help="send to the runtime's control topic even when an orchestrator could forward it")
    if tool == "run":
        parser.add_argument("--runtime", help="runtime name or uuid (required)")
        parser.add_argument("--file", required=True, help="module file, in the runtime's module directory")
        parser.add_argument("--name", help="module name (default: from the file)")
        parser.add_argument("--argv", nargs="*", default=[])
        parser.add_argument("--env", nargs="*", default=[], help="K=V ...")
        parser.add_argument("--dirs", nargs="*", default=[], help="directories to preopen, in the module directory")
        parser.add_argument("--repeat", type=int, default=1)
        parser.add_argument("--limit", type=float, help="seconds before the module is stopped")
        parser.add_argument("--fault-crash", choices=("ignore", "restart"), default="ignore")
        parser.add_argument("--channel", action="append", default=[], metavar="PATH:MODE:TOPIC",
                            help="a channel the module may open (MODE r, w or rw); repeat for more")
        parser.add_argument("--via-orchestrator", action="store_true",
                            help="send to {realm}/proc/control even when the runtime has not said it has an orchestrator")
    elif tool == "stop":
        parser.add_argument("--module", required=True, help="module name or uuid")
        parser.add_argument("--runtime", help="runtime name or uuid (when names repeat)")
        parser.set_defaults(timeout=10)
    elif tool == "list":
        parser.add_argument("--json", action="store_true", help="one JSON array, for scripts")
    elif tool == "resume":
        parser.add_argument("--module", required=True, help="module name or uuid")
        parser.add_argument("--on", required=True, help="the runtime to go on on (name or uuid)")
        parser.set_defaults(timeout=60)
    elif tool == "migrate":
        parser.add_argument("--module", required=True, help="module name or uuid")
        parser.add_argument("--to", required=True, help="the runtime to move it to (name or uuid)")
        parser.add_argument("--runtime", help="the runtime it runs on (when names repeat)")
        parser.add_argument("--json", action="store_true", help="the move's report as JSON")
        parser.set_defaults(timeout=60)
    args = parser.parse_args(argv)
    if tool == "run" and not args.runtime:
        # a create without a runtime ("parent": null) crashes the Silverline orchestrator
        parser.error("--runtime is required: the runtime's name or uuid (`list` shows them)")
    if tool == "run" and args.direct and args.via_orchestrator:
        parser.error("--direct and --via-orchestrator exclude each other")
    config = load_config(resolve_config_dir(args.config_dir))
    orch = config.runtime.orchestrator
    realm = args.realm or (orch.realm if orch else "realm")
    return {"run": cmd_run, "list": cmd_list, "stop": cmd_stop, "migrate": cmd_migrate, "resume": cmd_resume}[tool](config, realm, args)
