"""The derivative writer core: file-name labels, names, staged writes, JSON sidecars.

Every derivative output of chunkglm is named, sanitised and written through
this module: the GLM layouts (:mod:`chunkglm.interfaces`), the
meta-analysis (:mod:`chunkglm.meta.outputs`) and the maps maskers
(:mod:`chunkglm.maskers.outputs`); :mod:`chunkglm.report.from_derivatives` reads
the files back with the same labels.

Labels. Names given by users become parts of file names through one of
three functions, each keeping the names chunkglm has always written:

- :func:`contrast_label`: GLM contrast names in nilearn's file set, as
  nilearn's ``_clean_contrast_name`` (camelCase words, ASCII letters and
  digits only: ``"a - b"`` -> ``aMinusB``, case folded: ``faceVsBaseline`` ->
  ``facevsbaseline``); names with a path separator or without a letter or
  digit are refused. These are BIDS ``contrast-<label>`` entities.
  :func:`glm_label` is the same for the derivatives/glm (LAION) layout,
  without the case folding (``faceVsBaseline`` stays ``faceVsBaseline``).
- :func:`file_label`: meta-analysis map names, as NiMARE writes them (letters,
  digits, ``-`` and ``_`` kept, so ``z_corr-FDR_method-indep`` stays as it
  is; ``/`` becomes ``-``, anything else is dropped). They are not BIDS
  entities: NiMARE's map names hold ``_`` and ``-``, which
  :func:`contrast_label` would change.
- :func:`check_label`: labels the user gives as labels (subject, task,
  atlas): kept as they are, refused unless letters and digits.

No label can name a folder, and every planned path is checked
(:func:`check_paths`, :func:`check_relative`) to stay inside the output
folder.

Staged writes. :class:`StagedOutput` gives a temporary folder beside
``out_dir`` (in its parent, so on the same filesystem). Files are written
there; when the ``with`` block ends without error they are moved into
``out_dir``:

- ``out_dir`` does not exist: the staged folder is renamed to it (one
  atomic rename);
- it exists: each file is moved in with :func:`os.replace` (atomic per
  file). A file it replaces is first set aside, so that if any move fails
  every moved file is taken out again, every replaced file put back and
  every folder created removed.

On any error (including KeyboardInterrupt) the temporary folder is removed
and ``out_dir`` is as it was. Only a killed process can leave a temporary
folder, named ``.<out_dir name>.chunkglm-<host>-<pid>-<hex>``, in the
parent, never inside ``out_dir``: a killed command never leaves a
half-written file under a final name, and the next write to ``out_dir``
removes the folders of processes that are gone (:mod:`chunkglm.io.scratch`).

``out_dir`` may also be an object-store URL (``s3://bucket/derivatives``):
files are staged in a local temporary folder and, when the block ends
without error, uploaded (with retries, see :mod:`chunkglm.io.backends`).
Object stores have no atomic rename, so completeness is carried by a
``marker``: a relative path that is deleted first and written last, once
every other file is uploaded. A set whose marker is missing is incomplete
(:func:`output_complete`); re-running rewrites it. The marker works the same
on local folders (moved in last; an old marker is set aside first).

BIDS validation. Each derivatives dataset chunkglm writes (a folder where a
``dataset_description.json`` is staged) gets a ``.bidsignore`` beside that
file: :data:`BIDSIGNORE` (the names BIDS does not define yet: nilearn's
GLM file set, the derivatives/glm layout, chunkglm's records, reports and
stores) plus the patterns the writer adds with :meth:`StagedOutput.ignore`
(the meta-analysis' NiMARE map names, the maskers' time series). An existing
``.bidsignore`` keeps its lines; missing patterns are appended. The BIDS
validator (``bids-validator-deno``, tests/test_bids_validator.py) then
reports no error on these datasets.

JSON. :func:`write_json` writes sidecars (numpy values as numbers and
lists) in the layout each output has always had (nilearn's sorted 4-space
JSON for the GLM files, 2-space insertion order for the meta-analysis and
the maskers); :func:`dataset_description` gives a derivative
``dataset_description.json`` with chunkglm in ``GeneratedBy`` and the inputs
in ``SourceDatasets`` (given, or set by the command line with
:func:`source_datasets`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import string
import tempfile
import time
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path, PurePosixPath

import numpy as np
from zarr.core.buffer import default_buffer_prototype

from chunkglm._version import __version__
from chunkglm.errors import InputError
from chunkglm.io.backends import open_store, sync
from chunkglm.io.layout import is_url, redact_url
from chunkglm.io.scratch import owned_name, remove_stale

#: ``GeneratedBy`` / ``Software`` entry of every sidecar.
SOFTWARE = {"Name": "chunkglm", "Version": __version__}
#: BIDS version written in dataset_description.json.
BIDS_VERSION = "1.9.0"
#: nilearn's order of BIDS entities (raw, then derivatives), without the
#: entities nilearn drops from output names (part, echo, hemi, desc).
ENTITY_ORDER = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "space", "res", "den",
                "contrast", "stat")

#: File names chunkglm writes that BIDS does not define (yet), as ``.bidsignore`` patterns
#: (gitignore syntax; a name without "/" matches at any depth, a folder by its bare name).
BIDSIGNORE = (
    # nilearn's save_glm_to_bids file set (with or without a prefix; "group": its second level):
    # statistical maps (BEP041), their model JSON, design matrices, figures, cluster tables
    "*statmap.nii.gz", "*statmap.json", "*design.tsv", "*design.json", "*design.png", "*design.svg",
    "*clusters.tsv", "*clusters.json", "group",
    # its surface forms (nilearn 0.14.1's GIFTI per hemisphere, chunkglm's CIFTI dense scalars), maps and masks
    "*statmap.gii", "*statmap.dscalar.nii", "*_mask.gii", "*_mask.dscalar.nii",
    # masks named after a prefix that is not BIDS (prefix="study1": study1_mask.nii.gz); masks
    # with BIDS names (sub-*) are still checked
    "*_mask.nii.gz", "!sub-*_mask.nii.gz",
    # the derivatives/glm layout: first_level/sub-XX/..._stat-<s>.nii.gz, group_level/...
    "first_level", "group_level",
    # chunkglm's provenance records, HTML reports, cohort stores (zarr) inside an output folder
    "*provenance.json", "*.html", "*.zarr",
)
#: File name of the patterns above in a dataset, and the first line of a new one.
BIDSIGNORE_FILE = ".bidsignore"
_BIDSIGNORE_HEADER = "# Written by chunkglm: file names BIDS does not define (yet); the BIDS validator skips them."

#: Characters that can never be in a name: they would make it a path (or end it, NUL).
PATH_CHARACTERS = ("/", "\\", "\x00")

_ALNUM = frozenset(string.ascii_letters + string.digits)
_WORDS = (("-", " Minus "), ("+", " Plus "), (">", " Gt "), ("<", " Lt "), ("_", " "))
_FILE_LABEL = re.compile(r"[^A-Za-z0-9_-]")


# -- labels ------------------------------------------------------------------------------------


def contrast_label(name) -> str:
    """A contrast name as a BIDS label, as nilearn's ``_clean_contrast_name``.

    ``"a - b"`` -> ``"aMinusB"``, ``"face_vs_house"`` -> ``"faceVsHouse"``,
    ``"a>b"`` -> ``"aGtB"``. Only ASCII letters and digits are kept. nilearn
    folds case: the first word is lower-cased and the others title-cased, so
    ``"faceVsBaseline"`` -> ``"facevsbaseline"`` (nilearn's file set keeps
    this rule; the derivatives/glm layout uses :func:`glm_label`).

    Raises
    ------
    TypeError
        If ``name`` is not a string.
    InputError
        If it holds a path separator or NUL, or no ASCII letter or digit.
    """
    return _camel_label(name, keep_case=False)


def glm_label(name) -> str:
    """A contrast name as the derivatives/glm (LAION) layout's label: the user's name verbatim.

    A name that already is a BIDS label (ASCII letters and digits) is kept as
    it is: ``"faceVsBaseline"`` -> ``"faceVsBaseline"`` (:func:`contrast_label`,
    nilearn's rule, gives ``facevsbaseline``). Other names go through
    nilearn's camelCase conversion without folding the case of the user's
    letters, only upper-casing the first letter of each later word:
    ``"a - b"`` -> ``"aMinusB"``, ``"face_vs_house"`` -> ``"faceVsHouse"``,
    ``"Face - House"`` -> ``"FaceMinusHouse"``.

    Raises
    ------
    TypeError, InputError
        As :func:`contrast_label`.
    """
    return _camel_label(name, keep_case=True)


def _camel_label(name, *, keep_case: bool) -> str:
    if not isinstance(name, str):
        raise TypeError(f"contrast names must be strings, not {type(name).__name__} ({name!r}).")
    unsafe = [c for c in PATH_CHARACTERS if c in name]
    if unsafe:
        raise InputError(
            f"contrast name {name!r} contains {unsafe[0]!r}: names become file names, so path "
            f"separators are refused. Name the contrast, e.g. contrasts={{'myContrast': {name!r}}}.")
    text = name
    for old, new in _WORDS:
        text = text.replace(old, new)
    words = text.split(" ")
    if keep_case:
        words = [words[0]] + [word[:1].upper() + word[1:] for word in words[1:]]
    else:
        words = [words[0].lower()] + [word.title() for word in words[1:]]
    label = "".join(ch for ch in " ".join(words) if ch in _ALNUM)
    if not label:
        raise InputError(
            f"contrast name {name!r} has no ASCII letter or digit, so it cannot become a BIDS "
            "label (contrast-<label>); give it a name such as 'aMinusB'.")
    return label


def file_label(name: str) -> str:
    """A meta-analysis map name as a file-name label: letters, digits, ``-`` and ``_`` only.

    ``/`` becomes ``-``; every other character is dropped; an empty result is
    ``"map"``. Never a path.
    """
    return _FILE_LABEL.sub("", name.replace("/", "-")) or "map"


def check_label(label, what: str) -> str:
    """A label given as it is (subject, task, atlas): letters and digits only, else InputError."""
    if not isinstance(label, str) or not label or any(c not in _ALNUM for c in label):
        raise InputError(f"{what} {label!r} must be letters and digits only (a BIDS label).")
    return label


# -- names -------------------------------------------------------------------------------------


def bids_filename(entities: dict, suffix: str | None, extension: str | None, prefix: str = "",
                  order=ENTITY_ORDER) -> str:
    """``<prefix>_<key>-<value>_..._<suffix>.<extension>``, keys in ``order``.

    As nilearn's ``create_bids_filename``: entities with an empty label are
    left out; a non-empty prefix gets a trailing ``_``. ``extension=None``
    gives a base name (figures get one extension per format);
    ``suffix=None`` ends the name with the last entity (``..._stat-t``).
    """
    parts = [f"{key}-{entities[key]}" for key in order if entities.get(key) not in (None, "")]
    name = "_".join([*parts, suffix] if suffix else parts) + (f".{extension}" if extension else "")
    return with_prefix(prefix, name)


def with_prefix(prefix: str | None, name: str) -> str:
    """``<prefix>_<name>`` (a prefix already ending with ``_`` keeps it), or ``name``."""
    if prefix and not prefix.endswith("_"):
        prefix += "_"
    return f"{prefix or ''}{name}"


def check_paths(paths) -> None:
    """Each path is relative, without '..' or empty parts; no two are equal.

    Figure base names (no extension) are checked as they are: the
    extensions added later cannot make them unsafe.
    """
    seen = set()
    for path in paths:
        parts = PurePosixPath(path).parts
        if (not parts or PurePosixPath(path).is_absolute() or "\\" in path
                or any(p in ("", ".", "..") for p in parts)):
            raise InputError(f"refusing to write {path!r}: outputs must stay inside out_dir.")
        if path in seen:
            raise InputError(
                f"two outputs would be written to {path!r}: give contrasts (or runs) distinct names.")
        seen.add(path)


# -- JSON sidecars -----------------------------------------------------------------------------


def write_json(path, content, *, indent=4, sort_keys=True, newline=False) -> Path:
    """Write ``content`` as JSON; numpy values as numbers and lists. Returns ``path``.

    The defaults are nilearn's layout (sorted keys, 4 spaces, no final
    newline); the meta-analysis and the maskers write ``indent=2,
    sort_keys=False`` (with ``newline=True`` for the meta-analysis).
    """
    text = json.dumps(content, indent=indent, sort_keys=sort_keys, default=_plain)
    Path(path).write_text(text + "\n" if newline else text)
    return Path(path)


def _plain(value):
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")


def code_url() -> str | None:
    """Where chunkglm's code is published, from its package metadata (``[project.urls]`` or
    ``Home-page``); None while the project declares none."""
    from importlib import metadata

    try:
        meta = metadata.metadata("chunkglm")
    except metadata.PackageNotFoundError:
        return None
    urls = [entry.split(",", 1)[1].strip() for entry in meta.get_all("Project-URL") or [] if "," in entry]
    return next(iter(urls), None) or meta.get("Home-page") or None


def container(environ=None, root="/") -> dict | None:
    """The software container chunkglm runs in, as BIDS' ``GeneratedBy.Container``
    (``{"Type", "Tag"}``), or None outside one.

    ``CHUNKGLM_CONTAINER`` names the image (``chunkglm/chunkglm:0.1.0``; an image sets it);
    Apptainer and Singularity say theirs (``APPTAINER_NAME``, ``SINGULARITY_NAME``); Podman
    writes it in ``/run/.containerenv``; Docker only leaves ``/.dockerenv`` (Type without Tag
    unless ``CHUNKGLM_CONTAINER`` is set); else the ``container`` variable (systemd's
    convention) gives the Type.
    """
    env = os.environ if environ is None else environ
    root = Path(root)
    tag, kind = env.get("CHUNKGLM_CONTAINER") or None, None
    for name in ("APPTAINER", "SINGULARITY"):
        if env.get(f"{name}_CONTAINER") or env.get(f"{name}_NAME"):
            kind = name.lower()
            tag = tag or env.get(f"{name}_NAME") or Path(env[f"{name}_CONTAINER"]).name
            break
    else:
        if (root / "run" / ".containerenv").is_file():
            kind = "podman"
            found = re.search(r'^image="([^"]+)"', (root / "run" / ".containerenv").read_text(errors="replace"),
                              re.MULTILINE)
            tag = tag or (found.group(1) if found else None)
        elif (root / ".dockerenv").exists():
            kind = "docker"
        elif env.get("container"):
            kind = env["container"]
    if kind is None and tag is None:
        return None
    return {key: value for key, value in (("Type", kind), ("Tag", tag)) if value}


def software() -> dict:
    """The ``Software`` entry of the GLM layout's sidecars: chunkglm's Name and Version, and
    ``Container`` (the image, else the container's type) when it runs in one."""
    found = container()
    return {**SOFTWARE, **({"Container": found.get("Tag") or found["Type"]} if found else {})}


_SOURCES: ContextVar[tuple] = ContextVar("chunkglm_source_datasets", default=())


def source_entry(location) -> dict:
    """A ``SourceDatasets`` entry: ``{"URL": ...}`` (local paths as file:// URLs, credentials
    removed from URLs)."""
    text = str(location)
    if is_url(text):
        return {"URL": redact_url(text)}
    return {"URL": Path(text.removeprefix("file://")).expanduser().absolute().as_uri()}


@contextmanager
def source_datasets(locations):
    """``with source_datasets([bids_root]):`` every dataset_description.json written in the
    block lists these inputs as its ``SourceDatasets`` (the command line says what it read
    this way; writers need no parameter for it)."""
    token = _SOURCES.set(tuple(source_entry(loc) for loc in locations if loc is not None))
    try:
        yield
    finally:
        _SOURCES.reset(token)


def dataset_description(name: str | None = None, *, description: str | None = None,
                        existing=None, sources=None) -> dict:
    """A derivative ``dataset_description.json`` generated by chunkglm.

    Parameters
    ----------
    name : str, optional
        The dataset's ``Name`` (first key) of a new file.
    description : str, optional
        The ``Description`` of chunkglm's ``GeneratedBy`` entry.
    existing : Path, optional
        A dataset_description.json already there: it is extended, chunkglm
        added to ``GeneratedBy`` once (InputError if it is not JSON).
    sources : list of str or Path, optional
        The input datasets (``SourceDatasets``, as file:// or object-store URLs);
        default those of the enclosing :func:`source_datasets` block, if any.

    Returns
    -------
    dict
        ``DatasetType`` derivative, ``GeneratedBy`` with chunkglm's Name,
        Version, CodeURL (when the package declares one) and Container (when
        it runs in one, :func:`container`), ``SourceDatasets`` when known.
    """
    generated = {**SOFTWARE, **({"Description": description} if description is not None else {})}
    url = code_url()
    if url:
        generated["CodeURL"] = url
    image = container()
    if image:
        generated["Container"] = image
    entries_in = [source_entry(s) for s in sources] if sources is not None else list(_SOURCES.get())
    if existing is None:
        content = {**({"Name": name} if name is not None else {}), "BIDSVersion": BIDS_VERSION,
                   "DatasetType": "derivative", "GeneratedBy": [generated]}
        if entries_in:
            content["SourceDatasets"] = entries_in
        return content
    try:
        content = json.loads(Path(existing).read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{existing} exists but cannot be read as JSON ({err}); fix or "
                         "remove it.") from err
    entries = content.get("GeneratedBy")
    entries = list(entries) if isinstance(entries, list) else ([entries] if entries else [])
    if generated not in entries:
        entries.append(generated)
    content = {**content, "GeneratedBy": entries}
    if entries_in:
        known = content.get("SourceDatasets")
        known = list(known) if isinstance(known, list) else []
        content["SourceDatasets"] = known + [e for e in entries_in if e not in known]
    return content


# -- staged writes -----------------------------------------------------------------------------


class StagedOutput:
    """Context manager: ``with StagedOutput(out_dir) as out: out.path("a/b.json")``.

    Parameters
    ----------
    out_dir : str or Path
        Final folder (created, with its parents, only at commit), or an
        object-store URL such as ``s3://bucket/derivatives``.
    marker : str, optional
        Relative path of a completion marker, written last. Write it like any
        other file (``out.path(marker)``) or leave it to StagedOutput, which
        then writes a small JSON record (files, time, chunkglm version).
    storage_options : dict or chunkglm.io.backends.StorageSettings, optional
        For URL out dirs; credentials otherwise come from the environment or
        the standard AWS chain.

    Attributes
    ----------
    out_dir : Path or str
        The resolved final folder (a str for URLs).
    written : list of Path or str
        After a successful ``with`` block: the final paths (URLs for an
        object-store out_dir), in the order they were requested.
    """

    def __init__(self, out_dir, *, marker: str | None = None, storage_options=None):
        self.remote = is_url(str(out_dir))
        self.out_dir = str(out_dir).rstrip("/") if self.remote else Path(out_dir).expanduser().resolve()
        self.marker = None if marker is None else check_relative(marker)
        self.storage_options = storage_options
        self.written: list = []
        self._relative: list[str] = []
        self._ignored: dict[str, list[str]] = {}
        self._tmp: Path | None = None

    def __enter__(self):
        if self.remote:
            remove_stale(tempfile.gettempdir(), "chunkglm-upload-")  # left by killed uploads
            self._tmp = Path(tempfile.gettempdir()) / owned_name("chunkglm-upload-")
            self._tmp.mkdir(mode=0o700)
        else:
            if self.out_dir.exists() and not self.out_dir.is_dir():
                raise InputError(f"out_dir {self.out_dir} exists and is not a folder.")
            self._tmp = _make_temporary_folder(self.out_dir)
        (self._tmp / "out").mkdir()
        return self

    @property
    def root(self) -> Path:
        """The staged counterpart of ``out_dir``."""
        return self._tmp / "out"

    def path(self, relative: str) -> Path:
        """Where to write ``out_dir/relative`` now (its folder is created)."""
        relative = check_relative(relative)
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if relative not in self._relative:
            self._relative.append(relative)
        return target

    def existing(self, relative: str) -> Path | None:
        """``out_dir/relative`` if it exists already (to merge with), else None.

        For a URL out_dir the file is downloaded into the staging folder.
        """
        relative = check_relative(relative)
        if self.remote:
            return _download(self._store(), relative, self._tmp / "existing" / relative)
        path = self.out_dir / relative
        return path if path.is_file() else None

    def ignore(self, patterns, dataset: str = "") -> None:
        """Add ``.bidsignore`` patterns (file names BIDS does not define) to the derivatives
        dataset in the folder ``dataset`` (relative; ``""``: out_dir itself). Its
        ``.bidsignore`` is written at the end, with :data:`BIDSIGNORE`, even if no
        dataset_description.json is staged this time."""
        folder = "" if dataset in ("", ".") else check_relative(dataset)
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        for pattern in patterns:
            if not isinstance(pattern, str) or not pattern.strip() or "\n" in pattern:
                raise InputError(f"{pattern!r} is not a .bidsignore pattern.")
        known = self._ignored.setdefault(folder, [])
        known += [p for p in patterns if p not in known]

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._write_bidsignore()
                self._write_marker()
                if self.remote:
                    _upload_all(self._store(), self.root, self._staged_files(), self.marker)
                    self.written = [f"{redact_url(self.out_dir)}/{r}" for r in self._relative]
                else:
                    self._commit()
                    self.written = [self.out_dir / r for r in self._relative]
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)
        return False

    def _store(self):
        return open_store(self.out_dir, self.storage_options)

    def _staged_files(self) -> list[str]:
        """Every staged file, relative, marker last."""
        files = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if not p.is_dir())
        if self.marker in files:
            files.remove(self.marker)
            files.append(self.marker)
        return files

    def _write_bidsignore(self):
        """``.bidsignore`` beside each staged dataset_description.json (and in each folder given
        to :meth:`ignore`): an existing file's lines kept, missing patterns appended."""
        folders = [str(PurePosixPath(r).parent) for r in self._relative
                   if PurePosixPath(r).name == "dataset_description.json"]
        folders = [("" if f == "." else f) for f in folders] + list(self._ignored)
        for folder in dict.fromkeys(folders):
            relative = f"{folder}/{BIDSIGNORE_FILE}" if folder else BIDSIGNORE_FILE
            existing = self.existing(relative)
            lines = existing.read_text().splitlines() if existing is not None else [_BIDSIGNORE_HEADER]
            missing = [p for p in dict.fromkeys((*BIDSIGNORE, *self._ignored.get(folder, ())))
                       if p not in lines]
            # written every time, unchanged or not: the record of a run resumed after a kill
            # lists it as an undisturbed run's does
            self.path(relative).write_text("".join(f"{line}\n" for line in lines + missing))
            self._relative.remove(relative)  # listed in ``written`` after its description
            description = f"{folder}/dataset_description.json" if folder else "dataset_description.json"
            at = self._relative.index(description) + 1 if description in self._relative else 0
            self._relative.insert(at, relative)

    def _write_marker(self):
        if self.marker is None or (self.root / self.marker).is_file():
            return
        record = {"complete": True, "files": [r for r in self._relative if r != self.marker],
                  "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "chunkglm_version": __version__}
        self.path(self.marker).write_text(json.dumps(record, indent=2))

    def _commit(self):
        files = [Path(f) for f in self._staged_files()]
        if not self.out_dir.exists():
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(self.root, self.out_dir)
                return
            except OSError:  # created meanwhile by someone else: merge file by file
                pass
        _check_targets(self.out_dir, files)
        _move_all(self.root, self.out_dir, self._tmp / "replaced", files, self.marker)


def check_relative(relative) -> str:
    """A relative POSIX path that stays inside out_dir, or InputError."""
    text = str(relative)
    parts = PurePosixPath(text).parts
    if (not text.strip() or not parts or "\\" in text or text.startswith("/") or ":" in parts[0]
            or ".." in parts):
        raise InputError(f"{text!r} cannot name a file inside the output folder: use a relative "
                         "path without '..', '.', backslashes or a leading '/'.")
    return PurePosixPath(text).as_posix()


def output_complete(out_dir, marker: str, storage_options=None) -> bool:
    """True when ``out_dir/marker`` exists (local folder or object-store URL)."""
    marker = check_relative(marker)
    if not is_url(str(out_dir)):
        return (Path(out_dir).expanduser() / marker).is_file()
    return sync(open_store(str(out_dir).rstrip("/"), storage_options, read_only=True).exists(marker))


def _download(store, relative: str, target: Path) -> Path | None:
    data = sync(store.get(relative, default_buffer_prototype()))
    if data is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data.to_bytes())
    return target


