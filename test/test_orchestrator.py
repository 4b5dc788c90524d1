"""The node as a Silverline/ARTS runtime: a test orchestrator, written here,
drives a real rm_mqtt process through a real Mosquitto."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import requests
from conftest import ROOT, RmProcess, write_config
from helpers import free_port, wait_for


class TestOrchestrator:
    """Answers registrations (ka_interval_sec 1), sends module create/delete,
    records every message of the realm."""

    __test__ = False

    def __init__(self, port: int, realm: str, arts: bool = False, answer: bool = True, answer_managers: bool = True,
                 unique_error: bool = False, forward_direct: bool = False, manager_delay_s: float = 0.0) -> None:
        self.realm, self.arts, self.answer = realm, arts, answer
        self.manager_delay_s = manager_delay_s  # a slow orchestrator: the manager's reply comes this much later
        self.answer_managers, self.unique_error = answer_managers, unique_error
        # as the Silverline orchestrator does: creates and deletes published by others
        # straight on a runtime's control topic are forwarded there once more
        self.forward_direct = forward_direct
        self.sent: set[str] = set()  # object ids of what it published itself
        self.placed: dict[str, str] = {}  # module uuid -> runtime uuid
        self.messages: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"orch-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *a: c.subscribe(f"{realm}/proc/#", qos=1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(10)

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((msg.topic, msg.payload))
            self.cond.notify_all()
        if self.answer and msg.topic == f"{self.realm}/proc/control":
            self._place(client, json.loads(msg.payload))
            return
        if self.forward_direct and msg.topic.startswith(f"{self.realm}/proc/control/"):
            body = json.loads(msg.payload)
            if body.get("type") == "req" and body.get("action") in ("create", "delete") \
                    and body.get("object_id") not in self.sent:
                self._send(client, msg.topic, body)
            return
        if not self.answer or not msg.topic.startswith(f"{self.realm}/proc/reg"):
            return
        body = json.loads(msg.payload)
        if body.get("type") in ("req", "arts_req") and body.get("action") == "create":
            kind = body.get("data", {}).get("type")
            if kind == "manager" and (self.arts or not self.answer_managers):
                return  # ARTS answers runtimes only; Silverline does not answer a manager it knows
            details = {**body["data"], "ka_interval_sec": 1, "status": "A"}
            data = {"result": "ok", "details": details}
            if self.unique_error:  # as ARTS answers a runtime uuid it has already
                data = {"result": "error", "details": "UNIQUE constraint failed: arts_core_runtime.uuid"}
            reply = {"object_id": body["object_id"], "action": "create", "type": "arts_resp" if self.arts else "resp",
                     "data": data}
            if kind == "manager" and self.manager_delay_s:
                threading.Timer(self.manager_delay_s, client.publish, (msg.topic, json.dumps(reply), 1)).start()
                return
            client.publish(msg.topic, json.dumps(reply), qos=1)

    def _send(self, client: mqtt.Client, topic: str, body: dict) -> None:
        body = {**body, "object_id": str(uuid.uuid4())}
        self.sent.add(body["object_id"])
        client.publish(topic, json.dumps(body), qos=1)

    def _place(self, client: mqtt.Client, body: dict) -> None:
        """As an orchestrator does: send a module create to a registered runtime (its
        `parent`, else the last registered), a delete to the module's runtime."""
        runtimes = [b["data"]["uuid"] for _, b in self.json_messages("/proc/reg")
                    if b.get("action") == "create" and b.get("data", {}).get("type") == "runtime"]
        data = body.get("data") if isinstance(body.get("data"), dict) else {}
        if runtimes and body.get("action") == "create":
            runtime = data.get("parent") or runtimes[-1]
            data["parent"] = runtime
            self.placed[str(data.get("uuid"))] = runtime
            self._send(client, f"{self.realm}/proc/control/{runtime}", body)
        elif body.get("action") == "delete" and str(data.get("uuid")) in self.placed:
            self._send(client, f"{self.realm}/proc/control/{self.placed[str(data['uuid'])]}", body)

    def json_messages(self, topic_part: str = "") -> list[tuple[str, dict]]:
        with self.cond:
            msgs = list(self.messages)
        out = []
        for topic, payload in msgs:
            if topic_part in topic:
                try:
                    body = json.loads(payload)
                except ValueError:
                    continue
                if isinstance(body, dict):
                    out.append((topic, body))
        return out

    def wait(self, pred, timeout: float = 10, what: str = "a message") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for topic, body in self.json_messages():
                if pred(topic, body):
                    return body
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")

    def registration(self, kind: str) -> dict:
        return self.wait(lambda t, b: b.get("action") == "create" and b.get("type", "").endswith("req")
                         and isinstance(b.get("data"), dict) and b["data"].get("type") == kind, what=f"{kind} registration")

    def control(self, runtime: str, action: str, data: dict, **extra: Any) -> str:
        oid = str(uuid.uuid4())
        self.sent.add(oid)
        body = {"object_id": oid, "action": action, "type": "arts_req" if self.arts else "req", "data": data, **extra}
        self.client.publish(f"{self.realm}/proc/control/{runtime}", json.dumps(body), qos=1).wait_for_publish(5)
        return oid

    def create(self, runtime: str, file: str, args: Any = None, name: str = "m", **data: Any) -> str:
        module = str(uuid.uuid4())
        body = {"type": "module", "uuid": module, "name": name, "parent": runtime,
                ("filename" if self.arts else "file"): file, "apis": ["wasm", "wasi"], **data}
        if args is not None:
            body["args"] = args
        self.control(runtime, "create", body)
        return module

    def exited(self, module: str, timeout: float = 10) -> dict:
        body = self.wait(lambda t, b: b.get("action") == "exited" and b.get("data", {}).get("uuid") == module,
                         timeout, f"exited of {module}")
        return body["data"]["status"]

    def reply_to(self, oid: str, timeout: float = 10) -> dict:
        return self.wait(lambda t, b: b.get("object_id") == oid and str(b.get("type")).endswith("resp"), timeout,
                         f"reply to {oid}")["data"]

    def stdout(self, module: str) -> bytes:
        with self.cond:
            return b"".join(p for t, p in self.messages if t == f"{self.realm}/proc/stdio/{module}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def moddir(tmp_path: Path) -> Path:
    d = tmp_path / "modules"
    d.mkdir()
    for wat in (ROOT / "runtimes").glob("*.wat"):
        shutil.copy(wat, d)
    (d / "data").mkdir()
    (d / "data" / "data.txt").write_text("hello from a preopened dir\n")
    (tmp_path / "secret.txt").write_text("outside")
    import wasmtime

    (d / "args.wasm").write_bytes(wasmtime.wat2wasm((d / "args.wat").read_text()))
    return d


def start_node(tmp_path: Path, broker, mock, processes, moddir: Path, realm: str, name: str = "node1",
               dialect: str = "silverline", cfg_name: str = "cfg", orchestrator: dict | None = None,
               command: str = "rm_mqtt", rest_port: int | None = None, **runtime: Any) -> RmProcess:
    orch = {"realm": realm, "name": name, "max_nmodules": 3, "reg_timeout_s": 2, "ka_interval_sec": 1, "dialect": dialect,
            **(orchestrator or {})}
    # a node id of its own (two processes with one id: the second does not start)
    runtime.setdefault("node_id", f"{realm}-{cfg_name}")
    cfg = write_config(tmp_path / cfg_name, mock.port, broker.port, topic=f"{realm}-req", rest_port=rest_port,
                       runtime={"module_dir": str(moddir), "orchestrator": orch, **runtime})
    p = RmProcess(command, cfg).start()
    processes.append(p)
    return p


@pytest.fixture
def realm() -> str:
    return f"realm-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def orch(broker, realm):
    o = TestOrchestrator(broker.port, realm)
    yield o
    o.close()


@pytest.fixture
def node(tmp_path, broker, mock, processes, moddir, realm, orch):
    p = start_node(tmp_path, broker, mock, processes, moddir, realm)
    runtime = orch.registration("runtime")["data"]
    wait_for(lambda: "registered with the orchestrator" in p.log(), 10, "registration")
    p.runtime = runtime["uuid"]  # type: ignore[attr-defined]
    return p


def test_registration_manager_then_runtime_and_uuids_kept_across_restarts(node, orch, tmp_path, broker, mock, processes,
                                                                          moddir, realm):
    manager = orch.registration("manager")["data"]
    runtime = orch.registration("runtime")["data"]
    assert runtime["parent"] == manager["uuid"] and runtime["name"] == "node1"
    assert runtime["runtime_type"] == "linux/wasmtime" and runtime["max_nmodules"] == 3
    assert runtime["apis"] == ["wasm", "wasi", "stdio:out"]
    topics = [t for t, b in orch.json_messages("/proc/reg/") if b.get("data", {}).get("type") == "runtime"]
    assert topics[0] == f"{realm}/proc/reg/{runtime['uuid']}"
    # keepalives every ka_interval_sec from the reply (1 s)
    orch.wait(lambda t, b: t == f"{realm}/proc/keepalive/{runtime['uuid']}" and b.get("action") == "update", 5, "keepalive")
    # clean shutdown deregisters runtime and manager
    assert node.stop(signal.SIGTERM) == 0
    deletes = orch.wait(lambda t, b: b.get("action") == "delete" and b.get("data", {}).get("type") == "manager", 5, "manager delete")
    assert deletes["data"]["uuid"] == manager["uuid"]
    assert any(b.get("action") == "delete" and b["data"].get("type") == "runtime" for _, b in orch.json_messages("/proc/reg/"))
    # a restart registers the same uuids again
    with orch.cond:
        orch.messages.clear()
    start_node(tmp_path, broker, mock, processes, moddir, realm)
    again = orch.registration("runtime")["data"]
    assert again["uuid"] == runtime["uuid"] and again["parent"] == manager["uuid"]


def test_the_manager_is_registered_and_answered_before_the_runtime(tmp_path, broker, mock, processes, moddir, realm):
    """The Silverline orchestrator links a runtime to its manager only when the
    manager exists already (else its modules are lost with the node): on the
    wire, the manager's create, its reply, then the runtime's create."""
    slow = TestOrchestrator(broker.port, realm, manager_delay_s=0.8)
    try:
        p = start_node(tmp_path, broker, mock, processes, moddir, realm)
        runtime = slow.registration("runtime")["data"]
        wait_for(lambda: "registered with the orchestrator" in p.log(), 10, "registration")
        manager = slow.registration("manager")["data"]

        def label(body: dict) -> str:
            data = body.get("data") or {}
            if body.get("type") == "req":
                return f"create {data.get('type')}"
            return f"reply {(data.get('details') or {}).get('type')}"

        order = [label(b) for _, b in slow.json_messages("/proc/reg/") if b.get("action") == "create"]
        assert order.index("create manager") < order.index("reply manager") < order.index("create runtime"), order
        assert runtime["parent"] == manager["uuid"]
    finally:
        slow.close()


def test_module_with_argv_env_and_repeat(node, orch):
    m = orch.create(node.runtime, "args.wat", {"argv": ["x", "y z"], "env": ["A=1", "B=two"], "repeat": 2,
                                               "engine": "wasmtime", "fault_crash": "ignore"}, name="hello")
    status = orch.exited(m)
    assert status == {"code": 0, "reason": "exited", "message": "exit code 0"}
    assert orch.stdout(m) == b"hello\nx\ny z\nA=1\nB=two\n" * 2


def test_wasm_binary_and_preopened_dir(node, orch):
    m = orch.create(node.runtime, "args.wasm", {"argv": ["bin"]}, name="b")
    assert orch.exited(m)["code"] == 0 and orch.stdout(m).startswith(b"b\nbin\n")
    m = orch.create(node.runtime, "cat.wat", {"argv": ["data.txt"], "dirs": ["data"]}, name="cat")
    assert orch.exited(m)["code"] == 0
    assert orch.stdout(m) == b"hello from a preopened dir\n"
    # the module sees only the preopened directory: ../secret.txt is out of reach
    m = orch.create(node.runtime, "cat.wat", {"argv": ["../../secret.txt"], "dirs": ["data"]}, name="cat2")
    assert orch.exited(m)["code"] == 2 and orch.stdout(m) == b""


def test_delete_stops_a_running_module_and_stdout_streams(node, orch):
    m = orch.create(node.runtime, "ticker.wat", [], name="ticker")  # args as []: no arguments
    wait_for(lambda: orch.stdout(m).count(b"tick") >= 3, 10, "ticks while running")
    sent = time.monotonic()
    orch.control(node.runtime, "delete", {"type": "module", "uuid": m})
    status = orch.exited(m)
    took = time.monotonic() - sent
    assert status["reason"] == "deleted"
    assert took < 2.0, took  # bench/ measures it: well under 100 ms
    ka = orch.wait(lambda t, b: "/keepalive/" in t and not b["data"]["children"], 5, "keepalive without the module")
    assert ka["data"]["name"] == "node1"


def test_keepalive_lists_running_modules_with_cpu_and_memory(node, orch):
    m = orch.create(node.runtime, "ticker.wat", {}, name="kt")
    ka = orch.wait(lambda t, b: "/keepalive/" in t and any(c["uuid"] == m for c in b["data"].get("children", [])), 10,
                   "keepalive with the module")
    child = next(c for c in ka["data"]["children"] if c["uuid"] == m)
    assert set(child) >= {"uuid", "active", "cpu_usage_percent", "mem_usage"}
    # its one page of linear memory, while it runs (not 0 until it ends)
    orch.wait(lambda t, b: "/keepalive/" in t and any(c["uuid"] == m and c["mem_usage"] == 65536
                                                      for c in b["data"].get("children", [])), 5, "live mem_usage")
    orch.control(node.runtime, "delete", {"type": "module", "uuid": m})
    orch.exited(m)


def test_a_keepalive_goes_out_when_a_module_starts_and_ends(tmp_path, broker, mock, processes, moddir, realm):
    """`list` shows a module started a moment ago, not after the next keepalive (60 s by default)."""
    silent = TestOrchestrator(broker.port, realm, answer=False)  # no reply: the hour-long interval stays
    try:
        orchestrator = {"realm": realm, "name": "slowka", "reg_timeout_s": 0.5, "ka_interval_sec": 3600}
        cfg = write_config(tmp_path / "cfg", mock.port, broker.port, topic=f"{realm}-req",
                           runtime={"module_dir": str(moddir), "orchestrator": orchestrator})
        processes.append(RmProcess("rm_mqtt", cfg).start())
        runtime = silent.registration("runtime")["data"]["uuid"]
        m = silent.create(runtime, "ticker.wat", {}, name="fresh")
        silent.wait(lambda t, b: "/keepalive/" in t and any(c["uuid"] == m for c in b["data"].get("children", [])), 5,
                    "a keepalive with the new module")
        seen = len(silent.json_messages("/keepalive/"))
        silent.control(runtime, "delete", {"type": "module", "uuid": m})
        silent.exited(m)
        wait_for(lambda: any(not b["data"].get("children") for _, b in silent.json_messages("/keepalive/")[seen:]), 5,
                 "a keepalive without it")
    finally:
        silent.close()


def test_limit_and_fault_crash(node, orch):
    m = orch.create(node.runtime, "ticker.wat", {"limit": 0.3}, name="limited")
    assert orch.exited(m)["reason"] == "timeout"
    m = orch.create(node.runtime, "trap.wat", {"fault_crash": "restart"}, name="crashy")
    status = orch.exited(m)
    assert status["reason"] == "trap" and "unreachable" in status["message"]
    assert node.log().count("module crashy trapped") == 5  # restarted, bounded
    m = orch.create(node.runtime, "trap.wat", {"fault_crash": "ignore"}, name="once")
    assert orch.exited(m)["reason"] == "trap"
    assert "module once trapped" not in node.log()


def test_max_nmodules_is_enforced(node, orch):
    mods = [orch.create(node.runtime, "ticker.wat", {}, name=f"t{i}") for i in range(3)]
    wait_for(lambda: all(orch.stdout(m) for m in mods), 10, "three modules running")
    oid = orch.control(node.runtime, "create", {"type": "module", "uuid": str(uuid.uuid4()), "name": "fourth",
                                                "file": "ticker.wat"})
    reply = orch.reply_to(oid)
    assert reply["result"] == "error" and "max_nmodules" in reply["details"]
    for m in mods:
        orch.control(node.runtime, "delete", {"type": "module", "uuid": m})
    for m in mods:
        assert orch.exited(m)["reason"] == "deleted"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"{not json", "is not JSON"),
        (b"[1, 2]", "is not a JSON object"),
        ({"action": "create", "type": "req", "data": {"type": "module", "uuid": "u1", "name": "nofile"}}, "'file' is missing"),
        ({"action": "create", "type": "req", "data": {"type": "module", "uuid": "u2", "name": "ghost", "file": "nope.wasm"}},
         "not found in the module directory"),
        ({"action": "create", "type": "req", "data": {"type": "module", "uuid": "u3", "name": "escape", "file": "../secret.txt"}},
         "leaves the module directory"),
        ({"action": "create", "type": "req", "data": {"type": "module", "uuid": "u4", "name": "eng", "file": "echo.wat",
                                                       "args": {"engine": "wamr"}}}, "engine 'wamr' is not available"),
        ({"action": "create", "type": "req", "data": {"type": "module", "uuid": "u5", "name": "dirs", "file": "cat.wat",
                                                       "args": {"dirs": ["/etc"]}}}, "leaves the module directory"),
        ({"action": "delete", "type": "req", "data": {"type": "module", "uuid": "nobody"}}, "no module 'nobody' runs here"),
        ({"action": "dance", "type": "req", "data": {"type": "module", "uuid": "u6"}}, "unknown action 'dance'"),
        ({"action": "create", "type": "req", "data": {"type": "module", "uuid": "u7", "name": "c", "file": "relay.wat",
                                                       "channels": [{"path": "in", "mode": "r", "topic": "elsewhere/in"}]}},
         "channel 'in': topic 'elsewhere/in' is outside"),
        ({"action": "create", "type": "req", "data": {"type": "module", "uuid": "u8", "name": "c", "file": "relay.wat",
                                                       "channels": [{"path": "in", "mode": "r", "topic": "REALM/+/in"}]}},
         "holds a wildcard"),
        ({"action": "create", "type": "req", "data": {"type": "module", "uuid": "u9", "name": "c", "file": "relay.wat",
                                                       "channels": [{"path": "o", "mode": "w", "topic": "REALM/proc/control"}]}},
         "the orchestrator protocol's own"),
        ({"action": "create", "type": "req", "data": {"type": "module", "uuid": "u10", "name": "c", "file": "relay.wat",
                                                       "channels": [{"path": "in", "mode": "x", "topic": "REALM/in"}]}},
         "'mode' must be r, w or rw"),
    ],
)
def test_bad_control_messages_are_answered_and_the_node_keeps_serving(node, orch, payload, expected):
    topic = f"{orch.realm}/proc/control/{node.runtime}"
    if isinstance(payload, dict):
        payload = json.loads(json.dumps(payload).replace("REALM", orch.realm))
    if isinstance(payload, dict) and payload["action"] == "delete":
        # the Silverline orchestrator takes replies to creates only: an unknown module is logged
        payload = {"object_id": str(uuid.uuid4()), **payload}
        orch.client.publish(topic, json.dumps(payload), qos=1)
        wait_for(lambda: expected in node.log(), 10, "the error in the log")
        assert not [b for _, b in orch.json_messages() if b.get("object_id") == payload["object_id"]
                    and str(b.get("type")).endswith("resp")]
    elif isinstance(payload, dict):
        payload = {"object_id": str(uuid.uuid4()), **payload}
        orch.client.publish(topic, json.dumps(payload), qos=1)
        reply = orch.reply_to(payload["object_id"])
        assert reply["result"] == "error" and expected in reply["details"]
    else:
        orch.client.publish(topic, payload, qos=1)
    wait_for(lambda: expected in node.log(), 10, "the error in the log")
    m = orch.create(node.runtime, "args.wat", [], name="after")
    assert orch.exited(m)["code"] == 0 and node.alive


