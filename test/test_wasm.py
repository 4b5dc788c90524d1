"""WebAssembly components in flows: real wasmtime, the shipped modules in runtimes/."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import ORIGINAL, ROOT, write_config
from helpers import InProcessNode, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime_manager.cli import load_checked
from runtime_manager.config import WasmLimits, load_config
from runtime_manager.core.errors import ConfigError
from runtime_manager.core.request import FlowRequest
from runtime_manager.wasm.sandbox import load, run_module

RUNTIMES = ROOT / "runtimes"


def wasm_component(module: str, endpoints: dict | None = None, **limits) -> dict:
    cfg = {"protocol": "wasm", "module": module, "endpoints": endpoints or {"1": "_start"}}
    if limits:
        cfg["limits"] = limits
    return {"id": 50, "config": cfg}


FLOWS = """echo
TO echo 1
POST payload

chain
TO component1 1
POST payload
TO upper 1
POST result1 payload
TO sum 1
POST payload result2

get
TO echo 1
GET

loop
TO loop 1
GET

grow
TO grow 1
GET

trap
TO trap 1
GET

fuel
TO fuel 1
GET

longloop
TO longloop 1
GET
"""


@pytest.fixture
def engine(tmp_path: Path, mock):
    comps = {
        "echo": wasm_component("echo.wat"),
        "upper": wasm_component("upper.wat"),
        "sum": wasm_component("sum.wat"),
        "loop": wasm_component("loop.wat", timeout_ms=100),
        "longloop": wasm_component("loop.wat", timeout_ms=2000),
        "grow": wasm_component("grow.wat", memory_mb=8),
        "trap": wasm_component("trap.wat"),
        "fuel": wasm_component("loop.wat", fuel=100000, timeout_ms=5000),
    }
    cfg = write_config(tmp_path / "cfg", mock.port, flows=FLOWS, components=comps,
                       runtime={"module_dir": str(RUNTIMES), "wasm_threads": 2})
    e = InProcessNode(load_config(cfg)).start()
    yield e
    e.kill()


def run(engine: InProcessNode, flow: str, payload=None) -> dict:
    return engine.run(FlowRequest(flow, payload), timeout=20)


def test_echo_gets_the_request_body_on_stdin(engine):
    res = run(engine, "echo", {"k": [1, "two"]})
    assert res["status"] == "ok", res
    assert res["results"] == [{"payload": [{"k": [1, "two"]}]}]


def test_get_sends_an_empty_stdin(engine):
    res = run(engine, "get")
    assert res["results"] == [""]


def test_http_and_wasm_steps_chain(engine):
    res = run(engine, "chain", [5, 6])
    assert res["status"] == "ok", res
    r1, r2, r3 = res["results"]
    assert r1["payload"] == [[5, 6]]
    assert r2 == {"PAYLOAD": [{"ENDPOINT": "ENDPOINT1", "METHOD": "POST", "PAYLOAD": [[5, 6]]}, [5, 6]]}
    assert r3 == {"sum": 5 + 6 + 5 + 6 + 5 + 6}  # payload twice plus the payload inside result2


def test_infinite_loop_is_stopped_by_its_time_limit(engine):
    started = time.perf_counter()
    res = run(engine, "loop")
    took = time.perf_counter() - started
    assert res["error"]["code"] == "timeout" and res["error"]["component"] == "loop"
    assert "stopped after 100 ms" in res["error"]["message"]
    assert took < 5  # stopped, not left running (bench/ measures how fast)


def test_memory_limit_traps_with_out_of_memory(engine):
    res = run(engine, "grow")
    assert res["error"]["code"] == "wasm_trap"
    assert "out of memory (limits.memory_mb 8)" in res["error"]["message"]


def test_trap_names_component_and_cause_and_node_keeps_serving(engine):
    res = run(engine, "trap")
    err = res["error"]
    assert err["code"] == "wasm_trap" and err["component"] == "trap" and err["step"] == 1
    assert "unreachable" in err["message"]
    assert run(engine, "echo", 1)["status"] == "ok"


def test_fuel_limit(engine):
    res = run(engine, "fuel")
    assert res["error"]["code"] == "wasm_trap" and "out of fuel" in res["error"]["message"]


def test_a_slow_module_delays_only_its_own_flow(engine):
    results: dict[str, dict] = {}
    slow = threading.Thread(target=lambda: results.setdefault("loop", run(engine, "longloop")))
    slow.start()
    time.sleep(0.05)
    results["echo"] = run(engine, "echo", "fast")
    assert results["echo"]["status"] == "ok"
    assert "loop" not in results  # the echo finished while the loop still ran
    slow.join(10)
    assert results["loop"]["error"]["code"] == "timeout"


def test_many_stuck_modules_do_not_hold_up_other_flows(engine):
    """wasm_threads 2: six infinite loops (each stopped at 2 s) used to hold both
    threads and delay an unrelated flow by seconds. Now a component runs at most
    limits.concurrency (4) calls at once and the pool grows while every thread is held."""
    done: list[dict] = []
    for _ in range(6):
        engine.submit(FlowRequest("longloop"), done.append)
    wait_for(lambda: engine.node.wasm.pool.threads >= 4, 5, "four loops on threads of their own")
    t0 = time.monotonic()
    assert run(engine, "echo", "fast")["status"] == "ok"
    assert time.monotonic() - t0 < 1.0 and not done  # answered while every loop still ran
    wait_for(lambda: len(done) == 6, 15, "the loops to time out")
    assert all(r["error"]["code"] == "timeout" for r in done)


def test_the_pool_keeps_short_calls_on_one_thread_and_grows_only_when_held():
    from runtime_manager.wasm.pool import WasmPool

    pool = WasmPool(threads=2, max_threads=5, idle_s=0.3)
    try:
        names = {pool.submit(lambda: threading.current_thread().name).result(5) for _ in range(200)}
        assert names == {"wasm_0"} and pool.threads == 2
        release = threading.Event()
        held = [pool.submit(release.wait, 10) for _ in range(7)]
        wait_for(lambda: sum(f.running() for f in held) == 5, 5, "the pool to grow to its maximum")
        time.sleep(0.2)
        assert pool.threads == 5 and sum(f.running() for f in held) == 5  # no more: the other two wait
        release.set()
        assert all(f.result(5) for f in held)
        wait_for(lambda: pool.threads == 2, 5, "the extra threads to leave when idle")
    finally:
        pool.shutdown()


def test_fresh_instance_per_call_no_state_leaks(tmp_path):
    counter = tmp_path / "counter.wat"
    counter.write_text("""(module
      (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (global $n (mut i32) (i32.const 48))
      (func (export "_start")
        (global.set $n (i32.add (global.get $n) (i32.const 1)))
        (i32.store8 (i32.const 100) (global.get $n))
        (i32.store (i32.const 0) (i32.const 100)) (i32.store (i32.const 4) (i32.const 1))
        (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))""")
    loaded = load(counter)
    outs = {run_module(loaded, "_start").stdout for _ in range(3)}
    assert outs == {b"1"}
    # flow steps (stdio in memory) share a kept store between calls: each call
    # still gets its own instance, globals and memory, across store renewals
    in_memory = load(counter, memory_stdio=True)
    outs = {run_module(in_memory, "_start").stdout for _ in range(100)}
    assert outs == {b"1"}


def test_kept_stores_keep_every_limit_per_call(tmp_path):
    """Fuel and time are per call in a kept store; a trap does not carry over."""
    loop = load(RUNTIMES / "loop.wat", fuel=True, memory_stdio=True)
    for _ in range(40):
        out = run_module(loop, "_start", limits=WasmLimits(fuel=20000, timeout_ms=5000))
        assert out.trap == "out_of_fuel"
    echo = load(RUNTIMES / "echo.wat", memory_stdio=True)
    trap = load(RUNTIMES / "trap.wat", memory_stdio=True)
    for i in range(40):
        assert run_module(trap, "_start").trap is not None
        assert run_module(echo, "_start", str(i).encode()).stdout == str(i).encode()
    grow = load(RUNTIMES / "grow.wat", memory_stdio=True)
    for _ in range(5):  # each call may grow to its own limit, whatever the calls before held
        out = run_module(grow, "_start", limits=WasmLimits(memory_mb=4))
        assert out.trap and out.memory_bytes >= 3 * 1024 * 1024


def test_sandbox_sees_no_files_and_no_environment(tmp_path):
    # path_open on a preopened directory is the only way to a file; there is none
    probe = tmp_path / "probe.wat"
    probe.write_text("""(module
      (import "wasi_snapshot_preview1" "fd_prestat_get" (func $p (param i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "environ_sizes_get" (func $e (param i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") 1)
      (func (export "_start")
        ;; fd 3 would be the first preopened directory: expect EBADF (8)
        (if (i32.ne (call $p (i32.const 3) (i32.const 0)) (i32.const 8)) (then (call $exit (i32.const 3))))
        (drop (call $e (i32.const 16) (i32.const 20)))
        (if (i32.ne (i32.load (i32.const 16)) (i32.const 0)) (then (call $exit (i32.const 4))))
        (call $exit (i32.const 0))))""")
    out = run_module(load(probe), "_start", limits=WasmLimits())
    assert out.exit_code == 0, out


def test_nonzero_exit_fails_the_step(tmp_path, mock):
    exit7 = tmp_path / "exit7.wat"
    exit7.write_text("""(module
      (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "proc_exit" (func $x (param i32)))
      (memory (export "memory") 1) (data (i32.const 100) "bad input")
      (func (export "_start")
        (i32.store (i32.const 0) (i32.const 100)) (i32.store (i32.const 4) (i32.const 9))
        (drop (call $w (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
        ;; fd 5 does not exist in the sandbox: EBADF (8)
        (if (i32.ne (call $w (i32.const 5) (i32.const 0) (i32.const 1) (i32.const 8)) (i32.const 8)) (then unreachable))
        (call $x (i32.const 7))))""")
    cfg = write_config(tmp_path / "cfg", mock.port, flows="x\nTO bad 1\nGET\n",
                       components={"bad": wasm_component(str(exit7))})
    e = InProcessNode(load_config(cfg)).start()
    try:
        res = run(e, "x")
        assert res["error"]["code"] == "wasm_trap" and "exited with code 7; stderr: bad input" in res["error"]["message"]
    finally:
        e.kill()


def test_missing_or_invalid_module_is_a_load_time_error(tmp_path, mock):
    bad = tmp_path / "bad.wat"
    bad.write_text("(module (func $f (unknown-instr)))")
    comps = {"missing": wasm_component("nope.wasm"), "invalid": wasm_component(str(bad)),
             "wrongexport": wasm_component("echo.wat", {"1": "process"})}
    cfg = write_config(tmp_path / "cfg", mock.port, flows="1\nTO component1 1\nGET\n", components=comps,
                       runtime={"module_dir": str(RUNTIMES)})
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)  # what the files say: the module file is missing
    assert "components.conf: missing.config.module: module file not found" in "\n".join(exc.value.errors)
    comps.pop("missing")
    cfg = write_config(tmp_path / "cfg", mock.port, flows="1\nTO component1 1\nGET\n", components=comps,
                       runtime={"module_dir": str(RUNTIMES)})
    with pytest.raises(ConfigError) as exc:
        load_checked(cfg)  # what `check` and every entry point do: compile and look at the exports
    errors = "\n".join(exc.value.errors)
    assert "components.conf: invalid.config.module: bad.wat is neither a WebAssembly binary nor valid WAT" in errors
    assert "components.conf: wrongexport.config.module: no exported function 'process' (exports: _start)" in errors


def test_wasm_binary_modules_load_too(tmp_path):
    import wasmtime

    binary = tmp_path / "echo.wasm"
    binary.write_bytes(wasmtime.wat2wasm((RUNTIMES / "echo.wat").read_text()))
    assert run_module(load(binary), "_start", stdin=b'"x"').stdout == b'"x"'


def test_shipped_demo_config_has_a_wasm_flow():
    config = load_config(ROOT / "config_files")
    kinds = {type(c.component).__name__ for f in config.flows.values() for c in f.calls}
    assert "WasmComponent" in kinds


def test_original_config_still_loads_without_wasm():
    assert load_config(ORIGINAL).components


def test_every_shipped_module_compiles():
    from runtime_manager.wasm.channels import ModuleChannels

    for wat in RUNTIMES.glob("*.wat"):
        if "(import \"channels\"" in wat.read_text():  # an orchestrator module with channels
            load(wat, channels=ModuleChannels([], lambda *_: None))
        else:
            load(wat)


def test_runtimes_readme_lists_every_module():
    readme = (RUNTIMES / "README.md").read_text()
    for wat in RUNTIMES.glob("*.wat"):
        assert f"`{wat.name}`" in readme


def test_compiled_modules_are_cached_on_disk(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RM_WASM_CACHE", str(tmp_path / "cache"))
    module = tmp_path / "echo.wat"
    module.write_text((RUNTIMES / "echo.wat").read_text())
    load(module)
    cached = list((tmp_path / "cache").glob("*.cwasm"))
    assert len(cached) == 1
    assert run_module(load(module), "_start", stdin=b"1").stdout == b"1"  # loaded from the cache
    cached[0].write_bytes(b"garbage")  # a broken entry is compiled again, not fatal
    assert run_module(load(module), "_start", stdin=b"2").stdout == b"2"
    assert "unusable" in caplog.text
    module.write_text((RUNTIMES / "upper.wat").read_text())  # another module: another key
    load(module)
    assert len(list((tmp_path / "cache").glob("*.cwasm"))) == 2


def test_loading_a_configuration_starts_and_compiles_nothing(tmp_path, monkeypatch):
    import threading

    from runtime_manager.wasm.modules import EPOCH_CLOCK

    monkeypatch.setenv("RM_WASM_CACHE", str(tmp_path / "cache"))
    before = {t.name for t in threading.enumerate()}
    config = load_config(ROOT / "config_files")
    assert any(type(c).__name__ == "WasmComponent" for c in config.components.values())
    assert {t.name for t in threading.enumerate()} == before and not EPOCH_CLOCK.running
    assert not (tmp_path / "cache").exists()  # nothing compiled
    load_checked(ROOT / "config_files")  # `check` compiles (and fills the cache) but starts no thread
    assert list((tmp_path / "cache").glob("*.cwasm")) and not EPOCH_CLOCK.running


def test_output_beyond_max_output_bytes_fails_the_step(tmp_path, mock):
    """A module writing 2 MiB of zero bytes (64 KiB at a time) with max_output_bytes 1 MiB:
    the write that crosses the limit is refused (EFBIG) and the step fails result_too_large."""
    flood = tmp_path / "flood.wat"
    flood.write_text("""(module
      (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 2)
      (func (export "_start") (local $i i32)
        (i32.store (i32.const 0) (i32.const 1024)) (i32.store (i32.const 4) (i32.const 65536))
        (loop $more
          (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $more (i32.lt_u (local.get $i) (i32.const 32))))))""")
    comp = wasm_component(str(flood))
    comp["config"]["max_output_bytes"] = 1024 * 1024
    cfg = write_config(tmp_path / "cfg", mock.port, flows="x\nTO flood 1\nGET\n", components={"flood": comp})
    e = InProcessNode(load_config(cfg)).start()
    try:
        res = run(e, "x")
        assert res["error"]["code"] == "result_too_large" and "max_output_bytes (1048576)" in res["error"]["message"]
        assert res["error"]["component"] == "flood"
    finally:
        e.kill()


BUSY_WAT = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "done")
  (func (export "_start") (local $i i32)
    (local.set $i (i32.const 300000000))
    (loop $spin (local.set $i (i32.sub (local.get $i) (i32.const 1))) (br_if $spin (local.get $i)))
    (i32.store (i32.const 0) (i32.const 100)) (i32.store (i32.const 4) (i32.const 4))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"""


def test_short_calls_run_on_the_loop_and_a_long_one_again_on_a_thread(tmp_path: Path, mock):
    """A call tried on the loop that is not done within 5–10 ms is run again, whole,
    on a thread with its full limit; its component's next calls go to the threads."""
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "echo.wat").write_text((RUNTIMES / "echo.wat").read_text())
    (mods / "busy.wat").write_text(BUSY_WAT)
    comps = {"echo": wasm_component("echo.wat"), "busy": wasm_component("busy.wat", timeout_ms=20000)}
    cfg = write_config(tmp_path / "cfg", mock.port, flows="echo\nTO echo 1\nPOST payload\n\nbusy\nTO busy 1\nGET\n",
                       components=comps, runtime={"module_dir": str(mods), "wasm_threads": 2})
    e = InProcessNode(load_config(cfg)).start()
    try:
        wasm = e.node.wasm
        for i in range(20):
            assert run(e, "echo", i)["results"] == [{"payload": [i]}]
        assert wasm.inline_calls >= 20 and wasm.thread_calls == 0  # no thread hop for short calls
        res = run(e, "busy")
        assert res["status"] == "ok" and res["results"] == ["done"], res  # the whole call, once more, on a thread
        # (a loop of 100 ms or more: well past the loop's budget of 5-10 ms even when the
        # epoch thread waits for the GIL in a busy process)
        from runtime_manager.wasm.modules import EPOCH_CLOCK

        assert (wasm.inline_retries, wasm.thread_calls) == (1, 1), (wasm.inline_calls, EPOCH_CLOCK.running)
        # busy's next call goes to a thread at once; echo stays on the loop and is served meanwhile
        done: list[dict] = []
        e.submit(FlowRequest("busy"), done.append)
        t0 = time.monotonic()
        assert run(e, "echo", "fast")["status"] == "ok"
        assert not done or time.monotonic() - t0 < 1.0
        wait_for(lambda: done, 20, "the second busy call")
        assert done[0]["results"] == ["done"] and wasm.inline_retries == 1 and wasm.thread_calls == 2
    finally:
        e.kill()


def test_a_short_call_that_missed_its_loop_budget_comes_back_to_the_loop(tmp_path: Path, mock, monkeypatch):
    """A call stopped on the loop for want of time (another thread held the GIL, a
    garbage collection ran) is run again on a thread; when that run is quick its
    component's calls return to the loop instead of staying on threads for 10 s."""
    import runtime_manager.drivers.wasm as driver

    real, missed = driver.run_module, []

    def run_module(*args, **kwargs):  # the loop's try of the 3rd call misses its budget once
        if kwargs.get("deadline_ticks") is not None and len(missed) == 0 and driver_calls() == 2:
            missed.append(1)
            return driver.RunOutcome(b"", b"", trap="timeout")
        return real(*args, **kwargs)

    monkeypatch.setattr(driver, "run_module", run_module)
    cfg = write_config(tmp_path / "cfg", mock.port, flows="echo\nTO echo 1\nPOST payload\n",
                       components={"echo": wasm_component(str(RUNTIMES / "echo.wat"))})
    e = InProcessNode(load_config(cfg)).start()
    wasm = e.node.wasm

    def driver_calls() -> int:
        return wasm.inline_calls + wasm.thread_calls

    try:
        for i in range(6):
            assert run(e, "echo", i)["results"] == [{"payload": [i]}]
        assert missed and wasm.inline_retries == 1 and wasm.thread_calls == 1
        assert wasm.inline_calls == 5  # the calls after the retried one ran on the loop again
    finally:
        e.kill()


def test_stdio_host_calls_refuse_bad_pointers_and_descriptors(tmp_path):
    """fd_read/fd_write (defined on wasmtime's C API) answer an error number for an
    iovec or a result pointer outside memory, or another descriptor; the process lives."""
    probe = tmp_path / "badio.wat"
    probe.write_text("""(module
      (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "fd_read" (func $r (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") 1)
      (func $expect (param $got i32) (param $want i32) (param $code i32)
        (if (i32.ne (local.get $got) (local.get $want)) (then (call $exit (local.get $code)))))
      (func (export "_start")
        ;; an iovec whose buffer runs past the end of memory: EFAULT (21)
        (i32.store (i32.const 0) (i32.const 65530)) (i32.store (i32.const 4) (i32.const 100))
        (call $expect (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)) (i32.const 21) (i32.const 3))
        ;; the iovec array itself outside memory; a result pointer outside memory
        (call $expect (call $w (i32.const 1) (i32.const 70000) (i32.const 1) (i32.const 8)) (i32.const 21) (i32.const 4))
        (call $expect (call $r (i32.const 0) (i32.const -8) (i32.const 1) (i32.const 8)) (i32.const 21) (i32.const 5))
        (i32.store (i32.const 0) (i32.const 100)) (i32.store (i32.const 4) (i32.const 4))
        (call $expect (call $r (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 65534)) (i32.const 21) (i32.const 6))
        ;; descriptors other than stdin / stdout and stderr: EBADF (8)
        (call $expect (call $r (i32.const 5) (i32.const 0) (i32.const 1) (i32.const 8)) (i32.const 8) (i32.const 7))
        (call $expect (call $w (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)) (i32.const 8) (i32.const 8))
        ;; and a good write still works
        (call $expect (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)) (i32.const 0) (i32.const 9))))""")
    loaded = load(probe, memory_stdio=True)
    for _ in range(3):
        out = run_module(loaded, "_start", b"input")
        assert out.exit_code is None and out.trap is None, out
        assert out.stdout == b"\x00\x00\x00\x00"  # the 4 bytes at address 100


POOL_MISFIT_WAT = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (table 1 funcref) (table 50000 funcref)
  (memory (export "memory") 1)
  (data (i32.const 100) "\\"fits\\"")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 100)) (i32.store (i32.const 4) (i32.const 6))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"""


def test_a_module_that_does_not_fit_the_instance_pool_still_runs(tmp_path: Path, mock):
    """Flow steps' instances come from wasmtime's pooling allocator; a module whose
    instances do not fit a slot (two tables, one of 50,000 entries) passes `check`
    and runs from the usual allocator."""
    from runtime_manager.wasm.modules import inspect_component, pooled

    (tmp_path / "misfit.wat").write_text(POOL_MISFIT_WAT)
    echo = load(RUNTIMES / "echo.wat", memory_stdio=True)
    misfit = load(tmp_path / "misfit.wat", memory_stdio=True)
    assert pooled(echo.engine) and not pooled(misfit.engine)
    cfg = write_config(tmp_path / "cfg", mock.port, flows="f\nTO misfit 1\nGET\n",
                       components={"misfit": wasm_component(str(tmp_path / "misfit.wat"))})
    config = load_config(cfg)
    assert inspect_component(config.components["misfit"]) == []
    e = InProcessNode(config).start()
    try:
        for _ in range(40):  # past a kept store's 32 instances
            assert run(e, "f")["results"] == ["fits"]
    finally:
        e.kill()


def test_kept_stores_hold_no_more_instances_than_the_budget(monkeypatch):
    """The kept stores of all threads together hold at most KEPT_INSTANCES instances
    (each takes a slot of the engine's pool); a thread that ends gives its back."""
    import gc

    from runtime_manager.wasm import sandbox

    gc.collect()  # kept stores of earlier tests' ended threads give theirs back first
    monkeypatch.setattr(sandbox, "KEPT_INSTANCES", sandbox._kept_instances.value + 5)
    loaded = load(RUNTIMES / "echo.wat", memory_stdio=True)
    peak: list[int] = []

    def calls() -> None:
        for i in range(30):
            out = run_module(loaded, "_start", b'{"payload": [%d]}' % i, WasmLimits(), ["echo"])
            assert out.trap is None and out.stdout == b'{"payload": [%d]}' % i
            peak.append(sandbox._kept_instances.value)

    before = sandbox._kept_instances.value
    workers = [threading.Thread(target=calls) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    # a store over the budget is closed after its call: the other two threads may
    # each be one call further meanwhile
    assert max(peak) <= sandbox.KEPT_INSTANCES + 2 and len(peak) == 90
    gc.collect()
    assert sandbox._kept_instances.value == before  # the threads' kept stores went with them


def test_under_an_address_space_limit_the_pool_is_not_used(tmp_path: Path):
    """wasmtime aborts the process when it cannot map its instance pool: under
    `ulimit -v` a node allocates instances one by one, says so, and runs modules."""
    import resource
    import subprocess
    import sys

    script = ("import logging, sys; logging.basicConfig(level='WARNING')\n"
              "from pathlib import Path\n"
              "from runtime_manager.wasm.modules import EPOCH_CLOCK, pooled\n"
              "from runtime_manager.wasm.sandbox import load, run_module\n"
              "EPOCH_CLOCK.start()\n"
              f"loaded = load(Path({str(RUNTIMES / 'echo.wat')!r}), memory_stdio=True)\n"
              "outs = [run_module(loaded, '_start', b'{\"n\": 1}', None, ['echo']).stdout for _ in range(50)]\n"
              "print(pooled(loaded.engine), outs[-1].decode(), len(set(outs)))\n")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (16 * 1024**3, resource.RLIM_INFINITY))

    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         preexec_fn=limit, env={"RM_WASM_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", '{"n":', "1}", "1"]
    assert "instance pool not used: the address space is limited" in out.stderr


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 300), st.integers(0, 300), st.integers(1, 3), st.integers(0, 300),
       st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), min_size=3, max_size=3))
def test_stdio_iovecs_are_read_whole_or_refused_as_outside_memory(size, iovs, count, out, vecs):
    """A module's iovec array as the stdio host calls read it: every (pointer,
    length) pair when the array, every buffer and the 4-byte result lie inside
    memory, else None (the module gets EFAULT); one buffer (the usual call) as any number."""
    import struct

    from runtime_manager.wasm.sandbox import _iovecs

    memory = bytearray(max(size, iovs) + 8 * 3 + 16)  # room past `size`: the check must refuse it
    for i, (ptr, length) in enumerate(vecs):
        struct.pack_into("<II", memory, iovs + 8 * i, ptr, length)
    inside = iovs + 8 * count <= size and out + 4 <= size and all(p + n <= size for p, n in vecs[:count])
    got = _iovecs(memoryview(memory)[:size], iovs, count, out)
    assert got == (list(vecs[:count]) if inside else None)


def test_stdio_host_calls_follow_a_memory_that_grows_between_them(tmp_path):
    """The host calls read and write memory through a view made at the first call:
    after `memory.grow` a buffer, an iovec array and a result pointer in the new
    pages are reached all the same; more iovecs than IOV_MAX are refused (EINVAL)."""
    probe = tmp_path / "grows.wat"
    probe.write_text("""(module
      (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "fd_read" (func $r (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") 1)
      (data (i32.const 100) "[1,")
      (func $expect (param $got i32) (param $want i32) (param $code i32)
        (if (i32.ne (local.get $got) (local.get $want)) (then (call $exit (local.get $code)))))
      (func (export "_start")
        (i32.store (i32.const 0) (i32.const 100)) (i32.store (i32.const 4) (i32.const 3))
        (call $expect (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)) (i32.const 0) (i32.const 3))
        (drop (memory.grow (i32.const 2)))
        ;; stdin read into the third page, through an iovec array in the second
        (i32.store (i32.const 70000) (i32.const 140000)) (i32.store (i32.const 70004) (i32.const 16))
        (call $expect (call $r (i32.const 0) (i32.const 70000) (i32.const 1) (i32.const 140100)) (i32.const 0) (i32.const 4))
        (call $expect (i32.load (i32.const 140100)) (i32.const 2) (i32.const 5))
        (i32.store (i32.const 70004) (i32.const 2))
        (call $expect (call $w (i32.const 1) (i32.const 70000) (i32.const 1) (i32.const 140200)) (i32.const 0) (i32.const 6))
        (call $expect (i32.load (i32.const 140200)) (i32.const 2) (i32.const 7))
        (call $expect (call $w (i32.const 1) (i32.const 0) (i32.const 1025) (i32.const 8)) (i32.const 28) (i32.const 8))
        (call $expect (call $r (i32.const 0) (i32.const 0) (i32.const 1025) (i32.const 8)) (i32.const 28) (i32.const 9))))""")
    loaded = load(probe, memory_stdio=True)
    for _ in range(40):  # past a kept store's 32 instances
        out = run_module(loaded, "_start", b"2]")
        assert out.exit_code is None and out.trap is None, out
        assert out.stdout == b"[1,2]"
