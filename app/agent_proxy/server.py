"""One worker process: waitress serving the app, with drain on SIGTERM and reload on SIGHUP.

* SIGTERM: ``/_proxy/health`` answers 503 so the front stops sending new requests; the
  worker keeps serving until no request is in flight (at most ``limits.drain_seconds``),
  then exits 0.
* SIGHUP: the configuration is read again and validated; if it is good, a new app is
  swapped in atomically for new requests (in-flight requests finish with the old one);
  if not, the worker keeps the old one and logs one line naming the key. The log level
  and format, ``limits.max_in_flight`` and ``limits.drain_seconds`` change too; the keys
  ``config.restart_keys()`` names need a restart, and the reload's log line lists those
  that differ from what the worker started with (``needs_restart``).
* With ``NOTIFY_SOCKET`` set (systemd ``Type=notify``), READY=1 is sent once listening.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import signal
import socket
import threading
import time

from waitress import trigger, wasyncore
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError, crack_first_line, get_header_lines
from waitress.utilities import RequestEntityTooLarge
from waitress.rfc7230 import HEADER_FIELD_RE
from waitress.server import BaseWSGIServer, TcpWSGIServer, create_server
from waitress.task import ErrorTask, WSGITask

from . import __version__, config as configuration, errors, features, logs
from .app import RELAYED, WorkerState, create_app
from .config import ConfigError
from .hostport import hostport, local_host
from .metrics import Metrics
from .overload import BoundedDispatcher

log = logging.getLogger("agent_proxy.server")
IDENT = "agent-proxy"  # waitress's Server header on the answers the proxy makes itself
_WAITRESS_VIA = f"\r\nVia: {IDENT}\r\n".encode()
_WAITRESS_SERVER = f"\r\nServer: {IDENT}\r\n".encode()


def sd_notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError as exc:
            log.warning("cannot notify systemd: %s", exc)


class OneWriteTask(WSGITask):
    """Hands waitress the header block and the first body chunk as one write.

    waitress queues them separately, and its main loop may send the headers alone; a
    worker killed in between leaves the front a status line without its body, which it
    can no longer resend. In one write, the front sees either nothing (and resends a GET
    to another worker) or the answer.
    """

    @property
    def has_body(self) -> bool:
        # An answer to HEAD has no body (RFC 9110 9.3.2). Without a Content-Length from
        # the app, waitress would frame it chunked and send the last chunk after the head.
        if self.request.command == "HEAD" and not any(n.lower() == "content-length" for n, _ in self.response_headers):
            return False
        return super().has_body

    def build_response_header(self):
        # waitress adds "Via: <ident>" to an answer that carries its own Server header,
        # without the protocol version RFC 9110 asks for; the app stamps every relayed
        # answer with app.VIA, so waitress's line goes. To a relayed answer without a
        # Server header, waitress adds "Server: <ident>": an origin's answer is the
        # origin's, so that goes too.
        head = super().build_response_header().replace(_WAITRESS_VIA, b"\r\n", 1)
        if self.environ and self.environ.get(RELAYED):
            head = head.replace(_WAITRESS_SERVER, b"\r\n", 1)
        return head

    def write(self, data):
        if self.wrote_header or not data:
            return super().write(data)
        channel, parts = self.channel, []
        channel.write_soon = parts.append
        try:
            super().write(data)
        finally:
            del channel.write_soon
        return channel.write_soon(b"".join(parts))


_CONTROL_BYTES = re.compile(rb"[\x00-\x1f\x7f]")
_VERSION = re.compile(rb" HTTP/1\.[0-9]$")
BODY_LIMIT = "agent_proxy_body_limit"  # on waitress's Adjustments: limits.max_body_bytes
# Host header lines in a lowered header block (a folded continuation starts with a
# space, so it never matches), and a valid value: RFC 9110 7.2, uri-host [":" port],
# where uri-host is an IP-literal in brackets or a reg-name (which may be empty).
_HOST_LINE = re.compile(rb"^host:[ \t]*(.*?)[ \t]*\r?$", re.MULTILINE)
_HOST_VALUE = re.compile(rb"(?:\[[0-9a-f:.]+\]|[a-z0-9._~%!$&'()*+,;=-]*)(?::[0-9]*)?")


def _host_problem(first_line: bytes, lowered: bytes) -> str | None:
    """What is wrong with the request's Host header (RFC 9112 3.2: a 400), or None."""
    hosts = _HOST_LINE.findall(lowered)
    if len(hosts) > 1:
        return "more than one Host header"
    if hosts:
        return None if _HOST_VALUE.fullmatch(hosts[0]) else "a Host header that is not host[:port]"
    return "an HTTP/1.1 request without a Host header" if crack_first_line(first_line.rstrip())[2] == b"1.1" else None


