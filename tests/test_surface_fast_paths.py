"""The shortcuts the surface paths take past nibabel's slow steps give nibabel's results.

- ``cifti_header`` / ``cifti_image``: a header built from the brain-model arrays
  equal to ``Cifti2Header.from_axes`` (its own index lists), an image equal (values,
  CIFTI and NIfTI headers, written file) to ``Cifti2Image(rows, header)``;
- CIFTI grids: nibabel's axis built only when asked, grid ids unchanged;
- GIFTI runs read into one (time, vertex) array: the values nibabel parses, in
  the grid's order, for one data array per volume and one 2-D array;
- ``_structures``: nibabel's ``iter_structures`` names and counts;
- ``any_finite``: ``np.isfinite(rows).any()``.
"""

from __future__ import annotations

import gc
import re
import warnings

import nibabel as nib
import numpy as np
import pytest
from nibabel.cifti2 import BrainModelAxis, Cifti2Header, Cifti2Image, ScalarAxis, SeriesAxis
from nilearn.surface import InMemoryMesh, PolyMesh

from chunkglm.errors import InputError
from chunkglm.io.surface import BrainModels, cifti_header, cifti_image, gifti_image
from chunkglm.io.surface_convert import any_finite, convert_surface_runs, from_gifti, to_cifti


def _axis():
    left = np.zeros(40, dtype=bool)
    left[::3] = True
    block = np.zeros((3, 4, 2), dtype=bool)
    block[1:, 1:3] = True
    return (BrainModelAxis.from_mask(left, "CortexLeft") + BrainModelAxis.from_mask(~left, "CortexRight")
            + BrainModelAxis.from_mask(block, "ThalamusLeft", affine=np.diag([2.0, 2.0, 2.0, 1.0])))


def _split_axis():
    """_axis() and a second run of CortexLeft after the voxels (two BrainModels of one structure)."""
    left = np.zeros(40, dtype=bool)
    left[1::3] = True
    return _axis() + BrainModelAxis.from_mask(left, "CortexLeft")


def _arrays(axis) -> BrainModels:
    """The axis as arrays only (no nibabel axis kept): what read_grid gives."""
    return BrainModels(np.asarray(axis.name), axis.vertex, axis.voxel, axis.affine, axis.volume_shape,
                       dict(axis.nvertices))


@pytest.mark.parametrize("make", [_axis, _split_axis, lambda: _axis()[:27], lambda: _axis()[27:]],
                         ids=["cortex+voxels", "split-structure", "surface-only", "voxels-only"])
def test_cifti_header_and_image_equal_nibabels(tmp_path, make):
    axis = make()
    first = ScalarAxis(["z", "t"])
    want_header = Cifti2Header.from_axes((first, axis))
    rows = np.random.default_rng(0).standard_normal((2, len(axis)))
    for models in (_arrays(axis), BrainModels.from_axis(axis)):
        header = cifti_header(first, models)
        assert header.to_xml() == want_header.to_xml()
        assert header.get_axis(1) == axis and header.get_axis(0) == first
        want = Cifti2Image(rows, want_header)  # fresh: writing a Cifti2Image sets its NIfTI intent
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nibabel warns when a header does not fit the data
            got = cifti_image(rows, header)
        assert got.header is header and got.header.to_xml() == want.header.to_xml()
        assert got.nifti_header.binaryblock == want.nifti_header.binaryblock
        assert np.array_equal(np.asarray(got.dataobj), rows) and got.shape == want.shape
        want.to_filename(tmp_path / "want.dscalar.nii")
        got.to_filename(tmp_path / "got.dscalar.nii")
        assert (tmp_path / "got.dscalar.nii").read_bytes() == (tmp_path / "want.dscalar.nii").read_bytes()
    models = _arrays(axis)
    one, other = cifti_header(first, models), cifti_header(first, models)
    model = next(iter(one.matrix.get_index_map(1).brain_models))
    indices = model.vertex_indices if model.vertex_indices is not None else model.voxel_indices_ijk
    indices[0] = 39 if model.vertex_indices is not None else [9, 9, 9]  # each header its own lists
    assert other.to_xml() == want_header.to_xml() and models.axis == axis
    assert gc.isenabled()  # the collector paused while building is on again


