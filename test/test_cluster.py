"""Nodes as one system: statuses over the broker, the peer table, built-in
placement with failover, a node as load balancer for others, MQTT 5
request/response, forwarding over MQTT, redelivered requests not run twice.
Real Mosquitto, real `serve` processes, 127.0.0.1 only."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import requests
from conftest import RmProcess, write_config
from helpers import MqttProbe, free_port, wait_for
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from runtime_manager.cluster.peers import PeerTable
from runtime_manager.config import PeerAddress

FLOWS = "1\nTO component1 1\nPOST payload\n\nslow\nTO slowc 1\nGET\n"
INTERVAL_MS = 200


def slow_component(mock) -> dict:
    return {"slowc": {"id": 9, "config": {"protocol": "http", "ip": "127.0.0.1", "port": mock.port, "endpoints": {"1": "slow"}}}}


def peer_entry(node_id: str, port: int, **extra) -> dict:
    return {"id": node_id, "config": {"protocol": "http", "ip": "127.0.0.1", "port": port, "endpoint": "startrm", **extra}}


def group(tmp_path, broker, mock, n: int, policy: str = "least_loaded", runtime: dict | None = None,
          peer_extra: dict | None = None, prefix: str | None = None, topic: str = "component_msg",
          **lb) -> list[tuple[str, int, object]]:
    """n node configs that know each other: (node id, REST port, config dir)."""
    prefix = prefix or f"rm/nodes-{uuid.uuid4().hex[:6]}"  # a group of its own on the shared broker
    ports = {str(i): free_port() for i in range(1, n + 1)}
    nodes = {i: peer_entry(i, p, **(peer_extra or {})) for i, p in ports.items()}
    out = []
    for i, port in ports.items():
        cfg = write_config(tmp_path / f"node{i}", mock.port, broker.port, rest_port=port, flows=FLOWS, topic=topic,
                           components=slow_component(mock), nodes=nodes, lb={"policy": policy, **lb},
                           runtime={"node_id": i, "status_interval_ms": INTERVAL_MS, "status_prefix": prefix,
                                    "workers": 4, **(runtime or {})})
        out.append((i, port, cfg))
    return out


def status(port: int) -> dict:
    return requests.get(f"http://127.0.0.1:{port}/status", timeout=5).json()


def peer_state(port: int, peer: str) -> str | None:
    for p in status(port)["placement"]["peers"]:
        if p["id"] == peer:
            return p["state"]
    return None


def post(port: int, body: dict, timeout: float = 30) -> dict:
    return requests.post(f"http://127.0.0.1:{port}/startrm", json=body, timeout=timeout).json()


# ----- the peer table's rules, step by step ------------------------------------------------------
def _table(discover: bool = False) -> PeerTable:
    nodes = {i: PeerAddress(i, "http", "127.0.0.1", 5000 + int(i), "startrm") for i in ("1", "2", "3")}
    return PeerTable("1", nodes, 1.0, discover)


def test_a_peer_is_healthy_while_its_statuses_arrive_and_silent_after_three_intervals():
    table = _table()
    assert {p.id for p in table.peers.values()} == {"2", "3"}  # home is not its own peer
    assert table.healthy() == [] and table.usable("2")  # never heard of: only for policies blind to load
    table.heard({"node": "2", "state": "online", "in_flight": 2, "queued": 2, "capacity": 8, "interval_ms": 1000}, 10.0)
    assert [p.id for p in table.healthy()] == ["2"] and table.peers["2"].load == 0.5
    assert table.tick(12.9) == [] and table.peers["2"].state == "healthy"
    assert [p.id for p in table.tick(13.1)] == ["2"] and table.peers["2"].state == "silent"
    assert not table.usable("2")
    table.heard({"node": "2", "state": "online", "interval_ms": 1000}, 14.0)
    assert table.peers["2"].state == "healthy"


def test_a_load_report_changes_only_the_load_of_a_peer_heard_before():
    table = _table(discover=True)
    report = {"node": "2", "state": "online", "report": "load", "in_flight": 8, "queued": 0, "capacity": 8,
              "load": 1.0, "rest": {"ip": "10.9.9.9", "port": 1, "endpoint": "x"}, "flows": ["forged"]}
    assert table.heard(report, 1.0) is None and table.peers["2"].state == "unknown"  # its whole status comes first
    assert table.heard({**report, "node": "9"}, 1.0) is None and "9" not in table.peers  # not a peer: no discovery
    table.heard({"node": "2", "state": "online", "in_flight": 0, "queued": 0, "capacity": 8, "interval_ms": 5000,
                 "flows": ["1"]}, 2.0)
    assert table.peers["2"].load == 0
    table.heard(report, 3.0)
    peer = table.peers["2"]
    assert peer.load == 1.0 and peer.status["flows"] == ["1"] and "rest" not in peer.status  # only the load moves
    assert table.tick(3.0 + 14.9) == [] and [p.id for p in table.tick(3.0 + 15.1)] == ["2"]  # 3 heartbeats of 5 s
    table.heard(report, 20.0)  # a report from a silent peer: it is alive
    assert table.peers["2"].state == "healthy"


def test_offline_failed_own_and_unknown_statuses():
    table = _table()
    table.heard({"node": "3", "state": "offline", "reason": "stopped"}, 1.0)
    assert table.peers["3"].state == "offline" and table.peers["3"].reason == "stopped" and not table.usable("3")
    assert table.heard({"node": "1", "state": "online"}, 1.0) is None  # its own
    assert table.heard({"node": "9", "state": "online"}, 1.0) is None and "9" not in table.peers  # not discovering
    table.forward_failed("2", "timeout", 5.0)
    assert table.peers["2"].state == "failed" and not table.usable("2")
    table.tick(5.0 + table.retry_s + 0.1)  # a peer that publishes no status is tried again later
    assert table.usable("2")
    table.heard({"node": "2", "state": "online"}, 20.0)
    table.forward_failed("2", "reset", 21.0)
    table.tick(21.0 + table.retry_s + 0.1)
    assert table.peers["2"].state == "failed"  # one that publishes waits until it is heard from again
    table.heard({"node": "2", "state": "online"}, 30.0)
    assert table.usable("2")


def test_discovered_peers_are_reached_at_the_address_they_announce():
    table = _table(discover=True)
    peer = table.heard({"node": "9", "state": "online", "rest": {"ip": "127.0.0.1", "port": 7009, "endpoint": "/startrm"}}, 1.0)
    assert peer is not None and not peer.configured
    assert peer.address is not None and peer.address.url == "http://127.0.0.1:7009/startrm"
    assert [p.id for p in table.healthy()] == ["9"]


# ----- statuses over the broker ------------------------------------------------------------------------
# ----- statuses are input, not trust -----------------------------------------------------------
def test_a_status_is_kept_only_as_checked_values():
    table = _table(discover=True)
    deep: object = "x"
    for _ in range(300):
        deep = [deep]
    peer = table.heard({"node": "2", "state": "online", "flows": deep, "extra": {"a": deep}, "in_flight": 1e300,
                        "capacity": 4, "reason": "r" * 10_000}, 1.0)
    assert peer is not None and set(peer.status) == {"node", "state", "capacity"}
    json.dumps(table.to_dict(2.0))  # nothing deep reaches /status


def test_a_peer_is_reached_only_on_its_documented_topic_whatever_a_status_announces():
    nodes = {i: PeerAddress(i, "http", "127.0.0.1", 5000 + int(i), "startrm") for i in ("1", "2")}
    table = PeerTable("1", nodes, 1.0, discover=False, topic="component_msg")
    table.heard({"node": "2", "state": "online", "mqtt_topic": "attacker/inbox"}, 1.0)
    assert table.peers["2"].mqtt_topic is None  # a forged status steers nothing
    table.heard({"node": "2", "state": "online", "mqtt_topic": "component_msg/node/2",
                 "rest": {"ip": "10.6.6.6", "port": 1, "endpoint": "x"}}, 2.0)
    assert table.peers["2"].mqtt_topic == "component_msg/node/2"
    assert table.peers["2"].address is not None and table.peers["2"].address.url == "http://127.0.0.1:5002/startrm"


def test_fake_node_ids_leave_the_table_bounded_and_silent_discovered_peers_are_forgotten():
    from runtime_manager.cluster.peers import FORGET_AFTER_INTERVALS, MAX_DISCOVERED

    table = _table(discover=True)
    for i in range(10_000):
        table.heard({"node": f"fake-{i}", "state": "online", "rest": {"ip": "127.0.0.1", "port": 7000}}, 1.0)
    assert len(table.peers) == 2 + MAX_DISCOVERED
    table.heard({"node": "2", "state": "online"}, 1.0 + FORGET_AFTER_INTERVALS)
    table.tick(1.0 + FORGET_AFTER_INTERVALS + 0.5)
    assert set(table.peers) == {"2", "3"}  # the configured ones stay


def test_a_peer_id_that_is_a_digit_but_no_number_does_not_break_the_lb_answer():
    from conftest import SHIPPED

    from runtime_manager.cluster.placement import Placer
    from runtime_manager.config import load_config
    from runtime_manager.http.client import HttpClient

    table = _table(discover=True)
    table.heard({"node": "²", "state": "online", "capacity": 4, "rest": {"ip": "127.0.0.1", "port": 7000}}, 1.0)
    placer = Placer(load_config(SHIPPED), HttpClient(), table)
    assert placer.lb_answer(home_load=1.0)["id_node"] == "²"


def test_a_peer_that_never_answers_is_marked_failed_and_the_request_runs_at_home_in_time(
        tmp_path, broker, mock, processes):
    """The load balancer names a peer that takes connections and never answers
    (its timeout_s 30 s): the forward gets the request's time less a margin, the
    peer is marked failed, the request runs at home within task_timeout_ms."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        port = free_port()
        nodes = {"2": peer_entry("2", silent.getsockname()[1], timeout_s=30)}
        cfg = write_config(tmp_path / "cfg", mock.port, broker.port, rest_port=port, flows=FLOWS, nodes=nodes,
                           components=slow_component(mock), runtime={"node_id": "1", "task_timeout_ms": 3000})
        processes.append(RmProcess("serve", cfg).start())
        mock.lb_answer = 2
        started = time.monotonic()
        res = post(port, {"id_flow": "1", "payload": "p"}, timeout=10)
        took = time.monotonic() - started
        assert res["status"] == "ok" and res["node"] == "1", res
        assert res["placement"]["chosen"] == "home" and "no answer within" in res["placement"]["reason"]
        assert took < 3.0, took
        assert peer_state(port, "2") == "failed"
    finally:
        silent.close()
        mock.lb_answer = None


