"""FirstLevelModel on surface runs (nilearn SurfaceImages, store surface runs) against nilearn's.

Tolerance: relative L2 1e-7 over the fitted vertices, every output map, the
volume tests' float32 bound (tests/test_first_level.py). On surfaces nilearn's
SurfaceMasker hands the float32 values on as float64 and mean-scales them in
float64; chunkglm casts each block to float64 before scaling too, so both fit
the same float64 numbers: measured 3e-15 (OLS and AR(1)), the rest of the
bound is summation order. An AR(1) vertex on a bin edge could change bins under
another summation order; none did.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.datasets import load_fsaverage
from nilearn.glm.first_level import FirstLevelModel as NilearnFLM
from nilearn.maskers import SurfaceMasker
from nilearn.surface import SurfaceImage

from chunkglm.errors import InputError
from chunkglm.glm.first_level import FirstLevelModel
from chunkglm.io.cohort import open_cohort
from chunkglm.io.surface_convert import convert_surface_runs
from chunkglm.testing import make_synthetic_bids, rel_l2

REL_L2 = 1e-7
MAPS = ("z_score", "stat", "p_value", "effect_size", "effect_variance")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_bids(tmp_path_factory.mktemp("surface_flm"), n_subjects=1, n_runs=2, surface=True)


@pytest.fixture(scope="module")
def runs(dataset):
    """The GIFTI runs as nilearn reads them (float32 SurfaceImages) and their events."""
    mesh = load_fsaverage("fsaverage5")["pial"]
    images = [SurfaceImage(mesh, {p: str(f) for p, f in files.gifti.items()}) for files in dataset.surface.runs]
    events = [pd.read_csv(r.events_path, sep="\t") for r in dataset.runs]
    return images, events


def _values(img):
    return np.concatenate([np.asarray(img.data.parts[p]) for p in ("left", "right")])


def _compare(ours, ref, contrast, stat_type=None, mask=None, tolerance=REL_L2):
    got = ours.compute_contrast(contrast, stat_type=stat_type, output_type="all")
    want = ref.compute_contrast(contrast, stat_type=stat_type, output_type="all")
    for name in MAPS:
        assert isinstance(got[name], SurfaceImage), name
        assert got[name].shape == want[name].shape, name
        assert rel_l2(_values(got[name]), _values(want[name]), mask) <= tolerance, name
    return got


@pytest.mark.parametrize("noise_model", ["ols", "ar1"])
def test_matches_nilearn_on_surface_images(runs, dataset, noise_model):
    images, events = runs
    params = dict(t_r=dataset.tr, slice_time_ref=0.5, noise_model=noise_model)
    ref = NilearnFLM(**params).fit(images, events=events)
    ours = FirstLevelModel(**params, chunk_bytes=40 * 8 * 3000).fit(images, events=events)
    assert not ours._is_volume_glm() and isinstance(ours.masker_, SurfaceMasker)
    assert ours.mask_img_.shape == ref.mask_img_.shape == (20484,)
    assert np.array_equal(_values(ours.mask_img_), _values(ref.mask_img_))
    assert ours.n_elements_ == 20484
    _compare(ours, ref, "a - b")
    f_maps = _compare(ours, ref, np.eye(len(ours.design_matrices_[0].columns))[:2], "F")
    assert f_maps["effect_size"].shape == (20484, 2)  # nilearn's: one column per row of the contrast
    # the true effect is found: where the true a - b is over half its peak (236 vertices), z has its
    # sign (measured 98.7 %; by chance 50 %)
    truth = dataset.surface.betas["a"] - dataset.surface.betas["b"]
    z = _values(ours.compute_contrast("a - b"))
    strong = np.abs(truth) > 0.5 * np.abs(truth).max()
    assert np.mean(np.sign(z[strong]) == np.sign(truth[strong])) > 0.9


def test_a_surface_mask_and_the_voxelwise_attributes(runs, dataset):
    images, events = runs
    mask = SurfaceImage(images[0].mesh, {p: (np.arange(10242) % 4 == 0) for p in ("left", "right")})
    params = dict(t_r=dataset.tr, slice_time_ref=0.5, mask_img=mask, minimize_memory=False)
    ref = NilearnFLM(**params).fit(images[0], events=events[0])
    ours = FirstLevelModel(**params).fit(images[0], events=events[0])
    inside = _values(mask)
    assert ours.n_elements_ == inside.sum()
    got = _compare(ours, ref, "a", mask=inside)
    assert not _values(got["z_score"])[~inside].any()  # 0 outside the mask, as nilearn's
    for name in ("r_square_", "residuals_", "predicted_"):
        ours_maps, ref_maps = getattr(ours, name), getattr(ref, name)
        assert ours_maps[0].shape == ref_maps[0].shape, name
        assert rel_l2(_values(ours_maps[0]), _values(ref_maps[0]), inside) <= REL_L2, name


def test_store_surface_runs_fit_as_the_images(tmp_path, runs, dataset):
    """Runs converted once (GIFTI files -> store) fit as nilearn fits the SurfaceImages; the TR
    comes from the runs' sidecars."""
    images, events = runs
    names = convert_surface_runs([files.gifti for files in dataset.surface.runs], tmp_path / "s.zarr",
                                 mesh="fsaverage5", events=events, chunk_bytes=40 * 4 * 2500)
    cohort = open_cohort(tmp_path / "s.zarr")
    nodes = [cohort.runs[name] for name in names]
    ours = FirstLevelModel(slice_time_ref=0.5, mask_img=False).fit(nodes)  # events stored with the runs
    ref = NilearnFLM(t_r=dataset.tr, slice_time_ref=0.5, mask_img=False).fit(images, events=events)
    _compare(ours, ref, "a - b")


