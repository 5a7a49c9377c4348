"""A fault-injecting HTTP/1.1 proxy on 127.0.0.1, between s3datafs and the local S3 server.

Tests point an ``S3Source`` (``endpoint_url``) or a real mount (``AWS_ENDPOINT_URL``) at
``FaultProxy.endpoint`` and tell the proxy, per test, what to break. Requests are forwarded to the
upstream server unchanged unless a *rule* matches.

Control API (in process; the proxy serves from threads of the test process)::

    with FaultProxy(s3server.endpoint) as proxy:
        proxy.inject("error", status=503, code="SlowDown", times=2)   # the next 2 GetObjects
        proxy.inject("reset", probability=0.2, times=None)           # 20 % of them, forever
        proxy.inject("stall", key="p/big.bin")                        # hang one key's next GET
        proxy.wait_injected(3, timeout=10)                            # synchronise on faults
        proxy.clear()                                                 # no rules; free stalls
        proxy.injected, proxy.requests, proxy.accepted                # what happened

A rule matches a request by S3 operation (``op``, default ``"GetObject"``; ``"*"`` for any; the
classification is ``devtools.s3server``'s, so both ends agree), optionally by exact ``key``, and
optionally by the access key id that signed it (``signed_with``: a predicate, so a test can
refuse keys once "expired", as S3 does; moto checks no signature), or only for requests that
lack a header among their signed ones (``unsigned="x-amz-request-payer"``: a Requester Pays
bucket). ``signed`` lists ``(op, key, access key id)`` of every request, in order.
``times`` bounds how often it fires (``None``: unlimited), ``probability`` makes it random (from
the proxy's seeded RNG). Rules are tried in the order they were added; the first that fires wins.

Actions (``ACTIONS``):

==============  ===================================================================================
``reset``       the request is never forwarded; the client connection is reset (TCP RST)
``delay``       the request is forwarded after ``seconds``
``stall``       the request is never answered: the connection stays open and silent until
                ``clear()``/``release()``/``stop()`` or ``seconds`` (default 120) pass, then closes
``error``       answered by the proxy: ``status`` with an S3 XML error ``code`` (keep-alive)
``garbage``     answered by the proxy with bytes that are not HTTP, then closed
``truncate``    the real response, its body cut to ``keep`` (fraction), then the connection closes
``reset_body``  like ``truncate`` but the connection is reset
``stall_body``  headers and ``keep`` of the body, then silence (as ``stall``)
``short``       a well-formed response whose body (and Content-Length) is cut to ``keep``
``long``        a well-formed response with ``extra`` bytes appended (Content-Length grown)
``shift_range`` the body untouched, its Content-Range moved by ``by`` bytes (same length)
``drop_range``  the body untouched, Content-Range removed
``throttle``    the real response, its body sent at ``rate`` bytes/s (a slow link)
``flip``        one byte of the body inverted (at ``at``, default the middle); length unchanged
                (``strip_checksums``: and x-amz-checksum-* headers dropped, as real S3 sends none
                for ranged GETs while moto does for a whole-object range)
``rewrite``     a store that behaves otherwise than S3: the request forwarded without the headers
                or query parameters named in ``drop`` (``("if-match", "versionId")``: a store
                that ignores them), and the response's headers and body passed through ``edit``
                (``edit(headers, body) -> (headers, body)``; Content-Length follows the body,
                except for a HEAD, whose headers are sent as ``edit`` returns them)
==============  ===================================================================================

Body actions apply to responses with a Content-Length (every GetObject); the response is then
read whole into memory. Everything else is streamed in chunks, so a proxy with no rules is cheap.

Design: one thread per client connection, blocking sockets, one upstream connection per client
connection (kept alive as long as both sides allow), so keep-alive pools behave as they would
against S3. HTTP is parsed just enough to frame messages: request line, headers,
Content-Length or chunked bodies. Loopback only; ``stop()`` closes every socket and joins nothing
it cannot (connection threads are daemons), so a test can never hang on the proxy.
"""

from __future__ import annotations

import collections
import contextlib
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import parse_qs, parse_qsl, urlencode, urlparse

from devtools.s3server import classify, request_target

