"""``chunkglm first-level``: every subject of a BIDS folder or store, one graph.

Writes nilearn's ``save_glm_to_bids`` file set (``OUT_DIR/sub-XX/``) and the
derivatives/glm layout (``OUT_DIR/first_level/sub-XX/`` with its JSON).

1. A BIDS folder is converted (resumably) into a store first.
2. ``first_level_from_bids`` on the store gives one model per subject.
3. Contrasts are checked against every design before anything is computed.
4. The subjects' fits are evaluated in waves on the cluster (each chunk read
   once; a bounded number of subjects in memory, so a cohort of any size runs
   in flat memory), and each subject's derivatives are written as it is done.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from chunkglm.errors import InputError


def add_parser(sub, add_cluster) -> None:
    """Register the sub-command."""
    cmd = sub.add_parser("first-level", help="first-level GLM for every subject, BIDS derivatives out")
    cmd.add_argument("input", help="a BIDS/fMRIPrep folder or a cohort store")
    cmd.add_argument("-o", "--out-dir", required=True, help="output folder for the derivatives")
    cmd.add_argument("--task", required=True)
    cmd.add_argument("--space")
    cmd.add_argument("--subject", action="append", help="repeat for several (default: all)")
    cmd.add_argument("-c", "--contrast", action="append", required=True, metavar="NAME=EXPRESSION",
                     help='t contrast "aMinusB=a - b" (a formula over design columns), or F '
                          'contrast "effects=a; b" (one formula per row); repeat')
    cmd.add_argument("--confounds", help="comma-separated confound columns, e.g. trans_x,trans_y,csf")
    cmd.add_argument("--noise-model", default="ar1", choices=["ar1", "ols"])
    cmd.add_argument("--hrf-model", default="glover")
    cmd.add_argument("--drift-model", default="cosine")
    cmd.add_argument("--high-pass", type=float, default=0.01)
    cmd.add_argument("--store", help="store for a BIDS input (default: OUT_DIR/cohort.zarr)")
    add_cluster(cmd)
    cmd.set_defaults(func=run)


def parse_contrasts(items) -> dict[str, str]:
    """``["aMinusB=a - b"]`` -> ``{"aMinusB": "a - b"}``."""
    contrasts = {}
    for item in items:
        name, sep, expression = item.partition("=")
        if not sep or not name.strip() or not expression.strip():
            raise InputError(f"--contrast takes NAME=EXPRESSION, e.g. 'aMinusB=a - b'; received {item!r}.")
        contrasts[name.strip()] = expression.strip()
    return contrasts


def _store_for(args, client):
    from chunkglm.cli.main import print_progress
    from chunkglm.glm.from_bids import _as_cohort
    from chunkglm.io.convert import convert

    if _as_cohort(args.input) is not None:
        return args.input
    store = args.store or str(Path(args.out_dir) / "cohort.zarr")
    convert(args.input, store, task=args.task, space=args.space, subjects=args.subject,
            client=client, progress=print_progress)
    return store


def _models(args, store):
    from chunkglm.glm.from_bids import first_level_from_bids

    columns = [c.strip() for c in args.confounds.split(",")] if args.confounds else None
    models, runs, events, confounds = first_level_from_bids(
        store, args.task, space_label=args.space, sub_labels=args.subject,
        noise_model=args.noise_model, hrf_model=args.hrf_model, drift_model=args.drift_model,
        high_pass=args.high_pass, confounds_columns=columns)
    for model, run_list, ev, conf in zip(models, runs, events, confounds):
        model.fit(run_list, events=ev, confounds=conf)
    return models


def model_contrasts(model, contrasts):
    """Per model: name -> weights (t: a formula; F: a matrix of formula rows), and types."""
    from nilearn.glm.contrasts import expression_to_contrast_vector

    from chunkglm.glm.first_level import _expression

    columns = list(model.design_matrices_[0].columns)
    weights, types = {}, {}
    for name, expression in contrasts.items():
        rows = [row.strip() for row in expression.split(";") if row.strip()]
        if len(rows) == 1:
            weights[name], types[name] = rows[0], "t"
        else:
            weights[name] = np.vstack([_expression(r, columns, expression_to_contrast_vector) for r in rows])
            types[name] = "F"
    for value in weights.values():
        model._contrast_vectors(value)  # raises InputError naming the columns
    return weights, types


def run(args) -> int:
    """Entry point of ``chunkglm first-level``."""
    from chunkglm.cli.main import cluster_client
    from chunkglm.glm.first_level import fitted_in_waves
    from chunkglm.interfaces.bids import save_glm_derivatives, save_glm_to_bids

    contrasts = parse_contrasts(args.contrast)
    with cluster_client(args.cluster) as client:
        store = _store_for(args, client)
        models = _models(args, store)
        per_model = [model_contrasts(model, contrasts) for model in models]  # fail before computing
        print(f"fitting {len(models)} subject(s), {sum(len(m._runs) for m in models)} run(s)",
              file=sys.stderr, flush=True)
        for done, (model, (weights, types)) in enumerate(zip(fitted_in_waves(models), per_model), 1):
            save_glm_to_bids(model, weights, contrast_types=types, out_dir=args.out_dir,
                             prefix=f"sub-{model.subject_label}_task-{args.task}")
            save_glm_derivatives(model, weights, args.out_dir, task_label=args.task, contrast_types=types,
                                 confounds=model.confound_names_[0] or [])
            print(f"[{done}/{len(models)}] sub-{model.subject_label} written", file=sys.stderr, flush=True)
    print(f"derivatives: {Path(args.out_dir).absolute()}")
    return 0
