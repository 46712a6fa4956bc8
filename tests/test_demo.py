"""`proto4d demo` end to end: the README's main command, run exactly as a user would."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.e2e


def _processes_mentioning(marker: str) -> list[str]:
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            if p.pid == os.getpid() or p.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            if marker in cmd or marker in (p.info["cwd"] or ""):
                out.append(f"{p.pid}: {cmd[:200]}")
        except psutil.Error:
            continue
    return out


@pytest.mark.long
def test_demo_tells_the_whole_story_and_leaves_nothing_behind(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PROTO4D_CONFIG", "PROTO4D_DEMO_KEEP", "NOTIFY_SOCKET")}
    env["TMPDIR"] = str(tmp_path)  # the demo's temp dir lands here, so a leftover cannot hide
    try:
        r = subprocess.run([sys.executable, "-m", "proto4d", "demo"], capture_output=True, text=True, timeout=180,
                           env=env, cwd=tmp_path, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"the demo did not finish within 180 s:\n{out[-4000:]}")
    out = r.stdout
    assert r.returncode == 0, f"exit {r.returncode}\n{out[-6000:]}\n{r.stderr[-3000:]}"

    m = re.search(r"proto4d demo: .* in (\S+)$", out.splitlines()[0])
    assert m, out.splitlines()[:3]
    base = m.group(1)
    assert base.startswith(str(tmp_path.resolve())), base
    assert not Path(base).exists(), f"the demo left {base} behind"
    assert _processes_mentioning(base) == []

    assert re.search(r"failed requests during the update to v2: 0 of [1-9]\d*", out), out
    assert re.search(r"failed requests during the rollback switch: 0 of [1-9]\d*", out), out
    assert "rolled_back" in out and "ROLLED_BACK" in out
    assert re.search(r"rolled back: v2 \(\S+\) serves again", out), out
    assert "the daemon exited 0" in out and "no app process left" in out
    summary = out.strip().splitlines()[-2]
    assert summary.startswith("demo complete:"), summary
    assert re.search(r"switches: 0 \+ 0", summary), summary
    assert "updates done: 1" in summary and "rollbacks: 1" in summary
    assert re.search(r"\[\s*\d+\.\d+s\] == Act 1: v1 serving ==", out)
    assert "\x1b[" not in out, "no colour codes when stdout is not a terminal"
