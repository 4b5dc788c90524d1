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
import math
import os
import resource
import threading
from collections.abc import Iterable
from pathlib import Path

import wasmtime
from wasmtime import _ffi as ffi

from ..config import Config, WasmComponent

log = logging.getLogger("wasm")
EPOCH_TICK_S = 0.005
MiB = 1024 * 1024
POOL_SLOTS = 1000  # instances at once in a shared engine's pool (see make_engine)
POOL_ADDRESS_SPACE = 2 * POOL_SLOTS * (4 * 1024 + 64) * MiB + 64 * 1024 * MiB  # two pools and the rest
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


def make_engine(fuel: bool, pooled: bool = False) -> wasmtime.Engine:
    """An engine with epoch interruption (and fuel metering when asked).

    `pooled`: instances are allocated from wasmtime's pooling allocator, POOL_SLOTS
    of them at most at once: an instance's memory, table and context come from
    slots set aside once (about 4 TiB of address space, nothing resident)
    instead of being mapped and unmapped for each instance, which made a
    short flow step's instantiation and clean-up about a third of its cost.
    Not under an address-space limit that leaves too little for two pools."""
    cfg = wasmtime.Config()
    cfg.epoch_interruption = True
    cfg.consume_fuel = fuel
    # A memory keeps its address while its instance lives (its reservation is a
    # 32-bit memory's whole range): the stdio host calls read and write it
    # through a view made once per call (sandbox.py).
    ffi.wasmtime_config_memory_may_move_set(cfg.ptr(), False)
    if pooled and _address_space_left() < POOL_ADDRESS_SPACE:
        # wasmtime aborts the process (does not fail) when it cannot map the pool
        log.warning("WebAssembly instance pool not used: the address space is limited (ulimit -v); "
                    "instances are allocated one by one")
    elif pooled:
        pool = ffi.wasmtime_pooling_allocation_config_new()
        for set_total in (ffi.wasmtime_pooling_allocation_config_total_core_instances_set,
                          ffi.wasmtime_pooling_allocation_config_total_memories_set,
                          ffi.wasmtime_pooling_allocation_config_total_tables_set):
            set_total(pool, POOL_SLOTS)
        # a slot holds any 32-bit memory: the store's limit (limits.memory_mb) is what bounds it
        ffi.wasmtime_pooling_allocation_config_max_memory_size_set(pool, 4 * 1024 * MiB)
        ffi.wasmtime_pooling_allocation_strategy_set(cfg.ptr(), pool)
        ffi.wasmtime_pooling_allocation_config_delete(pool)
        engine = wasmtime.Engine(cfg)
        _pooled_engines.append(engine)
        return engine
    return wasmtime.Engine(cfg)


def _address_space_left() -> float:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return math.inf if soft == resource.RLIM_INFINITY else soft


_pooled_engines: list[wasmtime.Engine] = []


def pooled(engine: wasmtime.Engine) -> bool:
    """Whether `engine` allocates its instances from a pool."""
    return any(e is engine for e in _pooled_engines)


def cache_dir() -> Path:
    base = os.environ.get("RM_WASM_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                           "runtime_manager", "wasm")
    return Path(base)


def compile_module(engine: wasmtime.Engine, data: bytes, fuel: bool) -> wasmtime.Module:
    """Compile, or load the compiled artifact from the cache (keyed by module hash,
    wasmtime version and engine settings: an artifact only loads into a matching engine)."""
    pool = "|pool" if pooled(engine) else ""
    key = hashlib.sha256(data + f"|wasmtime {WASMTIME_VERSION}|epoch|fixed-memory|fuel={fuel}{pool}".encode()).hexdigest()
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


def compile_step_module(path: Path, fuel: bool) -> tuple[wasmtime.Engine, wasmtime.Module]:
    """A flow step's module, compiled for the shared engine with an instance pool,
    or for the one without when its instances do not fit a pool slot (more than
    one memory or table, a large table or instance)."""
    data = module_bytes(path)
    engine = shared_engine(fuel)
    try:
        module = compile_module(engine, data, fuel)
        misfit = _pool_misfit(engine, module) if pooled(engine) else None
    except ModuleError as exc:
        if not pooled(engine):
            raise
        misfit = str(exc)
    if misfit is None:
        return engine, module
    engine = shared_engine(fuel, pool=False)
    module = compile_module(engine, data, fuel)  # a module invalid for any engine fails here
    log.info("%s does not fit an instance pool slot (%s); its instances are allocated one by one", path.name, misfit)
    return engine, module


def _pool_misfit(engine: wasmtime.Engine, module: wasmtime.Module) -> str | None:
    """Why instances of `module` cannot come from `engine`'s pool (more than one
    memory or table, a table over the pool's size, a large instance), or None.
    Found by instantiating it once, its function imports as traps, in a store
    whose deadline has passed: the pool's limits are checked when the instance
    is allocated, before anything of the module runs (a start function is
    interrupted at once)."""
    store = wasmtime.Store(engine)
    try:
        store.set_epoch_deadline(0)
        linker = wasmtime.Linker(engine)
        linker.define_unknown_imports_as_traps(module)
        linker.instantiate(store, module)
    except wasmtime.Trap:
        return None  # allocated; its start function was interrupted or called an import
    except wasmtime.WasmtimeError as exc:  # not allocated: the usual allocator it is
        return str(exc).splitlines()[0]
    finally:
        store.close()
    return None


def inspect_component(comp: WasmComponent) -> list[str]:
    """Problems of one WASM component: its module loads and exports its endpoints."""
    try:
        _, module = compile_step_module(comp.module, comp.limits.fuel is not None)
    except ModuleError as exc:
        return [str(exc)]
    return check_exports(module, comp.endpoints.values())


def inspect_components(config: Config) -> list[str]:
    """Every module problem of a configuration, as `components.conf: NAME.config.module: message`."""
    return [f"components.conf: {comp.name}.config.module: {problem}"
            for comp in config.components.values() if isinstance(comp, WasmComponent)
            for problem in inspect_component(comp)]


_engines: dict[tuple[bool, bool], wasmtime.Engine] = {}  # (fuel, pooled) -> engine
_engines_lock = threading.Lock()


def shared_engine(fuel: bool, pool: bool = True) -> wasmtime.Engine:
    """The process's engines for flow steps: with or without fuel; with an
    instance pool (flow steps), or without (a module that does not fit a pool
    slot, see `sandbox.load`). Their epochs advance while `EPOCH_CLOCK` runs:
    the clock of every step's time limit."""
    with _engines_lock:
        if (fuel, pool) not in _engines:
            _engines[fuel, pool] = make_engine(fuel, pooled=pool)
        return _engines[fuel, pool]


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