def _upload_all(store, root: Path, files: list[str], marker: str | None, in_flight: int = 8) -> None:
    """Delete the old marker, upload every file (``in_flight`` at a time), then the marker."""
    buffer = default_buffer_prototype().buffer
    body = [f for f in files if f != marker]

    async def upload(relative, gate):
        async with gate:
            await store.set(relative, buffer.from_bytes((root / relative).read_bytes()))

    async def run():
        if marker is not None and await store.exists(marker):
            await store.delete(marker)
        gate = asyncio.Semaphore(in_flight)
        await asyncio.gather(*(upload(f, gate) for f in body))
        if marker is not None:
            await upload(marker, gate)

    sync(run())


def _make_temporary_folder(out_dir: Path) -> Path:
    """A new folder in out_dir's nearest existing ancestor, on out_dir's filesystem.

    Falls back to a folder inside an existing out_dir when its parent is
    read-only or on another filesystem (out_dir is a mount point).
    """
    parent = out_dir.parent
    while not parent.exists():
        parent = parent.parent
    prefix = f".{out_dir.name or 'out'}.chunkglm-"
    name = owned_name(prefix)
    if out_dir.exists() and os.stat(out_dir).st_dev != os.stat(parent).st_dev:
        parent = out_dir
    remove_stale(parent, prefix)  # left by a killed run of this command
    try:
        (parent / name).mkdir()
        return parent / name
    except PermissionError:
        if not out_dir.exists() or parent == out_dir:
            raise
        (out_dir / name).mkdir()
        return out_dir / name


