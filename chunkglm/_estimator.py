"""The scikit-learn estimator protocol as nilearn's estimators follow it.

Shared by chunkglm's maskers and models: ``get_params``/``set_params``,
``clone`` and ``repr`` come from :class:`sklearn.base.BaseEstimator` (so every
``__init__`` stores its parameters unchanged under their own names), and
``__sklearn_tags__`` carries nilearn's tags (``estimator_type`` "masker" or
"glm", ``input_tags`` with ``niimg_like`` / ``surf_img``), which nilearn's
estimator checks read to decide which checks apply.

No dask and no chunkglm model package is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from sklearn.base import BaseEstimator
from sklearn.utils import InputTags as _SkInputTags

try:  # nilearn's own class when it has it (nilearn >= 0.11 with scikit-learn >= 1.6)
    from nilearn._utils.tags import InputTags
except ImportError:  # pragma: no cover - the same fields, defined here

    @dataclass
    class InputTags(_SkInputTags):
        """nilearn's ``InputTags``: scikit-learn's plus ``niimg_like`` and ``surf_img``."""

        one_d_array: bool = False
        two_d_array: bool = True
        three_d_array: bool = False
        sparse: bool = False
        categorical: bool = False
        string: bool = False
        dict: bool = False
        positive_only: bool = False
        allow_nan: bool = False
        pairwise: bool = False
        niimg_like: bool = True  # str / Path of a .nii[.gz] file, or a NIfTI image
        surf_img: bool = False  # nilearn SurfaceImage


def nilearn_tags(tags, estimator_type: str | None, niimg_like: bool = True, surf_img: bool = False):
    """scikit-learn ``tags`` completed as nilearn's: its ``InputTags`` and estimator type."""
    tags.input_tags = InputTags(niimg_like=niimg_like, surf_img=surf_img)
    if estimator_type is not None:
        tags.estimator_type = estimator_type
    return tags


class NilearnEstimator(BaseEstimator):
    """A scikit-learn estimator tagged as nilearn tags its own.

    Subclasses set ``_estimator_type`` ("masker", "glm" or None), and
    ``_niimg_like`` / ``_surf_img`` for the inputs they accept, and define
    ``__sklearn_is_fitted__`` from their fitted attributes.
    """

    _estimator_type: str | None = None
    _niimg_like = True
    _surf_img = False
    #: the nilearn module whose documentation page describes the class chunkglm mirrors
    _nilearn_module: str | None = None

    def _get_doc_link(self) -> str:
        """The page of nilearn's documentation for the class this one mirrors (same name and
        parameters), for the installed nilearn version; "" when there is none."""
        if self._nilearn_module is None:
            return ""
        try:
            release = ".".join(version("nilearn").split(".")[:3])
        except PackageNotFoundError:  # pragma: no cover - nilearn is a dependency
            release = "stable"
        return (f"https://nilearn.github.io/{release}/modules/generated/{self._nilearn_module}."
                f"{type(self).__name__}.html")

    def __sklearn_tags__(self):
        return nilearn_tags(super().__sklearn_tags__(), self._estimator_type,
                            niimg_like=self._niimg_like, surf_img=self._surf_img)

    def _more_tags(self):
        """The tags again, under scikit-learn < 1.6's name (nilearn's estimators keep both)."""
        return self.__sklearn_tags__()

    def _log(self, message: str, level: int = 1, method: str = "fit") -> None:
        """Print ``message`` as nilearn's estimators log ("[Class.method] message") on stdout,
        when ``verbose`` is at least ``level`` (True counts as 1)."""
        if int(getattr(self, "verbose", 0) or 0) >= level:
            print(f"[{type(self).__name__}.{method}] {message}")

    def __sklearn_is_fitted__(self) -> bool:  # overridden by subclasses with their attributes
        return any(name.endswith("_") and not name.startswith("__") for name in vars(self))
