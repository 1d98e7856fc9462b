"""``chunkglm verify``: check a cohort store like ``git fsck``, and repair it.

Every node's completion marker, every chunk's presence (against the chunk
inventory the marker records) and every chunk's crc32c (each chunk is read
once). ``repair`` converts damaged runs and map collections again from their
recorded sources when those still have their recorded sha256, into a new
version switched to only once complete; it also finishes or removes
replacements cut off before their switch and removes replaced versions whose
grace time (:func:`chunkglm.io.layout.keep_replaced`) has passed. The root's
consolidated listing is compared with the nodes' documents (a conversion cut
off before its batch merge leaves entries out of date); ``repair`` mends it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from chunkglm.errors import ChunkglmError
from chunkglm.io import consolidated, locks
from chunkglm.io import layout as st
from chunkglm.io.cohort import DAMAGED_METADATA, damaged_metadata_message
from chunkglm.io.integrity import check_object, chunk_keys, node_inventory
from chunkglm.io.preprocess import SpatialPreprocessing
from chunkglm.io.sources import source_key, unchanged
from chunkglm.io.write_maps import MapsJob, convert_maps
from chunkglm.io.write_run import RunJob, convert_run


#: :attr:`Problem.node` of a problem of the root's consolidated listing (not a node's).
LISTING = "zarr.json"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a store.

    Attributes
    ----------
    node : str
        The node's path (``runs/<name>``), or ``""`` for the store itself.
    message : str
        One line: what is wrong and what to do.
    damaged : bool
        True for chunk damage (missing, corrupt) that re-converting fixes.
    """

    node: str
    message: str
    damaged: bool = False


def verify_store(store, storage_options=None) -> tuple[list[Problem], list[str]]:
    """Check every node of a store; return (problems, notes).

    Notes are not problems: nodes written before chunk inventories existed,
    whose missing chunks cannot be told from chunks never written.
    """
    root = st.open_root(store, storage_options, mode="r")
    problems, notes = [], []
    for kind in st.KINDS:
        for name, complete in st.node_status(root, kind).items():
            path = f"{kind}/{name}"
            if not complete:
                problems.append(Problem(path, _incomplete_line(root, path)))
                continue
            meta = st.node_meta(root[path])
            try:
                problems.extend(_check_complete_node(root, path, meta, notes))
            except DAMAGED_METADATA as err:
                problems.append(Problem(path, damaged_metadata_message(path, err), True))
            problems.extend(_unpublished(root, path, meta))
            notes.extend(_superseded_notes(path, meta))
    problems.extend(_leftovers(root))
    problems.extend(_listing_problems(root))
    return problems, notes


def _node_paths(root) -> list[str]:
    """Every node of the store and every node its listing names (listed but never written too)."""
    paths = {f"{kind}/{name}" for kind in st.KINDS for name in st.node_status(root, kind)}
    listed = consolidated.listing(consolidated.read_root(root.store) or {}) or {}
    paths |= {k for k in listed if k.count("/") == 1 and k.split("/")[0] in st.KINDS}
    return sorted(paths) + [st.PROVENANCE]


def _listing_problems(root) -> list[Problem]:
    found = consolidated.stale(root, _node_paths(root))
    if not found:
        return []
    return [Problem(LISTING, f"{LISTING}: the root's consolidated listing is out of date for {len(found)} "
                             f"node(s) (e.g. {', '.join(found[:3])}), left by a writer cut off before it listed "
                             "them; chunkglm reads their markers from the store, readers of the listing alone "
                             "(xarray) see them as listed; `chunkglm verify --repair` or the same `chunkglm "
                             "convert` lists them again")]


def _check_complete_node(root, path, meta, notes) -> list[Problem]:
    data = st.data_path(path, meta)
    arrays = meta.get("arrays")
    if arrays is None:
        notes.append(f"{path}: written without a chunk inventory (chunkglm before crc32c); "
                     "only checksums present in its arrays are checked")
        arrays = _legacy_inventory(root[data])
    return _check_node(root, path, data, arrays)


def _unpublished(root, path, meta) -> list[Problem]:
    return [Problem(path, f"{path}/{version}: a replacement of {path} cut off before its switch "
                          "(never read); `chunkglm verify --repair` or the next conversion of the node "
                          "finishes or removes it")
            for version in st.unpublished(root[path], meta)]


