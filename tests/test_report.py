"""HTML reports: generate_report of the models and meta results, chunkglm report DIR.

The numbers on the page are nilearn's (threshold and cluster table computed
by nilearn 0.14 on the same z map); a report made from the derivatives folder
shows the same statistical maps section as the report of the fitted model;
bad options are refused before anything is written.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from pathlib import Path

import dask
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from chunkglm.errors import InputError
from chunkglm.glm.first_level import first_level_from_bids
from chunkglm.glm.second_level import SecondLevelModel
from chunkglm.glm.io import save_glm_derivatives, save_glm_to_bids, save_group_derivatives
from chunkglm.io.convert import convert
from chunkglm.provenance import Stopwatch, record, write_record
from chunkglm.report import HTMLReport, find_results, write_reports
from chunkglm.report.sections import ReportOptions, stat_map_summary

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/: the browser check in tests/infra
from infra.browser import browser_check, chromium_session  # noqa: E402, F401  (pytest fixtures)

CONTRASTS = {"aMinusB": "a - b", "effects": np.eye(4)[:2]}


@pytest.fixture(autouse=True)
def _threads():
    with dask.config.set(scheduler="threads"):
        yield


@pytest.fixture(scope="module")
def fitted(tiny_bids, tmp_path_factory):
    """Two first-level models, their derivatives, a group model and its derivatives."""
    folder = tmp_path_factory.mktemp("report")
    with dask.config.set(scheduler="threads"):
        convert(tiny_bids.root, folder / "cohort.zarr")
        models, runs, events, confounds = first_level_from_bids(folder / "cohort.zarr", "main")
        for model, run, ev, conf in zip(models, runs, events, confounds):
            model.fit(run, events=ev, confounds=conf)
        glm = folder / "derivatives" / "glm"
        for model in models:
            prefix = f"sub-{model.subject_label}_task-main"
            save_glm_to_bids(model, CONTRASTS, out_dir=glm, prefix=prefix)
            save_glm_derivatives(model, CONTRASTS, glm, task_label="main", confounds=[])
        group = SecondLevelModel().fit(models)
        save_group_derivatives(group, {"mean": "intercept"}, glm, first_level_contrast="a - b")
    return {"folder": folder, "models": models, "group": group, "glm": glm}


def _tables(page: str, section: str) -> list[str]:
    body = page.split(f'<section id="{section}-UUID-', 1)[1].split("</section>", 1)[0]
    return re.findall(r"<table.*?</table>", body, flags=re.S)


def test_first_level_report_sections_and_nilearn_numbers(fitted):
    from nilearn.glm import threshold_stats_img as nilearn_threshold
    from nilearn.reporting import get_clusters_table as nilearn_table

    model = fitted["models"][0]
    report = model.generate_report(CONTRASTS, title="sub-01 report", height_control="fdr", alpha=0.05,
                                   two_sided=True)
    assert isinstance(report, HTMLReport) and report.title == "sub-01 report"
    page = report.get_standalone()
    for section in ("model-details", "design-matrix", "contrasts", "mask", "statistical-maps", "provenance"):
        assert f'<section id="{section}-UUID-' in page
    assert page.count("data:image/png;base64,") >= 6  # design, correlation, 2 contrasts, mask, 2 maps
    assert "http://" not in page and "https://" not in page  # nothing to fetch: readable offline
    # the page's threshold and clusters are nilearn's on the same z map
    z = model.compute_contrast("a - b")
    options = ReportOptions.checked(height_control="fdr", alpha=0.05, two_sided=True)
    _, threshold, table = stat_map_summary(z, model.mask_img_, options)
    ref_img, ref_threshold = nilearn_threshold(z, mask_img=model.mask_img_, alpha=0.05, height_control="fdr",
                                               two_sided=True)
    assert threshold == pytest.approx(ref_threshold, rel=1e-12)
    ref = nilearn_table(ref_img, stat_threshold=ref_threshold, two_sided=True, min_distance=8.0)
    assert len(table) == len(ref) > 0
    # float32 maps, peak values printed by both from the same voxels: equal to float32 precision
    np.testing.assert_allclose(table["Peak Stat"].astype(float), ref["Peak Stat"].astype(float), rtol=1e-6)
    np.testing.assert_array_equal(table[["X", "Y", "Z"]].astype(float), ref[["X", "Y", "Z"]].astype(float))
    assert f"{threshold:.3f}".rstrip("0") in page
    provenance = report.provenance
    assert provenance["versions"]["chunkglm"] and provenance["cluster"]["type"] == "none"


def test_report_from_derivatives_shows_what_the_model_report_shows(fitted):
    options = {"height_control": None, "threshold": 2.0, "cluster_threshold": 2, "two_sided": True}
    written = write_reports(fitted["glm"], **options)
    kinds = sorted(f.kind for f in find_results(fitted["glm"]))
    assert kinds == ["first_level", "first_level", "group_level"]
    assert sorted(p.name for p in written) == ["group_report.html", "sub-01_task-main_report.html",
                                               "sub-02_task-main_report.html"]
    model = fitted["models"][0]
    from_model = model.generate_report({"aminusb": "a - b", "effects": np.eye(4)[:2]}, **options).html
    from_files = (fitted["glm"] / "first_level" / "sub-01" / "sub-01_task-main_report.html").read_text()
    assert _tables(from_files, "statistical-maps") == _tables(from_model, "statistical-maps")
    group = fitted["group"].generate_report({"mean": "intercept"}, first_level_contrast="a - b", **options).html
    group_files = (fitted["glm"] / "group_level" / "group_report.html").read_text()
    shared = _tables(group, "statistical-maps")
    assert _tables(group_files, "statistical-maps")[:len(shared)] == shared
    assert "FDR-corrected" in group_files and "FWE-corrected" in group_files


def test_design_tsv_round_trip_gives_the_same_figures_inputs(fitted):
    design = pd.read_csv(fitted["glm"] / "first_level" / "sub-01" / "sub-01_task-main_design-matrix.tsv", sep="\t")
    pd.testing.assert_frame_equal(design, fitted["models"][0].design_matrices_[0].reset_index(drop=True))


def test_report_options_are_checked_before_anything_is_computed(fitted):
    model = fitted["models"][0]
    for bad, match in (({"height_control": "holm"}, "height_control"), ({"alpha": 2}, "alpha"),
                       ({"plot_type": "3d"}, "plot_type"), ({"cluster_threshold": -1}, "cluster_threshold"),
                       ({"display_mode": "w"}, "display_mode"), ({"threshold": float("nan")}, "threshold")):
        with pytest.raises(InputError, match=match):
            model.generate_report("a - b", **bad)
    with pytest.raises(InputError, match="contrast"):
        model.generate_report("a - nothere")
    options = ReportOptions.checked(height_control="fpr", threshold=2.5, plot_type="glass", cut_coords=[0, 0, 0])
    assert options.threshold is None and options.cut_coords is None and options.display_mode == "lzry"
    assert len(options.warnings) == 2  # both adjustments are said on the page


def test_glass_brain_report_and_no_survivor(fitted):
    model = fitted["models"][1]
    report = model.generate_report("a - b", plot_type="glass", height_control="bonferroni", alpha=1e-12)
    # nothing survives: said in words, with the threshold, instead of an empty glass brain
    assert ("No suprathreshold cluster: no voxel survives this threshold (z &gt; 7.84): nothing to draw, no cluster "
            "to list.") in report.html
    assert "Thresholded z map of a - b" not in report.html and report.findings == {"a - b": "no voxel survives"}
    assert report._repr_html_() == report.body and "<head>" not in report.body  # nilearn: the body inline
    assert "<iframe srcdoc=" in report.get_iframe()
    report.resize(800, 400)
    assert 'width="800"' in report.get_iframe()


def test_meta_result_report(tmp_path):
    import _nimare_reference as reference
    from chunkglm.meta import FDRCorrector, ibma

    spec = reference.write_maps_folder(tmp_path / "maps", seed=1)
    table = pd.DataFrame(spec["images"])
    result = FDRCorrector(alpha=0.05).transform(ibma.DerSimonianLaird(mask=spec["mask"]).fit(table))
    report = result.generate_report(height_control=None, threshold=1.0)
    page = report.html
    assert "DerSimonianLaird" in page and "z_corr-FDR_method-indep" in page
    # a corrected map shows the voxels whose corrected p < alpha: |z_corr| > norm.isf(alpha / 2)
    assert "1.960" in page
    written = result.save_derivatives(tmp_path / "out")
    assert written["mask"].exists()
    assert json.loads(written["sidecar"].read_text())["Corrections"]["alpha"] == 0.05
    pages = write_reports(tmp_path / "out", height_control=None, threshold=1.0)
    assert [p.name for p in pages] == ["DerSimonianLaird_report.html"]
    assert _tables(pages[0].read_text(), "statistical-maps") == _tables(page, "statistical-maps")
    # the estimator table: what the estimator computes, not how chunkglm runs it (caching, store, chunks)
    for written in (page, pages[0].read_text()):
        estimator = _text(_tables(written, "model-details")[0])
        for internal in ("memory", "memory_level", "store", "chunk_voxels", "chunk_bytes", "generate_description"):
            assert f" {internal} " not in f" {estimator} ", (internal, estimator)
        assert "DerSimonianLaird" in estimator and "weight_scheme rescale" in estimator
    with pytest.raises(InputError, match="not in this result"):
        result.generate_report(maps=["nope"])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "chunkglm.cli.main", "report", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_cli_report_writes_pages_and_refuses_bad_input(fitted, tmp_path):
    done = _cli(fitted["glm"] / "group_level", "--height-control", "none", "--threshold", "2.5",
                "--plot-type", "glass", "--jobs", "2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()  # the pages, then the index that links them
    assert lines[-2].endswith("group_report.html") and lines[-1] == str(fitted["glm"] / "group_level" / "index.html")
    assert _cli(fitted["glm"], "--jobs", "0").returncode == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _cli(empty)
    assert done.returncode == 2 and "no chunkglm result" in done.stderr
    before = sorted(p.name for p in (fitted["glm"] / "group_level").iterdir())
    done = _cli(fitted["glm"], "--alpha", "2")
    assert done.returncode == 2 and "alpha" in done.stderr
    assert sorted(p.name for p in (fitted["glm"] / "group_level").iterdir()) == before


def test_incomplete_derivatives_name_the_missing_file(fitted, tmp_path):
    import shutil

    copy = tmp_path / "glm"
    for part in ("group_level", "first_level/sub-01"):
        shutil.copytree(fitted["glm"] / part, copy / part, ignore=shutil.ignore_patterns("*_report.html"))
    (copy / "group_level" / "group_contrast-mean_stat-z.nii.gz").unlink()
    with pytest.raises(InputError, match=r"1 of 2 result\(s\)(.|\n)*group_contrast-mean_stat-z.nii.gz is missing"):
        write_reports(copy)
    assert not (copy / "group_level" / "group_report.html").exists()
    assert (copy / "first_level" / "sub-01" / "sub-01_task-main_report.html").exists()  # the others are written


def test_mask_of_report_is_the_model_mask(fitted):
    mask = nib.load(fitted["glm"] / "first_level" / "sub-01" / "sub-01_task-main_mask.nii.gz")
    np.testing.assert_array_equal(mask.get_fdata(), fitted["models"][0].mask_img_.get_fdata())


def test_reports_load_in_a_real_browser(fitted, browser_check, tmp_path):
    """Headless Chromium: no console error, no request leaving the file, every figure decodes, not blank."""
    pages = write_reports(fitted["glm"], height_control=None, threshold=2.0, plot_type="glass")
    pages.append(fitted["models"][0].generate_report(CONTRASTS, height_control="fpr", alpha=0.05)
                 .save_as_html(tmp_path / "model_report.html"))
    for page in pages:
        result = browser_check(page, tmp_path / f"{page.stem}.png")
        assert result.ok, (page, result.problems)
        n_figures = page.read_text().count("data:image/png;base64,")
        assert result.image_count == n_figures >= 4 and not result.broken_images
        assert result.title and not result.blank
    index = browser_check(fitted["glm"] / "index.html", tmp_path / "index.png")  # the page linking them all
    assert index.ok and not index.blank and index.title.startswith("chunkglm reports"), index.problems


# -- nilearn 0.14's generate_report behaviour (its test_glm_reporter.py checks these on its own pages) --------


@pytest.fixture(scope="module")
def small_runs():
    """A first-level model fitted on three small runs (nilearn's generator) and its contrast."""
    from nilearn._utils.data_gen import generate_fake_fmri_data_and_design

    from chunkglm.glm.first_level import FirstLevelModel

    _, imgs, designs = generate_fake_fmri_data_and_design([(7, 7, 7, 5), (7, 7, 7, 10), (7, 7, 7, 15)], rk=6)
    with dask.config.set(scheduler="threads"):
        model = FirstLevelModel(standardize=None).fit(imgs, design_matrices=designs)
    return model, np.eye(6)[[1]], (imgs, designs)


def _messages(record) -> list[str]:
    return [str(w.message) for w in record]


def test_report_is_a_nilearn_report_with_its_ids_and_one_panel_per_run(small_runs):
    from nilearn.reporting import HTMLReport as NilearnHTMLReport

    import warnings

    from nilearn.glm.first_level import FirstLevelModel as NilearnFirstLevelModel

    model, contrast, (imgs, designs) = small_runs

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        report = model.generate_report(contrasts=contrast)
    # the model's own (nilearn's "same contrast for all runs"...) only: none from drawing empty cuts
    assert not [m for m in _messages(record) if "masked element" in m or "report" in m], _messages(record)
    assert isinstance(report, NilearnHTMLReport)
    page = str(report)
    assert page.count('id="carousel-obj-') == 3 and 'id="carousel-navbar"' in page
    for marker in ('<nav class="navbar pure-g fw-bold" id="menu"', '<a id="navbar-contrasts-link',
                   '<a id="navbar-matrix-link', '<a href="#statistical-maps', 'id="mask-UUID-',
                   "The mask includes "):
        assert marker in page, marker
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = str(NilearnFirstLevelModel(standardize=None).fit(imgs, design_matrices=designs)
                        .generate_report())
    coverage = re.search(r"The mask includes (\d+) voxels \(([\d.]+) %\) of the image.", reference).groups()
    assert f"The mask includes {coverage[0]} voxels ({coverage[1]} %) of the image." in page
    with pytest.warns(UserWarning, match="Using default instead"):
        report.width = "wide"
    assert report.width == 800  # nilearn's HTMLDocument default


def test_report_warnings_are_nilearns_and_on_the_page(small_runs):
    model, contrast, _ = small_runs
    with pytest.warns(UserWarning) as record:
        report = model.generate_report(contrasts=contrast, first_level_contrast=contrast, threshold=2,
                                       plot_type="glass", cut_coords=[1.0, 2.0, 3.0])
    # the report's own UserWarnings (the model's are nilearn's too); a ResourceWarning that garbage
    # collection raises meanwhile (another test's temporary folder) is not the report's
    messages = [str(w.message) for w in record if issubclass(w.category, UserWarning) and "'" in str(w.message)]
    assert len(messages) == 3 and len(set(messages)) == 3, messages
    for expected in ("'first_level_contrast' is ignored", "'threshold' is only used when 'height_control=None'",
                     "'cut_coords' was set to None"):
        assert any(expected in m for m in messages), expected
        assert expected.replace("'", "&#39;") in str(report)
    with pytest.warns(UserWarning, match="No contrast passed during report generation."):
        page = str(model.generate_report())
    assert '<a id="navbar-contrasts-link' not in page and '<a href="#statistical-maps' not in page
    with pytest.warns(FutureWarning, match="the default 'threshold' will be set to"):
        model.generate_report(contrasts=contrast, height_control=None)


def test_report_option_errors_carry_nilearns_words(small_runs):
    model, contrast, _ = small_runs
    for bad, words in (({"min_distance": -8}, "'min_distance' must be > 0"),
                       ({"cluster_threshold": -10}, "'cluster_threshold' must be > 0"),
                       ({"plot_type": "junk"}, "'plot_type' must be one of"),
                       ({"height_control": "knights_of_ni"}, "must be one of")):
        with pytest.raises(ValueError, match=words):
            model.generate_report(contrasts=contrast, **bad)


@pytest.mark.parametrize("level", ["first", "second"])
def test_unfitted_model_gives_an_empty_report_with_nilearns_warning(level):
    from chunkglm.glm.first_level import FirstLevelModel

    model = FirstLevelModel() if level == "first" else SecondLevelModel()
    with pytest.warns(UserWarning, match="This estimator has not been fit yet.") as record:
        page = str(model.generate_report(title="empty"))
    assert len(record) == 1
    for marker in ('id="warnings"', "No statistical map was provided.", "No mask was provided.", "empty"):
        assert marker in page, marker
    assert '<a id="navbar-matrix-link' not in page and 'id="design-matrix-' not in page


def test_reporting_data_gives_nilearns_view_of_the_inputs(fitted):
    from chunkglm.glm.first_level import FirstLevelModel

    model = fitted["models"][0]
    view = model._reporting_data
    assert list(view["run_imgs"]) == list(range(len(model.design_matrices_)))
    assert [run["entities"] for run in view["run_imgs"].values()] == model.run_entities_
    assert view["run_imgs"][0]["entities"]["sub"] == "01"
    assert FirstLevelModel()._reporting_data == {} and fitted["group"]._reporting_data == {}


def test_saved_report_page_and_run_carousel_load_in_a_real_browser(small_runs, browser_check, tmp_path):
    """save_glm_to_bids' page links the PNG files beside it; three runs give the carousel (its script runs)."""
    import warnings

    from sklearn.base import clone

    fitted, contrast, (imgs, designs) = small_runs
    # a model of its own: save_glm_to_bids leaves its saved contrasts on the model (nilearn's
    # generate_report() then shows them), which the module's other tests, in any order, must not see
    with dask.config.set(scheduler="threads"):
        model = clone(fitted).fit(imgs, design_matrices=designs)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        save_glm_to_bids(model, {"c1": contrast[0]}, out_dir=tmp_path / "out", prefix="", height_control=None,
                         threshold=1.0)
    # the page reuses the maps and weight figures just written: the contrast is evaluated (and warned about) once
    assert sum("The same contrast will be used for all 3 runs" in m for m in _messages(record)) == 1
    page = tmp_path / "out" / "report.html"
    text = page.read_text()
    linked = [src for src in re.findall(r'<img src="([^"]+)"', text) if not src.startswith("data:")]
    assert len(linked) == 9 and all((page.parent / src).is_file() for src in linked)  # 3 runs x 3 figures
    result = browser_check(page, tmp_path / "saved.png")
    assert result.ok, result.problems
    assert result.image_count == text.count("<img ") and not result.broken_images


# -- issue 17 item 5: what the pages say, how they are built, the index ------------------------------------


def _text(page: str) -> str:
    """The page's words (tags, styles, scripts and figures removed), spaces collapsed."""
    page = re.sub(r"<(style|script)[^>]*>.*?</\1>", " ", page, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))


