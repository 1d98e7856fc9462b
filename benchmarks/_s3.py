"""A local S3-compatible server for the benchmarks: moto in server mode on 127.0.0.1.

The same server the tests use (``tests/conftest.py``), run here as its own
process so that it does not share the benchmark driver's GIL. Credentials are
dummies set in the environment (the workers inherit them); nothing leaves
127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

BUCKET = "chunkglm-bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """``with MotoServer() as s3:`` a moto server process; ``s3.endpoint``,
    ``s3.options`` (s3fs-style storage options), ``s3.upload(local, key)``."""

    def __init__(self):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.options = {"endpoint_url": self.endpoint}
        self.process = None

    def __enter__(self):
        os.environ.update(CREDENTIALS)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            self.__exit__(None, None, None)
            raise RuntimeError(f"moto server did not start on {self.endpoint}")
        return self

    def __exit__(self, *exc):
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None

    def upload(self, local: str, key: str) -> tuple[str, float]:
        """Copy a local folder to ``s3://BUCKET/key`` in a child process (this
        one stays small: children inherit their parent's peak RSS at fork);
        returns (url, seconds)."""
        from _harness import run_child

        url = f"s3://{BUCKET}/{key}"
        record = run_child("s3_upload", {"local": local, "url": url, "endpoint": self.endpoint})
        return url, record["wall_s"]
