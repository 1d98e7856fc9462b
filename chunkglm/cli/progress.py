"""Progress reporting for the ``chunkglm`` command.

One bar per long phase (conversion, first-level fits) on stderr, drawn with
:mod:`rich.progress` when stderr is a terminal. Otherwise, or with
``--no-progress``, no bar: one plain line per finished item
(``[3/10] runs/sub-01_...``), which logs and pipes read well.

Libraries' log lines (nilearn prints ``[function] message`` on stdout, e.g.
"A 'modulation' column was found" for every subject's design) are shown once
per command (:func:`library_lines_once`).
"""

from __future__ import annotations

import io
import logging
import re
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)



class Reporter:
    """Phases of a command, shown as bars (TTY) or as plain lines.

    Parameters
    ----------
    bars : bool
        Draw bars when the stream is a terminal; False (``--no-progress``)
        never draws any.
    stream : file, optional
        Default ``sys.stderr``.

    Attributes
    ----------
    bars : bool
        Whether bars are drawn (requested and the stream is a TTY).
    """

    def __init__(self, bars: bool = True, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.bars = bool(bars) and _is_tty(self.stream)
        self._live = None

    def line(self, text: str) -> None:
        """Print one message line (above the bar, when one is drawn)."""
        if self._live is not None:
            self._live.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    @contextmanager
    def phase(self, description: str, total: int | None = None):
        """A phase of ``total`` items; yields ``advance(label, done=None, total=None)``.

        ``advance`` counts one finished item (or sets ``done``/``total``
        when given, for callers that know them, like the converter).
        """
        if not self.bars:
            yield _PlainPhase(self.stream, total).advance
            return
        console = Console(file=self.stream, force_terminal=True)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                   TextColumn("{task.fields[item]}"))
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(description, total=total, item="")
            self._live = progress.console

            def advance(label, done=None, total=None):
                if total is not None:
                    progress.update(task, total=total)
                if done is None:
                    progress.advance(task)
                else:
                    progress.update(task, completed=done)
                progress.update(task, item=str(label))

            try:
                yield advance
            finally:
                self._live = None

    def converter_callback(self, advance):
        """Adapt ``advance`` to ``chunkglm.convert``'s ``progress(done, total, node)``."""
        def callback(done, total, node):
            advance(node, done=done, total=total)
        return callback


class _PlainPhase:
    """``[done/total] label`` lines."""

    def __init__(self, stream, total):
        self.stream, self.total, self.done = stream, total, 0

    def advance(self, label, done=None, total=None):
        self.total = total if total is not None else self.total
        self.done = done if done is not None else self.done + 1
        print(f"[{self.done}/{self.total if self.total is not None else '?'}] {label}",
              file=self.stream, flush=True)


def _is_tty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


#: A library's log line: nilearn's ``[make_first_level_design_matrix] A 'modulation' column ...``.
LIBRARY_LINE = re.compile(r"^\[[A-Za-z_][\w.]*\] \S")


class _OnceLines(io.TextIOBase):
    """A text stream that writes each library log line once, every other line as it comes."""

    def __init__(self, stream):
        self._stream, self._seen, self._partial = stream, set(), ""

    def writable(self) -> bool:
        return True

    def write(self, text) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            if LIBRARY_LINE.match(line):
                if line in self._seen:
                    continue
                self._seen.add(line)
            self._stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self._partial:  # a line without its end yet (print(..., end="")): written as it is
            self._stream.write(self._partial)
            self._partial = ""
        self._stream.flush()

    def isatty(self) -> bool:
        return _is_tty(self._stream)


#: The loggers whose records a command's in-process scheduler and client print on stderr.
DASK_LOGGERS = ("distributed", "tornado", "tornado.application")


class _OneLineRecords(logging.Filter):
    """Each dask/tornado log record as one line, each line once: no traceback.

    A lost worker (a host cut off, a node gone) makes the scheduler log the
    same error several times with tracebacks ("Exception in callback
    check_worker_ttl", "nanny worker(s) did not shut down"); the command goes
    on and re-runs the lost tasks, so the user needs the fact, once.
    """

    def __init__(self):
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        text = record.getMessage().splitlines()[0] if record.getMessage() else ""
        if record.exc_info and record.exc_info[1] is not None:
            err = record.exc_info[1]
            detail = str(err).splitlines()[0] if str(err) else ""
            text = f"{text}: {type(err).__name__}: {detail}" if text else f"{type(err).__name__}: {detail}"
        text = re.sub(r"<bound method (\S+) of <[^>]*>>", r"\1", text)  # no object reprs
        key = f"{record.name}|{text}"
        if key in self._seen:
            return False
        self._seen.add(key)
        record.msg, record.args, record.exc_info, record.exc_text, record.stack_info = text, (), None, None, None
        return True


@contextmanager
def library_lines_once():
    """Within the block, a library's log line on stdout (``[function] message``) is printed once,
    and the warnings and errors dask logs on stderr once each, as one line (:class:`_OneLineRecords`)."""
    original = sys.stdout
    sys.stdout = _OnceLines(original)
    try:
        import distributed.config  # noqa: F401 - sets up the handlers filtered below
    except ImportError:  # pragma: no cover - a dependency
        pass
    one_line = _OneLineRecords()
    handlers = {h for name in DASK_LOGGERS for h in logging.getLogger(name).handlers}
    for handler in handlers:
        handler.addFilter(one_line)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(one_line)
        sys.stdout.flush()
        sys.stdout = original
