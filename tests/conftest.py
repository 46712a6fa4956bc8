"""Fixtures for the end-to-end tests: a fresh origin and daemon per test, torn down for sure."""

from __future__ import annotations

import compileall
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Daemon, Origin

# uv (from the test extras) builds release venvs; its cache makes every build after the first fast.
os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")
# These machines run the tests as root, which `proto4d run` refuses unless told (the product never needs root).
if os.geteuid() == 0:
    os.environ.setdefault("PROTO4D_ALLOW_ROOT", "1")


def pytest_configure(config: pytest.Config) -> None:
    # Every daemon and CLI a test starts imports proto4d afresh. Where the environment sets
    # PYTHONDONTWRITEBYTECODE (CI's image does) nothing ever caches its bytecode, and each of those
    # few hundred processes compiled the package from source (0.1 s CPU each, some 30 s of the suite).
    # Compiled once here, before the workers start, under the session's own umask (a daemon under test
    # may run with umask 000: it must not be the one to create __pycache__ in the checkout).
    if not hasattr(config, "workerinput"):
        compileall.compile_dir(Path(__file__).resolve().parents[1] / "daemon" / "proto4d", quiet=2)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # xdist hands tests out in collection order: a 45-second test collected last would run alone at
    # the end while the other workers sit idle. The long ones go first (stable order otherwise).
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    o = Origin(tmp_path)
    o.commit("1")
    return o


@pytest.fixture
def make_daemon(tmp_path: Path, origin: Origin) -> Iterator:
    made: list[Daemon] = []

    def make(**overrides) -> Daemon:
        d = Daemon(tmp_path, origin, **overrides)
        made.append(d)
        return d

    yield make
    for d in made:
        d.cleanup()
    for d in made:
        # SIGKILLed processes take a moment to go; anything still there after that outlived the test.
        deadline = time.monotonic() + 10
        while d.app_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not d.app_pids(), f"app processes outlived the test: {d.app_pids()}"
