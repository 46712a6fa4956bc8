"""Outbound: the daemon's memory before and after its first webhook deliveries and external check.

For each daemon interpreter given (`--daemon LABEL=PYTHON`, each a venv with proto4d installed, e.g.
two trees side by side), a real daemon serves the sample app with `notify.webhook_url` and
`health.external_url` pointing at a receiver on loopback (HTTPS with a certificate made here by the
`openssl` program; `--scheme http` for plain HTTP). RSS and USS of the daemon's own process are read
after --settle-s once it is healthy ("idle"), then one forced update runs (its webhook events and,
at verifying, the external check), and they are read again --settle-s after the last event reached
the receiver or failed ("after"), with whether OpenSSL's libraries are mapped (/proc/<pid>/maps).
`--control` adds a run of each daemon without webhook and external URL, the same update: what the
update alone adds.

The receiver's certificate is passed as PROTO4D_TEST_CAFILE (the outbound helper trusts it besides
certifi's bundle); a daemon that does TLS in its own process ignores it, so its calls end at the
certificate check, after the handshake: TLS and httpx are loaded all the same, the figure that
matters here.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import itertools
import json
import shutil
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil

import common
from common import log, md_table

OPENSSL = ("libssl", "libcrypto", "_ssl.", "_hashlib.")
VERSIONS = itertools.count(2)  # the origin starts at version 1


class Receiver:
    def __init__(self, base: Path, scheme: str) -> None:
        self.events: list[str] = []
        self.gets = 0
        self.lock = threading.Lock()
        owner = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def reply(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                with owner.lock:
                    owner.events.append(body.get("event", "?"))
                self.reply()

            def do_GET(self) -> None:
                with owner.lock:
                    owner.gets += 1
                self.reply()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.cert: Path | None = None
        if scheme == "https":
            self.cert, key = base / "cert.pem", base / "key.pem"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                            "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                            "-keyout", str(key), "-out", str(self.cert)], check=True, capture_output=True, timeout=60)
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(self.cert, key)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def memory(pid: int) -> dict[str, Any]:
    p = psutil.Process(pid)
    mem = p.memory_full_info()
    maps = Path(f"/proc/{pid}/maps")
    mapped = sorted({ln.split()[-1].rsplit("/", 1)[-1] for ln in maps.read_text().splitlines()
                     if "/" in ln and any(k in ln for k in OPENSSL)}) if maps.exists() else None
    return {"rss_mb": round(mem.rss / 2**20, 1), "uss_mb": round(mem.uss / 2**20, 1), "openssl_mapped": mapped}


def one(args: argparse.Namespace, base: Path, origin: Any, rx: Receiver | None, label: str, python: str) -> dict:
    name = f"{label}-{'outbound' if rx else 'control'}"
    over: dict[str, Any] = {}
    if rx is not None:
        over = {"notify": {"webhook_url": f"{rx.url}/hook/bench-token", "webhook_timeout_s": 5},
                "health": {"external_url": f"{rx.url}/ext"}}
    d = common.new_daemon(base / name, origin, **over)
    d.daemon_python = python
    env = {"PROTO4D_TEST_CAFILE": str(rx.cert)} if rx is not None and rx.cert else {}
    try:
        d.start(env=env, timeout=300)
        time.sleep(args.settle_s)  # a measurement's wait, not a synchronisation
        idle = memory(d.proc.pid)
        events0 = len(rx.events) if rx else 0
        origin.commit(str(next(VERSIONS)))  # something to update to
        r = d.update("--force", "--wait", "--reason", "bench outbound")
        if r.returncode != 0:
            raise RuntimeError(f"{name}: the update failed: {r.stdout}{r.stderr}")

        def settled() -> bool:
            failed = [e for e in d.log_events() if e.get("event") == "webhook.failed"]
            return rx is None or len(rx.events) - events0 + len(failed) >= 3

        common.wait_for(settled, 60, "the webhook events delivered or failed")
        time.sleep(args.settle_s)
        after = memory(d.proc.pid)
        failed = [e.get("error") for e in d.log_events() if e.get("event") == "webhook.failed"]
        external = [ln.strip() for ln in (d.root / d.status()["update"]["last"]["log"]).read_text().splitlines()
                    if "external" in ln]
        row = {"daemon": label, "run": "webhook + external_url" if rx else "control (neither)",
               "idle": idle, "after": after, "delivered": len(rx.events) - events0 if rx else None,
               "failed": failed[:3], "external": external[:1]}
        log(f"  {name}: idle RSS {idle['rss_mb']} MiB, after {after['rss_mb']} MiB, OpenSSL {after['openssl_mapped']}")
        return row
    finally:
        with contextlib.suppress(Exception):
            d.stop(60)
        d.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="./dev bench outbound", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--daemon", action="append", required=True, metavar="LABEL=PYTHON",
                   help="a daemon interpreter with proto4d installed (repeat for a side-by-side run)")
    p.add_argument("--scheme", choices=["https", "http"], default="https")
    p.add_argument("--settle-s", type=float, default=20, help="wait before each reading (default 20)")
    p.add_argument("--control", action="store_true", help="also each daemon without webhook and external URL")
    common.add_run_args(p)
    args = p.parse_args(argv)
    if args.scheme == "https" and shutil.which("openssl") is None:
        p.error("--scheme https needs the openssl program (to make the receiver's certificate)")
    daemons = [tuple(x.split("=", 1)) for x in args.daemon]
    base, cleanup = common.workdir(args.keep, "outbound")
    rows: list[dict[str, Any]] = []
    rx = None
    try:
        origin = common.make_origin(base / "origin")
        rx = Receiver(base, args.scheme)
        for label, python in daemons:
            log(f"{label}: webhook + external_url over {args.scheme} ...")
            rows.append(one(args, base, origin, rx, label, python))
            if args.control:
                log(f"{label}: control ...")
                rows.append(one(args, base, origin, None, label, python))
    finally:
        if rx is not None:
            rx.close()
        cleanup()
    print(md_table(["daemon", "run", "idle RSS / USS MiB", "after RSS / USS MiB", "OpenSSL mapped after",
                    "events delivered", "webhook failures", "external check"],
                   [[r["daemon"], r["run"], f"{r['idle']['rss_mb']} / {r['idle']['uss_mb']}",
                     f"{r['after']['rss_mb']} / {r['after']['uss_mb']}",
                     ", ".join(r["after"]["openssl_mapped"] or []) or "none",
                     "-" if r["delivered"] is None else r["delivered"], "; ".join(map(str, r["failed"])) or "-",
                     "; ".join(r["external"]) or "-"] for r in rows]))
    path = common.write_json("outbound", {"command": common.command_line(), "machine": common.machine(),
                                          "scheme": args.scheme, "rows": rows})
    print(f"\nJSON: {path.relative_to(common.ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
