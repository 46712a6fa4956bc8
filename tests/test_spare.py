"""The spare's pure decisions: when a warm spare may stand in for a cold start, and what of the serving
process's module list is kept."""

from __future__ import annotations

from proto4d import spare
from proto4d.spare import Key, clean_modules, mismatch

BASE = {"PATH": "/v/bin:/usr/bin", "PYTHONPATH": "/shim", "TUTOR_SECRET": "s3cr3t", "PROTO4D_RELEASE": "r1"}


def test_a_cold_start_of_the_same_interpreter_user_and_environment_is_stood_in_for() -> None:
    spare_key = Key.of("/v/bin/python", "", {**BASE, spare.ENV: "7", "PROTO4D_ACCESS_FD": "5"})
    # What differs between any two processes by design: the release's name, the descriptors' numbers.
    cold = Key.of("/v/bin/python", "", {**BASE, "PROTO4D_RELEASE": "r2", "PROTO4D_SHARED_FD": "4",
                                        "PROTO4D_CONTROL_FD": "6", "PROTO4D_ACCESS_FD": "5"})
    assert mismatch(spare_key, cold) == ""


def test_anything_else_is_a_cold_start_and_the_reason_names_keys_never_values() -> None:
    s = Key.of("/v/bin/python", "", BASE)
    assert "another interpreter" in mismatch(s, Key.of("/w/bin/python", "", BASE))
    assert mismatch(s, Key.of("/v/bin/python", "tutor", BASE)) == "another user (tutor, the spare runs as the daemon's)"
    why = mismatch(s, Key.of("/v/bin/python", "", {**BASE, "TUTOR_SECRET": "other", "TZ": "UTC"}))
    assert "TUTOR_SECRET" in why and "TZ" in why and "s3cr3t" not in why and "other" not in why, why
    gone = {k: v for k, v in BASE.items() if k != "PYTHONPATH"}
    assert "PYTHONPATH" in mismatch(s, Key.of("/v/bin/python", "", gone))
    many = {**BASE, **{f"K{i}": "x" for i in range(8)}}
    assert "and 3 more" in mismatch(s, Key.of("/v/bin/python", "", many))


def test_a_module_list_keeps_dotted_names_only() -> None:
    assert clean_modules(["uvicorn.main", "h11", "a.b_c.d1"]) == ["uvicorn.main", "h11", "a.b_c.d1"]
    assert clean_modules(["os; import x", "", "a..b", ".rel", "x" * 201, 3, None, "ok"]) == ["ok"]
    assert clean_modules({"uvicorn": 1}) == [] and clean_modules("uvicorn") == []
    assert len(clean_modules(["m"] * (spare.MAX_MODULES + 5))) == spare.MAX_MODULES
