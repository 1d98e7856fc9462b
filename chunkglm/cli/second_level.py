"""``chunkglm second-level``: a group GLM over first-level results, group derivatives out.

Input: the output folder of ``chunkglm first-level`` (or of nilearn's
``save_glm_to_bids``: ``sub-XX/sub-XX_..._contrast-<C>_stat-effect_statmap.nii.gz``;
surface runs' layouts too: one GIFTI file per hemisphere, ``..._hemi-L_contrast-<C>_stat-effect.func.gii``,
modelled on the mesh of the space their sidecar records, e.g. fsaverage5, or CIFTI dense scalar
files, ``..._contrast-<C>_stat-effect.dscalar.nii``; the group maps are then written in the same format,
``group_level/group_hemi-L_contrast-<C>_stat-z.func.gii`` or ``..._stat-z.dscalar.nii``),
or a cohort store holding a ``maps/<collection>`` node. The maps are loaded once
into a maps node (a store), the model is fitted over voxel blocks, and
:func:`chunkglm.interfaces.bids.save_group_derivatives` writes
``OUTPUT_DIR/group_level/`` (stat and z maps, FDR and FWE corrected maps, the
sidecar; ``--layout glm``, the default), nilearn's ``save_glm_to_bids`` group
file set goes to ``OUTPUT_DIR/group/`` (``--layout nilearn`` or ``both``), the
residuals only with ``--save-residuals``; with ``--n-perm`` the FWE maps of t contrasts come from nilearn's
max-T permutation test (plus TFCE / cluster maps with ``--tfce`` /
``--cluster-forming-p``), run first by
:func:`chunkglm.glm.second_level.permutation_maps` with a progress bar per
contrast, named. A provenance
record (``group_level/group_provenance.json``; ``group/`` with ``--layout nilearn``) is
written last. An output folder whose record states another analysis (options, inputs, design) is
refused before anything is computed; ``--overwrite`` replaces it, its files removed once the new
ones are written (:mod:`chunkglm.cli.replace`).

The design: an intercept (one-sample test) plus the covariates of
``--design`` (a TSV with a ``subject_label`` or ``participant_id`` column
and one column per covariate, e.g. BIDS ``participants.tsv``; ``--covariates``
picks columns, text columns are dummy coded against a reference level, numeric
ones mean-centred with ``--center-covariates``; see
:mod:`chunkglm.design.covariates`), built with nilearn's
``make_second_level_design_matrix``; rows follow the maps' subjects. The
provenance record states each covariate's coding (``design.covariates``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nilearn.surface import InMemoryMesh, PolyMesh, SurfaceImage

from chunkglm.cli._args import (
    add_list,
    add_output_dir,
    add_sidedness,
    deprecated_alias,
    nonnegative,
    path_value,
    probability,
    split_list,
)
from chunkglm.cli._common import (
    add_allow_incomplete,
    add_chunk_mb,
    chunk_bytes,
    cluster_client,
    command_budget,
    command_options,
    open_if_store,
    output_location,
    print_skipped,
    relative_output,
    storage_for,
    write_output_record,
)
from chunkglm.cli.first_level import parse_contrasts as parse_pairs
from chunkglm.cli.progress import Reporter
from chunkglm.cli.replace import check_folder, remove_replaced
from chunkglm.design.covariates import MISSING, encode_covariates, parse_reference
from chunkglm.design.second_level import make_second_level_design_matrix
from chunkglm.errors import InputError
from chunkglm.glm.second_level import (
    SecondLevelModel,
    check_permutation_options,
    parse_contrast,
    permutation_maps,
)
from chunkglm.interfaces.bids import (
    check_correction_options,
    permutation_contrasts,
    save_group_derivatives,
    write_glm_to_bids,
)
from chunkglm.io.convert import file_sha256
from chunkglm.io.derivatives import contrast_label, source_datasets
from chunkglm.io.layout import redact_url
from chunkglm.io.mesh_spaces import gifti_files, gifti_pair, gifti_pair_data, layout_gifti_image
from chunkglm.io.surface import SurfaceGrid
from chunkglm.provenance import Stopwatch, cluster_summary, record

_EFFECT = re.compile(r"^sub-([A-Za-z0-9]+)_(?:.*_)?contrast-([A-Za-z0-9]+)_stat-effect_statmap\.nii(\.gz)?$")
_GLM_EFFECT = re.compile(r"^sub-([A-Za-z0-9]+)_(?:.*_)?contrast-([A-Za-z0-9]+)_stat-effect\.nii(\.gz)?$")
_CIFTI_EFFECT = re.compile(r"^sub-([A-Za-z0-9]+)_(?:.*_)?contrast-([A-Za-z0-9]+)_stat-effect\.dscalar\.nii$")
_GIFTI_EFFECT = re.compile(r"^sub-([A-Za-z0-9]+)_(?:.*_)?hemi-L_(?:.*_)?contrast-([A-Za-z0-9]+)_stat-effect\.func\.gii$")
#: Where first-level effect maps are, in the order searched: the derivatives/glm layout
#: (``chunkglm first-level``'s default; its surface forms: a CIFTI dense scalar file, or a GIFTI file
#: per hemisphere, found by its hemi-L file), then nilearn's save_glm_to_bids file set.
EFFECT_LAYOUTS = (("first_level/sub-*/sub-*_stat-effect.nii*", _GLM_EFFECT),
                  ("first_level/sub-*/sub-*_stat-effect.dscalar.nii", _CIFTI_EFFECT),
                  ("first_level/sub-*/sub-*_hemi-L_*stat-effect.func.gii", _GIFTI_EFFECT),
                  ("sub-*/**/sub-*_stat-effect_statmap.nii*", _EFFECT))


def add_parser(sub, add_common) -> None:
    """Register the sub-command (``add_common`` adds --cluster and --no-progress)."""
    cmd = sub.add_parser("second-level", help="group GLM (+ permutation inference), group derivatives out")
    cmd.add_argument("input", type=path_value,
                     help="a first-level derivatives folder (first_level/sub-XX/..._stat-effect.nii.gz, "
                          "or nilearn's sub-XX/..._stat-effect_statmap.nii.gz) or a cohort store with a "
                          "maps collection")
    add_output_dir(cmd, "output folder (group_level/ goes in it)", "--out-dir", "--out")
    cmd.add_argument("--first-level-contrast", metavar="NAME",
                     help="derivatives input: the first-level contrast whose effect maps are modelled "
                          "(its name or its file label, e.g. 'a - b' or aMinusB; required for a "
                          "derivatives input, no default)")
    cmd.add_argument("--task", help="derivatives input: keep the maps of this task only (default: all)")
    cmd.add_argument("--collection", help="store input: the maps collection (default: the only one)")
    add_design_options(cmd)
    add_list(cmd, "-c", "--contrast", metavar="NAME=EXPRESSION",
             help_text='t contrast over the design columns, e.g. "mean=intercept" or "age=age", '
                       'or F contrast "effects=intercept; age"; several: -c "mean=intercept" "age=age" '
                       "(default: mean=intercept)")
    add_list(cmd, "--mask", metavar="PATH", type=path_value,
             help_text="analysis mask, of the maps' kind: a NIfTI volume; for GIFTI maps one file per "
                       "hemisphere (--mask L.func.gii R.func.gii, or the hemi-L file alone when its hemi-R "
                       "file is beside it); for CIFTI maps a .dscalar.nii on their brain-model axis "
                       "(default: nilearn's background mask of the mean map; on surfaces the elements "
                       "finite in every map)")
    cmd.add_argument("--smoothing-fwhm", type=nonnegative, metavar="MM",
                     help="smooth each map when it is loaded (default: no smoothing)")
    cmd.add_argument("--alpha", type=probability, default=0.05,
                     help="FDR q and FWE p of the corrected maps (in the glm layout; nilearn's file set has "
                          "no corrected maps, its cluster tables use nilearn's p < 0.001)")
    add_sidedness(cmd, True, "tests (FDR, FWE and max-T corrections)")
    deprecated_alias(cmd, "--min-cluster-size", dest="cluster_threshold", new="--cluster-threshold",
                     type=int)
    cmd.add_argument("--cluster-threshold", action=_ClusterThreshold, default=0, metavar="VOXELS",
                     help="remove clusters smaller than this many voxels from the corrected maps "
                          "(nilearn's cluster_threshold, as in `chunkglm report`)")
    cmd.add_argument("--cluster-forming-p", type=float, metavar="P",
                     help="with --n-perm: cluster-forming uncorrected p (e.g. 0.001) for cluster size "
                          "and mass FWE p-values (nilearn's threshold; default: none, no cluster "
                          "inference)")
    cmd.add_argument("--n-perm", type=int, default=0, metavar="N",
                     help="permutations for the FWE maps of t contrasts (nilearn's max-T test); "
                          "0: Bonferroni")
    cmd.add_argument("--tfce", action="store_true", help="with --n-perm: TFCE maps and their FWE p-values")
    cmd.add_argument("--random-state", type=int,
                     help="seed of the permutations (nilearn's random_state; default: none, a new "
                          "seed each run)")
    add_layout_options(cmd)
    add_chunk_mb(cmd)
    cmd.add_argument("--store", type=path_value,
                     help="derivatives input: a store to load the maps into, kept (default: a "
                          "temporary one, removed at the end). Refused with a store input, whose maps "
                          "are read where they are")
    cmd.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                     help="option of the store's object storage (see first-level); repeat "
                          "(default: none)")
    cmd.add_argument("--overwrite", action="store_true",
                     help="replace another analysis already in the output folder (its provenance record "
                          "states other options, inputs or design): its files are removed once the new "
                          "results are written (default: refuse, nothing written; the same analysis is "
                          "always rewritten)")
    add_allow_incomplete(cmd)
    add_common(cmd)
    cmd.set_defaults(func=run)


#: Where the command's provenance record is, per --layout folder (group_level/, nilearn's group/).
RECORDS = ("group_level/group_provenance.json", "group/group_provenance.json")


def add_layout_options(cmd) -> None:
    """--layout and --save-residuals, as first-level's, for the group."""
    cmd.add_argument(
        "--layout", choices=("glm", "nilearn", "both"), default="glm",
        help="file set. glm (default): group_level/ (t|F and z maps, FDR and FWE corrected maps, "
             "permutation maps, the design, the mask, one JSON sidecar), what `chunkglm report` reads. "
             "nilearn: nilearn's save_glm_to_bids group file set in group/ (effect, variance, t|F, p, z "
             "per contrast, cluster tables at nilearn's p < 0.001 with --cluster-threshold and "
             "--two-sided/--one-sided, r-squared, figures, a report page); no corrected or permutation "
             "maps, so it refuses --n-perm. both: the two")
    cmd.add_argument(
        "--save-residuals", action="store_true",
        help="also write the residuals, one volume per input map (group_level/group_stat-errorts.nii.gz, "
             "or nilearn's group/stat-errorts_statmap.nii.gz with --layout nilearn or both); the fit "
             "then keeps them in memory (default: not written)")


