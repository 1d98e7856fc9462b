"""FirstLevelModel on surface runs: nilearn's mask rules for SurfaceImages, and SurfaceImage outputs
(CIFTI store runs: CIFTI dense scalar outputs).

nilearn 0.14 fits first-level GLMs on 2-D :class:`~nilearn.surface.SurfaceImage`
runs (vertices x time) through a ``SurfaceMasker``. The mask is nilearn's
(computed here with nilearn's own masker, from the in-memory images: vertices
finite in every run when ``mask_img`` is None, every vertex when False, a given
mask image's or fitted masker's otherwise); the runs are then staged into the
store on that mask (:func:`chunkglm.io.inputs.stage_inputs`) and fitted by the
same graph as volumes. Outputs are SurfaceImages on the runs' mesh, float64, 0
outside the mask, shaped as nilearn's ((n_vertices,) per map, (n_vertices, k)
for k volumes).
"""

from __future__ import annotations

import pickle

import numpy as np
from nilearn._utils.masker_validation import check_compatibility_mask_and_images
from nilearn.maskers import SurfaceMasker
from nilearn.maskers.masker_validation import check_embedded_masker
from nilearn.surface import InMemoryMesh, PolyMesh, SurfaceImage
from nilearn.surface.utils import check_polymesh_equal

from chunkglm.errors import InputError
from chunkglm.io.cohort import Node
from chunkglm.io.surface import SurfaceGrid
from chunkglm.io.surface_convert import is_surface_input

__all__ = ["check_surface_inputs", "cifti_image", "elements_image", "is_surface_fit", "surface_mask"]


def is_surface_fit(items, mask_img) -> bool:
    """True when the runs are SurfaceImages or surface store runs, or the mask is a surface one."""
    if isinstance(mask_img, SurfaceImage | SurfaceMasker):
        return True
    return any(isinstance(item, SurfaceImage) or is_surface_input(item)
               or (isinstance(item, Node) and isinstance(item.grid, SurfaceGrid)) for item in items)


def check_surface_inputs(items, mask_img) -> None:
    """nilearn's refusals: a volume mask with surface runs or a surface mask with volume runs
    (TypeError "Mask and input images must be of compatible types."), runs on meshes of different
    sizes (nilearn's MeshDimensionError), and runs that are not 2-D (vertices x time)."""
    files = [item for item in items if is_surface_input(item) and not isinstance(item, SurfaceImage)]
    if files:
        raise InputError(f"run_imgs holds surface files ({str(files[0])[:80]}): convert them first "
                         "(chunkglm.io.surface_convert.convert_surface_runs or convert_surface_bids) and pass "
                         "the store's runs, or load them as nilearn SurfaceImages.")
    images = [item for item in items if not isinstance(item, Node)]
    if mask_img is not False and images:
        check_compatibility_mask_and_images(mask_img, images)
    if any(isinstance(item, Node) for item in items) and images:
        raise InputError("run_imgs mixes store runs and SurfaceImages: give one kind.")
    for item in images:
        if not isinstance(item, SurfaceImage):
            raise TypeError(f"Mask and input images must be of compatible types: surface runs are "
                            f"SurfaceImages; received {type(item).__name__}.")
        if len(item.shape) != 2:
            raise InputError(f"a surface run is a 2-D SurfaceImage (vertices x time points); received shape "
                             f"{item.shape}.")
        if 0 in item.shape:
            raise InputError(f"The image is empty: a surface run of shape {item.shape} (vertices x time points) "
                             "has no value to model.")
        check_polymesh_equal(images[0].mesh, item.mesh)


def surface_mask(model, images) -> np.ndarray | None:
    """The vertices to fit, (n_vertices,) bool over the runs' parts, as nilearn's FirstLevelModel
    chooses them (None: every vertex). ``images``: the SurfaceImage runs."""
    given = model.mask_img
    if given is False:
        return None
    if isinstance(given, SurfaceMasker):  # fitted (checked as nilearn does, with its NotFittedError)
        mask = given.mask_img_
    elif isinstance(given, SurfaceImage):
        mask = SurfaceMasker(mask_img=given).fit().mask_img_
    else:  # None: nilearn's multi-run surface masker on the runs
        masker = check_embedded_masker(model, masker_type="multi_surface", ignore=["high_pass"])
        mask = masker.fit(images).mask_img_
    parts = [part for part in ("left", "right") if part in images[0].data.parts]
    missing = [part for part in parts if part not in mask.data.parts]
    if missing:
        raise InputError(f"the mask has no {missing} part; the runs have parts {parts}.")
    values = np.concatenate([np.asarray(mask.data.parts[part]).reshape(-1) for part in parts])
    return values != 0


