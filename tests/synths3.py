"""A synthetic S3 endpoint on 127.0.0.1 serving objects of up to 5 TiB that exist nowhere.

moto (``devtools/s3server.py``) keeps every object in memory, so the largest objects it can hold
are a few GiB short of what the tests need: sizes around 2**32 and S3's largest, 5 TiB, and a
ZIP64 archive of more than 4 GiB. This server holds none of their bytes: every GET computes its
range from ``synthdata`` (bytes made from their offsets), and the tests compare what a mount
serves with the same functions.

Server side (``python tests/synths3.py``): ``http.server``'s threaded server with HTTP/1.1
keep-alive on a loopback port chosen by the kernel; once listening it prints exactly one stdout
line ``READY http://127.0.0.1:PORT``. One bucket, ``BUCKET``, versioning Enabled, holding
``OBJECTS`` (plain objects) and ``ARCHIVE_KEY`` (``synthdata.synthetic_zip()``).

- What s3datafs asks is answered as S3 answers it, path-style and without checking signatures:
  GetBucketVersioning, HeadObject, GetObject (one ``Range``, ``If-Match``, ``versionId``) and
  ListObjectVersions (one page). Anything else is a 400 ``NotImplemented``: a test that starts
  using another operation fails loudly instead of reading an answer made up here.
- Pins never change: each object has one version, with a fixed VersionId and a multipart-style
  ETag (an object of more than 5 GB can only be uploaded in parts, and such an ETag is not the
  MD5 of the bytes, so no client may check one against it).
- One GET sends at most ``MAX_GET`` bytes (the largest ``--block-size``): a client asking for
  more is answered 400 at once, rather than making this process build gigabytes.
- Counters (``GET /__synth__/stats``, ``POST /__synth__/reset``, never counted themselves):
  requests by operation, and every GetObject's ``[key, start, end]``, so a test can tell how
  many GETs a warm remount sent (none) and which bytes a cold one fetched.

Client side: :class:`SynthS3` starts the script as a subprocess and stops it (a context manager).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

import synthdata
from synthdata import GiB, MiB, TiB

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # devtools, run as a script too
from devtools.s3server import ControlledServer, stop_process  # noqa: E402

BUCKET = "huge"
ARCHIVE_KEY = "z/big64.zip"
# key -> (size, seed): sizes at 2**32 and either side of it, and S3's largest object.
OBJECTS = {
    "o/4g-minus1.bin": (4 * GiB - 1, 0x1111),
    "o/4g.bin": (4 * GiB, 0x2222),
    "o/4g-plus1.bin": (4 * GiB + 1, 0x3333),
    "o/5t.bin": (5 * TiB, 0xA5A5_5A5A_0000_FFFF),
}
MAX_GET = 64 * MiB
CONTROL_PREFIX = "/__synth__/"
LAST_MODIFIED = 1714564800.0  # 2024-05-01T12:00:00Z
_LAST_MODIFIED_ISO = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(LAST_MODIFIED))
READY_TIMEOUT = 60.0
STOP_GRACE = 5.0
_XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    read: Callable[[int, int], bytes]

    @property
    def etag(self) -> str:
        digest = hashlib.md5(f"{self.key}/{self.size}".encode()).hexdigest()
        return f'"{digest}-{self.size // GiB + 1}"'  # "-<parts>": see the module docstring

    @property
    def version_id(self) -> str:
        return "v-" + hashlib.md5(self.key.encode()).hexdigest()[:20]


def stored_objects() -> dict[str, StoredObject]:
    """Every object of ``BUCKET`` by key: ``OBJECTS`` and the archive."""
    found = {
        key: StoredObject(key, size, functools.partial(synthdata.pattern, seed))
        for key, (size, seed) in OBJECTS.items()
    }
    archive = synthdata.synthetic_zip().archive
    found[ARCHIVE_KEY] = StoredObject(ARCHIVE_KEY, archive.size, archive.read)
    return found


class Counters:
    """Requests by operation and the ranges GETs sent; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops: dict[str, int] = {}
        self._gets: list[list[Any]] = []

    def count(self, op: str) -> None:
        with self._lock:
            self._ops[op] = self._ops.get(op, 0) + 1

    def got(self, key: str, start: int, end: int) -> None:
        with self._lock:
            self._gets.append([key, start, end])

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"ops": dict(self._ops), "gets": list(self._gets)}

    def reset(self) -> None:
        with self._lock:
            self._ops.clear()
            self._gets.clear()


