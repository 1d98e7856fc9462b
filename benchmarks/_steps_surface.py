"""Steps of the ``surface_first_level`` case (issue 20), run as ``python _steps_surface.py <step> '<json>'``.

They register in :data:`_steps.STEPS` and use its protocol (``Timed``, the
``BENCH-RESULT`` line): everything before ``with timed:`` is set-up. Inputs:

- ``gifti``: an fsaverage5 run as fMRIPrep writes it, ``..._hemi-L/R_space-fsaverage5_bold.func.gii``
  (one float32 data array per volume) on the mesh nilearn ships;
- ``cifti``: an fsLR 91k-like dense series ``..._space-fsLR_den-91k_bold.dtseries.nii`` whose brain
  models are synthesised: 29,696 + 29,716 cortex vertices of 32,492 per hemisphere (the counts of
  fsLR 32k without the medial wall) and 31,870 subcortical voxels in two structures of a 2 mm
  MNI grid (91,282 grayordinates, as HCP's).

nilearn has no CIFTI reader: its side reads the dtseries with nibabel and fits a SurfaceImage
holding the same 91,282 values, on a mesh of two parts (left cortex; right cortex + subcortical
voxels) with the same numbers of elements (its GLM does not use the geometry).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import _steps
from _steps import CONTRAST, GLM_PARAMS, step

N_VOLUMES = 300
TR = GLM_PARAMS["t_r"]
#: fsLR 32k: vertices per hemisphere, cortex vertices kept (medial wall out), subcortical voxels.
FSLR_NVERTEX = 32492
FSLR_CORTEX = {"CIFTI_STRUCTURE_CORTEX_LEFT": 29696, "CIFTI_STRUCTURE_CORTEX_RIGHT": 29716}
FSLR_SUBCORTICAL = 31870
MNI_2MM_SHAPE = (91, 109, 91)
MNI_2MM_AFFINE = [[-2, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1]]


def _events():
    """Blocks of a and b (10 s each, one every 20 s, alternating) over the run."""
    import pandas as pd

    onsets = list(range(10, int(N_VOLUMES * TR) - 20, 20))
    return pd.DataFrame({"onset": onsets, "duration": 10.0,
                         "trial_type": ["a" if i % 2 == 0 else "b" for i in range(len(onsets))]})


def _signal(n_elements, seed):
    """(time, element) float32: baseline + a/b effects on a tenth of the elements + AR(1) noise."""
    import numpy as np
    from nilearn.glm.first_level import make_first_level_design_matrix

    rng = np.random.default_rng(seed)
    frames = (np.arange(N_VOLUMES) + GLM_PARAMS["slice_time_ref"]) * TR
    design = make_first_level_design_matrix(frames, _events(), drift_model=None)[["a", "b"]].to_numpy()
    active = rng.random(n_elements) < 0.1
    betas = rng.normal(0, 8, (2, n_elements)) * active
    y = 800 + 200 * rng.random(n_elements, dtype=np.float32) + design @ betas
    eps = rng.normal(0, 10, n_elements)
    for t in range(N_VOLUMES):  # AR(1), rho 0.3, stationary sd 10
        eps = 0.3 * eps + np.sqrt(1 - 0.09) * rng.normal(0, 10, n_elements) if t else eps
        y[t] += eps
    return y.astype(np.float32)


@step("surface_data")
def surface_data(timed, folder):
    """Write both runs (and their events) into ``folder`` unless there; returns their paths (untimed)."""
    import nibabel as nib
    import numpy as np
    from nibabel.cifti2 import Cifti2Header, Cifti2Image, SeriesAxis
    from nibabel.gifti import GiftiDataArray, GiftiImage
    from nilearn.datasets import load_fsaverage

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    paths = {"events": str(root / "sub-01_task-main_events.tsv"),
             "left": str(root / "sub-01_task-main_hemi-L_space-fsaverage5_bold.func.gii"),
             "right": str(root / "sub-01_task-main_hemi-R_space-fsaverage5_bold.func.gii"),
             "cifti": str(root / "sub-01_task-main_space-fsLR_den-91k_bold.dtseries.nii")}
    with timed:
        if not Path(paths["events"]).is_file():
            _events().to_csv(paths["events"], sep="\t", index=False)
        mesh = load_fsaverage("fsaverage5")["pial"]
        sizes = {part: mesh.parts[part].n_vertices for part in ("left", "right")}
        if not Path(paths["right"]).is_file():
            values = _signal(sum(sizes.values()), 0)
            for part, start, stop in (("left", 0, sizes["left"]), ("right", sizes["left"], None)):
                meta = {"TimeStep": f"{TR * 1000:g}"}
                arrays = [GiftiDataArray(np.ascontiguousarray(row[start:stop]), intent="NIFTI_INTENT_TIME_SERIES",
                                         datatype="NIFTI_TYPE_FLOAT32", meta=meta) for row in values]
                nib.save(GiftiImage(darrays=arrays), paths[part])
        if not Path(paths["cifti"]).is_file():
            axis = _fslr_axis(np.random.default_rng(1))
            values = _signal(len(axis), 2)
            header = Cifti2Header.from_axes((SeriesAxis(0.0, TR, N_VOLUMES, "SECOND"), axis))
            Cifti2Image(values, header).to_filename(paths["cifti"])
    return {"paths": paths, "gifti_vertices": sizes}


def _fslr_axis(rng):
    """A 91k-like brain-model axis: the cortex vertex counts of fsLR 32k, 31,870 voxels in two structures."""
    import numpy as np
    from nibabel.cifti2 import BrainModelAxis

    axis = None
    for name, count in FSLR_CORTEX.items():
        vertices = np.sort(rng.choice(FSLR_NVERTEX, count, replace=False))
        part = BrainModelAxis.from_surface(vertices, FSLR_NVERTEX, name)
        axis = part if axis is None else axis + part
    ijk = np.indices(MNI_2MM_SHAPE).reshape(3, -1).T
    centre = np.array([45, 60, 36])
    distance = np.linalg.norm((ijk - centre) / [1.0, 1.3, 0.9], axis=1)
    chosen = ijk[np.argsort(distance, kind="stable")[:FSLR_SUBCORTICAL]]
    for name, side in (("CIFTI_STRUCTURE_THALAMUS_LEFT", chosen[:, 0] >= 45),
                       ("CIFTI_STRUCTURE_THALAMUS_RIGHT", chosen[:, 0] < 45)):
        mask = np.zeros(MNI_2MM_SHAPE, dtype=bool)
        mask[tuple(chosen[side].T)] = True
        axis = axis + BrainModelAxis.from_mask(mask, name, np.array(MNI_2MM_AFFINE, dtype=float))
    return axis


@step("surface_floor")
def surface_floor(timed, paths, kind):
    """Read the input once: the GIFTI pair parsed by nibabel (data arrays decoded), or the dtseries' values."""
    import nibabel as nib
    import numpy as np

    with timed:
        if kind == "gifti":
            total = sum(sum(d.data.size for d in nib.load(paths[p]).darrays) for p in ("left", "right"))
        else:
            total = np.asarray(nib.load(paths["cifti"]).dataobj).size
    return {"values": int(total)}