def test_statuses_are_retained_and_a_killed_node_goes_offline_by_its_will(tmp_path, broker, mock, processes):
    (_, port1, cfg1), (_, port2, cfg2) = group(tmp_path, broker, mock, 2)
    prefix = json.loads((cfg1 / "runtime.conf").read_text())["status_prefix"]
    n1 = RmProcess("serve", cfg1).start()
    n2 = RmProcess("serve", cfg2).start()
    processes += [n1, n2]
    wait_for(lambda: peer_state(port1, "2") == "healthy" and peer_state(port2, "1") == "healthy", 10, "peers healthy")
    # a fresh subscriber sees the group at once (retained), with what a peer needs
    probe = MqttProbe(broker.port, (f"{prefix}/+",))
    try:
        msgs = probe.wait_messages(2, 5)
        docs = {json.loads(p)["node"]: json.loads(p) for _, p in msgs}
        assert set(docs) == {"1", "2"}
        doc = docs["2"]
        assert doc["state"] == "online" and doc["rest"]["port"] == port2 and doc["capacity"] == 4
        assert doc["mqtt_topic"] == "component_msg/node/2" and "1" in doc["flows"] and doc["interval_ms"] == 1000  # the heartbeat (default group)
        for key in ("in_flight", "queued", "cpu_percent", "rss_mb", "uptime_s", "version"):
            assert key in doc
        n2.stop(signal.SIGKILL)  # no clean stop: the broker publishes its will
        wait_for(lambda: peer_state(port1, "2") in ("offline", "silent"), 40, "node 2 seen gone")
        wait_for(lambda: any(json.loads(p).get("state") == "offline" for _, p in probe.messages[2:]), 40, "the will")
    finally:
        probe.close()


