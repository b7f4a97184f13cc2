"""gunicorn's threaded worker, giving a connection a thread only once its whole request has arrived.

gunicorn's `gthread` worker hands a connection to one of its threads as soon as the first bytes
arrive, and that thread then reads the rest of the request with no time limit. A client that
sends a request head a byte at a time ("slowloris"), or announces a body and trickles it, holds
a thread for as long as it likes: a hundred such connections from one laptop left the API
answering nothing, `/health` included. gunicorn's documentation asks for a buffering proxy in
front (nginx); this worker does that buffering itself, so the API is safe on its own port too:

- The worker's event loop reads each connection's request without blocking, and only a request
  complete up to its body (at most `AVSR_MAX_REQUEST_BYTES`, plain or chunked) goes to a thread.
  What takes longer than `AVSR_REQUEST_READ_TIMEOUT_S` is answered 408 `request_timeout` (or just
  closed when nothing arrived) and costs no thread.
- At most half of `worker_connections` may be waiting so; past that the one waiting longest is
  closed, so idle connections cannot fill the worker either.
- A thread still reads from the socket when the loop could not buffer the request: a body over
  the limit (refused 413 by the app), a head over `MAX_HEAD_BYTES` or one that `Expect`s
  `100-continue`. Those reads end `AVSR_REQUEST_READ_TIMEOUT_S` after the thread took the request,
  and each write times out after as long.

Not for TLS (the loop cannot read an encrypted head): with a certificate configured it behaves as
gunicorn's own worker. The settings come from `tasks.settings` like every other process's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import selectors
import socket
import time
from collections import OrderedDict
from functools import partial
from typing import Any

from gunicorn.workers.gthread import TConn, ThreadWorker

from tasks.errors import http_status
from tasks.settings import Settings

MAX_HEAD_BYTES = 64 * 1024  # a longer head goes to a thread as it is; the parser refuses it (431/414)
_CHUNK = 64 * 1024


class RequestBuffer:
    """The bytes of one request as they arrive. `add` says when a thread can take the request without
    waiting on the client: its head and (for a body within `max_body`, by length or chunked) its whole
    body are there, or it is one the parser refuses or the app must answer first (over the limits,
    malformed, `Expect`). Each byte is looked at once however the request is split (a client sending
    a byte at a time must not make the event loop rescan what it has)."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.data = bytearray()
        self.body_start = -1  # after the head's blank line, once it has come
        self.length: int | None = None  # the body's Content-Length; None: chunked
        self.ready = False
        self._pos = 0  # chunked: where the next chunk-size line starts
        self._total = 0  # chunked: the chunk bytes so far
        self._trailers = -1  # chunked: where the trailers start, after the last chunk

    def add(self, chunk: bytes) -> bool:
        seen = len(self.data)
        self.data += chunk
        if not self.ready:
            self.ready = self._complete(seen)
        return self.ready

    def _complete(self, seen: int) -> bool:
        if self.body_start < 0:
            end = self.data.find(b"\r\n\r\n", max(0, seen - 3))
            if end < 0:
                return len(self.data) > MAX_HEAD_BYTES  # the parser refuses it (431/414)
            self.body_start = end + 4
            if self._framing(bytes(self.data[:end])):
                return True
        if self.length is not None:
            return len(self.data) - self.body_start >= self.length
        return self._chunks_complete(seen)

    def _framing(self, head: bytes) -> bool:
        """Read the body's framing from `head`; True when the request needs no body to be handed on."""
        fields: dict[str, list[str]] = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            fields.setdefault(name.strip().lower(), []).append(value.strip())
        if "expect" in fields:
            return True  # the client waits for gunicorn's 100 Continue
        if "transfer-encoding" in fields:
            self._pos = self.body_start
            return False
        lengths = fields.get("content-length")
        if not lengths or len(lengths) > 1 or not lengths[0].isdigit():
            return True  # no body, or one the parser refuses (400)
        self.length = int(lengths[0])
        return self.length > self.max_body  # the app answers 413 without reading it

    def _chunks_complete(self, seen: int) -> bool:
        data = self.data
        if self._trailers < 0:
            while True:
                eol = data.find(b"\r\n", max(self._pos, seen - 1))
                if eol < 0:
                    return len(data) - self._pos > 1024  # a chunk-size line that long: the parser refuses it
                try:
                    size = int(bytes(data[self._pos:eol]).split(b";", 1)[0].strip(), 16)
                except ValueError:
                    return True  # malformed: the parser answers 400
                if size == 0:
                    self._trailers = eol
                    break
                self._total += size
                if self._total > self.max_body:
                    return True  # the app answers 413
                next_line = eol + 2 + size + 2
                if next_line > len(data):
                    self._pos, seen = next_line, next_line  # nothing to look at before it
                    return False
                self._pos, seen = next_line, next_line
        if len(data) - self._trailers > MAX_HEAD_BYTES:
            return True  # trailers without end: the parser refuses them
        return data.find(b"\r\n\r\n", max(self._trailers, seen - 3)) >= 0


def request_ready(data: bytes, max_body: int) -> bool:
    """Whether `data` begins with a request a thread can take (see `RequestBuffer`)."""
    return RequestBuffer(max_body).add(data)


