"""The decisions of ahead.py, without processes: when to look, and whether a release prepared ahead may
stand for an update's commit."""

from __future__ import annotations

from proto4d import ahead

WANT = {"subdir": "", "workdir": "", "requirements": "requirements.txt", "shared": [".env"], "bytecode": False}
SHA = "a" * 40


def info(**over):
    base = {"commit": SHA, "outcome": "prepared", "venv": "k1", "ahead": {"at": 1.0, "inputs": dict(WANT)}}
    base.update(over)
    return base


def test_due_only_while_nobody_is_on_nothing_prepares_and_the_interval_passed():
    assert ahead.due(now=100, last=None, every_s=600, green=True, busy=False)
    assert not ahead.due(now=100, last=None, every_s=600, green=False, busy=False)
    assert not ahead.due(now=100, last=None, every_s=600, green=True, busy=True)
    assert not ahead.due(now=100, last=None, every_s=0, green=True, busy=False), "0 = never"
    assert not ahead.due(now=699, last=100, every_s=600, green=True, busy=False)
    assert ahead.due(now=700, last=100, every_s=600, green=True, busy=False)


def test_a_fitting_release_is_taken():
    assert ahead.unfit(info(), commit=SHA, want=WANT, venv_key="k1") == ""


def test_each_reason_a_release_prepared_ahead_does_not_fit():
    assert "not prepared ahead" in ahead.unfit(info(ahead=None), commit=SHA, want=WANT, venv_key="k1")
    assert "outcome verified" in ahead.unfit(info(outcome="verified"), commit=SHA, want=WANT, venv_key="k1")
    assert "commit bbbbbbb" in ahead.unfit(info(commit="b" * 40), commit=SHA, want=WANT, venv_key="k1")
    assert ahead.unfit(info(), commit=SHA, want={**WANT, "shared": [".env", "uploads"]},
                       venv_key="k1") == "changed since it was prepared: app.shared"
    assert ahead.unfit(info(), commit=SHA, want={**WANT, "bytecode": True, "subdir": "app"},
                       venv_key="k1") == "changed since it was prepared: app.user, app.subdir"
    assert "its record" in ahead.unfit(info(ahead={"at": 1}), commit=SHA, want=WANT, venv_key="k1")
    assert "venv" in ahead.unfit(info(), commit=SHA, want=WANT, venv_key="k2")
