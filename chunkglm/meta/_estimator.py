"""``IBMAEstimator``: parameters, inputs as NiMARE takes them, and the block graph.

The estimators of :mod:`chunkglm.meta.ibma` subclass it. ``fit`` takes a maps
collection of a cohort store, a table of NIfTI paths, or a NiMARE ``Dataset`` /
``Studyset`` (duck typed, :mod:`chunkglm.meta._nimare_inputs`); NIfTI inputs are
converted once into a store (resampled onto the mask where their grid differs,
as NiMARE resamples), keeping only the analyses that hold every input the
estimator reads, as NiMARE does.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging

import numpy as np
import pandas as pd

from chunkglm._version import __version__
from chunkglm.chunking import MemoryBudget
from chunkglm.errors import InputError
from chunkglm.graph import meta as meta_graph
from chunkglm.kernels import meta as km
from chunkglm.meta import _bags
from chunkglm.meta import _nimare_inputs as nm
from chunkglm.meta._base import FittedInputs, NiMAREBase
from chunkglm.meta._blocks import (
    _ROLE_OF,
    _correlation_moments,
    _fit_block,
    _image_any_valid,
    _image_roles,
    _role,
    _stored_roles,
)
from chunkglm.meta._inputs import DERIVATIONS, ROLES, MetaMaps, resolve
from chunkglm.meta.results import MetaResult

LGR = logging.getLogger("chunkglm.meta.ibma")

_REMOVED = {
    "resample": "resample was removed in 0.2.0. Images are now resampled only when their shape or affine "
                "differs from the mask's, which needs no switch. Pass 'resample__<name>' to control how that "
                "resampling is done.",
    "memory_limit": "memory_limit was removed in 0.2.0. Input images are converted once into a chunked store, "
                    "so peak memory does not depend on a limit set here.",
    "normalize_contrast_weights": "normalize_contrast_weights was removed in 0.21.0. Repeated images are "
                                  "dependence groups (groupby); pass groupby=False to treat every image as "
                                  "independent instead.",
}


class IBMAEstimator(NiMAREBase):
    """Base class: parameters, input checks and the block graph.

    Parameters
    ----------
    aggressive_mask : bool
        Drop every voxel that is zero or NaN in any input map (NiMARE's
        ``aggressive_mask=True``); default fits each missing-data pattern
        with its own studies.
    memory, memory_level, generate_description
        Accepted for NiMARE compatibility (caching does not apply here).
    mask : str, Path, nibabel image or nilearn masker, optional
        Restricts the analysed voxels. A ``NiftiMasker`` acts through its mask; a
        masker that averages across voxels (``NiftiLabelsMasker``) transforms the
        NIfTI inputs as NiMARE's does (one feature per label), refused by the
        combination tests (Fishers, Stouffers) and warned about by the others.
    groupby : None, False, str or array-like
        None (NiMARE's default) groups images by ``study_id``, a str by that
        per-image coordinate, an array gives one label per image; images
        sharing a label are a dependence group, modelled as NiMARE 0.22 models
        them (:mod:`chunkglm.kernels.meta.dependence`). False treats every
        image as independent. A missing-data pattern whose images all belong to
        one group is not fitted (NaN), as in NiMARE.
    store : str or Path, optional
        Where NIfTI/Dataset inputs are converted (default: a temporary store).
    chunk_voxels : int, optional
        Voxels per block of the graph (default: each store chunk split so that
        a task's float64 (K, voxel) block is within half of ``chunk_bytes``).
    chunk_bytes : int or str, optional
        chunkglm only: the memory budget (:class:`chunkglm.chunking.MemoryBudget`),
        uncompressed bytes per chunk of converted inputs; task blocks derive
        from it (:func:`chunkglm.graph.meta.task_blocks`). Default 64 MiB.
    **kwargs
        ``resample__<option>``: options of ``nilearn.image.resample_to_img`` for
        maps not on the mask's grid (NiMARE's defaults ``clip=True``,
        ``interpolation="linear"``).
    """

    _kernel: str = ""
    #: How a masker that averages across voxels is met: "reject", "warn" or None (NiMARE's).
    _voxel_averaging = "warn"
    _chunkglm_only = ("store", "chunk_voxels", "chunk_bytes")
    _min_analyses = _bags.MIN_STUDIES
    #: Whether the kernel models dependence groups (NiMARE 0.22's new-API estimators); the
    #: old-API classes (NiMARE 0.0.x had no groups) refuse repeated labels instead.
    _models_dependence = False
    #: Whether the kernel reads the null correlation between grouped images (the combination tests).
    _requires_corr_matrix = False

    def __init__(self, aggressive_mask=False, memory=None, memory_level=0, generate_description=True, *,
                 mask=None, groupby=None, store=None, chunk_voxels=None, chunk_bytes=None, **kwargs):
        _check_kwargs(type(self).__name__, kwargs)
        self.aggressive_mask = aggressive_mask
        self.memory = memory
        self.memory_level = memory_level
        self.generate_description = generate_description
        self.mask = mask
        self.masker = mask
        self.groupby = groupby
        self.store = store
        self.chunk_voxels = chunk_voxels
        self.chunk_bytes = chunk_bytes
        self._resample_kwargs = nm.resample_options(kwargs)

    # -- what subclasses declare ----------------------------------------------------

    def _kernel_name(self) -> str:
        return self._kernel

    def _kernel_params(self) -> dict:
        """Estimator parameters the kernel takes, by the kernel's keyword names."""
        return {}

    def _roles(self) -> tuple[str, ...]:
        """Kernel inputs (keyword names) this fit passes."""
        return tuple(km.INPUTS[self._kernel_name()])

    def _aliases(self) -> dict:
        """Kernel input name -> map type, where they differ (``con`` is ``beta``)."""
        return dict(_ROLE_OF)

    def _row_scale(self, blocks, stored, rows):
        """Per-image divisor of the image inputs (old RFX_GLM's global normalisation), or None."""
        return None

    def _outputs(self) -> tuple[str, ...]:
        return tuple(km.OUTPUTS[self._kernel_name()])

    def _description(self, n_images: int) -> str:
        return (f"An image-based meta-analysis was performed with chunkglm {__version__} on "
                f"{n_images} images using the {type(self).__name__} estimator, reproducing "
                "NiMARE 0.22's implementation.")

    def _image_input_fields(self) -> dict:
        """NiMARE's ``inputs_`` keys of the image inputs -> map type (``z_maps`` -> ``z``)."""
        aliases = self._aliases()
        return {f"{_role(r, aliases)}_maps": _role(r, aliases) for r in _image_roles(self._roles())}

    def _required_names(self) -> list[str]:
        names = list(self._image_input_fields())
        return names + (["sample_sizes"] if "sample_sizes" in self._roles() else [])

    # -- fit ------------------------------------------------------------------------

    def fit(self, dataset, drop_invalid=True) -> MetaResult:
        """Fit to a maps collection, a table of NIfTI paths or a NiMARE Dataset/Studyset.

        Parameters
        ----------
        dataset : chunkglm.io.cohort.Node, pandas.DataFrame, nimare Dataset or Studyset
            See :func:`chunkglm.meta._inputs.resolve`.
        drop_invalid : bool
            Drop analyses without the required data and images with no usable
            voxel (NiMARE's default, with its warning); False raises.

        Returns
        -------
        MetaResult
            Lazy until a map is read.

        Notes
        -----
        Global passes at fit, each one read of the inputs: which images hold any
        usable voxel (NiMARE drops the others), with ``aggressive_mask`` or when the
        inputs were converted in this fit (a stored collection in the default mode
        is not read: its empty images drop out of every missing-data pattern
        anyway); and for the old RFX tests each map's standard deviation over voxels.
        """
        self._drop_invalid = drop_invalid
        inputs, mask, collection = self._needed_images(dataset, drop_invalid)
        self.masker = self.mask if self.mask is not None else getattr(collection, "masker", None)
        self._check_masker()
        converted = isinstance(inputs, pd.DataFrame)
        maps = resolve(inputs, mask, store=self.store, resample=self._resample_kwargs,
                       chunk_bytes=MemoryBudget.of(self.chunk_bytes).chunk_bytes)
        self._meta_maps = maps
        roles = self._roles()
        self._check_inputs(maps, roles)
        rows = self._usable_images(maps, roles, drop_invalid) if self.aggressive_mask or converted else None
        self.images_ = rows
        self._set_inputs(maps, rows, inputs if converted else None, collection)
        if self._requires_corr_matrix and self._grouped():
            self.inputs_["corr_matrix"] = self._null_correlation(maps, roles, rows)
        lazy = self._graph(maps, roles, rows)
        n_images = maps.n_images if rows is None else int(rows.size)
        masker = mask if nm.is_masker(mask) and not nm.is_voxel_masker(mask) else None
        result = MetaResult._from_graph(self, lazy, self._outputs(), maps,
                                        self._description(n_images) if self.generate_description else "",
                                        masker=masker)
        result.tables.update(self._tables())
        return result

    def _check_masker(self):
        masker = self.masker
        if self._voxel_averaging is None or not nm.is_masker(masker) or type(masker).__name__ == "NiftiMasker":
            return
        if self._voxel_averaging == "reject":
            raise InputError(f"A {type(masker)} mask has been detected. Only NiftiMaskers are allowed for this "
                             "Estimator. This is because aggregation, such as averaging values across ROIs, "
                             "will produce invalid results.")
        LGR.warning(f"A {type(masker)} mask has been detected. Masks which average across voxels will likely "
                    "produce biased results when used with this Estimator.")

    def _needed_images(self, dataset, drop_invalid=True):
        """A table (or NiMARE Dataset/Studyset) reduced to the map types this estimator reads and
        to the analyses holding all of them (NiMARE's ``collect_inputs``), so that only those are
        converted. Returns ``(inputs, mask, collection)``: a collection's mask unless ``mask`` was given."""
        mask, collection = self.mask, None
        if isinstance(dataset, pd.DataFrame):
            dataset = nm.with_new_image_types(dataset)
        if nm.is_collection(dataset):
            collection = dataset
            dataset, masker = nm.table_from_collection(dataset, ROLES)
            mask = masker if mask is None else mask
        if not isinstance(dataset, pd.DataFrame):
            return dataset, mask, collection
        needed = self._needed_roles(dataset)
        sizes = "sample_sizes" in self._roles()
        table = dataset.drop(columns=[c for c in ROLES if c in dataset.columns and c not in needed])
        if collection is not None or not needed - set(dataset.columns):
            self._select_analyses(table, needed, sizes, drop_invalid, len(dataset))
            keep = nm.usable_rows(table, needed, sizes)
            table = table[keep].reset_index(drop=True)
            if "sample_sizes" in table.columns and any(nm.sample_size_list(v) is None for v in table["sample_sizes"]):
                table = table.drop(columns=["sample_sizes"])
            self._collected = keep
            if collection is not None and not keep.all():
                collection = _narrow(collection, keep)
        self.studyset_ = collection
        return table, mask, collection

    def _needed_roles(self, table) -> set:
        aliases, needed = self._aliases(), set()
        for arg in _image_roles(self._roles()):
            role = _role(arg, aliases)
            if role in table.columns or role not in DERIVATIONS:
                needed.add(role)
            else:
                needed.update(s for s in DERIVATIONS[role] if s != "sample_sizes")
        return needed

    def _select_analyses(self, table, needed, sizes, drop_invalid, n_submitted):
        """NiMARE's checks of the analyses holding the required data (before any image is read)."""
        names = {f"{r}_maps": r for r in needed}
        empty = [name for name, r in names.items()
                 if r not in table.columns or not nm.usable_rows(table, [r], False).any()]
        if sizes and not nm.usable_rows(table, [], True).any():
            empty.append("sample_sizes")
        if empty:
            raise InputError(f"The collection has no data for {', '.join(map(repr, empty))}. Check the requested "
                             "image type, metadata field or annotation.")
        keep = nm.usable_rows(table, needed, sizes)
        if not keep.all() and not drop_invalid:
            raise InputError(f"{int((~keep).sum())} of {keep.size} analyses lack required data; pass "
                             "drop_invalid=True to analyse the rest")
        n_used = int(keep.sum())
        if n_used < self._min_analyses:
            dropped = ""
            if n_submitted > n_used:
                dropped = (f"; the other {n_submitted - n_used} lacked required data "
                           f"({', '.join(repr(n) for n in self._required_names())})")
            raise InputError(
                f"{type(self).__name__} needs at least {self._min_analyses} analyses, but {n_used} of the "
                f"{n_submitted} submitted reached the estimator{dropped}. One analysis has no independent "
                "replication to estimate a variance from, so every output map would be NaN.")

    def _set_inputs(self, maps: MetaMaps, rows, table, collection) -> None:
        """``inputs_`` as NiMARE's dict (image arrays read when first asked for)."""
        select = np.arange(maps.n_images) if rows is None else rows
        ids = np.asarray(maps.ids)[select].tolist()
        values = {"id": ids, "corr_matrix": None}
        if "sample_sizes" in self._roles():
            raw = list(table["sample_sizes"]) if table is not None and "sample_sizes" in table.columns else None
            sizes = maps.sample_sizes
            values["sample_sizes"] = ([nm.sample_size_list(raw[i]) for i in select] if raw is not None
                                      else [[float(v)] for v in sizes[select]])
        values["contrast_names"] = self._group_codes(maps, select)
        if isinstance(self.groupby, str):  # NiMARE collects the field as a metadata input
            values["dependence_groups"] = self._group_labels(maps, select)
        fields = {name: role for name, role in self._image_input_fields().items() if role in maps.variables}
        loaders = {name: (lambda role=role: _read_rows(maps, role, rows)) for name, role in fields.items()}
        if self.aggressive_mask:
            loaders["aggressive_mask"] = lambda: _validity(inputs, fields).all(axis=0)
        else:
            loaders["data_bags"] = lambda: _data_bags(inputs, fields)
        inputs = self.inputs_ = FittedInputs(values, loaders)
        if collection is not None and rows is not None and rows.size != maps.n_images:
            keep = np.zeros(maps.n_images, dtype=bool)
            keep[rows] = True
            self.studyset_ = _narrow(collection, keep)

    def _tables(self) -> dict:
        """Non-map outputs (NiMARE: the assumed tau2 of WLS and FixedEffectsHedges)."""
        if hasattr(self, "tau2"):
            return {"level-estimator": pd.DataFrame(columns=["tau2"], data=[self.tau2])}
        return {}

    def _check_inputs(self, maps: MetaMaps, roles) -> None:
        name = type(self).__name__
        missing = [self._aliases().get(r, _role(r)) for r in roles
                   if self._aliases().get(r, _role(r)) not in maps.available()]
        if missing:
            how = {"sample_sizes": "a sample_sizes column / coordinate",
                   "varcope": "varcope maps (or se maps: varcope = se**2)",
                   "z": "z maps (or t maps with sample_sizes)"}
            raise InputError(f"{name} needs {', '.join(how.get(r, f'{r} maps') for r in missing)}; the "
                             f"collection {maps.node.name!r} holds {sorted(maps.available())}.")
        if maps.n_images < self._min_analyses:
            raise InputError(f"{name} needs at least {self._min_analyses} analyses, but {maps.n_images} of the "
                             f"{maps.n_images} submitted reached the estimator. One analysis has no independent "
                             "replication to estimate a variance from, so every output map would be NaN.")

    def _group_labels(self, maps: MetaMaps, select) -> list:
        """One dependence-group label per fitted image (NiMARE's ``_resolve_group_labels``)."""
        if self.groupby is False:
            return list(np.asarray(maps.ids)[select])
        if self.groupby is None:
            labels = maps.coord("study_id")
            return list(np.asarray(maps.ids if labels is None else labels)[select])
        if isinstance(self.groupby, str):
            labels = maps.coord(self.groupby)
            if labels is None:
                raise InputError(f"groupby={self.groupby!r} names no per-image coordinate of the collection.")
            return list(np.asarray(labels)[select])
        labels = list(np.asarray(self.groupby).ravel())
        collected = getattr(self, "_collected", None)
        if collected is not None and len(labels) == collected.size:  # positional: dropped analyses drop theirs
            labels = [label for label, keep in zip(labels, collected) if keep]
        if len(labels) == maps.n_images:
            labels = [labels[i] for i in select]
        if len(labels) != len(select):
            raise InputError(f"groupby must contain one label per image: expected {len(select)}, got {len(labels)}.")
        return labels

    def _group_codes(self, maps: MetaMaps, select) -> np.ndarray:
        """NiMARE's ``contrast_names``: labels coded in their sorted str order (every image its
        own code with ``groupby=False``, NiMARE's warning when that hides repeated labels)."""
        labels = self._group_labels(maps, select)
        if self.groupby is False:
            repeated = len(labels) - len(set(labels))
            if repeated:
                LGR.warning(f"{repeated} image(s) share a group with another image, but groupby=False was "
                            "requested, so they will be treated as independent. This inflates significance.")
            labels = list(np.asarray(maps.ids)[select])
        elif not self._models_dependence:
            _refuse_groups(type(self).__name__, labels, "study_id" if self.groupby is None else
                           (self.groupby if isinstance(self.groupby, str) else "groupby"))
        codes = {label: i for i, label in enumerate(sorted(set(labels), key=str))}
        self._group_label_of = {code: label for label, code in codes.items()}
        return np.array([codes[label] for label in labels])

    def _grouped(self) -> bool:
        """Whether some fitted images share a dependence group."""
        codes = np.asarray(self.inputs_["contrast_names"])
        return np.unique(codes).size < codes.size

    def _usable_images(self, maps, roles, drop_invalid) -> np.ndarray:
        """NiMARE drops images with no usable voxel, naming them (one global pass)."""
        stored = _stored_roles(roles, maps, self._aliases())
        blocks = [self._stored(maps, r) for r in stored]
        keep = meta_graph.rows_with_any(_image_any_valid, blocks, roles=roles, stored=stored,
                                        sample_sizes=maps.sample_sizes, aliases=self._aliases())
        if keep.all():
            return np.arange(keep.size)
        ids = np.asarray(maps.ids)
        dropped = ", ".join(ids[~keep])
        if not drop_invalid:
            raise InputError(f"{int((~keep).sum())} of {keep.size} images have no voxel with a usable value in every "
                             f"required input, so they can contribute nothing: {dropped}. Pass drop_invalid=True "
                             "to drop them and analyse the rest.")
        if not keep.any():
            raise InputError(f"None of the {keep.size} images have a voxel with a usable value in every required "
                             f"input, so there is nothing to meta-analyse: {dropped}.")
        LGR.warning("Dropping %d of %d image(s) with no voxel holding a usable value in every required input: %s.",
                    int((~keep).sum()), keep.size, dropped)
        if keep.sum() < self._min_analyses:
            raise InputError(f"{type(self).__name__} needs at least {self._min_analyses} analyses, but only "
                             f"{int(keep.sum())} image(s) hold usable values.")
        return np.flatnonzero(keep)

    def _null_correlation(self, maps: MetaMaps, roles, rows):
        """NiMARE's ``corr_matrix``: the null correlation between the fitted images' first input
        (z), from per-block moments summed (one global pass over it), or None when no two images
        share two usable voxels (NiMARE's warning)."""
        aliases = self._aliases()
        stored = _stored_roles(roles, maps, aliases)
        block = self._stored(maps, stored[0])
        if rows is not None and rows.size != maps.n_images:
            block = meta_graph.select_images(block, rows)
        sizes = maps.sample_sizes if rows is None or maps.sample_sizes is None else maps.sample_sizes[rows]
        moments = meta_graph.per_block(functools.partial(
            _correlation_moments, roles=roles, stored=stored[:1], sample_sizes=sizes, aliases=aliases), block)
        codes = np.asarray(self.inputs_["contrast_names"])
        corr = km.null_correlation(km.add_moments(moments), codes)
        if corr is not None:
            self._warn_cancelling_groups(corr, codes)
        if corr is None:
            LGR.warning("No two of the %d image(s) have two voxels both are valid at, so the null correlation "
                        "between them cannot be estimated. They are still grouped, but the reference "
                        "distribution will not be inflated for the correlation within a group, so p-values "
                        "may be anti-conservative.", codes.size)
        return corr

    def _warn_cancelling_groups(self, corr, codes) -> None:
        """NiMARE's warning for a dependence group whose images cancel (aggregated-z variance <= 1e-12):
        the kernels leave it out of every missing-data pattern where it cancels."""
        ids = np.asarray(self.inputs_["id"])
        for code in np.unique(codes):
            rows = np.flatnonzero(codes == code)
            if rows.size < 2:
                continue
            variance = float(corr[np.ix_(rows, rows)].sum() / rows.size ** 2)
            if not np.isfinite(variance) or variance <= km.CANCELLATION_FLOOR:
                LGR.warning("Dependence group %s (image(s) %s) is excluded wherever all its images are present: "
                            "its aggregated z statistic has variance %.3g, so its images cancel and carry no "
                            "information. Usually one contrast was uploaded in both directions, or the group's "
                            "contrasts partition one cohort.", getattr(self, "_group_label_of", {}).get(code, code),
                            ", ".join(map(str, ids[rows])), variance)

    def _stored(self, maps: MetaMaps, role):
        """A stored map type in the voxel blocks of the tasks (lazy)."""
        return meta_graph.task_array(maps.data(role), self.chunk_voxels, self.chunk_bytes)

    def _graph(self, maps: MetaMaps, roles, rows):
        """(n_outputs, V) float64 dask array of the estimator's maps."""
        aliases = self._aliases()
        stored = _stored_roles(roles, maps, aliases)
        blocks = [self._stored(maps, r) for r in stored]
        if rows is not None and rows.size != maps.n_images:
            blocks = [meta_graph.select_images(b, rows) for b in blocks]
        sizes = maps.sample_sizes
        if sizes is not None and rows is not None:
            sizes = sizes[rows]
        params, per_study = self._split_params(self._kernel_params())
        if self._grouped():
            codes = np.asarray(self.inputs_["contrast_names"])
            per_study["groups"] = codes
            if self._requires_corr_matrix:
                params["corr"] = self.inputs_["corr_matrix"]
                per_study["image_index"] = np.arange(codes.size)
        outputs = self._outputs()
        # one row more than the maps: which voxels held a NaN/inf (MetaResult's warning)
        return meta_graph.block_maps(
            _fit_block, blocks, len(outputs) + 1, f"meta-{type(self).__name__}", kernel_name=self._kernel_name(),
            roles=roles, stored=stored, aliases=aliases, row_scale=self._row_scale(blocks, stored, rows),
            sample_sizes=sizes, params=params, per_study=per_study, aggressive=bool(self.aggressive_mask),
            outputs=outputs)

    @staticmethod
    def _split_params(params):
        """Per-study keyword values (last axis = the fitted images, e.g. sign flips) are sliced per pattern."""
        per_study = {k: np.asarray(v) for k, v in params.items() if k in ("sign_flips",) and v is not None}
        return {k: v for k, v in params.items() if k not in per_study}, per_study

    def __deepcopy__(self, memo):
        """Parameters and small fitted attributes copied; the analysed collection, ``inputs_`` and the
        masks shared (a store, possibly temporary, is not copied)."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)  # not copy.copy: __getstate__ leaves the store link out
        shared = ("_meta_maps", "inputs_", "studyset_", "mask", "masker")
        for key, value in self.__dict__.items():
            if key not in shared:
                new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def __getstate__(self):
        """Pickled without its link to the store (``inputs_`` keeps the arrays, read now)."""
        state = dict(self.__dict__)
        state.pop("_meta_maps", None)
        return state

    def __repr__(self):
        defaults = {k: v.default for k, v in inspect.signature(type(self).__init__).parameters.items()
                    if v.default is not inspect.Parameter.empty}
        params = {k: v for k, v in self.get_params(deep=False).items() if defaults.get(k) != v}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in params.items())})"


def _read_rows(maps: MetaMaps, role, rows) -> np.ndarray:
    values = meta_graph.compute(maps.data(role))
    return values if rows is None else values[rows]


def _validity(inputs, fields) -> np.ndarray:
    """(K, V) bool: the entries usable in every image input (NiMARE's intersection of ``_usable``)."""
    arrays = {role: inputs[name] for name, role in fields.items()}
    return _bags.validity(arrays, next(iter(arrays.values())).dtype)


def _data_bags(inputs, fields) -> dict:
    """NiMARE's ``inputs_["data_bags"]``: per image input, one dict per missing-data pattern
    fitted (``values`` (s, v) float64, ``voxel_mask`` voxel indices, ``study_mask`` image
    indices), patterns in order of their first voxel, those with fewer than two images left
    out; every input shares the same index arrays. Read from the store when first asked for
    (the fit itself works block by block)."""
    valid = _validity(inputs, fields)
    patterns, inverse = _bags.voxel_patterns(valid)
    first = np.full(len(patterns), inverse.size)
    np.minimum.at(first, inverse, np.arange(inverse.size))
    rank = np.empty(len(patterns), dtype=np.intp)
    rank[np.argsort(first, kind="stable")] = np.arange(len(patterns))
    order = np.argsort(rank[inverse], kind="stable")
    bounds = np.concatenate(([0], np.cumsum(np.bincount(rank[inverse], minlength=len(patterns)))))
    bags = []
    for p in range(len(patterns)):
        voxels = order[bounds[p]:bounds[p + 1]]
        studies = np.flatnonzero(valid[:, voxels[0]])
        if studies.size >= _bags.MIN_STUDIES:
            bags.append((voxels, studies))
    return {name: [{"values": np.asarray(inputs[name][np.ix_(studies, voxels)], dtype=np.float64),
                    "voxel_mask": voxels, "study_mask": studies} for voxels, studies in bags]
            for name in fields}


def _narrow(collection, keep):
    """The collection restricted to the analyses kept (a Studyset's ``select_analyses``, a Dataset's ``slice``)."""
    if hasattr(collection, "select_analyses"):
        return collection.select_analyses(np.asarray(keep, dtype=bool))
    if hasattr(collection, "slice"):
        return collection.slice(list(np.asarray(collection.ids)[np.asarray(keep, dtype=bool)]))
    return collection


def _refuse_groups(name, labels, what):
    values, counts = np.unique(np.asarray([str(v) for v in labels]), return_counts=True)
    if (counts > 1).any():
        raise InputError(
            f"{name}: images share a {what} ({values[counts > 1][:5].tolist()} ...). {name} is NiMARE "
            "0.0.x's API, which had no dependence groups: give each image its own study_id, pass "
            "groupby=False to treat the images as independent (this inflates significance if they share "
            "participants), or use a NiMARE 0.22 estimator, which models the groups.")


def _check_kwargs(name, kwargs):
    resample = [k for k in kwargs if k.startswith("resample__")]
    other = sorted(set(kwargs) - set(resample))
    removed = [k for k in other if k in _REMOVED]
    if removed:
        raise TypeError(" ".join(_REMOVED[k] for k in removed) + f" ({name} got unexpected keyword argument(s): "
                        f"{', '.join(map(repr, removed))}.)")
    if other:
        raise TypeError(f"{name} got unexpected keyword argument(s): {', '.join(repr(k) for k in other)}. "
                        "Resampling arguments must be prefixed with 'resample__'.")
