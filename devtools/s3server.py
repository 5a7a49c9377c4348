"""A real local S3 server process (moto) for tests, demos and benchmarks.

Server side (``python devtools/s3server.py [--host H] [--port P] [--port-file F]``):
moto's WSGI app behind :class:`S3Middleware`, served by werkzeug's threaded server on a loopback
address only.  Once listening it prints exactly one stdout line ``READY http://127.0.0.1:PORT``
(and writes the URL to ``--port-file`` first, atomically); SIGTERM/SIGINT exit cleanly.

The middleware classifies every request by S3 operation (path-style addressing: ``/bucket`` and
``/bucket/key``, parsed exactly as moto parses them), counts it server-side, totals the body bytes
of successful GetObject responses and keeps the last 2000 request records.  ``GET
/__s3server__/stats`` and ``POST /__s3server__/reset`` are answered by the middleware itself and
never counted.  Stats also carry ``fast_gets``, the number of GETs the fast path answered.
werkzeug's per-request access log is off (the stats are the record); errors still go to stderr.

Keep-alive: werkzeug's dev server speaks HTTP/1.1 but sends ``Connection: close`` on every
response, and after each response drains whatever the socket holds (which, on a persistent
connection, would swallow the client's next request).  S3 keeps connections open, and a new TCP
connection per request penalises every client, the more so behind injected latency.  So the
request handler (:func:`keepalive_handler`) keeps connections open: werkzeug's drain reads an empty
buffer, the app reads the body through a stream limited to Content-Length, the unread rest of a
body (up to 1 MiB) is drained after the response, and the connection is closed instead when the
request body was chunked, the client asked for ``close``, or the app failed after the response
started (:class:`FailureMark` notices; a truncated body must end the connection).  Every
response carries Content-Length or is chunked (werkzeug chunks a body of unknown length).

Fast GETs (default on): stock moto copies the whole object for every ranged GET, and its
request handling costs ~1.3 ms of CPU per GET more than the bytes do (measured: a whole 64 KiB
object 1.6 ms of server CPU through moto, 0.32 ms through the fast path), so a benchmark of
small objects measured the server.  For a GetObject without ``Range`` (a 200) or with a single
``Range: bytes=a-b`` (or ``a-``, ``-n``; a 206) the middleware looks the key up in moto's
in-process backend and streams the bytes from ``FakeKey._value_buffer``, with the headers moto
sends: its ``x-amz-checksum-*`` ones too, in checksum mode, for the whole object (a 200, or a
range that covers it), as moto does.  Invariant: the fast path only ever answers a 200 or 206
that moto would answer identically (same headers bar the random request id, same bytes); every
other outcome - missing bucket/key/version, delete marker, If-Match mismatch, unsatisfiable,
multi or unparsable range, other conditional headers, SSE request headers, CORS (Origin),
response-* overrides, partNumber, bucket policy/logging, archived objects, anonymous or
virtual-host requests, IAM auth - is handed to moto unchanged, so error responses are moto's own.
Buffer reads happen under ``FakeKey.lock`` in bounded chunks; the first chunk is read under the
same lock as the size/ETag snapshot, so ranges up to one chunk are atomic.

Big buckets (``devtools/s3fastlist.py``): ``--fast-listing`` (default on) replaces moto's
ListObjectsV2 and ListObjectVersions with equivalents that walk a sorted key index instead of
scanning the bucket per page, and ``POST /__s3server__/populate`` (JSON ``{"bucket": B,
"objects": [[key, size], ...]}``, :meth:`S3Server.populate`) creates objects in moto's in-process
backend at ~40,000/s, so a million-key bucket takes seconds to fill and to list.

Client side: :class:`S3Server` starts the script as a subprocess with a clean dummy AWS
environment (:func:`clean_aws_env`), stderr to a log file in a temp dir.  moto is imported only in
the server process, never by importing this module.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import ipaddress
import itertools
import json
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, unquote, urlparse


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


CONTROL_PREFIX = "/__s3server__/"
HISTORY = 2000
CHUNK = 1 << 20
KEEPALIVE_DRAIN = 1 << 20  # unread request-body bytes drained to keep a connection; more: close
FAILED = "s3server.failed"  # environ key set by FailureMark
READY_TIMEOUT = 30.0
STOP_GRACE = 5.0
LIST_PARAMS = _names(
    "prefix delimiter marker max-keys encoding-type list-type continuation-token fetch-owner "
    "start-after"
)
GET_PARAMS = _names(
    "versionId partNumber response-cache-control response-content-disposition "
    "response-content-encoding response-content-language response-content-type "
    "response-expires"
)
BUCKET_PUTS = {frozenset(): "CreateBucket", frozenset({"versioning"}): "PutBucketVersioning"}
# Request headers whose semantics the fast path does not reproduce (WSGI environ names).
SLOW_HEADERS = _names(
    "HTTP_IF_NONE_MATCH HTTP_IF_MODIFIED_SINCE HTTP_IF_UNMODIFIED_SINCE HTTP_ORIGIN "
    "HTTP_X_MOTO_ACCOUNT_ID"
)
RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
# botocore session variables that client() cuts off from the environment.
ISOLATED_VARS = {"profile": None, "config_file": os.devnull, "credentials_file": os.devnull}
CREDENTIAL_RE = re.compile(r"Credential=[^/,]+/[^/,]+/([^/,]+)/")

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
Query = dict[str, list[str]]


# ---------------------------------------------------------------- request classification


def request_target(environ: Environ) -> tuple[str, str]:
    """(bucket, key) of a path-style request, parsed like moto: raw bucket, unquoted key."""
    raw = environ.get("RAW_URI") or environ.get("PATH_INFO") or "/"
    path = urlparse(raw).path if "://" in raw else raw.split("?", 1)[0]
    return path.lstrip("/").split("/")[0], "/".join(unquote(path).split("/")[2:])


def classify(method: str, bucket: str, key: str, query: Query, environ: Environ) -> str:
    params = set(query) - {"x-id"}
    if not bucket:
        return "Other"
    if key:
        return _object_op(method, params, environ)
    if method == "HEAD":
        return "HeadBucket"
    if method == "PUT":
        return BUCKET_PUTS.get(frozenset(params), "Other")
    if method != "GET":
        return "Other"
    if "versions" in params:
        return "ListObjectVersions"
    if params == {"versioning"}:
        return "GetBucketVersioning"
    if params <= LIST_PARAMS:
        return "ListObjectsV2" if query.get("list-type") == ["2"] else "ListObjects"
    return "Other"


def _object_op(method: str, params: set[str], environ: Environ) -> str:
    if method == "GET" and params <= GET_PARAMS:
        return "GetObject"
    if method == "HEAD" and params <= {"versionId", "partNumber"}:
        return "HeadObject"
    if method == "PUT" and not params and "HTTP_X_AMZ_COPY_SOURCE" not in environ:
        return "PutObject"
    if method == "DELETE" and params <= {"versionId"}:
        return "DeleteObject"
    return "Other"


# ---------------------------------------------------------------- statistics


class Stats:
    """Thread-safe counters; records are appended on arrival, their status set on response."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._ops: collections.Counter[str] = collections.Counter()
            self._get_bytes = 0
            self._fast_gets = 0
            self._requests: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY)

    def record(self, rec: dict[str, Any]) -> None:
        with self._lock:
            self._ops[rec["op"]] += 1
            self._requests.append(rec)

    def add(self, *, get_bytes: int = 0, fast_gets: int = 0) -> None:
        with self._lock:
            self._get_bytes += get_bytes
            self._fast_gets += fast_gets

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "ops": dict(self._ops),
                "get_bytes": self._get_bytes,
                "fast_gets": self._fast_gets,
                "requests": [dict(r) for r in self._requests],
            }


