"""The app's environment: an allowlist, not the daemon's environment minus a few names. Pure.

The daemon's environment holds what the app has no business with: launchd gives agents
`SSH_AUTH_SOCK` (the operator's SSH keys), systemd `NOTIFY_SOCKET` (the app could tell systemd
the daemon is ready or stopping), the operator's shell may carry cloud credentials, and every
`PROTO4D_*` steers proto4d itself. The app gets only what a Python web app needs to run, the
release venv, and `app.env` (the operator's explicit choice, applied last); its secrets come
from its own `.env`. The drain shim's PYTHONPATH and grace are added by the runner from the
drain plan, after this.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

__all__ = ["ALLOWED", "app_environment"]

# Passed through from the daemon's environment when set there.
ALLOWED = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "USER", "LOGNAME")
_ALLOWED_PREFIXES = ("LC_",)  # LC_ALL, LC_CTYPE, ...
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def _allowed(name: str) -> bool:
    return name in ALLOWED or name.startswith(_ALLOWED_PREFIXES)


def app_environment(daemon_env: Mapping[str, str], *, venv: Path, release: str,
                    extra: Mapping[str, str]) -> dict[str, str]:
    """The environment the app process starts with.

    daemon_env: the daemon's own (os.environ); venv: the release's venv (its bin/ goes first on
    PATH); release: its name, given as PROTO4D_RELEASE so the app can report what runs; extra:
    `app.env`.
    """
    env = {k: v for k, v in daemon_env.items() if _allowed(k)}
    env.update({
        "VIRTUAL_ENV": str(venv),
        "PATH": f"{venv / 'bin'}:{env.get('PATH') or _DEFAULT_PATH}",
        "PYTHONUNBUFFERED": "1",
        "PROTO4D_RELEASE": release,
    })
    env.update(extra)
    return env