def test_groups_hear_their_own_and_say_only_what_changed(tmp_path, broker, mock, processes):
    """Two nodes of group `a`, one of `b`, on one broker: each hears its own
    group; idle nodes send a whole status per heartbeat, not one per interval;
    a load change goes out as a small report that is not retained."""
    mock.slow_ms = 2500
    prefix = f"rm/nodes-{uuid.uuid4().hex[:6]}"
    nodes = group(tmp_path, broker, mock, 3, prefix=prefix, runtime={"status_interval_ms": 100,
                                                                       "status_heartbeat_ms": 2000})
    for (_, _, cfg), grp in zip(nodes, ("a", "a", "b"), strict=True):
        runtime = json.loads((cfg / "runtime.conf").read_text())
        (cfg / "runtime.conf").write_text(json.dumps({**runtime, "group": grp}))
    ports = [p for _, p, _ in nodes]
    processes += [RmProcess("serve", cfg).start() for _, _, cfg in nodes]
    wait_for(lambda: peer_state(ports[0], "2") == "healthy" and peer_state(ports[1], "1") == "healthy", 10,
             "the group a")
    time.sleep(1.5)
    assert peer_state(ports[0], "3") == "unknown" and peer_state(ports[2], "1") == "unknown"  # another group
    realm = MqttProbe(broker.port, (f"{prefix}/+", f"{prefix}/group/+/+"))  # a tool: the whole realm, on demand
    try:
        realm.wait_messages(3, 5)
        topics = {t for t, _ in realm.messages[:3]}
        assert topics == {f"{prefix}/group/a/1", f"{prefix}/group/a/2", f"{prefix}/group/b/3"}
        assert {json.loads(p)["group"] for _, p in realm.messages[:3]} == {"a", "b"}
        # idle for 4 s: a whole status every 2 s each (not one per status_interval_ms of 100)
        start = len(realm.messages)
        time.sleep(4.0)
        idle = [json.loads(p) for t, p in realm.messages[start:] if t.endswith("/a/1")]
        assert 1 <= len(idle) <= 3 and not any(d.get("report") for d in idle), idle
        # node 1 gets busy: a small load report, at once, and node 2's placement sees it
        busy = [threading.Thread(target=post, args=(ports[0], {"id_flow": "slow", "is_load_balancing": True}))
                for _ in range(4)]
        mark = len(realm.messages)
        for t in busy:
            t.start()
        wait_for(lambda: next(p for p in status(ports[1])["placement"]["peers"] if p["id"] == "1")["load"] >= 0.75,
                 1.5, "node 2 to see node 1's load")
        time.sleep(0.3)
        reports = [json.loads(p) for t, p in realm.messages[mark:] if t.endswith("/a/1")]
        assert any(r.get("report") == "load" and r["load"] > 0 for r in reports), \
            [(r.get("report"), r.get("load"), r.get("ready"), r.get("time")) for r in reports]
        assert all(len(json.dumps(r)) < 200 for r in reports if r.get("report"))
        for t in busy:
            t.join(30)
    finally:
        realm.close()
    # what is retained is the whole status, never a report
    late = MqttProbe(broker.port, (f"{prefix}/group/a/+",))
    try:
        retained = [json.loads(p) for _, p in late.wait_messages(2, 5)]
        assert all("report" not in d and "rest" in d for d in retained)
    finally:
        late.close()


def test_a_stopped_node_is_seen_gone_by_its_will_within_its_keepalive(tmp_path, broker, mock, processes):
    """A node frozen with SIGSTOP sends nothing; the broker gives up on its
    presence link after its keepalive and publishes its will: its group sees
    it gone long before three of its (long) heartbeats."""
    nodes = group(tmp_path, broker, mock, 2, runtime={"status_heartbeat_ms": 30000, "presence_keepalive_s": 1})
    (_, port1, _), _ = nodes
    n1, n2 = (RmProcess("serve", cfg).start() for _, _, cfg in nodes)
    processes += [n1, n2]
    wait_for(lambda: peer_state(port1, "2") == "healthy", 10, "node 2 healthy")
    n2.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        # 1.5 keepalives, then Mosquitto 2.0's next look at keepalives (every 6 s): 1.5 to 7.5 s here,
        # against 90 s for three heartbeats
        wait_for(lambda: peer_state(port1, "2") == "offline", 15, "node 2 seen gone")
        assert time.monotonic() - t0 < 10.0
        peer = next(p for p in status(port1)["placement"]["peers"] if p["id"] == "2")
        assert "will" in peer["reason"]
    finally:
        n2.proc.send_signal(signal.SIGCONT)
    # back: its presence link reconnects and says so
    wait_for(lambda: peer_state(port1, "2") == "healthy", 15, "node 2 back")


