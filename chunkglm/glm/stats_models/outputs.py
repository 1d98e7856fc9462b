"""fitlins' derivative names for the maps of a BIDS Stats Model.

``node-<node>/[sub-<s>/][ses-<S>/][sub-<s>_][ses-<S>_][task-<t>_][acq-<a>_][rec-<r>_][run-<n>_]
[echo-<e>_][space-<sp>_]contrast-<c>_stat-<effect|variance|t|F|z|p>_statmap.nii.gz`` and, per run,
``node-<node>/sub-<s>/..._design.tsv``, ``..._stat-{rSquare,logLikelihood}_statmap.nii.gz`` and the
figures ``node-<node>/reports/sub-<s>/figures/run-<n>/..._{design,corr,contrasts}.svg``, as fitlins
0.11 writes them (not its glass-brain PNGs of the contrasts). Node and contrast names
become labels by fitlins' rule (every character but ASCII letters and digits is a word break,
words camelCased: ``"trial_type.a"`` -> ``trialTypeA``), so no name can leave the output folder.
"""

from __future__ import annotations

import re

import nibabel as nib
import numpy as np

from chunkglm.errors import InputError

__all__ = ["MAP_NAMES", "design_path", "figure_path", "fitlins_label", "map_path", "model_map_path", "write_map"]

#: pybids entity name -> file-name key, in fitlins' order.
_ENTITY_KEYS = (("subject", "sub"), ("session", "ses"), ("task", "task"), ("acquisition", "acq"),
                ("reconstruction", "rec"), ("run", "run"), ("echo", "echo"), ("space", "space"))
#: nilearn's output_type -> the stat entity of the file (the test's name for "stat").
MAP_NAMES = {"effect_size": "effect", "effect_variance": "variance", "z_score": "z", "p_value": "p"}
_NOT_ALNUM = re.compile("[^a-zA-Z0-9]")


def fitlins_label(name, what="name") -> str:
    """A node or contrast name as a file-name label, by fitlins' ``to_alphanum`` rule.

    ``"a four word phrase"`` -> ``aFourWordPhrase``, ``"trial_type.a"`` -> ``trialTypeA``.

    Raises
    ------
    InputError
        If nothing (no ASCII letter or digit) is left.
    """
    words = _NOT_ALNUM.sub("_", str(name)).split("_")
    label = words[0] + "".join(word.title() for word in words[1:])
    if not label:
        raise InputError(f"the {what} {name!r} has no ASCII letter or digit to name its files with; "
                         "rename it in the model.")
    return label


def _scalar(value) -> str | None:
    """An entity's value as a label (lists, e.g. the model's Input filters, name no file)."""
    if value is None or isinstance(value, list | tuple | dict) or (isinstance(value, float) and np.isnan(value)):
        return None
    return str(value)


def _prefix(entities: dict, keys) -> tuple[list[str], str]:
    values = {key: _scalar(entities.get(name)) for name, key in keys}
    folders = [f"{key}-{values[key]}" for key in ("sub", "ses") if values[key] is not None]
    parts = [f"{key}-{value}" for key, value in values.items() if value is not None]
    for part in parts:
        if not _NOT_ALNUM.sub("", part.split("-", 1)[1]) == part.split("-", 1)[1]:
            raise InputError(f"the entity {part!r} is not a BIDS label (letters and digits only).")
    return folders, "_".join(parts)


def map_path(node_name: str, entities: dict, stat: str, desc: str | None = None) -> str:
    """Relative path of one map: ``node-run/sub-01/sub-01_run-1_contrast-a_stat-t_statmap.nii.gz``
    (``..._stat-z_desc-fweCorrected_statmap.nii.gz`` with a ``desc``, BIDS' last entity)."""
    folders, prefix = _prefix(entities, _ENTITY_KEYS)
    contrast = fitlins_label(entities["contrast"], "contrast")
    parts = (prefix, f"contrast-{contrast}", f"stat-{stat}", f"desc-{desc}" if desc else "", "statmap")
    name = "_".join(part for part in parts if part)
    return "/".join([f"node-{fitlins_label(node_name, 'node')}", *folders, f"{name}.nii.gz"])


def design_path(node_name: str, entities: dict) -> str:
    """Relative path of a run's design matrix: ``node-run/sub-01/sub-01_task-x_run-1_design.tsv``."""
    folders, prefix = _prefix(entities, _ENTITY_KEYS[:-1])
    return "/".join([f"node-{fitlins_label(node_name, 'node')}", *folders, f"{prefix}_design.tsv"])


def figure_path(node_name: str, entities: dict, suffix: str) -> str:
    """Relative path of a run's figure, as fitlins' reports:
    ``node-run/reports/sub-01/figures/run-1/sub-01_task-x_run-1_design.svg``."""
    folders, prefix = _prefix(entities, _ENTITY_KEYS[:-1])
    run = _scalar(entities.get("run"))
    figures = ["figures", *([f"run-{run}"] if run is not None else [])]
    return "/".join([f"node-{fitlins_label(node_name, 'node')}", "reports", *folders, *figures,
                     f"{prefix}_{suffix}.svg"])


def model_map_path(node_name: str, entities: dict, stat: str) -> str:
    """Relative path of a run's model map: ``node-run/sub-01/sub-01_task-x_run-1_stat-rSquare_statmap.nii.gz``."""
    folders, prefix = _prefix(entities, _ENTITY_KEYS[:-1])
    return "/".join([f"node-{fitlins_label(node_name, 'node')}", *folders, f"{prefix}_stat-{stat}_statmap.nii.gz"])


def write_map(img, path) -> None:
    """Write ``img`` as float32 NIfTI (chunkglm's map type) with its affine."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    out = nib.Nifti1Image(data, img.affine)
    out.header.set_xyzt_units("mm")
    out.to_filename(str(path))
