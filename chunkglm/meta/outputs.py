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
    <out>/meta/.bidsignore                     NiMARE's map names (and the JSON of
                                                all maps) are not BIDS names: listed
                                                here, so the BIDS validator checks
                                                the rest

Both name, stage and write their files through :mod:`chunkglm.io.derivatives`
(map names become labels by its ``file_label``); the files are written aside
and moved into place once all are written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chunkglm.errors import InputError
from chunkglm.io.derivatives import StagedOutput, dataset_description, file_label, write_json
from chunkglm.io.nifti import save_image
from chunkglm.provenance import versions


def save_maps(result, output_dir=".", prefix="", prefix_sep="_", names=None) -> list[Path]:
    """NiMARE's ``save_maps``; returns the written paths."""
    if prefix == "":
        prefix_sep = ""
    if not prefix.endswith(prefix_sep):
        prefix = prefix + prefix_sep
    output_dir = Path(output_dir)
    maps = result.maps
    names = list(names or maps)
    unknown = [n for n in names if n not in maps]
    if unknown:
        raise InputError(f"no maps named {unknown}; the result has {sorted(maps)}.")
    files = [f"{file_label(prefix + name)}.nii.gz" for name in names]
    with StagedOutput(output_dir) as out:
        for name, file in zip(names, files):
            save_image(result.get_map(name), out.path(file))
    return [output_dir / file for file in files]


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
    estimator = file_label(type(result.estimator).__name__)
    names = list(names or result.maps)
    files = {name: f"{estimator}_{file_label(name)}.nii.gz" for name in names}
    files["mask"] = f"{estimator}_mask.nii.gz"
    files["sidecar"] = f"{estimator}.json"
    content = _jsonable(sidecar(result))
    with StagedOutput(output_dir) as out:
        out.ignore([f"{estimator}_*", files["sidecar"]], "meta")
        for name in names:
            save_image(result.get_map(name), out.path(f"meta/{files[name]}"))
        save_image(result._inputs.mask_img(), out.path(f"meta/{files['mask']}"))
        write_json(out.path("meta/dataset_description.json"),
                   dataset_description("chunkglm image-based meta-analysis"), indent=2, sort_keys=False,
                   newline=True)
        write_json(out.path(f"meta/{files['sidecar']}"), content, indent=2, sort_keys=False, newline=True)
    return {key: folder / file for key, file in files.items()}
