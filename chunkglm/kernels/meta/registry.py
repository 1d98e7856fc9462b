"""The IBMA kernels by NiMARE class name, with their array inputs and output maps."""

from __future__ import annotations

from chunkglm.kernels.meta.combination import _weighted_stouffers, fishers, stouffers
from chunkglm.kernels.meta.glm import ffx_glm, mfx_glm, rfx_glm
from chunkglm.kernels.meta.likelihood import sample_size_based_likelihood, variance_based_likelihood
from chunkglm.kernels.meta.ols import permuted_ols_parametric
from chunkglm.kernels.meta.wls import dersimonian_laird, fixed_effects_hedges, hedges, weighted_least_squares

#: NiMARE class name -> kernel.
KERNELS = {
    "Fishers": fishers,
    "Stouffers": stouffers,
    "WeightedStouffers": _weighted_stouffers,
    "WeightedLeastSquares": weighted_least_squares,
    "DerSimonianLaird": dersimonian_laird,
    "Hedges": hedges,
    "VarianceBasedLikelihood": variance_based_likelihood,
    "SampleSizeBasedLikelihood": sample_size_based_likelihood,
    "FixedEffectsHedges": fixed_effects_hedges,
    "PermutedOLS": permuted_ols_parametric,
    "FFX_GLM": ffx_glm,
    "MFX_GLM": mfx_glm,
    "RFX_GLM": rfx_glm,
}

#: Positional array inputs of each kernel, in order ("sample_sizes" is per study).
INPUTS = {
    "Fishers": ("z",),
    "Stouffers": ("z",),
    "WeightedStouffers": ("z", "sample_sizes"),
    "WeightedLeastSquares": ("beta", "varcope"),
    "DerSimonianLaird": ("beta", "varcope"),
    "Hedges": ("beta", "varcope"),
    "VarianceBasedLikelihood": ("beta", "varcope"),
    "SampleSizeBasedLikelihood": ("beta", "sample_sizes"),
    "FixedEffectsHedges": ("t", "sample_sizes"),
    "PermutedOLS": ("beta",),
    "FFX_GLM": ("con", "se"),
    "MFX_GLM": ("con", "se"),
    "RFX_GLM": ("con",),
}

_FE = ("z", "p", "logp", "est", "se")
#: Output map names of each kernel, in NiMARE's order.
OUTPUTS = {
    "Fishers": ("z", "p", "logp", "dof"),
    "Stouffers": ("z", "p", "logp", "dof"),
    "WeightedStouffers": ("z", "p", "logp", "dof"),
    "WeightedLeastSquares": _FE + ("dof",),
    "DerSimonianLaird": _FE + ("tau2", "dof"),
    "Hedges": _FE + ("tau2", "dof"),
    "VarianceBasedLikelihood": _FE + ("tau2", "dof"),
    "SampleSizeBasedLikelihood": _FE + ("tau2", "sigma2", "dof"),
    "FixedEffectsHedges": _FE + ("dof",),
    "PermutedOLS": ("t", "z", "p", "logp", "dof"),
    "FFX_GLM": _FE + ("t", "dof"),
    "MFX_GLM": _FE + ("tau2", "t", "dof"),
    "RFX_GLM": ("t", "z", "p", "logp", "dof"),
}