def _relay_channels(realm: str) -> list[dict]:
    return [{"path": "in", "mode": "r", "topic": f"{realm}/ch/in"}, {"path": "out", "mode": "w", "topic": f"{realm}/ch/out"}]


def test_channels_carry_messages_between_mqtt_and_a_module(node, orch):
    """relay.wat reads channel "in" and writes what it read to channel "out"."""
    realm = orch.realm
    orch.client.subscribe(f"{realm}/ch/out", qos=1)
    m = orch.create(node.runtime, "relay.wat", {}, name="relay", channels=_relay_channels(realm))
    wait_for(lambda: orch.stdout(m) == b"ready\n", 10, "the relay ready")
    sent = [b"one", b"\x00\xff binary", b"", b"x" * 60000, json.dumps({"n": 5}).encode()]
    for payload in sent:
        orch.client.publish(f"{realm}/ch/in", payload, qos=1).wait_for_publish(5)

    def relayed() -> list[bytes]:
        with orch.cond:
            return [p for t, p in orch.messages if t == f"{realm}/ch/out"]

    wait_for(lambda: len(relayed()) == len(sent), 10, "every message relayed")
    assert relayed() == sent  # each message whole, in order
    # the keepalive shows its memory (2 pages) while it waits on the channel
    orch.wait(lambda t, b: "/keepalive/" in t and any(c["uuid"] == m and c["mem_usage"] == 131072
                                                      for c in b["data"].get("children", [])), 5, "live mem_usage")
    orch.client.publish(f"{realm}/ch/in", b"quit", qos=1)
    assert orch.exited(m) == {"code": 0, "reason": "exited", "message": "exit code 0"}
    # a module with a channel it did not get: open answers ENOENT (relay.wat exits 3)
    m = orch.create(node.runtime, "relay.wat", {}, name="half", channels=_relay_channels(realm)[:1])
    assert orch.exited(m)["code"] == 3