def _superseded_notes(path, meta) -> list[str]:
    kept = sorted(meta.get("superseded", {}))
    if not kept:
        return []
    names = ", ".join(f"{path}/{v}" if v else f"{path} (its first version)" for v in kept)
    return [f"{path}: replaced version(s) kept for readers that opened them: {names}; removed "
            f"{st.keep_replaced():.0f} s after their replacement by the next write of the node or "
            "`chunkglm verify --repair`"]


def _incomplete_line(root, path) -> str:
    source = st.node_meta(root[path]).get("replacing_from")
    if source:
        return (f"{path}: incomplete, its replacement by {source} was cut off; `chunkglm verify "
                "--repair` or the same `chunkglm convert` finishes it")
    return (f"{path}: incomplete (its conversion was cut off); re-run `chunkglm convert` on the same "
            "inputs to complete it")


def _legacy_inventory(group) -> dict:
    """Old nodes: check only the checksums they have; absent chunks may be fill value."""
    return {name: {**entry, "objects": None} for name, entry in node_inventory(group).items()}


def _check_node(root, path, data, arrays) -> list[Problem]:
    group = root[data]
    problems = []
    present = dict(group.arrays())
    for name, entry in sorted(arrays.items()):
        if name not in present:
            problems.append(Problem(path, f"{path}: array {name} listed in its completion marker is missing; "
                                          "`chunkglm verify --repair` converts it again", True))
            continue
        problems.extend(_check_array(root, path, data, name, present[name], entry))
    for name in sorted(set(present) - set(arrays)):
        problems.append(Problem(path, f"{path}: array {name} is not in its completion marker (a leftover of "
                                      "an interrupted write?); `chunkglm verify --repair` rewrites the node", True))
    return problems


def _check_array(root, path, data, name, array, entry) -> list[Problem]:
    """Read every stored object of one array once: present, checksum right."""
    prefix = "/".join(p for p in (root.path, data, name) if p)
    problems = []

    async def scan():
        proto = default_buffer_prototype()
        for key in chunk_keys(array):
            buf = await root.store.get(f"{prefix}/{key}", proto)
            if buf is None and not entry.get("objects"):
                continue  # old node: possibly a chunk equal to the fill value, never written
            try:
                check_object(path, f"{name}/{key}", entry, buf)
            except ChunkglmError as err:
                problems.append(Problem(path, str(err), True))

    sync(scan())
    return problems


def _leftovers(root) -> list[Problem]:
    if st.REPLACING not in root:
        return []
    found = []
    for kind in root[st.REPLACING].group_keys():
        for name in root[f"{st.REPLACING}/{kind}"].group_keys():
            found.append(Problem(f"{kind}/{name}", f"{st.REPLACING}/{kind}/{name}: a staged replacement of "
                                 f"{kind}/{name} left by an interrupted conversion; `chunkglm verify --repair` "
                                 "or the same `chunkglm convert` finishes or removes it"))
    return found


# -- repair -------------------------------------------------------------------------------------


def repair_store(store, problems, storage_options=None, input_storage_options=None) -> tuple[list, dict]:
    """Convert the damaged nodes again from unchanged sources.

    Returns
    -------
    repaired : list of str
        Node paths written again (or whose interrupted replacement was finished), and
        :data:`LISTING` when the root's consolidated listing was mended.
    unrepairable : dict
        Node path -> why it cannot be repaired here (and what to do).
    """
    root = st.open_root(store, storage_options, mode="a")
    repaired, unrepairable = [], {}
    for path in sorted({p.node for p in problems if p.node and p.node != LISTING}):
        kind, _, name = path.partition("/")
        if kind != "grids" and _finish_leftovers(root, kind, name):
            repaired.append(path)
            if not any(p.damaged for p in problems if p.node == path):
                continue
        reason = _repair_node(root, store, kind, name, storage_options, input_storage_options)
        if reason is None:
            repaired.append(path)
        else:
            unrepairable[path] = reason
    if any(p.node == LISTING for p in problems):  # after the nodes: their repairs are listed already
        consolidated.mend(root, _node_paths(root))
        repaired.append(LISTING)
    return sorted(set(repaired) - set(unrepairable)), unrepairable


