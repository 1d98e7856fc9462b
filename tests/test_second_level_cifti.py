"""SecondLevelModel and non_parametric_inference on CIFTI-2 dense scalar maps.

nilearn reads no CIFTI, so the anchors are nilearn fitted on the same numbers
in the forms it reads: the cortex grayordinates as SurfaceImages on
fsaverage5 (the vertices left out of the CIFTI axis NaN: nilearn's
SurfaceMasker leaves them out), and every grayordinate (cortex vertices and
subcortical voxels) as the voxels of a NIfTI image of shape (n, 1, 1) with
NiftiMasker's path (a mask given). Tolerance: the maps are float32 and stored
exactly (the store is float32), both sides fit the same float64 numbers, so the
maps differ only by the algebra (chunkglm's QR-basis normal equations vs
nilearn's pinv), ~1e-15 relative; bound 1e-7, as tests/test_second_level_surface.py.
Max-T -log10 p-values are ranks of the same permutations (same random_state):
equal while no null maximum ties a t within 1e-10 (checked).
"""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nibabel.cifti2 import BrainModelAxis, Cifti2Header, Cifti2Image, ScalarAxis, SeriesAxis
from nilearn.datasets import load_fsaverage
from nilearn.exceptions import NotImplementedWarning
from nilearn.glm.second_level import SecondLevelModel as NilearnSLM
from nilearn.glm.second_level import non_parametric_inference as nilearn_npi
from nilearn.surface import SurfaceImage

from chunkglm.errors import InputError, InputTypeError
from chunkglm.glm.first_level import FirstLevelModel
from chunkglm.glm.second_level import OUTPUT_TYPES, SecondLevelModel, non_parametric_inference
from chunkglm.io.cohort import open_cohort
from chunkglm.io.surface_convert import convert_surface_runs
from chunkglm.io.surface_maps import convert_surface_maps
from chunkglm.testing import rel_l2

REL_L2 = 1e-7  # float32 maps stored exactly: see the module docstring
N = 10
MESH = load_fsaverage("fsaverage5")["pial"]
N_VERTICES = 10242
#: cortex vertices kept (a medial cap left out, as fsLR's 91k axis does), then two subcortical blocks
KEPT = {"left": np.arange(0, N_VERTICES, 3), "right": np.arange(1, N_VERTICES, 4)}
VOLUME_SHAPE = (6, 5, 4)


def _axis() -> BrainModelAxis:
    axis = (BrainModelAxis.from_mask(np.isin(np.arange(N_VERTICES), KEPT["left"]), "CortexLeft")
            + BrainModelAxis.from_mask(np.isin(np.arange(N_VERTICES), KEPT["right"]), "CortexRight"))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for name, corner in (("ThalamusLeft", (0, 0, 0)), ("ThalamusRight", (3, 2, 1))):
        block = np.zeros(VOLUME_SHAPE, dtype=bool)
        block[corner[0]:corner[0] + 2, corner[1]:corner[1] + 3, corner[2]:corner[2] + 2] = True
        axis = axis + BrainModelAxis.from_mask(block, name, affine=affine)
    return axis


AXIS = _axis()
N_CORTEX = len(KEPT["left"]) + len(KEPT["right"])


def _design(n=N, seed=1):
    age = np.random.default_rng(seed).standard_normal(n)
    return pd.DataFrame({"intercept": np.ones(n), "age": age})


def _values(seed=0, n=N, nan=True) -> np.ndarray:
    """(n, grayordinates) float32: noise, an effect on the first 300, one of age on the next 300 and
    on the second subcortical block; a NaN grayordinate in one map (the default mask leaves it out)."""
    rng = np.random.default_rng(seed)
    age = _design(n)["age"].to_numpy()
    values = rng.standard_normal((n, len(AXIS))).astype(np.float32)
    values[:, :300] += 1.0
    values[:, 300:600] += (2.0 * age[:, None]).astype(np.float32)
    values[:, -12:] += (1.5 * age[:, None]).astype(np.float32)
    if nan:
        values[2, 1000] = np.nan
    return values