def test_a_module_waiting_on_a_channel_is_stopped_by_a_delete_and_by_its_limit(tmp_path, broker, mock, processes, moddir,
                                                                               realm, orch):
    port = free_port()
    start_node(tmp_path, broker, mock, processes, moddir, realm, http_port=port)
    runtime = orch.registration("runtime")["data"]["uuid"]

    def channel_topics() -> list[str]:
        return requests.get(f"http://127.0.0.1:{port}/status", timeout=5).json()["orchestrator"]["channel_topics"]

    m = orch.create(runtime, "relay.wat", {}, name="waiting", channels=_relay_channels(realm))
    wait_for(lambda: orch.stdout(m) == b"ready\n", 10, "the relay waiting")
    assert channel_topics() == [f"{realm}/ch/in"]  # what it reads; what it writes needs no subscription
    sent = time.monotonic()
    orch.control(runtime, "delete", {"type": "module", "uuid": m})
    assert orch.exited(m)["reason"] == "deleted"
    assert time.monotonic() - sent < 2.0
    m = orch.create(runtime, "relay.wat", {"limit": 0.5}, name="limited", channels=_relay_channels(realm))
    assert orch.exited(m)["reason"] == "timeout"
    wait_for(lambda: channel_topics() == [], 5, "the node to leave the channel topic")


