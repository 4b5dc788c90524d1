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
    """Threads for WebAssembly calls, in a chain. The first thread takes every
    call; each further one takes calls only while all threads before it are held
    by a call running longer than `slow_s`. Short calls thus run on one thread,
    without several threads taking turns at the GIL (measured: two busy threads
    were slower than one).

    The chain grows: when calls wait and every thread is held, one more thread
    joins (up to `max_threads`), so modules stuck in long calls delay only their
    own flows. Threads beyond the first `threads` leave after `idle_s` without work.
    """

    def __init__(self, threads: int = 2, max_threads: int = 16, slow_s: float = 0.02, idle_s: float = 10.0) -> None:
        self.base, self.max_threads = threads, max(threads, max_threads)
        self.slow_s, self.idle_s = slow_s, idle_s
        self._queue: collections.deque[tuple[concurrent.futures.Future, Callable[[], Any]]] = collections.deque()
        self._lock = threading.Lock()
        self._wake: list[threading.Condition] = []
        self._started: list[float | None] = []  # when each thread's call began; None: idle
        self._asleep: list[bool] = []  # waiting with no call to watch: only a notify (or idle_s) wakes it
        self._closed = False
        with self._lock:
            for _ in range(threads):
                self._add_thread()

    @property
    def threads(self) -> int:
        return len(self._wake)

    def _add_thread(self) -> None:
        """Under the lock: one more thread at the end of the chain."""
        i = len(self._wake)
        self._wake.append(threading.Condition(self._lock))
        self._started.append(None)
        self._asleep.append(False)
        threading.Thread(target=self._work, args=(i,), name=f"wasm_{i}", daemon=True).start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the WebAssembly pool is closed")
            self._queue.append((fut, functools.partial(fn, *args, **kwargs)))
            self._wake[0].notify()
            helper = next((j for j in range(1, len(self._wake)) if self._asleep[j]), None)
            if helper is not None and self._started[0] is not None:
                self._wake[helper].notify()  # a helper starts watching the threads before it
            elif helper is None and all(s is not None for s in self._started) and len(self._wake) < self.max_threads:
                self._add_thread()  # every thread holds a call: one more watches them
        return fut

    def _may_take(self, i: int) -> bool:
        now = time.monotonic()
        return all(start is not None and now - start > self.slow_s for start in self._started[:i])

    def _work(self, i: int) -> None:
        idle_since = time.monotonic()
        while True:
            with self._lock:
                while not self._closed and not (self._queue and self._may_take(i)):
                    if i >= self.base and i == len(self._wake) - 1 and time.monotonic() - idle_since > self.idle_s:
                        # the last extra thread, idle for long: it leaves the chain
                        self._wake.pop()
                        self._started.pop()
                        self._asleep.pop()
                        return
                    # helpers look again while calls wait: the threads before them may get stuck
                    self._asleep[i] = not (i and self._queue)
                    timeout = (self.idle_s if i >= self.base else None) if self._asleep[i] else self.slow_s / 4
                    self._wake[i].wait(timeout)
                self._asleep[i] = False
                if self._closed:
                    return
                fut, call = self._queue.popleft()
                self._started[i] = time.monotonic()
                if self._queue and i + 1 < len(self._wake) and self._asleep[i + 1]:
                    self._wake[i + 1].notify()  # the next helper starts watching this thread
                elif self._queue and i + 1 == len(self._wake) and len(self._wake) < self.max_threads:
                    self._add_thread()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(call())
                except BaseException as exc:
                    fut.set_exception(exc)
            with self._lock:
                self._started[i] = None
            idle_since = time.monotonic()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft()[0].cancel()
            for cond in self._wake:
                cond.notify_all()
