"""``MetaResult``: NiMARE's result object over a lazy (map, voxel) graph.

``maps`` is a dict of 1-D float32 arrays over the analysed voxels, named and
clipped as NiMARE's ``MetaResult`` stores them (``p*`` clipped to
[smallest float32 > 0, 1], ``logp*`` to [0, float32 max]). All maps of one
fit are computed together, in one pass over the inputs, the first time any
of them is asked for. ``to_xarray()`` gives the same maps lazily.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import xarray as xr
from nibabel.funcs import squeeze_image

from chunkglm.errors import InputError
from chunkglm.graph import meta as meta_graph
from chunkglm.kernels.finite import LEFT_OUT, warn
from chunkglm.meta._base import NiMAREBase
from chunkglm.meta.outputs import save_derivatives, save_maps
from chunkglm.report.build import result_report

FLOAT = np.float32
#: NiMARE 0.0.x's map names (its ``fsl_glm`` dict) -> today's.
OLD_MAP_NAMES = {"cope": "est", "log_p": "logp", "thresh_z": "z_corr-cluster"}
LGR = logging.getLogger("chunkglm.meta.results")

#: BibTeX entries of the works chunkglm's methods texts cite (as NiMARE's references.bib has them).
REFERENCES = {
    "benjamini1995controlling": "@article{benjamini1995controlling,\n  title={Controlling the false discovery rate: "
    "a practical and powerful approach to multiple testing},\n  author={Benjamini, Yoav and Hochberg, Yosef},\n"
    "  journal={Journal of the Royal statistical society: series B (Methodological)},\n  volume={57},\n"
    "  number={1},\n  pages={289--300},\n  year={1995}\n}",
    "benjamini2001control": "@article{benjamini2001control,\n  title={The control of the false discovery rate in "
    "multiple testing under dependency},\n  author={Benjamini, Yoav and Yekutieli, Daniel},\n"
    "  journal={Annals of statistics},\n  pages={1165--1188},\n  year={2001}\n}",
    "bonferroni1936teoria": "@article{bonferroni1936teoria,\n  title={Teoria statistica delle classi e calcolo "
    "delle probabilita},\n  author={Bonferroni, Carlo},\n  journal={Pubblicazioni del R Istituto Superiore di "
    "Scienze Economiche e Commericiali di Firenze},\n  volume={8},\n  pages={3--62},\n  year={1936}\n}",
    "shaffer1995multiple": "@article{shaffer1995multiple,\n  title={Multiple hypothesis testing},\n"
    "  author={Shaffer, Juliet Popper},\n  journal={Annual review of psychology},\n  volume={46},\n"
    "  number={1},\n  pages={561--584},\n  year={1995}\n}",
}


def bibtex_for(description: str) -> str:
    """The BibTeX entries of the ``\\cite*{...}`` keys in a methods text (those chunkglm knows)."""
    keys = []
    for group in re.findall(r"\\cite[a-z]*\{([^}]*)\}", description or ""):
        keys += [k.strip() for k in group.split(",") if k.strip() not in keys]
    return "\n".join(REFERENCES[k] for k in sorted(set(keys)) if k in REFERENCES)


def _deepcopy(obj):
    """NiMARE deep-copies what a result holds; an object that cannot be copied is kept as it is."""
    try:
        return copy.deepcopy(obj)
    except Exception:  # noqa: BLE001 - e.g. an estimator holding an open store
        return obj


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


class MetaResult(NiMAREBase):
    """Maps of one meta-analysis (and the corrections applied to it), as NiMARE's ``MetaResult``.

    Parameters
    ----------
    estimator : estimator instance
        The estimator that generated the maps (deep-copied, as NiMARE does).
    corrector : Corrector, optional
    diagnostics : list, optional
    mask : str, nibabel image or nilearn masker, optional
        Converts maps between arrays and images (``masker``).
    maps : dict of str -> 1-D ndarray, optional
        Stored as NiMARE stores them (float32; ``p*`` and ``logp*`` clipped).
    tables : dict of str -> pandas.DataFrame, optional
    description : str

    Attributes
    ----------
    maps : dict of str -> ndarray (n_voxels,)
        An estimator's maps are computed the first time they are read (one pass
        over the inputs); ``to_xarray()`` gives them lazily.
    tables, metadata, diagnostics, description_, bibtex_, estimator, corrector, masker
    """

    def __init__(self, estimator, corrector=None, diagnostics=None, mask=None, maps=None, tables=None,
                 description=""):
        self.estimator = _deepcopy(estimator)
        self.corrector = _deepcopy(corrector)
        self.diagnostics = [_deepcopy(d) for d in diagnostics or []]
        self._init_lazy(None, (), None, mask)
        checked = {}
        for name, values in (maps or {}).items():
            if not isinstance(values, np.ndarray):
                raise InputError(f"Maps must be numpy arrays. '{name}' is a {type(values)}")
            if values.ndim != 1:
                LGR.warning(f"Map '{name}' should be 1D, not {values.ndim}D. Squeezing.")
                values = np.squeeze(values)
            checked[name] = store_map(name, values)
        for name, table in (tables or {}).items():
            if not isinstance(table, pd.DataFrame):
                raise InputError(f"Tables must be DataFrames. '{name}' is a {type(table)}")
        self._maps = checked
        self.tables = dict(tables or {})
        self.metadata = {}
        self.description_ = description

    @classmethod
    def _from_graph(cls, estimator, lazy, names, inputs, description="", masker=None) -> MetaResult:
        """A result over a lazy (map, voxel) graph: ``lazy`` holds the maps in ``names`` order, then a
        row flagging the voxels where an input held a NaN/inf (+1) and those left unfitted because
        their images all come from one dependence group (+2); ``inputs`` the collection analysed."""
        new = cls.__new__(cls)
        new.estimator, new.corrector, new.diagnostics = estimator, None, []
        new._init_lazy(lazy, names, inputs, masker)
        new._maps = None
        new.tables, new.metadata = {}, {}
        new.description_ = description
        return new

    def _init_lazy(self, lazy, names, inputs, mask):
        self._lazy = lazy
        self._names = list(names)
        self._inputs = inputs
        self._mask = mask
        self._masker = None
        self._hooks = []

    @property
    def description_(self) -> str:
        """Methods text; setting it fills ``bibtex_`` with the entries it cites."""
        return self._description

    @description_.setter
    def description_(self, text):
        self._description = text or ""
        self.bibtex_ = bibtex_for(self._description)

    @property
    def maps(self) -> dict[str, np.ndarray]:
        """All maps, computed on first access (one pass over the inputs)."""
        if self._maps is None:
            values, *extras = meta_graph.compute_together(self._lazy, *[lazy for _, lazy in self._hooks
                                                                         if lazy is not None])
            values, extras = np.asarray(values), iter(extras)
            flags = values[len(self._names)]
            warn(int(np.count_nonzero(np.mod(flags, 2))), "the meta-analysis inputs", LEFT_OUT)
            skipped = int(np.count_nonzero(flags >= 2))
            if skipped:
                LGR.warning("Skipped %d voxel(s) whose valid images all come from a single group. One group "
                            "carries no independent replication to estimate a variance from, so those voxels "
                            "are NaN.", skipped)
            self._maps = {name: store_map(name, values[i]) for i, name in enumerate(self._names)}
            for hook, lazy in self._hooks:
                derived = hook(self._maps) if lazy is None else hook(self._maps, next(extras))
                self._maps.update({k: store_map(k, v) for k, v in derived.items()})
        return self._maps

    @maps.setter
    def maps(self, value):
        self._maps = dict(value)

    def add_hook(self, hook, lazy=None) -> None:
        """``hook(maps) -> {name: values}``: derived maps computed with the maps (global passes).

        With ``lazy`` (a dask collection), ``hook(maps, value)`` receives its value, computed in
        the same graph as the maps (input chunks they share are read once)."""
        self._hooks.append((hook, lazy))
        self._maps = None

    def add_maps(self, maps: dict) -> None:
        """Add (corrected) maps, stored as NiMARE stores them."""
        self.maps.update({name: store_map(name, values) for name, values in maps.items()})

    @property
    def masker(self):
        """A fitted nilearn masker of the analysed voxels (NiMARE's ``result.masker``)."""
        if self._masker is None:
            from nilearn.maskers import NiftiMasker  # local: a 0.4 s import (sklearn), only for this attribute

            mask = self._mask
            if mask is None and self._inputs is not None:
                mask = self._inputs.mask_img()
            if mask is None:
                return None
            if isinstance(mask, str | Path):
                mask = nib.load(str(mask))
            if isinstance(mask, nib.Nifti1Image):
                data = np.asarray(mask.dataobj) != 0
                mask = NiftiMasker(nib.Nifti1Image(data.astype(np.uint8), mask.affine), standardize=False,
                                   detrend=False, smoothing_fwhm=None, dtype=FLOAT)
            if not hasattr(mask, "transform"):
                raise InputError("mask argument must be a string, a nibabel image, or a Nilearn Masker instance.")
            if not (hasattr(mask, "mask_img_") or hasattr(mask, "labels_img_")):
                mask.fit()
            self._masker = mask
        return self._masker

    @masker.setter
    def masker(self, value):
        self._mask, self._masker = value, None

    def __getstate__(self):
        """Pickled with its maps computed and its mask as an image (the store may be temporary)."""
        state = dict(self.__dict__)
        state["_maps"] = self.maps
        if self._inputs is not None:
            if state["_mask"] is None:
                state["_mask"] = self._inputs.mask_img()
            state["_inputs"] = None
        state["_lazy"], state["_hooks"] = None, []
        return state

    def get_map(self, name: str, return_type: str = "image"):
        """A map as a NIfTI image (NaN -> 0, as NiMARE) or as a 1-D array.

        Parameters
        ----------
        name : str
            Key of :attr:`maps`; the old (0.0.x) names ``cope``, ``log_p`` and ``thresh_z``
            give ``est``, ``logp`` and ``z_corr-cluster`` where the result has no map so named.
        return_type : {"image", "array"}
        """
        maps = self.maps
        if name not in maps:
            name = OLD_MAP_NAMES.get(name, name)
        if maps.get(name) is None:
            raise InputError(f"No map with name '{name}' found; maps are {sorted(maps)}.")
        if return_type == "array":
            return maps[name]
        if return_type != "image":
            raise InputError(f"return_type must be 'image' or 'array'; received {return_type!r}.")
        if self._inputs is not None and self._mask is None:
            return self._image(maps[name])
        values = maps[name]
        if np.issubdtype(values.dtype, np.floating):
            values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        try:
            return self.masker.inverse_transform(values)
        except IndexError:
            return squeeze_image(self.masker.inverse_transform([values]))

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
        """A copy (its own maps dict, tables and estimator; corrections add to the copy only)."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)  # not copy.copy: __getstate__ computes the maps
        new.estimator = _deepcopy(self.estimator)
        if self._maps is not None:
            new._maps = {k: v.copy() for k, v in self._maps.items()}
        new._hooks = list(self._hooks)
        new.tables = copy.deepcopy(self.tables)
        new.metadata = {}
        return new

    def save(self, filename, compress=True, with_inputs=True):
        """Pickle the result (maps computed first); ``with_inputs=False`` leaves out the
        estimator's input arrays (``inputs_``'s image entries), as NiMARE's."""
        if with_inputs:
            return NiMAREBase.save(self, filename, compress)
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        estimator = type(self.estimator).__new__(type(self.estimator))
        estimator.__dict__.update(self.estimator.__dict__)
        inputs = getattr(estimator, "inputs_", None)
        if inputs:
            estimator.inputs_ = {k: v for k, v in inputs.items() if not k.endswith("_maps") and k != "data_bags"}
        new.estimator = estimator
        return NiMAREBase.save(new, filename, compress)

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