def test_a_clean_stop_says_offline_at_once(tmp_path, broker, mock, processes):
    (_, port1, cfg1), (_, _, cfg2) = group(tmp_path, broker, mock, 2)
    n1 = RmProcess("serve", cfg1).start()
    n2 = RmProcess("serve", cfg2).start()
    processes += [n1, n2]
    wait_for(lambda: peer_state(port1, "2") == "healthy", 10, "node 2 healthy")
    assert n2.stop() == 0
    wait_for(lambda: peer_state(port1, "2") == "offline", 5, "node 2 offline")
    peer = next(p for p in status(port1)["placement"]["peers"] if p["id"] == "2")
    assert peer["reason"] == "stopped"


# ----- placement over the group ------------------------------------------------------------------------
def test_least_loaded_spreads_over_healthy_peers_and_avoids_the_busy_one(tmp_path, broker, mock, processes):
    mock.slow_ms = 1500
    nodes = group(tmp_path, broker, mock, 3)
    procs = [RmProcess("serve", cfg).start() for _, _, cfg in nodes]
    processes += procs
    port1, _port2, port3 = (p for _, p, _ in nodes)
    wait_for(lambda: {peer_state(port1, "2"), peer_state(port1, "3")} == {"healthy"}, 10, "peers healthy")
    # node 3 is kept busy: 12 slow flows run there (placed already, so they stay)
    busy = [threading.Thread(target=post, args=(port3, {"id_flow": "slow", "is_load_balancing": True})) for _ in range(12)]
    for t in busy:
        t.start()
    wait_for(lambda: next(p for p in status(port1)["placement"]["peers"] if p["id"] == "3")["load"] >= 1, 5,
             "node 1 to see node 3 busy")
    # 10 slow flows at node 1 (4 workers): home first, then node 2, never node 3
    results: list[dict] = []
    sent = [threading.Thread(target=lambda: results.append(post(port1, {"id_flow": "slow"}))) for _ in range(10)]
    for t in sent:
        t.start()
        time.sleep(0.05)
    for t in sent + busy:
        t.join(30)
    where = [r["node"] for r in results]
    assert len(results) == 10 and all(r["status"] == "ok" for r in results), results
    assert "3" not in where and "1" in where and "2" in where, [(r["node"], r["placement"]["reason"]) for r in results]
    forwarded = [r["placement"] for r in results if r["node"] == "2"]
    assert all(p["asked"] == "least_loaded" and p["chosen"] == "node 2" for p in forwarded)


def test_a_peer_killed_mid_run_its_work_goes_elsewhere_and_every_request_gets_one_result(
        tmp_path, broker, mock, processes):
    mock.delay_ms = 50
    (_, port1, cfg1), (_, _port2, cfg2) = group(tmp_path, broker, mock, 2, policy="round_robin")
    n1 = RmProcess("serve", cfg1).start()
    n2 = RmProcess("serve", cfg2).start()
    processes += [n1, n2]
    wait_for(lambda: peer_state(port1, "2") == "healthy", 10, "node 2 healthy")
    probe = MqttProbe(broker.port, ("component_msg/result",))
    try:
        rids = [f"kill-{uuid.uuid4().hex}" for _ in range(40)]
        for i, rid in enumerate(rids):
            probe.publish({"id_flow": "1", "payload": i, "request_id": rid}, "component_msg/node/1")
            if i == 15:
                n2.stop(signal.SIGKILL)
            time.sleep(0.03)
        for rid in rids:
            probe.wait_result(rid, 30)
        time.sleep(0.5)  # room for a duplicate to show up
        assert all(len(probe.results[rid]) == 1 for rid in rids)
        results = [probe.results[rid][0] for rid in rids]
        assert all(r["status"] == "ok" for r in results), [r for r in results if r["status"] != "ok"]
        assert {r["node"] for r in results[:12]} == {"1", "2"}  # round robin while both lived
        assert all(r["node"] == "1" for r in results[25:])  # then only home
        assert peer_state(port1, "2") in ("offline", "failed", "silent")
    finally:
        probe.close()


def test_failover_tries_the_next_peer_then_home_and_says_so(tmp_path, broker, mock, processes):
    """The load balancer names a peer that is down: the next healthy peer runs it."""
    mock.lb_answer = 3
    nodes = group(tmp_path, broker, mock, 3, policy="external", protocol="http", ip="127.0.0.1", port=mock.port,
                  endpoint="LB/id_node")
    (_, port1, cfg1), (_, _port2, cfg2), (_, _port3, _) = nodes  # node 3 never runs
    n1 = RmProcess("serve", cfg1).start()
    n2 = RmProcess("serve", cfg2).start()
    processes += [n1, n2]
    wait_for(lambda: peer_state(port1, "2") == "healthy", 10, "node 2 healthy")
    res = post(port1, {"id_flow": "1", "payload": "x"})
    assert res["status"] == "ok" and res["node"] == "2"
    placement = res["placement"]
    assert placement["asked"] == "lb" and placement["chosen"] == "node 2"
    assert len(placement["tried"]) == 1 and placement["tried"][0].startswith("node 3: is down")
    assert peer_state(port1, "3") == "failed"
    n2.stop(signal.SIGKILL)
    wait_for(lambda: peer_state(port1, "2") != "healthy", 40, "node 2 gone")
    res = post(port1, {"id_flow": "1", "payload": "y"})
    assert res["status"] == "ok" and res["node"] == "1" and res["placement"]["chosen"] == "home"
    assert [t.split(":")[0] for t in res["placement"]["tried"]] == ["node 3"]