class StrictRequestParser(HTTPRequestParser):
    """waitress's request parser, with the framing rules it leaves open closed.

    waitress 3 frames a request carrying both Content-Length and Transfer-Encoding by
    the chunks and keeps the connection, so bytes after the body would be read as a next
    request (RFC 9112 6.1: such a request MUST be answered and the connection closed); it
    accepts ``chunked, chunked``, ignores Transfer-Encoding on HTTP/1.0, answers other
    codings 501, takes control bytes (NUL, TAB, DEL, ...) in the request target, and
    takes an HTTP/1.1 request without a Host header, with two, or with one that is not
    host[:port] (RFC 9112 3.2: each a 400). Each of these is a ParsingError here:
    waitress answers 400 and closes the connection after the answer, discarding whatever
    else was sent; the app never sees the request, so nothing is relayed.
    """

    def received(self, data: bytes) -> int:
        consumed = super().received(data)
        if (self.expect_continue and self.headers_finished and self.error is None
                and self.content_length > (limit := getattr(self.adj, BODY_LIMIT, self.content_length))):
            # The client waits for "100 Continue" before it sends the body: refused now,
            # nothing is left unread. (Without Expect the body is on its way: the app reads
            # it, up to waitress's cap, and refuses it then. Closing on unread bytes would
            # reset the connection, and the node front would lose the 413 with it.)
            self.error = RequestEntityTooLarge(f"a body of {self.content_length} bytes is over limits.max_body_bytes ({limit})")
            self.completed = True
        if self.error is not None:
            # waitress would still send "100 Continue" to a request it refuses, and then
            # wait for the body it invited.
            self.expect_continue = False
        return consumed

    def parse_header(self, header_plus: bytes) -> None:
        first_line, _, header = header_plus.partition(b"\r\n")
        if _CONTROL_BYTES.search(first_line):
            raise ParsingError("control bytes in the request line")
        if not _VERSION.search(first_line):
            raise ParsingError("a request line without HTTP/1.x at its end (HTTP/0.9 and 2 are not served here)")
        if header[:1] in (b" ", b"\t") or b"\n " in header or b"\n\t" in header:
            raise ParsingError("obsolete line folding (RFC 9112 5.2)")
        lowered = header.lower()
        problem = _host_problem(first_line, lowered)
        if problem:
            raise ParsingError(problem)
        # Most requests carry no Transfer-Encoding: one C-speed search spares them the
        # per-line walk (measured: ~3% of a worker's CPU per relayed request).
        if b"transfer-encoding" not in lowered:
            return super().parse_header(header_plus)
        codings, lengths = [], 0
        for line in get_header_lines(header):
            field = HEADER_FIELD_RE.match(line)
            if not field:
                continue  # waitress's own parse says "Invalid header"
            name = field.group("name").lower()
            if name == b"transfer-encoding":
                codings += [c.strip(b" \t").lower() for c in field.group("value").split(b",")]
            elif name == b"content-length":
                lengths += 1
        if codings:
            version = crack_first_line(first_line.rstrip())[2]
            if lengths:
                raise ParsingError("Content-Length and Transfer-Encoding together")
            if version != b"1.1":
                raise ParsingError("Transfer-Encoding in a request that is not HTTP/1.1")
            if codings != [b"chunked"]:
                raise ParsingError("a Transfer-Encoding other than chunked")
        super().parse_header(header_plus)


