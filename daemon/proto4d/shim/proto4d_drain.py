"""proto4d drain shim: a uvicorn HTTP protocol that loses no request when the server is told to stop.

This file runs inside the APP's interpreter (its own venv, Python 3.8 or later), never inside
proto4d: it imports nothing from proto4d and keeps to syntax Python 3.8 accepts. proto4d puts
the directory holding it on the app's PYTHONPATH and starts the app as

    python -m proto4d_drain <the usual uvicorn arguments>

which runs uvicorn's own command line with its `--http auto|h11|httptools` choices mapped to
the classes below. (uvicorn 0.24's `--http` accepts only those three names, not an import
string, so `--http proto4d_drain:AutoDrainProtocol` works only on newer uvicorn; the launcher
works on both.)

Why: on SIGTERM, stock uvicorn calls `shutdown()` on every connection. An idle keep-alive
connection is closed at once, so a client sending its next request at that moment gets a reset
or an EOF; an in-flight request only gets `keep_alive = False`, so its response goes out
without `Connection: close` and the connection is closed after it, under a client that may
already be reusing it. When a new process is serving the same listening socket (proto4d's
handoff), each of those is a failed request that never needed to fail.

What these classes change, on shutdown only:
  * in-flight request, response headers not sent yet: the response carries `Connection: close`
    and the connection closes after it;
  * in-flight request, headers already sent: `keep_alive = False` (stock behaviour);
  * idle keep-alive connection, or one holding part of a request: not closed at once. It is
    marked draining; a request arriving within the grace (PROTO4D_DRAIN_GRACE_S, default 1.0 s,
    counted from the last bytes received) is served with `Connection: close` and the
    connection closes after it; with none, it is closed the stock way when the grace ends.
Everything else (keep-alive timeout, parsing, flow control) is uvicorn's own. Each accepted
TCP connection also gets TCP_NODELAY (uvicorn treats a `--fd` socket as a Unix socket, so
asyncio never sets it).

Access records on their own channel: when proto4d passes a pipe (PROTO4D_ACCESS_FD), each
request uvicorn logs to its "uvicorn.access" logger is also written to that pipe as one JSON
line ({"c": client, "m": method, "t": target, "s": status}), after a first {"v": 1}. The daemon
then counts users and 5xx answers from the pipe only, and ignores access-log look-alikes in the
app's output: what the app prints (a student's text, say) cannot reach the pipe. The handler is
attached at each new connection if it is missing (an app that configures logging when imported
replaces uvicorn's handlers), so the hello goes out only once records really flow. Writes never
block the app: a full pipe drops the record. With the stock classes (the fallback) there is no
channel, and the daemon keeps parsing the output.

Promotion in place: when proto4d starts the process as a canary it may pass two more descriptors,
the shared listening socket (PROTO4D_SHARED_FD, held but not served) and one end of a control
socket pair (PROTO4D_CONTROL_FD). The process serves only its private `--fd` socket while the
daemon checks it. On the line `promote` on the control socket, the shim adds a listener on the
shared socket to the SAME uvicorn server (same app, same lifespan state, same protocol factory
as uvicorn's own), and only once the event loop accepts on it closes the private listener and
its inherited fd, then answers `promoted` (or `refused <reason>`, serving nothing new). The
daemon retires the old process only after `promoted`, so the shared socket always has an
acceptor. One line goes to stderr too: `proto4d-drain: promoted (shared socket fd N ...)`.
When uvicorn's Server has no `startup` to wrap, the shim answers `unavailable <reason>` at once
and the daemon starts the release again on the shared socket (the two-start path).
A production process gets the control socket alone (no PROTO4D_SHARED_FD): it answers `modules`
only (below), and `refused ...` to `promote`.

The spare (proto4d's `app.spare`): `modules` on the control socket answers one line, `modules` and
the JSON list of what this process imported from its interpreter's library and its venv (never the
app's own code). proto4d then starts `python -m proto4d_drain --proto4d-spare`, which imports that
list ahead and waits to become the next release's process (see `_spare`).

Once the server has started (after the app's lifespan startup), the shim collects and freezes the
heap built so far (`gc.freeze()`): full collections then skip the app's start-up objects instead of
pausing a request for all of them. `PROTO4D_GC_FREEZE=0` in the app's environment turns it off.

If uvicorn's classes lack what this relies on (checked when a class is first asked for), the
stock class is exported under the same name instead. Either way ONE line goes to stderr, the
first time uvicorn picks a class (during its start-up, before "Uvicorn running on"):
    proto4d-drain: active (uvicorn <version>, <h11|httptools>)
    proto4d-drain: fallback to stock uvicorn shutdown (<reason>)
"""

