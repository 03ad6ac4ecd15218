"""Local object servers for the remote-store tests and benchmark (127.0.0.1 only).

:class:`S3Server` is moto's S3 server (its WSGI app, served threaded by
werkzeug) behind a small middleware that makes it behave like a real, busy
service where a test needs it: a delay per request, 503 SlowDown / 429 answers
for the first requests of a key, access keys it refuses, and a log of every
request (method, key, Range header, status) to count GETs. The middleware
answers ``/_zarrdali/log`` and ``/_zarrdali/control`` itself, so a server run
in another process (``python -m zarrdali.bench.objectserver``) can be steered
and read.

:class:`RangeHTTPServer` is ``http.server`` serving a directory with HTTP range
requests (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``), as static-file servers of
Zarr stores do, with faults to inject (:class:`HTTPFaults`: 503s, requests
never answered, Range ignored, a connection limit, a small listen queue; 503s
and connection resets at random, as a busy object store or proxy gives; an
answer such as 401 or 403 for every request). :class:`SilentServer` accepts
connections and never answers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.server
import json
import logging
import os
import random
import re
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ACCESS_KEY = "zarrdali-test-key"
SECRET_KEY = "zarrdali-test-secret"
_CONTROL = "/_zarrdali/"
_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")


@dataclass
class Request:
    method: str
    path: str  # /bucket/key
    range: str | None
    status: int


@dataclass
class _Faults:
    delay_s: float = 0.0
    fail: dict[str, list[Any]] = field(default_factory=dict)  # key part -> [count, status]
    keys: tuple[str, ...] = (ACCESS_KEY,)


class _Middleware:
    """WSGI wrapper: delay, injected failures, credential check, request log."""

    def __init__(self, app) -> None:
        self.app = app
        self.faults = _Faults()
        self.log: list[Request] = []
        self.lock = threading.Lock()
        self.in_flight = self.peak_in_flight = 0

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path.startswith(_CONTROL):
            return self._control(path[len(_CONTROL) :], environ, start_response)
        method = environ["REQUEST_METHOD"]
        with self.lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return self._serve(environ, start_response, method, path)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _serve(self, environ, start_response, method: str, path: str):
        if self.faults.delay_s:
            time.sleep(self.faults.delay_s)  # a threaded server: requests wait side by side
        status_box: list[int] = []

        def record(status: str, headers, exc_info=None):
            status_box.append(int(status.split()[0]))
            return start_response(status, headers, exc_info)

        found = _CREDENTIAL.search(environ.get("HTTP_AUTHORIZATION", ""))
        if found and found.group(1) not in self.faults.keys:
            body = self._error(record, "403 Forbidden", "InvalidAccessKeyId", path)
        elif (status := self._injected(method, path)) is not None:
            code = "SlowDown" if status.startswith("503") else "TooManyRequests"
            body = self._error(record, status, code, path)
        else:
            body = self.app(environ, record)
        with self.lock:
            self.log.append(Request(method, path, environ.get("HTTP_RANGE"), status_box[0]))
        return body

    def _injected(self, method: str, path: str) -> str | None:
        if method != "GET":
            return None
        with self.lock:
            for part, rule in self.faults.fail.items():
                if part in path and rule[0] > 0:
                    rule[0] -= 1
                    return rule[1]
        return None

    @staticmethod
    def _error(start_response, status: str, code: str, path: str) -> list[bytes]:
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>{status}</Message><Resource>{path}</Resource></Error>"
        ).encode()
        start_response(status, [("Content-Type", "application/xml")])
        return [body]

    def _control(self, what: str, environ, start_response):
        if what == "log":
            with self.lock:
                payload = [r.__dict__ for r in self.log]
        elif what == "peak":
            payload = self.peak_in_flight
        else:  # control: JSON body {delay_s, fail, keys, clear_log}
            size = int(environ.get("CONTENT_LENGTH") or 0)
            body = json.loads(environ["wsgi.input"].read(size) or b"{}")
            self.configure(**body)
            payload = {"ok": True}
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(payload).encode()]

    def configure(
        self,
        delay_s: float | None = None,
        fail: dict[str, list[Any]] | None = None,
        keys: list[str] | None = None,
        clear_log: bool = False,
    ) -> None:
        with self.lock:
            if delay_s is not None:
                self.faults.delay_s = delay_s
            if fail is not None:
                self.faults.fail = {k: list(v) for k, v in fail.items()}
            if keys is not None:
                self.faults.keys = tuple(keys)
            if clear_log:
                self.log = []
                self.peak_in_flight = self.in_flight


class S3Server:
    """moto's S3 on 127.0.0.1 in a thread of this process (``with S3Server() as s3:``)."""

    def __init__(self, port: int = 0) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        self.mw = _Middleware(DomainDispatcherApplication(create_backend_app))
        self._server = make_server("127.0.0.1", port, self.mw, threaded=True)
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> S3Server:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    # -- steering and reading (also through HTTP: see RemoteS3Server) ----------
    def configure(self, **kwargs: Any) -> None:
        self.mw.configure(**kwargs)

    def requests(self) -> list[Request]:
        with self.mw.lock:
            return list(self.mw.log)

    def peak_in_flight(self) -> int:
        """The most requests the server had in progress at once since the log was cleared."""
        return self.mw.peak_in_flight

    def storage_options(self, key: str = ACCESS_KEY, secret: str = SECRET_KEY) -> dict:
        return storage_options(self.endpoint, key, secret)


