"""paho's MQTT 5 `Properties` and `ReasonCode` objects, made without
rebuilding paho's tables each time.

paho makes a `Properties` object for every MQTT 5 packet it reads (each
request, each PUBACK) and for every QoS 0 publish it has written (what it hands
`on_publish`), and each one builds paho's tables of property names, types and
packets anew (9.6 µs here), then `unpack` clears it by walking every name
(another 5 µs). Each `ReasonCode` (one for every PUBACK read and every QoS 0
publish written) copies paho's table of reason names out of a read-only
mapping, key by key (3.6 µs of its 4.4). Together about 30 µs of a request's
250 over MQTT.

The tables never change after they are built. `speed_up` makes
`Properties.__init__` share one set of them and `Properties.clear` drop only
the properties an object holds, and gives `ReasonCode` its table as a plain
dict (which paho still copies for every object, in one step: 1.0 µs). The
objects are otherwise paho's own (set, packed, unpacked and compared by its
code).

`speed_up` checks first that paho's classes are the ones this was written for
(the version pinned in requirements.txt: the three tables as the only state of
a new `Properties`, a mapping of reason names); with others it changes
nothing. test_mqtt_link compares objects made both ways.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

TABLES = ("types", "names", "properties")
_original_init = Properties.__init__
_original_clear = Properties.clear
_original_reason_names = ReasonCode.names


def speed_up() -> bool:
    """Make `Properties` and `ReasonCode` cheap to create; True when done (or already)."""
    if Properties.__init__ is _shared_init:
        return True
    probe = Properties(PacketTypes.PUBLISH)
    state = vars(probe)
    if (set(state) != {"packetType", *TABLES} or not isinstance(state["names"], dict)
            or not isinstance(_original_reason_names, Mapping)):
        return False  # not the paho this was written for: leave it be
    _SHARED.update({name: state[name] for name in TABLES})
    _NAMES.update(name.replace(" ", "") for name in state["names"])
    Properties.__init__ = _shared_init  # type: ignore[method-assign]
    Properties.clear = _clear_held  # type: ignore[method-assign]
    ReasonCode.names = dict(_original_reason_names)  # type: ignore[misc]
    return True


def restore() -> None:
    """paho's own classes again (for the tests that compare the two)."""
    Properties.__init__ = _original_init  # type: ignore[method-assign]
    Properties.clear = _original_clear  # type: ignore[method-assign]
    ReasonCode.names = _original_reason_names  # type: ignore[misc]


_SHARED: dict[str, Any] = {}
_NAMES: set[str] = set()


def _shared_init(self: Properties, packetType: int) -> None:  # paho calls it with this name
    state = self.__dict__
    state.update(_SHARED)
    state["packetType"] = packetType


def _clear_held(self: Properties) -> None:
    for name in [n for n in self.__dict__ if n in _NAMES]:
        delattr(self, name)