class CountingBody:
    """WSGI body wrapper reporting the length of every chunk it yields; forwards close()."""

    def __init__(self, body: Iterable[bytes], on_chunk: Callable[[int], None]) -> None:
        self._body, self._on_chunk = body, on_chunk

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._body:
            self._on_chunk(len(chunk))
            yield chunk

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            close()


# ---------------------------------------------------------------- fast ranged GETs


def resolve_range(header: str, size: int) -> tuple[int, int] | None:
    """Inclusive (begin, end) exactly as moto would serve it as a 206, else None (moto decides)."""
    match = RANGE_RE.fullmatch(header.strip())
    if match is None or match.groups() == ("", ""):
        return None
    first, last = (int(g) if g else None for g in match.groups())
    if first is None and last is not None:  # suffix range "-n"; "-0" is a 416 in moto
        begin, end = (max(size - last, 0), size - 1) if last else (size, -1)
    else:
        begin, end = first or 0, size - 1 if last is None else min(last, size - 1)
    if begin >= size or begin > end:
        return None  # moto answers 416 InvalidRange or a plain 200
    return begin, end


class FastRanges:
    """Answers plain and single-range GetObject requests straight from moto's backend."""

    def __init__(self) -> None:
        from moto import settings
        from moto.core.responses import BaseResponse
        from moto.iam.models import get_account_id_from
        from moto.s3.models import FakeKey, s3_backends
        from moto.s3.utils import ARCHIVE_STORAGE_CLASSES
        from moto.utilities.aws_headers import gen_amzn_requestid_long
        from moto.utilities.utils import get_partition

        self._settings, self._key_re = settings, BaseResponse.access_key_regex
        self._account_of, self._partition_of = get_account_id_from, get_partition
        self._fake_key, self._backends = FakeKey, s3_backends
        self._archive, self._request_id = set(ARCHIVE_STORAGE_CLASSES), gen_amzn_requestid_long

    def __call__(
        self, environ: Environ, bucket: str, key: str, query: Query, start: StartResponse
    ) -> Iterable[bytes] | None:
        """Start a 200 or 206 response and return its body, or None to let moto answer."""
        try:
            plan = self._plan(environ, bucket, key, query) if self._eligible(environ) else None
        except Exception:  # anything odd (missing bucket, ...) is moto's business
            plan = None
        if plan is None:
            return None
        fake, begin, end, first, status, headers = plan
        start(status, list(headers.items()))
        return self._stream(fake, begin + len(first), end, first)

    def _eligible(self, environ: Environ) -> bool:
        host = environ.get("HTTP_HOST", "").rsplit(":", 1)[0].strip("[]")
        return (
            "HTTP_AUTHORIZATION" in environ  # anonymous requests go through key ACL checks
            and (host == "localhost" or _is_ip(host))  # moto uses path-style for these only
            and SLOW_HEADERS.isdisjoint(environ)
            and not any(h.startswith("HTTP_X_AMZ_SERVER_SIDE_ENCRYPTION") for h in environ)
            and math.isinf(self._settings.INITIAL_NO_AUTH_ACTION_COUNT)
        )

    def _backend(self, environ: Environ) -> Any:
        auth = environ["HTTP_AUTHORIZATION"]
        match, region = self._key_re.search(auth), CREDENTIAL_RE.search(auth)
        account = os.environ.get("MOTO_ACCOUNT_ID") or self._account_of(
            match.group(1) if match else "AKIAEXAMPLE"
        )
        return self._backends[account][self._partition_of(region.group(1) if region else "")]

    def _plan(self, environ: Environ, bucket_name: str, key_name: str, query: Query) -> Any:
        if set(query) - {"versionId", "x-id"}:
            return None
        backend = self._backend(environ)
        bucket = backend.get_bucket(bucket_name)
        if bucket.policy or bucket.logging:
            return None
        fake = backend.get_object(
            bucket_name, key_name, version_id=query.get("versionId", [None])[0]
        )
        if not isinstance(fake, self._fake_key) or fake.storage_class in self._archive:
            return None  # missing key/version, delete marker: moto builds the error
        if_match, ranged = environ.get("HTTP_IF_MATCH"), "HTTP_RANGE" in environ
        with fake.lock:
            if fake.disposed:
                return None
            size, etag = fake.size, fake.etag
            span = resolve_range(environ["HTTP_RANGE"], size) if ranged else (0, size - 1)
            if span is None or (if_match and etag not in (if_match, f'"{if_match}"')):
                return None
            fake._value_buffer.seek(span[0])
            first = fake._value_buffer.read(min(CHUNK, span[1] + 1 - span[0]))
            headers = self._headers(environ, fake, span, size, ranged)
        status = "206 Partial Content" if ranged else "200 OK"
        return fake, span[0], span[1], first, status, headers

    def _headers(
        self, environ: Environ, fake: Any, span: tuple[int, int], size: int, ranged: bool
    ) -> dict[str, str]:
        """The headers moto's get_object (+ _handle_range_header for a range) would send."""
        headers: dict[str, Any] = {}
        if fake.version_id != "null":
            headers["x-amz-version-id"] = fake.version_id
        headers.update(fake.response_dict)
        if _checksum_shown(environ, fake, span, size):
            checksum = fake.checksum_value
            if fake.checksum_type == "COMPOSITE":
                checksum = f"{checksum}-{fake.checksum_parts}"
            headers[f"x-amz-checksum-{fake.checksum_algorithm.lower()}"] = checksum
            if fake.checksum_type:
                headers["x-amz-checksum-type"] = fake.checksum_type
        headers.update(fake.metadata)
        headers["Accept-Ranges"] = "bytes"
        if ranged:
            headers["content-range"] = f"bytes {span[0]}-{span[1]}/{size}"
        headers["content-length"] = str(span[1] + 1 - span[0])
        if not self._settings.DISABLE_GLOBAL_CORS:  # flask-cors on moto's app adds this
            headers["Access-Control-Allow-Origin"] = "*"
        self._request_id(headers)
        return {name: str(value) for name, value in headers.items()}

    @staticmethod
    def _stream(fake: Any, pos: int, end: int, first: bytes) -> Iterator[bytes]:
        if first:
            yield first
        while pos <= end:
            with fake.lock:
                if fake.disposed:
                    raise RuntimeError(f"{fake.name} was deleted while being streamed")
                fake._value_buffer.seek(pos)
                chunk = fake._value_buffer.read(min(CHUNK, end + 1 - pos))
            if not chunk:
                raise RuntimeError(f"{fake.name} shrank while being streamed")
            pos += len(chunk)
            yield chunk


