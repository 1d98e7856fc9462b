"""Helpers of the maps maskers: inputs per run, batches of runs, masks, dtypes, docstrings."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nilearn.image import get_data, load_img

from chunkglm.chunking import MemoryBudget
from chunkglm.errors import InputError, InputTypeError
from chunkglm.graph import maps as graph
from chunkglm.io.cohort import Node
from chunkglm.io.nifti import read_info
from chunkglm.io.write_run import _seconds
from chunkglm.maskers._maps_input import ZarrRunReader


#: Attributes a fit sets (forgotten when fitting again).
FITTED = ("maps_img_", "mask_img_", "n_elements_", "region_indices_", "dropped_regions_", "memory_",
           "clean_args_")


def multi_doc(doc: str) -> str:
    """NiftiMapsMasker's docstring for MultiNiftiMapsMasker: many runs, and ``n_jobs``."""
    head, rest = doc.split("\n\n", 1)
    head = ("Region signals of many runs from (overlapping) probabilistic maps.\n\n"
            "    nilearn's ``MultiNiftiMapsMasker`` (0.14), out of core: ``transform`` of a list\n"
            "    of runs gives one (time, region) array per run, all computed in one dask graph\n"
            "    (one 4-D run: one array). With ``high_variance_confounds``, the confounds come\n"
            "    after the user's, as nilearn's.")
    rest = rest.split("\n\n", 1)[1]
    marker = "    clean_args : dict, optional\n"
    n_jobs = ("    n_jobs : int, default=1\n        Accepted for nilearn compatibility: all runs are one dask graph, "
              "scheduled by dask.\n")
    return head + "\n\n" + rest.replace(marker, n_jobs + marker)



def load_mask(mask_img):
    """nilearn's load_mask: a 3-D (or 4-D, all volumes) mask -> (affine, bool array) or None."""
    if mask_img is None:
        return None
    try:
        if isinstance(mask_img, nib.spatialimages.SpatialImage):
            img = mask_img
        elif isinstance(mask_img, str | Path) and Path(mask_img).is_file():
            img = nib.load(str(mask_img))  # as nilearn's load_img
        else:  # wildcards, lists of images, ...: nilearn's own loader
            img = load_img(mask_img)
    except Exception as err:  # nibabel and nilearn raise several kinds for unreadable inputs
        raise InputError(f"mask_img cannot be read as an image: {err}") from err
    data = np.asanyarray(img.dataobj)
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        warnings.warn("Non-finite values detected. These values will be replaced with zeros.",
                      UserWarning, stacklevel=4)
    data = np.nan_to_num(data.reshape(*data.shape[:3], -1)).astype(bool).all(axis=3)
    if not data.any():
        raise InputError("The mask is invalid as it is empty: it masks all data. mask_img has no "
                         "non-zero voxel: give a mask with at least one voxel set.")
    return np.asarray(img.affine, dtype=float), data


def mismatch(what, affine, shape, grid):
    return (f"{what} has shape {tuple(shape[:3])} and affine\n{affine}\nbut the grid has shape "
            f"{tuple(grid.shape)} and affine\n{grid.affine}.")


def batches(datas, budget=None):
    """Indices of runs grouped by voxel blocks, each group's stacked float32 block within
    ``budget.run_batch_bytes()`` (a :class:`~chunkglm.chunking.MemoryBudget`, bytes per chunk,
    or None: the package default, 256 MiB per batch)."""
    budget = MemoryBudget.of(budget).run_batch_bytes()
    by_chunks: dict = {}
    for index, data in enumerate(datas):
        by_chunks.setdefault(data.chunks[1], []).append(index)
    batches = []
    for chunks, members in by_chunks.items():
        current, n_time = [], 0
        for index in members:
            grown = (n_time + datas[index].shape[0]) * max(chunks, default=1) * 4
            if current and grown > budget:
                batches.append(current)
                current, n_time = [], 0
            current.append(index)
            n_time += datas[index].shape[0]
        batches.append(current)
    return batches


def batched_moments(maps, datas, budget=None):
    """Per run the lazy (region, time) ``maps.T @ data.T``, then last the Gram matrix.

    Runs with the same voxel blocks are taken in batches: one task per voxel
    block and batch reads the maps block once for all its runs (and the
    first batch also accumulates the Gram matrix).
    """
    n_regions = len(maps.kept)
    projections, gram = [None] * len(datas), None
    for number, batch in enumerate(batches(datas, budget)):
        source = maps.blocks(datas[batch[0]].chunks[1]) or maps.reader()
        moments = graph.moments(source, [datas[i] for i in batch], with_gram=gram is None)
        if gram is None:
            gram, moments = moments[:, :n_regions], moments[:, n_regions:]
        offsets = np.cumsum([0] + [datas[i].shape[0] for i in batch])
        for index, start, stop in zip(batch, offsets[:-1], offsets[1:]):
            projections[index] = moments[:, start:stop]
    return [*projections, gram]


