"""The link's own PUBLISH reading and writing (mqtt/publish_codec.py), against
paho's encoder and decoder as the reference: whatever paho writes is read the
same, or left for paho; what the link writes is byte for byte what paho writes."""

from __future__ import annotations

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt._packet import decode_publish
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from runtime_manager.mqtt.publish_codec import publish_packet, read_publish

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
BINARY = st.binary(max_size=300)
# the properties a request carries (read here), and some it does not (left to paho)
READ = {"PayloadFormatIndicator": st.integers(0, 1), "MessageExpiryInterval": st.integers(0, 2**32 - 1),
        "ContentType": TEXT, "ResponseTopic": TEXT.filter(bool), "CorrelationData": st.binary(max_size=64),
        "UserProperty": st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3)}
LEFT = {"SubscriptionIdentifier": st.integers(1, 2**20), "TopicAlias": st.integers(1, 100)}


class _Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def send(self, data: bytes) -> int:
        self.data += data
        return len(data)

    def close(self) -> None:
        pass


def paho_packet(topic: str, payload: bytes, qos: int, v5: bool, props: dict | None = None, mid: int = 1,
                retain: bool = False, dup: bool = False) -> bytes:
    """The PUBLISH packet paho writes."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
    client._sock = _Sink()
    properties = None
    if v5 and props:
        properties = Properties(PacketTypes.PUBLISH)
        for name, value in props.items():
            setattr(properties, name, value)
    client._send_publish(mid if qos else 0, topic.encode(), payload, qos, retain, dup, mqtt.MQTTMessageInfo(mid),
                         properties)
    return bytes(client._sock.data)


def _strings(props: dict) -> list[str]:
    texts = [v for v in props.values() if isinstance(v, str)]
    return texts + [text for pair in props.get("UserProperty", []) for text in pair]


def paho_reads(packet: bytes, v5: bool) -> tuple[int, object]:
    """paho's decoding of a whole packet: (its length, the decoded PUBLISH)."""
    length, mult, pos = 0, 1, 1
    while True:
        byte = packet[pos]
        length += (byte & 127) * mult
        mult *= 128
        pos += 1
        if not byte & 128:
            break
    return pos + length, decode_publish(packet[0], packet[pos : pos + length],
                                        mqtt.MQTTv5 if v5 else mqtt.MQTTv311)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60), BINARY, st.integers(0, 1),
       st.booleans(), st.booleans(), st.booleans(), st.integers(1, 65535),
       st.fixed_dictionaries({}, optional=READ), st.binary(max_size=20))
def test_a_publish_paho_writes_is_read_as_paho_reads_it(topic, payload, qos, v5, retain, dup, mid, props, after):
    packet = paho_packet(topic, payload, qos, v5, props, mid, retain, dup)
    if v5 and any(c in text for text in _strings(props) for c in "\x00\ufeff"):
        # paho refuses a property string with a null character or U+FEFF as malformed: left for paho to do so
        assert read_publish(packet, 0, v5) is None
        return
    data = b"\x00" * 3 + packet + after  # at an offset, with the next packet's start behind it
    read = read_publish(data, 3, v5)
    assert read is not None
    message, end = read
    length, reference = paho_reads(packet, v5)
    assert end == 3 + length == 3 + len(packet)
    assert (message.topic, message.payload, message.qos, message.mid, message.retain, message.dup) == (
        reference.topic.decode(), reference.payload, reference.qos, reference.mid, reference.retain, reference.dup)
    if not v5:
        assert message.properties is None
        return
    expected = {name: getattr(reference.properties, name) for name in READ if hasattr(reference.properties, name)}
    got = {name: getattr(message.properties, name) for name in READ if hasattr(message.properties, name)}
    assert got == expected
    for name in READ:  # absent ones are absent, as with paho's Properties
        assert getattr(message.properties, name, None) == getattr(reference.properties, name, None)


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30), BINARY,
       st.fixed_dictionaries({}, optional=READ), st.sampled_from(sorted(LEFT)), st.data())
