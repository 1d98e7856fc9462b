"""How every ``chunkglm`` sub-command spells its options (one convention for all of them).

- ``-o/--output-dir`` for the output of every command (the old spellings
  ``--out``, ``--out-dir`` and ``convert``'s ``-o/--store`` still work, hidden
  from the help, with a note that they are deprecated).
- ``--two-sided`` / ``--one-sided`` for two-sidedness (``meta``'s old
  ``--two-sided yes|no`` still works).
- lists are space-separated and may be repeated: ``--subject 01 02``,
  ``--confounds trans_x trans_y`` (commas are accepted too).
- every option has help text, and the help shows its default.
- paths: ``~`` expanded, relative paths made absolute (against the current
  folder), trailing slashes dropped; URLs (``s3://...``) are kept as given.
- a usage error is one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from chunkglm.io.layout import is_url

#: Exit status of every usage or input error.
EXIT_ERROR = 2


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and defaults in the help (sub-parsers inherit both)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        self._arguments = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        """One line (no usage block), exit status 2."""
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}{self._list_hint(message)} (see {self.prog} --help)\n")

    def _list_hint(self, message) -> str:
        """A missing positional after a list option (``--mask m.nii INPUT``): the list took it."""
        if not message.startswith("the following arguments are required"):
            return ""
        given = set(getattr(self, "_arguments", ()))
        lists = [action.option_strings[-1] for action in self._actions
                 if action.option_strings and action.nargs in ("+", "*") and given & set(action.option_strings)]
        if not lists:
            return ""
        return (f"; {', '.join(lists)} took every value after {'them' if len(lists) > 1 else 'it'}: put the "
                f"positional arguments first, or end the list with --")


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the text already states its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.required
                or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or action.nargs == 0):
            return text
        return f"{text} (default: {action.default})"


def path_value(text) -> str:
    """A path option's value: ``~`` expanded, made absolute, no trailing slash; URLs as given
    (without a trailing slash)."""
    text = str(text)
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a folder or file name")
    if is_url(text):
        return text.rstrip("/") if text.rstrip("/").count("/") >= 2 else text
    return os.path.abspath(os.path.expanduser(text.removeprefix("file://")))


def _deprecated(base, new):
    """An argparse action class that does what ``base`` does after a note naming ``new``."""

    class Deprecated(base):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"{parser.prog}: note: {option_string} is deprecated; use {new}", file=sys.stderr)
            super().__call__(parser, namespace, values, option_string)

    return Deprecated


def deprecated_alias(parser, *flags, dest, new, kind="store", **kwargs) -> None:
    """Old spellings of an option: same ``dest``, hidden from the help, a note when used."""
    bases = {"store": argparse._StoreAction, "extend": argparse._ExtendAction,
             "store_true": argparse._StoreTrueAction}
    if kind == "extend":
        kwargs.setdefault("nargs", "+")
    kwargs.setdefault("default", argparse.SUPPRESS)  # the new spelling's default applies
    parser.add_argument(*flags, dest=dest, action=_deprecated(bases[kind], new), help=argparse.SUPPRESS,
                        **kwargs)


def require(parser, dest: str, flag: str) -> None:
    """Mark ``dest`` as required, checked after parsing (so hidden aliases satisfy it too)."""
    required = dict(parser.get_default("_required") or {})
    required[dest] = flag
    parser.set_defaults(_required=required)


def missing_required(args) -> list[str]:
    """The flags of required options that were not given."""
    return [flag for dest, flag in (getattr(args, "_required", None) or {}).items()
            if getattr(args, dest, None) is None]


def add_output_dir(parser, help_text, *old, required=True) -> None:
    """``-o/--output-dir`` (dest ``output_dir``), with hidden deprecated ``old`` spellings."""
    parser.add_argument("-o", "--output-dir", dest="output_dir", type=path_value, metavar="DIR",
                        help=f"{help_text} (required)" if required else help_text)
    if old:
        deprecated_alias(parser, *old, dest="output_dir", new="-o/--output-dir", type=path_value)
    if required:
        require(parser, "output_dir", "-o/--output-dir")


def split_list(values) -> list[str] | None:
    """``["01", "02,03"]`` -> ``["01", "02", "03"]`` (space- or comma-separated; None stays None)."""
    if values is None:
        return None
    return [item.strip() for value in values for item in str(value).split(",") if item.strip()]


def add_list(parser, *flags, help_text, metavar=None, **kwargs) -> None:
    """A list option: ``--subject 01 02``, repeatable (``--subject 01 --subject 02``)."""
    parser.add_argument(*flags, nargs="+", action="extend", metavar=metavar, help=help_text, **kwargs)


def add_sidedness(parser, two_sided: bool, what: str) -> None:
    """``--two-sided`` / ``--one-sided`` (dest ``two_sided``) with this command's default."""
    group = parser.add_mutually_exclusive_group()
    default = "two-sided" if two_sided else "one-sided"
    group.add_argument("--two-sided", dest="two_sided", action="store_true",
                       help=f"two-sided {what} (default: {default})")
    group.add_argument("--one-sided", dest="two_sided", action="store_false",
                       help=f"one-sided {what}, positive effects only (default: {default})")
    parser.set_defaults(two_sided=two_sided)


