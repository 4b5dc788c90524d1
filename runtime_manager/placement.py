"""Where a request runs: at home or on a peer (DESIGN.md, load balancing).

`Placement.place` asks the load balancer (or a built-in policy) and, when a
peer is chosen, forwards the request to it. Anything wrong on the way (the
load balancer down or talking nonsense, an unknown node, a peer that is down)
falls back to running at home, said in the log and in the result.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import aiohttp
import orjson

from .config import Config, Node
from .errors import FLOW_ERROR_CODES
from .logs import short
from .request import FlowRequest

log = logging.getLogger("lb")


class Placement:
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

    async def choose(self, req: FlowRequest) -> tuple[Node | None, dict[str, Any]]:
        if req.is_load_balancing:
            return None, {"asked": "none", "chosen": "home", "reason": "placed by a peer"}
        policy = self.lb.policy
        if policy == "local":
            return None, {"asked": "none", "chosen": "home", "reason": "policy local"}
        if policy == "round_robin":
            node_id, reason, asked = next(self._rotation), "policy round_robin", "policy"
        else:
            (node_id, reason), asked = await self._ask_lb(), "lb"
        info = {"asked": asked, "chosen": "home", "reason": reason}
        if node_id is None or node_id == self.home_id:
            if node_id is None and asked == "lb" and reason != "load balancer said null":
                log.warning("request %s: %s; running at home", req.request_id, reason)
            return None, info
        node = self.config.nodes.get(node_id)
        if node is None:
            info["reason"] = f"node {node_id} unknown (not in nodes.conf)"
            log.warning("request %s: %s; running at home", req.request_id, info["reason"])
            return None, info
        info["chosen"] = f"node {node_id}"
        return node, info

    async def forward(self, node: Node, req: FlowRequest, info: dict[str, Any]) -> dict[str, Any] | None:
        """Run the request on a peer. Returns its result, or None to run at home
        (with the reason written into `info`)."""
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
            return self._fallback(req, info, f"node {node.id} is down ({type(exc).__name__}: {exc})")
        try:
            result = orjson.loads(data)
        except orjson.JSONDecodeError:
            return self._fallback(req, info, f"node {node.id} answered HTTP {status} with non-JSON: {short(data, 60)}")
        if not isinstance(result, dict) or result.get("status") not in ("ok", "error"):
            return self._fallback(req, info, f"node {node.id} answered HTTP {status} without a result")
        if result["status"] == "error":
            code = (result.get("error") or {}).get("code") if isinstance(result.get("error"), dict) else None
            if code not in FLOW_ERROR_CODES:
                return self._fallback(req, info, f"node {node.id} answered {code or 'an error'} (HTTP {status})")
        result["placement"] = info
        result.setdefault("node", node.id)
        result["elapsed_ms"] = round((time.perf_counter() - req.received) * 1000, 3)
        return result

    def _fallback(self, req: FlowRequest, info: dict[str, Any], reason: str) -> None:
        log.warning("request %s: %s; running at home", req.request_id, reason)
        info["chosen"] = "home"
        info["reason"] = f"{info['reason']}, but {reason}"
        return None
