"""Per-subject completion records of ``chunkglm first-level`` (resume, provenance).

A subject's outputs count as complete only when its record
``sub-XX_task-T_provenance.json`` exists in the folder of the last file set
written: ``OUT_DIR/sub-XX/`` with nilearn's file set (``--layout nilearn`` or
``both``), else ``OUT_DIR/first_level/sub-XX/`` (``--layout glm``). It is
written last, atomically, after the file sets (each committed atomically by
the staging) and after its copy in the other layout's folder (``both``). The
record holds what decides the results and the files written (the
``analysis``: options, contrasts, layout, residuals and the runs' source
checksums), so a re-run can tell

- ``complete``: same analysis, every listed output present -> skipped;
- ``conflict``: complete, but another analysis -> refused (or, with
  ``--overwrite``, replaced);
- ``partial``: outputs without a record (interrupted), or a record of the
  same analysis whose listed files are not all there -> recomputed;
- ``new``: nothing there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import fsspec

from chunkglm.errors import InputError
from chunkglm.io.layout import is_url, node_meta
from chunkglm.provenance import read_record, strip_secrets, without_times, write_record


RECORD_SUFFIX = "provenance.json"


class OutDir:
    """The output folder, a local path or an object-store URL, for records and listings.

    Local records are written to a temporary name and renamed (atomic); on an
    object store one PUT is atomic. Object stores use the credentials of the
    environment or the standard chains (as the staging of the derivatives).
    """

    def __init__(self, out_dir):
        self.remote = is_url(str(out_dir))
        if self.remote:
            self.fs, root = fsspec.core.url_to_fs(str(out_dir))
            self.root, self.url = root.rstrip("/"), str(out_dir).rstrip("/")
        else:
            self.fs = fsspec.filesystem("file")
            self.root = self.url = str(Path(out_dir).expanduser().resolve())

    def path(self, relative: str) -> str:
        """Filesystem path (no scheme) of ``relative``."""
        return f"{self.root}/{relative}"

    def read_json(self, relative: str) -> dict | None:
        """A JSON record, or None when absent or unreadable."""
        if not self.remote:
            return read_record(self.path(relative))
        try:
            content = json.loads(self.fs.cat_file(self.path(relative)))
        except (OSError, ValueError):
            return None
        return content if isinstance(content, dict) else None

    def write_json(self, relative: str, content: dict) -> None:
        """Write a record (secrets stripped, without its times) atomically."""
        if not self.remote:
            Path(self.path(relative)).parent.mkdir(parents=True, exist_ok=True)
            write_record(self.path(relative), content)
            return
        data = json.dumps(strip_secrets(without_times(content)), indent=2) + "\n"
        self.fs.pipe_file(self.path(relative), data.encode())

    def sizes(self, *folders: str) -> dict[str, int]:
        """``{relative path: size}`` of every file under these relative folders."""
        if self.remote:
            self.fs.invalidate_cache()  # files may have been uploaded by another client
        found = {}
        for folder in folders:
            try:
                listing = self.fs.find(self.path(folder), detail=True)
            except (FileNotFoundError, OSError):
                continue
            for name, info in listing.items():
                found[name[len(self.root) + 1:]] = int(info.get("size") or 0)
        return found

    def remove(self, relative: str) -> None:
        """Delete a file if it exists."""
        try:
            self.fs.rm_file(self.path(relative))
        except FileNotFoundError:
            pass

    def relative(self, written) -> str | None:
        """A written path or URL relative to the folder (None if outside)."""
        text = str(written)
        if not self.remote:
            text = str(Path(text).resolve())
        prefix = (self.url if self.remote else self.root) + "/"
        return text[len(prefix):] if text.startswith(prefix) else None


@dataclass
class SubjectState:
    """Where one subject's outputs stand before the run.

    Attributes
    ----------
    subject : str
    status : {"new", "partial", "complete", "conflict"}
    record : dict or None
        The existing record (complete or conflict).
    differences : list of str
        For a conflict: what differs, as ``key: there -> now``.
    """

    subject: str
    status: str
    record: dict | None = None
    differences: list | None = None


def subject_folders(subject: str) -> tuple[str, str]:
    """The subject's two folders, relative to the output folder."""
    return f"sub-{subject}", f"first_level/sub-{subject}"


#: The layouts of ``chunkglm first-level`` and the folders they write a subject's files in
#: (subject_folders' order); a subject's record is in each, the marker in the first.
LAYOUT_FOLDERS = {"nilearn": (0,), "glm": (1,), "both": (0, 1)}
#: What records written before ``--layout`` / ``--save-residuals`` existed were made with.
OLD_OUTPUTS = {"layout": "both", "residuals": True}


