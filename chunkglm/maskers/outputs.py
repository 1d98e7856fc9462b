"""Outputs of the maps maskers: region signals as a labelled DataArray, BIDS TSV files, a zarr group.

``MultiMapsMasker.transform_to_xarray`` gives a (run, time, region)
DataArray (:func:`to_xarray`); :func:`save_timeseries` writes it as
BIDS-derivative TSV + JSON files per run, :func:`save_timeseries_to_store`
as ``timeseries/<atlas>`` of a zarr store.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from chunkglm._version import __version__
from chunkglm.errors import InputError
from chunkglm.io.store import zarr_store

_ENTITY_ORDER = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo", "space")


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


def _label(atlas):
    if not isinstance(atlas, str) or not re.fullmatch(r"[A-Za-z0-9]+", atlas):
        raise InputError(f"atlas becomes the BIDS desc- label and must be alphanumeric; received {atlas!r}.")
    return atlas


def timeseries_filename(entities: dict, atlas: str, fallback: str) -> str:
    """``sub-01_ses-1_task-rest_run-1_desc-<atlas>_timeseries.tsv`` (BIDS derivatives)."""
    parts = [f"{k}-{entities[k]}" for k in ("sub", "ses", "task", "acq", "run") if entities.get(k)]
    prefix = "_".join(parts) if parts else fallback
    return f"{prefix}_desc-{_label(atlas)}_timeseries.tsv"


def save_timeseries(signals, out_dir, atlas: str) -> list[Path]:
    """Write per-run BIDS-derivative TSV files (+ JSON sidecars) from ``transform_to_xarray``.

    Files go to ``out_dir/sub-XX[/ses-YY]/func/`` (``out_dir`` for runs
    without a subject); columns are ``map-<index>``; the NaN padding is cut.

    Returns
    -------
    list of Path
        The TSV files written.
    """
    out = Path(out_dir)
    _label(atlas)
    written = []
    width = max(3, len(str(int(signals["region"].max()) if signals.sizes["region"] else 0)))
    columns = [f"map-{int(i):0{width}d}" for i in signals["region"].values]
    for index in range(signals.sizes["run"]):
        run = signals.isel(run=index)
        entities = {k: str(run[_entity_coord(k)].item()) for k in _ENTITY_ORDER
                    if _entity_coord(k) in run.coords and str(run[_entity_coord(k)].item())}
        folder = out / f"sub-{entities['sub']}" if "sub" in entities else out
        folder = folder / f"ses-{entities['ses']}" if "ses" in entities and "sub" in entities else folder
        folder = folder / "func" if "sub" in entities else folder
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / timeseries_filename(entities, atlas, str(run["run"].item()))
        n_scans = int(run["n_scans"].item())
        pd.DataFrame(run.values[:n_scans], columns=columns).to_csv(path, sep="\t", index=False, na_rep="n/a")
        t_r = float(run["repetition_time"].item())
        sidecar = {"Columns": columns, "Atlas": atlas, "Sources": [str(run["run"].item())],
                   **({"SamplingFrequency": 1.0 / t_r, "RepetitionTime": t_r} if np.isfinite(t_r) else {})}
        path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2))
        written.append(path)
    description = out / "dataset_description.json"
    if not description.exists():
        description.write_text(json.dumps({
            "Name": "chunkglm region signals", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "chunkglm", "Version": __version__}]}, indent=2))
    return written


def save_timeseries_to_store(signals, store, atlas: str, storage_options=None) -> str:
    """Write the (run, time, region) DataArray to ``timeseries/<atlas>`` of a zarr store.

    Returns the group path written.
    """
    path = f"timeseries/{_label(atlas)}"
    signals.to_dataset(name="region_signals").to_zarr(
        zarr_store(store, storage_options), group=path, mode="w", zarr_format=3, consolidated=False)
    return path
