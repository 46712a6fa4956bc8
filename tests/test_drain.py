"""The drain shim and its plan: unit rows for drain.plan, then real uvicorn processes.

Real parts only: venvs built with uv (cached under ~/.cache/proto4d-tests/venvs, keyed by the
requirement set, so a re-run is instant), a listening TCP socket owned by the test and passed
down as `--fd N` exactly as the daemon does, real signals, real HTTP clients.

Environment knobs:
  PROTO4D_DRAIN_HANDOFFS=K    handoffs per load test (default 5)
  PROTO4D_DRAIN_CLIENTS=N     keep-alive clients in the load test (default 4; 2 fresh-connection ones too)
  PROTO4D_DRAIN_COMPARE=1     also run the load test on stock uvicorn (no shim) and print its
                              failed-request count: the measurement the shim exists for
  PROTO4D_TEST_CACHE=DIR      where the test venvs are cached
Run with `pytest -s tests/test_drain.py` to see the per-variant counts.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import TEST_CACHE, rows
from proto4d import drain
from proto4d.drain import SHIM_DIR, DrainPlan, plan

SHIM = str(SHIM_DIR)
ACTIVE_RE = re.compile(r"^proto4d-drain: active \(uvicorn (?P<version>[^,]+), (?P<impl>h11|httptools)\)$")
READY = "Uvicorn running on"
HANDOFFS = int(os.environ.get("PROTO4D_DRAIN_HANDOFFS", "5"))
CLIENTS = int(os.environ.get("PROTO4D_DRAIN_CLIENTS", "4"))  # keep-alive clients in the load test
COMPARE = os.environ.get("PROTO4D_DRAIN_COMPARE") == "1"
# A graceful stop: uvicorn 0.24 exits 0; newer uvicorn re-raises the SIGTERM it caught, after the
# same graceful shutdown, so the exit status is -SIGTERM.
CLEAN_EXIT = (0, -signal.SIGTERM)


# --------------------------------------------------------------------------------------------
# drain.plan: unit rows
# --------------------------------------------------------------------------------------------

PY = "{python}"
LAUNCH = (PY, "-m", "proto4d_drain")

# (argv, mode, expected kind, expected argv (None = unchanged), words the description must hold)
PLAN_ROWS = [
    ((PY, "-m", "uvicorn", "main:app", "--fd", "{fd}"), "auto", "shim",
     (*LAUNCH, "main:app", "--fd", "{fd}"), "proto4d_drain:AutoDrainProtocol"),
    ((PY, "-m", "uvicorn", "main:app", "--fd", "{fd}"), "shim", "shim",
     (*LAUNCH, "main:app", "--fd", "{fd}"), "proto4d_drain:AutoDrainProtocol"),
    ((PY, "-m", "uvicorn", "main:app", "--fd", "{fd}"), "sigterm", "sigterm", None, "app.drain is sigterm"),
    ((PY, "-m", "uvicorn", "main:app", "--http", "h11"), "auto", "shim",
     (*LAUNCH, "main:app", "--http", "h11"), "H11DrainProtocol"),
    ((PY, "-m", "uvicorn", "main:app", "--http=httptools"), "auto", "shim",
     (*LAUNCH, "main:app", "--http=httptools"), "HttpToolsDrainProtocol"),
    ((PY, "-m", "uvicorn", "main:app", "--http", "auto", "--port", "{port}"), "auto", "shim",
     (*LAUNCH, "main:app", "--http", "auto", "--port", "{port}"), "AutoDrainProtocol"),
    ((PY, "-u", "-X", "dev", "-m", "uvicorn", "main:app"), "auto", "shim",
     (PY, "-u", "-X", "dev", "-m", "proto4d_drain", "main:app"), "AutoDrainProtocol"),
    ((PY, "-muvicorn", "main:app"), "auto", "shim", (*LAUNCH, "main:app"), "AutoDrainProtocol"),
    (("/srv/venv/bin/uvicorn", "main:app", "--fd", "3"), "auto", "shim",
     ("/srv/venv/bin/python", "-m", "proto4d_drain", "main:app", "--fd", "3"), "AutoDrainProtocol"),
    (("python3.8", "/srv/venv/bin/uvicorn", "main:app", "--http=h11"), "auto", "shim",
     ("python3.8", "-m", "proto4d_drain", "main:app", "--http=h11"), "H11DrainProtocol"),
    (("uv", "run", "uvicorn", "main:app"), "auto", "shim",
     ("uv", "run", "python", "-m", "proto4d_drain", "main:app"), "AutoDrainProtocol"),
    ((PY, "-m", "uvicorn", "main:app", "--http", "proto4d_drain:H11DrainProtocol"), "auto", "shim",
     None, "--http proto4d_drain:H11DrainProtocol"),
    ((PY, "-m", "proto4d_drain", "main:app", "--fd", "{fd}"), "auto", "shim", None, "AutoDrainProtocol"),
    (("uvicorn", "main:app", "--fd", "{fd}"), "auto", "sigterm", None, "bare `uvicorn`"),
    (("uvicorn", "main:app", "--fd", "{fd}"), "shim", "sigterm", None, "app.drain is shim, but"),
    (("gunicorn", "-k", "uvicorn.workers.UvicornWorker", "main:app"), "auto", "sigterm", None, "gunicorn"),
    ((PY, "-m", "gunicorn", "main:app"), "shim", "sigterm", None, "gunicorn"),
    ((PY, "-m", "uvicorn", "main:app", "--http", "mypkg:MyProtocol"), "auto", "sigterm", None,
     "--http mypkg:MyProtocol is not one the shim wraps"),
    ((PY, "-m", "uvicorn", "main:app", "--workers", "4"), "auto", "sigterm", None, "--workers 4"),
    ((PY, "-m", "uvicorn", "main:app", "--workers=1"), "auto", "shim", (*LAUNCH, "main:app", "--workers=1"),
     "AutoDrainProtocol"),
    ((PY, "-m", "uvicorn", "main:app", "--reload"), "shim", "sigterm", None, "--reload"),
    ((PY, "-m", "uvicorn", "main:app", "--http2"), "auto", "sigterm", None, "--http2"),
    (("sh", "-c", "exec python -m uvicorn main:app"), "auto", "sigterm", None, "mentions uvicorn"),
    (("node", "server.js"), "auto", "sigterm", None, "not uvicorn"),
    ((PY, "-m", "http.server", "uvicorn"), "auto", "sigterm", None, "mentions uvicorn"),
    (("env", "A=1", "uvicorn", "main:app"), "auto", "sigterm", None, "cannot tell which Python"),
]


@pytest.mark.parametrize(("argv", "mode", "kind", "new_argv", "words"), PLAN_ROWS,
                         ids=[f"{i}-{' '.join(r[0])[:40]}-{r[1]}" for i, r in enumerate(PLAN_ROWS)])
def test_plan_rows(argv: tuple[str, ...], mode: str, kind: str, new_argv: tuple[str, ...] | None,
                   words: str) -> None:
    p = plan(list(argv), mode, {}, 1.0)
    assert isinstance(p, DrainPlan)
    assert p.kind == kind, p.description
    assert p.argv == (new_argv if new_argv is not None else argv)
    assert words in p.description
    if kind == "shim":
        assert p.description.startswith("proto4d drain shim (")
        assert p.env == {"PYTHONPATH": SHIM, "PROTO4D_DRAIN_GRACE_S": "1"}
    else:
        assert p.description.startswith("SIGTERM only: ")
        assert p.env == {}


def test_plan_environment() -> None:
    argv = [PY, "-m", "uvicorn", "main:app"]
    p = plan(argv, "auto", {"PYTHONPATH": f"/a{os.pathsep}/b", "OTHER": "x"}, 0.25)
    assert p.env == {"PYTHONPATH": os.pathsep.join([SHIM, "/a", "/b"]), "PROTO4D_DRAIN_GRACE_S": "0.25"}
    # Already first: not repeated.
    assert plan(argv, "auto", {"PYTHONPATH": SHIM}, 2).env["PYTHONPATH"] == SHIM
    assert "idle grace 2s" in plan(argv, "auto", {}, 2).description
    # uvicorn's own environment variables count like the options.
    assert plan(argv, "auto", {"UVICORN_HTTP": "h11"}, 1).description.count("H11DrainProtocol") == 1
    assert plan(argv, "auto", {"UVICORN_HTTP": "mypkg:P"}, 1).kind == "sigterm"
    assert plan(argv, "auto", {"UVICORN_WORKERS": "3"}, 1).kind == "sigterm"
    assert plan(argv, "auto", {"UVICORN_RELOAD": "true"}, 1).kind == "sigterm"
    # The command line wins over the environment, as in uvicorn.
    assert plan([*argv, "--http", "h11"], "auto", {"UVICORN_HTTP": "zz"}, 1).kind == "shim"


def test_plan_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="drain mode"):
        plan([PY, "-m", "uvicorn", "a:b"], "always", {}, 1.0)
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="grace"):
            plan([PY, "-m", "uvicorn", "a:b"], "auto", {}, bad)
    assert plan([], "auto", {}, 1.0).kind == "sigterm"


def test_shim_dir_and_source() -> None:
    src = (SHIM_DIR / "proto4d_drain.py").read_text()
    assert drain.SHIM_DIR.is_dir()
    assert sorted(p.name for p in SHIM_DIR.glob("*.py")) == ["proto4d_drain.py"]
    # The shim runs in the app's interpreter, which may be Python 3.8: no newer syntax, no proto4d.
    tree = ast.parse(src, feature_version=(3, 8))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not any(n.split(".")[0] == "proto4d" for n in names), names
        assert not isinstance(node, ast.AnnAssign | ast.Match)
        if isinstance(node, ast.FunctionDef):
            assert node.returns is None and all(a.annotation is None for a in node.args.args), node.name


# --------------------------------------------------------------------------------------------
# venvs with real uvicorn versions
# --------------------------------------------------------------------------------------------

VENV_SPECS: dict[str, tuple[str, ...]] = {
    "uvicorn0.24-h11": ("uvicorn==0.24.0",),
    "uvicorn0.24-httptools": ("uvicorn[standard]==0.24.0",),
    "uvicorn0.54-h11": ("uvicorn==0.54.0",),
    "uvicorn0.54-httptools": ("uvicorn[standard]==0.54.0",),
}
VENV_EXPECT = {  # name -> (uvicorn version, the implementation `--http auto` picks)
    "uvicorn0.24-h11": ("0.24.0", "h11"),
    "uvicorn0.24-httptools": ("0.24.0", "httptools"),
    "uvicorn0.54-h11": ("0.54.0", "h11"),
    "uvicorn0.54-httptools": ("0.54.0", "httptools"),
}
VENV_NAMES = list(VENV_SPECS)


def _uv() -> str:
    for cand in (Path(sys.executable).parent / "uv", shutil.which("uv")):
        if cand and Path(cand).is_file():
            return str(cand)
    pytest.skip("uv is not installed (pip install 'proto4d[test]')")
    raise AssertionError  # unreachable


def _build_venv(reqs: tuple[str, ...]) -> Path:
    """A cached venv holding `reqs`, built in a temp dir and renamed into place."""
    root = TEST_CACHE / "venvs"
    ident = {"requirements": sorted(reqs), "python": sys.version,
             "executable": os.path.realpath(sys.executable)}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    final = root / key
    python = final / "bin" / "python"
    if (final / ".proto4d-ok").is_file() and python.exists():
        return python
    root.mkdir(parents=True, exist_ok=True)
    uv = _uv()
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=root))
    try:
        venv = tmp / "venv"
        for cmd in ([uv, "venv", "-q", "--python", sys.executable, str(venv)],
                    [uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), *reqs]):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
            if done.returncode != 0:
                pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        (venv / ".proto4d-ok").write_text(json.dumps(ident) + "\n")
        if final.exists() and not (final / ".proto4d-ok").is_file():
            shutil.rmtree(final, ignore_errors=True)  # a broken earlier build
        try:
            os.rename(venv, final)
        except OSError:
            if not (final / ".proto4d-ok").is_file():  # lost a race to a build that did not finish
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return python


@pytest.fixture(scope="session")
def venv_python() -> Callable[[str], Path]:
    built: dict[str, Path] = {}
    lock = threading.Lock()

    def get(name: str) -> Path:
        with lock:
            if name not in built:
                built[name] = _build_venv(VENV_SPECS[name])
            return built[name]

    return get


# --------------------------------------------------------------------------------------------
# the app, the listening socket, the processes
# --------------------------------------------------------------------------------------------

APP_SOURCE = textwrap.dedent('''
    import asyncio
    import gc
    import sys
    from urllib.parse import parse_qs


    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        query = parse_qs(scope["query_string"].decode())
        if scope["path"] == "/slow":
            if query.get("mark"):
                sys.stderr.write("app: slow-start\\n")
                sys.stderr.flush()
            await asyncio.sleep(int(query.get("ms", ["100"])[0]) / 1000)
            out = b"slow"
        elif scope["path"] == "/echo" and scope["method"] == "POST":
            out = body
        elif scope["path"] == "/gc":
            out = str(gc.get_freeze_count()).encode()
        else:
            out = b"ok"
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(out)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})
''')


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "app.py").write_text(APP_SOURCE)
    return tmp_path


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """The socket the daemon would own: TCP_NODELAY on it, inherited by the children."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.set_inheritable(True)
    try:
        yield sock
    finally:
        sock.close()


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith("UVICORN_")}
    env.update(extra)
    return env