def test_chunked_equals_unchunked(runs, dataset):
    images, events = runs
    maps = [FirstLevelModel(t_r=dataset.tr, chunk_bytes=size).fit(images[0], events=events[0])
            .compute_contrast("a - b", output_type="all") for size in (40 * 8 * 1000, "256MiB")]
    for name in MAPS:
        np.testing.assert_allclose(_values(maps[0][name]), _values(maps[1][name]), rtol=1e-12, atol=1e-14)


def test_smoothing_along_the_mesh_as_nilearn(runs, dataset):
    """nilearn smooths along the mesh (its smooth_img) before masking; chunkglm smooths each run with
    the same function before storing it. Tolerance 1e-5, the volume tests' for int16 inputs: the
    smoothed values are float64 in nilearn and float32 in the store (its format), a 6e-8 relative
    rounding that percent-signal scaling amplifies (measured 5.3e-6 on z)."""
    images, events = runs
    params = dict(t_r=dataset.tr, smoothing_fwhm=6.0, noise_model="ols")
    ref = NilearnFLM(**params).fit(images[0], events=events[0])
    ours = FirstLevelModel(**params).fit(images[0], events=events[0])
    _compare(ours, ref, "a - b", tolerance=1e-5)


def test_refusals_as_nilearn(runs, dataset, tmp_path):
    images, events = runs
    volume_mask = nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4))
    with pytest.raises(TypeError, match="Mask and input images must be of compatible types"):
        FirstLevelModel(t_r=2.0, mask_img=volume_mask).fit(images[0], events=events[0])
    with pytest.raises(TypeError, match="Mask and input images must be of compatible types"):
        FirstLevelModel(t_r=2.0, mask_img=SurfaceMasker().fit(images[0])).fit(str(dataset.runs[0].bold_path),
                                                                                events=events[0])
    with pytest.raises(InputError, match="holds surface files.*convert them first"):
        FirstLevelModel(t_r=2.0).fit(dataset.surface.runs[0].gifti, events=events[0])
    with pytest.raises(InputError, match="holds surface files.*convert them first"):
        FirstLevelModel(t_r=2.0).fit(str(dataset.surface.runs[0].cifti), events=events[0])
    one_map = SurfaceImage(images[0].mesh, {p: images[0].data.parts[p][:, 0] for p in ("left", "right")})
    with pytest.raises(InputError, match="2-D SurfaceImage"):
        FirstLevelModel(t_r=2.0).fit(one_map, events=events[0])
    with pytest.raises(InputError, match="t_r not given"):
        FirstLevelModel().fit(images[0], events=events[0])
    # no time point: nilearn's ValueError saying "empty", for surfaces and volumes alike
    empty = SurfaceImage(images[0].mesh, {p: np.zeros((10242, 0), np.float32) for p in ("left", "right")})
    design = pd.DataFrame({"constant": np.ones(0)})
    with pytest.raises(ValueError, match="empty"):
        FirstLevelModel().fit(empty, design_matrices=design)
    with pytest.raises(ValueError, match="empty"):
        FirstLevelModel().fit(nib.Nifti1Image(np.zeros((7, 9, 0)), np.eye(4)), design_matrices=design)


