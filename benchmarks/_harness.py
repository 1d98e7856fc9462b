"""Runner plumbing: child processes, best-of-N, machine facts, tables.

Nothing here imports chunkglm or the anchors: the parent process stays small
and every measured step runs in its own fresh interpreter (``_steps.py``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from _steps import RESULT_PREFIX

STEPS_SCRIPT = Path(__file__).with_name("_steps.py")
PACKAGES = ("chunkglm", "numpy", "zarr", "numcodecs", "nibabel", "isal", "dask", "xarray")


class StepFailed(RuntimeError):
    """A child process crashed (a bug, not a missed target)."""


@dataclass
class Measurement:
    """One step run once per round, each time in a fresh process.

    ``wall_s`` is the best (minimum) wall time, ``peak_rss_mib`` the largest
    peak over the runs, ``rss_start_mib`` the smallest RSS at the start of the
    work; ``extra`` holds what the fastest run reported (checksums, sizes).
    """

    step: str
    args: dict
    runs: list = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return min(run["wall_s"] for run in self.runs)

    @property
    def walls(self) -> list[float]:
        return [run["wall_s"] for run in self.runs]

    @property
    def peak_rss_mib(self) -> float:
        return max(run["peak_rss_mib"] for run in self.runs)

    @property
    def rss_start_mib(self) -> float:
        return min(run["rss_start_mib"] for run in self.runs)

    @property
    def extra(self) -> dict:
        best = min(self.runs, key=lambda run: run["wall_s"])
        skip = {"step", "wall_s", "peak_rss_mib", "rss_start_mib"}
        return {k: v for k, v in best.items() if k not in skip}

    def as_json(self) -> dict:
        return {"step": self.step, "args": self.args, "wall_s_best": self.wall_s, "wall_s_all": self.walls,
                "peak_rss_mib": self.peak_rss_mib, "rss_start_mib": self.rss_start_mib, **self.extra}


@dataclass
class Context:
    """What a case gets: settings, scratch space and :meth:`measure`.

    The runner calls a case once per round (``repeat`` rounds). Each call of
    :meth:`measure` runs the step once more, in a fresh child process, and
    returns its :class:`Measurement` holding the runs of every round so far
    (steps are told apart by name and arguments). Interleaving rounds means a
    burst of load on a shared machine spoils one run of several steps, not
    every run of one step.
    """

    repeat: int
    data_dir: Path
    size: str
    round: int = 0
    #: What a case prepares once (round 0) and reuses in later rounds.
    setup: dict = field(default_factory=dict)
    _measurements: dict = field(default_factory=dict, repr=False)

    def measure(self, step: str, **kwargs) -> Measurement:
        key = (step, json.dumps(kwargs, sort_keys=True))
        result = self._measurements.setdefault(key, Measurement(step, kwargs))
        record = run_child(step, kwargs)
        result.runs.append(record)
        options = ", ".join(f"{k}={v}" for k, v in kwargs.items()
                            if not (isinstance(v, str) and "/" in v))  # not paths
        print(f"  round {self.round + 1}/{self.repeat} {step}({options}): {record['wall_s']:.3f} s, "
              f"peak RSS {record['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
        return result

    def work_dir(self, case: str) -> Path:
        """Scratch space of a case (the stores it writes), under the data dir."""
        path = self.data_dir / self.size / "work" / case
        path.mkdir(parents=True, exist_ok=True)
        return path


def nimare_python() -> str:
    """The interpreter of the NiMARE anchor: NiMARE 0.22 needs nilearn < 0.14, so it lives
    in its own venv (``make bench`` creates ``.venv-nimare``); CHUNKGLM_NIMARE_PYTHON overrides."""
    import os

    path = os.environ.get("CHUNKGLM_NIMARE_PYTHON") or str(Path(__file__).resolve().parents[1]
                                                         / ".venv-nimare" / "bin" / "python")
    if not Path(path).is_file():
        raise StepFailed(f"no NiMARE interpreter at {path}: run `make bench` (it creates .venv-nimare) "
                         "or set CHUNKGLM_NIMARE_PYTHON")
    return path


def run_child(step: str, kwargs: dict) -> dict:
    """One step in a fresh interpreter; returns its ``BENCH-RESULT`` record.

    ``nimare_*`` steps run in the NiMARE venv (:func:`nimare_python`), the others in this one.
    """
    python = nimare_python() if step.startswith("nimare_") else sys.executable
    command = [python, str(STEPS_SCRIPT), step, json.dumps(kwargs)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise StepFailed(f"step {step!r} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix(RESULT_PREFIX))


def machine() -> dict:
    """Cores, CPU model, memory, load and package versions of this machine."""
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(_meminfo_kib("MemTotal") / 2**20, 1),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "source_start": source_state(),
    }


def source_state() -> str:
    """The chunkglm source measured: ``<commit>``, ``+N uncommitted`` when
    ``chunkglm/`` has uncommitted files (read-only git queries), and
    ``py <digest>``, a hash of every ``chunkglm/**/*.py`` (which tells apart
    two different sets of uncommitted edits). The runner reads it at the start
    and at the end of a case: on a shared checkout the code may change in between."""
    import hashlib

    repo = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted((repo / "chunkglm").rglob("*.py")):
        digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes())
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "chunkglm"],
                                 capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        commit, changed = "unknown commit", []
    return commit + (f" +{len(changed)} uncommitted" if changed else "") + f", py {digest.hexdigest()[:8]}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo_kib(key: str) -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; numbers right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in cells) for i in range(len(headers))]

    def line(values):
        return "| " + " | ".join(v.rjust(w) if num else v.ljust(w)
                                 for v, w, num in zip(values, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                          for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
