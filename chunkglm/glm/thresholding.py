"""Thresholding of statistic maps, with nilearn's names (``nilearn.glm.thresholding``).

The implementation lives in :mod:`chunkglm.inference.thresholding`.
"""

from chunkglm.inference.thresholding import (
    cluster_level_inference,
    fdr_threshold,
    threshold_stats_img,
)

__all__ = ["cluster_level_inference", "fdr_threshold", "threshold_stats_img"]
