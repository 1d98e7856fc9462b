"""NiMARE 0.0.x's API: ffx_glm / mfx_glm / fsl_glm, old map names, the ``con`` image type, and
FSL's Gaussian-random-field cluster inference (smoothness from residuals, cluster p).

FSL cannot be installed here: the GRF pieces are checked against the theory they implement
(a Gaussian-smoothed white field's known FWHM, within the estimator's sampling error; the
cluster-size distribution's mean; the Euler characteristic density as nipy computes it) and
the voxelwise maps against NiMARE 0.22's equivalents (run in .venv-nimare).
"""

from __future__ import annotations

import json
import math
import subprocess
import warnings

import dask
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import integrate, ndimage, special

import _nimare_reference as reference
from chunkglm.errors import InputError
from chunkglm.graph import meta as meta_graph
from chunkglm.kernels.meta import grf as kgrf
from chunkglm.meta import FFX_GLM, MFX_GLM, convert_meta_maps, ffx_glm, fsl_glm, ibma, mfx_glm
from chunkglm.meta import grf
from chunkglm.testing import raise_if_dask_computes
from test_meta_parity import _python, ROOT


@pytest.fixture(autouse=True)
def _synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


# -- smoothness ---------------------------------------------------------------------------


def _smooth_field(shape, sigma, n_images, seed):
    """White noise smoothed with a Gaussian kernel of std ``sigma`` (voxels, per axis)."""
    rng = np.random.default_rng(seed)
    return np.stack([ndimage.gaussian_filter(rng.normal(size=shape), sigma, mode="wrap") for _ in range(n_images)])


def _kernel_correlation(sigma):
    """The lag-1 correlation of white noise filtered by scipy's sampled Gaussian (radius 4 sigma)."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return float((w[1:] * w[:-1]).sum() / (w * w).sum())


def _sums(values, ijk, shape):
    return kgrf.neighbour_sums(values, np.arange(values.shape[1]), kgrf.backward_neighbours(ijk, shape))


def test_backward_neighbours_match_a_brute_force_search():
    rng = np.random.default_rng(3)
    shape = (5, 6, 4)
    mask = rng.random(shape) > 0.3
    ijk = np.argwhere(mask)
    got = kgrf.backward_neighbours(ijk, shape)
    position = {tuple(v): i for i, v in enumerate(ijk)}
    for i, voxel in enumerate(ijk):
        for axis in range(3):
            other = list(voxel)
            other[axis] -= 1
            assert got[i, axis] == position.get(tuple(other), -1)


@pytest.mark.parametrize("sigma", [(1.0, 1.5, 2.0), (0.8, 0.8, 0.8)])
def test_smoothness_recovers_the_kernel_fwhm(sigma):
    """A white field smoothed with a known Gaussian: FWHM per axis within the sampling error.

    Expected value: the estimator's SS-/S2 is the mean over voxel pairs of the neighbours'
    sample correlation over the K images (each voxel is standardised), whose expectation is
    rho (1 - (1 - rho^2) / (2 (K - 1))) to first order (Fisher), rho the sampled kernel's lag-1
    correlation. Sampling error: the jackknife over the K independent images, carried to FWHM
    by the delta method; 4 standard errors (plus the O(1/K^2) left of the bias) bound it.
    """
    shape, n_images = (40, 36, 32), 24
    field = _smooth_field(shape, sigma, n_images, seed=11)
    mask = np.zeros(shape, dtype=bool)
    mask[3:-3, 3:-3, 3:-3] = True
    mask[18:22, 15:20, :] = False  # a hole: pairs across it are not counted
    ijk = np.argwhere(mask)
    values = field[:, mask]
    smooth = kgrf.smoothness(_sums(values, ijk, shape))
    assert smooth["volume"] == mask.sum()
    jack = np.array([_sums(np.delete(values, k, axis=0), ijk, shape) for k in range(n_images)])
    jack_ratio = jack[:, :3] / jack[:, 3:6]
    se_ratio = np.sqrt((n_images - 1) / n_images * ((jack_ratio - jack_ratio.mean(0)) ** 2).sum(0))
    for axis, s in enumerate(sigma):
        rho = _kernel_correlation(s)
        expected_ratio = rho * (1 - (1 - rho**2) / (2 * (n_images - 1)))
        expected_fwhm = math.sqrt(8 * math.log(2) * -1 / (4 * math.log(expected_ratio)))
        # d FWHM / d rho = FWHM / (2 rho |ln rho|)
        se_fwhm = expected_fwhm / (2 * rho * abs(math.log(rho))) * se_ratio[axis]
        # the bias's next term, O(rho / (K - 1)^2), carried to FWHM the same way
        next_term = expected_fwhm / (2 * rho * abs(math.log(rho))) * rho / (n_images - 1) ** 2
        assert abs(smooth["fwhm"][axis] - expected_fwhm) <= 4 * se_fwhm + next_term, (axis, smooth["fwhm"], se_fwhm)
        # and the kernel's own FWHM (sqrt(8 ln 2) sigma) within 5 %: the estimator measures what it should
        assert smooth["fwhm"][axis] == pytest.approx(math.sqrt(8 * math.log(2)) * s, rel=0.05)
    assert smooth["dlh"] == pytest.approx((8 * np.prod(smooth["sigmasq"])) ** -0.5)
    assert smooth["resels"] == pytest.approx(np.prod(smooth["fwhm"]))


def test_smoothness_ignores_the_per_voxel_mean_and_scale():
    """The intercept model's residuals are the maps minus one value per voxel: same smoothness."""
    shape = (20, 20, 20)
    field = _smooth_field(shape, 1.2, 10, seed=2)
    ijk = np.argwhere(np.ones(shape, dtype=bool))
    values = field.reshape(10, -1)
    shifted = values * np.linspace(0.5, 3, values.shape[1]) + np.linspace(-4, 9, values.shape[1])
    np.testing.assert_allclose(_sums(shifted, ijk, shape)[:6], _sums(values, ijk, shape)[:6], rtol=1e-10)


