"""Surface grids in the cohort store: SurfaceImage, GIFTI and CIFTI runs in, and back bit for bit.

The store keeps float32 values (its format); float32 inputs come back equal
bit for bit, float64 ones as their float32 values (as NIfTI runs do).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import xarray as xr
from nilearn.datasets import load_fsaverage
from nilearn.surface import InMemoryMesh, PolyMesh, SurfaceImage

from chunkglm.chunking import plan_voxel_chunks
from chunkglm.errors import InputError
from chunkglm.io.cohort import open_cohort
from chunkglm.io.surface import SurfaceGrid
from chunkglm.io.surface_convert import convert_surface_runs
from chunkglm.testing import make_synthetic_bids


@pytest.fixture(scope="module")
def fsaverage5():
    return load_fsaverage("fsaverage5")["pial"]


@pytest.fixture(scope="module")
def surface_bids(tmp_path_factory):
    return make_synthetic_bids(tmp_path_factory.mktemp("surface_bids"), n_subjects=1, n_runs=2, surface=True)


def _image(mesh, n_time, dtype=np.float32, seed=0, parts=("left", "right")):
    rng = np.random.default_rng(seed)
    return SurfaceImage(mesh if len(parts) == 2 else PolyMesh(**{p: mesh.parts[p] for p in parts}),
                        {p: rng.standard_normal((mesh.parts[p].n_vertices, n_time)).astype(dtype) for p in parts})


def test_surface_image_round_trip_bit_exact(tmp_path, fsaverage5):
    images = [_image(fsaverage5, 12, seed=s) for s in (0, 1)]
    names = convert_surface_runs(images, tmp_path / "s.zarr", t_r=2.0, chunk_bytes=12 * 4 * 1000,
                                 space="fsaverage5")
    cohort = open_cohort(tmp_path / "s.zarr")
    assert len(cohort.grids) == 1  # the geometry is stored once for both runs
    for name, image in zip(names, images):
        node = cohort.runs[name]
        assert isinstance(node.grid, SurfaceGrid) and node.grid.kind == "mesh"
        # the one planner's voxel blocks over the 20,484 vertices, time never split
        plan = plan_voxel_chunks(12, 20484, 4, 12 * 4 * 1000)
        assert node.data().data.chunks == ((12,), tuple(s.stop - s.start for s in plan.block_slices()))
        back = node.to_surface_image()
        for part in ("left", "right"):
            assert back.data.parts[part].dtype == np.float32
            assert np.array_equal(back.data.parts[part], image.data.parts[part])
            assert np.array_equal(back.mesh.parts[part].coordinates, fsaverage5.parts[part].coordinates)
            assert np.array_equal(back.mesh.parts[part].faces, fsaverage5.parts[part].faces)
        assert node.attrs["RepetitionTime"] == 2.0


def test_store_opens_with_plain_xarray(tmp_path, fsaverage5):
    convert_surface_runs(_image(fsaverage5, 5), tmp_path / "s.zarr", names=["run1"], t_r=1.0)
    tree = xr.open_datatree(tmp_path / "s.zarr", engine="zarr", zarr_format=3, chunks={})
    run = tree["runs/run1"].to_dataset()
    assert run["bold"].dims == ("time", "voxel")
    assert "hemi" in run.coords  # the part of each element, a coordinate of bold
    assert list(np.unique(run["hemi"].values)) == ["left", "right"]
    assert (run["hemi"].values[:10242] == "left").all()
    grid = tree[f"grids/{open_cohort(tmp_path / 's.zarr').grids[0]}"].to_dataset()
    assert grid["coordinates_left"].shape == (10242, 3) and grid["faces_right"].shape == (20480, 3)


def test_float64_surface_image_comes_back_as_its_float32_values(tmp_path, fsaverage5):
    image = _image(fsaverage5, 4, dtype=np.float64)
    convert_surface_runs(image, tmp_path / "s.zarr", names=["r"], t_r=2.0)
    back = open_cohort(tmp_path / "s.zarr").runs["r"].to_surface_image()
    assert np.array_equal(back.data.parts["left"], image.data.parts["left"].astype(np.float32))


def test_one_hemisphere_and_a_mask(tmp_path, fsaverage5):
    left = _image(fsaverage5, 6, parts=("left",))
    mask = np.zeros(10242, dtype=bool)
    mask[::3] = True
    convert_surface_runs(left, tmp_path / "s.zarr", names=["l"], t_r=2.0, mask=mask)
    node = open_cohort(tmp_path / "s.zarr").runs["l"]
    assert node.grid.parts == (("left", 10242),) and node.data().shape == (6, mask.sum())
    back = node.to_surface_image().data.parts["left"]
    assert list(node.to_surface_image().data.parts) == ["left"]
    assert np.array_equal(back[mask], left.data.parts["left"][mask]) and not back[~mask].any()


def test_gifti_pair_round_trip(tmp_path, surface_bids):
    files = surface_bids.surface.runs[0]
    convert_surface_runs(files.gifti, tmp_path / "s.zarr", names=["g"], mesh="fsaverage5")
    node = open_cohort(tmp_path / "s.zarr").runs["g"]
    assert node.attrs["RepetitionTime"] == surface_bids.tr  # from the BIDS sidecar
    assert node.grid.space == "fsaverage5"
    images = node.to_gifti(tmp_path, "back")
    for part, path in files.gifti.items():
        original = nib.load(path)
        hemi = {"left": "L", "right": "R"}[part]
        written = nib.load(tmp_path / f"back_hemi-{hemi}_bold.func.gii")
        assert len(written.darrays) == len(original.darrays) == surface_bids.n_volumes
        for ours, theirs in zip(images[part].darrays, original.darrays):
            assert ours.data.dtype == np.float32 and np.array_equal(ours.data, theirs.data)
        assert np.array_equal(written.agg_data(), original.agg_data())
    # the GIFTI run equals the SurfaceImage nilearn reads from the same files
    nilearn_image = SurfaceImage(load_fsaverage("fsaverage5")["pial"],
                                 {p: str(f) for p, f in files.gifti.items()})
    assert np.array_equal(node.to_surface_image().data.parts["right"], nilearn_image.data.parts["right"])


def test_cifti_round_trip(tmp_path, surface_bids):
    path = surface_bids.surface.runs[1].cifti
    convert_surface_runs(path, tmp_path / "s.zarr", names=["c"], chunk_bytes=40 * 4 * 2000)
    node = open_cohort(tmp_path / "s.zarr").runs["c"]
    assert node.grid.kind == "cifti" and node.data().data.numblocks[1] > 1
    assert [p for p, _ in node.grid.parts][-1] == "CIFTI_STRUCTURE_THALAMUS_RIGHT"
    node.to_cifti(tmp_path / "back.dtseries.nii")
    original, back = nib.load(path), nib.load(tmp_path / "back.dtseries.nii")
    assert back.get_data_dtype() == np.float32
    assert np.array_equal(np.asarray(back.dataobj), np.asarray(original.dataobj))
    for axis in (0, 1):
        assert back.header.get_axis(axis) == original.header.get_axis(axis)
    assert node.attrs["RepetitionTime"] == surface_bids.tr


def test_refusals(tmp_path, fsaverage5):
    image = _image(fsaverage5, 4)
    flipped = PolyMesh(left=InMemoryMesh(fsaverage5.parts["left"].coordinates[::-1].copy(),
                                         fsaverage5.parts["left"].faces),
                       right=fsaverage5.parts["right"])
    other = SurfaceImage(flipped, {p: image.data.parts[p] for p in ("left", "right")})
    with pytest.raises(InputError, match="another mesh"):
        convert_surface_runs([image, other], tmp_path / "a.zarr", t_r=2.0)
    one_map = SurfaceImage(fsaverage5, {p: image.data.parts[p][:, 0] for p in ("left", "right")})
    with pytest.raises(InputError, match="2-D SurfaceImage"):
        convert_surface_runs(one_map, tmp_path / "b.zarr", t_r=2.0)
    with pytest.raises(InputError, match="GIFTI runs carry no geometry"):
        convert_surface_runs({"left": "x.func.gii"}, tmp_path / "c.zarr")
    with pytest.raises(InputError, match="keys among"):
        convert_surface_runs({"both": "x.func.gii"}, tmp_path / "d.zarr", mesh="fsaverage5")
    convert_surface_runs(image, tmp_path / "e.zarr", names=["m"], t_r=2.0)
    with pytest.raises(InputError, match="mesh grid: write it back with to_gifti"):
        open_cohort(tmp_path / "e.zarr").runs["m"].to_cifti()
    assert not (tmp_path / "a.zarr").exists()  # refused before anything was written


def test_synthetic_surface_runs_follow_their_truth(surface_bids):
    """OLS with the true regressors recovers the true betas per vertex: the errors, divided by
    their exact sd under the generating AR(1) noise, are standard normal over 20,484 vertices
    (mean and sd within 0.05 of 0 and 1: 10 sampling sds at this count)."""
    truth, run = surface_bids.surface, surface_bids.runs[0]
    files = truth.runs[0]
    y = np.hstack([nib.load(files.gifti[p]).agg_data() .T for p in ("left", "right")]).astype(np.float64)
    design = surface_bids.truth.design[run.name][["a", "b", "constant"]].to_numpy()
    x = np.hstack([design, surface_bids.truth.drift_basis[run.name].to_numpy()])
    beta = np.linalg.lstsq(x, y, rcond=None)[0]
    lags = np.abs(np.subtract.outer(np.arange(len(x)), np.arange(len(x))))
    sigma = truth.noise_sd ** 2 * truth.ar1_rho ** lags
    pinv = np.linalg.pinv(x)
    sd = np.sqrt(np.diag(pinv @ sigma @ pinv.T))
    for index, condition in enumerate(("a", "b")):
        z = (beta[index] - truth.betas[condition]) / sd[index]
        assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05, condition
    z_base = (beta[2] - truth.baseline) / sd[2]
    assert abs(z_base.mean()) < 0.05 and abs(z_base.std() - 1) < 0.05


def test_synthetic_cifti_cortex_is_the_gifti_runs(surface_bids):
    truth = surface_bids.surface
    files = truth.runs[1]
    gifti = np.hstack([nib.load(files.gifti[p]).agg_data().T for p in ("left", "right")])
    cifti = np.asarray(nib.load(files.cifti).dataobj)
    n_left = 10242
    index = np.concatenate([truth.cifti_vertices["left"], n_left + truth.cifti_vertices["right"]])
    assert np.array_equal(cifti[:, :len(index)], gifti[:, index])
    assert cifti.shape[1] == len(truth.brain_models) == len(index) + 16
    assert np.array_equal(truth.cifti_betas["a"][:len(index)], truth.betas["a"][index])


def test_synthetic_surface_is_deterministic_and_leaves_the_volumes_unchanged(tmp_path, surface_bids):
    again = make_synthetic_bids(tmp_path, n_subjects=1, n_runs=2, surface=True)
    plain = make_synthetic_bids(tmp_path / "plain", n_subjects=1, n_runs=2)
    for ours, theirs, volume in zip(again.surface.runs, surface_bids.surface.runs, plain.runs):
        assert ours.cifti.read_bytes() == theirs.cifti.read_bytes()
        assert ours.gifti["left"].read_bytes() == theirs.gifti["left"].read_bytes()
    assert again.runs[0].bold_path.read_bytes() == plain.runs[0].bold_path.read_bytes()


def test_conversion_is_resumable_and_recorded(tmp_path, fsaverage5):
    """Converting the same runs again skips them; another source under a node's name is refused
    (nothing written) unless overwrite; each conversion that wrote is in the store's provenance."""
    store = tmp_path / "s.zarr"
    image = _image(fsaverage5, 4)
    convert_surface_runs(image, store, names=["r"], t_r=2.0)
    first = open_cohort(store).runs["r"].attrs["chunkglm"]["written"]
    convert_surface_runs(image, store, names=["r"], t_r=2.0)
    cohort = open_cohort(store)
    assert cohort.runs["r"].attrs["chunkglm"]["written"] == first
    records = cohort.attrs["provenance"]
    assert len(records) == 1 and records[0]["operation"] == "convert"
    assert records[0]["inputs"][0]["node"] == "runs/r" and len(records[0]["inputs"][0]["sha256"]) == 64
    other = _image(fsaverage5, 4, seed=5)
    with pytest.raises(InputError, match="already has a complete runs/r"):
        convert_surface_runs(other, store, names=["r"], t_r=2.0)
    assert np.array_equal(open_cohort(store).runs["r"].to_surface_image().data.parts["left"],
                          image.data.parts["left"])
    convert_surface_runs(other, store, names=["r"], t_r=2.0, overwrite=True)
    cohort = open_cohort(store)
    assert np.array_equal(cohort.runs["r"].to_surface_image().data.parts["left"], other.data.parts["left"])
    assert len(cohort.attrs["provenance"]) == 2
    with pytest.raises(InputError, match="not a voxel grid: write it back with to_surface_image"):
        cohort.runs["r"].to_nifti()


