"""The group as this node sees it: its peers, their health and their load.

A `PeerTable` is plain data, fed by what the node hears (statuses from the
status topic, forwards that failed) and read by placement. It does no I/O and
reads no clock of its own: every change takes `now` (a monotonic time), so its
rules can be tested step by step.

A peer is one of:
- `unknown`: in nodes.conf, never heard of. It takes forwards only where the
  policy is not about load (`external`, `round_robin`): nodes of the original
  FRACTAL runtime manager publish no status.
- `healthy`: its statuses (and load reports) arrive.
- `silent`: three heartbeats (the status interval it announces) without one; `offline`: it said so (a clean
  stop, or its last will when it vanished); `failed`: a forward to it failed.
  Out of placement until it is heard from again (a `failed` peer that publishes
  no status is tried again after `retry_s`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..config import PeerAddress
from ..core.topics import node_topic, topic_name_problem

MISSED_INTERVALS = 3
MAX_COUNT = 10**9
MAX_DISCOVERED = 256  # peers heard of but not in nodes.conf: the table holds at most this many
FORGET_AFTER_INTERVALS = 30  # a discovered peer silent this long leaves the table
MAX_FLOWS_LISTED = 1000
MAX_TEXT = 256
LOAD_KEYS = ("in_flight", "queued", "capacity", "load", "time")  # what a load report may change


def _text(value: Any, limit: int = MAX_TEXT) -> str | None:
    return value if isinstance(value, str) and len(value) <= limit and value.isprintable() else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def checked_status(raw: Any) -> dict[str, Any] | None:
    """A status from the broker as this node keeps it: the known keys with
    values of the right type and size, nothing else (a status is input: it may
    be forged, huge or nested to any depth). None when it names no node or no
    state."""
    if not isinstance(raw, dict):
        return None
    node = raw.get("node")
    node = str(node) if isinstance(node, int) and not isinstance(node, bool) else _text(node, 64)
    if not node or raw.get("state") not in ("online", "offline"):
        return None
    status: dict[str, Any] = {"node": node, "state": raw["state"]}
    for key in ("in_flight", "queued", "capacity", "queue_depth", "processes", "interval_ms", "pid"):
        if key in raw and _count(raw[key], -1) >= 0:
            status[key] = _count(raw[key])
    for key in ("time", "load", "uptime_s", "cpu_percent", "rss_mb"):
        if _number(raw.get(key)) is not None:
            status[key] = _number(raw[key])
    for key, limit in (("reason", 200), ("version", 32), ("config_dir", 4096)):
        if _text(raw.get(key), limit) is not None:
            status[key] = raw[key]
    if isinstance(raw.get("ready"), bool):
        status["ready"] = raw["ready"]
    flows = raw.get("flows")
    if isinstance(flows, list) and len(flows) <= MAX_FLOWS_LISTED and all(_text(f, 64) for f in flows):
        status["flows"] = list(flows)
    rest = raw.get("rest")
    if isinstance(rest, dict):
        checked = {"protocol": rest.get("protocol") or "http", "ip": _text(rest.get("ip")),
                   "port": _count(rest.get("port")), "endpoint": _text(rest.get("endpoint") or "startrm")}
        if checked["protocol"] in ("http", "https") and checked["ip"] and 0 < checked["port"] < 65536 \
                and checked["endpoint"]:
            status["rest"] = checked
    topic = raw.get("mqtt_topic")
    if isinstance(topic, str) and len(topic) <= 1024 and not topic_name_problem(topic):
        status["mqtt_topic"] = topic
    if raw.get("mqtt_batches") is True:
        status["mqtt_batches"] = True
    session = raw.get("mqtt_session")
    if isinstance(session, dict) and _text(session.get("shared_group"), 128):
        ids = session.get("client_ids")
        if isinstance(ids, list) and 0 < len(ids) <= 64 and all(_text(i, 128) for i in ids):
            status["mqtt_session"] = {"client_ids": list(ids), "shared_group": session["shared_group"]}
    instance = raw.get("instance")
    if isinstance(instance, dict) and _text(instance.get("host")) and _count(instance.get("pid"), -1) >= 0:
        status["instance"] = {"host": instance["host"], "pid": _count(instance["pid"])}
    return status


def _count(value: Any, default: int = 0) -> int:
    """A count from a status: a whole, finite, non-negative number, else `default`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    if not math.isfinite(value) or not 0 <= value <= MAX_COUNT:
        return default
    return int(value)


