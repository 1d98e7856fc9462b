"""chunkglm.meta: inputs, laziness, old API, corrections, outputs, CLI and bad input.

NiMARE parity is in test_meta_parity.py; these tests need no NiMARE.
"""

from __future__ import annotations

import argparse
import json

import dask
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import stats

import _nimare_reference as reference
from chunkglm.errors import InputError
from chunkglm.meta import FDRCorrector, FWECorrector, convert_meta_maps, ibma
from chunkglm.meta._inputs import table_from_dataset
from chunkglm.testing import raise_if_dask_computes



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("meta_ibma")
    spec = reference.write_maps_folder(folder / "maps", seed=1)
    table = pd.DataFrame(spec["images"])
    node = convert_meta_maps(table, folder / "meta.zarr", "studies", mask_img=spec["mask"])
    return {"folder": folder, "spec": spec, "table": table, "node": node}


@pytest.fixture(autouse=True)
def _threads():
    with dask.config.set(scheduler="threads"):
        yield


def _load(table, role, mask_path):
    mask = np.asarray(nib.load(mask_path).dataobj) != 0
    return np.stack([np.asarray(nib.load(p).dataobj)[mask] for p in table[role]]).astype(np.float64)


def _full_voxels(data, *roles):
    ok = np.ones(_load(data["table"], roles[0], data["spec"]["mask"]).shape[1], dtype=bool)
    for role in roles:
        values = _load(data["table"], role, data["spec"]["mask"])
        ok &= (np.isfinite(values) & (values != 0)).all(axis=0)
    return ok


def test_fit_is_lazy_and_all_maps_come_from_one_graph(data):
    with raise_if_dask_computes():
        result = ibma.DerSimonianLaird().fit(data["node"])
    lazy = result.to_xarray()
    assert list(lazy.data_vars) == ["z", "p", "logp", "est", "se", "tau2", "dof"]
    np.testing.assert_array_equal(lazy["est"].values.astype(np.float32), result.maps["est"])


def test_convert_meta_maps_node_layout(data):
    node = data["node"]
    assert node.attrs["variables"] == ["z", "t", "beta", "varcope", "se"]
    ds = node.to_dataset()
    assert ds["beta"].dims == ("image", "voxel")
    assert list(ds["study_id"].values) == [f"study-{k:02d}" for k in range(8)]
    np.testing.assert_array_equal(ds["sample_sizes"].values, [r[0] for r in data["table"]["sample_sizes"]])
    np.testing.assert_array_equal(ds["beta"].values, _load(data["table"], "beta", data["spec"]["mask"]))


def test_se_gives_varcope_and_t_gives_z(data, tmp_path):
    """A collection with se (no varcope) and t (no z): NiMARE's transforms are applied per block."""
    table = data["table"].drop(columns=["varcope", "z"])
    node = convert_meta_maps(table, tmp_path / "s.zarr", "derived", mask_img=data["spec"]["mask"])
    ours = ibma.DerSimonianLaird().fit(node).maps
    full = ibma.DerSimonianLaird().fit(data["node"]).maps
    for name in full:  # varcope = se**2 in float64 vs the stored float32 varcope: float32 rounding
        np.testing.assert_allclose(ours[name], full[name], rtol=2e-6, atol=1e-7, err_msg=name)
    stouffers = ibma.Stouffers().fit(node).maps
    t = _load(data["table"], "t", data["spec"]["mask"])
    sizes = np.array([s[0] for s in data["table"]["sample_sizes"]], dtype=float)
    z = np.sign(t) * stats.norm.isf(stats.t.sf(np.abs(t), sizes[:, None] - 1))  # t_to_z, dof n - 1
    ok = _full_voxels(data, "t")
    # Stouffer's z = sum(z) / sqrt(K); float32 maps: 1e-5.
    np.testing.assert_allclose(stouffers["z"][ok], z[:, ok].sum(0) / np.sqrt(8), rtol=1e-5)


def test_old_ffx_glm_closed_form_and_cluster_maps(data):
    result = ibma.FFX_GLM(cdt=0.05, q=0.2).fit(data["node"])
    beta = _load(data["table"], "beta", data["spec"]["mask"])
    var = _load(data["table"], "varcope", data["spec"]["mask"])
    sizes = np.array([s[0] for s in data["table"]["sample_sizes"]], dtype=float)
    ok = _full_voxels(data, "beta", "varcope")
    w = 1.0 / var[:, ok]
    est = (w * beta[:, ok]).sum(0) / w.sum(0)
    se = np.sqrt(1.0 / w.sum(0))
    maps = result.maps
    # float32 maps; se from sqrt(varcope) stored float32 (old NiMARE squared se again): 1e-5.
    np.testing.assert_allclose(maps["est"][ok], est, rtol=1e-5)
    np.testing.assert_allclose(maps["se"][ok], se, rtol=1e-5)
    np.testing.assert_allclose(maps["dof"][ok], 7 + (sizes - 1).sum())
    labels, z = maps["labels_corr-cluster"], maps["z_corr-cluster"]
    assert (labels > 0).any()
    np.testing.assert_array_equal(z[labels > 0], maps["z"][labels > 0])
    assert (z[labels == 0] == 0).all() and (maps["p"][labels > 0] < 0.05).all()