class _ClusterThreshold(argparse.Action):
    """``--cluster-threshold VOXELS``; its old meaning, a cluster-forming p in (0, 1), still works
    with a note (a voxel count is a whole number, so the two cannot be confused)."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            value = float(values)
        except ValueError:
            parser.error(f"{option_string} takes a cluster size in voxels (a whole number >= 0); "
                         f"received {values!r}")
        if 0 < value < 1:
            print(f"{parser.prog}: note: {option_string} {values} as a cluster-forming p is deprecated; "
                  f"use --cluster-forming-p {values} ({option_string} is a cluster size in voxels, "
                  "as in `chunkglm report` and nilearn)", file=sys.stderr)
            namespace.cluster_forming_p = value
            return
        if value < 0 or value != int(value):
            parser.error(f"{option_string} takes a cluster size in voxels (a whole number >= 0); "
                         f"received {values!r}; a cluster-forming p goes to --cluster-forming-p")
        setattr(namespace, self.dest, int(value))


def add_design_options(cmd) -> None:
    """--design (a participants-style TSV), --covariates, --center-covariates, --reference."""
    cmd.add_argument("--design", metavar="TSV", type=path_value,
                     help="covariates table: a TSV with a subject_label (or participant_id) column and "
                          "one column per covariate, e.g. BIDS participants.tsv; the design is intercept "
                          "+ covariates (default: intercept only, a one-sample test)")
    add_list(cmd, "--covariates", metavar="COLUMN",
             help_text="the columns of --design to model, e.g. --covariates age sex; text columns are "
                       "dummy coded, one 0/1 column <column>_<level> per level but the reference "
                       "(default: every column of --design)")
    cmd.add_argument("--center-covariates", action="store_true",
                     help="subtract each numeric covariate's mean over the modelled subjects, so the "
                          "intercept is the mean effect at the mean covariate (default: values as given)")
    add_list(cmd, "--reference", metavar="COLUMN=LEVEL",
             help_text="the reference level of a categorical covariate, absorbed by the intercept, e.g. "
                       "--reference sex=F; also makes a numeric column categorical (default: the first "
                       "level in sorted order)")


# -- inputs ------------------------------------------------------------------------------------

def effect_maps(folder, first_level_contrast, task=None) -> tuple[list[str], list[str]]:
    """The effect maps of one first-level contrast in a derivatives folder, one per subject.

    The derivatives/glm layout (``first_level/sub-XX/..._contrast-C_stat-effect.nii.gz``) is
    read when it holds the contrast, else nilearn's file set
    (``sub-XX/..._contrast-C_stat-effect_statmap.nii.gz``): a folder with both (``--layout
    both``) holds the same maps twice. Contrast labels match whatever their case.

    Returns
    -------
    subjects, paths : list of str
        Sorted by subject label.
    """
    if not first_level_contrast:
        raise InputError("a first-level derivatives input needs --first-level-contrast NAME (the "
                         "contrast whose effect maps are modelled).")
    # nilearn's file labels are lower case for first-level models ("a - b" -> aminusb), the
    # derivatives/glm layout's keep the user's case (aMinusB)
    wanted = {first_level_contrast.lower(), contrast_label(first_level_contrast).lower()}
    root = Path(folder)
    found, contrasts = {}, set()
    for pattern, regex in EFFECT_LAYOUTS:
        found = _layout_maps(root, pattern, regex, wanted, task, contrasts)
        if found:
            break
    if not found:
        detail = (f"contrasts found: {sorted(contrasts)}" if contrasts
                  else "no first_level/sub-XX/*_contrast-<C>_stat-effect.nii.gz or "
                       "sub-XX/*_contrast-<C>_stat-effect_statmap.nii.gz file at all")
        raise InputError(f"no effect map of contrast {first_level_contrast!r} in {root} ({detail}). "
                         "Pass the output folder of `chunkglm first-level` and one of its contrasts.")
    subjects = sorted(found)
    return subjects, [found[s] for s in subjects]


def _layout_maps(root, pattern, regex, wanted, task, contrasts) -> dict:
    """``{subject: path}`` of the wanted contrast's effect maps of one layout; adds every
    contrast label seen to ``contrasts``."""
    found = {}
    for path in sorted(root.glob(pattern)):
        match = regex.match(path.name)
        if match is None or (task and f"_task-{task}_" not in f"_{path.name}"):
            continue
        subject, label = match.group(1), match.group(2)
        contrasts.add(label)
        if label.lower() in wanted:
            if subject in found:
                raise InputError(f"sub-{subject} has several effect maps of contrast {label!r} "
                                 f"({found[subject]}, {path}); select one with --task.")
            found[subject] = str(path)
    return found


def store_maps(cohort, collection):
    """The maps node to model and its subject labels (None when it has no subject coordinate).

    An incomplete collection is never modelled: asked for by name it raises; when the
    only collection is chosen, incomplete ones are refused (or skipped, --allow-incomplete).
    """
    nodes = cohort.maps
    if collection is None:
        cohort.check_selection([f"maps/{n}" for n in nodes.incomplete])
        if len(nodes) != 1:
            raise InputError(f"the store holds {len(nodes)} maps collections {sorted(nodes)}: choose one "
                             "with --collection.")
        collection = next(iter(nodes))
    if collection not in nodes and collection not in nodes.incomplete:
        raise InputError(f"no maps collection {collection!r} in the store; it holds {sorted(nodes)}.")
    node = nodes[collection]
    dataset = node.to_dataset()
    subjects = [str(s) for s in dataset["subject"].values] if "subject" in dataset.variables else None
    return node, subjects


def read_covariates(path) -> pd.DataFrame:
    """A covariates TSV with a ``subject_label`` column (labels without ``sub-``); ``n/a`` is missing."""
    try:
        table = pd.read_csv(path, sep="\t", dtype={"subject_label": str, "participant_id": str},
                            na_values=list(MISSING))
    except (OSError, ValueError) as error:  # pandas' ParserError and EmptyDataError are ValueErrors
        raise InputError(f"cannot read the design TSV {path}: {error}. Give a tab-separated table with a "
                         "subject_label column and one row per subject.") from error
    if "subject_label" not in table.columns:
        if "participant_id" not in table.columns:
            raise InputError(f"the design TSV {path} has columns {list(table.columns)}: it needs a "
                             "subject_label (or participant_id) column and one column per covariate.")
        table = table.rename(columns={"participant_id": "subject_label"})
    table["subject_label"] = table["subject_label"].astype(str).str.removeprefix("sub-")
    counts = table["subject_label"].value_counts()
    twice = sorted(counts.index[counts > 1])
    if twice:
        raise InputError(f"the design TSV {path} has several rows for subject(s) {twice[:10]}; give one row "
                         "per subject.")
    return table


def design_for(subjects, covariates_path, n_maps, columns=None, *, center=False,
               reference=None) -> tuple[pd.DataFrame, dict]:
    """intercept (+ covariates), one row per map, in the maps' order; and the covariates'
    description (types, levels, reference levels, means) for the output's JSON."""
    if covariates_path is None:
        given = [flag for flag, value in (("--covariates", columns), ("--center-covariates", center),
                                          ("--reference", reference)) if value]
        if given:
            raise InputError(f"{', '.join(given)} select(s) columns of --design TSV; give --design "
                             "participants.tsv with it.")
        return pd.DataFrame({"intercept": [1.0] * n_maps}), {}
    if subjects is None:
        raise InputError("--design matches covariates to maps by subject, but the maps collection has "
                         "no subject coordinate; convert the maps from BIDS-named files (sub-XX_...).")
    table = read_covariates(covariates_path)
    missing = sorted(set(subjects) - set(table["subject_label"]))
    if missing:
        raise InputError(f"the design TSV {covariates_path} has no row for subject(s) {missing[:10]}; "
                         "give one row per subject whose map is modelled.")
    covariates, description = encode_covariates(table, subjects, columns, center=center,
                                                reference=parse_reference(reference),
                                                source=f"the design TSV {covariates_path}")
    return make_second_level_design_matrix(list(subjects), covariates), description


