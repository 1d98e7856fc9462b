"""Design-matrix and contrast-matrix figures, as nilearn draws them.

The drawing is nilearn's (:func:`nilearn.plotting.plot_design_matrix`,
:func:`~nilearn.plotting.plot_design_matrix_correlation`,
:func:`~nilearn.plotting.plot_contrast_matrix`) with nilearn's figure sizes;
the figures are plain :class:`matplotlib.figure.Figure` objects on an Agg
canvas, never registered with pyplot. So nothing here changes the user's
matplotlib backend, no figure is left open, and it works without a display.

matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

#: Formats written by :func:`save_figure`, in order.
FIGURE_FORMATS = ("png", "svg")

#: The salt of the ids in SVG files (``svg.hashsalt``): fixed, so that a figure's file is the same every run.
SVG_HASH_SALT = "chunkglm"

#: nilearn adds this many inches to the height of design-matrix figures.
_EXTRA_HEIGHT = 0.3


def _agg_figure(figsize):
    """A figure with one axes, on an Agg canvas, outside pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy (matplotlib): imported when a figure is drawn
    from matplotlib.figure import Figure  # heavy (matplotlib): imported when a figure is drawn

    figure = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def design_matrix_figure(design_matrix):
    """The design matrix drawn by :func:`nilearn.plotting.plot_design_matrix`.

    Parameters
    ----------
    design_matrix : pandas.DataFrame
        One run's design matrix (scans x regressors).

    Returns
    -------
    matplotlib.figure.Figure
        nilearn's figure size, plus nilearn's 0.3 inch of extra height.
    """
    from nilearn.plotting import plot_design_matrix  # heavy (matplotlib): imported when a figure is drawn

    names = [str(c) for c in design_matrix.columns]
    max_len = max(len(name) for name in names)
    height = float(np.clip(1 + 0.1 * len(design_matrix) + 0.04 * max_len, 3, 10))
    figure, axes = _agg_figure((1 + 0.23 * len(names), height + _EXTRA_HEIGHT))
    plot_design_matrix(design_matrix, axes=axes)
    return figure


def design_matrix_correlation_figure(design_matrix):
    """Correlations of the regressors (:func:`~nilearn.plotting.plot_design_matrix_correlation`).

    Parameters
    ----------
    design_matrix : pandas.DataFrame
        One run's design matrix.

    Returns
    -------
    matplotlib.figure.Figure or None
        None when fewer than two columns are left once nilearn drops the
        drift and constant columns (nilearn draws nothing either).
    """
    from nilearn.plotting import plot_design_matrix_correlation  # heavy (matplotlib): imported when a figure is drawn

    kept = [c for c in design_matrix.columns
            if c not in ("intercept", "constant") and not str(c).startswith("drift_")]
    if len(design_matrix.columns) < 2 or not kept:
        return None
    figure, axes = _agg_figure((7, 5 + _EXTRA_HEIGHT))
    plot_design_matrix_correlation(design_matrix, tri="diag", axes=axes)
    return figure


def contrast_matrix_figure(contrast_def, design_matrix, title):
    """A contrast's weights over the design columns (:func:`~nilearn.plotting.plot_contrast_matrix`).

    Parameters
    ----------
    contrast_def : str or array-like
        Formula over the design columns, or weights (1-D: t, 2-D: F).
    design_matrix : pandas.DataFrame
        The run's design matrix.
    title : str
        Written under the matrix (nilearn writes the contrast name there).

    Returns
    -------
    matplotlib.figure.Figure
        nilearn's width, 2 inches high (as nilearn's saved contrast figures).
    """
    from nilearn.plotting import plot_contrast_matrix  # heavy (matplotlib): imported when a figure is drawn

    definition = contrast_def if isinstance(contrast_def, str) else np.asarray(contrast_def, dtype=float)
    width = max(0.4 * design_matrix.shape[1], 5)
    figure, axes = _agg_figure((width, 2))
    plot_contrast_matrix(definition, design_matrix, colorbar=True, axes=axes)
    axes.set_xlabel(title)
    return figure