def test_surface_maps_round_trip(tmp_path, fsaverage5):
    from chunkglm.io.surface_maps import convert_surface_maps

    rng = np.random.default_rng(3)
    one_each = [SurfaceImage(fsaverage5, {p: rng.standard_normal(10242).astype(np.float32) for p in ("left", "right")})
                for _ in range(3)]
    two_more = _image(fsaverage5, 2, seed=4)  # a 2-D image: one map per column
    before = [img.shape for img in one_each]
    convert_surface_maps([*one_each, two_more], tmp_path / "s.zarr", "effects", chunk_bytes=5 * 4 * 3000,
                         coords={"subject": ["01", "02", "03", "04", "05"]})
    assert [img.shape for img in one_each] == before  # the inputs are left as they were
    node = open_cohort(tmp_path / "s.zarr").maps["effects"]
    data = node.to_dataset()
    assert data["effect"].dims == ("image", "voxel") and data["effect"].data.numblocks[1] > 1
    assert list(data["subject"].values) == ["01", "02", "03", "04", "05"] and "hemi" in data.coords
    back = node.to_surface_image()
    assert back.shape == (20484, 5)
    for column, img in enumerate(one_each):
        assert np.array_equal(back.data.parts["right"][:, column], img.data.parts["right"])
    assert np.array_equal(back.data.parts["left"][:, 3:], two_more.data.parts["left"])


