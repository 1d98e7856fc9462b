"""The notebooks in ``notebooks/`` run top to bottom, each in a fresh kernel of this
Python, on tiny synthetic data, and are committed without outputs.

Each notebook is executed with nbclient in its own temporary folder
(``CHUNKGLM_NOTEBOOK_DIR``) with a kernelspec registered in a temporary
``JUPYTER_PATH`` that points at ``sys.executable``, so a system-wide ``python3``
kernel can never be picked; a probe cell checks the kernel's interpreter. A
failing cell fails the test with the cell's source and traceback. The checks on
the printed results are loose on purpose: the data are deterministic (seed 0),
the thresholds only say "the known effect was found", and the exact parity of
each step with nilearn/NiMARE is tested in the library's own tests.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
EXECUTED = ["01_bids_to_first_level.ipynb", "02_group_and_meta.ipynb", "03_scale_out.ipynb",
            "04_bids_stats_models.ipynb"]
#: Seconds one cell may run: generous (the slowest cell takes ~10 s on 2 busy cores);
#: only there so that a hung cluster fails the test instead of blocking the suite.
CELL_TIMEOUT = 300
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PROBE = "import sys\nprint(sys.executable)\nprint(sys.prefix)"


@pytest.fixture
def kernel_folder(tmp_path, monkeypatch):
    """A temporary folder to run a notebook in, with a python3 kernelspec for this Python."""
    jupyter = tmp_path / "jupyter"
    spec = jupyter / "kernels" / "python3"
    spec.mkdir(parents=True)
    spec.joinpath("kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (chunkglm tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))  # searched before user and system paths
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("CHUNKGLM_NOTEBOOK_DIR", str(tmp_path / "out"))
    # notebook 3 then starts its own S3 server on 127.0.0.1, never a developer's endpoint
    monkeypatch.delenv("CHUNKGLM_NOTEBOOK_S3_ENDPOINT", raising=False)
    monkeypatch.delenv("CHUNKGLM_NOTEBOOK_S3_BUCKET", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    return tmp_path


def _text(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            parts.append(output.data.get("text/plain", ""))
    return "".join(parts)


def execute(name: str, folder: Path) -> str:
    """Run a notebook in a fresh kernel; return everything its cells printed."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(_PROBE))
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(folder / "run")}})
    failure = None
    try:
        client.execute()
    except CellExecutionError as error:
        failure = f"{name}: a cell failed\n{_ANSI.sub('', str(error))}"
    if failure:  # raised outside the except block: no chained, colour-coded copy of the error
        pytest.fail(failure, pytrace=False)
    executable, prefix = _text(nb.cells.pop(0)).splitlines()
    assert (executable, prefix) == (sys.executable, sys.prefix), "the kernel is not this Python"
    return "\n".join(_text(cell) for cell in nb.cells)


def _numbers(pattern: str, text: str) -> list[float]:
    found = [float(value) for value in re.findall(pattern, text)]
    assert found, f"nothing printed matches {pattern!r}:\n{text[-3000:]}"
    return found


def test_01_bids_to_first_level(kernel_folder):
    text = execute("01_bids_to_first_level.ipynb", kernel_folder)
    assert "converted 4 run(s), skipped 0" in text
    assert "second call: converted 0, skipped 4 complete run(s)" in text  # resume
    # mean over 4 subjects of z at the true peak; 4.7 measured, 3 = "clearly found"
    assert _numbers(r"peak z at the true effect location: (-?[\d.]+)", text)[0] > 3
    # mean effect map vs the true map (percent signal change); 0.70 measured
    assert _numbers(r"correlation of the mean effect map with the true map, .*: (-?[\d.]+)", text)[0] > 0.5
    # nilearn on the same NIfTI file: README documents <= 1e-7 on float32 inputs (2.7e-8 here)
    assert _numbers(r"relative L2 difference to nilearn ([\d.e+-]+)", text)[0] < 1e-6
    glm = kernel_folder / "out" / "01_first_level" / "derivatives" / "glm"
    assert (glm / "sub-04" / "sub-04_task-main_contrast-aMinusB_stat-z_statmap.nii.gz").is_file()
    assert (glm / "first_level" / "sub-04" / "sub-04_task-main_contrast-a_stat-effect.nii.gz").is_file()
    assert (glm / "first_level" / "sub-04" / "sub-04_task-main_glm.json").is_file()
    # reports: the model's page (its maps computed on the notebook's cluster) and one per subject
    assert "cluster that computed its maps: LocalCluster 2 workers" in text
    assert (kernel_folder / "out" / "01_first_level" / "sub-01_report.html").is_file()
    assert (glm / "first_level" / "sub-04" / "sub-04_task-main_report.html").is_file()


