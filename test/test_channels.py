"""Module channels as a module sees them: the `channels` functions in real
wasmtime, and the bounds of one module's inboxes and writes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import wasmtime
from conftest import ROOT

from runtime_manager.config import WasmLimits
from runtime_manager.wasm import channels as ch
from runtime_manager.wasm.channels import Channel, ModuleChannels
from runtime_manager.wasm.modules import make_engine
from runtime_manager.wasm.sandbox import MemoryProbe, load, run_module

IN, OUT, BOTH = Channel("in", "r/in", "r"), Channel("out", "r/out", "w"), Channel("io", "r/io", "rw")


def table(*channels: Channel) -> tuple[ModuleChannels, list[tuple[str, bytes]], list]:
    sent: list[tuple[str, bytes]] = []
    held: list = []  # `gone` callbacks not called yet: writes still on their way

    def send(channel: Channel, payload: bytes, gone) -> None:
        sent.append((channel.topic, payload))
        held.append(gone)

    return ModuleChannels(list(channels), send, "test"), sent, held


def test_open_read_write_close_and_their_errors() -> None:
    mc, sent, _held = table(IN, OUT)
    assert mc.open("nope") == -ch.ENOENT
    r, w = mc.open("in"), mc.open("out")
    assert r >= 0 and w >= 0 and r != w
    assert mc.write(r, b"x") == -ch.EACCES and mc.read(w, 10, 0) == -ch.EACCES
    assert mc.read(99, 10, 0) == -ch.EBADF and mc.write(99, b"") == -ch.EBADF
    started = time.monotonic()
    assert mc.read(r, 10, 50) == -ch.EAGAIN and time.monotonic() - started >= 0.045
    mc.deliver(IN, b"hello world")
    assert mc.read(r, 5, 0) == 11  # too long for the buffer: not taken, its length said
    assert mc.read(r, 11, 0) == b"hello world"
    assert mc.write(w, b"out!") == 0 and sent == [("r/out", b"out!")]
    assert mc.write(w, b"x" * (ch.MAX_MESSAGE + 1)) == -ch.EMSGSIZE
    assert mc.close(w) == 0 and mc.close(w) == -ch.EBADF


def test_inboxes_and_writes_are_bounded() -> None:
    mc, _sent, held = table(IN, OUT)
    for i in range(ch.MAX_QUEUED + 10):
        mc.deliver(IN, str(i).encode())
    assert mc.dropped() == 10  # the oldest went
    r = mc.open("in")
    assert mc.read(r, 100, 0) == b"10"
    big = b"y" * (ch.MAX_QUEUED_BYTES // 2 + 1)
    mc.deliver(IN, big)
    mc.deliver(IN, big)  # over the byte bound: everything older goes
    assert mc.read(r, len(big), 0) == big and mc.read(r, len(big), 0) == -ch.EAGAIN
    w = mc.open("out")
    for _ in range(ch.MAX_PENDING):
        assert mc.write(w, b"m") == 0
    assert mc.write(w, b"m") == -ch.EAGAIN  # the broker has not taken the others yet
    held.pop()()
    assert mc.write(w, b"m") == 0


def test_a_modules_own_write_on_an_rw_channel_does_not_come_back_to_it() -> None:
    mc, _sent, _ = table(BOTH)
    h = mc.open("io")
    assert mc.write(h, b"mine") == 0
    mc.deliver(BOTH, b"mine")  # the broker's copy of our own write
    mc.deliver(BOTH, b"theirs")
    assert mc.read(h, 100, 0) == b"theirs" and mc.read(h, 100, 0) == -ch.EAGAIN


def test_cancel_wakes_a_waiting_read() -> None:
    mc, _, _ = table(IN)
    r = mc.open("in")
    got: list = []
    t = threading.Thread(target=lambda: got.append(mc.read(r, 10, -1)))
    t.start()
    time.sleep(0.1)
    assert t.is_alive()
    mc.cancel()
    t.join(2)
    assert got == [-ch.ECANCELED]


def test_relay_wat_in_wasmtime(tmp_path: Path) -> None:
    """The functions a module imports, with real wasmtime: relay.wat copies "in" to "out"."""
    mc, sent, _held = table(IN, OUT)
    loaded = load(ROOT / "runtimes" / "relay.wat", engine=make_engine(False), channels=mc)
    out: list[bytes] = []
    probe = MemoryProbe()
    result: list = []
    t = threading.Thread(target=lambda: result.append(run_module(
        loaded, "_start", limits=WasmLimits(memory_mb=64), stdout=out.append, deadline_ticks=1, memory=probe)))
    t.start()
    deadline = time.monotonic() + 5
    while b"".join(out) != b"ready\n" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert probe.size() == 2 * 65536  # read while it runs
    for message in (b"a", b"", b"\x00" * 65536):
        mc.deliver(IN, message)
    mc.deliver(IN, b"quit")
    t.join(5)
    assert [p for _, p in sent] == [b"a", b"", b"\x00" * 65536]
    assert result[0].exit_code is None and result[0].trap is None
    # a message longer than its buffer: relay.wat exits 5 (it was offered the length)
    mc2, _, _ = table(IN, OUT)
    mc2.deliver(IN, b"z" * 70000)
    outcome = run_module(load(ROOT / "runtimes" / "relay.wat", engine=make_engine(False), channels=mc2), "_start",
                         limits=WasmLimits(memory_mb=64), deadline_ticks=1)
    assert outcome.exit_code == 5


def test_a_pointer_outside_memory_is_efault() -> None:
    wat = """(module
      (import "channels" "open" (func $open (param i32 i32) (result i32)))
      (import "channels" "write" (func $write (param i32 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (data (i32.const 0) "out")
      (func (export "bad_open") (result i32) (call $open (i32.const 65535) (i32.const 10)))
      (func (export "bad_write") (result i32) (call $write (call $open (i32.const 0) (i32.const 3))
                                                        (i32.const 65000) (i32.const 1000))))"""
    mc, sent, _ = table(OUT)
    engine = make_engine(False)
    linker = wasmtime.Linker(engine)
    ch.define(linker, mc)
    store = wasmtime.Store(engine)
    store.set_epoch_deadline(1)
    instance = linker.instantiate(store, wasmtime.Module(engine, wat))
    assert instance.exports(store)["bad_open"](store) == -ch.EFAULT
    assert instance.exports(store)["bad_write"](store) == -ch.EFAULT and not sent
