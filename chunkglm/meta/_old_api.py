"""NiMARE 0.0.x's module functions ``ffx_glm``, ``mfx_glm`` and ``fsl_glm``, without FSL.

The old functions took masked (n_contrasts, n_voxels) arrays and a mask image, wrote
them for FSL, ran ``flameo`` (``--runmode=fe`` or ``flame1``), ``smoothest`` and
``cluster`` (see :mod:`chunkglm.meta.grf`) and returned a dict of masked maps:
``cope``, ``z``, ``thresh_z``, ``t``, ``p`` (two-sided from z, whatever ``two_sided``)
and ``log_p`` (-log10 p). These functions return the same dict: the voxelwise maps
from the closed forms of :mod:`chunkglm.kernels.meta.glm` (``FFX_GLM``/``MFX_GLM``),
run over voxel blocks of the arrays, the smoothness summed in the same graph, then
FSL's cluster rule on the z map as a global pass.
"""

from __future__ import annotations

import numpy as np
from scipy import special

from chunkglm.errors import InputError
from chunkglm.graph import meta as meta_graph
from chunkglm.kernels import meta as km
from chunkglm.meta import _nimare_inputs as nm
from chunkglm.meta import grf
from chunkglm.meta._blocks import _fit_block

_RUN_MODES = {"ffx": "FFX_GLM", "mfx": "MFX_GLM"}
_LN10 = np.log(10.0)


def fsl_glm(con_maps, se_maps, sample_sizes, mask, inference, cdt=0.01, q=0.05, work_dir="fsl_glm",
            two_sided=True, *, chunk_voxels=None):
    """Run NiMARE 0.0.x's FSL GLM (fixed or mixed effects) with chunkglm's kernels instead of FSL.

    Parameters
    ----------
    con_maps : ndarray of shape (n_contrasts, n_voxels)
        Contrast maps after masking (``mask``'s in-mask voxels in C order, as nilearn's
        ``apply_mask``).
    se_maps : ndarray of shape (n_contrasts, n_voxels)
        Their standard errors (squared into variances, as the old code did for flameo).
    sample_sizes : ndarray of shape (n_contrasts,)
        Sample size of each contrast: ``n - 1`` is its variance's dof (fixed effects add
        them to the dof; FLAME1's mixed-effects dof is ``n_contrasts - 1``).
    mask : nibabel image, path or NiftiMasker
        The mask the maps were taken with (its grid places the voxels for the clusters).
    inference : {"ffx", "mfx"}
        ``flameo --runmode=fe`` or ``flame1``.
    cdt : float
        Cluster-defining threshold: ``0 < cdt < 1`` a two-tailed p (its z is the
        threshold), otherwise a z itself, as old NiMARE.
    q : float
        Clusters whose Gaussian-random-field p-value is below ``q`` are kept in ``thresh_z``.
    work_dir : str
        Accepted for compatibility and not used: nothing is written (FSL is not run).
    two_sided : bool
        Negative clusters too (``thresh_z`` negative there). ``p`` is two-sided either way,
        as the old function's.
    chunk_voxels : int, optional
        chunkglm only: voxels per block (default: the package memory budget).

    Returns
    -------
    dict of str -> ndarray of shape (n_voxels,)
        ``cope``, ``z``, ``thresh_z``, ``t``, ``p``, ``log_p`` (float64). Voxels where
        fewer than two contrasts hold a usable (finite, non-zero) value are NaN (flameo
        received zeros there).

    Notes
    -----
    Differences from FSL: entries that are NaN or 0 are left out per voxel (NiMARE 0.22's
    rule for every estimator); FSL's small-dof correction of dLh in ``smoothest`` is not
    applied (:mod:`chunkglm.meta.grf`).
    """
    if inference not in _RUN_MODES:
        raise InputError(f'Input "inference" must be "mfx" or "ffx"; received {inference!r}.')
    con, se, sizes = _check_arrays(con_maps, se_maps, sample_sizes)
    ijk, shape = _voxels(mask, con.shape[1])
    z_threshold = grf.check_cluster_z(grf.cdt_to_z(cdt))
    if not 0 < q < 1:
        raise InputError(f"q must be a probability in (0, 1); received {q!r}.")
    kernel = _RUN_MODES[inference]
    outputs = km.OUTPUTS[kernel]
    blocks = [meta_graph.from_numpy(con, chunk_voxels), meta_graph.from_numpy(se, chunk_voxels)]
    lazy = meta_graph.block_maps(
        _fit_block, blocks, len(outputs) + 1, f"meta-fsl_glm-{inference}", kernel_name=kernel,
        roles=("con", "se", "sample_sizes"), stored=["beta", "se"], aliases={"con": "beta"}, row_scale=None,
        sample_sizes=sizes, params={"two_sided": bool(two_sided)}, per_study={}, aggressive=False, outputs=outputs)
    values, sums = meta_graph.compute_together(lazy, grf.smoothness_sums(blocks[0], ijk, shape))
    maps = dict(zip(outputs, np.asarray(values)))
    smooth = km.smoothness(sums)
    thresh = grf.grf_cluster_maps(maps["z"], ijk, shape, z_threshold, q, two_sided, smooth)["z_corr-cluster"]
    nlogp = special.log_ndtr(-np.abs(maps["z"])) + np.log(2.0)  # two-sided p from z, in log space
    return {"cope": maps["est"], "z": maps["z"], "thresh_z": thresh, "t": maps["t"], "p": np.exp(nlogp),
            "log_p": -nlogp / _LN10}