def parse_contrasts(items) -> tuple[dict, dict]:
    """``NAME=EXPRESSION`` items -> definitions and types (``;`` separates F rows)."""
    definitions, types = {}, {}
    for name, expression in parse_pairs(items or ["mean=intercept"]).items():
        rows = [row.strip() for row in expression.split(";") if row.strip()]
        definitions[name] = rows[0] if len(rows) == 1 else rows
        types[name] = "t" if len(rows) == 1 else "F"
    return definitions, types


def contrast_weights(definitions, design) -> dict:
    """F rows (formulas) -> a weight matrix over the design's columns."""
    columns = [str(c) for c in design.columns]
    return {name: (np.vstack([parse_contrast(row, columns) for row in value])
                   if isinstance(value, list) else value)
            for name, value in definitions.items()}


def _check_permutation_args(args) -> None:
    if args.layout == "nilearn" and args.n_perm:
        raise InputError("--n-perm writes permutation maps in the glm layout (group_level/), which --layout "
                         "nilearn leaves out: use --layout both, or leave --n-perm out.")
    if args.n_perm < 0:
        raise InputError(f"--n-perm must be >= 0 (0: Bonferroni FWE); received {args.n_perm}.")
    if args.n_perm == 0 and (args.tfce or args.cluster_forming_p is not None):
        raise InputError("--tfce and --cluster-forming-p are permutation tests: give --n-perm N "
                         "(e.g. 5000) with them.")


