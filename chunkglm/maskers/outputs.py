"""Outputs of the maps maskers: region signals as a labelled DataArray, BIDS TSV files, a zarr group.

``MultiMapsMasker.transform_to_xarray`` gives a (run, time, region)
DataArray (:func:`to_xarray`); :func:`save_timeseries` writes it as
BIDS-derivative TSV + JSON files per run (named, staged and written by
:mod:`chunkglm.io.derivatives`, as every derivative output),
:func:`save_timeseries_to_store` as ``timeseries/<atlas>`` of a zarr store.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from chunkglm.io.derivatives import StagedOutput, bids_filename, check_label, dataset_description, write_json
from chunkglm.io.layout import list_written, writer_store

_ENTITY_ORDER = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo", "space")
#: Entities of the timeseries file names, in order (then desc-<atlas>).
_NAME_ENTITIES = ("sub", "ses", "task", "acq", "run")
#: The time series files in the output's .bidsignore: BIDS has no ``_timeseries`` suffix for
#: func derivatives yet (BEP012), so the validator would refuse the names.
TIMESERIES_BIDSIGNORE = ("*_timeseries.tsv", "*_timeseries.json")


def to_xarray(signals, nodes, region_indices) -> xr.DataArray:
    """The (run, time, region) DataArray of ``transform_to_xarray`` (NaN-padded, entities as coordinates)."""
    n_time = max((s.shape[0] for s in signals), default=0)
    n_regions = len(region_indices)
    values = np.full((len(signals), n_time, n_regions), np.nan, dtype=np.float64)
    for index, array in enumerate(signals):
        values[index, :array.shape[0]] = array.reshape(array.shape[0], -1)
    entities = [dict(node.entities) for node in nodes]
    coords = {"run": [node.name for node in nodes], "time": np.arange(n_time),
              "region": np.asarray(region_indices, dtype=int)}
    for key in _ENTITY_ORDER:
        if any(key in e for e in entities):
            coords[_entity_coord(key)] = ("run", [str(e.get(key, "")) for e in entities])
    coords["repetition_time"] = ("run", [float(node.attrs.get("RepetitionTime") or np.nan) for node in nodes])
    coords["n_scans"] = ("run", [int(s.shape[0]) for s in signals])
    return xr.DataArray(values, dims=("run", "time", "region"), coords=coords, name="region_signals")


def _entity_coord(key):
    """Coordinate name of a BIDS entity ("run" names the dimension: its entity is "run_label")."""
    return "run_label" if key == "run" else key


def atlas_label(atlas) -> str:
    """The atlas name as it is: it becomes the BIDS ``desc-`` label, so letters and digits only."""
    return check_label(atlas, "atlas (the desc- label of the file names)")


def timeseries_filename(entities: dict, atlas: str, fallback: str) -> str:
    """``sub-01_ses-1_task-rest_run-1_desc-<atlas>_timeseries.tsv`` (BIDS derivatives)."""
    prefix = bids_filename({k: entities[k] for k in _NAME_ENTITIES if entities.get(k)}, None, None,
                           order=_NAME_ENTITIES)
    return f"{prefix or fallback}_desc-{atlas_label(atlas)}_timeseries.tsv"


def save_timeseries(signals, out_dir, atlas: str) -> list[Path]:
    """Write per-run BIDS-derivative TSV files (+ JSON sidecars) from ``transform_to_xarray``.

    Files go to ``out_dir/sub-XX[/ses-YY]/func/`` (``out_dir`` for runs
    without a subject); columns are ``map-<index>``; the NaN padding is cut.
    The files are written aside and moved into ``out_dir`` once all are
    written (:class:`chunkglm.io.derivatives.StagedOutput`): after an error
    ``out_dir`` is as it was.

    ``out_dir`` may be an object-store URL (``s3://bucket/x``): the files are
    then uploaded by the staging, with the environment's credentials.

    Returns
    -------
    list of Path or str
        The TSV files written (URLs, credentials removed, for an object store).
    """
    atlas_label(atlas)
    width = max(3, len(str(int(signals["region"].max()) if signals.sizes["region"] else 0)))
    columns = [f"map-{int(i):0{width}d}" for i in signals["region"].values]
    with StagedOutput(out_dir) as staged:
        staged.ignore(TIMESERIES_BIDSIGNORE)  # BEP012's time series: not in BIDS yet
        for index in range(signals.sizes["run"]):
            run = signals.isel(run=index)
            entities = {k: str(run[_entity_coord(k)].item()) for k in _ENTITY_ORDER
                        if _entity_coord(k) in run.coords and str(run[_entity_coord(k)].item())}
            folder = [f"sub-{entities['sub']}"] if "sub" in entities else []
            folder += [f"ses-{entities['ses']}"] if "ses" in entities and "sub" in entities else []
            folder += ["func"] if "sub" in entities else []
            relative = "/".join([*folder, timeseries_filename(entities, atlas, str(run["run"].item()))])
            n_scans = int(run["n_scans"].item())
            pd.DataFrame(run.values[:n_scans], columns=columns).to_csv(staged.path(relative), sep="\t",
                                                                       index=False, na_rep="n/a")
            t_r = float(run["repetition_time"].item())
            sidecar = {"Columns": columns, "Atlas": atlas, "Sources": [str(run["run"].item())],
                       **({"SamplingFrequency": 1.0 / t_r, "RepetitionTime": t_r} if np.isfinite(t_r) else {})}
            write_json(staged.path(relative.removesuffix(".tsv") + ".json"), sidecar, indent=2, sort_keys=False)
        if staged.existing("dataset_description.json") is None:
            write_json(staged.path("dataset_description.json"), dataset_description("chunkglm region signals"),
                       indent=2, sort_keys=False)
    return [path for path in staged.written if str(path).endswith("_timeseries.tsv")]


def save_timeseries_to_store(signals, store, atlas: str, storage_options=None) -> str:
    """Write the (run, time, region) DataArray to ``timeseries/<atlas>`` of a zarr store.

    Returns the group path written.
    """
    path = f"timeseries/{atlas_label(atlas)}"
    signals.to_dataset(name="region_signals").to_zarr(
        writer_store(store, storage_options), group=path, mode="w", zarr_format=3, consolidated=False)
    list_written(store, path, storage_options)
    return path
