"""Update time: trigger -> verified, step by step, and the venv build on its own (uv vs pip, cold vs warm).

Part 1, through a real daemon: updates of the sample app triggered the way `proto4d update --force`
does (update.request, then SIGUSR2 to wake the daemon; --trigger file leaves the file to the
daemon's 1 s poll, as `touch update.request` does), with update.watch_s 0, so "verified" is the
moment the checks against the production port passed (the watch that follows is a configurable
wait, not work, and is excluded).
  unchanged        the requirements are the same: the venv is reused
  changed          every update changes requirements.txt: a new venv is built (uv, from a warm cache)
  unchanged+load   as unchanged, while the normal load mix runs (slow requests are in flight at the switch)
  proto4-sized     the app imports what Proto4 imports (FastAPI, OpenAI, SQLAlchemy) before serving
  staged           each version is staged first (`proto4d stage`, untimed); the promotion is the timed update
                   (after proto4-sized, the app is Proto4-sized here too)
Each block starts with one uncounted warm-up update. The steps come from the daemon itself: the
journal's step times and the update log's "timings:" line. The app's own start time is measured
twice: spawn -> "Uvicorn running on" (the bench starts the release's uvicorn itself), and first
log line -> "Uvicorn running on" in logs/app.log (what the brief calls the app's own start).

Part 2, the venv build alone: proto4d.releases.ensure_venv (what the daemon runs) with uv and with
venv+pip, for the sample's requirements and a Proto4-sized set (FastAPI, uvicorn[standard], httpx,
pydantic, python-dotenv, openai, SQLAlchemy: 30 pinned packages). Cold = a fresh empty
UV_CACHE_DIR / PIP_CACHE_DIR; warm = the next builds with the same cache. Packages come from PyPI
(pip is run with PIP_CONFIG_FILE=/dev/null so a machine's local wheel mirrors do not stand in for it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import common
from common import LoadSet, Target, fmt, log, md_table
from proto4d import releases
from proto4d.paths import Paths

# Proto4-sized: the top-level set Proto4 uses, fully pinned (uv pip compile, Python 3.11, resolved on PyPI).
PROTO4_REQUIREMENTS = """\
# Proto4-sized: fastapi, uvicorn[standard]==0.24.0 (Proto4's pin), httpx, pydantic, python-dotenv, openai, sqlalchemy
annotated-doc==0.0.7
annotated-types==0.8.0
anyio==4.16.0
certifi==2026.10.19.post1
click==8.5.1
fastapi==0.165.0
h11==0.16.0
httpcore==1.0.9
httpcore2==2.16.2
httptools==0.9.0
httpx==0.28.1
httpx2==2.16.2
idna==3.20
jiter==0.19.0
openai==3.57.0
opentelemetry-api==1.45.2
pydantic==2.14.4
pydantic-core==2.50.5
python-dotenv==1.2.4
pyyaml==6.0.4
sniffio==1.3.1
sqlalchemy==2.1.9
starlette==1.10.0
truststore==0.10.5
typing-extensions==4.16.0
typing-inspection==0.4.5
uvicorn[standard]==0.24.0
uvloop==0.23.0
watchfiles==1.3.0
websockets==17.4
"""
EXTRA_PACKAGE = "six==1.17.0"  # toggled in and out by the "changed" updates
TIMINGS_RE = re.compile(r"(\w+) ([\d.]+) s")
STEP_COLUMNS = ["pickup", "fetch", "export", "venv", "preflight", "canary", "switching", "verifying"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="./dev bench update", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Quick default: 5 updates per block, one cold and one warm venv build per case (about 5 minutes, "
               "most of it pip).\nREADME figures: --readme (= --updates 20 --repeat 3 --app-starts 10).")
    p.add_argument("--updates", type=int, default=5, help="counted updates per block (default 5)")
    p.add_argument("--repeat", type=int, default=1, help="warm venv builds per case; the median is shown (default 1)")
    p.add_argument("--app-starts", type=int, default=5, help="spawn -> ready measurements of the app (default 5)")
    p.add_argument("--uvicorn", default="0.54", choices=["0.54", "0.24"],
                   help="the sample app's uvicorn line (default 0.54, the sample's pin)")
    p.add_argument("--blocks", default=",".join(BLOCKS),
                   help=f"comma-separated subset of {','.join(BLOCKS)} (default: all, in this order)")
    p.add_argument("--skip-updates", action="store_true", help="only the venv builds")
    p.add_argument("--skip-venv", action="store_true", help="only the updates")
    p.add_argument("--installers", default="uv,pip", help="comma-separated subset of uv,pip for part 2")
    p.add_argument("--trigger", choices=["cli", "file"], default="cli",
                   help="cli: the request file, then SIGUSR2, as `proto4d update` does (default); "
                        "file: the file alone, as `touch update.request` (picked up within the 1 s poll)")
    p.add_argument("--promote", choices=["auto", "never", "both"], default="auto",
                   help="update.promote for the daemon: auto = the verified canary is promoted in place (one start, "
                        "as shipped); never = every release starts twice; both = never, then auto, in one run "
                        "(default auto)")
    p.add_argument("--spare", choices=["off", "on", "both"], default="off",
                   help="app.spare: on = each update first waits until the daemon's spare interpreter is warm (a "
                        "quiet moment between updates; not in the +load block, where users are always on), so the "
                        "start is that process; both = off, then on, in one run (default off)")
    p.add_argument("--ahead", choices=["off", "on", "both"], default="off",
                   help="update.prepare_ahead_s: on = each update's commit is pushed, then the bench waits until the "
                        "daemon has prepared its release ahead (nobody on; not in the +load block), and the update "
                        "takes it; both = off, then on, in one run (default off: the release is prepared in the "
                        "update)")
    p.add_argument("--readme", action="store_true", help="the README run: --updates 20 --repeat 3 --app-starts 10")
    common.add_run_args(p, "each part")
    args = p.parse_args(argv)
    if args.readme:
        args.updates = max(args.updates, 20)
        args.repeat = max(args.repeat, 3)
        args.app_starts = max(args.app_starts, 10)
    args.block_list = [b.strip() for b in args.blocks.split(",") if b.strip()]
    for b in args.block_list:
        if b not in BLOCKS:
            p.error(f"--blocks: unknown block {b!r}")
    args.installer_list = [i.strip() for i in args.installers.split(",") if i.strip()]
    if args.updates < 1:
        p.error("--updates must be at least 1")
    return args


# --------------------------------------------------------------------------- part 1


def read_timings(d: Any, answer: dict[str, Any]) -> dict[str, float]:
    path = d.root / answer.get("log", "")
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            if "timings:" in line:
                return {k: float(v) for k, v in TIMINGS_RE.findall(line.split("timings:", 1)[1])}
    return {}


def one_update(d: Any, origin: Any, version: str, requirements: str | None,
               files: dict[str, str] | None = None, trigger: str = "cli", staged: bool = False,
               ahead: bool = False) -> dict[str, Any]:
    sha = origin.commit(version, requirements=requirements, files=files)
    if ahead:  # pushed while nobody is on: the daemon prepares it before anyone asks for it (not timed)
        d.wait_status(lambda s: (s.get("ahead") or {}).get("state") == "ready" and s["ahead"]["commit"] == sha,
                      600, f"{sha[:7]} prepared ahead")
    if staged:  # `proto4d stage` first (not timed), then the promotion is the update that is timed
        stage_id, _ = common.trigger_update(d, reason="bench stage", wake=True, action="stage")
        staged_answer = common.wait_answer(d, stage_id, timeout=600)
        if staged_answer.get("state") != "staged":
            log(f"  stage {version}: {staged_answer.get('state')}: {staged_answer.get('message', '')[:300]}")
    req_id, t0 = common.trigger_update(d, reason="bench update", wake=trigger == "cli",
                                       action="promote" if staged else "update")
    answer = common.wait_answer(d, req_id, timeout=600)
    steps = common.step_times(common.journal_for(d, req_id))
    timings = read_timings(d, answer)
    verified = steps.get("watching", answer.get("at", time.time()))
    row = {"outcome": answer.get("state"), "trigger_to_verified": verified - t0,
           "prepared_ahead": bool(common.journal_for(d, req_id).get("prepared_ahead")),
           "pickup": steps.get("requested", t0) - t0, **timings,
           "steps": {k: round(v - t0, 3) for k, v in steps.items()}}
    if answer.get("state") != "done":
        log(f"  update {version}: {answer.get('state')}: {answer.get('message', '')[:300]}")
    return row


HEAVY_IMPORTS = """\
# Proto4-sized start-up: import what Proto4 imports before serving (FastAPI, OpenAI client, SQLAlchemy ORM).
import dotenv  # noqa: F401
import fastapi  # noqa: F401
import httpx  # noqa: F401
import openai  # noqa: F401
import pydantic  # noqa: F401
import sqlalchemy.orm  # noqa: F401
from openai import OpenAI  # noqa: F401