# -- the command -------------------------------------------------------------------------------

def _inputs(args, reporter):
    """(second_level_input, subjects, provenance inputs)."""
    cohort = open_if_store(args.input, storage_for(args), args.allow_incomplete)
    if cohort is not None:
        if args.store is not None:
            raise InputError(f"--store {args.store}: the input {args.input} is already a cohort store, "
                             "whose maps are read where they are; --store names where the maps of a "
                             "derivatives folder are loaded. Leave --store out.")
        node, subjects = store_maps(cohort, args.collection)
        print_skipped(cohort, reporter.line)
        reporter.line(f"maps: {node.path} of {args.input} ({node.data().shape[0]} maps)")
        return node, subjects, [{"node": node.path, "store": str(args.input)}]
    if not Path(args.input).is_dir():
        raise InputError(f"{args.input} is neither a cohort store nor a folder of first-level derivatives.")
    subjects, paths = effect_maps(args.input, args.first_level_contrast, args.task)
    reporter.line(f"maps: {len(paths)} effect maps of contrast {args.first_level_contrast!r}")
    files = [f for p in paths for f in ([p, gifti_pair(p)["right"]] if p.endswith(".func.gii") else [p])]
    entries = [{"path": str(Path(p).absolute()), "size": Path(p).stat().st_size,
                "sha256": file_sha256(p)} for p in files]
    if paths[0].endswith(".func.gii"):
        paths = [gifti_pair_map(p) for p in paths]
    return paths, subjects, entries


