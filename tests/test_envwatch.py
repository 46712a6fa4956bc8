"""The .env watch: keys named, values never kept (a pure comparison over digests)."""

from __future__ import annotations

from pathlib import Path

from proto4d import envwatch


def test_parse_env_reads_what_dotenv_reads() -> None:
    text = "# comment\nexport A=1\nB = 'two words'\nC=\"q\"\nD=plain # note\n1BAD=x\nnot a line\nE=\n"
    assert envwatch.parse_env(text) == {"A": "1", "B": "two words", "C": "q", "D": "plain", "E": ""}


def test_changes_name_keys_and_never_values(tmp_path: Path) -> None:
    env = tmp_path / "backend" / ".env"
    env.parent.mkdir()
    env.write_text("OPENAI_API_KEY=sk-old-secret\nMODEL=gpt-4o\nGONE=1\n")
    started = envwatch.read_fingerprints(tmp_path, ["backend/.env", "backend/data"], {"TZ": "Asia/Seoul"})
    assert envwatch.changes(started, envwatch.read_fingerprints(tmp_path, ["backend/.env"], {"TZ": "Asia/Seoul"})) == []

    env.write_text("OPENAI_API_KEY=sk-new-secret\nMODEL=gpt-4o\nNEW=1\n")
    now = envwatch.read_fingerprints(tmp_path, ["backend/.env"], {"TZ": "UTC"})
    found = envwatch.changes(started, now)
    assert [c.describe() for c in found] == [
        "app.env: changed TZ",
        "backend/.env: added NEW; removed GONE; changed OPENAI_API_KEY",
    ]
    text = repr(started) + repr(now) + repr(found)
    assert "sk-old-secret" not in text and "sk-new-secret" not in text and "Asia/Seoul" not in text


def test_a_missing_env_file_reads_as_empty(tmp_path: Path) -> None:
    started = envwatch.read_fingerprints(tmp_path, [".env"], {})
    (tmp_path / ".env").write_text("A=1\n")
    assert [c.added for c in envwatch.changes(started, envwatch.read_fingerprints(tmp_path, [".env"], {}))] == [("A",)]


def test_status_names_the_env_keys_changed_since_the_app_started(make_daemon) -> None:
    d = make_daemon().start()
    assert d.status()["app"]["env_changed"] == []
    (d.root / "shared" / ".env").write_text("TUTOR_SECRET=a-new-secret-value\nOPENAI_MODEL=gpt-x\n")
    s = d.wait_status(lambda s: s["app"]["env_changed"], 15, "the .env change in status")
    assert s["app"]["env_changed"] == [".env: added OPENAI_MODEL; changed TUTOR_SECRET"]
    text = d.cli("status").stdout
    assert "changed since the app started: .env: added OPENAI_MODEL" in text and "proto4d restart" in text
    assert "a-new-secret-value" not in (d.root / "state" / "status.json").read_text() + text


def test_restart_applies_a_changed_env_by_the_handoff_with_no_failed_request(make_daemon) -> None:
    from proto4d.demo.loadgen import Load

    d = make_daemon().start()
    before = d.status()["app"]
    (d.root / "shared" / ".env").write_text("TUTOR_SECRET=rotated\n")
    d.wait_status(lambda s: s["app"]["env_changed"], 15, "the .env change in status")
    with Load("127.0.0.1", d.port, users=4) as load:
        assert load.wait_requests(30, 20)
        r = d.cli("restart", "--wait", "--reason", "rotated the secret")
        assert r.returncode == 0, r.stdout + r.stderr
    assert "DONE" in r.stdout and "handoff" in r.stdout
    assert load.failures() == [], load.failures()[:5]
    s = d.wait_status(lambda s: s["app"]["pid"] != before["pid"] and s["update"]["state"] == "idle", 30,
                      "the new process serving")
    assert s["app"]["release"] == before["release"] and s["app"]["env_changed"] == []
    assert [p.name for p in (d.root / "releases").iterdir()] == [before["release"]]
