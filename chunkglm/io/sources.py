"""Input files as a store records them: cheap keys (path, size, mtime) and sha256.

A conversion task skips a node that is complete and was converted from the
same files; ``chunkglm verify --repair`` re-converts a damaged node only from
files whose sha256 is still the recorded one.
"""

from __future__ import annotations

import hashlib
import os

from chunkglm.io import layout as st
from chunkglm.io.preprocess import SpatialPreprocessing

import fsspec



def source_key(path: str, storage_options=None) -> dict:
    """Identify an input file cheaply (path, size, mtime) to decide skips."""
    if not st.is_url(path):
        stat = os.stat(path)
        return {"path": os.path.abspath(path), "size": stat.st_size, "mtime": int(stat.st_mtime)}
    fs, fpath = fsspec.core.url_to_fs(path, **(storage_options or {}))
    info = fs.info(fpath)
    return {"path": st.redact_url(path), "size": int(info.get("size", -1)),
            "mtime": str(info.get("LastModified", info.get("mtime", "")))}


def file_sha256(path: str, storage_options=None) -> str:
    """sha256 of a local file or fsspec URL, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with fsspec.open(path, "rb", **(storage_options or {})) as handle:
        while block := handle.read(8 * 2**20):
            digest.update(block)
    return digest.hexdigest()


def same_file(old: dict, new: dict, path: str, storage_options) -> bool:
    """Same path and size, and same mtime or (a copied/touched file) same sha256."""
    if old.get("path") != new["path"] or old.get("size") != new["size"]:
        return False
    return old.get("mtime") == new.get("mtime") or old.get("sha256") == file_sha256(path, storage_options)


def same_source(meta: dict, job, storage_options) -> bool:
    """Was the node whose marker is ``meta`` converted from ``job``'s files (and,
    for runs, with the same resampling/smoothing)?"""
    if hasattr(job, "bold"):
        prep = meta.get("preprocessing", SpatialPreprocessing().to_attrs())
        return prep == job.preprocessing.to_attrs() and same_file(
            meta.get("source", {}), job.source_key, job.bold, storage_options)
    old = meta.get("sources", [])
    return len(old) == len(job.source_keys) and all(
        same_file(o, new, path, storage_options) for o, new, path in zip(old, job.source_keys, job.images))


def unchanged(record: dict, storage_options=None) -> str | None:
    """None when the file at ``record["path"]`` still has ``record["sha256"]``, else why not."""
    path = record.get("path")
    if not path or not record.get("sha256"):
        return f"no sha256 recorded for {path or 'its source'}"
    try:
        digest = file_sha256(path, storage_options)
    except (FileNotFoundError, OSError) as err:
        return f"source {path} cannot be read ({type(err).__name__})"
    if digest != record["sha256"]:
        return f"source {path} changed (sha256 {digest[:12]}..., recorded {record['sha256'][:12]}...)"
    return None
