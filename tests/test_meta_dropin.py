"""NiMARE drop-in behaviour of chunkglm's IBMA (issue 16): inputs as NiMARE takes them, results and
correctors as NiMARE's, and the module layout a NiMARE user renames to.

NiMARE itself is not imported (chunkglm never does): its Dataset/Studyset are stood in for by
objects with the attributes chunkglm reads; NiMARE's own suites run in tests/peer.
"""

from __future__ import annotations

import logging

import dask
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import _nimare_reference as reference
from chunkglm.errors import InputError
from chunkglm.meta import ibma


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("meta_dropin")
    spec = reference.write_maps_folder(folder / "maps", seed=3)
    return {"folder": folder, "spec": spec, "table": pd.DataFrame(spec["images"])}


@pytest.fixture(autouse=True)
def _threads():
    with dask.config.set(scheduler="threads"):
        yield


class Dataset:
    """Stand-in for nimare.dataset.Dataset: the attributes chunkglm reads (images, metadata, masker, ids)."""

    def __init__(self, table, mask):
        self.images = table.drop(columns=["sample_sizes"])
        self.metadata = pd.DataFrame({"id": table["id"], "sample_sizes": list(table["sample_sizes"])})
        self.masker = type("NiftiMasker", (), {"mask_img": mask if isinstance(mask, nib.Nifti1Image)
                                                else nib.load(mask)})()
        self.ids = np.asarray(table["id"])

    def slice(self, ids):
        keep = self.images["id"].isin(ids).to_numpy()
        table = self.images[keep].assign(sample_sizes=list(self.metadata["sample_sizes"][keep]))
        return Dataset(table.reset_index(drop=True), self.masker.mask_img)


def test_missing_maps_drop_their_analyses(data):
    table = data["table"].copy()
    table.loc[2, "varcope"] = None  # as NiMARE's pain_20: no varcope
    table.loc[5, "z"] = None  # as pain_21: no z
    dataset = Dataset(table, data["spec"]["mask"])
    dsl = ibma.DerSimonianLaird()
    maps = dsl.fit(dataset).maps
    assert table["id"][2] not in dsl.inputs_["id"] and len(dsl.inputs_["id"]) == len(table) - 1
    assert list(dsl.studyset_.ids) == dsl.inputs_["id"]
    expected = ibma.DerSimonianLaird(mask=data["spec"]["mask"]).fit(data["table"].drop(index=2)).maps
    np.testing.assert_array_equal(maps["z"], expected["z"])
    fishers = ibma.Fishers()
    fishers.fit(dataset)
    assert table["id"][5] not in fishers.inputs_["id"] and table["id"][2] in fishers.inputs_["id"]
    assert fishers.inputs_["z_maps"].shape[0] == len(table) - 1
    with pytest.raises(ValueError, match="1 of 8 analyses lack required data"):
        ibma.Fishers().fit(dataset, drop_invalid=False)


def test_too_few_analyses_say_where_the_others_went(data):
    table = data["table"].iloc[:2].copy()
    table.loc[1, "z"] = None
    with pytest.raises(ValueError, match="Fishers needs at least 2 analyses, but 1 of the 2 submitted reached "
                                         "the estimator; the other 1 lacked required data \\('z_maps'\\)"):
        ibma.Fishers().fit(Dataset(table, data["spec"]["mask"]))


def test_sample_sizes_lists_read_as_nimare(data):
    table = data["table"].copy()
    table["sample_sizes"] = [[10, 20]] + [[n] for n in table["sample_sizes"].map(lambda v: np.mean(v))[1:]]
    stouffers = ibma.Stouffers(use_sample_size=True)
    stouffers.fit(Dataset(table, data["spec"]["mask"]))
    assert stouffers.inputs_["sample_sizes"][0] == [10.0, 20.0]
    assert stouffers._meta_maps.sample_sizes[0] == 15.0


def test_maps_on_another_grid_are_resampled_as_nimare(data, tmp_path):
    from nilearn.image import resample_to_img

    table = data["table"][["id", "study_id", "z"]].copy()
    img = nib.load(table["z"][1])
    affine = img.affine.copy()
    affine[:3, :3] *= 0.5
    path = tmp_path / "finer.nii.gz"
    nib.save(resample_to_img(img, nib.Nifti1Image(np.zeros((12, 14, 10), np.float32), affine),
                             interpolation="continuous"), path)
    table.loc[1, "z"] = str(path)
    mask = nib.load(data["spec"]["mask"])
    got = ibma.Fishers(mask=mask).fit(table).maps["z"]
    resampled = tmp_path / "back.nii.gz"
    nib.save(resample_to_img(nib.load(path), mask, clip=True, interpolation="linear", copy_header=True), resampled)
    expected = ibma.Fishers(mask=mask).fit(table.assign(z=[*table["z"][:1], str(resampled), *table["z"][2:]])).maps
    np.testing.assert_array_equal(got, expected["z"])
    with pytest.raises(InputError, match="another grid"):  # a direct conversion still refuses
        from chunkglm.meta import convert_meta_maps
        convert_meta_maps(table, tmp_path / "s.zarr", "x", mask_img=mask)


