"""``chunkglm meta``: an image-based meta-analysis over a store collection or a table of images.

::

    chunkglm meta --estimator DerSimonianLaird --store S --collection C -o DIR
    chunkglm meta --estimator Stouffers --table images.tsv -o DIR --correct fdr
    chunkglm meta --estimator DerSimonianLaird --table images.tsv -o DIR --groupby study --rho 0.5

``--table`` is a TSV with one row per image and columns among ``z, t, beta,
varcope, se`` (NIfTI paths, relative to the table's folder or absolute),
``sample_sizes``, ``study_id``, ``id`` (``con``, NiMARE 0.0.x's name, is read as ``beta``);
it is converted once into
``DIR/meta.zarr``. Writes the derivatives folder ``DIR/meta/`` (see
:mod:`chunkglm.meta.outputs`) and ``DIR/meta/provenance.json``. A ``DIR/meta/`` whose record
states another analysis is refused before anything is converted or computed; ``--overwrite``
replaces it, its files removed once the new ones are written (:mod:`chunkglm.cli.replace`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from chunkglm.cli._args import add_list, add_output_dir, add_sidedness, path_value, positive_int
from chunkglm.cli._common import (
    add_allow_incomplete,
    add_chunk_mb,
    cluster_client,
    command_budget,
    command_options,
    output_location,
    storage_for,
    write_output_record,
)
from chunkglm.cli.replace import check_folder, remove_replaced
from chunkglm.errors import InputError
from chunkglm.io.derivatives import source_datasets
from chunkglm.io.cohort import open_cohort
from chunkglm.meta import correct, ibma
from chunkglm.meta._inputs import ROLES, convert_meta_maps
from chunkglm.meta._nimare_inputs import with_new_image_types
from chunkglm.io.layout import redact_url
from chunkglm.provenance import Stopwatch, cluster_summary, record


ESTIMATORS = ("Fishers", "Stouffers", "WeightedStouffers", "WeightedLeastSquares", "DerSimonianLaird", "Hedges",
              "VarianceBasedLikelihood", "SampleSizeBasedLikelihood", "PermutedOLS", "FixedEffectsHedges",
              "FFX_GLM", "MFX_GLM", "RFX_GLM")
#: The estimators with NiMARE's weight_scheme / rho (PyMARE meta-regression).
REGRESSION_ESTIMATORS = ("WeightedLeastSquares", "DerSimonianLaird", "Hedges", "VarianceBasedLikelihood",
                         "SampleSizeBasedLikelihood", "FixedEffectsHedges")
WEIGHT_SCHEMES = ("rescale", "individual", "collapse")
CORRECTIONS = {"fdr": ("FDRCorrector", "indep"), "fdr-negcorr": ("FDRCorrector", "negcorr"),
               "bonferroni": ("FWECorrector", "bonferroni"), "montecarlo": ("FWECorrector", "montecarlo")}


def unit_interval(text) -> float:
    """A correlation in [0, 1] (``--rho``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number is needed; received {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a number between 0 and 1 is needed; received {text!r}")
    return value


def add_parser(sub, add_common) -> None:
    """Register the sub-command (``add_common`` adds --cluster and --no-progress)."""
    cmd = sub.add_parser("meta", help="image-based meta-analysis (NiMARE's IBMA estimators)")
    cmd.add_argument("--estimator", required=True, choices=ESTIMATORS, help="NiMARE's IBMA estimator")
    source = cmd.add_mutually_exclusive_group(required=True)
    source.add_argument("--store", type=path_value, help="cohort store holding the collection (this or --table)")
    source.add_argument("--table", type=path_value, help="TSV of NIfTI paths, one row per image (this or --store)")
    cmd.add_argument("--collection", help="maps collection of --store (required with --store, no default)")
    cmd.add_argument("--mask", type=path_value, help="mask image on the maps' grid (default: every "
                                                     "voxel of the store's collection or of the maps)")
    add_output_dir(cmd, "output folder (meta/ goes in it)", "--out")
    add_list(cmd, "--correct", choices=sorted(CORRECTIONS), metavar="METHOD",
             help_text=f"corrections to apply, e.g. --correct fdr bonferroni; one of {sorted(CORRECTIONS)} "
                       "(default: none)")
    cmd.add_argument("--n-iters", type=positive_int, default=5000, help="sign flips for montecarlo")
    cmd.add_argument("--aggressive-mask", action="store_true",
                     help="drop voxels missing in any study (default: fit each missing-data pattern)")
    cmd.add_argument("--groupby", metavar="COLUMN",
                     help="dependence groups: images with the same value in this --table column (or per-image "
                          "coordinate of the --store collection) are one group, modelled as NiMARE 0.22 models "
                          "them; 'none' treats every image as independent (default: study_id, NiMARE's)")
    cmd.add_argument("--weight-scheme", choices=WEIGHT_SCHEMES,
                     help="how images of one dependence group are weighted (NiMARE's weight_scheme; "
                          "regression estimators only; default rescale)")
    cmd.add_argument("--rho", type=unit_interval,
                     help="assumed correlation between the images of one dependence group (NiMARE's rho; "
                          "regression estimators only; default 0.8)")
    add_sidedness(cmd, True, "test")
    add_chunk_mb(cmd)
    cmd.add_argument("--overwrite", action="store_true",
                     help="replace another meta-analysis already in OUTPUT_DIR/meta/ (its provenance record "
                          "states other options: estimator, inputs, corrections...): its files are removed "
                          "once the new ones are written (default: refuse, nothing written; the same "
                          "analysis is always rewritten)")
    add_allow_incomplete(cmd)
    add_common(cmd)
    cmd.set_defaults(func=run)


#: The command's provenance record, relative to OUTPUT_DIR.
RECORD = "meta/provenance.json"


def _inputs(args):
    if args.store:
        if not args.collection:
            raise InputError("--store needs --collection (the maps collection to analyse).")
        cohort = open_cohort(args.store, allow_incomplete=args.allow_incomplete)
        if args.collection not in cohort.maps and args.collection not in cohort.maps.incomplete:
            raise InputError(f"{args.store} has no complete maps collection {args.collection!r}; it has "
                             f"{sorted(cohort.maps)}.")
        return cohort.maps[args.collection]  # an incomplete collection raises, naming it
    table_path = Path(args.table)
    if not table_path.is_file():
        raise InputError(f"--table {args.table}: no such file.")
    table = with_new_image_types(pd.read_csv(table_path, sep="\t"))
    for role in ROLES:
        if role in table.columns:
            table[role] = [str(p) if Path(str(p)).is_absolute() else str(table_path.parent / str(p))
                           for p in table[role]]
    store = output_location(args.output_dir, "meta.zarr")
    return convert_meta_maps(table, store, "meta", mask_img=args.mask)


def _estimator(args):
    two_sided = args.two_sided
    kwargs = {"aggressive_mask": args.aggressive_mask, "chunk_bytes": command_budget(args)}
    if args.mask and args.store:
        kwargs["mask"] = args.mask
    if args.estimator in ("Fishers", "Stouffers", "WeightedStouffers", "PermutedOLS", "FFX_GLM", "MFX_GLM",
                          "RFX_GLM"):
        kwargs["two_sided"] = two_sided
    elif not two_sided:
        raise InputError(f"{args.estimator} has no one-sided option (NiMARE's neither).")
    for option, name in (("--weight-scheme", "weight_scheme"), ("--rho", "rho")):
        if getattr(args, name) is None:
            continue
        if args.estimator not in REGRESSION_ESTIMATORS:
            raise InputError(f"{option} applies to the regression estimators {list(REGRESSION_ESTIMATORS)} "
                             f"(NiMARE's {name}); {args.estimator} has none.")
        kwargs[name] = getattr(args, name)
    if args.groupby is not None:
        kwargs["groupby"] = _groupby(args)
    return getattr(ibma, args.estimator)(**kwargs)


def _groupby(args):
    """``--groupby``: False for 'none'; a --table column's values (any column, one label per row);
    a --store collection's per-image coordinate by name."""
    if args.groupby.lower() == "none":
        return False
    if not args.table:
        return args.groupby
    columns = pd.read_csv(args.table, sep="\t", nrows=0).columns
    if args.groupby not in columns:
        raise InputError(f"--groupby {args.groupby}: the table {args.table} has no such column; it has "
                         f"{list(columns)}.")
    return pd.read_csv(args.table, sep="\t", usecols=[args.groupby], dtype=str)[args.groupby].tolist()


def run(args) -> int:
    """Entry point of ``chunkglm meta``."""
    stopwatch = Stopwatch()
    estimator = _estimator(args)
    options = command_options(args)
    replaced = check_folder(args.output_dir, [RECORD], {"options": options}, command="meta",
                            overwrite=args.overwrite)  # before the table's maps are converted
    with cluster_client(args) as client:
        result = estimator.fit(_inputs(args))
        for name in args.correct or []:
            klass, method = CORRECTIONS[name]
            kwargs = {"n_iters": args.n_iters} if method == "montecarlo" else {}
            result = getattr(correct, klass)(method=method, **kwargs).transform(result)
        with source_datasets([args.store or args.table]):
            written = result.save_derivatives(args.output_dir)
        cluster = cluster_summary(client)
    outputs = sorted(f"meta/{Path(str(p)).name}" for p in written.values())
    for path in remove_replaced(args.output_dir, replaced, outputs, RECORD):
        print(f"removed {path} (--overwrite: of the analysis replaced)", file=sys.stderr, flush=True)
    write_output_record(args.output_dir, RECORD,
                        record("meta", inputs=[result._inputs.describe()], options=options, cluster=cluster,
                               stopwatch=stopwatch, outputs=outputs), storage_for(args))
    print(f"derivatives: {redact_url(output_location(args.output_dir, 'meta'))}")
    return 0
