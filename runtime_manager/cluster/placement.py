"""Where a request runs: at home or on a peer (DESIGN.md, load balancing).

`Placer.choose` asks the load balancer (or a built-in policy) and `forward`
sends the request to the peer chosen. Anything wrong on the way (the load
balancer down or talking nonsense, an unknown node, a peer that is down) falls
back to running at home, said in the log and in the result's `placement`.
"""

from __future__ import annotations

import itertools
import logging

import aiohttp
import orjson

from ..config import Config, Node
from ..core.errors import FLOW_ERROR_CODES
from ..core.request import FlowRequest
from ..core.result import Placement, Result, peer_result
from ..logs import short

log = logging.getLogger("lb")


class Placer:
    def __init__(self, config: Config, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.lb = config.load_balancer
        self.session = session
        self.home_id = config.runtime.node_id
        self._lb_timeout = aiohttp.ClientTimeout(total=self.lb.timeout_s)
        self._rotation = itertools.cycle([None, *config.nodes])

    async def _ask_lb(self) -> tuple[str | None, str]:
        """Returns (node id or None for home, reason)."""
        url = self.lb.url
        try:
            async with self.session.get(url, timeout=self._lb_timeout) as resp:
                data = await resp.read()
                if resp.status != 200:
                    return None, f"load balancer answered HTTP {resp.status}"
        except Exception as exc:  # unreachable, timeout, reset: run at home
            return None, f"load balancer unreachable ({type(exc).__name__}: {exc})"
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None, f"load balancer answered non-JSON: {short(data, 60)}"
        if not isinstance(answer, dict) or "id_node" not in answer:
            return None, f"load balancer answer lacks id_node: {short(answer, 60)}"
        node = answer["id_node"]
        if node is None:
            return None, "load balancer said null"
        if isinstance(node, bool) or not isinstance(node, (int, str)):
            return None, f"load balancer said {short(node, 40)}, not a node id"
        return str(node), f"load balancer said {node}"

    async def choose(self, req: FlowRequest) -> tuple[Node | None, Placement]:
        """The peer to run `req` on (None: home), and why."""
        if req.is_load_balancing:
            return None, Placement("none", "home", "placed by a peer")
        policy = self.lb.policy
        if policy == "local":
            return None, Placement("none", "home", "policy local")
        if policy == "round_robin":
            node_id, reason, asked = next(self._rotation), "policy round_robin", "policy"
        else:
            (node_id, reason), asked = await self._ask_lb(), "lb"
        placement = Placement(asked, "home", reason)
        if node_id is None or node_id == self.home_id:
            if node_id is None and asked == "lb" and reason != "load balancer said null":
                log.warning("request %s: %s; running at home", req.request_id, reason)
            return None, placement
        node = self.config.nodes.get(node_id)
        if node is None:
            placement.reason = f"node {node_id} unknown (not in nodes.conf)"
            log.warning("request %s: %s; running at home", req.request_id, placement.reason)
            return None, placement
        placement.chosen = f"node {node_id}"
        return node, placement

    async def forward(self, node: Node, req: FlowRequest, placement: Placement) -> Result | None:
        """Run the request on a peer. Returns its result, or None to run at home
        (with the reason written into `placement`)."""
        body = orjson.dumps(
            {"id_flow": req.id_flow, "payload": req.payload, "is_load_balancing": True, "request_id": req.request_id}
        )
        headers = {"Content-Type": "application/json"}
        if node.token:
            headers["Authorization"] = f"Bearer {node.token}"
        try:
            async with self.session.post(
                node.url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=node.timeout_s)
            ) as resp:
                data = await resp.read()
                status = resp.status
        except Exception as exc:
            return self._fallback(req, placement, f"node {node.id} is down ({type(exc).__name__}: {exc})")
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            return self._fallback(req, placement, f"node {node.id} answered HTTP {status} with non-JSON: {short(data, 60)}")
        if not isinstance(answer, dict) or answer.get("status") not in ("ok", "error"):
            return self._fallback(req, placement, f"node {node.id} answered HTTP {status} without a result")
        if answer["status"] == "error":
            code = answer["error"].get("code") if isinstance(answer.get("error"), dict) else None
            if code not in FLOW_ERROR_CODES:
                return self._fallback(req, placement, f"node {node.id} answered {code or 'an error'} (HTTP {status})")
        return peer_result(req, answer, node.id, placement)

    @staticmethod
    def _fallback(req: FlowRequest, placement: Placement, reason: str) -> None:
        log.warning("request %s: %s; running at home", req.request_id, reason)
        placement.chosen = "home"
        placement.reason = f"{placement.reason}, but {reason}"
        return None
