"""Surface maps on a report page: nilearn SurfaceImages on their mesh, CIFTI-2 dense scalar maps.

A surface model's z maps are thresholded as the volume ones (chunkglm's
:func:`~chunkglm.inference.thresholding.threshold_stats_img`, which thresholds a
SurfaceImage on its mesh as nilearn does) and drawn with nilearn's
:func:`~nilearn.plotting.plot_surf_stat_map`: both hemispheres, lateral and
medial views, one colour scale, on the map's own mesh (the grid's mesh as the
store keeps it). Cluster tables of SurfaceImages are chunkglm's
:func:`~chunkglm.reporting.get_clusters_table` (nilearn's for meshes: clusters of
adjacent vertices, hemisphere, peak, size in vertices).

A CIFTI map (grayordinates: cortex vertices and subcortical voxels on one
axis; nilearn has no CIFTI image) is thresholded over all its grayordinates in
the mask with the same height control; its cortex is drawn on the mesh nilearn
ships with the same number of vertices (fsaverage5: 10,242 per hemisphere) and
listed in words when nilearn ships none (fsLR); its subcortical structures are
listed, one row each (voxels, voxels surviving, peak). Clusters are not formed
on grayordinates: ``cluster_threshold`` is not used for CIFTI maps, and the
page says so.

The figures are drawn outside pyplot on an Agg canvas, as the volume ones:
the same map gives the same PNG bytes, run after run.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pandas as pd

from chunkglm.inference.thresholding import height_threshold, threshold_stats_img
from chunkglm.io.mesh_spaces import packaged_mesh
from chunkglm.report.sections import Block, Correction, ReportOptions, figure_png, table_html
from chunkglm.reporting import get_clusters_table

#: The views of a surface map's figure: both hemispheres, outside and inside.
VIEWS = (("left", "lateral"), ("left", "medial"), ("right", "lateral"), ("right", "medial"))
#: How a page says that no vertex (no grayordinate) survives.
NO_VERTEX = "No suprathreshold cluster: no vertex survives"
NO_GRAYORDINATE = "No suprathreshold cluster: no grayordinate survives"
#: The end of a surface cluster count's sentence (the index page reads it back).
CLUSTERS_TAIL = "clusters of adjacent vertices, with their peak (hemisphere, vertex count)."
#: The start of a CIFTI map's survivor count (the index page reads it back).
GRAYORDINATES_SURVIVE = "grayordinate(s) survive;"
#: CIFTI structure name -> the hemisphere nilearn calls it.
CORTEX = {"CIFTI_STRUCTURE_CORTEX_LEFT": "left", "CIFTI_STRUCTURE_CORTEX_RIGHT": "right"}
#: The threshold that shows a corrected map as written: every non-zero vertex.
_AS_WRITTEN = 1e-6


def is_surface_image(img) -> bool:
    """A nilearn SurfaceImage."""
    from nilearn.surface import SurfaceImage

    return isinstance(img, SurfaceImage)


def is_cifti(img) -> bool:
    """A nibabel CIFTI-2 image (a CIFTI model's dense scalar map)."""
    return type(img).__name__ == "Cifti2Image"


def is_surface(img) -> bool:
    """A map the volume sections cannot draw: a SurfaceImage or a CIFTI-2 image."""
    return is_surface_image(img) or is_cifti(img)


def check_background(bg_img) -> None:
    """nilearn's refusal of a volume background for a surface model's report (its TypeError and words)."""
    if bg_img is None or (isinstance(bg_img, str) and bg_img == "MNI152TEMPLATE") or is_surface_image(bg_img):
        return
    raise TypeError(f"'bg_img' must a SurfaceImage instance. Got {bg_img.__class__.__name__}: a surface model's "
                    "maps are drawn on their mesh; pass a SurfaceImage on that mesh (e.g. sulcal depth), or None.")


def element_count(mask_img) -> tuple[int, int, str]:
    """(elements in the mask, elements of the mesh or axis, their name) of a surface or CIFTI mask."""
    if is_cifti(mask_img):
        data = np.asanyarray(mask_img.dataobj)
        return int(np.count_nonzero(data)), int(data.size), "grayordinates"
    parts = [np.asarray(values) for values in mask_img.data.parts.values()]
    return (int(sum(np.count_nonzero(values) for values in parts)), int(sum(values.size for values in parts)),
            "vertices")


# -- figures ------------------------------------------------------------------------


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy (matplotlib): when a figure is drawn
    from matplotlib.figure import Figure  # heavy (matplotlib): when a figure is drawn

    figure = Figure(figsize=figsize, facecolor="white")
    FigureCanvasAgg(figure)
    figure.subplots_adjust(left=0, right=0.93, bottom=0, top=0.9, wspace=0)
    return figure


def _background(options: ReportOptions, img):
    """The background map: the options' SurfaceImage when it is on the map's mesh, else none (nilearn's
    default for surfaces)."""
    bg = options.bg_img
    if not is_surface_image(bg):
        return None
    sizes = {part: mesh.n_vertices for part, mesh in img.mesh.parts.items()}
    if {part: mesh.n_vertices for part, mesh in bg.mesh.parts.items()} != sizes:
        raise TypeError(f"'bg_img' has {({p: m.n_vertices for p, m in bg.mesh.parts.items()})} vertices per "
                        f"hemisphere, the maps {sizes}: pass a background on the maps' mesh.")
    return bg


def surface_map_figure(img, threshold: float, options: ReportOptions, title=None, roi=False):
    """A thresholded SurfaceImage drawn by nilearn on its mesh: each hemisphere's lateral and medial view.

    Parameters
    ----------
    img : nilearn.surface.SurfaceImage
        One map (vertices,) per hemisphere, zeros below the threshold (``roi``: a 0/1 mask).
    threshold : float
        The threshold (its absolute value is drawn).
    options : chunkglm.report.sections.ReportOptions
        Sidedness and background (a SurfaceImage on the same mesh, or none).
    title : str, optional
    roi : bool, default=False
        Draw a mask (nilearn's ``plot_surf_roi``) instead of a statistical map.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from nilearn import DEFAULT_DIVERGING_CMAP
    from nilearn.plotting import plot_surf_roi, plot_surf_stat_map  # heavy (matplotlib): when drawn

    values = np.concatenate([np.ravel(np.asarray(v, dtype=float)) for v in img.data.parts.values()])
    finite = values[np.isfinite(values)]
    peak = float(np.max(np.abs(finite))) if finite.size else 1.0
    cmap, vmin, vmax = DEFAULT_DIVERGING_CMAP, -peak, peak
    if not options.two_sided and finite.size and (finite.min() >= 0 or finite.max() <= 0):
        cmap, vmin, vmax = ("Reds", 0.0, peak) if finite.min() >= 0 else ("Blues_r", -peak, 0.0)
    bg = _background(options, img)
    views = [(hemi, view) for hemi, view in VIEWS if hemi in img.mesh.parts]
    figure = _figure((3.0 * len(views) + 0.6, 3.0))
    for index, (hemi, view) in enumerate(views):
        axes = figure.add_subplot(1, len(views), index + 1, projection="3d")
        last = index == len(views) - 1
        with warnings.catch_warnings():  # nilearn's notes on meshes without a background / all-zero maps
            warnings.simplefilter("ignore", UserWarning)
            if roi:
                plot_surf_roi(roi_map=img, hemi=hemi, view=view, bg_map=bg, cmap="Reds", vmin=0, vmax=1.25,
                              threshold=0.5, colorbar=False, axes=axes, figure=figure)  # 0: the mesh's grey
            else:
                plot_surf_stat_map(stat_map=img, hemi=hemi, view=view, bg_map=bg, cmap=cmap, vmin=vmin, vmax=vmax,
                                   symmetric_cbar=bool(options.two_sided), threshold=abs(float(threshold)),
                                   colorbar=last, axes=axes, figure=figure)
        axes.set_title(f"{hemi} {view}", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


# -- SurfaceImage maps ----------------------------------------------------------------


def surviving_vertices(img) -> int:
    """Vertices of a thresholded SurfaceImage shown (non-zero and finite)."""
    return int(sum(np.count_nonzero(np.isfinite(v) & (np.asarray(v) != 0)) for v in img.data.parts.values()))


def surface_cluster_table(thresholded, threshold: float, options: ReportOptions) -> pd.DataFrame:
    """The cluster table of a thresholded SurfaceImage (clusters of adjacent vertices), nilearn's numbers."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No clusters found")
        return get_clusters_table(thresholded, stat_threshold=abs(float(threshold)),
                                  cluster_threshold=options.cluster_threshold, two_sided=options.two_sided)
        # min_distance: nilearn's surface table has no subpeaks (it warns when one is given)


def _cluster_block(table: pd.DataFrame) -> Block:
    if not len(table):
        return Block(text="No suprathreshold cluster.", text_class="note")
    return Block(text=f"{len(table)} cluster(s); {CLUSTERS_TAIL}", tables=[table_html(table, index=False)])


def stat_map_blocks(name: str, stat_img, mask_img, options: ReportOptions, stat_label="z") -> list[Block]:
    """A surface contrast's thresholded map, its settings and its cluster table (or, in words, that no
    vertex survives). CIFTI maps: :func:`cifti_stat_map_blocks`."""
    if is_cifti(stat_img):
        return cifti_stat_map_blocks(name, stat_img, mask_img, options, stat_label)
    with warnings.catch_warnings():  # nothing above the threshold: the page says so in words
        warnings.filterwarnings("ignore", message="empty mask")
        warnings.filterwarnings("ignore", message="The given float value must not exceed")
        thresholded, threshold = threshold_stats_img(
            stat_img, mask_img=mask_img, alpha=options.alpha, threshold=options.threshold,
            height_control=options.height_control, cluster_threshold=options.cluster_threshold,
            two_sided=options.two_sided)
    threshold = float(threshold)
    details = {"Height control": options.height_control, "α": options.alpha, "Threshold (computed)": threshold,
               "Cluster size threshold (vertices)": options.cluster_threshold}
    if not surviving_vertices(thresholded):
        return [Block(heading=name, tables=[table_html(details, header=False)],
                      text=f"{NO_VERTEX} this threshold ({_where(stat_label, options)} > {abs(threshold):.3g}"
                           f"{_size(options)}): nothing to draw, no cluster to list.", text_class="note no-survivor")]
    tail = " (both tails)" if options.two_sided else ""
    figure = surface_map_figure(thresholded, threshold, options, title=name)
    return [Block(heading=name, tables=[table_html(details, header=False)],
                  figures=[figure_png(figure, f"Thresholded {stat_label} map of {name}",
                                      f"{stat_label} map of {name} on the mesh, thresholded at {threshold:.3g}{tail}")]),
            _cluster_block(surface_cluster_table(thresholded, threshold, options))]


def corrected_map_blocks(name: str, corrected_img, mask_img, options: ReportOptions,
                         correction: Correction) -> list[Block]:
    """A corrected surface map as written (zero where nothing survives): every surviving vertex drawn (CIFTI:
    the cortex drawn, the structures listed)."""
    if is_cifti(corrected_img):
        return _cifti_corrected_blocks(name, corrected_img, options, correction)
    values = np.concatenate([np.ravel(np.asarray(v, dtype=float)) for v in corrected_img.data.parts.values()])
    survivors = int(np.count_nonzero(np.isfinite(values) & (values != 0)))
    details = {"Correction": correction.kind, "Method": correction.method, "α": correction.alpha,
               "Shown": "every vertex that survives (non-zero in the map written)", "Vertices surviving": survivors}
    if not survivors:
        return [Block(heading=name, tables=[table_html(details, header=False)],
                      text=f"{NO_VERTEX} the {correction.describe()}: nothing to draw, no cluster to list.",
                      text_class="note no-survivor")]
    display = replace(options, height_control=None, threshold=_AS_WRITTEN, two_sided=True, cluster_threshold=0,
                      warnings=())
    figure = surface_map_figure(corrected_img, _AS_WRITTEN, display, title=name)
    return [Block(heading=name, tables=[table_html(details, header=False)],
                  figures=[figure_png(figure, f"Corrected z map of {name}",
                                      f"z map of {name}: the vertices that survive the {correction.describe()}")]),
            _cluster_block(surface_cluster_table(corrected_img, _AS_WRITTEN, display))]


def _where(stat_label, options) -> str:
    return f"|{stat_label}|" if options.two_sided else stat_label


def _size(options) -> str:
    return f" in clusters of at least {options.cluster_threshold} vertices" if options.cluster_threshold else ""


# -- CIFTI maps ---------------------------------------------------------------------------


def cifti_values(img) -> np.ndarray:
    """The one map of a CIFTI dense scalar image, over its grayordinates (float64)."""
    data = np.asarray(img.get_fdata(), dtype=float)
    if data.ndim == 2 and data.shape[0] != 1:
        raise ValueError(f"expected one CIFTI map; received {data.shape[0]} (a dense scalar file of one map).")
    return data.reshape(-1)


def cifti_structures(img):
    """[(structure name, slice of the grayordinates, BrainModelAxis of the structure)] of a CIFTI image."""
    axis = img.header.get_axis(img.ndim - 1)
    return list(axis.iter_structures())


def cifti_cortex(img, values: np.ndarray):
    """The cortex of a CIFTI map as a SurfaceImage on nilearn's packaged mesh of its size (zeros off the
    brain-model axis, e.g. the medial wall), or None when nilearn ships no mesh of that size."""
    from nilearn.surface import PolyMesh, SurfaceImage

    parts = {}
    for name, part, model in cifti_structures(img):
        hemi = CORTEX.get(name)
        if hemi is None:
            continue
        n_vertices = int(model.nvertices[name])
        full = np.zeros(n_vertices)
        full[model.vertex] = values[part]
        parts[hemi] = (n_vertices, full)
    meshes = {hemi: packaged_mesh(n) for hemi, (n, _) in parts.items()}
    if not parts or any(mesh is None for mesh in meshes.values()):
        return None
    mesh = PolyMesh(**{hemi: mesh.parts[hemi] for hemi, mesh in meshes.items()})
    return SurfaceImage(mesh, {hemi: full for hemi, (_, full) in parts.items()})


def _cifti_threshold(values, mask, options: ReportOptions) -> float:
    kept = values[mask & np.isfinite(values)]
    return float(height_threshold(kept, options.alpha, options.height_control, options.two_sided, options.threshold))


def _structure_rows(img, values, shown) -> pd.DataFrame:
    rows = []
    for name, part, model in cifti_structures(img):
        survivors = np.flatnonzero(shown[part])
        peak = values[part][survivors][np.argmax(np.abs(values[part][survivors]))] if survivors.size else np.nan
        kind = "vertices" if name in CORTEX else "voxels"
        rows.append({"Structure": name.removeprefix("CIFTI_STRUCTURE_"), "Elements": f"{len(model)} {kind}", "Surviving": int(survivors.size), "Peak Stat": float(peak)})
    return pd.DataFrame(rows)


def cifti_stat_map_blocks(name: str, stat_img, mask_img, options: ReportOptions, stat_label="z") -> list[Block]:
    """A CIFTI contrast: its threshold over the grayordinates in the mask, the cortex drawn on its mesh (when
    nilearn ships one of its size), each structure's survivors in a table (or, in words, that none survives)."""
    values = cifti_values(stat_img)
    mask = (cifti_values(mask_img) != 0) if mask_img is not None else np.isfinite(values)
    threshold = _cifti_threshold(values, mask, options)
    finite = np.where(np.isfinite(values) & mask, values, 0.0)
    shown = (np.abs(finite) > abs(threshold)) if options.two_sided else (finite > threshold)
    details = {"Height control": options.height_control, "α": options.alpha, "Threshold (computed)": threshold,
               "Grayordinates in the mask": int(np.count_nonzero(mask))}
    notes = (" Clusters are not formed on grayordinates: cluster_threshold="
             f"{options.cluster_threshold} is not used." if options.cluster_threshold else "")
    if not shown.any():
        return [Block(heading=name, tables=[table_html(details, header=False)],
                      text=f"{NO_GRAYORDINATE} this threshold ({_where(stat_label, options)} > {abs(threshold):.3g}): "
                           f"nothing to draw, no structure to list.{notes}", text_class="note no-survivor")]
    caption = f"cortex of the {stat_label} map of {name}, thresholded at {threshold:.3g}"
    return _cifti_shown(name, stat_img, values, shown, threshold, options,
                        Block(heading=name, tables=[table_html(details, header=False)], text=notes.strip()), caption)


def _cifti_corrected_blocks(name, corrected_img, options, correction) -> list[Block]:
    values = cifti_values(corrected_img)
    shown = np.isfinite(values) & (values != 0)
    details = {"Correction": correction.kind, "Method": correction.method, "α": correction.alpha,
               "Shown": "every grayordinate that survives (non-zero in the map written)",
               "Grayordinates surviving": int(shown.sum())}
    head = Block(heading=name, tables=[table_html(details, header=False)])
    if not shown.any():
        head.text, head.text_class = (f"{NO_GRAYORDINATE} the {correction.describe()}: nothing to draw, no "
                                      "structure to list."), "note no-survivor"
        return [head]
    display = replace(options, two_sided=True)
    return _cifti_shown(name, corrected_img, values, shown, _AS_WRITTEN, display, head,
                        f"cortex of {name}: the grayordinates that survive the {correction.describe()}")


def _cifti_shown(name, img, values, shown, threshold, options, head: Block, caption: str) -> list[Block]:
    """The blocks of a CIFTI map with survivors: ``head``, the cortex drawn (or why not), the structures."""
    blocks = [head]
    cortex = cifti_cortex(img, np.where(shown, values, 0.0))
    if cortex is not None and surviving_vertices(cortex):
        figure = surface_map_figure(cortex, threshold, replace_background(options), title=name)
        blocks.append(Block(figures=[figure_png(figure, f"{name} (cortex)", caption)]))
    elif cortex is None and any(n in CORTEX for n, _, _ in cifti_structures(img)):
        blocks.append(Block(text="The cortex is not drawn: nilearn ships no mesh with this number of vertices "
                                 "(its survivors are listed below).", text_class="note"))
    table = _structure_rows(img, values, shown)
    blocks.append(Block(text=f"{int(shown.sum())} {GRAYORDINATES_SURVIVE} per structure of the brain-model axis:",
                        tables=[table_html(table, index=False)]))
    return blocks


def replace_background(options: ReportOptions) -> ReportOptions:
    """The options without a background (a CIFTI cortex is drawn on nilearn's packaged mesh)."""
    return replace(options, bg_img=None)


# -- masks ----------------------------------------------------------------------------------


def mask_block(mask_img, options: ReportOptions, caption: str) -> Block:
    """A surface or CIFTI mask: how many elements it keeps, drawn on the mesh (the cortex for CIFTI)."""
    n_kept, n_all, kind = element_count(mask_img)
    text = f"The mask includes {n_kept} {kind} ({100.0 * n_kept / max(n_all, 1):0.1f} %) of the " + \
        ("brain-model axis." if is_cifti(mask_img) else "mesh.")
    image = mask_img
    if is_cifti(mask_img):
        image = cifti_cortex(mask_img, (cifti_values(mask_img) != 0).astype(float))
        subcortical = [(n.removeprefix("CIFTI_STRUCTURE_"), len(m))
                       for n, _, m in cifti_structures(mask_img) if n not in CORTEX]
        if subcortical:
            text += " Subcortical structures: " + ", ".join(f"{n} ({k} voxels)" for n, k in subcortical) + "."
        options = replace_background(options)
    if image is None:
        return Block(text=text + " The cortex is not drawn: nilearn ships no mesh with this number of vertices.")
    as_int = type(image)(image.mesh, {p: (np.asarray(v) != 0).astype(np.int32) for p, v in image.data.parts.items()})
    return Block(text=text, figures=[figure_png(surface_map_figure(as_int, 0.5, options, roi=True), "Analysis mask",
                                                caption)])
