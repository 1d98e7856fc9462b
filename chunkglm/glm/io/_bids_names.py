"""File names of GLM outputs: nilearn's BIDS-like names, made safe.

The names follow nilearn 0.14's ``_generate_filenames_output`` (see
:func:`chunkglm.interfaces.bids.save_glm_to_bids`). Contrast names become
``contrast-<label>`` entities through nilearn's camelCase conversion,
restricted to ASCII letters and digits (BIDS labels); a name that contains a
path separator, or has no letter or digit, is refused. Every planned path is
checked to be a plain relative path, and no two outputs may share a name.
The label, file-name and path rules are those of every derivative output
(:mod:`chunkglm.io.derivatives`); the layouts are here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from chunkglm.errors import InputError
from chunkglm.io.derivatives import (
    ENTITY_ORDER,
    PATH_CHARACTERS,
    bids_filename,
    check_paths,
    with_prefix,
)


#: Entities kept across the runs of a model (when their label is unique).
MODEL_ENTITIES = ("sub", "ses", "task", "space")
#: Keys of ``compute_contrast(..., output_type="all")`` and their stat labels.
MAP_STATS = {"effect_size": "effect", "stat": None, "effect_variance": "variance",
             "z_score": "z", "p_value": "p"}
#: Maps of the derivatives/glm layout: output key -> stat label (None: t or F).
DERIVATIVE_STATS = {"stat": None, "z_score": "z", "effect_size": "effect", "effect_variance": "variance"}


@dataclass
class BidsNames:
    """Relative paths of every output of :func:`save_glm_to_bids`.

    ``runs[i]`` maps design/model-level keys to names; ``contrasts[label]``
    maps map keys (``MAP_STATS`` keys), ``clusters_tsv``, ``clusters_json``
    and ``design`` (one base name per run, no extension) to names.
    """

    folder: str
    mask: str
    statmap_json: str
    runs: list = field(default_factory=list)
    contrasts: dict = field(default_factory=dict)

    def all_paths(self) -> list[str]:
        """Every file name with its folder, for the collision and safety checks."""
        names = [self.mask, self.statmap_json]
        for run in self.runs:
            names += list(run.values())
        for outputs in self.contrasts.values():
            names += [v for k, v in outputs.items() if k != "design"]
            names += list(outputs["design"])
        return [f"{self.folder}/{n}" if self.folder else n for n in names]


def check_prefix(prefix):
    """nilearn's prefix: None or a string; here it may not name a folder."""
    if prefix is None:
        return None
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a string or None, not {type(prefix).__name__}.")
    if any(c in prefix for c in PATH_CHARACTERS) or prefix in (".", ".."):
        raise InputError(f"prefix {prefix!r} must not contain path separators: it starts file names.")
    return prefix


def _common_entities(run_entities: list[dict]) -> dict:
    """sub/ses/task/space labels shared by every run (nilearn's rule)."""
    common = {}
    for key in MODEL_ENTITIES:
        labels = {str(e[key]) for e in run_entities if e.get(key) is not None}
        if len(labels) == 1:
            common[key] = labels.pop()
    return common


def plan_bids_names(contrasts, run_entities, n_runs: int, prefix, group: bool = False) -> BidsNames:
    """All output names, as nilearn's ``_generate_filenames_output``.

    Parameters
    ----------
    contrasts : list of ContrastSpec
        With ``label`` and ``stat_type``.
    run_entities : list of dict or None
        BIDS entities of each run's input; None (or an empty dict for some
        run) when the inputs have no BIDS names: then names use ``prefix``
        and, for several runs, ``run-<i>`` (nilearn's behaviour for images).
    n_runs : int
    prefix : str or None
        nilearn's ``prefix``; when given, input names are not used.
    group : bool, default=False
        A second-level model: as nilearn, everything goes to a ``group``
        folder, names never come from the inputs, and there is no
        ``design.json`` (no repetition time).
    """
    if group:
        run_entities, n_runs = None, 1
    bids = prefix is None and run_entities is not None and all(run_entities)
    prefix = "" if bids or prefix is None else prefix
    common = _common_entities(run_entities) if bids else {}
    order = ENTITY_ORDER if bids else ("run", "contrast", "stat")
    if group:
        folder = "group"
    elif "sub" in common:
        folder = f"sub-{common['sub']}"
    else:
        folder = prefix.split("_")[0] if prefix.startswith("sub-") else ""
    per_run = [dict(run_entities[i]) if bids else ({"run": i + 1} if n_runs > 1 else {})
               for i in range(n_runs)]
    mask_entities = {k: v for k, v in common.items() if k not in ("run", "ses")}
    names = BidsNames(folder=folder,
                      mask=bids_filename(mask_entities, "mask", "nii.gz", prefix, order),
                      statmap_json=with_prefix(prefix, "statmap.json"))
    names.runs = [_run_names(entities, prefix, order) for entities in per_run]
    if group:
        del names.runs[0]["design_json"]
    for spec in contrasts:
        names.contrasts[spec.label] = _contrast_names(spec, common, per_run, prefix, order)
    check_paths(names.all_paths())
    return names