import asyncio
import contextlib
import importlib
import inspect
import json
import logging
import os
import socket
import sys

# The three protocol names are served by the module __getattr__ below (built on first use).
__all__ = ["AutoDrainProtocol", "H11DrainProtocol", "HttpToolsDrainProtocol", "main"]  # noqa: F822

CLOSE_HEADER = (b"connection", b"close")
DEFAULT_GRACE_S = 1.0
GRACE_ENV = "PROTO4D_DRAIN_GRACE_S"

# What the subclass touches in uvicorn's classes; checked before the subclass is built.
_PROTOCOL_METHODS = ("shutdown", "data_received", "connection_made", "connection_lost",
                     "on_response_complete", "timeout_keep_alive_handler")
_PROTOCOL_STATE = ("cycle", "transport", "loop")
_CYCLE_STATE = ("scope", "keep_alive", "response_started", "response_complete")
# The stock class name in each implementation module.
_STOCK_NAMES = {"h11": "H11Protocol", "httptools": "HttpToolsProtocol"}
# The names this module exports, and the implementation behind each ("auto" = uvicorn's choice).
_EXPORTS = {"H11DrainProtocol": "h11", "HttpToolsDrainProtocol": "httptools", "AutoDrainProtocol": "auto"}
# uvicorn's `--http` choices and the export the launcher maps each to.
_LAUNCH_MAP = (("auto", "AutoDrainProtocol"), ("h11", "H11DrainProtocol"),
               ("httptools", "HttpToolsDrainProtocol"))

_resolved = {}  # implementation name -> class
_announced = []  # the one line printed, once per process
ACCESS_FD_ENV = "PROTO4D_ACCESS_FD"
_MAX_TARGET = 300
# A write of at most PIPE_BUF bytes to a pipe is atomic (all or EAGAIN, never half a record); PIPE_BUF
# is 512 on macOS, 4096 on Linux.
_MAX_RECORD = 512


class _AccessChannel(logging.Handler):
    """Writes uvicorn's access records to the daemon's pipe, one JSON line each."""

    def __init__(self, fd):
        logging.Handler.__init__(self, logging.INFO)
        self.fd = fd
        self.dropped = 0
        self.said_hello = False

    def emit(self, record):
        try:
            args = record.args
            # uvicorn: '%s - "%s %s HTTP/%s" %d' % (client_addr, method, path_with_query, http_version, status)
            if not isinstance(args, tuple) or len(args) != 5:
                return
            client, method, target, _version, status = args
            self.write({"c": str(client), "m": str(method)[:20], "t": str(target)[:_MAX_TARGET], "s": int(status)})
        except Exception:  # never let the channel break a request
            self.dropped += 1

    def write(self, doc):
        data = (json.dumps(doc, separators=(",", ":")) + "\n").encode("utf-8", "replace")
        if len(data) > _MAX_RECORD and "t" in doc:  # a target full of escapes: its start is enough
            doc = dict(doc, t=doc["t"][:40])
            data = (json.dumps(doc, separators=(",", ":")) + "\n").encode("utf-8", "replace")
        if len(data) > _MAX_RECORD:
            self.dropped += 1
            return
        try:
            os.write(self.fd, data)
        except BlockingIOError:
            self.dropped += 1
        except OSError:
            self.dropped += 1


_channel = []  # the one _AccessChannel of this process, once proto4d's pipe is taken


def _take_access_channel():
    """Take the pipe proto4d passed (once, before uvicorn imports the app, so the app never sees
    PROTO4D_ACCESS_FD)."""
    raw = os.environ.pop(ACCESS_FD_ENV, "")
    if not raw or _channel:
        return
    try:
        fd = int(raw)
        os.set_blocking(fd, False)
    except (ValueError, OSError):
        return
    _channel.append(_AccessChannel(fd))