def _image(rows: np.ndarray, names=None) -> Cifti2Image:
    names = names or [f"map-{i}" for i in range(len(rows))]
    return Cifti2Image(np.asarray(rows, dtype=np.float32), Cifti2Header.from_axes((ScalarAxis(names), AXIS)))


def _files(folder, values) -> list[str]:
    paths = []
    for i, row in enumerate(values):
        path = str(folder / f"sub-{i:02d}_contrast-a_stat-effect.dscalar.nii")
        _image(row[None], [f"sub-{i:02d}"]).to_filename(path)
        paths.append(path)
    return paths


def _surface_images(values) -> list:
    """The cortex grayordinates as fsaverage5 SurfaceImages, NaN at the vertices not on the axis."""
    spans = {"left": slice(0, len(KEPT["left"])), "right": slice(len(KEPT["left"]), N_CORTEX)}
    images = []
    for row in values:
        parts = {}
        for part in ("left", "right"):
            parts[part] = np.full(N_VERTICES, np.nan, dtype=np.float32)
            parts[part][KEPT[part]] = row[spans[part]]
        images.append(SurfaceImage(MESH, parts))
    return images


def _array_images(values) -> list:
    """Each map's grayordinates as the voxels of an (n, 1, 1) NIfTI image (C order = element order)."""
    return [nib.Nifti1Image(row.reshape(-1, 1, 1), np.eye(4)) for row in values]


def _quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def _row(img) -> np.ndarray:
    return np.asarray(img.dataobj)[0]


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifti-maps")
    values = _values()
    return values, _files(folder, values)


@pytest.fixture(scope="module")
def fitted(maps):
    values, paths = maps
    model = _quiet(SecondLevelModel().fit, paths, design_matrix=_design())
    return model, _quiet(model.compute_contrast, "age", output_type="all")


def test_cifti_maps_cortex_and_voxels_match_nilearn(maps, fitted):
    """Group maps as dense scalars on the maps' brain-model axis; their cortex equals nilearn's
    SurfaceImage fit, every grayordinate nilearn's NiftiMasker-path fit of the same numbers."""
    values, _ = maps
    model, got = fitted
    inside = np.isfinite(values).all(axis=0)
    surface = _quiet(NilearnSLM().fit, _surface_images(values), design_matrix=_design())
    arrays = _quiet(NilearnSLM(mask_img=nib.Nifti1Image(inside.reshape(-1, 1, 1).astype(np.uint8), np.eye(4))).fit,
                    _array_images(values), design_matrix=_design())
    want_surface = _quiet(surface.compute_contrast, "age", output_type="all")
    want_arrays = _quiet(arrays.compute_contrast, "age", output_type="all")
    cortex = inside[:N_CORTEX]
    for name in OUTPUT_TYPES:
        img = got[name]
        assert isinstance(img, Cifti2Image) and img.shape == (1, len(AXIS)), name
        assert img.header.get_axis(1) == AXIS, name
        ours = _row(img)
        theirs = np.concatenate([np.asarray(want_surface[name].data.parts[p])[KEPT[p]] for p in ("left", "right")])
        assert rel_l2(ours[:N_CORTEX][cortex], theirs[cortex]) <= REL_L2, name
        assert rel_l2(ours[inside], np.asarray(want_arrays[name].dataobj).ravel()[inside]) <= REL_L2, name
        assert ours[~inside].tolist() == [0.0], name  # outside the mask, as nilearn's maps
    assert model.masker_ is None and model.n_elements_ == int(inside.sum()) == len(AXIS) - 1
    assert isinstance(model.mask_img_, Cifti2Image) and (_row(model.mask_img_) != 0).tolist() == inside.tolist()


