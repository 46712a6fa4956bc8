"""The spare interpreter: one app process started ahead, with the venv's imports done, that becomes
the next release's canary, so that an update's start imports only the app's own code.

Why: on a small machine a canary's start is the update's largest burst of CPU beside the serving app
(an interpreter importing the framework and its dependencies), and no scheduling class makes it free
(bench/RESULTS.md, "this VM's floor"). The spare pays that burst while nobody is on (the runner warms
it on a green sample), then waits blocked on its socket, costing no CPU, until an update needs a canary.

This module owns the protocol with the spare (the drain shim's `--proto4d-spare` mode, see its
`_spare`) and the decision whether a warm spare may stand in for a cold start (pure: `mismatch`).
What to import comes from the serving process (`modules` on its control socket) when the spare is
started; starting, stopping and the lifecycle are the runner's.

A spare stands in only when a cold start would run the same interpreter of the same venv, as the
same user, with the same environment apart from the per-process values below; and the shim itself
refuses when the release's tree would shadow a module already imported. Anything else: the spare is
stopped and the release starts cold, as without one.
"""

from __future__ import annotations

import array
import asyncio
import json
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proto4d import accesschannel, drain
from proto4d.child import AppProcess, NoLine, close_socket, recv_line

FLAG = "--proto4d-spare"
ENV = "PROTO4D_SPARE_FD"
# Values that differ from one process to the next by design: never a reason to start cold.
VOLATILE_ENV = frozenset({"PROTO4D_RELEASE", drain.SHARED_ENV, drain.CONTROL_ENV, accesschannel.ENV, ENV})
MAX_MODULES = 20_000
MAX_LINE = 8 << 20


@dataclass(frozen=True)
class Key:
    """What a process's start depends on beyond its working directory and argv."""

    python: str
    user: str
    env: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, python: Path | str, user: str | None, env: Mapping[str, str]) -> Key:
        return cls(str(python), user or "", tuple(sorted((k, v) for k, v in env.items() if k not in VOLATILE_ENV)))


def mismatch(spare: Key, cold: Key) -> str:
    """Why a spare started as `spare` cannot stand in for a cold start as `cold` ("" = it can).
    Names keys, never values (the environment holds secrets)."""
    if spare.python != cold.python:
        return f"another interpreter ({cold.python}, the spare runs {spare.python})"
    if spare.user != cold.user:
        mine = "the daemon's"
        return f"another user ({cold.user or mine}, the spare runs as {spare.user or mine})"
    a, b = dict(spare.env), dict(cold.env)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        return f"the environment changed since the spare started ({shown})"
    return ""


def clean_modules(raw: Any) -> list[str]:
    """The module list as the shim reported it, kept to dotted names (it is imported by name)."""
    if not isinstance(raw, list):
        return []
    out = []
    for name in raw[:MAX_MODULES]:
        if isinstance(name, str) and 0 < len(name) <= 200 and all(p.isidentifier() for p in name.split(".")):
            out.append(name)
    return out


class SpareError(Exception):
    """The spare did not answer as the protocol says (it is stopped; the release starts cold)."""


class Spare:
    """One spare process and the daemon's end of its socket."""

    def __init__(self, proc: AppProcess, sock: socket.socket, key: Key, venv: str) -> None:
        self.proc = proc
        self.sock = sock
        self.key = key
        self.venv = venv
        self.state = "warming"  # -> "warm" -> "used"; or "ended" (stopped by the daemon)
        self.imported = 0
        self.failed = 0
        self.warm_s: float | None = None
        self.warm_at: float | None = None  # wall clock
        self._buf = b""

    async def _line(self, what: str, timeout: float) -> str:
        try:
            line, self._buf = await recv_line(self.sock, self._buf, timeout, MAX_LINE, what)
        except NoLine as e:
            if e.closed:
                raise SpareError(f"it closed its socket ({self.proc.exit_description()}: "
                                 f"{self.proc.last_lines(2)})") from None
            raise SpareError(str(e)) from None
        return line

    async def _send(self, data: bytes) -> None:
        try:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)
        except OSError as e:
            raise SpareError(f"its socket failed ({e.strerror or e})") from None

    async def warm(self, modules: Sequence[str], timeout: float) -> None:
        """Have it import `modules`; raises SpareError."""
        self.sock.setblocking(False)
        t = time.monotonic()
        await self._send(b"preload " + json.dumps(list(modules), separators=(",", ":")).encode() + b"\n")
        verb, _, rest = (await self._line("preload", timeout)).partition(" ")
        parts = rest.split()
        if verb != "warm" or len(parts) != 3:
            raise SpareError(f"unexpected answer to preload: {verb[:40]!r}")
        try:
            self.imported, self.failed = int(parts[0]), int(parts[1])
        except ValueError:
            raise SpareError(f"unexpected answer to preload: {rest[:60]!r}") from None
        self.warm_s = round(time.monotonic() - t, 3)
        self.warm_at = time.time()
        self.state = "warm"

    async def send_fds(self, fds: Sequence[int], timeout: float = 5.0) -> list[int]:
        """Hand `fds` over (SCM_RIGHTS); their numbers in the spare, in the same order."""
        loop = asyncio.get_running_loop()
        message = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", list(fds)).tobytes())]
        deadline = loop.time() + timeout
        while True:  # one byte: sendmsg on a non-blocking socket either sends it or raises
            try:
                self.sock.sendmsg([b"F"], message)
                break
            except BlockingIOError:
                if loop.time() > deadline:
                    raise SpareError("its socket stayed full") from None
                await asyncio.sleep(0.01)
            except OSError as e:
                raise SpareError(f"the descriptors could not be handed over ({e.strerror or e})") from None
        verb, _, rest = (await self._line("the descriptors", timeout)).partition(" ")
        try:
            numbers = [int(n) for n in rest.split()]
        except ValueError:
            numbers = []
        if verb != "fds" or len(numbers) != len(fds):
            raise SpareError(f"it did not take the descriptors ({verb[:40]!r} {rest[:60]!r})")
        return numbers

    async def become(self, argv: Sequence[str], cwd: Path, env: Mapping[str, str], timeout: float = 5.0) -> str:
        """Tell it to run as this release's process; "" once it has, else why it refused."""
        order = {"argv": list(argv), "cwd": str(cwd), "env": dict(env)}
        await self._send(b"become " + json.dumps(order, separators=(",", ":")).encode() + b"\n")
        answer = await self._line("become", timeout)
        if answer == "became":
            self.state = "used"
            return ""
        return answer.removeprefix("refused ").strip()[:300] or answer[:300]

    def close(self) -> None:
        close_socket(self.sock)

    def status(self) -> dict[str, Any]:
        return {"pid": self.proc.pid, "state": self.state, "venv": self.venv, "imported": self.imported,
                "failed": self.failed, "warm_s": self.warm_s,
                "warm_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.warm_at))
                if self.warm_at else None}
