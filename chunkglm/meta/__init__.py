"""Image-based meta-analysis with NiMARE's estimators, corrections and map names.

``chunkglm.meta.ibma`` holds the estimators, ``chunkglm.meta.correct`` the
correctors, ``chunkglm.meta.results`` the :class:`MetaResult`.
"""

from chunkglm.meta._inputs import convert_meta_maps
from chunkglm.meta.correct import FDRCorrector, FWECorrector
from chunkglm.meta.results import MetaResult

__all__ = ["FDRCorrector", "FWECorrector", "MetaResult", "convert_meta_maps"]
