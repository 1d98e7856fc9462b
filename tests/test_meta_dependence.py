"""Dependence groups (several images of one study) against the real NiMARE 0.22.

The maps of ``_nimare_reference.write_maps_folder`` (K = 8, several missing-data
patterns) with study ids that put images 0-1 and 2-4 in one study each
(5 groups), fitted by NiMARE in ``.venv-nimare`` and by chunkglm.
"""

from __future__ import annotations

import json
import subprocess

import dask
import numpy as np
import pandas as pd
import pytest

import _nimare_reference as reference
from chunkglm.kernels.meta import dependence
from chunkglm.meta import FWECorrector, convert_meta_maps, ibma
from test_meta_parity import ROOT, _python, assert_maps_equal

STUDIES = ["s-a", "s-a", "s-b", "s-b", "s-b", "s-c", "s-d", "s-e"]

FITS = {
    "fishers": ("Fishers", {}),
    "fishers_one_n": ("Fishers", {"two_sided": False, "use_sample_size": True}),
    "fishers_aggr": ("Fishers", {"aggressive_mask": True}),
    "stouffers": ("Stouffers", {}),
    "stouffers_n": ("Stouffers", {"use_sample_size": True}),
    "stouffers_one_aggr": ("Stouffers", {"two_sided": False, "aggressive_mask": True}),
    "wls": ("WeightedLeastSquares", {}),
    "wls_tau_collapse": ("WeightedLeastSquares", {"tau2": 0.05, "weight_scheme": "collapse"}),
    "wls_individual": ("WeightedLeastSquares", {"weight_scheme": "individual"}),
    "dsl": ("DerSimonianLaird", {}),
    "dsl_rho0": ("DerSimonianLaird", {"rho": 0.0}),
    "dsl_individual": ("DerSimonianLaird", {"weight_scheme": "individual"}),
    "dsl_collapse": ("DerSimonianLaird", {"weight_scheme": "collapse"}),
    "dsl_aggr": ("DerSimonianLaird", {"aggressive_mask": True}),
    "hedges": ("Hedges", {}),
    "hedges_collapse": ("Hedges", {"weight_scheme": "collapse"}),
    "feh": ("FixedEffectsHedges", {}),
    "vbl_ml": ("VarianceBasedLikelihood", {"method": "ml"}),
    "vbl_reml_individual": ("VarianceBasedLikelihood", {"method": "reml", "weight_scheme": "individual"}),
    "ssbl": ("SampleSizeBasedLikelihood", {}),
    "ssbl_collapse": ("SampleSizeBasedLikelihood", {"weight_scheme": "collapse"}),
    "pols": ("PermutedOLS", {}),
    "pols_n_one": ("PermutedOLS", {"use_sample_size": True, "two_sided": False}),
    "pols_aggr": ("PermutedOLS", {"aggressive_mask": True}),
}
# Monte Carlo FWE (sign flips of whole groups, one null over every pattern) on the PermutedOLS fits:
# the same seeded flips as NiMARE, so the maps agree to float32 rounding.
MONTECARLO = {"pols": 60, "pols_n_one": 50, "pols_aggr": 40}
# The likelihood estimators solve for tau2 numerically (see test_meta_parity: chunkglm's Newton
# converges to ~1e-13, PyMARE's bounded minimiser stops at its xtol of 1e-6 in the search
# variable), so what depends on tau2 agrees to that tolerance; the closed forms (CR2 and
# Satterthwaite in closed form for the intercept-only model) agree to float32 rounding of
# NiMARE's stored maps (1e-6 relative) with 1e-7 absolute for tau2 near 0.
OPTIMISED = ("vbl_ml", "vbl_reml_individual", "ssbl", "ssbl_collapse")


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dependence")
    spec = reference.write_maps_folder(folder / "maps")
    for image, study in zip(spec["images"], STUDIES):
        image["study_id"] = study
    table = pd.DataFrame(spec["images"])
    node = convert_meta_maps(table, folder / "meta.zarr", "studies", mask_img=spec["mask"])
    spec["fits"] = [{"name": n, "class": c, "params": p,
                     "corrections": [["FWECorrector", {"method": "montecarlo", "n_iters": MONTECARLO[n]}]]
                     if n in MONTECARLO else []} for n, (c, p) in FITS.items()]
    spec_path, out = folder / "spec.json", folder / "nimare.npz"
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
    return {"node": node, "nimare": maps}


