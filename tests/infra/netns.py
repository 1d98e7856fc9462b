"""Several "hosts" on one machine: Linux network namespaces joined by a bridge.

Each host is a network namespace with one end of a veth pair; the other end is
enslaved to a bridge in the test's own namespace, which holds the bridge's
address (``.1``). Hosts are ``.10``, ``.11``, ... of a private /24 made for the
test (10.213.X.0/24, X from the process id): no traffic leaves the machine.
:meth:`Hosts.cut` takes a host's link down (its packets are dropped, as when a
cable or switch port fails: no reset reaches either side), :meth:`Hosts.restore`
brings it back. Processes started with :meth:`Hosts.popen` run inside a host's
namespace and share the file system (as cluster nodes share one).

Needs root and iproute2 (``ip``); :func:`unavailable` says why not, for a skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for program, package in (("ip", "iproute2"), ("nsenter", "util-linux")):
        if shutil.which(program) is None:
            return f"{package}'s `{program}` is not installed"
    probe = f"cgprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, netns: str | None = None) -> None:
    cmd = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


class Hosts:
    """``n`` hosts in their own network namespaces, bridged to this one.

    Use as a context manager: everything made (namespaces, links, bridge,
    processes started with :meth:`popen`) is removed at the end.
    """

    def __init__(self, n: int):
        tag = os.getpid() % 250 + 1
        self.subnet = f"10.213.{tag}"
        self.bridge = f"cgbr{tag}"
        self.bridge_address = f"{self.subnet}.1"
        self.names = [f"cgh{tag}x{i}" for i in range(n)]
        self.addresses = [f"{self.subnet}.{10 + i}" for i in range(n)]
        self._links = [f"cgv{tag}x{i}" for i in range(n)]
        self._processes: list[subprocess.Popen] = []

    def __enter__(self) -> Hosts:
        self._remove()  # those of a killed earlier run with this process id
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for name, link, address in zip(self.names, self._links, self.addresses):
                _ip("netns", "add", name)
                _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", name)
                _ip("link", "set", link, "master", self.bridge)
                _ip("link", "set", link, "up")
                _ip("addr", "add", f"{address}/24", "dev", "eth0", netns=name)
                _ip("link", "set", "eth0", "up", netns=name)
                _ip("link", "set", "lo", "up", netns=name)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def popen(self, host: int | None, cmd: list[str], **kwargs) -> subprocess.Popen:
        """Start ``cmd`` on host ``host`` (None: in this namespace), in its own process group."""
        if host is not None:
            cmd = self.enter(host) + list(cmd)
        process = subprocess.Popen(cmd, start_new_session=True, **kwargs)
        self._processes.append(process)
        return process

    def enter(self, host: int) -> list[str]:
        """The command prefix that runs a program on host ``host``.

        ``nsenter --net`` switches the network namespace only: unlike ``ip netns exec``
        it does not remount /sys, so the programs see this machine's cgroups (slurmd
        needs them) and its file systems.
        """
        return ["nsenter", f"--net=/var/run/netns/{self.names[host]}", "--"]

    def cut(self, host: int) -> None:
        """Take host ``host``'s link down: its packets are lost, no connection is reset."""
        _ip("link", "set", self._links[host], "down")

    def restore(self, host: int) -> None:
        _ip("link", "set", self._links[host], "up")

    def __exit__(self, *exc) -> None:
        for process in self._processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for process in self._processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
        self._remove()

    def _remove(self) -> None:
        for link in self._links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