def _finish_leftovers(root, kind, name) -> bool:
    """Switch to a replacement written completely, or remove one cut off; True when there was one."""
    with locks.node_lock(root, kind, name, st.redact_url(str(root.store))):
        if st.resume_swap(root, kind, name) or _drop_stale_staging(root, kind, name):
            return True
        path = f"{kind}/{name}"
        if path in root and st.is_complete(root[path]):
            return bool(st.drop_unpublished(root[path], st.node_meta(root[path])))
    return False


def remove_replaced(store, storage_options=None) -> list[str]:
    """Remove every node's replaced versions whose grace time has passed; return their paths."""
    root = st.open_root(store, storage_options, mode="a")
    removed = []
    for kind in ("runs", "maps"):
        for name, complete in st.node_status(root, kind).items():
            path = f"{kind}/{name}"
            if complete and st.node_meta(root[path]).get("superseded"):
                with locks.node_lock(root, kind, name, st.redact_url(str(root.store))):
                    removed += [f"{path}/{v}" if v else f"{path} (its first version)"
                                for v in st.remove_superseded(root, path)]
    return removed


def _drop_stale_staging(root, kind, name) -> bool:
    staging = f"{st.REPLACING}/{kind}/{name}"
    if staging in root and not st.is_complete(root[staging]):
        del root[staging]
        return True
    return False


def _repair_node(root, store, kind, name, storage_options, input_storage_options) -> str | None:
    """Re-convert one node; None on success, else why it cannot be repaired."""
    path = f"{kind}/{name}"
    if kind == "grids":
        return "grids are written from the inputs' masks: convert the inputs again into a new store"
    if path not in root or not st.is_complete(root[path]):
        return "incomplete: re-run `chunkglm convert` on the same inputs to complete it"
    group = root[path]
    meta, attrs = st.node_meta(group), group.attrs.asdict()
    if "inputs" not in meta:
        return ("it was written without the record a repair needs (an older chunkglm, or `chunkglm "
                "meta`/second-level staging): convert its inputs again with --overwrite")
    job, why = (_run_job if kind == "runs" else _maps_job)(name, meta, attrs, input_storage_options)
    if why:
        return f"{why}; convert the current inputs again with --overwrite"
    (convert_run if kind == "runs" else convert_maps)(job, store, storage_options, input_storage_options,
                                                      replace=True)
    return None


def _run_job(name, meta, attrs, storage_options):
    inputs, source = meta["inputs"], meta.get("source", {})
    for record in [source, *inputs.get("tables", {}).values()]:
        why = unchanged(record, storage_options)
        if why:
            return None, why
    prep = meta.get("preprocessing") or {}
    affine = prep.get("target_affine")
    preprocessing = SpatialPreprocessing(None if affine is None else np.asarray(affine), _tuple(prep.get("target_shape")),
                                         prep.get("smoothing_fwhm"))
    tables = inputs.get("tables", {})
    job = RunJob(name=name, bold=source["path"], grid_id=attrs["grid_id"], entities=attrs.get("entities", {}),
                 metadata=attrs.get("sidecar", {}), confounds=tables.get("confounds", {}).get("path"),
                 events=tables.get("events", {}).get("path"), source_key=source_key(source["path"], storage_options),
                 chunk_bytes=inputs["chunk_bytes"], task_memory=inputs["task_memory"], preprocessing=preprocessing)
    return job, None


def _maps_job(name, meta, attrs, storage_options):
    inputs, sources = meta["inputs"], meta.get("sources", [])
    for record in sources:
        why = unchanged(record, storage_options)
        if why:
            return None, why
    paths = tuple(s["path"] for s in sources)
    coords = {k: np.array(v, dtype=str) for k, v in inputs.get("coords", {}).items()}
    job = MapsJob(name=name, images=paths, grid_id=attrs["grid_id"], variable=inputs["variable"],
                  labels=tuple(inputs["labels"]), coords=coords,
                  source_keys=tuple(source_key(p, storage_options) for p in paths),
                  chunk_bytes=inputs["chunk_bytes"], task_memory=inputs["task_memory"])
    return job, None


def _tuple(value):
    return None if value is None else tuple(int(v) for v in value)
