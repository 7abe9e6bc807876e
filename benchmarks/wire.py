"""A loopback TCP proxy that counts round trips between a client and PostgreSQL.

A round trip is counted each time the client starts sending after the server has answered
(or at the start): a pipelined burst of messages is one round trip, as on a real network.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass
class WireCounter:
    round_trips: int = 0
    _client_turn: dict[int, bool] = field(default_factory=dict)

    def client_sent(self, conn: int) -> None:
        if not self._client_turn.get(conn, False):
            self.round_trips += 1
            self._client_turn[conn] = True

    def server_sent(self, conn: int) -> None:
        self._client_turn[conn] = False


class WireProxy:
    """``async with WireProxy(host=..., port=... or unix_path=...) as proxy``: proxy.port."""

    def __init__(
        self, *, host: str | None = None, port: int | None = None, unix_path: str | None = None
    ) -> None:
        self._target = (host, port, unix_path)
        self.counter = WireCounter()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_id = 0

    async def __aenter__(self) -> WireProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port, unix_path = self._target
        if unix_path is not None:
            up_reader, up_writer = await asyncio.open_unix_connection(unix_path)
        else:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        self._next_id += 1
        conn = self._next_id
        pumps = [
            asyncio.ensure_future(self._pump(reader, up_writer, conn, client=True)),
            asyncio.ensure_future(self._pump(up_reader, writer, conn, client=False)),
        ]
        for pump in pumps:
            self._tasks.add(pump)
            pump.add_done_callback(self._tasks.discard)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        for w in (writer, up_writer):
            w.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: int, *, client: bool
    ) -> None:
        while data := await reader.read(65536):
            if client:
                self.counter.client_sent(conn)
            else:
                self.counter.server_sent(conn)
            writer.write(data)
            await writer.drain()
