"""The group as this node sees it: its peers, their health and their load.

A `PeerTable` is plain data, fed by what the node hears (statuses from the
status topic, forwards that failed) and read by placement. It does no I/O and
reads no clock of its own: every change takes `now` (a monotonic time), so its
rules can be tested step by step.

A peer is one of:
- `unknown`: in nodes.conf, never heard of. It takes forwards only where the
  policy is not about load (`external`, `round_robin`): nodes of the original
  FRACTAL runtime manager publish no status.
- `healthy`: its statuses arrive.
- `silent`: three status intervals without one; `offline`: it said so (a clean
  stop, or its last will when it vanished); `failed`: a forward to it failed.
  Out of placement until it is heard from again (a `failed` peer that publishes
  no status is tried again after `retry_s`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import Node

MISSED_INTERVALS = 3


def node_load(status: dict[str, Any]) -> float:
    """A node's load from its status: flows in flight and queued per worker."""
    try:
        capacity = max(1, int(status.get("capacity") or 1))
        return (int(status.get("in_flight") or 0) + int(status.get("queued") or 0)) / capacity
    except (TypeError, ValueError):
        return 1.0


@dataclass
class Peer:
    id: str
    node: Node | None  # how to reach it over REST (from nodes.conf, else from its status)
    configured: bool  # listed in nodes.conf
    state: str = "unknown"
    reason: str = "not heard from yet"
    status: dict[str, Any] = field(default_factory=dict)
    last_heard: float | None = None
    retry_at: float = 0.0
    forwarding: int = 0  # forwards from this node still waiting for its answer

    @property
    def load(self) -> float:
        """Its last reported load, plus what this node sent it since."""
        capacity = max(1, int(self.status.get("capacity") or 1)) if self.status else 1
        return node_load(self.status) + self.forwarding / capacity

    @property
    def mqtt_topic(self) -> str | None:
        topic = self.status.get("mqtt_topic") if self.status else None
        return topic if isinstance(topic, str) and topic else None

    def to_dict(self, now: float) -> dict[str, Any]:
        view: dict[str, Any] = {"id": self.id, "state": self.state, "reason": self.reason,
                                "configured": self.configured, "load": round(self.load, 3),
                                "forwarding": self.forwarding}
        view["last_heard_s_ago"] = None if self.last_heard is None else round(now - self.last_heard, 1)
        for key in ("in_flight", "queued", "capacity", "cpu_percent", "rss_mb", "uptime_s", "rest", "mqtt_topic",
                    "version", "flows"):
            if key in self.status:
                view[key] = self.status[key]
        return view


class PeerTable:
    def __init__(self, home_id: str, configured: dict[str, Node], interval_s: float, discover: bool,
                 retry_s: float | None = None) -> None:
        self.home_id = home_id
        self.interval_s = interval_s
        self.discover = discover
        self.retry_s = retry_s if retry_s is not None else max(1.0, MISSED_INTERVALS * interval_s)
        self.peers: dict[str, Peer] = {nid: Peer(nid, node, True) for nid, node in configured.items() if nid != home_id}

    # ----- what the node hears -------------------------------------------------------------
    def heard(self, status: dict[str, Any], now: float) -> Peer | None:
        """A status from the status topic. Returns the peer it is about, or None
        when it is this node's own or from a node that is not a peer."""
        node_id = str(status.get("node") or "")
        if not node_id or node_id == self.home_id:
            return None
        peer = self.peers.get(node_id)
        if peer is None:
            if not self.discover:
                return None
            peer = self.peers[node_id] = Peer(node_id, None, False)
        if not peer.configured:
            peer.node = _node_from_status(node_id, status) or peer.node
        peer.status = status
        peer.last_heard = now
        if status.get("state") == "offline":
            peer.state, peer.reason = "offline", str(status.get("reason") or "said it is offline")
        else:
            peer.state, peer.reason = "healthy", "statuses arrive"
        return peer

    def forward_failed(self, node_id: str, why: str, now: float) -> None:
        peer = self.peers.get(node_id)
        if peer is not None:
            peer.state, peer.reason, peer.retry_at = "failed", f"a forward failed: {why}", now + self.retry_s

    def tick(self, now: float) -> list[Peer]:
        """Mark peers whose statuses stopped as silent, and give failed peers that
        publish no status another chance. Returns the peers that went silent."""
        gone = []
        for peer in list(self.peers.values()):
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
        return [p for p in list(self.peers.values()) if p.state == "healthy" and p.node is not None]

    def usable(self, node_id: str) -> bool:
        """Whether a forward to this node may be tried: healthy, or never heard of
        (an original-style node that publishes no status)."""
        peer = self.peers.get(node_id)
        return peer is not None and peer.node is not None and peer.state in ("healthy", "unknown")

    def to_dict(self, now: float) -> list[dict[str, Any]]:
        return [p.to_dict(now) for p in sorted(list(self.peers.values()), key=lambda p: p.id)]


def _interval_s(status: dict[str, Any], default: float) -> float:
    try:
        return max(0.05, float(status.get("interval_ms")) / 1000)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


def _node_from_status(node_id: str, status: dict[str, Any]) -> Node | None:
    """How to reach a discovered peer: the REST address in its status."""
    rest = status.get("rest")
    if not isinstance(rest, dict):
        return None
    try:
        return Node(id=node_id, protocol=str(rest.get("protocol") or "http"), ip=str(rest["ip"]), port=int(rest["port"]),
                    endpoint=str(rest.get("endpoint") or "startrm"),
                    )
    except (KeyError, TypeError, ValueError):
        return None
