"""Property-based fuzzing (hypothesis) of the three parsers that read what others write: the access-log
parser (app output), the request-file parser (a file in root) and the config loader.

Properties: no exception escapes any of them; every rejection names its reason (a request file's
RequestRejected and a config's ConfigError say what was expected, and a config error names the file);
and what the access-log parser accepts is well-formed (an IP address or nothing as the client, a
status from 100 to 599), however the line was made.

Example counts are kept small so the file runs in a few seconds in the default suite; raise them with
`PROTO4D_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/test_fuzz.py -p no:xdist` for a long run.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto4d import config
from proto4d.accesslog import AccessRecord, parse_channel_record, parse_line
from proto4d.inbox import KNOWN_KEYS, Request, RequestRejected, parse

EXAMPLES = int(os.environ.get("PROTO4D_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                database=None, derandomize="PROTO4D_FUZZ_EXAMPLES" not in os.environ)


# --------------------------------------------------------------------------- access log

def check_record(rec: AccessRecord | None) -> None:
    if rec is None:
        return
    assert 100 <= rec.status <= 599, rec
    if rec.client:
        ipaddress.ip_address(rec.client)
    assert rec.port is None or 0 <= rec.port <= 65535, rec


ips = st.one_of(st.ip_addresses().map(str), st.sampled_from(["kim", "1.2.3.4.5", "", "::1", "300.1.1.1"]))
tokens = st.one_of(st.text(max_size=12), st.sampled_from(["GET", "POST", "/", "/x?y=1", "HTTP/1.1", "500", '"', " - "]))


@st.composite
def uvicorn_like(draw: st.DrawFn) -> str:
    """Lines near uvicorn's format, with any part replaced by something else."""
    prefix = draw(st.sampled_from(["INFO:     ", "ERROR:    ", "", "2026-11-26 03:00:00,123 INFO:     ", "tutor> "]))
    client = draw(ips)
    port = draw(st.one_of(st.integers(-1, 70000).map(str), st.text(max_size=4)))
    method = draw(st.one_of(st.sampled_from(["GET", "POST", "get", "WebSocket"]), st.text(max_size=6)))
    target = draw(st.one_of(st.sampled_from(["/", "/a?b", "hello", '/q?"x"']), st.text(max_size=10)))
    status = draw(st.one_of(st.integers(0, 1000).map(str), st.text(max_size=4)))
    tail = draw(st.one_of(st.just(""), st.just(" OK"), st.text(max_size=10)))
    return f'{prefix}{client}:{port} - "{method} {target} HTTP/1.1" {status}{tail}'


@FUZZ
@given(st.one_of(st.text(max_size=300), uvicorn_like()))
def test_fuzz_access_log_line(line: str) -> None:
    check_record(parse_line(line))


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from("cmts") | st.text(max_size=3),
                                                                           inner, max_size=5)),
    max_leaves=10).map(lambda v: __import__("json").dumps(v).encode())))
def test_fuzz_access_channel_record(line: bytes) -> None:
    check_record(parse_channel_record(line))


# --------------------------------------------------------------------------- request file

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=30),
                    st.sampled_from(["main", "v1.10", "0777123", "2026-01-01", "a..b", "-x", "yes", "~"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=6)
docs = st.dictionaries(st.one_of(st.sampled_from(sorted(KNOWN_KEYS)), st.text(max_size=8)), values, max_size=6)


def check_request(data: bytes) -> None:
    try:
        req = parse(data, fallback_id="20261126-030000-abcdef")
    except RequestRejected as e:
        assert str(e).strip(), f"a rejection without a reason for {data!r}"
        return
    assert isinstance(req, Request) and req.action in ("update", "rollback")
    assert req.ref is None or isinstance(req.ref, str)
    assert isinstance(req.force, bool) and len(req.reason) <= 500


@FUZZ
@given(docs)
def test_fuzz_request_document(doc: dict[str, Any]) -> None:
    check_request(yaml.safe_dump(doc, allow_unicode=True).encode())


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_fuzz_request_bytes(data: bytes) -> None:
    check_request(data)


# --------------------------------------------------------------------------- config

BASE: dict[str, Any] = {
    "root": "state", "python": sys.executable,
    "app": {"repo": "origin", "branch": "main", "subdir": "", "workdir": "", "requirements": "",
            "command": ["{python}", "-m", "uvicorn", "main:app", "--fd", "{fd}"], "env": {}, "shared": []},
    "listen": {"host": "127.0.0.1", "port": 8000},
    "health": {"checks": [{"path": "/health", "status": [200]}], "start_timeout_s": 60},
    "activity": {"interval_s": 5, "window_s": 300, "ignore_paths": ["/health"], "tunnel_process": ""},
    "safety": {"yellow_max_users": 2, "quiet_for_s": 120},
    "schedule": {"timezone": "UTC", "preferred": ["02:00-06:00"], "avoid": []},
    "update": {"watch_s": 120, "max_5xx_ratio": 0.2, "min_5xx_count": 5, "min_5xx_clients": 2},
    "notify": {"notice_file": "notice.json", "webhook_url": ""},
}
PATHS = [(s, k) for s, v in BASE.items() if isinstance(v, dict) for k in v] + [(k, None) for k in BASE]


@st.composite
def mutated_config(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    section, key = draw(st.sampled_from(PATHS))
    value = draw(values)
    if key is None:
        doc[section] = value
        return section, doc
    doc[section][key] = value
    return f"{section}.{key}", doc


@settings(FUZZ, max_examples=max(10, EXAMPLES // 3))  # each example builds a whole config
@given(mutated_config())
def test_fuzz_config_one_key(tmp_path_factory: Any, mutation: tuple[str, dict[str, Any]]) -> None:
    path, doc = mutation
    base = tmp_path_factory.getbasetemp() / "fuzz-config"
    (base / "origin").mkdir(parents=True, exist_ok=True)
    try:
        config.parse(yaml.safe_dump(doc, allow_unicode=True), "fuzz.yaml", base_dir=base)
    except config.ConfigError as e:
        text = str(e)
        assert text.startswith("fuzz.yaml"), text
        assert e.expected.strip(), text
        # The error is about the key that was changed (or a key inside it), never elsewhere.
        assert e.key == "" or e.key.startswith(path) or path.startswith(e.key) or path.split(".")[0] in e.key, \
            (path, text)


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_fuzz_config_bytes(tmp_path_factory: Any, data: bytes | str) -> None:
    base: Path = tmp_path_factory.getbasetemp()
    try:
        config.parse(data, "fuzz.yaml", base_dir=base)
    except config.ConfigError as e:
        assert str(e).startswith("fuzz.yaml") and e.expected.strip(), str(e)