class RemoteS3Server:
    """An :class:`S3Server` running in another process (for benchmarks: the server
    then does not share this process's GIL). ``cpus``: the cores it may run on
    (all its threads; default: any)."""

    def __init__(self, port: int = 0, cpus: set[int] | None = None) -> None:
        import subprocess

        pin = None if cpus is None else partial(os.sched_setaffinity, 0, cpus)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "zarrdali.bench.objectserver", "--port", str(port)],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=pin,
        )
        self.pid = self._proc.pid
        line = self._proc.stdout.readline()  # "port N"
        if not line.startswith("port "):
            self._proc.kill()
            raise RuntimeError(f"the S3 server did not start: {line!r}")
        self.port = int(line.split()[1])
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RemoteS3Server:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=10)

    def _call(self, what: str, body: dict | None = None):
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        with urllib.request.urlopen(f"{self.endpoint}{_CONTROL}{what}", data=data) as resp:
            return json.loads(resp.read())

    def configure(self, **kwargs: Any) -> None:
        self._call("control", kwargs)

    def requests(self) -> list[Request]:
        return [Request(**r) for r in self._call("log")]

    def peak_in_flight(self) -> int:
        return int(self._call("peak"))

    def storage_options(self, key: str = ACCESS_KEY, secret: str = SECRET_KEY) -> dict:
        return storage_options(self.endpoint, key, secret)


def storage_options(endpoint: str, key: str = ACCESS_KEY, secret: str = SECRET_KEY) -> dict:
    """fsspec-style options for the local server (zarrdali translates them for obstore)."""
    return {
        "key": key,
        "secret": secret,
        "endpoint_url": endpoint,
        "client_kwargs": {"region_name": "us-east-1"},
    }


def upload(endpoint: str, bucket: str, directory: str | os.PathLike, prefix: str) -> int:
    """Create ``bucket`` (if needed) and upload ``directory`` under ``prefix``; returns files."""
    import obstore
    from obstore.store import S3Store

    _create_bucket(endpoint, bucket)
    store = S3Store(
        bucket,
        endpoint=endpoint,
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        region="us-east-1",
        client_options={"allow_http": True},
    )
    root = Path(directory)
    files = [p for p in root.rglob("*") if p.is_file()]

    async def put_all() -> None:
        limit = asyncio.Semaphore(16)

        async def put(path: Path) -> None:
            async with limit:
                key = f"{prefix}/{path.relative_to(root).as_posix()}"
                await obstore.put_async(store, key, path.read_bytes())

        await asyncio.gather(*(put(p) for p in files))

    asyncio.run(put_all())
    return len(files)