def test_cifti_dscalar_maps_round_trip(tmp_path, surface_bids):
    from nibabel.cifti2 import Cifti2Header, Cifti2Image, ScalarAxis

    from chunkglm.io.surface_maps import convert_surface_maps

    truth = surface_bids.surface
    betas = np.vstack([truth.cifti_betas[c] for c in ("a", "b")]).astype(np.float32)
    header = Cifti2Header.from_axes((ScalarAxis(["beta_a", "beta_b"]), truth.brain_models))
    Cifti2Image(betas, header).to_filename(str(tmp_path / "betas.dscalar.nii"))
    convert_surface_maps(tmp_path / "betas.dscalar.nii", tmp_path / "s.zarr", "truth")
    node = open_cohort(tmp_path / "s.zarr").maps["truth"]
    assert list(node.to_dataset()["image"].values) == ["beta_a", "beta_b"]  # the file's map names
    back = node.to_cifti(tmp_path / "back.dscalar.nii")
    assert np.array_equal(np.asarray(back.dataobj), betas)
    written = nib.load(tmp_path / "back.dscalar.nii")
    assert written.header.get_axis(0) == header.get_axis(0) and written.header.get_axis(1) == truth.brain_models
    with pytest.raises(InputError, match=r"\.dscalar\.nii paths or nibabel Cifti2Images\); received PosixPath"):
        convert_surface_maps(truth.runs[0].cifti, tmp_path / "s.zarr", "wrong")
    (tmp_path / "series.dscalar.nii").write_bytes(truth.runs[0].cifti.read_bytes())  # misnamed
    with pytest.raises(InputError, match="not a CIFTI-2 dense scalar file"):
        convert_surface_maps(tmp_path / "series.dscalar.nii", tmp_path / "s.zarr", "wrong")


