"""PUBLISH packets of the hot path, read and written without paho.

paho takes 12-14 µs to read a PUBLISH (a dict per packet, the bytes copied a
few times, an `MQTTMessage` and a `Properties` object, three locks) and
7-20 µs to write one (an `MQTTMessageInfo`, a queued dict, the writability
callbacks, a `ReasonCode` and a `Properties` for `on_publish`): about a
third of what a node spends on a request that only returns its payload.

`read_publish` reads the PUBLISH at the front of received bytes when it is one
of those a node gets in a burst: QoS 0 or 1, a topic name (no alias), and only
the properties a request carries (payload format, expiry, content type,
response topic, correlation data, user properties). Anything else (QoS 2, a
topic alias, a subscription identifier, a packet not wholly received, a
malformed one) it leaves where it is, for paho to read as it always does: it
never consumes what it does not understand. `Message` has the attributes of
paho's `MQTTMessage` that handlers use.

`publish_packet` writes a QoS 0 PUBLISH with at most a Correlation Data
property (a result), `puback_packet` the acknowledgement of a QoS 1 request. The link (`link.py`) decides when these may be used in
paho's place (a plain TCP connection through its `BatchedSocket`, paho with
nothing of its own half read or waiting to be written, so that packets stay
in order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PUBLISH = 0x30
PUBACK = 0x40
_STRING_PROPERTIES = {0x03: "ContentType", 0x08: "ResponseTopic"}


class MessageProperties:
    """The MQTT 5 properties of a message, named as paho names them; an absent
    one is not set (`getattr(props, name, None)`), as with paho's `Properties`."""

    __slots__ = ("ContentType", "CorrelationData", "MessageExpiryInterval", "PayloadFormatIndicator",
                 "ResponseTopic", "UserProperty")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MessageProperties) and _set(self) == _set(other)

    def __repr__(self) -> str:
        return f"MessageProperties({_set(self)})"


def _set(props: MessageProperties) -> dict[str, Any]:
    return {name: getattr(props, name) for name in MessageProperties.__slots__ if hasattr(props, name)}


@dataclass(slots=True)
class Message:
    """A PUBLISH as handlers see it (the attributes of paho's `MQTTMessage` they use)."""

    topic: str
    payload: bytes
    qos: int
    mid: int  # the packet identifier (0 at QoS 0)
    retain: bool
    dup: bool
    properties: MessageProperties | None  # None: MQTT 3.1.1, or no properties


def read_publish(data: bytes, at: int, v5: bool) -> tuple[Message, int] | None:
    """The PUBLISH starting at `data[at]` and where the next packet starts, or
    None when that packet is not one `read_publish` reads (see the module's
    docstring): nothing is consumed then."""
    end_of_data = len(data)
    if at >= end_of_data:
        return None
    first = data[at]
    qos = (first >> 1) & 3
    if first & 0xF0 != PUBLISH or qos > 1:
        return None
    length, pos = _varint(data, at + 1, min(end_of_data, at + 5))
    if length is None:
        return None
    end = pos + length
    if end > end_of_data or length < 2:
        return None
    topic_len = (data[pos] << 8) | data[pos + 1]
    pos += 2
    if topic_len == 0 or pos + topic_len > end:
        return None
    try:
        topic = data[pos : pos + topic_len].decode()
    except UnicodeDecodeError:
        return None
    pos += topic_len
    mid = 0
    if qos:
        if pos + 2 > end:
            return None
        mid = (data[pos] << 8) | data[pos + 1]
        pos += 2
    props = None
    if v5:
        props_len, pos = _varint(data, pos, end)
        if props_len is None or pos + props_len > end:
            return None
        if props_len:
            props = _properties(data, pos, pos + props_len)
            if props is None:
                return None
            pos += props_len
    return Message(topic, data[pos:end], qos, mid, bool(first & 1), bool(first & 8), props), end


def _varint(data: bytes, pos: int, limit: int) -> tuple[int | None, int]:
    """A variable byte integer at `pos` (at most 4 bytes, all before `limit`)."""
    value, shift = 0, 0
    for i in range(4):
        if pos + i >= limit:
            return None, pos
        byte = data[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + i + 1
        shift += 7
    return None, pos


def _properties(data: bytes, pos: int, end: int) -> MessageProperties | None:
    props = MessageProperties()
    users: list[tuple[str, str]] = []
    try:
        while pos < end:
            ident = data[pos]
            pos += 1
            if ident == 0x01 and not hasattr(props, "PayloadFormatIndicator") and data[pos] < 2:
                props.PayloadFormatIndicator = data[pos]
                pos += 1
            elif ident == 0x02 and not hasattr(props, "MessageExpiryInterval"):
                if pos + 4 > end:
                    return None
                props.MessageExpiryInterval = int.from_bytes(data[pos : pos + 4], "big")
                pos += 4
            elif ident in _STRING_PROPERTIES and not hasattr(props, _STRING_PROPERTIES[ident]):
                text, pos = _string(data, pos, end)
                setattr(props, _STRING_PROPERTIES[ident], text)
            elif ident == 0x09 and not hasattr(props, "CorrelationData"):
                length = (data[pos] << 8) | data[pos + 1]
                if pos + 2 + length > end:
                    return None
                props.CorrelationData = data[pos + 2 : pos + 2 + length]
                pos += 2 + length
            elif ident == 0x26:
                name, pos = _string(data, pos, end)
                value, pos = _string(data, pos, end)
                users.append((name, value))
            else:  # a property a request does not carry, one given twice or out of range: paho's to read
                return None
    except (IndexError, UnicodeDecodeError, ValueError):
        return None
    if pos != end:
        return None
    if users:
        props.UserProperty = users
    return props


def _string(data: bytes, pos: int, end: int) -> tuple[str, int]:
    length = (data[pos] << 8) | data[pos + 1]
    if pos + 2 + length > end:
        raise ValueError("string past the properties' end")
    text = data[pos + 2 : pos + 2 + length].decode()
    if "\x00" in text or "\ufeff" in text:  # paho refuses the packet as malformed (as it is, when paho reads it)
        raise ValueError("a character MQTT forbids in a string")
    return text, pos + 2 + length


def publish_packet(topic: str, payload: bytes, v5: bool, correlation: bytes | None = None,
                   retain: bool = False) -> bytes:
    """A QoS 0 PUBLISH of `payload` on `topic`, with Correlation Data when given (MQTT 5)."""
    name = topic.encode()
    out = bytearray(len(name).to_bytes(2, "big"))
    out += name
    if v5:
        if correlation is None:
            out.append(0)
        else:
            props = b"\x09" + len(correlation).to_bytes(2, "big") + correlation
            out += _encode_varint(len(props))
            out += props
    out += payload
    return bytes([PUBLISH | retain]) + _encode_varint(len(out)) + out


def puback_packet(mid: int) -> bytes:
    """The PUBACK of a QoS 1 message taken well (MQTT 5: its reason code, success, left out)."""
    return bytes((PUBACK, 2, mid >> 8, mid & 0xFF))


def _encode_varint(n: int) -> bytes:
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)
