"""Checkpoints that outlive a node: a module with `args.checkpoint_s` (or
runtime.conf orchestrator.checkpoint_s) is paused that often at a safe point,
its checkpoint taken and the module let go on at once; the checkpoint is then
encoded off the module's thread and kept retained on the broker:

    {realm}/rm/checkpoint/{runtime}/{module}   header (JSON) \\n zlib(module bytes) checkpoint

A runtime that starts with the same uuid finds its modules' checkpoints there
and goes on from them (instead of from the start); `resume` takes one to any
runtime. A module that ends clears its record; a module stopped with its node
keeps it (it goes on when the node is back). What a module printed after its
last checkpoint it prints again when it goes on from it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt

from ..core import topics
from ..mqtt.link import MqttLink
from ..wasm.checkpoint import Checkpoint, CheckpointError, decode, encode
from .migration import Incoming, frame, unframe
from .modules import GO_ON, ModuleRun

log = logging.getLogger("orch")
MAX_RECORD = 268_435_455 - 65_536  # a retained record: under MQTT's limit on a message, with room for its topic


def record(module: dict[str, Any], code: bytes, blob: bytes, runtime: str, name: str) -> bytes:
    packed = zlib.compress(code, 1)
    header = {"module": module, "runtime": runtime, "runtime_name": name, "at": datetime.now(UTC).isoformat(),
              "code_size": len(packed), "code_sha256": hashlib.sha256(code).hexdigest(),
              "sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
    return frame(header, packed + blob)


def read_record(payload: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    """(header, module bytes, checkpoint bytes) of a retained record; ValueError when damaged."""
    header, body = unframe(payload)
    size = header.get("code_size")
    if not isinstance(size, int) or not 0 < size <= len(body) or not isinstance(header.get("module"), dict):
        raise ValueError("the record has no module")
    try:
        code = zlib.decompressobj().decompress(body[:size], MAX_RECORD)
    except zlib.error as exc:
        raise ValueError(f"the module's bytes do not decompress: {exc}") from None
    blob = body[size:]
    if hashlib.sha256(code).hexdigest() != header.get("code_sha256") \
            or hashlib.sha256(blob).hexdigest() != header.get("sha256"):
        raise ValueError("the record is damaged (hash mismatch)")
    return header, code, blob


class Checkpoints:
    """A runtime's periodic checkpoints, and going on from them when it starts."""

    def __init__(self, link: MqttLink, realm: str, runtime_uuid: str, runtime_name: str, pause_timeout_s: float,
                 memory_mb: int, resume: Callable[[Incoming, Checkpoint], str | None], running: Callable[[str], bool]) -> None:
        self.link = link
        self.realm = realm
        self.runtime_uuid = runtime_uuid
        self.runtime_name = runtime_name
        self.pause_timeout_s = pause_timeout_s
        self.max_memory = memory_mb * 1024 * 1024
        self.resume = resume  # start a module from a checkpoint (an error string, or None)
        self.running = running  # does a module with this uuid run here?
        self.resuming: set[str] = set()  # modules about to go on from their checkpoint here
        self._tasks: dict[str, asyncio.Task] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def setup(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.link.subscribe(topics.checkpoint_topic(self.realm, self.runtime_uuid, "+"), self._on_record, qos=1)

    def topic(self, module: str) -> str:
        return topics.checkpoint_topic(self.realm, self.runtime_uuid, module)

    # ----- taking them -----------------------------------------------------------------------
    def follow(self, run: ModuleRun, module: dict[str, Any], every_s: float) -> None:
        """Checkpoint `run` every `every_s` seconds while it runs here."""
        assert self.loop is not None
        if every_s > 0 and run.uuid not in self._tasks:
            task = self.loop.create_task(self._every(run, module, every_s), name=f"checkpoints of {run.name}")
            self._tasks[run.uuid] = task
            task.add_done_callback(lambda _t, u=run.uuid: self._tasks.pop(u, None))

    def ended(self, run: ModuleRun, keep: bool) -> None:
        """`run` ended here: its record goes unless `keep` (stopped with the node)."""
        task = self._tasks.pop(run.uuid, None)
        if task is not None:
            task.cancel()
        if run.checkpoints and not keep:
            self.link.publish(self.topic(run.uuid), b"", qos=1, retain=True)

    def stop(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()

    async def _every(self, run: ModuleRun, module: dict[str, Any], every_s: float) -> None:
        while not run.done.is_set():
            await asyncio.sleep(every_s)
            if run.done.is_set():
                return
            if not run.moving:
                try:
                    await self.take(run, module)
                except Exception:
                    log.exception("checkpoint of module %s failed", run.name)

    async def take(self, run: ModuleRun, module: dict[str, Any]) -> bool:
        """One checkpoint of `run`, kept on the broker; False when it could not be taken now."""
        asked = run.pause()
        if isinstance(asked, str):
            log.debug("no checkpoint of module %s: %s", run.name, asked)
            return False
        try:
            checkpoint = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(asked.checkpoint)),
                                                self.pause_timeout_s)
        except TimeoutError:
            if run.give_up_pause(asked):
                log.warning("no checkpoint of module %s: no safe point within %.0f ms", run.name,
                            self.pause_timeout_s * 1000)
                return False
            checkpoint = await asyncio.wrap_future(asked.checkpoint)
        started = time.monotonic()
        asked.decide(GO_ON)  # the checkpoint holds a copy of its memory: it goes on at once
        paused_ms = (started - asked.paused_at) * 1000
        assert run.prepared is not None
        blob = await asyncio.to_thread(encode, checkpoint)
        payload = record(module, run.prepared.data, blob, self.runtime_uuid, self.runtime_name)
        if len(payload) > MAX_RECORD or not self.link.fits(self.topic(run.uuid), payload):
            log.warning("checkpoint of module %s not kept: %d bytes is more than the broker takes (%d)", run.name,
                        len(payload), min(MAX_RECORD, self.link.max_packet_bytes))
            return False
        self.link.publish(self.topic(run.uuid), payload, qos=1, retain=True)
        run.checkpoints += 1
        run.last_checkpoint = {"at": datetime.now(UTC).isoformat(), "bytes": len(payload), "paused_ms": round(paused_ms, 2),
                               "stdout_bytes": checkpoint.stdout_bytes}
        log.debug("checkpoint of module %s: %d bytes, paused %.1f ms", run.name, len(payload), paused_ms)
        return True

    # ----- going on from them --------------------------------------------------------------------
    def _on_record(self, msg: mqtt.MQTTMessage) -> None:
        if not msg.retain or not msg.payload:
            return  # ours, as we publish them; or a record cleared
        module_id = msg.topic.rsplit("/", 1)[-1]
        if self.running(module_id) or module_id in self.resuming:
            return
        self.resuming.add(module_id)
        assert self.loop is not None
        self.loop.create_task(self._go_on(module_id, msg.payload))

    async def _go_on(self, module_id: str, payload: bytes) -> None:
        try:
            try:
                header, code, blob = read_record(payload)
                checkpoint = await asyncio.to_thread(decode, blob, self.max_memory)
            except (ValueError, CheckpointError) as exc:
                log.error("the checkpoint of module %s cannot be used: %s; cleared", module_id, exc)
                self.link.publish(self.topic(module_id), b"", qos=1, retain=True)
                return
            if self.running(module_id):
                return
            why = self.resume(Incoming(f"checkpoint-{module_id}", "", header["module"], code, 0.0), checkpoint)
            if why is None:
                log.info("module %s (%s) goes on from its checkpoint of %s", header["module"].get("name"), module_id,
                         header.get("at"))
            else:
                log.error("module %s cannot go on from its checkpoint: %s", module_id, why)
        finally:
            self.resuming.discard(module_id)