def _copy_results(fitted, tmp_path, parts=("group_level", "first_level/sub-01")) -> Path:
    import shutil

    copy = tmp_path / "glm"
    for part in parts:
        shutil.copytree(fitted["glm"] / part, copy / part, ignore=shutil.ignore_patterns("*_report.html"))
    return copy


def test_first_level_pages_name_their_subject_in_the_header_and_the_tab(fitted, tmp_path):
    write_reports(fitted["glm"], height_control=None, threshold=2.0)
    for subject in ("01", "02"):
        page = (fitted["glm"] / "first_level" / f"sub-{subject}" / f"sub-{subject}_task-main_report.html").read_text()
        title = re.search(r"<title>(.*?)</title>", page).group(1)
        assert title.startswith(f"sub-{subject} task-main · First Level Model"), title
        assert re.search(rf"<header>\s*<h1>sub-{subject} task-main · ", page)
    # a title given for every page keeps each page's subject in front of it
    copy = _copy_results(fitted, tmp_path)
    write_reports(copy, title="Study A", height_control=None, threshold=2.0)
    page = (copy / "first_level" / "sub-01" / "sub-01_task-main_report.html").read_text()
    assert "<title>sub-01 task-main · Study A</title>" in page
    assert "<title>Study A</title>" in (copy / "group_level" / "group_report.html").read_text()
    # the fitted model's own page too
    report = fitted["models"][1].generate_report("a - b", height_control=None, threshold=2.0)
    assert report.title.startswith("sub-02 task-main · First Level Model: a - b"), report.title


