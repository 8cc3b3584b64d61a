"""Real S3 servers on loopback, started and stopped by project code.

Two servers share one small interface (:class:`S3Server`):

* :class:`MotoServer` -- moto's S3 in server mode, in this process (a thread).
  Starts in milliseconds. Use it for unit-level tests with small objects: every
  ranged GET makes moto read the whole object, so big objects are slow.
* :class:`RgwServer` -- Ceph's RADOS Gateway, a real S3 implementation, on a
  throwaway one-node Ceph cluster (ceph-mon + ceph-osd + radosgw) under one
  directory. Starts in a few seconds. Use it for integration tests, benchmarks
  and the demo.

Both: ``start()``, ``stop()``, context manager, ``endpoint_url``,
``access_key``, ``secret_key``, ``region``, ``client()`` (a boto3 S3 client,
path-style, retries configured), ``create_bucket(name)`` and a request log
counted *at the server*: ``requests()``, ``request_counts()``,
``object_get_counts()``, ``request_mark()``. Benchmarks use it to check e.g.
"exactly one GET per chunk".

Lifetimes and invariants (RgwServer):

* Everything a cluster owns lives under its directory: config, mon and osd
  data, logs, admin sockets. Two clusters with different directories and
  ports run side by side (the mon port is chosen like any other port; it need
  not be 3300).
* Every daemon is a direct child of the process that called ``start()``, runs
  in the foreground (``-f``) in its own process group, and gets SIGKILL from
  the kernel when that process dies (``PR_SET_PDEATHSIG``). Linux sends that
  signal when the *thread* that forked the child ends, so children are forked
  by one spawner thread that lives as long as the process: ``start()`` may
  be called from any thread.
* ``start()`` takes a directory that does not exist or is empty, and
  ``stop()`` deletes it: never point it at a directory holding other files.
* ``stop()`` signals each daemon by pid, waits for it to exit, then removes
  the directory unless ``keep=True``. Servers still running when the
  interpreter exits are stopped by an ``atexit`` hook. A forked child process
  never stops its parent's servers.

Command line (used by the demo, benchmarks and ``scripts/rgw.sh``)::

    python -m objcache.testing.s3servers rgw  --dir DIR [--port P] [--foreground]
    python -m objcache.testing.s3servers moto [--dir DIR] [--port P] [--foreground]
    python -m objcache.testing.s3servers stop --dir DIR
    python -m objcache.testing.s3servers status --dir DIR

``rgw``/``moto`` print one line of JSON (endpoint_url, access_key,
secret_key, region, ...) once the server answers. With ``--foreground`` the
command then stays up until SIGTERM/SIGINT and stops the server cleanly;
without it, a detached supervisor process keeps the server and ``stop --dir``
ends it.
"""
from __future__ import annotations

import argparse
import atexit
import collections
import ctypes
import http.client
import json
import os
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "S3Server", "MotoServer", "RgwServer", "S3Request",
    "S3ServerError", "RgwUnavailable",
    "CEPH_DEBIAN_PACKAGES", "rgw_available", "free_port", "s3_client",
]

#: Debian packages that provide the binaries RgwServer runs.
CEPH_DEBIAN_PACKAGES = "ceph-mon ceph-osd radosgw ceph-common"
_CEPH_BINARIES = ("monmaptool", "ceph-mon", "ceph-osd", "radosgw",
                  "radosgw-admin", "ceph")

#: User-Agent of the HTTP requests this module sends itself (readiness probes,
#: log barriers). They are left out of ``requests()``.
_PROBE_AGENT = "objcache-s3servers-probe"

_MIB = 1 << 20
_GIB = 1 << 30


class S3ServerError(RuntimeError):
    """A server failed to start, stop or answer."""


class RgwUnavailable(S3ServerError):
    """The Ceph binaries are not installed."""


