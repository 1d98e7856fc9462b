"""File names of GLM outputs: nilearn's BIDS-like names, made safe.

The names follow nilearn 0.14's ``_generate_filenames_output`` (see
:func:`chunkglm.interfaces.bids.save_glm_to_bids`). Contrast names become
``contrast-<label>`` entities through nilearn's camelCase conversion,
restricted to ASCII letters and digits (BIDS labels); a name that contains a
path separator, or has no letter or digit, is refused. Every planned path is
checked to be a plain relative path, and no two outputs may share a name.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np

from chunkglm.errors import InputError

_LABEL_CHARS = frozenset(string.ascii_letters + string.digits)
_WORDS = (("-", " Minus "), ("+", " Plus "), (">", " Gt "), ("<", " Lt "), ("_", " "))
_UNSAFE = ("/", "\\", "\x00")

#: nilearn's order of BIDS entities (raw, then derivatives), without the
#: entities nilearn drops from output names (part, echo, hemi, desc).
ENTITY_ORDER = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "space", "res", "den",
                "contrast", "stat")
#: Entities kept across the runs of a model (when their label is unique).
MODEL_ENTITIES = ("sub", "ses", "task", "space")
#: Keys of ``compute_contrast(..., output_type="all")`` and their stat labels.
MAP_STATS = {"effect_size": "effect", "stat": None, "effect_variance": "variance",
             "z_score": "z", "p_value": "p"}


def contrast_label(name) -> str:
    """A contrast name as a BIDS label, as nilearn's ``_clean_contrast_name``.

    ``"a - b"`` -> ``"aMinusB"``, ``"face_vs_house"`` -> ``"faceVsHouse"``,
    ``"a>b"`` -> ``"aGtB"``. Only ASCII letters and digits are kept.

    Raises
    ------
    TypeError
        If ``name`` is not a string.
    InputError
        If it holds a path separator or NUL, or no ASCII letter or digit.
    """
    if not isinstance(name, str):
        raise TypeError(f"contrast names must be strings, not {type(name).__name__} ({name!r}).")
    unsafe = [c for c in _UNSAFE if c in name]
    if unsafe:
        raise InputError(
            f"contrast name {name!r} contains {unsafe[0]!r}: names become file names, so path "
            f"separators are refused. Name the contrast, e.g. contrasts={{'myContrast': {name!r}}}.")
    text = name
    for old, new in _WORDS:
        text = text.replace(old, new)
    words = text.split(" ")
    words = [words[0].lower()] + [word.title() for word in words[1:]]
    label = "".join(ch for ch in " ".join(words) if ch in _LABEL_CHARS)
    if not label:
        raise InputError(
            f"contrast name {name!r} has no ASCII letter or digit, so it cannot become a BIDS "
            "label (contrast-<label>); give it a name such as 'aMinusB'.")
    return label


def bids_filename(entities: dict, suffix: str | None, extension: str | None, prefix: str = "",
                  order=ENTITY_ORDER) -> str:
    """``<prefix>_<key>-<value>_..._<suffix>.<extension>``, keys in ``order``.

    As nilearn's ``create_bids_filename``: entities with an empty label are
    left out; a non-empty prefix gets a trailing ``_``. ``extension=None``
    gives a base name (figures get one extension per format);
    ``suffix=None`` ends the name with the last entity (``..._stat-t``).
    """
    parts = [f"{key}-{entities[key]}" for key in order if entities.get(key) not in (None, "")]
    name = "_".join([*parts, suffix] if suffix else parts) + (f".{extension}" if extension else "")
    return _with_prefix(prefix, name)


def _with_prefix(prefix: str | None, name: str) -> str:
    if prefix and not prefix.endswith("_"):
        prefix += "_"
    return f"{prefix or ''}{name}"


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
    if any(c in prefix for c in _UNSAFE) or prefix in (".", ".."):
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
                      statmap_json=_with_prefix(prefix, "statmap.json"))
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


def group_derivative_names(contrasts, permutation_maps=()) -> dict:
    """Names of the derivatives/glm group layout, per contrast label, and the sidecar.

    ``group_level/group_contrast-<label>_stat-{t|F,z}.nii.gz`` and
    ``group_level/group_contrast-<label>_{fdr,fwe}-corrected.nii.gz``;
    the design matrix ``group_level/group_design-matrix.tsv``, the mask
    ``group_level/group_mask.nii.gz``, the sidecar ``group_level/group_glm.json``.
    """
    maps = {}
    for spec in contrasts:
        entities = {"contrast": spec.label}
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


def check_paths(paths) -> None:
    """Each path is relative, without '..' or empty parts; no two are equal.

    Figure base names (no extension) are checked as they are: the
    extensions added later cannot make them unsafe.
    """
    seen = set()
    for path in paths:
        parts = PurePosixPath(path).parts
        if (not parts or PurePosixPath(path).is_absolute() or "\\" in path
                or any(p in ("", ".", "..") for p in parts)):
            raise InputError(f"refusing to write {path!r}: outputs must stay inside out_dir.")
        if path in seen:
            raise InputError(
                f"two outputs would be written to {path!r}: give contrasts (or runs) distinct names.")
        seen.add(path)


def weights_json(weights: np.ndarray):
    """Contrast weights as JSON numbers (integral values as ints)."""
    def number(x):
        x = float(x)
        return int(x) if x.is_integer() else x

    array = np.asarray(weights, dtype=float)
    return [number(x) for x in array] if array.ndim == 1 else [weights_json(row) for row in array]
