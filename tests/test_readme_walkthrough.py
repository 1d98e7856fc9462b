"""The README, followed top to bottom as a new user would (issue 17's "Done when").

README.md is parsed when the tests are collected, so the walk follows its edits: every
fenced ```python, ```bash and ```sh block of the user-facing sections runs, in the README's
order, in one folder that holds a tiny synthetic dataset under the names the README uses
(``ds000001``, ``run1.nii.gz``, ``mask.nii.gz``, ``participants.tsv``, ``studies.tsv``,
``atlas_probseg.nii.gz``, ...). Python blocks share one namespace per section; shell lines
run through bash with the ``chunkglm`` entry point of this interpreter's environment first
on ``PATH``. One test per section (its heading is the test id) so that a failure names the
section; whichever test runs first walks the README up to its own section, in order.

Nothing in a command is edited to suit the test except what :data:`SUBSTITUTIONS` lists
(the S3 endpoint and credentials, for the moto server on 127.0.0.1), and sections and names
are handled otherwise only as :data:`EXCEPTED_SECTIONS`, :data:`NOT_RUN`,
:data:`REPOSITORY_FILES`, :data:`CARRIED_NAMES` and :data:`SCRIPTS` say, each with its
reason; :data:`WRITTEN` lists files the sections must leave behind. Environment-only speed-ups: the commands attach
to one running local dask cluster (``DASK_SCHEDULER_ADDRESS``, which every command reads
when given neither ``--scheduler`` nor ``--cluster``) instead of starting their own.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from chunkglm.testing import make_synthetic_bids

README = Path(__file__).resolve().parents[1] / "README.md"
BIN = Path(sys.executable).parent  # .venv/bin: the installed `chunkglm` entry point
RUNNABLE = {"python", "bash", "sh"}

#: Sections whose blocks are not run here, and why.
EXCEPTED_SECTIONS = {
    "Quick start": "`make demo` is tests/test_demo.py (the demo twice, byte identity); "
                   "`make test` is the suite this test belongs to",
}

#: Text of a block replaced before it runs: (section, README text, workspace key, why).
SUBSTITUTIONS = [
    ("Object storage", "http://127.0.0.1:9000", "s3_endpoint",
     "the README's example endpoint; the test's S3 server (moto) listens on a free port"),
    ("Object storage", "AWS_ACCESS_KEY_ID=...", "s3_key_assignment",
     "placeholder credential: the moto server's fake key"),
    ("Object storage", "AWS_SECRET_ACCESS_KEY=...", "s3_secret_assignment",
     "placeholder credential: the moto server's fake secret"),
]

#: Shell commands not run: (section, text of the command, why). Each must still be found.
NOT_RUN = [
    ("From a BIDS folder and a model JSON to group results (`chunkglm app`)", "--cluster slurm.yaml",
     "needs a SLURM cluster: tests/test_slurm.py runs commands on a real single-node SLURM"),
]

#: Files of the repository the README names by their path in a checkout (a reader follows
#: it there): copied into the walk's folder.
REPOSITORY_FILES = ["examples"]

#: Names a section's Python blocks use that an earlier section defines (a reader following
#: the README in one Python session has them): {section: {name: section defining it}}.
CARRIED_NAMES = {
    "Reports": {"model": "First-level GLM", "result": "Image-based meta-analysis"},
}

#: Python blocks guarded by ``if __name__ == "__main__":`` are scripts (the guard is the
#: point of the block): they run as ``python script.py`` in a fresh process, where the guard
#: is true; exec'd in this process the guarded body would silently not run. A ``...`` body
#: there is Python's Ellipsis, the reader's own code, and runs as it is.
SCRIPTS = "python blocks containing `if __name__ == \"__main__\":`"

#: Files a section's commands say they write (relative to the walk's folder), checked after it
#: ran: a command that exits 0 without writing them fails its section too.
WRITTEN = {
    "Converting data": ["cohort.zarr/zarr.json", "back.nii.gz"],
    "Object storage": ["s3://bucket/cohort.zarr/zarr.json"],
    "Reading a store": ["back.nii.gz"],
    "First-level GLM": ["derivatives/glm/dataset_description.json",
                        "derivatives/glm/first_level/sub-04/sub-04_task-main_contrast-aMinusB_stat-z.nii.gz"],
    "Second-level GLM and thresholding": ["group/group_level/group_provenance.json",
                                          "group/group_level/group_contrast-male_stat-logpmaxtfce.nii.gz",
                                          "group_effects/group_level/group_provenance.json"],
    "Image-based meta-analysis": ["derivatives/meta/dataset_description.json"],
    "From a BIDS folder and a model JSON to group results (`chunkglm app`)": [
        "out/app_provenance.json", "out/reports/index.html"],
    "Region signals from probabilistic maps": ["derivatives/timeseries/dataset_description.json"],
    "Reports": ["sub-01_report.html", "derivatives/index.html"],
    "Surfaces and CIFTI": ["derivatives/glm_surface/group_level/group_provenance.json",
                           "derivatives/glm_cifti/dataset_description.json"],
}

N_SUBJECTS = 4  # intercept + age + sex_M (the README's group design) needs 4 maps for 1 dof
SEED = 2  # a seed whose participants.tsv has both sexes (the README's contrast male=sex_M)
COMMAND_TIMEOUT = 600  # the second-level block (15,000 TFCE permutations) took ~200 s at load 8


# -- the README ------------------------------------------------------------------------------

@dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence


@dataclass
class Section:
    title: str
    line: int
    blocks: list[Block] = field(default_factory=list)


def readme_sections(text: str) -> list[Section]:
    """Sections (``##``/``###`` headings outside fences) with their runnable fenced blocks."""
    sections, fence, body = [Section("(top)", 1)], None, []
    for number, line in enumerate(text.splitlines(), 1):
        if fence is None:
            heading = re.match(r"#{2,3} (.+)", line)
            opening = re.match(r"```(\w*)\s*$", line)
            if heading:
                sections.append(Section(heading.group(1).strip(), number))
            elif opening:
                fence, body = Block(opening.group(1), "", number), []
        elif line.startswith("```"):
            fence.code = "\n".join(body) + "\n"
            if fence.lang in RUNNABLE:
                sections[-1].blocks.append(fence)
            fence = None
        else:
            body.append(line)
    assert fence is None, f"README.md: the fence opened at line {fence.line} is never closed"
    return [s for s in sections if s.blocks]


SECTIONS = readme_sections(README.read_text())
TITLES = [s.title for s in SECTIONS if s.title not in EXCEPTED_SECTIONS]


def shell_commands(code: str) -> list[str]:
    """Logical command lines of a shell block (backslash continuations joined)."""
    commands, current = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip() and not current.lstrip().startswith("#"):
            commands.append(current.strip())
        current = ""
    return commands


# -- the data the README names ---------------------------------------------------------------

def _image_like(reference, data, path):
    img = nib.Nifti1Image(np.asarray(data, np.float32), reference.affine)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)