class TimedSocket:
    """A client socket whose blocking reads end `timeout` seconds after `start_request` (the reads of
    one request together, so a trickle cannot stretch them) and whose writes each time out after
    `timeout` seconds.

    gunicorn switches its sockets between non-blocking (in the event loop) and blocking (in a
    thread, with no timeout); here blocking means bounded. Everything else is the socket's."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.raw = sock
        self.timeout = timeout
        self.blocking = False
        self.reads_end = time.monotonic() + timeout

    def start_request(self) -> None:
        self.reads_end = time.monotonic() + self.timeout

    def setblocking(self, flag: bool) -> None:
        self.blocking = flag
        self.raw.settimeout(self.timeout if flag else 0.0)

    def recv(self, size: int) -> bytes:
        if self.blocking:
            left = self.reads_end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the request did not arrive within {self.timeout:g} s")
            self.raw.settimeout(left)
        return self.raw.recv(size)

    def send(self, data: bytes) -> int:
        if self.blocking:
            self.raw.settimeout(self.timeout)
        return self.raw.send(data)

    def sendall(self, data: bytes) -> None:
        if self.blocking:
            self.raw.settimeout(self.timeout)
        self.raw.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


class _Conn(TConn):
    """gunicorn's connection, closing without lingering in the worker's loop."""

    def close(self, graceful: bool = False) -> None:
        # gunicorn's graceful close reads the client for up to 2 s in the worker's loop: a client
        # trickling bytes after its answer would stall every other connection. Here the FIN is
        # sent and only what has already arrived is drained (so the close sends no reset for it).
        if graceful:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
                self.sock.raw.setblocking(False)
                for _ in range(16):
                    if not self.sock.raw.recv(4096):
                        break
        self.sock.close()


class _Waiting:
    """A connection whose request has not arrived in full: what came so far and until when."""

    __slots__ = ("conn", "deadline", "request")

    def __init__(self, conn: TConn, deadline: float, request: RequestBuffer) -> None:
        self.conn = conn
        self.deadline = deadline
        self.request = request


def _timeout_answer(seconds: float) -> bytes:
    code = "request_timeout"
    body = json.dumps({"error": {"code": code, "message": f"the request did not arrive in full within "
                                                          f"{seconds:g} s"}}).encode()
    return (f"HTTP/1.1 {http_status(code)} Request Timeout\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode("latin-1") + body


class RequestBufferingWorker(ThreadWorker):
    """`gthread` whose threads only ever see requests that have arrived (see the module docstring)."""

    def init_process(self) -> None:
        settings = Settings.from_env()
        self.read_timeout = settings.request_read_timeout_s
        self.max_body = settings.max_request_bytes
        self.max_waiting = max(1, self.worker_connections // 2)
        self.waiting: OrderedDict[TConn, _Waiting] = OrderedDict()  # oldest first
        super().init_process()  # runs the worker's loop

    # Connections come from two places: accepted, or kept alive after a response.
    def accept(self, listener: socket.socket) -> None:
        if self.cfg.is_ssl:
            return super().accept(listener)
        try:
            sock, client = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return None
        self.nr_conns += 1
        self._wait_for_request(_Conn(self.cfg, TimedSocket(sock, self.read_timeout), client,
                                     listener.getsockname()))
        return None

    def on_client_socket_readable(self, conn: TConn, client: Any) -> None:
        if self.cfg.is_ssl:
            return super().on_client_socket_readable(conn, client)
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._wait_for_request(conn)
        return None

    def enqueue_req(self, conn: TConn) -> None:
        if self.cfg.is_ssl or conn.parser is None or getattr(conn, "early", b""):
            return super().enqueue_req(conn)
        # A kept-alive connection whose client sent more than its last request (pipelining): a
        # thread takes what follows only once that is whole too.
        pending = conn.parser.unreader.take_buffered()
        request = RequestBuffer(self.max_body)
        if request.add(pending):
            conn.early = pending
            return super().enqueue_req(conn)
        conn.sock.setblocking(False)
        self._wait_for_request(conn, request)
        return None

    def handle(self, conn: TConn) -> Any:
        early = getattr(conn, "early", b"")
        if early:
            conn.early = b""
            conn.data_ready = True  # no need for gunicorn's wait for the first byte
            conn.sock.setblocking(True)
            conn.init()
            conn.parser.unreader.unread(early)
        if isinstance(conn.sock, TimedSocket):
            conn.sock.start_request()
        return super().handle(conn)

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        while self.waiting:
            waiting = next(iter(self.waiting.values()))
            if waiting.deadline > now and (self.alive or waiting.request.data):
                break
            self._drop(waiting, answer=bool(waiting.request.data))

    def _wait_for_request(self, conn: TConn, request: RequestBuffer | None = None) -> None:
        """Read `conn`'s request (begun in `request`, if any) in the event loop until it is whole."""
        waiting = _Waiting(conn, time.monotonic() + self.read_timeout, request or RequestBuffer(self.max_body))
        self.waiting[conn] = waiting
        if len(self.waiting) > self.max_waiting:
            self._drop(next(iter(self.waiting.values())), answer=False)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, waiting))
        self._on_readable(waiting, conn.sock)  # the request may be here already

    def _on_readable(self, waiting: _Waiting, sock: Any) -> None:
        if waiting.conn not in self.waiting:
            return
        try:
            chunk = sock.raw.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(waiting, answer=False)
            return
        if waiting.request.add(chunk):
            del self.waiting[waiting.conn]
            self.poller.unregister(sock)
            waiting.conn.early = bytes(waiting.request.data)
            self.enqueue_req(waiting.conn)

    def _drop(self, waiting: _Waiting, answer: bool) -> None:
        """Close a connection that has not sent its request (with a 408 when part of it came)."""
        self.waiting.pop(waiting.conn, None)
        sock = waiting.conn.sock
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(sock)
        if answer:
            with contextlib.suppress(OSError):
                sock.raw.send(_timeout_answer(self.read_timeout))
        self.nr_conns -= 1
        waiting.conn.close()