def _nilearn_image(paths, kind, mesh):
    """The run as nilearn holds it: a SurfaceImage from the GIFTI files (nilearn reads them), or from the
    dtseries' values (nibabel) on a two-part mesh of the same sizes."""
    import nibabel as nib
    import numpy as np
    from nilearn.surface import SurfaceImage

    if kind == "gifti":
        return SurfaceImage(mesh, {"left": paths["left"], "right": paths["right"]})
    values = np.asarray(nib.load(paths["cifti"]).dataobj)  # (time, grayordinates)
    n_left = mesh.parts["left"].n_vertices
    return SurfaceImage(mesh, {"left": values[:, :n_left].T, "right": values[:, n_left:].T})


def _mesh(paths, kind):
    """Set-up: fsaverage5 (nilearn's), or a placeholder two-part mesh for the CIFTI values."""
    import nibabel as nib
    import numpy as np
    from nilearn.surface import InMemoryMesh, PolyMesh

    if kind == "gifti":
        from nilearn.datasets import load_fsaverage

        return load_fsaverage("fsaverage5")["pial"]
    n = nib.load(paths["cifti"]).shape[1]
    n_left = FSLR_CORTEX["CIFTI_STRUCTURE_CORTEX_LEFT"]
    faces = np.array([[0, 1, 2]])
    return PolyMesh(left=InMemoryMesh(np.zeros((n_left, 3)), faces),
                    right=InMemoryMesh(np.zeros((n - n_left, 3)), faces))