def test_smoothness_blocked_equals_one_block():
    """Blocks read their neighbours' voxels from the blocks before them: sums equal the whole's."""
    shape = (12, 10, 9)
    field = _smooth_field(shape, 1.0, 6, seed=5)
    mask = np.ones(shape, dtype=bool)
    mask[4:7, 2:5, :] = False
    ijk = np.argwhere(mask)
    values = field[:, mask]
    whole = _sums(values, ijk, shape)
    for chunk in (7, 50, 333):
        blocked = meta_graph.compute_together(grf.smoothness_sums(meta_graph.from_numpy(values, chunk), ijk, shape))[0]
        # the same pair products summed in another order: float64 rounding
        np.testing.assert_allclose(blocked, whole, rtol=1e-12, err_msg=str(chunk))


def test_smoothness_without_pairs_is_refused():
    with pytest.raises(ValueError, match="cannot be estimated"):
        kgrf.smoothness(np.zeros(kgrf.N_SUMS))


# -- cluster p --------------------------------------------------------------------------


def test_cluster_p_closed_form_at_known_inputs():
    """p = 1 - exp(-E[m] exp(-beta k^(2/3))) at V = 100,000 voxels, dLh = 0.01, z = 3, k = 40,
    written out with the math module."""
    volume, dlh, z, k = 100_000, 0.01, 3.0, 40
    em = volume * dlh * (z * z - 1) * math.exp(-z * z / 2) / (2 * math.pi) ** 2
    en = volume * 0.5 * math.erfc(z / math.sqrt(2))
    beta = (math.gamma(2.5) * em / en) ** (2 / 3)
    expected = 1 - math.exp(-em * math.exp(-beta * k ** (2 / 3)))
    assert kgrf.cluster_p([k], z, dlh, volume)[0] == pytest.approx(expected, rel=1e-12)


def test_cluster_p_falls_with_size_and_with_roughness():
    sizes = np.arange(1, 400)
    p = kgrf.cluster_p(sizes, 2.5, 0.02, 50_000)
    assert (np.diff(p) < 0).all() and 0 < p[-1] < p[0] <= 1
    # a rougher field (larger dLh) has more, smaller clusters: a 100-voxel one is rarer there
    rough, smooth = kgrf.cluster_p([100], 2.5, 0.05, 50_000)[0], kgrf.cluster_p([100], 2.5, 0.005, 50_000)[0]
    assert rough < smooth


