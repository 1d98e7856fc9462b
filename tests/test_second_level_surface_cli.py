"""``chunkglm second-level`` on the surface glm layouts ``chunkglm first-level`` writes (issue 20 item 5):
GIFTI pairs (fsaverage5) and CIFTI dense scalar maps in, the group maps in the same format out, equal to
the Python API's SecondLevelModel on the same files; every surface derivatives dataset passes the BIDS
validator; ``chunkglm report`` draws the group maps."""

from __future__ import annotations

import json
import re
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.datasets import load_fsaverage
from nilearn.surface import SurfaceImage

from chunkglm.cli.main import main
from chunkglm.cli.second_level import mask_input
from chunkglm.errors import InputError
from chunkglm.glm import save_glm_to_bids
from chunkglm.glm.io.bids import permutation_fwe_map
from chunkglm.glm.second_level import SecondLevelModel
from chunkglm.io.convert import convert
from chunkglm.io.mesh_spaces import gifti_files
from chunkglm.io.surface_maps import convert_surface_maps
from chunkglm.report import write_reports
from chunkglm.testing import make_synthetic_bids

from test_bids_validator import _errors, validate

MESH = load_fsaverage("fsaverage5")["pial"]
#: Both sides are chunkglm's fit of the same float32 maps; the command stages them into its own store
#: with its own voxel blocks, so sums may be ordered differently: one float32 rounding of the map's
#: largest value covers it.
RTOL = 1e-6

pytestmark = pytest.mark.filterwarnings("ignore:The given float value must not exceed:UserWarning",
                                        "ignore:No clusters found:UserWarning")


def _run(*argv):
    assert main([*map(str, argv), "--cluster", "none", "--no-progress"]) == 0, argv


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """first_level and group_level folders of the GIFTI (fsaverage5) and CIFTI branches, 3 subjects."""
    tmp = tmp_path_factory.mktemp("surface_second_level")
    dataset = make_synthetic_bids(tmp / "bids", n_subjects=3, n_runs=1, surface=True)
    _run("first-level", dataset.root, "-o", tmp / "fl", "--task", "main", "--space", "fsaverage5",
         "-c", "aMinusB=a - b")
    _run("second-level", tmp / "fl", "-o", tmp / "group", "--first-level-contrast", "aMinusB")
    convert(dataset.root, tmp / "c.zarr", space="fsaverage5", surface="cifti")
    _run("first-level", tmp / "c.zarr", "-o", tmp / "cfl", "--task", "main", "--space", "fsaverage5",
         "-c", "aMinusB=a - b")
    _run("second-level", tmp / "cfl", "-o", tmp / "cgroup", "--first-level-contrast", "aMinusB")
    return tmp


def _gifti(path):
    return np.asarray(nib.load(str(path)).darrays[0].data)


def _close(got, want):
    scale = float(np.nanmax(np.abs(want))) or 1.0
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * scale)


def test_gifti_layout_gives_gifti_group_maps_equal_to_the_api(layouts):
    folder = layouts / "group" / "group_level"
    names = {p.name for p in folder.iterdir()}
    for hemi in ("L", "R"):
        for rest in ("contrast-mean_stat-t", "contrast-mean_stat-z", "contrast-mean_fdr-corrected",
                     "contrast-mean_fwe-corrected", "mask"):
            assert f"group_hemi-{hemi}_{rest}.func.gii" in names
    assert not [n for n in names if n.endswith(".nii.gz")]
    sidecar = json.loads((folder / "group_glm.json").read_text())
    assert sidecar["Model"]["NumberOfMaps"] == 3 and sidecar["Contrasts"]["mean"]["Weights"] == [1]
    effects = [SurfaceImage(MESH, {part: str(p).replace("_hemi-L_", f"_hemi-{h}_") for part, h in
                                   (("left", "L"), ("right", "R"))})
               for p in sorted(layouts.glob("fl/first_level/sub-*/*_hemi-L_contrast-aMinusB_stat-effect.func.gii"))]
    z = SecondLevelModel().fit(effects, design_matrix=pd.DataFrame({"intercept": np.ones(3)})).compute_contrast(
        "intercept")
    for part, hemi in (("left", "L"), ("right", "R")):
        _close(_gifti(folder / f"group_hemi-{hemi}_contrast-mean_stat-z.func.gii"), np.asarray(z.data.parts[part]))
    page = write_reports(layouts / "group", jobs=1)[0].read_text()
    assert "The mask includes 20484 vertices" in page and "on the mesh" in page or "no vertex survives" in page