def _run_names(entities: dict, prefix: str, order) -> dict:
    def name(suffix, extension, stat=None):
        return bids_filename({**entities, "stat": stat}, suffix, extension, prefix, order)

    return {"design_tsv": name("design", "tsv"), "design_json": name("design", "json"),
            "design_base": name("design", None), "corrdesign_base": name("corrdesign", None),
            "errorts": name("statmap", "nii.gz", "errorts"),
            "rsquared": name("statmap", "nii.gz", "rsquared")}


def _contrast_names(spec, common: dict, per_run: list, prefix: str, order) -> dict:
    entities = {**common, "contrast": spec.label}
    out = {key: bids_filename({**entities, "stat": stat or spec.stat_type}, "statmap", "nii.gz",
                              prefix, order)
           for key, stat in MAP_STATS.items()}
    out["clusters_tsv"] = bids_filename(entities, "clusters", "tsv", prefix, order)
    out["clusters_json"] = bids_filename(entities, "clusters", "json", prefix, order)
    out["design"] = [bids_filename({**run, "contrast": spec.label}, "design", None, prefix, order)
                     for run in per_run]
    return out


def derivative_names(specs, entities, runs, n_runs) -> dict:
    """Relative paths of the derivatives/glm first-level layout (volume names; the surface writer
    derives its GIFTI/CIFTI names from them): maps per contrast label, designs, mask, sidecar, residuals."""
    base = f"first_level/sub-{entities['sub']}"
    maps = {spec.label: {key: f"{base}/" + bids_filename(
        {**entities, "contrast": spec.glm_label, "stat": stat or spec.stat_type}, None, "nii.gz")
        for key, stat in DERIVATIVE_STATS.items()} for spec in specs}
    run_labels = [str((runs[i] if i < len(runs) else {}).get("run") or "") for i in range(n_runs)]
    if "" in run_labels or len(set(run_labels)) < n_runs:  # e.g. run-1 of two sessions
        run_labels = [str(i + 1) for i in range(n_runs)]
    designs = [f"{base}/" + bids_filename({**entities, "run": r if n_runs > 1 else None},
                                          "design-matrix", "png") for r in run_labels]
    residuals = [f"{base}/" + bids_filename({**entities, "run": r if n_runs > 1 else None, "stat": "errorts"},
                                            None, "nii.gz") for r in run_labels]
    sidecar = f"{base}/" + bids_filename(entities, "glm", "json")
    mask = f"{base}/" + bids_filename(entities, "mask", "nii.gz")
    names = {"maps": maps, "designs": designs, "mask": mask, "sidecar": sidecar, "residuals": residuals}
    check_paths([p for m in maps.values() for p in m.values()] + designs
                + [d.removesuffix(".png") + ".tsv" for d in designs] + [mask, sidecar] + residuals)
    return names


def group_derivative_names(contrasts, permutation_maps=()) -> dict:
    """Names of the derivatives/glm group layout, per contrast label, and the sidecar.

    ``group_level/group_contrast-<label>_stat-{t|F,z}.nii.gz`` (``<label>``: the spec's
    ``glm_label``, the name as the user gave it when it is a BIDS label) and
    ``group_level/group_contrast-<label>_{fdr,fwe}-corrected.nii.gz``;
    the design matrix ``group_level/group_design-matrix.tsv``, the mask
    ``group_level/group_mask.nii.gz``, the sidecar ``group_level/group_glm.json``.
    """
    maps = {}
    for spec in contrasts:
        entities = {"contrast": spec.glm_label}  # the user's name verbatim (LAION layout)
        maps[spec.label] = {
            "stat": bids_filename({**entities, "stat": spec.stat_type}, None, "nii.gz", "group"),
            "z_score": bids_filename({**entities, "stat": "z"}, None, "nii.gz", "group"),
            "fdr": bids_filename(entities, "fdr-corrected", "nii.gz", "group"),
            "fwe": bids_filename(entities, "fwe-corrected", "nii.gz", "group"),
        }
        if spec.stat_type == "t":
            for key in permutation_maps:  # nilearn's names: logp_max_t -> stat-logpmaxt
                maps[spec.label][key] = bids_filename({**entities, "stat": key.replace("_", "")},
                                                      None, "nii.gz", "group")
        maps[spec.label] = {k: f"group_level/{v}" for k, v in maps[spec.label].items()}
    names = {"maps": maps, "design": "group_level/group_design-matrix.tsv", "mask": "group_level/group_mask.nii.gz",
             "sidecar": "group_level/group_glm.json"}
    check_paths([p for m in maps.values() for p in m.values()] + [names["design"], names["mask"], names["sidecar"]])
    return names


def weights_json(weights: np.ndarray):
    """Contrast weights as JSON numbers (integral values as ints)."""
    def number(x):
        x = float(x)
        return int(x) if x.is_integer() else x

    array = np.asarray(weights, dtype=float)
    return [number(x) for x in array] if array.ndim == 1 else [weights_json(row) for row in array]
