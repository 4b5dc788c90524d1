"""A checkpoint: everything a paused module needs to go on elsewhere, and its
encoding as bytes.

    b"RMCK1\\n", u32 header length, the header (JSON), then the memory's pages in
    blocks: u32 first page, u32 pages, u8 method (0 raw, 1 zlib, 2 zero), u32 length, bytes

A checkpoint may be a *delta* against a base (a copy of the memory the
destination already holds, taken while the module still ran): then it carries
only the pages that differ from the base, and `base_sha256` says which base.

Pages that are all zero are left out (a module's memory is mostly empty), and a
page is compressed only when a sample of it compresses: incompressible memory
is copied, not run through zlib for nothing (about 20 ms a MiB). `decode` checks everything it reads
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
    base_sha256: str | None = None  # a delta: the pages that differ from this base memory

    def header(self) -> dict[str, Any]:
        data = asdict(self)
        del data["memory"]
        data["memory_size"] = len(self.memory)
        return data


def encode(ck: Checkpoint, compress: bool = True, base: bytes | None = None) -> bytes:
    """`base`: only the pages that differ from it (`ck.base_sha256` must name it)."""
    assert (base is None) == (ck.base_sha256 is None)
    header = json.dumps(ck.header(), separators=(",", ":")).encode()
    out = [MAGIC, struct.pack("<I", len(header)), header]
    # slices of bytes, not of memoryviews: a memoryview compares byte by byte in
    # Python (0.18 ms a page), bytes with memcmp
    memory = ck.memory
    pages = len(memory) // PAGE
    before = base or b""

    def kind(page: int) -> int:  # 0 left out, 1 raw, 2 worth compressing (judged from a sample), 3 zero
        data = memory[page * PAGE : (page + 1) * PAGE]
        if base is not None and (page + 1) * PAGE <= len(before) and data == before[page * PAGE : (page + 1) * PAGE]:
            return 0  # as in the base
        if data == _ZERO_PAGE:
            return 3 if base is not None and (page + 1) * PAGE <= len(before) else 0
        if not compress:
            return 1
        sample = data[PAGE // 2 - 1024 : PAGE // 2 + 1024]
        return 2 if len(zlib.compress(sample, 1)) < 0.8 * len(sample) else 1

    kinds = [kind(p) for p in range(pages)]
    page = 0
    while page < pages:
        first, k = page, kinds[page]
        while page < pages and kinds[page] == k and page - first < BLOCK_PAGES:
            page += 1
        if k == 0:
            continue
        if k == 3:
            out.append(_BLOCK.pack(first, page - first, 2, 0))
            continue
        raw = memory[first * PAGE : page * PAGE]
        method, body = 0, bytes(raw) if isinstance(raw, bytearray) else raw
        if k == 2:
            packed = zlib.compress(raw, 1)
            if len(packed) < len(raw):
                method, body = 1, packed
        out += [_BLOCK.pack(first, page - first, method, len(body)), body]
    return b"".join(out)


def decode(data: bytes, max_memory: int, base: bytes | bytearray | None = None,
           base_sha256: str | None = None) -> Checkpoint:
    """A checkpoint from its bytes, its memory at most `max_memory` bytes; a
    delta needs its `base` (whose hash, `base_sha256`, the caller knows; a
    bytearray is used in place, and is the checkpoint's memory afterwards)."""
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
    wanted = head.get("base_sha256")
    if wanted is not None:
        if base is None or wanted != base_sha256:
            raise CheckpointError("it is a delta against a base memory this runtime does not hold")
        # a bytearray base becomes the memory itself (no copy of tens of MiB in the pause)
        memory = base if isinstance(base, bytearray) else bytearray(base)
        if len(memory) > memory_size:
            del memory[memory_size:]
        else:
            memory.extend(bytes(memory_size - len(memory)))
    else:
        memory = bytearray(memory_size)
    while pos < len(view):
        if len(view) < pos + _BLOCK.size:
            raise CheckpointError("truncated memory block")
        first, count, method, length = _BLOCK.unpack_from(view, pos)
        pos += _BLOCK.size
        if len(view) < pos + length or (first + count) * PAGE > memory_size or method not in (0, 1, 2):
            raise CheckpointError("a memory block lies outside the memory or the checkpoint")
        body = view[pos : pos + length]
        pos += length
        if method == 2:
            raw = bytes(count * PAGE) if length == 0 else b""
        elif method == 1:
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
