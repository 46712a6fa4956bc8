"""Every state proto4d has, and which change of state is allowed: data, in one place.

Three machines: an update (what the journal, the answer files and `status` say), the app
process the runner keeps (supervisord's states), and the daemon itself. Each owner keeps its
state in a `Machine` and changes it only through `Machine.change`, which checks the
transition against the table here and calls the owner's recorder (journal, status, log)
before the new state shows. An illegal transition is a bug: it raises instead of being
recorded, so the end-to-end suite and the unit tests catch it.

The state names are the strings on disk (journal.json, answers, status.json): changing one
is changing the files' format (shared/DESIGN.md).

Dependency-free on purpose: everything may import it, it imports nothing of proto4d.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

# -- the update

REQUESTED = "requested"
WAITING = "waiting"
NOTICED = "noticed"
PREPARING = "preparing"
CANARY = "canary"
SWITCHING = "switching"
VERIFYING = "verifying"
WATCHING = "watching"
ROLLING_BACK = "rolling_back"
DONE = "done"
ABORTED = "aborted"
ROLLED_BACK = "rolled_back"
REJECTED = "rejected"
SUPERSEDED = "superseded"
STAGED = "staged"  # `proto4d stage`: the release runs, verified, on the preview address until promoted or discarded

PENDING = frozenset({REQUESTED, WAITING, NOTICED})  # nothing touched yet: a newer request replaces it
BEFORE_SWITCH = frozenset({PREPARING, CANARY})  # work on the side; the live service untouched
AFTER_SWITCH = frozenset({SWITCHING, VERIFYING, WATCHING, ROLLING_BACK})  # the live service changed
FINAL = frozenset({DONE, ABORTED, ROLLED_BACK, REJECTED, SUPERSEDED, STAGED})

# Every state the update's code can move to from each state. An internal error before the switch
# aborts from wherever it happens; after it, the way out is always through rolling_back.
UPDATE: Mapping[str, frozenset[str]] = {
    REQUESTED: frozenset({WAITING, PREPARING, DONE, REJECTED, ABORTED, SUPERSEDED}),
    WAITING: frozenset({NOTICED, PREPARING, ABORTED, SUPERSEDED}),
    NOTICED: frozenset({PREPARING, ABORTED, SUPERSEDED}),
    PREPARING: frozenset({CANARY, SWITCHING, DONE, ABORTED}),
    # staged: a stage run ends once its canary runs verified on the preview address
    CANARY: frozenset({SWITCHING, ABORTED, STAGED}),
    # aborted: the new process never took over (an internal error before the handoff)
    SWITCHING: frozenset({VERIFYING, ROLLING_BACK, ABORTED}),
    VERIFYING: frozenset({WATCHING, ROLLING_BACK}),
    WATCHING: frozenset({DONE, ROLLING_BACK}),
    # rolling_back again: an internal error during a rollback starts the rollback over; aborted: the
    # rollback of a switch whose new process never took over failed on an internal error (the old
    # process still serves)
    ROLLING_BACK: frozenset({ROLLED_BACK, ROLLING_BACK, ABORTED}),
    **{s: frozenset() for s in FINAL},
}

# A daemon that died mid-update settles the journal on its next start; these are the only
# transitions recovery makes, and the only ones it may make without running the steps between.
RESUME = "resume"  # not a state: the request is submitted again from the start


def recovery_outcome(state: str) -> str | None:
    """What a journal left in `state` by a dead daemon becomes: RESUME, ABORTED, ROLLED_BACK, or None
    (already final: nothing to do)."""
    if state in FINAL:
        return None
    if state in PENDING:
        return RESUME
    if state in BEFORE_SWITCH:
        return ABORTED
    if state in AFTER_SWITCH:
        return ROLLED_BACK
    raise IllegalTransition(f"the journal holds an unknown update state {state!r}")


# -- the app process (the runner)

STOPPED = "stopped"
STARTING = "starting"
RUNNING = "running"
BACKOFF = "backoff"
FATAL = "fatal"
STOPPING = "stopping"

# A handoff (update or rollback) may take over from any state but stopping: it starts the release
# on the socket whatever the old process was doing. A failed rollback hands the app to the restart
# policy from wherever it was (backoff or fatal).
APP: Mapping[str, frozenset[str]] = {
    STOPPED: frozenset({STARTING, RUNNING, FATAL, STOPPING}),
    STARTING: frozenset({RUNNING, BACKOFF, FATAL, STARTING, STOPPING}),
    RUNNING: frozenset({STARTING, RUNNING, BACKOFF, FATAL, STOPPING}),
    BACKOFF: frozenset({STARTING, RUNNING, BACKOFF, FATAL, STOPPING}),
    FATAL: frozenset({STARTING, RUNNING, BACKOFF, FATAL, STOPPING}),
    STOPPING: frozenset({STOPPING, STOPPED}),
}

# -- the daemon

RELOADING = "reloading"

DAEMON: Mapping[str, frozenset[str]] = {
    STARTING: frozenset({RUNNING, RELOADING, STOPPING}),
    RUNNING: frozenset({RELOADING, STOPPING}),
    RELOADING: frozenset({RUNNING, STARTING, STOPPING}),  # back to what it was before the reload
    STOPPING: frozenset({STOPPING, STOPPED}),  # a second stop signal, or the shutdown itself
    STOPPED: frozenset(),
}


class IllegalTransition(AssertionError):
    """A change of state the tables above do not allow: a bug in proto4d."""


def check(table: Mapping[str, frozenset[str]], old: str, new: str) -> None:
    allowed = table.get(old)
    if allowed is None:
        raise IllegalTransition(f"unknown state {old!r}")
    if new not in table:
        raise IllegalTransition(f"unknown state {new!r}")
    if new not in allowed:
        raise IllegalTransition(f"{old} -> {new} is not an allowed transition "
                                f"(from {old}: {', '.join(sorted(allowed)) or 'none, it is final'})")


Recorder = Callable[[str, str, dict[str, Any]], None]


def logged(log: Any, event: str) -> Recorder:
    """A recorder that logs each real change (not a repeat) as `event` at debug level; `log` is a
    structlog-style logger (anything with .debug(event, **fields))."""

    def record(old: str, new: str, fields: dict[str, Any]) -> None:
        if old != new:
            log.debug(event, old=old, new=new, **fields)

    return record


class Machine:
    """One owner's current state. `change` checks the transition, then records it through the owner's
    recorder (journal, status, log), then makes it the state: a recorder that raises (a journal that
    cannot be written) leaves the state as it was."""

    def __init__(self, table: Mapping[str, frozenset[str]], initial: str, record: Recorder | None = None) -> None:
        if initial not in table:
            raise IllegalTransition(f"unknown initial state {initial!r}")
        self.table = table
        self._state = initial
        self._record = record

    @property
    def state(self) -> str:
        return self._state

    def change(self, new: str, **fields: Any) -> None:
        old = self._state
        check(self.table, old, new)
        if self._record is not None:
            self._record(old, new, fields)
        self._state = new

    def __repr__(self) -> str:
        return f"Machine({self._state!r})"
