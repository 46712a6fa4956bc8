"""/metrics: the state document in the Prometheus text format, through prometheus_client.

A custom collector builds the families from a fresh snapshot at every scrape, so the numbers
are exactly what the page shows. Counters over updates count the retained update logs
(retention keeps the newest 50): a decrease after pruning reads as a counter reset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from proto4d.web import history

VERDICTS = ("green", "yellow", "red")
STATES = ("idle", "waiting", "noticed", "preparing", "canary", "switching", "verifying", "watching",
          "rolling_back")


class StateCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, Any]], updates: Callable[[], list[dict[str, Any]]]) -> None:
        self.snapshot = snapshot
        self.updates = updates

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot()
        app, act, daemon, upd = s["app"], s["activity"], s["daemon"], s["update"]
        alive = 1.0 if s["alive"] and not s["problem"] else 0.0
        yield _gauge("proto4d_up", "1 when the daemon runs and its status is fresh", alive)
        yield _gauge("proto4d_app_up", "1 when the app runs and passed its health checks",
                     1.0 if alive and app.get("healthy") and app.get("state") == "running" else 0.0)
        c = CounterMetricFamily("proto4d_app_restarts", "App restarts after an exit, since the daemon started")
        c.add_metric([], float(app.get("restarts") or 0))
        yield c
        yield _gauge("proto4d_users", "Distinct client addresses in the activity window", act.get("users") or 0)
        yield _gauge("proto4d_requests_per_minute", "Requests per minute to the app", act.get("rpm") or 0)
        yield _gauge("proto4d_connections", "Established connections on the app's port", act.get("connections") or 0)
        yield _gauge("proto4d_app_cpu_percent", "CPU of the app's process tree, percent of one core",
                     act.get("cpu_percent") or 0)
        yield _gauge("proto4d_app_rss_bytes", "Resident memory of the app's process tree", act.get("rss_bytes") or 0)
        yield _gauge("proto4d_daemon_rss_bytes", "Resident memory of the daemon", daemon.get("rss_bytes") or 0)
        v = GaugeMetricFamily("proto4d_verdict", "1 for the current safety verdict", labels=["verdict"])
        color = s["verdict"]["color"]
        for name in VERDICTS:
            v.add_metric([name], 1.0 if name == color else 0.0)
        yield v
        st = GaugeMetricFamily("proto4d_update_state", "1 for the state of the update in progress (idle: none)",
                               labels=["state"])
        state = upd.get("state") or "idle"
        for name in STATES:
            st.add_metric([name], 1.0 if name == state else 0.0)
        yield st
        health = s.get("health") or {}
        if health.get("latency_ms") is not None:
            yield _gauge("proto4d_health_check_latency_seconds", "The slowest health check of the latest probe",
                         float(health["latency_ms"]) / 1000)
        updates = self.updates()
        counts: dict[str, int] = dict.fromkeys(history.OUTCOMES, 0)
        for u in updates:
            if u.get("outcome"):
                counts[u["outcome"]] = counts.get(u["outcome"], 0) + 1
        uc = CounterMetricFamily("proto4d_updates", "Updates by outcome, over the retained update logs",
                                 labels=["outcome"])
        for outcome, n in sorted(counts.items()):
            uc.add_metric([outcome], float(n))
        yield uc
        sm = SummaryMetricFamily("proto4d_update_step_duration_seconds",
                                 "Time spent in each update step, over the retained update logs", labels=["step"])
        for step, (n, total) in sorted(history.step_durations(updates).items()):
            sm.add_metric([step], count_value=n, sum_value=round(total, 3))
        yield sm
        last = next((u for u in updates if u.get("finished_at")), None)
        if last is not None:
            yield _gauge("proto4d_last_update_timestamp_seconds", "When the latest update ended",
                         float(last["finished_at"]))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def registry(collector: StateCollector) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg
