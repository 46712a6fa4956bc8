"""The serving app's latency while an update's preparation runs beside it, by the class that work runs in.

An update's preparation (the `git fetch` of the new commit, the export helper, the venv's check) runs in
processes the daemon starts through `procs.run`. This bench runs exactly that work, through the
product's own Mirror and venv check, against the bundled sample app served by a real daemon under the
normal load mix, in rounds whose class is drawn in a shuffled order:

  normal      no change: the work competes with the app at the same priority
  nice        nice +10 (`procs.lower_priority`, what every helper got before)
  background  the OS's background class (`procs.to_background`: SCHED_IDLE on Linux, the darwin
              background band on macOS), what fetch, export, venv builds and checks get now

`--floor`: what the background class cannot take away on this machine, with other rounds instead:

  none        nothing at all (the burst is a sleep of 0.25 s): the bench's own noise
  idle-spin   a busy loop in SCHED_IDLE / the background band (user space only)
  idle-start  the sample app's interpreter importing what its start imports (uvicorn, the app's
              main module), in the background class: a canary's start without the serving
  idle-fsync  20 small files written and fsynced one by one, in the background class: the I/O an
              update's journal, release.json and symlinks cause (the kernel's journal and block
              threads that carry it out are not in the class)

The preparation's own Python (what the daemon does between its commands) runs in a worker process at
the normal class, as in the daemon: not in this process, whose threads are the load.

After each burst, a stretch at rest as long as it: the burst's own baseline, at the same moments of the
run. Reported per class: fast requests (GET /, POST /echo) overlapping the bursts and overlapping the
rest stretches, p50 / p99 / max, and the ratio burst / rest. A new commit is pushed to the origin before
each round and the round starts only after a settle, so the bench's own git work is in no window.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from common import LoadSet, fmt, lat_stats, log, md_table, sign_test
from proto4d import procs, releases

CLASSES = ("normal", "nice", "background")
FLOOR = ("none", "background", "idle-spin", "idle-start", "idle-fsync")
SETTLE_S = 0.5
SPIN_S = 0.25  # about a canary's start at the sample app's size


def apply_class(name: str) -> None:
    """Make every `procs.run` of the next burst use `name` (procs.run looks the function up at each call)."""
    def normal(pid: int, platform: str = sys.platform, fallback: bool = True) -> str:
        return "normal"

    def nice(pid: int, platform: str = sys.platform, fallback: bool = True) -> str:
        procs.lower_priority(pid)
        return "nice"

    procs.to_background = {"normal": normal, "nice": nice, "background": _REAL_TO_BACKGROUND}[name]  # type: ignore[assignment]


_REAL_TO_BACKGROUND = procs.to_background


def burst(mirror: releases.Mirror, branch: str, venv: Path, scratch: Path, n: int) -> None:
    """What an update does between the request and the canary's start, minus the daemon's own bookkeeping."""
    mirror.fetch(branch=branch)
    sha = mirror.branch_head(branch)
    assert sha is not None
    dest = scratch / f"export-{n}"
    dest.mkdir()
    mirror.export(sha, "", dest)
    problem = releases.venv_problem(venv)
    if problem:
        raise RuntimeError(problem)


def floor_burst(kind: str, python: Path, app_dir: Path) -> None:
    """A round of --floor: what runs in the background class instead of an update's preparation."""
    if kind == "none":
        time.sleep(SPIN_S)
        return
    code = {
        "idle-spin": f"import time\ne = time.monotonic() + {SPIN_S!r}\nwhile time.monotonic() < e: pass",
        "idle-start": "import sys; sys.path.insert(0, '.'); import uvicorn.main, main",
        "idle-fsync": ("import os, tempfile\nd = tempfile.mkdtemp()\nfor i in range(20):\n"
                       "    with open(os.path.join(d, str(i)), 'wb') as f:\n"
                       "        f.write(os.urandom(2048)); f.flush(); os.fsync(f.fileno())\n"
                       "fd = os.open(d, os.O_RDONLY); os.fsync(fd); os.close(fd)"),
    }[kind]
    procs.run([str(python), "-c", code], cwd=app_dir, timeout=60, background=True)


