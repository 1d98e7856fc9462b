"""Reports of surface results (issue 20 item 5): generate_report, save_glm_to_bids' report.html and
``chunkglm report`` on a surface glm layout draw the maps on their mesh with nilearn's surface plotting,
say in words when no vertex survives, show CIFTI maps' cortex and list their subcortical structures, and
give the same bytes run after run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.datasets import load_fsaverage
from nilearn.surface import SurfaceImage

from chunkglm.errors import InputError
from chunkglm.glm import save_glm_to_bids
from chunkglm.glm.first_level import FirstLevelModel
from chunkglm.glm.io.surface_derivatives import save_surface_derivatives
from chunkglm.report import write_reports
from chunkglm.report.surface import cifti_cortex, cifti_values

MESH = load_fsaverage("fsaverage5")["pial"]
EVENTS = pd.DataFrame({"onset": [0, 20, 40, 60], "duration": [5] * 4, "trial_type": ["a", "b", "a", "b"]})
PNG = re.compile(r'src="data:image/png;base64,')


def _run(seed=0, effect=0.0):
    """40 volumes of noise on fsaverage5, plus ``effect`` times the a-b boxcar in the first 300 left
    vertices (so that 'a - b' survives there and nowhere else, whatever the seed)."""
    rng = np.random.default_rng(seed)
    data = {p: rng.standard_normal((10242, 40)).astype(np.float32) for p in ("left", "right")}
    boxcar = np.zeros(40)
    for onset, sign in ((0, 1), (10, -1), (20, 1), (30, -1)):
        boxcar[onset:onset + 3] = sign
    data["left"][:300] += (effect * boxcar).astype(np.float32)
    return SurfaceImage(MESH, data)


@pytest.fixture(scope="module")
def model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FirstLevelModel(t_r=2.0, subject_label="01").fit(_run(effect=4.0), events=EVENTS)


def _statistical_maps(html: str) -> str:
    return html.split('id="statistical-maps', 1)[1].split('id="provenance', 1)[0]


def test_generate_report_draws_surface_maps(model):
    report = model.generate_report({"aMinusB": "a - b"}, two_sided=True)
    html = str(report)
    maps = _statistical_maps(html)
    assert len(PNG.findall(maps)) == 1 and "on the mesh, thresholded at 3.29 (both tails)" in maps
    assert "The mask includes 20484 vertices (100.0 %) of the mesh." in html
    assert "Vertices in the mask" in html and 'id="design-matrix-' in html
    count = int(report.findings["aMinusB"].split(" ", 1)[0])
    assert count >= 1  # the 300 vertices with the effect form clusters (and noise may add a few)
    # same model, same options: the same figures, byte for byte (the page's provenance has the time)
    again = _statistical_maps(str(model.generate_report({"aMinusB": "a - b"}, two_sided=True)))
    assert re.findall(r'base64,[^"]+', again) == re.findall(r'base64,[^"]+', maps)


def test_no_vertex_survives_is_said_in_words(model):
    report = model.generate_report({"aMinusB": "a - b"}, height_control=None, threshold=50.0)
    maps = _statistical_maps(str(report))
    assert "No suprathreshold cluster: no vertex survives this threshold (z &gt; 50)" in maps
    assert not PNG.search(maps) and report.findings == {"aMinusB": "no vertex survives"}


def test_volume_background_refused_as_nilearn(model):
    volume = nib.Nifti1Image(np.zeros((2, 2, 2), dtype=np.float32), np.eye(4))
    with pytest.raises(TypeError, match="'bg_img' must a SurfaceImage instance. Got Nifti1Image"):
        model.generate_report("a - b", bg_img=volume)


def test_save_glm_to_bids_writes_a_surface_report(model, tmp_path):
    save_glm_to_bids(model, {"aMinusB": "a - b"}, out_dir=tmp_path, prefix="sub-01", two_sided=True)
    html = (tmp_path / "sub-01" / "sub-01_report.html").read_text()
    assert len(PNG.findall(_statistical_maps(html))) == 1
    assert 'src="sub-01_contrast-aminusb_design.png"' in html  # the weights figure written beside it


def _written(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.suffix in (".html", ".svg", ".json") and p.is_file()}


def test_chunkglm_report_on_a_surface_glm_layout(model, tmp_path):
    """The layout chunkglm first-level writes for GIFTI runs (maps and mask one .func.gii per
    hemisphere): one page per subject, maps drawn on fsaverage5 (nilearn's packaged mesh of 10,242
    vertices), the index's findings; a second run in another process rewrites every byte unchanged."""
    out = tmp_path / "glm"
    save_surface_derivatives(model, {"aMinusB": "a - b"}, out, task_label="main")
    pages = write_reports(out, jobs=1, two_sided=True)
    assert [p.name for p in pages] == ["sub-01_task-main_report.html"]
    html = pages[0].read_text()
    maps = _statistical_maps(html)
    assert len(PNG.findall(maps)) >= 1 and "on the mesh" in maps
    assert "The mask includes 20484 vertices" in html
    first = _written(out)
    done = subprocess.run([sys.executable, "-m", "chunkglm.cli.main", "report", str(out), "--two-sided"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    second = _written(out)
    assert sorted(second) == sorted(first)
    assert [name for name in first if first[name] != second[name]] == []


def test_layout_sidecar_records_the_space_and_the_report_uses_it(model, tmp_path):
    """The GIFTI files hold no geometry: the sidecar names the space (the runs' mesh has fsaverage5's
    faces) and vertex counts, and the report takes the mesh of that space; a space nilearn ships no mesh
    of (fsaverage6 is a download) is refused in one line naming it, not drawn on another mesh."""
    out = tmp_path / "glm"
    save_surface_derivatives(model, {"aMinusB": "a - b"}, out, task_label="main")
    sidecar = out / "first_level" / "sub-01" / "sub-01_task-main_glm.json"
    content = json.loads(sidecar.read_text())
    assert content["Space"] == "fsaverage5" and content["VertexCount"] == {"L": 10242, "R": 10242}
    sidecar.write_text(json.dumps({**content, "Space": "fsaverage6"}))
    with pytest.raises(InputError, match="could not be reported") as error:
        write_reports(out, jobs=1)
    line = str(error.value).splitlines()[1]  # the result's own line
    assert re.search(r"sub-01_task-main_glm\.json: space 'fsaverage6': nilearn ships no mesh of it .* "
                     r"convert the maps into a store with their mesh", line), line


def test_cifti_report_draws_the_cortex_and_lists_structures(tmp_path):
    """A CIFTI model (the synthetic fsaverage5-sized grayordinates, 2 thalamus blocks): the cortex drawn
    on nilearn's fsaverage5 mesh, every structure of the brain-model axis in the table and the mask."""
    from chunkglm.io.cohort import open_cohort
    from chunkglm.io.surface_convert import convert_surface_bids
    from chunkglm.testing import make_synthetic_bids

    dataset = make_synthetic_bids(tmp_path / "bids", n_subjects=1, n_runs=1, surface=True)
    convert_surface_bids(dataset.root, tmp_path / "c.zarr", space="fsaverage5", cifti=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cifti = FirstLevelModel(slice_time_ref=0.5).fit(list(open_cohort(tmp_path / "c.zarr").runs.values()))
        report = cifti.generate_report({"a": "a"}, height_control=None, threshold=2.0)
    html = str(report)
    assert "Subcortical structures: THALAMUS_LEFT (8 voxels), THALAMUS_RIGHT (8 voxels)." in html
    maps = _statistical_maps(html)
    for structure in ("CORTEX_LEFT", "CORTEX_RIGHT", "THALAMUS_LEFT", "THALAMUS_RIGHT"):
        assert f"<td>{structure}</td>" in maps
    assert len(PNG.findall(maps)) == 1 and "grayordinate(s) survive" in maps
    # the cortex drawn is the map's cortex values, each vertex in its place on the mesh
    z = cifti.compute_contrast("a")
    cortex = cifti_cortex(z, cifti_values(z))
    axis = z.header.get_axis(1)
    left = axis.vertex[axis.name == "CIFTI_STRUCTURE_CORTEX_LEFT"]
    np.testing.assert_array_equal(np.asarray(cortex.data.parts["left"])[left],
                                  cifti_values(z)[axis.name == "CIFTI_STRUCTURE_CORTEX_LEFT"])
    nothing = cifti.generate_report({"a": "a"}, height_control=None, threshold=1e3)
    assert "no grayordinate survives" in _statistical_maps(str(nothing))
