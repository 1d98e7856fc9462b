"""Meta-analysis outputs: NiMARE-style NIfTI maps and a group derivatives folder.

``save_maps`` writes ``<prefix><sep><map>.nii.gz`` as NiMARE's
``MetaResult.save_maps`` (float32, NaN -> 0, the input grid's affine).

``save_derivatives`` writes a BIDS-like group folder::

    <out>/meta/dataset_description.json
    <out>/meta/<Estimator>_<map>.nii.gz        one per map; the map name is
                                                sanitised into a label ("-" and
                                                "_" kept, e.g.
                                                DerSimonianLaird_z_corr-FDR_method-indep.nii.gz)
    <out>/meta/<Estimator>.json                sidecar: Estimator, Parameters,
                                                Maps, Inputs, Corrections,
                                                Description, Software, provenance
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from chunkglm._version import __version__
from chunkglm.errors import InputError
from chunkglm.io.nifti import save_image
from chunkglm.provenance import versions

_LABEL = re.compile(r"[^A-Za-z0-9_-]")


def save_maps(result, output_dir=".", prefix="", prefix_sep="_", names=None) -> list[Path]:
    """NiMARE's ``save_maps``; returns the written paths."""
    if prefix == "":
        prefix_sep = ""
    if not prefix.endswith(prefix_sep):
        prefix = prefix + prefix_sep
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    maps = result.maps
    names = list(names or maps)
    unknown = [n for n in names if n not in maps]
    if unknown:
        raise InputError(f"no maps named {unknown}; the result has {sorted(maps)}.")
    return [save_image(result.get_map(name), output_dir / f"{_safe(prefix + name)}.nii.gz") for name in names]


def _safe(name: str) -> str:
    """A file-name label: letters, digits, - and _ only; never a path."""
    return _LABEL.sub("", name.replace("/", "-")) or "map"


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 64 else f"array of shape {value.shape}"
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def sidecar(result) -> dict:
    """The JSON sidecar of a result: estimator, parameters, inputs, corrections, software."""
    estimator = result.estimator
    inputs = result._inputs.describe()
    keep = getattr(result._inputs, "keep", None)
    sources = result._inputs.node.cohort.root[result._inputs.node.path].attrs.get("chunkglm", {}).get("sources")
    if keep is not None:  # converted from NIfTI: the files (with sha256) are the inputs
        inputs = {"files": sources, "n_images": inputs["n_images"], "variables": inputs["variables"]}
    elif sources:
        inputs["sources"] = sources
    corrector = result.corrector
    return {
        "Estimator": type(estimator).__name__,
        "Parameters": _jsonable({**getattr(estimator, "chunkglm_params", dict)(), **estimator.get_params()}),
        "Maps": sorted(result.maps),
        "Inputs": _jsonable(inputs),
        "Corrections": None if corrector is None else {"Corrector": type(corrector).__name__,
                                                       "method": corrector.method,
                                                       "alpha": getattr(corrector, "alpha", None)},
        "Description": result.description_,
        "Software": {"Name": "chunkglm", "Versions": versions()},
    }


def save_derivatives(result, output_dir, names=None) -> dict[str, Path]:
    """Write ``<output_dir>/meta/`` (maps, sidecar, dataset_description.json).

    Parameters
    ----------
    result : MetaResult
    output_dir : str or Path
    names : list of str, optional
        Maps to write (default: all).

    Returns
    -------
    dict
        Map name (and ``"mask"``, ``"sidecar"``) -> written path.
    """
    folder = Path(output_dir) / "meta"
    folder.mkdir(parents=True, exist_ok=True)
    estimator = _safe(type(result.estimator).__name__)
    names = list(names or result.maps)
    written = {name: save_image(result.get_map(name), folder / f"{estimator}_{_safe(name)}.nii.gz")
               for name in names}
    written["mask"] = save_image(result._inputs.mask_img(), folder / f"{estimator}_mask.nii.gz")
    description = {"Name": "chunkglm image-based meta-analysis", "BIDSVersion": "1.9.0",
                   "DatasetType": "derivative",
                   "GeneratedBy": [{"Name": "chunkglm", "Version": __version__}]}
    (folder / "dataset_description.json").write_text(json.dumps(description, indent=2) + "\n")
    path = folder / f"{estimator}.json"
    path.write_text(json.dumps(_jsonable(sidecar(result)), indent=2) + "\n")
    written["sidecar"] = path
    return written
