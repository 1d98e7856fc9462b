"""GLMs with nilearn's module layout: :mod:`~chunkglm.glm.first_level`,
:mod:`~chunkglm.glm.second_level` (both packages), :mod:`~chunkglm.glm.thresholding` and
:mod:`~chunkglm.glm.io` (``save_glm_to_bids``); their public names are also here, as
``nilearn.glm`` gives them."""

from chunkglm.glm.first_level import FirstLevelModel, first_level_from_bids
from chunkglm.glm.io import save_glm_to_bids
from chunkglm.glm.second_level import SecondLevelModel, non_parametric_inference
from chunkglm.glm.thresholding import cluster_level_inference, fdr_threshold, threshold_stats_img

__all__ = ["FirstLevelModel", "SecondLevelModel", "cluster_level_inference", "fdr_threshold",
           "first_level_from_bids", "non_parametric_inference", "save_glm_to_bids", "threshold_stats_img"]
