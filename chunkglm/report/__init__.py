"""HTML reports of GLM and meta-analysis results, and their figures (drawn with nilearn).

``generate_report`` of the fitted models and of meta-analysis results, and
:func:`write_reports` for a derivatives folder (``chunkglm report DIR``),
give :class:`HTMLReport` pages: self-contained, readable offline.
"""

from chunkglm.report.from_derivatives import find_results, write_reports
from chunkglm.report.document import HTMLReport
from chunkglm.report.figures import (
    FIGURE_FORMATS,
    contrast_matrix_figure,
    design_matrix_correlation_figure,
    design_matrix_figure,
    mask_figure,
    save_figure,
    stat_map_figure,
)

__all__ = [
    "FIGURE_FORMATS",
    "HTMLReport",
    "contrast_matrix_figure",
    "design_matrix_correlation_figure",
    "design_matrix_figure",
    "find_results",
    "mask_figure",
    "save_figure",
    "stat_map_figure",
    "write_reports",
]
