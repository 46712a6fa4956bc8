"""What the resident daemon keeps out of its memory: OpenSSL, until TLS is really needed.

`import asyncio` imports `ssl`, and `hashlib` imports `_hashlib`; both load OpenSSL's libraries,
about 4-5 MiB of the daemon's RSS that Python never gives back, against a 30 MiB target (issue 12).
The daemon speaks plain HTTP to its own app on loopback and hashes a few small files (a config, a
requirements file), for which Python's built-in sha256 does. TLS is needed only for a webhook or
`health.external_url`, through httpx, which is imported by that first use anyway.

So `proto4d run` calls `daemon_imports()` before anything else: asyncio is imported while `import
ssl` is refused (asyncio then records "no ssl" in its modules), and `_hashlib` stays refused for the
daemon's life (hashlib and hmac fall back to their built-in code, as they are written to). The
first use of TLS calls `ssl_for_asyncio()`: ssl is imported and handed to asyncio's modules, which
are then as if asyncio had been imported with it (tests/test_lean.py runs asyncio's own TLS and
httpx's after it, so a Python whose asyncio uses ssl differently fails there, not in production).
"""

from __future__ import annotations

import sys

REFUSED_FOR_GOOD = ("_hashlib",)
REFUSED_WHILE_ASYNCIO_LOADS = ("ssl", "_ssl")


def daemon_imports() -> bool:
    """Import asyncio without ssl and refuse _hashlib; False when too late (either already imported)."""
    if any(name in sys.modules for name in ("asyncio", "hashlib", *REFUSED_FOR_GOOD, *REFUSED_WHILE_ASYNCIO_LOADS)):
        return False
    for name in (*REFUSED_FOR_GOOD, *REFUSED_WHILE_ASYNCIO_LOADS):
        sys.modules[name] = None  # type: ignore[assignment]  # `import name` raises ImportError while this stands
    try:
        import asyncio  # noqa: F401
    finally:
        for name in REFUSED_WHILE_ASYNCIO_LOADS:
            del sys.modules[name]
    return True


def ssl_for_asyncio() -> None:
    """Before any TLS: import ssl and give it to the asyncio modules that were imported without it.

    asyncio.sslproto also defines names from ssl at import (`if ssl is not None:`), so it is loaded
    again now that ssl is there; the other modules only look `ssl` up when called. Nothing of
    sslproto exists before (no TLS has run), so nothing holds its old classes.
    """
    import importlib
    import ssl

    reload = False
    for name, module in list(sys.modules.items()):
        if (name == "asyncio" or name.startswith("asyncio.")) and module is not None \
                and "ssl" in vars(module) and vars(module)["ssl"] is None:
            if name == "asyncio.sslproto":
                reload = True
            else:
                module.ssl = ssl  # type: ignore[attr-defined]
    if reload:
        importlib.reload(sys.modules["asyncio.sslproto"])