@pytest.mark.parametrize("noise_model", ["ols", "ar1"])
def test_cifti_runs_cortex_as_nilearn_on_the_gifti_runs(tmp_path, runs, dataset, noise_model):
    """CIFTI store runs (cortex vertices + thalamus voxels) fit element by element; their cortex
    elements hold the GIFTI runs' values (tests/test_surface_store.py), so their maps there equal
    nilearn's fit of the GIFTI SurfaceImages. AR(1): nilearn's Yule-Walker subtracts the grand
    mean of all residuals (here with the voxels), ~0 with an intercept: measured 1.6e-15."""
    from nibabel.cifti2 import Cifti2Image

    from chunkglm.io.surface_convert import convert_surface_bids

    images, events = runs
    convert_surface_bids(dataset.root, tmp_path / "c.zarr", space="fsaverage5", cifti=True)
    nodes = list(open_cohort(tmp_path / "c.zarr").runs.values())
    ours = FirstLevelModel(noise_model=noise_model, slice_time_ref=0.5).fit(nodes)
    ref = NilearnFLM(t_r=dataset.tr, slice_time_ref=0.5, noise_model=noise_model, mask_img=False).fit(
        images, events=events)
    kept = dataset.surface.cifti_vertices
    cortex = np.concatenate([kept["left"], 10242 + kept["right"]])
    got = ours.compute_contrast("a - b", output_type="all")
    want = ref.compute_contrast("a - b", output_type="all")
    for name in MAPS:
        assert isinstance(got[name], Cifti2Image) and got[name].shape == (1, len(dataset.surface.brain_models))
        assert got[name].header.get_axis(1) == dataset.surface.brain_models
        values = np.asarray(got[name].dataobj)[0]
        assert rel_l2(values[:len(cortex)], _values(want[name])[cortex]) <= REL_L2, name
        assert np.isfinite(values[len(cortex):]).all()  # the thalamus voxels are fitted too
    assert ours.masker_ is None and np.asarray(ours.mask_img_.dataobj).all()
    if noise_model == "ols":  # the header built once per grid is copied into each image, never shared
        first, second = got["z_score"].header, ours.compute_contrast("a - b").header
        assert first is not second and first.get_axis(1) == second.get_axis(1)
        model_axis = first.matrix.get_index_map(1)
        model_axis[0].vertex_indices[0] = 1 + model_axis[0].vertex_indices[0]  # a user edits one image's header
        assert ours.compute_contrast("a - b").header.get_axis(1) == dataset.surface.brain_models
        assert second.get_axis(1) == dataset.surface.brain_models


def test_first_level_from_bids_surface_folder_and_store(tmp_path, dataset):
    """space_label='fsaverage5': from the BIDS folder (nilearn's discovery: SurfaceImage runs, timing
    from the sidecars) and from a store of the same GIFTI runs (convert_surface_bids), both equal to
    nilearn's first_level_from_bids models fitted on the same runs."""
    from nilearn.glm.first_level import first_level_from_bids as nilearn_from_bids

    from chunkglm.glm.first_level import first_level_from_bids
    from chunkglm.io.surface_convert import convert_surface_bids

    where = dict(derivatives_folder="derivatives/fmriprep")
    refs, ref_imgs, ref_events, _ = nilearn_from_bids(dataset.root, "main", space_label="fsaverage5", **where)
    want = refs[0].fit(ref_imgs[0], events=ref_events[0]).compute_contrast("a - b")
    models, imgs, events, _ = first_level_from_bids(dataset.root, "main", space_label="fsaverage5", **where)
    assert isinstance(imgs[0][0], SurfaceImage) and models[0].slice_time_ref == 0.5
    got = models[0].fit(imgs[0], events=events[0]).compute_contrast("a - b")
    assert rel_l2(_values(got), _values(want)) <= REL_L2
    convert_surface_bids(dataset.root, tmp_path / "s.zarr", space="fsaverage5")
    models, nodes, events, _ = first_level_from_bids(tmp_path / "s.zarr", "main", space_label="fsaverage5")
    assert (models[0].t_r, models[0].slice_time_ref) == (dataset.tr, 0.5)  # from the stored sidecars
    got = models[0].fit(nodes[0], events=events[0]).compute_contrast("a - b")
    assert rel_l2(_values(got), _values(want)) <= REL_L2
    with pytest.raises(InputError, match="on a surface grid"):
        first_level_from_bids(tmp_path / "s.zarr", "main", mask_img="derivatives")
