"""An HTML report: one self-contained page, shown in notebooks, saved, opened.

:class:`HTMLReport` is a :class:`nilearn.reporting.HTMLReport` (code that
checks ``isinstance(report, nilearn.reporting.HTMLReport)`` keeps working)
with the same methods and attributes: ``body`` (what a notebook shows
inline, ``_repr_html_()``), ``width`` / ``height`` (an invalid value falls
back on nilearn's default with nilearn's warning), ``resize``,
``get_iframe``, ``get_standalone``. Two differences: ``save_as_html`` writes
the page itself (nilearn writes it wrapped in an ``<iframe srcdoc=...>``),
and ``open_in_browser`` opens that file instead of serving the page from a
short-lived local server. Figures are embedded in the page (base64 PNG) or,
for the page ``save_glm_to_bids`` writes, files beside it: the page reads
offline either way.
"""

from __future__ import annotations

import os
import re
import tempfile
import webbrowser
from pathlib import Path

from nilearn.reporting.html_report import HTMLReport as _NilearnHTMLReport

#: nilearn's default size (pixels) of a GLM report shown in a notebook (``report_dims``).
WIDTH_DEFAULT, HEIGHT_DEFAULT = 1600, 800

_BODY = re.compile(r"<body[^>]*>(.*)</body>", re.DOTALL)
_STYLE = re.compile(r"<style[^>]*>.*?</style>", re.DOTALL)


class HTMLReport(_NilearnHTMLReport):
    """A rendered report.

    Parameters
    ----------
    html : str
        The whole page.
    title : str
        The page's title.
    width, height : int
        Size of the frame the report is shown in within a notebook.

    Attributes
    ----------
    html : str
        The whole page (``get_standalone()``, ``str(report)``).
    body : str
        The page's style and body, without the document head: what
        ``_repr_html_`` gives a notebook, as nilearn's reports.
    """

    def __init__(self, html: str, title: str = "", width: int = WIDTH_DEFAULT,
                 height: int = HEIGHT_DEFAULT):
        # nilearn's constructor fills its own page template; this one holds a finished page. Nor is the
        # report counted among nilearn's open "views" (whose 10th triggers a memory warning): the page is
        # a string, not a served plot.
        self.html = html
        self.head_tpl = ""
        self.title = title
        self.body = _body(html)
        self._temp_file = None
        self._temp_file_removing_proc = None
        self.resize(width, height)

    def __str__(self) -> str:
        return self.html

    def save_as_html(self, file_name) -> Path:
        """Write the page (UTF-8); the folder must exist. Returns the path."""
        path = Path(file_name)
        path.write_text(self.html, encoding="utf-8")
        return path

    def open_in_browser(self, file_name=None) -> Path:
        """Save the page (to a temporary file by default) and open it in the default browser."""
        if file_name is None:
            handle, file_name = tempfile.mkstemp(suffix=".html", prefix="chunkglm_report_")
            os.close(handle)
        path = self.save_as_html(file_name)
        webbrowser.open(path.absolute().as_uri())
        return path


def _body(page: str) -> str:
    """The page's <style> elements and the content of its <body> (the page itself if it has none)."""
    found = _BODY.search(page)
    if found is None:
        return page
    return "".join(_STYLE.findall(page)) + found.group(1)
