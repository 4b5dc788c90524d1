"""Membership over the broker: this node's status out, its group's statuses in.

Traffic grows with the group, not with the realm squared: a node says what
changed, and hears its own group only.

- **The whole status**, retained, on its status topic (`<status_prefix>/<id>`,
  or `<status_prefix>/group/<group>/<id>` in a named group): what it is, how
  to reach it, its load. It goes out when the presence link connects, when
  something in it other than the load changes (ready, flows, address), when
  a peer or a tool asks (`{"command": "status"}` on its control topic), and
  at least every `status_heartbeat_ms` (the heartbeat). A fresh subscriber
  sees the group at once; tools read the whole realm's records on demand.
- **Load reports**, small and not retained, on the same topic: every
  `status_interval_ms` the node looks at its load and reports it when it
  moved by `load_report_delta` or more since the last report, or went to or
  from idle. Placement sees a load change within an interval.
- **Death**: the presence link (clean session, no requests) has the
  `offline` status as its last will and a short keepalive
  (`presence_keepalive_s`): a killed process is seen at once, a stopped one
  (SIGSTOP, a lost host) within 1.5 keepalives, when the broker gives up on
  it; a clean stop publishes `offline` itself. Three heartbeats of silence
  mark a peer silent as well, for whatever the will cannot tell.

What it hears goes into the `PeerTable` that placement reads; every interval
the table marks peers that went quiet.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson
import paho.mqtt.client as mqtt

from .. import __version__
from ..core.lifecycle import Service
from ..core.topics import node_control_topic, status_filters, status_topic
from ..mqtt.link import MqttLink
from .peers import Peer, PeerTable
from .twin import DuplicateNodeId, Instance, find_twin

log = logging.getLogger("peers")
MAX_STATUS_BYTES = 64 * 1024  # a real status is under 2 KiB
MIN_GAP_S = 0.2  # whole statuses asked for over the control topic: at most one per this


class Membership(Service):
    """A service of the node (core/lifecycle.py): after the presence link and
    the engine; `stop` publishes `offline` before the link disconnects."""

    name = "membership"

    def __init__(self, node_id: str, prefix: str, interval_ms: int, link: MqttLink, table: PeerTable,
                 status: Callable[[], dict[str, Any]], publish: bool = True,
                 instance: Instance | None = None,
                 on_gone: Callable[[Peer], None] | None = None, session: dict[str, Any] | None = None,
                 group: str = "", heartbeat_ms: int = 5000, load_delta: float = 0.25) -> None:
        self.node_id, self.prefix, self.group = node_id, prefix, group
        self.topic = status_topic(prefix, node_id, group)
        self.interval_s = interval_ms / 1000  # how often the load is looked at
        self.heartbeat_s = max(heartbeat_ms / 1000, self.interval_s)  # the whole status at least this often
        self.load_delta = load_delta
        self._reported: tuple[float, int] | None = None  # the load peers last heard, and the capacity behind it
        self._identity: bytes = b""  # the status without what changes all the time: a change of it goes out at once
        self._last_full = 0.0
        self.reports = 0  # load reports sent
        self._asked: asyncio.TimerHandle | None = None  # a whole status asked for, due shortly
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
        for topic in status_filters(prefix, group):
            link.subscribe(topic, self._on_status, qos=1)

    async def setup(self) -> None:
        """Before any link connects: stop when another process runs this node id
        (twin.py); its connections and ours would throw each other off the broker."""
        if not self.publishes:
            return
        found = await asyncio.get_running_loop().run_in_executor(
            None, partial(find_twin, self.link.cfg, self.topic, self.node_id, self.instance, self.interval_s,
                          control=node_control_topic(self.prefix, self.node_id)))
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
        if self._asked is not None:
            self._asked.cancel()
            self._asked = None
        if self._task is not None:
            self._task.cancel()
            self._task = None

    # ----- out ------------------------------------------------------------------------
    def status_doc(self, part: dict[str, Any] | None = None) -> dict[str, Any]:
        now_m, now_cpu = time.monotonic(), time.process_time()
        then_m, then_cpu = self._cpu
        self._cpu = (now_m, now_cpu)
        doc = {"node": self.node_id, "state": "online", "time": round(time.time(), 3),
               "interval_ms": round(self.heartbeat_s * 1000), "version": __version__, "pid": os.getpid(),
               "instance": self.instance.to_dict(), **({"mqtt_session": self.session} if self.session else {}),
               "cpu_percent": round(100 * (now_cpu - then_cpu) / max(1e-6, now_m - then_m), 1), "rss_mb": rss_mb()}
        if self.group:
            doc["group"] = self.group
        doc.update(self.status() if part is None else part)
        return doc

    def _offline(self, reason: str) -> bytes:
        return orjson.dumps({"node": self.node_id, "state": "offline", "reason": reason,
                             "interval_ms": round(self.heartbeat_s * 1000), "version": __version__,
                             **({"mqtt_session": self.session} if self.session else {})})

    def _publish_status(self) -> None:
        """The whole status, retained (on connect, on a change, on request, every heartbeat)."""
        if not self.publishes or not self.link.connected:
            return
        try:
            part = self.status()
            doc = self.status_doc(part)
            self.link.publish(self.topic, orjson.dumps(doc), qos=0, retain=True)
            self.published += 1
            self._last_full = time.monotonic()
            self._identity = _identity(part)
            self._reported = (_load(doc), int(doc.get("capacity") or 1))
        except Exception:
            log.exception("publishing this node's status failed")

    def publish_now(self) -> None:
        """A peer or a tool asked for the whole status (its control topic): at
        once, or, when one went out less than `MIN_GAP_S` ago, right after that
        (asking in a loop costs the node one status per gap)."""
        if self._asked is not None:
            return
        wait = MIN_GAP_S - (time.monotonic() - self._last_full)
        if wait <= 0:
            self._publish_status()
            return

        def due() -> None:
            self._asked = None
            self._publish_status()

        self._asked = asyncio.get_running_loop().call_later(wait, due)

    def _look(self) -> None:
        """Every interval: the whole status when it is due or changed, else a
        load report when the load moved enough, else nothing."""
        if not self.publishes or not self.link.connected:
            return
        if time.monotonic() - self._last_full >= self.heartbeat_s - 0.001:
            self._publish_status()
            return
        try:
            current = self.status()
        except Exception:
            log.exception("reading this node's status failed")
            return
        if _identity(current) != self._identity:
            self._publish_status()
            return
        load = _load(current)
        if self._reported is not None and not _moved(self._reported[0], load, self.load_delta):
            return
        report = {"node": self.node_id, "state": "online", "report": "load", "time": round(time.time(), 3),
                  **{k: current[k] for k in LOAD_KEYS if k in current}}
        try:
            self.link.publish(self.topic, orjson.dumps(report), qos=0, retain=False)
            self.reports += 1
            self._reported = (load, int(current.get("capacity") or 1))
        except Exception:
            log.exception("publishing this node's load failed")

    async def _beat(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.interval_s)
            self._look()
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


LOAD_KEYS = ("in_flight", "queued", "capacity", "load")
CHANGING_KEYS = frozenset(("time", "cpu_percent", "rss_mb", "uptime_s", *LOAD_KEYS))


def _load(doc: dict[str, Any]) -> float:
    load = doc.get("load")
    return float(load) if isinstance(load, (int, float)) else 0.0


def _moved(before: float, now: float, delta: float) -> bool:
    """Whether a load is worth a report: moved by `delta` or more, or to or from idle."""
    return abs(now - before) >= delta - 1e-9 or (before == 0) != (now == 0)


def _identity(doc: dict[str, Any]) -> bytes:
    """A status without what changes all the time: when this changes, peers hear it at once."""
    return orjson.dumps({k: v for k, v in doc.items() if k not in CHANGING_KEYS}, option=orjson.OPT_SORT_KEYS)


def rss_mb() -> float:
    """This process's resident memory now, in MB."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 1e6, 1)
    except (OSError, ValueError, IndexError):
        return 0.0
