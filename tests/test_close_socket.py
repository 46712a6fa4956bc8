"""child.close_socket: a socket closed while another task waits to read it must not take the next
socket with the same descriptor number down with it (the lost `promoted` of a staged release)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from proto4d.child import NoLine, close_socket, recv_line


async def answer_on_a_reused_number(close) -> str:
    """A read pending on socket A; A is closed with `close`; B gets A's number; B's answer is awaited."""
    loop = asyncio.get_running_loop()
    a, a_peer = socket.socketpair()
    a.setblocking(False)
    pending = asyncio.create_task(recv_line(a, b"", 30, 100, "warm"))  # the spare still warming
    await asyncio.sleep(0.05)  # it waits on the loop's reader now
    number = a.fileno()
    close(a)
    a_peer.close()
    b, b_peer = socket.socketpair()
    try:
        assert number in (b.fileno(), b_peer.fileno()), "the kernel gave the lowest free number back"
        mine = b if b.fileno() == number else b_peer
        theirs = b_peer if mine is b else b
        mine.setblocking(False)
        loop.call_later(0.1, theirs.send, b"promoted\n")  # the answer comes after the read began
        line, _ = await recv_line(mine, b"", 2, 100, "promote")
        return line
    finally:
        pending.cancel()
        with contextlib.suppress(asyncio.CancelledError, NoLine):
            await pending
        b.close()
        b_peer.close()


def test_the_next_socket_on_the_same_number_gets_its_answer():
    assert asyncio.run(answer_on_a_reused_number(close_socket)) == "promoted"


def test_a_plain_close_loses_it_which_is_why_the_helper_exists():
    """The same with socket.close(): the loop keeps the number registered, epoll has forgotten it, and
    the answer on the new socket is never seen. Should this fail, the interpreter no longer has the hazard."""
    with pytest.raises(NoLine, match="no answer to promote"):
        asyncio.run(answer_on_a_reused_number(lambda s: s.close()))
