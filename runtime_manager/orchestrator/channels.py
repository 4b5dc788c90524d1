"""Module channels over the node's MQTT link.

One subscription per topic that running modules may read, shared by every
module that reads it and dropped with the last; a message on it goes to each
of those modules' inboxes. A module's writes are published at QoS 1 from the
node's loop; each frees its slot (`ModuleChannels` allows MAX_PENDING) when the
broker has it, or when it could not be sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import paho.mqtt.client as mqtt

from ..mqtt.link import MqttLink
from ..wasm.channels import Channel, ModuleChannels

log = logging.getLogger("orch")


class ChannelRouter:
    def __init__(self, link: MqttLink) -> None:
        self.link = link
        self.loop: asyncio.AbstractEventLoop | None = None
        self._readers: dict[str, list[tuple[ModuleChannels, Channel]]] = {}  # topic -> who reads it

    # ----- on the loop ---------------------------------------------------------------
    def attach(self, module: ModuleChannels) -> None:
        """Subscribe what `module` may read (before it starts, so nothing sent after it is missed)."""
        self.loop = asyncio.get_running_loop()
        for channel in module.readers():
            if channel.topic not in self._readers and self.link.listens_to(channel.topic):
                raise ValueError(f"channel {channel.path!r}: the node itself listens on {channel.topic!r}")
        for channel in module.readers():
            readers = self._readers.setdefault(channel.topic, [])
            if not readers:
                self.link.subscribe(channel.topic, self._on_message, qos=1)
            readers.append((module, channel))

    def detach(self, module: ModuleChannels) -> None:
        for channel in module.readers():
            readers = [(m, c) for m, c in self._readers.get(channel.topic, []) if m is not module]
            if readers:
                self._readers[channel.topic] = readers
            elif self._readers.pop(channel.topic, None) is not None:
                self.link.unsubscribe(channel.topic)

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        for module, channel in list(self._readers.get(msg.topic, [])):
            module.deliver(channel, bytes(msg.payload))

    @property
    def topics(self) -> list[str]:
        return sorted(self._readers)

    # ----- from a module's thread -------------------------------------------------------
    def send(self, channel: Channel, payload: bytes, gone: Callable[[], None]) -> None:
        """Publish a module's write; `gone` runs once the broker has it or it failed."""
        def publish() -> None:
            try:
                if not self.link.fits(channel.topic, payload):
                    raise ValueError(f"{len(payload)} bytes exceed the broker's maximum packet size")
                self.link.publish(channel.topic, payload, qos=1, on_acked=lambda _ok: gone())
            except Exception as exc:
                log.error("channel %s: publish on %r failed: %s", channel.path, channel.topic, exc)
                gone()

        loop = self.loop
        if loop is None or loop.is_closed():
            gone()
            return
        try:
            loop.call_soon_threadsafe(publish)
        except RuntimeError:  # the loop closed: the node is stopping
            gone()
