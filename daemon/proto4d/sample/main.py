"""The bundled sample app: a tiny ASGI service that behaves like Proto4 for the demo, tests and benchmarks.

Its behaviour comes from `mode.txt` beside this file, so each commit of a test origin can be
a different version: `healthy`, `unhealthy` (health check answers 503), `crash_at_start`,
`crash_after <seconds>`, `hang_at_start`, `errors` (every non-health request answers 500),
`unhealthy_after <seconds>` (health answers 503 after that long), `ignore_sigterm` (a process
that will not stop when asked; only SIGKILL ends it), `ignore_sigterm child` (the same, plus a child
process in its process group that ignores SIGTERM too; its pid is in every answer as "child").
Endpoints: /health, / , /version, /slow?ms=N (an LLM call stand-in), POST /echo, /env?key=K,
POST /say (prints the body to stdout, as a chat app logs a student's message).
"""

import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs

HERE = Path(__file__).resolve().parent
MODE_LINE = (HERE / "mode.txt").read_text().strip() if (HERE / "mode.txt").exists() else "healthy"
MODE, _, ARG = MODE_LINE.partition(" ")
VERSION = (HERE / "VERSION").read_text().strip() if (HERE / "VERSION").exists() else "0"
STARTED = time.time()

if MODE == "crash_at_start":
    print("sample app: crashing at start as mode.txt asks", file=sys.stderr, flush=True)
    sys.exit(3)
if MODE == "hang_at_start":
    time.sleep(3600)
if MODE == "slow_start":  # a start that takes ARG seconds, then serves
    time.sleep(float(ARG or "3"))
if MODE == "crash_after":
    def _crash() -> None:
        time.sleep(float(ARG or "3"))
        print("sample app: crashing now as mode.txt asks", file=sys.stderr, flush=True)
        os._exit(4)
    threading.Thread(target=_crash, daemon=True).start()
CHILD = None
if MODE == "ignore_sigterm" and ARG == "child":
    import subprocess

    CHILD = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                              "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"])


async def _body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if MODE == "ignore_sigterm":  # uvicorn has installed its handlers by now: override them
                    import signal
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    query = parse_qs(scope.get("query_string", b"").decode())
    status, payload = 200, {"version": VERSION, "mode": MODE_LINE, "pid": os.getpid()}
    if CHILD is not None:
        payload["child"] = CHILD.pid
    if path == "/health":
        late = MODE == "unhealthy_after" and time.time() - STARTED > float(ARG or "3")
        status = 503 if MODE == "unhealthy" or late else 200
        payload["ok"] = status == 200
    elif MODE == "errors":
        status = 500
    elif path == "/slow":
        await asyncio.sleep(int(query.get("ms", ["500"])[0]) / 1000)
    elif path == "/echo":
        body = await _body(receive)
        payload["echo"] = body.decode(errors="replace")
    elif path == "/say":  # what a chat app does with a student's message: print it
        body = await _body(receive)
        print(body.decode(errors="replace"), flush=True)
    elif path == "/env":
        payload["value"] = os.environ.get(query.get("key", [""])[0])
    elif path == "/file":
        try:
            payload["text"] = Path(query.get("name", [""])[0]).read_text()
        except OSError as e:
            status, payload["error"] = 404, str(e)
    elif path not in ("/", "/version"):
        status = 404
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