def test_cifti_grid_keeps_its_id_and_builds_nibabels_axis_only_when_asked(tmp_path):
    """A CIFTI grid read back from the store holds arrays, nibabel's axis built on first use and
    equal to the converted one; grid ids are those chunkglm gave before BrainModels (pinned: stores
    converted earlier keep their grid and runs)."""
    from chunkglm.io.cohort import open_cohort
    from chunkglm.io.surface import SurfaceGrid

    for axis, pinned in ((_axis(), "fsLR_759849927078"), (_split_axis(), "fsLR_9ea9a6a60556")):
        grid = SurfaceGrid("cifti", (("x", len(axis)),), np.arange(len(axis)) % 4 != 0, "fsLR", {},
                           BrainModels.from_axis(axis))
        assert grid.grid_id == pinned and grid.brain_models is axis
    values = np.random.default_rng(5).standard_normal((3, len(axis))).astype(np.float32)
    path = tmp_path / "run.dtseries.nii"
    Cifti2Image(values, Cifti2Header.from_axes((SeriesAxis(0.0, 2.0, 3), axis))).to_filename(path)
    convert_surface_runs(str(path), tmp_path / "s.zarr", space="fsLR")
    node = next(iter(open_cohort(tmp_path / "s.zarr").runs.values()))
    read = node.grid
    assert "axis" not in vars(read.cifti) and read.parts == _nibabel_structures(axis)
    assert read.brain_models == axis and read.grid_id == node.attrs["grid_id"]
    stored = node.cohort.root[f"grids/{read.grid_id}"]["cifti_structure"][...]  # names read off the parts
    assert [str(name) for name in stored] == list(read.cifti.structure)
    assert np.array_equal(to_cifti(node).dataobj, values)
    with pytest.raises(InputError, match="received BrainModelAxis"):
        SurfaceGrid("cifti", (("x", len(axis)),), np.ones(len(axis), dtype=bool), "fsLR", {}, axis)


def _mesh(n_left, n_right):
    faces = np.array([[0, 1, 2]])
    return PolyMesh(left=InMemoryMesh(np.zeros((n_left, 3)), faces), right=InMemoryMesh(np.zeros((n_right, 3)), faces))


def test_gifti_rows_written_once_as_nibabel_parses_them(tmp_path):
    rng = np.random.default_rng(1)
    left, right = rng.standard_normal((5, 7)).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32)
    pair = {"left": tmp_path / "hemi-L.func.gii", "right": tmp_path / "hemi-R.func.gii"}
    nib.save(gifti_image(left), pair["left"])  # one data array per volume, as fMRIPrep writes
    nib.save(nib.gifti.GiftiImage(darrays=[nib.gifti.GiftiDataArray(np.ascontiguousarray(right.T))]),
             pair["right"])  # one (vertex, time) array
    run = from_gifti(pair, _mesh(7, 4), "")
    assert run.by_time and run.n_time == 5
    assert np.array_equal(run.rows(0, 5, run.grid.flat_index), np.hstack([left, right]))
    assert np.array_equal(run.rows(1, 3, np.array([0, 8])), np.hstack([left, right])[1:3, [0, 8]])
    with pytest.raises(InputError, match=r"have \{'left': 7\} vertices; the mesh has"):
        from_gifti(pair, _mesh(8, 4), "")
    nib.save(gifti_image(right[:3]), pair["right"])
    with pytest.raises(InputError, match=r"different numbers of volumes \[5, 3\]"):
        from_gifti(pair, _mesh(7, 4), "")


def _nibabel_structures(axis) -> tuple:
    return tuple((str(name), len(range(*sl.indices(len(axis))))) for name, sl, _ in axis.iter_structures())


def test_structures_and_any_finite_as_nibabel_and_numpy():
    for axis in (_axis(), _split_axis()):
        for models in (_arrays(axis), BrainModels.from_axis(axis)):
            assert tuple((n, b - a) for n, a, b in models.structures) == _nibabel_structures(axis)
    rows = np.full((4, 6), np.nan, dtype=np.float32)
    assert not any_finite(rows)
    rows[3, 5] = 1.0
    assert any_finite(rows)
    rows[3, 5] = np.inf
    assert not any_finite(rows)


@pytest.mark.parametrize("signal_scaling", [0, 1, (0, 1)])
def test_scaled_block_as_the_expression_it_replaces(signal_scaling):
    """scaled_block's in-place arithmetic gives the bits of nilearn's ``100 * (Y / mean - 1)``."""
    from chunkglm.kernels.glm import scaled_block

    rng = np.random.default_rng(2)
    block = (rng.standard_normal((50, 700)) * 40 + 600).astype(np.float32)
    block[:, 3] = 0.2  # a mean below 1: nilearn divides by 1
    if signal_scaling == 0:
        want, grand = 100 * (block / np.maximum(block.mean(axis=0), 1) - 1), None
    elif signal_scaling == 1:
        grand = block.mean(axis=1, dtype=np.float64)
        want = 100 * (block / grand[:, None] - 1)
    else:
        grand = np.float64(block.mean(dtype=np.float64))
        want = 100 * (block / max(grand, 1.0) - 1)
    got = scaled_block(block, signal_scaling, grand)
    assert got.dtype == want.dtype and np.array_equal(got, want)