def gifti_pair_map(left):
    """A first-level GIFTI pair (``..._hemi-L_...func.gii`` and its hemi-R file) as a SurfaceImage on the mesh
    of the space its sidecar records (``"Space": "fsaverage5"``; a layout without one: the mesh nilearn ships
    with its number of vertices), :func:`chunkglm.io.mesh_spaces.layout_gifti_image`."""
    return layout_gifti_image(gifti_pair(left))


#: How each kind of maps takes its --mask.
MASK_FORMS = {"volume": "a NIfTI volume (.nii/.nii.gz)",
              "mesh": "a GIFTI file per hemisphere (two .gii files, or the hemi-L file with its hemi-R sibling)",
              "cifti": "a CIFTI dense scalar (.dscalar.nii) on the maps' brain-model axis"}


def _maps_kind(second_level_input) -> str:
    """``volume``, ``mesh`` or ``cifti``: the kind of the maps modelled (files, SurfaceImages or a node)."""
    if isinstance(second_level_input, list):
        first = second_level_input[0]
        if not isinstance(first, str):
            return "mesh"  # GIFTI pairs, loaded as SurfaceImages
        return "cifti" if first.endswith(".dscalar.nii") else "volume"
    grid = second_level_input.grid
    return grid.kind if isinstance(grid, SurfaceGrid) else "volume"


