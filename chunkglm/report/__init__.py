"""Figures of GLM outputs (design matrices, contrasts), drawn with nilearn."""

from chunkglm.report.figures import (
    FIGURE_FORMATS,
    contrast_matrix_figure,
    design_matrix_correlation_figure,
    design_matrix_figure,
    save_figure,
)

__all__ = [
    "FIGURE_FORMATS",
    "contrast_matrix_figure",
    "design_matrix_correlation_figure",
    "design_matrix_figure",
    "save_figure",
]