def test_a_create_forwarded_again_runs_the_module_once(node, orch):
    """An orchestrator that reads the control topic forwards a create sent straight
    to a runtime once more, with the same module uuid."""
    module = str(uuid.uuid4())
    body = {"type": "module", "uuid": module, "name": "once", "file": "ticker.wat"}
    first = orch.control(node.runtime, "create", body)
    assert orch.reply_to(first)["result"] == "ok"
    second = orch.control(node.runtime, "create", body)
    wait_for(lambda: "already runs here: ignored" in node.log(), 10, "the second create ignored")
    orch.control(node.runtime, "delete", {"type": "module", "uuid": module})
    assert orch.exited(module)["reason"] == "deleted"
    assert node.log().count(f"({module}) started") == 1
    assert not [b for _, b in orch.json_messages() if b.get("object_id") == second and str(b.get("type")).endswith("resp")]


def test_keepalive_cpu_is_measured_over_the_real_interval(node, orch):
    m = orch.create(node.runtime, "loop.wat", {}, name="busy")  # an infinite loop: one core
    kas = []
    deadline = time.monotonic() + 10
    while len(kas) < 3 and time.monotonic() < deadline:
        kas = [c for _, b in orch.json_messages("/keepalive/") for c in b["data"].get("children", []) if c["uuid"] == m]
        time.sleep(0.1)
    orch.control(node.runtime, "delete", {"type": "module", "uuid": m})
    orch.exited(m)
    assert len(kas) >= 3 and max(c["cpu_usage_percent"] for c in kas[1:]) > 60  # not 34 % or 49 %


