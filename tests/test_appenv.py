"""appenv.app_environment: the app gets an allowlist of the daemon's environment, never its plumbing."""

from __future__ import annotations

from pathlib import Path

from proto4d.appenv import app_environment

DAEMON_ENV = {
    "PATH": "/usr/bin:/bin", "HOME": "/Users/srv", "LANG": "ko_KR.UTF-8", "LC_ALL": "ko_KR.UTF-8",
    "TZ": "Asia/Seoul", "TMPDIR": "/var/folders/x", "USER": "srv", "LOGNAME": "srv",
    # none of these may reach the app
    "SSH_AUTH_SOCK": "/private/tmp/com.apple.launchd.x/Listeners", "NOTIFY_SOCKET": "/run/systemd/notify",
    "WATCHDOG_USEC": "30000000", "LISTEN_FDS": "1", "PROTO4D_CONFIG": "/etc/proto4d.yaml",
    "PROTO4D_ALLOW_ROOT": "1", "AWS_SECRET_ACCESS_KEY": "abc", "GITHUB_TOKEN": "ghp_x", "PYTHONPATH": "/daemon/site",
    "PYTHONHOME": "/opt/py", "VIRTUAL_ENV": "/daemon/venv", "__PYVENV_LAUNCHER__": "/x", "UVICORN_WORKERS": "4",
}


def test_only_the_allowlist_the_venv_and_app_env() -> None:
    env = app_environment(DAEMON_ENV, venv=Path("/r/venvs/abc"), release="proto4_1",
                          extra={"OPENAI_BASE_URL": "http://x", "PROTO4D_FEATURE": "on"})
    assert env == {
        "PATH": "/r/venvs/abc/bin:/usr/bin:/bin", "HOME": "/Users/srv", "LANG": "ko_KR.UTF-8",
        "LC_ALL": "ko_KR.UTF-8", "TZ": "Asia/Seoul", "TMPDIR": "/var/folders/x", "USER": "srv", "LOGNAME": "srv",
        "VIRTUAL_ENV": "/r/venvs/abc", "PYTHONUNBUFFERED": "1", "PROTO4D_RELEASE": "proto4_1",
        # app.env is the operator's explicit choice, so it may name anything
        "OPENAI_BASE_URL": "http://x", "PROTO4D_FEATURE": "on",
    }


def test_a_daemon_without_path_gives_the_app_a_usable_one() -> None:
    env = app_environment({}, venv=Path("/v"), release="r", extra={})
    assert env["PATH"] == "/v/bin:/usr/local/bin:/usr/bin:/bin"
    assert "HOME" not in env