_BODY_ACTIONS = frozenset(  # rules that rewrite the response body, so it cannot be streamed
    [
        "truncate",
        "reset_body",
        "stall_body",
        "short",
        "long",
        "shift_range",
        "drop_range",
        "flip",
        "throttle",
    ]
)
ACTIONS = _BODY_ACTIONS | {"reset", "delay", "stall", "error", "garbage", "rewrite"}
Headers = list[tuple[bytes, bytes]]
CHUNK = 256 * 1024
_ACCESS_KEY = re.compile(r"Credential=([^/]*)/")  # SigV4's Authorization header
_SIGNED_HEADERS = re.compile(r"SignedHeaders=([^,\s]*)")
DEFAULT_STALL = 120.0
_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    412: "Precondition Failed",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass
class Rule:
    """One kind of fault, for requests that match; see the module docstring."""

    action: str
    op: str = "GetObject"
    key: str | None = None
    times: int | None = 1
    probability: float = 1.0
    status: int = 503
    code: str = "SlowDown"
    seconds: float = DEFAULT_STALL
    keep: float = 0.5
    extra: int = 17
    by: int = 1
    at: int | None = None
    strip_checksums: bool = False  # body actions: drop x-amz-checksum-* too (see ``flip``)
    rate: float = 1024 * 1024  # bytes per second, for ``throttle``
    signed_with: Callable[[str], bool] | None = None  # of the request's access key id
    unsigned: str | None = None  # fires only on requests without this header, signed
    drop: tuple[str, ...] = ()  # ``rewrite``: request headers and query parameters removed
    edit: Callable[[Headers, bytes], tuple[Headers, bytes]] | None = None  # ``rewrite``
    fired: int = 0

    def matches(self, op: str, key: str, access_key: str, signed_headers: set[str]) -> bool:
        return (
            (self.times is None or self.fired < self.times)
            and (self.op == "*" or self.op == op)
            and (self.key is None or self.key == key)
            and (self.signed_with is None or self.signed_with(access_key))
            and (self.unsigned is None or self.unsigned not in signed_headers)
        )


@dataclass(frozen=True)
class Injection:
    """A fault that fired: which action, on which request."""

    action: str
    op: str
    key: str
    range: str | None
    at: float = field(default_factory=time.monotonic)


@dataclass
class _Request:
    method: str
    target: str
    head: bytes  # request line and headers, as received
    headers: dict[str, str]  # lower-case names
    body: bytes
    op: str
    key: str


class _Closed(Exception):
    """The peer closed the connection (or the proxy is stopping)."""