def test_02_group_and_meta(kernel_folder):
    text = execute("02_group_and_meta.ipynb", kernel_folder)
    # both true blobs: parametric group z (4.6 and 4.2 measured), a cluster peak within one
    # voxel diagonal (4 mm voxels: 4 * sqrt(3) = 6.9 mm; 0 and 4 mm measured)
    assert min(_numbers(r"group z at the true peak \(.*\): (-?[\d.]+)", text)) > 3
    assert max(_numbers(r"nearest cluster peak ([\d.]+) mm away", text)) < 6.93
    # permutations (200): max-T, cluster mass and TFCE each find voxels at FWE p < 0.05
    for key in ("logp_max_t", "logp_max_mass", "logp_max_tfce"):
        assert _numbers(rf"{key}:\s+(\d+) voxels with FWE p < 0.05", text)[0] > 0, key
    assert _numbers(r"DerSimonianLaird: (\d+) voxels significant after FDR", text)[0] > 0
    meta_line = re.search(r"DerSimonianLaird: .* z at the true peaks: (.*)", text).group(1)
    assert min(float(z) for z in meta_line.split(",")) > 3, meta_line  # 4.5 and 4.4 measured
    assert _numbers(r"FWE-corrected \(permutation\) map: (\d+) voxels kept", text)[0] > 0
    out = kernel_folder / "out" / "02_group" / "derivatives"
    assert (out / "glm" / "group_level" / "group_contrast-mean_fwe-corrected.nii.gz").is_file()
    assert (out / "meta" / "DerSimonianLaird_z.nii.gz").is_file()
    for page in ("group_report.html", "meta_report.html", "derivatives/glm/group_level/group_report.html",
                 "derivatives/meta/DerSimonianLaird_report.html"):
        assert (kernel_folder / "out" / "02_group" / page).is_file(), page


def test_03_scale_out(kernel_folder):
    text = execute("03_scale_out.ipynb", kernel_folder)
    assert "(local moto server)" in text
    assert "dashboard: http://127.0.0.1:" in text
    assert "ClusterConfigError: Unknown key 'n_wokers'" in text
    assert "cohort.zarr: converted 4 run(s), skipped 0" in text
    assert "second call: converted 0, skipped 4 complete run(s)" in text  # resume on S3
    assert "sub-01_task-main_contrast-aMinusB_stat-z.nii.gz" in text  # derivatives on S3
    identical = re.findall(r"S3 and local z maps identical: (\w+)", text)
    assert identical == ["True"] * 4, identical
    assert "cluster closed" in text


def test_04_bids_stats_models(kernel_folder):
    text = execute("04_bids_stats_models.ipynb", kernel_folder)
    # an invalid model: bsmschema's one line naming the field, nothing written
    assert re.search(r"exit status 2: chunkglm app: error: the model \S+broken.json is not a valid BIDS Stats "
                     r"Model: Nodes\[0\]\.Level: ", text)
    assert "output folder created: False" in text
    # the known effect of 'a' at its true peak in the group z map (4.53 measured, 3 = "clearly found");
    # 6 subjects: 64 sign flips, so FWE p can reach 1/64 < 0.05 (3 voxels measured)
    assert _numbers(r"group z of 'a' at the true peak \(.*\): (-?[\d.]+)", text)[0] > 3
    assert _numbers(r"max-T permutation test: (\d+) voxels with FWE p < 0.05", text)[0] > 0
    out = kernel_folder / "out" / "04_bids_stats_models" / "out"
    for relative in ("node-dataset/contrast-aMinusB_stat-z_statmap.nii.gz",
                     "node-dataset/contrast-a_stat-z_desc-fweCorrected_statmap.nii.gz",
                     "node-subject/sub-06/sub-06_contrast-a_stat-effect_statmap.nii.gz",
                     "node-run/sub-06/sub-06_run-2_contrast-task_stat-F_statmap.nii.gz",
                     "group_level/group_contrast-a_fwe-corrected.nii.gz",
                     "first_level/sub-06/sub-06_task-main_contrast-a_stat-z.nii.gz",
                     "reports/index.html", "app_provenance.json"):
        assert (out / relative).is_file(), relative


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_committed_notebook_is_valid_and_stripped(path):
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {index} of {path.name} has outputs: strip them"
            assert cell.execution_count is None, f"cell {index} of {path.name} has an execution count"
        assert "execution" not in cell.metadata, f"cell {index} of {path.name} has timing metadata"


def test_every_notebook_is_executed_by_a_test():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == EXECUTED


def test_cluster_configs_shown_in_notebook_03_are_valid():
    """The SLURM and gateway configs are shown, not run: check them against the schema."""
    import yaml

    from chunkglm.cluster import load_config

    nb = nbformat.read(NOTEBOOKS / "03_scale_out.ipynb", as_version=4)
    blocks = [block for cell in nb.cells if cell.cell_type == "markdown"
              for block in re.findall(r"```yaml\n(.*?)```", cell.source, flags=re.S)]
    types = [load_config(yaml.safe_load(block)).type for block in blocks]
    assert types == ["slurm", "gateway"]
