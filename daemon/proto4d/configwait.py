"""`proto4d run` with an invalid configuration: stay up, say what is wrong, take the fix.

launchd restarts whatever exits (there is no RestartPreventExitStatus), so exiting 78 on a
bad file would become a respawn loop that says the same thing every ThrottleInterval. The
daemon instead waits: it logs the error (file, key, expectation) to stderr and, when the file
parses far enough to name `root`, to `<root>/logs/proto4d.log` and into
`<root>/state/status.json` (daemon state `invalid_config`), where `proto4d status` finds it.
It looks again on SIGHUP or when the file changes (polled: its mtime, size and content hash),
and returns the first valid configuration. With no usable `root` (a file that does not parse,
or is missing) stderr is the only place it can speak; it goes on waiting all the same.
SIGTERM/SIGINT/SIGQUIT end the wait (exit 0). Under systemd it reports READY with the error as
STATUS and keeps the watchdog fed, so systemd neither times the start out nor restarts it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from proto4d import __version__, fsutil, log
from proto4d import config as configmod
from proto4d.activity import iso
from proto4d.notifier import Notifier
from proto4d.paths import Paths

POLL_S = 1.0


def peek_root(path: Path) -> Path | None:
    """`root` as the full loader would resolve it, read from a file that may be invalid elsewhere."""
    try:
        with open(path, "rb") as f:
            doc = yaml.safe_load(f.read(configmod.MAX_CONFIG_BYTES))
    except (OSError, yaml.YAMLError, ValueError):
        return None
    root = doc.get("root") if isinstance(doc, dict) else None
    if not isinstance(root, str) or not root.strip():
        return None
    p = Path(os.path.expanduser(root))
    if not p.is_absolute():
        p = path.resolve().parent / p
    p = Path(os.path.normpath(p))
    return None if p == Path("/") or (p.exists() and not p.is_dir()) else p


def fingerprint(path: Path) -> tuple[Any, ...] | None:
    try:
        st = path.stat()
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read(configmod.MAX_CONFIG_BYTES + 1)).hexdigest()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, digest)


def waiting_status(path: Path, root: Path, error: str, since: float) -> dict[str, Any]:
    """status.json while waiting: the contract's keys, with the error where an operator looks."""
    message = f"invalid configuration, waiting for a fixed file (save it or send SIGHUP): {error}"
    return {
        "daemon": {"pid": os.getpid(), "version": __version__, "state": "invalid_config", "started_at": iso(since),
                   "config": str(path), "root": str(root), "config_error": error},
        "app": {"pid": 0, "release": "", "commit": "", "healthy": False, "since": None, "restarts": 0,
                "state": "stopped", "message": message, "last_exit": "", "drain": "", "draining": [], "port": 0},
        "activity": {"verdict": "red", "reasons": ["the daemon has no valid configuration"], "users": 0,
                     "requests_window": 0, "connections": 0, "last_request": None, "tunnel": None,
                     "cpu_percent": 0.0, "rss_bytes": 0, "sampled_at": None},
        "update": {"state": "idle", "id": "", "ref": "", "reason": "", "requested_at": None, "message": ""},
        "written_at": iso(time.time()),
    }


