"""Making a module migratable: Binaryen's Asyncify transform, and an export for
each mutable global.

wasmtime cannot snapshot a running instance. Asyncify (`wasm-opt --asyncify`)
rewrites a module so that the host, inside one of the imports it names, can
unwind the module's whole call stack into a buffer in linear memory, and later
(in a fresh instance, in another process) rewind it and go on exactly where it
stopped. The imports named here are the *safe points*: standard output, standard
input and sleeping (WASI `fd_write`, `fd_read`, `poll_oneoff`) and a channel
read. A module that never calls one (a pure compute loop) cannot be paused.

Every mutable global must travel with the memory: C and Rust keep their stack
pointer in one that they do not export, and without it the resumed program
computes wrong results silently. wasmtime-py reads exported globals only, so
`export_mutable_globals` appends an export `__rm_global_<index>` for each (a
small rewrite of the export section, no dependency).

The transformed bytes are cached by the hash of the module, of wasm-opt's
version and of the options, beside the compile cache. Nothing here runs a module.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

from .modules import cache_dir

log = logging.getLogger("wasm")

WASI = "wasi_snapshot_preview1"
SAFE_POINTS = (f"{WASI}.fd_write", f"{WASI}.fd_read", f"{WASI}.poll_oneoff", "channels.read")
GLOBAL_EXPORT = "__rm_global_"
ASYNCIFY_EXPORTS = ("asyncify_start_unwind", "asyncify_stop_unwind", "asyncify_start_rewind",
                    "asyncify_stop_rewind", "asyncify_get_state")
TRANSFORM_TIMEOUT_S = 120


@dataclass(frozen=True)
class Migratable:
    """The outcome of preparing a module: the bytes to run, and whether they can move."""

    data: bytes  # the bytes to run: transformed, or the original ones when `why_not` is set
    why_not: str | None = None  # None: it can move

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@functools.cache
def wasm_opt_version() -> str | None:
    """wasm-opt's version line, or None when Binaryen is not installed."""
    exe = shutil.which("wasm-opt")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip() or "wasm-opt"


