"""Modules that move with their state: a plain C program (built with the
standard WASI toolchain, no special imports) moved between real nodes while it
runs, through the orchestrator protocol's `delete` with `send_to_runtime`."""

from __future__ import annotations

import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
import wasmtime
from conftest import ROOT
from helpers import free_port, wait_for
from test_orchestrator import TestOrchestrator, run_tool, start_node

WANDER_C = ROOT / "test" / "wasm" / "wander.c"


def build_c(source: Path, out: Path) -> Path:
    """clang for wasm32-wasi with wasi-libc (Debian: clang-14, lld-14, wasi-libc, libclang-rt-14-dev-wasm32)."""
    clang = shutil.which("clang-14") or shutil.which("clang")
    assert clang, "clang is missing: make test installs clang-14, lld-14 and wasi-libc"
    subprocess.run([clang, "--target=wasm32-wasi", "--sysroot=/usr", "-isystem", "/usr/include/wasm32-wasi",
                    "-L/usr/lib/wasm32-wasi", "-O2", str(source), "-o", str(out)], check=True, capture_output=True)
    return out


@pytest.fixture
def realm() -> str:
    return f"realm-{uuid.uuid4().hex[:6]}"


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


def start_pair(tmp_path, broker, mock, processes, realm, wander, first: dict | None = None,
               second: dict | None = None, dialect: str = "silverline"):
    """node1 has the module in its module directory, node2 has none; `first`,
    `second`: more of node1's, node2's orchestrator section."""
    dirs = []
    for name in ("m1", "m2"):
        d = tmp_path / name
        d.mkdir()
        dirs.append(d)
    shutil.copy(wander, dirs[0] / "wander.wasm")
    for d in dirs:  # the small modules are on both
        for wat in ("loop.wat", "ticker.wat"):
            shutil.copy(ROOT / "runtimes" / wat, d)
        (d / "data").mkdir()
    orch = TestOrchestrator(broker.port, realm, arts=dialect == "arts")
    nodes = []
    for i, d in enumerate(dirs, 1):
        port = free_port()
        more = {"migrate_timeout_ms": 600, **((first or {}) if i == 1 else (second or {}))}
        p = start_node(tmp_path, broker, mock, processes, d, realm, name=f"node{i}", cfg_name=f"cfg{i}",
                       orchestrator=more, command="serve", rest_port=port, dialect=dialect)
        p.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
        wait_for(lambda p=p: "registered with the orchestrator" in p.log(), 15, f"node{i} registered")
        nodes.append(p)
    runtimes = {b["data"]["name"]: b["data"]["uuid"] for _, b in orch.json_messages("/proc/reg")
                if b.get("action") == "create" and b.get("data", {}).get("type") == "runtime"}
    for p, name in zip(nodes, ("node1", "node2"), strict=True):
        p.runtime = runtimes[name]  # type: ignore[attr-defined]
    return orch, nodes


@pytest.fixture
def two_nodes(tmp_path, broker, mock, processes, realm, wander):
    orch, nodes = start_pair(tmp_path, broker, mock, processes, realm, wander)
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


@pytest.mark.parametrize("heap_mib", ["0", "3"])  # 3 MiB: a base copy goes first, the pause moves what changed
def test_a_c_program_moves_back_and_forth_and_its_output_is_that_of_a_run_that_never_moved(two_nodes, realm, wander,
                                                                                           heap_mib):
    orch, (n1, n2) = two_nodes
    orch.client.subscribe(f"{realm}/rm/moved/#", qos=1)
    argv = ["40", "30", heap_mib]
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
        if heap_mib != "0":  # the state was a delta against the copy sent while it ran
            assert report["checkpoint_bytes"] < 1024 * 1024, report
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