def test_last_will_when_the_node_is_killed(node, orch):
    manager = orch.registration("manager")["data"]["uuid"]
    node.stop(signal.SIGKILL)
    will = orch.wait(lambda t, b: b.get("action") == "delete" and b.get("data", {}).get("uuid") == manager, 10, "last will")
    assert will["data"]["type"] == "manager"


def test_no_orchestrator_reply_is_logged_and_direct_control_still_works(tmp_path, broker, mock, processes, moddir, realm):
    silent = TestOrchestrator(broker.port, realm, answer=False)
    try:
        p = start_node(tmp_path, broker, mock, processes, moddir, realm)
        runtime = silent.registration("runtime")["data"]["uuid"]
        wait_for(lambda: "no orchestrator answered the registration" in p.log(), 15, "the missing reply in the log")
        m = silent.create(runtime, "args.wat", {"argv": ["direct"]}, name="d")
        assert silent.exited(m)["code"] == 0 and b"direct" in silent.stdout(m)
        # the usual case for a node without an orchestrator: said once, as a warning, not an error
        lines = [line for line in p.log().splitlines() if "no orchestrator answered" in line]
        assert len(lines) == 1 and "WARNING" in lines[0] and "ERROR" not in p.log()
    finally:
        silent.close()


def test_arts_dialect(tmp_path, broker, mock, processes, moddir, realm):
    arts = TestOrchestrator(broker.port, realm, arts=True)
    try:
        # ARTS' channel topics are not under the realm: allowed anywhere but the protocol's own
        p = start_node(tmp_path, broker, mock, processes, moddir, realm, dialect="arts", orchestrator={"channel_prefix": ""})
        reg = arts.registration("runtime")
        # ARTS schedules on runtimes whose apis string contains the module's (default wasi:snapshot_preview1)
        assert reg["type"] == "arts_req" and "wasi:snapshot_preview1" in reg["data"]["apis"]
        assert "wasi:unstable" in reg["data"]["apis"]
        reg_topics = {t for t, b in arts.json_messages("/proc/reg") if b.get("type") == "arts_req"}
        assert reg_topics == {f"{realm}/proc/reg"}
        wait_for(lambda: "registered with the orchestrator" in p.log(), 10, "registration reply matched by object_id")
        # ARTS answers runtimes only: no manager registration, no false error
        assert not [b for _, b in arts.json_messages("/proc/reg") if b.get("data", {}).get("type") == "manager"]
        assert "no registration reply" not in p.log() and "ERROR" not in p.log()
        runtime = reg["data"]["uuid"]
        # args, env and channels as ARTS sends them: Python repr strings
        m = arts.create(runtime, "args.wat", "['a1', 'b 2']", name="a", env="['X=1']",
                        channels="[{'path': '/ch/light', 'type': 'pubsub', 'mode': 'rw', 'params': {'topic': 'kitchen/light'}}]")
        assert arts.exited(m)["code"] == 0 and arts.stdout(m) == b"a\na1\nb 2\nX=1\n"
        # a module that ended by itself: ARTS (which never reads `exited`) is asked to drop it
        drop = arts.wait(lambda t, b: t == f"{realm}/proc/control" and b.get("action") == "delete"
                         and b.get("data", {}).get("uuid") == m, 10, "a delete for ARTS")
        assert drop["type"] == "arts_req" and drop["data"]["type"] == "module"
        # ... and the delete ARTS then forwards is answered quietly
        oid = arts.control(runtime, "delete", {"type": "module", "uuid": m})
        assert arts.reply_to(oid)["result"] == "ok" and "refused" not in p.log()
        # "['']": no arguments, no environment (it used to be refused)
        m = arts.create(runtime, "args.wat", "['']", name="bare", env="['']", channels="['']")
        assert arts.exited(m)["code"] == 0 and arts.stdout(m) == b"bare\n"
        # JSON strings keep working
        m = arts.create(runtime, "args.wat", json.dumps({"argv": ["from", "arts"], "env": ["K=V"]}), name="j")
        assert arts.exited(m)["code"] == 0 and arts.stdout(m) == b"j\nfrom\narts\nK=V\n"
        # migration: a delete with send_to_runtime hands the module, decoded, to that runtime
        m = arts.create(runtime, "ticker.wat", "['x']", name="mover", env="['Y=2']")
        wait_for(lambda: arts.stdout(m), 10, "mover running")
        target = str(uuid.uuid4())
        arts.control(runtime, "delete", {"type": "module", "uuid": m}, send_to_runtime=target)
        moved = arts.wait(lambda t, b: t == f"{realm}/proc/control/{target}" and b.get("action") == "create", 10, "hand-over")
        assert moved["data"]["uuid"] == m and moved["data"]["filename"] == "ticker.wat"
        assert moved["data"]["args"]["argv"] == ["x"] and moved["data"]["args"]["env"] == ["Y=2"]
        # ARTS-style channels: relay.wat copies what it reads on kitchen-…/in to kitchen-…/out
        kitchen = f"kitchen-{uuid.uuid4().hex[:6]}"
        arts.client.subscribe(f"{kitchen}/out", qos=1)
        m = arts.create(runtime, "relay.wat", "['']", name="arts-relay", channels=repr([
            {"path": "in", "type": "pubsub", "mode": "r", "params": {"topic": f"{kitchen}/in"}},
            {"path": "out", "type": "pubsub", "mode": "w", "params": {"topic": f"{kitchen}/out"}}]))
        wait_for(lambda: arts.stdout(m) == b"ready\n", 10, "the relay ready")
        arts.client.publish(f"{kitchen}/in", b"lights on", qos=1).wait_for_publish(5)
        wait_for(lambda: [pl for t, pl in arts.messages if t == f"{kitchen}/out"] == [b"lights on"], 10, "relayed")
        arts.client.publish(f"{kitchen}/in", b"quit", qos=1)
        assert arts.exited(m) == {"code": 0, "reason": "exited", "message": "exit code 0"}
        # killed: the will is the runtime's delete (ARTS ignores a manager's)
        p.stop(signal.SIGKILL)
        will = arts.wait(lambda t, b: b.get("action") == "delete" and t == f"{realm}/proc/reg", 10, "last will")
        assert will["data"]["type"] == "runtime" and will["data"]["uuid"] == runtime
    finally:
        arts.close()


