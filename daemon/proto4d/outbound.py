"""Outbound HTTP(S) (the webhook, `health.external_url`) in a short-lived helper process of its own.

    python -I <this file>     one job, a JSON line on stdin; "ready", then one answer, JSON lines on stdout

Why: TLS means `ssl`, OpenSSL's libraries and httpx, about 7 MiB that Python never gives back once
imported, against the resident daemon's 30 MiB target (issue 12). The daemon never imports them
(lean.py refuses them for good); a webhook POST or an external check runs this file in the daemon's
own interpreter instead, which exits when the call is over. Run by path with `-I` (no PYTHON*
variables, no working directory on sys.path), with an empty environment and `/` as its working
directory; the daemon's own sys.path comes with the job, so httpx is found wherever it was
installed, but nothing of proto4d is imported here.

The URL (and the token it may hold) and the body travel on stdin only: never in argv or the
environment, which `ps` shows. The helper prints no traceback (stderr goes nowhere) and answers
only a status, a latency, an error description and, for a redirect, where it pointed (the caller
logs only that URL's scheme and host).

Deadlines: the interpreter's start (imports, the TLS context) is bounded apart (`START_S`); then
the call gets `timeout` as one deadline for the whole of it (connect, send, read: a receiver
trickling its answer cannot hold it longer), kept by the helper and by the daemon, which kills the
helper at that deadline whatever it is doing. Redirects are never followed (`trust_env=False`: no
proxy, netrc or certificate file from any environment). The helper keeps its stdin open to the
daemon and exits at once when it closes: a daemon that dies (even by SIGKILL) leaves no helper
behind, and one that gave up on it (deadline, stop) ends it that way too.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

START_S = 10.0  # the helper's interpreter start and imports, on a loaded small machine; not the call's deadline
EX_ABANDONED = 3  # the helper's exit when the daemon closed its stdin before the answer
MAX_TEXT = 300  # an error description or a redirect's Location, at most
# Tests only: a CA file the helper trusts besides certifi's bundle, for a TLS receiver on loopback.
TEST_CAFILE_ENV = "PROTO4D_TEST_CAFILE"


@dataclass(frozen=True)
class Answer:
    status: int | None  # the HTTP status, None when there was no answer
    ms: float  # the call's latency (the helper's start not included)
    error: str | None = None  # what went wrong, for a log line ("connection refused", "timed out", ...)
    timed_out: bool = False
    location: str | None = None  # a redirect's target as given: log only notices.safe_url of it


# --------------------------------------------------------------------------- the daemon's side


async def request(method: str, url: str, timeout: float, *, body: Any = None, user_agent: str | None = None) -> Answer:
    """Run one request in a helper process; never raises (but CancelledError)."""
    import asyncio  # here, not at the top: the helper itself does not need it

    job = {"method": method, "url": url, "timeout": timeout, "json": body, "user_agent": user_agent,
           "path": _import_path(),
           "cafile": os.environ.get(TEST_CAFILE_ENV) or None}
    t = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", __file__, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, env={}, cwd="/", start_new_session=True)
    except OSError as e:
        return Answer(None, 0.0, f"cannot start {sys.executable} for the request: {e.strerror or e}")
    assert proc.stdin is not None and proc.stdout is not None
    stage, answered = "start", False
    try:
        proc.stdin.write(json.dumps(job).encode() + b"\n")
        async with asyncio.timeout(START_S):
            await proc.stdin.drain()
            first = _parse(await proc.stdout.readline())
        if first.get("ready") is not True:
            answered = True
            return _answer(first, time.monotonic() - t)
        stage, t = "call", time.monotonic()
        async with asyncio.timeout(timeout):
            line = await proc.stdout.readline()
        answered = True
        return _answer(_parse(line), time.monotonic() - t)
    except TimeoutError:
        if stage == "start":
            return Answer(None, (time.monotonic() - t) * 1000,
                          f"the request's helper did not start within {START_S:g} s")
        return Answer(None, (time.monotonic() - t) * 1000, "timed out", timed_out=True)
    except (ConnectionError, OSError) as e:  # the helper died before reading its job
        return Answer(None, (time.monotonic() - t) * 1000, f"the request's helper failed ({e.strerror or e})")
    finally:
        proc.stdin.close()  # a helper still running exits on it
        if proc.returncode is None:
            if not answered:  # the deadline, a stop: killed there and then, whatever it is doing
                _kill(proc.pid)
            try:
                await asyncio.wait_for(proc.wait(), 1)
            except TimeoutError:
                _kill(proc.pid)
                await proc.wait()


def _import_path() -> list[str]:
    """The daemon's sys.path, for the helper to find httpx wherever it was installed; not the working
    directory (`python -m` puts it first), which `-I` keeps out."""
    try:
        here = os.path.realpath(os.getcwd())
    except OSError:  # a working directory removed meanwhile
        here = ""
    return [p for p in sys.path if p and os.path.isabs(p) and os.path.realpath(p) != here]


def _parse(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


def _answer(obj: dict[str, Any], took_s: float) -> Answer:
    if not obj:
        return Answer(None, took_s * 1000, "the request's helper ended without an answer")
    status = obj.get("status")
    ms = obj.get("ms")
    text = obj.get("error")
    where = obj.get("location")
    return Answer(status if isinstance(status, int) else None,
                  float(ms) if isinstance(ms, (int, float)) else took_s * 1000,
                  str(text)[:MAX_TEXT] if text else None, obj.get("timed_out") is True,
                  str(where)[:MAX_TEXT] if isinstance(where, str) else None)


def _kill(pid: int) -> None:
    import contextlib
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- the helper


_said = threading.Lock()


def _say(obj: dict[str, Any], *, last: bool = False) -> None:
    """One JSON line on stdout; the last one ends the process at once (the timer's or the call's, first wins)."""
    if last:
        _said.acquire()
    os.write(1, json.dumps(obj).encode() + b"\n")
    if last:
        os._exit(0)


def _watch_stdin() -> None:
    """The daemon holds our stdin open until it has our answer: EOF means it died or gave up."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except OSError:
        pass
    os._exit(EX_ABANDONED)