def test_corrected_maps_state_their_correction_and_say_in_words_when_no_voxel_survives(fitted, tmp_path):
    copy = _copy_results(fitted, tmp_path, ("group_level",))
    fwe = copy / "group_level" / "group_contrast-mean_fwe-corrected.nii.gz"
    img = nib.load(fwe)  # a correction that nothing survived: the map is written all zeros
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine, img.header), fwe)
    alpha = json.loads((copy / "group_level" / "group_glm.json").read_text())["Corrections"]["FWE"]["Alpha"]
    [page] = write_reports(copy, height_control="fpr", alpha=0.001)
    written = page.read_text()
    text = _text(written)
    assert (f"No suprathreshold cluster: no voxel survives the FWE correction (bonferroni) at α = {alpha:g}: "
            "nothing to draw") in text, text
    assert 'alt="Corrected z map of mean (FWE-corrected)"' not in written  # no empty slices
    # the corrected maps' settings are their corrections' (α 0.05), never the report's own (α 0.001, 1e-06)
    tables = _tables(written, "statistical-maps")
    corrected = [t for t in tables if "Correction" in t]
    assert len(corrected) == 2 and all(f"<td>{alpha:g}</td>" in t and "0.001" not in t for t in corrected)
    assert "1e-06" not in written
    assert "Corrected maps: each at the α of its correction" in text


