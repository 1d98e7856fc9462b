"""``chunkglm report DIR``: an HTML report next to every result of a derivatives folder.

Finds the first-level subjects (``first_level/sub-XX/*_glm.json``), the
group analysis (``group_level/group_glm.json``) and the meta-analyses
(``meta/<Estimator>.json``) under DIR and writes each one's page (see
:mod:`chunkglm.report.from_derivatives`), with nilearn's ``generate_report``
thresholding options, several pages at once (``--jobs``), then
``DIR/index.html``, which links them all. Prints the pages, then the index.
Reads local files only; starts no cluster.
"""

from __future__ import annotations

from pathlib import Path

from chunkglm.cli._args import add_sidedness, nonnegative, path_value, positive_int, probability
from chunkglm.report.from_derivatives import write_reports
from chunkglm.report.pages import INDEX_NAME


HEIGHT_CONTROLS = ("fpr", "fdr", "bonferroni", "none")


def add_parser(sub, add_common=None) -> None:
    """Register the sub-command."""
    cmd = sub.add_parser("report", help="HTML reports of the results in a derivatives folder")
    cmd.add_argument("derivatives", metavar="DERIVATIVES_DIR", type=path_value,
                     help="a folder written by chunkglm first-level / second-level / meta (or one above it)")
    cmd.add_argument("--title", help="page title (default: the kind of result and its contrasts)")
    cmd.add_argument("--height-control", default="fpr", choices=HEIGHT_CONTROLS,
                     help="how the z threshold is set (default fpr, as nilearn's generate_report)")
    cmd.add_argument("--alpha", type=probability, default=0.001, help="p-value or q-value (default 0.001)")
    cmd.add_argument("--threshold", type=float,
                     help="z threshold, with --height-control none (default then 3.09)")
    cmd.add_argument("--cluster-threshold", type=int, default=0, metavar="VOXELS",
                     help="clusters smaller than this many voxels are not shown or listed "
                          "(nilearn's cluster_threshold)")
    add_sidedness(cmd, False, "thresholds (nilearn's two_sided)")
    cmd.add_argument("--min-distance", type=nonnegative, default=8.0, metavar="MM",
                     help="minimum distance between subpeaks of the cluster tables")
    cmd.add_argument("--plot-type", default="slice", choices=["slice", "glass"],
                     help="nilearn's plot_type of the maps")
    cmd.add_argument("--display-mode", help="nilearn's cuts, e.g. z, ortho, lzry (default z / lzry)")
    cmd.add_argument("--bg-img", default="MNI152TEMPLATE",
                     help="background image path, MNI152TEMPLATE (default) or none (volume results; "
                          "surface results are drawn on their mesh without one)")
    cmd.add_argument("--jobs", type=positive_int, default=None, metavar="N",
                     help="pages built at once (default: one per CPU this process may use; 1: one by one)")
    cmd.set_defaults(func=run)


def run(args) -> int:
    height_control = None if args.height_control == "none" else args.height_control
    bg_img = None if args.bg_img.lower() == "none" else args.bg_img
    written = write_reports(Path(args.derivatives), title=args.title, bg_img=bg_img,
                            threshold=args.threshold, alpha=args.alpha,
                            cluster_threshold=args.cluster_threshold, height_control=height_control,
                            two_sided=args.two_sided, min_distance=args.min_distance,
                            plot_type=args.plot_type, display_mode=args.display_mode, jobs=args.jobs)
    for path in written:
        print(path)
    print(Path(args.derivatives) / INDEX_NAME)
    return 0
