"""What a fitted GLM model says about itself: nilearn's model parameters and the runs' TRs.

Used by the reports (:mod:`chunkglm.report.build`) and by the BIDS writers
(:mod:`chunkglm.interfaces`), which import them from here.
"""

from __future__ import annotations

import numpy as np

from chunkglm.errors import InputError


def repetition_times(model) -> list[float]:
    """Each run's TR: ``model.t_r``, else the spacing of its design's frame times."""
    if getattr(model, "t_r", None) is not None:
        return [float(model.t_r)] * len(model.design_matrices_)
    out = []
    for index, design in enumerate(model.design_matrices_):
        times = np.asarray(design.index, dtype=float)
        if len(times) < 2:
            raise InputError(f"run {index}: t_r is unknown (model.t_r is None, one scan).")
        out.append(float(np.round((times[-1] - times[0]) / (len(times) - 1), 6)))
    return out


def model_parameters(model, t_r: float) -> dict:
    """nilearn's ``_attributes_to_dict`` for a first-level model (statmap.json)."""
    keys = ["subject_label", "drift_model", "hrf_model", "standardize", "noise_model", "t_r",
            "signal_scaling", "smoothing_fwhm", "slice_time_ref", "target_shape", "target_affine"]
    if model.hrf_model == "fir":
        keys.append("fir_delays")
    if model.drift_model == "cosine":
        keys.append("high_pass")
    elif model.drift_model == "polynomial":
        keys.append("drift_order")
    values = {key: getattr(model, key, None) for key in sorted(keys)}
    values["t_r"] = t_r
    values["standardize"] = getattr(model, "standardize", False)
    return {k: (list(np.asarray(v).tolist()) if isinstance(v, np.ndarray | tuple) else v)
            for k, v in values.items() if v is not None}


def group_model_parameters(model) -> dict:
    """nilearn's ``_attributes_to_dict`` for a second-level model (statmap.json).

    Of nilearn's selected attributes a SecondLevelModel has only these
    three; None values are left out, arrays and tuples become lists.
    """
    values = {key: getattr(model, key, None)
              for key in ("smoothing_fwhm", "target_affine", "target_shape")}
    return {k: (np.asarray(v).tolist() if isinstance(v, np.ndarray | tuple) else v)
            for k, v in values.items() if v is not None}
