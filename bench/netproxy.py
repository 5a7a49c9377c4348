"""A delaying, rate-limiting TCP proxy on 127.0.0.1, to give a local S3 server S3's latency.

This kernel has no netem, so network conditions are injected in user space, in front of the S3
server, per TCP connection:

- **First-byte latency.** For each request the first byte of the response is forwarded no earlier
  than ``delay`` after the request's first byte arrived at the proxy (like S3's time to first
  byte, which includes the server's own time). HTTP is not parsed: a *request* is a client->server
  burst that follows server->client data (or opens the connection); the next server->client data
  after it is the start of its response. That holds for HTTP/1.1 keep-alive without pipelining,
  which is what every client here does (boto3/urllib3, libcurl in s3fs, Go's net/http in rclone).
- **Bandwidth cap.** Server->client bytes are paced by a token bucket per connection (``rate``
  bytes/s, ``BURST`` bytes of burst), as S3 caps a single connection at ~100 MB/s. Client->server
  bytes (requests) are not paced.

Design: one thread per direction per connection, blocking sockets and ``recv_into``/``sendall``
on a reusable buffer (both release the GIL, so copying is not serialised). With ``delay`` 0 and
no rate the forwarding path does no timing at all. The proxy runs as its own process
(:class:`NetProxy` starts it), so its CPU use never competes with a benchmark's GIL. It binds and
connects to loopback addresses only. Shutdown: SIGTERM/SIGINT end the process; connection threads
are daemons.

Script: ``python bench/netproxy.py --upstream 127.0.0.1:PORT [--delay-ms 20] [--rate-mbps 100]``
prints ``READY http://127.0.0.1:PORT`` once listening.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

BUFFER = 256 << 10  # bytes per recv: big enough to be cheap, small enough to pace smoothly
BURST = 256 << 10  # token-bucket depth for the bandwidth cap
READY_TIMEOUT = 15.0


@dataclass(frozen=True)
class Shaping:
    """Network conditions of one profile: first-byte delay (s) and cap (bytes/s, 0 = none)."""

    delay: float = 0.0
    rate: float = 0.0


class _Turn:
    """Request/response turn-taking on one connection: when did the pending request arrive?"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._request_at: float | None = None
        self._responding = True  # the first client burst opens a request

    def client_data(self) -> None:
        with self._lock:
            if self._responding:
                self._request_at, self._responding = time.monotonic(), False

    def response_starts(self) -> float | None:
        """The arrival time of the request this server data answers, once per request."""
        with self._lock:
            self._responding = True
            request_at, self._request_at = self._request_at, None
            return request_at


class _Bucket:
    """Token bucket: ``spend(n)`` sleeps until n bytes are allowed at ``rate`` bytes/s."""

    def __init__(self, rate: float) -> None:
        self.rate, self._tokens, self._stamp = rate, float(BURST), time.monotonic()

    def spend(self, n: int) -> None:
        now = time.monotonic()
        self._tokens = min(float(BURST), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= n
        if self._tokens < 0:
            time.sleep(-self._tokens / self.rate)


def _pipe(src: socket.socket, dst: socket.socket, on_data: Callable[[int], None]) -> None:
    """Copy src to dst until EOF or error, calling ``on_data(n)`` before forwarding n bytes."""
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    try:
        while n := src.recv_into(buf):
            on_data(n)
            dst.sendall(view[:n])
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        for sock in (src, dst):  # wake the other direction's thread
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _serve_connection(client: socket.socket, upstream: tuple[str, int], shaping: Shaping) -> None:
    try:
        server = socket.create_connection(upstream)
    except OSError:
        client.close()
        return
    for sock in (client, server):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    turn, bucket = _Turn(), _Bucket(shaping.rate) if shaping.rate else None

    def downstream(n: int) -> None:
        request_at = turn.response_starts() if shaping.delay else None
        if request_at is not None:
            wait = request_at + shaping.delay - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        if bucket is not None:
            bucket.spend(n)

    up = threading.Thread(
        target=_pipe,
        args=(client, server, (lambda n: turn.client_data()) if shaping.delay else _noop),
        daemon=True,
    )
    up.start()
    _pipe(server, client, downstream if (shaping.delay or shaping.rate) else _noop)
    up.join()
    client.close()
    server.close()


def _noop(n: int) -> None:
    pass


def serve(listener: socket.socket, upstream: tuple[str, int], shaping: Shaping) -> None:
    """Accept forever, one handler thread per connection."""
    while True:
        client, _ = listener.accept()
        threading.Thread(
            target=_serve_connection, args=(client, upstream, shaping), daemon=True
        ).start()


def _loopback(host: str) -> str:
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"refusing non-loopback address {host!r}")
    return host


def _parse_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return _loopback(host or "127.0.0.1"), int(port)


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the S3 server (loopback)")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="first-byte latency")
    parser.add_argument("--rate-mbps", type=float, default=0.0, help="MB/s cap per connection")
    args = parser.parse_args(argv)
    try:
        upstream, listen = _parse_hostport(args.upstream), _parse_hostport(args.listen)
    except ValueError as exc:
        parser.error(str(exc))
    shaping = Shaping(delay=args.delay_ms / 1000, rate=args.rate_mbps * 1e6)
    listener = socket.create_server(listen, backlog=256)
    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
    print(f"READY http://{listen[0]}:{listener.getsockname()[1]}", flush=True)
    try:
        serve(listener, upstream, shaping)
    finally:
        listener.close()
    return 0


def _first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The first stdout line of ``proc``, or "" if none comes within ``timeout`` seconds."""
    lines: queue.Queue[str] = queue.Queue()
    stdout = proc.stdout
    assert stdout is not None
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        return ""


class NetProxy:
    """The proxy script as a subprocess; a context manager. ``endpoint`` is its URL."""

    def __init__(self, upstream_url: str, *, delay_ms: float = 0.0, rate_mbps: float = 0.0,
                 port: int = 0):
        self.upstream = upstream_url.split("://", 1)[-1].rstrip("/")
        self.port = port  # 0: any free port
        self.delay_ms, self.rate_mbps = delay_ms, rate_mbps
        self.endpoint = ""
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> NetProxy:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--upstream", self.upstream]
        cmd += ["--delay-ms", str(self.delay_ms), "--rate-mbps", str(self.rate_mbps)]
        cmd += ["--listen", f"127.0.0.1:{self.port}"]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
        )
        line = _first_line(self.proc, READY_TIMEOUT)
        if not line.startswith("READY "):
            self.__exit__()
            raise RuntimeError(f"netproxy did not start: {line!r}")
        self.endpoint = line.split(" ", 1)[1].strip()
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0


if __name__ == "__main__":
    sys.exit(main())
