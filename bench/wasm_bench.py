"""WebAssembly benchmark: echo steps per second with a fresh instance per call,
how fast an infinite loop is stopped, and whether parallel modules use both cores.

    .venv/bin/python bench/wasm_bench.py      (also run by bench/bench.py)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WASM_THREADS = int(os.environ.get("WASM_THREADS", "2"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "test"))

from helpers import InProcessNode  # noqa: E402

from runtime_manager.config import WasmLimits, load_config  # noqa: E402
from runtime_manager.core.request import FlowRequest  # noqa: E402
from runtime_manager.core.result import Result  # noqa: E402
from runtime_manager.drivers.wasm import WasmSteps  # noqa: E402
from runtime_manager.wasm import sandbox  # noqa: E402
from runtime_manager.wasm.modules import EPOCH_CLOCK, make_engine  # noqa: E402
from runtime_manager.wasm.sandbox import load, run_module  # noqa: E402


def _config(tmp: Path) -> Path:
    cfg = tmp / "cfg"
    cfg.mkdir()
    (cfg / "comm.conf").write_text(json.dumps({"mqtt": {"topic": "wb", "host": "127.0.0.1", "port": 1}, "rest": {}}))
    (cfg / "components.conf").write_text(json.dumps({
        "echo": {"id": 1, "config": {"protocol": "wasm", "module": "echo.wat", "endpoints": {"1": "_start"}}},
        "loop": {"id": 2, "config": {"protocol": "wasm", "module": "loop.wat", "endpoints": {"1": "_start"},
                                     "limits": {"timeout_ms": 1000}}},
        "loop2": {"id": 3, "config": {"protocol": "wasm", "module": "loop.wat", "endpoints": {"1": "_start"},
                                      "limits": {"timeout_ms": 1000}}}}))
    (cfg / "flows.conf").write_text("echo\nTO echo 1\nPOST payload\n\nloop\nTO loop 1\nGET\n\nloop2\nTO loop2 1\nGET\n")
    runtime = {"module_dir": str(ROOT / "runtimes"), "heartbeat_interval_ms": 0, "wasm_threads": WASM_THREADS, "queue_depth": 100000}
    (cfg / "runtime.conf").write_text(json.dumps(runtime))
    return cfg


def echo_steps_per_s(engine: InProcessNode, n: int) -> tuple[float, float]:
    done = threading.Semaphore(0)
    errors: list[dict] = []

    def finished(result: dict) -> None:
        if result["status"] != "ok":
            errors.append(result)
        done.release()

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for i in range(n):
        engine.submit(FlowRequest("echo", {"i": i, "text": "hello wasm"}), finished)
    for _ in range(n):
        done.acquire()
    elapsed = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    if errors:
        raise SystemExit(f"echo failed: {errors[0]}")
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    return n / elapsed, cpu / n * 1e6


def echo_steps_on_loop(node: InProcessNode, n: int) -> tuple[float, float]:
    """Echo flows accepted on the node's loop, as the MQTT entry point hands them
    over (`echo_steps_per_s` submits from another thread, as REST workers do)."""

    async def burst() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()
        left, errors = [n], []

        def done(result: Result) -> None:
            if result.status != "ok":
                errors.append(result)
            left[0] -= 1
            if not left[0]:
                finished.set_result(None)

        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        for i in range(n):
            node.engine.accept(FlowRequest("echo", {"i": i, "text": "hello wasm"}), done)
        await finished
        elapsed = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        if errors:
            raise SystemExit(f"echo failed: {errors[0].to_dict()}")
        return n / elapsed, (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / n * 1e6

    return asyncio.run_coroutine_threadsafe(burst(), node.loop).result(120)


def isolation_ms(engine: InProcessNode, loops: int, flows: tuple[str, ...] = ("loop",)) -> float:
    """An echo flow's latency while `loops` infinite loops (1 s limit each) run,
    spread over `flows` (worst of 3 echoes, 0.2 s after the loops began)."""
    stuck = threading.Semaphore(0)
    for i in range(loops):
        engine.submit(FlowRequest(flows[i % len(flows)]), lambda _r: stuck.release())
    time.sleep(0.2)
    worst = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        assert engine.run(FlowRequest("echo", "x"))["status"] == "ok"
        worst = max(worst, (time.perf_counter() - t0) * 1000)
    for _ in range(loops):
        stuck.acquire()
    return worst


def loop_stop_ms() -> float:
    loaded = load(ROOT / "runtimes" / "loop.wat")
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        out = run_module(loaded, "_start", limits=WasmLimits(timeout_ms=100))
        times.append((time.perf_counter() - t0) * 1000)
        assert out.trap == "timeout", out
    return max(times)


def delete_stop_ms(module: str) -> float:
    """How long a running orchestrator module takes to stop after a delete (worst of 5):
    its own engine's epoch is advanced, as RuntimeNode does."""
    engine = make_engine(False)
    loaded = load(ROOT / "runtimes" / module, engine=engine)
    worst = 0.0
    for _ in range(5):
        stop = threading.Event()
        finished: list[float] = []

        def run(stop: threading.Event = stop, finished: list[float] = finished) -> None:
            run_module(loaded, "_start", stop=stop, stdout=lambda _b: None, deadline_ticks=1)
            finished.append(time.perf_counter())

        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(0.2)
        asked = time.perf_counter()
        stop.set()
        engine.increment_epoch()
        engine.increment_epoch()
        worker.join()
        worst = max(worst, (finished[0] - asked) * 1000)
    return worst


