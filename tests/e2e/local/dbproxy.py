#!/usr/bin/env python3
"""A TCP proxy on loopback that can cut one "cluster" from the database, for
tests/e2e/local/check.sh (the local stand-in for `docker network disconnect`).

    dbproxy.py PORT_FILE UPSTREAM_HOST UPSTREAM_PORT

Listens on a free 127.0.0.1 port (written to PORT_FILE once listening) and forwards to
UPSTREAM. SIGUSR1 cuts: open connections stay open but nothing is forwarded any more,
and new connections are accepted but not forwarded (a partition: calls hang until their
own timeouts, as when packets are dropped). SIGUSR2 heals: connections that were open
across the cut are closed (bytes were lost mid-stream), waiting new ones go through.
SIGTERM stops. Mirrors the Blackhole mode of tests/support/proxy.rs.
"""

import asyncio
import os
import signal
import sys


class Proxy:
    def __init__(self, upstream_host, upstream_port):
        self.upstream = (upstream_host, upstream_port)
        self.open = asyncio.Event()
        self.open.set()
        self.generation = 0  # incremented by every cut
        self.sessions = set()

    def cut(self):
        if self.open.is_set():
            self.generation += 1
            self.open.clear()
            print("dbproxy: cut", flush=True)

    def heal(self):
        if not self.open.is_set():
            for writers in list(self.sessions):
                for w in writers:
                    w.close()
            self.open.set()
            print("dbproxy: healed", flush=True)

    async def pipe(self, reader, writer, generation):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                # Hold the bytes while cut; a session that lived across a cut is closed
                # by heal(), so they are never delivered late.
                await self.open.wait()
                if self.generation != generation:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def serve(self, client_reader, client_writer):
        await self.open.wait()
        generation = self.generation
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.close()
            return
        writers = (client_writer, up_writer)
        self.sessions.add(writers)
        try:
            await asyncio.gather(
                self.pipe(client_reader, up_writer, generation),
                self.pipe(up_reader, client_writer, generation),
            )
        finally:
            self.sessions.discard(writers)


async def main():
    port_file, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    proxy = Proxy(host, port)
    server = await asyncio.start_server(proxy.serve, "127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, proxy.cut)
    loop.add_signal_handler(signal.SIGUSR2, proxy.heal)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    with open(port_file + ".tmp", "w") as f:
        f.write(f"{server.sockets[0].getsockname()[1]}\n")
    os.replace(port_file + ".tmp", port_file)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