def test_a_node_is_the_load_balancer_of_an_original_style_node(tmp_path, broker, mock, processes):
    """Node 2 speaks only the original protocol (policy external); node 1 answers
    its GET /lb/id_node from its view of the group."""
    mock.slow_ms = 1500
    (_, port1, cfg1), (_, port2, cfg2) = group(tmp_path, broker, mock, 2)
    lb = {"protocol": "http", "ip": "127.0.0.1", "port": port1, "endpoint": "lb/id_node"}
    (cfg2 / "load_balancer.conf").write_text(json.dumps(lb))
    n1 = RmProcess("serve", cfg1).start()
    n2 = RmProcess("serve", cfg2).start()
    processes += [n1, n2]
    wait_for(lambda: peer_state(port1, "2") == "healthy", 10, "node 2 healthy")
    answer = requests.get(f"http://127.0.0.1:{port1}/lb/id_node", timeout=5).json()
    assert answer["id_node"] == 1 and answer["policy"] == "least_loaded"  # idle: ties go home
    res = post(port2, {"id_flow": "1", "payload": "p"})
    assert res["node"] == "1" and res["placement"] == {"asked": "lb", "chosen": "node 1", "reason": "load balancer said 1"}
    busy = [threading.Thread(target=post, args=(port1, {"id_flow": "slow", "is_load_balancing": True})) for _ in range(8)]
    for t in busy:
        t.start()
    wait_for(lambda: requests.get(f"http://127.0.0.1:{port1}/lb/id_node", timeout=5).json()["id_node"] == 2, 5,
             "node 1 to name node 2 while busy")
    res = post(port2, {"id_flow": "1", "payload": "q"})
    assert res["node"] == "2" and res["placement"]["chosen"] == "home"
    for t in busy:
        t.join(30)


# ----- MQTT 5 request/response and forwarding over MQTT -------------------------------------------------
def test_an_mqtt5_request_is_answered_on_its_response_topic_with_its_correlation_data(tmp_path, broker, mock, processes):
    (_, _port1, cfg1), = group(tmp_path, broker, mock, 1)
    processes.append(RmProcess("serve", cfg1).start())
    answers = f"answers/{uuid.uuid4().hex}"
    probe = MqttProbe(broker.port, (answers,))
    got: list[mqtt.MQTTMessage] = []
    probe.client.on_message = lambda _c, _u, msg: got.append(msg)
    try:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = answers
        props.CorrelationData = b"\x00corr-42"
        probe.client.publish("component_msg", json.dumps({"id_flow": "1", "payload": "v5"}), qos=1,
                             properties=props).wait_for_publish(5)
        wait_for(lambda: got, 10, "the answer on the response topic")
        msg = got[0]
        assert msg.topic == answers and msg.properties.CorrelationData == b"\x00corr-42"
        body = json.loads(msg.payload)
        assert body["status"] == "ok" and body["node"] == "1"
        # a bad response topic is a bad request, answered on the result topic
        props.ResponseTopic = "bad/+/topic"
        probe.client.subscribe("component_msg/result", qos=1)
        time.sleep(0.3)
        probe.client.publish("component_msg", json.dumps({"id_flow": "1"}), qos=1, properties=props).wait_for_publish(5)
        wait_for(lambda: len(got) > 1, 10, "the error")
        err = json.loads(got[1].payload)
        assert got[1].topic == "component_msg/result" and err["error"]["code"] == "bad_request"
        assert "Response Topic" in err["error"]["message"] and got[1].properties.CorrelationData == b"\x00corr-42"
    finally:
        probe.close()


def test_forwarding_over_mqtt_to_a_peers_own_topic(tmp_path, broker, mock, processes):
    (_, port1, cfg1), (_, port2, cfg2) = group(tmp_path, broker, mock, 2, policy="round_robin",
                                                peer_extra={"forward": "mqtt"})
    n1 = RmProcess("serve", cfg1).start()
    n2 = RmProcess("serve", cfg2).start()
    processes += [n1, n2]
    wait_for(lambda: peer_state(port1, "2") == "healthy", 10, "node 2 healthy")
    results = [post(port1, {"id_flow": "1", "payload": i}) for i in range(4)]
    assert [r["node"] for r in results].count("2") == 2 and all(r["status"] == "ok" for r in results)
    counts = status(port2)["by_entrypoint"]
    assert counts.get("mqtt") == 2 and not counts.get("rest")  # reached over MQTT, not REST


# ----- nothing run twice -------------------------------------------------------------------------------
def test_a_redelivered_request_is_answered_from_the_dedupe_window(tmp_path, broker, mock, processes):
    (_, _port1, cfg1), = group(tmp_path, broker, mock, 1, policy="local")
    processes.append(RmProcess("serve", cfg1).start())
    probe = MqttProbe(broker.port, ("component_msg/result",))
    try:
        rid = f"dup-{uuid.uuid4().hex}"
        first = probe.request("1", "once", request_id=rid)
        calls = mock.calls["endpoint1"]
        probe.publish({"id_flow": "1", "payload": "once", "request_id": rid})
        probe.wait_messages(2, 10)
        assert mock.calls["endpoint1"] == calls  # not run again
        assert probe.results[rid][1] == first
        # while the first copy still runs: acknowledged with its one result
        mock.slow_ms = 800
        rid2 = f"dup-{uuid.uuid4().hex}"
        for _ in range(2):
            probe.publish({"id_flow": "slow", "request_id": rid2})
        probe.wait_result(rid2, 10)
        time.sleep(1.0)
        assert len(probe.results[rid2]) == 1 and mock.calls["slow"] == 1
    finally:
        probe.close()


