"""A node as one service: `serve` runs MQTT, REST and the orchestrator runtime in
one process on one engine; one lifecycle for every part; REST backpressure."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import requests
from conftest import ROOT, RmProcess, write_config
from helpers import free_port, wait_for
from test_orchestrator import TestOrchestrator

from runtime_manager.core.lifecycle import Entrypoint, Service
from runtime_manager.core.request import new_request_id
from runtime_manager.node import Node

FLOWS = "1\nTO component1 1\nPOST payload\nTO component2 1\nPOST result1\n\nslow\nTO slowc 1\nGET\n"


def slow_component(port: int) -> dict:
    return {"slowc": {"id": 9, "config": {"protocol": "http", "ip": "127.0.0.1", "port": port, "timeout_s": 20,
                                          "endpoints": {"1": "slow"}}}}


def serve(tmp_path: Path, broker, mock, processes, topic: str, runtime: dict | None = None, rest: dict | None = None,
          name: str = "cfg") -> tuple[RmProcess, str]:
    port = free_port()
    cfg = write_config(tmp_path / name, mock.port, broker.port, rest_port=port, topic=topic, flows=FLOWS,
                       components=slow_component(mock.port), runtime={"node_id": "1", **(runtime or {})},
                       comm={"rest": rest or {}})
    p = RmProcess("serve", cfg).start("running:")
    processes.append(p)
    wait_for(lambda: "subscribing to" in p.log(), 20, "the subscription")
    return p, f"http://127.0.0.1:{port}"


def post(base: str, body: dict, timeout: float = 30) -> requests.Response:
    return requests.post(f"{base}/startrm", data=json.dumps(body), headers={"Content-Type": "application/json"},
                         timeout=timeout)


def test_serve_runs_mqtt_rest_and_the_orchestrator_in_one_process_on_one_engine(tmp_path, broker, mock, processes,
                                                                                  probe_factory):
    realm = f"realm-{uuid.uuid4().hex[:6]}"
    orch = TestOrchestrator(broker.port, realm)
    try:
        orchestrator = {"realm": realm, "name": "one", "ka_interval_sec": 1, "reg_timeout_s": 2}
        node, base = serve(tmp_path, broker, mock, processes, "one",
                           runtime={"module_dir": str(ROOT / "runtimes"), "orchestrator": orchestrator})
        probe = probe_factory(topics=("one/result",))
        for i in range(5):
            probe.publish({"id_flow": "1", "payload": i, "request_id": f"m{i}"}, "one")
        rest = [post(base, {"id_flow": "1", "payload": i}) for i in range(3)]
        assert all(r.status_code == 200 and r.json()["node"] == "1" for r in rest)
        assert all(probe.wait_result(f"m{i}")["status"] == "ok" for i in range(5))
        # the orchestrator runtime of the same process registered and runs a module
        runtime = orch.registration("runtime")["data"]["uuid"]
        module = orch.create(runtime, "args.wat", {"argv": ["same", "process"]}, name="m")
        assert orch.exited(module)["code"] == 0 and orch.stdout(module) == b"m\nsame\nprocess\n"
        status = requests.get(f"{base}/status", timeout=5).json()
        assert status["pid"] == node.proc.pid
        assert status["accepted"] == 8 and status["ok"] == 8  # one set of counters ...
        assert status["by_entrypoint"] == {"mqtt": 5, "rest": 3}  # ... fed by both entry points
        assert status["mqtt"]["connected"] is True and status["orchestrator"]["runtime"] == runtime
        assert sorted(status["entrypoints"]) == ["mqtt entry point", "rest entry point"]
        log = node.log()
        assert log.count("engine started") == 1 and "orchestrator runtime" in log
    finally:
        orch.close()


def test_sigterm_drains_mqtt_and_rest_then_stops_in_order(tmp_path, broker, mock, processes, probe_factory):
    node, base = serve(tmp_path, broker, mock, processes, "drain")
    probe = probe_factory(topics=("drain/result",))
    mock.slow_ms = 2000
    answers: list[requests.Response] = []
    threads = [threading.Thread(target=lambda: answers.append(post(base, {"id_flow": "slow"}))) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(4):
        probe.publish({"id_flow": "slow", "request_id": f"d{i}"}, "drain")
    wait_for(lambda: mock.calls["slow"] >= 8, 10, "8 flows in flight")
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    port = int(base.rsplit(":", 1)[1])

    def refused() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) != 0

    wait_for(lambda: requests.get(f"{base}/readyz", timeout=5).status_code == 503, 5, "/readyz to say draining")
    ready = requests.get(f"{base}/readyz", timeout=5).json()
    assert ready["ready"] is False and any("stopping" in r for r in ready["reasons"])
    late = post(base, {"id_flow": "1"})  # a new flow request while draining: refused at once
    assert late.status_code == 503 and late.json()["error"]["code"] == "overloaded"
    assert not answers and not probe.results  # the flows were still running
    assert node.proc.wait(20) == 0  # one signal: a graceful stop (a second one would kill)
    assert refused()  # and REST has closed
    for t in threads:
        t.join(10)
    assert [r.status_code for r in answers] == [200] * 4
    assert all(probe.wait_result(f"d{i}", 5)["status"] == "ok" for i in range(4))
    log = node.log()
    order = [log.index(line) for line in ("SIGTERM received", "engine stopped", "node 1 stopped")]
    assert order == sorted(order)


def test_a_second_signal_kills_at_once(tmp_path, broker, mock, processes, probe_factory):
    node, _ = serve(tmp_path, broker, mock, processes, "twice", runtime={"drain_timeout_s": 30})
    probe = probe_factory(topics=("twice/result",))
    mock.slow_ms = 20000
    probe.publish({"id_flow": "slow", "request_id": "long"}, "twice")
    wait_for(lambda: mock.calls["slow"] >= 1, 10, "a flow in flight")
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "SIGTERM received, stopping" in node.log(), 10, "the first signal")
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(10) == 1
    assert "received again: killing" in node.log()


def test_sigkill_mid_burst_loses_nothing_at_qos1(tmp_path, broker, mock, processes, probe_factory):
    mock.keep_bodies = False
    mock.delay_ms = 2
    node, _ = serve(tmp_path, broker, mock, processes, "kill9")
    probe = probe_factory(topics=("kill9/result",))
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"kill9-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5)
    publisher.max_inflight_messages_set(0)
    publisher.connect("127.0.0.1", broker.port)
    publisher.loop_start()
    n = 1000
    try:
        for i in range(n):
            publisher.publish("kill9", json.dumps({"id_flow": "1", "request_id": f"k{i}"}), qos=1)
        wait_for(lambda: len(probe.results) >= 100, 60, "the burst under way")
        node.stop(signal.SIGKILL)
        assert len(probe.results) < n, "the burst ended before the kill: nothing tested"
        again = RmProcess("serve", node.config_dir).start("running:")  # same client id: its session waits for it
        processes.append(again)
        wait_for(lambda: len(probe.results) >= n, 120, f"{n} results")
    finally:
        publisher.disconnect()
        publisher.loop_stop()
    assert {f"k{i}" for i in range(n)} <= set(probe.results)
    assert all(r[0]["status"] == "ok" for r in probe.results.values())


def test_rest_answers_overloaded_at_once_and_health_stays_fast(tmp_path, broker, mock, processes):
    """4 workers and a queue of 8: of twenty concurrent flow requests four run,
    eight wait, and the other eight are answered 503 overloaded at once, as MQTT
    ones are; flow requests hold no thread (rest.threads 2), so /health and
    /status answer meanwhile."""
    _, base = serve(tmp_path, broker, mock, processes, "bp", runtime={"queue_depth": 8, "workers": 4},
                    rest={"threads": 2})
    mock.slow_ms = 2000
    answers: list[tuple[int, dict, float]] = []
    lock = threading.Lock()

    def one() -> None:
        t0 = time.monotonic()
        r = post(base, {"id_flow": "slow"})
        with lock:
            answers.append((r.status_code, r.json(), time.monotonic() - t0))

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    wait_for(lambda: mock.calls["slow"] >= 4 and len(answers) >= 8, 10, "eight answers while four flows run")
    t0 = time.monotonic()
    health = requests.get(f"{base}/health", timeout=5)
    health_s = time.monotonic() - t0
    status = requests.get(f"{base}/status", timeout=5).json()
    for t in threads:
        t.join(20)
    codes = sorted(code for code, _, _ in answers)
    assert codes == [200] * 12 + [503] * 8
    refused = [(body, took) for code, body, took in answers if code == 503]
    assert all(body["error"]["code"] == "overloaded" and "queue full (8 requests waiting)" in body["error"]["message"]
               for body, _ in refused)
    assert max(took for _, took in refused) < 1.5  # at once, not after a flow (2 s)
    assert health.status_code == 200 and health_s < 1.0
    assert status["in_flight"] == 4 and status["queued"] == 8 and mock.calls["slow"] == 12  # the queued ones ran after


def test_livez_and_readyz_say_why_a_node_is_not_ready(tmp_path, own_broker, mock, processes):
    own_broker.start()
    _, base = serve(tmp_path, own_broker, mock, processes, "ready")
    assert requests.get(f"{base}/livez", timeout=5).json() == {"status": "alive"}
    assert requests.get(f"{base}/readyz", timeout=5).json()["ready"] is True
    own_broker.stop()
    wait_for(lambda: requests.get(f"{base}/readyz", timeout=5).status_code == 503, 10, "not ready without the broker")
    ready = requests.get(f"{base}/readyz", timeout=5).json()
    assert any("MQTT broker" in r for r in ready["reasons"])
    assert requests.get(f"{base}/livez", timeout=5).status_code == 200  # alive all the same
    own_broker.start()
    wait_for(lambda: requests.get(f"{base}/readyz", timeout=5).status_code == 200, 20, "ready again")


def test_check_rejects_an_empty_broker_host(tmp_path, mock):
    cfg = write_config(tmp_path / "cfg", mock.port, comm={"mqtt": {"host": ""}})
    out = subprocess.run([sys.executable, "-m", "runtime_manager", "check", "--config-dir", str(cfg)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "comm.conf: mqtt.host: not a host name or address: ''" in out.stdout


def test_request_ids_stay_unique_in_forked_and_spawned_processes():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its ids, then out at once
        os.write(write, ",".join(new_request_id() for _ in range(3)).encode())
        os._exit(0)
    os.close(write)
    mine = {new_request_id() for _ in range(3)}
    os.waitpid(pid, 0)
    child = set(os.read(read, 4096).decode().split(","))
    os.close(read)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        spawned = {pool.apply(new_request_id) for _ in range(3)}
    assert len(child) == 3 and len(spawned) == 3
    assert not mine & child and not mine & spawned


# ----- the container's lifecycle, with services that record what happens ---------------------
class Recorder(Service):
    entrypoint = False

    def __init__(self, name: str, events: list[str], fail: str = "") -> None:
        self.name, self.events, self.fail = name, events, fail

    async def _step(self, what: str) -> None:
        self.events.append(f"{what} {self.name}")
        if self.fail == what:
            raise RuntimeError(f"{self.name} fails at {what}")
        if what == "stop" and self.entrypoint:
            await asyncio.sleep(0.05)  # entry points drain concurrently

    async def setup(self) -> None:
        await self._step("setup")

    async def start(self) -> None:
        await self._step("start")

    async def stop(self) -> None:
        await self._step("stop")

    def kill(self) -> None:
        self.events.append(f"kill {self.name}")
        if self.fail == "kill":
            raise RuntimeError("kill must not raise out of the node")


class EntryRecorder(Recorder, Entrypoint):
    """An entry point: the node stops it first, with the others."""

    entrypoint = True


def _node(services: list[Recorder]) -> Node:
    from runtime_manager.config import load_config

    node = Node.__new__(Node)  # the container alone, around the recorders
    node.config = load_config(ROOT / "config_files")
    node.services = services  # type: ignore[assignment]
    node._set_up = []
    return node


def test_container_starts_in_order_and_stops_entry_points_first_then_in_reverse():
    events: list[str] = []
    services = [Recorder("pool", events), Recorder("link", events), Recorder("engine", events),
                EntryRecorder("mqtt", events), EntryRecorder("rest", events)]
    node = _node(services)

    async def scenario() -> None:
        await node.start()
        await node.stop()

    asyncio.run(scenario())
    assert events == ["setup pool", "setup link", "setup engine", "setup mqtt", "setup rest",
                      "start pool", "start link", "start engine", "start mqtt", "start rest",
                      "stop mqtt", "stop rest", "stop engine", "stop link", "stop pool"]


def test_container_cleans_up_only_what_was_set_up_when_a_setup_fails():
    events: list[str] = []
    node = _node([Recorder("pool", events), Recorder("link", events, fail="setup"), Recorder("engine", events)])
    with pytest.raises(RuntimeError, match="link fails at setup"):
        asyncio.run(node.start())
    assert events == ["setup pool", "setup link", "stop pool"]


def test_container_kill_never_raises_and_a_failing_stop_becomes_a_kill():
    events: list[str] = []
    node = _node([Recorder("pool", events, fail="kill"), Recorder("link", events, fail="stop"), Recorder("engine", events)])

    async def scenario() -> None:
        await node.start()
        await node.stop()

    asyncio.run(scenario())
    assert events[-4:] == ["stop engine", "stop link", "kill link", "stop pool"]
    asyncio.run(node.start())
    node.kill()  # pool's kill raises: logged, not raised
    assert events[-3:] == ["kill engine", "kill link", "kill pool"]


def test_a_sighup_during_start_up_is_a_reload_once_started(tmp_path, broker, mock, processes):
    """SIGHUP storms while a node starts: it neither dies nor loses the reload."""
    import signal as signals
    import time as clock

    from conftest import RmProcess, write_config

    cfg = write_config(tmp_path / "cfg", mock.port, broker.port, runtime={"node_id": "1"})
    node = RmProcess("serve", cfg).start(ready=None)
    processes.append(node)
    deadline = clock.monotonic() + 15
    sent = 0
    while "engine started" not in node.log() and clock.monotonic() < deadline:
        clock.sleep(0.05 if sent else 0.3)  # the interpreter's own start: SIGHUP is taken from main() on
        if node.proc.poll() is not None:
            break
        node.proc.send_signal(signals.SIGHUP)
        sent += 1
    assert sent >= 1 and node.proc.poll() is None, node.log()
    wait_for(lambda: "reload: " in node.log(), 10, "the reload asked for during start-up")
    assert node.stop() == 0


def test_the_supervisor_removes_the_load_files_a_killed_supervisor_left():
    import tempfile
    from pathlib import Path

    from runtime_manager.supervisor import LOADS_PREFIX, _remove_left_behind

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = Path(tempfile.mkdtemp(prefix=f"{LOADS_PREFIX}{dead.pid}-"))
    (left / "loads").write_bytes(b"\0" * 48)
    alive = Path(tempfile.mkdtemp(prefix=f"{LOADS_PREFIX}{os.getpid()}-"))
    (alive / "loads").write_bytes(b"\0" * 48)
    try:
        _remove_left_behind()
        assert not left.exists() and (alive / "loads").exists()  # a running supervisor's is left alone
    finally:
        (alive / "loads").unlink()
        alive.rmdir()
