"""One writer per store node: a lock object beside the nodes, on local disk and S3.

Every write of a node (``runs/<name>``, ``maps/<name>``) holds the node's
lock, ``_locks/<kind>--<name>/zarr.json`` (a zarr group document, so plain
zarr and xarray readers see an ordinary empty group). It is created with the
store's create-if-absent write (an exclusive link on local disk; S3's
conditional ``PUT`` with ``If-None-Match: *`` through obstore) and read back:
the writer whose token it holds owns the node. A second conversion of the same
node is refused with :class:`~chunkglm.errors.NodeBusyError` ("another
conversion is writing runs/X"), never left to interleave its writes.

A lock whose holder is gone does not block anyone for long: on the holder's
host, a lock of a process that no longer exists is stale at once; on another
host, a lock whose heartbeat (rewritten every :data:`HEARTBEAT_SECONDS` by a
thread of the holder) is older than :data:`STALE_SECONDS` is stale. A stale
lock is replaced by the next writer. Limits: with the fsspec backend (no
conditional write) two writers starting within one request's time of each
other can both believe they hold the lock; two writers taking over one stale
lock at the same instant can too. Neither arises with one conversion per node
at a time.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from chunkglm.errors import NodeBusyError
from chunkglm.io.writer_store import inner
from chunkglm.provenance import process_alive

__all__ = ["LOCKS", "HEARTBEAT_SECONDS", "PARTIAL_STALE_SECONDS", "STALE_SECONDS", "acquire", "node_lock",
           "release", "remove_leftovers"]

#: The group holding the locks (never a node kind).
LOCKS = "_locks"
#: A holder rewrites its lock this often.
HEARTBEAT_SECONDS = 30.0
#: A lock of another host whose heartbeat is older than this is stale
#: (environment: ``CHUNKGLM_LOCK_STALE_SECONDS``).
STALE_SECONDS = 300.0

# Locks this process holds: (store, key) -> [token, depth, heartbeat stop event].
_HELD: dict[tuple[str, str], list] = {}
_GUARD = threading.Lock()


def _key(root, kind: str, name: str) -> str:
    return "/".join(p for p in (root.path, LOCKS, f"{kind}--{name}", "zarr.json") if p)


def _store_id(root) -> str:
    return f"{type(inner(root.store)).__name__}:{root.store}"


def _document(token: str, since: float) -> bytes:
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": token,
              "since": since, "heartbeat": time.time()}
    doc = {"zarr_format": 3, "node_type": "group", "attributes": {"chunkglm": {"lock": holder}}}
    return json.dumps(doc).encode()


def _read(store, key) -> dict | None:
    buf = sync(store.get(key, default_buffer_prototype()))
    if buf is None:
        return None
    try:
        return json.loads(buf.to_bytes())["attributes"]["chunkglm"]["lock"]
    except (ValueError, KeyError, TypeError):  # cut off mid-write: no holder can be named
        return {}


#: Attempts of one lock write whose folder a releasing holder removed meanwhile (each is one
#: more mkdir+open: a release removes the folder at most once per holder).
_WRITE_ATTEMPTS = 5


def _write(store, key, data: bytes, exclusive: bool) -> None:
    buf = default_buffer_prototype().buffer.from_bytes(data)
    for attempt in range(_WRITE_ATTEMPTS):
        try:
            return sync(store.set_if_not_exists(key, buf) if exclusive else store.set(key, buf))
        except FileNotFoundError:
            # zarr's LocalStore makes the key's folder, then opens its temporary file in it; a
            # holder releasing the lock between the two removed the emptied folder
            # (_remove_empty_folder): make it again
            if attempt == _WRITE_ATTEMPTS - 1:
                raise


def stale_after() -> float:
    """Seconds without heartbeat after which another host's lock is stale."""
    try:
        return float(os.environ.get("CHUNKGLM_LOCK_STALE_SECONDS", STALE_SECONDS))
    except ValueError:
        return STALE_SECONDS


def is_stale(holder: dict) -> bool:
    """True when the holder of a lock is gone (see the module docs); called for locks that
    this process does not hold."""
    if not holder:
        return True
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        # this process's own lock that it no longer holds (its release was cut off) is stale too
        return pid == os.getpid() or not process_alive(pid)
    return time.time() - float(holder.get("heartbeat", 0)) > stale_after()


def busy_message(path: str, location: str, holder: dict) -> str:
    """The one line a refused writer gets."""
    since = time.strftime("%H:%M:%S", time.localtime(float(holder.get("since", 0))))
    return (f"another conversion is writing {path} in {location} (process {holder.get('pid')} on "
            f"{holder.get('host')}, since {since}). Wait for it to end, then run the same command "
            "again: complete nodes are skipped.")