def test_store_node_and_in_memory_images_equal_the_files(maps, fitted, tmp_path):
    """The same maps as a maps node of a CIFTI grid, and as in-memory Cifti2Images (what CIFTI
    first-level models return), give the same maps bit for bit; a given CIFTI mask is used."""
    values, paths = maps
    _, want = fitted
    convert_surface_maps(paths, tmp_path / "s.zarr", "group", coords={"subject": [f"{i:02d}" for i in range(N)]})
    node = open_cohort(tmp_path / "s.zarr").maps["group"]
    images = [_image(row[None]) for row in values]
    for given in (node, images, _image(values)):  # one file of several maps too
        got = _quiet(SecondLevelModel().fit(given, design_matrix=_design()).compute_contrast, "age",
                     output_type="all")
        for name in OUTPUT_TYPES:
            assert np.array_equal(_row(got[name]), _row(want[name])), name
    mask = np.zeros(len(AXIS), dtype=np.float32)
    mask[:5000] = 1
    masked = _quiet(SecondLevelModel(mask_img=_image(mask[None])).fit, paths, design_matrix=_design())
    with pytest.warns(UserWarning, match="1 voxel .* NaN or infinite"):  # the NaN inside the mask counts as 0
        z = _row(masked.compute_contrast("age"))
    assert masked.n_elements_ == 5000 and not z[5000:].any() and np.isfinite(z).all()


def test_first_level_models_on_cifti_runs(tmp_path):
    """FirstLevelModels fitted on CIFTI store runs: their effect maps (Cifti2Images) are modelled,
    equal to the same maps given as images."""
    rng = np.random.default_rng(3)
    n_time = 30
    frame = np.arange(n_time) * 2.0
    regressor = (np.arange(n_time) % 10 < 5).astype(float)
    runs = []
    for subject in range(3):
        data = (rng.standard_normal((n_time, len(AXIS))) + np.outer(regressor, rng.random(len(AXIS)))
                ).astype(np.float32)
        path = tmp_path / f"sub-{subject}.dtseries.nii"
        series = SeriesAxis(start=0.0, step=2.0, size=n_time, unit="SECOND")
        Cifti2Image(data, Cifti2Header.from_axes((series, AXIS))).to_filename(str(path))
        runs.append(str(path))
    names = convert_surface_runs(runs, tmp_path / "runs.zarr")
    nodes = open_cohort(tmp_path / "runs.zarr").runs
    design = pd.DataFrame({"task": regressor, "constant": np.ones(n_time)}, index=frame)
    models = []
    for subject, name in enumerate(names):
        model = FirstLevelModel(subject_label=f"{subject:02d}").fit(nodes[name], design_matrices=design)
        models.append(model)
    second = pd.DataFrame({"intercept": np.ones(3)})
    got = _quiet(SecondLevelModel().fit(models, design_matrix=second).compute_contrast, "intercept",
                 first_level_contrast="task", output_type="all")
    effects = [m.compute_contrast("task", output_type="effect_size") for m in models]
    want = _quiet(SecondLevelModel().fit(effects, design_matrix=second).compute_contrast, "intercept",
                  output_type="all")
    for name in OUTPUT_TYPES:
        assert got[name].header.get_axis(1) == AXIS
        assert np.array_equal(_row(got[name]), _row(want[name])), name


def test_max_t_matches_nilearn_same_random_state(maps):
    """Max-T over every analysed grayordinate: nilearn's on the same numbers as voxels."""
    values, paths = maps
    inside = np.isfinite(values).all(axis=0)
    mask = nib.Nifti1Image(inside.reshape(-1, 1, 1).astype(np.uint8), np.eye(4))
    kwargs = dict(design_matrix=_design(), second_level_contrast="age", n_perm=200, random_state=0,
                  two_sided_test=True)
    ours = _quiet(non_parametric_inference, paths, **kwargs)
    theirs = _quiet(nilearn_npi, _array_images(values), mask=mask, **kwargs)
    assert isinstance(ours, Cifti2Image) and ours.header.get_axis(1) == AXIS
    assert np.array_equal(_row(ours)[inside], np.asarray(theirs.dataobj).ravel()[inside])
    assert _row(ours)[~inside].tolist() == [0.0]
    with pytest.warns(NotImplementedWarning, match="Cluster level inference not yet implemented"):
        dropped = non_parametric_inference(paths, threshold=0.01, tfce=True, n_perm=20, random_state=0,
                                           design_matrix=_design(), second_level_contrast="age")
    assert isinstance(dropped, Cifti2Image)