def parallel_cpu_ratio(threads: int = 2) -> float:
    """CPU seconds per wall second while `threads` infinite loops run for 1 s each."""
    loaded = load(ROOT / "runtimes" / "loop.wat")
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    workers = [threading.Thread(target=run_module, args=(loaded, "_start"), kwargs={"limits": WasmLimits(timeout_ms=1000)})
               for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / wall


def bare_calls_per_s(n: int, keep_stores: bool) -> float:
    """`run_module` in a loop on one thread, as a flow step calls it (stdio in memory)."""
    loaded = load(ROOT / "runtimes" / "echo.wat", memory_stdio=True)
    body = b'{"payload": [{"i": 1, "text": "hello wasm"}]}'
    saved = sandbox.REUSE_CALLS
    sandbox.REUSE_CALLS = saved if keep_stores else 1
    try:
        for _ in range(200):
            run_module(loaded, "_start", body, WasmLimits(), ["echo"])
        t0 = time.perf_counter()
        for _ in range(n):
            run_module(loaded, "_start", body, WasmLimits(), ["echo"])
        return n / (time.perf_counter() - t0)
    finally:
        sandbox.REUSE_CALLS = saved


def engine_echo(tmp: Path, scale: float, on_loop: bool, submit_on_loop: bool = False) -> list[tuple[float, float]]:
    """Echo flows through the engine: short calls on the loop (as shipped), or every
    call handed to a WebAssembly thread (as before); requests submitted from
    another thread, or accepted on the loop."""
    tmp.mkdir(parents=True, exist_ok=True)
    saved = WasmSteps._run_here
    if not on_loop:
        WasmSteps._run_here = lambda *_a: (None, False)  # type: ignore[method-assign]
    engine = InProcessNode(load_config(_config(tmp))).start()
    measure = echo_steps_on_loop if submit_on_loop else echo_steps_per_s
    try:
        measure(engine, int(500 * scale) or 50)  # warm-up
        return [measure(engine, int(10000 * scale) or 100) for _ in range(3)]
    finally:
        engine.stop()
        WasmSteps._run_here = saved  # type: ignore[method-assign]


def echo_over_mqtt(tmp: Path, scale: float, rounds: int = 3, root: Path = ROOT, label: str = "this tree") -> list[dict]:
    """The echo flow over MQTT as users send it: a real Mosquitto (the README's
    settings), `rm_mqtt` in its own process (no load balancer), QoS 0 bursts of 10,000 from a paho
    load generator (bench.py's); flows/s from the first publish to the last result."""
    from bench import LoadGenerator, Setup, run_burst

    echo = {"echo": {"id": 99, "config": {"protocol": "wasm", "module": str(ROOT / "runtimes" / "echo.wat"),
                                          "endpoints": {"1": "_start"}}}}
    setup = Setup(tmp, extra_components=echo, flows="1\nTO echo 1\nPOST payload\n", root=root, label=label)
    for cfg in setup.cfgs:  # no load balancer: the flow runs at home without asking
        (cfg / "load_balancer.conf").unlink()
    setup.start()
    gen = LoadGenerator(setup.broker_port)
    try:
        time.sleep(1.0)
        run_burst(setup, gen, "warmup", int(1000 * scale) or 50, 0)
        rows = [run_burst(setup, gen, f"echo r{i}", int(10000 * scale) or 100, 0) for i in range(rounds)]
        for row in rows:
            row["peak_rss_mb"] = setup.peak_rss_mb()
        return rows
    finally:
        gen.close()
        setup.stop()


def main(scale: float = 1.0) -> None:
    logging.basicConfig(level="WARNING")
    with tempfile.TemporaryDirectory(prefix="rm-wasm-mqtt-") as tmp:
        over_mqtt = echo_over_mqtt(Path(tmp), scale)
    with tempfile.TemporaryDirectory(prefix="rm-wasm-bench-") as tmp:
        EPOCH_CLOCK.start()
        bare = [(keep, sorted(bare_calls_per_s(int(5000 * scale) or 100, keep) for _ in range(3))[1])
                for keep in (False, True, False, True)]  # interleaved: the machine's mood changes
        EPOCH_CLOCK.stop()
        hop = engine_echo(Path(tmp) / "a", scale, on_loop=False)
        runs = engine_echo(Path(tmp) / "b", scale, on_loop=True)
        looped = engine_echo(Path(tmp) / "d", scale, on_loop=True, submit_on_loop=True)
        (Path(tmp) / "c").mkdir()
        engine = InProcessNode(load_config(_config(Path(tmp) / "c"))).start()
        try:
            isolation = [(n, flows, isolation_ms(engine, n, flows)) for n, flows in
                         ((6, ("loop",)), (16, ("loop",)), (8, ("loop", "loop2")))]
        finally:
            engine.stop()
    rate, cpu = sorted(runs)[1]
    hop_rate, hop_cpu = sorted(hop)[1]
    loop_rate, loop_cpu = sorted(looped)[1]
    EPOCH_CLOCK.start()  # the clock of flow-step time limits, as a running node has it
    print("\n| WebAssembly | figure |\n| --- | --- |")
    mq = sorted(over_mqtt, key=lambda r: r["flows_per_s"])[len(over_mqtt) // 2]
    print(f"| echo flow over MQTT (a real Mosquitto, rm_mqtt, QoS 0 bursts of {mq['requests']:,}), median of "
          f"{len(over_mqtt)} | {mq['flows_per_s']:.0f} steps/s, {mq['cpu_us_per_flow']:.0f} µs CPU per step (node), "
          f"{mq['errors'] + mq['lost']} errors or lost |")
    print(f"| echo flow (one WASM step, fresh instance per call), accepted on the node's loop as MQTT requests are, "
          f"median of 3 runs | {loop_rate:.0f} steps/s, {loop_cpu:.0f} µs CPU per step |")
    print(f"| the same, submitted from another thread as REST requests are | {rate:.0f} steps/s, {cpu:.0f} µs CPU per step |")
    print(f"| the same, every call handed to a WebAssembly thread (as before), same run | {hop_rate:.0f} steps/s, "
          f"{hop_cpu:.0f} µs CPU per step |")
    pairs = ", ".join(f"{fresh:.0f} / {kept:.0f}" for (_, fresh), (_, kept) in zip(bare[::2], bare[1::2], strict=True))
    print(f"| `run_module` alone, one thread: a fresh store per call / kept stores (median of 3, twice) | "
          f"{pairs} calls/s |")
    for n, flows, ms in isolation:
        print(f"| echo flow while {n} infinite loops ({' and '.join(flows)}, 1 s limit) run, wasm_threads {WASM_THREADS}: "
              f"latency (worst of 3) | {ms:.1f} ms |")
    print(f"| infinite loop with timeout_ms 100, stopped after (worst of 5) | {loop_stop_ms():.1f} ms |")
    print(f"| orchestrator module stopped by a delete (worst of 5): busy loop / ticker sleeping 50 ms | "
          f"{delete_stop_ms('loop.wat'):.1f} ms / {delete_stop_ms('ticker.wat'):.1f} ms |")
    print(f"| 2 infinite loops in parallel for 1 s: CPU s per wall s | {parallel_cpu_ratio():.2f} (2.0 = both cores) |")


if __name__ == "__main__":
    main(0.1 if "--quick" in sys.argv else 1.0)