def node_load(status: dict[str, Any]) -> float:
    """A node's load from its status: flows in flight and queued per worker."""
    capacity = max(1, _count(status.get("capacity"), 1))
    return (_count(status.get("in_flight")) + _count(status.get("queued"))) / capacity


@dataclass
class Peer:
    id: str
    address: PeerAddress | None  # how to reach it over REST (from nodes.conf, else from its status)
    configured: bool  # listed in nodes.conf
    state: str = "unknown"
    reason: str = "not heard from yet"
    status: dict[str, Any] = field(default_factory=dict)
    last_heard: float | None = None
    retry_at: float = 0.0
    answered_at: float | None = None  # when it last answered a forward (for peers that publish no status)
    forwarding: int = 0  # forwards from this node still waiting for its answer

    @property
    def load(self) -> float:
        """Its last reported load, plus what this node sent it since."""
        capacity = max(1, _count(self.status.get("capacity"), 1))
        return node_load(self.status) + self.forwarding / capacity

    expected_topic: str | None = None  # the one request topic it may announce: `<mqtt.topic>/node/<id>`

    @property
    def mqtt_topic(self) -> str | None:
        """The peer's own request topic, when it announces the documented one
        (a status naming another topic, forged or not, is not followed)."""
        topic = self.status.get("mqtt_topic")
        return topic if topic is not None and topic == self.expected_topic else None

    def to_dict(self, now: float) -> dict[str, Any]:
        view: dict[str, Any] = {"id": self.id, "state": self.state, "reason": self.reason,
                                "configured": self.configured, "load": round(self.load, 3),
                                "forwarding": self.forwarding}
        view["last_heard_s_ago"] = None if self.last_heard is None else round(now - self.last_heard, 1)
        view["last_answer_s_ago"] = None if self.answered_at is None else round(now - self.answered_at, 1)
        for key in ("in_flight", "queued", "capacity", "cpu_percent", "rss_mb", "uptime_s", "rest", "mqtt_topic",
                    "mqtt_batches", "version", "flows"):
            if key in self.status:
                view[key] = self.status[key]
        return view


