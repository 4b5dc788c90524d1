"""A fast fake component service and load balancer for the benchmark: a bare
asyncio HTTP/1.1 keep-alive server (uvloop when installed).

    python bench/fast_service.py --port 6000

`GET .../id_node` answers {"id_node": null} (`--lb-answer 2`: {"id_node": 2});
any other GET answers {"ok": true};
a POST answers its own body back (so chained results grow as in real flows,
bounded by the payload here).
"""

from __future__ import annotations

import argparse
import asyncio

LB = b'{"id_node":null}'
OK = b'{"ok":true}'


def response(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class Http(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            line0 = head.split(b"\r\n", 1)[0]
            if line0.startswith(b"GET"):
                out = LB if b"id_node" in line0 else OK
            else:
                out = body or OK
            self.transport.write(response(out))  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=6000)
    parser.add_argument("--lb-answer", default="null", help="the load balancer's id_node (JSON: null, 2, \"2\")")
    args = parser.parse_args()
    global LB
    LB = b'{"id_node":%s}' % args.lb_answer.encode()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(Http, "127.0.0.1", args.port)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
