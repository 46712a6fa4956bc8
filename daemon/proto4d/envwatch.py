"""Which configuration keys changed since the app started: `.env` files and `app.env`, values never kept.

A running process read its environment at start; a later edit of the shared `.env` does not
reach it until a restart. To say so in `status` without ever holding a secret, each value is
kept only as a salted digest (the salt lives in memory for the daemon's lifetime), and the
comparison names keys: added, removed, changed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

_SALT = os.urandom(16)


def parse_env(text: str) -> dict[str, str]:
    """KEY=VALUE lines of a dotenv file (export prefix, quotes and comments as python-dotenv reads them)."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "a").isalnum() or key[0].isdigit():
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        out[key] = value
    return out


def fingerprint(values: Mapping[str, str]) -> dict[str, str]:
    return {k: hashlib.blake2b(v.encode(), key=_SALT, digest_size=12).hexdigest() for k, v in values.items()}


@dataclass(frozen=True)
class EnvChange:
    source: str
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def describe(self) -> str:
        parts = [f"{label} {', '.join(keys)}" for label, keys in
                 (("added", self.added), ("removed", self.removed), ("changed", self.changed)) if keys]
        return f"{self.source}: " + "; ".join(parts)


def compare(source: str, before: Mapping[str, str], after: Mapping[str, str]) -> EnvChange:
    return EnvChange(source,
                     added=tuple(sorted(set(after) - set(before))),
                     removed=tuple(sorted(set(before) - set(after))),
                     changed=tuple(sorted(k for k in set(before) & set(after) if before[k] != after[k])))


def read_fingerprints(shared: Path, rels: Iterable[str], app_env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Digests per source: each shared `.env*` file (relative name) and `app.env` (key "app.env")."""
    out = {"app.env": fingerprint(app_env)}
    for rel in rels:
        if not Path(rel).name.startswith(".env"):
            continue
        try:
            text = (shared / rel).read_text(errors="replace")
        except OSError:
            text = ""
        out[rel] = fingerprint(parse_env(text))
    return out


def changes(started: Mapping[str, Mapping[str, str]], now: Mapping[str, Mapping[str, str]]) -> list[EnvChange]:
    """What changed since the process started, per source; empty when nothing did."""
    out = []
    for source in sorted(set(started) | set(now)):
        c = compare(source, started.get(source, {}), now.get(source, {}))
        if c:
            out.append(c)
    return out
