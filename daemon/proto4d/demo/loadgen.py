"""A small HTTP load generator for the demo, the tests and the benchmarks (loopback only).

Each simulated user is a thread with its own keep-alive connection (or a fresh one per
request), sending GETs and POSTs with a body, as one student behind the tunnel would:
`X-Forwarded-For` carries the user's address, the way cloudflared presents it. Every
failure is recorded with its time and cause, because "no failed request" is the claim.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Result:
    at: float
    latency: float
    ok: bool
    status: int | None
    error: str
    method: str
    path: str
    user: str


@dataclass
class Mix:
    """What one user sends: weights of GET /, GET /slow (an LLM-call stand-in) and POST /echo."""

    get: float = 0.6
    slow: float = 0.2
    post: float = 0.2
    slow_ms: tuple[int, int] = (50, 300)
    think_s: tuple[float, float] = (0.0, 0.0)  # pause between a user's requests
    keepalive: bool = True
    body_bytes: int = 512


@dataclass
class Load:
    host: str
    port: int
    users: int = 4
    mix: Mix = field(default_factory=Mix)
    timeout: float = 30.0
    first_address: int = 10

    def __post_init__(self) -> None:
        self.results: list[Result] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._on = threading.Event()  # cleared by pause(): the users leave until resume()
        self._on.set()
        self._threads: list[threading.Thread] = []
        self._active = 0

    def start(self) -> Load:
        for i in range(self.users):
            t = threading.Thread(target=self._user, args=(i,), daemon=True, name=f"user-{i}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 35.0) -> None:
        self._stop.set()
        self._on.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))

    def pause(self) -> None:
        """Every user finishes the request it is in, closes its connection and waits (a class break)."""
        self._on.clear()

    def resume(self) -> None:
        self._on.set()

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- reading results

    def snapshot(self) -> list[Result]:
        with self._lock:
            return list(self.results)

    def failures(self, since: float = 0.0) -> list[Result]:
        return [r for r in self.snapshot() if not r.ok and r.at >= since]

    def count(self, since: float = 0.0) -> int:
        return sum(1 for r in self.snapshot() if r.at >= since)

    def wait_requests(self, n: int, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count() >= n:
                return True
            time.sleep(0.02)
        return False

    # -- one user

    def _user(self, i: int) -> None:
        rnd = random.Random(i * 7919 + 1)
        address = f"10.0.{(self.first_address + i) // 250}.{(self.first_address + i) % 250 + 1}"
        conn: http.client.HTTPConnection | None = None
        body = json.dumps({"user": address, "text": "x" * self.mix.body_bytes}).encode()
        while not self._stop.is_set():
            if not self._on.is_set():
                if conn is not None:
                    conn.close()
                    conn = None
                self._on.wait()
                continue
            roll = rnd.random() * (self.mix.get + self.mix.slow + self.mix.post)
            if roll < self.mix.get:
                method, path, payload = "GET", "/", None
            elif roll < self.mix.get + self.mix.slow:
                method, path, payload = "GET", f"/slow?ms={rnd.randint(*self.mix.slow_ms)}", None
            else:
                method, path, payload = "POST", "/echo", body
            if conn is None or not self.mix.keepalive:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            headers = {"X-Forwarded-For": address, "User-Agent": "proto4d-loadgen"}
            if payload is not None:
                headers["Content-Type"] = "application/json"
            if not self.mix.keepalive:
                headers["Connection"] = "close"
            t0 = time.monotonic()
            at = time.time()
            status, error = None, ""
            try:
                conn.request(method, path, body=payload, headers=headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                error = f"{type(e).__name__}: {e}"
                with contextlib.suppress(Exception):
                    conn.close()
                conn = None
            ok = status is not None and status < 400
            with self._lock:
                self.results.append(Result(at, time.monotonic() - t0, ok, status, error, method, path, address))
            think = rnd.uniform(*self.mix.think_s) if self.mix.think_s[1] > 0 else 0.0
            if think:
                self._stop.wait(think)
        if conn is not None:
            conn.close()


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]