def test_first_level_page_shows_tr_and_slice_timing(fitted, tmp_path):
    model = fitted["models"][0]
    write_reports(fitted["glm"], height_control=None, threshold=2.0)
    page = (fitted["glm"] / "first_level" / "sub-01" / "sub-01_task-main_report.html").read_text()
    details = _text(_tables(page, "model-details")[0])
    assert f"t_r (seconds) {model.t_r:g}" in details and f"slice_time_ref {model.slice_time_ref:g}" in details
    # from the derivatives/glm sidecar alone (no nilearn file set beside it)
    copy = _copy_results(fitted, tmp_path, ("first_level/sub-01",))
    sidecar = copy / "first_level" / "sub-01" / "sub-01_task-main_glm.json"
    content = json.loads(sidecar.read_text())
    content["Model"].update({"RepetitionTime": 1.5, "SliceTimingRef": 0.25})
    sidecar.write_text(json.dumps(content))
    [page] = write_reports(copy, height_control=None, threshold=2.0)
    details = _text(_tables(page.read_text(), "model-details")[0])
    assert "t_r (seconds) 1.5" in details and "slice_time_ref 0.25" in details
    del content["Model"]["RepetitionTime"], content["Model"]["SliceTimingRef"]
    sidecar.write_text(json.dumps(content))
    [page] = write_reports(copy, height_control=None, threshold=2.0)
    assert "TR and slice timing not recorded" in _text(page.read_text())
    # nor the nilearn file set: the runs' nodes in the store that the provenance record names
    write_record(copy / "first_level" / "sub-01" / "sub-01_task-main_provenance.json",
                 record("first-level", inputs=[{"store": str(fitted["folder"] / "cohort.zarr"), "node": f"runs/{name}"}
                                               for name in model._run_names],
                        options={}, cluster=None, stopwatch=Stopwatch()))
    [page] = write_reports(copy, height_control=None, threshold=2.0)
    details = _text(_tables(page.read_text(), "model-details")[0])
    assert f"t_r (seconds) {model.t_r:g}" in details and f"slice_time_ref {model.slice_time_ref:g}" in details


