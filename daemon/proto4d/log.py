"""The daemon's log: JSON lines in `logs/proto4d.log`, one readable line per event on stderr.

Events are named after what the operator asks at 3 a.m. ("app.exited", "update.step",
"reload.refused") with the facts as keys. Secrets registered with `redact()` (webhook
tokens, `.env` values) are replaced before anything is written, whichever sink.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import sys
import threading
from pathlib import Path
from typing import Any

import structlog

_secrets: tuple[str, ...] = ()  # longest first; replaced whole, so a reader in another thread never sees it change
_lock = threading.Lock()
_configured_file: Path | None = None


def redact(*secrets: str) -> None:
    """Never print these strings (only ones long enough to be secrets; short ones would mangle logs)."""
    global _secrets
    with _lock:
        new = set(_secrets) | {s for s in secrets if s and len(s) >= 6}
        _secrets = tuple(sorted(new, key=len, reverse=True))


_NOT_SECRET = re.compile(r"^(?:[-+]?\d+(?:\.\d+)?|\d{1,3}(?:\.\d{1,3}){3}|localhost|true|false|yes|no)$", re.I)


def redact_env_file(path: Path) -> None:
    """Register the values of a dotenv file (`KEY=value` lines) as secrets.

    Numbers, IP addresses and booleans are left readable; every other value is masked wherever
    it would be printed (the app printing its settings, a crash's last lines, an error message).
    """
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return
    values = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        if line.startswith("export "):
            line = line[7:]
        value = line.split("=", 1)[1].strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if value and not _NOT_SECRET.match(value):
            values.append(value)
    redact(*values)


def scrub(text: str) -> str:
    for s in _secrets:
        if s in text:
            text = text.replace(s, "***")
    return text


def _scrub_processor(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    if not _secrets:
        return event
    for k, v in event.items():
        if isinstance(v, str):
            event[k] = scrub(v)
        elif isinstance(v, list | tuple):
            event[k] = [scrub(x) if isinstance(x, str) else x for x in v]
    return event


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
        text = str(v)
        if " " in text or not text:
            text = repr(text)
        parts.append(f"{k}={text}")
    return " ".join(parts)


_SHARED = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=False),
    _scrub_processor,
]


def setup(log_file: Path | None, stderr: bool = True, level: int = logging.INFO,
          max_bytes: int = 10 << 20, backups: int = 5) -> None:
    """Configure structlog and the stdlib root logger; safe to call again (e.g. after a reload)."""
    global _configured_file
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(level)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.handlers.RotatingFileHandler(log_file, maxBytes=max_bytes, backupCount=backups,
                                                  encoding="utf-8")
        fh.setFormatter(structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.processors.format_exc_info,
                        structlog.processors.JSONRenderer(default=str)],
            foreign_pre_chain=_SHARED))
        root.addHandler(fh)
    if stderr:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.processors.format_exc_info,
                        _console_renderer],
            foreign_pre_chain=_SHARED))
        root.addHandler(sh)
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    # Libraries chatter at INFO about every HTTP probe; the daemon's own events are what matter.
    for noisy in ("httpx", "httpcore", "git", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _configured_file = log_file


def get(name: str = "proto4d") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