def build_workspace(root: Path):
    """Every file the README names, made from one tiny synthetic dataset."""
    data = make_synthetic_bids(root / "ds000001", n_subjects=N_SUBJECTS, size="tiny", seed=SEED,
                               surface=True)  # fMRIPrep's fsaverage5 GIFTI and CIFTI runs too
    participants = pd.read_csv(root / "ds000001" / "participants.tsv", sep="\t")
    assert set(participants["sex"]) == {"F", "M"}, "choose a SEED whose subjects have both sexes"
    first, second = data.runs[0], data.runs[1]
    shutil.copy(root / "ds000001" / "participants.tsv", root / "participants.tsv")
    shutil.copy(first.bold_path, root / "run1.nii.gz")
    nib.save(nib.load(second.bold_path), root / "run2.nii")  # the README's uncompressed run
    shutil.copy(first.bold_path, root / "sub-01_run-1_bold.nii.gz")
    shutil.copy(first.events_path, root / "sub-01_run-1_events.tsv")
    shutil.copy(first.confounds_path, root / "sub-01_run-1_desc-confounds_timeseries.tsv")
    reference = nib.load(first.mask_path)
    truth = data.truth
    _image_like(reference, truth.mask.astype(np.uint8), root / "mask.nii.gz")
    contrast = (truth.betas["a"] - truth.betas["b"]) * truth.mask
    rng = np.random.default_rng(SEED)
    for subject in ("01", "02"):  # the README's explicit 3-D files
        _image_like(reference, contrast + rng.normal(0, 1, contrast.shape) * truth.mask,
                    root / f"sub-{subject}_effect.nii.gz")
    studies = []
    for study in range(1, 4):  # a meta-analysis table of three studies
        beta, varcope = root / f"study-{study}_beta.nii.gz", root / f"study-{study}_varcope.nii.gz"
        _image_like(reference, contrast + rng.normal(0, 1, contrast.shape) * truth.mask, beta)
        _image_like(reference, (1 + rng.uniform(0, 0.5, contrast.shape)) * truth.mask, varcope)
        studies.append({"beta": beta.name, "varcope": varcope.name, "sample_sizes": 20 + study,
                        "study_id": f"study-{study}"})
    pd.DataFrame(studies).to_csv(root / "studies.tsv", sep="\t", index=False)
    _image_like(reference, _gaussian_maps(reference.shape, truth.mask), root / "atlas_probseg.nii.gz")
    return data