def test_arts_re_registration_error_means_already_registered(tmp_path, broker, mock, processes, moddir, realm):
    arts = TestOrchestrator(broker.port, realm, arts=True, unique_error=True)
    try:
        p = start_node(tmp_path, broker, mock, processes, moddir, realm, dialect="arts")
        wait_for(lambda: "knows this runtime already" in p.log(), 10, "the error read as already registered")
        assert "ERROR" not in p.log()
    finally:
        arts.close()


def test_silverline_manager_without_reply_is_a_warning_and_the_runtime_reply_counts(
        tmp_path, broker, mock, processes, moddir, realm):
    """The Silverline orchestrator gives no reply to a manager it already knows."""
    orch = TestOrchestrator(broker.port, realm, answer_managers=False)
    try:
        p = start_node(tmp_path, broker, mock, processes, moddir, realm)
        wait_for(lambda: "registered with the orchestrator; keepalive every 1.0 s" in p.log(), 10, "the runtime reply used")
        wait_for(lambda: "no reply to the manager registration" in p.log(), 10, "a warning")
        assert "ERROR" not in p.log()
    finally:
        orch.close()


def test_a_clean_stop_does_not_report_modules_as_exited(node, orch):
    """The orchestrator marks the modules of a runtime that went away as killed and
    re-sends them when it is back; an `exited` would mark them done."""
    m = orch.create(node.runtime, "ticker.wat", {}, name="survivor")
    wait_for(lambda: orch.stdout(m), 10, "the module running")
    assert node.stop(signal.SIGTERM) == 0
    orch.wait(lambda t, b: b.get("action") == "delete" and b.get("data", {}).get("type") == "runtime", 10, "deregistration")
    assert not [b for _, b in orch.json_messages("/proc/control/") if b.get("action") == "exited"
                and b.get("data", {}).get("uuid") == m]
    assert "module survivor" in node.log() and "stopped with the node" in node.log()


