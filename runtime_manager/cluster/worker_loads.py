"""The load of each worker process of one node (`serve --processes N`).

Workers share the node's requests (one shared MQTT subscription, one REST
port); the first worker tells the group the node's status, so it needs the
others' load. Each worker writes its flows in flight and queued into its slot
of a small file mapped into every worker's memory; the first sums them.
Each write also stamps the slot with the time (the system's monotonic clock,
the same in every process): the supervisor reads the stamps as heartbeats,
and a worker whose stamp stops (stopped, wedged) is killed and started again.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path

_SLOT = struct.Struct("<qqd")  # in flight, queued, when written (time.monotonic)


def create_file(path: Path, workers: int) -> None:
    """The shared file, zeroed (by the supervisor, before it starts the workers)."""
    path.write_bytes(b"\0" * (_SLOT.size * workers))


class WorkerLoads:
    def __init__(self, path: Path, index: int, workers: int) -> None:
        self.index, self.workers = index, workers
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, _SLOT.size * workers)
        finally:
            os.close(fd)

    def write(self, in_flight: int, queued: int) -> None:
        _SLOT.pack_into(self._map, self.index * _SLOT.size, in_flight, queued, time.monotonic())

    def others(self) -> tuple[int, int]:
        """Flows in flight and queued in the other workers."""
        in_flight = queued = 0
        for i in range(self.workers):
            if i != self.index:
                a, q, _at = _SLOT.unpack_from(self._map, i * _SLOT.size)
                in_flight, queued = in_flight + a, queued + q
        return in_flight, queued

    def beats(self) -> list[float]:
        """When each worker last wrote its slot (time.monotonic; 0: never)."""
        return [_SLOT.unpack_from(self._map, i * _SLOT.size)[2] for i in range(self.workers)]

    def close(self) -> None:
        self._map.close()


def heartbeats(path: Path, workers: int) -> list[float]:
    """When each worker last wrote its slot (time.monotonic; 0: never). For the supervisor."""
    try:
        data = path.read_bytes()
    except OSError:
        return [0.0] * workers
    return [_SLOT.unpack_from(data, i * _SLOT.size)[2] if len(data) >= (i + 1) * _SLOT.size else 0.0
            for i in range(workers)]

