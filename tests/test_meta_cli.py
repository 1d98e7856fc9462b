"""``chunkglm meta``: dependence groups (--groupby, --weight-scheme, --rho) and the ``con`` column.

The command's maps equal the Python API's on the same groups and options; NiMARE parity of
the grouped estimators themselves is in test_meta_dependence.py.
"""

from __future__ import annotations

import argparse
import json

import dask
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import _nimare_reference as reference
from chunkglm.errors import InputError
from chunkglm.meta import convert_meta_maps, ibma

STUDIES = ["s-a", "s-a", "s-b", "s-b", "s-b", "s-c", "s-d", "s-e"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("meta_cli")
    spec = reference.write_maps_folder(folder / "maps", seed=2)
    table = pd.DataFrame(spec["images"])
    table["sample_sizes"] = [s[0] for s in table["sample_sizes"]]
    table["study"] = STUDIES
    tsv = folder / "images.tsv"
    table.to_csv(tsv, sep="\t", index=False)
    node = convert_meta_maps(table, folder / "meta.zarr", "studies", mask_img=spec["mask"])
    return {"folder": folder, "spec": spec, "table": table, "tsv": tsv, "node": node}


@pytest.fixture(autouse=True)
def _synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


def _parse(*argv):
    from chunkglm.cli import main as cli_main
    from chunkglm.cli import meta as cli_meta

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli_meta.add_parser(sub, cli_main._add_common)
    return parser.parse_args(["meta", *argv, "--cluster", "none", "--no-progress"])


def _z(out, estimator, mask_path):
    mask = np.asarray(nib.load(mask_path).dataobj) != 0
    return np.asarray(nib.load(out / f"meta/{estimator}_z.nii.gz").dataobj)[mask]


@pytest.mark.parametrize("estimator, options, params", [
    ("DerSimonianLaird", ["--weight-scheme", "collapse", "--rho", "0.5"], {"weight_scheme": "collapse", "rho": 0.5}),
    ("WeightedLeastSquares", ["--rho", "0.2"], {"rho": 0.2}),
    ("Stouffers", [], {}),
])
def test_groupby_column_and_options_reach_the_estimator(data, tmp_path, estimator, options, params):
    out = tmp_path / "out"
    args = _parse("--estimator", estimator, "--table", str(data["tsv"]), "--mask", data["spec"]["mask"],
                  "--out", str(out), "--groupby", "study", *options)
    assert args.func(args) == 0
    grouped = getattr(ibma, estimator)(groupby=STUDIES, **params).fit(data["node"]).maps["z"]
    independent = getattr(ibma, estimator)(groupby=False).fit(data["node"]).maps["z"]
    z = _z(out, estimator, data["spec"]["mask"])
    np.testing.assert_array_equal(z, np.nan_to_num(grouped))  # the same float32 map, NaN written as 0
    assert not np.allclose(np.nan_to_num(grouped), np.nan_to_num(independent))  # the groups mattered


def test_groupby_none_is_independent_images(data, tmp_path):
    args = _parse("--estimator", "Hedges", "--table", str(data["tsv"]), "--mask", data["spec"]["mask"],
                  "--out", str(tmp_path / "out"), "--groupby", "none")
    assert args.func(args) == 0
    expected = ibma.Hedges(groupby=False).fit(data["node"]).maps["z"]
    np.testing.assert_array_equal(_z(tmp_path / "out", "Hedges", data["spec"]["mask"]), np.nan_to_num(expected))


def test_con_column_of_a_table(data, tmp_path):
    tsv = tmp_path / "con.tsv"
    data["table"].rename(columns={"beta": "con"}).to_csv(tsv, sep="\t", index=False)
    args = _parse("--estimator", "RFX_GLM", "--table", str(tsv), "--mask", data["spec"]["mask"],
                  "--out", str(tmp_path / "out"), "--groupby", "none")
    assert args.func(args) == 0
    expected = ibma.RFX_GLM().fit(data["node"]).maps["z"]
    np.testing.assert_array_equal(_z(tmp_path / "out", "RFX_GLM", data["spec"]["mask"]), np.nan_to_num(expected))


def test_bad_dependence_options_say_what_to_do(data, tmp_path):
    base = ["--table", str(data["tsv"]), "--out", str(tmp_path / "out")]
    args = _parse("--estimator", "Fishers", *base, "--rho", "0.5")
    with pytest.raises(InputError, match="--rho applies to the regression estimators"):
        args.func(args)
    args = _parse("--estimator", "Hedges", *base, "--groupby", "site")
    with pytest.raises(InputError, match="--groupby site: the table .* has no such column"):
        args.func(args)
    with pytest.raises(SystemExit):
        _parse("--estimator", "Hedges", *base, "--rho", "1.5")
    with pytest.raises(SystemExit):
        _parse("--estimator", "Hedges", *base, "--weight-scheme", "average")


def test_another_meta_analysis_in_the_folder_is_refused_and_overwrite_replaces_it(data, tmp_path):
    """meta/ holds one analysis: another estimator (or other options) into it is refused, nothing
    touched; the same one again is allowed; --overwrite leaves only the new analysis's files (before,
    the old estimator's maps and its FDR maps stayed beside a record describing the new run only)."""
    out = tmp_path / "out"
    base = ["--table", str(data["tsv"]), "--mask", data["spec"]["mask"], "--out", str(out), "--groupby", "none"]

    def files():
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in (out / "meta").rglob("*") if p.is_file()}

    first = _parse("--estimator", "Hedges", *base, "--correct", "fdr")
    assert first.func(first) == 0
    before = files()
    assert any(name.startswith("meta/Hedges_") and "FDR" in name for name in before)
    assert first.func(first) == 0 and files() == before  # the same analysis: rewritten, the same bytes
    other = _parse("--estimator", "Stouffers", *base)
    with pytest.raises(InputError, match=r"already holds another meta analysis \(meta/provenance.json: "
                                         r"options.correct: \[\"fdr\"\] there, null now; options.estimator"):
        other.func(other)
    assert files() == before
    replace = _parse("--estimator", "Stouffers", *base, "--overwrite")
    assert replace.func(replace) == 0
    after = files()
    record = json.loads(after["meta/provenance.json"])
    assert record["options"]["estimator"] == "Stouffers"
    shared = {"meta/provenance.json", "meta/dataset_description.json", "meta/.bidsignore"}
    assert set(after) == set(record["outputs"]) | shared, set(after) ^ (set(record["outputs"]) | shared)
    assert not [name for name in after if "Hedges" in name]
