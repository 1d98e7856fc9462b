"""SecondLevelModel and non_parametric_inference on surface maps against nilearn 0.14.1's.

Tolerances: SurfaceImage maps of float32 values are stored exactly (the store
is float32) and both sides fit the same float64 numbers, so maps differ only
by the algebra (chunkglm's QR-basis normal equations vs nilearn's pinv): measured
3e-15 relative L2; bound 1e-7, the first-level surface tests' bound. Effect maps
of first-level models are float64: stored as float32 they round by ~6e-8
relative, so those comparisons take the volume second-level tests' 1e-5.
Max-T -log10 p-values are ranks of the same permutations (same random_state):
equal as long as no null maximum ties a t within 1e-10 (none does, checked
exactly as the volume tests do).
"""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.datasets import load_fsaverage
from nilearn.exceptions import MeshDimensionError, NotImplementedWarning
from nilearn.glm.first_level import FirstLevelModel as NilearnFLM
from nilearn.glm.second_level import SecondLevelModel as NilearnSLM
from nilearn.glm.second_level import non_parametric_inference as nilearn_npi
from nilearn.maskers import SurfaceMasker
from nilearn.surface import InMemoryMesh, PolyMesh, SurfaceImage

from chunkglm.errors import InputError, InputTypeError
from chunkglm.glm.first_level import FirstLevelModel
from chunkglm.glm.second_level import OUTPUT_TYPES, SecondLevelModel, non_parametric_inference
from chunkglm.io.cohort import open_cohort
from chunkglm.io.surface_maps import convert_surface_maps
from chunkglm.testing import make_synthetic_bids, rel_l2

REL_L2 = 1e-7  # float32 maps stored exactly: see the module docstring
REL_L2_FLOAT64 = 1e-5  # float64 first-level effect maps stored as float32
N = 10
MESH = load_fsaverage("fsaverage5")["pial"]


def _values(img):
    return np.concatenate([np.asarray(img.data.parts[p]) for p in ("left", "right")])


def _surface_maps(seed=0, n=N):
    """n float32 maps on fsaverage5: noise, an effect on the first 500 left vertices, one of age
    (:func:`_design`) on the next 500, a NaN vertex in one map (nilearn's mask leaves it out)."""
    rng = np.random.default_rng(seed)
    age = _design(n)["age"].to_numpy()
    maps = []
    for i in range(n):
        left = rng.standard_normal(10242).astype(np.float32)
        left[:500] += 1.0
        left[500:1000] += 2.0 * age[i]
        right = rng.standard_normal(10242).astype(np.float32)
        if i == 2:
            right[17] = np.nan
        maps.append(SurfaceImage(MESH, {"left": left, "right": right}))
    return maps


def _design(n=N, seed=1):
    age = np.random.default_rng(seed).standard_normal(n)
    return pd.DataFrame({"intercept": np.ones(n), "age": age})


def _quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def _assert_maps(ours, theirs, contrast, tolerance, stat_type=None):
    got = ours.compute_contrast(contrast, second_level_stat_type=stat_type, output_type="all")
    want = theirs.compute_contrast(contrast, second_level_stat_type=stat_type, output_type="all")
    inside = _values(theirs.masker_.mask_img_) != 0
    for name in OUTPUT_TYPES:
        assert isinstance(got[name], SurfaceImage), name
        assert got[name].shape == want[name].shape, name
        values, expected = (_values(img).reshape(len(inside), -1) for img in (got[name], want[name]))
        assert np.all(values[~inside] == 0) and np.all(expected[~inside] == 0), name
        # nilearn's SurfaceMasker keeps NaN: its maps are NaN where an input map is
        assert np.array_equal(np.isnan(values), np.isnan(expected)), name
        finite = inside[:, None] & np.isfinite(expected)
        assert rel_l2(values[finite], expected[finite]) <= tolerance, name
    return got


def test_list_of_surface_images_matches_nilearn():
    maps = _surface_maps()
    ours = _quiet(SecondLevelModel(chunk_bytes=N * 4 * 3000).fit, maps, design_matrix=_design())
    theirs = _quiet(NilearnSLM().fit, maps, design_matrix=_design())
    assert not ours._is_volume_glm() and isinstance(ours.masker_, SurfaceMasker)
    assert ours.n_elements_ == theirs.n_elements_ == 20483  # the NaN vertex is out
    assert np.array_equal(_values(ours.mask_img_), _values(theirs.masker_.mask_img_))
    for contrast in ("intercept", "age", [1, -1]):
        _assert_maps(ours, theirs, contrast, REL_L2)
    f_maps = _assert_maps(ours, theirs, np.eye(2), REL_L2, "F")
    assert f_maps["effect_size"].shape == (20484, 2)
    # the effect is found: the first 500 left vertices have the largest z
    z = _values(ours.compute_contrast("intercept"))
    assert z[:500].mean() > 2.0 > abs(z[1000:10242].mean()) * 10