def _brain_figure(figsize):
    """An empty figure on an Agg canvas, outside pyplot, for nilearn's brain displays."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy (matplotlib): imported when a figure is drawn
    from matplotlib.figure import Figure  # heavy (matplotlib): imported when a figure is drawn

    figure = Figure(figsize=figsize, facecolor="white")
    FigureCanvasAgg(figure)
    return figure


#: Figure sizes (inches) of the stat-map displays: one-letter modes draw 7 cuts in a row.
_STAT_MAP_SIZES = {"ortho": (10.0, 3.6), "tiled": (8.0, 6.0), "mosaic": (12.0, 8.0),
                   "x": (12.0, 2.6), "y": (12.0, 2.6), "z": (12.0, 2.6)}


def stat_map_figure(thresholded_img, threshold, options, title=None):
    """A thresholded statistical map as nilearn's report draws it.

    ``plot_stat_map`` (``plot_type="slice"``, no cross) or ``plot_glass_brain``
    (``"glass"``, signed) with nilearn's report colours: a symmetric diverging
    map for two-sided thresholds, "Reds" / "Blues_r" for one-signed maps.

    Parameters
    ----------
    thresholded_img : nibabel.Nifti1Image
        The map after thresholding (zeros below the threshold).
    threshold : float
        The voxel threshold (its absolute value is drawn).
    options : chunkglm.report.sections.ReportOptions
        Background, plot type, display mode, cut coordinates, sidedness.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    from nilearn import DEFAULT_DIVERGING_CMAP
    from nilearn.plotting import plot_glass_brain, plot_stat_map  # heavy (matplotlib): imported when a figure is drawn

    cmap, symmetric = DEFAULT_DIVERGING_CMAP, bool(options.two_sided)
    data = np.asanyarray(thresholded_img.dataobj)
    finite = data[np.isfinite(data)]
    if not options.two_sided and finite.size:
        if finite.min() >= 0:
            cmap = "Reds"
        elif finite.max() <= 0:
            cmap = "Blues_r"
    figure = _brain_figure(_STAT_MAP_SIZES.get(options.display_mode, (12.0, 3.0)))
    common = {"display_mode": options.display_mode, "cmap": cmap, "symmetric_cbar": symmetric,
              "threshold": abs(float(threshold)), "figure": figure, "title": title}
    with _quiet_empty_cuts():
        if options.plot_type == "glass":
            display = plot_glass_brain(thresholded_img, plot_abs=False, **common)
        else:
            display = plot_stat_map(thresholded_img, bg_img=options.background(), cut_coords=options.cut_coords,
                                    draw_cross=False, **common)
    colorbar = getattr(display, "_cbar", None)
    if colorbar is not None:
        colorbar.ax.set_xlabel("Z score", labelpad=5, fontweight="bold", loc="right",
                               color="white" if options.plot_type == "slice" else "black")
    return figure


def mask_figure(mask_img, options):
    """The analysis mask over the background (``plot_roi``, axial cuts), as in nilearn's report."""
    from nilearn.plotting import plot_roi  # heavy (matplotlib): imported when a figure is drawn

    figure = _brain_figure((12.0, 2.6))
    with _quiet_empty_cuts():
        plot_roi(mask_img, bg_img=options.background(), display_mode="z", cmap="Set1", colorbar=False,
                 figure=figure)
    return figure


@contextmanager
def _quiet_empty_cuts():
    """Silence numpy's "converting a masked element to nan", which nilearn's plotting triggers on every
    cut that holds no voxel of the overlay (a small mask over the MNI template): the cut is drawn empty,
    which is the figure's point, and the warning tells the user nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Warning: converting a masked element to nan")
        yield


def save_figure(figure, paths):
    """Write one figure to several files; the format comes from each suffix.

    Parameters
    ----------
    figure : matplotlib.figure.Figure
    paths : sequence of str or Path
        E.g. ``[".../design.png", ".../design.svg"]``.

    Returns
    -------
    list of Path
        The files written. SVG files carry no date and their element ids
        are hashes of their content with a fixed salt (matplotlib's
        ``svg.hashsalt``; by default a random one per file), so equal
        figures give byte-identical files, run after run.
    """
    from matplotlib import rc_context  # heavy (matplotlib): imported when a figure is drawn

    written = []
    for path in map(Path, paths):
        fmt = path.suffix.lstrip(".").lower()
        metadata = {"Date": None} if fmt == "svg" else None
        with rc_context({"svg.hashsalt": SVG_HASH_SALT}):
            figure.savefig(path, format=fmt, metadata=metadata)
        # the layout is done: later formats reuse it instead of solving it again
        figure.set_layout_engine("none")
        written.append(path)
    return written
