"""Where a request runs: at home or on a peer (docs/architecture.md, load balancing).

`Placer.decide` chooses with the policy of load_balancer.conf and, when a peer
is chosen, `Placer.forward` sends the request to it: over REST (`POST` with
`is_load_balancing: true`, the original protocol) or over MQTT to the peer's
own request topic, as nodes.conf says for that peer. A forward that fails
marks the peer failed in the peer table and tries the next healthy peer, then
home. The result's `placement` says what was asked, where the request ran,
why, and what was tried on the way. A forwarded request is never forwarded again.

Policies: `external` (ask the load balancer), `local`, `round_robin` (home and
the peers in turn, skipping peers known to be down), `least_loaded` (the
healthy node with the lowest load, home included; ties go home) and
`local_first` (home while its load is under `threshold`, else the
least-loaded healthy peer). Load is flows in flight and queued per worker.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import orjson

from ..config import Config, PeerAddress
from ..core.errors import FLOW_ERROR_CODES, ForwardFailed, TooLargeToForward
from ..core.request import FlowRequest, forward_body
from ..core.result import Placement, Result, peer_result
from ..core.tracecontext import OUTGOING
from ..http.client import HttpClient
from ..logs import short
from .peers import Peer, PeerTable

log = logging.getLogger("lb")

# Sends a request to a peer's MQTT request topic and returns its answer (a result
# object), raising on a timeout or when the broker is out of reach.
MqttForward = Callable[[Peer, FlowRequest, float], Awaitable[dict[str, Any]]]
MAX_TRIES = 3  # peers tried for one request before it runs at home
HOME_MARGIN_S = 1.0  # of a request's time (a quarter at most), kept for running it at home when its forwards fail


class Placer:
    """Placement for one node. `home_load` (what `decide` and `lb_answer` are
    given) is this node's flows in flight and queued per worker, not counting
    the request being placed."""

    def __init__(self, config: Config, http: HttpClient, peers: PeerTable | None = None,
                 mqtt_forward: MqttForward | None = None) -> None:
        self.lb = config.load_balancer
        self.http = http
        self.home_id = config.node_name
        self.peers = peers or PeerTable(self.home_id, config.nodes, 0.0, discover=False)
        self.mqtt_forward = mqtt_forward  # None: peers are reached over REST only
        self._rotation = itertools.count()

    def reconfigure(self, config: Config) -> None:
        """A reload: the load balancer and the peers of nodes.conf, from now on."""
        self.lb = config.load_balancer
        self.peers.reconfigure(config.nodes)

    # ----- deciding ---------------------------------------------------------------------
    async def decide(self, req: FlowRequest, home_load: float) -> tuple[Placement, Peer | None]:
        """Where `req` should run: its placement, and the peer to try first (None: home)."""
        if req.is_load_balancing:
            return Placement("none", "home", "placed by a peer"), None
        lb = self.lb  # a reload meanwhile does not change this request's
        policy = lb.policy
        if policy == "local":
            return Placement("none", "home", "policy local"), None
        if policy == "external":
            first, reason = await self._ask_lb(req, lb.url, lb.timeout_s)
            placement = Placement("lb", "home", reason)
        else:
            first, reason = self.choose_by_policy(home_load, policy)
            placement = Placement(policy if policy != "round_robin" else "policy", "home", reason)
        return placement, first

    def choose_by_policy(self, home_load: float, policy: str) -> tuple[Peer | None, str]:
        """A built-in policy's choice (None: home) and why."""
        if policy == "round_robin":
            ring: list[Peer | None] = [None, *(p for p in list(self.peers.peers.values()) if p.configured)]
            for _ in range(len(ring)):
                peer = ring[next(self._rotation) % len(ring)]
                if peer is None:
                    return None, "policy round_robin"
                if self.peers.usable(peer.id):
                    return peer, "policy round_robin"
            return None, "policy round_robin: no peer usable"
        healthy = sorted(self.peers.healthy(), key=lambda p: (p.load, p.id))
        if policy == "local_first":
            if home_load < self.lb.threshold:
                return None, f"home load {home_load:.2f} under threshold {self.lb.threshold:g}"
            if not healthy:
                return None, f"home load {home_load:.2f} over threshold {self.lb.threshold:g}, no healthy peer"
            best = healthy[0]
            return best, f"home load {home_load:.2f} over threshold {self.lb.threshold:g}; node {best.id} load {best.load:.2f}"
        # least_loaded (and the answer of GET /lb/id_node)
        if not healthy or healthy[0].load >= home_load:
            return None, f"least loaded: home ({home_load:.2f})" + ("" if healthy else ", no healthy peer")
        best = healthy[0]
        return best, f"least loaded: node {best.id} ({best.load:.2f}, home {home_load:.2f})"

    def lb_answer(self, home_load: float) -> dict[str, Any]:
        """This node as a load balancer for others (`GET /lb/id_node`): the node its
        policy picks, home included (`least_loaded` when its own policy is not a
        built-in one over the group)."""
        policy = self.lb.policy if self.lb.policy in ("least_loaded", "local_first", "round_robin") else "least_loaded"
        peer, reason = self.choose_by_policy(home_load, policy)
        node_id = self.home_id if peer is None else peer.id
        whole = node_id.isascii() and node_id.isdigit()  # not "²", a digit to isdigit() that int() refuses
        return {"id_node": int(node_id) if whole else node_id, "policy": policy, "reason": reason}

    async def _ask_lb(self, req: FlowRequest, url: str, timeout_s: float) -> tuple[Peer | None, str]:
        """The peer the load balancer at `url` names (None for home), and why."""
        try:
            resp = await self.http.request("GET", url, timeout=timeout_s, limit=1024 * 1024)
            data = resp.body
            if resp.status != 200:
                return self._home(req, f"load balancer answered HTTP {resp.status}")
        except Exception as exc:  # unreachable, timeout, reset: run at home
            return self._home(req, f"load balancer unreachable ({type(exc).__name__}: {exc})")
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            return self._home(req, f"load balancer answered non-JSON: {short(data, 60)}")
        if not isinstance(answer, dict) or "id_node" not in answer:
            return self._home(req, f"load balancer answer lacks id_node: {short(answer, 60)}")
        node = answer["id_node"]
        if node is None:
            return None, "load balancer said null"
        if isinstance(node, bool) or not isinstance(node, (int, str)):
            return self._home(req, f"load balancer said {short(node, 40)}, not a node id")
        if str(node) == self.home_id:
            return None, f"load balancer said {node}"
        peer = self.peers.peers.get(str(node))
        if peer is None or peer.address is None:
            return self._home(req, f"node {node} unknown (not in nodes.conf), named by the load balancer")
        return peer, f"load balancer said {node}"

    @staticmethod
    def _home(req: FlowRequest, reason: str) -> tuple[None, str]:
        log.warning("request %s: %s; running at home", req.request_id, reason)
        return None, reason

    # ----- forwarding ---------------------------------------------------------------------
    async def forward(self, first: Peer, req: FlowRequest, placement: Placement, deadline: float) -> Result | None:
        """Run `req` on `first`, else on the next healthy peers by load (at most
        MAX_TRIES in all). Returns the peer's result, or None to run it at home
        (`placement` says why). `deadline` (the loop's clock) is the request's:
        a forward gets what is left of it less a margin for running at home, and
        a peer that does not answer in that time is marked failed."""
        tried: list[str] = []
        loop = asyncio.get_running_loop()
        margin = min(HOME_MARGIN_S, 0.25 * (deadline - loop.time()))
        for peer in itertools.islice(self._candidates(first), MAX_TRIES):
            if not self.peers.usable(peer.id):
                tried.append(f"node {peer.id}: {peer.state} ({peer.reason})")
                continue
            budget = deadline - loop.time() - margin
            if budget <= 0:
                tried.append(f"node {peer.id}: not tried, too little of the request's time left")
                break
            placement.chosen = f"node {peer.id}"  # what a timeout of the whole request reports
            placement.tried = tried
            try:
                answer = await self._forward(peer, req, budget)
            except TooLargeToForward as exc:  # not the peer's doing: it stays as it is
                tried.append(f"node {peer.id}: not sent, {exc}")
                continue
            except ForwardFailed as exc:
                why = str(exc)
                tried.append(f"node {peer.id}: {why}")
                self.peers.forward_failed(peer.id, why, time.monotonic())
                log.warning("request %s: node %s: %s", req.request_id, peer.id, why)
                continue
            self.peers.forward_answered(peer.id, time.monotonic())
            return peer_result(req, answer, peer.id, placement)
        placement.chosen = "home"
        placement.tried = tried
        placement.reason = f"{placement.reason}, but " + "; ".join(t.replace(": ", " ", 1) for t in tried)
        log.warning("request %s: running at home (%s)", req.request_id, "; ".join(tried))
        return None

    def _candidates(self, first: Peer) -> Iterator[Peer]:
        """`first`, then (looked at only when it fails) the other healthy peers by load."""
        yield first
        yield from sorted((p for p in self.peers.healthy() if p is not first), key=lambda p: (p.load, p.id))

    async def _forward(self, peer: Peer, req: FlowRequest, budget_s: float) -> dict[str, Any]:
        """The peer's answer, checked to be a result it stands by, within
        `budget_s` (or the peer's own timeout_s, when shorter). Raises ForwardFailed."""
        node = peer.address
        assert node is not None
        timeout_s = min(node.timeout_s, budget_s)
        peer.forwarding += 1
        try:
            if node.forward == "mqtt" and self.mqtt_forward is not None and peer.mqtt_topic:
                try:
                    answer = await self.mqtt_forward(peer, req, timeout_s)
                except TooLargeToForward:
                    raise
                except Exception as exc:
                    raise ForwardFailed(f"no answer over MQTT ({type(exc).__name__}: {exc})") from None
                status = 200
            else:
                answer, status = await self._post(node, req, timeout_s)
        finally:
            peer.forwarding -= 1
        if not isinstance(answer, dict) or answer.get("status") not in ("ok", "error"):
            raise ForwardFailed(f"answered HTTP {status} without a result")
        if answer["status"] == "error":
            code = answer["error"].get("code") if isinstance(answer.get("error"), dict) else None
            if code not in FLOW_ERROR_CODES:
                raise ForwardFailed(f"answered {code or 'an error'} (HTTP {status})")
        return answer

    async def _post(self, node: PeerAddress, req: FlowRequest, timeout_s: float) -> tuple[Any, int]:
        body = forward_body(req)
        headers = {"Content-Type": "application/json"}
        traceparent = OUTGOING.get()
        if traceparent is not None:  # tracing is on: the peer's spans join this forward's
            headers["traceparent"] = traceparent
        if node.token:
            headers["Authorization"] = f"Bearer {node.token}"
        try:
            resp = await self.http.request("POST", node.url, body, headers, timeout=timeout_s)
            data, status = resp.body, resp.status
        except TimeoutError:
            raise ForwardFailed(f"no answer within {timeout_s:.1f} s") from None
        except Exception as exc:
            raise ForwardFailed(f"is down ({type(exc).__name__}: {exc})") from None
        try:
            return orjson.loads(data), status
        except orjson.JSONDecodeError:
            raise ForwardFailed(f"answered HTTP {status} with non-JSON: {short(data, 60)}") from None
