"""Second-level GLM with nilearn's names (``nilearn.glm.second_level``).

- :mod:`~chunkglm.glm.second_level.model`: :class:`SecondLevelModel`;
- :mod:`~chunkglm.glm.second_level.nonparametric`: :func:`non_parametric_inference`
  (max-T, cluster size/mass and TFCE permutation inference), and its parts for a fitted
  model: :func:`permutation_maps` of one t contrast (:func:`contrast_vector`) with settings
  checked by :func:`check_permutation_options`;
- :mod:`~chunkglm.glm.second_level.inputs`: nilearn's input forms loaded
  once into a ``maps/`` node of a store;
- the design matrices: :func:`make_second_level_design_matrix`.
"""

from chunkglm.design.second_level import make_second_level_design_matrix
from chunkglm.glm.second_level.model import OUTPUT_TYPES, SecondLevelModel, parse_contrast
from chunkglm.glm.second_level.nonparametric import (
    check_permutation_options,
    contrast_vector,
    non_parametric_inference,
    permutation_maps,
)

__all__ = ["OUTPUT_TYPES", "SecondLevelModel", "check_permutation_options", "contrast_vector",
           "make_second_level_design_matrix", "non_parametric_inference", "parse_contrast", "permutation_maps"]
