"""The node's HTTP client against real servers on 127.0.0.1 that answer as told:
keep-alive, chunked and close-delimited bodies, limits, timeouts, every way a
connection can fail, and arbitrary bytes as an answer (hypothesis)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from helpers import free_port
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime_manager.http.client import HttpClient, HttpConnectionError, HttpProtocolError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + (await reader.readexactly(length) if length else b"")


class Server:
    """An asyncio server on a free port; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler, self.connections, self.open = handler, 0, 0
        self.port = free_port()

    async def __aenter__(self) -> Server:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self.open += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                self.open -= 1
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/path?q=1"


def keep_alive(answer: Callable[[bytes], bytes]) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await read_request(reader)
            writer.write(answer(request))
            await writer.drain()

    return handler


def run(coro: Awaitable[object]) -> object:
    return asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


def test_keep_alive_connections_are_reused_and_requests_are_well_formed() -> None:
    seen: list[bytes] = []

    def answer(request: bytes) -> bytes:
        seen.append(request)
        return ok(b'{"ok":true}', b"Content-Type: application/json\r\n")

    async def main() -> None:
        async with Server(keep_alive(answer)) as server:
            client = HttpClient()
            for i in range(10):
                resp = await client.request("POST", server.url, b'{"n":%d}' % i, {"Content-Type": "application/json"})
                assert resp.status == 200 and resp.body == b'{"ok":true}' and resp.headers["content-type"] == "application/json"
            assert (await client.request("GET", server.url)).status == 200
            assert server.connections == 1 and client.idle_connections == 1
            await client.close()

    run(main())
    assert seen[0].startswith(b"POST /path?q=1 HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"Content-Length: 7\r\n" in seen[0] and seen[0].endswith(b'\r\n\r\n{"n":0}')
    assert seen[-1].startswith(b"GET /path?q=1 HTTP/1.1\r\n") and b"Content-Length" not in seen[-1]


def test_chunked_and_close_delimited_bodies() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"

    async def close_delimited(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
        await writer.drain()

    async def main() -> None:
        async with Server(keep_alive(lambda _r: chunked)) as server:
            client = HttpClient()
            assert (await client.request("GET", server.url)).body == b"hello world"
            assert (await client.request("GET", server.url)).body == b"hello world"
            assert server.connections == 1
        await client.close()
        client = HttpClient()
        async with Server(close_delimited) as server:
            resp = await client.request("GET", server.url)
            assert resp.body == b"until the end" and client.idle_connections == 0  # not reused
            assert (await client.request("GET", server.url)).body == b"until the end"
            assert server.connections == 2
        await client.close()

    run(main())


def test_a_body_past_the_limit_is_cut_and_its_connection_closed() -> None:
    async def main() -> None:
        async with Server(keep_alive(lambda _r: ok(b"x" * 100_000))) as server:
            client = HttpClient()
            resp = await client.request("GET", server.url, limit=100)
            assert resp.truncated and resp.body == b"x" * 101
            resp = await client.request("GET", server.url, limit=1_000_000)
            assert not resp.truncated and len(resp.body) == 100_000
            assert server.connections == 2  # the cut one was not reused
            await client.close()

    run(main())


def test_timeouts_and_failed_connections() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    async def hang_up_midway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()

    async def main() -> None:
        client = HttpClient()
        async with Server(silent) as server:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(TimeoutError):
                await client.request("GET", server.url, timeout=0.3)
            assert 0.25 < loop.time() - started < 2 and client.idle_connections == 0
        with pytest.raises(HttpConnectionError, match="cannot connect"):
            await client.request("GET", f"http://127.0.0.1:{free_port()}/")
        async with Server(hang_up_midway) as server:
            with pytest.raises(HttpConnectionError, match="closed before the answer"):
                await client.request("GET", server.url)
        async with Server(keep_alive(lambda _r: b"garbage\r\n\r\n")) as server:
            with pytest.raises(HttpProtocolError):
                await client.request("GET", server.url)
        with pytest.raises(ValueError):
            await client.request("GET", "ftp://127.0.0.1/")
        with pytest.raises(ValueError, match="line break"):
            await client.request("GET", "http://127.0.0.1:1/", headers={"X": "a\r\nInjected: 1"})
        await client.close()

    run(main())


def test_each_answer_waits_its_own_time_under_one_timer() -> None:
    """Answers waited for at once, each with its own timeout (one timer serves
    them all): each ends at its own time, one that came is not touched when the
    others expire, and the same client used again on a new loop still times out."""
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    client = HttpClient()

    async def first_loop() -> None:
        async with Server(silent) as quiet, Server(keep_alive(lambda _r: ok(b"{}"))) as quick:
            loop = asyncio.get_running_loop()
            started = loop.time()

            async def timed_out(timeout: float) -> float:
                with pytest.raises(TimeoutError):
                    await client.request("GET", quiet.url, timeout=timeout)
                return loop.time() - started

            long = asyncio.ensure_future(timed_out(1.5))  # the timer is set for it first...
            await asyncio.sleep(0.05)
            short = asyncio.ensure_future(timed_out(0.3))  # ...and set again, earlier, for this one
            answered = await client.request("GET", quick.url, timeout=0.5)
            assert answered.status == 200
            assert 0.25 < await short < 1.2
            assert 1.4 < await long < 3.0
            assert (await client.request("GET", quick.url, timeout=0.5)).status == 200  # its connection, kept
            assert quick.connections == 1

    async def second_loop() -> None:
        async with Server(silent) as quiet:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(TimeoutError):  # due after the first loop's last timer, which is gone with it
                await client.request("GET", quiet.url, timeout=1.0)
            assert 0.9 < loop.time() - started < 2.5
        await client.close()

    run(first_loop())
    run(second_loop())


def test_a_connection_the_server_closed_while_idle_is_not_used_again() -> None:
    async def one_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(b"once"))  # keep-alive by HTTP/1.1 default, then the server goes away
        await writer.drain()

    async def main() -> None:
        async with Server(one_then_close) as server:
            client = HttpClient()
            for _ in range(5):
                assert (await client.request("GET", server.url)).body == b"once"
                await asyncio.sleep(0.05)  # the server's FIN arrives while the connection is idle
            assert server.connections == 5
            await client.close()

    run(main())


def test_errors_are_answers_and_calls_per_host_are_bounded() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await asyncio.sleep(0.1)
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops")
            await writer.drain()

    async def main() -> None:
        async with Server(slow) as server:
            client = HttpClient(max_per_host=2)
            answers = await asyncio.gather(*(client.request("GET", server.url) for _ in range(6)))
            assert {(a.status, a.body) for a in answers} == {(500, b"oops")}
            assert server.connections == 2  # six calls, two at a time, on two kept connections
            await client.close()

    run(main())


@given(st.one_of(st.binary(max_size=300),
                 st.builds(lambda status, body, extra: b"HTTP/1.1 %d X\r\n%s\r\n%s" % (status, extra, body),
                           st.integers(0, 1200), st.binary(max_size=100),
                           st.sampled_from([b"", b"Content-Length: 3\r\n", b"Content-Length: -1\r\n",
                                            b"Transfer-Encoding: chunked\r\n", b"Content-Length: 99999999999999999999\r\n"]))))
@settings(max_examples=150, deadline=None)
def test_any_answer_is_a_response_or_a_named_error(answer: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as server:
            client = HttpClient()
            try:
                resp = await client.request("GET", server.url, timeout=1.0, limit=1000)
                assert 0 <= resp.status and len(resp.body) <= 1001
            except (HttpConnectionError, HttpProtocolError, TimeoutError):
                pass
            await client.close()

    run(main())


def test_https_with_the_trust_store_and_a_refused_certificate(tmp_path, monkeypatch) -> None:
    """TLS for https components: a certificate the trust store holds (SSL_CERT_FILE,
    as OpenSSL reads it) is taken; one it does not is a connection error."""
    import ssl

    from helpers import make_certificate

    cert, key = make_certificate(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def main() -> None:
        port = free_port()
        server = await asyncio.start_server(keep_alive(lambda _r: ok(b"secret")), "127.0.0.1", port, ssl=server_tls)
        try:
            with pytest.raises(HttpConnectionError, match="cannot connect"):  # not in the trust store
                await HttpClient().request("GET", f"https://127.0.0.1:{port}/", timeout=5)
            monkeypatch.setenv("SSL_CERT_FILE", str(cert))
            client = HttpClient()
            for _ in range(3):
                assert (await client.request("GET", f"https://127.0.0.1:{port}/", timeout=5)).body == b"secret"
            assert client.idle_connections == 1  # kept alive over TLS too
            await client.close()
        finally:
            server.close()

    run(main())
