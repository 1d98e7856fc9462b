"""Shared fixtures: synthetic BIDS data, real example images, a real S3 server."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import nibabel as nib
import pytest

from chunkglm.testing import make_synthetic_bids

#: nibabel and nipy ship these in their wheels: real images nobody here made.
EXAMPLE4D = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"


def nipy_functional() -> Path:
    import nipy.testing

    return Path(nipy.testing.funcfile)


@pytest.fixture(scope="session")
def real_images() -> list[Path]:
    """nibabel's example4d (int16, 2 volumes) and nipy's functional (int16, scaled)."""
    paths = [EXAMPLE4D, nipy_functional()]
    assert all(p.is_file() for p in paths)
    return paths


@pytest.fixture(scope="session")
def tiny_bids(tmp_path_factory):
    """Two subjects, one run each, tiny grid; read-only for tests."""
    return make_synthetic_bids(tmp_path_factory.mktemp("bids"), n_subjects=2, size="tiny", seed=1)


@pytest.fixture(scope="session")
def tiny_bids_sessions(tmp_path_factory):
    """Two subjects x two sessions x two runs, int16 with scaling."""
    return make_synthetic_bids(tmp_path_factory.mktemp("bids_ses"), n_subjects=2, n_sessions=2,
                               n_runs=2, size="tiny", dtype="int16", seed=2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto in server mode) on 127.0.0.1.

    Yields a dict with ``endpoint``, ``key``, ``secret`` and ``storage_options``
    for fsspec/s3fs. Credentials are fake and exist only in this process.
    """
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    key, secret = "testing-key-id", "super-secret-value-1234"
    options = {"key": key, "secret": secret, "client_kwargs": {"endpoint_url": endpoint,
                                                              "region_name": "us-east-1"}}
    try:
        yield {"endpoint": endpoint, "key": key, "secret": secret, "storage_options": options}
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket per test; returns its name."""
    import boto3

    import hashlib
    import re

    # bucket names: lowercase letters, digits, hyphens, at most 63 characters
    label = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"bucket-{label}-{hashlib.sha256(request.node.name.encode()).hexdigest()[:8]}"
    client = boto3.client("s3", endpoint_url=s3_server["endpoint"], region_name="us-east-1",
                          aws_access_key_id=s3_server["key"],
                          aws_secret_access_key=s3_server["secret"])
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The S3 server's endpoint and credentials in the environment only, as on a cluster."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret"])
    return s3_server


@pytest.fixture(autouse=True)
def _no_real_aws(monkeypatch):
    """Never let a test reach a real cloud endpoint through ambient credentials."""
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


class S3Proxy:
    """A real TCP proxy on 127.0.0.1 in front of an S3 server, for real failures.

    ``cut_on`` (a regex over the HTTP bytes the client sends, e.g. a request
    line): at its ``cut_after``-th match the proxy cuts the network, as if
    the server had stopped: every open connection is reset and new ones are
    refused. ``fail_first``: the first N connections get a ``503 Slow Down``
    and are closed (a transient error that clients retry).
    """

    def __init__(self, upstream: str, *, cut_on: bytes | None = None, cut_after: int = 1,
                 fail_first: int = 0):
        import re
        import threading

        self._upstream = ("127.0.0.1", int(upstream.rsplit(":", 1)[1]))
        self._pattern = re.compile(cut_on) if cut_on else None
        self._cut_after, self._matches, self.failed_left = cut_after, 0, fail_first
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.cut_done = threading.Event()
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request forwarded
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import threading

        while not self.cut_done.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                fail = self.failed_left > 0
                self.failed_left -= fail
            if fail:
                threading.Thread(target=self._slow_down, args=(client,), daemon=True).start()
                continue
            upstream = socket.create_connection(self._upstream)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    @staticmethod
    def _slow_down(client):
        with client:
            client.recv(65536)
            client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def _pump(self, source, target, scan):
        try:
            while data := source.recv(65536):
                # request lines are short and arrive whole: no match spans two reads
                if scan and self._pattern is not None and self._should_cut(data):
                    self.cut()
                    return
                if scan:
                    self._record(data)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _record(self, data: bytes) -> None:
        import re
        from urllib.parse import unquote

        found = re.findall(rb"(?:^|\r\n)(GET|PUT|HEAD|DELETE|POST) (\S+) HTTP/1\.1\r\n", data)
        with self._lock:
            self.requests += [(m.decode(), unquote(p.decode()).split("?")[0]) for m, p in found]

    def _should_cut(self, data: bytes) -> bool:
        with self._lock:
            self._matches += len(self._pattern.findall(data))
            return self._matches >= self._cut_after

    def cut(self):
        """Reset every connection and refuse new ones from now on."""
        self.cut_done.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()
                except OSError:
                    pass

    def close(self):
        self.cut()


@pytest.fixture
def s3_proxy(s3_server):
    """Factory: ``s3_proxy(cut_on=..., fail_first=...)`` -> a started :class:`S3Proxy`."""
    proxies = []

    def make(**kwargs):
        proxies.append(S3Proxy(s3_server["endpoint"], **kwargs))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()