def rgw_available() -> bool:
    """True when every Ceph binary RgwServer needs is on PATH."""
    return all(shutil.which(b) for b in _CEPH_BINARIES)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now, for a daemon to bind.

    Picked below the kernel's ephemeral range (32768-60999), where outgoing
    connections do not take ports. The port is released before it is
    returned, so another process could still take it first; a daemon that
    then fails to bind makes start() fail with its log.
    """
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32768)
        if _port_is_free(host, port):
            return port
    raise S3ServerError(f"no free TCP port found on {host} in 20000-32767")


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


# --------------------------------------------------------------------------
# Request records, shared by both servers


@dataclass(frozen=True)
class S3Request:
    """One HTTP request as the server saw it.

    ``bucket``/``key`` are decoded from a path-style target ``/bucket/key``
    (``None`` when absent). ``range`` is the raw Range header (``None`` when
    absent). ``status`` is the HTTP status the server answered.
    """
    method: str
    bucket: str | None
    key: str | None
    query: str
    status: int
    range: str | None
    user_agent: str
    target: str

    @property
    def is_ranged_get(self) -> bool:
        return self.method == "GET" and self.range is not None


def _split_target(target: str) -> tuple[str | None, str | None, str]:
    """Raw request target -> (bucket, key, query), path-style addressing."""
    path, _, query = target.partition("?")
    path = urllib.parse.unquote(path, errors="surrogateescape")
    if not path.startswith("/"):
        return None, None, query
    bucket, sep, key = path[1:].partition("/")
    return (bucket or None), (key if sep and key else None), query


def _counts(reqs: Iterable[S3Request]) -> dict[str, int]:
    return dict(collections.Counter(r.method for r in reqs))


def s3_client(endpoint_url: str, access_key: str, secret_key: str,
              region: str = "us-east-1", **config: Any):
    """A new boto3 S3 client for a loopback server (e.g. from the CLI's JSON).

    Path-style addressing, standard retry mode (3 attempts), and checksums
    only when an operation requires them (boto3 >= 1.36 otherwise adds CRC32
    checksums that older S3 implementations, RGW 16 included, do not all
    understand). ``config`` overrides botocore ``Config`` fields.
    """
    import boto3
    from botocore.config import Config

    options: dict[str, Any] = dict(
        s3={"addressing_style": "path"},
        retries={"mode": "standard", "max_attempts": 3},
        signature_version="s3v4",
        connect_timeout=5,
        read_timeout=60,
        max_pool_connections=32,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    options.update(config)
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, region_name=region,
        aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        config=Config(**options))


# --------------------------------------------------------------------------
# Registry of running servers: stopped at interpreter exit.

_running: set["S3Server"] = set()
_running_lock = threading.Lock()


def _stop_all_at_exit() -> None:
    with _running_lock:
        servers = list(_running)
    for server in servers:
        try:
            server.stop()
        except Exception as exc:  # noqa: BLE001 -- best effort at exit
            print(f"objcache.testing.s3servers: stopping {server!r} at exit "
                  f"failed: {exc}", file=sys.stderr)


atexit.register(_stop_all_at_exit)


class S3Server:
    """Interface shared by MotoServer and RgwServer."""

    region = "us-east-1"
    endpoint_url: str
    access_key: str
    secret_key: str

    def __init__(self) -> None:
        # Set by start(); only this process may stop the server (a forked
        # child inherits the object and the atexit hook, not the daemons).
        self._owner_pid: int | None = None
        self._client_cache: Any = None

    # -- lifetime ----------------------------------------------------------
    def start(self) -> "S3Server":
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._owner_pid is not None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _register(self) -> None:
        self._owner_pid = os.getpid()
        with _running_lock:
            _running.add(self)

    def _unregister(self) -> bool:
        """Mark stopped; False if this process does not own the server."""
        if self._owner_pid != os.getpid():
            return False
        self._owner_pid = None
        self._client_cache = None
        with _running_lock:
            _running.discard(self)
        return True

    # -- clients -----------------------------------------------------------
    def client(self, **config: Any):
        """A new boto3 S3 client for this server (see :func:`s3_client`)."""
        return s3_client(self.endpoint_url, self.access_key, self.secret_key,
                         self.region, **config)

    def _client(self):
        """A client kept for the helpers below (boto3 clients are thread-safe)."""
        if self._client_cache is None:
            self._client_cache = self.client()
        return self._client_cache

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name``; returns the name."""
        self._client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Delete bucket ``name`` with every object and pending upload in it."""
        c = self._client()
        for page in c.get_paginator("list_multipart_uploads").paginate(Bucket=name):
            for up in page.get("Uploads", []):
                c.abort_multipart_upload(Bucket=name, Key=up["Key"],
                                         UploadId=up["UploadId"])
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                c.delete_objects(Bucket=name, Delete={"Objects": keys,
                                                      "Quiet": True})
        c.delete_bucket(Bucket=name)

    # -- request log -------------------------------------------------------
    def requests(self, since: int = 0) -> list[S3Request]:
        """Requests served since ``since`` (a value of ``request_mark()``).

        Every request that completed before this call is included. The
        module's own probes are not.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not count requests")

    def request_mark(self) -> int:
        """Position in the request log now; pass it to ``requests(since=)``."""
        return len(self.requests())

    def request_counts(self, since: int = 0) -> dict[str, int]:
        """Requests since ``since`` per HTTP method, e.g. {"GET": 3, "PUT": 1}.

        For finer questions (ranged GETs per key) filter ``requests()``.
        """
        return _counts(self.requests(since))

    def object_get_counts(self, since: int = 0, bucket: str | None = None
                          ) -> dict[tuple[str | None, str | None], int]:
        """GETs of objects since ``since``, per (key, Range header or None).

        E.g. "exactly one GET per chunk" is
        ``all(n == 1 for n in server.object_get_counts(mark, b).values())``.
        Listings (GET on a bucket) are not counted.
        """
        return dict(collections.Counter(
            (r.key, r.range) for r in self.requests(since)
            if r.method == "GET" and r.key is not None
            and (bucket is None or r.bucket == bucket)))

    def info(self) -> dict[str, Any]:
        """What a client needs to connect (printed by the CLI)."""
        return {"endpoint_url": self.endpoint_url, "access_key": self.access_key,
                "secret_key": self.secret_key, "region": self.region}


# --------------------------------------------------------------------------
# moto


class _RecordingMiddleware:
    """WSGI middleware that records each request when its status is known.

    The record is appended before the response body is sent, so a request
    whose response the client has seen is always in the log.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.log: list[S3Request] = []

    def __call__(self, environ: dict, start_response: Any) -> Any:
        agent = environ.get("HTTP_USER_AGENT", "")
        target = environ.get("RAW_URI") or environ.get("REQUEST_URI") or (
            urllib.parse.quote(environ.get("PATH_INFO", "").encode("latin-1"))
            + ("?" + environ["QUERY_STRING"] if environ.get("QUERY_STRING") else ""))

        def recording_start_response(status: str, headers: Any, *exc: Any) -> Any:
            if not agent.startswith(_PROBE_AGENT):
                bucket, key, query = _split_target(target)
                rec = S3Request(
                    method=environ.get("REQUEST_METHOD", ""), bucket=bucket,
                    key=key, query=query, status=int(status.split()[0]),
                    range=environ.get("HTTP_RANGE"), user_agent=agent,
                    target=target)
                with self.lock:
                    self.log.append(rec)
            return start_response(status, headers, *exc)

        return self.app(environ, recording_start_response)


class MotoServer(S3Server):
    """moto's S3 server in this process, on a background thread.

    All MotoServers of one process share moto's in-memory state (moto keeps
    its backends in module globals); use distinct bucket names.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 access_key: str = "testing", secret_key: str = "testing") -> None:
        super().__init__()
        self.host = host
        self.port = port
        self.access_key = access_key
        self.secret_key = secret_key
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._recorder: _RecordingMiddleware | None = None

    @property
    def endpoint_url(self) -> str:  # type: ignore[override]
        return f"http://{self.host}:{self.port}"

    def start(self) -> "MotoServer":
        if self.running:
            return self
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        class QuietHandler(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass  # no access line on stderr per request

        self._recorder = _RecordingMiddleware(
            DomainDispatcherApplication(create_backend_app))
        # make_server binds and listens before it returns: no readiness poll.
        self._server = make_server(self.host, self.port, self._recorder,
                                   threaded=True, request_handler=QuietHandler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name=f"moto-s3-{self.port}", daemon=True)
        self._thread.start()
        self._register()
        return self

    def stop(self) -> None:
        if not self._unregister():
            return
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join(timeout=10)
        self._server = None

    def requests(self, since: int = 0) -> list[S3Request]:
        if self._recorder is None:
            return []
        with self._recorder.lock:
            return self._recorder.log[since:]

    def request_mark(self) -> int:
        if self._recorder is None:
            return 0
        with self._recorder.lock:
            return len(self._recorder.log)

    def __repr__(self) -> str:
        return f"MotoServer({self.endpoint_url})"


# --------------------------------------------------------------------------
# Ceph RGW

# PR_SET_PDEATHSIG: the kernel sends the signal to the child when the thread
# that forked it exits.
_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_parent(parent_pid: int):
    """preexec_fn: SIGKILL this child when the parent dies.

    Runs in the child between fork and exec; keeps to one libc call and a pid
    check (the parent may have died before prctl took effect).
    """
    def preexec() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)
    return preexec