def prepare(data: bytes) -> Migratable:
    """`data` transformed so that it can pause at its safe points, from the
    cache when it was done before; or the original bytes and why not."""
    version = wasm_opt_version()
    if version is None:
        return Migratable(data, "Binaryen's wasm-opt is not installed (apt-get install binaryen)")
    problem = _unfit(data)
    if problem:
        return Migratable(data, problem)
    key = hashlib.sha256(data + f"|{version}|{','.join(SAFE_POINTS)}|O2|globals".encode()).hexdigest()
    path = cache_dir() / f"{key}.asyncify.wasm"
    try:
        return Migratable(path.read_bytes())
    except OSError:
        pass
    try:
        out = export_mutable_globals(_asyncify(data))
    except TransformError as exc:
        return Migratable(data, f"the Asyncify transform failed: {exc}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(out)
        tmp.replace(path)
    except OSError as exc:
        log.debug("cannot cache a transformed module: %s", exc)
    return Migratable(out)


class TransformError(Exception):
    pass


def _asyncify(data: bytes) -> bytes:
    with tempfile.TemporaryDirectory(prefix="rm-asyncify-") as tmp:
        src, dst = os.path.join(tmp, "in.wasm"), os.path.join(tmp, "out.wasm")
        with open(src, "wb") as f:
            f.write(data)
        cmd = ["wasm-opt", src, "--asyncify", f"--pass-arg=asyncify-imports@{','.join(SAFE_POINTS)}",
               "-O2", "--enable-bulk-memory", "--enable-sign-ext", "--enable-mutable-globals",
               "--enable-nontrapping-float-to-int", "-o", dst]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=TRANSFORM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise TransformError(f"wasm-opt took more than {TRANSFORM_TIMEOUT_S} s") from None
        except OSError as exc:
            raise TransformError(str(exc)) from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            raise TransformError(lines[0] if lines else f"wasm-opt exited with {done.returncode}")
        with open(dst, "rb") as f:
            return f.read()


def _unfit(data: bytes) -> str | None:
    """Why a module cannot be made migratable, judged from its sections."""
    try:
        module = read_sections(data)
    except ValueError as exc:
        return f"not a WebAssembly binary this runtime can read: {exc}"
    if module.memories + module.imported_memories != 1:
        return "it must have exactly one linear memory"
    if module.imported_memories:
        return "its memory is imported"
    if any(kind not in NUMBER_TYPES for kind, mutable in module.globals if mutable):
        return "it has a mutable global that is not a number (v128 or a reference)"
    return None


# ----- a small reader and writer of the binary format ----------------------------------------
NUMBER_TYPES = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64"}
_SECTION_ORDER = [1, 2, 3, 4, 5, 13, 6, 7, 8, 9, 12, 10, 11]  # custom sections (0) go anywhere


def _uleb(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated number")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("number too long")


def _sleb_skip(data: bytes, pos: int) -> int:
    while True:
        if pos >= len(data):
            raise ValueError("truncated number")
        pos += 1
        if not data[pos - 1] & 0x80:
            return pos


def uleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _name(data: bytes, pos: int) -> tuple[bytes, int]:
    size, pos = _uleb(data, pos)
    if pos + size > len(data):
        raise ValueError("truncated name")
    return data[pos : pos + size], pos + size


def _limits(data: bytes, pos: int) -> int:
    flags, pos = _uleb(data, pos)
    _, pos = _uleb(data, pos)
    if flags & 1:
        _, pos = _uleb(data, pos)
    return pos


def _const_expr_end(data: bytes, pos: int) -> int:
    """The position after a constant expression's `end`."""
    while True:
        if pos >= len(data):
            raise ValueError("truncated constant expression")
        op = data[pos]
        pos += 1
        if op == 0x0B:
            return pos
        if op in (0x41, 0x42):
            pos = _sleb_skip(data, pos)
        elif op == 0x43:
            pos += 4
        elif op == 0x44:
            pos += 8
        elif op in (0x23, 0xD2):
            _, pos = _uleb(data, pos)
        elif op == 0xD0:
            pos += 1
        elif op == 0xFD:  # v128.const
            _, pos = _uleb(data, pos)
            pos += 16
        elif op not in (0x6A, 0x6B, 0x6C, 0x7C, 0x7D, 0x7E):  # extended constant arithmetic
            raise ValueError(f"unexpected opcode {op:#x} in a constant expression")


@dataclass
class Sections:
    sections: list[tuple[int, bytes]]  # (id, contents) in file order
    imported_globals: int = 0
    imported_memories: int = 0
    memories: int = 0
    globals: list[tuple[int, bool]] = field(default_factory=list)  # the defined ones: (value type, mutable)


def read_sections(data: bytes) -> Sections:
    if data[:4] != b"\0asm" or data[4:8] != b"\x01\0\0\0":
        raise ValueError("no WebAssembly 1.0 header")
    pos, sections = 8, []
    while pos < len(data):
        sid = data[pos]
        size, start = _uleb(data, pos + 1)
        if start + size > len(data):
            raise ValueError(f"section {sid} runs past the end")
        sections.append((sid, data[start : start + size]))
        pos = start + size
    out = Sections(sections)
    for sid, body in sections:
        if sid == 2:
            count, p = _uleb(body, 0)
            for _ in range(count):
                _, p = _name(body, p)
                _, p = _name(body, p)
                kind = body[p]
                p += 1
                if kind == 0:
                    _, p = _uleb(body, p)
                elif kind == 1:
                    p = _limits(body, p + 1)
                elif kind == 2:
                    p = _limits(body, p)
                    out.imported_memories += 1
                elif kind == 3:
                    p += 2
                    out.imported_globals += 1
                elif kind == 4:
                    _, p = _uleb(body, p + 1)
                else:
                    raise ValueError(f"unknown import kind {kind}")
        elif sid == 5:
            out.memories, _ = _uleb(body, 0)
        elif sid == 6:
            count, p = _uleb(body, 0)
            for _ in range(count):
                kind, mutable = body[p], body[p + 1] == 1
                p = _const_expr_end(body, p + 2)
                out.globals.append((kind, mutable))
    return out


def export_mutable_globals(data: bytes) -> bytes:
    """`data` with an export `__rm_global_<index>` for each defined mutable global."""
    module = read_sections(data)
    extra = [(GLOBAL_EXPORT + str(module.imported_globals + i)).encode()
             for i, (_kind, mutable) in enumerate(module.globals) if mutable]
    indices = [module.imported_globals + i for i, (_kind, mutable) in enumerate(module.globals) if mutable]
    if not extra:
        return data
    entries = b"".join(uleb(len(name)) + name + b"\x03" + uleb(index) for name, index in zip(extra, indices, strict=True))
    sections = list(module.sections)
    for i, (sid, body) in enumerate(sections):
        if sid == 7:
            count, p = _uleb(body, 0)
            sections[i] = (7, uleb(count + len(extra)) + body[p:] + entries)
            break
    else:
        where = next((i for i, (sid, _) in enumerate(sections)
                      if sid and _SECTION_ORDER.index(sid) > _SECTION_ORDER.index(7)), len(sections))
        sections.insert(where, (7, uleb(len(extra)) + entries))
    return b"\0asm\x01\0\0\0" + b"".join(bytes([sid]) + uleb(len(body)) + body for sid, body in sections)
