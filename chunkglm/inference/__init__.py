"""Inference on result maps: voxel-level thresholds (fpr, FDR, Bonferroni),
cluster-extent thresholding and cluster labelling.

These are global passes over single 3-D result maps, run in memory.
"""

from chunkglm.inference.thresholding import (
    cluster_level_inference,
    fdr_threshold,
    threshold_stats_img,
)

__all__ = ["cluster_level_inference", "fdr_threshold", "threshold_stats_img"]