def _ensure_access_channel():
    """On every new connection: the channel is a handler of "uvicorn.access".

    Not earlier: uvicorn's logging config, and an app that configures logging when it is imported,
    replace the logger's handlers. The hello goes out with the first attachment, so the daemon
    stops reading access lines from the output only once records really flow here; a handler the
    app removes later is put back at the next connection.
    """
    if not _channel:
        return
    handler = _channel[0]
    logger = logging.getLogger("uvicorn.access")
    if handler in logger.handlers:
        return
    logger.addHandler(handler)  # with --no-access-log, the channel is then the only handler
    if not handler.said_hello:
        handler.said_hello = True
        handler.write({"v": 1})


def _grace_s():
    raw = os.environ.get(GRACE_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_GRACE_S
    except ValueError:
        return DEFAULT_GRACE_S
    if value != value or value < 0:  # NaN or negative
        return DEFAULT_GRACE_S
    return value


def _announce(line):
    if _announced:
        return
    _announced.append(line)
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _uvicorn_version():
    try:
        import uvicorn
    except ImportError:
        return "?"
    return str(getattr(uvicorn, "__version__", "?"))


def _auto_impl():
    """Mirror uvicorn's own `--http auto`: httptools when importable, else h11."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "httptools"


def _code_names(func):
    code = getattr(func, "__code__", None)
    return set(code.co_names) if code is not None else set()


def _code_consts(func):
    code = getattr(func, "__code__", None)
    return tuple(code.co_consts) if code is not None else ()


def _check(module, impl):
    """Return (reason the subclass cannot apply or "", whether scope headers carry the close)."""
    stock = getattr(module, _STOCK_NAMES[impl], None)
    if stock is None:
        return f"uvicorn.protocols.http.{impl}_impl has no {_STOCK_NAMES[impl]}", False
    for name in _PROTOCOL_METHODS:
        if not callable(getattr(stock, name, None)):
            return f"{stock.__name__} has no {name}()", False
    init_names = _code_names(stock.__init__)
    for name in _PROTOCOL_STATE:
        if name not in init_names:
            return f"{stock.__name__} does not keep self.{name}", False
    cycle = getattr(module, "RequestResponseCycle", None)
    if cycle is None:
        return f"uvicorn.protocols.http.{impl}_impl has no RequestResponseCycle", False
    cycle_names = _code_names(cycle.__init__)
    for name in _CYCLE_STATE:
        if name not in cycle_names:
            return f"RequestResponseCycle does not keep self.{name}", False
    send_names = _code_names(getattr(cycle, "send", None))
    # uvicorn <= 0.2x (both implementations) and h11 in later ones: the response gets
    # `connection: close` when the request's scope headers hold it.
    if "CLOSE_HEADER" in send_names:
        return "", True
    # httptools in later uvicorn: the response gets `connection: close` when keep_alive is off.
    if "keep_alive" in send_names and b"connection: close\r\n" in _code_consts(getattr(cycle, "send", None)):
        return "", False
    return "RequestResponseCycle.send has no way to announce connection: close", False


def _set_nodelay(transport):
    try:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except Exception:  # a Unix socket, or a transport without one: nothing to do
        pass


class _DrainMixin:
    """The shutdown behaviour; mixed in front of uvicorn's H11Protocol or HttpToolsProtocol."""

    _p4_draining = False
    _p4_timer = None
    _p4_scope_close = True  # set per class: the close is announced through the scope headers

    # -- Protocol interface ----------------------------------------------------------------
    def connection_made(self, transport):
        if _channel:
            _ensure_access_channel()
            logger = getattr(self, "access_logger", None)
            if logger is not None:  # uvicorn decided in __init__, before the channel was attached
                self.access_log = logger.hasHandlers()
        super().connection_made(transport)
        _set_nodelay(transport)

    def connection_lost(self, exc):
        self._p4_cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data):
        before = self.cycle
        idle_before = before is None or before.response_complete
        super().data_received(data)
        if not self._p4_draining:
            return
        if self.cycle is not before:  # a request was parsed while draining
            self._p4_cancel_timer()
            self._p4_close_after(self.cycle)
        elif data and idle_before and self._p4_timer is not None:
            self._p4_arm_timer()  # part of a request: the client is still sending, count the grace from now

    def on_response_complete(self):
        before = self.cycle
        super().on_response_complete()
        # h11 starts a pipelined request from here.
        if self._p4_draining and self.cycle is not before and self.cycle is not None:
            self._p4_close_after(self.cycle)

    def shutdown(self):
        """Called by uvicorn's Server.shutdown() on every connection when the server stops."""
        if self._p4_draining:
            return
        self._p4_draining = True
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            self._p4_close_after(cycle)
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        # Idle (or holding part of a request): give the client the grace to send one more.
        self._p4_arm_timer()

    # -- the drain -------------------------------------------------------------------------
    def _p4_close_after(self, cycle):
        """The response to `cycle` closes the connection, and says so when it still can."""
        cycle.keep_alive = False
        if cycle.response_started or not self._p4_scope_close:
            return
        scope = cycle.scope
        headers = scope.get("headers")
        if isinstance(headers, list):
            if CLOSE_HEADER not in headers:
                headers.append(CLOSE_HEADER)
        else:
            scope["headers"] = [*list(headers or ()), CLOSE_HEADER]

    def _p4_arm_timer(self):
        self._p4_cancel_timer()
        self._p4_timer = self.loop.call_later(_grace_s(), self._p4_grace_over)

    def _p4_cancel_timer(self):
        timer = self._p4_timer
        if timer is not None:
            self._p4_timer = None
            timer.cancel()

    def _p4_grace_over(self):
        self._p4_timer = None
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            return  # a request came in: its response closes the connection
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        try:
            self.timeout_keep_alive_handler()  # the stock close (h11: ConnectionClosed, then close)
        except Exception:
            transport.close()
        if not transport.is_closing():
            transport.close()


