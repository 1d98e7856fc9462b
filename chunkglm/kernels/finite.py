"""Non-finite input values, as nilearn's maskers treat them: set to 0.

nilearn masks data with ``ensure_finite=True`` (``nilearn.masking.apply_mask_fmri``
-> ``smooth_array`` -> ``nilearn._utils.niimg.ensure_finite_data``): every NaN
and +/-inf becomes 0 in its copy of the data, and the model sees the zeros.
The store keeps the values as given; the models replace them when they read a
block, once, here. Pure numpy on one block, no dask.

Blocks are (time|image, voxel): a *voxel* counts as affected when any of its
values along axis 0 is non-finite (the number the warning gives).
"""

from __future__ import annotations

import inspect
import os
import warnings

import numpy as np

#: nilearn's wording (``ensure_finite_data``), quoted in chunkglm's warnings.
NILEARN_MESSAGE = "Non-finite values detected. These values will be replaced with zeros."


def finite_block(block: np.ndarray) -> tuple[np.ndarray, int]:
    """The block with NaN/inf set to 0, and how many voxels (columns) held one.

    A block without any non-finite value is returned as it is (no copy); the
    test for that is one sum over the block, without a temporary array (NaN
    and inf propagate through a sum; a sum that overflows only sends the
    block to the exact check below). Otherwise the block is copied once and
    the non-finite entries zeroed; the input is never modified.

    Parameters
    ----------
    block : ndarray of shape (n, n_voxels)

    Returns
    -------
    (ndarray of the same shape and dtype, int)
    """
    if block.dtype.kind not in "fc" or block.size == 0:
        return block, 0
    with np.errstate(over="ignore", invalid="ignore"):  # inf - inf, or an overflowing sum
        if np.isfinite(np.sum(block)):
            return block, 0
    finite = np.isfinite(block)
    n_voxels = int(np.count_nonzero(~finite.all(axis=0))) if block.ndim > 1 else int((~finite).any())
    if n_voxels == 0:  # the sum overflowed; every value is finite
        return block, 0
    return np.where(finite, block, block.dtype.type(0)), n_voxels


def nonfinite_voxels(*blocks: np.ndarray) -> np.ndarray:
    """(n_voxels,) bool: the voxel (column) holds a NaN/inf in any of the (n, n_voxels) blocks.

    One sum per block when all is finite (the common case), as :func:`finite_block`.
    """
    flags = np.zeros(blocks[0].shape[-1], dtype=bool)
    for block in blocks:
        if block.dtype.kind not in "fc" or block.size == 0:
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.sum(block)):
                continue
        flags |= ~np.isfinite(block).all(axis=0)
    return flags


def finite_values(block: np.ndarray) -> np.ndarray:
    """:func:`finite_block` without the count (a second read of data already counted)."""
    return finite_block(block)[0]


#: What became of the values: nilearn's models (default) and NiMARE's IBMA estimators.
SET_TO_ZERO = f"they were set to 0, as nilearn does ({NILEARN_MESSAGE})"
LEFT_OUT = "those values were left out of the fit, as NiMARE does (not usable, like zeros)"


def warning_text(n_voxels: int, where: str, action: str = SET_TO_ZERO) -> str:
    """The warning chunkglm gives (nilearn's own is silent in its maskers' path)."""
    noun = "voxel" if n_voxels == 1 else "voxels"
    verb = "holds" if n_voxels == 1 else "hold"
    return f"{n_voxels} {noun} of {where} {verb} NaN or infinite values; {action}."


def warn(n_voxels: int, where: str, action: str = SET_TO_ZERO) -> None:
    """Warn (``UserWarning``, nilearn's category) when ``n_voxels`` > 0, pointing at the caller's code."""
    if n_voxels > 0:
        warnings.warn(warning_text(int(n_voxels), where, action), UserWarning, stacklevel=_stack_level())


def _stack_level() -> int:
    """The first frame outside chunkglm (as nilearn's ``find_stack_level``)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = inspect.currentframe(), 0
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return max(level, 1)
