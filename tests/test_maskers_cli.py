"""``chunkglm extract`` on a store: the TSV files equal MultiMapsMasker's signals.

The command is registered in ``cli/main.py`` by its owner; here its parser is
built the same way (``add_parser(sub, add_common)``).
"""

from __future__ import annotations

import argparse
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import chunkglm
from chunkglm.cli import extract
from chunkglm.cli.main import _add_common
from chunkglm.errors import InputError
from chunkglm.maskers import MultiMapsMasker


def _parser():
    parser = argparse.ArgumentParser(prog="chunkglm")
    sub = parser.add_subparsers(dest="command", required=True)
    extract.add_parser(sub, _add_common)
    return parser


def test_extract_command_writes_bids_timeseries(tmp_path):
    rng = np.random.default_rng(0)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    shape, n_time = (6, 7, 5), 30
    paths = []
    for run in (1, 2):
        img = nib.Nifti1Image(rng.normal(size=(*shape, n_time)).astype(np.float32), affine)
        img.header.set_zooms((3.0, 3.0, 3.0, 2.0))
        paths.append(tmp_path / f"sub-02_ses-a_task-rest_run-{run}_bold.nii.gz")
        nib.save(img, paths[-1])
    maps = np.abs(rng.normal(size=(*shape, 3))).astype(np.float32)
    nib.save(nib.Nifti1Image(maps, affine), tmp_path / "maps.nii.gz")
    store = tmp_path / "cohort.zarr"
    chunkglm.convert([str(p) for p in paths], store, chunk_bytes=2_000)
    out = tmp_path / "out"
    args = _parser().parse_args([
        "extract", "--store", str(store), "--maps", str(tmp_path / "maps.nii.gz"), "--out", str(out),
        "--atlas", "toy", "--standardize", "zscore_sample", "--detrend", "--high-pass", "0.01",
        "--cluster", "none", "--no-progress", "--to-store"])
    assert args.func(args) == 0
    nodes = sorted(chunkglm.open_cohort(store).runs.values(), key=lambda n: n.name)
    expected = MultiMapsMasker(str(tmp_path / "maps.nii.gz"), standardize="zscore_sample", detrend=True,
                               high_pass=0.01, t_r=2.0).fit_transform(nodes)
    for run, values in zip((1, 2), expected):
        path = out / "sub-02" / "ses-a" / "func" / f"sub-02_ses-a_task-rest_run-{run}_desc-toy_timeseries.tsv"
        table = pd.read_csv(path, sep="\t")
        assert list(table.columns) == ["map-000", "map-001", "map-002"]
        np.testing.assert_allclose(table.values, values, rtol=1e-6, atol=1e-6)  # TSV of float32
        assert json.loads(path.with_suffix(".json").read_text())["SamplingFrequency"] == 0.5
    stored = chunkglm.open_cohort(store).to_datatree()["timeseries/toy"]["region_signals"]
    assert stored.shape == (2, n_time, 3)


def test_extract_keeps_one_analysis_per_atlas_label(tmp_path):
    """Runs of one analysis may be extracted in batches into one folder (the record lists them all);
    other options under the same --atlas label are refused, nothing touched; --overwrite leaves only
    the new analysis's files. Before, files of two settings sat side by side, undistinguishable."""
    rng = np.random.default_rng(1)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    shape = (6, 7, 5)
    paths = []
    for sub in ("01", "02"):
        img = nib.Nifti1Image(rng.normal(size=(*shape, 20)).astype(np.float32), affine)
        img.header.set_zooms((3.0, 3.0, 3.0, 2.0))
        paths.append(tmp_path / f"sub-{sub}_task-rest_bold.nii.gz")
        nib.save(img, paths[-1])
    nib.save(nib.Nifti1Image(np.abs(rng.normal(size=(*shape, 2))).astype(np.float32), affine), tmp_path / "maps.nii.gz")
    store = tmp_path / "cohort.zarr"
    chunkglm.convert([str(p) for p in paths], store)
    out = tmp_path / "out"

    def run(*flags):
        args = _parser().parse_args(["extract", "--store", str(store), "--maps", str(tmp_path / "maps.nii.gz"),
                                     "-o", str(out), "--atlas", "toy", "--cluster", "none", "--no-progress", *flags])
        return args.func(args)

    def files():
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    assert run("--subject", "01") == 0 and run("--subject", "02") == 0  # two batches, one analysis
    record = json.loads((out / "desc-toy_provenance.json").read_text())
    assert sorted(record["outputs"]) == sorted(f"sub-{s}/func/sub-{s}_task-rest_desc-toy_timeseries.{e}"
                                               for s in ("01", "02") for e in ("tsv", "json"))
    before = files()
    with pytest.raises(InputError, match=r"already holds another extract analysis \(desc-toy_provenance.json: "
                                         r"options.detrend: false there, true now\)"):
        run("--subject", "01", "--detrend")
    assert files() == before
    assert run("--subject", "01", "--detrend", "--overwrite") == 0
    record = json.loads((out / "desc-toy_provenance.json").read_text())
    assert record["options"]["detrend"] is True
    assert not (out / "sub-02").exists() or not any((out / "sub-02").rglob("*.tsv"))
    assert set(files()) == set(record["outputs"]) | {"desc-toy_provenance.json", "dataset_description.json",
                                                    ".bidsignore"}