class JsonErrorTask(ErrorTask):
    """waitress's own error answers (400, 413, 431, 500) in the proxy's shape: JSON and the code."""

    def execute(self):
        error = self.request.error
        code = errors.code_for_status(error.code)
        body = errors.body(code, error.body)
        self.status = f"{error.code} {error.reason}"
        self.response_headers.extend([("Content-Type", "application/json"), (errors.ERROR_HEADER, code)])
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class Channel(HTTPChannel):
    """waitress's channel, not writable while a task thread is sending on it.

    A task thread flushes its own writes (waitress's ``send_bytes`` is 1). While it sits in
    that send, the socket looks writable to the main loop, which then spins through
    poll(): every pass finds the output buffer locked and sends nothing, and holds the GIL
    the task thread needs to return from its send. With 2 to 8 busy connections this cut
    waitress answering a bare "hello" from ~6,500 to ~600 requests/s at ten times the CPU
    per request (measured here). The task thread pulls the trigger after a flush that
    leaves data behind, so the main loop still takes over whatever the task could not send.
    """

    task_class = OneWriteTask
    error_task_class = JsonErrorTask
    parser_class = StrictRequestParser
    _flushing = False

    def _flush_some(self, do_close=True):
        self._flushing = True
        try:
            return super()._flush_some(do_close)
        finally:
            self._flushing = False

    def writable(self):
        return not self._flushing and super().writable()


def _idle(channel: HTTPChannel) -> bool:
    """No request in progress and nothing left to send (a half-received head counts as idle)."""
    return not (channel.requests or channel.total_outbufs_len or channel.will_close or channel.close_when_flushed)


class Listener(TcpWSGIServer):
    """waitress's listener, which keeps accepting at the connection limit by making room.

    waitress stops accept() while its socket map holds connection_limit sockets: 2,000 idle
    connections left /_proxy/health unanswered until the idle ones timed out (~120 s),
    and the front marked the node down. Here a connection past the limit closes the
    longest-idle one instead, as nginx reuses idle keep-alive connections; a client may
    always lose an idle connection (RFC 9112 9.3). Only when every connection is busy is
    the newcomer closed at once. The main loop closes the chosen ones on its next pass, so
    a worker holds at most connection_limit + ACCEPTS_PER_PASS client sockets, and health
    checks, which are never idle, get through a flood.
    """

    def readable(self):
        now = time.time()
        if now >= self.next_channel_cleanup:
            self.next_channel_cleanup = now + self.adj.cleanup_interval
            self.maintenance(now)  # closes connections idle for channel_timeout
        return self.accepting

    # Connections taken off the accept queue per pass of the main loop. waitress takes one,
    # and a pass costs more with every connection held: filling 2,200 connections took
    # ~10 s, in which a health check waited in the queue past the front's check timeout.
    ACCEPTS_PER_PASS = 64

    def handle_accept(self):
        for _ in range(self.ACCEPTS_PER_PASS):
            try:
                accepted = self.accept()
                if accepted is None:
                    return  # the queue is empty
                conn, addr = accepted
                self.set_socket_options(conn)
            except OSError:
                continue  # the peer was gone before we got to it
            if len(self._map) >= self.adj.connection_limit and not self._close_longest_idle():
                conn.close()
                continue
            self.channel_class(self, conn, addr, self.adj, map=self._map)

    def _close_longest_idle(self) -> bool:
        idle = [c for c in self._map.values() if isinstance(c, HTTPChannel) and _idle(c)]
        if not idle:
            return False
        min(idle, key=lambda c: c.last_activity).will_close = True  # closed by the main loop next pass
        return True


class Trigger(trigger.trigger):
    """waitress's wake-up pipe, written once until the main loop has read it.

    Every task pulls the trigger when it ends so that the main loop polls its channel
    again; under load many tasks end between two passes of the loop, and one byte wakes
    it for all of them. A pull that finds one pending skips its write(2) (and the GIL
    handoff around it). The flag is cleared once the pipe has been read, before the loop
    runs the thunks and polls again: a pull that skipped its write made its changes before
    that, so the next poll sees them; a pull after it writes.
    """

    _pulled = False

    def _physical_pull(self):
        if not self._pulled:
            self._pulled = True
            super()._physical_pull()

    def recv(self, buffer_size):
        try:
            return super().recv(buffer_size)
        finally:
            self._pulled = False


