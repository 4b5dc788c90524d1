"""paho's MQTT 5 `Properties`, made without rebuilding its tables each time.

paho makes a `Properties` object for every MQTT 5 packet it reads (each
request, each PUBACK) and for every QoS 0 publish it has written (what it hands
`on_publish`), and each one builds paho's tables of property names, types and
packets anew (9.6 µs here), then `unpack` clears it by walking every name
(another 5 µs): about 30 µs of a request's 250 over MQTT. The tables never
change after they are built: `speed_up` makes `Properties.__init__` share one
set of them and `clear` drop only the properties an object holds. The objects
are otherwise paho's own (set, packed, unpacked and compared by its code).

`speed_up` checks first that paho's `Properties` is the one this was written
for (the version pinned in requirements.txt: its tables as the only state of a
new object); with any other it changes nothing. test_mqtt_link compares
objects made both ways, property by property, packed and unpacked.
"""

from __future__ import annotations

from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

TABLES = ("types", "names", "properties")
_original_init = Properties.__init__
_original_clear = Properties.clear


def speed_up() -> bool:
    """Make `Properties` cheap to create and clear; True when done (or already)."""
    if Properties.__init__ is _shared_init:
        return True
    probe = Properties(PacketTypes.PUBLISH)
    state = vars(probe)
    if set(state) != {"packetType", *TABLES} or not isinstance(state["names"], dict):
        return False  # not the paho this was written for: leave it be
    shared = {name: state[name] for name in TABLES}
    names = frozenset(name.replace(" ", "") for name in state["names"])
    _SHARED.update(shared)
    _NAMES.update(names)
    Properties.__init__ = _shared_init  # type: ignore[method-assign]
    Properties.clear = _clear_held  # type: ignore[method-assign]
    return True


def restore() -> None:
    """paho's own `Properties` again (for the tests that compare the two)."""
    Properties.__init__ = _original_init  # type: ignore[method-assign]
    Properties.clear = _original_clear  # type: ignore[method-assign]


_SHARED: dict[str, Any] = {}
_NAMES: set[str] = set()


def _shared_init(self: Properties, packetType: int) -> None:  # paho calls it with this name
    state = self.__dict__
    state.update(_SHARED)
    state["packetType"] = packetType


def _clear_held(self: Properties) -> None:
    for name in [n for n in self.__dict__ if n in _NAMES]:
        delattr(self, name)
