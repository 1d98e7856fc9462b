"""One analysis per output folder, for commands that write one result set (``second-level``, ``meta``).

Such a command's provenance record (``group_level/group_provenance.json``, ``meta/provenance.json``)
describes the analysis whose files are beside it. Before anything is computed, the records already
in the output folder are compared with the new run's analysis (:func:`analysis`: the record's
options without those that only say how it ran and, for the group model, its inputs (sha256) and
design; the meta-analysis' inputs are its options, a table or a store collection):

- no record: nothing to compare (a new folder, or files of a run killed before its record, which
  the same command run again completes as ``first-level`` does);
- the same analysis: allowed, the files are rewritten (a re-run writes the same bytes);
- another analysis: refused in one line naming what differs (:func:`check_folder`), nothing written,
  unless ``--overwrite``. Then the old analysis's files are removed only once the new results are
  computed and written (:func:`remove_replaced`), before the new record, so no stale map of the
  old analysis survives beside the new record (as ``first-level --overwrite`` does per subject).
"""

from __future__ import annotations

import json

from chunkglm.cli.resume import OutDir, differences
from chunkglm.errors import InputError
from chunkglm.provenance import strip_secrets

#: Command options that say how a command ran, not what it computed (left out of the comparison).
RUN_ONLY = frozenset({"allow_incomplete", "chunk_mb", "cluster", "scheduler", "workers", "no_progress",
                      "output_dir", "storage_option", "overwrite", "verbose", "quiet"})


def analysis(record: dict, run_only=RUN_ONLY, extra=()) -> dict:
    """What decides a record's results: its options (without ``run_only`` keys) and the ``extra``
    top-level fields (e.g. ``inputs``, ``design``), JSON-normalised; from a written record or one
    being assembled, so records written before this comparison existed compare the same way."""
    options = {k: v for k, v in (record.get("options") or {}).items() if k not in run_only}
    content = {"options": options, **{k: record.get(k) for k in extra}}
    return json.loads(json.dumps(strip_secrets(content), default=str))


def check_folder(output_dir, record_paths, new: dict, *, command: str, overwrite: bool,
                 extra=(), run_only=RUN_ONLY) -> list[tuple[str, dict]]:
    """The records of other analyses in ``output_dir`` (``[(relative path, record)]``), which
    ``--overwrite`` replaces; without it, InputError when there is one (nothing written yet).

    Parameters
    ----------
    output_dir : str or Path
        The command's output folder (a local path or an object-store URL).
    record_paths : sequence of str
        Where the command's records may be, relative (one per ``--layout`` folder).
    new : dict
        The new run's record as far as known before computing (``options`` and the ``extra``
        fields), compared through :func:`analysis`.
    command : str
        The command's name, for the message.
    overwrite : bool
        ``--overwrite`` was given.
    extra : sequence of str
        Top-level record fields compared besides the options (``inputs``, ``design``).
    run_only : set of str
        Options left out of the comparison (default :data:`RUN_ONLY`).
    """
    out = OutDir(output_dir)
    wanted = analysis(new, run_only, extra)
    others = []
    for relative in record_paths:
        found = out.read_json(relative)
        if found is None:
            continue
        changed = differences(analysis(found, run_only, extra), wanted)
        if changed:
            others.append((relative, found, changed))
    if others and not overwrite:
        relative, _, changed = others[0]
        shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise InputError(f"{out.url} already holds another {command} analysis ({relative}: {shown}). Nothing "
                         "was written. Pass --overwrite to replace it (its files are removed once the new "
                         "results are written), or choose another output folder.")
    return [(relative, found) for relative, found, _ in others]


def remove_replaced(output_dir, replaced, new_outputs, new_record: str) -> list[str]:
    """Delete the files the ``replaced`` records listed that the new results do not have, then those
    records (but ``new_record``, rewritten next); returns what was removed, relative."""
    out = OutDir(output_dir)
    keep = set(new_outputs) | {new_record}
    removed = []
    for relative, found in replaced:
        listed = [str(p) for p in found.get("outputs") or [] if isinstance(p, str)]
        for path in [*listed, relative]:
            parts = path.split("/")
            if path in keep or path in removed or path.startswith("/") or ".." in parts or ":" in parts[0]:
                continue  # written again now, or not a path inside the folder
            out.remove(path)
            removed.append(path)
    return removed


def earlier_outputs(output_dir, record_path: str, outputs) -> list[str]:
    """The files an existing record at ``record_path`` lists that are still in the folder and not
    in ``outputs``: those of earlier runs of the same analysis over other subjects (the record keeps
    listing them); after a replacement, none (:func:`remove_replaced` removed them by then)."""
    out = OutDir(output_dir)
    listed = [p for p in (out.read_json(record_path) or {}).get("outputs") or [] if isinstance(p, str)]
    present = set(out.sizes(*{p.split("/")[0] for p in listed if "/" in p}))
    present |= {p for p in listed if "/" not in p and out.fs.exists(out.path(p))}
    return [p for p in listed if p in present and p not in set(outputs)]