class Switch:
    """The WSGI callable waitress holds; points at the current app, swapped on reload."""

    def __init__(self, app):
        self.current = app

    def __call__(self, env, start_response):
        return self.current(env, start_response)


def pin_to_cpu(index: int) -> int | None:
    """Run this process on one core: the ``index``-th of those it may use, round-robin.

    A worker runs Python on one core at a time (the GIL), and its threads hand the GIL to
    each other at every socket call, several times a request. Left to the scheduler, they
    sit on different cores and every handoff is a wake-up across cores. On one core, one
    worker relaying small requests at 32 connections used 172 instead of 228 µs of CPU per
    request and served 5,800 instead of 4,600 a second (measured here, side by side). Called
    before any thread starts: threads inherit it. Returns the core, or None when the
    process may use only one (or the kernel refuses; said in the log).
    """
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None
    cpu = allowed[index % len(allowed)]
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:
        logs.event(log, f"cannot pin the worker to CPU {cpu}: {exc.strerror}", logging.WARNING)
        return None
    return cpu


def _log_settings(config: configuration.Config, port: int) -> None:
    # One line: every effective setting, and which of them are defaults.
    logs.event(log, "starting", version=__version__, proxy_id=config.proxy_id, listen=f"{config.listen.host}:{port}",
               config=config.source, **config.effective())
    for warning in configuration.warnings(config):
        logs.event(log, warning, logging.WARNING)
    _log_failed_features(config)


def _log_failed_features(config: configuration.Config) -> None:
    for feature, reason in config.failed_features.items():
        logs.event(log, f"feature {feature} failed: {reason}", logging.ERROR, feature=feature)


def worker_descriptors(config: configuration.Config) -> int:
    """Descriptors one worker may need: its client connections (and one pass of accepts
    while the idle ones it replaces close), the kept upstream and agent connections, one
    relay connection per thread, and 64 for listeners, the wake-up pipe and logs."""
    limits = config.limits
    return limits.connection_limit + Listener.ACCEPTS_PER_PASS + config.upstream.pool_size + limits.threads + 64


