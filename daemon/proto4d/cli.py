"""The `proto4d` command: argument parsing and output only.

Each subcommand reads what it needs (the config, the files under `root`) and prints;
the daemon's behaviour lives in the modules the `run` command starts. Exit codes are
part of the contract: 0 ok, 1 the operation failed, 2 usage, 78 invalid configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

import yaml

from proto4d import __version__
from proto4d import config as configmod

EX_OK = 0
EX_FAILED = 1
EX_USAGE = 2
EX_CONFIG = configmod.EX_CONFIG


class UsageError(Exception):
    """A mistake on the command line, reported with exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _add_follow(p: argparse.ArgumentParser, *, reason_help: str, wait_help: str,
                timeout_help: str = "with --wait: give up following after SECONDS") -> None:
    """--reason, --wait and --timeout of a command that writes a request and follows its answer."""
    p.add_argument("--reason", help=reason_help)
    p.add_argument("--wait", action="store_true", help=wait_help)
    p.add_argument("--timeout", type=float, metavar="SECONDS", help=timeout_help)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="the YAML config (default: $PROTO4D_CONFIG, then ./proto4d.yaml)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="proto4d",
        description="Keep one web app alive and update it without anyone noticing: proto4d owns the app's "
                    "process, watches who is using it, and when an update is asked for it waits for a safe "
                    "moment, prepares the new release beside the running one, switches over without dropping a "
                    "request, verifies, and rolls back by itself when the new version is unhealthy.",
        epilog="Exit codes: 0 ok, 1 the operation failed (e.g. the update was rolled back), 2 usage, "
               "78 invalid configuration. Start with `proto4d demo` to see the whole story on a sample app.",
    )
    parser.add_argument("--version", action="version", version=f"proto4d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("run", help="run the daemon in the foreground (what launchd/systemd start)",
                       description="Run the daemon in the foreground: start the current release (building the "
                                   "first one when there is none), sample activity, act on update requests. "
                                   "SIGHUP reloads the config, SIGUSR1 requests an update to the branch head, "
                                   "SIGTERM/SIGINT drain the app and exit 0.")
    _add_config(p)
    p.add_argument("--allow-root", action="store_true",
                   help="run even as root (refused otherwise: the app and its builds would run as root too); "
                        "PROTO4D_ALLOW_ROOT=1 in the environment does the same")

    p = sub.add_parser("status", help="what the daemon, the app and the update are doing",
                       description="Show the daemon's last status: app process and release, health, activity "
                                   "verdict and the update in progress. Says so when the daemon is not running "
                                   "or its status is stale.")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (the status.json contract)")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")

    p = sub.add_parser("activity", help="who is using the app now, and whether an update may start",
                       description="Users (distinct client addresses) and their requests in the activity window, "
                                   "the last request, the tunnel, CPU and memory, and the safety verdict with "
                                   "its reasons and a recommendation.")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("update", help="ask the daemon for an update (writes <root>/update.request)",
                       description="Ask for an update. The daemon waits for a safe moment (see `activity`), "
                                   "prepares the release beside the running one, switches with no dropped "
                                   "request, verifies and rolls back by itself when the new version is not "
                                   "healthy. Without --wait this returns once the daemon has accepted the "
                                   "request. One update runs at a time: a request that arrives while another "
                                   "is still waiting for a quiet moment replaces it; one that arrives later is "
                                   "queued (one place: a newer request replaces the queued one). Every request "
                                   "gets an answer in <root>/state/answers/<id>.json.")
    _add_config(p)
    p.add_argument("--ref", help="a branch, tag or commit to deploy (default: the configured branch's head); "
                                 "naming a ref also allows one whose history does not descend from what runs")
    p.add_argument("--force", action="store_true", help="do not wait for a quiet moment (checks still run)")
    p.add_argument("--allow-incompatible", action="store_true",
                   help="deploy a migration the previous release cannot run on (only while nobody is on; a rollback "
                        "then restores the pre-switch snapshot and saves, counted, what was written since)")
    _add_follow(p, reason_help="why, for the logs and the notice",
                wait_help="follow the update to its end; exit 0 only when the new release serves and is verified",
                timeout_help="with --wait: give up following after SECONDS (the update goes on; exit 1)")

    p = sub.add_parser("restart", help="the serving release again, by the zero-gap handoff (e.g. after a .env "
                                       "change)",
                       description="Start the serving release again in a new process and hand the socket over, as "
                                   "an update does (canary, handoff, verification, watch; no waiting for a quiet "
                                   "moment, since no request is dropped). What it is for: a changed shared .env or "
                                   "app.env reaches the app only through a new process; `proto4d status` says when "
                                   "that is the case and which keys changed.")
    _add_config(p)
    _add_follow(p, reason_help="why, for the logs",
                wait_help="follow the restart to its end")

    p = sub.add_parser("stage", help="prepare a release and run it, verified, on the preview address for a teacher "
                                     "to try; production is untouched",
                       description="Prepare the branch head (or REF) as an update would (release, venv, "
                                   "data steps) and run it on the preview address stage.listen (loopback by "
                                   "default: reach it with a second tunnel hostname or `ssh -L`), verified, "
                                   "without touching production or waiting for a quiet moment. `proto4d status` "
                                   "shows its URL and when it expires (stage.ttl_s). `proto4d promote` makes it "
                                   "production; `proto4d discard` ends it. One release is staged at a time: "
                                   "staging another discards it, and an update deploys the staged one if it is "
                                   "the same commit, else discards it.")
    _add_config(p)
    p.add_argument("--ref", help="a branch, tag or commit to stage (default: the configured branch's head)")
    _add_follow(p, reason_help="why, for the logs",
                wait_help="follow it to its end; exit 0 only when the release is staged and verified")

    p = sub.add_parser("promote", help="make the staged release production (waits for a quiet moment)",
                       description="Move the staged release to production with the same zero-gap switch as an "
                                   "update: the process the teacher tried is promoted in place when the data rule "
                                   "allows (see update.promote), else the release starts again on the shared "
                                   "socket after its canary on copies of the data. Waits for a safe moment like "
                                   "any update (--force: do not wait), then verifies, watches and rolls back by "
                                   "itself when unhealthy. The preview address stops answering once promoted.")
    _add_config(p)
    p.add_argument("--force", action="store_true", help="do not wait for a quiet moment (checks still run)")
    p.add_argument("--allow-incompatible", action="store_true",
                   help="as for `update`: a migration the previous release cannot run on (only while nobody is on)")
    _add_follow(p, reason_help="why, for the logs and the notice",
                wait_help="follow it to its end; exit 0 only when the release serves and is verified")

    p = sub.add_parser("discard", help="end the staged release (its process, its release directory)",
                       description="Stop the staged release's process and remove its release (and its copies of "
                                   "the data). A promotion still waiting for a quiet moment is cancelled with it; "
                                   "one already switching is not.")
    _add_config(p)
    _add_follow(p, reason_help="why, for the logs",
                wait_help="wait for the answer")

    p = sub.add_parser("rollback", help="switch back to the previous (or a named) release",
                       description="Switch to the previous retained release (or RELEASE) with its own venv, "
                                   "using the same zero-gap switch as an update.")
    _add_config(p)
    p.add_argument("release", nargs="?", help="release name (see `proto4d releases`); default: the previous one")
    _add_follow(p, reason_help="why, for the logs",
                wait_help="follow the rollback to its end")

    p = sub.add_parser("releases", help="list retained releases",
                       description="Retained releases (the backups): name, commit, age, outcome; the current "
                                   "one is marked.")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("check-config", help="validate the config and print the effective values",
                       description="Validate the config file and print the effective configuration with all "
                                   "defaults filled in. On an error, print one line naming the file, the key and "
                                   "what was expected, and exit 78.")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="print the effective config as JSON instead of YAML")

    p = sub.add_parser("install-service", help="render the launchd plist or systemd unit for this machine",
                       description="Render the service file that runs `proto4d run` for this config, write it "
                                   "where launchd or systemd looks, and print the commands that load it.")
    _add_config(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--launchd", action="store_true", help="a LaunchAgent/LaunchDaemon plist (macOS)")
    g.add_argument("--systemd", action="store_true", help="a systemd unit (Linux)")
    p.add_argument("--print", action="store_true", dest="print_only", help="print the file instead of writing it")
    p.add_argument("--output", metavar="FILE", help="write here instead of the default location")
    p.add_argument("--user", metavar="NAME",
                   help="the user a system-wide service runs as (default: the sudo caller, SUDO_USER)")
    p.add_argument("--allow-root", action="store_true", help="let a system-wide service run as root")

    p = sub.add_parser("doctor", help="what on this machine would break the service, with the fix for each",
                       description="Check this machine for what would break the service: another process or "
                                   "launchd job serving the same port or app, pid files of other start scripts, "
                                   "an interpreter path an upgrade removes, root in a folder macOS hides from "
                                   "background jobs, sleep settings, git and uv, free disk, the time zone, the "
                                   "listen address. Prints each finding with its fix; exit 1 when anything "
                                   "would break.")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="print the findings as JSON")

    p = sub.add_parser("pending", help="what an update would bring: commits, requirements, .env keys, migrations",
                       description="Fetch the branch head (into state/pending.git, never the daemon's own mirror) "
                                   "and show what an update would bring: the commits since the running release, "
                                   "requirement lines added and removed, new .env.example keys (and those the "
                                   "shared .env lacks), migration files added, and whether a release is staged.")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("backups", help="database snapshots: list, take one, restore one",
                       description="SQLite databases under shared/ are snapshotted before every switch (a "
                                   "consistent copy while the app writes). List them, take one now, or restore "
                                   "one: restore first prints what it replaces and how many rows differ per "
                                   "table, and only acts with --yes; the databases as they were are kept as a "
                                   "snapshot of their own.")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--take", action="store_true", help="take a snapshot now")
    p.add_argument("--reason", help="with --take: why, kept in the snapshot")
    p.add_argument("--restore", metavar="ID", help="restore snapshot ID (or `latest`)")
    p.add_argument("--db", metavar="PATH", help="with --restore: only this database (relative to shared/)")
    p.add_argument("--yes", action="store_true", help="with --restore: really replace the live databases")

    p = sub.add_parser("web", help="the status page and /metrics (a separate process reading the state files)",
                       description="Serve the read-only status page and /metrics (Prometheus) on web.listen "
                                   "(default 127.0.0.1:8099). It reads the files under root and never talks to "
                                   "the daemon, so it can be started, stopped and restarted on its own.")
    _add_config(p)
    p.add_argument("--port", type=int, metavar="PORT",
                   help="listen on this port instead of web.listen.port (0: any free port, printed)")

    p = sub.add_parser("logs", help="the app's output, the daemon's events, or one update's story",
                       description="Print a log: the app's output (--app), the daemon's events as readable lines "
                                   "(--daemon), or one update's story (--update ID; the default is the last "
                                   "update). -f follows it as it grows, across rotation.")
    _add_config(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--app", action="store_true", help="the app's output (logs/app.log)")
    g.add_argument("--daemon", action="store_true", help="the daemon's events (logs/proto4d.log), one line each")
    g.add_argument("--update", nargs="?", const="", metavar="ID",
                   help="one update's story: a request id or an update log name (default: the last update)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing what is added (Ctrl-C to stop)")
    p.add_argument("-n", "--lines", type=int, default=200, metavar="N",
                   help="start with the last N lines (default 200; 0 = all) of the app or daemon log")

    sub.add_parser("demo", help="the whole story on a bundled sample app, no set-up",
                   description="In a temporary directory: a local git origin with a sample app in three versions, "
                               "the daemon running it, simulated users, an update that waits for quiet and then "
                               "switches under load with no failed request, a broken version rolled back, and a "
                               "timeline. Leaves nothing behind.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EX_USAGE
    handler = _HANDLERS[args.command]
    try:
        return handler(args)
    except configmod.ConfigError as e:
        print(f"proto4d: invalid configuration: {e}", file=sys.stderr)
        return EX_CONFIG
    except UsageError as e:
        print(f"proto4d {args.command}: {e}", file=sys.stderr)
        return EX_USAGE
    except KeyboardInterrupt:
        return 130


def _load(args: argparse.Namespace) -> configmod.Config:
    return configmod.load(args.config)


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    # What is printed may end up in a terminal log or a CI job: no URL credentials, no webhook token.
    from proto4d import log, notices

    data = log.scrub_obj(configmod.to_dict(cfg))
    if data.get("notify", {}).get("webhook_url"):
        data["notify"]["webhook_url"] = notices.safe_url(data["notify"]["webhook_url"])
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(f"# {cfg.source}: valid; effective configuration with defaults:")
        print(yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100), end="")
        print(configmod.describe_reload_rules())
    return EX_OK


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    # Heavy imports (asyncio daemon, httpx, git) only for the commands that need them.
    def run(args: argparse.Namespace) -> int:
        import importlib
        return getattr(importlib.import_module(module), name)(args)
    return run


def _daemon(args: argparse.Namespace) -> int:
    from proto4d import lean

    lean.daemon_imports()  # before anything imports asyncio or hashlib: OpenSSL stays out until TLS is used
    return _lazy("proto4d.supervisor", "cmd_run")(args)


_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "check-config": cmd_check_config,
    "run": _daemon,
    "status": _lazy("proto4d.views", "cmd_status"),
    "activity": _lazy("proto4d.views", "cmd_activity"),
    "releases": _lazy("proto4d.views", "cmd_releases"),
    "update": _lazy("proto4d.client", "cmd_update"),
    "rollback": _lazy("proto4d.client", "cmd_rollback"),
    "stage": _lazy("proto4d.client", "cmd_stage"),
    "promote": _lazy("proto4d.client", "cmd_promote"),
    "discard": _lazy("proto4d.client", "cmd_discard"),
    "restart": _lazy("proto4d.client", "cmd_restart"),
    "install-service": _lazy("proto4d.service", "cmd_install_service"),
    "backups": _lazy("proto4d.backups", "cmd_backups"),
    "pending": _lazy("proto4d.pending", "cmd_pending"),
    "demo": _lazy("proto4d.demo.story", "cmd_demo"),
    "doctor": _lazy("proto4d.doctor", "cmd_doctor"),
    "web": _lazy("proto4d.web.server", "cmd_web"),
    "logs": _lazy("proto4d.logview", "cmd_logs"),
}
