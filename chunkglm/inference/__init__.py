"""Inference on result maps: voxel-level thresholds (fpr, FDR, Bonferroni),
cluster-extent thresholding, cluster labelling, All-Resolution Inference and
cluster tables.

These are global passes over single result maps, run in memory: 3-D volumes
(6-connected voxels), or surface maps hemisphere by hemisphere (clusters on
the mesh, :mod:`chunkglm.inference.surface_clusters`).
"""

from chunkglm.inference.thresholding import (
    cluster_level_inference,
    fdr_threshold,
    threshold_stats_img,
)

__all__ = ["cluster_level_inference", "fdr_threshold", "threshold_stats_img"]
