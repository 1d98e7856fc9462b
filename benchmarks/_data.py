"""Benchmark inputs: synthetic BIDS datasets, generated once and cached.

A dataset lives in ``<data-dir>/<size>/bids``; ``manifest.json`` next to it
is written last, so a generation cut off half-way is redone, never reused.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

MANIFEST = "manifest.json"


def synthetic_run(data_dir: Path, size: str) -> dict:
    """Paths of the one-run synthetic dataset of ``size`` (generated if absent).

    Returns a dict with ``root``, ``bold``, ``mask`` (str paths), ``size``
    and ``generated_s`` (0 when reused from the cache).
    """
    folder = Path(data_dir) / size
    manifest = folder / MANIFEST
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        if all(Path(info[key]).exists() for key in ("root", "bold", "mask")):
            return {**info, "generated_s": 0.0}
    return _generate(folder, size)


def _generate(folder: Path, size: str) -> dict:
    from chunkglm.testing import make_synthetic_bids

    # <data-dir>/<size> also holds the other cases' data and work stores: remove only this dataset's files
    shutil.rmtree(folder / "bids", ignore_errors=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"generating the synthetic {size!r} dataset in {folder} (once; cached) ...", flush=True)
    start = time.perf_counter()
    dataset = make_synthetic_bids(folder / "bids", n_subjects=1, size=size, seed=0, dtype="float32")
    run = dataset.runs[0]
    info = {"root": str(Path(dataset.root).absolute()), "bold": str(Path(run.bold_path).absolute()),
            "mask": str(Path(run.mask_path).absolute()), "size": size}
    (folder / MANIFEST).write_text(json.dumps(info, indent=1))
    return {**info, "generated_s": time.perf_counter() - start}


def run_tables(run: dict) -> dict:
    """The events and confounds TSVs of the one run of :func:`synthetic_run`.

    ``events``: the raw BIDS ``*_events.tsv`` under ``<root>/sub-*/func``;
    ``confounds``: fMRIPrep's ``*_desc-confounds_timeseries.tsv`` next to the
    preprocessed bold file.
    """
    prefix = Path(run["bold"]).name.split("_space-")[0]  # sub-01_task-main_run-1
    events = sorted(Path(run["root"]).glob(f"sub-*/**/func/{prefix}_events.tsv"))
    confounds = sorted(Path(run["bold"]).parent.glob(f"{prefix}_desc-confounds_timeseries.tsv"))
    if len(events) != 1 or len(confounds) != 1:
        raise FileNotFoundError(f"expected one events and one confounds table for {prefix}; "
                                f"found {events} and {confounds}")
    return {"events": str(events[0]), "confounds": str(confounds[0])}


def linked_cohort(run: dict, folder: Path, n_runs: int) -> dict:
    """A BIDS dataset of ``n_runs`` subjects that all reuse the one run of
    :func:`synthetic_run` (cached in ``folder``; rebuilt when the source changed).

    Every file of the source subject (``sub-01``: raw events and sidecar,
    fMRIPrep mask, confounds, JSON) is copied under ``sub-01`` ... ``sub-NN``
    with the subject label in its path and name replaced; the preprocessed
    bold ``.nii.gz`` (~1.1 GB) is a **symlink** to the cached one, so the
    dataset costs a few MB whatever ``n_runs``. Top-level files
    (``dataset_description.json``) are copied, ``participants.tsv`` lists
    the new subjects.

    Returns a dict with ``root`` (str), ``subjects`` (labels without
    ``sub-``), ``runs`` (node names, e.g. ``sub-07_task-main_run-1``) and
    ``built_s`` (0 when reused).
    """
    source_root = Path(run["root"])
    source_bold = Path(run["bold"])
    source_sub = source_bold.name.split("_", 1)[0]  # "sub-01"
    folder = Path(folder)
    stamp = {"source_bold": str(source_bold), "source_size": source_bold.stat().st_size,
             "source_mtime": source_bold.stat().st_mtime, "n_runs": n_runs}
    manifest = folder / MANIFEST
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        if info.get("stamp") == stamp and Path(info["root"]).is_dir():
            return {**info, "built_s": 0.0}
    start = time.perf_counter()
    if folder.exists():
        shutil.rmtree(folder)
    root = folder / "bids"
    subjects = [f"{i:02d}" for i in range(1, n_runs + 1)]
    for path in sorted(p for p in source_root.rglob("*") if p.is_file()):
        relative = path.relative_to(source_root)
        if source_sub not in relative.parts:  # top-level files
            target = root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if relative.name == "participants.tsv":
                header, *lines = path.read_text().splitlines()
                row = next((line for line in lines if line.startswith(source_sub + "\t")), source_sub)
                rows = [row.replace(source_sub, f"sub-{label}", 1) for label in subjects]
                target.write_text("\n".join([header, *rows]) + "\n")
            else:
                shutil.copyfile(path, target)
            continue
        for label in subjects:
            target = root / str(relative).replace(source_sub, f"sub-{label}")
            target.parent.mkdir(parents=True, exist_ok=True)
            if path == source_bold:
                target.symlink_to(source_bold.absolute())
            else:
                shutil.copyfile(path, target)
    node = source_bold.name.split("_space-")[0]  # sub-01_task-main_run-1
    info = {"root": str(root.absolute()), "subjects": subjects,
            "runs": [node.replace(source_sub, f"sub-{label}", 1) for label in subjects], "stamp": stamp}
    manifest.write_text(json.dumps(info, indent=1))
    return {**info, "built_s": time.perf_counter() - start}


#: Second-level maps per size: N maps on a grid, a covariate correlated with the signal.
SECOND_LEVEL_SIZES = {
    "realistic": {"n_maps": 200, "shape": (97, 115, 97), "voxel_size": 2.0},  # MNI 2 mm
    "small": {"n_maps": 30, "shape": (20, 24, 20), "voxel_size": 2.0},
}


def second_level_maps(data_dir: Path, size: str) -> dict:
    """N subject maps (3-D float32 ``.nii.gz``), a brain-like mask and a design
    (``covariate``, ``intercept``), cached in ``<data-dir>/<size>/second_level``.

    Each map is ``intercept_map + covariate_i * slope_map + noise_i``: a smooth
    group effect, a smooth covariate effect (``slope_map``, a few blobs), and
    spatially smooth Gaussian noise (sigma 1.5 voxels, rescaled to unit SD),
    inside an ellipsoid mask on the MNI 2 mm grid (``realistic``: 235,413 voxels, 200 maps of
    (97, 115, 97)); 0 outside the mask. The covariate is standard normal,
    seed 0, so it correlates with the signal wherever ``slope_map`` is non-zero.

    Returns a dict with ``maps`` (list of str paths), ``mask``, ``design``
    (CSV of the design matrix, one row per map), ``n_maps``, ``shape``,
    ``mask_voxels`` and ``generated_s`` (0 when reused from the cache).
    """
    folder = Path(data_dir) / size / "second_level"
    manifest = folder / MANIFEST
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        if all(Path(p).exists() for p in [*info["maps"], info["mask"], info["design"]]):
            return {**info, "generated_s": 0.0}
    return _generate_second_level(folder, size)


def _generate_second_level(folder: Path, size: str) -> dict:
    import nibabel as nib
    import numpy as np
    import pandas as pd
    from scipy.ndimage import gaussian_filter

    from chunkglm.testing.synthetic import MNI_2MM_AFFINE

    spec = SECOND_LEVEL_SIZES[size]
    shape, n_maps = spec["shape"], spec["n_maps"]
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "maps").mkdir(parents=True)
    print(f"generating {n_maps} second-level maps {shape} in {folder} (once; cached) ...", flush=True)
    start = time.perf_counter()
    affine = MNI_2MM_AFFINE.copy()
    if size != "realistic":  # a small grid centred on the origin
        affine[:3, 3] = -np.asarray(shape) * spec["voxel_size"] / 2
    rng = np.random.default_rng(0)
    grid = np.indices(shape, dtype=np.float32)
    centre, radii = (np.asarray(shape) - 1) / 2, np.asarray(shape) * np.array([0.375, 0.39, 0.355])
    mask = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(axis=0) <= 1.0
    intercept_map = gaussian_filter(rng.standard_normal(shape), 4.0) * 20.0 + 0.3
    slope_map = np.zeros(shape)
    for _ in range(4):  # a few blobs where the covariate matters
        blob = np.round(centre + rng.uniform(-0.5, 0.5, 3) * radii).astype(int)
        slope_map[tuple(blob)] = 1.0
    slope_map = gaussian_filter(slope_map, 3.0)
    slope_map *= 0.8 / slope_map.max()
    covariate = rng.standard_normal(n_maps)
    paths = []
    for i in range(n_maps):
        noise = gaussian_filter(rng.standard_normal(shape), 1.5)
        data = intercept_map + covariate[i] * slope_map + noise / noise.std()
        data = np.where(mask, data, 0.0).astype(np.float32)
        path = folder / "maps" / f"sub-{i + 1:04d}_effect.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), path)
        paths.append(str(path.absolute()))
    mask_path = folder / "mask.nii.gz"
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), mask_path)
    design_path = folder / "design.csv"
    pd.DataFrame({"covariate": covariate, "intercept": np.ones(n_maps)}).to_csv(design_path, index=False)
    info = {"maps": paths, "mask": str(mask_path.absolute()), "design": str(design_path.absolute()),
            "n_maps": n_maps, "shape": list(shape), "mask_voxels": int(mask.sum()), "size": size}
    (folder / MANIFEST).write_text(json.dumps(info, indent=1))
    return {**info, "generated_s": time.perf_counter() - start}


def second_level_scale_store(data_dir: Path, n_maps: int) -> dict:
    """A store holding ``maps/scale`` of ``n_maps`` maps on the realistic second-level mask
    (MNI 2 mm, 235,413 voxels), written straight into the store (no NIfTI: 5,000 files
    would be ~9 GB of gzip), cached in ``<data-dir>/realistic/second_level_scale_<N>.zarr``.

    Map i = intercept_map + covariate_i * slope_map + white noise (unit SD), float32;
    ``covariate`` (standard normal, seed 1) is an image coordinate of the node.
    Returns ``store``, ``node``, ``mask`` (the NIfTI mask), ``n_maps``, ``store_gib``.
    """
    return _scale_store(data_dir, f"second_level_scale_{n_maps}.zarr", n_maps, "effect", "covariate")


def meta_scale_store(data_dir: Path, n_maps: int) -> dict:
    """As :func:`second_level_scale_store`, for IBMA: ``maps/scale`` holds ``n_maps`` z maps
    (variable ``z``: a smooth group map scaled by a per-study factor + white unit noise) and a
    ``sample_sizes`` coordinate (20..60); ``<data-dir>/realistic/meta_scale_<N>.zarr``."""
    return _scale_store(data_dir, f"meta_scale_{n_maps}.zarr", n_maps, "z", "sample_sizes")


def _scale_store(data_dir: Path, name: str, n_maps: int, variable: str, coord: str) -> dict:
    import nibabel as nib
    import numpy as np
    from scipy.ndimage import gaussian_filter

    from chunkglm.chunking import plan_voxel_chunks
    from chunkglm.io import layout as st
    from chunkglm.io.write_run import write_rows

    maps = second_level_maps(data_dir, "realistic")
    store = (Path(data_dir) / "realistic" / name).absolute()
    done = store / "scale_manifest.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(store, ignore_errors=True)
    print(f"writing {n_maps} maps into {store} (once; cached) ...", flush=True)
    mask_img = nib.load(maps["mask"])
    mask = np.asarray(mask_img.dataobj) > 0
    rng = np.random.default_rng(1)
    group_map = (gaussian_filter(rng.standard_normal(mask.shape), 4.0) * 20.0 + 0.3)[mask]
    slope_map = np.zeros(mask.shape)
    slope_map[tuple(np.array(mask.shape) // 3)] = 1.0
    slope_map = (gaussian_filter(slope_map, 3.0) / gaussian_filter(slope_map, 3.0).max() * 0.8)[mask]
    if coord == "sample_sizes":
        values = rng.integers(20, 61, n_maps).astype(np.float64)
        scale = np.sqrt(values / 40.0)
    else:
        values = rng.standard_normal(n_maps)
        scale = np.ones(n_maps)
    root = st.open_root(str(store), mode="a")
    grid_id = st.write_grid(root, st.Grid(mask_img.affine, mask, ""))
    node = st.start_node(root, "maps", "scale")
    plan = plan_voxel_chunks(n_maps, int(mask.sum()), 4, 64 * 2**20)

    def fill(out, start, stop):
        for row in range(start, stop):
            noise = rng.standard_normal(out.shape[1], dtype=np.float32)
            signal = group_map * scale[row] if coord == "sample_sizes" else group_map + values[row] * slope_map
            out[row - start] = signal + noise
        return True

    write_rows(node, variable, ("image", "voxel"), plan, fill, 2 * 2**30, "scale maps")
    st.write_array(node, "image", np.array([f"map{i:05d}" for i in range(n_maps)], dtype=str), ("image",))
    st.write_array(node, coord, values, ("image",))
    st.finish_node(node, {"grid_id": grid_id, "variables": [variable]}, {"kind": "maps", "sources": []})
    info = {"store": str(store), "node": "scale", "mask": maps["mask"], "n_maps": n_maps,
            "store_gib": sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 2**30}
    done.write_text(json.dumps(info))
    return info


def meta_maps(data_dir: Path, n_studies: int) -> dict:
    """K studies' maps for image-based meta-analysis, NIfTI on the MNI 2 mm grid of the
    second_level case (its ellipsoid mask, 235,413 voxels), cached in
    ``<data-dir>/realistic/meta_<K>``.

    Study k: ``varcope_k = v_k * (1 + 0.5 * smooth_k) * 30 / n_k`` (positive, smooth),
    ``beta_k = effect + sqrt(varcope_k + tau2) * noise_k`` (``effect``: a smooth map with a
    few blobs; ``tau2`` = 0.05 between-study variance; ``noise_k`` smooth, unit SD),
    ``z_k = t_k = beta_k / sqrt(varcope_k)``; 0 outside the mask; sample size ``n_k``
    uniform in [20, 60]. Files ``study-XXXX_{beta,varcope,z,t}.nii.gz`` (float32).

    Returns ``table`` (TSV: study_id, sample_sizes and one column per map type, absolute
    paths), ``nimare`` (a NiMARE Dataset JSON with the same files and sample sizes),
    ``mask``, ``n_studies``, ``mask_voxels``, ``generated_s``.
    """
    import nibabel as nib
    import numpy as np
    import pandas as pd
    from scipy.ndimage import gaussian_filter

    folder = (Path(data_dir) / "realistic" / f"meta_{n_studies}").absolute()
    manifest = folder / MANIFEST
    if manifest.is_file():
        return {**json.loads(manifest.read_text()), "generated_s": 0.0}
    base = second_level_maps(data_dir, "realistic")
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "maps").mkdir(parents=True)
    print(f"generating {n_studies} studies x 4 meta-analysis maps in {folder} (once; cached) ...", flush=True)
    start = time.perf_counter()
    mask_img = nib.load(base["mask"])
    mask = np.asarray(mask_img.dataobj) > 0
    rng = np.random.default_rng(7)
    effect = np.zeros(mask.shape)
    for _ in range(5):
        effect[tuple(rng.integers(20, 75, 3))] = 1.0
    effect = gaussian_filter(effect, 4.0)
    effect *= 0.6 / effect.max()
    # a pool of smooth fields, combined per study (smoothing 4 maps per study would dominate)
    pool = [gaussian_filter(rng.standard_normal(mask.shape), 2.0) for _ in range(8)]
    pool = [(f / f[mask].std()).astype(np.float32) for f in pool]
    rows, studies = [], {}
    for k in range(n_studies):
        n = int(rng.integers(20, 61))
        a, b, c = rng.choice(len(pool), 3, replace=False)
        noise = (pool[a] * rng.standard_normal() + pool[b] * rng.standard_normal()) / np.sqrt(2)
        varcope = rng.uniform(0.5, 1.5) * (1 + 0.5 * np.tanh(pool[c])) * 30.0 / n
        beta = effect + np.sqrt(varcope + 0.05) * noise
        z = beta / np.sqrt(varcope)
        paths = {}
        for name, values in (("beta", beta), ("varcope", varcope), ("z", z), ("t", z)):
            path = folder / "maps" / f"study-{k + 1:04d}_{name}.nii.gz"
            nib.save(nib.Nifti1Image(np.where(mask, values, 0).astype(np.float32), mask_img.affine), path)
            paths[name] = str(path)
        rows.append({"study_id": f"study-{k + 1:04d}", "sample_sizes": n, **paths})
        studies[f"study-{k + 1:04d}"] = {"contrasts": {"1": {"images": dict(paths),
                                                               "metadata": {"sample_sizes": [n]}}}}
    table = folder / "studies.tsv"
    pd.DataFrame(rows).to_csv(table, sep="\t", index=False)
    nimare = folder / "nimare_dataset.json"
    nimare.write_text(json.dumps(studies))
    info = {"table": str(table), "nimare": str(nimare), "mask": base["mask"], "n_studies": n_studies,
            "mask_voxels": int(mask.sum())}
    manifest.write_text(json.dumps(info, indent=1))
    return {**info, "generated_s": time.perf_counter() - start}


def gaussian_atlas(data_dir: Path, n_maps: int) -> dict:
    """``n_maps`` overlapping Gaussian probabilistic maps (4-D float32 ``.nii.gz``) on the grid of
    the realistic synthetic run, cached in ``<data-dir>/realistic/atlas_<R>.nii.gz``.

    Map r: exp(-d^2 / 2 sigma^2), sigma = 6 mm, centred at a random voxel of the run's brain
    mask (seed 3), set to 0 beyond 3 sigma (so neighbouring maps overlap, and the file
    compresses). Returns ``maps``, ``n_maps``, ``generated_s``.
    """
    import nibabel as nib
    import numpy as np

    run = synthetic_run(data_dir, "realistic")
    path = (Path(data_dir) / "realistic" / f"atlas_{n_maps}.nii.gz").absolute()
    if path.is_file():
        return {"maps": str(path), "n_maps": n_maps, "generated_s": 0.0}
    print(f"generating {n_maps} Gaussian maps into {path} (once; cached) ...", flush=True)
    start = time.perf_counter()
    mask_img = nib.load(run["mask"])
    mask = np.asarray(mask_img.dataobj) > 0
    rng = np.random.default_rng(3)
    inside = np.argwhere(mask)
    centres = inside[rng.choice(len(inside), n_maps, replace=False)]
    voxel = float(np.abs(mask_img.affine[0, 0]))
    sigma = 6.0 / voxel
    radius = int(np.ceil(3 * sigma))
    offsets = np.arange(-radius, radius + 1)
    dx, dy, dz = np.meshgrid(offsets, offsets, offsets, indexing="ij")
    kernel = np.exp(-(dx**2 + dy**2 + dz**2) / (2 * sigma**2)).astype(np.float32)
    kernel[(dx**2 + dy**2 + dz**2) > (3 * sigma) ** 2] = 0
    data = np.zeros((*mask.shape, n_maps), dtype=np.float32)
    shape = np.array(mask.shape)
    for r, centre in enumerate(centres):
        lo = centre - radius
        src = tuple(slice(max(0, -a), kernel.shape[0] - max(0, a + kernel.shape[0] - n))
                    for a, n in zip(lo, shape))
        dst = tuple(slice(max(0, a), min(n, a + kernel.shape[0])) for a, n in zip(lo, shape))
        data[(*dst, r)] = kernel[src]
    nib.save(nib.Nifti1Image(data, mask_img.affine), path)
    return {"maps": str(path), "n_maps": n_maps, "generated_s": time.perf_counter() - start}
