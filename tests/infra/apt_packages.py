"""Install Debian packages that a test's real component needs (apt-get, root only).

Used by the SLURM tests (``slurm/local_slurm.py``) and the headless-browser
check (``browser.py``): when a program is missing, ``install`` runs
``apt-get update`` and ``apt-get install``, or raises the caller's
"unavailable" error with the reason (not root, no apt-get, apt-get's output
tail), so the test can skip with it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile


def tail(text: str | bytes | None, lines: int = 15) -> str:
    """The last ``lines`` lines of a command's output."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").strip().splitlines()[-lines:])


def _apt(args: list[str], timeout: float, error: type[Exception], hint: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "-o", f"DPkg::Lock::Timeout={int(timeout)}", *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise error(f"`{' '.join(command)}` did not finish in {timeout:.0f} s:\n"
                    f"{tail(exc.stdout)}\n{tail(exc.stderr)}{hint}") from None
    if done.returncode != 0:
        raise error(f"`{' '.join(command)}` failed (exit {done.returncode}):\n"
                    f"{tail(done.stdout)}\n{tail(done.stderr)}{hint}")


def install(packages, what: str, error: type[Exception], timeout: float = 900.0, hint: str = "") -> None:
    """``apt-get install`` ``packages`` (after ``update``); ``error(message)`` when it cannot.

    Parameters
    ----------
    packages : sequence of str
    what : str
        What is missing, for the messages (e.g. "SLURM programs missing: slurmd").
    error : Exception class
        Raised with the reason: not root, no apt-get, apt-get failed or timed out.
    timeout : float
        Seconds allowed for each apt-get command (also its dpkg lock wait).
    hint : str
        Appended to the messages (e.g. how to install by hand).
    """
    if os.geteuid() != 0:
        raise error(f"{what}; installing {' and '.join(packages)} needs root (running as uid "
                    f"{os.geteuid()}).{hint}")
    if shutil.which("apt-get") is None:
        raise error(f"{what}; no apt-get to install {' and '.join(packages)} with.{hint}")
    # one installer at a time: pytest-xdist workers may need SLURM and Chromium at once, and
    # `apt-get update` does not wait for another one's lock
    with open(os.path.join(tempfile.gettempdir(), "chunkglm-tests-apt.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _apt(["update", "-q"], timeout, error, hint)
        _apt(["install", "-y", "-q", "--no-install-recommends", *packages], timeout, error, hint)