def _flat(image):
    """All elements of a map, in file order (left, right; CIFTI: brain-model order)."""
    import numpy as np

    if hasattr(image, "data") and hasattr(image.data, "parts"):
        return np.concatenate([np.asarray(image.data.parts[p]).ravel() for p in ("left", "right")])
    return np.asarray(image.get_fdata()).ravel()


def _save(maps, out, label) -> dict:
    import numpy as np

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    saved = {}
    for name in ("z_score", "effect_size"):
        path = folder / f"{label}_{name}.npy"
        np.save(path, _flat(maps[name]).astype(np.float64))
        saved[name] = str(path)
    return saved


@step("surface_glm_nilearn")
def surface_glm_nilearn(timed, paths, kind, out):
    """nilearn's FirstLevelModel: the run read into a SurfaceImage, fit, compute_contrast(all)."""
    import pandas as pd
    from nilearn.glm.first_level import FirstLevelModel

    mesh = _mesh(paths, kind)
    events = pd.read_csv(paths["events"], sep="\t")
    model = FirstLevelModel(**GLM_PARAMS)
    with timed:
        model.fit(_nilearn_image(paths, kind, mesh), events=events)
        maps = model.compute_contrast(CONTRAST, output_type="all")
    return {"maps": _save(maps, out, f"nilearn_{kind}"), "design_columns": list(model.design_matrices_[0].columns)}


@step("surface_glm_chunkglm")
def surface_glm_chunkglm(timed, paths, kind, store, out, label, convert=False):
    """chunkglm's FirstLevelModel on the store run, fit + compute_contrast(all); ``convert``: the files
    are converted into a fresh ``store`` inside the timed work (``chunkglm.convert``, this process)."""
    import pandas as pd

    _steps._import_convert_dependencies()
    import dask.array  # noqa: F401
    import nilearn.glm.contrasts  # noqa: F401
    import xarray  # noqa: F401

    from chunkglm.glm.first_level import FirstLevelModel
    from chunkglm.io.cohort import open_cohort
    from chunkglm.io.convert import convert as chunkglm_convert

    files = [paths["left"], paths["right"]] if kind == "gifti" else [paths["cifti"]]
    events = pd.read_csv(paths["events"], sep="\t")
    model = FirstLevelModel(**GLM_PARAMS)
    if convert:
        shutil.rmtree(store, ignore_errors=True)
    opened = time.perf_counter()
    with timed:
        if convert:
            chunkglm_convert(files, store, client=None)
        cohort = open_cohort(store)
        (run,) = cohort.runs.values()
        model.fit(run, events=events)
        maps = model.compute_contrast(CONTRAST, output_type="all")
    return {"maps": _save(maps, out, label), "design_columns": list(model.design_matrices_[0].columns),
            "open_s": time.perf_counter() - opened}


