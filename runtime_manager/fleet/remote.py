"""Talking to the fleet's hosts over SSH (asyncssh) and to its broker (paho).

One connection per host, at most `fleet.parallel` at once; host keys are
checked (known_hosts), keys come from `ssh.identity_file` or the agent. What can
go wrong reaching a host becomes one line that says so (`HostError`).
"""

from __future__ import annotations

import asyncio
import io
import json
import shlex
import tarfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
import paho.mqtt.client as mqtt

from ..core.topics import presence_topic, status_filters
from .spec import Fleet, FleetHost

T = TypeVar("T")


class HostError(Exception):
    """A host that cannot be used now; the message says why, in a few words."""


async def connect(fleet: Fleet, host: FleetHost) -> asyncssh.SSHClientConnection:
    options: dict[str, Any] = {"port": fleet.ssh.port, "known_hosts": str(fleet.ssh.known_hosts)
                               if fleet.ssh.known_hosts else ()}
    if fleet.ssh.user:
        options["username"] = fleet.ssh.user
    if fleet.ssh.identity_file:
        options["client_keys"] = [str(fleet.ssh.identity_file)]
    try:
        return await asyncio.wait_for(asyncssh.connect(host.address, **options), fleet.connect_timeout_s)
    except TimeoutError:
        raise HostError(f"unreachable: no answer within {fleet.connect_timeout_s:g} s") from None
    except asyncssh.PermissionDenied:
        raise HostError("authentication refused: the key was not accepted") from None
    except asyncssh.HostKeyNotVerifiable as exc:
        raise HostError(f"host key not trusted ({exc.reason}): add it to known_hosts") from None
    except asyncssh.Error as exc:
        raise HostError(f"ssh: {exc.reason}") from None
    except OSError as exc:
        raise HostError(f"unreachable: {exc.strerror or exc}") from None


def env_prefix(fleet: Fleet, host: FleetHost) -> str:
    """`env` with the fleet's variables and RM_CONFIG_DIR for a command on `host`."""
    variables = {**fleet.environment, "RM_CONFIG_DIR": f"{fleet.root_of(host)}/config"}
    return "env " + " ".join(f"{k}={shlex.quote(v)}" for k, v in variables.items())


async def run(conn: asyncssh.SSHClientConnection, command: str, input: bytes | None = None,
              timeout: float = 60) -> tuple[int, str, str]:
    try:
        done = await asyncio.wait_for(conn.run(command, input=input, encoding=None, check=False), timeout)
    except TimeoutError:
        raise HostError(f"`{command.split()[0]}` did not finish within {timeout:g} s") from None
    except asyncssh.Error as exc:
        raise HostError(f"ssh: {exc.reason}") from None
    out = (done.stdout or b"").decode("utf-8", "replace")
    err = (done.stderr or b"").decode("utf-8", "replace")
    return int(done.exit_status if done.exit_status is not None else 255), out, err


def tar_of(directory: Path, names: list[str] | None = None) -> bytes:
    """`directory`'s entries (or `names` of them) as a gzipped tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for entry in sorted(directory.iterdir()) if names is None else [directory / n for n in names]:
            tar.add(entry, arcname=entry.name)
    return buf.getvalue()


async def each(fleet: Fleet, hosts: list[FleetHost],
               work: Callable[[FleetHost, asyncssh.SSHClientConnection], Awaitable[T]]) -> dict[str, T | HostError]:
    """`work` on every host at once (at most `fleet.parallel` connections): its
    result, or the HostError that stopped it, by host address."""
    gate = asyncio.Semaphore(fleet.parallel)

    async def one(host: FleetHost) -> T | HostError:
        async with gate:
            try:
                conn = await connect(fleet, host)
            except HostError as exc:
                return exc
            try:
                async with conn:
                    return await work(host, conn)
            except HostError as exc:
                return exc
            except (asyncssh.Error, OSError) as exc:
                return HostError(f"ssh: {getattr(exc, 'reason', None) or exc}")

    results = await asyncio.gather(*(one(h) for h in hosts))
    return {h.address: r for h, r in zip(hosts, results, strict=True)}


class Statuses:
    """The nodes' retained statuses on the broker, kept up to date while open."""

    def __init__(self, fleet: Fleet, prefix: str = "rm/nodes", realm: str | None = None) -> None:
        self.prefix = prefix
        self.docs: dict[str, dict[str, Any]] = {}
        self.runtimes: dict[str, list[str]] = {}  # runtime name -> its modules, from the realm's presence records
        self.lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"rm-fleet-{uuid.uuid4().hex[:8]}")
        topics = [(t, 1) for t in status_filters(prefix)] + ([(presence_topic(realm), 1)] if realm else [])
        self.realm = realm
        self.client.on_connect = lambda c, *a: c.subscribe(topics)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        try:
            self.client.connect(fleet.broker_host, fleet.broker_port, 30)
        except OSError as exc:
            raise HostError(f"cannot reach the broker at {fleet.broker_host}:{fleet.broker_port}: {exc}") from None
        self.client.loop_start()
        if not subscribed.wait(10):
            raise HostError(f"could not subscribe at the broker {fleet.broker_host}:{fleet.broker_port}")
        if realm:  # every live runtime answers with a fresh presence record within 100 ms
            self.client.publish(f"{realm}/rm/query", json.dumps({"query": uuid.uuid4().hex}), qos=0)
        time.sleep(0.4)  # the retained statuses come at once

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        node = msg.topic.rsplit("/", 1)[-1]
        try:
            doc = json.loads(msg.payload) if msg.payload else None
        except ValueError:
            doc = None
        if self.realm and msg.topic.startswith(f"{self.realm}/rm/presence/"):
            if isinstance(doc, dict) and doc.get("state") == "online" and isinstance(doc.get("children"), list):
                with self.lock:
                    self.runtimes[str(doc.get("name"))] = [str(c.get("name")) for c in doc["children"]
                                                           if isinstance(c, dict)]
            return
        with self.lock:
            if isinstance(doc, dict) and doc.get("report") == "load":
                if node in self.docs:  # a small load report: the load of the status heard before
                    self.docs[node].update({k: v for k, v in doc.items() if k != "report"})
            elif isinstance(doc, dict):
                doc["_received"] = time.time()
                self.docs[node] = doc
            else:
                self.docs.pop(node, None)

    def state(self, node_id: str) -> str:
        """ready, not ready, silent, offline or unknown, as the broker tells it."""
        with self.lock:
            doc = self.docs.get(node_id)
        if doc is None:
            return "unknown"
        if doc.get("state") == "offline":
            return "offline"
        interval = float(doc.get("interval_ms") or 1000) / 1000
        if time.time() - float(doc.get("time") or 0) > max(3 * interval, 3.0):
            return "silent"
        return "ready" if doc.get("ready") else "not ready"

    def modules(self, runtime_name: str) -> list[str] | None:
        with self.lock:
            return self.runtimes.get(runtime_name)

    def doc(self, node_id: str) -> dict[str, Any]:
        with self.lock:
            return dict(self.docs.get(node_id) or {})

    def clear(self, topics: list[str]) -> None:
        for topic in topics:
            self.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