def test_cluster_size_distribution_has_the_expected_mean():
    """Sum over k of P(S >= k) (the mean size, continuous) is E[N] / E[m] = V Phi(-h) / E[m]."""
    volume, dlh, z = 200_000, 0.01, 2.8
    em = kgrf.expected_clusters(z, dlh, volume)
    tail = lambda k: -np.log1p(-kgrf.cluster_p([k], z, dlh, volume)[0]) / em  # P(S >= k)
    mean, _ = integrate.quad(tail, 0, np.inf, limit=200)
    assert mean == pytest.approx(float(kgrf.expected_voxels(z, volume) / em), rel=1e-6)


def test_expected_clusters_is_nipys_euler_characteristic_density():
    rft = pytest.importorskip("nipy.algorithms.statistics.rft")
    z = np.array([1.5, 2.3, 3.1, 4.0, 5.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # nipy's poly1d copy, not ours
        density = rft.Gaussian().density(z, 3)  # EC density per unit volume of a field with Lambda = I
    volume, dlh = 123_456, 0.0123
    np.testing.assert_allclose(kgrf.expected_clusters(z, dlh, volume), volume * dlh * density, rtol=1e-12)


def test_low_cluster_forming_threshold_is_refused():
    with pytest.raises(ValueError, match="cluster-forming z of at least"):
        kgrf.cluster_p([10], 0.9, 0.01, 1000)
    with pytest.raises(InputError, match="lower cdt"):
        FFX_GLM(cdt=0.5, cluster="grf")
    with pytest.raises(InputError, match="'fdr'.*'grf'"):
        FFX_GLM(cluster="fsl")


# -- the old module functions -----------------------------------------------------------


@pytest.fixture(scope="module")
def old_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("old_api")
    spec = reference.write_maps_folder(folder / "maps", seed=4)
    table = pd.DataFrame(spec["images"])
    mask_img = nib.load(spec["mask"])
    mask = np.asarray(mask_img.dataobj) != 0
    arrays = {role: np.stack([np.asarray(nib.load(p).dataobj)[mask] for p in table[role]]).astype(np.float64)
              for role in ("beta", "se", "varcope")}
    sizes = np.array([s[0] for s in table["sample_sizes"]], dtype=float)
    node = convert_meta_maps(table, folder / "meta.zarr", "studies", mask_img=spec["mask"])
    return {"folder": folder, "spec": spec, "table": table, "mask_img": mask_img, "sizes": sizes, "node": node,
            **arrays}


@pytest.fixture(scope="module")
def nimare_equivalents(old_data):
    """NiMARE 0.22's nearest estimators: WeightedLeastSquares(tau2=0) is the fixed-effects weighted
    mean; VarianceBasedLikelihood(method='reml') the REML tau^2 and its weighted mean."""
    spec = dict(old_data["spec"])
    spec["fits"] = [{"name": "wls", "class": "WeightedLeastSquares", "params": {}, "corrections": []},
                    {"name": "vbl", "class": "VarianceBasedLikelihood", "params": {"method": "reml"},
                     "corrections": []}]
    spec_path, out = old_data["folder"] / "spec.json", old_data["folder"] / "nimare.npz"
    spec_path.write_text(json.dumps(spec))
    run = subprocess.run([_python(), str(ROOT / "tests" / "_nimare_reference.py"), str(spec_path), str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    data = np.load(out)
    return {key: data[key] for key in data.files}


def test_ffx_glm_returns_the_old_maps_and_nimare_wls_estimate(old_data, nimare_equivalents):
    out = ffx_glm(old_data["beta"], old_data["se"], old_data["sizes"], old_data["mask_img"])
    assert sorted(out) == sorted(["cope", "z", "thresh_z", "t", "p", "log_p"])
    wls = nimare_equivalents["wls/est"].astype(np.float64)
    np.testing.assert_array_equal(np.isnan(out["cope"]), np.isnan(wls))
    # ours weights by se**2 of the float32 se file, NiMARE by the float32 varcope file: float32 rounding
    np.testing.assert_allclose(out["cope"], wls, rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(out["p"], 2 * special.ndtr(-np.abs(out["z"])), rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(out["log_p"], -np.log10(out["p"]), rtol=1e-12, equal_nan=True)


def test_mfx_glm_cope_is_nimare_reml_estimate(old_data, nimare_equivalents):
    out = mfx_glm(old_data["beta"], old_data["se"], old_data["sizes"], old_data["mask_img"])
    vbl = nimare_equivalents["vbl/est"].astype(np.float64)
    np.testing.assert_array_equal(np.isnan(out["cope"]), np.isnan(vbl))
    # tau2 from a Newton solve here, PyMARE's bounded minimiser there (test_meta_parity's 1e-4)
    np.testing.assert_allclose(out["cope"], vbl, rtol=1e-4, atol=1e-6, equal_nan=True)


def test_fsl_glm_equals_the_estimator_classes_with_grf(old_data):
    for inference, klass in (("ffx", FFX_GLM), ("mfx", MFX_GLM)):
        out = fsl_glm(old_data["beta"], old_data["se"], old_data["sizes"], old_data["mask_img"], inference,
                      cdt=0.05, q=0.5)
        assert (out["thresh_z"] != 0).any()  # clusters were kept: the comparison below is not of empty maps
        result = klass(cdt=0.05, q=0.5, cluster="grf").fit(old_data["node"])
        maps = result.maps
        # float32 maps of the class vs float64 here
        np.testing.assert_allclose(maps["z"], out["z"], rtol=1e-5, atol=1e-6, equal_nan=True)
        np.testing.assert_array_equal(maps["z_corr-cluster"] != 0, out["thresh_z"] != 0)
        np.testing.assert_allclose(result.get_map("thresh_z", "array"), out["thresh_z"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.get_map("cope", "array"), out["cope"], rtol=1e-5, equal_nan=True)
        np.testing.assert_array_equal(result.get_map("log_p", "array"), maps["logp"])
        assert set(result.metadata["smoothness"]) >= {"fwhm", "dlh", "resels", "volume"}


def test_old_functions_find_a_smooth_blob_and_its_sign(tmp_path):
    """Positive and negative smooth effects in smooth noise: both clusters kept (two-sided), the
    negative one with negative thresh_z; one-sided keeps the positive only; blocks change nothing."""
    shape, n_images = (24, 24, 24), 16
    noise = _smooth_field(shape, 1.5, n_images, seed=8)
    noise /= noise.std()
    grid = np.indices(shape)
    blob = lambda c: np.exp(-(((grid - np.array(c)[:, None, None, None]) ** 2).sum(0)) / 8.0)
    effect = 2.0 * blob((7, 7, 7)) - 2.0 * blob((16, 16, 16))
    mask = np.ones(shape, dtype=bool)
    mask_img = nib.Nifti1Image(mask.astype(np.uint8), np.eye(4))
    con = (noise + effect)[:, mask]
    se = np.full_like(con, 1.0)
    sizes = np.full(n_images, 20)
    two = ffx_glm(con, se, sizes, mask_img, cdt=0.001, q=0.05)
    one = ffx_glm(con, se, sizes, mask_img, cdt=0.001, q=0.05, two_sided=False)
    blocked = ffx_glm(con, se, sizes, mask_img, cdt=0.001, q=0.05, chunk_voxels=1000)
    thresh = two["thresh_z"].reshape(shape)
    assert thresh[7, 7, 7] > 0 and thresh[16, 16, 16] < 0
    assert one["thresh_z"].reshape(shape)[7, 7, 7] > 0 and (one["thresh_z"] >= 0).all()
    for key in two:
        np.testing.assert_allclose(blocked[key], two[key], rtol=1e-10, err_msg=key)


def test_old_function_bad_input_says_what_was_received(old_data):
    beta, se, sizes, mask = old_data["beta"], old_data["se"], old_data["sizes"], old_data["mask_img"]
    with pytest.raises(InputError, match='"inference" must be "mfx" or "ffx"'):
        fsl_glm(beta, se, sizes, mask, "rfx")
    with pytest.raises(InputError, match=r"one shape; received \(8, \d+\) and \(8, 3\)"):
        ffx_glm(beta, se[:, :3], sizes, mask)
    with pytest.raises(InputError, match="8 maps, 3 sample sizes"):
        ffx_glm(beta, se, sizes[:3], mask)
    with pytest.raises(InputError, match="in-mask voxels but the maps have 5"):
        mfx_glm(beta[:, :5], se[:, :5], sizes, mask)


def test_grf_cluster_maps_are_built_with_the_maps_in_one_pass(old_data):
    with raise_if_dask_computes():
        result = FFX_GLM(cluster="grf").fit(old_data["node"])
    assert {"z_corr-cluster", "labels_corr-cluster", "logp_corr-cluster"} <= set(result.maps)
    assert "cluster" not in FFX_GLM(cluster="grf").get_params()  # chunkglm only, reported apart


def test_grf_reads_each_store_chunk_once_for_maps_and_smoothness(old_data, tmp_path, monkeypatch):
    """The smoothness sums read the contrast maps' blocks (and their neighbours' tails) in the graph
    of the maps: every store chunk is still read once."""
    from chunkglm.meta._inputs import MetaMaps

    node = convert_meta_maps(old_data["table"], tmp_path / "small.zarr", "small", mask_img=old_data["spec"]["mask"],
                             chunk_bytes=8 * 4 * 64)
    reads, arrays = [], {}
    original = MetaMaps.data

    def counted(self, role):
        if role not in arrays:  # one dask array per map type, as the store gives (same keys each call)
            def read(block, block_info=None):
                reads.append((role, block_info[0]["chunk-location"]))
                return block
            stored = original(self, role)
            arrays[role] = stored.map_blocks(read, dtype=stored.dtype)
        return arrays[role]

    monkeypatch.setattr(MetaMaps, "data", counted)
    result = FFX_GLM(cluster="grf", chunk_voxels=32).fit(node)
    assert (result.maps["logp_corr-cluster"] > 0).any()
    n_chunks = arrays["beta"].numblocks[1]
    assert n_chunks > 1 and set(arrays) == {"beta", "se"}
    assert sorted(reads) == [(r, (0, i)) for r in ("beta", "se") for i in range(n_chunks)]


def test_grf_class_maps_do_not_depend_on_the_blocks(old_data):
    whole = MFX_GLM(cluster="grf", cdt=0.05, q=0.5).fit(old_data["node"])
    blocked = MFX_GLM(cluster="grf", cdt=0.05, q=0.5, chunk_voxels=16).fit(old_data["node"])
    for name, values in whole.maps.items():  # per-voxel arithmetic: equal
        if name == "logp_corr-cluster":  # from the smoothness sums, added in another order: float32 rounding
            np.testing.assert_allclose(blocked.maps[name], values, rtol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(blocked.maps[name], values, err_msg=name)
    np.testing.assert_allclose(blocked.metadata["smoothness"]["fwhm"], whole.metadata["smoothness"]["fwhm"],
                               rtol=1e-12)


def test_old_names_are_importable_where_old_code_imports_them():
    import chunkglm.meta as meta

    assert ibma.ffx_glm is meta.ffx_glm and ibma.mfx_glm is meta.mfx_glm and ibma.fsl_glm is meta.fsl_glm


# -- the ``con`` image type ------------------------------------------------------------------


def test_con_column_is_the_beta_maps(old_data, tmp_path):
    table = old_data["table"].rename(columns={"beta": "con"})
    from_con = FFX_GLM(mask=old_data["spec"]["mask"], store=tmp_path / "c.zarr").fit(table).maps
    from_beta = FFX_GLM().fit(old_data["node"]).maps
    for name in ("est", "z", "z_corr-cluster"):
        np.testing.assert_array_equal(from_con[name], from_beta[name], err_msg=name)
    node = convert_meta_maps(table, tmp_path / "d.zarr", "con", mask_img=old_data["spec"]["mask"])
    assert "beta" in node.attrs["variables"]
    both = old_data["table"].assign(con=old_data["table"]["beta"])
    with pytest.raises(InputError, match="'con' is NiMARE 0.0.x's name for 'beta'"):
        FFX_GLM(mask=old_data["spec"]["mask"]).fit(both)


class Dataset:  # NiMARE's Dataset as chunkglm duck-types it (class name, images, metadata, masker)
    def __init__(self, images, metadata, masker):
        self.images, self.metadata, self.masker = images, metadata, masker


def test_dataset_with_con_images(old_data):
    from nilearn.maskers import NiftiMasker

    table = old_data["table"]
    images = pd.DataFrame({"id": table["id"], "study_id": table["study_id"], "con": table["beta"],
                           "se": table["se"]})
    metadata = pd.DataFrame({"id": table["id"], "sample_sizes": table["sample_sizes"]})
    dataset = Dataset(images, metadata, NiftiMasker(old_data["spec"]["mask"]).fit())
    ours = ibma.RFX_GLM().fit(dataset).maps
    expected = ibma.RFX_GLM().fit(old_data["node"]).maps
    np.testing.assert_array_equal(ours["t"], expected["t"])