def test_old_mfx_glm_is_weighted_by_tau2(data):
    maps = ibma.MFX_GLM().fit(data["node"]).maps
    beta = _load(data["table"], "beta", data["spec"]["mask"])
    var = _load(data["table"], "varcope", data["spec"]["mask"])
    ok = _full_voxels(data, "beta", "varcope")
    w = 1.0 / (var[:, ok] + maps["tau2"][ok].astype(np.float64))
    assert (maps["tau2"][ok] >= 0).all()
    # est uses float32-rounded tau2 here: 1e-4 relative
    np.testing.assert_allclose(maps["est"][ok], (w * beta[:, ok]).sum(0) / w.sum(0), rtol=1e-4, atol=1e-6)


def test_old_rfx_glm_normalises_each_map(data):
    maps = ibma.RFX_GLM().fit(data["node"]).maps
    beta = _load(data["table"], "beta", data["spec"]["mask"])
    scaled = beta / np.nanstd(beta, axis=1, keepdims=True)
    ok = _full_voxels(data, "beta")
    t, p = stats.ttest_1samp(scaled[:, ok], 0.0, axis=0)
    np.testing.assert_allclose(maps["t"][ok], t, rtol=1e-5)
    np.testing.assert_allclose(maps["p"][ok], p, rtol=1e-5, atol=1e-7)


def test_old_rfx_empirical_null_is_chunk_independent(data):
    whole = ibma.RFX_GLM(null="empirical", n_iters=40, random_state=3).fit(data["node"]).maps
    chunked = ibma.RFX_GLM(null="empirical", n_iters=40, random_state=3, chunk_voxels=32).fit(data["node"]).maps
    for name in whole:
        np.testing.assert_array_equal(whole[name], chunked[name], err_msg=name)
    ok = np.isfinite(whole["p"])
    assert ((whole["p"][ok] > 0) & (whole["p"][ok] <= 1)).all()
    with pytest.raises(InputError, match="n_iters"):
        ibma.RFX_GLM(null="empirical").fit(data["node"])


def test_stouffers_old_and_new_signatures(data):
    node = data["node"]
    np.testing.assert_array_equal(ibma.Stouffers("ffx").fit(node).maps["z"], ibma.Stouffers().fit(node).maps["z"])
    old_rfx = ibma.Stouffers("rfx", "theoretical", None, True).fit(node).maps
    z = _load(data["table"], "z", data["spec"]["mask"])
    ok = _full_voxels(data, "z")
    t, _ = stats.ttest_1samp((z / np.nanstd(z, axis=1, keepdims=True))[:, ok], 0.0, axis=0)
    np.testing.assert_allclose(old_rfx["t"][ok], t, rtol=1e-5)
    weighted = ibma.WeightedStouffers().fit(node).maps
    new = ibma.Stouffers(use_sample_size=True).fit(node).maps
    for name in new:
        np.testing.assert_array_equal(weighted[name], new[name], err_msg=name)
    with pytest.raises(InputError, match="empirical"):
        ibma.Stouffers(inference="ffx", null="empirical")


def test_montecarlo_accepts_explicit_sign_flips(data):
    result = ibma.PermutedOLS(random_state=5).fit(data["node"])
    seeded = FWECorrector(method="montecarlo", n_iters=30).transform(result)
    flips = np.random.RandomState(5).choice((-1.0, 1.0), size=(30, 8))
    given = FWECorrector(method="montecarlo", sign_flips=flips).transform(result)
    name = "p_level-voxel_corr-FWE_method-montecarlo"
    np.testing.assert_array_equal(seeded.maps[name], given.maps[name])
    assert name not in result.maps  # transform returns a corrected copy
    with pytest.raises(InputError, match="sign_flips"):
        FWECorrector(method="montecarlo", sign_flips=flips[:, :5]).transform(result)
    with pytest.raises(InputError, match="montecarlo"):
        FWECorrector(method="montecarlo").transform(ibma.Stouffers().fit(data["node"]))