def _mask_kind(paths) -> str | None:
    names = [str(p).lower() for p in paths]
    if all(n.endswith(".gii") for n in names):
        return "mesh"
    if len(names) == 1 and names[0].endswith(".dscalar.nii"):
        return "cifti"
    if len(names) == 1 and names[0].endswith((".nii", ".nii.gz")):
        return "volume"
    return None


def _cifti_mask(path):
    try:
        image = nib.load(str(path))
    except (OSError, ValueError) as error:  # nibabel's ImageFileError is a ValueError
        raise InputError(f"--mask {path}: cannot read it as a CIFTI dense scalar ({error}).") from error
    if type(image).__name__ != "Cifti2Image":
        raise InputError(f"--mask {path}: a {type(image).__name__}, not a CIFTI-2 dense scalar; give "
                         f"{MASK_FORMS['cifti']}.")
    return image


def mask_input(paths, second_level_input):
    """The model's ``mask_img`` from ``--mask`` (None: none given), of the maps' kind: a NIfTI path, a
    SurfaceImage of a GIFTI pair on the maps' mesh, or a CIFTI dense scalar image; another kind, or
    another number of files, is refused in one line."""
    if not paths:
        return None
    maps, given = _maps_kind(second_level_input), _mask_kind(paths)
    if given != maps:
        what = f"a {given} mask" if given else "not a mask chunkglm reads"
        raise InputError(f"--mask {' '.join(map(str, paths))}: {what}, but the maps are {maps} maps; give "
                         f"{MASK_FORMS[maps]}.")
    if maps == "volume":
        return paths[0]
    if maps == "cifti":
        return _cifti_mask(paths[0])
    files = gifti_files(paths)
    data = gifti_pair_data(files)
    mesh = (second_level_input[0].mesh if isinstance(second_level_input, list)
            else PolyMesh(**{part: InMemoryMesh(*second_level_input.grid.meshes[part])
                             for part, _ in second_level_input.grid.parts}))
    sizes = {part: m.n_vertices for part, m in mesh.parts.items()}
    found = {part: len(values) for part, values in data.items()}
    if found != sizes:
        raise InputError(f"--mask {sorted(files.values())}: {found} vertices per hemisphere, the maps' mesh "
                         f"{sizes}; give a mask on the maps' mesh.")
    return SurfaceImage(mesh, data)