@step("surface_convert")
def surface_convert(timed, paths, kind, store):
    """Set-up of the store rows: ``chunkglm.convert`` of the run's files into ``store`` (fresh)."""
    from chunkglm.io.convert import convert as chunkglm_convert

    files = [paths["left"], paths["right"]] if kind == "gifti" else [paths["cifti"]]
    shutil.rmtree(store, ignore_errors=True)
    with timed:
        report = chunkglm_convert(files, store, client=None)
    size = sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file())
    return {"converted": report.converted, "store_mib": size / 2**20}


# --- case "surface_second_level_scale": N maps of an fsLR-32k-sized mesh, 2 workers ---------------

@step("surface_maps_store")
def surface_maps_store(timed, store, n_maps, chunk_mib=64):
    """Set-up: ``maps/scale`` of ``n_maps`` float32 CIFTI dense scalar maps on the fsLR 91k-like
    brain-model axis of ``surface_data``'s run (group effect + unit noise), written by
    ``convert_surface_maps`` as one collection in chunks of ``chunk_mib`` MiB (kept when already
    complete with ``n_maps`` maps on a CIFTI grid)."""
    import numpy as np
    from nibabel.cifti2 import Cifti2Header, Cifti2Image, ScalarAxis

    from chunkglm.io.cohort import open_cohort
    from chunkglm.io.surface_maps import convert_surface_maps

    with timed:
        try:
            node = open_cohort(store).maps["scale"]
            done = node.data().shape[0] == n_maps and node.grid.kind == "cifti"
        except Exception:
            done = False
        if not done:
            shutil.rmtree(store, ignore_errors=True)
            axis = _fslr_axis(np.random.default_rng(1))
            rng = np.random.default_rng(n_maps)
            effect = np.where(rng.random(len(axis)) < 0.1, 0.5, 0.0).astype(np.float32)
            values = effect + rng.standard_normal((n_maps, len(axis)), dtype=np.float32)
            names = [f"sub-{i:04d}" for i in range(n_maps)]
            image = Cifti2Image(values, Cifti2Header.from_axes((ScalarAxis(names), axis)))
            convert_surface_maps(image, store, "scale", chunk_bytes=int(chunk_mib * 2**20))
    size = sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file())
    return {"store_mib": size / 2**20, "n_grayordinates": int(len(axis)) if not done else int(node.grid.shape[0])}


@step("surface_second_level_scale")
def surface_second_level_scale(timed, store, n_workers=2, sample_s=0.2):
    """SecondLevelModel (one-sample: intercept) fit + compute_contrast(z) on the maps node, on a
    LocalCluster of ``n_workers`` x 1 thread (set-up); worker memory as ``_steps.second_level_scale``'s."""
    _steps._second_level_imports()
    import numpy as np
    import pandas as pd

    from chunkglm.cluster import start
    from chunkglm.glm.second_level import SecondLevelModel
    from chunkglm.io.cohort import open_cohort

    node = open_cohort(store).maps["scale"]
    n_maps = node.data().shape[0]
    design = pd.DataFrame({"intercept": np.ones(n_maps)})
    client = start(n_workers=n_workers, threads_per_worker=1, dashboard_address=":0", verbose=False)
    try:
        client.run(_steps._worker_imports)
        with _steps.WorkerMemory(client, sample_s) as sampler, timed:
            model = SecondLevelModel().fit(node, design_matrix=design)
            z = model.compute_contrast("intercept", output_type="z_score")
        peaks = client.run(_steps._worker_peak_rss)
        memory = {str(w): sampler.summary(w, set()) for w in peaks}
    finally:
        client.close()
    values = np.asarray(z.dataobj)[0]  # a dense scalar Cifti2Image on the maps' brain-model axis
    return {"n_maps": int(n_maps), "worker_vmhwm_mib": {str(w): v / 2**20 for w, v in peaks.items()},
            "worker_sampled_rss_mib": {w: m["rss"] / 2**20 for w, m in memory.items()},
            "z_max": float(np.nanmax(values))}


if __name__ == "__main__":
    _steps.main(sys.argv)
