"""Run NiMARE 0.22 IBMA estimators on a folder of NIfTI maps; save every map (npz).

Runs INSIDE the NiMARE reference environment (``.venv-nimare``, see
``requirements/nimare-reference.txt``), never in chunkglm's: the parity
tests call it once per session through a subprocess.

Usage::

    python tests/_nimare_reference.py SPEC.json OUT.npz

SPEC.json::

    {"images": [{"id": "s01", "study_id": "s01", "sample_sizes": [20],
                 "beta": "/abs/beta.nii.gz", "varcope": ..., "z": ..., "t": ..., "se": ...}, ...],
     "mask": "/abs/mask.nii.gz",
     "fits": [{"name": "dsl", "class": "DerSimonianLaird", "params": {...},
               "corrections": [["FDRCorrector", {"method": "indep"}], ...]}, ...]}

OUT.npz holds ``<fit name>/<map name>`` arrays (masked, float32 as NiMARE
stores them) and ``<fit name>/__error__`` (a message) for a fit that raised.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings

import numpy as np


SHAPE = (6, 7, 5)
N_STUDIES = 8


def write_maps_folder(folder, seed=0) -> dict:
    """Tiny synthetic study maps (numpy + nibabel only, so both environments can call it).

    K = 8 studies on a 6x7x5 grid, a mask with a hole, float32 NIfTI files for
    beta, varcope, se, z, t; distinct sample sizes. Missing data as NiMARE
    sees it: study 1 is 0 in a slab (NeuroVault's "no coverage"), study 2
    NaN in another, study 3 and 4 cover only part of the grid, so voxels fall
    into several missing-data patterns; one voxel is covered by one study only.

    Returns
    -------
    dict
        ``{"images": [...], "mask": path}``, the first part of a SPEC.json.
    """
    import nibabel as nib
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = -9.0
    mask = np.ones(SHAPE, dtype=np.uint8)
    mask[0, 0, :] = 0
    nib.save(nib.Nifti1Image(mask, affine), folder / "mask.nii.gz")
    sizes = rng.choice(np.arange(12, 60), N_STUDIES, replace=False)
    effect = 0.4 + 0.6 * np.linspace(-1, 1, SHAPE[0])[:, None, None] * np.ones(SHAPE)
    images = []
    for k in range(N_STUDIES):
        varcope = rng.uniform(0.3, 2.0, SHAPE) / sizes[k] * 20
        beta = effect + rng.normal(0, 0.5, SHAPE) + rng.normal(0, 1.0, SHAPE) * np.sqrt(varcope)
        missing = np.zeros(SHAPE, dtype=bool)
        if k == 1:
            missing[:, :2, :] = True
        if k in (3, 4):
            missing[3:, :, 2:] = True
        if k != 0:
            missing[5, 6, 4] = True  # covered by study 0 only
        fill = np.nan if k == 2 else 0.0
        if k == 2:
            missing[:2, 4:, :] = True
        maps = {"beta": beta, "varcope": varcope, "se": np.sqrt(varcope), "z": beta / np.sqrt(varcope)}
        maps["t"] = maps["z"] * 1.05
        entry = {"id": f"c{k:02d}", "study_id": f"study-{k:02d}", "sample_sizes": [int(sizes[k])]}
        for role, values in maps.items():
            values = np.where(missing, fill, values).astype(np.float32)
            path = folder / f"study-{k:02d}_{role}.nii.gz"
            nib.save(nib.Nifti1Image(values, affine), path)
            entry[role] = str(path)
        images.append(entry)
    return {"images": images, "mask": str(folder / "mask.nii.gz")}


def _dataset(spec):
    from nimare.dataset import Dataset

    source = {}
    for image in spec["images"]:
        images = {k: image[k] for k in ("z", "t", "beta", "varcope", "se") if k in image}
        contrast = {"images": images}
        if "sample_sizes" in image:
            contrast["metadata"] = {"sample_sizes": image["sample_sizes"]}
        source.setdefault(image["study_id"], {"contrasts": {}})["contrasts"][image["id"]] = contrast
    return Dataset(source, mask=spec["mask"])


def _fit(dset, fit, cache):
    from nimare import correct
    from nimare.meta import ibma

    estimator = getattr(ibma, fit["class"])(**fit.get("params", {}))
    estimator.share_masked_image_cache(cache)  # each file is masked once for all fits
    result = estimator.fit(dset)
    for name, params in fit.get("corrections", []):
        result = getattr(correct, name)(**params).transform(result)
    return result.maps


def main(spec_path, out_path):
    """Fit every spec; one npz of all maps."""
    import gc

    import nimare.correct  # noqa: F401 - imported before the freeze below
    import nimare.meta.ibma  # noqa: F401

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    # nilearn's safe_get_data calls gc.collect() per image; with NiMARE's imports on the heap
    # that is ~0.3 s a call. Freezing the imported objects makes it cheap; no number changes.
    gc.freeze()
    with open(spec_path) as handle:
        spec = json.load(handle)
    dset = _dataset(spec)
    out = {"__ids__": np.array(list(dset.ids), dtype=str)}
    cache = {}
    for fit in spec["fits"]:
        try:
            for name, values in _fit(dset, fit, cache).items():
                out[f"{fit['name']}/{name}"] = np.asarray(values)
        except Exception as err:  # reported per fit, so one failure does not hide the others
            out[f"{fit['name']}/__error__"] = np.array(f"{type(err).__name__}: {err}")
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
