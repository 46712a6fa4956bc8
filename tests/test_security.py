"""Security: no shell, no leaked secret, nothing world-writable, and only trusted request files.

(a) No shell string is ever built from config or request content: a static check of every
    module of the package (ast), plus request and reason text full of shell syntax that must
    reach no shell at run time.
(b) Secrets (the webhook URL's token, password and query; the shared `.env` values) never
    appear in the daemon's logs, its state files, `status --json` or its stderr, even when the
    app prints its `.env` at start and crashes with it in its last lines.
(c) What the daemon creates is not world-writable, even under a umask of 000.
(d) The request-file trust rules (owner, mode, symlink, root directory mode) are the
    `TRUST_CASES` of tests/test_bad_input_e2e.py, run there against a real daemon.
"""

from __future__ import annotations

import ast
import contextlib
import http.server
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from harness import SAMPLE, wait_for

PACKAGE = Path(__file__).resolve().parents[1] / "daemon" / "proto4d"

# --------------------------------------------------------------------------- (a) no shell

SHELL_CALLS = {
    ("os", "system"), ("os", "popen"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"),
    ("asyncio", "create_subprocess_shell"), ("pty", "spawn"),
}
SHELL_METHODS = {"create_subprocess_shell", "subprocess_shell"}  # asyncio.create_..., loop.subprocess_shell


def shell_uses(source: str, filename: str = "<src>") -> list[str]:
    """Every place in `source` that runs a shell (or could): a description per finding."""
    found = []
    tree = ast.parse(source, filename)
    aliases: dict[str, tuple[str, str]] = {}  # `from os import system as s` -> s: (os, system)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = (node.module, a.name)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call):
            func = node.func
            name: tuple[str, str] | None = None
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                name = (func.value.id, func.attr)
            elif isinstance(func, ast.Name) and func.id in aliases:
                name = aliases[func.id]
            if name in SHELL_CALLS:
                found.append(f"{where}: {name[0]}.{name[1]}()")
            if isinstance(func, ast.Attribute) and func.attr in SHELL_METHODS:
                found.append(f"{where}: .{func.attr}()")
            for kw in node.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append(f"{where}: shell={ast.unparse(kw.value)}")
                if kw.arg is None and isinstance(kw.value, ast.Dict) and any(  # **{"shell": True}
                        isinstance(k, ast.Constant) and k.value == "shell" for k in kw.value.keys):
                    found.append(f"{where}: **{{'shell': ...}}")
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr == "USE_SHELL":  # GitPython's global switch
                    found.append(f"{where}: .USE_SHELL = ...")
    return found


def package_files() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 20, files  # the whole package, shim and sample included
    return files


def test_no_module_of_the_package_runs_a_shell() -> None:
    findings = []
    for path in package_files():
        findings += shell_uses(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    assert findings == [], "\n".join(findings)


@pytest.mark.parametrize("snippet", [
    "import subprocess\nsubprocess.run(cmd, shell=True)",
    "import subprocess\nsubprocess.Popen(cmd, shell=flag)",
    "import subprocess\nsubprocess.check_output(f'git fetch {url}', shell=1)",
    "import os\nos.system('git pull')",
    "import os\nos.popen(cmd).read()",
    "from os import system\nsystem(cmd)",
    "from os import system as s\ns(cmd)",
    "import asyncio\nasync def f():\n    await asyncio.create_subprocess_shell(cmd)",
    "async def f(loop):\n    await loop.subprocess_shell(proto, cmd)",
    "import subprocess\nsubprocess.getoutput(cmd)",
    "import git\ngit.Git.USE_SHELL = True",
    "import subprocess\nsubprocess.run(cmd, **{'shell': True})",
])
def test_the_static_check_finds_a_shell(snippet: str) -> None:
    assert shell_uses(snippet), snippet


def test_the_static_check_accepts_argv_lists() -> None:
    assert shell_uses("import subprocess\nsubprocess.run(['git', 'fetch', url], shell=False)\n"
                      "import asyncio\nasyncio.create_subprocess_exec(*argv)\n") == []


def test_every_child_process_is_started_from_an_argv_list() -> None:
    """The calls that start processes take a list (or *argv), never one string to split."""
    starters = {"Popen", "run", "check_output", "check_call", "call", "create_subprocess_exec"}
    findings = []
    for path in package_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in starters and node.args):
                first = node.args[0]
                if isinstance(first, ast.JoinedStr | ast.BinOp) or (
                        isinstance(first, ast.Constant) and isinstance(first.value, str)):
                    findings.append(f"{path.name}:{node.lineno}: {ast.unparse(node)[:100]}")
    assert findings == [], "\n".join(findings)


# --------------------------------------------------------------------------- (b) secrets

ENV_SECRET = "zq-env-secret-7f3a9c1e"
TOKEN = "tok-9d8e7f6a5b4c"
QUERY_SECRET = "qk-1a2b3c4d5e6f"
PASSWORD = "pw-5e6f7a8b9c"
SECRETS = (ENV_SECRET, TOKEN, QUERY_SECRET, PASSWORD)


class Hook:
    """A local webhook receiver that records every POST (and fails one event on purpose)."""

    def __init__(self, fail_event: str = "started") -> None:
        self.posts: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    data = json.loads(body)
                except ValueError:
                    data = {"raw": body.decode(errors="replace")}
                with hook.lock:
                    hook.posts.append({"path": self.path, "body": data, "auth": self.headers.get("Authorization")})
                status = 500 if data.get("event") == fail_event else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self) -> list[str]:
        with self.lock:
            return [p["body"].get("event") for p in self.posts]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook():
    h = Hook()
    yield h
    h.close()


