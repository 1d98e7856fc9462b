"""Second-level GLM with nilearn's names (``nilearn.glm.second_level``).

- :mod:`~chunkglm.glm.second_level.model`: :class:`SecondLevelModel`;
- :mod:`~chunkglm.glm.second_level.nonparametric`: :func:`non_parametric_inference`
  (max-T, cluster size/mass and TFCE permutation inference);
- :mod:`~chunkglm.glm.second_level.inputs`: nilearn's input forms loaded
  once into a ``maps/`` node of a store;
- the design matrices: :func:`make_second_level_design_matrix`.
"""

from chunkglm.design.second_level import make_second_level_design_matrix
from chunkglm.glm.second_level.model import OUTPUT_TYPES, SecondLevelModel, parse_contrast
from chunkglm.glm.second_level.nonparametric import non_parametric_inference

__all__ = ["OUTPUT_TYPES", "SecondLevelModel", "make_second_level_design_matrix", "non_parametric_inference",
           "parse_contrast"]
