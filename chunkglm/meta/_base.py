"""What NiMARE's ``NiMAREBase`` gives its estimators, correctors and results, without NiMARE.

``get_params`` with NiMARE's keys (the sorted named parameters of the class's own
``__init__``; chunkglm-only options are left out and reported by
``chunkglm_params``), ``set_params`` (NiMARE's error for an unknown key),
``save``/``load`` (pickle, gzip by default), and ``inputs_`` as NiMARE's dict
(:class:`FittedInputs`: the image arrays are read from the store when first asked for).
"""

from __future__ import annotations

import gzip
import inspect
import pickle
from collections.abc import MutableMapping

import numpy as np


class NiMAREBase:
    """``get_params``/``set_params``/``save``/``load`` as NiMARE's ``NiMAREBase``."""

    #: Constructor parameters that NiMARE's class does not have (reported by :meth:`chunkglm_params`).
    _chunkglm_only: tuple[str, ...] = ()

    @classmethod
    def _get_param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        names = [p.name for p in signature.parameters.values()
                 if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        return sorted(n for n in names if n not in cls._chunkglm_only)

    def get_params(self, deep=True) -> dict:
        """NiMARE's parameters of this object (``<name>__<sub>`` for nested objects when ``deep``)."""
        out = {}
        for key in self._get_param_names():
            value = getattr(self, key, None)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                out.update((f"{key}__{k}", v) for k, v in value.get_params().items())
            out[key] = value
        return out

    def chunkglm_params(self) -> dict:
        """chunkglm's own options (not NiMARE's parameters) and their values."""
        names = []
        for klass in type(self).__mro__:
            if "__init__" in vars(klass) and klass is not object:
                names += [p for p in inspect.signature(klass.__init__).parameters
                          if p not in ("self", "kwargs", "args") and p not in names]
        nimare = set(self._get_param_names())
        return {n: getattr(self, n) for n in names if n not in nimare and hasattr(self, n)}

    def set_params(self, **params):
        """Set parameters (NiMARE's ``set_params``); returns self."""
        if not params:
            return self
        valid = self.get_params(deep=True)
        valid.update(self.chunkglm_params())
        nested = {}
        for key, value in params.items():
            key, delim, sub_key = key.partition("__")
            if key not in valid:
                raise ValueError(f"Invalid parameter {key} for estimator {self}. Check the list of available "
                                 "parameters with `estimator.get_params().keys()`.")
            if delim:
                nested.setdefault(key, {})[sub_key] = value
            else:
                setattr(self, key, value)
        for key, sub in nested.items():
            valid[key].set_params(**sub)
        return self

    def save(self, filename, compress=True):
        """Pickle this object to ``filename`` (gzip-compressed unless ``compress=False``)."""
        opener = gzip.GzipFile if compress else open
        with opener(filename, "wb") as handle:
            pickle.dump(self, handle)

    @classmethod
    def load(cls, filename, compressed=True):
        """Load a pickled object, checking that it is a ``cls``."""
        opener = gzip.GzipFile if compressed else open
        with opener(filename, "rb") as handle:
            obj = pickle.load(handle)
        if not isinstance(obj, cls):
            raise OSError(f"Pickled object must be {cls}, not {type(obj)}")
        return obj


class FittedInputs(MutableMapping):
    """An estimator's ``inputs_`` with NiMARE's keys.

    ``id`` (analysis ids), ``<type>_maps`` ((K, V) arrays of the in-mask values,
    read from the store on first access), ``sample_sizes`` (each analysis' list, as
    NiMARE keeps them), ``contrast_names`` (an integer dependence-group code per
    image), ``corr_matrix`` (the null correlation of the combination tests' groups, or None),
    and, as NiMARE's, ``aggressive_mask`` (the voxels usable in every image) with
    ``aggressive_mask=True``, ``data_bags`` (each missing-data pattern's rows and voxels) without.
    """

    def __init__(self, values: dict, loaders: dict):
        self._values = dict(values)
        self._loaders = dict(loaders)

    def __getitem__(self, key):
        if key not in self._values and key in self._loaders:
            value = self._loaders.pop(key)()
            self._values[key] = value if isinstance(value, dict) else np.asarray(value)
        return self._values[key]

    def __setitem__(self, key, value):
        self._loaders.pop(key, None)
        self._values[key] = value

    def __delitem__(self, key):
        self._loaders.pop(key, None)
        self._values.pop(key, None)

    def __iter__(self):
        return iter(list(self._values) + [k for k in self._loaders if k not in self._values])

    def __len__(self):
        return len(set(self._values) | set(self._loaders))

    def __getstate__(self):
        return {"_values": {k: self[k] for k in self}, "_loaders": {}}

    def __repr__(self):
        return f"FittedInputs({sorted(self)})"
