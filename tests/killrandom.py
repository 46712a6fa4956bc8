"""The daemon SIGKILLed at random instants of updates, rollbacks and first starts, then restarted.

Unlike the named pause points of test_killpoints_e2e, the kill lands anywhere: between a fork
and its record, inside a venv build, mid-drain, during a journal write. One real daemon, one
real origin and one root serve the whole run (state accumulates as on a real machine); each
cycle picks an operation, triggers it, waits a random time, SIGKILLs the daemon alone (its
children orphaned, as after a real crash), restarts it (a quarter of the time SIGKILLs it once more
during that recovery and restarts it again) and checks what an operator relies on:

- it serves again within SERVE_BOUND_S (HTTP answers, status healthy);
- once settled: exactly one app process (no orphan), `current` is the release status names,
  that release is verified, and it is the version HTTP answers with;
- `shared/` byte-identical; no half-built release or venv;
- the journal is final and agrees with `current` (done: the target serves; aborted or rolled
  back: the release from before serves), and with status when status names it.

`./dev killrandom [KILLS] [SEED]` runs the full proof (README has its figures); the default
suite runs a few cycles (test_killrandom_e2e.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Daemon, Origin, events, wait_for

SERVE_BOUND_S = 30.0  # from the restart to the app answering healthy again
SETTLE_BOUND_S = 90.0  # until every invariant holds (a resumed update may run to its end first)
REKILL_P = 0.25  # share of cycles whose recovery is killed too
REKILL_WINDOW_S = 1.5
STABLE_S = 1.5  # "settled" must hold this long (three status samples)
FINAL = ("done", "aborted", "rolled_back", "rejected", "superseded", "staged")
# operation -> the span (s) after its trigger in which the kill lands, uniformly
# (about the operation's own length here, so most kills land inside it, some just after)
WINDOWS = {"update": 5.0, "crashing_update": 7.0, "rollback": 4.0, "first_start": 3.5,
           # `proto4d stage`; and `promote` of a release staged just before (the kill lands in the promotion)
           "stage": 3.0, "stage_promote": 4.0,
           # a push alone: the next look (1 s apart while nobody is on) fetches and prepares it in ~0.5 s
           "ahead": 2.0}


@dataclass
class Cycle:
    n: int
    op: str
    delay: float
    rekill: float | None = None  # a second kill, this long into the recovery
    serve_s: float = 0.0
    settle_s: float = 0.0
    journal: str = ""
    error: str = ""


@dataclass
class Result:
    seed: int
    cycles: list[Cycle] = field(default_factory=list)

    @property
    def failures(self) -> list[Cycle]:
        return [c for c in self.cycles if c.error]

    def summary(self) -> str:
        done = [c for c in self.cycles if not c.error]
        ops: dict[str, int] = {}
        outcomes: dict[str, int] = {}
        for c in self.cycles:
            ops[c.op] = ops.get(c.op, 0) + 1
            outcomes[c.journal or "-"] = outcomes.get(c.journal or "-", 0) + 1
        serve = max((c.serve_s for c in done), default=0.0)
        settle = max((c.settle_s for c in done), default=0.0)
        rekills = sum(1 for c in self.cycles if c.rekill is not None)
        return (f"{len(self.cycles) + rekills} kills in {len(self.cycles)} cycles ({rekills} during a recovery; "
                f"seed {self.seed}): {len(done)} cycles recovered, {len(self.failures)} failed; "
                f"operations {ops}; journal after recovery {outcomes}; "
                f"max time to serve again {serve:.1f} s (bound {SERVE_BOUND_S:g} s), max to settle {settle:.1f} s")


def tree_digest(root: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


class KillRandom:
    def __init__(self, base: Path, seed: int, log=print, spare: bool = False, ahead: bool = False) -> None:
        self.rng = random.Random(seed)
        self.result = Result(seed)
        self.log = log
        self.origin = Origin(base)
        self.version = 1
        self.origin.commit("1")
        self.ahead = ahead
        self.d = Daemon(base, self.origin, update={"watch_s": 2, "drain_timeout_s": 5,
                                                   **({"prepare_ahead_s": 1} if ahead else {})},
                        **({"app": {"spare": True}} if spare else {}))
        (self.d.root / "shared" / "data").mkdir(parents=True, exist_ok=True)
        (self.d.root / "shared" / "data" / "answers.db").write_bytes(os.urandom(4096))
        self.shared = tree_digest(self.d.root / "shared")

    def close(self) -> None:
        self.d.cleanup()

    # -- one cycle

    def request(self, action: str) -> str:
        rid = f"kr-{os.urandom(3).hex()}"
        (self.d.root / "update.request").write_text(f"id: {rid}\naction: {action}\nforce: true\n")
        return rid

    def releases(self) -> list[str]:
        rel = self.d.root / "releases"
        return sorted(p.name for p in rel.iterdir() if not p.name.startswith(".")) if rel.is_dir() else []

    def previous(self) -> str | None:
        """The release a rollback would go back to, when it still exists."""
        cur = self.d.root / "current"
        try:
            prev = json.loads((cur.resolve() / "release.json").read_text()).get("previous")
        except (OSError, ValueError):
            return None
        return prev if prev and (self.d.root / "releases" / prev).is_dir() else None

    def trigger(self, op: str) -> None:
        d = self.d
        if op == "first_start":
            # A fresh install on this machine: nothing but shared/ (and the venv cache, as after a reinstall).
            # The branch head may be a crashing version an earlier cycle rolled back: a fresh install takes a
            # healthy head (a first release that crashes after its checks is a crash loop, another test).
            self.version += 1
            self.origin.commit(str(self.version))
            assert d.stop() == 0
            for name in ("releases", "mirror"):
                shutil.rmtree(d.root / name, ignore_errors=True)
            for name in ("current", "state/journal.json"):
                (d.root / name).unlink(missing_ok=True)
            d.start(wait_healthy=False)
            return
        if op == "rollback":
            self.request("rollback")
            return
        if op == "ahead":  # a push and no request: killed while the daemon prepares the new head ahead
            self.version += 1
            self.origin.commit(str(self.version))
            return
        if op in ("stage", "stage_promote"):
            self.version += 1
            self.origin.commit(str(self.version))
            rid = self.request("stage")
            if op == "stage_promote":
                answer = self.d.root / "state" / "answers" / f"{rid}.json"
                wait_for(lambda: json.loads(answer.read_text())["state"] == "staged", 60, "the release staged")
                self.request("promote")
            return
        self.version += 1
        self.origin.commit(str(self.version), mode="crash_after 1.5" if op == "crashing_update" else "healthy")
        self.request("update")

    def cycle(self, n: int) -> Cycle:
        op = self.rng.choice(["update", "update", "crashing_update", "rollback", "first_start", "stage",
                              "stage_promote", *(["ahead", "ahead"] if self.ahead else [])])
        if op == "rollback" and not self.previous():
            op = "update"
        c = Cycle(n, op, round(self.rng.uniform(0, WINDOWS[op]), 3))
        self.trigger(op)
        time.sleep(c.delay)  # the random instant itself: this is the point of the test, not a synchronisation
        self.d.kill()
        self.d.start(wait_healthy=False)
        if self.rng.random() < REKILL_P:
            # and once more while it recovers (ending orphans, settling the journal, starting the app)
            c.rekill = round(self.rng.uniform(0, REKILL_WINDOW_S), 3)
            time.sleep(c.rekill)
            self.d.kill()
            self.d.start(wait_healthy=False)
        t0 = time.monotonic()
        try:
            self.wait_serving()
            c.serve_s = time.monotonic() - t0
            c.journal = self.settle_and_check()
            c.settle_s = time.monotonic() - t0
            if c.serve_s > SERVE_BOUND_S:
                c.error = f"served again only after {c.serve_s:.1f} s (bound {SERVE_BOUND_S:g} s)"
        except AssertionError as e:
            c.error = str(e)[:2000]
        return c

    def wait_serving(self) -> None:
        d = self.d

        def serving() -> bool:
            s = d.status()
            if s["daemon"]["pid"] != d.proc.pid or not s["app"]["healthy"]:
                return False
            return d.get("/health", timeout=2)["status"] == 200

        wait_for(lambda: (d.assert_alive(), serving())[1], SERVE_BOUND_S + 30, "the app serving again")

    def settle_and_check(self) -> str:
        d = self.d
        root = d.root

        stable: dict[str, object] = {}

        def settled():
            if (root / "update.request").exists() or list((root / "state" / "requests").glob("*.request")):
                return None  # a request not yet taken (the killed daemon's, acted on now)
            s = d.status()
            if s["daemon"]["pid"] != d.proc.pid or s["update"]["state"] != "idle" or s["update"].get("queued"):
                return None
            if not (s["app"]["healthy"] and s["app"]["state"] == "running") or s["app"]["draining"]:
                return None
            if (s.get("ahead") or {}).get("state") in ("looking", "preparing"):
                return None  # its temp dir is work going on, not left behind
            rel = s["app"]["release"]
            info = json.loads((root / "releases" / rel / "release.json").read_text())
            if info.get("outcome") != "verified":
                return None
            jpath = root / "state" / "journal.json"
            j = json.loads(jpath.read_text()) if jpath.exists() else {}
            if j and j["state"] not in FINAL:
                return None  # a resumed request not yet acted on
            # status.json is rewritten every sample (0.5 s): what it says must hold over a few samples
            key = (s["app"]["pid"], rel, j.get("id"), j.get("state"))
            if stable.get("key") != key:
                stable.update(key=key, since=time.monotonic())
                return None
            return s if time.monotonic() - float(stable["since"]) >= STABLE_S else None

        s = wait_for(lambda: (d.assert_alive(), settled())[1], SETTLE_BOUND_S, "settled on one verified release")
        rel = s["app"]["release"]
        assert (root / "current").resolve().name == rel, f"current is not {rel}"
        info = json.loads((root / "releases" / rel / "release.json").read_text())
        assert info["commit"] == s["app"]["commit"], (info["commit"], s["app"]["commit"])
        served = d.get()["version"]
        assert served == (root / "releases" / rel / "VERSION").read_text().strip(), (served, rel)
        st = s.get("stage")
        if st is not None:  # a stage request the killed daemon had not started was resumed and staged
            assert st["running"] and (root / "releases" / st["release"]).is_dir(), st
            self.request("discard")
            wait_for(lambda: d.status().get("stage") is None and not (root / "state" / "stage.json").exists(), 30,
                     "the resumed stage discarded")
            assert not (root / "releases" / st["release"]).exists(), st
        def only_the_serving_process() -> bool:  # and with app.spare, a spare the daemon knows
            return d.app_pids() == [s["app"]["pid"]]

        wait_for(only_the_serving_process, 30, f"only the serving process {s['app']['pid']} and the daemon's spare "
                 f"(have {d.app_pids()})")
        assert not [p for p in self.releases_hidden()], f"half-built left: {self.releases_hidden()}"
        assert tree_digest(root / "shared") == self.shared, "shared/ changed"
        # a staged process ends with the daemon that staged it: the next one removes what it left
        assert not (root / "state" / "stage.json").exists(), "a stage outlived its daemon"
        canary = root / "state" / "canary"
        assert not (canary.is_dir() and list(canary.iterdir())), f"canary copies left: {list(canary.iterdir())}"
        jpath = root / "state" / "journal.json"
        if not jpath.exists():
            return "-"
        j = json.loads(jpath.read_text())
        assert j["state"] in FINAL, j["state"]
        if j["state"] == "done" and j.get("new_release"):
            assert rel == j["new_release"] or rel == j.get("current"), (j, rel)
        elif j["state"] in ("aborted", "rolled_back") and j.get("old_release"):
            assert rel == j["old_release"], (j["state"], j.get("old_release"), rel)
        last = s["update"].get("last") or {}
        if last.get("id") == j["id"]:
            assert last.get("state") == j["state"], (last, j["state"])
        return j["state"]

    def releases_hidden(self) -> list[str]:
        out = []
        for sub in ("releases", "venvs"):
            p = self.d.root / sub
            if p.is_dir():
                out += [f"{sub}/{x.name}" for x in p.iterdir() if x.name.startswith(".")]
        return out

    def run(self, cycles: int, stop_on_failure: bool = False) -> Result:
        self.d.start(wait_healthy=True)
        for n in range(1, cycles + 1):
            c = self.cycle(n)
            self.result.cycles.append(c)
            again = f", again +{c.rekill:4.2f} s into the recovery" if c.rekill is not None else ""
            self.log(f"[{n}/{cycles}] {c.op:<16} kill at +{c.delay:5.2f} s{again} -> "
                     + (f"FAILED: {c.error}" if c.error else
                        f"served after {c.serve_s:4.1f} s, settled after {c.settle_s:4.1f} s, journal {c.journal}"))
            if c.error:
                self.log(self.d.tail(40))
                if stop_on_failure:
                    break
                try:  # start the next cycle from a clean daemon
                    self.d.stop()
                except AssertionError:
                    self.d.cleanup()
                self.d.start(wait_healthy=True)
        return self.result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cycles", nargs="?", type=int, default=100,
                    help="operations to kill (a quarter are killed a second time during their recovery)")
    ap.add_argument("seed", nargs="?", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--spare", action="store_true", help="app.spare on: kills also land while a spare warms, "
                    "waits and becomes a release's process")
    ap.add_argument("--ahead", action="store_true", help="update.prepare_ahead_s 1: kills also land while the "
                    "daemon prepares a pushed head ahead (a cycle that only pushes), and updates take those releases")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")
    os.environ.setdefault("PROTO4D_ALLOW_ROOT", "1")  # as the test suite does: CI machines run as root
    base = Path(tempfile.mkdtemp(prefix="proto4d-killrandom-"))
    kr = KillRandom(base, seed, log=lambda m: print(m, flush=True), spare=args.spare, ahead=args.ahead)
    t = time.monotonic()
    seen = ""  # what the kills met: spares, preparations ahead (from the daemon's log)
    try:
        result = kr.run(args.cycles)
        if args.spare:  # that the kills met spares at all: what they did, from the daemon's log
            seen = "; spare " + ", ".join(f"{what} {len(events(kr.d, 'spare.' + what))}"
                                            for what in ("warm", "became", "unused", "ended", "exited", "failed"))
        if args.ahead:
            seen += "; ahead " + ", ".join(f"{what} {len(events(kr.d, 'ahead.' + what))}"
                                             for what in ("preparing", "ready", "removed", "stopped", "failed"))
    finally:
        kr.close()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(result.summary() + seen + f"; {time.monotonic() - t:.0f} s in all")
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