def test_a_request_id_reused_with_another_body_is_run_never_answered_with_another_clients_result(
        tmp_path, broker, mock, processes):
    """Client B sends client A's request_id on the same result topic with its own
    payload: B's request runs and B gets its own result, not A's (A's payload)."""
    (_, _port1, cfg1), = group(tmp_path, broker, mock, 1, policy="local")
    processes.append(RmProcess("serve", cfg1).start())
    alice, bob = MqttProbe(broker.port, ("component_msg/result",)), MqttProbe(broker.port, ("component_msg/result",))
    try:
        rid = f"shared-{uuid.uuid4().hex}"
        first = alice.request("1", "alice's secret", request_id=rid)
        calls = mock.calls["endpoint1"]
        bob.publish({"id_flow": "1", "payload": "bob's own", "request_id": rid})
        wait_for(lambda: any("bob's own" in json.dumps(r) for r in bob.results.get(rid, [])), 10, "bob's own result")
        assert mock.calls["endpoint1"] == calls + 1  # run, as the request it is
        assert not any("alice's secret" in json.dumps(r) for r in bob.results[rid] if r != first)
        assert all("alice's secret" not in json.dumps(r) for r in bob.results[rid] if "bob's own" in json.dumps(r))
    finally:
        alice.close()
        bob.close()


@pytest.mark.parametrize("window", [0])
def test_the_dedupe_window_can_be_off(tmp_path, broker, mock, processes, window):
    (_, _, cfg1), = group(tmp_path, broker, mock, 1, policy="local", runtime={"dedupe_window": window})
    processes.append(RmProcess("serve", cfg1).start())
    probe = MqttProbe(broker.port, ("component_msg/result",))
    try:
        rid = f"dup-{uuid.uuid4().hex}"
        probe.request("1", "twice", request_id=rid)
        probe.publish({"id_flow": "1", "payload": "twice", "request_id": rid})
        probe.wait_messages(2, 10)
        assert mock.calls["endpoint1"] == 2
    finally:
        probe.close()


# ----- serve --processes ----------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []


def test_serve_processes_shares_one_subscription_and_one_port_and_restarts_a_killed_worker(
        tmp_path, broker, mock, processes):
    """SIGKILL of one worker in the middle of a 1,000-request QoS 1 burst: every
    request is answered (the broker keeps what the dead worker had taken in its
    session and hands it over when the worker is back with the same client id)."""
    mock.delay_ms = 5
    (_, port, cfg), = group(tmp_path, broker, mock, 1, policy="local", runtime={"workers": 8})
    sup = RmProcess("serve", cfg, "--processes", "2").start(ready=None)
    processes.append(sup)
    wait_for(lambda: len(_children(sup.proc.pid)) == 2 and sup.log().count("engine started") == 2, 30, "two workers")
    # one REST port, both workers behind it
    pids = {requests.get(f"http://127.0.0.1:{port}/status", timeout=5, headers={"Connection": "close"}).json()["pid"]
            for _ in range(40)}
    assert pids == set(_children(sup.proc.pid))
    probe = MqttProbe(broker.port, ("component_msg/result",))
    try:
        wait_for(lambda: sup.log().count("'$share/rm-1/component_msg'") >= 2, 10, "shared subscriptions")
        rids = [f"burst-{i}-{uuid.uuid4().hex[:6]}" for i in range(1000)]
        victim = _children(sup.proc.pid)[1]
        for i, rid in enumerate(rids):
            probe.client.publish("component_msg", json.dumps({"id_flow": "1", "payload": i, "request_id": rid}), qos=1)
            if i == 400:
                wait_for(lambda: len(probe.results) >= 100, 20, "the burst under way")
                import os
                os.kill(victim, signal.SIGKILL)
        wait_for(lambda: all(r in probe.results for r in rids), 90, "every request answered")
        assert all(probe.results[r][0]["status"] == "ok" for r in rids)
        wait_for(lambda: len(_children(sup.proc.pid)) == 2 and victim not in _children(sup.proc.pid), 20,
                 "the worker started again")
        assert "starting it again" in sup.log()
        assert "connected (session present: True)" in sup.log()  # back on its session
        # the restarted member rejoins the group: it takes requests again
        more = [f"after-{i}-{uuid.uuid4().hex[:6]}" for i in range(40)]
        for rid in more:
            probe.client.publish("component_msg", json.dumps({"id_flow": "1", "request_id": rid}), qos=1)
        wait_for(lambda: all(r in probe.results for r in more), 30, "requests after the restart")

        def accepted_by_each() -> dict[int, int]:
            seen: dict[int, int] = {}
            for _ in range(40):
                st = requests.get(f"http://127.0.0.1:{port}/status", timeout=5, headers={"Connection": "close"}).json()
                seen[st["pid"]] = st["by_entrypoint"].get("mqtt", 0)
            return seen

        counts = accepted_by_each()
        assert set(counts) == set(_children(sup.proc.pid)) and all(n > 0 for n in counts.values()), counts
    finally:
        probe.close()
    assert sup.stop() == 0
    assert _children_gone(sup)


def _children_gone(sup: RmProcess) -> bool:
    return "all workers stopped (exit codes [0, 0])" in sup.log()


