"""The threads that run WebAssembly flow steps."""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import threading
import time
from collections.abc import Callable
from typing import Any


class WasmPool(concurrent.futures.Executor):
    """Threads for WebAssembly calls. The first thread takes every call; each
    further one takes calls only while all threads before it are held by a call
    running longer than `slow_s`. Short calls thus run on one thread, without
    several threads taking turns at the GIL (measured: two busy threads were
    slower than one), and a slow module still delays only its own flow."""

    def __init__(self, threads: int = 2, slow_s: float = 0.02) -> None:
        self.slow_s = slow_s
        self._queue: collections.deque[tuple[concurrent.futures.Future, Callable[[], Any]]] = collections.deque()
        self._lock = threading.Lock()
        self._wake = [threading.Condition(self._lock) for _ in range(threads)]
        self._started: list[float | None] = [None] * threads
        self._asleep = [False] * threads  # waiting with no timeout: only a notify wakes it
        self._closed = False
        for i in range(threads):
            threading.Thread(target=self._work, args=(i,), name=f"wasm_{i}", daemon=True).start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the WebAssembly pool is closed")
            self._queue.append((fut, functools.partial(fn, *args, **kwargs)))
            self._wake[0].notify()
            if len(self._wake) > 1 and self._asleep[1] and self._started[0] is not None:
                self._wake[1].notify()  # a helper starts watching the first thread
        return fut

    def _may_take(self, i: int) -> bool:
        now = time.monotonic()
        return all(start is not None and now - start > self.slow_s for start in self._started[:i])

    def _work(self, i: int) -> None:
        while True:
            with self._lock:
                while not self._closed and not (self._queue and self._may_take(i)):
                    # helpers look again while calls wait: the threads before them may get stuck
                    self._asleep[i] = not (i and self._queue)
                    self._wake[i].wait(None if self._asleep[i] else self.slow_s / 4)
                self._asleep[i] = False
                if self._closed:
                    return
                fut, call = self._queue.popleft()
                self._started[i] = time.monotonic()
                if i + 1 < len(self._wake) and self._queue and self._asleep[i + 1]:
                    self._wake[i + 1].notify()  # the next helper starts watching this thread
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(call())
                except BaseException as exc:
                    fut.set_exception(exc)
            with self._lock:
                self._started[i] = None

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft()[0].cancel()
            for cond in self._wake:
                cond.notify_all()
