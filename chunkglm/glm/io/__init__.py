"""Saving fitted GLMs, nilearn 0.14's ``nilearn.glm.io`` (``save_glm_to_bids``), and
chunkglm's derivatives layouts (:mod:`chunkglm.glm.io.bids`). ``chunkglm.interfaces.bids``
gives the same functions under their older home, as nilearn does."""

from chunkglm.glm.io.bids import (
    check_correction_options,
    permutation_contrasts,
    save_glm_derivatives,
    save_glm_to_bids,
    save_group_derivatives,
    write_glm_to_bids,
)

__all__ = ["check_correction_options", "permutation_contrasts", "save_glm_derivatives",
           "save_glm_to_bids", "save_group_derivatives", "write_glm_to_bids"]