"""
BLOCKS = ("unchanged", "changed", "unchanged+load", "proto4-sized", "staged")


def requirements_for(block: str, base_req: str, i: int) -> str | None:
    if block != "changed":
        return None
    extra = f"{EXTRA_PACKAGE}\n" if i % 2 else ""
    return f"{base_req}{extra}# bench build {i} {time.time():.0f}\n"


def run_updates(args: argparse.Namespace, base: Path, promote: str = "auto", spare: bool = False,
                ahead: bool = False) -> dict[str, Any]:
    origin = common.make_origin(base / "origin", args.uvicorn)
    base_req = common.UVICORN_REQUIREMENTS[args.uvicorn]
    d = common.new_daemon(base / "daemon", origin, app={"spare": spare},
                          update={"watch_s": 0, "promote": promote, "prepare_ahead_s": 1 if ahead else 0})
    blocks: dict[str, dict[str, Any]] = {}
    n = 0
    try:
        d.start(timeout=300)
        time.sleep(1)
        for block in args.block_list:
            log(f"updates: {block} ({args.updates} + 1 warm-up)")
            t_block = time.time()
            block_meter = common.BusyMeter()
            became_before = len(common.harness.events(d, "spare.became"))
            load = LoadSet(d.port, common.MIXES["normal"]).start() if block.endswith("+load") else None
            rows: list[dict[str, Any]] = []
            warmup: dict[str, Any] = {}
            try:
                if load is not None:
                    time.sleep(3)
                for i in range(args.updates + 1):
                    n += 1
                    files = None
                    requirements = requirements_for(block, base_req, n)
                    if block == "proto4-sized" and i == 0:
                        sample = (common.harness.SAMPLE / "main.py").read_text()
                        files = {"main.py": HEAVY_IMPORTS + sample}
                        requirements = PROTO4_REQUIREMENTS
                    if spare and load is None:
                        d.wait_status(lambda s: (s["app"].get("spare") or {}).get("state") == "warm", 180,
                                      "a warm spare")
                    row = one_update(d, origin, f"u{n}", requirements, files, args.trigger, staged=block == "staged",
                                     ahead=ahead and load is None and block != "staged")
                    if i == 0:
                        warmup = row
                    else:
                        rows.append(row)
                    time.sleep(0.5)
            finally:
                if load is not None:
                    load.stop()
                    failed = sum(1 for r in load.results() if not r.ok)
                    log(f"  load: {load.count():,} requests, {failed} failed")
            # The app's own start time: spawn -> ready (the bench starts the current release's uvicorn itself),
            # and first line -> ready of the daemon's processes in logs/app.log during this block.
            current = (d.root / "current").resolve()
            rel = releases.read_release(Paths(d.root), current.name)
            python = releases.python_for(Paths(d.root), rel)
            spawns = [common.spawn_ready_seconds(python, current) for _ in range(args.app_starts)]
            in_log = [(role, secs) for role, at, secs in common.app_log_start_times(d.root / "logs" / "app.log")
                      if at >= t_block]
            blocks[block] = {"rows": rows, "warmup": warmup, "app_start_spawn_s": spawns,
                             "spare_became": len(common.harness.events(d, "spare.became")) - became_before,
                             "prepared_ahead": sum(1 for r in rows if r.get("prepared_ahead")),
                             "machine_load": block_meter.read(),
                             "app_start_log_s": {role: [s for r, s in in_log if r == role]
                                                 for role in sorted({r for r, _ in in_log})}}
    finally:
        with contextlib.suppress(Exception):
            d.stop(60)
        d.cleanup()
    return {"blocks": blocks}


def med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), 3) if vals else None


def update_table(part1: dict[str, Any]) -> str:
    rows = []
    for block, b in part1["blocks"].items():
        items = b["rows"]
        label = {"unchanged": "unchanged (idle)", "changed": "requirements changed (new venv, uv warm cache)",
                 "unchanged+load": "unchanged, under normal load",
                 "proto4-sized": "Proto4-sized app, unchanged",
                 "staged": "promote of a staged release (`proto4d stage`, then `promote`)"}[block]
        for name, sel in ((label, items), (f"{label}: first update" if block == "proto4-sized" else "", None)):
            if not name:
                continue
            sel = sel if sel is not None else [b["warmup"]]
            row: list[Any] = [name, f"{sum(1 for r in sel if r['outcome'] == 'done')}/{len(sel)}"]
            for col in STEP_COLUMNS:
                row.append(fmt(med([r.get(col) for r in sel]), 2))
            t2v = [r["trigger_to_verified"] for r in sel]
            row += [fmt(med(t2v), 2), fmt(max(t2v) if t2v else None, 2), fmt(med(b["app_start_spawn_s"]), 2),
                    fmt(med(b["app_start_log_s"].get("app") or b["app_start_log_s"].get("canary", [])), 3)]
            rows.append(row)
    return md_table(["block", "done", *STEP_COLUMNS, "trigger->verified", "max", "app start (spawn->ready)",
                     "app start (first line->ready)"], rows)


# --------------------------------------------------------------------------- part 2


@contextlib.contextmanager
def env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def pip_pypi_only() -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(common.pypi_only_env(saved))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def build_once(base: Path, req_file: Path, installer: str, upgrade_after: bool = False) -> tuple[float, float | None]:
    """(seconds to build, seconds of a following `pip install --upgrade -r` into it: the old way's step)."""
    root = Path(os.path.realpath(base)) / f"root-{time.monotonic_ns()}"
    paths = Paths(root)
    paths.venvs.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    result = releases.ensure_venv(paths, req_file, sys.executable, installer, progress=lambda _t: None)
    took = time.monotonic() - t
    assert not result.reused and result.installer == installer, result
    upgrade = None
    if upgrade_after:
        t = time.monotonic()
        subprocess.run([str(releases.venv_python(result.path)), "-m", "pip", "install", "-q", "--upgrade", "-r",
                        str(req_file)], check=True, capture_output=True, timeout=600)
        upgrade = time.monotonic() - t
    shutil.rmtree(root, ignore_errors=True)
    return took, upgrade


def run_venvs(args: argparse.Namespace, base: Path) -> list[dict[str, Any]]:
    sets = {"sample (uvicorn " + common.UVICORN_LABEL[args.uvicorn] + ")": common.UVICORN_REQUIREMENTS[args.uvicorn],
            "Proto4-sized (30 packages)": PROTO4_REQUIREMENTS}
    out = []
    for name, text in sets.items():
        req_dir = base / f"req-{len(out)}"
        req_dir.mkdir(parents=True)
        req_file = req_dir / "requirements.txt"
        req_file.write_text(text)
        for installer in args.installer_list:
            cache = base / f"cache-{installer}-{len(out)}"
            cache.mkdir()
            with pip_pypi_only(), env(UV_CACHE_DIR=str(cache / "uv"), PIP_CACHE_DIR=str(cache / "pip")):
                log(f"venv: {name} with {installer}: cold ...")
                cold, _ = build_once(base, req_file, installer)
                cache_mb = round(common.dir_bytes(cache) / 2**20, 1)
                warm = []
                upgrades = []
                for k in range(args.repeat):
                    log(f"venv: {name} with {installer}: warm {k + 1}/{args.repeat} ...")
                    w, up = build_once(base, req_file, installer, upgrade_after=installer == "pip")
                    warm.append(w)
                    if up is not None:
                        upgrades.append(up)
            out.append({"requirements": name, "installer": installer, "cold_s": round(cold, 2), "cache_mb": cache_mb,
                        "pip_upgrade_s": med(upgrades),
                        "warm_s": [round(w, 2) for w in warm], "warm_median_s": med(warm)})
    return out


def venv_table(rows: list[dict[str, Any]]) -> str:
    return md_table(["requirements", "installer", "cold cache s", "warm cache s (median)", "warm runs",
                     "cache after the cold build MB", "old way: pip install --upgrade into it s"],
                    [[r["requirements"], r["installer"], fmt(r["cold_s"], 2), fmt(r["warm_median_s"], 2),
                      ", ".join(f"{w:.2f}" for w in r["warm_s"]), fmt(r["cache_mb"]), fmt(r.get("pip_upgrade_s"), 2)]
                     for r in rows])


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = common.machine()
    base, cleanup = common.workdir(args.keep, "update")
    started = time.time()
    part1s: dict[str, dict[str, Any]] = {}  # "update.promote[ + app.spare]" -> part 1's blocks
    part2: list[dict[str, Any]] = []
    meter = common.BusyMeter()
    try:
        if not args.skip_updates:
            if args.quiet_wait:
                common.wait_quiet(args.quiet_wait)
            for promote in (["never", "auto"] if args.promote == "both" else [args.promote]):
                for spare in ([False, True] if args.spare == "both" else [args.spare == "on"]):
                    for ahead in ([False, True] if args.ahead == "both" else [args.ahead == "on"]):
                        mode = promote + (" + app.spare" if spare else "") + (" + prepared ahead" if ahead else "")
                        log(f"updates with update.promote: {mode}")
                        sub = "updates-" + promote + ("-spare" if spare else "") + ("-ahead" if ahead else "")
                        part1s[mode] = run_updates(args, base / sub, promote, spare, ahead)
        if not args.skip_venv:
            if args.quiet_wait:
                common.wait_quiet(args.quiet_wait)
            part2 = run_venvs(args, base / "venvs")
    finally:
        cleanup()

    tgts: list[Target] = []
    for mode, part1 in part1s.items():
        for block, b in part1.get("blocks", {}).items():
            start = med(b["app_start_spawn_s"])
            if block == "changed" or start is None or not b["rows"]:
                continue
            t2v = med([r["trigger_to_verified"] for r in b["rows"]])
            tgts.append(Target(f"trigger -> verified, requirements unchanged: {block} (update.promote {mode})", t2v,
                               round(start + 0.5, 3), " s",
                               f"limit = this app's start {start:.2f} s (spawn -> ready) + 0.5 s (issue 12)"))
    for r in part2:
        if r["requirements"].startswith("Proto4"):
            tgts.append(Target(f"Proto4-sized venv from a warm cache ({r['installer']})", r["warm_median_s"], 5.0,
                               " s", "the daemon uses uv when present" if r["installer"] == "uv" else
                               "the fallback without uv"))

    busy = meter.read()
    data = {"bench": "update", "machine_load": busy, "command": common.command_line(), "machine": machine,
            "started_at": started,
            "seconds": round(time.time() - started, 1), "args": vars(args), "updates": part1s, "venvs": part2,
            "targets": [t.to_dict() for t in tgts]}
    path = common.write_json("update", data)
    print("\n## Update time\n")
    print(f"Machine: {common.machine_line(machine)}")
    print(f"Command: `{common.command_line()}`")
    print(f"Load: {common.others_line(busy)}\n")
    for mode, part1 in part1s.items():
        print(f"Trigger -> verified by step, seconds (median of {args.updates} updates per block; update.watch_s 0, "
              "so the watch is excluded; uvicorn " + common.UVICORN_LABEL[args.uvicorn] + f"; update.promote {mode}: "
              + ("one start, the canary promoted in place" if mode.startswith("auto") else "two starts")
              + ("; the spare interpreter became the start in " + ", ".join(
                  f"{b['spare_became']} of {len(b['rows']) + 1} ({block})" for block, b in part1["blocks"].items())
                 if "app.spare" in mode else "")
              + ("; the release prepared ahead in " + ", ".join(
                  f"{b['prepared_ahead']} of {len(b['rows'])} ({block})" for block, b in part1["blocks"].items())
                 if "prepared ahead" in mode else "") + "):\n")
        print(update_table(part1) + "\n")
    if part1s:
        print("\npickup = trigger -> the daemon took the request (a dropped file waits for the 1 s poll; "
              "`proto4d update` wakes the daemon at once); fetch is done before preparing; export, venv, "
              "preflight make up preparing; canary = a full start of the new release on a "
              "private port plus its checks; switching = with promotion in place, `promote` to the verified canary "
              "and its answer once it accepts on the shared socket, SIGTERM the old one, wait until the old one "
              "stops listening; with two starts, the handoff (start again on the shared socket, wait for its ready "
              "line, then the same).\n")
        print("app start: spawn -> \"Uvicorn running on\" of the block's release, started by the bench "
              f"(median of {args.app_starts}); first line -> ready: the daemon's own app processes in logs/app.log "
              "(with the drain shim the first line is printed before uvicorn imports the app; with promotion in place "
              "every start is a canary's).\n")
    if part2:
        print("Venv build alone (proto4d.releases.ensure_venv; cold = empty cache, warm = same cache again):\n")
        print(venv_table(part2))
        print("\nA cold build downloads what the cache holds afterwards: on this machine PyPI answers at hundreds of "
              "MB/s, so cold is close to warm; on a slower link add (cache MB / link speed). pip's time is mostly "
              "its own install work (unpacking, byte-compiling), which a warm cache does not save. The last column "
              "is what the operator's script paid on every update even when nothing changed: `pip install --upgrade "
              "-r requirements.txt` into a venv that already has everything (pip still asks the index about each "
              "package).")
        if any(r["installer"] == "pip" and r["cache_mb"] < 0.5 for r in part2):
            print("Here pip cached nothing during the cold build (the index answered without cacheable headers: an "
                  "HTTP proxy in front of PyPI), so pip's \"warm\" builds downloaded everything again.")
    common.print_targets(tgts, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
