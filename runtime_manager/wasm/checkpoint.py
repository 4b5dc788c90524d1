"""A checkpoint: everything a paused module needs to go on elsewhere, and its
encoding as bytes.

    b"RMCK1\\n", u32 header length, the header (JSON), then the memory's pages in
    blocks: u32 first page, u32 pages, u8 method (0 raw, 1 zlib), u32 length, bytes

Pages that are all zero are left out (a module's memory is mostly empty), and a
block is compressed only when a sample of it compresses: incompressible memory
is copied, not run through zlib for nothing. `decode` checks everything it reads
against the limits it is given; it raises `CheckpointError` naming what is wrong.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

MAGIC = b"RMCK1\n"
PAGE = 65536
BLOCK_PAGES = 16  # a block is at most 1 MiB of memory
_BLOCK = struct.Struct("<IIBI")
_ZERO_PAGE = bytes(PAGE)
MAX_HEADER = 4 * 1024 * 1024


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says why."""


@dataclass
class Checkpoint:
    module_sha256: str  # of the module bytes that ran (transformed)
    memory: bytes | bytearray  # the whole linear memory
    globals: dict[str, Any]  # export name -> value, for every mutable global
    buffer: int  # where the unwound call stack lies in memory
    buffer_size: int
    safe_point: str  # the import it stopped in
    sleep_left_ns: int = 0  # what remained of a sleep it was in
    stdout_bytes: int = 0  # bytes of standard output it wrote before the checkpoint
    runs_done: int = 0  # completed runs of `args.repeat`
    restarts: int = 0  # restarts after a trap (`fault_crash: restart`)
    elapsed_s: float = 0.0  # how long it has run, against `args.limit`
    channels: dict[str, Any] = field(default_factory=dict)  # open channel handles and queued messages

    def header(self) -> dict[str, Any]:
        data = asdict(self)
        del data["memory"]
        data["memory_size"] = len(self.memory)
        return data


def encode(ck: Checkpoint, compress: bool = True) -> bytes:
    header = json.dumps(ck.header(), separators=(",", ":")).encode()
    out = [MAGIC, struct.pack("<I", len(header)), header]
    memory = memoryview(ck.memory)
    pages = len(memory) // PAGE
    page = 0
    while page < pages:
        if memory[page * PAGE : (page + 1) * PAGE] == _ZERO_PAGE:
            page += 1
            continue
        first = page
        while page < pages and page - first < BLOCK_PAGES and memory[page * PAGE : (page + 1) * PAGE] != _ZERO_PAGE:
            page += 1
        raw = memory[first * PAGE : page * PAGE]
        method, body = 0, bytes(raw)
        if compress and len(zlib.compress(raw[:4096], 1)) < 3500:  # the sample compresses: the block likely does
            packed = zlib.compress(raw, 1)
            if len(packed) < len(raw):
                method, body = 1, packed
        out += [_BLOCK.pack(first, page - first, method, len(body)), body]
    return b"".join(out)


def decode(data: bytes, max_memory: int) -> Checkpoint:
    """A checkpoint from its bytes, its memory at most `max_memory` bytes."""
    view = memoryview(data)
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise CheckpointError("not a checkpoint (no RMCK1 header)")
    pos = len(MAGIC)
    if len(view) < pos + 4:
        raise CheckpointError("truncated header")
    (size,) = struct.unpack_from("<I", view, pos)
    pos += 4
    if size > MAX_HEADER or len(view) < pos + size:
        raise CheckpointError("truncated or oversized header")
    try:
        head = json.loads(bytes(view[pos : pos + size]))
    except ValueError as exc:
        raise CheckpointError(f"header is not JSON: {exc}") from None
    pos += size
    if not isinstance(head, dict):
        raise CheckpointError("header is not an object")
    memory_size = head.pop("memory_size", None)
    if not isinstance(memory_size, int) or memory_size < 0 or memory_size % PAGE:
        raise CheckpointError("memory_size must be a whole number of 64 KiB pages")
    if memory_size > max_memory:
        raise CheckpointError(f"its memory ({memory_size // 1048576} MiB) is over this runtime's limit "
                              f"({max_memory // 1048576} MiB)")
    memory = bytearray(memory_size)
    while pos < len(view):
        if len(view) < pos + _BLOCK.size:
            raise CheckpointError("truncated memory block")
        first, count, method, length = _BLOCK.unpack_from(view, pos)
        pos += _BLOCK.size
        if len(view) < pos + length or (first + count) * PAGE > memory_size or method not in (0, 1):
            raise CheckpointError("a memory block lies outside the memory or the checkpoint")
        body = view[pos : pos + length]
        pos += length
        if method == 1:
            inflater = zlib.decompressobj()
            try:
                raw = inflater.decompress(body, count * PAGE)
            except zlib.error as exc:
                raise CheckpointError(f"a memory block does not decompress: {exc}") from None
        else:
            raw = bytes(body)
        if len(raw) != count * PAGE:
            raise CheckpointError("a memory block has the wrong size")
        memory[first * PAGE : (first + count) * PAGE] = raw
    try:
        ck = Checkpoint(memory=memory, **head)
    except TypeError as exc:
        raise CheckpointError(f"header fields: {exc}") from None
    if not isinstance(ck.globals, dict) or not isinstance(ck.buffer, int) or not isinstance(ck.buffer_size, int) \
            or not 0 <= ck.buffer <= ck.buffer + ck.buffer_size <= memory_size:
        raise CheckpointError("globals or the unwind buffer are not valid")
    return ck
