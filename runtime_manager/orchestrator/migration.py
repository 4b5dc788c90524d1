"""Moving a running module to another runtime with its state, over the broker.

Every runtime takes moves on `{realm}/rm/migrate/{its uuid}`; the answers go to
the mover's own such topic. A message is a JSON header, a newline, and bytes.

    mover                                   destination
    offer  (the module's bytes, its spec) ->  full? already here? compiles it
           <- taking, then ready | refused (why)
    base   (a copy of its memory, taken  ->  keeps it
            while it runs: modules of 1 MiB
            or more)                       <- based
    the module stops at its next safe point (within migrate_timeout_ms)
    state  (the checkpoint, in chunks)    ->  checks the hash, restores, goes on
           <- resumed | failed (why)
    abort  (the mover gave up)            ->  forgets it (stops it, silently, if it had gone on)

The module's bytes travel with the offer, so a destination does not need the
module's file. With a base, the state carries only the pages that changed
since the copy: the pause grows with what the module writes, not with its
memory. The pause is from the moment the module stopped to the moment
the destination says it goes on. When the destination refuses or fails, the
module goes on at the source; when it has no state to move (not migratable, no
safe point in time) or the destination does not take moves (no answer: a
runtime of another kind), it is started again at the destination, as before.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from ..core import topics
from ..logs import short
from ..mqtt.link import MqttLink
from ..wasm.checkpoint import Checkpoint, CheckpointError, decode, encode
from ..wasm.modules import WASMTIME_VERSION, ModuleError, compile_module, make_engine
from .modules import GO_ON, MOVED, TRANSIENT, ModuleRun, Pause

log = logging.getLogger("orch")

CHUNK = 256 * 1024  # a state message: bounded, and few of them (each costs a broker round)
MAX_CODE = 64 * 1024 * 1024  # a module's bytes
HEARD_TIMEOUT_S = 3.0  # a runtime that takes moves says `taking` at once
OFFER_TIMEOUT_S = 30.0  # ... and `ready` once it has compiled the module
STATE_TIMEOUT_S = 10.0  # plus a second per 4 MiB of checkpoint
INCOMING_TTL_S = 60.0  # an offer whose state never comes is forgotten
MAX_INCOMING = 8  # moves under way into one runtime at once
PRECOPY_MIN = 1024 * 1024  # a module with this much memory or more sends a base copy before it stops


def frame(header: dict[str, Any], body: bytes = b"") -> bytes:
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + body


def unframe(payload: bytes) -> tuple[dict[str, Any], bytes]:
    head, _, body = payload.partition(b"\n")
    header = json.loads(head)
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, body


def chunks(mid: str, blob: bytes, kind: str = "state") -> list[bytes]:
    """A checkpoint as `state` (or `base`) messages of at most CHUNK bytes each."""
    digest = hashlib.sha256(blob).hexdigest()
    total = max(1, -(-len(blob) // CHUNK))
    return [frame({"kind": kind, "id": mid, "seq": i, "total": total, "size": len(blob), "sha256": digest},
                  blob[i * CHUNK : (i + 1) * CHUNK]) for i in range(total)]


@dataclass
class MoveReport:
    """How a move went: published on `{realm}/rm/moved/{module}`, printed by `migrate`."""

    module: str
    uuid: str
    source: str
    target: str
    moved: bool  # it runs at the target now
    with_state: bool  # it went on where it was (False: it started again, or stayed)
    why: str | None = None  # why not with its state, or why it stayed
    pause_ms: float | None = None
    checkpoint_bytes: int = 0
    object_id: str | None = None
    move_id: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # where the pause went

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Incoming:
    """A move this runtime accepted and whose state it waits for."""

    mid: str
    source: str  # where to answer
    module: dict[str, Any]  # the spec, as a create carries it
    code: bytes
    expires: float
    parts: dict[int, bytes] = field(default_factory=dict)
    base_parts: dict[int, bytes] = field(default_factory=dict)
    base: bytearray | None = None  # the memory copy its state is a delta against
    base_sha256: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # receive_ms, decode_ms (start_ms: the runtime's)
    first_part_at: float = 0.0
    arrived_at: float = 0.0


# what the runtime does for the mover: why it cannot take a module (or None),
# and starting one from a checkpoint (an error string, or None when it started)
CanTake = Callable[[dict[str, Any]], str | None]
Accept = Callable[[Incoming, Checkpoint], str | None]


class Mover:
    """Both ends of a move, for one runtime. Runs on the node's loop."""

    def __init__(self, link: MqttLink, realm: str, runtime_uuid: str, migrate_timeout_s: float, memory_mb: int,
                 can_take: CanTake, accept: Accept, forget: Callable[[str], None]) -> None:
        self.link = link
        self.realm = realm
        self.runtime_uuid = runtime_uuid
        self.migrate_timeout_s = migrate_timeout_s
        self.max_memory = memory_mb * 1024 * 1024
        self.max_state = self.max_memory + 4 * 1024 * 1024  # a checkpoint: the memory and its header
        self.can_take = can_take
        self.accept = accept
        self.forget = forget  # a module that arrived by this move id goes, silently
        self.incoming: dict[str, Incoming] = {}
        self._answers: dict[tuple[str, str], asyncio.Future[dict[str, Any]]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def setup(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.link.subscribe(topics.migrate_topic(self.realm, self.runtime_uuid), self._on_message, qos=1)

    def _send(self, runtime: str, payload: bytes) -> None:
        """One message of a move; one the broker cannot take is logged, and the
        move then ends as one its target does not answer."""
        try:
            self.link.publish(topics.migrate_topic(self.realm, runtime), payload, qos=1)
        except ValueError as exc:
            log.error("a move's message to runtime %s cannot be sent: %s", runtime, exc)

    # ----- the mover's side ---------------------------------------------------------------
    async def move(self, run: ModuleRun, target: str, module: dict[str, Any], code: bytes,
                   restart_elsewhere: Callable[[str], Awaitable[MoveReport]], ours: bool = True) -> MoveReport:
        """Move `run` to runtime `target` with its state; `restart_elsewhere(why)`
        when it has none that can move, or when `target` is not one of ours and
        does not answer (another kind of runtime). Never raises."""
        report = MoveReport(run.name, run.uuid, self.runtime_uuid, target, moved=False, with_state=False)
        if run.why_not_movable is not None:
            return await restart_elsewhere(run.why_not_movable)
        mid = report.move_id = str(uuid.uuid4())
        offer = {"kind": "offer", "id": mid, "from": self.runtime_uuid, "module": module, "wasmtime": WASMTIME_VERSION,
                 "code_sha256": hashlib.sha256(code).hexdigest(), "memory_bytes": run.memory_bytes}
        answered = self._awaiting(mid, ("taking", "refused"))
        ready = self._awaiting(mid, ("ready",))
        try:
            self._send(target, frame(offer, zlib.compress(code, 1)))
            heard = False
            try:
                answer = await asyncio.wait_for(answered, HEARD_TIMEOUT_S)
                heard = True
                if answer.get("kind") == "taking":
                    answer = await asyncio.wait_for(ready, OFFER_TIMEOUT_S)
            except TimeoutError:
                answer = None
        finally:
            self._done_awaiting(mid, ("taking", "refused", "ready"))
        if not heard and ours:  # one of ours, silent (stopped, cut off): the module stays
            report.why = f"runtime {target} did not answer within {HEARD_TIMEOUT_S:g} s; it goes on here"
            return report
        if not heard:
            return await restart_elsewhere(f"runtime {target} does not take modules with their state "
                                           f"(no answer within {HEARD_TIMEOUT_S:g} s)")
        if answer is None or answer.get("kind") != "ready":
            why = f"runtime {target} did not get ready within {OFFER_TIMEOUT_S:g} s" if answer is None else \
                f"runtime {target} refused it: {answer.get('why')}"
            report.why = f"{why}; it goes on here"
            return report
        base, base_sha256 = await self._send_base(run, target, mid)
        asked = await self._pause(run, base, base_sha256)
        if isinstance(asked, str):
            self._send(target, frame({"kind": "abort", "id": mid}))
            if run.done.is_set():
                report.why = "it ended before it could move"
                return report
            return await restart_elsewhere(asked)
        try:
            checkpoint = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(asked.checkpoint)),
                                                self.migrate_timeout_s)
        except TimeoutError:
            if run.give_up_pause(asked):
                self._send(target, frame({"kind": "abort", "id": mid}))
                return await restart_elsewhere(
                    f"it did not reach a safe point (output, input, a sleep, a channel read) within "
                    f"{self.migrate_timeout_s * 1000:.0f} ms (migrate_timeout_ms)")
            checkpoint = await asyncio.wrap_future(asked.checkpoint)
        except asyncio.CancelledError:
            run.give_up_pause(asked)
            raise
        handed = time.monotonic()
        try:
            blob = asked.blob or await asyncio.to_thread(encode, checkpoint)
            report.checkpoint_bytes = len(blob)
            encoded = time.monotonic()
            answer = await self._state(target, mid, blob)
        except Exception as exc:  # the module must not stay paused whatever happens
            log.exception("move of module %s failed", run.name)
            answer = {"kind": "failed", "why": f"{type(exc).__name__}: {exc}"}
        if answer is not None and answer.get("kind") == "resumed":
            now = time.monotonic()
            report.pause_ms = round((now - asked.paused_at) * 1000, 2)
            there = {k: answer[k] for k in ("receive_ms", "decode_ms", "start_ms") if isinstance(answer.get(k), (int, float))}
            report.timings = {"capture_ms": round((handed - asked.paused_at) * 1000, 2),
                              "send_until_resumed_ms": round((now - encoded) * 1000, 2), **there}
            report.moved = report.with_state = True
            run.moved_to = target
            asked.decide(MOVED, f"moved to runtime {target} with its state")
            return report
        self._send(target, frame({"kind": "abort", "id": mid}))
        asked.decide(GO_ON)
        why = f"runtime {target} did not answer" if answer is None else f"runtime {target}: {answer.get('why')}"
        report.why = f"{why}; it went on here"
        return report

    async def _pause(self, run: ModuleRun, base: bytes | None, base_sha256: str | None) -> Pause | str:
        """Ask for the pause; when the module is between two runs of `repeat`,
        or a checkpoint of it is being taken, ask again for a while."""
        deadline = time.monotonic() + self.migrate_timeout_s
        while True:
            asked = run.pause(encoded=True, base=base, base_sha256=base_sha256)
            if not isinstance(asked, str) or asked not in TRANSIENT or time.monotonic() > deadline:
                return asked
            await asyncio.sleep(0.02)

    async def _send_base(self, run: ModuleRun, target: str, mid: str) -> tuple[bytes | None, str | None]:
        """Before the pause: a copy of the module's memory taken while it runs,
        kept by the destination (None when it is small, or it did not work)."""
        copy = await asyncio.to_thread(run.memory_copy)
        if copy is None or len(copy) < PRECOPY_MIN:
            return None, None

        def prepare() -> tuple[bytes, str]:
            return encode(Checkpoint("", copy, {}, 0, 0, "base")), hashlib.sha256(copy).hexdigest()

        blob, digest = await asyncio.to_thread(prepare)
        answer = await self._stream(target, mid, blob, "base", ("based", "failed"))
        if answer is None or answer.get("kind") != "based":
            log.info("move %s: no base copy of module %s (%s); the whole memory moves in the pause", mid, run.name,
                     "no answer" if answer is None else answer.get("why"))
            return None, None
        return copy, digest

    async def _state(self, target: str, mid: str, blob: bytes) -> dict[str, Any] | None:
        return await self._stream(target, mid, blob, "state", ("resumed", "failed"))

    async def _stream(self, target: str, mid: str, blob: bytes, kind: str,
                      answers: tuple[str, ...]) -> dict[str, Any] | None:
        parts = chunks(mid, blob, kind)
        fut = self._awaiting(mid, answers)
        try:
            for part in parts:
                self._send(target, part)
            return await asyncio.wait_for(fut, STATE_TIMEOUT_S + len(blob) / (4 * 1024 * 1024))
        except TimeoutError:
            return None
        finally:
            self._done_awaiting(mid, answers)

    def _awaiting(self, mid: str, kinds: tuple[str, ...]) -> asyncio.Future[dict[str, Any]]:
        assert self.loop is not None
        fut: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        for kind in kinds:
            self._answers[mid, kind] = fut
        return fut

    def _done_awaiting(self, mid: str, kinds: tuple[str, ...]) -> None:
        for kind in kinds:
            self._answers.pop((mid, kind), None)

    # ----- the destination's side ------------------------------------------------------------
    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        try:
            header, body = unframe(msg.payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            log.warning("unreadable message on %s: %s", msg.topic, short(msg.payload[:200]))
            return
        kind, mid = header.get("kind"), header.get("id")
        if not isinstance(mid, str):
            return
        fut = self._answers.get((mid, str(kind)))
        if fut is not None:
            if not fut.done():
                fut.set_result(header)
            return
        source = header.get("from")
        if kind == "offer" and isinstance(source, str) and topics.topic_name_problem(source) is None \
                and "/" not in source and "+" not in source and "#" not in source:
            self._spawn(self._offer(header, body, source))
        elif kind in ("state", "base"):
            self._part(header, body)
        elif kind == "abort":
            if self.incoming.pop(mid, None) is None:
                self.forget(mid)

    def _spawn(self, coro: Awaitable[None]) -> None:
        assert self.loop is not None
        task = self.loop.create_task(coro)  # type: ignore[arg-type]
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is None
                               or log.error("move failed: %s", t.exception()))

    def answer(self, source: str, mid: str, kind: str, **more: Any) -> None:
        self._send(source, frame({"kind": kind, "id": mid, **more}))

    async def _offer(self, header: dict[str, Any], body: bytes, source: str) -> None:
        mid = header["id"]
        module = header.get("module")
        if not isinstance(module, dict):
            return self.answer(source, mid, "refused", why="the offer has no module")
        why = self.can_take(module)
        memory = header.get("memory_bytes")
        if why is None and isinstance(memory, int) and memory > self.max_memory:
            why = (f"its memory ({memory / 1048576:.1f} MiB) is over this runtime's module_memory_mb "
                   f"({self.max_memory // 1048576})")
        self._expire()
        if why is None and len(self.incoming) >= MAX_INCOMING:
            why = f"{MAX_INCOMING} moves into it are under way already"
        if why is None and len(body) > MAX_CODE:
            why = "the module is too large"
        code = b""
        if why is None:
            try:
                code = zlib.decompressobj().decompress(body, MAX_CODE + 1)
            except zlib.error as exc:
                why = f"the module's bytes do not decompress: {exc}"
        if why is None and hashlib.sha256(code).hexdigest() != header.get("code_sha256"):
            why = "the module's bytes do not match their hash"
        if why is None:
            self.answer(source, mid, "taking")
            try:
                await asyncio.to_thread(compile_module, make_engine(False), code, False)  # cached for the module's thread
            except ModuleError as exc:
                why = f"wasmtime {WASMTIME_VERSION} cannot compile it: {exc}"
        if why is not None:
            log.info("move %s of module %s refused: %s", mid, module.get("name"), why)
            return self.answer(source, mid, "refused", why=why)
        self._expire()
        self.incoming[mid] = Incoming(mid, source, module, code, time.monotonic() + INCOMING_TTL_S)
        self.answer(source, mid, "ready")

    def _expire(self) -> None:
        now = time.monotonic()
        for mid in [m for m, inc in self.incoming.items() if inc.expires < now]:
            del self.incoming[mid]

    def _part(self, header: dict[str, Any], body: bytes) -> None:
        inc = self.incoming.get(header["id"])
        is_base = header.get("kind") == "base"
        seq, total, size = header.get("seq"), header.get("total"), header.get("size")
        if inc is None or not all(isinstance(v, int) for v in (seq, total, size)):
            return
        if size > self.max_state or not 0 <= seq < total <= self.max_state // CHUNK + 1:  # type: ignore[operator]
            del self.incoming[inc.mid]
            return self.answer(inc.source, inc.mid, "failed", why=f"a checkpoint of {size} bytes is over the limit")
        parts = inc.base_parts if is_base else inc.parts
        if not parts and not is_base:
            inc.first_part_at = time.monotonic()
        parts[seq] = body  # type: ignore[index]
        if len(parts) < total:  # type: ignore[operator]
            return
        blob = b"".join(parts[i] for i in range(total))  # type: ignore[arg-type]
        parts.clear()
        if len(blob) != size or hashlib.sha256(blob).hexdigest() != header.get("sha256"):
            self.incoming.pop(inc.mid, None)
            return self.answer(inc.source, inc.mid, "failed", why="the checkpoint arrived damaged (hash mismatch)")
        if is_base:
            self._spawn(self._base(inc, blob))
            return
        del self.incoming[inc.mid]
        inc.timings["receive_ms"] = round((time.monotonic() - inc.first_part_at) * 1000, 2)
        self._spawn(self._arrived(inc, blob))

    async def _base(self, inc: Incoming, blob: bytes) -> None:
        def read() -> tuple[bytearray, str]:
            memory = decode(blob, self.max_memory).memory
            return bytearray(memory), hashlib.sha256(memory).hexdigest()

        try:
            inc.base, inc.base_sha256 = await asyncio.to_thread(read)
        except CheckpointError as exc:
            return self.answer(inc.source, inc.mid, "failed", why=f"unusable base: {exc}")
        self.answer(inc.source, inc.mid, "based")

    async def _arrived(self, inc: Incoming, blob: bytes) -> None:
        started = time.monotonic()
        try:
            checkpoint = await asyncio.to_thread(decode, blob, self.max_memory, inc.base, inc.base_sha256)
            inc.arrived_at = time.monotonic()
            inc.timings["decode_ms"] = round((inc.arrived_at - started) * 1000, 2)
        except CheckpointError as exc:
            return self.answer(inc.source, inc.mid, "failed", why=f"unusable checkpoint: {exc}")
        why = self.accept(inc, checkpoint)  # the module's thread answers `resumed` once it goes on
        if why is not None:
            self.answer(inc.source, inc.mid, "failed", why=why)
