"""``MetaResult``: NiMARE's result object over a lazy (map, voxel) graph.

``maps`` is a dict of 1-D float32 arrays over the analysed voxels, named and
clipped as NiMARE's ``MetaResult`` stores them (``p*`` clipped to
[smallest float32 > 0, 1], ``logp*`` to [0, float32 max]). All maps of one
fit are computed together, in one pass over the inputs, the first time any
of them is asked for. ``to_xarray()`` gives the same maps lazily.
"""

from __future__ import annotations

import copy
from pathlib import Path

import nibabel as nib
import numpy as np
import xarray as xr

from chunkglm.errors import InputError
from chunkglm.graph import meta as meta_graph
from chunkglm.kernels.finite import LEFT_OUT, warn
from chunkglm.meta.outputs import save_derivatives, save_maps
from chunkglm.report.build import result_report

FLOAT = np.float32


def clip_p(values) -> np.ndarray:
    """NiMARE's ``_clip_p_values`` (float32)."""
    values = np.array(values, dtype=FLOAT)
    return np.clip(values, np.nextafter(FLOAT(0), FLOAT(1)), FLOAT(1), out=values)


def clip_logp(values) -> np.ndarray:
    """NiMARE's ``_clip_logp_values`` (float32)."""
    values = np.array(values, dtype=FLOAT)
    return np.clip(values, FLOAT(0), np.finfo(FLOAT).max, out=values)


def store_map(name: str, values) -> np.ndarray:
    """A map as NiMARE's MetaResult stores it (1-D float32, p/logp clipped)."""
    values = np.asarray(values).reshape(-1)
    if name == "p" or name.startswith("p_"):
        return clip_p(values)
    if name.startswith("logp"):
        return clip_logp(values)
    return values.astype(FLOAT) if np.issubdtype(values.dtype, np.floating) else values