def leaky_main() -> str:
    """The sample app, printing its `.env` at start the way apps dump their settings."""
    return ('print("startup settings:", open(".env").read().strip(), flush=True)\n'
            + (SAMPLE / "main.py").read_text())


def daemon_written_files(root: Path) -> list[Path]:
    """What the daemon writes that an operator or a monitoring tool reads."""
    out = [p for p in (root / "logs").rglob("*") if p.is_file()]
    out += [p for p in (root / "state").rglob("*") if p.is_file() and "repo.git" not in p.parts]
    out += list((root / "releases").glob("*/release.json"))
    out += [p for p in (root / "notice.json",) if p.exists()]
    return out


@pytest.mark.long
@pytest.mark.e2e
def test_secrets_never_appear_in_logs_or_status(make_daemon, origin, hook, tmp_path):
    url = f"http://hookuser:{PASSWORD}@127.0.0.1:{hook.port}/hook/{TOKEN}?key={QUERY_SECRET}"
    d = make_daemon(notify={"webhook_url": url})
    (d.root / "shared" / ".env").write_text(f"TUTOR_SECRET={ENV_SECRET}\nDEBUG=1\n")
    d.start()
    # v2 serves and prints its .env at every start (its canary, which is then promoted in place).
    sha2 = origin.commit("2", files={"main.py": leaky_main()})
    pwned = [tmp_path / f"pwned-{i}" for i in range(4)]
    reason = (f"$(touch {pwned[0]}) `touch {pwned[1]}`; touch {pwned[2]} | touch {pwned[3]} && echo "
              f"'\"{ENV_SECRET[:3]}")
    r = d.update("--force", "--wait", "--reason", reason)
    assert r.returncode == 0, r.stdout + r.stderr
    assert d.status()["app"]["commit"] == sha2
    # v3 prints its .env and crashes at start: its last lines go into the abort message.
    origin.commit("3", mode="crash_at_start")
    r = d.update("--force", "--wait")
    assert r.returncode == 1 and "ABORTED" in r.stdout, r.stdout
    assert "startup settings: TUTOR_SECRET=***" in r.stdout, r.stdout  # the line is there, the value is not

    # The webhook heard the story, at the URL with its token, and failed once on purpose.
    wait_for(lambda: {"requested", "started", "done", "aborted"} <= set(hook.events()), 30, "the webhook events")
    events = hook.events()
    assert events.index("requested") < events.index("started") < events.index("done"), events
    assert all(p["path"] == f"/hook/{TOKEN}?key={QUERY_SECRET}" for p in hook.posts), hook.posts
    assert all(p["auth"] and p["auth"].startswith("Basic ") for p in hook.posts)
    assert all(p["body"].get("reason") == reason for p in hook.posts if p["body"]["id"] == hook.posts[0]["body"]["id"])
    # logged once the helper that made the POST has answered, a moment after the hook saw it
    failed = wait_for(lambda: [e for e in d.log_events() if e.get("event") == "webhook.failed"], 30,
                      "the failed delivery logged")
    assert failed[0]["url"] == f"http://127.0.0.1:{hook.port}/...", failed

    # The shell syntax in the reason reached no shell.
    assert [p for p in pwned if p.exists()] == []

    outputs = {"status --json": d.cli("status", "--json").stdout, "status": d.cli("status").stdout,
               "releases --json": d.cli("releases", "--json").stdout, "activity": d.cli("activity").stdout,
               "daemon stderr": d.log_path.read_text(errors="replace")}
    assert json.loads(outputs["status --json"])["app"]["commit"] == sha2
    files = daemon_written_files(d.root)
    names = {p.relative_to(d.root).as_posix() for p in files}
    assert {"logs/proto4d.log", "logs/app.log", "state/status.json", "state/journal.json"} <= names, names
    assert [n for n in names if n.startswith("logs/update_")], names
    assert [n for n in names if n.startswith("state/answers/")], names
    app_log = (d.root / "logs" / "app.log").read_text()
    # v2 once (its canary, promoted in place: one start), v3 once (its canary)
    assert app_log.count("startup settings: TUTOR_SECRET=***") >= 2, app_log[-2000:]
    leaks = []
    for secret in SECRETS:
        for p in files:
            if secret.encode() in p.read_bytes():
                leaks.append(f"{secret} in {p.relative_to(d.root)}")
        leaks += [f"{secret} in `{k}`" for k, text in outputs.items() if secret in text]
        leaks += [f"{secret} in a webhook body" for p in hook.posts if secret in json.dumps(p["body"])
                  and secret == ENV_SECRET]
    assert leaks == [], "\n".join(leaks)