def acquire(root, kind: str, name: str, location: str = "", wait: float = 0.0) -> None:
    """Take the lock of ``kind/name`` (re-entrant within this process).

    Parameters
    ----------
    wait : float
        Seconds to wait for a live holder to release it before giving up.

    Raises
    ------
    NodeBusyError
        Another live process holds it (still, after ``wait`` seconds).
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            return _acquire(root, kind, name, location)
        except NodeBusyError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def _acquire(root, kind, name, location) -> None:
    key, ident = _key(root, kind, name), (_store_id(root), _key(root, kind, name))
    with _GUARD:
        if ident in _HELD:
            _HELD[ident][1] += 1
            return
    _require_parent(root)
    store, token, since = root.store, uuid.uuid4().hex, time.time()
    for _ in range(3):
        _write(store, key, _document(token, since), exclusive=True)
        holder = _read(store, key)
        if holder is not None and holder.get("token") == token:
            break
        if holder is not None and not is_stale(holder):
            raise NodeBusyError(busy_message(f"{kind}/{name}", location or str(store), holder))
        if holder is not None and _read(store, key) == holder:  # still the stale one: take it over
            sync(store.delete(key))
            _remove_empty_folder(store, key)
    else:
        raise NodeBusyError(busy_message(f"{kind}/{name}", location or str(store), _read(store, key) or {}))
    stop = threading.Event()
    _heartbeat(store, key, token, since, stop)
    with _GUARD:
        _HELD[ident] = [token, 1, stop]


def _require_parent(root) -> None:
    try:
        root.require_group(LOCKS)
    except zarr.errors.ContainsGroupError:  # another writer created it meanwhile
        pass


def _heartbeat(store, key, token, since, stop) -> None:
    def beat():
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                holder = _read(store, key)
                if not holder or holder.get("token") != token:
                    return  # taken over (we were believed gone): nothing of ours to refresh
                _write(store, key, _document(token, since), exclusive=False)
            except Exception:  # a heartbeat missed is retried at the next beat
                continue

    threading.Thread(target=beat, name=f"chunkglm-lock-{key}", daemon=True).start()


def release(root, kind: str, name: str) -> None:
    """Give back a lock taken by :func:`acquire` (the lock object is deleted at depth 0)."""
    key, ident = _key(root, kind, name), (_store_id(root), _key(root, kind, name))
    with _GUARD:
        entry = _HELD.get(ident)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _HELD[ident]
    entry[2].set()
    try:
        holder = _read(root.store, key)
        if holder is not None and holder.get("token") == entry[0]:
            sync(root.store.delete(key))
            _remove_empty_folder(root.store, key)
    except Exception:  # storage unreachable: the lock left behind is stale (no heartbeat, or our pid)
        pass


def _remove_empty_folder(store, key) -> None:
    """Local disk keeps a deleted key's folder: remove it, so no empty non-zarr folder is listed."""
    if isinstance(inner(store), LocalStore):
        try:
            (inner(store).root / key).parent.rmdir()
        except OSError:  # not empty (taken again meanwhile) or already gone
            pass


def holds(root, kind: str, name: str) -> bool:
    """True when this process holds the lock of ``kind/name``."""
    return (_store_id(root), _key(root, kind, name)) in _HELD


@contextmanager
def node_lock(root, kind: str, name: str, location: str = "", wait: float = 0.0):
    """Hold the lock of ``kind/name`` for the ``with`` block (see :func:`acquire`)."""
    acquire(root, kind, name, location, wait)
    try:
        yield
    finally:
        release(root, kind, name)


#: zarr's temporary file of a group document (``zarr.<hex>.partial``, renamed into place
#: microseconds after it is written) older than this is a killed writer's
#: (environment: ``CHUNKGLM_PARTIAL_STALE_SECONDS``).
PARTIAL_STALE_SECONDS = 60.0
#: The groups every writer re-writes (zarr's require_group) and lock folders live in.
_SHARED_GROUPS = ("", "grids", "runs", "maps", LOCKS, "_provenance")


def partial_stale_after() -> float:
    """Seconds after which a group document's temporary file is a killed writer's."""
    try:
        return float(os.environ.get("CHUNKGLM_PARTIAL_STALE_SECONDS", PARTIAL_STALE_SECONDS))
    except ValueError:
        return PARTIAL_STALE_SECONDS


def remove_leftovers(root) -> list[str]:
    """Remove what killed writers leave at the top of a store; return the keys removed.

    - Locks whose holder is gone (:func:`is_stale`): a writer killed after its node was
      complete leaves its lock, and no later writer of that node comes to replace it.
    - On local disk, zarr's temporary files (``*.partial``) of the shared groups' documents
      (the root, ``grids``, ``runs``, ``maps``, ``_locks`` and each lock's folder,
      ``_provenance``) and of each node's and provenance record's own document older than
      :func:`partial_stale_after` (a record folder left empty is removed):
      a writer killed between writing one and renaming it. The arrays inside nodes are not
      walked: an incomplete node is rewritten whole by the next conversion.

    Other processes' live locks and recent temporary files are left alone.
    """
    removed = []
    store, prefix = root.store, "/".join(p for p in (root.path, LOCKS) if p)

    async def lock_names():
        try:
            return [name async for name in store.list_dir(prefix)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    for name in sync(lock_names()):
        key = f"{prefix}/{name}/zarr.json"
        if "--" not in name or (_store_id(root), key) in _HELD:
            continue
        holder = _read(store, key)
        if holder is not None and is_stale(holder) and _read(store, key) == holder:
            sync(store.delete(key))
            _remove_empty_folder(store, key)
            removed.append(key)
    local = inner(store)
    if isinstance(local, LocalStore):
        base = local.root / root.path if root.path else local.root
        folders = [base / group for group in _SHARED_GROUPS]
        folders += [p for p in (base / LOCKS).glob("*--*") if p.is_dir()]
        folders += [p for kind in _SHARED_GROUPS[1:4] for p in (base / kind).glob("*") if p.is_dir()]
        records = [p for p in (base / _SHARED_GROUPS[5]).glob("*") if p.is_dir()]
        cutoff = time.time() - partial_stale_after()
        for folder in folders + records:
            for path in folder.glob("*.partial"):
                try:
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed.append(str(path.relative_to(local.root)))
                except OSError:  # renamed or removed meanwhile
                    continue
        for folder in records:  # a record whose stale document was never renamed into place: empty
            if any(key.startswith(f"{folder.relative_to(local.root)}/") for key in removed):
                try:
                    folder.rmdir()
                except OSError:  # not empty: a record
                    pass
    return removed