def test_glm_pages_have_a_methods_paragraph(fitted):
    write_reports(fitted["glm"], height_control="fpr", alpha=0.001, cluster_threshold=2)
    first = _text((fitted["glm"] / "first_level" / "sub-01" / "sub-01_task-main_report.html").read_text())
    t_r, scans = fitted["models"][0].t_r, len(fitted["models"][0].design_matrices_[0])
    assert (f"Methods A first-level general linear model was fitted to 1 run(s) of sub-01 ({scans} "
            f"scans, TR = {t_r:g} s, slice-timing reference at") in first, first
    assert "their z maps are shown at p < 0.001 uncorrected (one-sided), in clusters of at least 2 voxels." in first
    group = _text((fitted["glm"] / "group_level" / "group_report.html").read_text())
    assert "Methods A second-level general linear model (ordinary least squares) was fitted to 2 map(s)" in group
    assert "Corrected maps: FDR correction at α = 0.05; FWE correction (bonferroni) at α = 0.05." in group
    report = fitted["models"][0].generate_report("a - b", height_control="fdr", alpha=0.05)
    assert "A first-level general linear model was fitted to 1 run(s) of sub-01" in _text(report.html)
    assert "at q < 0.05 (false discovery rate" in _text(report.html)


def _meeting_report_of(real, barrier, passed):
    """report_of that waits until a second page is being built at the same time (once)."""
    def report_of(result, options, title=None):
        if not passed.value:
            barrier.wait()  # BrokenBarrierError after its timeout if pages are built one at a time
            passed.value = 1
        return real(result, options, title)
    return report_of