class _Signals:
    """SIGHUP: look again; TERM/INT/QUIT: give up waiting. USR1/USR2 (update triggers) are ignored
    while nothing runs, rather than ending the process by their default action."""

    def __init__(self) -> None:
        self.hup = False
        self.stop = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        def on_hup(*_: Any) -> None:
            self.hup = True

        def on_stop(*_: Any) -> None:
            self.stop = True

        for sig, handler in ((signal.SIGHUP, on_hup), (signal.SIGTERM, on_stop), (signal.SIGINT, on_stop),
                             (signal.SIGQUIT, on_stop), (signal.SIGUSR1, signal.SIG_IGN),
                             (signal.SIGUSR2, signal.SIG_IGN)):
            self._old[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *_: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def wait(config_path: str | None, error: configmod.ConfigError, poll_s: float = POLL_S) -> configmod.Config | None:
    """Block until the configuration at `config_path` is valid; None when told to stop first."""
    path = Path(config_path).expanduser() if config_path else configmod.default_config_path()
    since = time.time()
    said: tuple[str, Path | None] | None = None
    seen = fingerprint(path)
    notifier = Notifier()
    with _Signals() as sigs:
        while True:
            root = peek_root(path)
            if (str(error), root) != said:
                said = (str(error), root)
                _report(path, root, str(error), since)
                notifier.status(f"invalid configuration, waiting for a fix: {error}"[:400])
                notifier.ready()
            while not sigs.stop and not sigs.hup:
                notifier.watchdog()
                time.sleep(min(poll_s, notifier.watchdog_interval() or poll_s))
                now = fingerprint(path)
                if now != seen:
                    seen = now
                    break
            if sigs.stop:
                notifier.stopping()
                log.get("proto4d").info("daemon.stopped", reason="stop signal while waiting for a valid config")
                return None
            why = "SIGHUP" if sigs.hup else "the file changed"
            sigs.hup = False
            try:
                cfg = configmod.load(path)
            except configmod.ConfigError as e:
                if str(e) == str(error):
                    log.get("proto4d").warning("config.still_invalid", error=str(e), trigger=why)
                error = e
                continue
            log.get("proto4d").info("config.valid", config=str(path), trigger=why,
                                    waited_s=round(time.time() - since, 1))
            if root is not None and root != cfg.root:  # the waiting note must not outlive us there
                with contextlib.suppress(OSError):
                    fsutil.atomic_write_json(Paths(root).status, {
                        **waiting_status(path, root, "", since),
                        "daemon": {"pid": os.getpid(), "state": "stopped", "config": str(path),
                                   "message": f"the fixed configuration moved root to {cfg.root}"}},
                        durable=False)
            return cfg


def _report(path: Path, root: Path | None, error: str, since: float) -> None:
    """Say what is wrong where it can be found: stderr always; the root's log and status when known."""
    logfile = None
    if root is not None and _locked_by_another(Paths(root).lock):
        # A daemon already runs for this root (this one was started by hand beside the service?): its
        # status and log are not ours to overwrite.
        print(f"proto4d: another daemon runs for {root}; this one says what is wrong here only", file=sys.stderr)
        root = None
    if root is not None:
        try:
            Paths(root).make_dirs()
            logfile = Paths(root).daemon_log
            fsutil.atomic_write_json(Paths(root).status, waiting_status(path, root, error, since), durable=False)
        except OSError as e:
            print(f"proto4d: cannot write status under {root}: {e.strerror or e}", file=sys.stderr)
            logfile = None
    # stderr always when there is no log file; else as the daemon does (launchd's plist turns it off: the
    # file it writes to is never rotated)
    log.setup(logfile, stderr=logfile is None or os.environ.get("PROTO4D_LOG_STDERR", "1") != "0")
    log.get("proto4d").error("config.invalid", error=error, config=str(path), root=str(root) if root else None,
                             waiting="for the file to change or SIGHUP; exiting would only be restarted by "
                                     "launchd/systemd with the same error")


def _locked_by_another(lock: Path) -> bool:
    """Whether a running daemon holds `<root>/state/daemon.lock` (probed, never kept: the daemon this
    process becomes takes the lock itself once the config is valid)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops the probe's lock
    return False


def waiting_daemon(config_path: str | None) -> str:
    """For `proto4d status` on an invalid file: the daemon waiting for it, if one is ("" if none)."""
    path = Path(config_path).expanduser() if config_path else configmod.default_config_path()
    root = peek_root(path)
    status = fsutil.read_json(Paths(root).status) if root is not None else None
    daemon = status.get("daemon") if isinstance(status, dict) else None
    if not isinstance(daemon, dict) or daemon.get("state") != "invalid_config":
        return ""
    pid = daemon.get("pid")
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return ""
    return (f"the daemon (pid {pid}) is up since {daemon.get('started_at')} and waits for this file to be fixed; "
            "it takes a saved fix by itself (or on SIGHUP)")
