"""Image-based meta-analysis with NiMARE's estimators, corrections and map names.

``chunkglm.meta.ibma`` holds the estimators (also importable from here, as
``nimare.meta.<Estimator>``), ``chunkglm.meta.correct`` (``chunkglm.correct``)
the correctors, ``chunkglm.meta.results`` (``chunkglm.results``) the :class:`MetaResult`. NiMARE 0.0.x's module functions ``ffx_glm``, ``mfx_glm`` and
``fsl_glm`` are importable from here and from ``chunkglm.meta.ibma``.
"""

from chunkglm.meta._inputs import convert_meta_maps
from chunkglm.meta.correct import FDRCorrector, FWECorrector
from chunkglm.meta.ibma import (
    FFX_GLM,
    MFX_GLM,
    RFX_GLM,
    DerSimonianLaird,
    Fishers,
    FixedEffectsHedges,
    Hedges,
    IBMAEstimator,
    PermutedOLS,
    SampleSizeBasedLikelihood,
    Stouffers,
    VarianceBasedLikelihood,
    WeightedLeastSquares,
    WeightedStouffers,
    ffx_glm,
    fsl_glm,
    mfx_glm,
)
from chunkglm.meta.results import MetaResult

__all__ = ["FFX_GLM", "MFX_GLM", "RFX_GLM", "DerSimonianLaird", "FDRCorrector", "FWECorrector", "Fishers",
           "FixedEffectsHedges", "Hedges", "IBMAEstimator", "MetaResult", "PermutedOLS", "SampleSizeBasedLikelihood",
           "Stouffers", "VarianceBasedLikelihood", "WeightedLeastSquares", "WeightedStouffers", "convert_meta_maps",
           "ffx_glm", "fsl_glm", "mfx_glm"]
