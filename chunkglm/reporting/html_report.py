"""An HTML report: one self-contained page, shown in notebooks, saved, opened.

The same methods as nilearn's :class:`nilearn.reporting.HTMLReport`
(``save_as_html``, ``open_in_browser``, ``get_iframe``, ``get_standalone``,
``resize``, ``_repr_html_``), so code written for nilearn's reports works on
chunkglm's. Figures are embedded in the page (base64 PNG): the file reads
offline and can be mailed or archived alone.
"""

from __future__ import annotations

import html
import os
import tempfile
import webbrowser
from pathlib import Path

#: nilearn's default size (pixels) of a report shown in a notebook.
WIDTH_DEFAULT, HEIGHT_DEFAULT = 1600, 800


class HTMLReport:
    """A rendered report.

    Parameters
    ----------
    html : str
        The whole page.
    title : str
        The page's title.
    width, height : int
        Size of the frame the report is shown in within a notebook.
    """

    def __init__(self, html: str, title: str = "", width: int = WIDTH_DEFAULT,
                 height: int = HEIGHT_DEFAULT):
        self.html = html
        self.title = title
        self.resize(width, height)

    def resize(self, width: int, height: int) -> HTMLReport:
        """Set the size of the notebook frame; returns the report."""
        self.width, self.height = int(width), int(height)
        return self

    def get_standalone(self) -> str:
        """The whole page, as saved by :meth:`save_as_html`."""
        return self.html

    def get_iframe(self, width: int | None = None, height: int | None = None) -> str:
        """An ``<iframe>`` holding the page (how notebooks show it)."""
        width, height = width or self.width, height or self.height
        return (f'<iframe srcdoc="{html.escape(self.html, quote=True)}" width="{width}" '
                f'height="{height}" frameborder="0"></iframe>')

    def _repr_html_(self) -> str:
        return self.get_iframe()

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