def test_pages_are_built_at_once_and_indexed(fitted, tmp_path, monkeypatch):
    import multiprocessing

    from chunkglm.report import from_derivatives

    copy = _copy_results(fitted, tmp_path, ("group_level", "first_level/sub-01", "first_level/sub-02"))
    context = multiprocessing.get_context("fork")  # shared with the pool's workers whether processes or threads
    barrier, passed = context.Barrier(2, timeout=120), context.Value("i", 0)
    monkeypatch.setattr(from_derivatives, "report_of",
                        _meeting_report_of(from_derivatives.report_of, barrier, passed))
    pages = write_reports(copy, jobs=2, height_control=None, threshold=2.0)
    assert sorted(p.name for p in pages) == ["group_report.html", "sub-01_task-main_report.html",
                                             "sub-02_task-main_report.html"]
    index = (copy / "index.html").read_text()
    links = re.findall(r'<a href="([^"]+)">', index)
    assert sorted(links) == sorted(str(p.relative_to(copy)) for p in pages)
    assert all((copy / link).is_file() for link in links)
    text = _text(index)
    assert "sub-01 task-main · First Level Model" in text and "3 page(s)" in text
    assert re.search(r"mean \(FWE-corrected\): (no voxel survives|\d+ cluster\(s\))", text), text


