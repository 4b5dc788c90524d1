"""Compiled WebAssembly modules: reading (`.wasm` or `.wat`), compiling with an
on-disk cache, checking exports, the process's engines and their epoch clock.

Nothing here starts a thread or compiles anything at import or when a
configuration is loaded: `inspect_components` (used by `check` and at start-up)
compiles, and `EPOCH_CLOCK.start()` (by whoever runs modules) starts the clock.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import wasmtime

from ..config import Config, WasmComponent

log = logging.getLogger("wasm")
EPOCH_TICK_S = 0.005
MiB = 1024 * 1024
WASMTIME_VERSION = importlib.metadata.version("wasmtime")


class ModuleError(Exception):
    """A module that cannot be loaded: missing, invalid, or without the export asked for."""


def module_bytes(path: Path) -> bytes:
    """A module's binary: `.wasm` as it is, `.wat` compiled from text."""
    try:
        data = path.read_bytes()
    except (OSError, ValueError) as exc:
        raise ModuleError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if path.suffix == ".wat" or not data.startswith(b"\0asm"):
        try:
            return wasmtime.wat2wasm(data.decode("utf-8"))
        except (UnicodeDecodeError, wasmtime.WasmtimeError) as exc:
            raise ModuleError(f"{path.name} is neither a WebAssembly binary nor valid WAT: {str(exc).splitlines()[0]}") from None
    return data


def make_engine(fuel: bool) -> wasmtime.Engine:
    cfg = wasmtime.Config()
    cfg.epoch_interruption = True
    cfg.consume_fuel = fuel
    return wasmtime.Engine(cfg)


def cache_dir() -> Path:
    base = os.environ.get("RM_WASM_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                           "runtime_manager", "wasm")
    return Path(base)


def compile_module(engine: wasmtime.Engine, data: bytes, fuel: bool) -> wasmtime.Module:
    """Compile, or load the compiled artifact from the cache (keyed by module hash,
    wasmtime version and engine settings: an artifact only loads into a matching engine)."""
    key = hashlib.sha256(data + f"|wasmtime {WASMTIME_VERSION}|epoch|fuel={fuel}".encode()).hexdigest()
    path = cache_dir() / f"{key}.cwasm"
    if path.is_file():
        try:
            return wasmtime.Module.deserialize_file(engine, str(path))
        except wasmtime.WasmtimeError:
            log.warning("compiled cache entry %s unusable; compiling again", path.name)
    try:
        module = wasmtime.Module(engine, data)
    except wasmtime.WasmtimeError as exc:
        raise ModuleError(f"invalid module: {str(exc).splitlines()[0]}") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(module.serialize())
        tmp.replace(path)
    except OSError as exc:  # a read-only home is no reason to fail
        log.debug("cannot cache compiled module: %s", exc)
    return module


def check_exports(module: wasmtime.Module, names: Iterable[str]) -> list[str]:
    """Problems with the exports that endpoints name: each must be a function without parameters."""
    exports = {e.name: e.type for e in module.exports}
    problems = []
    for name in names:
        kind = exports.get(name)
        if kind is None:
            funcs = sorted(n for n, t in exports.items() if isinstance(t, wasmtime.FuncType))
            problems.append(f"no exported function '{name}' (exports: {', '.join(funcs) or 'none'})")
        elif not isinstance(kind, wasmtime.FuncType):
            problems.append(f"export '{name}' is not a function")
        elif kind.params:
            problems.append(f"function '{name}' takes parameters; it must take none (input comes on stdin)")
    return problems


def inspect_component(comp: WasmComponent) -> list[str]:
    """Problems of one WASM component: its module loads and exports its endpoints."""
    try:
        module = compile_module(shared_engine(comp.limits.fuel is not None), module_bytes(comp.module),
                                comp.limits.fuel is not None)
    except ModuleError as exc:
        return [str(exc)]
    return check_exports(module, comp.endpoints.values())


def inspect_components(config: Config) -> list[str]:
    """Every module problem of a configuration, as `components.conf: NAME.config.module: message`."""
    return [f"components.conf: {comp.name}.config.module: {problem}"
            for comp in config.components.values() if isinstance(comp, WasmComponent)
            for problem in inspect_component(comp)]


_engines: dict[bool, wasmtime.Engine] = {}
_engines_lock = threading.Lock()


def shared_engine(fuel: bool) -> wasmtime.Engine:
    """The process's engines for flow steps (one with fuel, one without). Their
    epochs advance while `EPOCH_CLOCK` runs: the clock of every step's time limit."""
    with _engines_lock:
        if fuel not in _engines:
            _engines[fuel] = make_engine(fuel)
        return _engines[fuel]


class EpochClock:
    """One thread that advances the shared engines' epochs every EPOCH_TICK_S,
    running while at least one user has started it (start/stop are counted)."""

    def __init__(self) -> None:
        self._users = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._lock:
            self._users += 1
            if self._thread is None:
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._tick, args=(self._stop,), name="wasm-epoch", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users == 0 and self._thread is not None:
                self._stop.set()
                self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    @staticmethod
    def _tick(stop: threading.Event) -> None:
        while not stop.wait(EPOCH_TICK_S):
            for engine in list(_engines.values()):
                engine.increment_epoch()


EPOCH_CLOCK = EpochClock()
