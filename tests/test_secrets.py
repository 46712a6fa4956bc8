"""Secrets never written: URL credentials (registered or not), nested values, rendered tracebacks,
numeric secrets under secret-looking keys, and the mirror's git config.

The whole daemon is covered end to end by tests/test_security.py (b); these are the pieces.
"""

from __future__ import annotations

import base64
import http.server
import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from proto4d import log
from proto4d.releases import Mirror, ReleaseError


@pytest.fixture(autouse=True)
def _fresh_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log, "_secrets", ())


@pytest.mark.parametrize(("text", "shown"), [
    ("cannot fetch https://x-access-token:ghp_abc123@github.com/o/r.git: 403",
     "cannot fetch https://***@github.com/o/r.git: 403"),
    ("git@github.com:o/r.git", "git@github.com:o/r.git"),  # scp-like: no credentials in it
    ("ssh://git@host/r.git", "ssh://***@host/r.git"),
    ("two: http://a:b@h1/ and https://tok@h2/x", "two: http://***@h1/ and https://***@h2/x"),
    ("mail me at kim@example.org", "mail me at kim@example.org"),
    ("https://host/path?next=a@b", "https://host/path?next=a@b"),
])
def test_url_credentials_are_masked_without_registration(text: str, shown: str) -> None:
    assert log.scrub(text) == shown


def test_scrub_obj_reaches_nested_values_and_keys() -> None:
    log.redact("hunter2-secret")
    doc = {"a": {"b": ["x hunter2-secret y", ("https://u:p@h/",)]}, "hunter2-secret": 1, "n": 5}
    assert log.scrub_obj(doc) == {"a": {"b": ["x *** y", ("https://***@h/",)]}, "***": 1, "n": 5}


def test_redact_url_registers_user_and_password() -> None:
    log.redact_url("https://x-access-token:ghp_0123456789@github.com/o/r.git")
    assert log.scrub("token ghp_0123456789 alone") == "token *** alone"
    log.redact_url("https://ghp_onlyuser99@github.com/o/r.git")
    assert log.scrub("ghp_onlyuser99") == "***"


def test_env_file_numeric_secrets_are_masked_under_secret_keys(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("PORT=8000\nWORKERS=4\nAPI_PIN=73519024\nSTRIPE_KEY=sk_live_abc\n"
                   "DATABASE_URL=postgres://app:dbpass99@db/app\nDEBUG=true\nTIMEOUT_S=123456\n")
    log.redact_env_file(env)
    out = log.scrub("port 8000, 4 workers, pin 73519024, key sk_live_abc, dbpass99, debug true, timeout 123456")
    assert out == "port 8000, 4 workers, pin ***, key ***, ***, debug true, timeout 123456"


def test_a_traceback_in_the_log_is_scrubbed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logfile = tmp_path / "proto4d.log"
    log.setup(logfile, stderr=True)
    log.redact("registered-secret-123")
    try:
        try:
            raise RuntimeError("fetch https://u:tok-in-traceback@h/r.git failed; registered-secret-123")
        except RuntimeError:
            log.get().exception("fetch.failed",
                                nested={"url": "https://u:tok-nested@h/", "list": ["registered-secret-123"]})
    finally:
        for h in list(logging.getLogger().handlers):
            h.flush()
        log.setup(None, stderr=False)
    text = logfile.read_text() + capsys.readouterr().err
    for leaked in ("tok-in-traceback", "tok-nested", "registered-secret-123"):
        assert leaked not in text, text
    row = json.loads(logfile.read_text().splitlines()[-1])
    assert "RuntimeError" in row["exception"] and "https://***@h/r.git" in row["exception"]


class _AuthServer:
    """A git 'smart HTTP' endpoint that only asks for credentials and records what it gets."""

    def __init__(self) -> None:
        self.auth: list[str] = []
        owner = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                got = self.headers.get("Authorization")
                if got:
                    owner.auth.append(got)
                    self.send_response(403)
                else:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="r"')
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_mirror_uses_the_token_but_never_writes_it(tmp_path: Path) -> None:
    server = _AuthServer()
    try:
        url = f"http://deploy:tok-mirror-42@127.0.0.1:{server.port}/o/r.git"
        mirror = Mirror(tmp_path / "repo.git", url)
        with pytest.raises(ReleaseError) as err:
            mirror.fetch(timeout=20)
    finally:
        server.close()
    # git sent the credentials (so they reached it) ...
    assert f"Basic {base64.b64encode(b'deploy:tok-mirror-42').decode()}" in server.auth
    # ... yet no file of the mirror and no message holds them.
    assert "tok-mirror-42" not in str(err.value)
    for f in (tmp_path / "repo.git").rglob("*"):
        if f.is_file():
            assert b"tok-mirror-42" not in f.read_bytes(), f
    assert f"http://***@127.0.0.1:{server.port}/o/r.git" in (tmp_path / "repo.git" / "config").read_text()


def test_check_config_prints_no_credentials(tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg = tmp_path / "proto4d.yaml"
    cfg.write_text(f"root: {tmp_path / 'state'}\npython: {sys.executable}\n"
                   "app:\n  repo: https://deploy:tok-in-config-77@github.com/o/r.git\n"
                   "notify:\n  webhook_url: https://hooks.example.org/services/T0/hook-secret-88\n")
    for extra in ((), ("--json",)):
        r = subprocess.run([sys.executable, "-m", "proto4d", "check-config", "--config", str(cfg), *extra],
                           capture_output=True, text=True, timeout=30, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "tok-in-config-77" not in r.stdout and "hook-secret-88" not in r.stdout, r.stdout
        assert "https://***@github.com/o/r.git" in r.stdout and "https://hooks.example.org/..." in r.stdout


def test_an_exception_passed_as_exc_info_keeps_its_traceback_scrubbed(tmp_path: Path) -> None:
    logfile = tmp_path / "proto4d.log"
    log.setup(logfile, stderr=False)
    try:
        try:
            raise ValueError("push to https://u:tok-exc-info@h/r.git refused")
        except ValueError as e:
            err = e
        log.get().error("push.failed", exc_info=err)
    finally:
        for h in logging.getLogger().handlers:
            h.flush()
        log.setup(None, stderr=False)
    row = json.loads(logfile.read_text().splitlines()[-1])
    assert "Traceback" in row["exception"] and "https://***@h/r.git" in row["exception"], row
    assert "tok-exc-info" not in logfile.read_text()