def worker(argv: list[str]) -> int:
    """`background.py --worker MIRROR ORIGIN VENV SCRATCH`: runs a burst for each `CLASS N` line on
    stdin and answers `ok` (or `error ...`); the bench's side of a round is one line each way."""
    mirror_path, origin, venv, scratch = argv
    mirror = releases.Mirror(Path(mirror_path), origin)
    for line in sys.stdin:
        cls, n = line.split()
        apply_class(cls)
        try:
            burst(mirror, "main", Path(venv), Path(scratch), int(n))
            print("ok", flush=True)
        except Exception as e:  # the bench stops on it, with the reason
            print(f"error {type(e).__name__}: {e}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="./dev bench background", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=60, help="rounds per class (default 60)")
    p.add_argument("--rest-s", type=float, default=1.0, help="at least this much rest between rounds (default 1)")
    p.add_argument("--floor", action="store_true",
                   help="rounds of none / background / idle-spin / idle-start / idle-fsync instead (see above)")
    p.add_argument("--seed", type=int, default=None, help="the shuffle's seed (printed when not given)")
    common.add_run_args(p, "the run")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    rng = random.Random(seed)
    base = Path(tempfile.mkdtemp(prefix="proto4d-bench-background-"))
    classes = FLOOR if args.floor else CLASSES
    log(f"background bench: {args.rounds} rounds x {classes}, seed {seed}; scratch {base}")
    origin = common.Origin(base)
    origin.commit("1")
    d = common.new_daemon(base / "daemon", origin)
    order = [c for c in classes for _ in range(args.rounds)]
    rng.shuffle(order)
    windows: dict[str, list[tuple[float, float]]] = {c: [] for c in classes}
    rests: dict[str, list[tuple[float, float]]] = {c: [] for c in classes}
    try:
        d.start(timeout=300)
        venv = next(p for p in (d.root / "venvs").iterdir() if (p / "venv.json").is_file())
        mirror = releases.Mirror(base / "mirror.git", str(origin.bare))
        mirror.fetch(branch="main")
        python = venv / "bin" / "python"
        app_dir = d.root / "current"
        scratch = base / "exports"
        scratch.mkdir()
        work = subprocess.Popen([sys.executable, __file__, "--worker", str(base / "mirror.git"), str(origin.bare),
                                 str(venv), str(scratch)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert work.stdin is not None and work.stdout is not None

        def run_burst(cls: str, n: int) -> None:
            work.stdin.write(f"{cls} {n}\n")
            work.stdin.flush()
            answer = work.stdout.readline().strip()
            if answer != "ok":
                raise RuntimeError(f"the burst worker: {answer or 'exited'}")

        load = LoadSet(d.port, common.MIXES["normal"]).start()
        try:
            time.sleep(2)
            for i, cls in enumerate(order):
                origin.commit(str(i + 2))
                time.sleep(SETTLE_S)
                a = time.time()
                if cls in CLASSES:
                    run_burst(cls, i)
                else:
                    floor_burst(cls, python, app_dir)
                b = time.time()
                windows[cls].append((a, b))
                time.sleep(0.2)  # the burst's processes reaped, its last requests answered
                r0 = time.time()
                time.sleep(b - a)
                rests[cls].append((r0, time.time()))
                time.sleep(max(0.0, args.rest_s - (b - a)))
                if (i + 1) % 30 == 0:
                    log(f"  {i + 1}/{len(order)} rounds, {load.count():,} requests")
        finally:
            load.stop()
        results = [r for r in load.results() if r.ok and common.is_fast(r)]
        failed = sum(1 for r in load.results() if not r.ok)
        work.stdin.close()
        work.wait(30)
    finally:
        with contextlib.suppress(Exception):
            d.stop(60)
        if not args.keep:
            d.cleanup()

    rows, out = [], {}
    starts = [r.at for r in results]  # results: fast ones, sorted by start
    for cls in classes:
        ws, rs = sorted(windows[cls]), sorted(rests[cls])
        during = lat_stats([r.latency for r in results if common.overlaps(r, ws)])
        rest = lat_stats([r.latency for r in results if common.overlaps(r, rs)])
        burst_ms = 1000 * sum(b - a for a, b in ws) / len(ws) if ws else 0.0
        pairs = [(common.window_max(results, starts, a, b), common.window_max(results, starts, c, d))
                 for (a, b), (c, d) in zip(windows[cls], rests[cls], strict=True)]
        twins = sign_test([(x, y) for x, y in pairs if x > 0 and y > 0])
        out[cls] = {"burst": during, "rest": rest, "burst_ms_mean": round(burst_ms, 1), "twins": twins}
        rows.append([cls, fmt(burst_ms), during["n"], f"{fmt(during['p50'])} / {fmt(rest['p50'])}",
                     f"{fmt(during['p99'])} / {fmt(rest['p99'])}", f"{fmt(during['max'])} / {fmt(rest['max'])}",
                     fmt(during["p99"] / rest["p99"], 2) if rest["p99"] else "-",
                     fmt(during["max"] / rest["max"], 2) if rest["max"] else "-",
                     f"{twins['worse']}/{twins['n']} (p {fmt(twins['p_sign'], 3)}), {fmt(twins['median_ratio'], 2)}"])
    print(f"\n## Latency beside an update's preparation, by class ({args.rounds} rounds each, seed {seed})\n")
    print(f"Command: `./dev bench background --rounds {args.rounds} --seed {seed}{' --floor' if args.floor else ''}`; "
          f"{failed} failed requests.\n")
    print(md_table(["class", "burst ms (mean)", "requests in bursts", "p50 burst / rest", "p99 burst / rest",
                    "max burst / rest", "p99 ratio", "max ratio",
                    "rounds worse than their rest (sign test), median ratio"], rows))
    print("\nms, fast requests overlapping the bursts / overlapping a stretch at rest as long as each burst, "
          "right after it. The last column compares each round's worst request with its own rest stretch's.")
    path = common.write_json("background", {"seed": seed, "rounds": args.rounds, "floor": args.floor,
                                            "failed": failed, "classes": out,
                                            "machine": common.machine()})
    print(f"\nJSON: {path.relative_to(common.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[2:]) if sys.argv[1:2] == ["--worker"] else main())