def _brain_model_xml(axis) -> bytes:
    """The brain-model MatrixIndicesMap element nibabel writes for ``axis``."""
    from xml.etree import ElementTree

    return ElementTree.tostring(axis.to_mapping(1)._to_xml_element())


@pytest.mark.parametrize("make", [_axis, _split_axis, lambda: _axis()[:27], lambda: _axis()[27:]],
                         ids=["cortex+voxels", "split-structure", "surface-only", "voxels-only"])
def test_brain_models_from_xml_as_nibabels_axis(make):
    axis = make()
    models = BrainModels.from_xml(_brain_model_xml(axis))
    assert "axis" not in vars(models) and models.axis == axis
    assert np.array_equal(models.structure, axis.name) and models.nvertices == axis.nvertices
    assert np.array_equal(models.vertex, axis.vertex) and np.array_equal(models.ijk, axis.voxel)
    assert (models.affine is None) == (axis.affine is None) and models.volume_shape == axis.volume_shape


def test_brain_models_from_xml_refuses_what_nibabels_axis_refuses():
    xml = _brain_model_xml(_axis())
    for bad, why in ((xml.replace(b"CIFTI_STRUCTURE_THALAMUS_LEFT", b"CIFTI_STRUCTURE_NOWHERE"), "not CIFTI-2 names"),
                     (xml[:xml.index(b"<Volume")] + xml[xml.index(b"</Volume>") + 9:], "no Volume element"),
                     (xml.replace(b'IndexCount="14"', b'IndexCount="15"'), "could not broadcast|IndexOffset"),
                     (xml.replace(b"<VertexIndices>0 ", b"<VertexIndices>-1 "), "undefined vertex"),
                     (re.sub(rb"(<TransformationMatrixVoxelIndicesIJKtoXYZ[^>]*>)[^<]*", rb"\1", xml), "reshape")):
        assert bad != xml
        with pytest.raises(ValueError, match=why):
            BrainModels.from_xml(bad)


def test_read_cifti_leaves_to_nibabel_what_from_xml_does_not_read(tmp_path):
    """A brain-model element BrainModels.from_xml refuses is parsed by nibabel: its error, or its
    axis when it reads it."""
    from nibabel.cifti2 import Cifti2HeaderError

    from chunkglm.io.surface_convert import read_cifti

    axis = _axis()
    Cifti2Image(np.ones((1, len(axis)), "f4"), Cifti2Header.from_axes((ScalarAxis(["x"]), axis))).to_filename(
        tmp_path / "m.dscalar.nii")
    raw = (tmp_path / "m.dscalar.nii").read_bytes()
    name, other = b"CIFTI_STRUCTURE_THALAMUS_LEFT", b"CIFTI_STRUCTURE_THALAMUS_XXXX"  # same length: offsets hold
    (tmp_path / "bad.dscalar.nii").write_bytes(raw.replace(name, other))
    with pytest.raises(Cifti2HeaderError, match="BrainStructure for this BrainModel element is not valid"):
        read_cifti(tmp_path / "bad.dscalar.nii")


def test_cifti_run_rows_read_from_the_file_as_nibabel_reads_them(tmp_path, monkeypatch):
    """A whole CIFTI run is read from its file by element blocks (5 elements here), into the
    (time, element) rows nibabel gives; time slabs, element subsets, float64 files go through
    nibabel's proxy; a truncated file gets nibabel's error."""
    from chunkglm.io import surface_convert
    from chunkglm.io.surface_convert import _read_transposed, from_cifti

    monkeypatch.setattr(surface_convert, "READ_BLOCK_BYTES", 4 * 7 * 5)
    axis = _axis()
    values = np.random.default_rng(6).standard_normal((7, len(axis))).astype(np.float32)
    for dtype in (np.float32, np.float64):
        path = tmp_path / f"{np.dtype(dtype).name}.dtseries.nii"
        Cifti2Image(values.astype(dtype), Cifti2Header.from_axes((SeriesAxis(0.0, 2.0, 7), axis))).to_filename(path)
        run = from_cifti(path, "")
        out = np.full(values.shape, np.nan, dtype=np.float32)
        assert _read_transposed(run.values, out) == (dtype == np.float32)
        run.fill(out, 0, 7, run.grid.flat_index)
        assert np.array_equal(out, values)
        slab = np.empty((3, len(axis)), dtype=np.float32)
        run.fill(slab, 2, 5, run.grid.flat_index)
        assert np.array_equal(slab, values[2:5])
        some = np.array([0, 4, 40])
        run.fill(slab[:, :3], 2, 5, some)
        assert np.array_equal(slab[:, :3], values[2:5][:, some])
    path = tmp_path / "float32.dtseries.nii"
    path.write_bytes(path.read_bytes()[:-100])
    run = from_cifti(path, "")
    with pytest.raises(OSError, match="buffer is smaller|Expected"):
        run.fill(np.empty(values.shape, dtype=np.float32), 0, 7, run.grid.flat_index)


