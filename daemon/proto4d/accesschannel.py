"""The access-record channel: a pipe from the drain shim inside the app process to the daemon.

Whatever the app prints reaches the daemon on the app's stdout, and an access-log line printed
by the app (a student's chat message in uvicorn's format, say) cannot be told from uvicorn's own
there. When the app runs through the drain shim, the daemon also passes it the write end of a
pipe (`PROTO4D_ACCESS_FD`); the shim writes uvicorn's access records to it (shim/proto4d_drain.py).
Once the shim has said hello on the pipe, the records come from the pipe only and access-log
look-alikes in the output are ignored (AppProcess.access_channel tells the supervisor so).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable

from proto4d.accesslog import CHANNEL_HELLO, AccessRecord, parse_channel_record

ENV = "PROTO4D_ACCESS_FD"
_MAX_LINE = 8192


class AccessChannel:
    """One pipe per app process: `env` and `write_fd` go to the child; `run` reads the records."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self.active = False  # the shim said hello: records come from here, not from the output
        self.records = 0
        self.rejected = 0

    @property
    def env(self) -> dict[str, str]:
        return {ENV: str(self.write_fd)}

    def spawned(self) -> None:
        """The child has its copy of the write end: close ours, so the pipe ends when the app does."""
        with contextlib.suppress(OSError):
            os.close(self.write_fd)

    async def run(self, on_record: Callable[[AccessRecord], None], on_hello: Callable[[], None]) -> None:
        """Read records until the app closes its end (it exits)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_MAX_LINE, loop=loop)
        pipe = os.fdopen(self.read_fd, "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), pipe)
        try:
            while True:
                try:
                    raw = await reader.readline()
                except ValueError:  # longer than any record the shim writes: readline has dropped it
                    self.rejected += 1
                    continue
                if not raw:
                    return
                rec = parse_channel_record(raw)
                if rec is not None:
                    self.records += 1
                    on_record(rec)
                elif _is_hello(raw):
                    if not self.active:
                        self.active = True
                        on_hello()
                else:
                    self.rejected += 1
        finally:
            transport.close()


def _is_hello(raw: bytes) -> bool:
    try:
        return json.loads(raw) == CHANNEL_HELLO
    except ValueError:
        return False