def _build(impl):
    """The drain class for one implementation, or the stock class and the reason it is used."""
    module = importlib.import_module(f"uvicorn.protocols.http.{impl}_impl")
    stock = getattr(module, _STOCK_NAMES[impl], None)
    reason, scope_close = _check(module, impl)
    if reason:
        if stock is None:
            raise ImportError("proto4d-drain: " + reason)
        return stock, reason
    name = "H11DrainProtocol" if impl == "h11" else "HttpToolsDrainProtocol"
    cls = type(name, (_DrainMixin, stock), {"_p4_scope_close": scope_close, "__module__": "proto4d_drain"})
    cls.__qualname__ = name
    cls.__doc__ = f"uvicorn's {stock.__name__} with proto4d's drain on shutdown."
    return cls, ""


def _resolve(impl):
    if not _resolved:
        _take_access_channel()
    if impl == "auto":
        impl = _auto_impl()
    cls = _resolved.get(impl)
    if cls is None:
        try:
            cls, reason = _build(impl)
        except ImportError as exc:
            if impl == "httptools" and "httptools" in str(exc):
                raise ImportError(f"proto4d-drain: httptools is not installed ({exc})") from exc
            raise
        _resolved[impl] = cls
        if reason:
            _announce(f"proto4d-drain: fallback to stock uvicorn shutdown ({reason})")
        else:
            _announce(f"proto4d-drain: active (uvicorn {_uvicorn_version()}, {impl})")
    return cls


def __getattr__(name):
    impl = _EXPORTS.get(name)
    if impl is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _resolve(impl)


def _http_choice(argv):
    """The `--http` value uvicorn will use (command line, then UVICORN_HTTP, then "auto")."""
    value = None
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--http" and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--http="):
            value = arg[len("--http="):]
    if value is None:
        value = os.environ.get("UVICORN_HTTP") or "auto"
    return value


CONTROL_FD_ENV = "PROTO4D_CONTROL_FD"
SHARED_FD_ENV = "PROTO4D_SHARED_FD"
_promoters = []  # keeps the one _Promoter of this process (and its task) alive


def _say(fd, text):
    """One line to the daemon on the control socket; a daemon that is gone is no error."""
    with contextlib.suppress(OSError):
        os.write(fd, (text.replace("\n", " ")[:400] + "\n").encode("utf-8", "replace"))