def test_a_destination_that_is_full_refuses_and_the_module_goes_on_where_it_was(two_nodes, realm, wander):
    orch, (n1, n2) = two_nodes
    orch.client.subscribe(f"{realm}/rm/moved/#", qos=1)
    for i in range(3):  # node2 takes 3 modules (max_nmodules)
        orch.create(n2.runtime, "ticker.wat", {}, name=f"filler{i}")
    wait_for(lambda: n2.log().count("started: ticker.wat") == 3, 10, "node2 full")
    argv = ["25", "30"]
    expected, code = reference_run(wander, ["wander", *argv])
    module = orch.create(n1.runtime, "wander.wasm", {"argv": argv}, name="wander")
    wait_for(lambda: orch.stdout(module).count(b"\n") >= 2, 10, "running on node1")
    orch.control(n1.runtime, "delete", {"type": "module", "uuid": module}, send_to_runtime=n2.runtime)
    report = moved(orch, realm, module, 1)
    assert not report["moved"] and not report["with_state"]
    assert "max_nmodules" in report["why"] and "goes on here" in report["why"]
    end = orch.wait(lambda t, b: t == f"{realm}/proc/control/{n1.runtime}" and b.get("action") == "exited"
                    and b["data"].get("uuid") == module, 30, "the end on node1")
    assert end["data"]["status"] == {"code": code, "reason": "exited", "message": f"exit code {code}"}
    assert orch.stdout(module) == expected


@pytest.mark.parametrize(("file", "args", "why"), [
    ("loop.wat", {}, "did not reach a safe point"),  # a compute loop: never at a safe point
    ("ticker.wat", {"dirs": ["data"]}, "preopened directories"),  # may hold open files
    ("ticker.wat", {"migratable": False}, "migration is off for it"),
])
def test_a_module_that_cannot_move_with_its_state_starts_again_at_the_destination_and_the_report_says_why(
        two_nodes, realm, file, args, why):
    orch, (n1, n2) = two_nodes
    orch.client.subscribe(f"{realm}/rm/moved/#", qos=1)
    module = orch.create(n1.runtime, file, args, name="stuck")
    wait_for(lambda: "started: " + file in n1.log(), 10, "started on node1")
    orch.control(n1.runtime, "delete", {"type": "module", "uuid": module}, send_to_runtime=n2.runtime)
    report = moved(orch, realm, module, 1)
    assert report["moved"] and not report["with_state"] and why in report["why"], report
    create = orch.wait(lambda t, b: t == f"{realm}/proc/control/{n2.runtime}" and b.get("action") == "create"
                       and b["data"].get("uuid") == module, 10, "started again on node2")
    assert create["data"]["file"] == file
    left = orch.exited(module)  # the source says where it went
    assert left["reason"] == "deleted" and left["message"].startswith(f"moved to runtime {n2.runtime} (started again")
    wait_for(lambda: f"module stuck ({module}) started" in n2.log(), 10, "running on node2")
    assert "goes on with its state" not in n2.log()


def test_migrate_from_the_command_line_and_over_rest(two_nodes, realm, wander):
    orch, (n1, n2) = two_nodes
    argv = ["150", "30"]  # about 5 s: time for two command-line tools to start
    expected, code = reference_run(wander, ["wander", *argv])
    module = orch.create(n1.runtime, "wander.wasm", {"argv": argv}, name="walker")
    wait_for(lambda: orch.stdout(module).count(b"\n") >= 2, 10, "running on node1")
    done = run_tool(n1.config_dir, "migrate", "--module", "walker", "--to", "node2", "--direct", "--timeout", "30")
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.fullmatch(rf"module walker \({module}\) moved from node1 to node2 with its state: paused [0-9.]+ ms, "
                        r"checkpoint \d+ bytes\n", done.stdout), done.stdout
    # over REST, on the node it runs on now, by name; back to node1 by its uuid
    answer = requests.post(f"{n2.url}/modules/walker/migrate", json={"to": n1.runtime}, timeout=30)
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert report["with_state"] and report["source"] == n2.runtime and report["target"] == n1.runtime
    assert report["pause_ms"] > 0 and report["checkpoint_bytes"] > 0
    # /status: the module can move, and the node that moved it keeps the report
    here = requests.get(f"{n1.url}/status", timeout=10).json()["orchestrator"]
    assert [(m["name"], m["moves_with_state"], m["why_not"]) for m in here["modules"]] == [("walker", True, None)]
    assert here["migratable"] is True
    there = requests.get(f"{n2.url}/status", timeout=10).json()["orchestrator"]
    assert there["modules"] == [] and there["moves"][-1]["move_id"] == report["move_id"]
    # what cannot be asked is answered, and nothing moves
    assert requests.post(f"{n2.url}/modules/walker/migrate", json={"to": "node1"}, timeout=10).status_code == 404
    assert requests.post(f"{n1.url}/modules/walker/migrate", json={"to": "nowhere"}, timeout=10).status_code == 404
    assert requests.post(f"{n1.url}/modules/walker/migrate", json={}, timeout=10).status_code == 400
    end = orch.wait(lambda t, b: t == f"{realm}/proc/control/{n1.runtime}" and b.get("action") == "exited"
                    and b["data"].get("uuid") == module and b["data"]["status"]["reason"] == "exited", 30, "the end")
    assert end["data"]["status"]["code"] == code
    assert orch.stdout(module) == expected