def _gaussian_maps(shape, mask, n_maps=4):
    """Overlapping probabilistic maps (Gaussian bumps in the mask), shape (x, y, z, n_maps)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    centres = np.argwhere(mask)[np.linspace(0, mask.sum() - 1, n_maps).astype(int)]
    maps = [np.exp(-((grid - c) ** 2).sum(-1) / (2 * 2.0 ** 2)) for c in centres]
    return np.stack(maps, axis=-1) * mask[..., None]


# -- the walk ----------------------------------------------------------------------------------

class Walk:
    """Runs the README's sections in order, once each, and keeps each one's outcome."""

    def __init__(self, root: Path, env: dict, substitutions: dict):
        self.root, self.env, self.values = root, env, substitutions
        self.outcomes: dict[str, str | None] = {}
        self.namespaces: dict[str, dict] = {}
        self.seconds: dict[str, float] = {}
        self.ran: list[str] = []  # "section: block line" of every block run

    def until(self, title: str) -> str | None:
        for section in SECTIONS:
            if section.title in EXCEPTED_SECTIONS:
                continue
            if section.title not in self.outcomes:
                started = time.perf_counter()
                self.outcomes[section.title] = self._section(section)
                self.seconds[section.title] = time.perf_counter() - started
            if section.title == title:
                return self.outcomes[title]
        raise KeyError(title)

    def _section(self, section: Section) -> str | None:
        namespace = {"__name__": "readme_walkthrough"}
        for name, origin in CARRIED_NAMES.get(section.title, {}).items():
            if name in self.namespaces.get(origin, {}):
                namespace[name] = self.namespaces[origin][name]
        self.namespaces[section.title] = namespace
        code = "".join(block.code for block in section.blocks)
        missing = [text for title, text, *_ in SUBSTITUTIONS + NOT_RUN
                   if title == section.title and text not in code]
        if missing:
            return f"the README's {section.title} no longer holds {missing}: update SUBSTITUTIONS"
        for block in section.blocks:
            code = self._substituted(section.title, block.code)
            where = f"README.md:{block.line} ({section.title}, ```{block.lang})"
            self.ran.append(where)
            try:
                if block.lang == "python" and re.search(r"if __name__ == .__main__.:", code):
                    self._script(code, where)
                elif block.lang == "python":
                    self._python(code, namespace, where)
                else:
                    for command in shell_commands(code):
                        if not any(title == section.title and text in command for title, text, _ in NOT_RUN):
                            self._shell(command, where)
            except Exception as err:  # noqa: BLE001 - the section's outcome, reported by its test
                detail = err.args[0] if isinstance(err, _CommandFailed) else traceback.format_exc()[-4000:]
                return f"{where} failed:\n{detail}"
        absent = [name for name in WRITTEN.get(section.title, []) if not self._exists(name)]
        return f"{section.title} ran but did not write {absent}" if absent else None

    def _exists(self, name: str) -> bool:
        if not name.startswith("s3://"):
            return (self.root / name).exists()
        bucket, _, key = name[len("s3://"):].partition("/")
        return "Contents" in self.values["s3_client"].list_objects_v2(Bucket=bucket, Prefix=key)

    def _substituted(self, title: str, code: str) -> str:
        for section, text, key, _why in SUBSTITUTIONS:
            if section == title:
                code = code.replace(text, self.values[key])
        return code

    def _python(self, code: str, namespace: dict, where: str) -> None:
        cwd, saved = os.getcwd(), {key: os.environ.get(key) for key in self.env}
        os.chdir(self.root)
        os.environ.update(self.env)
        try:
            exec(compile(code, where, "exec"), namespace)  # noqa: S102 - the README's own code
        finally:
            os.chdir(cwd)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def _script(self, code: str, where: str) -> None:
        script = self.root / f"readme_script_{len(self.ran)}.py"
        script.write_text(code)
        self._run([sys.executable, script.name], where, code)

    def _shell(self, command: str, where: str) -> None:
        self._run(["bash", "-c", command], where, command)

    def _run(self, argv, where, shown) -> None:
        done = subprocess.run(argv, cwd=self.root, env={**os.environ, **self.env}, capture_output=True,
                              text=True, timeout=COMMAND_TIMEOUT)
        if done.returncode != 0:
            raise _CommandFailed(f"$ {shown}\nexit {done.returncode}\n{done.stderr[-4000:]}")


class _CommandFailed(Exception):
    pass


@pytest.fixture(scope="module")
def walk(tmp_path_factory, s3_server):
    import boto3
    from distributed import LocalCluster

    root = tmp_path_factory.mktemp("readme")
    build_workspace(root)
    for name in REPOSITORY_FILES:
        shutil.copytree(README.parent / name, root / name)
    s3 = boto3.client("s3", endpoint_url=s3_server["endpoint"], region_name="us-east-1",
                      aws_access_key_id=s3_server["key"], aws_secret_access_key=s3_server["secret"])
    s3.create_bucket(Bucket="bucket")  # the README's bucket name
    values = {"s3_endpoint": s3_server["endpoint"], "s3_client": s3,
              "s3_key_assignment": f"AWS_ACCESS_KEY_ID={s3_server['key']}",
              "s3_secret_assignment": f"AWS_SECRET_ACCESS_KEY={s3_server['secret']}"}
    cwd = os.getcwd()
    os.chdir(root)  # the workers' working folder is the reader's
    try:
        cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1",
                               dashboard_address="127.0.0.1:0")
    finally:
        os.chdir(cwd)
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "DASK_SCHEDULER_ADDRESS": cluster.scheduler_address,
           # the Python API's S3 example takes its credentials from the environment
           "AWS_ACCESS_KEY_ID": s3_server["key"], "AWS_SECRET_ACCESS_KEY": s3_server["secret"]}
    assert shutil.which("chunkglm", path=env["PATH"]) == str(BIN / "chunkglm")
    walker = Walk(root, env, values)
    started = time.perf_counter()
    try:
        yield walker
    finally:
        cluster.close()
        times = ", ".join(f"{t}: {s:.1f} s" for t, s in walker.seconds.items())
        print(f"\nREADME walk: {len(walker.ran)} blocks in {time.perf_counter() - started:.1f} s ({times})")


def test_the_readme_has_the_sections_this_walk_handles():
    titles = {s.title for s in readme_sections(README.read_text())}
    for table in (EXCEPTED_SECTIONS, CARRIED_NAMES, WRITTEN, {s[0]: None for s in SUBSTITUTIONS + NOT_RUN}):
        assert set(table) <= titles, f"sections named here but no longer in the README: {set(table) - titles}"
    assert {"Converting data", "First-level GLM", "Reports"} <= titles


@pytest.mark.parametrize("title", TITLES)
def test_readme_section_runs_as_written(walk, title):
    outcome = walk.until(title)
    if outcome is not None:
        earlier = [t for t in TITLES[:TITLES.index(title)] if walk.outcomes.get(t)]
        note = f"\n(earlier sections that failed: {earlier})" if earlier else ""
        pytest.fail(outcome + note, pytrace=False)