def ffx_glm(con_maps, se_maps, sample_sizes, mask, cdt=0.01, q=0.05, work_dir="ffx_glm", two_sided=True, *,
            chunk_voxels=None):
    """Fixed-effects GLM on contrast and standard-error maps (NiMARE 0.0.x ``ffx_glm``), without FSL.

    :func:`fsl_glm` with ``inference="ffx"``; same parameters (``work_dir`` accepted, not used)
    and the same returned dict (``cope``, ``z``, ``thresh_z``, ``t``, ``p``, ``log_p``).
    """
    return fsl_glm(con_maps, se_maps, sample_sizes, mask, "ffx", cdt=cdt, q=q, work_dir=work_dir,
                   two_sided=two_sided, chunk_voxels=chunk_voxels)


def mfx_glm(con_maps, se_maps, sample_sizes, mask, cdt=0.01, q=0.05, work_dir="mfx_glm", two_sided=True, *,
            chunk_voxels=None):
    """Mixed-effects GLM (FLAME1-style REML tau^2) on contrast and standard-error maps (NiMARE 0.0.x
    ``mfx_glm``), without FSL.

    :func:`fsl_glm` with ``inference="mfx"``; same parameters (``work_dir`` accepted, not used)
    and the same returned dict (``cope``, ``z``, ``thresh_z``, ``t``, ``p``, ``log_p``).
    """
    return fsl_glm(con_maps, se_maps, sample_sizes, mask, "mfx", cdt=cdt, q=q, work_dir=work_dir,
                   two_sided=two_sided, chunk_voxels=chunk_voxels)


def _check_arrays(con_maps, se_maps, sample_sizes):
    con = np.asarray(con_maps, dtype=np.float64)
    se = np.asarray(se_maps, dtype=np.float64)
    sizes = np.asarray(sample_sizes, dtype=np.float64).ravel()
    if con.ndim != 2 or con.shape != se.shape:
        raise InputError(f"con_maps and se_maps must be (n_contrasts, n_voxels) arrays of one shape; received "
                         f"{con.shape} and {se.shape}.")
    if sizes.shape[0] != con.shape[0]:
        raise InputError(f"sample_sizes must hold one value per contrast map: {con.shape[0]} maps, "
                         f"{sizes.shape[0]} sample sizes.")
    if not (np.isfinite(sizes).all() and (sizes > 1).all()):
        raise InputError(f"sample_sizes must be finite and above 1 (n - 1 is each map's dof); received {sizes}.")
    return con, se, sizes


def _voxels(mask, n_voxels):
    img = nm.mask_image(mask)
    if img is None:
        raise InputError("mask is required: the mask image the maps were taken with (nibabel image or path).")
    inside = np.asarray(img.dataobj).reshape(img.shape[:3]) != 0
    ijk = np.argwhere(inside)
    if ijk.shape[0] != n_voxels:
        raise InputError(f"mask has {ijk.shape[0]} in-mask voxels but the maps have {n_voxels}: give the mask "
                         "the maps were taken with (nilearn's apply_mask order).")
    return ijk, inside.shape