def test_pool_is_of_processes_only_where_forking_is_safe(tmp_path):
    code = ("import threading, time; from chunkglm.report.pages import executor; "
            "print(type(executor(3, 2)).__name__); "
            "threading.Thread(target=time.sleep, args=(2,), daemon=True).start(); "
            "print(type(executor(3, 2)).__name__, executor(3, 1), executor(1, 4))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = "ProcessPoolExecutor" if sys.platform == "linux" else "ThreadPoolExecutor"
    assert done.stdout.split() == [expected, "ThreadPoolExecutor", "None", "None"]
    with pytest.raises(InputError, match="jobs must be"):
        write_reports(tmp_path, jobs=0)


def test_failed_results_are_named_in_the_index(fitted, tmp_path):
    copy = _copy_results(fitted, tmp_path)
    (copy / "group_level" / "group_contrast-mean_stat-z.nii.gz").unlink()
    with pytest.raises(InputError, match="index.html"):
        write_reports(copy)
    text = _text((copy / "index.html").read_text())
    assert "group_glm.json not reported:" in text and "group_contrast-mean_stat-z.nii.gz is missing" in text
    assert "1 page(s), 1 result(s) not reported" in text


def test_saved_svg_figures_are_byte_identical_run_after_run(tmp_path):
    from chunkglm.report.figures import design_matrix_figure, save_figure

    design = pd.DataFrame(np.random.default_rng(0).normal(size=(20, 3)), columns=["a", "b", "constant"])
    first = save_figure(design_matrix_figure(design), [tmp_path / "one.png", tmp_path / "one.svg"])
    second = save_figure(design_matrix_figure(design), [tmp_path / "two.png", tmp_path / "two.svg"])
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.suffix
    # and in another process (matplotlib's default salt is random per file)
    code = ("import sys, numpy as np, pandas as pd; from chunkglm.report.figures import design_matrix_figure, "
            "save_figure; d = pd.DataFrame(np.random.default_rng(0).normal(size=(20, 3)), "
            "columns=['a', 'b', 'constant']); save_figure(design_matrix_figure(d), sys.argv[1:])")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "three.png"), str(tmp_path / "three.svg")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "three.png").read_bytes() == first[0].read_bytes()
    assert (tmp_path / "three.svg").read_bytes() == first[1].read_bytes()


