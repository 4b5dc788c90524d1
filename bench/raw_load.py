"""A lean MQTT load generator: QoS 0 requests written by hand on one socket.

bench.py's `LoadGenerator` uses paho, which costs about as much CPU per request
as the node it measures (measured: 198 µs a flow against the node's 217 in a
WebAssembly echo burst, the two cores full). On a two-core machine that caps
what the node is seen to do. This one encodes each PUBLISH itself (MQTT 3.1.1,
QoS 0), sends them in batches, and reads results with one `recv` for many:
a few µs a request. Same interface as `LoadGenerator` for `run_burst`.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import orjson


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _remaining_length(len(body)) + body


def _string(s: str) -> bytes:
    data = s.encode()
    return len(data).to_bytes(2, "big") + data


class RawLoadGenerator:
    BATCH = 64  # requests written together

    def __init__(self, port: int, client_id: str = "bench-raw") -> None:
        self.sent: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.statuses: dict[str, str] = {}
        self.node_ms: dict[str, float] = {}
        self.cond = threading.Condition()
        self.topic = "bench"
        self._out: list[bytes] = []
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connect = _string("MQTT") + bytes([4, 0x02]) + (0).to_bytes(2, "big") + _string(client_id)  # clean, no keepalive
        self.sock.sendall(_packet(0x10, connect) + _packet(0x82, (1).to_bytes(2, "big") + _string("+/result") + b"\x00"))
        self._subscribed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._subscribed.wait(10):
            raise RuntimeError("no SUBACK from the broker")

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            now = time.perf_counter()
            pos, results = 0, []
            while pos + 2 <= len(buf):
                first = buf[pos]
                length, mult, i = 0, 1, pos + 1
                while i < len(buf):
                    length += (buf[i] & 0x7F) * mult
                    mult *= 128
                    i += 1
                    if not buf[i - 1] & 0x80:
                        break
                else:
                    break  # the length is not all here yet
                if i + length > len(buf):
                    break
                body = buf[i:i + length]
                pos = i + length
                if first >> 4 == 3:  # PUBLISH at QoS 0: topic, then the payload
                    topic_len = int.from_bytes(body[:2], "big")
                    results.append(orjson.loads(body[2 + topic_len:]))
                elif first >> 4 == 9:  # SUBACK
                    self._subscribed.set()
            buf = buf[pos:]
            if results:
                with self.cond:
                    for data in results:
                        rid = data.get("request_id")
                        if rid not in self.done:
                            self.done[rid] = now
                            self.statuses[rid] = data.get("status")
                            if isinstance(data.get("elapsed_ms"), (int, float)):
                                self.node_ms[rid] = data["elapsed_ms"]

    def send(self, rid: str, qos: int = 0) -> None:
        assert qos == 0, "the raw generator sends QoS 0 only"
        payload = orjson.dumps({"id_flow": "1", "payload": "0x03abcdefghil", "request_id": rid})
        self.sent[rid] = time.perf_counter()
        self._out.append(_packet(0x30, _string(self.topic) + payload))
        if len(self._out) >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        if self._out:
            self.sock.sendall(b"".join(self._out))
            self._out.clear()

    def wait(self, rids: list[str], timeout: float) -> None:
        from bench import wait_for_results

        self.flush()
        wait_for_results(self, rids, timeout)

    def close(self) -> None:
        try:
            self.sock.sendall(_packet(0xE0, b""))  # DISCONNECT
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> RawLoadGenerator:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()
