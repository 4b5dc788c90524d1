"""Modules that move with their state: a plain C program (built with the
standard WASI toolchain, no special imports) moved between real nodes while it
runs, through the orchestrator protocol's `delete` with `send_to_runtime`."""

from __future__ import annotations

import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import wasmtime
from conftest import ROOT
from helpers import wait_for
from test_orchestrator import TestOrchestrator, realm, start_node  # noqa: F401 (a fixture)

WANDER_C = ROOT / "test" / "wasm" / "wander.c"


def build_c(source: Path, out: Path) -> Path:
    """clang for wasm32-wasi with wasi-libc (Debian: clang-14, lld-14, wasi-libc, libclang-rt-14-dev-wasm32)."""
    clang = shutil.which("clang-14") or shutil.which("clang")
    assert clang, "clang is missing: make test installs clang-14, lld-14 and wasi-libc"
    subprocess.run([clang, "--target=wasm32-wasi", "--sysroot=/usr", "-isystem", "/usr/include/wasm32-wasi",
                    "-L/usr/lib/wasm32-wasi", "-O2", str(source), "-o", str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def wander(tmp_path_factory) -> Path:
    return build_c(WANDER_C, tmp_path_factory.mktemp("c") / "wander.wasm")


def reference_run(module: Path, argv: list[str]) -> tuple[bytes, int]:
    """The program's stdout and exit code in plain wasmtime, never moved."""
    engine = wasmtime.Engine()
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    store = wasmtime.Store(engine)
    out = module.parent / f"ref-{random.random()}.out"
    wasi = wasmtime.WasiConfig()
    wasi.argv = argv
    wasi.stdout_file = str(out)
    store.set_wasi(wasi)
    instance = linker.instantiate(store, wasmtime.Module(engine, module.read_bytes()))
    try:
        instance.exports(store)["_start"](store)
        code = 0
    except wasmtime.ExitTrap as exc:
        code = exc.code
    return out.read_bytes(), code


@pytest.fixture
def two_nodes(tmp_path, broker, mock, processes, realm, wander):
    """node1 has the module in its module directory, node2 has none."""
    dirs = []
    for name in ("m1", "m2"):
        d = tmp_path / name
        d.mkdir()
        dirs.append(d)
    shutil.copy(wander, dirs[0] / "wander.wasm")
    orch = TestOrchestrator(broker.port, realm)
    nodes = []
    for i, d in enumerate(dirs, 1):
        p = start_node(tmp_path, broker, mock, processes, d, realm, name=f"node{i}", cfg_name=f"cfg{i}")
        wait_for(lambda p=p: "registered with the orchestrator" in p.log(), 15, f"node{i} registered")
        nodes.append(p)
    runtimes = {b["data"]["name"]: b["data"]["uuid"] for _, b in orch.json_messages("/proc/reg/")
                if b.get("action") == "create" and b.get("data", {}).get("type") == "runtime"}
    for p, name in zip(nodes, ("node1", "node2"), strict=True):
        p.runtime = runtimes[name]  # type: ignore[attr-defined]
    yield orch, nodes
    orch.close()


def moved(orch: TestOrchestrator, realm: str, module: str, count: int, timeout: float = 30) -> dict:
    """The `count`-th report of a move of `module`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reports = [b for t, b in orch.json_messages(f"{realm}/rm/moved/{module}")]
        if len(reports) >= count:
            return reports[count - 1]
        time.sleep(0.02)
    raise AssertionError(f"no report of move {count} of {module}")


def test_a_c_program_moves_back_and_forth_and_its_output_is_that_of_a_run_that_never_moved(two_nodes, realm, wander):
    orch, (n1, n2) = two_nodes
    orch.client.subscribe(f"{realm}/rm/moved/#", qos=1)
    argv = ["40", "30"]
    expected, code = reference_run(wander, ["wander", *argv])
    module = orch.create(n1.runtime, "wander.wasm", {"argv": argv}, name="wander")
    wait_for(lambda: orch.stdout(module).count(b"\n") >= 2, 10, "the program running on node1")
    route = [n2, n1, n2]
    for i, target in enumerate(route, 1):
        time.sleep(random.uniform(0.05, 0.25))  # an arbitrary moment of its run
        source = route[i - 2] if i > 1 else n1
        orch.control(source.runtime, "delete", {"type": "module", "uuid": module}, send_to_runtime=target.runtime)
        report = moved(orch, realm, module, i)
        assert report["moved"] and report["with_state"], report
        assert report["target"] == target.runtime and report["pause_ms"] < 1000
    # it ended on node2, once, with the exit code of a run that never moved
    end = orch.wait(lambda t, b: t == f"{realm}/proc/control/{n2.runtime}" and b.get("action") == "exited"
                    and b["data"].get("uuid") == module and b["data"]["status"]["reason"] == "exited", 30, "the end")
    assert end["data"]["status"]["code"] == code
    assert orch.stdout(module) == expected
    print([moved(orch, realm, module, i) for i in (1, 2, 3)])
    # each move reported the module `exited` (deleted) at its source, as a move always did
    exits = [b["data"]["status"] for t, b in orch.json_messages("/proc/control/") if b.get("action") == "exited"
             and b["data"].get("uuid") == module]
    assert [s["reason"] for s in exits] == ["deleted", "deleted", "deleted", "exited"], exits
