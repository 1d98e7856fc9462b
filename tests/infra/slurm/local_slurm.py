"""A real single-node SLURM on 127.0.0.1, started and stopped by the tests.

:class:`LocalSlurm` runs a private ``munged`` (as the ``munge`` user, with its
own key and socket), ``slurmctld`` and ``slurmd -N localhost`` from one
temporary directory, with a ``slurm.conf`` written from ``slurm.conf.in``.
Nothing outside that directory is touched: the system munge socket, /etc/slurm
and the system's daemons (if any) are left alone.  Clients find this cluster
through the ``SLURM_CONF`` variable in :attr:`LocalSlurm.env`.

:func:`ensure_installed` installs ``slurm-wlm`` and ``munge`` from the Debian
packages when they are missing and this process may (root, apt-get).  Where
that is impossible it raises :class:`SlurmUnavailable` whose message is the
reason to skip.

Run ``python tests/infra/slurm/local_slurm.py`` to start the cluster by hand;
it prints the ``SLURM_CONF`` to export and stops on Ctrl-C.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/infra, also when run as a script
from apt_packages import install, tail as _tail  # noqa: E402

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "slurm.conf.in"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scancel", "scontrol")
PACKAGES = ("slurm-wlm", "munge")
#: Memory left to the operating system when sizing the node (MB).
RESERVED_MB = 1024


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or run here; the message says why."""