def test_one_2d_surface_image_matches_nilearn_and_input_kept():
    maps = _surface_maps(seed=3)
    stacked = SurfaceImage(MESH, {p: np.stack([m.data.parts[p] for m in maps], axis=1) for p in ("left", "right")})
    before = {p: np.array(stacked.data.parts[p]) for p in ("left", "right")}
    design = pd.DataFrame({"intercept": np.ones(N)})
    ours = _quiet(SecondLevelModel().fit, stacked, design_matrix=design)
    theirs = _quiet(NilearnSLM().fit, stacked, design_matrix=design)
    _assert_maps(ours, theirs, "intercept", REL_L2)
    for part, values in before.items():  # not reshaped nor modified
        assert np.array_equal(stacked.data.parts[part], values, equal_nan=True)


def test_mask_and_smoothing_match_nilearn():
    maps = _surface_maps(seed=4)
    mask = SurfaceImage(MESH, {"left": np.arange(10242) % 3 != 0, "right": np.arange(10242) < 4000})
    design = pd.DataFrame({"intercept": np.ones(N)})
    for params in ({"mask_img": mask}, {"mask_img": SurfaceMasker(mask_img=mask).fit()},
                   {"smoothing_fwhm": 6.0}):
        ours = _quiet(SecondLevelModel(**params).fit, maps, design_matrix=design)
        theirs = _quiet(NilearnSLM(**params).fit, maps, design_matrix=design)
        assert ours.n_elements_ == theirs.n_elements_
        if "mask_img" in params:  # the mask holds the NaN vertex of map 2: nilearn's maps are NaN there
            assert np.isnan(_values(theirs.compute_contrast("intercept"))[10242 + 17])
        # smoothed maps are float64, stored as float32: the float64 bound
        _assert_maps(ours, theirs, "intercept", REL_L2_FLOAT64 if "smoothing_fwhm" in params else REL_L2)


@pytest.fixture(scope="module")
def first_levels(tmp_path_factory):
    """chunkglm's and nilearn's FirstLevelModels fitted on the same 3 subjects' GIFTI runs."""
    dataset = make_synthetic_bids(tmp_path_factory.mktemp("surface_slm"), n_subjects=3, n_runs=1, surface=True)
    ours, theirs = [], []
    for files, run in zip(dataset.surface.runs, dataset.runs, strict=True):
        image = SurfaceImage(MESH, {p: str(f) for p, f in files.gifti.items()})
        events = pd.read_csv(run.events_path, sep="\t")
        params = dict(t_r=dataset.tr, slice_time_ref=0.5, subject_label=run.subject)
        ours.append(_quiet(FirstLevelModel(**params).fit, image, events=events))
        theirs.append(_quiet(NilearnFLM(**params).fit, image, events=events))
    return ours, theirs


def test_first_level_models_match_nilearn(first_levels):
    """nilearn 0.14.1 fits a SecondLevelModel on surface FirstLevelModels but its compute_contrast
    refuses their SurfaceImage effect maps (check_niimg); chunkglm models them, equal to nilearn's
    model of the same effect maps given as SurfaceImages."""
    ours_flm, theirs_flm = first_levels
    ours = _quiet(SecondLevelModel().fit, ours_flm)
    assert list(ours.design_matrix_.columns) == ["intercept"]
    effects = [m.compute_contrast("a - b", output_type="effect_size") for m in theirs_flm]
    theirs = _quiet(NilearnSLM().fit, effects, design_matrix=pd.DataFrame({"intercept": np.ones(3)}))
    with pytest.raises(TypeError, match="NiftiLike"):  # nilearn's own refusal, if it changes: revisit
        _quiet(NilearnSLM().fit, theirs_flm).compute_contrast(first_level_contrast="a - b")
    got = ours.compute_contrast(first_level_contrast="a - b", output_type="all")
    want = theirs.compute_contrast(output_type="all")
    for name in OUTPUT_TYPES:
        assert got[name].shape == want[name].shape
        assert rel_l2(_values(got[name]), _values(want[name])) <= REL_L2_FLOAT64, name
    # nilearn's FirstLevelModels are accepted too (their effect maps are nilearn's computation)
    mixed = _quiet(SecondLevelModel().fit, theirs_flm).compute_contrast(first_level_contrast="a - b")
    assert rel_l2(_values(mixed), _values(want["z_score"])) <= REL_L2_FLOAT64