class _Promoter:
    """Waits for `promote` on the control socket, then serves the shared socket with the same server."""

    def __init__(self, server, control_fd, shared_fd):
        self.server = server
        self.control_fd = control_fd
        self.shared_fd = shared_fd
        self.buffer = b""
        self.task = None
        self.done = False

    def listen(self):
        loop = asyncio.get_running_loop()
        os.set_blocking(self.control_fd, False)
        loop.add_reader(self.control_fd, self._readable)

    def _readable(self):
        loop = asyncio.get_running_loop()
        try:
            data = os.read(self.control_fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the daemon closed its end: nothing more will come
            loop.remove_reader(self.control_fd)
            return
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line.strip() == b"promote" and self.shared_fd is None:
                _say(self.control_fd, "refused this process holds no shared socket to promote onto")
            elif line.strip() == b"promote" and self.task is None:
                self.task = loop.create_task(self._promote())
            elif line.strip() == b"promote":
                _say(self.control_fd, "promoted" if self.done else "refused a promotion is in progress")
            elif line.strip() == b"modules":  # what a spare may import ahead of the next release
                _answer_modules(self.control_fd)

    def _factory(self):
        """The protocol factory uvicorn's startup() builds (uvicorn 0.2x to 0.5x: keyword arguments)."""
        server = self.server
        config = server.config
        cls = config.http_protocol_class
        kwargs = {"config": config, "server_state": server.server_state}
        params = inspect.signature(cls).parameters
        lifespan = getattr(server, "lifespan", None)
        if "app_state" in params:
            kwargs["app_state"] = getattr(lifespan, "state", {})
        for name, p in params.items():
            if p.default is p.empty and name not in kwargs and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                raise RuntimeError(f"{cls.__name__}() needs {name!r}, which the shim does not know")
        return lambda: cls(**kwargs)

    async def _promote(self):
        server = self.server
        config = server.config
        loop = asyncio.get_running_loop()
        try:
            factory = self._factory()
            old = list(getattr(server, "servers", None) or [])
            if not old:
                raise RuntimeError("uvicorn's server has no listener to replace")
            sock = socket.socket(fileno=os.dup(self.shared_fd))
            try:
                shared = await loop.create_server(factory, sock=sock, ssl=config.ssl, backlog=config.backlog)
            except BaseException:
                sock.close()
                raise
        except Exception as exc:  # nothing new is served: the daemon starts the release again instead
            _say(self.control_fd, f"refused {type(exc).__name__}: {exc}")
            return
        # The loop accepts on the shared socket now; the private one goes (a check there is refused).
        server.servers = [shared]
        for s in old:
            s.close()
        private = getattr(config, "fd", None)
        if isinstance(private, int) and private not in (self.shared_fd, self.control_fd):
            with contextlib.suppress(OSError):
                os.close(private)
        self.done = True
        sys.stderr.write(f"proto4d-drain: promoted (shared socket fd {self.shared_fd}; private listener closed)\n")
        sys.stderr.flush()
        _say(self.control_fd, "promoted")


def _take_promotion():
    """The control socket, and for a canary the shared socket for promotion in place (taken before the
    app is imported). Production's process has a control socket alone: the daemon asks it `modules`."""
    control = os.environ.pop(CONTROL_FD_ENV, "")
    shared = os.environ.pop(SHARED_FD_ENV, "")
    if not control:
        return
    try:
        control_fd, shared_fd = int(control), (int(shared) if shared else None)
    except ValueError:
        return
    try:
        import uvicorn.server
        server_cls = uvicorn.server.Server
        original = server_cls.startup
        if not inspect.iscoroutinefunction(original):
            raise AttributeError("Server.startup is not a coroutine function")
    except (ImportError, AttributeError) as exc:
        if shared_fd is not None:
            _say(control_fd, f"unavailable uvicorn's Server cannot be wrapped ({exc})")
        return

    async def startup(self, *args, **kwargs):
        await original(self, *args, **kwargs)
        if getattr(self, "should_exit", False) or _promoters:
            return
        promoter = _Promoter(self, control_fd, shared_fd)
        _promoters.append(promoter)
        promoter.listen()

    server_cls.startup = startup


def _stop_accepting(server):
    """Stop accepting now, on every listener of uvicorn's server, and let the listening socket go.

    Not asyncio's Server.close(): a connection accepted in the same turn of the loop gets its
    transport in a task that runs on the next turn, and a closed Server refuses it (an assertion in
    Server._attach, swallowed by asyncio), so that client's request is reset. That happens with
    uvicorn's own shutdown too, whenever it closes the server just after an accept. Here the reader
    is removed (which also cancels an accept already queued in this turn), and the descriptor is
    pointed at /dev/null (dup2), so the listening socket leaves this process at once while the
    Server stays open: connections already accepted get their transports; no new one is accepted.
    uvicorn's shutdown() later closes the Server as usual (its socket is then /dev/null)."""
    loop = asyncio.get_running_loop()
    for listener in list(getattr(server, "servers", None) or []):
        for sock in list(getattr(listener, "sockets", None) or ()):
            try:
                fd = sock.fileno()
                if fd < 0:
                    continue
                loop.remove_reader(fd)
                null = os.open(os.devnull, os.O_RDONLY)
                try:
                    os.dup2(null, fd)
                finally:
                    os.close(null)
            except Exception:  # never let this break the shutdown: uvicorn's own close still comes
                continue


GC_FREEZE_ENV = "PROTO4D_GC_FREEZE"


def _freeze_startup_heap():
    """Once the server is up: collect, then move every object the start built (the app's imports, its
    lifespan's state) to the collector's permanent generation.

    A full collection walks every tracked object while the event loop waits: 8 ms for the sample app's
    22,000 objects on the lab VM, several times that for an app of Proto4's size, a request's worth of
    latency whenever one lands. Those objects live as long as the process; afterwards a full
    collection walks only what was made since (0.001 ms at start). Each release's first process hit its
    first one a few seconds into serving, which a twin comparison of the switch bench showed. The cost:
    a reference cycle among start-up objects dropped later is never collected. `PROTO4D_GC_FREEZE=0`
    in the app's environment (`app.env`) turns it off."""
    if os.environ.get(GC_FREEZE_ENV, "1") == "0":
        return
    import gc
    if not hasattr(gc, "freeze"):
        return
    gc.collect()
    gc.freeze()


def _prompt_exit():
    """Stop accepting at once when told to stop, on an inherited socket.

    uvicorn stops accepting only in shutdown(), which its main loop reaches at its next tick (every
    0.1 s); uvicorn 0.29 and later also catch SIGTERM with signal.signal and no wake-up descriptor,
    so the handler itself waits for the loop's next timer, another 0.1 s. proto4d sends SIGTERM only
    once another process accepts on the shared socket (or to stop the service, the daemon keeping
    the socket and its backlog), and it waits until the old process no longer listens before it
    verifies the port: those up to 0.2 s were most of a promotion's switch. Accepting stops at the
    loop's next turn after the signal (_stop_accepting); everything else (the drain of open
    connections, the lifespan) stays uvicorn's own shutdown. Only with `--fd` (the socket proto4d owns): a server that
    bound its own port would refuse connections sooner instead.
    """
    try:
        import signal

        import uvicorn.server
        server_cls = uvicorn.server.Server
        original_exit = server_cls.handle_exit
        original_startup = server_cls.startup
        if not inspect.iscoroutinefunction(original_startup):
            return
    except (ImportError, AttributeError):
        return

    def handle_exit(self, sig, frame):
        original_exit(self, sig, frame)
        if getattr(getattr(self, "config", None), "fd", None) is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        with contextlib.suppress(RuntimeError):  # thread-safe: the signal may land in the loop's own code
            loop.call_soon_threadsafe(_stop_accepting, self)

    async def startup(self, *args, **kwargs):
        await original_startup(self, *args, **kwargs)
        _freeze_startup_heap()  # here: the one startup wrapper every shim run installs
        if getattr(getattr(self, "config", None), "fd", None) is None:
            return
        # A wake-up descriptor, unless one is set already (asyncio's add_signal_handler sets its own):
        # the loop then wakes as the signal lands, not at its next timer.
        loop = asyncio.get_running_loop()
        reader, writer = socket.socketpair()
        try:
            reader.setblocking(False)
            writer.setblocking(False)
            previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        except (ValueError, OSError):  # not the main thread
            reader.close()
            writer.close()
            return
        if previous != -1:
            signal.set_wakeup_fd(previous)
            reader.close()
            writer.close()
            return

        def drain():
            with contextlib.suppress(OSError):
                while reader.recv(4096):
                    pass

        loop.add_reader(reader.fileno(), drain)
        _wakeup.extend((reader, writer))  # kept open for the life of the process

    server_cls.handle_exit = handle_exit
    server_cls.startup = startup


_wakeup = []  # the wake-up socket pair, once set


SPARE_FD_ENV = "PROTO4D_SPARE_FD"
SPARE_FLAG = "--proto4d-spare"
_MAX_MESSAGE = 8 << 20  # a module list of a large app is ~100 KB; anything near this is not ours
_MAX_FDS = 8


def _module_list():
    """What this process imported from its interpreter's library and its venv, in import order: what a
    spare may import ahead of the next release. Never the app's own code (the working directory, any
    path a .pth or an editable install adds), never this shim or __main__."""
    here = os.path.realpath(os.getcwd())
    roots = []
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        real = os.path.realpath(prefix)
        if real != "/" and not (here + os.sep).startswith(real + os.sep):
            roots.append(real + os.sep)
    names = []
    for name, module in list(sys.modules.items()):
        if name in ("__main__", "proto4d_drain") or module is None:
            continue
        path = getattr(module, "__file__", None)
        if not isinstance(path, str):
            continue
        real = os.path.realpath(path)
        if real.startswith(here + os.sep) or not any(real.startswith(r) for r in roots):
            continue
        names.append(name)
    return names


def _answer_modules(fd):
    """`modules` on the control socket: the list, as one JSON line (written whole, however long)."""
    data = ("modules " + json.dumps(_module_list(), separators=(",", ":")) + "\n").encode("utf-8", "replace")
    sock = socket.socket(fileno=os.dup(fd))
    try:
        sock.setblocking(True)
        sock.settimeout(10)
        sock.sendall(data)
    except OSError:
        pass
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            os.set_blocking(fd, False)


class _SpareGone(Exception):
    """The daemon closed its end (or broke the protocol): the spare ends quietly."""


def _spare_line(sock, buf):
    while b"\n" not in buf:
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise _SpareGone("the daemon closed the spare's socket")
        buf += chunk
        if len(buf) > _MAX_MESSAGE:
            raise _SpareGone("a message longer than any the daemon sends")
    line, _, rest = buf.partition(b"\n")
    return line.decode("utf-8", "replace"), rest


def _spare_send(sock, text):
    sock.sendall((text.replace("\n", " ") + "\n").encode("utf-8", "replace"))


def _shadowed(cwd):
    """A module already imported here that the release's own tree would shadow at a cold start
    (its directory comes first on sys.path there): then this process would run different code."""
    import importlib.machinery

    suffixes = (".py", ".pyc", *importlib.machinery.EXTENSION_SUFFIXES)
    try:
        entries = set(os.listdir(cwd))
    except OSError as exc:
        return f"cannot list {cwd} ({exc})"
    for name in {n.partition(".")[0] for n in list(sys.modules)}:
        if not name or name == "__main__":
            continue
        # A directory shadows as a regular package only (one without __init__ is a namespace portion,
        # which the import system passes over for a package found later on sys.path).
        if name in entries and any(os.path.exists(os.path.join(cwd, name, "__init__" + suffix))
                                   for suffix in suffixes):
            return f"the release's {name}/ would shadow the imported module {name}"
        for suffix in suffixes:
            if name + suffix in entries:
                return f"the release's {name}{suffix} would shadow the imported module {name}"
    return ""


def _spare():
    """`python -m proto4d_drain --proto4d-spare`: an interpreter that imports ahead what the app's
    last process imported from its venv and library, then waits, costing no CPU, to become the next
    release's canary (proto4d's runner; the protocol, one exchange at a time on PROTO4D_SPARE_FD):

        daemon: preload <JSON list of module names>     spare: warm <imported> <failed> <seconds>
        daemon: one byte carrying the descriptors        spare: fds <n> <n> ...   (their numbers here)
        daemon: become <JSON {"argv", "cwd", "env"}>     spare: became | refused <why>

    `become` gives what a cold start would get: the working directory, the whole environment, the
    uvicorn arguments naming the descriptors by their numbers here; this process then runs main()
    as if started so. It refuses when the release's tree would shadow a module already imported;
    the daemon then starts the release cold. The daemon gone at any step: it exits, status 0."""
    import array
    import gc
    import time

    raw = os.environ.pop(SPARE_FD_ENV, "")
    try:
        sock = socket.socket(fileno=int(raw))
    except (ValueError, OSError) as exc:
        raise SystemExit(f"proto4d-spare: no control socket ({SPARE_FD_ENV}={raw!r}: {exc})") from None
    sock.setblocking(True)
    start_dir = os.getcwd()
    try:
        line, buf = _spare_line(sock, b"")
        verb, _, rest = line.partition(" ")
        if verb != "preload":
            raise _SpareGone(f"expected preload, got {verb[:40]!r}")
        names = json.loads(rest)
        t0 = time.monotonic()
        imported = failed = 0
        for name in names if isinstance(names, list) else ():
            if not isinstance(name, str) or name in sys.modules or name in ("__main__", "proto4d_drain"):
                continue
            try:
                importlib.import_module(name)
                imported += 1
            except (Exception, SystemExit):  # what the app imported may need its own state: it imports it then
                failed += 1
        if hasattr(gc, "freeze"):  # what the spare built lives as long as the release's process
            gc.collect()
            gc.freeze()
        _spare_send(sock, f"warm {imported} {failed} {time.monotonic() - t0:.3f}")
        if buf:
            raise _SpareGone("the daemon sent before the answer")
        fds = array.array("i")
        msg, ancdata, _flags, _addr = sock.recvmsg(1, socket.CMSG_LEN(_MAX_FDS * fds.itemsize))
        if not msg:
            raise _SpareGone("the daemon closed the spare's socket")
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        _spare_send(sock, "fds " + " ".join(str(fd) for fd in fds))
        line, buf = _spare_line(sock, b"")
        verb, _, rest = line.partition(" ")
        if verb != "become":
            raise _SpareGone(f"expected become, got {verb[:40]!r}")
        order = json.loads(rest)
        argv, cwd, env = order["argv"], order["cwd"], order["env"]
        why = _shadowed(cwd)
        if why:
            _spare_send(sock, "refused " + why)
            raise _SpareGone(why)
        os.chdir(cwd)
    except _SpareGone as exc:
        sys.stderr.write(f"proto4d-spare: ended ({exc})\n")
        return 0
    except (OSError, ValueError, KeyError, TypeError) as exc:
        sys.stderr.write(f"proto4d-spare: ended ({type(exc).__name__}: {exc})\n")
        with contextlib.suppress(OSError):
            _spare_send(sock, f"refused {type(exc).__name__}: {exc}")
        return 0
    # As a cold start of the release would be: its environment, its directory first on sys.path.
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in env.items()})
    if sys.path and sys.path[0] == start_dir:
        sys.path[0] = cwd
    sys.argv[1:] = list(argv)
    with contextlib.suppress(OSError):
        _spare_send(sock, "became")
    sock.close()
    return main(list(argv))


