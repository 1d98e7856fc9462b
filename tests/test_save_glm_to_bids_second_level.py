"""Second-level outputs: save_glm_to_bids and save_group_derivatives against nilearn.

Both SecondLevelModels fit the same float32 NIfTI maps with the same design
(intercept + age), nilearn's with minimize_memory=False (it cannot write
stat-errorts/rsquared otherwise).

Tolerance on saved maps: relative L2 over the mask <= 1e-6. Ours are float32
files (nilearn's float64): ~6e-8 relative rounding; the algebra differs by
~1e-12 (tests/test_second_level.py); measured <= 7.2e-8 on every map
(stat-rsquared the largest). Any real error (a wrong dof, a column
swapped, another contrast) is >= 1e-2.

nilearn's save_glm_to_bids thresholds two-sided for its clusters.json
whatever two_sided says; ours follows two_sided, so both save with
two_sided=True and the clusters.json parameters can be compared.
"""

from __future__ import annotations

import functools
import json
import types
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import chunkglm
from chunkglm.errors import InputError
from chunkglm.glm.second_level import SecondLevelModel, check_permutation_options, permutation_maps
from chunkglm.glm.io import (
    permutation_contrasts,
    save_glm_derivatives,
    save_glm_to_bids,
    save_group_derivatives,
    write_glm_to_bids,
)
from chunkglm.io.derivatives import container, software
from chunkglm.testing import rel_l2

pytestmark = pytest.mark.filterwarnings("ignore:No clusters found:UserWarning")