def _checksum_shown(environ: Environ, fake: Any, span: tuple[int, int], size: int) -> bool:
    """moto sends x-amz-checksum-* headers in checksum mode for the whole object only."""
    return (
        environ.get("HTTP_X_AMZ_CHECKSUM_MODE") == "ENABLED"
        and fake.checksum_algorithm is not None
        and span == (0, size - 1)
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- the middleware


class S3Middleware:
    """WSGI middleware in front of moto: counts operations, serves control and fast-range GETs."""

    def __init__(self, app: Callable[..., Iterable[bytes]], *, fast_ranges: bool = True) -> None:
        self.app, self.stats = app, Stats()
        self.fast = FastRanges() if fast_ranges else None

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "").startswith(CONTROL_PREFIX):
            return self._control(environ, start_response)
        bucket, key = request_target(environ)
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        op = classify(environ["REQUEST_METHOD"], bucket, key, query, environ)
        rec = {
            "op": op,
            "bucket": bucket or None,
            "key": key or None,
            "version_id": query.get("versionId", [None])[0],
            "range": environ.get("HTTP_RANGE"),
            "if_match": environ.get("HTTP_IF_MATCH"),
            "status": None,
        }
        self.stats.record(rec)

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            rec["status"] = int(status.split(None, 1)[0])
            return start_response(status, headers, exc_info)

        if op != "GetObject":
            return self.app(environ, start)
        body = self.fast(environ, bucket, key, query, start) if self.fast else None
        if body is not None:
            self.stats.add(fast_gets=1)
        else:
            body = self.app(environ, start)
        return CountingBody(body, lambda n: self.stats.add(get_bytes=n * (rec["status"] < 300)))

    def _control(self, environ: Environ, start_response: StartResponse) -> list[bytes]:
        action = (environ["REQUEST_METHOD"], environ["PATH_INFO"][len(CONTROL_PREFIX) :])
        if action == ("GET", "stats"):
            status, payload = "200 OK", self.stats.snapshot()
        elif action == ("POST", "reset"):
            self.stats.reset()
            status, payload = "200 OK", {"reset": True}
        elif action == ("POST", "populate"):
            status, payload = _populate(environ)
        else:
            status, payload = "404 Not Found", {"error": f"unknown control request {action}"}
        body = json.dumps(payload).encode()
        start_response(
            status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        return [body]


def _fastlist() -> Any:
    """devtools/s3fastlist.py, whether this file runs as a script or as ``devtools.s3server``."""
    import importlib

    return importlib.import_module(f"{__package__}.s3fastlist" if __package__ else "s3fastlist")


def _populate(environ: Environ) -> tuple[str, dict[str, Any]]:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        request = json.loads(environ["wsgi.input"].read(length))
        return "200 OK", _fastlist().populate(request)
    except Exception as exc:  # a missing bucket, a malformed request: say so, keep serving
        return "400 Bad Request", {"error": f"{type(exc).__name__}: {exc}"}


# ---------------------------------------------------------------- HTTP/1.1 keep-alive


class FailureMark:
    """WSGI wrapper: sets ``environ[FAILED]`` when the app raises, before or while streaming."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        try:
            body = self.app(environ, start_response)
        except BaseException:
            environ[FAILED] = True
            raise
        return self._iterate(body, environ)

    @staticmethod
    def _iterate(body: Iterable[bytes], environ: Environ) -> Iterator[bytes]:
        try:
            yield from body
        except BaseException:
            environ[FAILED] = True
            raise
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()


def keepalive_handler(base: type) -> type:
    """A subclass of werkzeug request handler ``base`` with persistent connections (see top)."""
    from werkzeug.serving import DechunkedInput
    from werkzeug.wsgi import LimitedStream

    class KeepAliveHandler(base):  # type: ignore[misc, valid-type]
        protocol_version = "HTTP/1.1"
        # Headers and body go out in separate writes: with Nagle on, a small body waits for the
        # client's delayed ACK of the headers (40 ms per request on a reused connection).
        disable_nagle_algorithm = True
        _socket_in: Any = None
        _body: Any = None
        _keep = False

        def log_request(self, *args: Any, **kwargs: Any) -> None:  # no per-request access log
            pass

        def run_wsgi(self) -> None:
            # werkzeug drains self.rfile after the response: give it an empty buffer instead.
            self._socket_in, self.rfile = self.rfile, io.BytesIO()
            try:
                super().run_wsgi()
            finally:
                self.rfile = self._socket_in
            environ = getattr(self, "environ", {})
            if not (self._keep and not environ.get(FAILED) and self._drain()):
                self.close_connection = True

        def make_environ(self) -> Environ:
            environ = super().make_environ()
            self._keep, self._body = not self.close_connection, None
            if environ.get("wsgi.input_terminated"):  # chunked request body: read it, then close
                environ["wsgi.input"] = DechunkedInput(self._socket_in)
                self._keep = False
            else:
                length = int(environ.get("CONTENT_LENGTH") or 0)
                self._body = environ["wsgi.input"] = LimitedStream(self._socket_in, length)
            return environ

        def send_header(self, keyword: str, value: str) -> None:
            if keyword.lower() == "connection" and self._keep:
                return  # werkzeug always says close; whether to close is decided above
            super().send_header(keyword, value)

        def _drain(self) -> bool:
            """Read the unread rest of the request body; False if too long or it fails."""
            body = self._body
            if body is None or body.limit - body.tell() > KEEPALIVE_DRAIN:
                return False
            try:
                body.exhaust()
            except Exception:
                return False
            return True

    return KeepAliveHandler


# ---------------------------------------------------------------- the server process


def loopback_host(host: str) -> str:
    """The address to bind for ``host``; raises ValueError unless it is loopback."""
    address = "127.0.0.1" if host == "localhost" else host
    if not _is_ip(address) or not ipaddress.ip_address(address).is_loopback:
        raise ValueError(f"refusing to bind non-loopback host {host!r}")
    return address


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    Path(tmp).write_text(text)
    os.replace(tmp, path)


def _exit(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file")
    parser.add_argument("--fast-ranges", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--fast-listing", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    try:
        host = loopback_host(args.host)
    except ValueError as exc:
        parser.error(str(exc))

    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    if args.fast_listing:
        _fastlist().install()
    app = S3Middleware(
        DomainDispatcherApplication(create_backend_app), fast_ranges=args.fast_ranges
    )
    handler = keepalive_handler(MotoRequestHandler)
    server = make_server(host, args.port, FailureMark(app), threaded=True, request_handler=handler)
    url = f"http://{f'[{host}]' if ':' in host else host}:{server.server_port}"
    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
    try:
        if args.port_file:
            _write_atomically(args.port_file, url + "\n")
        print(f"READY {url}", flush=True)
        server.serve_forever()
    finally:
        server.server_close()
    return 0


# ---------------------------------------------------------------- the client API


def stop_process(proc: subprocess.Popen[Any], sig: int, grace: float) -> None:
    """Send ``sig`` to ``proc`` if it still runs; kill it if it has not ended after ``grace``."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def clean_aws_env() -> dict[str, str]:
    """os.environ without any AWS_* variable, plus dummy credentials and region."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


def _pump(stream: IO[bytes], ready: queue.Queue[str | None], log: IO[bytes]) -> None:
    """Hand the READY url to ``ready``; copy other stdout lines to the log; None at EOF."""
    with stream:
        for line in stream:
            text = line.decode(errors="replace").strip()
            if text.startswith("READY "):
                ready.put(text.split(" ", 1)[1])
            else:
                with contextlib.suppress(ValueError):  # the log is closed after a failed stop
                    log.write(line)
                    log.flush()
    ready.put(None)


class ControlledServer:
    """A test server process's counters, read over its control paths (``control_prefix``, never
    counted themselves); ``endpoint`` is set once the process is ready."""

    control_prefix = CONTROL_PREFIX

    def __init__(self) -> None:
        self.endpoint = ""
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _control(self, name: str, method: str) -> dict[str, Any]:
        url = f"{self.endpoint}{self.control_prefix}{name}"
        with self._opener.open(urllib.request.Request(url, method=method), timeout=10) as response:
            return json.load(response)

    def stats(self) -> dict[str, Any]:
        return self._control("stats", "GET")

    def reset_stats(self) -> None:
        self._control("reset", "POST")


class S3Server(ControlledServer):
    """The server script as a subprocess; a context manager. See the module docstring."""

    def __init__(
        self, *, fast_ranges: bool = True, env: dict[str, str] | None = None,
        fast_listing: bool = True, port: int = 0,
    ) -> None:
        super().__init__()
        self.fast_ranges, self.extra_env = fast_ranges, dict(env or {})
        self.port = port  # 0: any free port; a fixed one on a machine shared with other runs
        self.fast_listing = fast_listing
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None
        self._log: IO[bytes] | None = None
        self._tmpdir: str | None = None

    def start(self) -> S3Server:
        if self._proc is not None:
            raise RuntimeError("S3Server already started")
        self._tmpdir = tempfile.mkdtemp(prefix="s3server-")
        self.log_path = Path(self._tmpdir) / "server.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port)]
        cmd += [] if self.fast_ranges else ["--no-fast-ranges"]
        cmd += [] if self.fast_listing else ["--no-fast-listing"]
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**clean_aws_env(), **self.extra_env},
        )
        ready: queue.Queue[str | None] = queue.Queue()
        self._pump = threading.Thread(
            target=_pump,
            args=(self._proc.stdout, ready, self._log),
            name="s3server-stdout",
            daemon=True,
        )
        self._pump.start()
        try:
            url = ready.get(timeout=READY_TIMEOUT)
        except queue.Empty:
            url = None
        if url is None:
            tail = self.log_path.read_text(errors="replace")[-4000:]
            self.stop()
            raise RuntimeError(f"s3server did not become ready; log tail:\n{tail}")
        self.endpoint = url
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, signal.SIGTERM, STOP_GRACE)
            if self._pump is not None:
                self._pump.join(STOP_GRACE)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def ops(self) -> dict[str, int]:
        return self.stats()["ops"]

    @property
    def pid(self) -> int:
        """The server process's pid (benchmarks read its CPU time)."""
        if self._proc is None:
            raise RuntimeError("S3Server is not running")
        return self._proc.pid

    def populate(
        self, bucket: str, objects: Iterable[tuple[str, int]], *, batch: int = 100_000
    ) -> int:
        """Create ``(key, size)`` objects in ``bucket`` in process (see s3fastlist); the count.

        Each object's bytes are ``s3fastlist.content(key, size)``. The bucket must exist.
        """
        created = 0
        items = iter(objects)
        while chunk := [[key, size] for key, size in itertools.islice(items, batch)]:
            body = json.dumps({"bucket": bucket, "objects": chunk}).encode()
            request = urllib.request.Request(
                f"{self.endpoint}{CONTROL_PREFIX}populate", data=body, method="POST",
                headers={"Content-Type": "application/json"},
            )
            try:
                with self._opener.open(request, timeout=600) as response:
                    created += json.load(response)["created"]
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")
                raise RuntimeError(f"populate failed: {detail}") from None
        return created

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this server, blind to AWS_PROFILE and the ~/.aws files;
        ``config``: more ``botocore.config.Config`` settings."""
        import boto3
        import botocore.session
        from botocore.config import Config

        isolated = {name: (None, None, default, None) for name, default in ISOLATED_VARS.items()}
        session = boto3.session.Session(
            botocore_session=botocore.session.Session(session_vars=isolated)
        )
        return session.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(s3={"addressing_style": "path"}, **config),
        )


if __name__ == "__main__":
    sys.exit(main())
