"""The pieces of a report: options, tables, embedded figures, statistical-map sections.

A report is a list of sections (:class:`Section`), each a list of blocks
(:class:`Block`: a heading, a sentence, HTML tables, PNG figures, a code
listing). :func:`render` fills the page template with them. Every figure is
nilearn's drawing on an Agg canvas outside pyplot (see
:mod:`chunkglm.report.figures`), embedded as base64 PNG.

The thresholding and the cluster tables are chunkglm's
:func:`~chunkglm.inference.thresholding.threshold_stats_img` and
:func:`~chunkglm.reporting.get_clusters_table`, which give nilearn 0.14's
numbers; the defaults are those of nilearn's ``generate_report``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import numbers
import warnings
from dataclasses import dataclass, field, replace
from importlib.metadata import version
from importlib.resources import files

import jinja2
import numpy as np
import pandas as pd

from chunkglm._version import __version__
from chunkglm.errors import InputError
from chunkglm.inference.clusters import TABLE_COLUMNS
from chunkglm.inference.thresholding import threshold_stats_img
from chunkglm.report.figures import mask_figure, stat_map_figure
from chunkglm.reporting import get_clusters_table

HEIGHT_CONTROLS = ("fpr", "fdr", "bonferroni", None)
PLOT_TYPES = ("slice", "glass")
#: nilearn's default cuts per plot type.
DEFAULT_DISPLAY_MODE = {"slice": "z", "glass": "lzry"}
DISPLAY_MODES = ("ortho", "tiled", "mosaic", "x", "y", "z", "xz", "yx", "yz",
                 "l", "r", "lr", "lzr", "lyr", "lzry", "lyrz")
#: The dpi of embedded figures: sharp on screen, a few hundred KB per report.
DPI = 90


@dataclass(frozen=True)
class ReportOptions:
    """How statistical maps are thresholded and drawn (nilearn's ``generate_report`` parameters)."""

    bg_img: object = "MNI152TEMPLATE"
    threshold: float | None = None
    alpha: float = 0.001
    cluster_threshold: int = 0
    height_control: str | None = "fpr"
    two_sided: bool = False
    min_distance: float = 8.0
    plot_type: str = "slice"
    cut_coords: object = None
    display_mode: str | None = None
    warnings: tuple = ()

    @classmethod
    def checked(cls, **kwargs) -> ReportOptions:
        """Validated options, with nilearn's adjustments (and its warnings, kept for the page).

        Invalid values raise :class:`~chunkglm.errors.InputError` (a ValueError)
        whose message starts with nilearn 0.14's (``'plot_type' must be one
        of ...``), followed by what to pass instead.
        """
        notes = []
        height_control = kwargs.get("height_control", "fpr")
        if height_control not in HEIGHT_CONTROLS:
            raise InputError(f"'height_control' must be one of {HEIGHT_CONTROLS}. Got {height_control=}: "
                             "'fpr', 'fdr' or 'bonferroni' control alpha, None thresholds at 'threshold'.")
        alpha = kwargs.get("alpha", 0.001)
        if not isinstance(alpha, numbers.Real) or not 0 < alpha < 1:
            raise InputError(f"alpha must be a number in (0, 1); received {alpha!r}.")
        threshold = kwargs.get("threshold")
        if threshold is not None and (not isinstance(threshold, numbers.Real) or not math.isfinite(threshold)):
            raise InputError(f"threshold must be a finite number or None; received {threshold!r}.")
        if height_control is None and threshold is None:
            threshold = 3.09  # nilearn 0.14's report default
        elif height_control is not None and threshold is not None:
            notes.append(f"'threshold={float(threshold)!r}' is not used with 'height_control={height_control!r}'. "
                         "'threshold' is only used when 'height_control=None'. 'threshold' was set to 'None'.")
            threshold = None
        cluster_threshold = kwargs.get("cluster_threshold", 0)
        if not isinstance(cluster_threshold, numbers.Real) or cluster_threshold < 0:
            raise InputError(f"'cluster_threshold' must be > 0. Got {cluster_threshold=}: give a number of "
                             "voxels >= 0 (0 keeps every cluster).")
        min_distance = kwargs.get("min_distance", 8.0)
        if not isinstance(min_distance, numbers.Real) or min_distance < 0:
            raise InputError(f"'min_distance' must be > 0. Got {min_distance=}: give a distance in mm between "
                             "subpeaks (default 8).")
        plot_type = kwargs.get("plot_type", "slice")
        if plot_type not in PLOT_TYPES:
            raise InputError(f"'plot_type' must be one of {{'slice', 'glass'}}. Got {plot_type=}: 'slice' draws "
                             "cuts over the background, 'glass' a glass brain.")
        display_mode = kwargs.get("display_mode") or DEFAULT_DISPLAY_MODE[plot_type]
        if display_mode not in DISPLAY_MODES:
            raise InputError(f"display_mode must be one of {DISPLAY_MODES}; received {display_mode!r}.")
        cut_coords = kwargs.get("cut_coords")
        if cut_coords is not None and plot_type == "glass":
            notes.append(f"'cut_coords={cut_coords!r}' is not used with 'plot_type={plot_type!r}'. "
                         "'cut_coords' is only used when 'plot_type='slice''. 'cut_coords' was set to None.")
            cut_coords = None
        return cls(bg_img=kwargs.get("bg_img", "MNI152TEMPLATE"), threshold=threshold, alpha=float(alpha),
                   cluster_threshold=cluster_threshold, height_control=height_control,
                   two_sided=bool(kwargs.get("two_sided", False)), min_distance=float(min_distance),
                   plot_type=plot_type, cut_coords=cut_coords, display_mode=display_mode,
                   warnings=tuple(notes))

    def background(self):
        """The background image: nilearn's MNI152 template by default, None for none."""
        if isinstance(self.bg_img, str) and self.bg_img == "MNI152TEMPLATE":
            from nilearn.plotting.image.utils import MNI152TEMPLATE  # heavy (matplotlib): only when drawn

            return MNI152TEMPLATE
        return self.bg_img or None

    def as_table(self) -> dict:
        """The thresholding settings, named as in nilearn's report."""
        return {"Height control": self.height_control, "α": self.alpha,
                "Threshold (given)": self.threshold, "Cluster size threshold (voxels)": self.cluster_threshold,
                "Two-sided": self.two_sided, "Minimum distance (mm)": self.min_distance}


@dataclass
class Figure:
    """A figure of the page: a PNG embedded (a ``data:`` URI) or a file beside the page."""

    src: str
    alt: str
    caption: str = ""


@dataclass
class Block:
    """A part of a section."""

    heading: str = ""
    text: str = ""
    text_class: str = ""
    tables: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    code: str = ""


@dataclass
class Section:
    """A titled part of the page (one entry of the navigation bar).

    ``anchor`` names the section's HTML id (``<anchor>-<page id>``, nilearn's
    ids: ``model-details``, ``mask``, ``statistical-maps``...); ``nav_id``
    gives its link in the navigation bar an id too (nilearn's
    ``navbar-contrasts-link``...), ``in_nav=False`` leaves it out of the bar.
    A section with ``panels`` is a carousel: one panel per run, each with its
    own sections (design matrix, contrasts), one shown at a time.
    """

    anchor: str
    title: str
    blocks: list[Block] = field(default_factory=list)
    intro: str = ""
    nav_id: str = ""
    in_nav: bool = True
    panels: list[Panel] = field(default_factory=list)


@dataclass
class Panel:
    """One run of a carousel section: its label and its sections."""

    label: str
    parts: list[Section] = field(default_factory=list)


def png_figure(png: bytes, alt: str, caption: str = "") -> Figure:
    """Embed PNG bytes (base64)."""
    return Figure("data:image/png;base64," + base64.b64encode(png).decode("ascii"), alt, caption)


def file_figure(path: str, alt: str, caption: str = "") -> Figure:
    """A figure file the page links to (a path relative to the page, or absolute)."""
    return Figure(str(path), alt, caption)


def figure_png(figure, alt: str, caption: str = "") -> Figure:
    """Embed a matplotlib figure (drawn outside pyplot) as PNG."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return png_figure(buffer.getvalue(), alt, caption)


def table_html(values, *, header=True, index=True, precision=3) -> str:
    """A dict (name -> value) or a DataFrame as an escaped HTML table."""
    frame = values if isinstance(values, pd.DataFrame) else pd.DataFrame(
        {"Value": [_cell(v, precision) for v in values.values()]}, index=list(values.keys()))
    formatters = {column: (lambda v, p=precision: _cell(v, p)) for column in frame.columns}
    return frame.to_html(header=header, index=index, escape=True, border=0, na_rep="",
                         formatters=formatters, classes="chunkglm-table")


def _cell(value, precision) -> str:
    if isinstance(value, bool | np.bool_) or value is None:
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(value)
    if isinstance(value, numbers.Real):
        if math.isnan(value):
            return ""
        if abs(value) >= 1e4 or 0 < abs(value) < 1e-3:
            return f"{value:.{precision}g}"
        return f"{value:.{precision}f}".rstrip("0").rstrip(".") or "0"
    if isinstance(value, list | tuple | np.ndarray):
        return ", ".join(_cell(v, precision) for v in np.ravel(value).tolist())
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_cell(v, precision)}" for k, v in value.items())
    return str(value)


def parameters_section(title: str, parameters: dict, extra_blocks=()) -> Section:
    """The model's parameters (and any further blocks, e.g. its inputs)."""
    return Section("model-details", title, [Block(tables=[table_html(parameters, header=False)]),
                                            *extra_blocks])


def stat_map_blocks(name: str, stat_img, mask_img, options: ReportOptions, stat_label="z") -> list[Block]:
    """A contrast's (or estimator map's) thresholded map, its settings and its cluster table.

    As nilearn's report: ``threshold_stats_img`` gives the voxel threshold
    (and removes clusters under ``cluster_threshold``), the figure shows the
    thresholded map and ``get_clusters_table`` lists its clusters with peaks
    and subpeaks at least ``min_distance`` mm apart.
    """
    with warnings.catch_warnings():  # nilearn's "empty mask" when nothing survives: the page says so
        warnings.filterwarnings("ignore", message="empty mask")
        return _stat_map_blocks(name, stat_img, mask_img, options, stat_label)


def stat_map_summary(stat_img, mask_img, options: ReportOptions):
    """(thresholded map, voxel threshold, cluster table) as nilearn's report computes them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No clusters found")
        thresholded, threshold = threshold_stats_img(
            stat_img, mask_img=mask_img, alpha=options.alpha, threshold=options.threshold,
            height_control=options.height_control, cluster_threshold=options.cluster_threshold,
            two_sided=options.two_sided)
        if not surviving_voxels(thresholded):  # no table to search (nor get_clusters_table's warning about it)
            return thresholded, threshold, pd.DataFrame(columns=TABLE_COLUMNS)
        table = get_clusters_table(thresholded, stat_threshold=threshold,
                                   cluster_threshold=options.cluster_threshold, two_sided=options.two_sided,
                                   min_distance=options.min_distance)
    return thresholded, threshold, table


#: How a page says that nothing survives (nilearn's report's words first).
NO_SURVIVOR = "No suprathreshold cluster: no voxel survives"


def _stat_map_blocks(name, stat_img, mask_img, options, stat_label) -> list[Block]:
    thresholded, threshold, table = stat_map_summary(stat_img, mask_img, options)
    details = {"Height control": options.height_control, "α": options.alpha,
               "Threshold (computed)": float(threshold),
               "Cluster size threshold (voxels)": options.cluster_threshold,
               "Minimum distance (mm)": options.min_distance}
    tail = " (both tails)" if options.two_sided else ""
    if not surviving_voxels(thresholded):
        where = f"|{stat_label}|" if options.two_sided else stat_label
        size = (f" in clusters of at least {options.cluster_threshold} voxels"
                if options.cluster_threshold else "")
        return [Block(heading=name, tables=[table_html(details, header=False)],
                      text=f"{NO_SURVIVOR} this threshold ({where} > {abs(float(threshold)):.3g}{size}): "
                           "nothing to draw, no cluster to list.", text_class="note no-survivor")]
    figure = stat_map_figure(thresholded, threshold, options, title=name)
    caption = f"{stat_label} map of {name}, thresholded at {threshold:.3g}{tail}"
    return [Block(heading=name, tables=[table_html(details, header=False)],
                  figures=[figure_png(figure, f"Thresholded {stat_label} map of {name}", caption)]),
            _cluster_block(table)]


@dataclass(frozen=True)
class Correction:
    """How a corrected map was made, as its page states it.

    ``kind``: "FDR" or "FWE"; ``method``: how (e.g. "permutation max-T",
    "indep"); ``alpha``: the level of the correction. ``z_threshold``: the
    map holds z of corrected p-values, shown where ``|z|`` exceeds it
    (NiMARE's ``z_corr-…``); None: the map is written thresholded (voxels
    that do not survive are 0) and every non-zero voxel is shown.
    """

    kind: str
    method: str | None
    alpha: float | None
    z_threshold: float | None = None

    def describe(self) -> str:
        """E.g. "FWE correction (permutation max-T) at α = 0.05"."""
        method = f" ({self.method})" if self.method and self.method.lower() != self.kind.lower() else ""
        alpha = f" at α = {self.alpha:g}" if self.alpha is not None else ""
        return f"{self.kind} correction{method}{alpha}"


def corrected_map_blocks(name: str, corrected_img, mask_img, options: ReportOptions,
                         correction: Correction) -> list[Block]:
    """A corrected map (``name``: its heading): its correction's settings, then the voxels that survive it
    (or, in words, that none does).

    The settings table is the correction's (its α, its method), never the
    report's own thresholding options, which apply to the uncorrected maps
    only. Every voxel that survives is shown, of either sign; the report's
    ``cluster_threshold`` and ``min_distance`` still shape the figure and the
    cluster table.
    """
    shown = (f"|z| > {correction.z_threshold:.3f} (corrected p < {correction.alpha:g})"
             if correction.z_threshold is not None else "every voxel that survives (non-zero in the map written)")
    data = np.asanyarray(corrected_img.dataobj)
    finite = np.where(np.isfinite(data), data, 0)
    survivors = (int(np.count_nonzero(np.abs(finite) > correction.z_threshold))
                 if correction.z_threshold is not None else int(np.count_nonzero(finite)))
    details = {"Correction": correction.kind, "Method": correction.method, "α": correction.alpha,
               "Shown": shown, "Voxels surviving": survivors,
               "Cluster size threshold (voxels)": options.cluster_threshold,
               "Minimum distance (mm)": options.min_distance}
    heading = name
    if not survivors:
        return [Block(heading=heading, tables=[table_html(details, header=False)],
                      text=f"{NO_SURVIVOR} the {correction.describe()}: nothing to draw, no cluster to list.",
                      text_class="note no-survivor")]
    threshold = correction.z_threshold if correction.z_threshold is not None else _AS_WRITTEN
    display = replace(options, height_control=None, threshold=threshold, two_sided=True, warnings=())
    return _drawn_corrected(heading, details, corrected_img, mask_img, display, correction)


#: The threshold that shows a map as written: every non-zero voxel (corrected maps hold z, |z| >> this).
_AS_WRITTEN = 1e-6


def _drawn_corrected(heading, details, corrected_img, mask_img, display, correction) -> list[Block]:
    thresholded, threshold, table = stat_map_summary(corrected_img, mask_img, display)
    if not surviving_voxels(thresholded):  # survivors, but in clusters smaller than cluster_threshold
        return [Block(heading=heading, tables=[table_html(details, header=False)],
                      text=f"{NO_SURVIVOR} the {correction.describe()} in clusters of at least "
                           f"{display.cluster_threshold} voxels: nothing to draw, no cluster to list.",
                      text_class="note no-survivor")]
    figure = stat_map_figure(thresholded, threshold, display, title=heading)
    caption = f"z map of {heading}: the voxels that survive the {correction.describe()}"
    return [Block(heading=heading, tables=[table_html(details, header=False)],
                  figures=[figure_png(figure, f"Corrected z map of {heading}", caption)]),
            _cluster_block(table)]


def surviving_voxels(thresholded_img) -> int:
    """How many voxels of a thresholded map are shown (non-zero and finite)."""
    data = np.asanyarray(thresholded_img.dataobj)
    return int(np.count_nonzero(np.isfinite(data) & (data != 0)))


def _cluster_block(table) -> Block:
    if len(table):
        return Block(text=f"{_count(table)} cluster(s); peaks and subpeaks in mm (world coordinates).",
                     tables=[table_html(table, index=False, precision=3)])
    return Block(text="No suprathreshold cluster.", text_class="note")


def _count(table) -> int:
    return int(table["Cluster Size (mm3)"].astype(str).str.len().gt(0).sum())


def mask_block(mask_img, options: ReportOptions, caption: str) -> Block:
    """The analysis mask over the background, as nilearn's report draws it."""
    data = np.asanyarray(mask_img.dataobj)
    n_voxels = int(np.count_nonzero(data))
    coverage = 100.0 * n_voxels / max(data.size, 1)
    return Block(text=f"The mask includes {n_voxels} voxels ({coverage:0.1f} %) of the image.",
                 figures=[figure_png(mask_figure(mask_img, options), "Analysis mask", caption)])


def provenance_section(record: dict | None) -> Section:
    """Where the results come from: inputs, options, versions, cluster.

    ``record`` is a provenance record (:func:`chunkglm.provenance.record`),
    read from a derivatives folder or assembled for a report made in
    memory; secrets were stripped when it was made. No time is shown (a
    record's ``started`` and ``wall_time_s``, where it has them): a page
    written again from the same results is the same bytes.
    """
    if not record:
        return Section("provenance", "Provenance", [Block(
            text="No provenance record was found for these results (they were not written by a chunkglm "
                 "command).", text_class="note")])
    summary = {"Operation": record.get("operation"),
               "chunkglm version": (record.get("versions") or {}).get("chunkglm")}
    cluster = record.get("cluster") or {}
    blocks = [Block(tables=[table_html(summary, header=False)]),
              Block(heading="Cluster", tables=[table_html(_cluster_rows(cluster), header=False)])]
    inputs = record.get("inputs") or []
    if inputs:
        blocks.append(Block(heading=f"Inputs ({len(inputs)})", tables=[table_html(_inputs_frame(inputs),
                                                                                     index=False)]))
    if record.get("options"):
        blocks.append(Block(heading="Options", tables=[table_html(_flat(record["options"]), header=False)]))
    if record.get("versions"):
        blocks.append(Block(heading="Software", tables=[table_html(record["versions"], header=False)]))
    return Section("provenance", "Provenance", blocks)


def _cluster_rows(cluster: dict) -> dict:
    memory = cluster.get("memory_limit")
    return {"Kind": cluster.get("type"), "Workers": cluster.get("n_workers"), "Threads": cluster.get("threads"),
            "Memory per worker": "—" if not memory else f"{memory / 2**30:.1f} GiB",
            **({"Scheduler": cluster["scheduler"]} if cluster.get("scheduler") else {})}


_MAX_INPUT_ROWS = 200


def _inputs_frame(inputs) -> pd.DataFrame:
    rows = [entry if isinstance(entry, dict) else {"path": str(entry)} for entry in inputs[:_MAX_INPUT_ROWS]]
    frame = pd.DataFrame(rows)
    if len(inputs) > _MAX_INPUT_ROWS:
        frame.loc[len(frame)] = {frame.columns[0]: f"… {len(inputs) - _MAX_INPUT_ROWS} more"}
    return frame


def _flat(options: dict, prefix="") -> dict:
    flat = {}
    for key, value in options.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


#: Stands for the page's id while it is rendered; replaced by one derived from the page's content.
_UID_PLACEHOLDER = "UUID-chunkglm0uid0"


def render(*, title: str, model_type: str, sections: list[Section], subtitle: str = "",
           warnings=()) -> str:
    """The page: the template filled with the sections (all text escaped).

    The same results give the same bytes (a re-run rewrites a page unchanged):
    the page carries no time of its own (its provenance section gives the
    results' record), and the id that scopes its elements (nilearn's
    ``UUID-<12 hex>``, random in nilearn) is the start of the sha256 of the
    page rendered without it, so two different pages in one document still
    get different ids.
    """
    source = files("chunkglm.report").joinpath("templates/report.html").read_text(encoding="utf-8")
    template = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(source)
    runs = max((len(section.panels) for section in sections), default=0)
    page = template.render(title=title, model_type=model_type, subtitle=subtitle, sections=sections,
                           warnings=list(warnings), uid=_UID_PLACEHOLDER, carousel_runs=runs,
                           version=__version__, nilearn_version=version("nilearn"))
    uid = f"UUID-{hashlib.sha256(page.encode()).hexdigest()[:12]}"
    return page.replace(_UID_PLACEHOLDER, uid)