def run_reader(node, data):
    """A reader of the run's stored bold array, read inside the extraction tasks."""
    return ZarrRunReader(node.zarr_array("bold"), data.chunks)  # missing/corrupt chunks raise


def reread(node, data):
    """The run's bold array under new task names (read again by a second pass)."""
    array = node.zarr_array("bold")  # missing/corrupt chunks raise
    return graph.reread_run(array, data.chunks, node.cohort.location, node.path)


@dataclass(frozen=True)
class FileRun:
    """A NIfTI run read as it is (no store): its path, header and grid."""

    path: str
    info: object
    grid: object


def file_t_r(info):
    """The run's RepetitionTime as conversion stores it: the 4th zoom, in seconds."""
    zooms = [float(z) for z in info.header.get_zooms()]
    return _seconds(zooms[3], info) if len(zooms) > 3 else None


def node_key(node):
    return (node.cohort.location, node.path)


def nilearn_data_dtype(image, info):
    """The dtype nilearn's extraction sees for a run (the store holds float32)."""
    if isinstance(image, np.ndarray) or hasattr(image, "dataobj") and isinstance(image.dataobj, np.ndarray):
        return np.asarray(image.dataobj).dtype
    scaled = info.slope != 1 or info.inter != 0
    return np.dtype(np.float64) if scaled else info.dtype.newbyteorder("=")


def check_confounds(confounds, n_scans, index):
    if isinstance(confounds, str | Path) and not Path(confounds).is_file():
        raise FileNotFoundError(f"confounds file not found: {confounds}")
    if confounds is None or isinstance(confounds, str | Path | list):
        return
    n_rows = len(confounds) if hasattr(confounds, "__len__") else None
    if n_rows is not None and np.ndim(confounds) >= 1 and n_rows != n_scans:
        raise InputError(f"Confound signal has an incorrect length: the confounds of run {index} have {n_rows} rows but the run has {n_scans} "
                         "scans: give one row per scan (before sample_mask censoring).")


def per_run(value, n_runs, name):
    if value is None:
        return [None] * n_runs
    if not isinstance(value, list | tuple):
        raise InputTypeError(f"'{name}' must be a None or a list. Got {type(value).__name__}. Give one "
                             f"entry per run (None for a run without {name}).")
    if len(value) != n_runs:
        raise InputError(f"number of {name} ({len(value)}) unequal to number of images ({n_runs}).")
    return list(value)


def as_list(value):
    return list(value) if isinstance(value, list | tuple) else [value]


def input_name(item):
    return str(item) if isinstance(item, str | Path) else type(item).__name__


def input_grid(item):
    """(affine, 3-D shape) of a run given to ``transform`` (image, NIfTI path or store run), or None."""
    if isinstance(item, nib.spatialimages.SpatialImage):
        return item.affine, tuple(item.shape[:3])
    if isinstance(item, Node):
        return item.grid.affine, tuple(item.grid.shape)
    if isinstance(item, str | Path) and Path(item).is_file():
        info = read_info(str(item))
        return info.affine, tuple(info.volume_shape)
    return None


def read_image(data, affine):
    """A fitted image in the state nilearn's fit leaves its own: data read through ``get_data``.

    nilearn's fit reads ``mask_img_``'s array with ``get_data``, which keeps it
    on the image; such an image pickles (and ``joblib.hash``-es) the same
    before and after a user reads it again, which caches keyed on the fitted
    masker rely on.
    """
    image = nib.Nifti1Image(data, affine)
    get_data(image)
    return image


def downcast_int64(data):
    """nilearn's images of 64-bit ints: int32 when the values fit (with its warning), else kept."""
    if data.dtype not in (np.int64, np.uint64):
        return data
    limits = np.iinfo(np.int32)
    if data.size == 0 or (limits.min <= data.min() and data.max() <= limits.max):
        warnings.warn("Data array used to create a new image contains 64-bit ints. Many tools such as "
                      "FSL and SPM cannot deal with int64 in Nifti images, so for compatibility the data "
                      "has been converted to int32.", UserWarning, stacklevel=3)
        return data.astype(np.int32)
    warnings.warn("Data array used to create a new image contains 64-bit ints, and some values too "
                  "large to store in 32-bit ints. The resulting image thus contains 64-bit ints, which "
                  "may cause some compatibility issues with some other tools or an error when saving "
                  "the image to a Nifti file.", UserWarning, stacklevel=3)
    return data


def one_run_sample_mask(sample_mask):
    """A multi masker's ``sample_mask`` for one run given alone: the run's entry of the list.

    As nilearn, a list is one entry per run and the first is this run's. An entry
    that is a plain list of indices or booleans (``[[1, 2, 4]]``) is taken as the
    array it spells; nilearn raises TypeError ("'int' object is not iterable") there.
    An array (not a list) is the run's own mask, as for NiftiMapsMasker.
    """
    if not isinstance(sample_mask, list):
        return sample_mask
    entry = sample_mask[0]
    if isinstance(entry, list | tuple) and all(np.ndim(value) == 0 for value in entry):
        return np.asarray(entry)
    return entry