def test_surface_maps_refusals(tmp_path, fsaverage5):
    from chunkglm.io.surface_maps import convert_surface_maps

    image = _image(fsaverage5, 2)
    with pytest.raises(InputError, match="one value per map"):
        convert_surface_maps(image, tmp_path / "s.zarr", "m", coords={"subject": ["01"]})
    with pytest.raises(InputError, match="coords takes"):
        convert_surface_maps(image, tmp_path / "s.zarr", "m", coords={"age": [1, 2]})
    with pytest.raises(InputError, match="name each of the 2 maps once"):
        convert_surface_maps(image, tmp_path / "s.zarr", "m", ids=["x", "x"])
    left = _image(fsaverage5, 1, parts=("left",))
    with pytest.raises(InputError, match="share one grid"):
        convert_surface_maps([image, left], tmp_path / "s.zarr", "m")
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("cifti", [False, True])
def test_fmriprep_surface_outputs_from_a_bids_folder(tmp_path, surface_bids, cifti):
    """fMRIPrep's GIFTI pairs (or CIFTI series) found in a BIDS folder, converted with each run's
    entities, events, confounds and sidecar timing (StartTime / TR = slice_time_ref)."""
    from chunkglm.io.surface_convert import convert_surface_bids

    names = convert_surface_bids(surface_bids.root, tmp_path / "s.zarr", space="fsaverage5", cifti=cifti)
    assert names == [r.name for r in surface_bids.runs]
    cohort = open_cohort(tmp_path / "s.zarr")
    node = cohort.select(sub="01", run=2)[0]
    run = surface_bids.runs[1]
    assert node.grid.kind == ("cifti" if cifti else "mesh")
    assert node.attrs["RepetitionTime"] == surface_bids.tr and node.attrs["slice_time_ref"] == 0.5
    assert node.entities == {"sub": "01", "task": "main", "run": "2", "space": "fsaverage5"}
    pd = pytest.importorskip("pandas")
    assert node.events[["onset", "duration"]].equals(pd.read_csv(run.events_path, sep="\t")[["onset", "duration"]])
    assert node.confounds.shape == (surface_bids.n_volumes, len(pd.read_csv(run.confounds_path, sep="\t").columns))
    with pytest.raises(InputError, match="no surface run"):
        convert_surface_bids(surface_bids.root, tmp_path / "t.zarr", space="fsaverage6")


