"""Surface runs into the store and back: nilearn ``SurfaceImage``, GIFTI pairs, CIFTI-2.

Into the store, :func:`convert_surface_runs` takes, per run, one of

- a nilearn 0.14 :class:`~nilearn.surface.SurfaceImage` (2-D: vertices x time),
- a GIFTI pair ``{"left": "..._hemi-L_..._bold.func.gii", "right": "..._hemi-R_...func.gii"}``
  (one hemisphere alone is a run of that hemisphere), with the mesh given
  (a nilearn ``PolyMesh``, or the name of a mesh nilearn ships, ``"fsaverage5"``),
- a CIFTI-2 dense series (``*.dtseries.nii``): grayordinates x time,

and writes a ``runs/<name>`` node: ``bold (time, voxel)`` float32 over the
grid's stored elements, voxel blocks from the one planner
(:func:`chunkglm.chunking.plan_voxel_chunks`; time never split), the element
coordinates (``voxel``, ``hemi``) and the grid node (mesh geometry or CIFTI
brain models, once per grid: :mod:`chunkglm.io.surface`).

Back, :func:`to_surface_image`, :func:`to_gifti` and :func:`to_cifti` rebuild
the inputs: the stored float32 values exactly (float32 inputs come back bit
for bit; others as their float32 values, as NIfTI runs do), elements outside
the grid's mask 0, the mesh / brain-model axis / series timing as given.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nilearn.surface import SurfaceImage

from chunkglm.chunking import DEFAULT_CHUNK_BYTES, DEFAULT_TASK_MEMORY, as_bytes, plan_voxel_chunks
from chunkglm.errors import ConversionError, InputError
from chunkglm.io import consolidated, locks
from chunkglm.io import layout as st
from chunkglm.io.preprocess import SpatialPreprocessing
from chunkglm.io.shipped_mesh import pial_mesh
from chunkglm.io.surface import (MESH_PARTS, BrainModels, SurfaceGrid, cifti_header, cifti_image, gifti_image,
                                  write_element_coordinates, write_grid)
from chunkglm.io.write_run import write_events, write_rows
from chunkglm.provenance import Stopwatch, cluster_summary, record

__all__ = ["SurfaceRun", "cifti_shape", "convert_surface_bids", "convert_surface_runs", "is_surface_input",
           "read_cifti", "read_surface_run", "to_cifti", "to_gifti", "to_surface_image"]

#: Bytes of a CIFTI run read at a time when its rows are read from the file (:func:`_read_transposed`).
READ_BLOCK_BYTES = 8 << 20
#: Suffixes of the CIFTI-2 files read as runs.
CIFTI_RUN_SUFFIXES = (".dtseries.nii",)


class SurfaceRun:
    """One surface run read for conversion: its grid, its (element, time) values and timing.

    Attributes
    ----------
    grid : chunkglm.io.surface.SurfaceGrid
        Every element stored (the caller may restrict the mask).
    values : array-like, shape (n_elements, n_time)
        In memory or lazy (a CIFTI file's proxy is read by time slabs).
    t_r : float or None
        Repetition time (s), when the source states it.
    source : dict
        What identifies the input (paths with sha256, or the sha256 of in-memory values).
    cifti : dict
        CIFTI series axis (start, step, unit) to write the run back.
    """

    def __init__(self, grid, values, t_r=None, source=None, cifti=None, by_time=False):
        self.grid, self.values, self.t_r = grid, values, t_r
        self.source, self.cifti, self.by_time = source or {}, cifti or {}, by_time

    @property
    def n_time(self) -> int:
        """Volumes of the run."""
        return int(self.values.shape[0 if self.by_time else 1])

    def rows(self, start: int, stop: int, elements: np.ndarray) -> np.ndarray:
        """Time points [start, stop) of the stored ``elements``, (time, element) float32 (a view of
        float32 values held (time, element) when every element is stored: no copy)."""
        if self.by_time:  # GIFTI and CIFTI: (time, element), a CIFTI file read one slab at a time
            rows = np.asarray(self.values[start:stop], dtype=np.float32)
            return rows if elements.size == rows.shape[1] else rows[:, elements]  # sorted, unique: all
        return np.asarray(self.values[elements, start:stop], dtype=np.float32).T

    def fill(self, out: np.ndarray, start: int, stop: int, elements: np.ndarray) -> None:
        """``out[:] = self.rows(start, stop, elements)``; every row and element of a CIFTI file
        read from the file element block by element block (:func:`_read_transposed`)."""
        whole = self.by_time and start == 0 and stop == self.n_time and elements.size == self.values.shape[1]
        if not (whole and _read_transposed(self.values, out)):
            out[:] = self.rows(start, stop, elements)


def _read_transposed(proxy, out: np.ndarray) -> bool:
    """Fill ``out`` (time, element) float32 with the values of an uncompressed NIfTI-2 proxy of
    that shape holding unscaled native float32 in Fortran order (each element's series
    contiguous in the file, as CIFTI-2 files are), 8 MiB of elements at a time; False, ``out``
    left to the caller, for any other proxy or a short read. Copying nibabel's memory map into
    ``out`` instead walks the whole file once per row (page faults, strided reads): ~3x the CPU
    on a 91k x 300 run."""
    from nibabel.arrayproxy import ArrayProxy

    native = np.dtype(np.float32).newbyteorder("=")
    if not (isinstance(proxy, ArrayProxy) and proxy.order == "F" and tuple(proxy.shape) == out.shape
            and np.dtype(proxy.dtype) == native and proxy.slope == 1.0 and proxy.inter == 0.0
            and isinstance(proxy.file_like, str | Path) and str(proxy.file_like).endswith(".nii")
            and out.dtype == native and out.shape[0] > 0):
        return False
    n_time, n_elements = out.shape
    step = max(1, READ_BLOCK_BYTES // (4 * n_time))
    buffer = np.empty((min(step, n_elements), n_time), dtype=np.float32)
    with open(proxy.file_like, "rb") as handle:
        handle.seek(proxy.offset)
        for first in range(0, n_elements, step):
            block = buffer[:min(step, n_elements - first)]
            if handle.readinto(memoryview(block).cast("B")) != block.nbytes:
                return False  # truncated: nibabel's proxy says so
            out[:, first:first + len(block)] = block.T
    return True


def is_surface_input(item) -> bool:
    """True for a SurfaceImage, a GIFTI pair (dict of hemispheres) or a CIFTI dense series path."""
    if isinstance(item, SurfaceImage) or isinstance(item, dict):
        return True
    return isinstance(item, str | Path) and str(item).endswith(CIFTI_RUN_SUFFIXES)


# -- reading inputs ------------------------------------------------------------------------------


def read_surface_run(item, mesh=None, space="") -> SurfaceRun:
    """A SurfaceImage, GIFTI pair or CIFTI dense series as a :class:`SurfaceRun` (nothing written)."""
    if isinstance(item, SurfaceImage):
        return from_surface_image(item, space)
    if isinstance(item, dict):
        return from_gifti(item, mesh, space)
    if isinstance(item, str | Path) and str(item).endswith(CIFTI_RUN_SUFFIXES):
        return from_cifti(Path(item), space)
    raise InputError(f"a surface run is a nilearn SurfaceImage, a GIFTI pair {{'left': path, 'right': path}} "
                     f"or a CIFTI-2 .dtseries.nii path; received {type(item).__name__}.")


def mesh_grid(mesh, parts, space="") -> SurfaceGrid:
    """A mesh grid of every vertex of ``parts`` (in nilearn's order) of a nilearn ``PolyMesh``."""
    meshes = {}
    for part in parts:
        if part not in mesh.parts:
            raise InputError(f"the data have a {part!r} part but the mesh has only {sorted(mesh.parts)}.")
        meshes[part] = (np.asarray(mesh.parts[part].coordinates), np.asarray(mesh.parts[part].faces))
    sizes = tuple((part, int(meshes[part][0].shape[0])) for part in parts)
    return SurfaceGrid("mesh", sizes, np.ones(sum(n for _, n in sizes), dtype=bool), space, meshes)


def from_surface_image(img, space, maps=False) -> SurfaceRun:
    """A SurfaceImage's values (n_vertices, k) and mesh grid; ``maps``: a 1-D image is one map
    (the image itself is left as it is)."""
    parts = [part for part in MESH_PARTS if part in img.data.parts]
    if len(img.shape) != 2 and not (maps and len(img.shape) == 1):
        what = "surface maps are 1-D or 2-D SurfaceImages" if maps else (
            "a surface run is a 2-D SurfaceImage (vertices x time points)")
        raise InputError(f"{what}; received shape {img.shape}."
                         + ("" if maps else " Give 3-D maps to second-level models, not as runs."))
    grid = mesh_grid(img.mesh, parts, space)
    values = np.concatenate([np.asarray(img.data.parts[part]).reshape(len(img.data.parts[part]), -1)
                             for part in parts], axis=0)
    digest = hashlib.sha256(values.dtype.str.encode() + np.ascontiguousarray(values).tobytes()).hexdigest()
    return SurfaceRun(grid, values, source={"path": "<SurfaceImage in memory>", "sha256": digest,
                                            "size": int(values.nbytes), "dtype": str(values.dtype)})


def _load_mesh(mesh):
    if isinstance(mesh, str):
        try:  # load_fsaverage(mesh)["pial"], its two files read once per process
            return pial_mesh(mesh), mesh
        except Exception as err:  # nilearn names the meshes it has
            raise InputError(f"mesh {mesh!r}: {err}") from err
    if mesh is None or not hasattr(mesh, "parts"):
        raise InputError("GIFTI runs carry no geometry: give mesh= a nilearn PolyMesh or the name of a "
                         f"mesh nilearn ships (e.g. 'fsaverage5'); received {type(mesh).__name__}.")
    return mesh, ""


def from_gifti(pair, mesh, space) -> SurfaceRun:
    unknown = sorted(set(pair) - set(MESH_PARTS))
    if unknown or not pair:
        raise InputError(f"a GIFTI pair is a dict with keys among {MESH_PARTS}; received keys {sorted(pair)}.")
    poly, named = _load_mesh(mesh)
    parts = [part for part in MESH_PARTS if part in pair]
    images = {part: nib.load(str(pair[part])) for part in parts}
    steps = {d.meta.get("TimeStep") for img in images.values() for d in img.darrays if d.meta.get("TimeStep")}
    grid = mesh_grid(poly, parts, space or named)
    t_r = _sidecar_tr(pair[parts[0]]) or (float(steps.pop()) / 1000.0 if len(steps) == 1 else None)
    return SurfaceRun(grid, _gifti_rows(images, grid, pair), t_r,
                      {"files": [_file_source(pair[part]) for part in parts]}, by_time=True)


def _gifti_rows(images, grid, pair) -> np.ndarray:
    """The parts' data arrays written once into one (time, vertex) array, in the grid's part order
    (fMRIPrep writes one data array per volume; one (vertex, time) array is read as well)."""
    blocks = {part: [np.asarray(d.data).reshape(len(d.data), -1) for d in img.darrays]
              for part, img in images.items()}
    volumes = {part: sum(b.shape[1] for b in arrays) for part, arrays in blocks.items()}
    if len(set(volumes.values())) > 1:
        raise InputError(f"the hemispheres of {list(map(str, pair.values()))} have different numbers of "
                         f"volumes {list(volumes.values())}: give the two files of one run.")
    sizes = dict(grid.parts)
    wrong = {part: arrays[0].shape[0] for part, arrays in blocks.items()
             if any(b.shape[0] != sizes[part] for b in arrays)}
    if wrong:
        raise InputError(f"the GIFTI data have {wrong} vertices; the mesh has {sizes}: give the mesh of "
                         "the files' space (e.g. mesh='fsaverage5' for *_space-fsaverage5_* files).")
    dtype = np.result_type(*[b.dtype for arrays in blocks.values() for b in arrays])
    values = np.empty((next(iter(volumes.values())), grid.shape[0]), dtype=dtype)
    slices = grid.part_slices()
    for part, arrays in blocks.items():
        time = 0
        for block in arrays:
            values[time:time + block.shape[1], slices[part]] = block.T
            time += block.shape[1]
    return values


def _sidecar_tr(path) -> float | None:
    """RepetitionTime of the BIDS sidecar beside a GIFTI file (``..._bold.json``), if any."""
    stem = str(path).removesuffix(".gii").removesuffix(".func")
    sidecar = Path(stem + ".json")
    if not sidecar.is_file():
        return None
    value = json.loads(sidecar.read_text()).get("RepetitionTime")
    return float(value) if value else None


def any_finite(rows: np.ndarray) -> bool:
    """Whether any value of ``rows`` is finite, row by row: a run's first row usually answers
    (one pass over a whole run, and its boolean copy, only when every value is NaN or inf)."""
    return any(bool(np.isfinite(row).any()) for row in rows)


def cifti_shape(path) -> tuple:
    """A CIFTI-2 file's data shape (rows, grayordinates) from its NIfTI-2 header alone."""
    return tuple(_nifti2(path).shape[4:])


def read_cifti(path) -> tuple[list, object]:
    """A CIFTI-2 file's axes (nibabel's) and its values as a lazy (rows, grayordinates) proxy,
    without making a ``Cifti2Image``: nibabel's constructor deep-copies the parsed header and
    rebuilds every axis to check the data's shape, about half the time of ``nib.load`` on a 91k
    axis. The NIfTI-2 image is read and its CIFTI-2 extension parsed, as ``nib.load`` does (the
    brain-model element by :meth:`BrainModels.from_xml`)."""
    axes, dataobj = _read_cifti(path)
    return [axis.axis if isinstance(axis, BrainModels) else axis for axis in axes], dataobj


def _read_cifti(path) -> tuple[list, object]:
    """:func:`read_cifti`'s axes, a brain-model axis as :class:`BrainModels` (nibabel's axis not built)."""
    from nibabel.arrayproxy import reshape_dataobj
    from nibabel.cifti2 import Cifti2Extension

    nifti = _nifti2(path)
    extension = next((e for e in nifti.header.extensions if isinstance(e, Cifti2Extension)), None)
    if extension is None:
        raise InputError(f"{path} has no CIFTI-2 extension in its NIfTI-2 header: it is not a CIFTI-2 file.")
    dataobj = reshape_dataobj(nifti.dataobj, nifti.shape[4:])
    return _axes(extension.content, len(dataobj.shape)), dataobj


#: Brain models parsed in this process, by the sha256 of their XML element: the maps of a group
#: (one file each) repeat one axis; a few are kept (one object per axis: the runs of a conversion
#: on it share one grid without comparing arrays).
_BRAIN_MODELS: dict = {}
_BRAIN_MODELS_KEPT = 4
_BRAIN_MODELS_TYPE = b'IndicesMapToDataType="CIFTI_INDEX_TYPE_BRAIN_MODELS"'


def _axes(xml: bytes, n_dims: int) -> list:
    """The axes of a CIFTI-2 extension's XML, its one brain-model element as :class:`BrainModels`
    (read by :meth:`BrainModels.from_xml`, or taken from :data:`_BRAIN_MODELS` when byte-identical
    to one read before), the rest of the document parsed by nibabel with that element emptied.
    Otherwise (no such element, or one ``from_xml`` does not read) nibabel parses the whole
    document, with its errors."""
    from xml.etree.ElementTree import ParseError

    from nibabel.cifti2 import BrainModelAxis, Cifti2Extension

    def parsed_by_nibabel():
        header = Cifti2Extension.from_bytes(xml).get_content()
        axes = [header.get_axis(i) for i in range(n_dims)]
        return [BrainModels.from_axis(a) if isinstance(a, BrainModelAxis) else a for a in axes]

    span = _brain_model_span(xml)
    if span is None:  # none, several, or one map over several dimensions (dense connectivity)
        return parsed_by_nibabel()
    start, open_end, end, dim = span
    key = hashlib.sha256(xml[start:end]).digest()
    if key not in _BRAIN_MODELS:
        try:
            models = BrainModels.from_xml(xml[start:end])
        except (ValueError, KeyError, ParseError):  # nibabel reads it, or says why not
            return parsed_by_nibabel()
        if len(_BRAIN_MODELS) >= _BRAIN_MODELS_KEPT:
            _BRAIN_MODELS.pop(next(iter(_BRAIN_MODELS)))
        _BRAIN_MODELS[key] = models
    rest = xml[:open_end] + b"</MatrixIndicesMap>" + xml[end:]
    header = Cifti2Extension.from_bytes(rest).get_content()
    return [header.get_axis(i) if i != dim else _BRAIN_MODELS[key] for i in range(n_dims)]


def _brain_model_span(xml: bytes):
    """(start, end of the opening tag, end, dimension) of the one brain-model MatrixIndicesMap of a
    CIFTI-2 document that applies to one dimension, or None."""
    at = xml.find(_BRAIN_MODELS_TYPE)
    if at < 0 or xml.find(_BRAIN_MODELS_TYPE, at + 1) >= 0:
        return None
    start, open_end = xml.rfind(b"<MatrixIndicesMap", 0, at), xml.find(b">", at) + 1
    close = xml.find(b"</MatrixIndicesMap>", at)
    dims = re.search(rb'AppliesToMatrixDimension="\s*(\d+)\s*"', xml[start:open_end])
    if start < 0 or open_end <= 0 or close < 0 or dims is None or xml[open_end - 2:open_end] == b"/>":
        return None
    return start, open_end, close + len(b"</MatrixIndicesMap>"), int(dims.group(1))


def _nifti2(path):
    try:
        return nib.Nifti2Image.from_filename(str(path))
    except Exception as err:  # nibabel's header errors: not a NIfTI-2 file
        raise InputError(f"{path} is not a CIFTI-2 file (a NIfTI-2 file with a CIFTI-2 extension): {err}") from None


def _memory_source(values) -> dict:
    values = np.asarray(values)
    digest = hashlib.sha256(values.dtype.str.encode() + np.ascontiguousarray(values).tobytes()).hexdigest()
    return {"path": "<Cifti2Image in memory>", "sha256": digest, "size": int(values.nbytes),
            "dtype": str(values.dtype)}


def _file_source(path) -> dict:
    """A file's identity (path, sha256, size), its bytes hashed as they are read (never all held)."""
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return {"path": str(Path(path).absolute()), "sha256": digest, "size": Path(path).stat().st_size}


def from_cifti(path, space, maps=False) -> SurfaceRun:
    """A CIFTI-2 dense series (``maps``: dense scalar) as a :class:`SurfaceRun`; ``path`` a file, or
    (maps) an in-memory ``nibabel.cifti2.Cifti2Image``, identified by the sha256 of its values."""
    from nibabel.cifti2 import BrainModelAxis, Cifti2Image, ScalarAxis, SeriesAxis

    if isinstance(path, Cifti2Image):
        axes, dataobj = [path.header.get_axis(i) for i in range(path.ndim)], path.dataobj
        axes = [BrainModels.from_axis(a) if isinstance(a, BrainModelAxis) else a for a in axes]
        filename = path.get_filename()
        path = filename or "<Cifti2Image in memory>"
    else:
        axes, dataobj = _read_cifti(path)
        filename = path
    first = ScalarAxis if maps else SeriesAxis
    if not (isinstance(axes[0], first) and isinstance(axes[1], BrainModels)):
        what = "dense scalar file (maps x brain models)" if maps else "dense series (series x brain models)"
        kinds = ["BrainModelAxis" if isinstance(a, BrainModels) else type(a).__name__ for a in axes]
        raise InputError(f"{path} is not a CIFTI-2 {what}; its axes are {kinds}.")
    models = axes[1]
    parts = tuple((name, stop - start) for name, start, stop in models.structures)
    grid = SurfaceGrid("cifti", parts, np.ones(len(models), dtype=bool), space, {}, models)
    if maps:
        source = {"files": [_file_source(path)]} if filename else _memory_source(dataobj)
        return SurfaceRun(grid, dataobj, None, source,
                          {"names": [str(n) for n in axes[0].name]}, by_time=True)
    series = axes[0]
    step = float(series.step) * {"SECOND": 1.0, "MSEC": 1e-3, "USEC": 1e-6}.get(series.unit.upper(), 1.0)
    cifti = {"start": float(series.start), "step": float(series.step), "unit": series.unit}
    return SurfaceRun(grid, dataobj, step if series.unit.upper() != "HERTZ" else None,
                      {"files": [_file_source(path)]}, cifti, by_time=True)


# -- writing runs ---------------------------------------------------------------------------------


def convert_surface_runs(items, store, *, names=None, mesh=None, space="", mask=None, t_r=None,
                         events=None, confounds=None, metadata=None, entities=None, smoothing_fwhm=None,
                         chunk_bytes=DEFAULT_CHUNK_BYTES, task_memory=DEFAULT_TASK_MEMORY,
                         storage_options=None, overwrite=False, client=None, command=None) -> list[str]:
    """Write surface runs into ``store`` as ``runs/<name>`` nodes; return their names.

    A run whose node is complete from the same source (sha256 of the files, or of a
    SurfaceImage's values) and preprocessing is skipped; one from another source is
    refused unless ``overwrite`` (its new version is switched in at completion).

    Parameters
    ----------
    items : SurfaceImage, GIFTI pair dict, CIFTI path, or a list of them
        The runs (see the module docstring); all on one grid.
    store : str or Path
        The cohort store (local path or fsspec URL).
    names : list of str, optional
        Node names; default ``surface-run-00000``...
    mesh : nilearn PolyMesh or str, optional
        GIFTI inputs: their mesh (or a mesh nilearn ships: "fsaverage5").
    space : str
        Template space recorded with the grid (``fsaverage5``, ``fsLR``).
    mask : ndarray of bool (n_elements,), optional
        The elements stored; default all.
    t_r : float, optional
        Repetition time (s) when the inputs do not state it (SurfaceImages never do).
    events, confounds : DataFrame, TSV path, or a list of them (one per run), optional
        Stored with each run (``node.events``, ``node.confounds``; confounds need one row per volume).
    metadata : dict or list of them, optional
        Per run, BIDS sidecar fields: ``RepetitionTime`` (used when the file states no TR) and
        ``StartTime`` (``slice_time_ref = StartTime / TR``, as for volume runs).
    entities : dict or list of them, optional
        Per run, BIDS entities (``sub``, ``ses``, ``task``, ``run``...) for ``cohort.select``.
    smoothing_fwhm : float, optional
        SurfaceImage runs: smoothed along the mesh first with nilearn's ``smooth_img`` (as
        nilearn's SurfaceMasker smooths), recorded in the nodes' preprocessing.
        GIFTI and CIFTI runs are refused with it (convert them unsmoothed).
    chunk_bytes, task_memory, storage_options, overwrite
        As :func:`chunkglm.convert`'s.
    client : distributed.Client, optional
        Default: the active client, if any. GIFTI and CIFTI runs are then
        converted as one task per run on the cluster (each reads its own
        files; a run that fails does so alone: :class:`~chunkglm.errors.ConversionError`
        lists those, after the others are written). In-memory SurfaceImages
        are written by this process.
    command : dict, optional
        The command-line arguments that asked for this conversion, kept in the
        provenance record (as :func:`chunkglm.convert`'s).
    """
    stopwatch = Stopwatch()
    items = list(items) if isinstance(items, list | tuple) else [items]
    names = names or [f"surface-run-{i:05d}" for i in range(len(items))]
    tables = {"names": names, **{key: _per_run(value, len(items), key) for key, value in (
        ("events", events), ("confounds", confounds), ("metadata", metadata), ("entities", entities))}}
    wrong = {key: len(value) for key, value in tables.items() if len(value) != len(items)}
    if wrong:
        raise InputError(f"{len(items)} surface runs but {wrong}: give one of each per run.")
    prepared = [smoothed_surface(item, smoothing_fwhm) for item in items]
    # in-memory images and CIFTI proxies are read (and checked) now; GIFTI files, parsed whole by
    # nibabel, one at a time while writing: a conversion holds one GIFTI run in memory, not all
    eager = {i: read_surface_run(item, mesh, space) for i, item in enumerate(prepared) if not isinstance(item, dict)}
    first = eager[0] if 0 in eager else read_surface_run(prepared[0], mesh, space)
    grid = first.grid if mask is None else first.grid.with_mask(mask)
    for key in ("events", "confounds"):
        tables[key] = [_table(value) for value in tables[key]]
    for index, run in ({0: first} | eager).items():
        _check_run(first.grid, run, index, tables["confounds"][index])
    names = [st.check_node_name(name) for name in names]
    sources = [eager[i].source if i in eager else (first.source if i == 0 else _gifti_source(item))
               for i, item in enumerate(prepared)]
    root = st.open_root(store, storage_options, mode="a")
    locks.remove_leftovers(root)
    for name, source in zip(names, sources):  # every refusal known now before anything is written
        _check_existing(root, name, source, smoothing_fwhm, grid.grid_id, overwrite)
    grid_id = write_grid(root, grid)
    reference, sizes = first.grid, (as_bytes(chunk_bytes), as_bytes(task_memory), smoothing_fwhm)
    pending = [i for i, (name, source) in enumerate(zip(names, sources))
               if _existing(root, name, source, smoothing_fwhm, grid_id) != "same"]
    client = client if client is not None else _default_client()
    files = [i for i in pending if client is not None and not isinstance(prepared[i], SurfaceImage)]
    job = {"grid": grid, "grid_id": grid_id, "reference": reference, "mesh": mesh, "space": space, "t_r": t_r,
           "sizes": sizes}
    futures = {client.submit(_convert_file, _store_arg(store), storage_options, names[i], prepared[i], i,
                             _companions(tables, i), job, key=f"convert-surface-{names[i]}-{uuid.uuid4().hex[:8]}"): i
               for i in files}
    written = []
    for index in (i for i in pending if i not in files):  # in this process: SurfaceImages, or no cluster
        run = first if index == 0 else eager.get(index) or read_surface_run(prepared[index], mesh, space)
        _check_run(reference, run, index, tables["confounds"][index])
        _write_run(root, names[index], grid, grid_id, run, t_r, _companions(tables, index), sizes)
        written.append((names[index], sources[index]))
        first = run = None  # a GIFTI run's values are released before the next is read
    failures = _gather(futures, names, sources, written)
    if written:
        options = {"inputs": "surface", "space": space, "t_r": t_r, "smoothing_fwhm": smoothing_fwhm,
                   "chunk_bytes": as_bytes(chunk_bytes), "task_memory": as_bytes(task_memory),
                   "n_elements": grid.n_voxels, "grid_kind": grid.kind, **({"command": command} if command else {})}
        sources = [{"node": f"runs/{name}", **entry} for name, source in written
                   for entry in source.get("files", [source])]
        full = record("convert", inputs=sources, options=options, cluster=cluster_summary(client),
                      stopwatch=stopwatch)
        full.pop("chunkglm_provenance")
        st.add_provenance(root, full)
    consolidated.mend(root, [f"grids/{grid_id}", *(f"runs/{n}" for n in names), st.PROVENANCE])
    if failures:
        lines = "\n".join(f"  runs/{name}: {message}" for name, message in sorted(failures.items()))
        where = st.redact_url(str(store))
        raise ConversionError(f"{len(failures)} surface run(s) could not be converted into {where}; "
                              f"the other {len(written)} were written completely:\n{lines}\nFix those inputs, then "
                              "run the same conversion again: complete runs are skipped.", failures)
    return list(names)


def _companions(tables, index) -> dict:
    return {key: tables[key][index] for key in ("events", "confounds", "metadata", "entities")}


def _store_arg(store):
    """Workers may run elsewhere: local stores as absolute paths."""
    return store if st.is_url(str(store)) else str(Path(str(store).removeprefix("file://")).absolute())


def _default_client():
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def _convert_file(store, storage_options, name, item, index, companions, job) -> str:
    """One surface run's task on a worker: read its file(s), check them, write its node."""
    root = st.open_root(store, storage_options, mode="a")
    run = read_surface_run(item, job["mesh"], job["space"])
    _check_run(job["reference"], run, index, companions["confounds"])
    _write_run(root, name, job["grid"], job["grid_id"], run, job["t_r"], companions, job["sizes"])
    return name


def _gather(futures, names, sources, written) -> dict:
    """Wait for every task; add the runs written to ``written``; return {name: why} of those that failed
    (a run fails alone: the others are written)."""
    if not futures:
        return {}
    from distributed import as_completed, wait

    failures = {}
    try:
        for future in as_completed(futures):
            index = futures[future]
            try:
                future.result()
                written.append((names[index], sources[index]))
            except Exception as err:  # one bad run must not lose the others
                failures[names[index]] = f"{type(err).__name__}: {err}"
        wait(list(futures))
    finally:
        next(iter(futures)).client.cancel(list(futures))
    return failures


def convert_surface_bids(path, store, *, space="fsaverage5", task=None, subjects=None, sessions=None,
                         derivatives_folder="derivatives/fmriprep", cifti=None, mesh=None, **options) -> list[str]:
    """fMRIPrep's surface runs of one space -> ``runs/<bids name>`` nodes; return their names.

    ``space`` ``fsaverage5`` (GIFTI pairs, on ``mesh``: by default the mesh of
    that name nilearn ships) or ``fsLR`` (CIFTI dense series; ``cifti=True``
    for CIFTI runs of another space). Each run keeps
    its BIDS entities, events, confounds and sidecar (RepetitionTime,
    StartTime), as volume runs converted by :func:`chunkglm.convert` do.
    ``options``: those of :func:`convert_surface_runs` (chunk_bytes, overwrite...).
    """
    from chunkglm.io.bids import discover_surface_runs

    found = discover_surface_runs(path, space=space, task=task, subjects=subjects, sessions=sessions,
                                  derivatives_folder=derivatives_folder, cifti=cifti)
    gifti = isinstance(found[0].bold, dict)
    return convert_surface_runs([r.bold for r in found], store, names=[r.name for r in found],
                                mesh=(mesh or str(space).removeprefix("space-")) if gifti else None,
                                space=str(space).removeprefix("space-"), events=[r.events for r in found],
                                confounds=[r.confounds for r in found], metadata=[r.metadata for r in found],
                                entities=[r.entities for r in found], **options)


def check_same_grid(first: SurfaceGrid, other: SurfaceGrid, index: int) -> None:
    if first.kind == other.kind == "cifti" and first.cifti is other.cifti:
        return  # one brain-model object (read_cifti's cache): one grid, its parts counted from it
    if first.kind != other.kind or first.parts != other.parts:
        raise InputError(f"surface run {index} has {other.kind} parts {list(other.parts)}, run 0 "
                         f"{first.kind} parts {list(first.parts)}: the runs of one conversion share one grid.")
    if first.with_mask(other.mask).grid_id != other.grid_id:
        raise InputError(f"surface run {index} is on another mesh (or CIFTI axis) than run 0, with the same "
                         "numbers of vertices: the runs of one conversion share one grid.")


def _gifti_source(pair) -> dict:
    """A GIFTI pair's source identity (path, sha256, size per file), as from_gifti records it."""
    return {"files": [_file_source(pair[part]) for part in MESH_PARTS if part in pair]}


def _check_run(reference: SurfaceGrid, run, index: int, confounds) -> None:
    check_same_grid(reference, run.grid, index)
    if confounds is not None and len(confounds) != run.n_time:
        raise InputError(f"the confounds of surface run {index} have {len(confounds)} rows for {run.n_time} "
                         "volumes: confounds need one row per volume.")


def _existing(root, name, source, fwhm, grid_id) -> str | None:
    """"same" (a complete node from this source, preprocessing and grid), "other", or None (no node)."""
    path = f"runs/{name}"
    if path not in root or not st.is_complete(root[path]):
        return None
    meta = st.node_meta(root[path])
    same = (meta.get("source") == source and root[path].attrs.get("grid_id") == grid_id
            and meta.get("preprocessing") == SpatialPreprocessing(None, None, fwhm).to_attrs())
    return "same" if same else "other"


def _check_existing(root, name, source, fwhm, grid_id, overwrite) -> None:
    if not overwrite and _existing(root, name, source, fwhm, grid_id) == "other":
        raise InputError(f"the store already has a complete runs/{name} converted from a different source, "
                         "mask or smoothing. Pass overwrite=True to replace it, or another name; nothing was written.")


def smoothed_surface(item, fwhm):
    """A SurfaceImage smoothed along its mesh (nilearn's smooth_img), or the item when no fwhm."""
    if fwhm is None:
        return item
    from nilearn.image import smooth_img

    if not isinstance(item, SurfaceImage):
        raise InputError(f"smoothing_fwhm at conversion applies to SurfaceImage runs; received "
                         f"{type(item).__name__}. Convert it unsmoothed, or load it as a SurfaceImage first.")
    return smooth_img(item, fwhm)


def _per_run(value, n, what) -> list:
    if isinstance(value, list | tuple):
        return list(value)
    if value is not None and what in ("events", "confounds") and n > 1:
        raise InputError(f"give {what} as a list, one per run ({n} runs); received one {type(value).__name__}.")
    return [value] * n


def _table(value):
    if value is None or isinstance(value, pd.DataFrame):
        return value
    return pd.read_csv(value, sep="\t", na_values=["n/a", "NaN", "nan"], keep_default_na=False)


def _write_run(root, name, grid, grid_id, run, t_r, companions, sizes):
    chunk_bytes, task_memory, fwhm = sizes
    metadata, entities = dict(companions["metadata"] or {}), dict(companions["entities"] or {})
    tr = run.t_r if run.t_r is not None else metadata.get("RepetitionTime", t_r)
    events, confounds = companions["events"], companions["confounds"]
    elements = grid.flat_index
    plan = plan_voxel_chunks(run.n_time, grid.n_voxels, 4, chunk_bytes)

    def fill(out, start, stop):
        run.fill(out, start, stop, elements)
        return any_finite(out)

    st.resume_swap(root, "runs", name)
    node = st.begin_version(root, "runs", name)
    try:
        write_rows(node, "bold", ("time", "voxel"), plan, fill, task_memory, f"surface run {name}")
        write_element_coordinates(node, grid)
        node["bold"].attrs["coordinates"] = "hemi"  # xarray reads hemi as a coordinate of bold
        frame = np.arange(run.n_time, dtype=np.float64) * (tr or 0.0)
        st.write_array(node, "time", frame, ("time",), attrs={"units": "s"})
        if events is not None:
            write_events(node, events)
        if confounds is not None:
            st.write_array(node, "confound", np.array(list(confounds.columns), dtype=str), ("confound",))
            st.write_array(node, "confounds", confounds.apply(pd.to_numeric, errors="coerce")
                           .to_numpy(np.float64), ("time", "confound"))
    except BaseException:
        st.discard_version(root, node)
        raise
    start = metadata.get("StartTime")
    attrs = {"grid_id": grid_id, "RepetitionTime": tr, "entities": entities, "sidecar": metadata,
             "slice_time_ref": float(start) / float(tr) if start is not None and tr else None,
             **{key: entities.get(entity) for key, entity in (("subject", "sub"), ("session", "ses"),
                                                              ("task", "task"), ("run", "run"))},
             "shape": [run.n_time, grid.shape[0]], "grid_kind": grid.kind}
    meta = {"kind": "run", "source": run.source, "preprocessing": SpatialPreprocessing(None, None, fwhm).to_attrs(),
            "cifti": run.cifti}
    st.finish_node(node, attrs, meta)
    st.publish_version(root, "runs", name, node)


# -- back to files and images -------------------------------------------------------------------


def _full_values(node) -> np.ndarray:
    """(n_elements, time) float32 of a surface run: stored values, 0 outside the mask."""
    grid = node.grid
    values = node.data().values
    full = np.zeros((grid.shape[0], values.shape[0]), dtype=np.float32)
    full[grid.mask] = values.T
    return full


def _polymesh(grid):
    from nilearn.surface import InMemoryMesh, PolyMesh

    if grid.kind != "mesh":
        raise InputError(f"this run's grid is a {grid.kind} grid, with no mesh geometry: write it back with "
                         "to_cifti, or give a SurfaceImage's mesh when converting.")
    return PolyMesh(**{part: InMemoryMesh(*grid.meshes[part]) for part, _ in grid.parts})


def to_surface_image(node):
    """A surface run (or map collection) as a nilearn SurfaceImage: (vertices, time) float32."""
    grid = node.grid
    full = _full_values(node)
    slices = grid.part_slices()
    return SurfaceImage(_polymesh(grid), {part: full[slices[part]] for part, _ in grid.parts})


def to_gifti(node, folder=None, stem=None) -> dict:
    """A mesh-grid run as GIFTI images, one per hemisphere, one data array per volume (as fMRIPrep's
    ``*_hemi-L_..._bold.func.gii``). Written as ``<folder>/<stem>_hemi-L_bold.func.gii`` ... when
    ``folder`` is given; returns {part: GiftiImage}."""
    grid = node.grid
    _polymesh(grid)  # mesh grids only
    full, slices = _full_values(node), grid.part_slices()
    tr = node.attrs.get("RepetitionTime")
    meta = {"TimeStep": f"{tr * 1000:g}"} if tr else {}
    images = {}
    for part, _ in grid.parts:
        images[part] = gifti_image(full[slices[part]].T, "NIFTI_INTENT_TIME_SERIES", meta)
        if folder is not None:
            hemi = {"left": "L", "right": "R"}[part]
            nib.save(images[part], Path(folder) / f"{stem or node.name}_hemi-{hemi}_bold.func.gii")
    return images


def to_cifti(node, path=None):
    """A CIFTI-grid run as a CIFTI-2 dense series (time, grayordinates) float32, its brain-model
    axis and series timing as converted (a map collection: a dense scalar file, one map per image,
    named by the image ids); written to ``path`` when given."""
    from nibabel.cifti2 import ScalarAxis, SeriesAxis

    grid = node.grid
    if grid.kind != "cifti":
        raise InputError(f"this run's grid is a {grid.kind} grid: write it back with to_gifti or "
                         "to_surface_image.")
    full = _full_values(node)
    if node.kind == "maps":
        names = [str(v) for v in node.cohort.root[node.data_path]["image"][...]]
        img = cifti_image(np.ascontiguousarray(full.T), cifti_header(ScalarAxis(names), grid.cifti))
        if path is not None:
            img.to_filename(str(path))
        return img
    series = dict(dict(node.attrs.get(st.ATTR, {})).get("cifti") or {})
    axis = SeriesAxis(series.get("start", 0.0), series.get("step", node.attrs.get("RepetitionTime") or 1.0),
                      full.shape[1], series.get("unit", "SECOND"))
    img = cifti_image(np.ascontiguousarray(full.T), cifti_header(axis, grid.cifti))
    if path is not None:
        img.to_filename(str(path))
    return img