class _Spawner:
    """Forks children from one thread that lives as long as the process.

    PR_SET_PDEATHSIG fires when the *thread* that forked a child ends, not the
    process: a daemon forked from a short-lived thread (a thread pool worker,
    asyncio.to_thread) would be killed with it. This thread only ends when
    the process does. A forked copy of this process starts its own.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._requests: queue.SimpleQueue = queue.SimpleQueue()

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """subprocess.Popen(argv, **kwargs) with the parent-death signal set."""
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._requests = queue.SimpleQueue()
                threading.Thread(target=self._serve, args=(self._requests,),
                                 name="s3servers-spawner", daemon=True).start()
            done: Future = Future()
            self._requests.put((argv, kwargs, done))
        try:
            return done.result()
        except KeyboardInterrupt:
            # Interrupted while the child was being forked: never leave it.
            try:
                proc = done.result(timeout=30)
            except Exception:  # noqa: BLE001 -- it did not start
                raise KeyboardInterrupt from None
            proc.kill()
            proc.wait()
            raise

    @staticmethod
    def _serve(requests: queue.SimpleQueue) -> None:
        while True:
            argv, kwargs, done = requests.get()
            try:
                done.set_result(subprocess.Popen(
                    argv, preexec_fn=_die_with_parent(os.getpid()), **kwargs))
            except BaseException as exc:  # noqa: BLE001 -- handed to the caller
                done.set_exception(exc)


_spawner = _Spawner()


# One line of the beast frontend's access log (written at `debug rgw >= 1`):
#   ... beast: 0x7f..: 127.0.0.1 - user [29/Nov/2026:06:10:54.862 +0000]
#   "GET /bkt/key HTTP/1.1" 206 10 - "Boto3/..." bytes=10-19 latency=0.004s
# The referer and user agent are '-' or a quoted string; the Range header is
# printed unquoted ('-' when absent).
_BEAST_LINE = re.compile(
    r' beast: 0x[0-9a-f]+: \S+ - (?P<user>\S+) \[[^\]]*\] '
    r'"(?P<method>[A-Z]+) (?P<target>\S+) HTTP/[0-9.]+" '
    r'(?P<status>\d+) (?P<bytes>\d+) (?:-|"[^"]*") '
    r'(?:-|"(?P<agent>[^"]*)") (?P<range>.*?) latency=\S+$')


def _unusable_directory(directory: Path) -> str | None:
    """Why RgwServer cannot start a cluster in ``directory``, or None.

    stop() deletes the directory, so it must hold nothing else. (The CLI's
    background launcher may have created log/ for its own output.)
    """
    if (directory / "ceph.conf").exists():
        return (f"{directory} already holds a Ceph cluster (ceph.conf); "
                f"RgwServer makes a fresh cluster on every start: remove the "
                f"directory or choose another")
    if directory.exists() and (not directory.is_dir() or any(
            p.name != "log" for p in directory.iterdir())):
        return (f"{directory} is not an empty directory; RgwServer needs a new "
                f"or empty one (stop() deletes it)")
    return None


@dataclass
class _Daemon:
    name: str
    proc: subprocess.Popen
    log: Path  # the daemon's own log file (ceph `log file`)
    out: Path  # its stdout+stderr


class RgwServer(S3Server):
    """A one-node Ceph cluster with RADOS Gateway, under ``directory``.

    ``objectstore="memstore"`` (default) keeps objects in the OSD's RAM with
    room for ``store_bytes`` (measured: the OSD's RSS grows by ~2 bytes per
    byte stored; idle daemons take ~130 MiB together; start ~2 s).
    ``"bluestore"`` uses a sparse file of ``store_bytes`` under the directory
    instead (start ~9 s, for data sets bigger than RAM). No authentication
    inside the cluster; the S3 user has ``access_key``/``secret_key``.
    ``port``/``mon_port`` default to free ports on ``host`` (any 127.x.y.z
    address works without setup). ``extra_conf`` adds or overrides ceph.conf
    options, e.g. ``{"rgw_max_chunk_size": 8 << 20}``.

    Every ``start()`` makes a fresh cluster: ``directory`` must not hold one.
    ``timings`` has the seconds of each start phase and of the last stop.
    """

    def __init__(self, directory: str | os.PathLike, *, host: str = "127.0.0.1",
                 port: int | None = None, mon_port: int | None = None,
                 access_key: str = "objcache", secret_key: str = "objcache-secret",
                 objectstore: str = "memstore", store_bytes: int = 2 * _GIB,
                 keep: bool = False, start_timeout: float = 60.0,
                 extra_conf: dict[str, Any] | None = None) -> None:
        super().__init__()
        if objectstore not in ("memstore", "bluestore"):
            raise ValueError(f"objectstore must be memstore or bluestore, "
                             f"not {objectstore!r}")
        self.directory = Path(directory).absolute()
        self.host = host
        self.port = port
        self.mon_port = mon_port
        self.access_key = access_key
        self.secret_key = secret_key
        self.objectstore = objectstore
        self.store_bytes = store_bytes
        self.keep = keep
        self.start_timeout = start_timeout
        self.extra_conf = dict(extra_conf or {})
        self._daemons: list[_Daemon] = []
        self._env: dict[str, str] = {}
        self._log_lock = threading.Lock()
        self._log_offset = 0          # bytes of the rgw log parsed so far
        self._log_partial = b""       # an incomplete last line
        self._log: list[S3Request] = []
        self._serving = False         # rgw has answered HTTP since start()
        self.timings: dict[str, float] = {}   # seconds per start/stop phase

    # -- paths -------------------------------------------------------------
    @property
    def conf_path(self) -> Path:
        return self.directory / "ceph.conf"

    @property
    def log_dir(self) -> Path:
        return self.directory / "log"

    @property
    def rgw_log(self) -> Path:
        return self.log_dir / "client.rgw.a.log"

    @property
    def endpoint_url(self) -> str:  # type: ignore[override]
        return f"http://{self.host}:{self.port}"

    def daemon_pids(self) -> dict[str, int]:
        return {d.name: d.proc.pid for d in self._daemons if d.proc.poll() is None}

    def __repr__(self) -> str:
        return f"RgwServer({self.endpoint_url}, dir={str(self.directory)!r})"

    # -- start -------------------------------------------------------------
    def start(self) -> "RgwServer":
        if self.running:
            return self
        missing = [b for b in _CEPH_BINARIES if not shutil.which(b)]
        if missing:
            raise RgwUnavailable(
                f"Ceph RGW cannot start: {', '.join(missing)} not found on PATH. "
                f"Install the Debian packages: apt-get install "
                f"--no-install-recommends {CEPH_DEBIAN_PACKAGES}")
        problem = _unusable_directory(self.directory)
        if problem:
            raise S3ServerError(problem)
        if self.port is None:
            self.port = free_port(self.host)
        if self.mon_port is None:
            self.mon_port = free_port(self.host)
        for what, port in (("mon", self.mon_port), ("rgw", self.port)):
            if not _port_is_free(self.host, port):
                raise S3ServerError(
                    f"{what} port {self.host}:{port} is already in use (another "
                    f"Ceph cluster or server?); choose another port or another "
                    f"loopback address (e.g. host='127.0.0.2')")

        self._register()  # from here on, stop() (also at exit) cleans up
        try:
            self._start_cluster()
        except BaseException as exc:
            # Kill what started. After a failure keep the directory so its
            # logs can be read (the error has their tails); after an
            # interruption (Ctrl-C, SIGTERM in the CLI) clean up as stop() does.
            interrupted = isinstance(exc, KeyboardInterrupt)
            self._shutdown(graceful=False, remove=interrupted and not self.keep)
            raise
        return self

    def _start_cluster(self) -> None:
        t_start = time.monotonic()
        deadline = t_start + self.start_timeout
        d = self.directory
        for sub in ("log", "run", "crash", "mon.a", "osd.0"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        self.conf_path.write_text(self._ceph_conf(fsid))
        with self._log_lock:  # a new rgw log for a new cluster
            self._log_offset, self._log_partial, self._log = 0, b"", []
        # The Ceph tools are Debian's python3 programs: keep our interpreter's
        # settings and any user Ceph settings away from them.
        self._env = {k: v for k, v in os.environ.items()
                     if not k.startswith(("CEPH_", "PYTHON"))}
        conf = ["-c", str(self.conf_path)]

        # mon: create its store from a one-mon monmap, then run it.
        self._run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a",
                   f"[v2:{self.host}:{self.mon_port}]", str(d / "monmap")],
                  deadline)
        self._run(["ceph-mon", *conf, "--mkfs", "-i", "a",
                   "--monmap", str(d / "monmap")], deadline)
        self._spawn("mon.a", ["ceph-mon", *conf, "-f", "-i", "a"])

        # osd: `osd new` also waits for the mon to form a quorum.
        osd_uuid = str(uuid.uuid4())
        osd_id = self._run(["ceph", *conf, "--connect-timeout",
                            str(max(1, int(deadline - time.monotonic()))),
                            "osd", "new", osd_uuid], deadline).strip()
        if osd_id != "0":
            raise S3ServerError(f"expected osd id 0, the mon gave {osd_id!r}")
        self.timings["mon"] = time.monotonic() - t_start
        self._run(["ceph-osd", *conf, "-i", "0", "--mkfs",
                   "--osd-uuid", osd_uuid], deadline)
        self._spawn("osd.0", ["ceph-osd", *conf, "-f", "-i", "0"])

        # rgw: its start creates the rgw pools and writes to them, so once it
        # answers HTTP the osd is up and the pools are active.
        self._spawn("client.rgw.a", ["radosgw", *conf, "-f", "-n", "client.rgw.a"])
        self._wait_http(deadline)
        self.timings["rgw"] = time.monotonic() - t_start
        self._serving = True
        # --max-buckets 0: no limit (the default, 1000, is reached by a long
        # test session that makes a bucket per test).
        self._run(["radosgw-admin", *conf, "user", "create", "--uid", "objcache",
                   "--display-name", "objcache", "--access-key", self.access_key,
                   "--secret-key", self.secret_key, "--max-buckets", "0"],
                  deadline)
        self.timings["start"] = time.monotonic() - t_start
        self._write_state()

    def _ceph_conf(self, fsid: str) -> str:
        d = self.directory
        # Unix sockets paths are limited to 108 bytes; with a deep directory,
        # run without admin sockets (only `ceph daemon` needs them).
        asok = str(d / "run" / "$name.asok")
        if len(asok) + 16 > 107:
            asok = ""
        store: dict[str, Any]
        if self.objectstore == "memstore":
            store = {"osd objectstore": "memstore",
                     "memstore device bytes": self.store_bytes}
        else:
            store = {"osd objectstore": "bluestore",
                     "bluestore block create": "true",
                     "bluestore block size": self.store_bytes,
                     "bluestore block db create": "false",
                     "bluestore block wal create": "false",
                     "osd memory target": 1 * _GIB}
        glob: dict[str, Any] = {
            "fsid": fsid,
            "mon host": f"v2:{self.host}:{self.mon_port}",
            "mon initial members": "a",
            "public addr": self.host,
            "cluster addr": self.host,
            "ms bind msgr1": "false",
            "ms bind ipv6": "false",
            # No cephx; and every messenger mode `crc`, else rgw loops on
            # "get_initial_auth_request returned -13".
            "auth cluster required": "none",
            "auth service required": "none",
            "auth client required": "none",
            "ms mon client mode": "crc",
            "ms client mode": "crc",
            "ms mon service mode": "crc",
            "ms service mode": "crc",
            "ms mon cluster mode": "crc",
            "ms cluster mode": "crc",
            # Everything under the directory (defaults are /var/...).
            "log file": str(d / "log" / "$name.log"),
            "admin socket": asok,
            "run dir": str(d / "run"),
            "crash dir": str(d / "crash"),
            "mon data": str(d / "mon.$id"),
            "osd data": str(d / "osd.$id"),
            "mon cluster log to file": "false",
            "keyring": "/dev/null",
            # The mon batches map changes for `paxos propose interval` (1 s by
            # default); rgw's first start makes ~15 of them, one per pool.
            "paxos propose interval": 0.05,
            # One OSD: one replica, few PGs, no mgr (HEALTH_WARN is harmless).
            "osd pool default size": 1,
            "osd pool default min size": 1,
            "osd pool default pg num": 8,
            "osd pool default pgp num": 8,
            "osd pool default pg autoscale mode": "off",
            "osd crush chooseleaf type": 0,
            "mon allow pool size one": "true",
            "mon allow pool delete": "true",
            "mon warn on pool no redundancy": "false",
            "mon max pg per osd": 1000,   # else rgw's pool creation fails
            "mon data avail warn": 1,
            "mon data avail crit": 0,     # a full /tmp must not stop the mon
            **store,
        }
        rgw: dict[str, Any] = {
            # tcp_nodelay: without it small requests take ~48 ms (Nagle +
            # delayed ACK).
            "rgw frontends":
                f"beast endpoint={self.host}:{self.port} tcp_nodelay=1",
            # Level 1 writes one access-log line per HTTP request (with the
            # Range header): requests() parses them.
            "debug rgw": 1,
            "rgw enable ops log": "false",
            # Deleted objects' tails are freed after 2 h by default; a long
            # test session on memstore would keep them in RAM.
            "rgw gc obj min wait": 60,
            "rgw gc processor period": 60,
        }
        # extra_conf: an option set above is overridden where it is set; a
        # new one goes to rgw's section if it is an rgw option, else global.
        for key, value in self.extra_conf.items():
            key = key.replace("_", " ")
            if key in rgw or (key not in glob and key.startswith("rgw ")):
                rgw[key] = value
            else:
                glob[key] = value

        def section(name: str, opts: dict[str, Any]) -> str:
            return f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in opts.items())
        return section("global", glob) + "\n" + section("client.rgw.a", rgw)

    def _write_state(self) -> None:
        """DIR/server.json: what the CLI's `stop`/`status` and humans need."""
        state = {**self.info(), "kind": "rgw", "directory": str(self.directory),
                 "pid": os.getpid(),  # the process that owns the daemons
                 "start_seconds": round(self.timings["start"], 2),
                 "daemons": self.daemon_pids()}
        tmp = self.directory / "server.json.tmp"
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        tmp.replace(self.directory / "server.json")

    # -- processes ---------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> None:
        out = self.log_dir / f"{name}.out"
        with open(out, "ab") as f:
            proc = _spawner.popen(
                argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                env=self._env, cwd=self.directory, close_fds=True,
                # Own process group: a terminal's Ctrl-C reaches only us, and
                # we stop the daemons in order.
                process_group=0)
        self._daemons.append(_Daemon(name, proc, self.log_dir / f"{name}.log", out))

    def _run(self, argv: list[str], deadline: float) -> str:
        """Run a one-shot Ceph tool to completion; its stdout."""
        self._check_daemons()
        shown = " ".join(a for a in argv if a not in ("-c", str(self.conf_path)))
        proc = _spawner.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=self._env,
                              cwd=self.directory)
        try:
            stdout, stderr = proc.communicate(
                timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired as exc:
            raise S3ServerError(
                f"`{shown}` did not finish within the start timeout "
                f"({self.start_timeout:.0f} s)\n" + self._log_tails()) from exc
        finally:
            if proc.poll() is None:  # timed out or interrupted: never leave it
                proc.kill()
                proc.communicate()
        if proc.returncode != 0:
            raise S3ServerError(
                f"`{shown}` failed with exit status {proc.returncode}:\n"
                f"{_tail_text(stdout + stderr)}\n" + self._log_tails())
        return stdout.decode(errors="replace")

    def _check_daemons(self) -> None:
        for d in self._daemons:
            rc = d.proc.poll()
            if rc is not None:
                raise S3ServerError(
                    f"{d.name} exited with status {rc} during start\n"
                    + self._log_tails([d]))

    def _log_tails(self, daemons: list[_Daemon] | None = None,
                   lines: int = 15) -> str:
        parts = []
        for d in self._daemons if daemons is None else daemons:
            for path in (d.out, d.log):
                if path.exists() and path.stat().st_size:
                    parts.append(f"--- tail of {path} ---\n"
                                 + _tail_text(path.read_bytes()[-16384:], lines))
        return "\n".join(parts)

    def _wait_http(self, deadline: float) -> None:
        """Poll until rgw answers an HTTP request.

        beast may accept connections before it serves them, so every attempt
        has its own short timeout.
        """
        while True:
            self._check_daemons()
            try:
                status = self._probe("GET", "/", timeout=1.0)
                if status < 500:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise S3ServerError(
                    f"radosgw did not answer on {self.endpoint_url} within "
                    f"{self.start_timeout:.0f} s\n" + self._log_tails())
            time.sleep(0.05)  # poll interval, not synchronisation

    def _probe(self, method: str, path: str, timeout: float) -> int:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, headers={"User-Agent": _PROBE_AGENT})
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    # -- stop --------------------------------------------------------------
    def stop(self) -> None:
        """Stop every daemon (by pid), wait for them, remove the directory.

        With ``keep=False`` nothing in the cluster is worth saving, so the
        daemons get SIGKILL (~0.05 s). With ``keep=True`` they get SIGTERM,
        in reverse start order, so their logs end cleanly (~0.5 s), and
        SIGKILL only if they do not exit in time. Memstore objects are lost
        either way (the OSD's fast shutdown does not dump them to disk).
        """
        self._shutdown(graceful=self.keep, remove=not self.keep)

    def _shutdown(self, graceful: bool, remove: bool) -> None:
        if not self._unregister():
            return
        t0 = time.monotonic()
        if self._serving:  # requests() still answers after stop
            try:
                self._log_barrier(timeout=2.0)
            except (OSError, S3ServerError):
                pass  # a dead rgw logs no more
            with self._log_lock:
                self._parse_log()
        self._serving = False
        for d in reversed(self._daemons):
            _terminate(d.proc, graceful=graceful)
        self._daemons.clear()
        self.timings["stop"] = time.monotonic() - t0
        if remove:
            shutil.rmtree(self.directory, ignore_errors=True)

    # -- request log -------------------------------------------------------
    def requests(self, since: int = 0) -> list[S3Request]:
        if self.running:
            self._log_barrier()
            with self._log_lock:
                self._parse_log()
        # After stop() the log was parsed one last time (the file may be gone).
        with self._log_lock:
            return self._log[since:]

    def _log_barrier(self, timeout: float = 10.0) -> None:
        """Wait until every request answered so far is in the rgw log.

        rgw writes an access line just after it sent the response, through
        Ceph's logging thread, which writes lines in the order they were
        logged. A marker request sent now is logged after every request whose
        response has already reached its client (bar the microseconds between
        rgw writing a response and logging it); once the marker's line is in
        the file, so are theirs.
        """
        token = uuid.uuid4().hex
        self._probe("HEAD", f"/objcache-log-barrier-{token}", timeout=timeout)
        needle = token.encode()
        deadline = time.monotonic() + timeout
        with open(self.rgw_log, "rb") as f:
            f.seek(self._log_offset)
            seen = b""
            while True:
                seen += f.read()
                if needle in seen:
                    return
                if time.monotonic() > deadline:
                    raise S3ServerError(
                        f"the rgw log {self.rgw_log} did not show a request "
                        f"within {timeout} s")
                time.sleep(0.002)  # poll interval for the log thread's write

    def _parse_log(self) -> None:
        """Append the access lines written since the last call to _log."""
        with open(self.rgw_log, "rb") as f:
            f.seek(self._log_offset)
            data = f.read()
        self._log_offset += len(data)
        data = self._log_partial + data
        lines = data.split(b"\n")
        self._log_partial = lines.pop()  # b"" or an unfinished line
        for raw in lines:
            if b" beast: " not in raw:
                continue
            m = _BEAST_LINE.search(raw.decode("utf-8", "replace"))
            if m is None or (m["agent"] or "").startswith(_PROBE_AGENT):
                continue
            bucket, key, query = _split_target(m["target"])
            rng = m["range"]
            self._log.append(S3Request(
                method=m["method"], bucket=bucket, key=key, query=query,
                status=int(m["status"]), range=None if rng == "-" else rng,
                user_agent=m["agent"] or "", target=m["target"]))