def run_permutations(model, weights, types, args, reporter) -> tuple[dict | None, dict | None]:
    """The max-T permutation maps of every t contrast (``--n-perm``) and their settings; (None, None) for 0.

    One progress bar per contrast, named (``permutations, contrast age (2/3)``), over its voxel
    blocks; without bars, lines ``[3/8] contrast age: permutation blocks``.
    """
    if args.n_perm == 0:
        return None, None
    settings = {"n_perm": args.n_perm, "random_state": args.random_state, "tfce": args.tfce,
                "threshold": args.cluster_forming_p, "two_sided_test": args.two_sided}
    check_permutation_options(settings["threshold"], settings["tfce"], settings["n_perm"])
    tested = permutation_contrasts(model, weights, types)
    maps = {}
    for number, (name, con_val) in enumerate(tested.items(), 1):
        with reporter.phase(f"permutations, contrast {name} ({number}/{len(tested)})") as advance:
            def progress(done, total, advance=advance, name=name):
                advance(f"contrast {name}: permutation blocks", done=done, total=total)

            maps[name] = permutation_maps(model, con_val, **settings, progress=progress)
    return maps, settings


def _write(args, model, weights, types, maps, settings) -> list:
    """The file sets of ``--layout``; returns every file written."""
    paths = []
    if args.layout in ("glm", "both"):
        paths += save_group_derivatives(
            model, weights, args.output_dir, contrast_types=types, alpha=args.alpha,
            two_sided=args.two_sided, cluster_threshold=args.cluster_threshold,
            permutation_maps=maps, permutation=settings,
            residuals=args.save_residuals and args.layout == "glm")
    if args.layout in ("nilearn", "both"):
        paths += write_glm_to_bids(model, weights, contrast_types=types, out_dir=args.output_dir,
                                   residuals=args.save_residuals, two_sided=args.two_sided,
                                   cluster_threshold=args.cluster_threshold)
    return paths


def run(args) -> int:
    """Entry point of ``chunkglm second-level``."""
    stopwatch = Stopwatch()
    _check_permutation_args(args)
    definitions, types = parse_contrasts(args.contrast)
    reporter = Reporter(bars=not args.no_progress)
    with cluster_client(args) as client:
        second_level_input, subjects, entries = _inputs(args, reporter)
        n_maps = (len(second_level_input) if isinstance(second_level_input, list)
                  else int(second_level_input.data().shape[0]))
        design, covariates = design_for(subjects, args.design, n_maps, split_list(args.covariates),
                                        center=args.center_covariates, reference=args.reference)
        weights = contrast_weights(definitions, design)  # unknown columns fail here, before the fit
        mask = mask_input(args.mask, second_level_input)
        described = {"columns": [str(c) for c in design.columns], "subjects": subjects,
                     "rows": int(len(design)), "covariates": covariates}
        options = command_options(args)
        replaced = check_folder(args.output_dir, RECORDS, {"options": options, "inputs": entries,
                                                           "design": described},
                                command="second-level", overwrite=args.overwrite, extra=("inputs", "design"))
        store = args.store if isinstance(second_level_input, list) else None
        keep = args.save_residuals or args.layout != "glm"  # nilearn's set has r-squared (and residuals)
        model = SecondLevelModel(mask_img=mask, smoothing_fwhm=args.smoothing_fwhm, store=store,
                                 chunk_bytes=command_budget(args) or chunk_bytes(None, None),
                                 minimize_memory=not keep)
        with reporter.phase("loading and fitting") as advance:
            model.fit(second_level_input, design_matrix=design)
            advance("fitted")
        check_correction_options(args.alpha, args.two_sided, args.cluster_threshold)
        maps, settings = run_permutations(model, weights, types, args, reporter)
        with reporter.phase("writing"), source_datasets([args.input]):
            paths = _write(args, model, weights, types, maps, settings)
        outputs = [relative_output(p, args.output_dir) for p in paths]
        content = record("second-level", inputs=entries, options=options,
                         cluster=cluster_summary(client), stopwatch=stopwatch, design=described,
                         outputs=outputs)
    folder = "group" if args.layout == "nilearn" else "group_level"  # beside the files written
    for path in remove_replaced(args.output_dir, replaced, outputs, f"{folder}/group_provenance.json"):
        reporter.line(f"removed {path} (--overwrite: of the analysis replaced)")
    write_output_record(args.output_dir, f"{folder}/group_provenance.json", content, storage_for(args))
    for path in outputs:
        reporter.line(f"wrote {path}")
    print(f"group derivatives: {redact_url(output_location(args.output_dir, folder))}")
    return 0