# ---------------------------------------------------------------- the server process


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every response carries Content-Length
    objects: dict[str, StoredObject] = {}
    counters = Counters()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass  # no access log: the counters are the record

    # -- dispatch

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == CONTROL_PREFIX + "reset":
            self.counters.reset()
            self._send(200, b"{}", "application/json")
        else:
            self._error(400, "NotImplemented")

    def do_GET(self) -> None:
        if self.path == CONTROL_PREFIX + "stats":
            self._send(200, json.dumps(self.counters.snapshot()).encode(), "application/json")
            return
        bucket, key, query = self._parse()
        if bucket != BUCKET:
            self._count_and_error("other", 404, "NoSuchBucket")
        elif key:
            self.counters.count("GetObject")
            self._get_object(key, query)
        elif "versioning" in query:
            self.counters.count("GetBucketVersioning")
            self._send_xml(f'<VersioningConfiguration xmlns="{_XMLNS}"><Status>Enabled</Status>'
                           "</VersioningConfiguration>")
        elif "versions" in query:
            self.counters.count("ListObjectVersions")
            self._list_versions(query)
        else:
            self._count_and_error("other", 400, "NotImplemented")

    def do_HEAD(self) -> None:
        bucket, key, query = self._parse()
        self.counters.count("HeadObject")
        found = self._find(bucket, key, query)
        if found is None:
            self._send(404, b"", head=True)
        else:
            self._send(200, b"", head=True, length=found.size, headers=self._pin_headers(found))

    # -- operations

    def _get_object(self, key: str, query: dict[str, list[str]]) -> None:
        found = self._find(BUCKET, key, query)
        if found is None:
            return self._error(404, "NoSuchKey")
        if_match = self.headers.get("If-Match")
        if if_match is not None and if_match.strip() not in (found.etag, found.etag.strip('"')):
            return self._error(412, "PreconditionFailed")
        wanted = self._range(found.size)
        if wanted is None:
            return self._error(416, "InvalidRange")
        start, end = wanted
        if end - start > MAX_GET:
            return self._error(400, "RangeLargerThanThisServerSends")
        body = found.read(start, end)
        self.counters.got(key, start, end)
        headers = self._pin_headers(found)
        if self.headers.get("Range") is None:
            return self._send(200, body, "application/octet-stream", headers=headers)
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{found.size}"
        self._send(206, body, "application/octet-stream", headers=headers)

    def _range(self, size: int) -> tuple[int, int] | None:
        """``[start, end)`` the Range header asks for (all without one); None: unsatisfiable."""
        header = self.headers.get("Range")
        if header is None:
            return (0, size) if size else None
        match = _RANGE.fullmatch(header.strip())
        if match is None or match[1] == match[2] == "":
            return None
        if match[1] == "":  # the last n bytes
            start, end = max(0, size - int(match[2])), size
        else:
            start = int(match[1])
            end = size if match[2] == "" else min(size, int(match[2]) + 1)
        return (start, end) if start < end else None

    def _list_versions(self, query: dict[str, list[str]]) -> None:
        prefix = query.get("prefix", [""])[0]
        delimiter = query.get("delimiter", [""])[0]
        versions, prefixes = [], []
        for key in sorted(k for k in self.objects if k.startswith(prefix)):
            rest = key[len(prefix) :]
            if delimiter and delimiter in rest:
                common = prefix + rest.split(delimiter, 1)[0] + delimiter
                if common not in prefixes:
                    prefixes.append(common)
                continue
            found = self.objects[key]
            versions.append(
                f"<Version><Key>{escape(key)}</Key><VersionId>{found.version_id}</VersionId>"
                f"<IsLatest>true</IsLatest><LastModified>{_LAST_MODIFIED_ISO}</LastModified>"
                f"<ETag>{escape(found.etag)}</ETag><Size>{found.size}</Size>"
                "<StorageClass>STANDARD</StorageClass></Version>"
            )
        common_prefixes = "".join(
            f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in prefixes
        )
        self._send_xml(
            f'<ListVersionsResult xmlns="{_XMLNS}"><Name>{BUCKET}</Name>'
            f"<Prefix>{escape(prefix)}</Prefix><KeyMarker></KeyMarker>"
            "<VersionIdMarker></VersionIdMarker><MaxKeys>1000</MaxKeys>"
            + (f"<Delimiter>{escape(delimiter)}</Delimiter>" if delimiter else "")
            + f"<IsTruncated>false</IsTruncated>{''.join(versions)}{common_prefixes}"
            "</ListVersionsResult>"
        )

    # -- helpers

    def _parse(self) -> tuple[str, str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
        return bucket, key, parse_qs(parts.query, keep_blank_values=True)

    def _find(self, bucket: str, key: str, query: dict[str, list[str]]) -> StoredObject | None:
        found = self.objects.get(key) if bucket == BUCKET else None
        version = query.get("versionId", [None])[0]
        if found is None or version not in (None, found.version_id):
            return None
        return found

    @staticmethod
    def _pin_headers(found: StoredObject) -> dict[str, str]:
        return {
            "ETag": found.etag,
            "x-amz-version-id": found.version_id,
            "Last-Modified": formatdate(LAST_MODIFIED, usegmt=True),
            "Accept-Ranges": "bytes",
        }

    def _count_and_error(self, op: str, status: int, code: str) -> None:
        self.counters.count(op)
        self._error(status, code)

    def _error(self, status: int, code: str) -> None:
        body = f"<Error><Code>{code}</Code><Message>{code}</Message></Error>"
        self._send_xml(body, status)

    def _send_xml(self, document: str, status: int = 200) -> None:
        text = '<?xml version="1.0" encoding="UTF-8"?>' + document
        self._send(status, text.encode(), "application/xml")

    def _send(self, status: int, body: bytes, content_type: str = "", *, head: bool = False,
              length: int | None = None, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if not head:
            self.wfile.write(body)


def _exit(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    Handler.objects = stored_objects()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, _exit)
    try:
        print(f"READY http://127.0.0.1:{server.server_address[1]}", flush=True)
        server.serve_forever()
    finally:
        server.server_close()
    return 0


# ---------------------------------------------------------------- the client API


class SynthS3(ControlledServer):
    """The server script as a subprocess on 127.0.0.1; a context manager (see the top).
    ``stats()`` is ``{"ops": {operation: count}, "gets": [[key, start, end], ...]}`` since the
    last ``reset_stats()``."""

    control_prefix = CONTROL_PREFIX

    def __init__(self) -> None:
        super().__init__()
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SynthS3:
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        )
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], READY_TIMEOUT)
        line = self._proc.stdout.readline().decode() if ready else ""
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"synths3 did not become ready (said {line!r})")
        self.endpoint = line.split()[1]
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stop_process(proc, signal.SIGTERM, STOP_GRACE)
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> SynthS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid



if __name__ == "__main__":
    sys.exit(main())