def _check_targets(out_dir: Path, files) -> None:
    """Refuse before moving anything if a file would land on a folder or under a file."""
    for rel in files:
        target = out_dir / rel
        if target.is_dir():
            raise InputError(f"cannot write {target}: a folder of that name exists.")
        for parent in target.parents:
            if parent == out_dir:
                break
            if parent.exists() and not parent.is_dir():
                raise InputError(f"cannot write {target}: {parent} is a file, not a folder.")


def _move_all(source: Path, out_dir: Path, aside: Path, files, marker=None) -> None:
    """Move every file into out_dir; on failure undo every move, then re-raise.

    An existing ``marker`` is set aside before anything else moves (the
    marker itself comes last in ``files``), so a set cut off half-way never
    carries a marker.
    """
    moved, created = [], []
    try:
        if marker is not None and (out_dir / marker).is_file():
            (aside / marker).parent.mkdir(parents=True, exist_ok=True)
            os.replace(out_dir / marker, aside / marker)
            moved.append((Path(marker), aside / marker))
        for rel in files:
            target = out_dir / rel
            created += _make_parents(target.parent, out_dir)
            saved = None
            if target.exists():
                saved = aside / rel
                saved.parent.mkdir(parents=True, exist_ok=True)
                os.replace(target, saved)
            moved.append((rel, saved))
            os.replace(source / rel, target)
    except BaseException:
        _undo(moved, created, out_dir)
        raise


def _make_parents(folder: Path, out_dir: Path) -> list[Path]:
    """Create ``folder`` and its missing parents below out_dir; return those created."""
    missing = []
    while folder != out_dir and not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir()
    return list(reversed(missing))


def _undo(moved, created, out_dir: Path) -> None:
    for rel, saved in reversed(moved):
        target = out_dir / rel
        target.unlink(missing_ok=True)
        if saved is not None:
            os.replace(saved, target)
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            pass
