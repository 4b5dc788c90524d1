"""Where the CPU goes: py-spy profiles of one `rm_mqtt` in an MQTT burst (flow 1
of the original: a load-balancer GET and 3 POSTs) and of WebAssembly echo steps
through the engine. Writes flame graphs (SVG) and collapsed stacks to
bench/profiles/, and prints the largest shares.

    .venv/bin/pip install py-spy        # not a dependency of the project
    .venv/bin/python bench/profile.py [--burst-only | --wasm-only] [--quick] [--native] [--root ../before]
                                        # as root, or with ptrace allowed (py-spy attaches by PID)
                                        # --root: profile the rm_mqtt of another checkout (before and after)
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "profiles"
sys.path.insert(0, str(ROOT / "bench"))

from bench import LoadGenerator, Setup, run_burst  # noqa: E402

RATE = 400  # samples per second


def py_spy() -> str:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    return exe


def record(args: list[str], output: Path, fmt: str, native: bool = False) -> subprocess.Popen:
    # --native shows C frames (uvloop, system calls) but stops the process for each sample: slower runs
    mode = ["--native"] if native else ["--nonblocking"]
    return subprocess.Popen([py_spy(), "record", "--rate", str(RATE), "--format", fmt, "--output", str(output),
                             *mode, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def shares(collapsed: Path, thread: str | None = None, top: int = 25) -> list[tuple[str, float, float]]:
    """(function, cumulative %, self %) of the samples (of one thread, when named)."""
    total, cumulative, own = 0, collections.Counter(), collections.Counter()
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if (thread and thread not in frames[0]) or not count.isdigit():
            continue  # another thread, or a line py-spy garbled (--nonblocking reads a running process)
        n = int(count)
        total += n
        names = [re.sub(r" \(.*\)$", "", f) for f in frames[1:]]
        for name in set(names):
            cumulative[name] += n
        if names:
            own[names[-1]] += n
    rows = [(name, 100 * c / total, 100 * own[name] / total) for name, c in cumulative.most_common()]
    skip = {"<module>", "Thread.run", "Thread._bootstrap", "Thread._bootstrap_inner", "_run_module_as_main", "_run_code",
            "main", "run", "Runner.run", "BaseEventLoop.run_forever", "BaseEventLoop.run_until_complete"}
    return [r for r in rows if r[0] not in skip][:top]


def print_shares(title: str, rows: list[tuple[str, float, float]]) -> None:
    print(f"\n{title}\n\n| function | cumulative % | self % |\n| --- | --- | --- |")
    for name, cum, own in rows:
        print(f"| `{name}` | {cum:.1f} | {own:.1f} |")


def _root() -> Path:
    """The checkout whose rm_mqtt is profiled (`--root PATH`; this one by default)."""
    if "--root" in sys.argv:
        return Path(sys.argv[sys.argv.index("--root") + 1]).resolve()
    return ROOT


def profile_burst(n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="rm-profile-") as tmp:
        setup = Setup(Path(tmp) / "a", root=_root()).start()
        gen = LoadGenerator(setup.broker_port)
        try:
            time.sleep(1.0)
            run_burst(setup, gen, "warmup", 500, 1)
            pid = str(setup.rms[0].pid)
            native = "--native" in sys.argv
            outputs = [("raw", "rm_mqtt_burst_native.txt")] if native else \
                [("flamegraph", "rm_mqtt_burst.svg"), ("raw", "rm_mqtt_burst.txt")]
            for fmt, name in outputs:
                spy = record(["--pid", pid], OUT / name, fmt, native)
                time.sleep(1.0)  # py-spy attached
                row = run_burst(setup, gen, f"profiled-{fmt}", n, 1)
                spy.send_signal(2)  # SIGINT: py-spy writes its output and ends
                spy.wait(30)
                print(f"burst of {n} at QoS 1 under py-spy: {row['flows_per_s']:.0f} flows/s, {row['cpu_us_per_flow']:.0f} µs CPU per flow")
        finally:
            gen.close()
            setup.stop()
    native = "--native" in sys.argv
    print_shares("rm_mqtt in a burst (all threads)", shares(OUT / ("rm_mqtt_burst_native.txt" if native else "rm_mqtt_burst.txt")))


WASM_SCRIPT = """
import sys, tempfile, threading
from pathlib import Path
sys.path.insert(0, {bench!r}); sys.path.insert(0, {test!r}); sys.path.insert(0, {root!r})
import wasm_bench as wb
from helpers import InProcessNode
from runtime_manager.config import load_config
with tempfile.TemporaryDirectory() as tmp:
    node = InProcessNode(load_config(wb._config(Path(tmp)))).start()
    wb.echo_steps_per_s(node, 500)
    print("ready", flush=True)
    sys.stdin.readline()
    rate, cpu = wb.echo_steps_per_s(node, {n})
    print(f"{{rate:.0f}} {{cpu:.0f}}", flush=True)
    node.stop()
