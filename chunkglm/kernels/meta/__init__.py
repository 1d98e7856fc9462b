"""Image-based meta-analysis (IBMA) kernels: NiMARE 0.22 / PyMARE 0.0.13 on one voxel block.

Pure numpy on one clean (study, voxel) block: K studies x V voxels, float64,
finite, variances > 0, every voxel valid in every study (the caller applies
NiMARE's liberal-mask "bags" and ``aggressive_mask``). No dask, no files.

Every kernel returns a dict of (V,) float64 maps named and ordered as the
NiMARE 0.22 estimator's ``MetaResult`` maps, for the case NiMARE meets when no
dependence group holds more than one image (``DependenceModel.labels`` is
None): PyMARE then uses model-based standard errors, the estimator's own
``small_sample_correction`` default (Knapp-Hartung where tau^2 is estimated,
Wald for ``WeightedLeastSquares``), and ``weight_scheme`` has no effect (no
groups to rescale or collapse). The ``dof`` map is NiMARE's ``_dof_map``:
the group count minus one, ``K - 1``.

Conventions copied from NiMARE / PyMARE:

- ``p`` is ``exp(nlogp)``, ``nlogp`` the natural log of the p-value computed in
  log space (no underflow); ``logp`` is NiMARE's ``_nlogp_to_logp_values``:
  ``-nlogp / ln 10`` rounded to float32, clipped to [0, float32 max].
- The maps are what NiMARE's ``_fit_over_bags`` holds (float64). NiMARE's
  ``MetaResult`` then casts every map to float32 and clips ``p`` to
  [smallest positive float32, 1]; the writer does that, not the kernels.
- Knapp-Hartung: see :mod:`.wls`. A zero or non-finite ``se`` gives NaN
  ``z``/``p``/``logp``, as PyMARE.

Every kernel in :data:`KERNELS` gives bit-identical maps however voxels are
blocked and whatever the memory layout: sums over studies always run in study
order (:func:`_ksum`). The sign-flip nulls use one matrix product per batch of
flips instead (BLAS order), which is why their ties are taken within sqrt(eps).

Modules, as PyMARE splits its estimators:

- :mod:`.distributions`: log-space normal / t / chi^2 tails (``t_to_z``, ``nimare_logp``, ...)
- :mod:`.combination`: Fisher's and Stouffer's combination tests (grouped: Brown's method, group-level Stouffer)
- :mod:`.correlation`: the null correlation between images the grouped combination tests read
- :mod:`.dependence`: dependence groups in the meta-regression estimators (weights, CR2, Satterthwaite)
- :mod:`.wls`: weighted least squares, DerSimonian-Laird and Hedges tau^2, FixedEffectsHedges
- :mod:`.likelihood`: the ML/REML profile-likelihood solver (VarianceBased/SampleSizeBased)
- :mod:`.ols`: one-sample t and PermutedOLS's parametric maps
- :mod:`.glm`: the old API's FFX_GLM, MFX_GLM and RFX_GLM
- :mod:`.sign_flip`: sign-flip t, counts, empirical p and max-statistic null
- :mod:`.grf`: FSL's smoothness from residuals and Gaussian-random-field cluster p (old FFX/MFX ``cdt``/``q``)
- :mod:`.registry`: :data:`KERNELS`, :data:`INPUTS`, :data:`OUTPUTS`

Every name is re-exported here: ``from chunkglm.kernels import meta; meta.fishers(...)``.
"""

from chunkglm.kernels.meta._arrays import SMALL_SAMPLE_CORRECTIONS, _ksum, _log_ksum
from chunkglm.kernels.meta.combination import CANCELLATION_FLOOR, fishers, stouffers
from chunkglm.kernels.meta.correlation import add_moments, null_correlation, null_correlation_moments
from chunkglm.kernels.meta.distributions import log_chi2_sf, nimare_logp, t_to_nlogp, t_to_z
from chunkglm.kernels.meta.glm import ffx_glm, mfx_glm, rfx_glm
from chunkglm.kernels.meta.grf import (
    backward_neighbours,
    cluster_p,
    expected_clusters,
    expected_voxels,
    neighbour_sums,
    smoothness,
    standardise,
)
from chunkglm.kernels.meta.likelihood import (
    sample_size_based_likelihood,
    sample_size_based_nll,
    variance_based_likelihood,
    variance_based_nll,
)
from chunkglm.kernels.meta.ols import (
    collapse_blocks,
    one_sample_t,
    permuted_ols_parametric,
    weighted_mean_satterthwaite_dof,
)
from chunkglm.kernels.meta.registry import INPUTS, KERNELS, OUTPUTS
from chunkglm.kernels.meta.sign_flip import (
    empirical_p,
    sign_flip_counts,
    sign_flip_max_null,
    sign_flip_t,
    weighted_sign_flip_max_null,
    weighted_sign_flip_t,
)
from chunkglm.kernels.meta.wls import dersimonian_laird, fixed_effects_hedges, hedges, weighted_least_squares

__all__ = [
    "CANCELLATION_FLOOR", "INPUTS", "KERNELS", "OUTPUTS", "SMALL_SAMPLE_CORRECTIONS", "add_moments", "backward_neighbours",
    "cluster_p", "collapse_blocks", "expected_clusters", "expected_voxels", "neighbour_sums", "smoothness", "standardise",
    "dersimonian_laird", "empirical_p",
    "ffx_glm", "fishers", "fixed_effects_hedges", "hedges", "log_chi2_sf", "mfx_glm", "nimare_logp",
    "null_correlation", "null_correlation_moments", "one_sample_t",
    "permuted_ols_parametric", "rfx_glm", "sample_size_based_likelihood", "sample_size_based_nll",
    "sign_flip_counts", "sign_flip_max_null", "sign_flip_t", "stouffers", "t_to_nlogp", "t_to_z",
    "variance_based_likelihood", "variance_based_nll", "weighted_least_squares", "weighted_mean_satterthwaite_dof",
    "weighted_sign_flip_max_null", "weighted_sign_flip_t",
]