class AppProcess:
    """One uvicorn child in its own process group, its stderr read line by line."""

    def __init__(self, argv: list[str] | tuple[str, ...], env: dict[str, str], cwd: Path, fd: int,
                 extra_fds: tuple[int, ...] = ()) -> None:
        self.argv = list(argv)
        self.lines: list[str] = []
        self.eof = False
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(self.argv, cwd=cwd, env=_child_env(env), pass_fds=(fd, *extra_fds),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self.cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def wait_line(self, needle: str, timeout: float, start: int = 0) -> int:
        """Index of the first line from `start` containing `needle`; fail on exit or timeout."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i in range(start, len(self.lines)):
                    if needle in self.lines[i]:
                        return i
                if self.eof:
                    raise AssertionError(f"process ended (rc={self.proc.poll()}) before {needle!r}:\n"
                                         + "\n".join(self.lines[-30:]))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {needle!r} within {timeout}s:\n" + "\n".join(self.lines[-30:]))
                self.cond.wait(left)

    def wait_ready(self, timeout: float = 60) -> None:
        self.wait_line(READY, timeout)

    def sigterm(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {timeout}s after SIGTERM:\n" + "\n".join(self.lines[-30:])) \
                from None

    def drain_lines(self) -> list[str]:
        self.reader.join(5)
        with self.cond:
            return [ln for ln in self.lines if ln.startswith("proto4d-drain:")]

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        if self.proc.stderr is not None:
            self.reader.join(5)
            self.proc.stderr.close()


@contextlib.contextmanager
def processes() -> Iterator[list[AppProcess]]:
    started: list[AppProcess] = []
    try:
        yield started
    finally:
        for p in started:
            p.kill()


def _command(python: Path, fd: int, variant: str, grace: float = 1.0,
             extra: tuple[str, ...] = ()) -> tuple[tuple[str, ...], dict[str, str]]:
    """The command the daemon would run: drain.plan over the configured uvicorn command."""
    argv = [str(python), "-m", "uvicorn", "app:app", "--fd", str(fd), "--no-access-log", *extra]
    p = plan(argv, "shim" if variant == "shim" else "sigterm", {}, grace)
    assert p.kind == ("shim" if variant == "shim" else "sigterm"), p.description
    return p.argv, p.env


def _check_drain_line(proc: AppProcess, venv: str, variant: str) -> None:
    lines = proc.drain_lines()
    if variant == "stock":
        assert lines == []
        return
    version, impl = VENV_EXPECT[venv]
    assert len(lines) == 1, lines
    m = ACTIVE_RE.match(lines[0])
    assert m and m.group("version") == version and m.group("impl") == impl, lines[0]
    # Printed before the server says it is running.
    assert proc.lines.index(lines[0]) < next(i for i, ln in enumerate(proc.lines) if READY in ln)


# --------------------------------------------------------------------------------------------
# raw HTTP on one socket (the focused test)
# --------------------------------------------------------------------------------------------

def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode()


def _read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes] | None:
    """One response; None when the server closed (or reset) the connection before any byte."""
    buf = b""
    try:
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except ConnectionResetError:
        pass
    if not buf:
        return None
    head, sep, body = buf.partition(b"\r\n\r\n")
    assert sep, f"truncated response: {buf!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, "connection closed inside a response body"
        body += chunk
    return status, headers, body


def _closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def _says_close(headers: dict[str, str]) -> bool:
    return "close" in [t.strip().lower() for t in headers.get("connection", "").split(",")]


@pytest.mark.e2e
@pytest.mark.parametrize("variant", ["shim", "stock"])
@pytest.mark.parametrize("venv", VENV_NAMES)
def test_shutdown_idle_midparse_inflight(venv_python: Callable[[str], Path], app_dir: Path,
                                         listener: socket.socket, venv: str, variant: str) -> None:
    """One server, four keep-alive connections in the four states, then SIGTERM.

    With the shim: the idle one and the mid-parse one are still served (200 + connection: close),
    the in-flight one's response says connection: close, a silent idle one is closed when the
    grace ends (not at once). Stock uvicorn, the control: the first two are closed at once.
    """
    python = venv_python(venv)
    port = listener.getsockname()[1]
    grace = 0.6
    argv, env = _command(python, listener.fileno(), variant, grace=grace)
    with processes() as procs, contextlib.ExitStack() as stack:
        proc = AppProcess(argv, env, app_dir, listener.fileno())
        procs.append(proc)
        proc.wait_ready()
        conns = [stack.enter_context(_connect(port)) for _ in range(4)]
        idle, partial, silent, inflight = conns
        for c in (idle, partial, silent):  # one full keep-alive exchange on each
            c.sendall(_request("/"))
            resp = _read_response(c)
            assert resp is not None and resp[0] == 200 and not _says_close(resp[1]), resp
        partial.sendall(b"GET /?part=2 HTTP/1.1\r\nHost: te")  # the rest comes after SIGTERM
        inflight.sendall(_request("/slow?ms=700&mark=1"))
        proc.wait_line("app: slow-start", 30)

        proc.sigterm()
        mark = proc.wait_line("Shutting down", 30)
        t_shutdown = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # stock may have closed them
            idle.sendall(_request("/?second=1"))
            partial.sendall(b"st\r\n\r\n")
        got_idle = _read_response(idle)
        got_partial = _read_response(partial)
        assert _closed_by_server(silent)
        t_silent = time.monotonic() - t_shutdown
        got_inflight = _read_response(inflight)
        after_closed = [_closed_by_server(c) for c in (idle, partial, inflight)]
        rc = proc.wait_exit(30)
        proc.wait_line("Finished server process", 5, start=mark)
        _check_drain_line(proc, venv, variant)

    assert rc in CLEAN_EXIT
    assert got_inflight is not None and got_inflight[0] == 200 and got_inflight[2] == b"slow"
    assert after_closed == [True, True, True]  # every connection is closed after its last response
    version, impl = VENV_EXPECT[venv]
    print(f"\n[drain] {venv} {variant}: idle->{_summary(got_idle)} mid-parse->{_summary(got_partial)} "
          f"in-flight->{_summary(got_inflight)} silent idle closed after {t_silent:.2f}s")
    if variant == "shim":
        for got in (got_idle, got_partial):
            assert got is not None, "the shim closed a connection that had a request coming"
            assert got[0] == 200 and got[2] == b"ok" and _says_close(got[1]), got
        assert _says_close(got_inflight[1])
        assert grace * 0.8 <= t_silent < grace + 3, t_silent
    else:
        # The control: stock uvicorn closes idle connections at shutdown, so both requests fail.
        assert got_idle is None and got_partial is None
        assert t_silent < grace * 0.8, t_silent
        # Stock in-flight responses say connection: close only in uvicorn 0.54's httptools protocol.
        assert _says_close(got_inflight[1]) == (version == "0.54.0" and impl == "httptools"), got_inflight


def _summary(resp: tuple[int, dict[str, str], bytes] | None) -> str:
    if resp is None:
        return "closed"
    return f"{resp[0]}{' +close' if _says_close(resp[1]) else ''}"


# --------------------------------------------------------------------------------------------
# handoffs under load
# --------------------------------------------------------------------------------------------

class Load:
    """Keep-alive clients (connections reused) and fresh-connection clients, counting failures."""

    def __init__(self, port: int, keepalive: int = 4, fresh: int = 2, seed: int = 4) -> None:
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(True, seed + i), daemon=True)
                        for i in range(keepalive)]
        self.threads += [threading.Thread(target=self._run, args=(False, seed + 100 + i), daemon=True)
                         for i in range(fresh)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not any(t.is_alive() for t in self.threads), "a load thread did not finish"

    def count(self) -> int:
        with self.lock:
            return self.ok + len(self.failures)

    def wait_requests(self, n: int, timeout: float = 30) -> None:
        """Let the load make n more requests (progress, not a fixed sleep)."""
        target = self.count() + n
        deadline = time.monotonic() + timeout
        while self.count() < target:
            assert time.monotonic() < deadline, f"load stalled at {self.count()} requests"
            time.sleep(0.01)

    def _run(self, keepalive: bool, seed: int) -> None:
        rng = random.Random(seed)
        conn: http.client.HTTPConnection | None = None
        while not self.stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
            r = rng.random()
            body: bytes | None = None
            if r < 0.4:
                method, path = "GET", "/"
            elif r < 0.7:
                method, path = "GET", f"/slow?ms={rng.randint(50, 300)}"
            else:
                method, path, body = "POST", "/echo", rng.randbytes(rng.randint(1, 4096))
            try:
                conn.request(method, path, body=body,
                             headers={"content-type": "application/octet-stream"} if body else {})
                resp = conn.getresponse()
                data = resp.read()
                expected = body if body is not None else (b"slow" if path.startswith("/slow") else b"ok")
                if resp.status != 200 or data != expected:
                    raise AssertionError(f"{method} {path}: {resp.status} {data[:40]!r}")
                with self.lock:
                    self.ok += 1
            except Exception as exc:
                with self.lock:
                    self.failures.append(f"{method} {path}: {exc!r}")
                conn.close()
                conn = None
            if not keepalive and conn is not None:
                conn.close()
                conn = None
            time.sleep(rng.uniform(0, 0.02))  # think time: keep-alive connections sit idle now and then
        if conn is not None:
            conn.close()


compare_only = pytest.mark.skipif(not COMPARE, reason="stock uvicorn comparison: set PROTO4D_DRAIN_COMPARE=1")


@pytest.mark.e2e
@pytest.mark.parametrize("variant", ["shim", pytest.param("stock", marks=compare_only)])
@pytest.mark.parametrize("venv", rows(VENV_NAMES, ["uvicorn0.24-h11", "uvicorn0.54-httptools"]))
def test_handoff_under_load(venv_python: Callable[[str], Path], app_dir: Path, listener: socket.socket,
                            venv: str, variant: str) -> None:
    """K handoffs on one inherited listening socket while clients keep sending; count failures."""
    python = venv_python(venv)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    argv, env = _command(python, fd, variant)
    handoffs = 0
    with processes() as procs:
        old = AppProcess(argv, env, app_dir, fd)
        procs.append(old)
        old.wait_ready()
        with Load(port, keepalive=CLIENTS) as load:
            load.wait_requests(40)
            for _ in range(HANDOFFS):
                new = AppProcess(argv, env, app_dir, fd)
                procs.append(new)
                new.wait_ready()
                old.sigterm()
                assert old.wait_exit(30) in CLEAN_EXIT
                _check_drain_line(old, venv, variant)
                handoffs += 1
                old = new
                load.wait_requests(40)
        old.sigterm()
        assert old.wait_exit(30) in CLEAN_EXIT
        _check_drain_line(old, venv, variant)

    failed = len(load.failures)
    print(f"\n[drain] {venv} {variant}: {failed} failed of {load.ok + failed} requests "
          f"over {handoffs} handoffs ({failed / max(handoffs, 1):.2f} per handoff)"
          + "".join(f"\n    {f}" for f in load.failures[:10]))
    assert handoffs == HANDOFFS
    assert load.ok >= 40 * (HANDOFFS + 1)
    if variant == "shim":
        assert load.failures == []


# --------------------------------------------------------------------------------------------
# promotion in place: a canary on its private socket takes the shared one without restarting
# --------------------------------------------------------------------------------------------

def _private_listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


def _answer(control: socket.socket, timeout: float) -> str:
    control.settimeout(timeout)
    buf = b""
    while b"\n" not in buf:
        chunk = control.recv(4096)
        assert chunk, f"the control socket closed before an answer ({buf!r})"
        buf += chunk
    return buf.split(b"\n", 1)[0].decode()


def _get(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/")
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.e2e
@pytest.mark.parametrize("venv", rows(VENV_NAMES, ["uvicorn0.24-httptools", "uvicorn0.54-h11"]))
def test_promotion_in_place_under_load(venv_python: Callable[[str], Path], app_dir: Path,
                                       listener: socket.socket, venv: str) -> None:
    """A canary serving only its private socket is told `promote`: the same process (one start) then
    accepts on the shared socket, its private one refuses, and the old process drains under load with
    no request failing."""
    python = venv_python(venv)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    argv, env = _command(python, fd, "shim")
    private = _private_listener()
    mine, theirs = socket.socketpair()
    with processes() as procs, private, mine:
        old = AppProcess(argv, env, app_dir, fd)
        procs.append(old)
        old.wait_ready()
        cargv, cenv = _command(python, private.fileno(), "shim")
        cenv = {**cenv, drain.SHARED_ENV: str(fd), drain.CONTROL_ENV: str(theirs.fileno())}
        with Load(port, keepalive=CLIENTS) as load:
            load.wait_requests(40)
            canary = AppProcess(cargv, cenv, app_dir, private.fileno(), extra_fds=(fd, theirs.fileno()))
            procs.append(canary)
            theirs.close()
            canary.wait_ready()
            assert _get(private.getsockname()[1]) == 200  # the canary's checks go to its private port
            load.wait_requests(40)  # meanwhile only the old process serves the shared socket
            mine.sendall(b"promote\n")
            assert _answer(mine, 30) == "promoted"
            canary.wait_line("proto4d-drain: promoted", 10)
            old.sigterm()
            assert old.wait_exit(30) in CLEAN_EXIT
            load.wait_requests(80)  # the promoted process alone serves them
            private_port = private.getsockname()[1]
            private.close()  # the daemon's copy: the shim closed the process's own
            with pytest.raises(OSError):
                _get(private_port)
        mine.sendall(b"promote\n")  # asked again: it says it is done, and changes nothing
        assert _answer(mine, 10) == "promoted"
        assert canary.proc.poll() is None
        canary.sigterm()
        assert canary.wait_exit(30) in CLEAN_EXIT
        lines = canary.drain_lines()
        assert ACTIVE_RE.match(lines[0]) and lines[1].startswith("proto4d-drain: promoted (shared socket fd"), lines
    print(f"\n[promote] {venv}: {len(load.failures)} failed of {load.ok + len(load.failures)} requests")
    assert load.failures == [], load.failures[:10]
    assert load.ok >= 160


@pytest.mark.e2e
def test_promotion_refused_when_uvicorn_cannot_be_wrapped(venv_python: Callable[[str], Path], app_dir: Path,
                                                          listener: socket.socket, tmp_path: Path) -> None:
    """A uvicorn whose Server has no startup() to wrap: the shim says `unavailable` at once (the daemon then
    starts the release again on the shared socket) and still serves its private socket."""
    python = venv_python("uvicorn0.54-h11")
    fd = listener.fileno()
    private = _private_listener()
    patch = tmp_path / "patch"
    patch.mkdir()
    # sitecustomize runs before the shim: it replaces Server.startup with a plain function.
    (patch / "sitecustomize.py").write_text(textwrap.dedent('''
        import uvicorn.server
        _real = uvicorn.server.Server.startup
        def startup(self, sockets=None):
            return _real(self, sockets)
        uvicorn.server.Server.startup = startup
    '''))
    argv, env = _command(python, private.fileno(), "shim")
    mine, theirs = socket.socketpair()
    env = {**env, "PYTHONPATH": f"{env['PYTHONPATH']}{os.pathsep}{patch}", drain.SHARED_ENV: str(fd),
           drain.CONTROL_ENV: str(theirs.fileno())}
    with processes() as procs, private, mine:
        canary = AppProcess(argv, env, app_dir, private.fileno(), extra_fds=(fd, theirs.fileno()))
        procs.append(canary)
        theirs.close()
        canary.wait_ready()
        answer = _answer(mine, 10)
        assert answer.startswith("unavailable ") and "not a coroutine function" in answer, answer
        assert _get(private.getsockname()[1]) == 200
        canary.sigterm()
        assert canary.wait_exit(30) in CLEAN_EXIT


# --------------------------------------------------------------------------------------------
# how the protocol is selected, and the fallback
# --------------------------------------------------------------------------------------------

SELECT_ROWS = [
    # (venv, how to run, extra uvicorn args, expected first drain line or None, expected failure text)
    ("uvicorn0.24-httptools", "plan", ("--http=h11",), "proto4d-drain: active (uvicorn 0.24.0, h11)", None),
    ("uvicorn0.54-httptools", "import-string", ("--http", "proto4d_drain:H11DrainProtocol"),
     "proto4d-drain: active (uvicorn 0.54.0, h11)", None),
    # Why drain.plan runs uvicorn through `-m proto4d_drain`: uvicorn 0.24 refuses an import string.
    ("uvicorn0.24-h11", "import-string", ("--http", "proto4d_drain:AutoDrainProtocol"), None,
     "Invalid value for '--http'"),
]


@pytest.mark.e2e
@pytest.mark.parametrize(("venv", "how", "extra", "line", "error"), SELECT_ROWS,
                         ids=[f"{r[0]}-{r[1]}" for r in SELECT_ROWS])
def test_protocol_selection(venv_python: Callable[[str], Path], app_dir: Path, listener: socket.socket,
                            venv: str, how: str, extra: tuple[str, ...], line: str | None,
                            error: str | None) -> None:
    python = venv_python(venv)
    fd = listener.fileno()
    if how == "plan":
        argv, env = _command(python, fd, "shim", extra=extra)
    else:
        argv = (str(python), "-m", "uvicorn", "app:app", "--fd", str(fd), "--no-access-log", *extra)
        env = {"PYTHONPATH": SHIM}
    with processes() as procs:
        proc = AppProcess(argv, env, app_dir, fd)
        procs.append(proc)
        if error is not None:
            assert proc.wait_exit(30) == 2
            proc.wait_line(error, 5)
            return
        proc.wait_ready()
        with _connect(listener.getsockname()[1]) as c:
            c.sendall(_request("/"))
            resp = _read_response(c)
        assert resp is not None and resp[0] == 200
        proc.sigterm()
        assert proc.wait_exit(30) in CLEAN_EXIT
        assert proc.drain_lines() == [line]


FAKE_UVICORN = {
    "uvicorn/__init__.py": '__version__ = "9.9.9"\n',
    "uvicorn/protocols/__init__.py": "",
    "uvicorn/protocols/http/__init__.py": "",
    # Protocol classes from some future uvicorn that has no shutdown() to override.
    "uvicorn/protocols/http/h11_impl.py": textwrap.dedent("""
        class H11Protocol:
            def __init__(self, config, server_state, app_state, _loop=None):
                self.cycle = None
                self.transport = None
                self.loop = _loop

        class RequestResponseCycle:
            pass
    """),
    "uvicorn/protocols/http/httptools_impl.py": textwrap.dedent("""
        class HttpToolsProtocol:
            def __init__(self, config, server_state, app_state, _loop=None):
                pass

        class RequestResponseCycle:
            pass
    """),
}

FALLBACK_PROBE = textwrap.dedent("""
    import importlib.util
    import proto4d_drain
    from uvicorn.protocols.http import h11_impl
    auto = "httptools" if importlib.util.find_spec("httptools") else "h11"
    if auto == "h11":
        assert proto4d_drain.AutoDrainProtocol is h11_impl.H11Protocol
    else:
        from uvicorn.protocols.http import httptools_impl
        assert proto4d_drain.AutoDrainProtocol is httptools_impl.HttpToolsProtocol
    assert proto4d_drain.H11DrainProtocol is h11_impl.H11Protocol
    print("probe ok")
""")


def test_fallback_to_stock(tmp_path: Path) -> None:
    for rel, text in FAKE_UVICORN.items():
        path = tmp_path / "fake" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    env = _child_env({"PYTHONPATH": os.pathsep.join([SHIM, str(tmp_path / "fake")])})
    done = subprocess.run([sys.executable, "-c", FALLBACK_PROBE], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "probe ok"
    drain_lines = [ln for ln in done.stderr.splitlines() if ln.startswith("proto4d-drain:")]
    assert len(drain_lines) == 1, done.stderr  # once per process, however many classes are asked for
    assert re.fullmatch(r"proto4d-drain: fallback to stock uvicorn shutdown \(\w+ has no shutdown\(\)\)",
                        drain_lines[0]), drain_lines


def test_grace_from_environment(tmp_path: Path) -> None:
    """PROTO4D_DRAIN_GRACE_S is read when the grace starts; a bad value means the default."""
    probe = "import proto4d_drain as m; print(m._grace_s())"
    for value, expected in (("0.25", "0.25"), ("", "1.0"), ("soon", "1.0"), ("-3", "1.0"), ("nan", "1.0")):
        env = _child_env({"PYTHONPATH": SHIM, "PROTO4D_DRAIN_GRACE_S": value})
        done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == expected, (value, done.stdout)


NODELAY_PROBE = textwrap.dedent("""
    import asyncio
    import socket
    import sys

    from uvicorn.config import Config
    from uvicorn.server import ServerState


    async def app(scope, receive, send):
        pass


    async def accepted_nodelay(http):
        config = Config(app=app, http=http, lifespan="off")
        config.load()
        listener = socket.socket()  # no TCP_NODELAY here: the shim must set it per connection
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        # What uvicorn does with --fd: the TCP socket is taken for a Unix one, so asyncio skips TCP_NODELAY.
        sock = socket.fromfd(listener.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
        made = []
        loop = asyncio.get_running_loop()

        def factory():
            proto = config.http_protocol_class(config=config, server_state=ServerState(), app_state={})
            made.append(proto)
            return proto

        server = await loop.create_server(factory, sock=sock)
        _, writer = await asyncio.open_connection(*listener.getsockname())
        for _ in range(500):
            if made and made[0].transport is not None:
                break
            await asyncio.sleep(0.01)
        value = made[0].transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        writer.close()
        server.close()
        listener.close()
        return value


    def run(coro, use_uvloop):
        if use_uvloop:
            import uvloop
            loop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(coro)
        finally:
            loop.close()


    import proto4d_drain
    loops = [False]
    try:
        import uvloop  # noqa: F401
        loops.append(True)
    except ImportError:
        pass
    for use_uvloop in loops:
        shim = run(accepted_nodelay(proto4d_drain.AutoDrainProtocol), use_uvloop)
        stock = run(accepted_nodelay("auto"), use_uvloop)
        print("uvloop" if use_uvloop else "asyncio", int(bool(shim)), int(bool(stock)))
""")


@pytest.mark.parametrize("venv", VENV_NAMES)
def test_tcp_nodelay_on_accepted_connections(venv_python: Callable[[str], Path], tmp_path: Path,
                                             venv: str) -> None:
    """The shim sets TCP_NODELAY on each connection uvicorn accepts from a `--fd` socket; stock does not."""
    python = venv_python(venv)
    done = subprocess.run([str(python), "-c", NODELAY_PROBE], env=_child_env({"PYTHONPATH": SHIM}),
                          cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    rows = done.stdout.split("\n")
    expected = ["asyncio 1 0", "uvloop 1 0"] if VENV_EXPECT[venv][1] == "httptools" else ["asyncio 1 0"]
    assert [r for r in rows if r] == expected, done.stdout + done.stderr


@pytest.mark.parametrize("variant,env,frozen", [("shim", {}, True), ("shim", {"PROTO4D_GC_FREEZE": "0"}, False),
                                                ("stock", {}, False)])
def test_the_startup_heap_is_frozen_unless_turned_off(venv_python: Callable[[str], Path], app_dir: Path,
                                                      listener: socket.socket, variant: str, env: dict[str, str],
                                                      frozen: bool) -> None:
    """Through the shim, what the app built at start (its imports, its lifespan's objects) is moved out of
    the collector's reach once the server is up: a full collection no longer walks it while a request
    waits (the sample app's heap, 22,000 objects: 8 ms a collection, 0.001 ms once frozen)."""
    python = venv_python("uvicorn0.54-httptools")  # built for the default suite's rows already
    argv, plan_env = _command(python, listener.fileno(), variant)
    with processes() as started:
        proc = AppProcess(argv, {**plan_env, **env}, app_dir, listener.fileno())
        started.append(proc)
        proc.wait_ready()
        conn = http.client.HTTPConnection("127.0.0.1", listener.getsockname()[1], timeout=10)
        conn.request("GET", "/gc")
        count = int(conn.getresponse().read())
        conn.close()
    assert (count > 1000) if frozen else count == 0, count