def test_store_surface_maps_node(tmp_path):
    maps = _surface_maps(seed=5)
    store = tmp_path / "maps.zarr"
    convert_surface_maps(maps, store, "group", coords={"subject": [f"{i:02d}" for i in range(N)]})
    node = open_cohort(store).maps["group"]
    ours = _quiet(SecondLevelModel().fit, node)
    theirs = _quiet(NilearnSLM().fit, maps, design_matrix=pd.DataFrame({"intercept": np.ones(N)}))
    assert ours.n_elements_ == theirs.n_elements_
    _assert_maps(ours, theirs, "intercept", REL_L2)


@pytest.mark.parametrize(("contrast", "two_sided"), [("intercept", False), ("age", True)])
def test_max_t_matches_nilearn_same_random_state(contrast, two_sided):
    maps = _surface_maps(seed=6)
    params = dict(design_matrix=_design(), second_level_contrast=contrast, n_perm=40,
                  two_sided_test=two_sided, random_state=2)
    ours = _quiet(non_parametric_inference, maps, **params)
    theirs = _quiet(nilearn_npi, maps, **params)
    assert isinstance(ours, SurfaceImage) and ours.shape == theirs.shape
    assert _values(theirs).max() > 1.0  # the effect vertices are significant: not trivial
    np.testing.assert_array_equal(_values(ours), _values(theirs))


@pytest.mark.parametrize("option", [{"tfce": True}, {"threshold": 0.01}])
def test_cluster_inference_dropped_as_nilearn(option):
    maps = _surface_maps(seed=7)
    params = dict(design_matrix=pd.DataFrame({"intercept": np.ones(N)}), n_perm=20, random_state=0, **option)
    with pytest.warns(NotImplementedWarning, match="Cluster level inference not yet implemented for surface"):
        ours = non_parametric_inference(maps, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = nilearn_npi(maps, **params)
    assert isinstance(ours, SurfaceImage) and isinstance(theirs, SurfaceImage)
    np.testing.assert_array_equal(_values(ours), _values(theirs))


def test_refusals_as_nilearn():
    maps = _surface_maps(seed=8, n=3)
    design = pd.DataFrame({"intercept": np.ones(3)})
    with pytest.raises(InputError, match="require a design matrix"):
        SecondLevelModel().fit(maps)
    with pytest.raises(InputTypeError, match="must be a 3D SurfaceImage"):
        SecondLevelModel().fit(maps[0], design_matrix=design)
    two_d = SurfaceImage(MESH, {p: np.stack([maps[0].data.parts[p]] * 2, axis=1) for p in ("left", "right")})
    with pytest.raises(InputTypeError, match="require all images to be 3D SurfaceImage"):
        SecondLevelModel().fit([maps[0], two_d], design_matrix=pd.DataFrame({"intercept": np.ones(2)}))
    with pytest.raises(InputTypeError, match="must be of the same type"):
        SecondLevelModel().fit([maps[0], "map.nii.gz"], design_matrix=pd.DataFrame({"intercept": np.ones(2)}))
    volume_mask = nib.Nifti1Image(np.ones((2, 2, 2), np.uint8), np.eye(4))
    with pytest.raises(TypeError, match="Mask and input images must be of compatible types"):
        SecondLevelModel(mask_img=volume_mask).fit(maps, design_matrix=design)
    with pytest.raises(MeshDimensionError):  # nilearn's check_polymesh_equal
        SecondLevelModel().fit([maps[0], _small_surface_image()],
                               design_matrix=pd.DataFrame({"intercept": np.ones(2)}))


def _small_surface_image():
    """A map on a 100-vertex mesh per hemisphere (another mesh size)."""
    coordinates = np.random.default_rng(0).standard_normal((100, 3))
    faces = np.array([[0, 1, 2], [1, 2, 3]])
    mesh = PolyMesh(left=InMemoryMesh(coordinates, faces), right=InMemoryMesh(coordinates, faces))
    return SurfaceImage(mesh, {p: np.zeros(100, np.float32) for p in ("left", "right")})


def test_repeated_column_names_as_nilearn():
    """nilearn fits designs whose column names repeat (its estimator checks use ["", "", ""]);
    weights work, a formula over the repeated names is refused."""
    maps = _surface_maps(seed=9, n=6)
    design = pd.DataFrame(np.random.default_rng(2).standard_normal((6, 3)), columns=["", "", ""])
    ours = _quiet(SecondLevelModel().fit, maps, design_matrix=design)
    theirs = _quiet(NilearnSLM().fit, maps, design_matrix=design)
    _assert_maps(ours, theirs, [1, 0, 0], REL_L2)
    with pytest.raises(InputError, match="not unique"):
        ours.compute_contrast("a")


def test_empty_surface_image_refused_as_nilearn():
    empty = SurfaceImage(MESH, {p: np.zeros((10242, 0), np.float32) for p in ("left", "right")})
    with pytest.raises(ValueError, match="The image is empty"):  # nilearn's word for it
        SecondLevelModel().fit(empty, design_matrix=pd.DataFrame({"intercept": np.ones(0)}))