def test_a_clean_stop_with_on_stop_migrate_moves_the_module_and_it_goes_on_on_the_other_node(
        tmp_path, broker, mock, processes, realm, wander):
    orch, (n1, n2) = start_pair(tmp_path, broker, mock, processes, realm, wander, first={"on_stop": "migrate"})
    try:
        argv = ["40", "30"]
        expected, code = reference_run(wander, ["wander", *argv])
        module = orch.create(n1.runtime, "wander.wasm", {"argv": argv}, name="drained")
        wait_for(lambda: orch.stdout(module).count(b"\n") >= 3, 10, "running on node1")
        assert n1.stop(signal.SIGTERM) == 0
        assert "moved to runtime" in n1.log() and "with its state" in n1.log()
        # node1 said the module left it (so an orchestrator does not send it again), node2 took it
        left = orch.wait(lambda t, b: t == f"{realm}/proc/control/{n1.runtime}" and b.get("action") == "exited"
                         and b["data"].get("uuid") == module, 10, "exited on node1")
        assert left["data"]["status"]["message"] == f"moved to runtime {n2.runtime} with its state"
        orch.wait(lambda t, b: t == f"{realm}/proc/control/{n2.runtime}" and b.get("action") == "create"
                  and b["data"].get("uuid") == module, 10, "the create announcing it on node2")
        end = orch.wait(lambda t, b: t == f"{realm}/proc/control/{n2.runtime}" and b.get("action") == "exited"
                        and b["data"].get("uuid") == module, 30, "the end on node2")
        assert end["data"]["status"]["code"] == code
        assert orch.stdout(module) == expected
    finally:
        orch.close()


def continues_from_a_checkpoint(out: bytes, expected: bytes) -> int:
    """`out` is `expected` with one stretch printed twice (what the module printed
    after its last checkpoint and before its node died): the length of that stretch."""
    for k in range(len(out) + 1):
        rest = out[k:]
        if out[:k] == expected[:k] and expected.endswith(rest) and len(expected) - len(rest) <= k:
            return k - (len(expected) - len(rest))
    raise AssertionError(f"not a run that went on from a checkpoint:\n{out.decode()}\n---\n{expected.decode()}")


