"""Forwards in batches (core/forward_batch.py): the wire format, the forwarding
side in-process against a real Mosquitto and a test peer, and a real node taking
batches, honest and hostile."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
import requests
from conftest import Broker, RmProcess, write_config
from helpers import MqttProbe, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from test_cluster import group, peer_state, post, status
from test_metrics import samples

from runtime_manager.cluster.mqtt_forward import MqttForwarder
from runtime_manager.cluster.peers import Peer
from runtime_manager.config import MqttConfig
from runtime_manager.core.errors import BadRequest, TooLargeToForward
from runtime_manager.core.forward_batch import BATCH_PROPERTY, MAX_ITEMS, answers_body, batch_body, read_answers, read_batch
from runtime_manager.core.request import FlowRequest
from runtime_manager.mqtt.link import MqttLink

json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=8)


# ----- the wire format ---------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=6), json_values, max_size=4), min_size=1, max_size=MAX_ITEMS))
def test_a_batch_reads_back_as_the_requests_it_was_made_of(requests):
    bodies = [orjson.dumps(r) for r in requests]
    assert read_batch(batch_body(bodies), 1024 * 1024) == requests


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 63), st.dictionaries(st.text(max_size=6), json_values, max_size=4)), max_size=20))
def test_answers_read_back_as_the_pairs_they_were_made_of(pairs):
    body = answers_body([(i, orjson.dumps(r)) for i, r in pairs])
    assert read_answers(body, 64) == pairs


@pytest.mark.parametrize("payload, message", [
    (b"{not json", "not valid JSON"), (b'{"id_flow": "1"}', "non-empty JSON array"), (b"[]", "non-empty JSON array"),
    (orjson.dumps([{}] * (MAX_ITEMS + 1)), f"more than {MAX_ITEMS}"), (b"[" + b" " * 70_000 + b"]", "larger than"),
])
def test_what_is_not_a_batch_is_refused_with_a_reason(payload, message):
    with pytest.raises(BadRequest, match=message):
        read_batch(payload, 1000)


def test_answers_that_are_not_pairs_for_this_batch_are_left_out_and_one_object_answers_all():
    body = b'[[0, {"status": "ok"}], [7, {"status": "ok"}], [-1, {}], [1, "x"], [true, {}], [2], "junk", [1, {"a": 1}]]'
    assert read_answers(body, 3) == [(0, {"status": "ok"}), (1, {"a": 1})]
    assert read_answers(b'{"status": "error"}', 3) == {"status": "error"}
    for bad in (b"nope", b"3"):
        with pytest.raises(ValueError):
            read_answers(bad, 3)


# ----- forwarding in batches, in-process, against a test peer ---------------------------------------
class FakePeer:
    """A peer that is not a node: takes what is forwarded to `<topic>/node/2`
    and answers as the test says (`answer(message) -> [(payload, properties)]`)."""

    def __init__(self, port: int, topic: str) -> None:
        self.received: list[mqtt.MQTTMessage] = []
        self.answer = lambda msg: []
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"tp-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *a: c.subscribe(f"{topic}/node/2", qos=1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(10)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.received.append(msg)
        for payload, props in self.answer(msg):
            self.client.publish(msg.properties.ResponseTopic, payload, qos=1, properties=props)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _correlated(token: bytes) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = token
    return props


def _ok(item: dict) -> bytes:
    return orjson.dumps({"status": "ok", "request_id": item["request_id"], "results": [item["payload"]]})


def _peer(topic: str, batches: bool) -> Peer:
    status: dict[str, Any] = {"mqtt_topic": f"{topic}/node/2"}
    if batches:
        status["mqtt_batches"] = True
    return Peer("2", None, True, status=status, expected_topic=f"{topic}/node/2")


async def _with_forwarder(port: int, scenario: Any) -> None:
    topic = f"fb-{uuid.uuid4().hex[:6]}"
    link = MqttLink(MqttConfig(host="127.0.0.1", port=port, topic=topic), f"fwd-test-{topic}", max_backoff_s=0.5)
    forwarder = MqttForwarder(topic, "1", link)
    peer = FakePeer(port, topic)
    await link.setup()
    await link.start()
    try:
        assert await link.wait_connected(10)
        await asyncio.sleep(0.2)  # the answers subscription in place
        await scenario(forwarder, peer, topic)
    finally:
        peer.close()
        await forwarder.stop()
        await link.stop()


def _requests(n: int) -> list[FlowRequest]:
    return [FlowRequest("1", f"payload {i}", f"rid-{i}") for i in range(n)]


def test_forwards_taken_in_one_turn_travel_in_one_message_and_each_gets_its_own_answer(broker):
    """40 forwards at once: one message of 40; answered in two messages, out of
    order, the second half first: every forward gets the answer to its own request."""
    async def scenario(forwarder: MqttForwarder, peer: FakePeer, topic: str) -> None:
        def answer(msg: mqtt.MQTTMessage) -> list:
            items = orjson.loads(msg.payload)
            pairs = [(i, _ok(item)) for i, item in enumerate(items)][::-1]
            token = msg.properties.CorrelationData
            return [(answers_body(pairs[:15]), _correlated(token)), (answers_body(pairs[15:]), _correlated(token))]

        peer.answer = answer
        reqs = _requests(40)
        answers = await asyncio.gather(*(forwarder.forward(_peer(topic, True), r, 5.0) for r in reqs))
        assert [a["request_id"] for a in answers] == [r.request_id for r in reqs]
        assert [a["results"] for a in answers] == [[r.payload] for r in reqs]
        assert len(peer.received) == 1 and forwarder.batches_sent == 1
        msg = peer.received[0]
        assert (BATCH_PROPERTY[0], BATCH_PROPERTY[1]) in msg.properties.UserProperty
        items = orjson.loads(msg.payload)
        assert len(items) == 40 and all(i["is_load_balancing"] is True for i in items)
        assert not forwarder._sent and not forwarder._gathering  # nothing left waiting

    asyncio.run(asyncio.wait_for(_with_forwarder(broker.port, scenario), 60))


def test_a_forward_its_peer_does_not_answer_times_out_alone_and_a_refused_batch_answers_all(broker):
    async def scenario(forwarder: MqttForwarder, peer: FakePeer, topic: str) -> None:
        def answer_some(msg: mqtt.MQTTMessage) -> list:
            items = orjson.loads(msg.payload)
            pairs = [(i, _ok(item)) for i, item in enumerate(items) if i != 2]
            return [(answers_body(pairs), _correlated(msg.properties.CorrelationData))]

        peer.answer = answer_some
        got = await asyncio.gather(*(forwarder.forward(_peer(topic, True), r, 0.8) for r in _requests(5)),
                                   return_exceptions=True)
        assert [isinstance(g, TimeoutError) for g in got] == [False, False, True, False, False]
        assert "no answer within 0.8 s" in str(got[2])

        refused = {"status": "error", "error": {"code": "bad_request", "message": "not a batch"}}
        peer.answer = lambda msg: [(orjson.dumps(refused), _correlated(msg.properties.CorrelationData))]
        got = await asyncio.gather(*(forwarder.forward(_peer(topic, True), r, 5.0) for r in _requests(3)))
        assert got == [refused] * 3
        await asyncio.sleep(0.1)
        assert not forwarder._sent

    asyncio.run(asyncio.wait_for(_with_forwarder(broker.port, scenario), 60))


answer_payloads = st.one_of(
    st.binary(max_size=40),
    json_values.map(orjson.dumps),
    st.lists(st.one_of(st.tuples(st.integers(-2, 6), json_values).map(list), json_values), max_size=6).map(orjson.dumps),
)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(payloads=st.lists(answer_payloads, min_size=1, max_size=3))
def test_whatever_comes_back_for_a_batch_each_forward_ends_once_and_nothing_is_left_waiting(broker, payloads):
    """Garbage, results for places that do not exist, lists of anything: each
    forward of the batch gets one answer (a dict), or fails, or times out."""
    async def scenario(forwarder: MqttForwarder, peer: FakePeer, topic: str) -> None:
        peer.answer = lambda msg: [(p, _correlated(msg.properties.CorrelationData)) for p in payloads]
        got = await asyncio.gather(*(forwarder.forward(_peer(topic, True), r, 0.6) for r in _requests(5)),
                                   return_exceptions=True)
        assert all(isinstance(g, (dict, ValueError, TimeoutError)) for g in got), got
        await asyncio.sleep(0)
        assert not forwarder._sent and not forwarder._gathering

    asyncio.run(asyncio.wait_for(_with_forwarder(broker.port, scenario), 60))


def test_a_peer_that_does_not_take_batches_is_sent_one_message_per_forward(broker):
    async def scenario(forwarder: MqttForwarder, peer: FakePeer, topic: str) -> None:
        def answer(msg: mqtt.MQTTMessage) -> list:
            item = orjson.loads(msg.payload)
            assert isinstance(item, dict) and not getattr(msg.properties, "UserProperty", None)
            return [(_ok(item), _correlated(msg.properties.CorrelationData))]

        peer.answer = answer
        reqs = _requests(6)
        answers = await asyncio.gather(*(forwarder.forward(_peer(topic, False), r, 5.0) for r in reqs))
        assert [a["request_id"] for a in answers] == [r.request_id for r in reqs]
        assert len(peer.received) == 6 and forwarder.batches_sent == 0

    asyncio.run(asyncio.wait_for(_with_forwarder(broker.port, scenario), 60))


def test_stopping_fails_the_forwards_still_gathering_or_waiting(broker):
    async def scenario(forwarder: MqttForwarder, peer: FakePeer, topic: str) -> None:
        waiting = [asyncio.ensure_future(forwarder.forward(_peer(topic, True), r, 30.0)) for r in _requests(3)]
        await asyncio.sleep(0.3)  # sent, never answered
        gathering = asyncio.ensure_future(forwarder.forward(_peer(topic, True), _requests(1)[0], 30.0))
        await asyncio.sleep(0)  # in this turn's batch, not sent yet
        forwarder.kill()
        for fut in [*waiting, gathering]:
            with pytest.raises(ConnectionError, match="stopping"):
                await fut

    asyncio.run(asyncio.wait_for(_with_forwarder(broker.port, scenario), 60))


# ----- a real node taking batches ---------------------------------------------------------------------
class BatchSender:
    """Publishes batches to a node's own topic and collects the answers by token."""

    def __init__(self, port: int) -> None:
        self.topic = f"answers/{uuid.uuid4().hex}"
        self.answers: dict[bytes, list[Any]] = {}
        self.cond = threading.Condition()
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bs-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *a: c.subscribe(self.topic, qos=1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert ready.wait(10)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.answers.setdefault(bytes(msg.properties.CorrelationData), []).append(orjson.loads(msg.payload))
            self.cond.notify_all()

    def send(self, payload: bytes, token: bytes, topic: str = "component_msg/node/1", marked: bool = True) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.topic
        props.CorrelationData = token
        if marked:
            props.UserProperty = [BATCH_PROPERTY]
        self.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(10)

    def answered(self, token: bytes, size: int, timeout: float = 10) -> dict[int, dict] | dict:
        """The answers to one batch by index (once there is one for each), or the one object answering it all."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                got = self.answers.get(token, [])
                if any(isinstance(g, dict) for g in got):
                    return next(g for g in got if isinstance(g, dict))
                pairs = {i: r for g in got for i, r in g}
                if len(pairs) >= size:
                    return pairs
                left = deadline - time.monotonic()
                assert left > 0, f"answers to {size} requests: got {sorted(pairs)}"
                self.cond.wait(left)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _item(i: int, flow: str = "1", rid: str | None = None) -> dict:
    return {"id_flow": flow, "payload": f"p{i}", "is_load_balancing": True, "request_id": rid or f"b-{uuid.uuid4().hex}"}


@pytest.fixture
def one_node(tmp_path, broker, mock, processes):
    (_, port, cfg), = group(tmp_path, broker, mock, 1, policy="local")
    processes.append(RmProcess("serve", cfg).start())
    sender = BatchSender(broker.port)
    yield port, sender, broker.port
    sender.close()


def test_a_node_runs_each_request_of_a_batch_and_answers_them_by_place(one_node, mock):
    port, sender, _ = one_node
    token = b"\x01token-one"
    items = [_item(i) for i in range(10)]
    items[4] = {"id_flow": "", "request_id": "bad-4"}  # not a request: answered in its place
    items[6]["id_flow"] = "no-such-flow"
    sender.send(orjson.dumps(items), token)
    answers = sender.answered(token, 10)
    assert sorted(answers) == list(range(10))
    for i, result in answers.items():
        if i == 4:
            assert result["error"]["code"] == "bad_request" and result["request_id"] == "bad-4"
        elif i == 6:
            assert result["status"] == "error" and result["error"]["code"] == "unknown_flow"
        else:
            assert result["status"] == "ok" and result["request_id"] == items[i]["request_id"]
            assert result["node"] == "1" and f"p{i}" in json.dumps(result["results"])
    assert status(port)["by_entrypoint"]["mqtt"] >= 9


def test_a_batch_delivered_again_is_answered_from_the_dedupe_window_without_running_again(one_node, mock):
    _, sender, _ = one_node
    items = [_item(i) for i in range(5)]
    sender.send(orjson.dumps(items), b"first")
    first = sender.answered(b"first", 5)
    calls = mock.calls["endpoint1"]
    sender.send(orjson.dumps(items), b"first")  # the same message again (a redelivery)
    wait_for(lambda: len(sender.answers[b"first"]) >= 2 and
             len({i for g in sender.answers[b"first"][1:] for i, _ in g}) == 5, 10, "the answers again")
    again = {i: r for g in sender.answers[b"first"][1:] for i, r in g}
    assert again == first and mock.calls["endpoint1"] == calls  # the kept results, nothing run twice
    sender.send(orjson.dumps(items), b"other")  # the same requests in another batch: run, as they are
    assert all(r["status"] == "ok" for r in sender.answered(b"other", 5).values())
    assert mock.calls["endpoint1"] == calls + 5


@pytest.mark.parametrize("payload, message", [
    (b"\xff\xfe", "not valid JSON"), (b'{"id_flow": "1"}', "non-empty JSON array"), (b"[]", "non-empty JSON array"),
    (orjson.dumps([_item(i) for i in range(MAX_ITEMS + 1)]), f"more than {MAX_ITEMS}"),
])
def test_a_batch_that_cannot_be_read_is_answered_once_and_the_node_goes_on(one_node, payload, message):
    port, sender, _ = one_node
    token = uuid.uuid4().bytes
    sender.send(payload, token)
    answer = sender.answered(token, 1)
    assert answer["status"] == "error" and answer["error"]["code"] == "bad_request" and message in answer["error"]["message"]
    time.sleep(0.2)
    assert len(sender.answers[token]) == 1
    assert post(port, {"id_flow": "1", "payload": "after"})["status"] == "ok"


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(items=st.lists(st.one_of(json_values, st.fixed_dictionaries({"id_flow": st.sampled_from(["1", "2", 1, "", None]),
                                                                    "payload": json_values}, optional={
    "request_id": st.one_of(st.text(max_size=8), st.integers(-2**63, 2**63 - 1), st.booleans()),
    "is_load_balancing": json_values, "traceparent": json_values})), min_size=1, max_size=12))
def test_whatever_a_batch_holds_each_request_in_it_gets_exactly_one_answer(one_node, items):
    _, sender, _ = one_node
    token = uuid.uuid4().bytes
    sender.send(orjson.dumps(items), token)
    answers = sender.answered(token, len(items))
    assert all(isinstance(i, int) for i in answers) and sorted(answers) == list(range(len(items)))
    time.sleep(0.05)
    indices = [i for g in sender.answers[token] for i, _ in g]
    assert sorted(indices) == list(range(len(items)))  # none twice
    for result in answers.values():
        assert result["status"] in ("ok", "error")


def test_an_unmarked_array_on_the_request_topic_is_still_a_bad_request(one_node):
    _, _, broker_port = one_node
    probe = MqttProbe(broker_port, ("component_msg/result",))
    try:
        probe.publish(orjson.dumps([_item(0)]), topic="component_msg/node/1")
        wait_for(lambda: probe.messages, 10, "the error result")
        assert json.loads(probe.messages[0][1])["error"]["code"] == "bad_request"
    finally:
        probe.close()


# ----- two nodes --------------------------------------------------------------------------------------------
def test_a_burst_forwarded_over_mqtt_goes_in_batches_and_every_request_gets_one_result(tmp_path, broker, mock, processes):
    (_, port1, cfg1), (_, _, cfg2) = group(tmp_path, broker, mock, 2, policy="round_robin",
                                          peer_extra={"forward": "mqtt"}, runtime={"workers": 32})
    processes += [RmProcess("serve", cfg1).start(), RmProcess("serve", cfg2).start()]
    wait_for(lambda: peer_state(port1, "2") == "healthy", 10, "node 2 healthy")
    peers = {p["id"]: p for p in status(port1)["placement"]["peers"]}
    assert peers["2"]["mqtt_batches"] is True
    seen = MqttProbe(broker.port, ("component_msg/node/2",))  # what node 1 sends node 2
    probe = MqttProbe(broker.port, ("component_msg/result",))
    try:
        rids = [f"burst-{i}-{uuid.uuid4().hex[:6]}" for i in range(300)]
        for rid in rids:
            probe.client.publish("component_msg/node/1", json.dumps({"id_flow": "1", "payload": rid, "request_id": rid}), qos=1)
        wait_for(lambda: all(r in probe.results for r in rids), 60, "every result")
        time.sleep(0.3)
        assert all(len(probe.results[r]) == 1 and probe.results[r][0]["status"] == "ok" for r in rids)
        on_2 = [r for r in rids if probe.results[r][0]["node"] == "2"]
        assert 100 <= len(on_2) <= 200  # round robin, home and node 2 in turn
        batches = [json.loads(p) for _t, p in seen.messages]
        assert all(isinstance(b, list) for b in batches)
        assert sorted(i["request_id"] for b in batches for i in b) == sorted(on_2)
        assert len(batches) < len(on_2)  # together, not one message each
        metrics = samples(requests.get(f"http://127.0.0.1:{port1}/metrics", timeout=5).text)
        assert metrics[("rm_forward_batch_requests_count", ())] == len(batches)
        assert metrics[("rm_forward_batch_requests_sum", ())] == len(on_2)
    finally:
        seen.close()
        probe.close()


def test_answers_larger_than_the_broker_takes_are_split_and_a_result_too_large_is_answered_in_its_place(
        tmp_path, mock, processes):
    """A broker taking packets of at most 8,000 bytes: the answers to a batch of
    20 (~500 bytes each) leave in several messages, each one it takes; a result
    larger than a packet is answered `result_too_large` in its place."""
    small = Broker(tmp_path / "broker", extra="max_packet_size 8000\n").start()
    try:
        flows = "echo\nTO component1 1\nPOST payload\n\nbig\nTO bigc big\nGET\n"
        bigc = {"bigc": {"id": 9, "config": {"protocol": "http", "ip": "127.0.0.1", "port": mock.port,
                                             "endpoints": {"big": "big?n=20000"}}}}
        cfg = write_config(tmp_path / "cfg", mock.port, small.port, flows=flows, components=bigc,
                           lb={"policy": "local"}, runtime={"node_id": "1"})
        processes.append(RmProcess("serve", cfg).start())
        sender = BatchSender(small.port)
        try:
            items = [_item(i, flow="echo") | {"payload": f"{i:03d}" + "x" * 250} for i in range(20)]
            items[7] = _item(7, flow="big")
            token = b"split"
            sender.send(orjson.dumps(items), token)
            answers = sender.answered(token, 20)
            assert sorted(answers) == list(range(20))
            assert answers[7]["error"]["code"] == "result_too_large"
            for i in (0, 19):
                assert answers[i]["status"] == "ok" and f"{i:03d}xxx" in json.dumps(answers[i]["results"])
            messages = sender.answers[token]
            assert len(messages) >= 2 and sum(len(m) for m in messages) == 20  # split, none twice
            assert all(len(orjson.dumps(m)) < 8000 for m in messages)
        finally:
            sender.close()
    finally:
        small.stop()


@pytest.fixture
def small_broker(tmp_path):
    """A broker that takes packets of at most 8,000 bytes (MQTT 5 Maximum Packet Size)."""
    b = Broker(tmp_path / "small-broker", extra="max_packet_size 8000\n").start()
    yield b
    b.stop()


def test_batches_stay_under_the_brokers_packet_limit_and_a_request_over_it_is_not_sent(small_broker):
    async def scenario(forwarder: MqttForwarder, peer: FakePeer, topic: str) -> None:
        def answer(msg: mqtt.MQTTMessage) -> list:
            items = orjson.loads(msg.payload)
            return [(answers_body([(i, _ok(item))]), _correlated(msg.properties.CorrelationData))
                    for i, item in enumerate(items)]

        peer.answer = answer
        reqs = [FlowRequest("1", f"{i:03d}" + "y" * 400, f"rid-{i}") for i in range(30)]  # ~12 KB in all
        answers = await asyncio.gather(*(forwarder.forward(_peer(topic, True), r, 5.0) for r in reqs))
        assert [a["request_id"] for a in answers] == [r.request_id for r in reqs]
        assert len(peer.received) >= 2 and all(len(m.payload) < 8000 for m in peer.received)
        assert sum(len(orjson.loads(m.payload)) for m in peer.received) == 30
        sent = len(peer.received)
        for batches in (True, False):
            with pytest.raises(TooLargeToForward, match="larger than the broker takes"):
                await forwarder.forward(_peer(topic, batches), FlowRequest("1", "z" * 9000, "too-big"), 5.0)
        await asyncio.sleep(0.3)
        assert len(peer.received) == sent and forwarder.link.connected  # nothing sent, the link untouched

    asyncio.run(asyncio.wait_for(_with_forwarder(small_broker.port, scenario), 60))


def test_a_request_too_large_to_forward_runs_at_home_and_the_peer_stays_healthy(tmp_path, small_broker, mock, processes):
    (_, port1, cfg1), (_, _, cfg2) = group(tmp_path, small_broker, mock, 2, policy="round_robin",
                                          peer_extra={"forward": "mqtt"})
    processes += [RmProcess("serve", cfg1).start(), RmProcess("serve", cfg2).start()]
    wait_for(lambda: peer_state(port1, "2") == "healthy", 10, "node 2 healthy")
    results = [post(port1, {"id_flow": "1", "payload": "w" * 9000}) for _ in range(2)]  # one of them for node 2
    assert all(r["status"] == "ok" and r["node"] == "1" for r in results)
    refused = next(r for r in results if r["placement"].get("tried"))
    assert "not sent, the request of" in refused["placement"]["tried"][0]
    assert peer_state(port1, "2") == "healthy"
    assert {post(port1, {"id_flow": "1", "payload": "small"})["node"] for _ in range(2)} == {"1", "2"}
