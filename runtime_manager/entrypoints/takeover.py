"""A member of the shared group that is gone: its MQTT session taken over.

Nodes that share one subscription (`mqtt.shared_group`) each hold a persistent
session. Mosquitto keeps choosing a member whose session lives, even when the
member is gone, and holds that member's share of new requests (and those it
had taken and not acknowledged) until it returns or the session expires: a
day by default. So when a member is gone (its last will or its clean stop
says `offline`, or its statuses stop for three intervals), one survivor, the
live member with the lowest node id, takes its session over after
TAKEOVER_GRACE_S:

1. it connects once with the gone member's client id, without a clean start:
   the broker hands it what the session holds, at once;
2. it unsubscribes that session from the shared topics, so the broker chooses
   the live members only from then on;
3. it runs the requests it got as its own (results to their answer topics)
   and acknowledges each after its result is out, on that connection;
4. when nothing more comes for QUIET_S and every request taken is answered,
   it disconnects with a session expiry of 0: the session ends.

The bound, on Mosquitto: a member killed is seen at once (its will), one
stopped or cut off within three status intervals; its requests run on the
survivor TAKEOVER_GRACE_S later. A member that returns during the takeover
throws the survivor's connection off (the newest connection with a client id
wins): what the survivor had not acknowledged goes back to the member (at
least once: a result may then come twice, with the same request_id). A member
that was only cut off reconnects the same way and rejoins. MQTT 5 only (an
MQTT 3.1.1 session cannot be ended by its DISCONNECT). Other brokers: this
needs a broker that keeps a member's queued messages in its session and hands
them to a later connection with its client id (Mosquitto 2 does); brokers that
redispatch a gone member's share themselves (EMQX) need none of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..cluster.peers import Peer, PeerTable
from ..config import Config
from ..core.flows import natural_order
from ..core.lifecycle import Entrypoint, wait_until
from ..engine import FlowEngine
from ..mqtt.link import MqttLink
from .mqtt import MqttEntrypoint

log = logging.getLogger("peers")
TAKEOVER_GRACE_S = 1.0  # after a member is seen gone: it may be a restart
QUIET_S = 1.0  # nothing more from the session for this long: it is drained
CONNECT_S = 10.0


def session_of(peer: Peer) -> tuple[list[str], str] | None:
    """The client ids and shared group a peer announced, when it has them."""
    session = peer.status.get("mqtt_session")
    if not isinstance(session, dict):
        return None
    return list(session["client_ids"]), session["shared_group"]


class SessionTakeover(Entrypoint):
    """An entry point of the node (core/lifecycle.py): requests come in on a
    gone member's session. `peer_gone` (from membership) starts a takeover when
    this node is the one to do it; `stop` lets a running takeover finish its
    requests and keeps the session (someone may still take it); `kill` drops it."""

    name = "session takeover"

    def __init__(self, config: Config, engine: FlowEngine, table: PeerTable) -> None:
        self.config, self.engine, self.table = config, engine, table
        self.node_id = config.node_name
        self.group = config.mqtt.shared_group
        self._tasks: dict[str, asyncio.Task] = {}
        self.taken_over: dict[str, dict[str, Any]] = {}  # "node 3", "worker 1" -> what the last takeover did
        self._stopping = False

    @property
    def enabled(self) -> bool:
        return bool(self.group) and self.config.mqtt.protocol != "3.1.1"

    def peer_gone(self, peer: Peer) -> None:
        """A member left placement (offline or silent): take its session over when
        this node is the lowest live member of the group (on the loop)."""
        session = session_of(peer)
        if not self.enabled or self._stopping or session is None or session[1] != self.group:
            return
        label = f"node {peer.id}"
        if label in self._tasks:
            return
        live = [p.id for p in self.table.healthy() if (session_of(p) or ([], None))[1] == self.group]
        if min([self.node_id, *live], key=natural_order) != self.node_id:
            return  # another survivor does it
        self._tasks[label] = asyncio.get_running_loop().create_task(
            self._take_over(label, peer.id, session[0], lambda: peer.state == "healthy"),
            name=f"takeover-{peer.id}")

    def sibling_gone(self, index: int, client_id: str, back: Callable[[], bool]) -> None:
        """A worker of this node (`serve --processes`) that the supervisor has not
        brought back: its session on the node's shared subscription taken over the
        same way, by this (the first) worker. `back()`: it beats again."""
        label = f"worker {index}"
        if not self.enabled or self._stopping or label in self._tasks:
            return
        self._tasks[label] = asyncio.get_running_loop().create_task(
            self._take_over(label, self.node_id, [client_id], back), name=f"takeover-w{index}")

    async def _take_over(self, label: str, node_id: str, client_ids: list[str], back: Callable[[], bool]) -> None:
        try:
            await asyncio.sleep(TAKEOVER_GRACE_S)
            if back() or self._stopping:
                return  # it came back, or this node is stopping
            for client_id in client_ids:
                await self._drain(label, node_id, client_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("taking over %s's session failed", label)
        finally:
            self._tasks.pop(label, None)

    async def _drain(self, label: str, node_id: str, client_id: str) -> None:
        """The MQTT entry point, on the gone member's session, until it is drained."""
        started = time.monotonic()
        mq = replace(self.config.mqtt, client_id=client_id)
        as_member = replace(self.config, mqtt=mq, runtime=replace(self.config.runtime, node_id=node_id))
        link = MqttLink(mq, client_id, receive_maximum=self.config.runtime.queue_depth, once=True,
                        name=f"takeover of {label}")
        entry = MqttEntrypoint(as_member, self.engine, link)
        seen = [0, time.monotonic()]  # requests taken, when the last came

        def quiet() -> bool:
            if entry.taken != seen[0]:
                seen[:] = [entry.taken, time.monotonic()]
            return time.monotonic() - seen[1] >= QUIET_S and not entry.in_flight

        await link.setup()
        await entry.start()
        await link.start()
        end = False
        try:
            if not await link.wait_connected(CONNECT_S):
                log.warning("could not take over %s's session (%s): %s", label, client_id,
                            link.last_error or "no connection")
                return
            log.warning("%s is gone: taking over its session %s", label, client_id)
            # What the session holds comes at once; from now on the broker is to choose
            # the live members only. What it sent before it heard is still run.
            for topic in entry.topics:
                link.leave(topic)
            limit = self.config.runtime.task_timeout_ms / 1000 + 30
            await wait_until(lambda: not link.connected or quiet(), limit, step_s=0.05)
            end = link.connected and not self._stopping  # thrown off (the member is back): its session stays
        finally:
            await entry.stop()
            await link.stop(end_session=end)
        self.taken_over[label] = {"client_id": client_id, "requests": entry.taken, "ended": end,
                                    "seconds": round(time.monotonic() - started, 2)}
        why = ("the session ended" if end else "this node is stopping: the session stays" if self._stopping
               else "the connection was taken (the member is back?): the session stays")
        log.warning("took over %s's session %s: %d request(s) answered; %s", label, client_id, entry.taken, why)

    async def stop(self) -> None:
        self._stopping = True
        await wait_until(lambda: not self._tasks, self.config.runtime.drain_timeout_s)
        self.kill()

    def kill(self) -> None:
        self._stopping = True
        for task in list(self._tasks.values()):
            task.cancel()
