"""chunkglm.io.inputs: every accepted input form stages to the same node content and the same maps
view; store nodes pass through uncopied; bad inputs raise InputError naming what was received and
what to give; a complete maps node is replaced, never deleted first."""

from __future__ import annotations

import gc

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from chunkglm import convert, open_cohort
from chunkglm.errors import InputError
from chunkglm.io import layout as st
from chunkglm.io.inputs import MapsView, StagedInputs, stage_inputs, write_maps_node

SHAPE = (6, 5, 4)
AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[1:5, 1:4, :3] = 1
    runs = [rng.standard_normal((*SHAPE, 7)).astype(np.float32) + 100 for _ in range(2)]
    maps = rng.standard_normal((*SHAPE, 4)).astype(np.float32)
    out = {"mask": nib.Nifti1Image(mask, AFFINE), "run_imgs": [], "run_paths": [], "map_imgs": [],
           "map_paths": [], "maps_4d": nib.Nifti1Image(maps, AFFINE)}
    for index, data in enumerate(runs):
        img = nib.Nifti1Image(data, AFFINE)
        img.header.set_zooms((3.0, 3.0, 3.0, 2.0))
        path = folder / f"sub-0{index + 1}_task-x_bold.nii.gz"
        nib.save(img, path)
        out["run_imgs"].append(img)
        out["run_paths"].append(str(path))
    for index in range(maps.shape[3]):
        img = nib.Nifti1Image(maps[..., index], AFFINE)
        path = folder / f"map_{index}.nii.gz"
        nib.save(img, path)
        out["map_imgs"].append(img)
        out["map_paths"].append(str(path))
    return out


def _bold(nodes):
    return [np.asarray(node.data().values) for node in nodes]


def _view(staged: StagedInputs) -> dict:
    view = staged.maps()
    return {"data": np.asarray(view.data().compute()), "variables": view.variables, "n_images": view.n_images,
            "ijk": view.ijk, "affine": view.grid.affine, "shape": view.grid.shape}


def _assert_same_view(a, b):
    np.testing.assert_array_equal(a["data"], b["data"])  # bit-equal, NaN in place
    assert a["variables"] == b["variables"] and a["n_images"] == b["n_images"] and a["shape"] == b["shape"]
    np.testing.assert_array_equal(a["ijk"], b["ijk"])
    np.testing.assert_array_equal(a["affine"], b["affine"])


# -- runs ------------------------------------------------------------------------------------


def test_runs_from_every_form_hold_the_same_values(images):
    forms = {"paths": images["run_paths"], "images": images["run_imgs"],
             "tuple": tuple(images["run_paths"]), "mixed": [images["run_paths"][0], images["run_imgs"][1]]}
    staged = {name: stage_inputs(form, "runs", mask_img=images["mask"]) for name, form in forms.items()}
    reference = _bold(staged["paths"].nodes)
    assert reference[0].shape == (7, int(np.asarray(images["mask"].dataobj).sum()))
    for name, result in staged.items():
        assert result.converted and len(result.nodes) == 2, name
        for ours, ref in zip(_bold(result.nodes), reference):
            np.testing.assert_array_equal(ours, ref)
    one = stage_inputs(images["run_paths"][0], "runs", mask_img=images["mask"])  # a single path
    np.testing.assert_array_equal(_bold(one.nodes)[0], reference[0])
    data = np.asarray(images["run_imgs"][0].dataobj)[np.asarray(images["mask"].dataobj) != 0]
    np.testing.assert_array_equal(reference[0], data.T)  # the input's values, in-mask


def test_runs_mask_may_be_computed_from_the_staged_files(images):
    seen = []

    def mask(infos):
        seen.extend(info.path for info in infos)
        return images["mask"]

    staged = stage_inputs(images["run_imgs"], "runs", mask_img=mask)
    assert seen == staged.paths and len(seen) == 2
    assert staged.nodes[0].grid.n_voxels == int(np.asarray(images["mask"].dataobj).sum())


def test_store_runs_pass_through_uncopied(images, tmp_path):
    convert(images["run_paths"], tmp_path / "s.zarr", mask_img=images["mask"])
    cohort = open_cohort(tmp_path / "s.zarr")
    nodes = list(cohort.runs.values())
    before = sorted(st.open_root(tmp_path / "s.zarr").group_keys())
    staged = stage_inputs(nodes, "runs")
    assert not staged.converted and staged.folder is None
    assert all(a is b for a, b in zip(staged.nodes, nodes))
    assert sorted(st.open_root(tmp_path / "s.zarr").group_keys()) == before
    assert stage_inputs(nodes[0], "runs").nodes[0] is nodes[0]


def test_scratch_folder_is_removed_with_its_owner(images):
    class Owner:
        pass

    owner = Owner()
    staged = stage_inputs(images["run_paths"], "runs", mask_img=images["mask"], owner=owner)
    folder = staged.folder
    assert (folder / "store.zarr").is_dir()
    del owner, staged
    gc.collect()
    assert not folder.exists()


# -- maps ------------------------------------------------------------------------------------


def test_maps_from_every_form_give_the_same_view(images):
    forms = {
        "paths": images["map_paths"],
        "images": images["map_imgs"],
        "4-D image": images["maps_4d"],
        "series": pd.Series(images["map_paths"]),
        "dataframe of paths": pd.DataFrame({"effect": images["map_paths"]}),
        "dataframe of images": pd.DataFrame({"effect": images["map_imgs"]}),
    }
    views = {name: _view(stage_inputs(form, "maps", mask_img=images["mask"])) for name, form in forms.items()}
    reference = views["paths"]
    assert reference["variables"] == ["beta"] and reference["n_images"] == 4  # "effect" read as beta
    maps = np.asarray(images["maps_4d"].dataobj)[np.asarray(images["mask"].dataobj) != 0].T
    np.testing.assert_array_equal(reference["data"], maps)
    for name, view in views.items():
        _assert_same_view(view, reference)