# --------------------------------------------------------------------------
# installation
# --------------------------------------------------------------------------
def missing_programs() -> list[str]:
    """Return the SLURM and munge programs not found on PATH (or /usr/sbin)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [name for name in DAEMONS + CLIENTS if shutil.which(name, path=path) is None]


def ensure_installed(timeout: float = 900.0) -> float:
    """Install slurm-wlm and munge from apt if any of their programs is missing.

    Parameters
    ----------
    timeout : float
        Seconds allowed for each apt-get command.

    Returns
    -------
    float
        Seconds spent installing (0.0 when everything was there).

    Raises
    ------
    SlurmUnavailable
        When programs are missing and cannot be installed: not root, no
        apt-get, or apt-get failed (its output's tail is in the message).
    """
    missing = missing_programs()
    if not missing:
        return 0.0
    started = time.monotonic()
    install(PACKAGES, f"SLURM programs missing: {', '.join(missing)}", SlurmUnavailable, timeout)
    still = missing_programs()
    if still:
        raise SlurmUnavailable(f"apt-get installed {' '.join(PACKAGES)} but "
                               f"{', '.join(still)} are still missing.")
    return time.monotonic() - started


# --------------------------------------------------------------------------
# the cluster
# --------------------------------------------------------------------------
def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports on 127.0.0.1 that are free now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:  # all bound at once, so the ports differ
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def node_size() -> tuple[int, int]:
    """Return (CPUs, RealMemory in MB) to declare for this machine."""
    cpus = len(os.sched_getaffinity(0))
    memory_mb = psutil.virtual_memory().total // 2**20 - RESERVED_MB
    return cpus, int(memory_mb)


def communication_parameters() -> str:
    """Return slurm.conf's CommunicationParameters binding the daemons to loopback.

    ``NoInAddrAny`` makes slurmd bind to the address of its node name
    (``localhost``).  ``NoCtldInAddrAny`` makes slurmctld bind to the address
    of this machine's host name, which is only right when that name resolves
    to a loopback address (as on most containers and VMs); elsewhere slurmctld
    keeps listening on every interface, the only way it still answers on
    127.0.0.1.
    """
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        address = ""
    return "NoCtldInAddrAny,NoInAddrAny" if address.startswith("127.") else "NoInAddrAny"


class LocalSlurm:
    """A single-node SLURM cluster living in one temporary directory.

    Parameters
    ----------
    root : path-like, optional
        Directory for every file of the cluster; a new temporary one (removed
        by :meth:`stop`) when omitted.
    start_timeout : float
        Seconds to wait for the node to be idle.

    Attributes
    ----------
    env : dict
        ``os.environ`` plus ``SLURM_CONF``: the environment for sbatch & co.
    cpus, memory_mb : int
        Size of the node as declared in slurm.conf.
    """

    def __init__(self, root: str | os.PathLike | None = None, start_timeout: float = 60.0):
        self._owns_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="chunkglm-slurm-"))
        self.start_timeout = start_timeout
        self.cpus, self.memory_mb = node_size()
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket.2"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: dict[str, subprocess.Popen] = {}

    # ---------------------------------------------------------- lifecycle
    def start(self) -> LocalSlurm:
        """Start munged, slurmctld and slurmd; return when the node is idle.

        Raises
        ------
        SlurmUnavailable
            When a daemon exits or the node is not idle in time; the
            message carries the tail of the daemons' logs.
        """
        try:
            self._make_dirs()
            self._start_munged()
            self._write_conf()
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._wait_for(lambda: self._ok(["scontrol", "ping"], "UP"), "slurmctld to answer")
            self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)])
            self._wait_for(self.node_idle, "the node to be idle in sinfo")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel every job, stop the daemons, remove the temporary directory."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self.cancel_all()
        for name in reversed(DAEMONS):
            proc = self._procs.pop(name, None)
            if proc is not None:
                _terminate(proc)
        for proc in self.leftover_processes():
            _terminate(proc)
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------- queries
    @property
    def daemons(self) -> dict[str, int]:
        """Process ids of the running daemons, by name."""
        return {name: proc.pid for name, proc in self._procs.items() if proc.poll() is None}

    def run(self, *args: str, check: bool = True, timeout: float = 30.0) -> str:
        """Run a SLURM client command against this cluster; return its stdout."""
        done = subprocess.run(list(args), capture_output=True, text=True, env=self.env,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"`{' '.join(args)}` failed (exit {done.returncode}): "
                               f"{done.stderr.strip()}\n{self.logs()}")
        return done.stdout

    def node_idle(self) -> bool:
        """Tell whether ``sinfo`` reports the node idle."""
        return self._ok(["sinfo", "-h", "-N", "-o", "%N %t"], "localhost idle")

    def jobs(self) -> list[dict[str, str]]:
        """Return the queue as dicts with ``id``, ``name``, ``state`` and ``user``."""
        out = self.run("squeue", "-h", "-o", "%i|%j|%T|%u")
        keys = ("id", "name", "state", "user")
        return [dict(zip(keys, line.split("|"))) for line in out.splitlines() if line.strip()]

    def cancel_all(self, timeout: float = 30.0) -> None:
        """Cancel every job of the cluster and wait until the queue is empty."""
        ids = [job["id"] for job in self.jobs()]
        if ids:
            self.run("scancel", *ids, check=False)
        deadline = time.monotonic() + timeout
        while self.jobs() and time.monotonic() < deadline:
            time.sleep(0.5)

    def leftover_processes(self) -> list[psutil.Process]:
        """Return live processes started for this cluster's jobs (SLURM_CONF is ours)."""
        mine = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get("SLURM_CONF") == str(self.conf) and (
                        proc.environ().get("SLURM_JOB_ID") or proc.name() == "slurmstepd"):
                    mine.append(proc)
            except (psutil.Error, OSError):
                continue
        return mine

    def logs(self, lines: int = 20) -> str:
        """Return the tail of every daemon's log, for error messages."""
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {log.name} ---\n{_tail(log.read_text(errors='replace'), lines)}")
        return "\n".join(parts)

    # ---------------------------------------------------------- internals
    def _make_dirs(self) -> None:
        self.root.chmod(0o755)  # munged, as the munge user, must reach its directory
        for sub in ("state", "spool", "run", "log"):
            (self.root / sub).mkdir(exist_ok=True)

    def _start_munged(self) -> None:
        munge = pwd.getpwnam("munge")
        folder = self.munge_socket.parent
        folder.mkdir(exist_ok=True)
        folder.chmod(0o755)  # munged requires its socket directory to be searchable by all
        key = folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for path in (folder, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        log = self.root / "log" / "munged.log"
        log.touch()
        os.chown(log, munge.pw_uid, munge.pw_gid)
        self._spawn("munged", [
            "munged", "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--log-file={log}", f"--pid-file={folder / 'munged.pid'}",
            f"--seed-file={folder / 'munged.seed'}",
        ], user=munge.pw_uid, group=munge.pw_gid)
        self._wait_for(self.munge_socket.exists, "munged's socket")

    def _write_conf(self) -> None:
        ctld_port, slurmd_port = free_ports(2)
        text = TEMPLATE.read_text().format(
            root=self.root, ctld_port=ctld_port, slurmd_port=slurmd_port,
            comm_params=communication_parameters(),
            munge_socket=self.munge_socket, cpus=self.cpus, memory_mb=self.memory_mb)
        self.conf.write_text(text)

    def _spawn(self, name: str, command: list[str], **kwargs) -> None:
        if shutil.which("setpriv"):  # the daemon gets SIGTERM if this process dies first
            command = ["setpriv", "--pdeathsig", "TERM", "--", *command]
        out = open(self.root / "log" / f"{name}.out", "wb")
        with out:
            self._procs[name] = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, start_new_session=True, **kwargs)

    def _ok(self, command: list[str], expected: str) -> bool:
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=self.env,
                                  timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0 and expected in done.stdout

    def _wait_for(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self._procs.items() if p.poll() is not None]
            if dead:
                raise SlurmUnavailable(f"{', '.join(dead)} exited while waiting for {what}:\n"
                                       f"{self._outputs()}{self.logs()}")
            if ready():
                return
            time.sleep(0.25)
        raise SlurmUnavailable(f"timed out after {self.start_timeout:.0f} s waiting for {what}:\n"
                               f"{self._outputs()}{self.logs()}")

    def _outputs(self) -> str:
        parts = []
        for out in sorted((self.root / "log").glob("*.out")):
            text = _tail(out.read_text(errors="replace"))
            if text:
                parts.append(f"--- {out.name} ---\n{text}\n")
        return "".join(parts)


class NamespacedSlurm(LocalSlurm):
    """SLURM over several hosts: slurmctld and one ``slurmd`` per node, each in its own
    network namespace (:class:`tests.infra.netns.Hosts`: host 0 is the controller, hosts
    1.. are the nodes ``node1``, ``node2``, ...). Clients (sbatch, squeue, a dask scheduler)
    run in the test's namespace and reach them through the hosts' bridge; munged's socket
    is a file, shared by every namespace. ``SlurmdTimeout`` is short, so a node whose link
    is cut (:meth:`Hosts.cut`) is marked down in seconds.
    """

    def __init__(self, hosts, root=None, start_timeout: float = 60.0, slurmd_timeout: int = 10):
        super().__init__(root, start_timeout)
        self.hosts = hosts
        self.nodes = [f"node{i}" for i in range(1, len(hosts.names))]
        self.slurmd_timeout = slurmd_timeout

    def start(self) -> NamespacedSlurm:
        try:
            self._make_dirs()
            for node in self.nodes:
                (self.root / f"spool-{node}").mkdir(exist_ok=True)
            self._start_munged()
            self._write_conf()
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)], host=0)
            self._wait_for(lambda: self._ok(["scontrol", "ping"], "UP"), "slurmctld to answer")
            for i, node in enumerate(self.nodes, start=1):
                self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)], host=i)
            self._wait_for(self.node_idle, "every node to be idle in sinfo")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        names = [n for n in self._procs if n.startswith("slurmd-")]
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self.cancel_all()
        for name in names + ["slurmctld", "munged"]:
            proc = self._procs.pop(name, None)
            if proc is not None:
                _terminate(proc)
        for proc in self.leftover_processes():
            _terminate(proc)
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def node_idle(self) -> bool:
        return all(self._ok(["sinfo", "-h", "-N", "-n", node, "-o", "%N %t"], f"{node} idle")
                   for node in self.nodes)

    def node_state(self, node: str) -> str:
        return self.run("sinfo", "-h", "-N", "-n", node, "-o", "%t", check=False).strip()

    def _write_conf(self) -> None:
        ctld_port, slurmd_port = free_ports(2)
        text = TEMPLATE.read_text().format(
            root=self.root, ctld_port=ctld_port, slurmd_port=slurmd_port, comm_params="",
            munge_socket=self.munge_socket, cpus=1, memory_mb=self.memory_mb // len(self.nodes))
        ctl = self.hosts.addresses[0]
        nodes = "\n".join(f"NodeName={node} NodeAddr={address} CPUs=1 "
                          f"RealMemory={self.memory_mb // len(self.nodes)} State=UNKNOWN"
                          for node, address in zip(self.nodes, self.hosts.addresses[1:]))
        lines = []
        for line in text.splitlines():
            key = line.split("=", 1)[0]
            if key == "SlurmctldHost":
                line = f"SlurmctldHost=localhost({ctl})"  # slurmctld accepts the name localhost
            elif key == "CommunicationParameters":
                continue  # each daemon has its own namespace: binding to any address stays there
            elif key in ("SlurmdSpoolDir", "SlurmdPidFile", "SlurmdLogFile"):
                stem, suffix = os.path.splitext(line)
                line = f"{stem}-%n{suffix}"
            elif key == "NodeName":
                line = nodes
            elif key == "PartitionName":
                line = f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP"
            lines.append(line)
        lines.append(f"SlurmdTimeout={self.slurmd_timeout}")
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, command: list[str], host: int | None = None, **kwargs) -> None:
        if host is not None:
            command = self.hosts.enter(host) + command
        super()._spawn(name, command, **kwargs)


def _terminate(proc: subprocess.Popen | psutil.Process, timeout: float = 15.0) -> None:
    """SIGTERM one process we started, SIGKILL it if it outlives ``timeout``."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=timeout)
    except (subprocess.TimeoutExpired, psutil.TimeoutExpired):
        proc.kill()
        proc.wait(timeout=timeout)
    except (ProcessLookupError, psutil.NoSuchProcess):
        pass


if __name__ == "__main__":
    seconds = ensure_installed()
    if seconds:
        print(f"installed {' and '.join(PACKAGES)} in {seconds:.0f} s")
    with LocalSlurm() as slurm:
        print(f"export SLURM_CONF={slurm.conf}\n(Ctrl-C stops the cluster)", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