def test_refusals(maps, tmp_path):
    values, paths = maps
    design = _design()
    with pytest.raises(InputError, match="smoothing_fwhm given with CIFTI maps"):
        SecondLevelModel(smoothing_fwhm=4.0).fit(paths, design_matrix=design)
    with pytest.raises(InputError, match="target_affine, target_shape given with CIFTI maps"):
        SecondLevelModel(target_affine=np.eye(3), target_shape=(2, 2, 2)).fit(paths, design_matrix=design)
    volume_mask = nib.Nifti1Image(np.ones((2, 2, 2), np.uint8), np.eye(4))
    with pytest.raises(TypeError, match="Mask and input images must be of compatible types"):
        SecondLevelModel(mask_img=volume_mask).fit(paths, design_matrix=design)
    with pytest.raises(TypeError, match="Mask and input images must be of compatible types.*CIFTI"):
        SecondLevelModel(mask_img=paths[0]).fit(_array_images(values), design_matrix=design)
    with pytest.raises(InputTypeError, match=r"second_level_input\[1\] is a Nifti1Image"):
        SecondLevelModel().fit([paths[0], _array_images(values)[1]], design_matrix=design.iloc[:2])
    with pytest.raises(InputError, match="require a design matrix"):
        SecondLevelModel().fit(paths)
    with pytest.raises(InputError, match="at least 2 maps"):
        SecondLevelModel().fit(paths[0], design_matrix=design.iloc[:1])
    with pytest.raises(InputError, match="does not exist"):
        SecondLevelModel().fit([paths[0], str(tmp_path / "missing.dscalar.nii")], design_matrix=design.iloc[:2])
    small = Cifti2Image(values[:1, :N_CORTEX], Cifti2Header.from_axes((ScalarAxis(["x"]), AXIS[:N_CORTEX])))
    with pytest.raises(InputError, match="share one grid"):
        SecondLevelModel().fit([paths[0], small], design_matrix=design.iloc[:2])
    with pytest.raises(InputError, match="not one map on the maps' brain-model axis"):
        SecondLevelModel(mask_img=small).fit(paths, design_matrix=design)


@pytest.mark.parametrize("height_control", ["fpr", "fdr", "bonferroni", None])
@pytest.mark.parametrize("two_sided", [True, False])
def test_threshold_stats_img_matches_nilearn_on_the_same_values(fitted, height_control, two_sided):
    """threshold_stats_img on a CIFTI z map: the cut-off and map of nilearn's on the same numbers as
    voxels, with a mask (zeroed outside) and without one (the finite grayordinates counted)."""
    from nilearn.glm import threshold_stats_img as nilearn_threshold

    from chunkglm.glm.thresholding import threshold_stats_img

    z = fitted[1]["z_score"]
    values = _row(z).copy()
    values[1000] = np.nan  # not counted by default, as a NaN vertex by nilearn's SurfaceMasker
    z = Cifti2Image(values[None], z.header)
    counted = np.isfinite(values)
    inside = counted & (np.arange(len(AXIS)) < 6000)
    kwargs = dict(alpha=0.05, height_control=height_control, two_sided=two_sided, threshold=3.0
                  if height_control is None else None)
    for mask in (inside, None):
        volume_mask = nib.Nifti1Image((counted if mask is None else mask).reshape(-1, 1, 1).astype(np.uint8),
                                      np.eye(4))
        cifti_mask = None if mask is None else _image(mask[None].astype(np.float32))
        got, got_cutoff = _quiet(threshold_stats_img, z, mask_img=cifti_mask, **kwargs)
        want, want_cutoff = _quiet(nilearn_threshold, nib.Nifti1Image(np.nan_to_num(values).reshape(-1, 1, 1),
                                                                      np.eye(4)), mask_img=volume_mask, **kwargs)
        assert got_cutoff == pytest.approx(want_cutoff, rel=1e-12, abs=1e-12)
        assert isinstance(got, Cifti2Image) and got.header.get_axis(1) == AXIS
        assert np.array_equal(_row(got)[counted], np.asarray(want.dataobj).ravel()[counted])
    with pytest.raises(InputError, match="form no clusters"):
        threshold_stats_img(z, cluster_threshold=10)
    with pytest.raises(InputError, match="not one map on stat_img's brain-model axis"):
        threshold_stats_img(z, mask_img=_image(np.ones((2, len(AXIS)), np.float32)))