def test_a_node_killed_and_started_again_goes_on_from_the_last_checkpoint(tmp_path, broker, mock, processes, realm,
                                                                        wander):
    orch, (n1, _n2) = start_pair(tmp_path, broker, mock, processes, realm, wander)
    try:
        argv = ["60", "40"]
        expected, code = reference_run(wander, ["wander", *argv])
        orch.client.subscribe(f"{realm}/rm/checkpoint/#", qos=1)
        module = orch.create(n1.runtime, "wander.wasm", {"argv": argv, "checkpoint_s": 0.3}, name="phoenix")
        wait_for(lambda: orch.stdout(module).count(b"\n") >= 15, 20, "a few checkpoints taken")
        n1.stop(signal.SIGKILL)
        printed = orch.stdout(module).count(b"\n")
        time.sleep(1.0)  # down for a while: nothing runs it meanwhile
        assert orch.stdout(module).count(b"\n") == printed
        again = start_node(tmp_path, broker, mock, processes, tmp_path / "m1", realm, name="node1", cfg_name="cfg1",
                           command="serve", rest_port=free_port())
        wait_for(lambda: "goes on from its checkpoint" in again.log(), 15, "the module resumed from its checkpoint")
        end = orch.wait(lambda t, b: t == f"{realm}/proc/control/{n1.runtime}" and b.get("action") == "exited"
                        and b["data"].get("uuid") == module, 30, "the end on node1")
        assert end["data"]["status"]["code"] == code
        repeated = continues_from_a_checkpoint(orch.stdout(module), expected)
        assert 0 <= repeated < len(expected) // 3, repeated  # not from the start: at most ~0.3 s of output again
        # its record, kept while it ran, is gone once it ended
        def records() -> list[bytes]:
            with orch.cond:
                return [p for t, p in orch.messages if t == f"{realm}/rm/checkpoint/{n1.runtime}/{module}"]

        assert len([r for r in records() if r]) >= 3
        wait_for(lambda: records()[-1] == b"", 10, "the record cleared")
    finally:
        orch.close()


def test_resume_takes_a_dead_nodes_module_to_another_runtime(tmp_path, broker, mock, processes, realm, wander):
    orch, (n1, n2) = start_pair(tmp_path, broker, mock, processes, realm, wander)
    try:
        argv = ["60", "40"]
        expected, code = reference_run(wander, ["wander", *argv])
        module = orch.create(n1.runtime, "wander.wasm", {"argv": argv, "checkpoint_s": 0.3}, name="orphan")
        wait_for(lambda: orch.stdout(module).count(b"\n") >= 15, 20, "a few checkpoints taken")
        n1.stop(signal.SIGKILL)  # and it never comes back
        done = run_tool(n2.config_dir, "resume", "--module", "orphan", "--on", "node2", "--timeout", "30")
        assert done.returncode == 0, done.stdout + done.stderr
        assert re.fullmatch(rf"module orphan \({module}\) goes on on node2 from its checkpoint of \S+ \(\d+ bytes\)\n",
                            done.stdout), done.stdout
        end = orch.wait(lambda t, b: t == f"{realm}/proc/control/{n2.runtime}" and b.get("action") == "exited"
                        and b["data"].get("uuid") == module, 30, "the end on node2")
        assert end["data"]["status"]["code"] == code
        assert 0 <= continues_from_a_checkpoint(orch.stdout(module), expected) < len(expected) // 3
        # twice is refused: it runs now
        again = run_tool(n2.config_dir, "resume", "--module", "orphan", "--on", "node2", "--timeout", "10")
        assert again.returncode != 0
    finally:
        orch.close()


