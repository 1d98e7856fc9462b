"""The methods paragraph of a GLM report: what was fitted and how the maps were thresholded, in words.

A paragraph a reader can paste into a paper and edit, written from the same
pieces the page shows (the model's nilearn parameters, its designs, its
contrasts, the corrections of the corrected maps, the thresholding
options), so that a page made from a fitted model and one made from its
derivatives say the same. The meta-analysis page has NiMARE's own
description instead (``MetaResult.description_``).
"""

from __future__ import annotations

from importlib.metadata import version

from chunkglm._version import __version__

#: nilearn's noise models, in words.
_NOISE = {"ols": "ordinary least squares (no serial-correlation model)",
          "ar1": "an AR(1) model of the serial correlations (prewhitening, as nilearn)"}


def first_level_methods(parameters: dict, scans: list[int], contrasts: list[str], options,
                        subject: str | None = None) -> str:
    """The paragraph of a first-level page.

    Parameters
    ----------
    parameters : dict
        nilearn's names (``hrf_model``, ``drift_model``, ``high_pass``,
        ``noise_model``, ``t_r``, ``slice_time_ref``, ``smoothing_fwhm``,
        ``confounds``); missing ones are not mentioned.
    scans : list of int
        Scans per run.
    contrasts : list of str
    options : chunkglm.report.sections.ReportOptions
        How the uncorrected maps are thresholded.
    subject : str, optional
        The subject label (without ``sub-``).
    """
    who = f" of sub-{subject}" if subject else ""
    timing = [f"{sum(scans)} scans"] if scans else []
    if parameters.get("t_r") is not None:
        timing.append(f"TR = {_numbers(parameters['t_r'])} s")
    if parameters.get("slice_time_ref") is not None:
        timing.append(f"slice-timing reference at {_numbers(parameters['slice_time_ref'])} of the TR")
    sentences = [f"A first-level general linear model was fitted to {len(scans) or 'the'} run(s){who}"
                 f"{' (' + ', '.join(timing) + ')' if timing else ''} with chunkglm {__version__}, which "
                 f"reproduces nilearn {version('nilearn')}'s FirstLevelModel."]
    if parameters.get("hrf_model"):
        sentences.append(f"The events were convolved with the {parameters['hrf_model']} haemodynamic response "
                         "function.")
    sentences += _drift(parameters)
    confounds = parameters.get("confounds")
    if confounds:
        names = confounds if isinstance(confounds, list) else [confounds]
        sentences.append(f"{len(names)} confound regressor(s) were included ({', '.join(map(str, names))}).")
    if parameters.get("smoothing_fwhm"):
        sentences.append(f"The data were smoothed with a {parameters['smoothing_fwhm']:g} mm FWHM Gaussian kernel.")
    if parameters.get("noise_model"):
        sentences.append(f"The model used {_NOISE.get(parameters['noise_model'], parameters['noise_model'])}.")
    sentences += _contrasts_and_thresholds(contrasts, options, [])
    return " ".join(sentences)


def second_level_methods(n_maps, regressors: list[str], contrasts: list[str], options, corrections=(),
                         first_level_contrast: str | None = None, smoothing_fwhm=None) -> str:
    """The paragraph of a group (second-level) page.

    ``corrections``: the :class:`~chunkglm.report.sections.Correction` of
    each corrected map shown (said once each).
    """
    of = f" of the first-level contrast {first_level_contrast}" if first_level_contrast else ""
    sentences = [f"A second-level general linear model (ordinary least squares) was fitted to "
                 f"{n_maps if n_maps is not None else 'the'} map(s){of} with chunkglm {__version__}, which "
                 f"reproduces nilearn {version('nilearn')}'s SecondLevelModel; regressors: "
                 f"{', '.join(map(str, regressors)) or 'none'}."]
    if smoothing_fwhm:
        sentences.append(f"The maps were smoothed with a {smoothing_fwhm:g} mm FWHM Gaussian kernel.")
    return " ".join(sentences + _contrasts_and_thresholds(contrasts, options, corrections))


def _numbers(value) -> str:
    """``2`` or, one per run where runs differ, ``2, 2.5``."""
    return ", ".join(f"{v:g}" for v in value) if isinstance(value, list | tuple) else f"{value:g}"


def _drift(parameters: dict) -> list[str]:
    drift = parameters.get("drift_model")
    if drift == "cosine":
        cutoff = parameters.get("high_pass")
        return ["Low-frequency drifts were modelled by a discrete cosine basis"
                f"{f' (high-pass filter {cutoff:g} Hz)' if cutoff is not None else ''}."]
    if drift == "polynomial":
        order = parameters.get("drift_order")
        return [f"Low-frequency drifts were modelled by polynomials{f' up to order {order}' if order else ''}."]
    return ["No drift regressor was included."] if "drift_model" in parameters else []


def _contrasts_and_thresholds(contrasts, options, corrections) -> list[str]:
    if not contrasts:
        return ["No contrast was estimated."]
    sentences = [f"{len(contrasts)} contrast(s) were estimated ({', '.join(map(str, contrasts))}); their z maps "
                 f"are shown {threshold_words(options)}."]
    seen = []
    for correction in corrections:
        words = correction.describe()
        if words not in seen:
            seen.append(words)
    if seen:
        sentences.append(f"Corrected maps: {'; '.join(seen)}.")
    return sentences


def threshold_words(options) -> str:
    """How the uncorrected maps are thresholded, e.g. "at p < 0.001 uncorrected (one-sided)"."""
    sides = "two-sided" if options.two_sided else "one-sided"
    if options.height_control == "fpr":
        words = f"at p < {options.alpha:g} uncorrected ({sides})"
    elif options.height_control == "fdr":
        words = f"at q < {options.alpha:g} (false discovery rate, Benjamini-Hochberg; {sides})"
    elif options.height_control == "bonferroni":
        words = f"at p < {options.alpha:g}, Bonferroni-corrected ({sides})"
    else:
        words = f"above |z| = {options.threshold:g}" if options.two_sided else f"above z = {options.threshold:g}"
    if options.cluster_threshold:
        words += f", in clusters of at least {options.cluster_threshold} voxels"
    return words
