"""A real dask-gateway server on 127.0.0.1 for tests (local backend).

:class:`LocalGateway` writes a ``dask_gateway_config.py`` into a temporary
directory, starts ``dask-gateway-server`` as a subprocess on free loopback
ports and waits for its health endpoint.  Schedulers and workers are this
interpreter's ``python -m distributed.cli.dask_scheduler`` / ``dask_worker``
(the server's default ``dask-scheduler`` script no longer exists in this
distributed version).  :meth:`LocalGateway.stop` stops the server, which stops
its clusters and proxy, then ends any process of its tree still alive.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

CONFIG = """\
import sys
from dask_gateway_server.options import Integer, Options

c.DaskGateway.address = "127.0.0.1:{api_port}"
c.Proxy.address = "127.0.0.1:{http_port}"
c.Proxy.tcp_address = "127.0.0.1:{tcp_port}"
c.DaskGateway.backend_class = "dask_gateway_server.backends.local.UnsafeLocalBackend"
c.LocalBackend.clusters_directory = {clusters!r}
c.ClusterConfig.scheduler_cmd = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
c.ClusterConfig.worker_cmd = [sys.executable, "-m", "distributed.cli.dask_worker"]
c.ClusterConfig.scheduler_memory = "1 G"
c.ClusterConfig.worker_memory = "{worker_memory}"
c.ClusterConfig.idle_timeout = 600
c.DaskGateway.authenticator_class = "dask_gateway_server.auth.SimpleAuthenticator"
c.SimpleAuthenticator.password = {password!r}


def _options(options):
    return {{"worker_cores": options.worker_cores}}


c.Backend.cluster_options = Options(
    Integer("worker_cores", default=1, min=1, max=2, label="Worker cores"),
    handler=_options,
)
"""


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalGateway:
    """A dask-gateway server with the local backend, for one test session.

    Parameters
    ----------
    folder : pathlib.Path
        Empty directory for the config, the log and the clusters' files.
    password : str
        The SimpleAuthenticator's shared password (any user name).
    worker_memory : str
        Memory limit of each worker, as dask-gateway writes it ("2 G").
    """

    def __init__(self, folder: Path, password: str, worker_memory: str = "2 G"):
        self.folder = Path(folder)
        self.password = password
        self.http_port, self.tcp_port, self.api_port = free_port(), free_port(), free_port()
        self.worker_memory = worker_memory
        self.log_path = self.folder / "gateway-server.log"
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def address(self) -> str:
        """The gateway's public HTTP address (proxy)."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def proxy_address(self) -> str:
        """The scheduler proxy address clients connect to."""
        return f"gateway://127.0.0.1:{self.tcp_port}"

    def config(self, **gateway_options) -> dict:
        """A chunkglm ``type: gateway`` config for this server."""
        options = {"address": self.address, "proxy_address": self.proxy_address,
                   "auth": {"type": "basic", "username": "chunkglm-test"},
                   "workers": 2, "wait_timeout": 120}
        options.update(gateway_options)
        return {"version": 1, "type": "gateway", "gateway": options, "adapt": None}

    def start(self, timeout: float = 60.0) -> "LocalGateway":
        """Start the server and wait until its API answers."""
        config = self.folder / "dask_gateway_config.py"
        config.write_text(CONFIG.format(
            api_port=self.api_port, http_port=self.http_port, tcp_port=self.tcp_port,
            clusters=str(self.folder / "clusters"), password=self.password,
            worker_memory=self.worker_memory))
        server = Path(sys.executable).with_name("dask-gateway-server")
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [str(server), "-f", str(config)], cwd=self.folder, stdout=self._log,
            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dask-gateway-server exited:\n{self.logs()}")
            if self._healthy():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"dask-gateway-server did not answer in {timeout} s:\n{self.logs()}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.address}/api/health", timeout=2) as answer:
                return json.load(answer).get("status") == "pass"
        except (OSError, ValueError):
            return False

    def processes(self) -> list[psutil.Process]:
        """The server and every process it started (proxy, schedulers, workers)."""
        if self.process is None or self.process.poll() is not None:
            return []
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server (it stops its clusters), then end any leftover process."""
        tree = self.processes()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        _, alive = psutil.wait_procs(tree[1:], timeout=10)
        for proc in alive:  # only processes this server started, by pid
            proc.kill()
        psutil.wait_procs(alive, timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def logs(self) -> str:
        """The server's log (for assertion messages)."""
        return self.log_path.read_text() if self.log_path.exists() else ""