def _terminate(proc: subprocess.Popen, graceful: bool,
               term_timeout: float = 20.0) -> None:
    """End one child and reap it. SIGTERM first when ``graceful``."""
    if proc.poll() is not None:
        return
    if graceful:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=term_timeout)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait()


def _tail_text(data: bytes, lines: int = 15) -> str:
    text = [ln for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    return "\n".join(text[-lines:])


# --------------------------------------------------------------------------
# Command line


def _make_server(args: argparse.Namespace) -> S3Server:
    if args.kind == "moto":
        return MotoServer(host=args.host, port=args.port or 0)
    return RgwServer(args.dir, host=args.host, port=args.port,
                     mon_port=args.mon_port, access_key=args.access_key,
                     secret_key=args.secret_key, objectstore=args.objectstore,
                     store_bytes=args.store_bytes, keep=args.keep)


class _Stop(KeyboardInterrupt):
    """Raised in the main thread by the SIGTERM/SIGINT handler."""


def _serve_foreground(args: argparse.Namespace) -> int:
    """Start, print the JSON line, serve until SIGTERM/SIGINT, stop."""
    def on_signal(signum: int, frame: Any) -> None:
        # Once: a second signal during stop() must not interrupt the cleanup.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise _Stop(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = _make_server(args)
    try:
        try:
            server.start()
        except S3ServerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        info = {**server.info(), "kind": args.kind, "pid": os.getpid()}
        if isinstance(server, RgwServer):
            info["directory"] = str(server.directory)
            info["start_seconds"] = round(server.timings["start"], 2)
        elif args.dir:
            Path(args.dir).mkdir(parents=True, exist_ok=True)
            (Path(args.dir) / "server.json").write_text(json.dumps(info) + "\n")
        print(json.dumps(info), flush=True)
        while True:
            signal.pause()
    except _Stop:
        return 0
    finally:
        server.stop()
        if args.kind == "moto" and args.dir:
            (Path(args.dir) / "server.json").unlink(missing_ok=True)


def _serve_background(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the foreground command as a detached supervisor; print its JSON."""
    directory = Path(args.dir).absolute()
    state = directory / "server.json"
    if state.exists():
        print(f"error: {state} exists: a server may be running there "
              f"(`stop --dir {args.dir}`)", file=sys.stderr)
        return 1
    problem = _unusable_directory(directory) if args.kind == "rgw" else None
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    (directory / "log").mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "objcache.testing.s3servers", *argv,
           "--foreground"]
    with open(directory / "log" / "supervisor.out", "ab") as out:
        sup = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while not state.exists():
        if sup.poll() is not None or time.monotonic() > deadline:
            if sup.poll() is None:
                sup.terminate()
            print(f"error: the server did not start; see "
                  f"{directory / 'log' / 'supervisor.out'}:\n"
                  + _tail_text((directory / "log" / "supervisor.out").read_bytes(),
                               30), file=sys.stderr)
            return 1
        time.sleep(0.05)
    info = json.loads(state.read_text())
    info.pop("daemons", None)
    print(json.dumps(info), flush=True)
    return 0


def _pid_alive(pid: int) -> bool:
    """Running; a zombie (exited, not yet reaped by its parent) is not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _stop_dir(args: argparse.Namespace) -> int:
    state_path = Path(args.dir) / "server.json"
    if not state_path.exists():
        print(f"no server running in {args.dir} (no server.json)", file=sys.stderr)
        return 1
    state = json.loads(state_path.read_text())
    pid = state["pid"]
    if _pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            print(f"supervisor pid {pid} did not exit within {args.timeout} s",
                  file=sys.stderr)
            return 1
        time.sleep(0.05)
    # The supervisor stops its daemons; PDEATHSIG covers a supervisor that was
    # killed. Anything left (pid reuse is checked) gets SIGKILL here.
    for name, dpid in state.get("daemons", {}).items():
        try:
            cmdline = Path(f"/proc/{dpid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(Path(args.dir).absolute()).encode() in cmdline:
            os.kill(dpid, signal.SIGKILL)
            print(f"killed leftover {name} (pid {dpid})", file=sys.stderr)
    if state_path.exists() and state.get("kind") == "rgw":
        state_path.unlink()  # kept directory: allow inspecting, not re-stopping
    return 0


def _status_dir(args: argparse.Namespace) -> int:
    state_path = Path(args.dir) / "server.json"
    if not state_path.exists():
        print(json.dumps({"running": False}))
        return 1
    state = json.loads(state_path.read_text())
    state["running"] = _pid_alive(state["pid"])
    print(json.dumps(state))
    return 0 if state["running"] else 1


def _size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": _MIB, "g": _GIB, "t": 1 << 40}
    m = re.fullmatch(r"(\d+)\s*([kmgt]?)i?b?", text.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(m[1]) * units[m[2]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m objcache.testing.s3servers",
                                description="S3 servers on loopback.")
    sub = p.add_subparsers(dest="command", required=True)
    for kind in ("rgw", "moto"):
        s = sub.add_parser(kind, help=f"run a {kind} S3 server")
        s.set_defaults(kind=kind)
        s.add_argument("--dir", required=(kind == "rgw"),
                       help="directory of the server (rgw: its cluster; "
                            "both: server.json for stop/status)")
        s.add_argument("--host", default="127.0.0.1")
        s.add_argument("--port", type=int, default=None,
                       help="S3 port (default: a free port)")
        s.add_argument("--foreground", action="store_true",
                       help="stay attached until SIGTERM/SIGINT")
        if kind == "rgw":
            s.add_argument("--mon-port", type=int, default=None)
            s.add_argument("--access-key", default="objcache")
            s.add_argument("--secret-key", default="objcache-secret")
            s.add_argument("--objectstore", choices=("memstore", "bluestore"),
                           default="memstore")
            s.add_argument("--store-bytes", type=_size, default=2 * _GIB,
                           help="capacity of the object store (e.g. 4G)")
            s.add_argument("--keep", action="store_true",
                           help="keep the directory (logs) after stopping")
    for name, helptext in (("stop", "stop the server recorded in DIR"),
                           ("status", "print DIR's server.json, and whether "
                                      "it runs")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--dir", required=True)
        s.add_argument("--timeout", type=float, default=60.0)
    if argv is None:
        argv = sys.argv[1:]
    args = p.parse_args(argv)

    if args.command == "stop":
        return _stop_dir(args)
    if args.command == "status":
        return _status_dir(args)
    if args.foreground:
        return _serve_foreground(args)
    if not args.dir:
        p.error("without --foreground, --dir is required (for server.json)")
    return _serve_background(args, argv)


if __name__ == "__main__":
    sys.exit(main())