class FaultProxy:
    """See the module docstring. A context manager; ``start()`` returns self."""

    def __init__(self, upstream: str, *, seed: int = 0) -> None:
        parsed = urlparse(upstream)
        self._upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self._rules: list[Rule] = []
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._release = threading.Event()
        self._stopping = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.injected: list[Injection] = []
        self.requests: collections.Counter[str] = collections.Counter()
        self.signed: list[tuple[str, str, str]] = []  # (op, key, access key id) per request
        self.accepted = 0  # client connections so far (keep-alive reuses them)
        self.endpoint = ""

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        listener = socket.create_server(("127.0.0.1", 0))
        self._listener = listener
        self.endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        threading.Thread(target=self._accept, name="faultproxy-accept", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._release.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _close(sock)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control ---------------------------------------------------------------------------------

    def inject(self, action: str, **options: object) -> Rule:
        """Add a rule (see ``Rule`` for the options); returns it (``rule.fired`` counts)."""
        if action not in ACTIONS:
            raise ValueError(f"unknown fault action {action!r}")
        rule = Rule(action, **options)  # type: ignore[arg-type]
        with self._lock:
            self._release.clear()
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule and release stalled connections; forwarding resumes as normal."""
        with self._lock:
            self._rules.clear()
        self.release()

    def release(self) -> None:
        """End every stall now (the stalled connections are closed)."""
        self._release.set()

    def wait_injected(self, count: int, timeout: float = 10.0, action: str | None = None) -> None:
        """Block until ``count`` faults (of ``action``, if any) have fired, else AssertionError."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._count(action) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"only {self._count(action)} of {count} faults fired in {timeout}s"
                    )
                self._changed.wait(remaining)

    def injected_count(self, action: str | None = None) -> int:
        with self._lock:
            return self._count(action)

    def _count(self, action: str | None) -> int:
        return sum(1 for i in self.injected if action is None or i.action == action)

    def _choose(self, request: _Request) -> Rule | None:
        authorization = request.headers.get("authorization", "")
        match = _ACCESS_KEY.search(authorization)
        access_key = match[1] if match else ""
        listed = _SIGNED_HEADERS.search(authorization)
        signed = set(listed[1].split(";")) & set(request.headers) if listed else set()
        with self._lock:
            self.requests[request.op] += 1
            self.signed.append((request.op, request.key, access_key))
            for rule in self._rules:
                if rule.matches(request.op, request.key, access_key, signed) and (
                    rule.probability >= 1.0 or self._random.random() < rule.probability
                ):
                    rule.fired += 1
                    self.injected.append(
                        Injection(
                            rule.action, request.op, request.key, request.headers.get("range")
                        )
                    )
                    self._changed.notify_all()
                    return rule
        return None

    # -- serving ---------------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            self._track(client)
            threading.Thread(
                target=self._serve, args=(client,), name="faultproxy-conn", daemon=True
            ).start()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)
        if self._stopping.is_set():
            _close(sock)

    def _untrack(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._sockets.discard(sock)
        _close(sock)

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        up_reader: BinaryIO | None = None
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader = client.makefile("rb")
            while not self._stopping.is_set():
                request = _read_request(reader)
                rule = self._choose(request)
                if rule is not None and rule.action == "rewrite":
                    request = _without(request, rule.drop)
                elif rule is not None and rule.action not in _BODY_ACTIONS:
                    verdict = self._before_forwarding(rule, client)
                    if verdict == "close":
                        return
                    if verdict == "answered":
                        continue
                if upstream is None:
                    upstream = socket.create_connection(self._upstream, timeout=None)
                    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self._track(upstream)
                    up_reader = upstream.makefile("rb")
                upstream.sendall(request.head + request.body)
                assert up_reader is not None
                keep = self._relay(request, up_reader, client, rule)
                if not keep:
                    return
                if request.headers.get("connection", "").lower() == "close":
                    return
        except (_Closed, OSError):
            return
        finally:
            self._untrack(upstream)
            self._untrack(client)

    def _before_forwarding(self, rule: Rule, client: socket.socket) -> str:
        """Apply a request-level fault: ``forward``, ``answered`` (by the proxy) or ``close``."""
        if rule.action == "delay":
            self._release.wait(rule.seconds)
            return "close" if self._stopping.is_set() else "forward"
        if rule.action == "error":
            client.sendall(_error_response(rule.status, rule.code))
            return "answered"
        if rule.action == "reset":
            _reset(client)
        elif rule.action == "stall":
            self._stall(rule)
        elif rule.action == "garbage":
            client.sendall(b"\x00\xffthis is not HTTP\r\n\r\n\x13\x37")
        return "close"

    def _stall(self, rule: Rule) -> None:
        self._release.wait(rule.seconds)

    def _relay(
        self, request: _Request, up: BinaryIO, client: socket.socket, rule: Rule | None
    ) -> bool:
        """Forward one response (changed by ``rule``); True if both connections stay usable."""
        status_line, headers = _read_head(up)
        status = int(status_line.split(b" ", 2)[1])
        names = {name.lower(): value for name, value in headers}
        keep_alive = names.get(b"connection", b"").lower() != b"close"
        no_body = request.method == "HEAD" or status in (204, 304) or 100 <= status < 200
        edit = rule.edit if rule is not None and rule.action == "rewrite" else None
        if no_body:
            if edit is not None:
                headers, _ = edit(headers, b"")
            client.sendall(_head(status_line, headers))
            return keep_alive
        if b"content-length" in names:
            length = int(names[b"content-length"])
            if edit is not None:
                headers, body = edit(headers, _read_exact(up, length))
                headers = [(n, v) for n, v in headers if n.lower() != b"content-length"]
                headers.append((b"Content-Length", str(len(body)).encode()))
                client.sendall(_head(status_line, headers) + body)
                return keep_alive
            if rule is not None and rule.action in _BODY_ACTIONS:
                body = _read_exact(up, length)
                return self._changed_body(rule, status_line, headers, body, client) and keep_alive
            client.sendall(_head(status_line, headers))
            _copy(up, client, length)
            return keep_alive
        client.sendall(_head(status_line, headers))
        if names.get(b"transfer-encoding", b"").lower() == b"chunked":
            _copy_chunked(up, client)
            return keep_alive
        _copy(up, client, None)  # body until the server closes
        return False

    def _changed_body(
        self,
        rule: Rule,
        status_line: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        client: socket.socket,
    ) -> bool:
        action, cut = rule.action, int(len(body) * rule.keep)
        if action in ("truncate", "reset_body", "stall_body"):
            client.sendall(_head(status_line, headers) + body[:cut])
            if action == "reset_body":
                _reset(client)
            elif action == "stall_body":
                self._stall(rule)
            return False
        if action == "throttle":
            client.sendall(_head(status_line, headers))
            for offset in range(0, len(body), 16 * 1024):
                if self._stopping.is_set():
                    return False
                client.sendall(body[offset : offset + 16 * 1024])
                time.sleep(16 * 1024 / rule.rate)
            return True
        if action == "short":
            body = body[:cut]
        elif action == "long":
            body += b"\xa5" * rule.extra
        elif action == "flip" and body:
            at = len(body) // 2 if rule.at is None else min(rule.at, len(body) - 1)
            body = body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1 :]
        dropped = {b"content-length"}
        if rule.strip_checksums:
            dropped |= {n.lower() for n, _ in headers if n.lower().startswith(b"x-amz-checksum-")}
        headers = [(n, v) for n, v in headers if n.lower() not in dropped]
        headers.append((b"Content-Length", str(len(body)).encode()))
        if action == "shift_range":
            headers = [
                (n, _shift(v, rule.by) if n.lower() == b"content-range" else v) for n, v in headers
            ]
        elif action == "drop_range":
            headers = [(n, v) for n, v in headers if n.lower() != b"content-range"]
        client.sendall(_head(status_line, headers) + body)
        return True