def _polymesh(grid: SurfaceGrid):
    return PolyMesh(**{part: InMemoryMesh(*grid.meshes[part]) for part, _ in grid.parts})


def elements_image(grid: SurfaceGrid, values, selected=None, dtype=np.float64):
    """An image of ``values`` over the fitted elements, 0 outside them. ``selected``: indices into
    the stored elements (None: all).

    Mesh grids: a SurfaceImage, (voxel,) -> (n_vertices,), (k, voxel) -> (n_vertices, k).
    CIFTI grids (nilearn has no CIFTI image): a ``nibabel.cifti2.Cifti2Image`` dense scalar file of
    one map per row (maps ``map-0``...), on the runs' brain-model axis.
    """
    values = np.asarray(values, dtype=dtype)
    elements = grid.flat_index if selected is None else grid.flat_index[selected]
    full = np.zeros((grid.shape[0], *values.shape[:-1]), dtype=dtype)
    full[elements] = values.T if values.ndim == 2 else values
    if grid.kind == "cifti":
        return _cifti_image(grid, full)
    slices = grid.part_slices()
    return SurfaceImage(_polymesh(grid), {part: full[slices[part]] for part, _ in grid.parts})


#: CIFTI headers built, by (grid id, number of maps), pickled: building one from a 91k brain-model
#: axis (nibabel's from_axes) costs several times the copy each image takes of it, and unpickling
#: that copy ~10x less than nibabel's deepcopy of its ~10^6 index objects.
_CIFTI_HEADERS: dict = {}
_CIFTI_HEADERS_KEPT = 8


def _cifti_header(grid: SurfaceGrid, n_maps: int) -> bytes:
    """The dense scalar header of ``n_maps`` maps (``map-0``...) on the grid's brain-model axis, built
    once per grid and number of maps and kept pickled (each image unpickles its own copy)."""
    from nibabel.cifti2 import Cifti2Header, ScalarAxis

    key = (grid.grid_id, n_maps)
    if key not in _CIFTI_HEADERS:
        if len(_CIFTI_HEADERS) >= _CIFTI_HEADERS_KEPT:
            _CIFTI_HEADERS.pop(next(iter(_CIFTI_HEADERS)))
        axis = ScalarAxis([f"map-{i}" for i in range(n_maps)])
        header = Cifti2Header.from_axes((axis, grid.brain_models))
        _CIFTI_HEADERS[key] = pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)
    return _CIFTI_HEADERS[key]


def _cifti_image(grid: SurfaceGrid, full: np.ndarray):
    rows = full.reshape(len(full), -1).T  # (maps, grayordinates)
    if rows.dtype == bool:
        rows = rows.astype(np.uint8)  # CIFTI-2 has no boolean type
    return cifti_image(np.ascontiguousarray(rows), _cifti_header(grid, len(rows)))


def cifti_image(rows: np.ndarray, header):
    """``nibabel.cifti2.Cifti2Image(rows, header)``, faster on large brain-model axes.

    ``header``: a ``Cifti2Header`` built for these rows, or its pickle (this module's cache).
    The image gets its own copy of it, as nibabel's constructor gives, made by unpickling
    (~0.02 s on a 91k axis, nibabel's deepcopy ~0.25 s), and nibabel's check that the header's
    axes fit the data is left out (``get_data_shape`` rebuilds the brain-model axis, ~0.5 s):
    the image is made on a small stand-in header of the same shape (two series axes, cheap to
    build, copy and check) whose place the copy then takes. Equal to nibabel's image, values,
    headers and written file (tests/test_surface_speed.py)."""
    from nibabel.cifti2 import Cifti2Image, SeriesAxis

    pickled = header if isinstance(header, bytes) else pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)
    stand_in = (SeriesAxis(0.0, 1.0, rows.shape[0]), SeriesAxis(0.0, 1.0, rows.shape[1]))
    img = Cifti2Image(rows, stand_in)
    img._header = pickle.loads(pickled)  # nosec: bytes pickled above or by _cifti_header, in this process
    img.update_headers()
    return img


def fitted_surface_masker(model, mask_image):
    """``masker_``: the given fitted SurfaceMasker, else one fitted on the model's mask (None for
    CIFTI runs: nilearn has no CIFTI masker)."""
    if model._grid.kind == "cifti":
        return None
    if isinstance(model.mask_img, SurfaceMasker):
        return model.mask_img
    masker = check_embedded_masker(model, masker_type="surface", ignore=["high_pass"])
    masker.mask_img = mask_image
    return masker.fit()