def run_tool(cfg: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime_manager", *args, "--config-dir", str(cfg)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_command_line_tools_run_list_stop(node, orch):
    cfg = node.config_dir
    out = run_tool(cfg, "run", "--runtime", "node1", "--file", "args.wat", "--argv", "a", "b", "--env", "X=1")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "args\na\nb\nX=1\n"
    assert "exited: exit code 0" in out.stderr
    # a long module, listed, then stopped by name
    runner = subprocess.Popen([sys.executable, "-m", "runtime_manager", "run", "--runtime", "node1", "--file", "ticker.wat",
                               "--name", "longone", "--config-dir", str(cfg)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: "longone" in run_tool(cfg, "list").stdout, 20, "list to show the module")
        listing = run_tool(cfg, "list").stdout
        assert "node1" in listing and node.runtime in listing
        stopped = run_tool(cfg, "stop", "--module", "longone")
        assert stopped.returncode == 0 and "stopped" in stopped.stdout
        out_, err_ = runner.communicate(timeout=20)
        assert "tick" in out_ and "deleted" in err_
    finally:
        if runner.poll() is None:
            runner.kill()
    refused = run_tool(cfg, "run", "--runtime", "node1", "--file", "../escape.wat")
    assert refused.returncode == 2 and "leaves the module directory" in refused.stderr


def test_run_through_an_orchestrator(node, orch):
    refused = run_tool(node.config_dir, "run", "--via-orchestrator", "--file", "args.wat")
    assert refused.returncode == 2 and "--runtime is required" in refused.stderr  # no "parent": null
    out = run_tool(node.config_dir, "run", "--via-orchestrator", "--runtime", "node1", "--file", "args.wat", "--argv", "placed")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "args\nplaced\n"
    assert any(t == f"{orch.realm}/proc/control" for t, _ in orch.json_messages("/proc/control"))


def _creates(orch: TestOrchestrator, topic: str, name: str) -> list[dict]:
    return [b for t, b in orch.json_messages("/proc/control") if t == topic and b.get("action") == "create"
            and b.get("data", {}).get("name") == name]


def test_tools_go_through_a_silverline_orchestrator_by_default(tmp_path, broker, mock, processes, moddir, realm):
    """A registered runtime says so in its presence record; `run` and `stop` then go
    through the orchestrator, which (like Silverline's) also forwards what is sent
    straight to a runtime once more: the module runs once, the second delete is quiet."""
    orch = TestOrchestrator(broker.port, realm, forward_direct=True)
    try:
        p = start_node(tmp_path, broker, mock, processes, moddir, realm)
        runtime = orch.registration("runtime")["data"]["uuid"]
        wait_for(lambda: "registered with the orchestrator" in p.log(), 10, "registration")
        listing = run_tool(p.config_dir, "list").stdout
        assert "node1" in listing and "online, silverline orchestrator" in listing
        out = run_tool(p.config_dir, "run", "--runtime", "node1", "--file", "args.wat", "--name", "placed")
        assert out.returncode == 0, out.stderr
        assert len(_creates(orch, f"{realm}/proc/control", "placed")) == 1  # to the orchestrator
        # straight to the runtime: forwarded once more, run once
        out = run_tool(p.config_dir, "run", "--direct", "--runtime", "node1", "--file", "args.wat", "--name", "direct")
        assert out.returncode == 0, out.stderr
        assert out.stdout == "direct\n"  # argv[0] is the module's name
        assert len(_creates(orch, f"{realm}/proc/control/{runtime}", "direct")) == 2
        wait_for(lambda: "here: ignored" in p.log(), 5, "the second create ignored")
        assert len(re.findall(r"module direct \(\S+\) started", p.log())) == 1
        runner = subprocess.Popen([sys.executable, "-m", "runtime_manager", "run", "--runtime", "node1", "--file",
                                   "ticker.wat", "--name", "longer", "--config-dir", str(p.config_dir)], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: "longer" in run_tool(p.config_dir, "list").stdout, 20, "list to show the module")
            stopped = run_tool(p.config_dir, "stop", "--direct", "--module", "longer")
            assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped
            runner.communicate(timeout=20)
        finally:
            if runner.poll() is None:
                runner.kill()
        deletes = [b for t, b in orch.json_messages(f"/proc/control/{runtime}") if b.get("action") == "delete"]
        wait_for(lambda: len([b for t, b in orch.json_messages(f"/proc/control/{runtime}")
                              if b.get("action") == "delete"]) >= 2, 5, "the delete forwarded again")
        time.sleep(0.3)
        replies = [b for t, b in orch.json_messages(f"/proc/control/{runtime}") if str(b.get("type")).endswith("resp")
                   and b.get("action") != "create"]
        assert not replies, replies  # Silverline takes replies to creates only
        assert "ERROR" not in p.log() and deletes
    finally:
        orch.close()


def test_keepalives_are_not_retained_and_list_says_who_is_alive(tmp_path, broker, mock, processes, moddir, realm, orch):
    alive = start_node(tmp_path, broker, mock, processes, moddir, realm, name="alive", cfg_name="a")
    killed = start_node(tmp_path, broker, mock, processes, moddir, realm, name="killed", cfg_name="k")
    stopped = start_node(tmp_path, broker, mock, processes, moddir, realm, name="stopped", cfg_name="s")
    for p in (alive, killed, stopped):
        wait_for(lambda p=p: "registered with the orchestrator" in p.log(), 10, "registration")
    orch.wait(lambda t, b: "/keepalive/" in t, 5, "a keepalive")
    # a new subscriber gets no retained keepalive (a killed node's would stay forever)
    retained: list[str] = []
    late = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"late-{uuid.uuid4().hex[:6]}")
    late.on_connect = lambda c, *a: c.subscribe(f"{realm}/proc/keepalive/+", qos=1)
    late.on_message = lambda _c, _u, msg: msg.retain and retained.append(msg.topic)
    late.connect("127.0.0.1", broker.port)
    late.loop_start()
    try:
        time.sleep(1.0)
        assert not retained
    finally:
        late.disconnect()
        late.loop_stop()
    killed.stop(signal.SIGKILL)
    assert stopped.stop(signal.SIGTERM) == 0
    out = run_tool(alive.config_dir, "list")
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if not line.startswith(" ")}
    assert "online" in lines["alive"]
    assert "not answering: last heard" in lines["killed"] and "s ago" in lines["killed"]
    assert "stopped at" in lines["stopped"]
    listed = json.loads(run_tool(alive.config_dir, "list", "--json").stdout)
    assert {r["name"]: r["alive"] for r in listed} == {"alive": True, "killed": False, "stopped": False}
    refused = run_tool(alive.config_dir, "run", "--runtime", "killed", "--file", "args.wat")
    assert refused.returncode != 0 and "is not answering" in refused.stderr
    # a clean stop leaves the keepalive topic alone: no empty payload for the orchestrator to decode
    assert all(payload for t, payload in orch.messages if "/keepalive/" in t)


