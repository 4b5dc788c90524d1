"""Command-line tools for people, in the spirit of Silverline's manage.py:

    python -m runtime_manager run  --runtime node1 --file echo.wasm --argv a b
    python -m runtime_manager list
    python -m runtime_manager stop --module <name or uuid>

They speak MQTT to the broker of comm.conf, in the realm of runtime.conf's
orchestrator section (or --realm), straight to a runtime's control topic. A
runtime is found by name or uuid from its (retained) keepalives; with
--via-orchestrator, `run` sends to `{realm}/proc/control` and lets an
orchestrator choose.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt

from .config import Config, load_config, resolve_config_dir
from .transports.mqtt_link import make_client


class Session:
    """One MQTT connection with a collecting subscriber."""

    def __init__(self, config: Config, topics: list[str]) -> None:
        self.messages: list[tuple[str, bytes]] = []
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
            self.messages.append((msg.topic, msg.payload))
            self.cond.notify_all()

    def publish(self, topic: str, body: dict[str, Any]) -> None:
        self.client.publish(topic, json.dumps(body), qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _runtimes(messages: list[tuple[str, bytes]]) -> dict[str, dict[str, Any]]:
    runtimes: dict[str, dict[str, Any]] = {}
    for _topic, payload in messages:
        try:
            data = json.loads(payload).get("data", {})
        except (ValueError, AttributeError):
            continue  # an empty retained message: a runtime that deregistered
        if isinstance(data, dict) and data.get("uuid"):
            runtimes[data["uuid"]] = data
    return runtimes


def keepalives(config: Config, realm: str, wait_s: float, name: str | None = None) -> dict[str, dict[str, Any]]:
    """The runtimes that keepalives announce (uuid -> the keepalive's data), gathered
    for `wait_s`, or until a runtime called `name` is seen."""
    session = Session(config, [f"{realm}/proc/keepalive/+"])
    with session.cond:
        session.cond.wait_for(lambda: name is not None and any(d.get("name") == name for d in _runtimes(session.messages).values()),
                              wait_s)
    session.close()
    return _runtimes(session.messages)


def find_runtime(config: Config, realm: str, name: str, wait_s: float) -> str:
    try:
        return str(uuid.UUID(name))
    except ValueError:
        pass
    found = [u for u, d in keepalives(config, realm, wait_s, name).items() if d.get("name") == name]
    if not found:
        raise SystemExit(f"no runtime named {name!r} in realm {realm!r} (is it running? `list` shows what keepalives say)")
    return found[0]


def cmd_run(config: Config, realm: str, args: argparse.Namespace) -> int:
    module_id = str(uuid.uuid4())
    name = args.name or args.file.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    module_args: dict[str, Any] = {"argv": args.argv, "env": args.env, "dirs": args.dirs, "repeat": args.repeat,
                                   "engine": "wasmtime", "fault_crash": args.fault_crash}
    if args.limit:
        module_args["limit"] = args.limit
    if args.via_orchestrator:
        runtime = find_runtime(config, realm, args.runtime, args.wait)
        topic = f"{realm}/proc/control"
        control = f"{realm}/proc/control/{runtime}"
    else:
        runtime = find_runtime(config, realm, args.runtime, args.wait)
        topic = control = f"{realm}/proc/control/{runtime}"
    stdio = f"{realm}/proc/stdio/{module_id}"
    session = Session(config, [stdio, control])
    data = {"type": "module", "uuid": module_id, "name": name, "parent": runtime, "file": args.file,
            "apis": ["wasm", "wasi"], "args": module_args, "channels": []}
    session.publish(topic, {"object_id": str(uuid.uuid4()), "action": "create", "type": "req", "data": data})
    seen, status = 0, None
    deadline = time.monotonic() + args.timeout
    try:
        while status is None and time.monotonic() < deadline:
            with session.cond:
                session.cond.wait_for(lambda n=seen: len(session.messages) > n, 0.5)
                new, seen = session.messages[seen:], len(session.messages)
            for topic_, payload in new:
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
                elif str(msg.get("type", "")).endswith("resp") and d.get("result") == "error":
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


def cmd_list(config: Config, realm: str, args: argparse.Namespace) -> int:
    runtimes = keepalives(config, realm, args.wait)
    if not runtimes:
        print(f"no runtimes in realm {realm!r}")
        return 0
    for rid, data in sorted(runtimes.items(), key=lambda kv: str(kv[1].get("name"))):
        children = data.get("children") or []
        print(f"{data.get('name')}  {rid}  {len(children)} module(s)")
        for child in children:
            print(f"    {child.get('name', '?')}  {child.get('uuid')}  cpu {child.get('cpu_usage_percent')}%  "
                  f"mem {child.get('mem_usage')}  last active {child.get('active')}")
    return 0


def cmd_stop(config: Config, realm: str, args: argparse.Namespace) -> int:
    runtimes = keepalives(config, realm, args.wait)
    for rid, data in runtimes.items():
        if args.runtime and args.runtime not in (rid, data.get("name")):
            continue
        for child in data.get("children") or []:
            if args.module in (child.get("uuid"), child.get("name")):
                control = f"{realm}/proc/control/{rid}"
                session = Session(config, [control])
                session.publish(control, {"object_id": str(uuid.uuid4()), "action": "delete", "type": "req",
                                          "data": {"type": "module", "uuid": child["uuid"]}})
                wanted = child["uuid"].encode()
                with session.cond:
                    ok = session.cond.wait_for(lambda s=session, w=wanted: any(b'"exited"' in p and w in p for _, p in s.messages),
                                               args.timeout)
                session.close()
                print(f"module {child.get('name')} ({child['uuid']}) on {data.get('name')}: {'stopped' if ok else 'delete sent'}")
                return 0 if ok else 3
    print(f"no module {args.module!r} in the keepalives of realm {realm!r}", file=sys.stderr)
    return 2


def main(tool: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m runtime_manager {tool}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-dir", help="for the broker (comm.conf) and the realm (runtime.conf)")
    parser.add_argument("--realm", help="overrides runtime.conf orchestrator.realm (default realm)")
    parser.add_argument("--wait", type=float, default=1.5, help="seconds to gather keepalives")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the module to end")
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
        parser.add_argument("--via-orchestrator", action="store_true", help="send to {realm}/proc/control")
    elif tool == "stop":
        parser.add_argument("--module", required=True, help="module name or uuid")
        parser.add_argument("--runtime", help="runtime name or uuid (when names repeat)")
        parser.set_defaults(timeout=10)
    args = parser.parse_args(argv)
    if tool == "run" and not args.runtime:
        # a create without a runtime ("parent": null) crashes the Silverline orchestrator
        parser.error("--runtime is required: the runtime's name or uuid (`list` shows them)")
    config = load_config(resolve_config_dir(args.config_dir))
    orch = config.runtime.orchestrator
    realm = args.realm or (orch.realm if orch else "realm")
    return {"run": cmd_run, "list": cmd_list, "stop": cmd_stop}[tool](config, realm, args)
