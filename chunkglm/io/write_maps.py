"""Stack 3-D images into a ``maps/<collection>`` node: (image, voxel) float32.

One task reads the images in order (each is small) and fills rows; memory is
bounded exactly as for runs (:func:`chunkglm.io.write_run.write_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from chunkglm.chunking import DEFAULT_CHUNK_BYTES, DEFAULT_TASK_MEMORY, plan_voxel_chunks
from chunkglm.io import layout as st
from chunkglm.io.nifti import NiftiReader, fortran_indices, header_to_text, scale_values
from chunkglm.io.write_run import existing_result, write_rows


@dataclass(frozen=True)
class MapsJob:
    """A collection of 3-D images on one grid (no credentials stored)."""

    name: str
    images: tuple[str, ...]
    grid_id: str
    variable: str = "effect"
    labels: tuple[str, ...] = ()
    coords: dict = field(default_factory=dict)
    source_keys: tuple[dict, ...] = ()
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    task_memory: int = DEFAULT_TASK_MEMORY


def convert_maps(job: MapsJob, store, storage_options=None, input_storage_options=None, *,
                 replace=False, listed=True) -> dict:
    """Write ``maps/<job.name>``; return a summary with each image's sha256.

    Idempotent and never deleting a complete node, and ``listed`` as
    :func:`chunkglm.io.write_run.convert_run`.
    """
    root = st.open_root(store, storage_options, mode="a")
    st.resume_swap(root, "maps", job.name)
    done = None if replace else existing_result(root, "maps", job, input_storage_options)
    if done is not None:
        return done
    grid = st.read_grid(root, job.grid_id)
    fidx = fortran_indices(grid.ijk, grid.shape)
    hashes, header_bytes = [], []

    def fill(out, start, stop):
        finite = False
        for row, path in enumerate(job.images[start:stop]):
            with NiftiReader(path, input_storage_options) as reader:
                info = reader.info
                (_, raw), = reader.iter_volumes(0, 1)
                out[row] = scale_values(raw[fidx], info.slope, info.inter)
                hashes.append(reader.finish())
                header_bytes.append(info.header_bytes)
            finite = finite or bool(np.isfinite(out[row]).any())
        return finite

    node = st.begin_version(root, "maps", job.name, listed=listed)
    try:
        plan = plan_voxel_chunks(len(job.images), grid.n_voxels, 4, job.chunk_bytes)
        write_rows(node, job.variable, ("image", "voxel"), plan, fill, job.task_memory, f"collection {job.name!r}")
        _write_coords(node, job)
    except BaseException:
        st.discard_version(root, node, listed=listed)
        raise
    sources = [{**key, "sha256": sha, "size": size} for key, (sha, size) in zip(job.source_keys, hashes)]
    attrs = {"grid_id": job.grid_id, "variables": [job.variable]}
    st.finish_node(node, attrs, {"kind": "maps", "sources": sources, "nifti_header": header_to_text(header_bytes[0]),
                                 "inputs": _job_record(job)})
    st.publish_version(root, "maps", job.name, node, listed=listed)
    return {"name": job.name, "n_images": len(job.images), "sources": sources}


def _job_record(job) -> dict:
    """What a repair needs to stack the images again (their paths are in ``sources``)."""
    coords = {name: [str(v) for v in values] for name, values in job.coords.items()}
    return {"variable": job.variable, "labels": list(job.labels), "coords": coords,
            "chunk_bytes": job.chunk_bytes, "task_memory": job.task_memory}


def _write_coords(node, job):
    st.write_array(node, "image", np.array(job.labels, dtype=str), ("image",))
    for name, values in job.coords.items():
        st.write_array(node, name, np.asarray(values), ("image",))