@pytest.mark.parametrize("name", sorted(FITS))
def test_grouped_maps_equal_nimare(name, grouped):
    klass, params = FITS[name]
    with dask.config.set(scheduler="synchronous"):
        result = getattr(ibma, klass)(**params).fit(grouped["node"])
        if name in MONTECARLO:
            result = FWECorrector(method="montecarlo", n_iters=MONTECARLO[name]).transform(result)
        maps = result.maps
    if name in OPTIMISED:
        assert_maps_equal(maps, grouped["nimare"][name], rtol=1e-4, atol=1e-6)
    else:
        assert_maps_equal(maps, grouped["nimare"][name], rtol=1e-6, atol=1e-7)


def test_groups_change_the_maps_and_dof_is_satterthwaite(grouped):
    with dask.config.set(scheduler="synchronous"):
        grouped_fit = ibma.DerSimonianLaird(aggressive_mask=True).fit(grouped["node"]).maps
        naive = ibma.DerSimonianLaird(aggressive_mask=True, groupby=False).fit(grouped["node"]).maps
    dof = grouped_fit["dof"][np.isfinite(grouped_fit["dof"])]
    assert dof.size and np.all(dof < 7) and not np.allclose(dof, np.round(dof))
    assert np.all(naive["dof"][np.isfinite(naive["dof"])] == 7)
    valid = np.isfinite(grouped_fit["p"]) & np.isfinite(naive["p"])
    assert not np.allclose(grouped_fit["est"][valid], naive["est"][valid])


