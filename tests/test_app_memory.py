"""``chunkglm app``'s process caps its glibc heap arenas (:func:`chunkglm.cli.app.limit_heap_arenas`).

glibc gives each new thread that allocates its own heap arena (up to 8 per core); the app's
process runs the client, the scheduler and the nannies in about 20 threads, and the memory each
arena frees stays resident. The check counts the arenas glibc reports (``malloc_info``) after
six threads allocate at once, in a fresh interpreter, with and without the cap.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import chunkglm.cli.app as app

_CODE = """
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
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
path = os.path.join(tempfile.mkdtemp(), "info.xml")
handle = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(handle))
libc.fclose(ctypes.c_void_p(handle))
print(capped, open(path).read().count("<heap nr="))
"""


def _arenas(mode) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-c", _CODE, mode], capture_output=True, text=True, check=True)
    capped, count = done.stdout.split()
    return capped, int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_heap_arenas_are_capped_at_two():
    assert _arenas("cap") == ("True", 2)
    # without the cap glibc makes one per thread (main + 6; its limit is 8 per core)
    assert _arenas("none")[1] > 2


def test_without_glibc_nothing_is_done(monkeypatch):
    def no_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(app.ctypes, "CDLL", no_glibc)
    assert app.limit_heap_arenas() is False