def record_paths(subject: str, task: str, layout: str = "both") -> tuple[str, ...]:
    """(marker, its copies), relative paths: ``sub-XX/`` then ``first_level/sub-XX/`` for the
    folders ``layout`` writes (both: the marker in ``sub-XX/``, a copy in ``first_level/``)."""
    name = f"sub-{subject}_task-{task}_{RECORD_SUFFIX}"
    folders = subject_folders(subject)
    return tuple(f"{folders[i]}/{name}" for i in LAYOUT_FOLDERS[layout])


def run_inputs(nodes) -> list[dict]:
    """Provenance of a subject's runs: node, source path, size, sha256 (from the store)."""
    entries = []
    for node in nodes:
        meta = node_meta(node.cohort.root[node.path])
        source = meta.get("source", {})
        entries.append({"node": node.path, "path": source.get("path"), "size": source.get("size"),
                        "sha256": source.get("sha256"), "store": _absolute(node.cohort.location),
                        "preprocessing": meta.get("preprocessing")})
    return entries


def _absolute(location) -> str:
    text = str(location)
    return text if "://" in text and not text.startswith("file://") else str(Path(text).absolute())


def analysis_identity(options: dict, inputs: list[dict]) -> dict:
    """What decides a subject's results: options and the runs' contents (JSON-normalised)."""
    runs = [{"node": i["node"], "sha256": i["sha256"], "size": i["size"],
             "preprocessing": i["preprocessing"]} for i in inputs]
    return json.loads(json.dumps(strip_secrets({**options, "runs": runs})))


def subject_state(out: OutDir, subject: str, task: str, identity: dict) -> SubjectState:
    """Classify a subject's existing outputs (see the module docstring)."""
    record = next((found for found in map(out.read_json, record_paths(subject, task, "both"))
                   if found is not None), None)
    present = out.sizes(*subject_folders(subject))
    if record is not None:
        analysis = record.get("analysis", {})
        if "outputs" in identity and isinstance(analysis, dict):  # a record of before --layout
            analysis = {"outputs": OLD_OUTPUTS, **analysis}
        found = differences(analysis, identity)
        if found:  # even if some of its files are gone: never mix two analyses
            return SubjectState(subject, "conflict", record, found)
        outputs = record.get("outputs") or []
        if outputs and all(present.get(o["path"]) == o["size"] for o in outputs):
            return SubjectState(subject, "complete", record)
    return SubjectState(subject, "partial" if present else "new", record)


def differences(old: dict, new: dict) -> list[str]:
    """``key: <old> there, <new> now`` for each key whose value differs between two records'
    analyses; a key holding a dict on both sides (``options``) is compared key by key
    (``options.noise_model: ...``)."""
    found = []
    for key in sorted(set(old) | set(new), key=str):
        before, now = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(now, dict):
            found += [f"{key}.{inner}: {_short(before.get(inner))} there, {_short(now.get(inner))} now"
                      for inner in sorted(set(before) | set(now), key=str) if before.get(inner) != now.get(inner)]
        elif before != now:
            found.append(f"{key}: {_short(before)} there, {_short(now)} now")
    return found


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def conflict_error(states: list[SubjectState], out_dir) -> InputError:
    """The error for subjects whose complete outputs came from another analysis."""
    lines = [f"  sub-{s.subject}: " + "; ".join(s.differences[:4]) for s in states]
    return InputError(
        f"{out_dir} already holds complete first-level results of {len(states)} subject(s) "
        "computed with other options or inputs:\n" + "\n".join(lines)
        + "\nNothing was written. Pass --overwrite to replace them, or choose another -o/--output-dir.")


def clear_record(out: OutDir, subject: str, task: str) -> None:
    """Remove a subject's records (it becomes incomplete) before it is rewritten."""
    for relative in record_paths(subject, task, "both"):
        out.remove(relative)


def output_entries(out: OutDir, written, subject: str) -> list[dict]:
    """``[{"path": relative, "size": bytes}]`` of the subject's files just written
    (shared files such as dataset_description.json left out)."""
    sizes = out.sizes(*subject_folders(subject))
    entries = []
    for item in written:
        relative = out.relative(item)
        if relative in sizes and relative not in {e["path"] for e in entries}:
            entries.append({"path": relative, "size": sizes[relative]})
    return entries


def remove_stale(out: OutDir, old_record: dict | None, new_entries: list[dict]) -> list[str]:
    """Delete files an overwritten record listed that the new results do not have."""
    if not old_record:
        return []
    keep = {e["path"] for e in new_entries}
    stale = [o["path"] for o in old_record.get("outputs") or [] if o["path"] not in keep
             and not o["path"].startswith("/") and ".." not in o["path"].split("/")]  # stay inside
    for relative in stale:
        out.remove(relative)
    return stale
