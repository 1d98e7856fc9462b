"""``save_glm_to_bids`` and the derivatives layouts under nilearn's older module name
(``nilearn.interfaces.bids``); they live in :mod:`chunkglm.glm.io` (nilearn 0.14's home).

As nilearn's, ``save_glm_to_bids`` imported from here warns (FutureWarning) that its home
is ``chunkglm.glm``; the derivatives layouts (chunkglm's own) are given as they are.
"""

import warnings

from chunkglm.glm.io import (
    check_correction_options,
    permutation_contrasts,
    save_glm_derivatives,
    save_group_derivatives,
    write_glm_to_bids,
)
from chunkglm.glm.io import save_glm_to_bids as _save_glm_to_bids

__all__ = ["check_correction_options", "permutation_contrasts", "save_glm_derivatives",
           "save_glm_to_bids", "save_group_derivatives", "write_glm_to_bids"]


def save_glm_to_bids(*args, **kwargs):
    """:func:`chunkglm.glm.save_glm_to_bids`, with nilearn 0.14's FutureWarning for this path."""
    # nilearn's words first (code matching on them keeps working), then where chunkglm's lives
    warnings.warn("'save_glm_to_bids' has been moved to 'nilearn.glm' in version 0.13. Please import "
                  "from 'nilearn.glm' instead: with chunkglm, import it from 'chunkglm.glm' "
                  "(chunkglm.interfaces.bids keeps it while nilearn's path exists, until nilearn "
                  "0.15.0).", FutureWarning, stacklevel=2)
    return _save_glm_to_bids(*args, **kwargs)