"""


def profile_wasm(n: int) -> None:
    script = WASM_SCRIPT.format(bench=str(ROOT / "bench"), test=str(ROOT / "test"), root=str(ROOT), n=n)
    for fmt, name in (("flamegraph", "wasm_echo_steps.svg"), ("raw", "wasm_echo_steps.txt")):
        proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                cwd=ROOT)
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        spy = record(["--pid", str(proc.pid), "--threads"], OUT / name, fmt)
        time.sleep(1.0)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        rate, cpu = proc.stdout.readline().split()
        spy.send_signal(2)
        spy.wait(30)
        proc.wait(30)
        print(f"{n} echo steps through the engine under py-spy: {rate} steps/s, {cpu} µs CPU per step (process)")
    print_shares("WebAssembly echo steps: the engine's loop thread", shares(OUT / "wasm_echo_steps.txt", "test-node"))


def profile_wasm_mqtt(n: int) -> None:
    """rm_mqtt running a one-step WebAssembly echo flow for QoS 0 MQTT requests
    (as `wasm_bench.py` measures it over MQTT: no load balancer)."""
    echo = {"echo": {"id": 99, "config": {"protocol": "wasm", "module": str(ROOT / "runtimes" / "echo.wat"),
                                          "endpoints": {"1": "_start"}}}}
    with tempfile.TemporaryDirectory(prefix="rm-profile-") as tmp:
        setup = Setup(Path(tmp) / "w", extra_components=echo, flows="1\nTO echo 1\nPOST payload\n", root=_root())
        (setup.cfg / "load_balancer.conf").unlink()
        setup.start()
        gen = LoadGenerator(setup.broker_port)
        try:
            time.sleep(1.0)
            run_burst(setup, gen, "warmup", 1000, 0)
            spy = record(["--pid", str(setup.rms[0].pid)], OUT / "wasm_echo_mqtt.txt", "raw")
            time.sleep(1.0)
            row = run_burst(setup, gen, "profiled", n, 0)
            spy.send_signal(2)
            spy.wait(30)
            print(f"{n} echo flows over MQTT (QoS 0) under py-spy: {row['flows_per_s']:.0f} flows/s, "
                  f"{row['cpu_us_per_flow']:.0f} µs CPU per flow")
        finally:
            gen.close()
            setup.stop()
    print_shares("rm_mqtt running WebAssembly echo flows over MQTT (all threads)", shares(OUT / "wasm_echo_mqtt.txt"))


def main() -> None:
    OUT.mkdir(exist_ok=True)
    quick = "--quick" in sys.argv
    threading.excepthook = lambda args: None
    if "--wasm-only" not in sys.argv:
        profile_burst(1000 if quick else 6000)
    if "--burst-only" not in sys.argv:
        profile_wasm_mqtt(1000 if quick else 10000)
        if "--root" not in sys.argv:  # in-process: this checkout's engine only
            profile_wasm(1000 if quick else 10000)
    print(f"\nflame graphs: {OUT}/*.svg (open in a browser); collapsed stacks: {OUT}/*.txt")


if __name__ == "__main__":
    main()
