"""The daemon's log: JSON lines in `logs/proto4d.log`, one readable line per event on stderr.

Events are named after what the operator asks at 3 a.m. ("app.exited", "update.step",
"reload.refused") with the facts as keys. This module also owns what is secret: credentials
in any URL (`https://user:token@host` -> `https://***@host`, whether registered or not) and
the strings registered with `redact()` (the repo URL's and webhook's tokens, `.env` values)
are replaced by `scrub` / `scrub_obj` before anything is written: the log (nested values and
rendered tracebacks included), app.log, update logs, status, answers and webhook bodies.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    import structlog

from proto4d import fsutil

_secrets: tuple[str, ...] = ()  # longest first; replaced whole, so a reader in another thread never sees it change
_lock = threading.Lock()
_warned: set[tuple[str, int]] = set()
_configured_file: Path | None = None


def redact(*secrets: str) -> None:
    """Never print these strings (only ones long enough to be secrets; short ones would mangle logs)."""
    global _secrets
    with _lock:
        new = set(_secrets) | {s for s in secrets if s and len(s) >= 6}
        _secrets = tuple(sorted(new, key=len, reverse=True))


def redact_url(url: str) -> None:
    """Register the credentials a URL carries (`https://x-access-token:TOKEN@host/...`): the user part
    too, since a token is often given as the user alone."""
    try:
        parts = urlsplit(url)
        user, password = parts.username, parts.password
    except ValueError:
        return
    redact(*(unquote(p) for p in (user, password) if p), *(p for p in (user, password) if p))


# Values readable in logs: numbers, IP addresses, booleans, unless their key says they are secret.
_NOT_SECRET = re.compile(r"^(?:[-+]?\d+(?:\.\d+)?|\d{1,3}(?:\.\d{1,3}){3}|localhost|true|false|yes|no)$", re.I)
_SECRET_KEY = re.compile(r"KEY|SECRET|TOKEN|PASS|PWD|PIN|AUTH|CREDENTIAL|PRIVATE|SALT|SIGNATURE|DSN|COOKIE", re.I)
# Credentials in a URL: scheme://<userinfo>@ (userinfo has no '/', '@' or whitespace).
_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s\"'<>]+@")


def redact_env_file(path: Path) -> None:
    """Register the values of a dotenv file (`KEY=value` lines) as secrets.

    Numbers, IP addresses and booleans are left readable; every other value is masked wherever
    it would be printed (the app printing its settings, a crash's last lines, an error message).
    """
    try:
        text = path.read_text(errors="replace")
        st = os.stat(path)
    except OSError:
        return
    if st.st_mode & 0o044 and (str(path), st.st_mode) not in _warned:
        # The shared .env holds the app's secrets; anyone on the machine can read it.
        _warned.add((str(path), st.st_mode))
        get().warning("env.readable_by_others", path=str(path), mode=f"{st.st_mode & 0o777:o}",
                      fix=f"chmod 600 {path}")
    values = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        if line.startswith("export "):
            line = line[7:]
        key, value = (part.strip() for part in line.split("=", 1))
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if value and (not _NOT_SECRET.match(value) or _SECRET_KEY.search(key)):
            values.append(value)
            if "://" in value:
                redact_url(value)
    redact(*values)


def scrub(text: str) -> str:
    """`text` without URL credentials or any registered secret."""
    if "://" in text and "@" in text:
        text = _URL_CREDENTIALS.sub(r"\g<scheme>***@", text)
    for s in _secrets:
        if s in text:
            text = text.replace(s, "***")
    return text


def scrub_obj(obj: Any, _depth: int = 0) -> Any:
    """`scrub` applied to every string in a JSON-like value (dict keys and values, lists, tuples)."""
    if isinstance(obj, str):
        return scrub(obj)
    if _depth > 50:
        return obj
    if isinstance(obj, dict):
        return {scrub_obj(k, _depth + 1) if isinstance(k, str) else k: scrub_obj(v, _depth + 1)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub_obj(x, _depth + 1) for x in obj]
    if isinstance(obj, tuple):
        return tuple(scrub_obj(x, _depth + 1) for x in obj)
    return obj


def _scrub_processor(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    # Runs twice: before rendering (event values) and after format_exc_info (the traceback text, which
    # is a string by then). exc_info is left whole for format_exc_info to render.
    for k, v in event.items():
        if k != "exc_info" and isinstance(v, str | dict | list | tuple):
            event[k] = scrub_obj(v)
    return event


def _scrubbed_str(obj: Any) -> str:
    return scrub(str(obj))


def _console_renderer(_logger: Any, _name: str, event: dict[str, Any]) -> str:
    ts = event.pop("timestamp", "")
    level = event.pop("level", "info")
    name = event.pop("event", "")
    msg = event.pop("msg", None)
    parts = [ts[:19].replace("T", " "), f"{level:<7}", name]
    if msg:
        parts.append(f"- {msg}")
    for k, v in event.items():
        if k in ("logger",):
            continue
        text = scrub(str(v))
        if " " in text or not text:
            text = repr(text)
        parts.append(f"{k}={text}")
    return " ".join(parts)


def _shared() -> list[Any]:
    import structlog
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=False),
        _scrub_processor,
    ]


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """The daemon's log is private to its user (0600, or narrower by the umask)."""

    def _open(self):  # type: ignore[no-untyped-def]
        return open(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors,
                    opener=fsutil.private_opener)


def setup(log_file: Path | None, stderr: bool = True, level: int = logging.INFO,
          max_bytes: int = 10 << 20, backups: int = 5) -> None:
    """Configure structlog and the stdlib root logger; safe to call again (e.g. after a reload)."""
    # structlog (and the asyncio it pulls in) loads here, not at import: the CLI commands only
    # scrub text with this module, and each `proto4d status` pays its import time.
    import structlog
    global _configured_file
    shared = _shared()
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(level)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = _PrivateRotatingFileHandler(log_file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        fh.setFormatter(structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.processors.format_exc_info,
                        _scrub_processor,
                        structlog.processors.JSONRenderer(default=_scrubbed_str)],
            foreign_pre_chain=shared))
        root.addHandler(fh)
    if stderr:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.processors.format_exc_info,
                        _scrub_processor,
                        _console_renderer],
            foreign_pre_chain=shared))
        root.addHandler(sh)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    # Libraries chatter at INFO about every HTTP probe; the daemon's own events are what matter.
    for noisy in ("httpx", "httpcore", "git", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _configured_file = log_file


def get(name: str = "proto4d") -> structlog.stdlib.BoundLogger:
    import structlog
    return structlog.get_logger(name)