def test_what_it_does_not_read_is_left_whole_for_paho(topic, payload, props, unusual, data):
    """QoS 2, a property a request does not carry, a packet not wholly received,
    another kind of packet: None (nothing consumed)."""
    props = {**props, unusual: data.draw(LEFT[unusual])}
    assert read_publish(paho_packet(topic, payload, 1, True, props), 0, True) is None
    assert read_publish(paho_packet(topic, payload, 2, True), 0, True) is None
    packet = paho_packet(topic, payload, 0, True)
    cut = data.draw(st.integers(0, len(packet) - 1))
    assert read_publish(packet[:cut], 0, True) is None
    assert read_publish(b"\x40\x02\x00\x01" + packet, 0, True) is None  # a PUBACK first


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80), st.booleans())
def test_any_bytes_are_read_as_paho_reads_them_or_left(data, v5):
    """Whatever arrives: either not read, or read exactly as paho decodes that packet."""
    read = read_publish(data, 0, v5)
    if read is None:
        return
    message, end = read
    length, reference = paho_reads(data, v5)
    assert end == length
    assert (message.topic, message.payload, message.qos, message.mid) == (
        reference.topic.decode(), reference.payload, reference.qos, reference.mid)
    if v5 and message.properties is not None:
        for name in READ:
            assert getattr(message.properties, name, None) == getattr(reference.properties, name, None)


def test_an_invalid_utf8_topic_or_an_empty_one_is_left_for_paho():
    packet = bytearray(paho_packet("ab", b"x", 0, True))
    packet[4] = 0xFF  # the topic's first byte
    assert read_publish(bytes(packet), 0, True) is None
    assert read_publish(b"\x30\x04\x00\x00\x00x", 0, True) is None  # an empty topic: an alias's


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60), st.binary(max_size=70000),
       st.one_of(st.none(), st.binary(max_size=300)), st.booleans(), st.booleans())
def test_the_results_it_writes_are_the_bytes_paho_writes(topic, payload, correlation, v5, retain):
    props = {"CorrelationData": correlation} if v5 and correlation is not None else None
    assert publish_packet(topic, payload, v5, correlation if v5 else None, retain) == \
        paho_packet(topic, payload, 0, v5, props, retain=retain)


@pytest.mark.parametrize("size", [0, 127, 128, 16383, 16384, 2_097_151, 2_097_152])
def test_remaining_lengths_at_each_width(size):
    packet = publish_packet("t", b"x" * size, True)
    message, end = read_publish(packet, 0, True)
    assert end == len(packet) and message.payload == b"x" * size


@settings(max_examples=500, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20), st.binary(max_size=40),
       st.fixed_dictionaries({}, optional=READ), st.integers(0, 1),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=3))
def test_a_damaged_publish_is_read_as_paho_reads_it_or_left(topic, payload, props, qos, damage):
    """A packet paho wrote, with a few bytes changed: not read, or read exactly as
    paho decodes it (never a packet paho would refuse as malformed)."""
    packet = bytearray(paho_packet(topic, payload, qos, True, props))
    for at, value in damage:
        packet[at % len(packet)] = value
    read = read_publish(bytes(packet), 0, True)
    if read is None:
        return
    message, end = read
    length, reference = paho_reads(bytes(packet), True)  # raises if paho finds it malformed
    assert end == length
    assert (message.topic, message.payload, message.qos, message.mid) == (
        reference.topic.decode(), reference.payload, reference.qos, reference.mid)
    for name in READ:
        assert getattr(message.properties, name, None) == getattr(reference.properties, name, None)


@given(st.integers(1, 65535), st.booleans())
def test_the_acknowledgements_it_writes_are_the_bytes_paho_writes(mid, v5):
    from runtime_manager.mqtt.publish_codec import puback_packet

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
    client._sock = _Sink()
    client._send_puback(mid)
    assert puback_packet(mid) == bytes(client._sock.data)