def test_re_registers_after_the_broker_restarts(tmp_path, own_broker, mock, processes, moddir, realm):
    own_broker.start()
    first = TestOrchestrator(own_broker.port, realm)
    p = start_node(tmp_path, own_broker, mock, processes, moddir, realm)
    runtime = first.registration("runtime")["data"]["uuid"]
    wait_for(lambda: "registered with the orchestrator" in p.log(), 10, "first registration")
    first.close()
    own_broker.stop()
    own_broker.start()
    second = TestOrchestrator(own_broker.port, realm)
    try:
        again = second.registration("runtime")["data"]
        assert again["uuid"] == runtime
        wait_for(lambda: p.log().count("registered with the orchestrator") >= 2, 15, "second registration")
        m = second.create(runtime, "args.wat", [], name="after-restart")
        assert second.exited(m)["code"] == 0
    finally:
        second.close()


def test_module_metrics_count_starts_ends_and_refusals(tmp_path, broker, mock, processes, moddir, realm, orch):
    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()
    start_node(tmp_path, broker, mock, processes, moddir, realm, http_port=port)
    runtime = orch.registration("runtime")["data"]["uuid"]
    done = orch.create(runtime, "args.wat", {"argv": ["x"]}, name="once")
    assert orch.exited(done)["reason"] == "exited"
    ticking = orch.create(runtime, "ticker.wat", {}, name="ticking")
    wait_for(lambda: orch.stdout(ticking), 10, "the ticker to run")
    oid = orch.control(runtime, "create", {"type": "module", "uuid": str(uuid.uuid4()), "name": "ghost", "file": "nope.wasm"})
    assert orch.reply_to(oid)["result"] == "error"

    def metrics() -> dict:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    got = wait_for(lambda: (m := metrics()).get(("rm_orchestrator_modules", (("state", "running"),))) == 1 and m, 10,
                   "the running module in the gauge")
    assert got[("rm_orchestrator_modules_started_total", ())] == 2
    assert got[("rm_orchestrator_modules_ended_total", (("reason", "exited"),))] == 1
    assert got[("rm_orchestrator_modules_refused_total", ())] == 1
