"""Soak: one daemon, many updates alternating a good version and a broken one, under steady load.

    ./dev bench soak [--updates 1000] [--users 3] [--every 50] [--keep]

Every other update is a good version (-> done); in between, the broken kinds in turn:
  crash_at_start       cannot start: the canary fails                    -> aborted
  crash_after 2.5      passes the canary, crashes 2.5 s after it starts  -> rolled back by the watch
  unhealthy_after 2.5  passes the canary, then /health answers 503       -> rolled back by the watch
  errors               /health fine, every user request answers 500      -> rolled back (update.max_5xx_ratio)
Each update is a new commit on the origin, asked for the way `proto4d update --force` asks
(update.request), with short timings (watch 4 s, drain 5 s). A few keep-alive users send GETs,
slow GETs and POSTs the whole time (not in CI: this takes about 45 s per 10 updates).

Every `--every` updates and at the end it prints: updates done / aborted / rolled back (and any
outcome other than expected), failed requests split by cause (at the instant a process crashed;
500s answered by the `errors` version, which is the fault itself; anything else, which should be
0), the daemon's RSS, open file descriptors and threads, the app processes alive at rest (must be
1), and the disk used under root by releases, venvs, logs and state (retention keeps it bounded).
The figures go to bench/results/soak-<stamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

import common
from common import log, md_table, wait_for
from proto4d.demo.loadgen import Load, Mix, Result

GOOD = ("good", "healthy", "done")
BROKEN = (
    ("crash_at_start", "crash_at_start", "aborted"),
    ("crash_after", "crash_after 2.5", "rolled_back"),
    ("unhealthy_after", "unhealthy_after 2.5", "rolled_back"),
    ("errors", "errors", "rolled_back"),
)
CRASH_WINDOW_S = 1.0  # a failure this close to an app process's unexpected exit was in flight inside it


def plan(i: int) -> tuple[str, str, str]:
    """(kind, mode.txt, expected outcome) of update number i (0-based)."""
    return GOOD if i % 2 == 0 else BROKEN[(i // 2) % len(BROKEN)]


def daemon_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        # /health only: the `errors` version must pass its canary and be caught by the watch's 5xx share.
        "health": {"checks": [{"path": "/health", "status": [200]}], "start_timeout_s": 15, "interval_s": 0.3,
                   "timeout_s": 3},
        "activity": {"interval_s": 1, "window_s": 10, "tunnel_process": ""},
        "update": {"watch_s": args.watch_s, "drain_timeout_s": 5, "notice_grace_s": 1, "keep_min": 3,
                   "keep_days": 0, "max_5xx_ratio": 0.2, "min_free_mb": 1},
        "app": {"log_max_bytes": 1 << 20, "log_backups": 2, "stable_s": 30, "max_fast_failures": 3},
    }


class LogTail:
    """New JSON events of logs/proto4d.log since the last call (follows its size rotation)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0
        self.ino: int | None = None

    def _read(self, path: Path, pos: int) -> tuple[list[dict[str, Any]], int]:
        out = []
        with open(path, "rb") as f:
            f.seek(pos)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line being written is read next time
        for line in data[:end].splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out, pos + end

    def new(self) -> list[dict[str, Any]]:
        try:
            st = os.stat(self.path)
        except OSError:
            return []
        events: list[dict[str, Any]] = []
        if self.ino is not None and st.st_ino != self.ino:
            rotated = self.path.with_name(self.path.name + ".1")
            with contextlib.suppress(OSError):
                events, _ = self._read(rotated, self.pos)
            self.pos = 0
        self.ino = st.st_ino
        more, self.pos = self._read(self.path, self.pos)
        return events + more