def test_maps_table_holds_several_map_types_and_coordinates(images):
    table = pd.DataFrame({"z": images["map_paths"], "varcope": images["map_imgs"][::-1],
                          "study_id": ["a", "a", "b", "c"], "sample_sizes": [10.0, 12.0, 20.0, 8.0]})
    view = stage_inputs(table, "maps", map_types=("z", "t", "beta", "varcope", "se")).maps()
    assert isinstance(view, MapsView)
    assert view.variables == ["z", "varcope"]
    assert view.ids == [f"image-{i:05d}" for i in range(4)]
    assert view.coord("study_id").tolist() == ["a", "a", "b", "c"]
    np.testing.assert_array_equal(view.sample_sizes, [10.0, 12.0, 20.0, 8.0])
    assert {"se", "varcope", "z", "sample_sizes"} <= view.available()
    np.testing.assert_array_equal(np.asarray(view.data("varcope"))[0],
                                  np.asarray(images["map_imgs"][3].dataobj).ravel())
    assert view.grid.n_voxels == int(np.prod(SHAPE))  # no mask: every voxel of the grid


def test_store_maps_pass_through_uncopied(images, tmp_path):
    node = stage_inputs(images["map_paths"], "maps", store=tmp_path / "s.zarr", collection="group").nodes[0]
    staged = stage_inputs(node, "maps")
    assert staged.nodes[0] is node and not staged.converted


def test_a_complete_maps_node_is_replaced_never_deleted_first(images, tmp_path):
    store = tmp_path / "s.zarr"
    table = pd.DataFrame({"z": images["map_paths"]})
    first = np.asarray(write_maps_node(table, ["z"], store, "c").data("z").values)
    nan = nib.Nifti1Image(np.full(SHAPE, np.nan, dtype=np.float32), AFFINE)
    with pytest.raises(InputError, match="only NaN"):
        write_maps_node(pd.DataFrame({"z": [_saved(nan, tmp_path, i) for i in range(2)]}), ["z"], store, "c")
    kept = open_cohort(store).maps["c"]  # the failed rewrite left the complete node as it was
    np.testing.assert_array_equal(np.asarray(kept.data("z").values), first)
    replaced = write_maps_node(pd.DataFrame({"z": images["map_paths"][:2]}), ["z"], store, "c")
    np.testing.assert_array_equal(np.asarray(replaced.data("z").values), first[:2])
    root = st.open_root(store)  # written beside the first version, switched to at its marker
    meta = st.node_meta(root["maps/c"])
    assert st.VERSION.match(meta["version"]) and not st.unpublished(root["maps/c"], meta), meta
    assert st.data_path("maps/c", meta) != "maps/c"


def _saved(img, folder, index):
    path = folder / f"nan_{index}.nii"
    nib.save(img, path)
    return str(path)


# -- bad inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, kind, message", [
    (3, "runs", r"run_imgs entries must be NIfTI paths, nibabel images or store nodes .*received \['int'\]"),
    ({"a": 1}, "maps", r"maps entries must be NIfTI paths, nibabel images or store nodes .*received \['dict'\]"),
    ([], "runs", r"run_imgs is empty: give at least one image"),
    (pd.DataFrame({"effect": ["x.nii"]}), "runs", r"run_imgs was a DataFrame.*runs are 4-D images"),
    (pd.DataFrame({"other": ["x.nii"]}), "maps", r"no map column.*it has \['other'\]"),
    ("/nonexistent/run.nii.gz", "runs", r"File not found: '/nonexistent/run.nii.gz'"),
])
def test_bad_inputs_say_what_was_received_and_what_to_give(bad, kind, message):
    with pytest.raises(InputError, match=message):
        stage_inputs(bad, kind)


def test_bad_kinds_of_images_and_nodes(images, tmp_path):
    with pytest.raises(InputError, match=r"run_imgs must be 4-D images \(runs\); received shape \(6, 5, 4\)"):
        stage_inputs(images["map_paths"][:1], "runs")
    node = stage_inputs(images["map_paths"], "maps", store=tmp_path / "s.zarr", collection="m").nodes[0]
    with pytest.raises(InputError, match=r"run_imgs must be runs of a cohort store .*received the maps node 'm'"):
        stage_inputs([node], "runs")
    with pytest.raises(InputError, match=r"mixes store maps and NIfTI images: give one kind"):
        stage_inputs([node, images["map_paths"][0]], "maps")
    with pytest.raises(InputError, match=r"kind must be 'runs' or 'maps'; received 'volumes'"):
        stage_inputs(images["map_paths"], "volumes")
    with pytest.raises(InputError, match=r"column 'z' has no path in rows \[1\]"):
        stage_inputs(pd.DataFrame({"z": [images["map_paths"][0], None]}), "maps", map_types=("z",))
    other = nib.Nifti1Image(np.zeros((3, 3, 3), dtype=np.float32), AFFINE)
    with pytest.raises(InputError, match=r"(?s)on another grid.*Resample all maps onto one grid first"):
        stage_inputs([images["map_imgs"][0], other], "maps")