def old_two_sided_values(argv: list[str]) -> list[str]:
    """``meta``'s old ``--two-sided yes|no`` (and ``--two-sided=yes|no``) as the new flags."""
    out, items = [], list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        value = None
        if item.startswith("--two-sided="):
            value = item.split("=", 1)[1]
        elif item == "--two-sided" and i + 1 < len(items) and items[i + 1] in ("yes", "no"):
            value = items[i + 1]
            i += 1
        if value is None:
            out.append(item)
        elif value in ("yes", "no"):
            new = "--two-sided" if value == "yes" else "--one-sided"
            print(f"chunkglm meta: note: --two-sided {value} is deprecated; use {new}", file=sys.stderr)
            out.append(new)
        else:
            out.append(item)  # argparse reports it
        i += 1
    return out


def cluster_value(text) -> str:
    """A config name as given; a path starting with ``~`` expanded (names are looked up as given)."""
    text = str(text)
    return os.path.expanduser(text) if text.startswith("~") else text


def add_cluster_options(parser, *, starts_cluster=True) -> None:
    """--cluster (a config), --scheduler (a running scheduler) and --workers (local cluster size)."""
    if not starts_cluster:
        parser.add_argument(
            "--cluster", default="none", metavar="NAME|PATH", type=cluster_value,
            help="cluster config whose storage: section (object-storage backend, endpoint, retries) "
                 "applies; this command starts no cluster (default: none, i.e. the defaults)")
        return
    parser.add_argument(
        "--cluster", metavar="NAME|PATH", type=cluster_value,
        help="cluster config: a name from cluster_configs/ or a YAML path; 'none' runs in this "
             "process without a cluster (default: local, or the scheduler of --scheduler / "
             "DASK_SCHEDULER_ADDRESS when one is given)")
    parser.add_argument(
        "--scheduler", metavar="ADDRESS",
        help="run on an already running dask scheduler, e.g. tcp://host:8786, instead of starting a "
             "cluster (default: $DASK_SCHEDULER_ADDRESS when set, else none)")
    parser.add_argument(
        "--workers", type=int, metavar="N",
        help="number of workers of the local cluster (default: the config's n_workers, one per "
             "usable core)")


# -- value types: a bad value is a one-line usage error naming the option's rule ----------------


def _number(text, kind=float):
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{'a whole number' if kind is int else 'a number'} is needed; "
                                         f"received {text!r}") from None


def nonnegative(text) -> float:
    """A number >= 0 (a cut-off frequency, a smoothing width, a distance)."""
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"a number >= 0 is needed; received {text!r}")
    return value


def positive(text) -> float:
    """A number > 0 (a repetition time)."""
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a number > 0 is needed; received {text!r}")
    return value


def positive_int(text) -> int:
    """A whole number >= 1 (an iteration count)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number >= 1 is needed; received {text!r}")
    return value


def probability(text) -> float:
    """A p- or q-value in (0, 1)."""
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a p-value between 0 and 1 (exclusive) is needed; received {text!r}")
    return value


def byte_size(text) -> str:
    """A size such as "2GiB", "512MB" or a number of bytes (checked, kept as given)."""
    from chunkglm.chunking import as_bytes

    try:
        if as_bytes(text) <= 0:
            raise ValueError
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f'a size such as "2GiB", "512MiB" or a number of bytes is needed; '
                                         f"received {text!r}") from None
    return text


def none_or(text):
    """``none`` (any case) -> None, anything else as given."""
    return None if str(text).lower() == "none" else text