def _written(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.suffix in (".html", ".svg", ".json") and p.is_file()}


def test_reports_are_byte_identical_run_after_run(fitted, tmp_path):
    """Issue 17: re-running ``chunkglm report`` on the same results rewrites every page, figure and
    sidecar unchanged. Found differing before: nilearn's page id (a random uuid4 scoping the page's
    elements, now the start of the sha256 of the page rendered without it) and the time of writing
    in each page's and the index's footer (left out; a page's provenance section gives its record's
    times). The second run is another process (its own random state), with a pool of 2."""
    copy = _copy_results(fitted, tmp_path, ("group_level", "first_level/sub-01", "first_level/sub-02"))
    write_reports(copy, height_control=None, threshold=2.0)
    first = _written(copy)
    assert sum(name.endswith("_report.html") for name in first) == 3 and "index.html" in first
    done = _cli(copy, "--height-control", "none", "--threshold", "2.0", "--jobs", "2")
    assert done.returncode == 0, done.stderr
    second = _written(copy)
    assert sorted(second) == sorted(first)
    assert [name for name in first if first[name] != second[name]] == []
    # the pages' ids still differ between pages (derived from each page's content)
    ids = {re.search(r'id="mask-(UUID-[0-9a-f]{12})"', first[name].decode()).group(1)
           for name in first if name.endswith("_report.html")}
    assert len(ids) == 3