def test_a_second_process_with_a_running_node_id_stops_and_leaves_the_first_alone(tmp_path, broker, mock, processes):
    """Two processes with one node id share MQTT client ids and would throw each
    other off the broker: the newcomer sees the running node's status first and
    stops with one message; the running node keeps its one connection. A node
    killed a moment ago (its retained status still says online) does not stop
    its own restart."""
    (i, port, cfg), = group(tmp_path, broker, mock, 1)
    first = RmProcess("serve", cfg).start()
    processes.append(first)
    wait_for(lambda: status(port)["mqtt"]["connected"], 10, "the first node connected")
    pid = first.proc.pid
    second = RmProcess("serve", cfg, "--port", str(free_port())).start(ready=None)
    processes.append(second)
    assert second.proc.wait(20) == 1
    refused = [line for line in second.log().splitlines() if "already running" in line]
    assert len(refused) == 1 and f"node id {i} is already running: process {pid}" in refused[0], second.log()
    mine = status(port)
    assert mine["mqtt"]["connections"] == 1 and mine["mqtt"]["connected"]  # never thrown off
    assert requests.post(f"http://127.0.0.1:{port}/startrm", json={"id_flow": "1", "payload": 1}, timeout=10).ok
    first.stop(signal.SIGKILL)
    again = RmProcess("serve", cfg).start(ready=None)  # at once: its retained status says online, but nobody publishes it
    processes.append(again)

    def connected() -> bool:
        try:
            return status(port)["mqtt"]["connected"]
        except requests.ConnectionError:
            return False  # not listening yet

    wait_for(connected, 15, "the restarted node connected")
    assert again.proc.poll() is None


# ----- a member that dies and does not come back ------------------------------------------------------
def shared_group(tmp_path, broker, mock, processes) -> tuple[str, list[Path], list[RmProcess], MqttProbe]:
    """Three `serve` nodes on one shared subscription of a topic of their own,
    subscribed and heard all round: (topic, their configs, the nodes, a probe)."""
    prefix = f"rm/nodes-{uuid.uuid4().hex[:6]}"
    topic = f"group-{uuid.uuid4().hex[:6]}"
    cfgs = [write_config(tmp_path / f"node{i}", mock.port, broker.port, topic=topic, flows=FLOWS, lb={"policy": "local"},
                         components=slow_component(mock), comm={"mqtt": {"shared_group": "group"}},
                         runtime={"node_id": i, "status_interval_ms": INTERVAL_MS, "status_prefix": prefix, "workers": 4})
            for i in ("1", "2", "3")]
    nodes = [RmProcess("serve", cfg).start() for cfg in cfgs]
    processes += nodes
    wait_for(lambda: all("subscribing to" in n.log() for n in nodes), 20, "three members subscribed")
    time.sleep(3 * INTERVAL_MS / 1000)  # statuses heard all round
    return topic, cfgs, nodes, MqttProbe(broker.port, (f"{topic}/result",))


def send(probe: MqttProbe, topic: str, label: str, n: int) -> list[str]:
    """`n` requests of flow 1 at 50 a second; their request ids."""
    rids = [f"{label}-{k}-{uuid.uuid4().hex[:6]}" for k in range(n)]
    for rid in rids:
        probe.publish({"id_flow": "1", "payload": rid, "request_id": rid}, topic=topic)
        time.sleep(0.02)
    return rids


def test_a_killed_member_that_never_returns_its_share_is_answered_by_the_survivors(tmp_path, broker, mock, processes):
    """Three nodes on one shared subscription, a steady stream of QoS 1 requests;
    node 3 is SIGKILLed and never restarted. The broker keeps choosing its
    session; node 1 (the lowest live id) takes the session over, runs what it
    held, and ends it: every request is answered once, within seconds."""
    topic, _cfgs, nodes, probe = shared_group(tmp_path, broker, mock, processes)
    try:
        def burst(label: str, n: int) -> list[str]:
            return send(probe, topic, label, n)

        before = burst("before", 30)
        wait_for(lambda: all(r in probe.results for r in before), 20, "the first burst answered")
        assert {str(probe.results[r][0]["node"]) for r in before} == {"1", "2", "3"}  # all three took their share
        nodes[2].stop(signal.SIGKILL)  # between bursts: nothing of node 3's in flight
        killed = time.monotonic()
        after = burst("after", 60)
        wait_for(lambda: all(r in probe.results for r in after), 20, "every request after the kill answered")
        took = time.monotonic() - killed
        time.sleep(0.5)  # a second result would come by now
        assert all(len(probe.results[r]) == 1 for r in after)  # answered once
        assert {str(probe.results[r][0]["node"]) for r in after} <= {"1", "2"}
        assert took < 10, took
        wait_for(lambda: "took over node 3's session" in nodes[0].log(), 10, "the takeover done")
        assert "the session ended" in nodes[0].log()
        port1 = json.loads((tmp_path / "node1" / "comm.conf").read_text())["rest"]["port"]
        done = status(port1)["placement"]["takeovers"]["node 3"]
        assert done["ended"] is True and done["requests"] >= 1
        assert "took over" not in nodes[1].log()  # one survivor does it
        # the session is gone: new requests go to the two live members only, at once
        again = burst("again", 20)
        wait_for(lambda: all(r in probe.results for r in again), 5, "requests after the takeover answered at once")
    finally:
        probe.close()