def main(argv=None):
    """`python -m proto4d_drain ARGS`: uvicorn's command line with the drain classes."""
    if argv is None:
        argv = sys.argv[1:]
    if list(argv[:1]) == [SPARE_FLAG]:
        return _spare()
    import uvicorn
    import uvicorn.config

    _prompt_exit()
    _take_promotion()

    cli = getattr(uvicorn, "main", None)
    protocols = getattr(sys.modules["uvicorn.config"], "HTTP_PROTOCOLS", None)
    choice = _http_choice(argv)
    if not isinstance(protocols, dict):
        _announce("proto4d-drain: fallback to stock uvicorn shutdown "
                  "(uvicorn.config.HTTP_PROTOCOLS not found)")
    else:
        for key, export in _LAUNCH_MAP:
            if key in protocols:
                protocols[key] = "proto4d_drain:" + export
        if choice not in dict(_LAUNCH_MAP) and not choice.startswith("proto4d_drain:"):
            _announce(f"proto4d-drain: fallback to stock uvicorn shutdown (--http {choice} is not wrapped)")
    if not callable(cli):
        raise SystemExit("proto4d-drain: uvicorn has no command line entry point (uvicorn.main)")
    return cli(args=list(argv), prog_name="python -m uvicorn")


if __name__ == "__main__":
    # Run through the importable module so uvicorn's "proto4d_drain:..." strings find the same state.
    sys.modules.setdefault("proto4d_drain", sys.modules[__name__])
    main()