class MetaResult:
    """Maps of one meta-analysis (and the corrections applied to it).

    Parameters
    ----------
    estimator : estimator instance
        The fitted estimator (holds its inputs, for Monte Carlo corrections).
    lazy : dask.array.Array of shape (n_maps + 1, n_voxels)
        The maps, in ``names`` order, then a row flagging (1) the voxels where an
        input held a NaN/inf (counted for a warning when the maps are computed).
    names : list of str
        NiMARE's map names.
    inputs : chunkglm.meta._inputs.MetaMaps
        The collection analysed (grid and voxels).
    description : str

    Attributes
    ----------
    maps : dict of str -> ndarray (n_voxels,)
    tables : dict
    description_ : str
    estimator, corrector
    """

    def __init__(self, estimator, lazy, names, inputs, description=""):
        self.estimator = estimator
        self.corrector = None
        self._lazy = lazy
        self._names = list(names)
        self._inputs = inputs
        self._maps = None
        self._extra = {}
        self._hooks = []
        self.tables = {}
        self.description_ = description

    @property
    def maps(self) -> dict[str, np.ndarray]:
        """All maps, computed on first access (one pass over the inputs)."""
        if self._maps is None:
            values = meta_graph.compute(self._lazy)
            warn(int(np.count_nonzero(values[len(self._names)])), "the meta-analysis inputs", LEFT_OUT)
            self._maps = {name: store_map(name, values[i]) for i, name in enumerate(self._names)}
            for hook in self._hooks:
                self._maps.update({k: store_map(k, v) for k, v in hook(self._maps).items()})
        return {**self._maps, **self._extra}

    def add_hook(self, hook) -> None:
        """``hook(maps) -> {name: values}``: derived maps computed with the maps (global passes)."""
        self._hooks.append(hook)
        self._maps = None

    def add_maps(self, maps: dict) -> None:
        """Add (corrected) maps, stored as NiMARE stores them."""
        self._extra.update({name: store_map(name, values) for name, values in maps.items()})

    @property
    def masker(self):
        """A fitted nilearn ``NiftiMasker`` of the analysed voxels (NiMARE's ``result.masker``)."""
        from nilearn.maskers import NiftiMasker  # local: a 0.4 s import (sklearn), only for this attribute

        return NiftiMasker(self._inputs.mask_img(), standardize=None).fit()

    def get_map(self, name: str, return_type: str = "image"):
        """A map as a NIfTI image (NaN -> 0, as NiMARE) or as a 1-D array.

        Parameters
        ----------
        name : str
            Key of :attr:`maps`.
        return_type : {"image", "array"}
        """
        maps = self.maps
        if name not in maps:
            raise InputError(f"No map with name '{name}' found; maps are {sorted(maps)}.")
        if return_type == "array":
            return maps[name]
        if return_type != "image":
            raise InputError(f"return_type must be 'image' or 'array'; received {return_type!r}.")
        return self._image(maps[name])

    def _image(self, values):
        grid, ijk = self._inputs.grid, self._inputs.ijk
        values = np.asarray(values)
        if np.issubdtype(values.dtype, np.floating):
            values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        data = np.zeros(grid.shape, dtype=values.dtype)
        data[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = values
        return nib.Nifti1Image(data, grid.affine)

    def generate_report(self, maps=None, title=None, bg_img="MNI152TEMPLATE", threshold=None, alpha=0.001,
                        cluster_threshold=0, height_control="fpr", two_sided=False, min_distance=8.0,
                        plot_type="slice", cut_coords=None, display_mode=None, report_dims=(1600, 800)):
        """An HTML report of the meta-analysis (the options of nilearn's ``generate_report``).

        The estimator and its parameters, the inputs, the methods text, the
        mask, the z map thresholded as asked (``height_control``, ``alpha``,
        ``threshold``, ``cluster_threshold``) with its cluster table, each
        corrected z map (``z_corr-…``) as its corrector left it, and a
        provenance record. Figures are embedded: the page reads offline.

        Parameters
        ----------
        maps : list of str, optional
            Maps to show; default "z" and every corrected z map.
        title, bg_img, threshold, alpha, cluster_threshold, height_control, two_sided, min_distance, plot_type, \
cut_coords, display_mode, report_dims
            As :meth:`chunkglm.glm.first_level.FirstLevelModel.generate_report`.

        Returns
        -------
        chunkglm.report.HTMLReport
        """
        return result_report(self, maps, title, report_dims, bg_img=bg_img, threshold=threshold, alpha=alpha,
                             cluster_threshold=cluster_threshold, height_control=height_control,
                             two_sided=two_sided, min_distance=min_distance, plot_type=plot_type,
                             cut_coords=cut_coords, display_mode=display_mode)

    def to_xarray(self):
        """The estimator's maps as a lazy xarray Dataset over ``voxel`` (with ``ijk``)."""
        data = {name: ("voxel", self._lazy[i]) for i, name in enumerate(self._names)}
        return xr.Dataset(data, coords={"ijk": (("voxel", "axis"), self._inputs.ijk)},
                          attrs={"estimator": type(self.estimator).__name__})

    def copy(self) -> MetaResult:
        """A copy sharing the computed maps (corrections add to the copy only)."""
        new = copy.copy(self)
        new._extra = dict(self._extra)
        new.tables = dict(self.tables)
        return new

    def save_maps(self, output_dir=".", prefix="", prefix_sep="_", names=None):
        """Write ``<prefix><sep><name>.nii.gz`` for each map, as NiMARE's ``save_maps``."""
        return save_maps(self, output_dir, prefix, prefix_sep, names)

    def save_tables(self, output_dir=".", prefix="", prefix_sep="_", names=None):
        """Write ``<prefix><sep><table>.tsv`` for each table, as NiMARE's ``save_tables``."""
        if prefix == "":
            prefix_sep = ""
        if not prefix.endswith(prefix_sep):
            prefix = prefix + prefix_sep
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        for name in names or list(self.tables):
            self.tables[name].to_csv(Path(output_dir) / f"{prefix}{name}.tsv", sep="\t", index=False)

    def save_derivatives(self, output_dir, **kwargs):
        """Write the group derivatives folder; see :func:`chunkglm.meta.outputs.save_derivatives`."""
        return save_derivatives(self, output_dir, **kwargs)
