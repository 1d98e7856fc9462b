"""The pybids side: the dataset's layout and the model's graph.

:func:`load_graph` indexes the raw dataset and its preprocessed derivatives
with ``bids.BIDSLayout``, reads the model (a validated JSON file, or
``"auto"``: the model ``bids.modeling.auto_model`` derives from the events)
and builds ``bids.modeling.BIDSStatsModelsGraph`` with its variables loaded
for the selected runs. Nothing here reads images.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import bids
from bids.modeling import BIDSStatsModelsGraph, auto_model

from chunkglm.errors import InputError
from chunkglm.glm.stats_models.spec import pybids_refusal, read_model, validate_model

__all__ = ["load_graph", "participant_labels"]


def participant_labels(labels) -> list[str] | None:
    """``["sub-01", "02"]`` -> ``["01", "02"]`` (the ``sub-`` prefix is optional)."""
    if not labels:
        return None
    return [str(label).removeprefix("sub-") for label in labels]


def load_graph(bids_dir, derivatives, model, *, space=None, task=None, participants=None, desc="preproc"):
    """Index the dataset, read the model and build its graph (variables loaded, no image read).

    Parameters
    ----------
    bids_dir : str or Path
        The raw BIDS dataset (events, sidecars).
    derivatives : str or Path
        The fMRIPrep derivatives folder (preprocessed BOLD, masks, confounds).
    model : str, Path, dict or "auto"
        A BIDS Stats Model JSON file (validated first, before the dataset is
        indexed), the model itself, or "auto".
    space, task : str, optional
        Keep runs of this space / task.
    participants : list of str, optional
        Subject labels (``sub-`` optional).
    desc : str
        The preprocessed BOLD files' ``desc`` label.

    Returns
    -------
    bids.modeling.BIDSStatsModelsGraph
    """
    spec = None if _is_auto(model) else read_model(model)
    layout = _layout(bids_dir, derivatives)
    spec = spec if spec is not None else _auto_model(layout, task)
    selectors = {"desc": desc}
    if space:
        selectors["space"] = space
    if task:
        selectors["task"] = task
    subjects = participant_labels(participants)
    if subjects:
        missing = sorted(set(subjects) - set(layout.get_subjects()))
        if missing:
            raise InputError(f"--participant-label {' '.join(missing)}: no such subject in {bids_dir} "
                             f"(subjects: {' '.join(layout.get_subjects()) or 'none'}).")
        selectors["subject"] = subjects
    with pybids_refusal("the model's graph on this dataset"):
        graph = BIDSStatsModelsGraph(layout, spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            graph.load_collections(**selectors)
    return graph


def _is_auto(model) -> bool:
    return isinstance(model, str) and model == "auto"


def _layout(bids_dir, derivatives):
    for folder, what in ((bids_dir, "BIDS_DIR"), (derivatives, "--derivatives")):
        if not Path(folder).is_dir():
            raise InputError(f"{what} {folder}: no such folder.")
    if not (Path(derivatives) / "dataset_description.json").is_file():
        raise InputError(f"--derivatives {derivatives} has no dataset_description.json: point it at "
                         "the fMRIPrep output folder.")
    try:
        return bids.BIDSLayout(str(bids_dir), derivatives=[str(derivatives)], validate=False)
    except (ValueError, OSError) as err:
        raise InputError(f"pybids cannot index {bids_dir}: {err}") from None


def _auto_model(layout, task):
    """pybids' model from the events: per task, each trial type against the others at the run
    level, then fixed effects per subject (and session) and a one-sample test per contrast."""
    models = auto_model(layout, one_vs_rest=True)
    if task:
        models = [m for m in models if task in m.get("Input", {}).get("task", [])]
    if not models:
        raise InputError(f"--model auto: pybids derived no model{f' for task {task!r}' if task else ''} "
                         "(no events found).")
    if len(models) > 1:
        tasks = sorted(t for m in models for t in m.get("Input", {}).get("task", []))
        raise InputError(f"--model auto: one model per task ({', '.join(tasks)}); choose one with --task.")
    validate_model(models[0], "the model pybids derived (--model auto)")
    return models[0]