# --------------------------------------------------------------------------- (c) modes


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def world_writable(root: Path, skip: set[Path]) -> list[str]:
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p in skip:
                continue
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                continue  # a symlink's own mode means nothing
            if st.st_mode & stat.S_IWOTH and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
                bad.append(f"{stat.filemode(st.st_mode)} {p.relative_to(root)}")
    return bad


@pytest.mark.e2e
def test_nothing_the_daemon_creates_is_world_writable_even_under_umask_000(make_daemon, origin):
    d = make_daemon(update={"watch_s": 0.5})
    d.seed_venv = False  # the daemon creates venvs/ and builds the venv itself, under umask 000
    d.write_config()
    made_by_the_test = {d.root / "shared" / ".env"}
    with umask(0):  # the daemon inherits it: whatever it creates without an explicit mode would be 0666/0777
        d.start(wait_healthy=False)
    d.wait_healthy()
    origin.commit("2")
    r = d.update("--force", "--wait")
    assert r.returncode == 0, r.stdout
    d.cli("rollback", "--wait")
    wait_for(lambda: d.status()["update"]["state"] == "idle", 30, "the rollback's end")
    (d.root / "update.request").write_text("ref: [bad\n")  # a rejected request leaves files too
    wait_for(lambda: not (d.root / "update.request").exists(), 10, "the rejection")
    created = [p for p in d.root.rglob("*") if p not in made_by_the_test]
    kinds = {p.relative_to(d.root).parts[0] for p in created}
    assert {"releases", "venvs", "state", "logs", "current", "shared"} <= kinds, kinds
    assert (d.root / "shared" / "data").is_dir()  # created by the daemon (app.shared)
    assert world_writable(d.root, made_by_the_test) == []
    # The app inherits a umask that keeps its own files private to others as well.
    assert d.stop() == 0


# --------------------------------------------------------------------------- (d) trusted request files


def test_the_request_file_trust_rules_are_exercised_end_to_end() -> None:
    """Owner, mode, symlink and the root directory's mode: the cases run against a real daemon in
    tests/test_bad_input_e2e.py (test_untrusted_request_files_are_rejected_and_never_read)."""
    from test_bad_input_e2e import TRUST_CASES

    by_rule = {c.id: c.needle for c in TRUST_CASES}
    assert "owned by uid" in by_rule["not-owned-by-the-daemon-user"]
    assert "world-writable" in by_rule["world-writable-file"]
    assert "symlink" in by_rule["symlink-to-etc-hostname"] and "symlink" in by_rule["symlink-to-a-good-request"]
    assert "writable by group or others" in by_rule["root-writable-by-others"]
    assert "writable by group or others" in by_rule["root-writable-by-group"]
    assert "not a regular file" in by_rule["fifo"] and "not a regular file" in by_rule["directory"]
