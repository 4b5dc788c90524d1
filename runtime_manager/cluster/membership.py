"""Membership over the broker: this node's status out, its peers' statuses in.

Every `status_interval_ms` the node publishes its status, **retained**, on
`<status_prefix>/<node id>` (default `rm/nodes/<id>`): what it is, how to
reach it, and its load. A fresh subscriber to `rm/nodes/+` sees the whole
group at once. The status goes out on a link of its own, the presence link
(clean session, no requests): its last will is the `offline` status, so when
the process vanishes the broker says so within its keepalive; a clean stop
publishes `offline` itself. (The node's main link keeps its will for the
orchestrator, which has its own rules for it.)

What it hears on `rm/nodes/+` goes into the `PeerTable` that placement reads;
every interval the table marks peers that went quiet.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import orjson
import paho.mqtt.client as mqtt

from .. import __version__
from ..core.lifecycle import Service
from ..core.topics import status_topic
from ..mqtt.link import MqttLink
from .peers import Peer, PeerTable
from .twin import DuplicateNodeId, Instance, find_twin

log = logging.getLogger("peers")
MAX_STATUS_BYTES = 64 * 1024  # a real status is under 2 KiB


class Membership(Service):
    """A service of the node (core/lifecycle.py): after the presence link and
    the engine; `stop` publishes `offline` before the link disconnects."""

    name = "membership"

    def __init__(self, node_id: str, prefix: str, interval_ms: int, link: MqttLink, table: PeerTable,
                 status: Callable[[], dict[str, Any]], publish: bool = True,
                 instance: Instance | None = None,
                 on_gone: Callable[[Peer], None] | None = None, session: dict[str, Any] | None = None) -> None:
        self.node_id, self.prefix = node_id, prefix
        self.topic = status_topic(prefix, node_id)
        self.interval_s = interval_ms / 1000
        self.link, self.table, self.status = link, table, status
        self.publishes = publish  # False: a worker that only listens (`serve --processes`, workers after the first)
        self._task: asyncio.Task | None = None
        self._cpu = (time.monotonic(), time.process_time())
        self.published = 0
        self.instance = instance or Instance.this(supervised=False)
        self.on_gone = on_gone  # a peer left placement (offline or silent)
        # its sessions on the shared subscription, in every status and in the will:
        # what a survivor takes over when this node is gone (entrypoints/takeover.py)
        self.session = session
        if publish:
            link.will(self.topic, self._offline("vanished (its last will)"), qos=1, retain=True)
            link.on_connected(self._publish_status)
        link.subscribe(f"{prefix}/+", self._on_status, qos=1)

    async def setup(self) -> None:
        """Before any link connects: stop when another process runs this node id
        (twin.py); its connections and ours would throw each other off the broker."""
        if not self.publishes:
            return
        found = await asyncio.get_running_loop().run_in_executor(
            None, find_twin, self.link.cfg, self.topic, self.node_id, self.instance, self.interval_s)
        if found is not None:
            other, ago = found
            raise DuplicateNodeId(
                f"node id {self.node_id} is already running: process {other.pid} on host {other.host} published its "
                f"status {ago:.1f} s ago on '{self.topic}'. Give this node another id (--node-id, or runtime.conf "
                f"node_id) or stop the other one; the running node was left alone")

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._beat(), name="membership")

    async def stop(self) -> None:
        self.kill()
        if self.publishes and self.link.connected:
            try:
                self.link.publish(self.topic, self._offline("stopped"), qos=1, retain=True)
            except Exception as exc:
                log.warning("could not publish the offline status: %s", exc)

    def kill(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    # ----- out ------------------------------------------------------------------------
    def status_doc(self) -> dict[str, Any]:
        now_m, now_cpu = time.monotonic(), time.process_time()
        then_m, then_cpu = self._cpu
        self._cpu = (now_m, now_cpu)
        doc = {"node": self.node_id, "state": "online", "time": round(time.time(), 3),
               "interval_ms": round(self.interval_s * 1000), "version": __version__, "pid": os.getpid(),
               "instance": self.instance.to_dict(), **({"mqtt_session": self.session} if self.session else {}),
               "cpu_percent": round(100 * (now_cpu - then_cpu) / max(1e-6, now_m - then_m), 1), "rss_mb": rss_mb()}
        doc.update(self.status())
        return doc

    def _offline(self, reason: str) -> bytes:
        return orjson.dumps({"node": self.node_id, "state": "offline", "reason": reason,
                             "interval_ms": round(self.interval_s * 1000), "version": __version__,
                             **({"mqtt_session": self.session} if self.session else {})})

    def _publish_status(self) -> None:
        if not self.publishes or not self.link.connected:
            return
        try:
            self.link.publish(self.topic, orjson.dumps(self.status_doc()), qos=0, retain=True)
            self.published += 1
        except Exception:
            log.exception("publishing this node's status failed")

    async def _beat(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.interval_s)
            self._publish_status()
            now, then = time.monotonic(), last
            last = now
            if now - then > 2 * self.interval_s:
                # This node was not running (stopped, its loop held): the silence it
                # would see is its own. Its peers get an interval to be heard again.
                continue
            for peer in self.table.tick(now):
                log.warning("node %s left placement: %s", peer.id, peer.reason)
                self._gone(peer)

    # ----- in -------------------------------------------------------------------------
    def _on_status(self, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return  # a retained status cleared
        if len(msg.payload) > MAX_STATUS_BYTES:
            log.warning("a status of %d bytes on '%s' (at most %d); ignored", len(msg.payload), msg.topic, MAX_STATUS_BYTES)
            return
        try:
            status = orjson.loads(msg.payload)
        except orjson.JSONDecodeError:
            log.warning("a status on '%s' is not JSON; ignored", msg.topic)
            return
        if not isinstance(status, dict) or str(status.get("node")) != msg.topic.rsplit("/", 1)[-1]:
            log.warning("a status on '%s' does not name its node; ignored", msg.topic)
            return
        peer = self.table.peers.get(str(status["node"]))
        before = peer.state if peer else None
        peer = self.table.heard(status, time.monotonic())
        if peer is not None and peer.state != before:
            level = logging.INFO if peer.state == "healthy" else logging.WARNING
            log.log(level, "node %s is %s (%s)", peer.id, peer.state, peer.reason)
            if peer.state == "offline":
                self._gone(peer)

    def _gone(self, peer: Peer) -> None:
        if self.on_gone is not None:
            try:
                self.on_gone(peer)
            except Exception:
                log.exception("acting on node %s gone failed", peer.id)


def rss_mb() -> float:
    """This process's resident memory now, in MB."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 1e6, 1)
    except (OSError, ValueError, IndexError):
        return 0.0
