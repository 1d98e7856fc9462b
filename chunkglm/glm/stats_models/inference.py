"""Permutation FWE of a BIDS Stats Model's dataset nodes (``chunkglm app --n-perm``).

Each t contrast of a ``"glm"`` node at the Dataset level gets nilearn's max-T
permutation test, with the code ``chunkglm second-level --n-perm`` runs
(:func:`chunkglm.glm.second_level.permutation_maps` on the node's fitted
:class:`~chunkglm.glm.second_level.SecondLevelModel`: its maps and mask as they
are, nothing reloaded), written beside the node's other maps in fitlins' style:

- ``..._contrast-<c>_stat-logpMaxT_statmap.nii.gz``: -log10 of the FWE p-value
  (nilearn's ``logp_max_t``);
- ``..._contrast-<c>_stat-z_desc-fweCorrected_statmap.nii.gz``: the contrast's
  z map where that p-value is below ``alpha``, 0 elsewhere (the glm layout's
  ``_fwe-corrected`` map with permutations).

F contrasts are not permutation-tested (as in nilearn and ``second-level``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chunkglm.errors import InputError
from chunkglm.glm.io.bids import permutation_fwe_map
from chunkglm.glm.second_level import check_permutation_options, permutation_maps

__all__ = ["PermutationTest"]

#: stat label of each written map (fitlins' camelCase, as its stat-rSquare).
LOGP_STAT = "logpMaxT"
FWE_DESC = "fweCorrected"


@dataclass(frozen=True)
class PermutationTest:
    """Settings of the dataset nodes' max-T permutation test.

    Parameters
    ----------
    n_perm : int
        Number of permutations (sign flips for a one-sample test), >= 1.
    random_state : int or None
        Seed (nilearn's ``random_state``; None: a new one each run).
    two_sided_test : bool
        Test |t| (max of |t| over voxels per permutation).
    alpha : float
        FWE rate of the ``desc-fweCorrected`` z maps, in (0, 1).
    """

    n_perm: int
    random_state: int | None = None
    two_sided_test: bool = True
    alpha: float = 0.05

    def __post_init__(self):
        check_permutation_options(n_perm=self.n_perm)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not 0 < self.alpha < 1:
            raise InputError(f"the FWE alpha must be a number in (0, 1), e.g. 0.05; received {self.alpha!r}.")

    def run(self, model, weights, progress=None) -> dict:
        """nilearn's permutation maps (``t``, ``logp_max_t``) of one t contrast of a fitted group model.

        Parameters
        ----------
        model : chunkglm.glm.second_level.SecondLevelModel
            Fitted.
        weights : ndarray of shape (n_columns,)
            The contrast over the design's columns.
        progress : callable, optional
            ``progress(done, total)`` after each voxel block.
        """
        return permutation_maps(model, np.asarray(weights, dtype=float), n_perm=self.n_perm,
                                two_sided_test=self.two_sided_test, random_state=self.random_state,
                                progress=progress)

    def fitlins_maps(self, images, z_img) -> dict:
        """``{stat label or (stat, desc): image}`` written in fitlins' layout, from :meth:`run`'s
        ``images`` and the contrast's z map."""
        logp = images["logp_max_t"]
        return {LOGP_STAT: logp, ("z", FWE_DESC): permutation_fwe_map(z_img, logp, self.alpha)}

    def layout_settings(self) -> dict:
        """The settings as :func:`chunkglm.interfaces.bids.save_group_derivatives` takes them."""
        return {"n_perm": self.n_perm, "random_state": self.random_state, "two_sided_test": self.two_sided_test}

    def settings(self) -> dict:
        """For the provenance record."""
        return {"n_perm": self.n_perm, "random_state": self.random_state,
                "two_sided_test": self.two_sided_test, "alpha": self.alpha, "method": "max-T (nilearn)"}