def test_anything_on_a_runtimes_migrate_topic_leaves_it_serving_and_moving(two_nodes, realm, wander):
    """Forged or broken move messages (hypothesis) are answered or dropped; the
    runtime keeps serving, and a real move afterwards goes as it should."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from runtime_manager.orchestrator.migration import frame

    orch, (n1, n2) = two_nodes
    text = st.text(max_size=20)
    scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), text)
    header = st.fixed_dictionaries(
        {"kind": st.sampled_from(["offer", "state", "abort", "ready", "taking", "resumed", "failed", "?"])},
        optional={"id": st.one_of(st.uuids().map(str), scalar), "from": st.one_of(st.just("forger"), scalar),
                  "module": st.one_of(scalar, st.fixed_dictionaries({}, optional={
                      "uuid": st.one_of(st.uuids().map(str), scalar), "file": st.one_of(st.just("x.wasm"), scalar),
                      "args": st.one_of(scalar, st.dictionaries(text, scalar, max_size=3))})),
                  "seq": scalar, "total": scalar, "size": scalar, "sha256": scalar, "code_sha256": scalar})
    messages = st.one_of(st.tuples(header, st.binary(max_size=200)).map(lambda hb: frame(*hb)), st.binary(max_size=200))

    @given(messages)
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    def send(payload: bytes) -> None:
        orch.client.publish(f"{realm}/rm/migrate/{n2.runtime}", payload, qos=1).wait_for_publish(5)

    send()
    time.sleep(0.5)
    assert n2.alive and "Traceback" not in n2.log()
    argv = ["20", "30"]
    expected, code = reference_run(wander, ["wander", *argv])
    module = orch.create(n1.runtime, "wander.wasm", {"argv": argv}, name="after")
    wait_for(lambda: orch.stdout(module).count(b"\n") >= 2, 10, "running")
    orch.control(n1.runtime, "delete", {"type": "module", "uuid": module}, send_to_runtime=n2.runtime)
    end = orch.wait(lambda t, b: t == f"{realm}/proc/control/{n2.runtime}" and b.get("action") == "exited"
                    and b["data"].get("uuid") == module, 30, "the end on node2")
    assert end["data"]["status"]["code"] == code and orch.stdout(module) == expected


def test_a_destination_that_stops_answering_leaves_the_module_where_it_was(two_nodes, realm, wander):
    """node2 frozen (SIGSTOP) when the move is asked: one of ours that does not
    answer is not handed the module; it goes on on node1, whole."""
    orch, (n1, n2) = two_nodes
    orch.client.subscribe(f"{realm}/rm/moved/#", qos=1)
    argv = ["150", "20"]
    expected, code = reference_run(wander, ["wander", *argv])
    module = orch.create(n1.runtime, "wander.wasm", {"argv": argv}, name="homebody")
    wait_for(lambda: orch.stdout(module).count(b"\n") >= 2, 10, "running on node1")
    n2.proc.send_signal(signal.SIGSTOP)
    try:
        orch.control(n1.runtime, "delete", {"type": "module", "uuid": module}, send_to_runtime=n2.runtime)
        report = moved(orch, realm, module, 1)
        assert not report["moved"] and "did not answer" in report["why"] and "goes on here" in report["why"], report
    finally:
        n2.proc.send_signal(signal.SIGCONT)
    end = orch.wait(lambda t, b: t == f"{realm}/proc/control/{n1.runtime}" and b.get("action") == "exited"
                    and b["data"].get("uuid") == module, 30, "the end on node1")
    assert end["data"]["status"]["code"] == code and orch.stdout(module) == expected
    assert not [b for t, b in orch.json_messages(f"/proc/control/{n2.runtime}") if b.get("action") == "create"]


def test_a_module_too_large_for_the_destination_is_refused_before_it_stops(tmp_path, broker, mock, processes, realm,
                                                                          wander):
    orch, (n1, n2) = start_pair(tmp_path, broker, mock, processes, realm, wander, second={"module_memory_mb": 2})
    try:
        orch.client.subscribe(f"{realm}/rm/moved/#", qos=1)
        argv = ["100", "20", "3"]
        expected, code = reference_run(wander, ["wander", *argv])
        module = orch.create(n1.runtime, "wander.wasm", {"argv": argv}, name="heavy")
        wait_for(lambda: orch.stdout(module).count(b"\n") >= 2, 10, "running on node1")
        orch.control(n1.runtime, "delete", {"type": "module", "uuid": module}, send_to_runtime=n2.runtime)
        report = moved(orch, realm, module, 1)
        assert not report["moved"] and "module_memory_mb" in report["why"], report
        end = orch.wait(lambda t, b: t == f"{realm}/proc/control/{n1.runtime}" and b.get("action") == "exited"
                        and b["data"].get("uuid") == module, 30, "the end on node1")
        assert end["data"]["status"]["code"] == code and orch.stdout(module) == expected
    finally:
        orch.close()


def test_arts_moves_a_module_with_its_state(tmp_path, broker, mock, processes, realm, wander):
    """The ARTS dialect: its repr-string args, `filename`, arts_req; the move's create is in ARTS' form."""
    orch, (n1, n2) = start_pair(tmp_path, broker, mock, processes, realm, wander, dialect="arts")
    try:
        orch.client.subscribe(f"{realm}/rm/moved/#", qos=1)
        argv = ["60", "30"]
        expected, code = reference_run(wander, ["wander", *argv])
        module = orch.create(n1.runtime, "wander.wasm", repr(argv), name="arty")
        wait_for(lambda: orch.stdout(module).count(b"\n") >= 3, 10, "running on node1")
        orch.control(n1.runtime, "delete", {"type": "module", "uuid": module}, send_to_runtime=n2.runtime)
        report = moved(orch, realm, module, 1)
        assert report["moved"] and report["with_state"], report
        create = orch.wait(lambda t, b: t == f"{realm}/proc/control/{n2.runtime}" and b.get("action") == "create"
                           and b["data"].get("uuid") == module, 10, "the create on node2")
        assert create["type"] == "arts_req" and create["data"]["filename"] == "wander.wasm"
        end = orch.wait(lambda t, b: t == f"{realm}/proc/control/{n2.runtime}" and b.get("action") == "exited"
                        and b["data"].get("uuid") == module, 30, "the end on node2")
        assert end["data"]["status"]["code"] == code and orch.stdout(module) == expected
    finally:
        orch.close()


def test_run_follows_its_module_when_it_moves(two_nodes, realm, wander):
    """`run` streams the module's output and exits with its code, wherever it ends."""
    orch, (n1, n2) = two_nodes
    argv = ["60", "30"]
    expected, code = reference_run(wander, ["wander", *argv])
    tool = subprocess.Popen([sys.executable, "-m", "runtime_manager", "run", "--runtime", "node1", "--file",
                             "wander.wasm", "--argv", *argv, "--direct", "--config-dir", str(n1.config_dir)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        module = wait_for(lambda: next((b["data"]["uuid"] for t, b in orch.json_messages(f"/proc/control/{n1.runtime}")
                                        if b.get("action") == "create"), None), 20, "the create")
        wait_for(lambda: orch.stdout(module).count(b"\n") >= 3, 10, "running on node1")
        orch.control(n1.runtime, "delete", {"type": "module", "uuid": module}, send_to_runtime=n2.runtime)
        out, err = tool.communicate(timeout=60)
    finally:
        if tool.poll() is None:
            tool.kill()
    assert tool.returncode == code, err
    assert out == expected
    assert b"moved to runtime" in err and b"following it" in err


def test_moves_of_a_module_checkpointed_every_100_ms_keep_its_state(two_nodes, realm, wander):
    """A move that meets a checkpoint being taken waits for it, instead of starting the module again."""
    orch, (n1, n2) = two_nodes
    orch.client.subscribe(f"{realm}/rm/moved/#", qos=1)
    argv = ["80", "20"]
    expected, code = reference_run(wander, ["wander", *argv])
    module = orch.create(n1.runtime, "wander.wasm", {"argv": argv, "checkpoint_s": 0.1}, name="busy")
    wait_for(lambda: orch.stdout(module).count(b"\n") >= 3, 10, "running on node1")
    for i, (source, target) in enumerate([(n1, n2), (n2, n1), (n1, n2)], 1):
        orch.control(source.runtime, "delete", {"type": "module", "uuid": module}, send_to_runtime=target.runtime)
        report = moved(orch, realm, module, i)
        assert report["with_state"], report
        time.sleep(random.uniform(0.1, 0.3))
    end = orch.wait(lambda t, b: t == f"{realm}/proc/control/{n2.runtime}" and b.get("action") == "exited"
                    and b["data"].get("uuid") == module and b["data"]["status"]["reason"] == "exited", 30, "the end")
    assert end["data"]["status"]["code"] == code and orch.stdout(module) == expected
