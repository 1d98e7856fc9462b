"""``chunkglm app``'s process caps its glibc heap arenas and fixes its mmap threshold
(:func:`chunkglm.cli.app.limit_heap_arenas`).

glibc gives each new thread that allocates its own heap arena (up to 8 per core); the app's
process runs the client, the scheduler and the nannies in about 20 threads, and the memory each
arena frees stays resident. The check counts the arenas glibc reports (``malloc_info``) after
six threads allocate at once, in a fresh interpreter, with and without the cap; and the blocks
mapped on their own (``malloc_info``'s mmap total) after a larger mapped block was freed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import chunkglm.cli.app as app

#: The end of both child programs: glibc's malloc_info XML, read back as ``info``.
_MALLOC_INFO = """
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
path = os.path.join(tempfile.mkdtemp(), "info.xml")
handle = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(handle))
libc.fclose(ctypes.c_void_p(handle))
info = open(path).read()
"""

_ARENAS = """
import ctypes, os, sys, tempfile, threading
capped = None
if sys.argv[1] == "cap":
    from chunkglm.cli.app import limit_heap_arenas  # imported before the cap, as in chunkglm app
    capped = limit_heap_arenas(2)
barrier, held = threading.Barrier(6), []
def allocate():
    held.append(bytearray(50_000))  # above pymalloc's sizes, below the mmap threshold: from an arena
    barrier.wait()  # all six threads alive at once: each new one asks glibc for an arena
threads = [threading.Thread(target=allocate) for _ in range(6)]
[t.start() for t in threads]
[t.join() for t in threads]
""" + _MALLOC_INFO + """
print(capped, info.count("<heap nr="))
"""

_MAPPED = """
import ctypes, os, re, sys, tempfile
from chunkglm.cli.app import limit_heap_arenas  # both ways: the same mapped blocks from imports
capped = limit_heap_arenas(2) if sys.argv[1] == "cap" else None
freed = bytearray(8 << 20)  # mapped on its own (above any threshold), then freed:
del freed  # glibc's dynamic threshold rises to 8 MiB unless the threshold was set
held = bytearray(1 << 20)  # 1 MiB: mapped with a fixed 128 KiB threshold, from the arena otherwise
""" + _MALLOC_INFO + """
print(capped, re.search(r'<total type="mmap" count="(\\d+)"', info).group(1))
"""


def _child(code, mode) -> tuple[str, int]:
    """(what limit_heap_arenas returned, the count the program printed) of a fresh interpreter."""
    # glibc's MALLOC_*_ variables (distributed puts MALLOC_TRIM_THRESHOLD_ in the environment of the
    # processes it starts, and a test process may hold it) switch its dynamic mmap threshold off: the
    # child gets the allocator's defaults, whatever ran before in this process
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True, env=env)
    capped, count = done.stdout.split()
    return capped, int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_heap_arenas_are_capped_at_two():
    assert _child(_ARENAS, "cap") == ("True", 2)
    # without the cap glibc makes one per thread (main + 6; its limit is 8 per core)
    assert _child(_ARENAS, "none")[1] > 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_large_blocks_stay_mapped_after_a_larger_one_is_freed():
    # with the fixed threshold the 1 MiB block is a mapping of its own (unmapped when freed)
    capped, mapped = _child(_MAPPED, "cap")
    assert capped == "True" and mapped >= 1
    # glibc's default: the freed 8 MiB block raised the threshold, the 1 MiB block is in the arena
    assert _child(_MAPPED, "none")[1] < mapped


def test_without_glibc_nothing_is_done(monkeypatch):
    def no_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(app.ctypes, "CDLL", no_glibc)
    assert app.limit_heap_arenas() is False


@pytest.mark.parametrize(("n_workers", "threads", "window"), [(2, 1, 2), (1, 3, 3)])
def test_wave_follows_the_worker_threads_of_this_process(n_workers, threads, window):
    # workers as threads of this process (the app with processes: false): one run per worker
    # thread in a window, not two per worker, since the persisted fits are held here
    from distributed import Client, LocalCluster

    from chunkglm.graph.evaluate import _default_window

    with LocalCluster(n_workers=n_workers, threads_per_worker=threads, processes=False,
                      dashboard_address=None) as cluster, Client(cluster):
        assert _default_window() == window