# -- HTTP framing ---------------------------------------------------------------------------------


def _read_head(stream: BinaryIO) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    first = stream.readline(65537)
    if not first:
        raise _Closed
    headers: list[tuple[bytes, bytes]] = []
    while True:
        line = stream.readline(65537)
        if not line:
            raise _Closed
        if line in (b"\r\n", b"\n"):
            return first.rstrip(b"\r\n"), headers
        name, _, value = line.partition(b":")
        headers.append((name.strip(), value.strip()))


def _head(status_line: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [status_line] + [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _read_request(stream: BinaryIO) -> _Request:
    request_line, headers = _read_head(stream)
    method, target, _version = request_line.decode("latin-1").split(" ", 2)
    names = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in headers}
    if names.get("transfer-encoding", "").lower() == "chunked":
        body = b"".join(_chunks(stream))
    else:
        body = _read_exact(stream, int(names.get("content-length") or 0))
    bucket, key = request_target({"RAW_URI": target})
    query = parse_qs(urlparse(target).query, keep_blank_values=True)
    op = classify(method, bucket, key, query, {})
    return _Request(method, target, _head(request_line, headers), names, body, op, key)


def _without(request: _Request, names: tuple[str, ...]) -> _Request:
    """``request`` without the headers and query parameters called ``names`` (any case)."""
    if not names:
        return request
    dropped = {name.lower() for name in names}
    request_line, *lines = request.head.rstrip(b"\r\n").split(b"\r\n")
    method, target, version = request_line.decode("latin-1").split(" ", 2)
    parsed = urlparse(target)
    query = [(k, v) for k, v in parse_qsl(parsed.query, keep_blank_values=True)
             if k.lower() not in dropped]
    target = parsed._replace(query=urlencode(query)).geturl()
    kept = [line for line in lines
            if line.partition(b":")[0].strip().decode("latin-1").lower() not in dropped]
    head = b"\r\n".join([f"{method} {target} {version}".encode("latin-1"), *kept]) + b"\r\n\r\n"
    headers = {k: v for k, v in request.headers.items() if k not in dropped}
    return _Request(method, target, head, headers, request.body, request.op, request.key)


def _read_exact(stream: BinaryIO, length: int) -> bytes:
    data = stream.read(length) if length else b""
    if len(data) != length:
        raise _Closed
    return data


def _copy(source: BinaryIO, client: socket.socket, length: int | None) -> None:
    remaining = length
    while remaining is None or remaining > 0:
        chunk = source.read1(CHUNK if remaining is None else min(CHUNK, remaining))  # type: ignore[attr-defined]
        if not chunk:
            if remaining is None:
                return
            raise _Closed
        client.sendall(chunk)
        if remaining is not None:
            remaining -= len(chunk)


def _chunks(stream: BinaryIO) -> Iterator[bytes]:
    """The raw bytes of a chunked body, framing included, ending with the last chunk."""
    while True:
        size_line = stream.readline(65537)
        if not size_line:
            raise _Closed
        size = int(size_line.split(b";")[0].strip(), 16)
        data = _read_exact(stream, size + 2)
        yield size_line + data
        if size == 0:
            return  # trailers are not used by S3 responses


def _copy_chunked(source: BinaryIO, client: socket.socket) -> None:
    for piece in _chunks(source):
        client.sendall(piece)


def _shift(content_range: bytes, by: int) -> bytes:
    unit, _, rest = content_range.partition(b" ")
    span, _, total = rest.partition(b"/")
    first, _, last = span.partition(b"-")
    return b"%s %d-%d/%s" % (unit, int(first) + by, int(last) + by, total)


def _error_response(status: int, code: str) -> bytes:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>injected by the fault proxy</Message>"
        "<RequestId>FAULTPROXY</RequestId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        "x-amz-request-id: FAULTPROXY\r\n\r\n"
    ).encode()
    return head + body


def _reset(sock: socket.socket) -> None:
    """Close with RST rather than FIN: the peer sees 'connection reset by peer'."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