def test_fdr_counts_nan_voxels_as_nimare(data):
    result = FDRCorrector(method="indep").transform(ibma.Stouffers().fit(data["node"]))
    p = result.maps["p"].astype(np.float64)
    ok = ~np.isnan(p)
    order = np.argsort(p[ok])
    ranked = p[ok][order] * ok.sum() / np.arange(1, ok.sum() + 1)
    expected = np.minimum(np.minimum.accumulate(ranked[::-1])[::-1], 1)[np.argsort(order)]
    # NiMARE's log-space step-up on the float32 p map: float32 rounding.
    np.testing.assert_allclose(result.maps["p_corr-FDR_method-indep"][ok], expected, rtol=1e-6)
    assert np.isnan(result.maps["p_corr-FDR_method-indep"][~ok]).all()


def test_aggressive_mask_drops_empty_images(data, tmp_path):
    table = data["table"].copy()
    empty = dict(table.iloc[0])
    mask = np.asarray(nib.load(data["spec"]["mask"]).dataobj)
    for role in ("beta", "varcope"):
        path = tmp_path / f"empty_{role}.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros(mask.shape, np.float32), nib.load(data["spec"]["mask"]).affine), path)
        empty[role] = str(path)
    empty.update(id="empty", study_id="study-empty")
    node = convert_meta_maps(pd.concat([table, pd.DataFrame([empty])]), tmp_path / "s.zarr", "e",
                             mask_img=data["spec"]["mask"])
    with_empty = ibma.Hedges(aggressive_mask=True).fit(node).maps
    without = ibma.Hedges(aggressive_mask=True).fit(data["node"]).maps
    for name in without:
        np.testing.assert_array_equal(with_empty[name], without[name], err_msg=name)
    with pytest.raises(InputError, match="drop_invalid"):
        ibma.Hedges(aggressive_mask=True).fit(node, drop_invalid=False)
    # The empty image takes no sign-flip column (NiMARE drops it before drawing the flips).
    name = "p_level-voxel_corr-FWE_method-montecarlo"
    ours, expected = (FWECorrector(method="montecarlo", n_iters=20).transform(ibma.PermutedOLS().fit(n)).maps[name]
                      for n in (node, data["node"]))
    np.testing.assert_array_equal(ours, expected)


def test_nimare_dataset_tables_are_read(data):
    class FakeDataset:  # test double of nimare.dataset.Dataset's attributes read by chunkglm
        images = data["table"].assign(id=[f"{s}-1" for s in data["table"]["study_id"]]).drop(columns="sample_sizes")
        metadata = pd.DataFrame({"id": [f"{s}-1" for s in data["table"]["study_id"]],
                                 "sample_sizes": list(data["table"]["sample_sizes"])})
        masker = type("M", (), {"mask_img": nib.load(data["spec"]["mask"])})()

    table, mask = table_from_dataset(FakeDataset())
    assert list(table.columns) == ["id", "study_id", "z", "t", "beta", "varcope", "se", "sample_sizes"]
    assert mask.shape == reference.SHAPE


def test_save_maps_and_derivatives(data, tmp_path):
    result = FDRCorrector().transform(ibma.DerSimonianLaird(mask=data["spec"]["mask"]).fit(data["table"]))
    paths = result.save_maps(tmp_path / "nimare_like", prefix="dsl")
    assert sorted(p.name for p in paths)[:2] == ["dsl_dof.nii.gz", "dsl_est.nii.gz"]
    img = nib.load(tmp_path / "nimare_like" / "dsl_z.nii.gz")
    mask = np.asarray(nib.load(data["spec"]["mask"]).dataobj) != 0
    np.testing.assert_array_equal(np.asarray(img.dataobj)[mask], np.nan_to_num(result.maps["z"]))
    written = result.save_derivatives(tmp_path / "out")
    assert (tmp_path / "out/meta/DerSimonianLaird_z_corr-FDR_method-indep.nii.gz").exists()
    side = json.loads(written["sidecar"].read_text())
    assert side["Estimator"] == "DerSimonianLaird" and side["Parameters"]["aggressive_mask"] is False
    # only the maps DerSimonianLaird reads (beta, varcope) are converted and listed
    assert len(side["Inputs"]["files"]) == 8 * 2 and all(len(f["sha256"]) == 64 for f in side["Inputs"]["files"])
    assert side["Software"]["Versions"]["chunkglm"]
    np.testing.assert_array_equal(np.ravel(result.masker.transform(img)), np.nan_to_num(result.maps["z"]))
    wls = ibma.WeightedLeastSquares(tau2=0.1).fit(data["node"])
    wls.save_tables(tmp_path / "tables", prefix="wls")
    assert (tmp_path / "tables/wls_level-estimator.tsv").read_text().split() == ["tau2", "0.1"]


