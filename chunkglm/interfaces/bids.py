"""``save_glm_to_bids`` and the derivatives layouts under nilearn's older module name
(``nilearn.interfaces.bids``); they live in :mod:`chunkglm.glm.io` (nilearn 0.14's home)."""

from chunkglm.glm.io import (
    check_correction_options,
    permutation_contrasts,
    save_glm_derivatives,
    save_glm_to_bids,
    save_group_derivatives,
    write_glm_to_bids,
)

__all__ = ["check_correction_options", "permutation_contrasts", "save_glm_derivatives",
           "save_glm_to_bids", "save_group_derivatives", "write_glm_to_bids"]