SHAPE = (12, 14, 10)
AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])
N = 12
REL_L2 = 1e-6
CONTRASTS = {"intercept": "intercept", "age - intercept": np.array([-1.0, 1.0]), "effects": np.eye(2)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """N float32 maps (noise, a strong effect in one corner of the brain box) and a design."""
    folder = tmp_path_factory.mktemp("group_maps")
    rng = np.random.default_rng(3)
    paths = []
    for i in range(N):
        data = np.zeros(SHAPE, np.float32)
        data[2:-2, 2:-2, 2:-2] = rng.normal(0.3, 1.0, (8, 10, 6))
        data[2:6, 2:6, 2:6] += 2.5
        path = folder / f"sub-{i:02d}_effect.nii.gz"
        nib.save(nib.Nifti1Image(data, AFFINE), path)
        paths.append(str(path))
    design = pd.DataFrame({"intercept": np.ones(N), "age": rng.normal(0.0, 10, N)})  # centred
    return {"paths": paths, "design": design, "tmp": folder}


def _nilearn_model(paths, design, **params):
    from nilearn.glm.second_level import SecondLevelModel as NilearnModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = NilearnModel(minimize_memory=False, **params).fit(paths, design_matrix=design)
    real = model.generate_report

    @functools.wraps(real)  # nilearn reads the signature for the keyword defaults
    def generate_report(*args, **kwargs):  # its HTML report is not compared
        return types.SimpleNamespace(save_as_html=lambda path: Path(path).write_text(""))

    model.generate_report = generate_report
    return model


def _nilearn_save(model, contrasts, out_dir, prefix=None):
    from nilearn.glm import save_glm_to_bids as nilearn_save

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nilearn_save(model, contrasts, out_dir=out_dir, prefix=prefix, two_sided=True)
    return out_dir


@pytest.fixture(scope="module")
def saved(inputs):
    tmp = inputs["tmp"]
    ours = SecondLevelModel(minimize_memory=False).fit(inputs["paths"], design_matrix=inputs["design"])
    ref = _nilearn_model(inputs["paths"], inputs["design"])
    _nilearn_save(ref, CONTRASTS, tmp / "nilearn")
    paths = write_glm_to_bids(ours, CONTRASTS, out_dir=tmp / "ours", two_sided=True)
    return {"ref": tmp / "nilearn", "ours": tmp / "ours", "paths": paths, "model": ours}


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _expected_from_nilearn(ref_files):
    """nilearn's set (its report.html included), plus an SVG beside every PNG and the
    .bidsignore of the names BIDS does not define (tests/test_bids_validator.py)."""
    return set(ref_files) | {f[:-4] + ".svg" for f in ref_files if f.endswith(".png")} | {".bidsignore"}


def _load(path):
    return json.loads(Path(path).read_text())


# -- nilearn's file set -----------------------------------------------------------------


def test_file_set_matches_nilearn(saved):
    ours = _files(saved["ours"])
    assert ours == _expected_from_nilearn(_files(saved["ref"]))
    assert sorted(p.relative_to(saved["ours"]).as_posix() for p in saved["paths"]) == sorted(ours)
    for name in ("group/contrast-ageMinusIntercept_stat-t_statmap.nii.gz",
                 "group/contrast-effects_stat-F_statmap.nii.gz", "group/design.svg",
                 "group/stat-errorts_statmap.nii.gz", "group/statmap.json"):
        assert name in ours
    assert not any(name.endswith("design.json") for name in ours)  # first level only


def test_statmaps_match_nilearn(saved):
    mask = nib.load(saved["ours"] / "group" / "mask.nii.gz").get_fdata() > 0
    ref_mask = nib.load(saved["ref"] / "group" / "mask.nii.gz").get_fdata() > 0
    np.testing.assert_array_equal(mask, ref_mask)
    maps = sorted(f for f in _files(saved["ref"]) if f.endswith("statmap.nii.gz"))
    assert len(maps) == 3 * 5 + 2
    for name in maps:
        ours, ref = nib.load(saved["ours"] / name), nib.load(saved["ref"] / name)
        assert ours.shape == ref.shape, name  # errorts: one volume per map; F effect: 2
        np.testing.assert_allclose(ours.affine, ref.affine, err_msg=name)
        assert rel_l2(ours.get_fdata(), ref.get_fdata(), mask) <= REL_L2, name


def test_tables_and_json_match_nilearn(saved):
    ours, ref = saved["ours"] / "group", saved["ref"] / "group"
    design, ref_design = (pd.read_csv(d / "design.tsv", sep="\t") for d in (ours, ref))
    pd.testing.assert_frame_equal(design, ref_design)
    statmap, ref_statmap = _load(ours / "statmap.json"), _load(ref / "statmap.json")
    assert statmap["ModelParameters"] == ref_statmap["ModelParameters"] == {}
    assert statmap["Description"] == "A statistical map generated by chunkglm."
    for label in ("intercept", "ageMinusIntercept", "effects"):
        name = f"contrast-{label}_clusters.json"
        assert _load(ours / name) == _load(ref / name)
    description, ref_description = (_load(d / "dataset_description.json")
                                    for d in (saved["ours"], saved["ref"]))
    assert {k: v for k, v in description.items() if k != "GeneratedBy"} == \
        {k: v for k, v in ref_description.items() if k != "GeneratedBy"}
    assert description["GeneratedBy"] == [{"Name": "chunkglm", "Version": chunkglm.__version__,
                                           "Description": "A chunkglm second-level GLM.",
                                           **({"Container": container()} if container() else {})}]


def test_model_parameters_match_nilearn_for_other_settings():
    from nilearn.glm.second_level import SecondLevelModel as NilearnModel

    from chunkglm.glm.io._bids_files import group_model_parameters

    settings = dict(smoothing_fwhm=6.0, target_affine=np.diag([4.0, 4, 4, 1]), target_shape=(10, 12, 10))
    ref = json.loads(json.dumps(NilearnModel(**settings)._attributes_to_dict(), default=list))
    assert group_model_parameters(SecondLevelModel(**settings)) == ref


def test_clusters_come_from_the_z_map(saved):
    from nilearn.glm import threshold_stats_img
    from nilearn.reporting import get_clusters_table

    folder = saved["ours"] / "group"
    z_img = nib.load(folder / "contrast-intercept_stat-z_statmap.nii.gz")
    table = pd.read_csv(folder / "contrast-intercept_clusters.tsv", sep="\t")
    assert len(table) > 0
    mask = nib.load(folder / "mask.nii.gz")
    thresholded, threshold = threshold_stats_img(z_img, mask_img=mask, alpha=0.001, two_sided=True)
    expected = get_clusters_table(thresholded, stat_threshold=threshold, two_sided=True)
    np.testing.assert_allclose(table["Peak Stat"], expected["Peak Stat"].astype(float), rtol=1e-6)


def test_figures_are_png_and_svg(saved):
    folder = saved["ours"] / "group"
    for base in ("design", "corrdesign", "contrast-ageMinusIntercept_design"):
        assert (folder / f"{base}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in (folder / f"{base}.svg").read_bytes()[:2000]


def test_one_sample_design_with_prefix_matches_nilearn(inputs, tmp_path):
    design = pd.DataFrame({"intercept": np.ones(N)})
    ref = _nilearn_model(inputs["paths"], design)
    _nilearn_save(ref, "intercept", tmp_path / "nilearn", prefix="grp")
    ours = SecondLevelModel(minimize_memory=False).fit(inputs["paths"], design_matrix=design)
    save_glm_to_bids(ours, "intercept", out_dir=tmp_path / "ours", prefix="grp", two_sided=True)
    files = _files(tmp_path / "ours")
    assert files == _expected_from_nilearn(_files(tmp_path / "nilearn"))
    assert "group/grp_contrast-intercept_stat-t_statmap.nii.gz" in files
    name = "group/grp_contrast-intercept_stat-z_statmap.nii.gz"
    mask = nib.load(tmp_path / "ours" / "group" / "grp_mask.nii.gz").get_fdata() > 0
    assert rel_l2(nib.load(tmp_path / "ours" / name).get_fdata(),
                   nib.load(tmp_path / "nilearn" / name).get_fdata(), mask) <= REL_L2


def test_dataframe_input_passes_first_level_contrast(inputs, saved, tmp_path):
    frame = pd.DataFrame({"subject_label": [f"{i:02d}" for i in range(N)], "map_name": "a",
                          "effects_map_path": inputs["paths"]})
    other = frame.assign(map_name="b", effects_map_path=inputs["paths"][::-1])
    model = SecondLevelModel(minimize_memory=False).fit(pd.concat([frame, other]),
                                                        design_matrix=inputs["design"])
    save_glm_to_bids(model, {"intercept": "intercept"}, out_dir=tmp_path, first_level_contrast="a")
    name = "group/contrast-intercept_stat-t_statmap.nii.gz"
    mask = nib.load(tmp_path / "group" / "mask.nii.gz").get_fdata() > 0
    assert rel_l2(nib.load(tmp_path / name).get_fdata(),
                   nib.load(saved["ref"] / name).get_fdata(), mask) <= REL_L2


def test_minimize_memory_leaves_out_model_maps_with_a_warning(inputs, saved, tmp_path):
    model = SecondLevelModel().fit(inputs["paths"], design_matrix=inputs["design"])
    with pytest.warns(UserWarning, match="minimize_memory=True"):
        save_glm_to_bids(model, CONTRASTS, out_dir=tmp_path, two_sided=True)
    model_maps = {"group/stat-errorts_statmap.nii.gz", "group/stat-rsquared_statmap.nii.gz"}
    assert _files(tmp_path) == _files(saved["ours"]) - model_maps


# -- derivatives/glm group_level layout ------------------------------------------------------


@pytest.fixture(scope="module")
def group(saved):
    out = saved["ours"].parent / "derivatives_glm"
    paths = save_group_derivatives(saved["model"], CONTRASTS, out, alpha=0.05,
                                   descriptions={"intercept": "mean effect"})
    return {"out": out, "paths": paths}


def test_group_layout_names(group):
    labels = ("intercept", "ageMinusIntercept", "effects")
    expected = {".bidsignore", "dataset_description.json", "group_level/group_glm.json", "group_level/group_design-matrix.tsv",
                "group_level/group_mask.nii.gz"}
    for label in labels:
        stat = "F" if label == "effects" else "t"
        expected |= {f"group_level/group_contrast-{label}_stat-{stat}.nii.gz",
                     f"group_level/group_contrast-{label}_stat-z.nii.gz",
                     f"group_level/group_contrast-{label}_fdr-corrected.nii.gz",
                     f"group_level/group_contrast-{label}_fwe-corrected.nii.gz"}
    assert _files(group["out"]) == expected
    assert sorted(p.relative_to(group["out"]).as_posix() for p in group["paths"]) == sorted(expected)


def test_group_layout_keeps_contrast_names_verbatim(saved, tmp_path):
    """group_contrast-meanVsZero, not meanvszero (the LAION layout; issue 17 item 10)."""
    save_group_derivatives(saved["model"], {"meanVsZero": "intercept"}, tmp_path, alpha=0.05)
    names = {p.name for p in (tmp_path / "group_level").iterdir()}
    assert {"group_contrast-meanVsZero_stat-t.nii.gz", "group_contrast-meanVsZero_stat-z.nii.gz",
            "group_contrast-meanVsZero_fdr-corrected.nii.gz", "group_contrast-meanVsZero_fwe-corrected.nii.gz"} <= names
    meta = json.loads((tmp_path / "group_level" / "group_glm.json").read_text())
    assert list(meta["Contrasts"]) == ["meanVsZero"]
    assert list(meta["Corrections"]["FDR"]["Thresholds"]) == ["meanVsZero"]


def test_group_maps_and_thresholds_match_nilearn(group, saved):
    from nilearn.glm import threshold_stats_img

    folder = group["out"] / "group_level"
    sidecar = _load(folder / "group_glm.json")
    mask = nib.load(saved["ref"] / "group" / "mask.nii.gz")
    inside = mask.get_fdata() > 0
    n_survivors = {}
    for label, stat in (("intercept", "t"), ("ageMinusIntercept", "t"), ("effects", "F")):
        ref_z = nib.load(saved["ref"] / "group" / f"contrast-{label}_stat-z_statmap.nii.gz")
        ref_stat = nib.load(saved["ref"] / "group" / f"contrast-{label}_stat-{stat}_statmap.nii.gz")
        z = nib.load(folder / f"group_contrast-{label}_stat-z.nii.gz")
        assert rel_l2(z.get_fdata(), ref_z.get_fdata(), inside) <= REL_L2
        assert rel_l2(nib.load(folder / f"group_contrast-{label}_stat-{stat}.nii.gz").get_fdata(),
                       ref_stat.get_fdata(), inside) <= REL_L2
        for key, control in (("fdr", "fdr"), ("fwe", "bonferroni")):
            # nilearn on our own z map: the same voxels and threshold exactly
            expected, threshold = threshold_stats_img(z, mask_img=mask, alpha=0.05,
                                                      height_control=control, two_sided=True)
            ours = nib.load(folder / f"group_contrast-{label}_{key}-corrected.nii.gz").get_fdata()
            np.testing.assert_allclose(ours, expected.get_fdata(), rtol=0, atol=0)
            recorded = sidecar["Corrections"][key.upper()]["Thresholds"][label]
            assert recorded == (pytest.approx(threshold, rel=1e-12) if np.isfinite(threshold) else None)
            n_survivors[(label, key)] = int(np.count_nonzero(ours))
    # the strong corner effect survives both corrections, FDR keeps at least as many voxels
    assert n_survivors[("intercept", "fwe")] > 0
    assert n_survivors[("intercept", "fdr")] >= n_survivors[("intercept", "fwe")]


def test_group_sidecar_content(group, saved):
    sidecar = _load(group["out"] / "group_level" / "group_glm.json")
    assert sidecar["AnalysisLevel"] == "group_level"
    assert sidecar["Model"] == {"Type": "GLM", "Estimator": "OLS", "Regressors": ["intercept", "age"],
                                "NumberOfMaps": N, "SmoothingFWHM": None}
    assert sidecar["Contrasts"] == {
        "intercept": {"Name": "intercept", "Description": "mean effect", "Weights": [1, 0], "Type": "t"},
        "ageMinusIntercept": {"Name": "age - intercept", "Description": "age - intercept",
                              "Weights": [-1, 1], "Type": "t"},
        "effects": {"Name": "effects", "Description": "effects", "Weights": [[1, 0], [0, 1]],
                    "Type": "F"}}
    corrections = sidecar["Corrections"]
    assert (corrections["TwoSided"], corrections["ClusterThreshold"]) == (True, 0)
    assert (corrections["FDR"]["Method"], corrections["FDR"]["Alpha"]) == ("fdr", 0.05)
    assert (corrections["FWE"]["Method"], corrections["FWE"]["Alpha"]) == ("bonferroni", 0.05)
    assert sidecar["Software"] == software()  # with "Container" when run in one


def test_group_permutation_fwe_matches_non_parametric_inference(saved, inputs, tmp_path):
    """Permutation maps given: the logp maps are nilearn's own non_parametric_inference on the
    same maps, design and seed (compared exactly: the same engine and permutations, float32
    files), the FWE map is the z map where logp_max_t > -log10(alpha); F contrasts stay Bonferroni."""
    from nilearn.glm.second_level import non_parametric_inference as nilearn_npi

    calls = []
    out = tmp_path / "glm"
    contrasts = {"intercept": "intercept", "effects": np.eye(2)}
    settings = {"n_perm": 200, "random_state": 4, "tfce": True, "threshold": None, "two_sided_test": True}
    check_permutation_options(settings["threshold"], settings["tfce"], settings["n_perm"])
    con_vals = permutation_contrasts(saved["model"], contrasts)
    assert list(con_vals) == ["intercept"]  # F contrasts are not permutation-tested
    maps = {name: permutation_maps(saved["model"], con_val, **settings,
                                   progress=lambda done, total: calls.append((done, total)))
            for name, con_val in con_vals.items()}
    paths = save_group_derivatives(saved["model"], contrasts, out, permutation_maps=maps,
                                   permutation=settings)
    folder = out / "group_level"
    names = {p.relative_to(out).as_posix() for p in paths}
    for stat in ("logpmaxt", "tfce", "logpmaxtfce"):
        assert f"group_level/group_contrast-intercept_stat-{stat}.nii.gz" in names
        assert f"group_level/group_contrast-effects_stat-{stat}.nii.gz" not in names
    assert calls and calls[-1][0] == calls[-1][1]  # progress reached its total
    ref = nilearn_npi(inputs["paths"], design_matrix=inputs["design"], second_level_contrast="intercept",
                      mask=saved["model"].mask_img_, n_perm=200, two_sided_test=True, random_state=4,
                      tfce=True, n_jobs=1, verbose=0)
    inside = saved["model"].mask_img_.get_fdata() > 0
    for stat, key in (("logpmaxt", "logp_max_t"), ("logpmaxtfce", "logp_max_tfce")):
        ours = nib.load(folder / f"group_contrast-intercept_stat-{stat}.nii.gz").get_fdata()
        # -log10 of k/(n_perm+1): equal p-values; 1e-6 covers the float32 files
        np.testing.assert_allclose(ours[inside], ref[key].get_fdata()[inside], rtol=1e-6, atol=1e-6)
    logp = nib.load(folder / "group_contrast-intercept_stat-logpmaxt.nii.gz").get_fdata()
    z = nib.load(folder / "group_contrast-intercept_stat-z.nii.gz").get_fdata()
    fwe = nib.load(folder / "group_contrast-intercept_fwe-corrected.nii.gz").get_fdata()
    np.testing.assert_array_equal(fwe, np.where(logp > -np.log10(0.05), z, 0).astype(np.float32))
    assert np.count_nonzero(fwe) > 0
    fwe_meta = _load(folder / "group_glm.json")["Corrections"]["FWE"]
    assert fwe_meta["Method"] == {"intercept": "permutation max-T", "effects": "bonferroni"}
    assert fwe_meta["Permutation"]["NumberOfPermutations"] == 200
    assert fwe_meta["Thresholds"]["intercept"] == pytest.approx(-np.log10(0.05))


# -- bad input: a clear error, nothing written ---------------------------------------------


@pytest.fixture
def existing_out(tmp_path):
    out = tmp_path / "out"
    (out / "group").mkdir(parents=True)
    (out / "group" / "keep.txt").write_text("keep")
    return out


def _snapshot(root: Path) -> dict:
    return {f: (root / f).read_bytes() for f in _files(root)}


def test_unfitted_model_is_refused(tmp_path):
    for save in (save_glm_to_bids, save_group_derivatives):
        with pytest.raises(InputError, match="not fitted"):
            save(SecondLevelModel(), "intercept", out_dir=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("contrast, match", [("intercept - height", "cannot be evaluated"),
                                              (np.array([1.0, 0.0, 0.0]), "3 weights"),
                                              (np.zeros(2), "null")])
def test_bad_contrasts_fail_before_writing(saved, existing_out, contrast, match):
    before = _snapshot(existing_out)
    for save in (save_glm_to_bids, save_group_derivatives):
        with pytest.raises(InputError, match=match):
            save(saved["model"], {"c": contrast}, out_dir=existing_out)
        assert _snapshot(existing_out) == before
    assert [p.name for p in existing_out.parent.iterdir()] == ["out"]  # no staging folder left


def test_bad_options_and_wrong_levels_are_refused(saved, existing_out, tmp_path):
    before = _snapshot(existing_out)
    for alpha in (0, 1.5, "0.05"):
        with pytest.raises(InputError, match="alpha"):
            save_group_derivatives(saved["model"], "intercept", existing_out, alpha=alpha)
    with pytest.raises(InputError, match="cluster_threshold"):
        save_group_derivatives(saved["model"], "intercept", existing_out, cluster_threshold=-1)
    settings = {"n_perm": 10, "random_state": 0, "tfce": False, "threshold": None}
    maps = {"intercept": {"logp_max_t": None}}
    for kwargs, match in (({"permutation": settings}, "without permutation_maps"),
                          ({"permutation_maps": maps}, "the settings they were computed with"),
                          ({"permutation_maps": maps, "permutation": {**settings, "n_perm": 0}}, "n_perm"),
                          ({"permutation_maps": maps, "permutation": {**settings, "seed": 1}}, "unknown"),
                          ({"permutation_maps": maps, "permutation": {**settings, "tfce": True}}, "lack"),
                          ({"permutation_maps": maps, "permutation": {**settings, "two_sided_test": False}},
                           "two_sided_test"),
                          ({"permutation_maps": {"age": {"logp_max_t": None}}, "permutation": settings},
                           "not a t contrast")):
        with pytest.raises(InputError, match=match):
            save_group_derivatives(saved["model"], "intercept", existing_out, **kwargs)
    with pytest.raises(InputError, match="unknown keyword"):
        save_glm_to_bids(saved["model"], "intercept", out_dir=existing_out, colour="red")
    with pytest.raises(InputError, match="contrast-aMinusB"):  # two names, one label
        save_glm_to_bids(saved["model"], {"a - b": "intercept", "a_minus_b": "age"}, out_dir=existing_out)
    with pytest.raises(TypeError, match="save_group_derivatives"):
        save_glm_derivatives(saved["model"], "intercept", existing_out)
    with pytest.raises(TypeError, match="SecondLevelModel"):
        save_group_derivatives(object(), "intercept", existing_out)
    assert _snapshot(existing_out) == before


def test_group_residuals_need_a_model_that_keeps_them(inputs, saved, tmp_path):
    """residuals=True (chunkglm second-level --save-residuals): group_stat-errorts, one volume per
    map, equal to the model's residuals_; refused before writing when the fit kept none."""
    model = SecondLevelModel().fit(inputs["paths"], design_matrix=inputs["design"])
    with pytest.raises(InputError, match="minimize_memory=False"):
        save_group_derivatives(model, "intercept", tmp_path / "refused", residuals=True)
    assert not (tmp_path / "refused").exists()
    paths = save_group_derivatives(saved["model"], "intercept", tmp_path / "out", residuals=True)
    written = tmp_path / "out" / "group_level" / "group_stat-errorts.nii.gz"
    assert written in paths
    np.testing.assert_allclose(nib.load(written).get_fdata(), saved["model"].residuals_.get_fdata(),
                               rtol=1e-6, atol=1e-6)  # float32 file of the float64 image
