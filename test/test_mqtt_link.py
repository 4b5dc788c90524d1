"""The MQTT link in-process against a real Mosquitto: it owns its connection and
survives whatever a connection attempt, a read or a handler raises."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

from runtime_manager.config import MqttConfig
from runtime_manager.mqtt.link import MqttLink


async def _until(cond: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def _link(port: int, name: str) -> MqttLink:
    return MqttLink(MqttConfig(host="127.0.0.1", port=port, topic=name), f"link-test-{name}", max_backoff_s=0.5)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_publishes_reach_handlers_and_a_failing_handler_does_not_stop_the_link(broker, caplog):
    async def scenario() -> None:
        link = _link(broker.port, "handlers")
        got: list[bytes] = []

        def handler(msg: Any) -> None:
            if msg.payload == b"boom":
                raise ValueError("a handler bug")
            got.append(msg.payload)

        link.subscribe("lt/handlers/#", handler)
        await link.setup()
        await link.start()
        assert await link.wait_connected(10)
        acked = asyncio.Event()
        for payload in (b"one", b"boom", b"two"):
            link.publish("lt/handlers/x", payload, qos=1, on_acked=lambda _ok: acked.set())
        for bad in ("lt/\x01", "lt/\ufffe", "$SYS/x", "lt/#"):  # the broker would drop the link for these
            with pytest.raises(ValueError, match="cannot publish on topic"):
                link.publish(bad, b"x", qos=1)
        await _until(lambda: got == [b"one", b"two"], 10, "both good messages")
        await asyncio.wait_for(acked.wait(), 5)
        assert link.connected and link.connections == 1 and link.unacked == 0
        await link.stop()
        assert not link.connected

    run(scenario())
    assert "handler of 'lt/handlers/#' failed" in caplog.text and "a handler bug" in caplog.text


def test_a_connection_attempt_that_raises_anything_is_logged_and_retried(broker, caplog):
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        link = _link(broker.port, "retry")
        real, attempts = link._connect_blocking, []

        def flaky() -> None:
            attempts.append(1)
            if len(attempts) <= 2:
                raise RuntimeError("something nobody expected")
            real()

        link._connect_blocking = flaky  # type: ignore[method-assign]
        await link.setup()
        await link.start()
        assert await link.wait_connected(20)
        assert len(attempts) == 3
        await link.stop()

    run(scenario())
    assert caplog.text.count("unreachable (RuntimeError: something nobody expected)") == 2


def test_a_bad_host_keeps_the_link_retrying_instead_of_dying(caplog):
    async def scenario() -> None:
        link = MqttLink(MqttConfig(host="", port=1883, topic="x"), "link-test-badhost", max_backoff_s=0.2)
        await link.setup()
        await link.start()
        await _until(lambda: caplog.text.count("Invalid host") >= 3, 10, "three attempts")
        assert all(not t.done() for t in link._tasks)  # still trying
        await link.stop()

    run(scenario())


def test_an_exception_while_reading_becomes_a_reconnect(broker, caplog):
    async def scenario() -> None:
        link = _link(broker.port, "readerr")
        got: list[bytes] = []
        link.subscribe("lt/readerr", lambda m: got.append(m.payload))
        await link.setup()
        await link.start()
        assert await link.wait_connected(10)
        real = link.client._packet_read
        broken = [True]

        def packet_read() -> Any:
            if broken[0]:
                broken[0] = False
                raise RuntimeError("a bug in reading")
            return real()

        link.client._packet_read = packet_read  # type: ignore[method-assign]
        link.publish("lt/readerr", b"first", qos=1)  # its PUBACK is read: the read fails
        await _until(lambda: link.connections == 2 and link.connected, 15, "a second connection")
        link.publish("lt/readerr", b"after", qos=1)
        await _until(lambda: b"after" in got, 10, "a message after the reconnect")
        await link.stop()

    run(scenario())
    assert "reading from the broker failed" in caplog.text


@pytest.mark.parametrize("sig", ["stop", "kill"])
def test_broker_going_away_and_back_reconnects_and_resubscribes(own_broker, sig):
    import signal

    async def scenario() -> None:
        own_broker.start()
        link = _link(own_broker.port, f"bounce-{sig}")
        got: list[bytes] = []
        link.subscribe("lt/bounce", lambda m: got.append(m.payload))
        await link.setup()
        await link.start()
        assert await link.wait_connected(10)
        await asyncio.get_running_loop().run_in_executor(
            None, own_broker.stop, signal.SIGTERM if sig == "stop" else signal.SIGKILL)
        await _until(lambda: not link.connected, 10, "the link to notice")
        await asyncio.get_running_loop().run_in_executor(None, own_broker.start)
        await _until(lambda: link.connected, 20, "the link to reconnect")
        link.publish("lt/bounce", b"back", qos=1)
        await _until(lambda: got == [b"back"], 10, "a message after the reconnect")
        await link.stop()

    run(scenario())


def test_over_tls_every_message_decoded_in_one_read_is_handled(tmp_path):
    """An SSL socket may hold decoded records that raise no further readable
    event: a burst of small messages over TLS must all arrive without waiting
    for the next packet from the broker (a keepalive, a minute later)."""
    import time

    import paho.mqtt.client as mqtt
    from conftest import Broker
    from helpers import free_port, make_certificate

    cert, key = make_certificate(tmp_path)
    tls_port = free_port()
    broker = Broker(tmp_path / "broker", extra=f"\nlistener {tls_port} 127.0.0.1\ncertfile {cert}\nkeyfile {key}\n").start()
    count = 2000
    try:
        async def scenario() -> None:
            cfg = MqttConfig(host="127.0.0.1", port=tls_port, topic="tls", tls={"ca_certs": str(cert)})
            link = MqttLink(cfg, "link-test-tls", max_backoff_s=0.5)
            got: list[bytes] = []
            link.subscribe("tls/burst", lambda msg: got.append(msg.payload), qos=0)
            await link.setup()
            await link.start()
            await _until(lambda: link.connected, 10, "connected over TLS")
            await asyncio.sleep(0.3)  # the subscription made
            publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tls-burst")
            publisher.connect("127.0.0.1", broker.port)
            publisher.loop_start()
            try:
                for i in range(count):
                    publisher.publish("tls/burst", str(i).encode(), qos=0)
                started = time.monotonic()
                await _until(lambda: len(got) >= count, 20, f"{count} messages over TLS (got {len(got)})")
                assert time.monotonic() - started < 20 and got[-1] == str(count - 1).encode()
            finally:
                publisher.disconnect()
                publisher.loop_stop()
                await link.stop()

        run(scenario())
    finally:
        broker.stop()