def ts(event: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(event["timestamp"]).timestamp()


def disk(root: Path) -> dict[str, Any]:
    state = root / "state"
    out = {k: common.dir_bytes(root / k) for k in ("releases", "venvs", "logs", "shared")}
    out["mirror"] = common.dir_bytes(state / "repo.git")
    out["state_other"] = common.dir_bytes(state) - out["mirror"]
    out["total"] = common.dir_bytes(root)
    out["n_releases"] = sum(1 for p in (root / "releases").iterdir() if not p.name.startswith("."))
    out["n_venvs"] = sum(1 for p in (root / "venvs").iterdir() if not p.name.startswith("."))
    out["n_update_logs"] = len(list((root / "logs").glob("update_*.log")))
    out["n_answers"] = len(list((state / "answers").glob("*.json")))
    out["partial"] = [p.name for sub in ("releases", "venvs") for p in (root / sub).iterdir()
                      if p.name.startswith(".")]
    return out


class Soak:
    def __init__(self, args: argparse.Namespace, base: Path) -> None:
        self.args = args
        self.base = base
        self.origin = common.make_origin(base / "origin")
        (base / "daemon").mkdir()
        self.d = common.harness.Daemon(base / "daemon", self.origin, **daemon_config(args))
        if args.install == "production":
            log("the daemon's production install: venv + pip install . ...")
            self.d.daemon_python = common.production_python(base)
        self.load: Load | None = None
        self.tail = LogTail(self.d.root / "logs" / "proto4d.log")
        self.results_total = 0
        self.failures: list[dict[str, Any]] = []  # every failed request, classified
        self.crashes: list[float] = []  # when an app process exited unexpectedly
        self.errors_windows: list[tuple[float, float]] = []  # while an `errors` version was in play
        self.pending: list[Result] = []  # failures not yet classified (a crash event may come later)
        self.updates: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.rest_counts: Counter[int] = Counter()

    # -- load and failures

    def drain_results(self) -> None:
        assert self.load is not None
        with self.load._lock:  # take what the users recorded so far; they go on appending to a new list
            batch, self.load.results = self.load.results, []
        self.results_total += len(batch)
        self.pending += [r for r in batch if not r.ok]
        for e in self.tail.new():
            if e.get("event") == "app.exited":
                self.crashes.append(ts(e))

    def classify(self, final: bool = False) -> None:
        """Sort the failures: at a crash instant, a 500 from the `errors` version, or other."""
        horizon = time.time() - 3
        keep = []
        for r in self.pending:
            end = r.at + r.latency
            if not final and end > horizon:
                keep.append(r)  # its crash may not be in the log yet
                continue
            if r.status is None and any(abs(end - c) <= CRASH_WINDOW_S for c in self.crashes):
                cause = "crash_instant"
            elif r.status is not None and r.status >= 500 and any(a <= r.at <= b for a, b in self.errors_windows):
                cause = "errors_version_5xx"
            else:
                cause = "other"
            self.failures.append({"at": r.at, "latency": round(r.latency, 3), "status": r.status, "error": r.error,
                                  "method": r.method, "path": r.path, "cause": cause})
        self.pending = keep

    # -- figures

    def sample(self, n_done: int) -> dict[str, Any]:
        self.drain_results()
        self.classify()
        proc = psutil.Process(self.d.proc.pid)
        with proc.oneshot():
            rss, fds, threads = proc.memory_info().rss, proc.num_fds(), proc.num_threads()
        outcomes = Counter(u["outcome"] for u in self.updates)
        causes = Counter(f["cause"] for f in self.failures)
        s = {
            "updates": n_done, "at": time.time(),
            "done": outcomes["done"], "aborted": outcomes["aborted"], "rolled_back": outcomes["rolled_back"],
            "unexpected": sum(1 for u in self.updates if u["outcome"] != u["expected"]),
            "requests": self.results_total, "failed": len(self.failures),
            "failed_crash_instant": causes["crash_instant"], "failed_errors_5xx": causes["errors_version_5xx"],
            "failed_other": causes["other"],
            "rss_bytes": rss, "fds": fds, "threads": threads,
            "app_processes_at_rest": len(self.d.app_pids()),
            "disk": disk(self.d.root),
        }
        self.samples.append(s)
        return s

    def row(self, s: dict[str, Any]) -> list[Any]:
        dk = s["disk"]
        return [s["updates"], s["done"], s["aborted"], s["rolled_back"], s["unexpected"], s["requests"],
                s["failed_crash_instant"], s["failed_errors_5xx"], s["failed_other"],
                f"{s['rss_bytes'] / 2**20:.1f}", s["fds"], s["threads"], s["app_processes_at_rest"],
                f"{dk['total'] / 2**20:.1f}", dk["n_releases"], dk["n_venvs"], f"{dk['logs'] / 2**20:.2f}",
                dk["n_update_logs"]]

    HEADERS = ("updates", "done", "aborted", "rolled back", "unexpected", "requests", "failed@crash",
               "5xx(errors ver.)", "failed other", "RSS MiB", "fds", "threads", "app procs", "disk MB",
               "releases", "venvs", "logs MB", "update logs")

    def print_row(self, s: dict[str, Any]) -> None:
        print(md_table(self.HEADERS, [self.row(s)]).splitlines()[-1], flush=True)

    # -- the run

    def one(self, i: int) -> None:
        kind, mode, expected = plan(i)
        self.origin.commit(str(i + 2), mode=mode, message=f"soak {i}: {kind}")
        rid, t0 = common.trigger_update(self.d, reason=f"soak {i} {kind}")
        answer = common.wait_answer(self.d, rid, timeout=180)
        t1 = time.time()
        if kind == "errors":
            self.errors_windows.append((t0, t1 + 1))
        u = {"i": i, "kind": kind, "expected": expected, "outcome": answer["state"], "seconds": round(t1 - t0, 2)}
        if u["outcome"] != expected:
            u["message"] = answer.get("message", "")
            log(f"update {i} ({kind}): {u['outcome']}, expected {expected}: {u['message'][:300]}")
        self.updates.append(u)
        # At rest: the update is over and the old process has drained; exactly one app process remains.
        try:
            wait_for(lambda: self.d.status()["update"]["state"] == "idle" and not self.d.status()["app"]["draining"]
                     and self.d.status()["app"]["healthy"] and len(self.d.app_pids()) == 1, 30, "rest")
            self.rest_counts[1] += 1
        except AssertionError:
            n = len(self.d.app_pids())
            self.rest_counts[n] += 1
            log(f"update {i} ({kind}): not at rest after 30 s: {n} app processes, status {self.d.status()['app']}")
        self.drain_results()

    def run(self) -> int:
        args = self.args
        log(f"origin and daemon under {self.base}")
        self.d.start()
        self.load = Load("127.0.0.1", self.d.port, users=args.users,
                         mix=Mix(get=0.6, slow=0.2, post=0.2, slow_ms=(20, 300), think_s=(0.01, 0.05)))
        self.load.start()
        started = time.time()
        print(md_table(self.HEADERS, []).splitlines()[0])
        print(md_table(self.HEADERS, []).splitlines()[1], flush=True)
        interrupted = False
        try:
            assert self.load.wait_requests(20, 30), "the load never got going"
            self.print_row(self.sample(0))
            for i in range(args.updates):
                self.one(i)
                if (i + 1) % args.every == 0 and i + 1 != args.updates:
                    self.print_row(self.sample(i + 1))
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: the figures so far")
        finally:
            t_end = time.time()
            self.load.stop()
            self.drain_results()
            time.sleep(0.5)  # let the daemon's log catch up with the last requests' fate
            self.drain_results()
            self.classify(final=True)
        last = self.sample(len(self.updates))
        self.print_row(last)
        result = self.report(started, t_end, interrupted)
        rc = self.d.stop()
        result["daemon_exit"] = rc
        result["app_processes_after_stop"] = len(self.d.app_pids())
        path = common.write_json("soak", result)
        print(f"\nfigures: {path.relative_to(common.ROOT)}")
        ok = (last["unexpected"] == 0 and last["failed_other"] == 0 and set(self.rest_counts) <= {1}
              and rc == 0 and not last["disk"]["partial"])
        return 0 if ok else 1

    def report(self, started: float, ended: float, interrupted: bool) -> dict[str, Any]:
        samples = [s for s in self.samples if s["updates"] > 0]
        base = samples[0] if samples else self.samples[0]
        last = self.samples[-1]

        def trend(key: str, scale: float = 1.0) -> dict[str, Any]:
            xs = [s["updates"] for s in samples] or [0]
            ys = [s[key] / scale for s in samples] or [0]
            slope = 0.0
            if len(xs) >= 2:
                mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
                den = sum((x - mx) ** 2 for x in xs)
                slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0
            return {"first": ys[0], "last": ys[-1], "min": min(ys), "max": max(ys), "per_update": slope,
                    "per_1000_updates": slope * 1000}

        rss = trend("rss_bytes", 2**20)
        fds = trend("fds")
        threads = trend("threads")
        disk_t = {"first_mb": base["disk"]["total"] / 2**20, "last_mb": last["disk"]["total"] / 2**20,
                  "max_mb": max(s["disk"]["total"] for s in self.samples) / 2**20}
        kinds = Counter((u["kind"], u["outcome"]) for u in self.updates)
        print()
        print(f"{len(self.updates)} updates in {(ended - started) / 60:.1f} min ({args_line(self.args)})"
              + (" - INTERRUPTED" if interrupted else ""))
        print("outcomes by kind: " + ", ".join(f"{k} -> {o}: {c}" for (k, o), c in sorted(kinds.items())))
        print(f"requests {last['requests']:,}; failed {last['failed']}: at a crash instant "
              f"{last['failed_crash_instant']}, 500 from the errors version {last['failed_errors_5xx']}, "
              f"other {last['failed_other']}")
        print(f"daemon RSS {rss['first']:.1f} -> {rss['last']:.1f} MiB (min {rss['min']:.1f}, max {rss['max']:.1f}; "
              f"trend {rss['per_1000_updates']:+.2f} MiB per 1000 updates after update {base['updates']})")
        print(f"daemon fds {fds['first']:.0f} -> {fds['last']:.0f} (min {fds['min']:.0f}, max {fds['max']:.0f}; "
              f"trend {fds['per_1000_updates']:+.1f} per 1000 updates); threads {threads['first']:.0f} -> "
              f"{threads['last']:.0f} (max {threads['max']:.0f})")
        print(f"app processes at rest after each update: {dict(self.rest_counts)}")
        print(f"disk under root {disk_t['first_mb']:.1f} -> {disk_t['last_mb']:.1f} MB (max {disk_t['max_mb']:.1f}); "
              f"releases {last['disk']['n_releases']}, venvs {last['disk']['n_venvs']}, update logs "
              f"{last['disk']['n_update_logs']}, answers {last['disk']['n_answers']}, half-built "
              f"{last['disk']['partial'] or 'none'}")
        others = [f for f in self.failures if f["cause"] == "other"]
        for f in others[:10]:
            print(f"  other failure: {f}")
        durations = Counter()
        for u in self.updates:
            durations[u["kind"]] += u["seconds"]
        return {
            "bench": "soak", "command": common.command_line(), "machine": common.machine(),
            "args": vars(self.args), "interrupted": interrupted, "seconds": round(ended - started, 1),
            "updates": self.updates, "samples": self.samples, "trend": {"rss_mb": rss, "fds": fds,
                                                                       "threads": threads, "disk": disk_t},
            "rest_counts": dict(self.rest_counts),
            # every failure but the 500s of the `errors` versions (the fault itself: a sample of those)
            "failures": [f for f in self.failures if f["cause"] != "errors_version_5xx"][:2000]
            + [f for f in self.failures if f["cause"] == "errors_version_5xx"][:50],
            "mean_seconds_by_kind": {k: round(v / max(1, sum(1 for u in self.updates if u["kind"] == k)), 2)
                                     for k, v in durations.items()},
        }


def args_line(args: argparse.Namespace) -> str:
    return f"{args.users} users, watch {args.watch_s:g} s, sample every {args.every}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--updates", type=int, default=1000, help="how many updates (default 1000)")
    p.add_argument("--users", type=int, default=3, help="simulated keep-alive users (default 3)")
    p.add_argument("--every", type=int, default=50, help="print the figures every N updates (default 50)")
    p.add_argument("--watch-s", type=float, default=4.0, help="update.watch_s (default 4; must exceed 3 s, "
                   "when the crash_after and unhealthy_after versions fail)")
    p.add_argument("--keep", action="store_true", help="keep the origin and the daemon's root afterwards")
    common.add_install_arg(p)
    args = p.parse_args()
    if args.updates < 1 or args.users < 1 or args.every < 1:
        p.error("--updates, --users and --every must be at least 1")
    common.raise_nofile(4096)
    base, cleanup = common.workdir(args.keep, "soak")
    soak = Soak(args, base)
    try:
        return soak.run()
    finally:
        soak.d.cleanup()
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