class PeerTable:
    """`topic`: the group's request topic (comm.conf mqtt.topic), from which each
    peer's own topic is known; a status cannot name another."""

    def __init__(self, home_id: str, configured: dict[str, PeerAddress], interval_s: float, discover: bool,
                 retry_s: float | None = None, topic: str | None = None) -> None:
        self.home_id = home_id
        self.interval_s = interval_s
        self.discover = discover
        self.topic = topic
        self.retry_s = retry_s if retry_s is not None else max(1.0, MISSED_INTERVALS * interval_s)
        self.peers: dict[str, Peer] = {nid: self._peer(nid, node, True) for nid, node in configured.items()
                                       if nid != home_id}

    def _peer(self, node_id: str, address: PeerAddress | None, configured: bool) -> Peer:
        expected = node_topic(self.topic, node_id) if self.topic else None
        return Peer(node_id, address, configured, expected_topic=expected)

    def reconfigure(self, configured: dict[str, PeerAddress]) -> None:
        """A reload of nodes.conf: new peers join (unknown until heard from), a
        changed one keeps what was heard of it, a removed one leaves (or stays as
        discovered when `discover` is on and it was heard from)."""
        for nid, node in configured.items():
            if nid == self.home_id:
                continue
            peer = self.peers.get(nid)
            if peer is None:
                self.peers[nid] = self._peer(nid, node, True)
            else:
                peer.address, peer.configured = node, True
        for nid, peer in list(self.peers.items()):
            if peer.configured and nid not in configured:
                if self.discover and peer.last_heard is not None:
                    peer.configured, peer.address = False, _node_from_status(nid, peer.status)
                else:
                    del self.peers[nid]

    # ----- what the node hears -------------------------------------------------------------
    def heard(self, raw: dict[str, Any], now: float) -> Peer | None:
        """A status from the status topic (checked here: only what
        `checked_status` keeps is kept). Returns the peer it is about, or None
        when it is this node's own, from a node that is not a peer, or no status."""
        status = checked_status(raw)
        if status is None or status["node"] == self.home_id:
            return None
        node_id = status["node"]
        peer = self.peers.get(node_id)
        if raw.get("report") == "load" and status["state"] == "online":
            # a small load report: what it says replaces the load of the status heard before
            if peer is None or peer.last_heard is None:
                return None  # its whole status (retained) comes first, or the peer is not ours
            peer.status = {**peer.status, **{k: status[k] for k in LOAD_KEYS if k in status}}
            peer.last_heard = now
            if peer.state != "healthy":
                peer.state, peer.reason = "healthy", "statuses arrive"
            return peer
        if peer is None:
            discovered = sum(1 for p in self.peers.values() if not p.configured)
            if not self.discover or discovered >= MAX_DISCOVERED or status["state"] != "online":
                return None
            peer = self.peers[node_id] = self._peer(node_id, None, False)
        if not peer.configured:
            peer.address = _node_from_status(node_id, status) or peer.address
        peer.status = status
        peer.last_heard = now
        if status.get("state") == "offline":
            reason = status.get("reason")
            peer.state, peer.reason = "offline", reason[:200] if isinstance(reason, str) and reason else "said it is offline"
        else:
            peer.state, peer.reason = "healthy", "statuses arrive"
        return peer

    def forward_answered(self, node_id: str, now: float) -> None:
        """A forward got the peer's result: for a peer that publishes no status
        (the original's nodes, REST-only ones), the only sign it serves."""
        peer = self.peers.get(node_id)
        if peer is not None:
            peer.answered_at = now
            if peer.state == "unknown":
                peer.reason = "no status; answers forwards"

    def forward_failed(self, node_id: str, why: str, now: float) -> None:
        peer = self.peers.get(node_id)
        if peer is not None:
            peer.state, peer.reason, peer.retry_at = "failed", f"a forward failed: {why}", now + self.retry_s

    def tick(self, now: float) -> list[Peer]:
        """Mark peers whose statuses stopped as silent, and give failed peers that
        publish no status another chance. Returns the peers that went silent."""
        gone = []
        for peer in list(self.peers.values()):
            if not peer.configured and peer.last_heard is not None and \
                    now - peer.last_heard > FORGET_AFTER_INTERVALS * _interval_s(peer.status, self.interval_s):
                del self.peers[peer.id]  # a discovered peer long silent: forgotten (the table stays bounded)
                continue
            if peer.state == "healthy" and peer.last_heard is not None and self.interval_s > 0:
                interval = _interval_s(peer.status, self.interval_s)
                if now - peer.last_heard > MISSED_INTERVALS * interval:
                    peer.state = "silent"
                    peer.reason = f"no status for {now - peer.last_heard:.1f} s ({MISSED_INTERVALS} intervals)"
                    gone.append(peer)
            elif peer.state == "failed" and peer.last_heard is None and now >= peer.retry_at:
                peer.state, peer.reason = "unknown", "to be tried again"
        return gone

    # ----- what placement reads ----------------------------------------------------------------
    def healthy(self) -> list[Peer]:
        # list() first: the REST thread reads the table while the loop changes it
        return [p for p in list(self.peers.values()) if p.state == "healthy" and p.address is not None]

    def usable(self, node_id: str) -> bool:
        """Whether a forward to this node may be tried: healthy, or never heard of
        (an original-style node that publishes no status)."""
        peer = self.peers.get(node_id)
        return peer is not None and peer.address is not None and peer.state in ("healthy", "unknown")

    def to_dict(self, now: float) -> list[dict[str, Any]]:
        return [p.to_dict(now) for p in sorted(list(self.peers.values()), key=lambda p: p.id)]


def _interval_s(status: dict[str, Any], default: float) -> float:
    """The status interval a peer announces (50 ms to an hour), else ours."""
    ms = _count(status.get("interval_ms"), 0)
    return min(3600.0, max(0.05, ms / 1000)) if ms else default


def _node_from_status(node_id: str, status: dict[str, Any]) -> PeerAddress | None:
    """How to reach a discovered peer: the REST address in its status, when it is one."""
    rest = status.get("rest")
    if not isinstance(rest, dict):
        return None
    protocol, ip, port, endpoint = (rest.get("protocol") or "http", rest.get("ip"), _count(rest.get("port")),
                                    rest.get("endpoint") or "startrm")
    if protocol not in ("http", "https") or not 0 < port < 65536 or not isinstance(endpoint, str):
        return None
    if not isinstance(ip, str) or not ip or any(c.isspace() or c in "/?#@" for c in ip):
        return None
    return PeerAddress(id=node_id, protocol=protocol, ip=ip, port=port, endpoint=endpoint)
