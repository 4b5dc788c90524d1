"""The load of each worker process of one node (`serve --processes N`).

Workers share the node's requests (one shared MQTT subscription, one REST
port); the first worker tells the group the node's status, so it needs the
others' load. Each worker writes its flows in flight and queued into its slot
of a small file mapped into every worker's memory; the first sums them.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

_SLOT = struct.Struct("<qq")  # in flight, queued


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
        _SLOT.pack_into(self._map, self.index * _SLOT.size, in_flight, queued)

    def others(self) -> tuple[int, int]:
        """Flows in flight and queued in the other workers."""
        in_flight = queued = 0
        for i in range(self.workers):
            if i != self.index:
                a, q = _SLOT.unpack_from(self._map, i * _SLOT.size)
                in_flight, queued = in_flight + a, queued + q
        return in_flight, queued

    def close(self) -> None:
        self._map.close()
