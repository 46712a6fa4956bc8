"""The status page in a real browser: Debian's headless Chromium reads the page served by `proto4d web`
from the files of a real daemon, during a real update.

Screenshots (desktop and phone width) go to test-artifacts/web/ (gitignored). Without Chromium the
test is skipped, unless PROTO4D_REQUIRE_BROWSER=1 (CI sets it, after installing chromium).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cdp import Browser, find_chromium
from harness import Daemon, Origin, wait_for

pytestmark = pytest.mark.e2e

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "web"
ROOT_ENV = {"PROTO4D_ALLOW_ROOT": "1"}


def start_web(d: Daemon) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "proto4d", "web", "--config", str(d.config_path), "--port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    first: list[str] = []
    t = threading.Thread(target=lambda: first.append(proc.stderr.readline() if proc.stderr else ""), daemon=True)
    t.start()
    wait_for(lambda: first or proc.poll() is not None, 20, "proto4d web to say where it listens")
    m = re.search(r"http://127\.0\.0\.1:(\d+)/", first[0] if first else "")
    assert m, f"proto4d web did not start: {first}"
    return proc, f"http://127.0.0.1:{m.group(1)}/"


@pytest.fixture
def browser(tmp_path: Path):
    if find_chromium() is None:
        if os.environ.get("PROTO4D_REQUIRE_BROWSER"):
            pytest.fail("chromium is required (PROTO4D_REQUIRE_BROWSER=1) but not installed")
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    b = Browser(tmp_path / "chromium-profile")
    yield b
    b.close()


@pytest.mark.long
def test_page_follows_a_real_update(make_daemon, origin: Origin, browser: Browser) -> None:
    # The page polls every 2 s and an update of the sample app takes about a second once it starts: the
    # wait before it (quiet for 4 s, or a 4 s notice) is what the page can show as an earlier step.
    d = make_daemon(safety={"quiet_for_s": 4}, update={"watch_s": 3, "notice_grace_s": 4})
    d.start(env=ROOT_ENV)
    for _ in range(3):  # one visitor: the chart has a user
        assert d.get("/version")["status"] == 200
    d.wait_status(lambda s: s["activity"]["users"] >= 1, 10, "the visitor sampled")  # so in activity.jsonl
    web, url = start_web(d)
    try:
        b = browser
        b.navigate(url)
        wait_for(lambda: b.eval("!!window.proto4dPage && proto4dPage.states > 0 && proto4dPage.histories > 0"),
                 15, "the page's first state and history")
        verdict = b.eval("document.getElementById('verdict').dataset.verdict")
        assert verdict in ("green", "yellow", "red")
        assert b.eval("document.getElementById('verdict').textContent") == verdict.upper()
        assert b.eval("document.getElementById('reasons').children.length") >= 1
        # The chart's data: samples from activity.jsonl, with the visitor in them.
        wait_for(lambda: b.eval("Math.max(0, ...proto4dPage.history.users.filter(v => v !== null))") >= 1, 10,
                 "the visitor in the chart's data")
        assert int(b.eval("document.getElementById('chart').dataset.points")) >= 1
        assert b.eval("document.getElementById('chart').querySelector('path.users') !== null")

        # A real update, whose subject the page must show as text, never as markup.
        origin.commit("2", message="v2 <img src=x onerror=alert(1)> & <b>bold</b>")
        r = d.update("--reason", "browser test")
        assert r.returncode == 0, r.stdout + r.stderr
        seen: list[str] = []      # the step the page showed as current, in the order it showed them

        def finished() -> bool:
            current = b.eval("(document.querySelector('#steps li[data-current]') || {dataset: {}}).dataset.step")
            if current and current not in seen:
                seen.append(current)
            d.assert_alive()
            return b.eval("(document.querySelector('#timeline > li') || {dataset: {}}).dataset.outcome") == "done" \
                and "browser test" not in (b.eval("document.getElementById('update').textContent") or "")
        wait_for(finished, 60, "the update to end on the page", interval=0.2)
        # The page followed the update live: it showed at least two steps as current, the watch among them
        # after an earlier one.
        assert "watching" in seen and seen.index("watching") >= 1, f"steps the page showed as they happened: {seen}"

        # The chart marks the update (requested and done), after the page reloaded its history.
        wait_for(lambda: b.eval("document.querySelectorAll('#chart line[data-kind=done]').length") >= 1, 10,
                 "the done mark on the chart")
        assert b.eval("document.querySelectorAll('#chart line[data-kind=requested]').length") >= 1
        # The timeline links to the update's log, served read-only.
        story = b.eval("fetch(document.querySelector('#timeline > li a').href).then(r => r.text())")
        assert "outcome: DONE" in story
        # Escaped: the subject is text in the releases table; no element came from it.
        wait_for(lambda: "<img src=x" in (b.eval("document.getElementById('releases').textContent") or ""), 10,
                 "the new release's subject in the table")
        assert b.eval("document.querySelectorAll('img, b').length") == 0

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        b.viewport(1280, 900)
        b.screenshot(ARTIFACTS / "desktop.png")
        b.viewport(390, 844, mobile=True)
        b.eval("proto4dPage.history && window.dispatchEvent(new Event('resize'))")
        assert b.eval("document.documentElement.scrollWidth") <= 390, "the page is wider than a phone"
        b.screenshot(ARTIFACTS / "phone.png")
        assert b.errors == [], f"console errors: {b.errors}"
    finally:
        web.terminate()
        assert web.wait(10) == 0