def test_a_stopped_worker_is_killed_and_started_again_and_what_it_held_is_answered(tmp_path, broker, mock, processes):
    """`kill -STOP` on one worker of `serve --processes 2`: its event loop's
    heartbeat stops, the supervisor kills it within its bound and starts it
    again; the requests the broker had given it are answered after all."""
    import os

    from runtime_manager.supervisor import SILENT_S

    # a topic of its own: the sessions that other tests' workers left on the broker (a
    # node's workers share `rm-<node id>`) would take their share of these requests
    topic = f"stopped-{uuid.uuid4().hex[:6]}"
    (_, _port, cfg), = group(tmp_path, broker, mock, 1, policy="local", runtime={"workers": 4}, topic=topic)
    sup = RmProcess("serve", cfg, "--processes", "2").start(ready=None)
    processes.append(sup)
    wait_for(lambda: len(_children(sup.proc.pid)) == 2 and sup.log().count("engine started") == 2, 30, "two workers")
    probe = MqttProbe(broker.port, (f"{topic}/result",))
    try:
        wait_for(lambda: sup.log().count(f"'$share/rm-1/{topic}'") >= 2, 10, "shared subscriptions")
        victim = _children(sup.proc.pid)[1]
        os.kill(victim, signal.SIGSTOP)
        stopped = time.monotonic()
        rids = [f"stopped-{i}-{uuid.uuid4().hex[:6]}" for i in range(40)]
        for i, rid in enumerate(rids):
            probe.client.publish(topic, json.dumps({"id_flow": "1", "payload": i, "request_id": rid}), qos=1)
        wait_for(lambda: all(r in probe.results for r in rids), SILENT_S + 20, "every request answered")
        assert time.monotonic() - stopped < SILENT_S + 20
        assert "silent for" in sup.log() and victim not in _children(sup.proc.pid)
        assert all(probe.results[r][0]["status"] == "ok" for r in rids)
    finally:
        probe.close()


def test_a_member_that_returns_during_the_takeover_loses_nothing(tmp_path, broker, mock, processes):
    """Node 3 is killed with requests flowing and started again as soon as node 1
    begins to take its session over: whoever holds the session when, every
    request is answered (at least once)."""
    topic, cfgs, nodes, probe = shared_group(tmp_path, broker, mock, processes)
    rids: list[str] = []
    try:
        def stream() -> None:
            rids.extend(send(probe, topic, "returns", 150))

        sender = threading.Thread(target=stream)
        sender.start()
        time.sleep(0.5)
        nodes[2].stop(signal.SIGKILL)
        wait_for(lambda: "taking over its session" in nodes[0].log(), 10, "the takeover begun")
        back = RmProcess("serve", cfgs[2]).start(ready=None)  # at once: it throws the survivor off its session
        processes.append(back)
        sender.join(20)
        wait_for(lambda: all(r in probe.results for r in rids), 30, "every request answered")
        assert all(probe.results[r][0]["status"] == "ok" for r in rids)
    finally:
        probe.close()


def test_a_worker_that_cannot_be_started_again_its_session_is_taken_over_by_the_first(
        tmp_path, broker, mock, processes):
    """One worker of `serve --processes 2` is killed and cannot start again (its
    configuration broke meanwhile): the supervisor keeps trying, and the first
    worker takes the silent worker's session over, so its share is answered."""
    import os

    topic = f"sibling-{uuid.uuid4().hex[:6]}"
    (_, _port, cfg), = group(tmp_path, broker, mock, 1, policy="local", runtime={"workers": 4}, topic=topic)
    sup = RmProcess("serve", cfg, "--processes", "2").start(ready=None)
    processes.append(sup)
    wait_for(lambda: len(_children(sup.proc.pid)) == 2 and sup.log().count("engine started") == 2, 30, "two workers")
    probe = MqttProbe(broker.port, (f"{topic}/result",))
    try:
        wait_for(lambda: sup.log().count(f"'$share/rm-1/{topic}'") >= 2, 10, "shared subscriptions")
        (cfg / "flows.conf").write_text("broken\nTO nowhere 1\nGET\n")  # a restarted worker will not start
        os.kill(_children(sup.proc.pid)[1], signal.SIGKILL)
        killed = time.monotonic()
        rids = [f"sibling-{i}-{uuid.uuid4().hex[:6]}" for i in range(40)]
        for i, rid in enumerate(rids):
            probe.client.publish(topic, json.dumps({"id_flow": "1", "payload": i, "request_id": rid}), qos=1)
        wait_for(lambda: all(r in probe.results for r in rids), 40, "every request answered")
        assert time.monotonic() - killed < 30
        assert "worker 1 is gone: taking over its session" in sup.log()
    finally:
        probe.close()


def test_a_stopped_node_its_share_is_taken_over_and_it_rejoins_when_it_resumes(tmp_path, broker, mock, processes):
    """`kill -STOP` on a whole node with requests flowing: its statuses stop, a
    survivor takes its session over after three intervals; `kill -CONT` five
    seconds later: it rejoins without taking anyone's session for its own
    silence. Every request is answered (those the stopped node had already
    read may be answered twice: at least once)."""
    import os

    topic, _cfgs, nodes, probe = shared_group(tmp_path, broker, mock, processes)
    rids: list[str] = []
    try:
        def stream() -> None:
            rids.extend(send(probe, topic, "stop", 300))

        sender = threading.Thread(target=stream)
        sender.start()
        time.sleep(1.0)
        os.kill(nodes[2].proc.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: "took over node 3's session" in nodes[0].log(), 10, "the takeover")
            time.sleep(2.0)
        finally:
            os.kill(nodes[2].proc.pid, signal.SIGCONT)
        sender.join(30)
        wait_for(lambda: all(r in probe.results for r in rids), 30, "every request answered")
        wait_for(lambda: "the event loop was held for" in nodes[2].log(), 10, "node 3 running again")
        time.sleep(1.5)
        assert "taking over" not in nodes[2].log() and "left placement" not in nodes[2].log()
    finally:
        probe.close()