def _create_bucket(endpoint: str, bucket: str) -> None:
    import boto3  # moto's own dependency

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    )
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        s3.create_bucket(Bucket=bucket)


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single byte-range requests (what Zarr readers send), and the
    faults of :class:`RangeHTTPServer` (``self.server.faults``)."""

    server_version = "zarrdali-range/1"
    server: _Threading

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def handle(self) -> None:
        faults = self.server.faults
        with faults.lock:
            faults.connections += 1
            over = faults.max_connections and faults.connections > faults.max_connections
            if over:
                faults.refused += 1
            elif faults.reset_rate and faults.rng.random() < faults.reset_rate:
                over = True  # a connection reset at random (a proxy, a flaky link)
                faults.resets += 1
        try:
            if over:  # at its connection limit: reset the connection, as a full server does
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                return
            super().handle()
        finally:
            with faults.lock:
                faults.connections -= 1

    def send_head(self):
        faults = self.server.faults
        with faults.lock:
            faults.requests.append((self.path, self.headers.get("Range")))
            hang = _take(faults.hang, self.path)
            fail = _take(faults.fail, self.path)
            throttle = _take(faults.throttle, self.path)
            if not fail and faults.fail_rate and faults.rng.random() < faults.fail_rate:
                fail = True
                faults.failed_at_random += 1
            status = next((code for part, code in faults.status.items() if part in self.path), 0)
            delay = faults.delay_s
        if status:  # e.g. 401, 403: what a store answers a client it does not let in
            self.send_error(status)
            return None
        if throttle:  # what a store says to a client it asks for fewer requests
            self.send_error(429, "Too Many Requests")
            return None
        if hang:  # never answered: the connection stays open until the server closes
            faults.closing.wait()
            return None
        if delay:
            time.sleep(delay)
        if fail:
            self.send_error(503, "Service Unavailable")
            return None
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404, "File not found")
            return None
        size = os.path.getsize(path)
        want = None if faults.ignore_range else self.headers.get("Range")
        f = open(path, "rb")  # noqa: SIM115  (closed by the base class after copying)
        if not want:
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            if not faults.ignore_range:
                self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            return f
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", want.strip())
        if not m or (not m.group(1) and not m.group(2)):
            f.close()
            self.send_error(400, "bad range")
            return None
        if m.group(1):
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        else:  # suffix: the last n bytes
            start, end = max(0, size - int(m.group(2))), size - 1
        if start >= size or end < start:
            f.close()
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.end_headers()
            return None
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return _Limited(f, end - start + 1)


def _take(counts: dict[str, int], path: str) -> bool:
    """Whether ``path`` matches a part with a count left (then one is used)."""
    for part, left in counts.items():
        if part in path and left > 0:
            counts[part] = left - 1
            return True
    return False


class _Limited:
    """A file object that ends after ``n`` bytes (for ``copyfile``)."""

    def __init__(self, f, n: int) -> None:
        self.f, self.left = f, n

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self.f.read(size)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.f.close()


@dataclass
class HTTPFaults:
    """What :class:`RangeHTTPServer` does wrong, changeable while it serves.

    ``fail``/``hang``/``throttle``: path part -> how many of its next GETs answer 503
    / are never answered / answer 429; ``ignore_range``: answer every GET with the whole file (200);
    ``max_connections``: connections past it are reset at once; ``delay_s``: before
    each answer. ``fail_rate``/``reset_rate``: the share of GETs answered 503 / of
    connections reset, drawn at random (``rng``, seeded: runs repeat); ``status``:
    path part -> the status every GET of it gets (401, 403, ...). ``requests`` logs
    (path, Range) of every GET; ``refused`` counts resets at the connection limit,
    ``resets`` and ``failed_at_random`` the random ones.
    """

    fail: dict[str, int] = field(default_factory=dict)
    hang: dict[str, int] = field(default_factory=dict)
    throttle: dict[str, int] = field(default_factory=dict)
    fail_rate: float = 0.0
    reset_rate: float = 0.0
    status: dict[str, int] = field(default_factory=dict)
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    resets: int = 0
    failed_at_random: int = 0
    ignore_range: bool = False
    max_connections: int = 0
    delay_s: float = 0.0
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    refused: int = 0
    connections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    closing: threading.Event = field(default_factory=threading.Event)


class _Threading(http.server.ThreadingHTTPServer):
    daemon_threads = True
    faults: HTTPFaults


class RangeHTTPServer:
    """``http.server`` (HTTP/1.0: a connection per request) serving ``directory``
    with range support on 127.0.0.1, a thread per connection.

    ``backlog``: its listen queue (the default 256; ``http.server``'s own is 5,
    which drops the connects of many requests in flight: a small server).
    ``faults`` (:class:`HTTPFaults`) makes it misbehave.
    """

    def __init__(self, directory: str | os.PathLike, *, backlog: int = 256) -> None:
        self.faults = HTTPFaults()
        server_class = type("Server", (_Threading,), {"request_queue_size": backlog})
        serve = partial(_RangeHandler, directory=os.fspath(directory))
        self._server = server_class(("127.0.0.1", 0), serve)
        self._server.faults = self.faults
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def requests(self) -> list[tuple[str, str | None]]:
        return self.faults.requests

    @property
    def fail(self) -> dict[str, int]:
        return self.faults.fail

    def __enter__(self) -> RangeHTTPServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.faults.closing.set()  # hung answers return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never answers (a hung endpoint: a
    process stopped under its listening socket, a proxy whose backend is gone).
    ``url``: ``http://127.0.0.1:PORT``; ``connections``: how many were accepted."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.connections = 0
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            self.connections += 1
            self._held.append(conn)  # open, unread, unanswered

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(timeout=5)
        for conn in self._held:
            conn.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="moto S3 server on 127.0.0.1 with zarrdali's knobs")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--http", metavar="DIRECTORY", help="serve DIRECTORY over HTTP/1.0 instead")
    p.add_argument("--backlog", type=int, default=256, help="listen queue of --http")
    p.add_argument("--fail-rate", type=float, default=0.0, help="--http: share of GETs 503")
    p.add_argument("--reset-rate", type=float, default=0.0, help="--http: connections reset")
    p.add_argument("--seed", type=int, default=0, help="--http: of the random faults")
    args = p.parse_args(argv)
    if args.http:
        http = RangeHTTPServer(args.http, backlog=args.backlog)
        http.faults.fail_rate, http.faults.reset_rate = args.fail_rate, args.reset_rate
        http.faults.rng.seed(args.seed)
        print(f"port {http.url.rsplit(':', 1)[1]}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            http._server.serve_forever()
        return
    server = S3Server(args.port)
    print(f"port {server.port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server._server.serve_forever()


if __name__ == "__main__":
    main()
