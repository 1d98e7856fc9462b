"""The report page (:class:`HTMLReport`), defined in :mod:`chunkglm.reporting.html_report`
(nilearn's ``nilearn.reporting.HTMLReport`` home) so that both layers can hand it out."""

from chunkglm.reporting.html_report import HEIGHT_DEFAULT, WIDTH_DEFAULT, HTMLReport

__all__ = ["HEIGHT_DEFAULT", "WIDTH_DEFAULT", "HTMLReport"]
