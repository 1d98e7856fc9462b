"""VarianceBasedLikelihood on NiMARE's own test data: where chunkglm's tau2 differs from NiMARE's, which
likelihood is higher. Runs INSIDE ``.venv-nimare`` (NiMARE 0.22 and chunkglm, editable, both installed).

Usage::

    python tests/_nimare_vbl_optimum.py OUT.json

OUT.json: ``{"skip": reason}`` when NiMARE's test images are not installed, else per method
(``ml``, ``reml``): ``n_voxels`` fitted on both sides, and for each voxel whose tau2 differs
(beyond 1e-3 relative, 1e-4 absolute) its ``tau2`` on both sides and PyMARE's own negative
log-likelihood (``VarianceBasedLikelihoodEstimator._nll_func``) at both, on the voxel's
studies (NiMARE's liberal-mask bag).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings

import numpy as np


def main(out_path):
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    from nimare.dataset import Dataset
    from nimare.meta import ibma
    from nimare.tests.utils import get_test_data_path
    from pymare.estimators import VarianceBasedLikelihoodEstimator

    from chunkglm.meta import ibma as chunkglm_ibma

    folder = os.path.join(get_test_data_path(), "test_pain_dataset")
    if not os.path.isdir(folder):
        json.dump({"skip": f"NiMARE's test images are not installed ({folder}); `make test` unpacks them "
                           "from ../shared/peer-data/"}, open(out_path, "w"))
        return
    dset = Dataset(os.path.join(get_test_data_path(), "test_pain_dataset.json"),
                   mask=os.path.join(folder, "mask.nii.gz"))
    dset.update_path(folder)
    report = {}
    for method in ("ml", "reml"):
        nimare_fit = ibma.VarianceBasedLikelihood(method=method)
        theirs = np.asarray(nimare_fit.fit(dset).maps["tau2"], dtype=np.float64)
        ours = np.asarray(chunkglm_ibma.VarianceBasedLikelihood(method=method).fit(dset).maps["tau2"],
                          dtype=np.float64)
        both = np.isfinite(theirs) & np.isfinite(ours)
        differ = both & ~np.isclose(ours, theirs, rtol=1e-3, atol=1e-4)
        voxels = []
        bags = zip(nimare_fit.inputs_["data_bags"]["beta_maps"], nimare_fit.inputs_["data_bags"]["varcope_maps"])
        for beta_bag, varcope_bag in bags:
            for position in np.flatnonzero(np.isin(beta_bag["voxel_mask"], np.flatnonzero(differ))):
                voxel = int(beta_bag["voxel_mask"][position])
                y, v = beta_bag["values"][:, [position]], varcope_bag["values"][:, [position]]
                nll = VarianceBasedLikelihoodEstimator(method=method)._nll_func
                design = np.ones((y.shape[0], 1))
                voxels.append({"voxel": voxel, "n_studies": int(y.shape[0]),
                               "tau2_nimare": float(theirs[voxel]), "tau2_chunkglm": float(ours[voxel]),
                               "nll_nimare": float(nll(np.array([theirs[voxel]]), y, v, design)[0]),
                               "nll_chunkglm": float(nll(np.array([ours[voxel]]), y, v, design)[0])})
        report[method] = {"n_voxels": int(both.sum()), "differ": voxels}
    json.dump(report, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
