"""The state tables (proto4d.states) and the one function that changes a state, in milliseconds."""

from __future__ import annotations

import pytest

from proto4d import states
from proto4d.states import IllegalTransition, Machine


@pytest.mark.parametrize("table", [states.UPDATE, states.APP, states.DAEMON], ids=["update", "app", "daemon"])
def test_every_target_is_a_known_state(table):
    for old, allowed in table.items():
        assert allowed <= set(table), f"{old} leads to unknown states {allowed - set(table)}"


@pytest.mark.parametrize("table, initial", [(states.UPDATE, states.REQUESTED), (states.APP, states.STOPPED),
                                            (states.DAEMON, states.STARTING)], ids=["update", "app", "daemon"])
def test_every_state_is_reachable_from_the_initial_one(table, initial):
    seen, todo = {initial}, [initial]
    while todo:
        for nxt in table[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(table)


def test_update_groups_partition_the_states():
    groups = [states.PENDING, states.BEFORE_SWITCH, states.AFTER_SWITCH, states.FINAL]
    assert set().union(*groups) == set(states.UPDATE)
    assert sum(len(g) for g in groups) == len(states.UPDATE)


def test_final_states_lead_nowhere_and_every_other_reaches_one():
    for s in states.FINAL:
        assert states.UPDATE[s] == frozenset()
    for s in set(states.UPDATE) - states.FINAL:
        seen, todo = {s}, [s]
        while todo:
            for nxt in states.UPDATE[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert seen & states.FINAL, f"{s} can never end"


def test_after_the_switch_the_only_way_out_is_done_or_through_rolling_back():
    for s in states.AFTER_SWITCH - {states.ROLLING_BACK}:
        assert states.UPDATE[s] & states.FINAL <= {states.DONE, states.ABORTED}
    # aborted after the switch only before the new process took over (from switching, or from the
    # rollback of such a switch); never once it was verified or watched
    assert states.ABORTED not in states.UPDATE[states.VERIFYING] | states.UPDATE[states.WATCHING]
    assert states.UPDATE[states.ROLLING_BACK] == {states.ROLLED_BACK, states.ROLLING_BACK, states.ABORTED}


def test_superseded_only_before_anything_was_touched():
    for s, allowed in states.UPDATE.items():
        assert (states.SUPERSEDED in allowed) == (s in states.PENDING), s


@pytest.mark.parametrize("state, outcome", [
    ("requested", states.RESUME), ("waiting", states.RESUME), ("noticed", states.RESUME),
    ("preparing", "aborted"), ("canary", "aborted"),
    ("switching", "rolled_back"), ("verifying", "rolled_back"), ("watching", "rolled_back"),
    ("rolling_back", "rolled_back"),
    ("done", None), ("aborted", None), ("rolled_back", None), ("rejected", None), ("superseded", None),
])
def test_recovery_outcome_for_every_state(state, outcome):
    assert states.recovery_outcome(state) == outcome


def test_recovery_of_an_unknown_state_is_an_error_not_a_guess():
    with pytest.raises(IllegalTransition, match="unknown update state 'exploded'"):
        states.recovery_outcome("exploded")


def test_machine_records_then_changes():
    seen: list[tuple[str, str, dict]] = []
    m = Machine(states.UPDATE, states.REQUESTED, lambda old, new, f: seen.append((old, new, f)))
    m.change(states.PREPARING, note="x")
    m.change(states.CANARY)
    assert m.state == states.CANARY
    assert seen == [("requested", "preparing", {"note": "x"}), ("preparing", "canary", {})]


def test_machine_refuses_an_illegal_transition_and_records_nothing():
    seen: list[str] = []
    m = Machine(states.UPDATE, states.DONE, lambda old, new, f: seen.append(new))
    with pytest.raises(IllegalTransition, match="done -> preparing is not an allowed transition"):
        m.change(states.PREPARING)
    assert m.state == states.DONE and seen == []
    with pytest.raises(IllegalTransition, match="unknown state 'exploded'"):
        Machine(states.UPDATE, states.REQUESTED).change("exploded")


def test_a_recorder_that_fails_leaves_the_state_unchanged():
    def record(old, new, fields):
        raise OSError(28, "No space left on device")

    m = Machine(states.UPDATE, states.REQUESTED, record)
    with pytest.raises(OSError):
        m.change(states.PREPARING)
    assert m.state == states.REQUESTED


@pytest.mark.parametrize("old, new, ok", [
    ("stopped", "starting", True), ("starting", "running", True), ("running", "backoff", True),
    ("backoff", "starting", True), ("fatal", "starting", True), ("running", "stopping", True),
    ("stopping", "stopped", True), ("stopping", "running", False), ("stopped", "backoff", False),
])
def test_app_transitions(old, new, ok):
    m = Machine(states.APP, old)
    if ok:
        m.change(new)
        assert m.state == new
    else:
        with pytest.raises(IllegalTransition):
            m.change(new)


def test_daemon_transitions():
    m = Machine(states.DAEMON, states.STARTING)
    for s in (states.RUNNING, states.RELOADING, states.RUNNING, states.STOPPING, states.STOPPING, states.STOPPED):
        m.change(s)
    with pytest.raises(IllegalTransition):
        m.change(states.RUNNING)


def test_logged_recorder_logs_real_changes_only():
    class Log:
        def __init__(self) -> None:
            self.lines: list[tuple[str, dict]] = []

        def debug(self, event: str, **fields) -> None:
            self.lines.append((event, fields))

    log = Log()
    m = Machine(states.APP, states.STOPPED, states.logged(log, "app.state"))
    m.change(states.STARTING)
    m.change(states.STARTING)
    assert log.lines == [("app.state", {"old": "stopped", "new": "starting"})]