def test_cifti_layout_gives_dense_scalar_group_maps_equal_to_the_api(layouts):
    folder = layouts / "cgroup" / "group_level"
    z_file = folder / "group_contrast-mean_stat-z.dscalar.nii"
    assert {"group_mask.dscalar.nii", "group_contrast-mean_fwe-corrected.dscalar.nii"} <= {
        p.name for p in folder.iterdir()}
    effects = sorted(str(p) for p in layouts.glob("cfl/first_level/sub-*/*_contrast-aMinusB_stat-effect.dscalar.nii"))
    z = SecondLevelModel().fit(effects, design_matrix=pd.DataFrame({"intercept": np.ones(3)})).compute_contrast(
        "intercept")
    written = nib.load(str(z_file))
    assert written.header.get_axis(1) == z.header.get_axis(1)
    _close(np.asarray(written.dataobj, dtype=np.float64), np.asarray(z.dataobj, dtype=np.float64))
    page = write_reports(layouts / "cgroup", jobs=1)[0].read_text()
    assert "THALAMUS_LEFT (8 voxels)" in page


def test_sidecars_record_the_space_and_a_space_without_a_packaged_mesh_is_refused(layouts, tmp_path, capsys):
    """first-level and group sidecars name the maps' space and vertex counts (the GIFTI files hold no
    geometry); second-level models the pairs on that space's mesh, and refuses in one line a space nilearn
    ships no mesh of (fsaverage6: a download), naming it, before anything is written."""
    for sidecar in [*layouts.glob("fl/first_level/sub-*/*_glm.json"), layouts / "group/group_level/group_glm.json"]:
        content = json.loads(sidecar.read_text())
        assert content["Space"] == "fsaverage5" and content["VertexCount"] == {"L": 10242, "R": 10242}, sidecar
    assert all(json.loads(p.read_text())["Space"] == "fsaverage5"
               for p in layouts.glob("cfl/first_level/sub-*/*_glm.json"))
    copy = tmp_path / "fl"
    shutil.copytree(layouts / "fl", copy)
    sidecar = sorted(copy.glob("first_level/sub-*/*_glm.json"))[1]
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "Space": "fsaverage6"}))
    capsys.readouterr()
    assert main(["second-level", str(copy), "-o", str(tmp_path / "group"), "--first-level-contrast", "aMinusB",
                 "--cluster", "none", "--no-progress"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "space 'fsaverage6': nilearn ships no mesh of it" in error and "chunkglm.io.surface_maps" in error
    assert not (tmp_path / "group" / "group_level").exists()


def _surface_effects(layouts):
    return [SurfaceImage(MESH, {part: str(p).replace("_hemi-L_", f"_hemi-{h}_") for part, h in
                                (("left", "L"), ("right", "R"))})
            for p in sorted(layouts.glob("fl/first_level/sub-*/*_hemi-L_contrast-aMinusB_stat-effect.func.gii"))]


def test_gifti_mask_pair_restricts_the_group_model(layouts, tmp_path):
    """--mask as two GIFTI files (named by their hemi entity, in any order): the model is fitted inside it,
    the group mask written is it, the z map equals the API's SecondLevelModel with that mask."""
    inside = {"left": (np.arange(10242) < 4000).astype(np.uint8), "right": np.ones(10242, dtype=np.uint8)}
    files = {}
    for part, hemi in (("left", "L"), ("right", "R")):
        files[part] = tmp_path / f"roi_hemi-{hemi}_mask.func.gii"
        nib.gifti.GiftiImage(darrays=[nib.gifti.GiftiDataArray(inside[part])]).to_filename(str(files[part]))
    _run("second-level", layouts / "fl", "-o", tmp_path / "group", "--first-level-contrast", "aMinusB",
         "--mask", files["right"], files["left"])
    folder = tmp_path / "group" / "group_level"
    mask = SurfaceImage(MESH, {part: inside[part].astype(float) for part in inside})
    z = SecondLevelModel(mask_img=mask).fit(_surface_effects(layouts), design_matrix=pd.DataFrame(
        {"intercept": np.ones(3)})).compute_contrast("intercept")
    for part, hemi in (("left", "L"), ("right", "R")):
        np.testing.assert_array_equal(_gifti(folder / f"group_hemi-{hemi}_mask.func.gii") != 0, inside[part] != 0)
        got = _gifti(folder / f"group_hemi-{hemi}_contrast-mean_stat-z.func.gii")
        _close(got, np.asarray(z.data.parts[part]))
        assert not got[inside[part] == 0].any()


def test_gifti_mask_with_a_store_of_mesh_maps(layouts, tmp_path):
    """A store's maps node on a mesh grid takes --mask as the hemi-L file alone (its hemi-R sibling found),
    modelled on the grid's mesh: the group mask written is it."""
    convert_surface_maps(_surface_effects(layouts), tmp_path / "s.zarr", "effects",
                         coords={"subject": ["01", "02", "03"]})
    inside = {"L": np.ones(10242, dtype=np.uint8), "R": (np.arange(10242) >= 6000).astype(np.uint8)}
    for hemi, values in inside.items():
        nib.gifti.GiftiImage(darrays=[nib.gifti.GiftiDataArray(values)]).to_filename(
            str(tmp_path / f"roi_hemi-{hemi}_mask.func.gii"))
    _run("second-level", tmp_path / "s.zarr", "-o", tmp_path / "group", "--mask", tmp_path / "roi_hemi-L_mask.func.gii")
    for hemi, values in inside.items():
        np.testing.assert_array_equal(
            _gifti(tmp_path / "group" / "group_level" / f"group_hemi-{hemi}_mask.func.gii") != 0, values != 0)


def test_cifti_mask_restricts_the_group_model(layouts, tmp_path):
    """--mask a .dscalar.nii on the maps' brain-model axis: the group mask written is it."""
    full = nib.load(str(layouts / "cgroup" / "group_level" / "group_mask.dscalar.nii"))
    values = np.asarray(full.dataobj, dtype=np.float32).copy()
    values[0, : values.shape[1] // 2] = 0
    path = tmp_path / "half_mask.dscalar.nii"
    nib.Cifti2Image(values, full.header).to_filename(str(path))
    _run("second-level", layouts / "cfl", "-o", tmp_path / "group", "--first-level-contrast", "aMinusB",
         "--mask", path)
    written = nib.load(str(tmp_path / "group" / "group_level" / "group_mask.dscalar.nii"))
    np.testing.assert_array_equal(np.asarray(written.dataobj) != 0, values != 0)


@pytest.mark.parametrize("layout, mask, message", [
    ("fl", "mask.nii.gz", r"a volume mask, but the maps are mesh maps; give a GIFTI file per hemisphere"),
    ("cfl", "roi_hemi-L_mask.func.gii", r"a mesh mask, but the maps are cifti maps; give a CIFTI dense scalar"),
    ("fl", "mask.dscalar.nii", r"a cifti mask, but the maps are mesh maps"),
])
def test_mask_of_another_kind_is_refused_in_one_line(layouts, tmp_path, capsys, layout, mask, message):
    capsys.readouterr()
    assert main(["second-level", str(layouts / layout), "-o", str(tmp_path / "group"), "--first-level-contrast",
                 "aMinusB", "--mask", str(tmp_path / mask), "--cluster", "none", "--no-progress"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(message, error), error
    assert not (tmp_path / "group" / "group_level").exists()


def test_mask_forms_for_volume_maps_and_gifti_pairs(tmp_path):
    """A surface mask with volume maps is refused; a hemi-L (or hemi-R) file alone finds its sibling, a
    missing sibling is one line naming it."""
    with pytest.raises(InputError, match=r"a mesh mask, but the maps are volume maps; give a NIfTI volume"):
        mask_input([str(tmp_path / "roi_hemi-L_mask.func.gii")], [str(tmp_path / "sub-01_stat-effect.nii.gz")])
    with pytest.raises(InputError, match=r"a cifti mask, but the maps are volume maps"):
        mask_input([str(tmp_path / "m.dscalar.nii")], [str(tmp_path / "sub-01_stat-effect.nii.gz")])
    left, right = tmp_path / "roi_hemi-L_mask.func.gii", tmp_path / "roi_hemi-R_mask.func.gii"
    left.write_bytes(b"")
    with pytest.raises(InputError, match="has no right-hemisphere file .*roi_hemi-R_mask.func.gii"):
        gifti_files([left])
    right.write_bytes(b"")
    assert gifti_files([right]) == gifti_files([left]) == {"left": str(left), "right": str(right)}
    assert gifti_files([tmp_path / "a.gii", tmp_path / "b.gii"]) == {"left": str(tmp_path / "a.gii"),
                                                                     "right": str(tmp_path / "b.gii")}
    with pytest.raises(InputError, match="one file per hemisphere .* received 3"):
        gifti_files([left, right, left])


@pytest.fixture(scope="module")
def api_datasets(layouts):
    """nilearn's file set (save_glm_to_bids) of a surface and a CIFTI second-level model."""
    effects = sorted(str(p) for p in layouts.glob("cfl/first_level/sub-*/*_contrast-aMinusB_stat-effect.dscalar.nii"))
    design = pd.DataFrame({"intercept": np.ones(3)})
    save_glm_to_bids(SecondLevelModel(minimize_memory=False).fit(effects, design_matrix=design), "intercept",
                     out_dir=layouts / "api_cifti")
    return layouts


@pytest.mark.parametrize("name", ["fl", "group", "cfl", "cgroup", "api_cifti"])
def test_surface_derivatives_pass_the_bids_validator(api_datasets, name):
    assert _errors(validate(api_datasets / name)) == []


def test_permutation_fwe_map_on_surfaces():
    """The z map where -log10 p > -log10(alpha), clusters of fewer adjacent vertices than asked removed."""
    z = {p: np.zeros(10242, dtype=np.float32) for p in ("left", "right")}
    logp = {p: np.zeros(10242) for p in ("left", "right")}
    faces = MESH.parts["left"].faces
    big = np.unique(faces[(faces == 0).any(axis=1)])  # vertex 0 and its neighbours: one cluster
    lone = np.setdiff1d(np.arange(10242), faces[np.isin(faces, big).any(axis=1)].ravel())[0]  # none of them
    assert len(big) >= 5
    for vertex in (*big, lone):
        z["left"][vertex], logp["left"][vertex] = 4.0, 3.0
    kept = permutation_fwe_map(SurfaceImage(MESH, z), SurfaceImage(MESH, logp), 0.05, cluster_threshold=5)
    left = np.asarray(kept.data.parts["left"])
    assert set(np.flatnonzero(left)) == set(big) and left.dtype == np.float32
    assert not np.asarray(kept.data.parts["right"]).any()
    assert np.flatnonzero(np.asarray(permutation_fwe_map(SurfaceImage(MESH, z), SurfaceImage(MESH, logp),
                                                         0.05).data.parts["left"])).size == len(big) + 1
