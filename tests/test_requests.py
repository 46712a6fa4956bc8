"""The request-file parser (`proto4d.inbox.parse`): pure bytes in, a Request or the reason out.

Every row is what an operator (or a script, or an attacker with write access to nothing but
the file's content) can put in `<root>/update.request`. The trust rules about the file itself
(owner, mode, symlink, the root directory) need a real file system: tests/test_bad_input_e2e.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import yaml

from proto4d.inbox import KNOWN_KEYS, MAX_REQUEST_BYTES, Request, RequestRejected, parse

FALLBACK = "20261126-030000-abcdef"


@dataclass(frozen=True)
class Good:
    id: str
    data: bytes
    want: dict  # fields of the Request that must have these values (the rest: defaults)


DEFAULTS = {"id": FALLBACK, "action": "update", "ref": None, "force": False, "reason": "", "release": None,
            "requested_by": "", "source": "file", "allow_incompatible": False}

GOOD = [
    Good("empty", b"", {}),
    Good("only-whitespace", b"  \n\t\n\n", {}),
    Good("only-a-comment", b"# update please\n", {}),
    Good("explicit-null-document", b"---\n...\n", {}),
    Good("branch", b"ref: main\n", {"ref": "main"}),
    Good("all-update-keys", b"ref: v1.2.3\nforce: true\nreason: hotfix for the login page\n",
         {"ref": "v1.2.3", "force": True, "reason": "hotfix for the login page"}),
    Good("ref-with-slash-dash-dot", b"ref: feature/x-y_z.1\n", {"ref": "feature/x-y_z.1"}),
    Good("flow-mapping", b"{ref: main, force: false}\n", {"ref": "main"}),
    Good("all-digit-sha", b"ref: 1234567\n", {"ref": "1234567"}),
    # YAML 1.1 would read these as octal 262739, float 1.1 and a date: the ref is the text as written.
    Good("octal-looking-sha", b"ref: 0777123\n", {"ref": "0777123"}),
    Good("float-looking-tag", b"ref: 1.10\n", {"ref": "1.10"}),
    Good("date-looking-tag", b"ref: 2026-01-01\n", {"ref": "2026-01-01"}),
    Good("quoted-ref", b"ref: '0777123'\n", {"ref": "0777123"}),
    Good("yaml-1.1-yes-is-true", b"force: yes\n", {"force": True}),
    Good("force-false", b"force: false\n", {"force": False}),
    Good("reason-null", b"reason:\n", {"reason": ""}),
    Good("reason-newlines-folded", b'reason: "line one\\nline two"\n', {"reason": "line one line two"}),
    Good("reason-500-chars", b"reason: " + b"x" * 500 + b"\n", {"reason": "x" * 500}),
    Good("own-id", b"id: deploy-42.a_b\n", {"id": "deploy-42.a_b"}),
    Good("rollback-to-previous", b"action: rollback\n", {"action": "rollback"}),
    Good("rollback-named", b"action: rollback\nrelease: proto4_20261126_030000_abc1234\nforce: true\n",
         {"action": "rollback", "release": "proto4_20261126_030000_abc1234", "force": True}),
    Good("requested-by-truncated", b"requested_by: " + b"a" * 300 + b"\n", {"requested_by": "a" * 200}),
    Good("requested-by-not-text-ignored", b"requested_by: 5\n", {}),
    Good("byte-order-mark", b"\xef\xbb\xbfref: main\n", {"ref": "main"}),
    Good("document-marker", b"---\nref: main\n", {"ref": "main"}),
    Good("crlf-line-ends", b"ref: main\r\nforce: true\r\n", {"ref": "main", "force": True}),
    Good("restart", b"action: restart\nreason: new .env\n", {"action": "restart", "reason": "new .env"}),
    Good("stage-a-tag", b"action: stage\nref: v2\n", {"action": "stage", "ref": "v2"}),
    Good("promote-forced", b"action: promote\nforce: true\n", {"action": "promote", "force": True}),
    Good("promote-incompatible", b"action: promote\nallow_incompatible: true\n",
         {"action": "promote", "allow_incompatible": True}),
    Good("discard", b"action: discard\nreason: not today\n", {"action": "discard", "reason": "not today"}),
    Good("allow-incompatible", b"allow_incompatible: true\n", {"allow_incompatible": True}),
    Good("exactly-the-size-limit", b"ref: main\n" + b"#" * (MAX_REQUEST_BYTES - 11) + b"\n", {"ref": "main"}),
    Good("what-the-cli-writes", yaml.safe_dump({"action": "update", "ref": "0777123", "force": True,
                                                "reason": "r", "id": "20261126-030000-0a1b2c",
                                                "requested_by": "op@host"}, sort_keys=False).encode(),
         {"ref": "0777123", "force": True, "reason": "r", "id": "20261126-030000-0a1b2c",
          "requested_by": "op@host"}),
]


@dataclass(frozen=True)
class Bad:
    id: str
    data: bytes
    needle: str  # what the reason must say


BAD = [
    Bad("nul-bytes", b"ref: main\x00\n", "binary (contains NUL bytes)"),
    Bad("binary-with-nul", bytes(range(256)), "binary"),
    Bad("latin-1", b"reason: caf\xe9\n", "not UTF-8"),
    Bad("random-high-bytes", b"\xff\xfe\xfd\x80\x81", "not UTF-8"),
    Bad("one-byte-too-big", b"#" * (MAX_REQUEST_BYTES + 1), f"at most {MAX_REQUEST_BYTES}"),
    Bad("huge", b"ref: main\n" * 10_000, "bytes; at most"),
    Bad("invalid-yaml", b"ref: [unclosed\n", "not valid YAML at line"),
    Bad("tab-indent", b"ref:\n\tmain\n", "not valid YAML"),
    Bad("python-tag", b"ref: !!python/object/apply:os.system ['id']\n", "not valid YAML"),
    Bad("two-documents", b"ref: a\n---\nref: b\n", "not valid YAML"),
    Bad("a-list", b"- main\n- force\n", "must be empty or a YAML mapping"),
    Bad("a-scalar", b"main\n", "must be empty or a YAML mapping"),
    Bad("unknown-key", b"reff: main\n", "unknown key(s) in the request file: reff"),
    Bad("unknown-keys-listed", b"branch: main\ncommand: rm -rf /\n", "branch, command"),
    Bad("duplicate-key", b"ref: main\nref: dev\n", "ref: given twice (lines 1 and 2)"),
    Bad("force-quoted-yes", b'force: "yes"\n', "force: expected true or false, got 'yes'"),
    Bad("force-number", b"force: 1\n", "force: expected true or false"),
    Bad("ref-a-list", b"ref: [main, dev]\n", "ref: expected a branch, tag or commit name"),
    Bad("ref-a-mapping", b"ref: {name: main}\n", "ref: expected"),
    Bad("ref-bool", b"ref: true\n", "ref: expected"),
    Bad("ref-with-spaces", b"ref: bad ref with spaces\n", "got 'bad ref with spaces'"),
    Bad("ref-option-injection", b"ref: --upload-pack=touch /tmp/x\n", "ref: expected"),
    Bad("ref-leading-dash", b"ref: -rf\n", "ref: expected"),
    Bad("ref-dotdot", b"ref: main..dev\n", "ref: expected"),
    Bad("ref-lock", b"ref: main.lock\n", "ref: expected"),
    Bad("ref-trailing-slash", b"ref: feature/\n", "ref: expected"),
    Bad("ref-shell-metachars", b"ref: main;reboot\n", "ref: expected"),
    Bad("ref-too-long", b"ref: " + b"a" * 201 + b"\n", "ref: expected"),
    Bad("action-unknown", b"action: deploy\n",
        "action: expected update, rollback, restart, stage, promote or discard, got 'deploy'"),
    Bad("promote-with-ref", b"action: promote\nref: main\n", "promote acts on the staged release"),
    Bad("discard-with-ref", b"action: discard\nref: main\n", "discard acts on the staged release"),
    Bad("stage-names-a-release", b"action: stage\nrelease: proto4_x\n", "only a rollback request names"),
    Bad("stage-incompatible", b"action: stage\nallow_incompatible: true\n", "only an update or a promotion"),
    Bad("restart-with-ref", b"action: restart\nref: main\n", "a restart runs the serving release again"),
    Bad("allow-incompatible-text", b'allow_incompatible: "yes"\n', "allow_incompatible: expected true or false"),
    Bad("allow-incompatible-on-a-rollback", b"action: rollback\nallow_incompatible: true\n",
        "only an update or a promotion carries a migration"),
    Bad("id-path-traversal", b"id: ../../etc/passwd\n", "id: expected letters"),
    Bad("id-number", b"id: 42\n", "id: expected"),
    Bad("id-too-long", b"id: " + b"a" * 65 + b"\n", "id: expected"),
    Bad("reason-a-list", b"reason: [a, b]\n", "reason: expected text"),
    Bad("reason-too-long", b"reason: " + b"x" * 501 + b"\n", "at most 500 characters"),
    Bad("release-on-an-update", b"release: proto4_20261126_030000_abc1234\n", "only a rollback request names"),
    Bad("release-traversal", b"action: rollback\nrelease: ../../etc\n", "release: expected a release name"),
    Bad("rollback-with-ref", b"action: rollback\nref: main\n", "a rollback request names a release, not a ref"),
]


def test_tables_are_big_and_distinct() -> None:
    assert len(GOOD) + len(BAD) >= 25
    assert len({r.id for r in GOOD + BAD}) == len(GOOD) + len(BAD)
    assert len({r.data for r in GOOD + BAD}) == len(GOOD) + len(BAD)


@pytest.mark.parametrize("row", GOOD, ids=[r.id for r in GOOD])
def test_accepted(row: Good) -> None:
    req = parse(row.data, fallback_id=FALLBACK)
    assert isinstance(req, Request)
    got = {k: getattr(req, k) for k in DEFAULTS}
    assert got == {**DEFAULTS, **row.want}


@pytest.mark.parametrize("row", BAD, ids=[r.id for r in BAD])
def test_rejected(row: Bad) -> None:
    with pytest.raises(RequestRejected) as info:
        parse(row.data, fallback_id=FALLBACK)
    reason = str(info.value)
    assert row.needle in reason, reason
    assert "\n" not in reason and len(reason) < 400, reason  # one line, fit for status and the log
    assert "Traceback" not in reason


def test_a_huge_file_is_refused_before_it_is_decoded() -> None:
    # 1 MiB of nested flow lists would make a YAML parser recurse deep; the size check comes first.
    with pytest.raises(RequestRejected, match="bytes; at most"):
        parse(b"[" * (1 << 20), fallback_id=FALLBACK)


def test_the_source_is_kept_and_the_fallback_id_is_used() -> None:
    req = parse(b"", fallback_id="x-1", source="SIGUSR1")
    assert (req.id, req.source) == ("x-1", "SIGUSR1")


def test_round_trip_through_the_journal() -> None:
    req = parse(b"action: rollback\nrelease: proto4_20261126_030000_abc1234\nreason: bad release\n",
                fallback_id=FALLBACK)
    again = Request.from_dict(req.to_dict())
    assert again == req
    assert again.describe() == "rollback to proto4_20261126_030000_abc1234"
    assert parse(b"ref: v2\nforce: true\n", fallback_id="i").describe() == "update to v2 (forced)"
    assert parse(b"", fallback_id="i").describe() == "update to the branch head"


def test_every_known_key_is_accepted_by_the_parser() -> None:
    doc = {"id": "a", "action": "rollback", "force": True, "reason": "r", "release": "proto4_x",
           "requested_by": "me", "requested_at": 1.5}
    assert set(doc) | {"ref", "allow_incompatible"} == KNOWN_KEYS
    parse(yaml.safe_dump(doc).encode(), fallback_id=FALLBACK)
    parse(yaml.safe_dump({"ref": "main", "allow_incompatible": True}).encode(), fallback_id=FALLBACK)
