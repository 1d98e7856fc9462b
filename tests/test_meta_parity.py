"""chunkglm.meta against the real NiMARE 0.22 (run once per session in .venv-nimare).

Every map of every estimator is compared voxel by voxel with NiMARE's, on a
tiny grid (6x7x5, K = 8) with several missing-data patterns (see
``_nimare_reference.write_maps_folder``), by default and with aggressive_mask.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest

import _nimare_reference as reference
from chunkglm.meta import FDRCorrector, FWECorrector, convert_meta_maps, ibma

ROOT = Path(__file__).resolve().parents[1]

# name -> (class, params, corrections); the same specs go to NiMARE.
FITS = {
    "fishers": ("Fishers", {}, []),
    "fishers_one": ("Fishers", {"two_sided": False}, []),
    "fishers_n": ("Fishers", {"use_sample_size": True}, []),
    "stouffers": ("Stouffers", {}, [["FWECorrector", {"method": "bonferroni"}]]),
    "stouffers_n": ("Stouffers", {"use_sample_size": True}, []),
    "wls": ("WeightedLeastSquares", {}, []),
    "wls_tau": ("WeightedLeastSquares", {"tau2": 0.05}, []),
    "dsl": ("DerSimonianLaird", {}, [["FDRCorrector", {"method": "indep"}],
                                      ["FDRCorrector", {"method": "negcorr"}]]),
    "dsl_aggr": ("DerSimonianLaird", {"aggressive_mask": True}, [["FDRCorrector", {"method": "indep"}]]),
    "hedges": ("Hedges", {}, []),
    "vbl_ml": ("VarianceBasedLikelihood", {"method": "ml"}, []),
    "vbl_reml": ("VarianceBasedLikelihood", {"method": "reml"}, []),
    "ssbl": ("SampleSizeBasedLikelihood", {}, []),
    "feh": ("FixedEffectsHedges", {}, []),
    "pols": ("PermutedOLS", {}, [["FWECorrector", {"method": "montecarlo", "n_iters": 60}]]),
    "pols_aggr": ("PermutedOLS", {"aggressive_mask": True, "two_sided": False},
                  [["FWECorrector", {"method": "montecarlo", "n_iters": 40}]]),
    "pols_n": ("PermutedOLS", {"use_sample_size": True}, [["FWECorrector", {"method": "montecarlo", "n_iters": 30}]]),
}

# Closed forms (and PermutedOLS's sign-flip null, drawn from the same seed) agree to the last
# bit of NiMARE's float32 maps: 1e-6 relative is float32 rounding with margin; 1e-7 absolute
# covers tau2 near 0, the difference Q - (K - 1) of O(10) sums whose summation order differs
# (a 4e-4 tau2 was seen 1.9e-8 apart). The likelihood
# estimators solve for tau2 numerically: chunkglm's Newton converges to ~1e-13, PyMARE's
# bounded scalar minimiser stops at its own tolerance, so tau2 (and what depends on it) may
# differ where the likelihood is flat; 1e-4 relative (plus 1e-6 absolute for tau2 ~ 0) bounds that.
OPTIMISED = ("vbl_ml", "vbl_reml", "ssbl")


def _python() -> str:
    python = os.environ.get("CHUNKGLM_NIMARE_PYTHON") or str(ROOT / ".venv-nimare" / "bin" / "python")
    if not Path(python).exists():
        pytest.fail(f"no NiMARE reference interpreter at {python}: run `make test` (it creates .venv-nimare) "
                    "or set CHUNKGLM_NIMARE_PYTHON")
    return python


@pytest.fixture(scope="session")
def meta_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("meta")
    spec = reference.write_maps_folder(folder / "maps")
    table = pd.DataFrame(spec["images"])
    node = convert_meta_maps(table, folder / "meta.zarr", "studies", mask_img=spec["mask"])
    return {"folder": folder, "spec": spec, "table": table, "node": node}


@pytest.fixture(scope="session")
def nimare_maps(meta_data):
    spec = dict(meta_data["spec"])
    spec["fits"] = [{"name": n, "class": c, "params": p, "corrections": k} for n, (c, p, k) in FITS.items()]
    spec_path, out = meta_data["folder"] / "spec.json", meta_data["folder"] / "nimare.npz"
    spec_path.write_text(json.dumps(spec))
    run = subprocess.run([_python(), str(ROOT / "tests" / "_nimare_reference.py"), str(spec_path), str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    data = np.load(out)
    maps = {}
    for key in data.files:
        if "/" in key:
            fit, name = key.split("/", 1)
            maps.setdefault(fit, {})[name] = data[key]
    return maps


def _fit(name, node, **extra):
    klass, params, corrections = FITS[name]
    with dask.config.set(scheduler="synchronous"):
        result = getattr(ibma, klass)(**params, **extra).fit(node)
        for corrector, kwargs in corrections:
            result = {"FDRCorrector": FDRCorrector, "FWECorrector": FWECorrector}[corrector](**kwargs).transform(result)
        result.maps  # noqa: B018 - computed inside the scheduler context
    return result


def assert_maps_equal(ours: dict, theirs: dict, rtol, atol=0.0):
    assert "__error__" not in theirs, str(theirs.get("__error__"))
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        got = np.asarray(ours[name], dtype=np.float64)
        expected = np.asarray(expected, dtype=np.float64)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected), err_msg=name)
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol, equal_nan=True, err_msg=name)


@pytest.mark.parametrize("name", sorted(FITS))
def test_maps_equal_nimare(name, meta_data, nimare_maps):
    result = _fit(name, meta_data["node"])
    if name in OPTIMISED:
        assert_maps_equal(result.maps, nimare_maps[name], rtol=1e-4, atol=1e-6)
    else:
        assert_maps_equal(result.maps, nimare_maps[name], rtol=1e-6, atol=1e-7)


def test_missing_patterns_are_exercised(nimare_maps):
    dof = nimare_maps["dsl"]["dof"]
    assert set(np.unique(dof[np.isfinite(dof)])) >= {4.0, 5.0, 6.0, 7.0}
    assert np.isnan(dof).any()  # the voxel covered by one study only


@pytest.mark.parametrize("name", ["dsl", "vbl_reml", "pols", "fishers_n"])
def test_chunked_equals_unchunked(name, meta_data):
    whole = _fit(name, meta_data["node"]).maps
    chunked = _fit(name, meta_data["node"], chunk_voxels=16).maps
    for key, values in whole.items():
        # Each voxel's arithmetic does not depend on the blocking (kernels are per column).
        np.testing.assert_array_equal(chunked[key], values, err_msg=key)


def test_table_input_equals_store(meta_data, nimare_maps):
    with dask.config.set(scheduler="synchronous"):
        result = ibma.Hedges(mask=meta_data["spec"]["mask"]).fit(meta_data["table"])
        assert_maps_equal(result.maps, nimare_maps["hedges"], rtol=1e-6, atol=1e-7)


def test_local_cluster(meta_data, nimare_maps):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster):
        result = ibma.DerSimonianLaird(chunk_voxels=64).fit(meta_data["node"])
        result = FDRCorrector(method="indep").transform(result)
        maps = {k: v for k, v in result.maps.items() if "negcorr" not in k}
    expected = {k: v for k, v in nimare_maps["dsl"].items() if "negcorr" not in k}
    assert_maps_equal(maps, expected, rtol=1e-6, atol=1e-7)