def ensure_descriptors(need: int, source: str) -> None:
    """Raise this process's open-file limit to ``need`` within its hard limit, or refuse to start."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise ConfigError([
            f"{source}: limits.connection_limit: a worker may need {need} open files (connections, pool, threads) "
            f"but may open only {hard} (LimitNOFILE in its unit, ulimit -n)"
        ])
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def serve(config_path: str, port: int | None = None) -> int:
    config = configuration.load(config_path, lenient=True)
    secret = config.read_secret()
    ensure_descriptors(worker_descriptors(config), config.source)
    logs.setup(config.logging.level, config.logging.format)
    port = port or config.listen.port
    _log_settings(config, port)

    control = config.listen_control
    control_port = config.control_port_of(port)
    listen = f"{hostport(config.listen.host, port)}"
    if control:
        listen += f" {hostport(control.host, control_port)}"
    # Before the first thread starts (waitress's, the reject thread): they inherit the core.
    cpu = pin_to_cpu(port - config.listen.port) if config.limits.pin_cpu else None
    state, metrics, access_lines = WorkerState(), Metrics(worker=str(port)), logs.LineBatch()
    switch = Switch(create_app(config, secret, state, metrics, control_port, access_lines, siblings(config, port)))
    limits = config.limits
    socket_map: dict = {}
    dispatcher = BoundedDispatcher(limits.max_in_flight)
    dispatcher.set_thread_count(limits.threads)
    metrics.held.set_function(dispatcher.held)
    try:
        server = create_server(
            switch,
            map=socket_map,
            _dispatcher=dispatcher,
            listen=listen,
            threads=limits.threads,
            connection_limit=limits.connection_limit,
            backlog=4096,
            asyncore_use_poll=True,
            # A connection idle this long is closed, looked for once a second.
            channel_timeout=limits.idle_timeout,
            cleanup_interval=1,
            # waitress answers bodies far over the limit itself (a bare 413); the app
            # answers the rest with its JSON 413. Big answers stream: keep waitress's
            # own buffer small so that it does not hold them whole.
            max_request_body_size=2 * limits.max_body_bytes + 1024 * 1024,
            outbuf_high_watermark=1024 * 1024,
            ident=IDENT,
            clear_untrusted_proxy_headers=False,
        )
    except (OSError, ValueError) as exc:  # waitress says ValueError for a host it cannot resolve
        reason = f"cannot listen on {listen}: {getattr(exc, 'strerror', None) or exc}"
        logs.event(log, reason, logging.ERROR)
        raise errors.CommandError(reason) from None
    # The parser refuses a body over the limit from its Content-Length when the client
    # waits for "100 Continue" before sending it.
    setattr(server.adj, BODY_LIMIT, limits.max_body_bytes)
    for listener in socket_map.values():
        if isinstance(listener, BaseWSGIServer):
            # waitress builds its listeners in create_server, with no class to pass in
            listener.__class__ = Listener
            listener.channel_class = Channel
            # waitress makes the trigger in the listener's __init__, with no class to pass in
            listener.trigger.__class__ = Trigger

    stop = threading.Event()

    def drain_then_stop() -> None:
        deadline = time.monotonic() + config.limits.drain_seconds
        while time.monotonic() < deadline:
            with state.lock:
                if state.in_flight == 0:
                    break
            time.sleep(0.05)
        else:
            logs.event(log, "drain time is up; exiting with requests in flight", logging.WARNING, in_flight=state.in_flight)
        stop.set()

    def on_term(signum, frame):
        if state.draining:
            return
        state.draining = True
        sd_notify("STOPPING=1")
        logs.event(log, "draining", in_flight=state.in_flight, signal=signal.Signals(signum).name)
        threading.Thread(target=drain_then_stop, name="drain", daemon=True).start()

    started = config

    def on_hup(signum, frame):
        nonlocal config
        try:
            new = configuration.load(config_path, lenient=True)
            new_secret = new.read_secret()
        except ConfigError as exc:
            logs.event(log, "reload refused, keeping the running configuration: " + "; ".join(exc.problems), logging.ERROR)
            return
        logs.setup(new.logging.level, new.logging.format)
        dispatcher.max_held = new.limits.max_in_flight
        switch.current = create_app(new, new_secret, state, metrics, control_port, access_lines, siblings(new, port))
        refresh = _upstream_view(new) != _upstream_view(config) and new.public_url and port == new.listen.port
        config = new
        # Against what the worker started with: until a restart, every reload says it.
        fixed = [key for key in configuration.restart_keys() if new.get(key) != started.get(key)]
        logs.event(log, "configuration reloaded", config=new.source, needs_restart=fixed)
        _log_failed_features(new)
        if refresh:  # the first worker speaks for the node
            threading.Thread(target=_refresh_registration, args=(new,), name="register", daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    sd_notify("READY=1")
    logs.event(log, "listening", address=listen, threads=limits.threads, cpu=cpu)
    try:
        while not stop.is_set():
            wasyncore.loop(timeout=0.2, map=socket_map, use_poll=True, count=1)
            access_lines.flush()
    finally:
        server.task_dispatcher.shutdown()
        wasyncore.close_all(socket_map)
        access_lines.flush()
    logs.event(log, "stopped")
    return 0


def _upstream_view(config: configuration.Config) -> tuple:
    """What the upstream stored at registration: the public URL and the features."""
    return config.public_url, features.feature_map(config, config.failed_features)


def _refresh_registration(config: configuration.Config) -> None:
    """After a reload that changed what the upstream sees: register again, and log how it went."""
    from . import registration
    from .errors import CommandError

    try:
        outcome = registration.register(config, warn=lambda line: logs.event(log, line, logging.WARNING))
    except (CommandError, ConfigError) as exc:
        logs.event(log, f"registration refresh failed: {exc}", logging.ERROR)
        return
    logs.event(log, f"registration refreshed: {outcome}")


def siblings(config: configuration.Config, port: int) -> list[tuple[str, int]]:
    """Where the node's other workers serve /_proxy/metrics: their control listeners if any."""
    listener = config.listen_control or config.listen
    host = local_host(listener.host)
    index = port - config.listen.port
    return [(host, listener.port + i) for i in range(config.worker_count) if i != index]