def test_empty_image_is_dropped_and_named(data, tmp_path, caplog):
    table = data["table"][["id", "study_id", "z"]].copy()
    img = nib.load(table["z"][3])
    path = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), path)
    table.loc[3, "z"] = str(path)
    with caplog.at_level(logging.WARNING):
        meta = ibma.Fishers(mask=data["spec"]["mask"])
        meta.fit(table)
    assert table["id"][3] in caplog.text and table["id"][3] not in meta.inputs_["id"]
    with pytest.raises(ValueError, match="drop_invalid=True"):
        ibma.Fishers(mask=data["spec"]["mask"]).fit(table, drop_invalid=False)


def test_niftimasker_as_mask(data):
    from nilearn.maskers import NiftiMasker

    masker = NiftiMasker(data["spec"]["mask"]).fit()
    got = ibma.Hedges(mask=masker).fit(data["table"]).maps["z"]
    np.testing.assert_array_equal(got, ibma.Hedges(mask=data["spec"]["mask"]).fit(data["table"]).maps["z"])


def test_labels_masker_is_refused_or_warned_as_nimare(data, tmp_path, caplog):
    from nilearn.maskers import NiftiLabelsMasker

    mask = nib.load(data["spec"]["mask"])
    labels = (np.asarray(mask.dataobj) != 0).astype(np.int16) * (1 + np.arange(mask.shape[0]) % 3)[:, None, None]
    atlas = nib.Nifti1Image(labels.astype(np.int16), mask.affine)
    with pytest.raises(ValueError, match="Only NiftiMaskers are allowed"):
        ibma.Fishers(mask=NiftiLabelsMasker(atlas)).fit(data["table"])
    with caplog.at_level(logging.WARNING):
        result = ibma.DerSimonianLaird(mask=NiftiLabelsMasker(atlas)).fit(data["table"])
    assert "will likely produce biased results" in caplog.text
    assert result.maps["z"].shape == (3,) and result.get_map("z").shape == mask.shape


def test_metaresult_and_correctors_as_nimare(data, tmp_path):
    from chunkglm.correct import FDRCorrector, FWECorrector
    from chunkglm.results import MetaResult

    mask = nib.load(data["spec"]["mask"])
    n = int((np.asarray(mask.dataobj) != 0).sum())
    p = np.linspace(1e-6, 1, n)
    result = MetaResult(ibma.Fishers(), mask=mask, maps={"p": p, "z": np.ones(n)}, description="d")
    assert result.maps["p"].dtype == np.float32 and result.metadata == {} and result.diagnostics == []
    corrected = FDRCorrector(method="indep").transform(result)
    assert "p_corr-FDR_method-indep" in corrected.maps and "p_corr-FDR_method-indep" not in result.maps
    assert "benjamini1995controlling" in corrected.bibtex_
    assert corrected.get_map("p_corr-FDR_method-indep").shape == mask.shape
    assert FDRCorrector.inspect(result) == ["indep", "negcorr"]
    assert FWECorrector(method="montecarlo", n_iters=5, n_cores=None).parameters == {"n_iters": 5}
    with pytest.raises(ValueError, match="n_iters must be a positive integer"):
        FWECorrector(method="montecarlo", n_iters=True)
    with pytest.raises(TypeError, match="Accepted keyword arguments: \\(none\\)"):
        FWECorrector(method="bonferroni", voxel_thresh=0.01).transform(result)
    corrected.save(tmp_path / "r.pkl.gz")
    loaded = MetaResult.load(tmp_path / "r.pkl.gz")
    np.testing.assert_array_equal(loaded.maps["p_corr-FDR_method-indep"], corrected.maps["p_corr-FDR_method-indep"])


def test_fitted_result_pickles_and_estimator_params_are_nimare(data, tmp_path):
    meta = ibma.DerSimonianLaird(mask=data["spec"]["mask"], store=tmp_path / "s.zarr")
    result = meta.fit(data["table"])
    assert sorted(meta.get_params()) == ["rho", "small_sample_correction", "weight_scheme"]
    assert meta.chunkglm_params()["store"] == tmp_path / "s.zarr"
    with pytest.raises(ValueError, match="Invalid parameter nope"):
        meta.set_params(nope=1)
    assert meta.set_params(rho=0.5).rho == 0.5
    result.save(tmp_path / "r.pkl.gz")
    from chunkglm.results import MetaResult

    loaded = MetaResult.load(tmp_path / "r.pkl.gz")
    np.testing.assert_array_equal(loaded.maps["z"], result.maps["z"])
    np.testing.assert_array_equal(np.asarray(loaded.get_map("z").dataobj), np.asarray(result.get_map("z").dataobj))
    meta.save(tmp_path / "e.pkl.gz")
    assert type(ibma.DerSimonianLaird.load(tmp_path / "e.pkl.gz")) is ibma.DerSimonianLaird


def test_module_layout_a_nimare_user_renames_to():
    import chunkglm.correct
    import chunkglm.meta
    import chunkglm.meta.correct
    import chunkglm.results

    assert chunkglm.meta.Fishers is ibma.Fishers and chunkglm.meta.PermutedOLS is ibma.PermutedOLS
    assert chunkglm.correct.FDRCorrector is chunkglm.meta.correct.FDRCorrector
    assert chunkglm.results.MetaResult is chunkglm.meta.results.MetaResult