def _describe(e: Exception) -> str:
    import httpx

    name = type(e).__name__
    text = str(e).strip()
    if isinstance(e, httpx.ConnectError):
        # httpx says "All connection attempts failed"; the OS's reason is further down the chain.
        cause: BaseException | None = e
        while cause is not None:
            if isinstance(cause, ConnectionRefusedError):
                return "connection refused"
            if isinstance(cause, OSError) and cause.strerror:
                return f"cannot connect ({cause.strerror})"
            cause = cause.__cause__ or cause.__context__
        return "connection refused" if "refused" in text.lower() else f"cannot connect ({text})"
    if isinstance(e, httpx.TimeoutException):
        return "timed out"
    if isinstance(e, httpx.RemoteProtocolError):
        return "connection closed without an answer"
    return f"{name}: {text}" if text else name


def helper() -> None:
    job = json.loads(sys.stdin.buffer.readline())
    sys.path.extend(p for p in job.get("path") or () if p not in sys.path)
    with _errors_answered(0.0):
        import httpx

        verify: Any = True  # certifi's bundle, as httpx does without trust_env
        if job.get("cafile"):
            import ssl

            import certifi
            verify = ssl.create_default_context(cafile=certifi.where())
            verify.load_verify_locations(cafile=job["cafile"])
        headers = {"User-Agent": job["user_agent"]} if job.get("user_agent") else None
        timeout = float(job["timeout"])
        client = httpx.Client(trust_env=False, timeout=timeout, follow_redirects=False, verify=verify,
                              headers=headers)
    threading.Thread(target=_watch_stdin, daemon=True).start()
    _say({"ready": True})
    t = time.monotonic()
    timer = threading.Timer(timeout, lambda: _say({"status": None, "ms": (time.monotonic() - t) * 1000,
                                                   "error": "timed out", "timed_out": True}, last=True))
    timer.daemon = True
    timer.start()
    with _errors_answered(t):
        try:
            r = client.post(job["url"], json=job.get("json")) if job["method"] == "POST" else client.get(job["url"])
        except httpx.TimeoutException:
            _say({"status": None, "ms": (time.monotonic() - t) * 1000, "error": "timed out", "timed_out": True},
                 last=True)
        except httpx.HTTPError as e:
            _say({"status": None, "ms": (time.monotonic() - t) * 1000, "error": _describe(e)[:MAX_TEXT]}, last=True)
        answer: dict[str, Any] = {"status": r.status_code, "ms": (time.monotonic() - t) * 1000}
        if 300 <= r.status_code < 400:
            answer["location"] = r.headers.get("location", "")[:MAX_TEXT]
        _say(answer, last=True)


class _errors_answered:
    """Anything unexpected (a bad URL, a missing httpx) is an answer too, never a traceback."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: object) -> bool:
        if e is not None and isinstance(e, Exception):
            ms = (time.monotonic() - self.t) * 1000 if self.t else 0.0
            _say({"status": None, "ms": ms, "error": f"{type(e).__name__}: {str(e).strip()}"[:MAX_TEXT]}, last=True)
        return False


if __name__ == "__main__":
    os.nice(5)  # a background errand: the serving app comes first on a small machine
    helper()
