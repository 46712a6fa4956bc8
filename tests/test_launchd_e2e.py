"""The daemon started the way launchd starts it, end to end.

launchd gives a job a cleared environment: its default PATH (/usr/bin:/bin:/usr/sbin:/sbin)
and the plist's EnvironmentVariables, nothing of the shell that installed it. Here the plist
is rendered by install-service for this config and this user, and its ProgramArguments,
WorkingDirectory, EnvironmentVariables and log paths are used exactly as launchd would; the
daemon must fetch, build the venv with uv (found through the plist's PATH only), serve the
sample app, log each event once, and after an interpreter upgrade left its venv dangling,
rebuild it and serve again.
"""

from __future__ import annotations

import os
import plistlib
import pwd
import re
import signal
import subprocess
from pathlib import Path

import pytest

from harness import Daemon
from proto4d import config, releases, service
from proto4d.paths import Paths

pytestmark = pytest.mark.e2e

LAUNCHD_DEFAULT_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
# How this lab reaches the package index (its CA bundle, pip's find-links): on a Mac these live in
# the operator's ~/.config/uv/uv.toml or pip.conf, which the job reads through HOME. Nothing else of
# the test's environment reaches the daemon.
INDEX_ENV = re.compile(r"^(UV_.*|PIP_.*|SSL_CERT_(FILE|DIR)|REQUESTS_CA_BUNDLE|CURL_CA_BUNDLE|(HTTPS?|NO)_PROXY)$",
                       re.IGNORECASE)


def launch(d: Daemon, plist: dict) -> None:
    env = {k: v for k, v in os.environ.items() if INDEX_ENV.match(k)}
    env.update({"PATH": LAUNCHD_DEFAULT_PATH, **plist["EnvironmentVariables"]})
    if os.geteuid() == 0:  # the lab runs as root; on the Mac, UserName makes it the operator
        env["PROTO4D_ALLOW_ROOT"] = "1"
    out = open(plist["StandardOutPath"], "ab")  # noqa: SIM115 - handed to the child, closed below
    err = open(plist["StandardErrorPath"], "ab")  # noqa: SIM115
    try:
        d.proc = subprocess.Popen(plist["ProgramArguments"], env=env, cwd=plist["WorkingDirectory"], stdout=out,
                                  stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        out.close()
        err.close()


def test_started_as_launchd_starts_it(make_daemon, tmp_path: Path):
    d: Daemon = make_daemon()
    cfg = config.load(d.config_path)
    me = service.account(pwd.getpwuid(os.geteuid()).pw_name)
    plist = plistlib.loads(service.render_launchd(cfg, service.exe_argv(), run_as=me))
    assert plist["UserName"] == me.user
    (d.root / "logs").mkdir(parents=True, exist_ok=True)  # install-service makes it; launchd opens files there

    launch(d, plist)
    d.wait_healthy(timeout=60)
    assert d.get("/version")["status"] == 200
    events = d.log_events()
    progress = " ".join(str(e.get("text", "")) for e in events if e.get("event") == "first_release.progress")
    assert "building with uv" in progress, progress  # uv found through the plist's PATH alone
    # each event is written once: to the rotated proto4d.log, not also to launchd's unrotated file
    assert any(e.get("event") == "daemon.starting" for e in events)
    err = Path(plist["StandardErrorPath"]).read_text()
    assert "daemon.starting" not in err and "app.ready" not in err, err

    # SIGTERM (launchctl bootout/kill) drains and exits 0: KeepAlive{SuccessfulExit=false} leaves it stopped
    assert d.stop() == 0

    # `brew upgrade` removed the interpreter the venv was built from: the next start rebuilds it
    paths = Paths(d.root)
    rel = releases.read_release(paths, paths.current_release() or "")
    assert rel is not None
    py = releases.python_for(paths, rel)
    py.unlink()
    py.symlink_to(tmp_path / "Cellar" / "python@3.12" / "3.12.7" / "bin" / "python3.12")
    launch(d, plist)
    d.wait_healthy(timeout=60)
    assert d.get("/version")["status"] == 200
    repaired = [e for e in d.log_events() if e.get("event") == "venv.repair"]
    assert repaired and "cannot run" in repaired[0]["text"], repaired
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(60) == 0
