"""The access channel's two ends without a server: the shim's handler writes whole records, small
enough to be atomic on a pipe (PIPE_BUF is 512 on macOS), and the daemon's reader turns them into
AccessRecords, the hello into `active`, and anything else into nothing."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os

from proto4d.accesschannel import AccessChannel
from proto4d.accesslog import AccessRecord, parse_channel_record
from proto4d.drain import SHIM_DIR


def shim_module():
    spec = importlib.util.spec_from_file_location("proto4d_drain_under_test", SHIM_DIR / "proto4d_drain.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def record(*args: object) -> logging.LogRecord:
    return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', args, None)


def test_the_shim_writes_small_whole_records() -> None:
    shim = shim_module()
    r, w = os.pipe()
    try:
        handler = shim._AccessChannel(w)
        handler.emit(record("203.0.113.7:0", "GET", "/lesson?x=1", "1.1", 200))
        handler.emit(record("127.0.0.1:5000", "POST", "/" + "\u00e9\x1b" * 3000, "1.1", 503))
        handler.emit(record("only", "two"))  # not uvicorn's record: ignored
        os.close(w)
        w = -1
        lines = os.read(r, 1 << 16).splitlines(keepends=True)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert len(lines) == 2 and all(len(line) <= 512 for line in lines), lines
    assert parse_channel_record(lines[0]) == AccessRecord("203.0.113.7", 0, "GET", "/lesson", "x=1", 200)
    long = parse_channel_record(lines[1])
    assert long is not None and long.status == 503 and long.path.startswith("/\u00e9\x1b")


def test_the_daemon_reads_records_after_the_hello() -> None:
    got: list[AccessRecord] = []
    hellos: list[bool] = []

    async def main() -> AccessChannel:
        ch = AccessChannel()
        w = os.dup(ch.write_fd)
        ch.spawned()  # as after a spawn: only the "child" holds the write end now
        for line in (b'{"v":1}\n', b'{"c":"198.51.100.4:1","m":"GET","t":"/","s":200}\n', b"junk\n",
                     b"x" * 20000 + b"\n", b'{"c":"kim:1","m":"GET","t":"/","s":200}\n',
                     b'{"c":"198.51.100.5:1","m":"GET","t":"/a","s":500}\n'):
            os.write(w, line)
        os.close(w)
        await asyncio.wait_for(ch.run(got.append, lambda: hellos.append(True)), 5)
        return ch

    ch = asyncio.run(main())
    assert ch.active and hellos == [True]
    assert [(g.client, g.status) for g in got] == [("198.51.100.4", 200), ("198.51.100.5", 500)]
    assert ch.rejected == 3


def test_the_shim_attaches_at_connections_says_hello_once_and_comes_back_after_a_logging_reset(
        monkeypatch) -> None:
    shim = shim_module()
    r, w = os.pipe()
    logger = logging.getLogger("uvicorn.access")
    before, level = list(logger.handlers), logger.level
    logger.setLevel(logging.INFO)  # as uvicorn's logging config sets it
    monkeypatch.setenv(shim.ACCESS_FD_ENV, str(w))
    try:
        shim._take_access_channel()
        assert shim.ACCESS_FD_ENV not in os.environ  # the app never sees it
        shim._ensure_access_channel()  # the first connection
        shim._ensure_access_channel()
        logger.handlers = [h for h in logger.handlers if h not in shim._channel]  # the app's dictConfig
        shim._ensure_access_channel()  # the next connection puts it back
        assert logger.handlers.count(shim._channel[0]) == 1
        logger.info('%s - "%s %s HTTP/%s" %d', "198.51.100.9:7", "GET", "/", "1.1", 200)
        os.close(w)
        w = -1
        lines = os.read(r, 1 << 16).splitlines()
    finally:
        logger.handlers = before
        logger.setLevel(level)
        os.close(r)
        if w >= 0:
            os.close(w)
    assert lines == [b'{"v":1}', b'{"c":"198.51.100.9:7","m":"GET","t":"/","s":200}']
