"""Surface maps into a ``maps/<collection>`` node: SurfaceImages, GIFTI pairs, CIFTI dense scalars.

The map counterpart of :func:`chunkglm.io.surface_convert.convert_surface_runs`:
each map becomes one row of an ``(image, voxel)`` float32 variable over the
grid's stored elements (the layout of volume map collections, so group models
read them alike), with an ``image`` id per row and optional per-image
coordinates (``subject``, ``contrast``, ``study_id``, ``sample_sizes``).
Inputs, one map or several each:

- a nilearn SurfaceImage: 1-D (one map) or 2-D (one map per column);
- a GIFTI pair ``{"left": ..., "right": ...}`` of shape files (one map per data array), with ``mesh``;
- a CIFTI-2 dense scalar file (``*.dscalar.nii``, or a nibabel ``Cifti2Image`` in memory): one map per
  row, its map names as ids.

Back: ``node.to_surface_image()`` (vertices x images), ``node.to_cifti()``
(a dense scalar file named by the image ids).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chunkglm.chunking import DEFAULT_CHUNK_BYTES, DEFAULT_TASK_MEMORY, as_bytes, plan_voxel_chunks
from chunkglm.errors import InputError
from chunkglm.io import consolidated, locks
from chunkglm.io import layout as st
from chunkglm.io.surface import write_element_coordinates, write_grid
from chunkglm.io.surface_convert import any_finite, check_same_grid, from_cifti, from_gifti, from_surface_image
from chunkglm.io.write_run import write_rows

__all__ = ["CIFTI_MAP_SUFFIXES", "convert_surface_maps", "is_cifti_image", "is_cifti_map"]

#: Suffixes of the CIFTI-2 files read as maps.
CIFTI_MAP_SUFFIXES = (".dscalar.nii",)
#: Per-image coordinates stored with the maps (as volume map collections').
COORDINATES = ("subject", "contrast", "study_id", "sample_sizes")


def _read_maps(item, mesh, space):
    from nilearn.surface import SurfaceImage

    if isinstance(item, SurfaceImage):
        return from_surface_image(item, space, maps=True)
    if isinstance(item, dict):
        return from_gifti(item, mesh, space)
    if isinstance(item, str | Path) and str(item).endswith(CIFTI_MAP_SUFFIXES):
        return from_cifti(Path(item), space, maps=True)
    if is_cifti_image(item):
        return from_cifti(item, space, maps=True)
    raise InputError(f"surface maps are nilearn SurfaceImages, GIFTI pairs {{'left': path, 'right': path}} or "
                     f"CIFTI-2 dense scalars (.dscalar.nii paths or nibabel Cifti2Images); received "
                     f"{type(item).__name__} {str(item)[:80]!r}.")


def is_cifti_image(item) -> bool:
    """True for an in-memory ``nibabel.cifti2.Cifti2Image``."""
    from nibabel.cifti2 import Cifti2Image

    return isinstance(item, Cifti2Image)


def is_cifti_map(item) -> bool:
    """True for CIFTI-2 dense scalar maps: a ``.dscalar.nii`` path or a nibabel Cifti2Image."""
    return is_cifti_image(item) or (isinstance(item, str | Path) and str(item).endswith(CIFTI_MAP_SUFFIXES))


def convert_surface_maps(items, store, collection, *, map_type="effect", ids=None, coords=None, mesh=None,
                         space="", mask=None, chunk_bytes=DEFAULT_CHUNK_BYTES, task_memory=DEFAULT_TASK_MEMORY,
                         storage_options=None) -> str:
    """Write surface maps as ``maps/<collection>`` (variable ``map_type``); return the collection name.

    Parameters
    ----------
    items : SurfaceImage, GIFTI pair, CIFTI dscalar path, or a list of them
        All on one grid; their maps are stacked in order.
    store : str or Path
        The cohort store.
    collection : str
        The node's name. A complete node of that name is replaced by a new
        version, switched in at its completion (readers see one or the other).
    map_type : str
        The variable name (``effect``, ``variance``, ``z``, ``t``...).
    ids : list of str, optional
        One per map; default a CIFTI file's map names, else ``image-00000``...
    coords : dict of str to sequence, optional
        Per-image coordinates among ``subject``, ``contrast``, ``study_id``, ``sample_sizes``.
    mesh, space, mask, chunk_bytes, task_memory, storage_options
        As :func:`chunkglm.io.surface_convert.convert_surface_runs`'s.
    """
    items = list(items) if isinstance(items, list | tuple) else [items]
    if not items:
        raise InputError("no surface maps given: pass at least one SurfaceImage, GIFTI pair or CIFTI dscalar.")
    read = [_read_maps(item, mesh, space) for item in items]
    for index, maps in enumerate(read[1:], 1):
        check_same_grid(read[0].grid, maps.grid, index)
    grid = read[0].grid if mask is None else read[0].grid.with_mask(mask)
    ids = _ids(ids, read)
    coords = _coords(coords, len(ids))
    root = st.open_root(store, storage_options, mode="a")
    locks.remove_leftovers(root)
    grid_id = write_grid(root, grid)
    _write(root, st.check_node_name(collection), grid, grid_id, read, ids, coords, map_type,
           [m.source for m in read], (as_bytes(chunk_bytes), as_bytes(task_memory)))
    consolidated.mend(root, [f"grids/{grid_id}", f"maps/{collection}"])
    return collection


def _ids(ids, read) -> list[str]:
    count = sum(m.n_time for m in read)
    if ids is None:
        names = [n for m in read for n in m.cifti.get("names", [])]
        ids = names if len(names) == count and len(set(names)) == count else [f"image-{i:05d}" for i in range(count)]
    ids = [str(i) for i in ids]
    if len(ids) != count or len(set(ids)) != count:
        raise InputError(f"ids must name each of the {count} maps once; received {len(ids)} ids "
                         f"({len(set(ids))} distinct).")
    return ids


def _coords(coords, count) -> dict:
    coords = dict(coords or {})
    unknown = sorted(set(coords) - set(COORDINATES))
    if unknown:
        raise InputError(f"coords takes {list(COORDINATES)}; received {unknown}.")
    wrong = {name: len(v) for name, v in coords.items() if len(v) != count}
    if wrong:
        raise InputError(f"each coordinate needs one value per map ({count}); received lengths {wrong}.")
    return coords


def _write(root, name, grid, grid_id, read, ids, coords, map_type, sources, sizes):
    """The maps' rows written in order, each input read when its rows are reached (CIFTI files by
    their lazy proxies: the maps are never all held, unless they fit the task memory)."""
    chunk_bytes, task_memory = sizes
    plan = plan_voxel_chunks(len(ids), grid.n_voxels, 4, chunk_bytes)
    offsets = np.cumsum([0] + [m.n_time for m in read])

    def fill(out, start, stop):
        for maps, first, last in zip(read, offsets[:-1], offsets[1:]):
            lo, hi = max(start, first), min(stop, last)
            if lo < hi:
                out[lo - start:hi - start] = maps.rows(lo - first, hi - first, grid.flat_index)
        return any_finite(out)

    st.resume_swap(root, "maps", name)
    node = st.begin_version(root, "maps", name)
    try:
        write_rows(node, map_type, ("image", "voxel"), plan, fill, task_memory, f"surface maps {name}")
        write_element_coordinates(node, grid)
        node[map_type].attrs["coordinates"] = "hemi"
        st.write_array(node, "image", np.array(ids, dtype=object), ("image",))
        for coord, data in coords.items():
            data = np.asarray(data, dtype=np.float64) if coord == "sample_sizes" else np.array(
                [str(v) for v in data], dtype=object)
            st.write_array(node, coord, data, ("image",))
    except BaseException:
        st.discard_version(root, node)
        raise
    st.finish_node(node, {"grid_id": grid_id, "variables": [map_type], "grid_kind": grid.kind},
                   {"kind": "maps", "sources": sources})
    st.publish_version(root, "maps", name, node)