def test_cli_meta_table(data, tmp_path):
    from chunkglm.cli import main as cli_main
    from chunkglm.cli import meta as cli_meta

    tsv = tmp_path / "images.tsv"
    table = data["table"].copy()
    table["sample_sizes"] = [s[0] for s in table["sample_sizes"]]
    table.to_csv(tsv, sep="\t", index=False)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli_meta.add_parser(sub, cli_main._add_common)
    args = parser.parse_args(["meta", "--estimator", "Hedges", "--table", str(tsv), "--mask", data["spec"]["mask"],
                              "--out", str(tmp_path / "out"), "--correct", "bonferroni", "--cluster", "none",
                              "--no-progress"])
    assert args.func(args) == 0
    z = nib.load(tmp_path / "out/meta/Hedges_z_corr-FWE_method-bonferroni.nii.gz")
    expected = FWECorrector().transform(ibma.Hedges().fit(data["node"])).maps["z_corr-FWE_method-bonferroni"]
    mask = np.asarray(nib.load(data["spec"]["mask"]).dataobj) != 0
    np.testing.assert_array_equal(np.asarray(z.dataobj)[mask], np.nan_to_num(expected))
    assert json.loads((tmp_path / "out/meta/provenance.json").read_text())["operation"] == "meta"


# -- bad input -------------------------------------------------------------------------


def test_missing_map_in_a_row(data, tmp_path):
    table = data["table"].copy()
    table.loc[3, "varcope"] = None
    with pytest.raises(InputError, match="'varcope' has no path in rows \\[3\\]"):
        convert_meta_maps(table, tmp_path / "s.zarr", "x")


def test_negative_variances(data, tmp_path):
    table = data["table"][["id", "study_id", "beta", "varcope"]].copy()
    img = nib.load(table["varcope"][2])
    path = tmp_path / "neg.nii.gz"
    nib.save(nib.Nifti1Image(-np.abs(np.asarray(img.dataobj)), img.affine), path)
    table.loc[2, "varcope"] = str(path)
    node = convert_meta_maps(table, tmp_path / "s.zarr", "neg")
    with pytest.raises(InputError, match="negative"):
        ibma.DerSimonianLaird().fit(node).maps


def test_sample_sizes_missing_or_all_equal(data, tmp_path):
    table = data["table"].drop(columns=["sample_sizes"])
    node = convert_meta_maps(table, tmp_path / "s.zarr", "nosizes", mask_img=data["spec"]["mask"])
    with pytest.raises(InputError, match="needs a sample_sizes"):
        ibma.SampleSizeBasedLikelihood().fit(node)
    with pytest.raises(InputError, match="needs a sample_sizes"):
        ibma.Stouffers(use_sample_size=True).fit(node)
    equal = data["table"].assign(sample_sizes=[[20]] * 8)
    node = convert_meta_maps(equal, tmp_path / "s.zarr", "equal", mask_img=data["spec"]["mask"])
    with pytest.raises(InputError, match="differ between studies"):
        ibma.SampleSizeBasedLikelihood().fit(node)


def test_maps_on_different_grids(data, tmp_path):
    table = data["table"].copy()
    img = nib.load(table["beta"][1])
    path = tmp_path / "shifted.nii.gz"
    affine = img.affine.copy()
    affine[0, 3] += 3.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), path)
    table.loc[1, "beta"] = str(path)
    with pytest.raises(InputError, match="another grid"):
        convert_meta_maps(table, tmp_path / "s.zarr", "grids")


def test_dependence_groups_are_refused_by_the_old_api_only(data, tmp_path):
    """NiMARE 0.0.x had no dependence groups: its classes refuse repeated study ids; the 0.22 ones model them."""
    table = data["table"].copy()
    table.loc[1, "study_id"] = table.loc[0, "study_id"]
    node = convert_meta_maps(table, tmp_path / "s.zarr", "groups", mask_img=data["spec"]["mask"])
    with pytest.raises(InputError, match="groupby=False"):
        ibma.Stouffers("rfx").fit(node)
    with pytest.raises(InputError, match="groupby=False"):
        ibma.RFX_GLM().fit(node)
    independent = ibma.Stouffers(groupby=False).fit(node).maps
    np.testing.assert_array_equal(independent["z"], ibma.Stouffers().fit(data["node"]).maps["z"])
    grouped = ibma.Stouffers().fit(node).maps
    assert not np.allclose(grouped["z"], independent["z"], equal_nan=True)