def test_gifti_runs_converted_one_at_a_time(tmp_path, surface_bids):
    """GIFTI runs are read while being written, one at a time (nibabel parses a file whole): a run
    on another grid met on the way is refused by name, the runs before it stay complete, and the
    conversion run again skips them."""
    pairs = [files.gifti for files in surface_bids.surface.runs]
    store = tmp_path / "s.zarr"
    with pytest.raises(InputError, match="surface run 1 has mesh parts"):
        convert_surface_runs([pairs[0], {"left": pairs[1]["left"]}], store, names=["a", "b"], mesh="fsaverage5")
    cohort = open_cohort(store)
    assert sorted(cohort.runs) == ["a"] and not cohort.incomplete
    written = cohort.runs["a"].attrs["chunkglm"]["written"]
    convert_surface_runs(pairs, store, names=["a", "b"], mesh="fsaverage5")
    cohort = open_cohort(store)
    assert cohort.runs["a"].attrs["chunkglm"]["written"] == written and sorted(cohort.runs) == ["a", "b"]


def test_gifti_runs_converted_on_a_cluster(tmp_path, surface_bids):
    """With a dask cluster, one task per GIFTI run (each worker reads its own files); a run that fails
    does so alone (ConversionError naming it), the others are written, equal to a conversion in this
    process."""
    from distributed import Client, LocalCluster

    from chunkglm.errors import ConversionError

    pairs = [files.gifti for files in surface_bids.surface.runs]
    convert_surface_runs(pairs, tmp_path / "here.zarr", names=["a", "b"], mesh="fsaverage5")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        with pytest.raises(ConversionError, match=r"runs/c: InputError: surface run 2 has mesh parts") as err:
            convert_surface_runs([*pairs, {"left": pairs[0]["left"]}], tmp_path / "there.zarr",
                                 names=["a", "b", "c"], mesh="fsaverage5", client=client)
    assert set(err.value.failures) == {"c"}
    here, there = open_cohort(tmp_path / "here.zarr"), open_cohort(tmp_path / "there.zarr")
    assert sorted(there.runs) == ["a", "b"] and not there.incomplete
    for name in ("a", "b"):
        assert np.array_equal(there.runs[name].data().values, here.runs[name].data().values)
    assert len(there.attrs["provenance"]) == 1  # the runs written are recorded
