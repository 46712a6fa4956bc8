"""What the resident daemon keeps out of its memory: OpenSSL and httpx, for its whole life.

`import asyncio` imports `ssl`, and `hashlib` imports `_hashlib`; both load OpenSSL's libraries,
about 4-5 MiB of the daemon's RSS that Python never gives back, against a 30 MiB target (issue 12);
httpx (with ssl, its TLS context and h11) is about 7 MiB more. The daemon speaks plain HTTP to its
own app on loopback and hashes a few small files (a config, a requirements file), for which
Python's built-in sha256 does. TLS is needed only for a webhook or `health.external_url`, and those
run in a short-lived helper process (outbound.py), never in the daemon.

So `proto4d run` calls `daemon_imports()` before anything else: asyncio is imported while `import
ssl` is refused (asyncio then records "no ssl" in its modules), and ssl, `_ssl`, `_hashlib` and
httpx stay refused for the daemon's life (hashlib and hmac fall back to their built-in code, as they
are written to): code that would load them in the daemon fails loudly (ImportError, in the tests
first) instead of costing memory for good.
"""

from __future__ import annotations

import sys

REFUSED_FOR_GOOD = ("_hashlib", "ssl", "_ssl", "httpx")


def daemon_imports() -> bool:
    """Import asyncio without ssl and refuse OpenSSL and httpx; False when too late (any already imported)."""
    if any(name in sys.modules for name in ("asyncio", "hashlib", *REFUSED_FOR_GOOD)):
        return False
    for name in REFUSED_FOR_GOOD:
        sys.modules[name] = None  # type: ignore[assignment]  # `import name` raises ImportError while this stands
    import asyncio  # noqa: F401
    return True