@pytest.mark.parametrize("make", [_axis, _split_axis, lambda: _axis()[27:]], ids=["cortex+voxels", "split", "voxels"])
def test_read_cifti_as_nib_load(tmp_path, make):
    """read_cifti's axes and values are nib.load's, for a dense series and a dense scalar file;
    cifti_shape reads the NIfTI-2 header's; a file that is no NIfTI-2 is one line."""
    from chunkglm.io.surface_convert import cifti_shape, read_cifti

    axis = make()
    values = np.random.default_rng(3).standard_normal((6, len(axis))).astype(np.float32)
    for first, name in ((SeriesAxis(0.0, 2.0, 6), "run.dtseries.nii"), (ScalarAxis(list("abcdef")), "m.dscalar.nii")):
        Cifti2Image(values, Cifti2Header.from_axes((first, axis))).to_filename(tmp_path / name)
        axes, dataobj = read_cifti(tmp_path / name)
        img = nib.load(tmp_path / name)
        assert axes == [img.header.get_axis(0), img.header.get_axis(1)]
        assert np.array_equal(np.asarray(dataobj[2:5]), np.asarray(img.dataobj[2:5]))
        assert cifti_shape(tmp_path / name) == (6, len(axis))
    (tmp_path / "text.dscalar.nii").write_text("not an image")
    with pytest.raises(InputError, match="is not a CIFTI-2 file"):
        read_cifti(tmp_path / "text.dscalar.nii")


def test_read_cifti_reuses_a_brain_model_axis_parsed_before(tmp_path):
    """Map files on one brain-model axis: the second file's axis is the first's object (its XML
    element byte-identical), its own map names parsed; a file on another axis gets its own."""
    from chunkglm.io.surface_convert import read_cifti

    axis = _axis()
    values = np.ones((1, len(axis)), dtype=np.float32)
    for name in ("sub-01", "sub-02"):
        Cifti2Image(values, Cifti2Header.from_axes((ScalarAxis([name]), axis))).to_filename(tmp_path / f"{name}.dscalar.nii")
    other = axis[:-3]
    Cifti2Image(values[:, :-3], Cifti2Header.from_axes((ScalarAxis(["x"]), other))).to_filename(tmp_path / "o.dscalar.nii")
    first, second, third = (read_cifti(tmp_path / f)[0] for f in ("sub-01.dscalar.nii", "sub-02.dscalar.nii",
                                                                   "o.dscalar.nii"))
    assert second[1] is first[1] and second[1] == axis and list(second[0].name) == ["sub-02"]
    assert list(first[0].name) == ["sub-01"]
    assert third[1] is not first[1] and third[1] == other and third[0] == nib.load(tmp_path / "o.dscalar.nii").header.get_axis(0)


@pytest.mark.parametrize("task_memory", [None, 600])  # 600 B: one-row slabs (the maps are 1,280 B)
def test_surface_maps_written_file_by_file(tmp_path, task_memory):
    """convert_surface_maps reads each CIFTI file when its rows are reached (row slabs cross the
    files' boundaries when the maps exceed the task memory): the node holds the files' maps in
    order, on a mask too."""
    from chunkglm.io.cohort import open_cohort
    from chunkglm.io.surface_maps import convert_surface_maps

    axis = _axis()
    rng = np.random.default_rng(4)
    counts = [1, 2, 1, 3, 1, 2]
    blocks = [rng.standard_normal((n, len(axis))).astype(np.float32) for n in counts]
    paths = []
    for i, block in enumerate(blocks):
        paths.append(tmp_path / f"m{i}.dscalar.nii")
        names = [f"s{i}-{j}" for j in range(len(block))]
        Cifti2Image(block, Cifti2Header.from_axes((ScalarAxis(names), axis))).to_filename(paths[-1])
    mask = np.arange(len(axis)) % 3 != 0
    sizes = {} if task_memory is None else {"task_memory": task_memory, "chunk_bytes": 256}
    convert_surface_maps(paths, tmp_path / "s.zarr", "m", mask=mask, **sizes)
    node = open_cohort(tmp_path / "s.zarr").maps["m"]
    assert np.array_equal(node.data().values, np.vstack(blocks)[:, mask])
    assert list(node.to_dataset()["image"].values) == [f"s{i}-{j}" for i, n in enumerate(counts) for j in range(n)]
