"""GLMs with nilearn's module layout: :mod:`~chunkglm.glm.first_level`,
:mod:`~chunkglm.glm.second_level` (both packages) and :mod:`~chunkglm.glm.thresholding`."""