def test_bad_parameters(data):
    with pytest.raises(TypeError, match="unexpected keyword"):
        ibma.DerSimonianLaird(memory_limit="1GB")
    assert ibma.Fishers(resample__interpolation="nearest")._resample_kwargs["interpolation"] == "nearest"
    with pytest.raises(InputError, match="weight_scheme"):
        ibma.Hedges(weight_scheme="nope")
    with pytest.raises(InputError, match="needs at least 2 analyses"):
        ibma.Fishers().fit(data["table"].iloc[:1])
    with pytest.raises(InputError, match="maps collection"):
        ibma.Fishers().fit([1, 2])


def test_mask_on_a_store_collection(data, tmp_path):
    mask_img = nib.load(data["spec"]["mask"])
    sub = np.asarray(mask_img.dataobj).copy()
    sub[:3] = 0
    path = tmp_path / "sub.nii.gz"
    nib.save(nib.Nifti1Image(sub, mask_img.affine), path)
    part = ibma.DerSimonianLaird(mask=path).fit(data["node"])
    whole = ibma.DerSimonianLaird().fit(data["node"]).maps
    inside = (sub != 0)[np.asarray(mask_img.dataobj) != 0]
    for name, values in part.maps.items():
        np.testing.assert_array_equal(values, whole[name][inside], err_msg=name)
    img = part.get_map("z")
    np.testing.assert_array_equal(np.asarray(img.dataobj)[sub != 0], np.nan_to_num(part.maps["z"]))


def test_collection_written_by_convert_reads_effect_as_beta(data, tmp_path):
    from chunkglm.io.convert import convert
    from chunkglm.io.cohort import open_cohort

    convert(list(data["table"]["beta"]), tmp_path / "c.zarr", mask_img=data["spec"]["mask"],
            collection="betas", map_type="effect")
    node = open_cohort(tmp_path / "c.zarr").maps["betas"]
    ours = ibma.PermutedOLS().fit(node).maps
    expected = ibma.PermutedOLS().fit(data["node"]).maps
    for name in expected:
        np.testing.assert_array_equal(ours[name], expected[name], err_msg=name)


def test_each_store_chunk_is_read_once_for_all_maps(data, tmp_path, monkeypatch):
    from chunkglm.meta._inputs import MetaMaps

    node = convert_meta_maps(data["table"], tmp_path / "small.zarr", "small", mask_img=data["spec"]["mask"],
                             chunk_bytes=8 * 4 * 64)
    reads, n_blocks = [], {}
    original = MetaMaps.data

    def counted(self, role):
        def read(block, block_info=None):
            reads.append((role, block_info[0]["chunk-location"]))
            return block
        array = original(self, role)
        n_blocks[role] = array.numblocks[1]
        return array.map_blocks(read, dtype=array.dtype)

    monkeypatch.setattr(MetaMaps, "data", counted)
    result = ibma.DerSimonianLaird(chunk_voxels=32).fit(node)
    FDRCorrector().transform(result)
    assert n_blocks == {"beta": 4, "varcope": 4}
    assert sorted(reads) == [(r, (0, i)) for r in ("beta", "varcope") for i in range(4)]


def test_patterns_give_each_voxel_its_own_studies():
    from chunkglm.meta import _bags

    def count_and_mean(beta, sample_sizes):  # test double of a kernel: what did it receive?
        return {"k": np.full(beta.shape[1], beta.shape[0], float), "mean": beta.mean(0),
                "n": np.full(beta.shape[1], sample_sizes.sum())}

    rng = np.random.default_rng(0)
    beta = rng.normal(size=(5, 300)) + 3
    beta[rng.random(beta.shape) < 0.3] = 0.0
    beta[1, :10] = np.nan
    sizes = np.arange(1.0, 6.0)
    valid = _bags.validity({"beta": beta})
    out = _bags.fit_patterns(count_and_mean, {"beta": beta, "sample_sizes": sizes}, valid, ["k", "mean", "n"], {})
    k = valid.sum(0)
    fitted = k >= _bags.MIN_STUDIES
    np.testing.assert_array_equal(out[0][fitted], k[fitted])
    np.testing.assert_allclose(out[1][fitted], (np.where(valid, beta, 0).sum(0) / np.maximum(k, 1))[fitted])
    np.testing.assert_array_equal(out[2][fitted], (valid * sizes[:, None]).sum(0)[fitted])
    assert np.isnan(out[:, ~fitted]).all()
    aggressive = _bags.fit_patterns(count_and_mean, {"beta": beta, "sample_sizes": sizes}, valid, ["k", "mean", "n"],
                                    {}, aggressive_mask=True)
    np.testing.assert_array_equal(np.isfinite(aggressive[0]), valid.all(0))
