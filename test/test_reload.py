"""Reload without restart: SIGHUP and `python -m runtime_manager reload` read the
configuration directory again; new requests use it, running ones finish on the
old one, a broken directory changes nothing and says why."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
from conftest import ROOT, RmProcess, write_config
from helpers import free_port, wait_for
from mock_services import MockServices

from runtime_manager.config import load_config
from runtime_manager.reload import changes, merged

FLOWS = "1\nTO component1 1\nPOST payload\n\nslow\nTO component1 slow\nGET\nTO component1 1\nPOST result1\n"
FLOW_2 = "\n2\nTO component1 2\nPOST payload\n"


def component(port: int) -> dict:
    return {"component1": {"id": 1, "config": {"protocol": "http", "ip": "127.0.0.1", "port": port,
                                               "endpoints": {"1": "endpoint1", "2": "endpoint2", "slow": "slow"}}}}


def move_component(cfg: Path, port: int) -> None:
    data = json.loads((cfg / "components.conf").read_text())
    data.update(component(port))
    (cfg / "components.conf").write_text(json.dumps(data))


def reload_command(cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime_manager", "reload", "--config-dir", str(cfg)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_changes_sort_what_applies_live_from_what_needs_a_restart(tmp_path):
    old_dir = write_config(tmp_path / "old", 6001, 1883, rest_port=5001, flows=FLOWS, components=component(6001))
    new_dir = write_config(tmp_path / "new", 6001, 1884, rest_port=5001, flows=FLOWS + FLOW_2, components=component(6002),
                           lb={"policy": "least_loaded"}, runtime={"task_timeout_ms": 5000, "workers": 8})
    old, new = load_config(old_dir), load_config(new_dir)
    found = changes(old, new)
    assert found.flows_added == ["2"] and found.flows_removed == [] and found.flows_changed == []
    assert found.components_changed == ["component1"]
    assert {"load_balancer.policy", "runtime.task_timeout_ms"} <= set(found.live)
    assert {"mqtt.port", "mqtt.client_id", "runtime.workers"} <= set(found.needs_restart)
    assert "runtime.workers" not in found.live and "mqtt.port" not in found.live
    running = merged(old, new)
    assert set(running.flows) == {"1", "2", "slow"} and running.components["component1"].port == 6002
    assert running.mqtt == old.mqtt and running.rest == old.rest  # kept until a restart
    assert running.runtime.task_timeout_ms == 5000 and running.runtime.workers == old.runtime.workers
    assert changes(old, old).any is False


@pytest.fixture
def second_mock():
    m = MockServices().start()
    yield m
    m.stop()


def test_reload_adds_a_flow_moves_a_component_and_refuses_a_broken_file(tmp_path, broker, mock, second_mock, processes):
    port = free_port()
    cfg = write_config(tmp_path / "cfg", mock.port, broker.port, rest_port=port, flows=FLOWS, components=component(mock.port),
                       lb={"policy": "local"}, runtime={"node_id": "1"})
    node = RmProcess("serve", cfg).start()
    processes.append(node)
    url = f"http://127.0.0.1:{port}/startrm"
    assert requests.post(url, json={"id_flow": "2", "payload": "x"}, timeout=10).json()["error"]["code"] == "unknown_flow"

    # a flow in flight across the reload: it started on the old config and finishes on it
    mock.slow_ms = 1500
    in_flight: dict = {}
    runner = threading.Thread(target=lambda: in_flight.update(
        requests.post(url, json={"id_flow": "slow", "payload": "p"}, timeout=30).json()))
    runner.start()
    wait_for(lambda: mock.calls["slow"] == 1, 10, "the slow flow to start")

    (cfg / "flows.conf").write_text(FLOWS + FLOW_2)
    move_component(cfg, second_mock.port)
    done = reload_command(cfg)
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    assert outcome["ok"] is True and outcome["flows_added"] == ["2"] and outcome["components_changed"] == ["component1"]

    runner.join(30)
    assert in_flight["status"] == "ok", in_flight
    assert mock.calls["endpoint1"] == 1 and second_mock.calls["endpoint1"] == 0  # its second step stayed on the old one
    answer = requests.post(url, json={"id_flow": "2", "payload": "x"}, timeout=10).json()
    assert answer["status"] == "ok" and answer["results"][0]["endpoint"] == "endpoint2"
    assert requests.post(url, json={"id_flow": "1", "payload": "y"}, timeout=10).json()["status"] == "ok"
    assert second_mock.calls["endpoint2"] == 1 and second_mock.calls["endpoint1"] == 1 and mock.calls["endpoint2"] == 0

    # a broken file: the command names it and does not signal; a SIGHUP logs it as check does and changes nothing
    (cfg / "flows.conf").write_text(FLOWS + FLOW_2 + "\n3\nTO component1 1\nPOTS payload\n")
    refused = reload_command(cfg)
    assert refused.returncode == 1 and "flows.conf:" in refused.stdout and "POTS" in refused.stdout
    assert "no node was asked to reload" in refused.stderr
    node.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in node.log(), 10, "the reload to be refused")
    assert "reload: flows.conf:" in node.log() and "POTS" in node.log()
    assert requests.post(url, json={"id_flow": "2", "payload": "x"}, timeout=10).json()["status"] == "ok"
    status = requests.get(f"http://127.0.0.1:{port}/status", timeout=5).json()
    assert status["config"]["reloads"] == 2 and status["config"]["last_reload"]["ok"] is False
    assert status["config"]["flows"] == ["1", "2", "slow"]

    # what cannot change live is named, and the node runs on with its old value
    comm = json.loads((cfg / "comm.conf").read_text())
    comm["mqtt"]["port"] = 1
    (cfg / "comm.conf").write_text(json.dumps(comm))
    (cfg / "flows.conf").write_text(FLOWS + FLOW_2)
    assert reload_command(cfg).returncode == 0
    assert "mqtt.port changed; it applies at the next start" in node.log()
    assert requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200  # still connected
    assert node.alive


def test_sighup_to_a_supervisor_reloads_every_worker(tmp_path, broker, mock, processes):
    port = free_port()
    cfg = write_config(tmp_path / "cfg", mock.port, broker.port, rest_port=port, flows=FLOWS, components=component(mock.port),
                       lb={"policy": "local"}, runtime={"node_id": "1"})
    node = RmProcess("serve", cfg, "--processes", "2").start()
    processes.append(node)
    wait_for(lambda: node.log().count("engine started") == 2, 20, "both workers")
    (cfg / "flows.conf").write_text(FLOWS + FLOW_2)
    node.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: node.log().count("reload: flows added: 2") == 2, 20, "both workers to reload")
    # every connection (spread over both workers by the kernel) finds flow 2
    for _ in range(10):
        with requests.Session() as s:
            assert s.post(f"http://127.0.0.1:{port}/startrm", json={"id_flow": "2"}, timeout=10).json()["status"] == "ok"
    assert node.stop() == 0


def test_reload_all_reaches_every_node_on_the_directory(tmp_path, broker, mock, processes):
    """Three nodes of one host read one directory: two publish statuses (asked
    over the broker), one is REST-only (`rm_api`, as node 2 of `make run`: found
    on the REST port nodes.conf gives it, and signalled). `reload --all`
    reaches all three."""
    port1, port2, port3 = free_port(), free_port(), free_port()
    peers = {"3": {"id": 3, "config": {"protocol": "http", "ip": "127.0.0.1", "port": port3, "endpoint": "startrm"}}}
    cfg = write_config(tmp_path / "cfg", mock.port, broker.port, rest_port=port1, flows=FLOWS, nodes=peers,
                       components=component(mock.port), lb={"policy": "local"}, runtime={"node_id": "1"})
    processes.append(RmProcess("serve", cfg).start())
    processes.append(RmProcess("serve", cfg, "--node-id", "2", "--port", str(port2)).start(ready=None))
    processes.append(RmProcess("rm_api", cfg, "--node-id", "3", "--port", str(port3)).start(ready=None))

    def ready(port: int) -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).ok
        except requests.ConnectionError:
            return False  # not listening yet (two nodes write one log: RmProcess cannot tell)

    for port in (port1, port2, port3):
        wait_for(lambda port=port: ready(port), 20, f"the node on {port} ready")
        assert requests.post(f"http://127.0.0.1:{port}/startrm", json={"id_flow": "2"}, timeout=10).status_code == 404
    (cfg / "flows.conf").write_text(FLOWS + FLOW_2)

    def all_reloaded() -> bool:
        done = reload_command_all(cfg)
        return done.returncode == 0 and all(f"node {n}" in done.stdout for n in ("1", "2", "3"))

    wait_for(all_reloaded, 20, "the three nodes found and reloaded")
    for port in (port1, port2, port3):
        res = requests.post(f"http://127.0.0.1:{port}/startrm", json={"id_flow": "2", "payload": "p"}, timeout=10)
        assert res.status_code == 200, res.text
        assert requests.get(f"http://127.0.0.1:{port}/status", timeout=5).json()["config"]["reloads"] >= 1
    (cfg / "flows.conf").write_text(FLOWS + "\n\nbroken\nTO nowhere 1\nGET\n")
    refused = reload_command_all(cfg)  # a broken directory is refused before any node is asked
    assert refused.returncode == 1 and "nowhere" in refused.stdout + refused.stderr


def reload_command_all(cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime_manager", "reload", "--all", "--config-dir", str(cfg)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