def test_null_correlation_equals_nimare():
    """Per-block moments summed equal NiMARE's whole-array null correlation (with and without gaps)."""
    script = """
import json, sys
import numpy as np
from nimare.meta.ibma import _null_correlation
z = np.load(sys.argv[1])
groups = np.array(json.loads(sys.argv[2]))
np.save(sys.argv[3], _null_correlation(z, groups))
"""
    from chunkglm.kernels.meta import correlation
    import tempfile
    from pathlib import Path
    rng = np.random.default_rng(3)
    groups = [0, 0, 1, 1, 1, 2, 3, 4]
    z = rng.normal(size=(8, 900)) + rng.normal(size=900)
    z[[0, 1]] += rng.normal(size=900)
    for gaps in (False, True):
        if gaps:
            z[2, :100] = 0.0
            z[6, 300:420] = np.nan
        with tempfile.TemporaryDirectory() as tmp:
            path, out = Path(tmp) / "z.npy", Path(tmp) / "corr.npy"
            np.save(path, z)
            run = subprocess.run([_python(), "-c", script, str(path), json.dumps(groups), str(out)],
                                 capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, run.stderr[-2000:]
            expected = np.load(out)
        parts = [correlation.null_correlation_moments(z[:, s]) for s in (slice(0, 250), slice(250, 900))]
        ours = correlation.null_correlation(correlation.add_moments(parts), groups)
        # the same sums in another order (per block, then added): 1e-13 absolute on values in [-1, 1]
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("kernel", ["fishers", "stouffers"])
def test_a_cancelling_group_is_left_out(kernel):
    """A group whose images correlate -1 under the null has aggregated-z variance 0: NiMARE drops it
    from the model before PyMARE sees it (``_screen_dependence_groups``); the rest is fitted as usual."""
    from chunkglm.kernels import meta as km
    rng = np.random.default_rng(5)
    z = rng.normal(size=(6, 40))
    groups = np.array([0, 0, 1, 1, 2, 3])
    corr = np.eye(6)
    corr[0, 1] = corr[1, 0] = -1.0
    corr[2, 3] = corr[3, 2] = 0.4
    fit = getattr(km, kernel)
    dropped = fit(z, groups=groups, corr=corr, image_index=np.arange(6))
    rest = fit(z[2:], groups=groups[2:], corr=corr[2:, 2:], image_index=np.arange(4))
    for name in ("z", "p", "logp", "dof"):
        np.testing.assert_array_equal(dropped[name], rest[name], err_msg=name)
    assert np.all(dropped["dof"] == 2)  # three groups left
    # a group whose images do not cancel changes the result
    corr[0, 1] = corr[1, 0] = 0.3
    kept = fit(z, groups=groups, corr=corr, image_index=np.arange(6))
    assert np.all(kept["dof"] == 3) and not np.allclose(kept["z"], rest["z"])


def test_single_group_pattern_is_not_fitted():
    """A missing-data pattern whose images all come from one study is NaN (NiMARE skips it)."""
    rng = np.random.default_rng(0)
    beta, varcope = rng.normal(size=(4, 6)), rng.uniform(0.5, 1.0, (4, 6))
    beta[2:, 4:] = np.nan
    from chunkglm.kernels import meta as km
    from chunkglm.meta import _bags
    valid = _bags.validity({"beta": beta, "varcope": varcope}, np.float64)
    skipped = np.zeros(6, dtype=bool)
    out = _bags.fit_patterns(km.KERNELS["DerSimonianLaird"], {"beta": np.nan_to_num(beta), "varcope": varcope},
                             valid, km.OUTPUTS["DerSimonianLaird"], {"weight_scheme": "rescale", "rho": 0.8},
                             per_study={"groups": np.array([0, 0, 1, 1])}, skipped=skipped)
    assert np.isnan(out[:, 4:]).all() and np.isfinite(out[:, :4]).all()
    np.testing.assert_array_equal(skipped, [False] * 4 + [True] * 2)  # reported (MetaResult warns, as NiMARE)


def test_single_group_voxels_are_warned_about(tmp_path, caplog):
    """Voxels where only the two images of study s-a are usable: NaN, and NiMARE's warning."""
    import nibabel as nib
    spec = reference.write_maps_folder(tmp_path / "maps", seed=2)
    for k, (image, study) in enumerate(zip(spec["images"], STUDIES)):
        image["study_id"] = study
        if k >= 2:  # every other image misses the slab x = 0
            img = nib.load(image["beta"])
            data = np.asarray(img.dataobj).copy()
            data[0] = 0.0
            nib.save(nib.Nifti1Image(data, img.affine), image["beta"])
    node = convert_meta_maps(pd.DataFrame(spec["images"]), tmp_path / "meta.zarr", "studies", mask_img=spec["mask"])
    with dask.config.set(scheduler="synchronous"), caplog.at_level("WARNING"):
        maps = ibma.DerSimonianLaird().fit(node).maps
    assert "Skipped" in caplog.text and "single group" in caplog.text
    with dask.config.set(scheduler="synchronous"):
        independent = ibma.DerSimonianLaird(groupby=False).fit(node).maps
    assert np.isnan(maps["z"]).sum() > np.isnan(independent["z"]).sum()


def test_cluster_robust_closed_form_equals_the_general_sandwich():
    """The intercept-only CR2 closed form against the general formula (explicit matrices)."""
    rng = np.random.default_rng(1)
    labels = np.array([0, 0, 0, 1, 2, 2, 3])
    y, w = rng.normal(size=(7, 3)), rng.uniform(0.5, 2.0, (7, 3))
    est, var, dof = dependence.cluster_robust(y, w, dependence.Groups(labels))
    for col in range(3):
        wc = w[:, col]
        bread = 1.0 / wc.sum()
        e = y[:, col] - (wc * y[:, col]).sum() * bread
        meat, blocks = 0.0, []
        for g in np.unique(labels):
            rows = labels == g
            xt = np.sqrt(wc[rows])[:, None]
            vals, vecs = np.linalg.eigh(np.eye(rows.sum()) - xt @ xt.T * bread)
            adjust = vecs @ np.diag(vals ** -0.5) @ vecs.T
            meat += (xt.T @ adjust @ (np.sqrt(wc[rows]) * e[rows])).item() ** 2
            b = np.zeros(7)
            b[rows] = (adjust @ xt).ravel() * bread
            blocks.append(b)
        # Satterthwaite: G = (I - H) B with H the whitened hat matrix
        xt_all = np.sqrt(wc)[:, None]
        g_mat = (np.eye(7) - xt_all @ xt_all.T * bread) @ np.stack(blocks, axis=1)
        s = g_mat.T @ g_mat
        # float64 sums of 7 terms: agreement to ~1e-15 relative, 1e-12 leaves margin
        np.testing.assert_allclose(var[col], bread ** 2 * meat, rtol=1e-12)
        np.testing.assert_allclose(dof[col], np.trace(s) ** 2 / np.trace(s @ s), rtol=1e-12)


def test_cancelling_group_is_named_in_a_warning(caplog):
    est = ibma.Stouffers()
    est.inputs_ = {"id": ["i0", "i1", "i2"]}
    est._group_label_of = {0: "study-x", 1: "study-y"}
    corr = np.eye(3)
    corr[0, 1] = corr[1, 0] = -1.0
    with caplog.at_level("WARNING"):
        est._warn_cancelling_groups(corr, np.array([0, 0, 1]))
    assert "study-x" in caplog.text and "i0, i1" in caplog.text and "cancel" in caplog.text
