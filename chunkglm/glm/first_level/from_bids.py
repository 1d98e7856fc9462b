"""``first_level_from_bids`` for fMRIPrep-style folders and for cohort stores.

Kept out of the model module (nilearn's first_level.py mixes them): this
module only finds runs and their inputs, then builds FirstLevelModels.

- A BIDS folder goes through nilearn's own ``first_level_from_bids``, so the
  discovery, the sidecar timing (t_r, slice_time_ref from StartTime) and the
  ``confounds_*`` loading strategies are nilearn's. Our models take the same
  parameters; the NIfTI runs are converted when the models are fitted.
- A cohort store (a path or an opened cohort) holds the same information:
  runs are selected by BIDS entities, timing comes from the stored sidecars,
  events from the stored events, confounds by column name.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
from nilearn.glm.first_level import first_level_from_bids as nilearn_from_bids

from chunkglm.errors import InputError, InputTypeError, StoreError
from chunkglm.glm.first_level.model import FirstLevelModel
from chunkglm.io.cohort import Cohort, open_cohort

__all__ = ["first_level_from_bids"]

# nilearn's FirstLevelModel parameters that chunkglm's model does not take (yet). Left at
# nilearn's defaults they change nothing; any other value is refused rather than dropped.
_SELECTION = ("dataset_path", "task_label", "space_label", "sub_labels", "exclude_subjects",
              "img_filters", "derivatives_folder", "confounds_columns", "kwargs")


def first_level_from_bids(dataset_path, task_label, space_label=None, sub_labels=None,
                          exclude_subjects=None, img_filters=None, t_r=None, slice_time_ref=None,
                          hrf_model="glover", drift_model="cosine", high_pass=0.01, drift_order=1,
                          fir_delays=None, min_onset=-24, mask_img=None, target_affine=None,
                          target_shape=None, smoothing_fwhm=None, memory=None, memory_level=1,
                          standardize=False, signal_scaling=0, noise_model="ar1", verbose=0, n_jobs=1,
                          minimize_memory=True, derivatives_folder="derivatives",
                          confounds_columns=None, **kwargs):
    """Models and fit arguments for every subject, as nilearn's function returns them.

    Parameters
    ----------
    dataset_path : str, Path or Cohort
        A BIDS dataset with fMRIPrep derivatives, or a cohort store.
    task_label, space_label, sub_labels, exclude_subjects, img_filters
        Run selection, as nilearn (``img_filters`` is a list of (entity, label)).
    confounds_columns : list of str, optional
        Stores only: confound columns to use (they must hold no NaN).
    **kwargs
        BIDS folders only: ``confounds_*`` options of nilearn's load_confounds.
        Any other keyword raises ``RuntimeError`` (nilearn's class and wording).
    Other parameters are FirstLevelModel's; every one of them reaches the
    models returned.

    Returns
    -------
    models, models_run_imgs, models_events, models_confounds : lists, one entry per subject
    """
    arguments = dict(locals())
    params = {name: value for name, value in arguments.items() if name not in _SELECTION}
    if not isinstance(dataset_path, str | Path | Cohort):
        raise InputTypeError(f"'dataset_path' must be of type str, pathlib.Path or a chunkglm Cohort; "
                             f"received {type(dataset_path).__name__}.")
    cohort = _as_cohort(dataset_path)
    if cohort is None:
        if confounds_columns is not None:
            raise InputError("confounds_columns applies to cohort stores; for BIDS folders use "
                             "nilearn's confounds_strategy=... keywords.")
        return _from_folder(dataset_path, task_label, space_label, sub_labels, exclude_subjects,
                            img_filters, derivatives_folder, params, kwargs)
    if kwargs:
        raise RuntimeError(f"Unknown keyword arguments for a cohort store: {sorted(kwargs)}; "
                           "select confounds with confounds_columns=[...].")
    return _from_store(cohort, task_label, space_label, sub_labels, exclude_subjects, img_filters,
                       confounds_columns, params)


def _as_cohort(dataset_path):
    if isinstance(dataset_path, Cohort):
        return dataset_path
    path = Path(str(dataset_path))
    if "://" in str(dataset_path) or (path / "zarr.json").is_file():
        try:
            return open_cohort(dataset_path)
        except StoreError:
            return None
    return None


def _from_folder(dataset_path, task_label, space_label, sub_labels, exclude_subjects, img_filters,
                 derivatives_folder, params, kwargs):
    """nilearn discovers runs, timing and confounds; its models' settings become ours, all of them."""
    delays = params["fir_delays"]
    nilearn_params = {**params, "fir_delays": None if delays is None else list(delays)}
    models, run_imgs, events, confounds = nilearn_from_bids(
        str(dataset_path), task_label, space_label=space_label, sub_labels=sub_labels,
        exclude_subjects=exclude_subjects, img_filters=img_filters,
        derivatives_folder=derivatives_folder, **nilearn_params, **kwargs)
    ours = []
    for model in models:
        # nilearn fills t_r and slice_time_ref from the sidecars, and mask_img="derivatives" with
        # the subject's brain mask; everything else is what we passed
        mine = {**params, "t_r": model.t_r, "slice_time_ref": model.slice_time_ref,
                "mask_img": model.mask_img}
        ours.append(FirstLevelModel(**mine, subject_label=model.subject_label))
    return ours, run_imgs, events, confounds


def _from_store(cohort, task_label, space_label, sub_labels, exclude_subjects, img_filters, columns,
                params):
    filters = dict(img_filters or [])
    nodes = cohort.select(task=task_label, sub=sub_labels, space=space_label, **filters)
    excluded = set(exclude_subjects or ())
    nodes = [node for node in nodes if node.entities.get("sub") not in excluded]
    if not nodes:
        raise InputError(
            f"no run of {cohort.location} matches task={task_label!r}, space={space_label!r}, "
            f"subjects={sub_labels!r}, filters={filters}.")
    by_subject = defaultdict(list)
    for node in sorted(nodes, key=lambda n: n.name):
        by_subject[node.entities.get("sub")].append(node)
    models, run_imgs, events, confounds = [], [], [], []
    for subject, runs in sorted(by_subject.items()):
        timing = _store_timing(runs, params)
        mask = params["mask_img"]
        if isinstance(mask, str) and mask == "derivatives":  # the subject's stored (brain) mask
            if not hasattr(runs[0].grid, "affine"):
                raise InputError("mask_img='derivatives' takes the brain mask of volume runs; these runs are "
                                 "on a surface grid: leave mask_img None (their stored elements).")
            mask = nib.Nifti1Image(runs[0].grid.mask.astype(np.uint8), runs[0].grid.affine)
        models.append(FirstLevelModel(**{**params, **timing, "mask_img": mask}, subject_label=subject))
        run_imgs.append(runs)
        events.append([node.events for node in runs])
        confounds.append(None if columns is None else [node.confound_columns(columns) for node in runs])
    return models, run_imgs, events, confounds


def _store_timing(runs, params):
    """t_r and slice_time_ref from the stored sidecars (one value per subject).

    As nilearn: slice_time_ref is StartTime / RepetitionTime, and 0 when the
    sidecars have no StartTime.
    """
    timing = {}
    for name, key in (("t_r", "RepetitionTime"), ("slice_time_ref", "slice_time_ref")):
        if params[name] is not None:
            continue
        values = {node.attrs.get(key) for node in runs}
        if name == "slice_time_ref" and values == {None}:
            values = {0.0}
        if len(values) != 1 or None in values:
            raise InputError(
                f"{key} differs between the runs of subject {runs[0].entities.get('sub')} or is "
                f"missing ({sorted(map(str, values))}): pass {name}=... explicitly.")
        timing[name] = values.pop()
    return timing
