"""`chunkglm app`'s BIDS-App options: --nprocs, --mem, --cluster, --scheduler, -v/-q each do what
their help says (the provenance record's cluster entry is the scheduler's own view of its workers)."""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from distributed import LocalCluster

import chunkglm.glm.stats_models as stats_models
from chunkglm.cli._common import command_budget
from chunkglm.cli.app import settle_sizes_and_verbosity
from chunkglm.cli.commands import build_parser
from chunkglm.cli.main import main
from chunkglm.glm.second_level import SecondLevelModel, non_parametric_inference
from chunkglm.interfaces.bids import save_group_derivatives
from chunkglm.testing import make_synthetic_bids

RUN_MODEL = {
    "Name": "runs", "BIDSModelVersion": "1.0.0", "Input": {"task": ["main"]},
    "Nodes": [{"Level": "Run", "Name": "run", "GroupBy": ["run", "subject"],
               "Transformations": {"Transformer": "pybids-transforms-v1", "Instructions": [
                   {"Name": "Factor", "Input": ["trial_type"]},
                   {"Name": "Convolve", "Input": ["trial_type.a", "trial_type.b"], "Model": "spm"}]},
               "Model": {"X": ["trial_type.a", "trial_type.b", 1], "Type": "glm"},
               "Contrasts": [{"Name": "a", "ConditionList": ["trial_type.a"], "Weights": [1], "Test": "t"}]}],
}
EFFECT = "node-run/sub-01/sub-01_run-1_contrast-a_stat-effect_statmap.nii.gz"


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("app_options")
    ds = make_synthetic_bids(root / "ds", n_subjects=1, n_runs=1, size="tiny")
    model = root / "model.json"
    model.write_text(json.dumps(RUN_MODEL))
    return ds, model


def _app(one_run, out, *extra):
    ds, model = one_run
    return main(["app", str(ds.root), str(out), "run", "--model", str(model), *extra])


def _cluster(out) -> dict:
    return json.loads((out / "app_provenance.json").read_text())["cluster"]


def _effect(out) -> np.ndarray:
    return np.asarray(nib.load(out / EFFECT).dataobj)


def test_nprocs_and_mem_size_the_local_cluster_and_qq_prints_nothing(one_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert _app(one_run, out, "--nprocs", "2", "--mem", "1GB", "-qq") == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Scheduler:" not in captured.err and "done" not in captured.err, captured.err
    cluster = _cluster(out)
    assert (cluster["type"], cluster["n_workers"]) == ("LocalCluster", 2)
    assert cluster["memory_limit"] == 500_000_000  # 1 GB shared by the 2 workers
    reference = tmp_path / "none"
    assert _app(one_run, reference, "--cluster", "none", "-qq") == 0
    np.testing.assert_array_equal(_effect(out), _effect(reference))


def test_cluster_config_and_mem_share_its_workers(one_run, tmp_path, capsys):
    config = tmp_path / "two_threads.yaml"
    # a worker process of its own: an in-process worker's memory limit is measured on the whole
    # process (here pytest's, holding every earlier test's imports), which paused the worker at 80 %
    # of 0.75 GB and hung the fit (seen once on a clean clone)
    config.write_text("version: 1\ntype: local\nlocal:\n  n_workers: 1\n  processes: true\n"
                      "  dashboard_address: null\n")
    out = tmp_path / "out"
    assert _app(one_run, out, "--cluster", str(config), "--mem-gb", "0.75", "-q") == 0
    captured = capsys.readouterr()
    assert "Scheduler:" in captured.err and "done" not in captured.err  # -q: no progress lines
    assert "file(s) written under" in captured.out
    cluster = _cluster(out)
    assert (cluster["n_workers"], cluster["memory_limit"]) == (1, 750_000_000)


def test_scheduler_runs_on_the_running_cluster_and_leaves_it_running(one_run, tmp_path, capsys):
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp",
                      host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster:
        out = tmp_path / "out"
        assert _app(one_run, out, "--scheduler", cluster.scheduler_address) == 0
        err = capsys.readouterr().err
        assert f"Scheduler: {cluster.scheduler_address} (running scheduler, 1 worker(s))" in err
        assert "node run: sub-01_task-main_run-1 done" in err  # progress lines by default
        assert _cluster(out)["n_workers"] == 1
        assert cluster.status.name == "running"


def test_verbose_lets_pybids_warnings_through(one_run, tmp_path, monkeypatch):
    real = stats_models.load_graph

    def warning_load_graph(*args, **kwargs):
        warnings.warn("pybids: a file this model does not use", UserWarning)
        return real(*args, **kwargs)

    monkeypatch.setattr(stats_models, "load_graph", warning_load_graph)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert _app(one_run, tmp_path / "quiet", "--cluster", "none", "--no-progress") == 0
    assert not [w for w in seen if "does not use" in str(w.message)]
    with pytest.warns(UserWarning, match="a file this model does not use"):
        assert _app(one_run, tmp_path / "verbose", "--cluster", "none", "--no-progress", "-v") == 0


@pytest.mark.parametrize("extra, words", [
    (["--nprocs", "2", "--workers", "3"], "--nprocs 2 and --workers 3 both set the number of workers"),
    (["--nprocs", "-1"], "--nprocs takes a number of worker processes >= 0"),
    (["--mem", "1GB", "--cluster", "none"], "--mem sizes a local cluster, but --cluster none runs in this process"),
    (["--n-cpus", "2", "--scheduler", "tcp://127.0.0.1:9"], "--nprocs sizes a local cluster; the scheduler"),
    (["--nprocs", "2", "--mem", "1GB", "--cluster", "slurm"], "--nprocs and --mem size the local cluster; the "
                                                              "config 'slurm' is of type 'slurm'"),
])
def test_size_flags_that_cannot_apply_are_one_line_errors(one_run, tmp_path, capsys, extra, words):
    out = tmp_path / "out"
    assert _app(one_run, out, *extra) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err, err
    assert not out.exists()  # refused before anything is converted


def test_mem_with_in_process_workers_is_a_one_line_error(one_run, tmp_path, capsys, monkeypatch):
    """Workers that are threads of the command's process (processes: false) would be held to --mem
    with the whole process's memory: dask paused them at 80 % and the command waited for good."""
    monkeypatch.setenv("CHUNKGLM_CLUSTER__LOCAL__PROCESSES", "false")
    out = tmp_path / "out"
    assert _app(one_run, out, "--nprocs", "1", "--mem", "1GB") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "--mem limits the memory of worker processes, but the config 'local' runs its workers as threads" in err
    assert "use a config with processes: true" in err and "or leave out --mem" in err
    assert not out.exists()  # refused before anything is converted or started


def test_mem_value_and_the_chunk_budget(one_run, capsys):
    ds, model = one_run

    def parse(*extra):
        args = build_parser().parse_args(["app", str(ds.root), "out", "run", "--model", str(model), *extra])
        settle_sizes_and_verbosity(args)  # as the command does first
        return args

    for bad in ("lots", "0", "-2GB"):
        with pytest.raises(SystemExit):
            parse(f"--mem={bad}")
        assert "a memory size such as" in capsys.readouterr().err
    assert parse("--mem", "8GiB").memory == 8 * 2**30
    assert parse("--mem-gb", "1.5").memory == 1_500_000_000
    # 200 MB over 2 workers: a quarter of 100 MB per worker is below the 64 MiB default budget
    assert command_budget(parse("--nprocs", "2", "--mem", "200MB")) == 25_000_000
    assert command_budget(parse("--nprocs", "2", "--mem", "8GB")) == 64 * 2**20  # the default stays
    assert command_budget(parse()) is None  # neither --mem nor --chunk-mb: the store's own chunks


# -- --n-perm: the dataset nodes' max-T permutation test ----------------------------------------

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"


def test_n_perm_maps_equal_non_parametric_inference_on_the_subject_maps(tmp_path):
    ds = make_synthetic_bids(tmp_path / "ds", n_subjects=6, n_runs=1, size="tiny", seed=3)
    out = tmp_path / "out"
    code = main(["app", str(ds.root), str(out), "dataset", "--model", str(EXAMPLES / "one_sample.json"),
                 "--n-perm", "60", "--random-state", "5", "--alpha", "0.5", "--cluster", "none", "--no-progress",
                 "--no-reports"])
    assert code == 0
    for contrast in ("a", "aMinusB"):  # F contrasts stop at the run node; b is tested as these are
        subject_maps = sorted((out / "node-subject").glob(f"sub-*/sub-*_contrast-{contrast}_stat-effect_statmap.nii.gz"))
        assert len(subject_maps) == 6
        expected = non_parametric_inference([str(p) for p in subject_maps],
                                            design_matrix=pd.DataFrame({"intercept": [1.0] * 6}),
                                            second_level_contrast=[1.0], n_perm=60, random_state=5,
                                            two_sided_test=True)
        written = out / "node-dataset"
        logp = nib.load(written / f"contrast-{contrast}_stat-logpMaxT_statmap.nii.gz")
        # the same code on the same float32 maps with the same sign flips: equal once stored as float32
        np.testing.assert_array_equal(np.asarray(logp.dataobj),
                                      np.asarray(expected.dataobj, dtype=np.float64).astype(np.float32))
        z = np.asarray(nib.load(written / f"contrast-{contrast}_stat-z_statmap.nii.gz").dataobj)
        fwe = np.asarray(nib.load(written / f"contrast-{contrast}_stat-z_desc-fweCorrected_statmap.nii.gz").dataobj)
        kept = np.asarray(expected.dataobj) > -np.log10(0.5)  # --alpha 0.5: 6 subjects show little
        np.testing.assert_array_equal(fwe, np.where(kept, z, 0))
        assert 0 < kept.sum() < (z != 0).sum()  # some voxels kept, some not (4 and 5 of 440)
    settings = json.loads((out / "app_provenance.json").read_text())["options"]
    assert (settings["n_perm"], settings["random_state"]) == (60, 5)


@pytest.mark.parametrize("extra, level, words", [
    (["--n-perm", "10"], "participant", "the analysis level 'participant' stops before them"),
    (["--random-state", "0"], "dataset", "--random-state set(s) the permutation test and group_level/'s"),
    (["--random-state", "0", "--layout", "glm"], "dataset", "--random-state seeds the permutation test"),
    (["--n-perm", "-3"], "dataset", "--n-perm takes a number of permutations >= 0"),
])
def test_n_perm_misuse_is_refused_before_anything_is_read(one_run, tmp_path, capsys, extra, level, words):
    out = tmp_path / "out"
    code = main(["app", str(one_run[0].root), str(out), level, "--model", str(EXAMPLES / "one_sample.json"),
                 *extra, "--cluster", "none"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert not out.exists()


def test_n_perm_needs_a_dataset_glm_node(one_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert _app(one_run, out, "--n-perm", "10", "--cluster", "none") == 2  # RUN_MODEL: one run node
    err = capsys.readouterr().err
    assert "the analysis level 'run' stops before them" in err
    ds, _ = one_run
    model = tmp_path / "meta.json"
    subject = {"Level": "Dataset", "Name": "all", "GroupBy": ["contrast"], "Model": {"X": [1], "Type": "meta"},
               "DummyContrasts": {"Test": "t"}}
    model.write_text(json.dumps({**RUN_MODEL, "Nodes": [*RUN_MODEL["Nodes"], subject]}))
    code = main(["app", str(ds.root), str(out), "dataset", "--model", str(model), "--n-perm", "10",
                 "--cluster", "none"])
    assert code == 2 and "Dataset nodes of Type 'glm'; this model has none" in capsys.readouterr().err
    assert not out.exists()


# -- --layout glm|both: the derivatives/glm layout ----------------------------------------------


@pytest.fixture(scope="module")
def three_subjects(tmp_path_factory):
    root = tmp_path_factory.mktemp("app_layout")
    ds = make_synthetic_bids(root / "ds", n_subjects=3, n_runs=1, size="tiny", seed=4)
    return root, ds


def _load(path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def test_layout_both_writes_the_glm_layout_as_second_level_does(three_subjects, tmp_path):
    root, ds = three_subjects
    out = tmp_path / "out"
    code = main(["app", str(ds.root), str(out), "dataset", "--model", str(EXAMPLES / "one_sample.json"),
                 "--layout", "both", "--cluster", "none", "--no-progress", "--store", str(root / "store.zarr")])
    assert code == 0
    # first_level/: the subject node's fixed effects, under chunkglm's names
    for subject in ("01", "02", "03"):
        for stat, fitlins_stat in (("effect", "effect"), ("variance", "variance"), ("t", "t")):
            ours = out / f"first_level/sub-{subject}/sub-{subject}_task-main_contrast-aMinusB_stat-{stat}.nii.gz"
            theirs = out / f"node-subject/sub-{subject}/sub-{subject}_contrast-aMinusB_stat-{fitlins_stat}_statmap.nii.gz"
            np.testing.assert_array_equal(_load(ours), _load(theirs))
        assert (out / f"first_level/sub-{subject}/sub-{subject}_task-main_contrast-a_stat-z.nii.gz").is_file()
        sidecar = json.loads((out / f"first_level/sub-{subject}/sub-{subject}_task-main_glm.json").read_text())
        assert sidecar["AnalysisLevel"] == "first_level" and sorted(sidecar["Contrasts"]) == ["a", "aMinusB", "b"]
    # group_level/: what save_group_derivatives writes for the same group model, one per contrast, merged
    sidecar = json.loads((out / "group_level/group_glm.json").read_text())
    assert sorted(sidecar["Contrasts"]) == ["a", "aMinusB", "b"]
    assert sorted(sidecar["Corrections"]["FDR"]["Thresholds"]) == ["a", "aMinusB", "b"]
    for contrast in ("a", "aMinusB", "b"):
        maps = sorted(str(p) for p in out.glob(f"node-subject/sub-*/sub-*_contrast-{contrast}_stat-effect_statmap.nii.gz"))
        model = SecondLevelModel().fit(maps, design_matrix=pd.DataFrame({"intercept": [1.0] * 3}))
        direct = tmp_path / f"direct_{contrast}"
        save_group_derivatives(model, {contrast: np.array([1.0])}, direct)
        for name in (f"group_contrast-{contrast}_stat-t.nii.gz", f"group_contrast-{contrast}_stat-z.nii.gz",
                     f"group_contrast-{contrast}_fdr-corrected.nii.gz", f"group_contrast-{contrast}_fwe-corrected.nii.gz",
                     "group_mask.nii.gz"):
            np.testing.assert_array_equal(_load(out / "group_level" / name), _load(direct / "group_level" / name))
        direct_sidecar = json.loads((direct / "group_level/group_glm.json").read_text())
        assert sidecar["Contrasts"][contrast] == direct_sidecar["Contrasts"][contrast]
        assert sidecar["Corrections"]["FWE"]["Thresholds"][contrast] == \
            direct_sidecar["Corrections"]["FWE"]["Thresholds"][contrast]
        np.testing.assert_array_equal(_load(out / "group_level" / f"group_contrast-{contrast}_stat-t.nii.gz"),
                                      _load(out / f"node-dataset/contrast-{contrast}_stat-t_statmap.nii.gz"))
    assert _validator_errors(out) == []


def test_layout_glm_alone_leaves_no_fitlins_files(three_subjects, tmp_path):
    root, ds = three_subjects
    out = tmp_path / "out"
    code = main(["app", str(ds.root), str(out), "dataset", "--model", str(EXAMPLES / "one_sample.json"),
                 "--layout", "glm", "--alpha", "0.1", "--n-perm", "20", "--random-state", "1", "--cluster", "none",
                 "--no-progress", "--no-reports", "--store", str(root / "store.zarr")])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [".bidsignore", "app_provenance.json", "dataset_description.json",
                                                    "first_level", "group_level"]
    sidecar = json.loads((out / "group_level/group_glm.json").read_text())
    assert sidecar["Corrections"]["FDR"]["Alpha"] == 0.1  # --alpha reaches the corrections
    # --n-perm: the permutation maps and FWE method of the glm layout, as second-level --n-perm writes them
    fwe = sidecar["Corrections"]["FWE"]
    assert fwe["Method"] == {"a": "permutation max-T", "aMinusB": "permutation max-T", "b": "permutation max-T"}
    assert fwe["Permutation"]["NumberOfPermutations"] == 20 and fwe["Permutation"]["RandomState"] == 1
    assert all((out / f"group_level/group_contrast-{c}_stat-logpmaxt.nii.gz").is_file() for c in ("a", "b", "aMinusB"))
    outputs = json.loads((out / "app_provenance.json").read_text())["outputs"]
    assert outputs and all(o.startswith(("first_level/", "group_level/")) for o in outputs)


def test_layout_glm_gives_each_dataset_glm_node_its_folder(tmp_path):
    # group_comparisons.json: three Dataset glm nodes (one-sample, age covariate, two groups) on the
    # subject maps: group_level/node-<node>/ each, with its own design, mask and sidecar
    ds = make_synthetic_bids(tmp_path / "ds", n_subjects=4, n_runs=1, size="tiny", seed=6)
    (ds.root / "participants.tsv").write_text("participant_id\tage\tgroup\nsub-01\t45\tcontrol\n"
                                              "sub-02\t53\tpatient\nsub-03\t37\tpatient\nsub-04\t29\tcontrol\n")
    out = tmp_path / "out"
    code = main(["app", str(ds.root), str(out), "dataset", "--model", str(EXAMPLES / "group_comparisons.json"),
                 "--layout", "both", "--cluster", "none", "--no-progress", "--no-reports",
                 "--store", str(tmp_path / "store.zarr")])
    assert code == 0
    group = out / "group_level"
    assert sorted(p.name for p in group.iterdir()) == ["node-age", "node-dataset", "node-groups"]
    # pybids names a node's contrasts after their input's (a_age): glm_label camelCases them
    expected = {"dataset": ["a", "aMinusB", "b"], "age": ["aAge", "aMeanAndAge"], "groups": ["aMinusBControlVsPatient"]}
    columns = {"dataset": ["intercept"], "age": ["intercept", "age"], "groups": ["group.control", "group.patient"]}
    for node, contrasts in expected.items():
        sidecar = json.loads((group / f"node-{node}/group_glm.json").read_text())
        assert sidecar["Model"]["Node"] == node and sorted(sidecar["Contrasts"]) == contrasts
        design = pd.read_csv(group / f"node-{node}/group_design-matrix.tsv", sep="\t")
        assert list(design.columns) == columns[node]
        assert (group / f"node-{node}/group_mask.nii.gz").is_file()
        for contrast in contrasts:
            stat = "F" if contrast == "aMeanAndAge" else "t"
            ours = group / f"node-{node}/group_contrast-{contrast}_stat-{stat}.nii.gz"
            # the same map fitlins' layout holds (fitlins' rule lower-cases inside words: aMeanandage)
            theirs = [p for p in out.glob(f"node-{node}/contrast-*_stat-{stat}_statmap.nii.gz")
                      if p.name.split("_")[0].lower() == f"contrast-{contrast}".lower()]
            assert len(theirs) == 1, (node, contrast, theirs)
            np.testing.assert_array_equal(_load(ours), _load(theirs[0]))
            assert (group / f"node-{node}/group_contrast-{contrast}_stat-z.nii.gz").is_file()
    assert _validator_errors(out) == []


def _validator_errors(folder) -> list:
    """bids-validator-deno (test extra), offline, as tests/test_bids_validator.py runs it."""
    validator = pytest.importorskip("bids_validator_deno")
    from deno import find_deno_bin

    bundle = os.path.join(os.path.dirname(validator.__file__), "bids-validator.js")
    done = subprocess.run([os.fsdecode(find_deno_bin()), "run", "--no-prompt", "--deny-net", "--allow-read",
                           "--allow-env", bundle, str(folder), "--format", "json"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "DENO_NO_UPDATE_CHECK": "1"})
    assert done.stdout.startswith("{"), done.stderr
    issues = json.loads(done.stdout)["issues"]["issues"]
    return [f"{i['code']} {i.get('location', '')}" for i in issues if i["severity"] == "error"]


# -- HTML reports ----------------------------------------------------------------------------------


def test_a_report_page_per_run_and_node_group_and_an_index(three_subjects, tmp_path):
    root, ds = three_subjects
    out = tmp_path / "out"
    code = main(["app", str(ds.root), str(out), "dataset", "--model", str(EXAMPLES / "one_sample.json"),
                 "--participant-label", "01", "02", "--cluster", "none", "--no-progress",
                 "--store", str(root / "store.zarr")])
    assert code == 0
    pages = sorted(p.relative_to(out / "reports").as_posix() for p in (out / "reports").rglob("*_report.html"))
    assert pages == ["node-dataset/dataset_report.html", "node-run/sub-01_task-main_run-1_report.html",
                     "node-run/sub-02_task-main_run-1_report.html", "node-subject/sub-01_report.html",
                     "node-subject/sub-02_report.html"]
    run = (out / "reports/node-run/sub-01_task-main_run-1_report.html").read_text()
    for heading in ("Design matrix", "Contrasts", "Mask", "Statistical maps", "Provenance"):
        assert f">{heading}<" in run, heading
    assert all(f">{name}<" in run for name in ("a", "b", "aMinusB", "task"))  # the F test too
    dataset = (out / "reports/node-dataset/dataset_report.html").read_text()
    assert "Second Level Model" in dataset and all(f">{name}<" in dataset for name in ("a", "b", "aMinusB"))
    assert "Fixed Effects" in (out / "reports/node-subject/sub-02_report.html").read_text()
    index = (out / "reports/index.html").read_text()
    assert all(f'href="{page}"' in index for page in pages)
    recorded = json.loads((out / "app_provenance.json").read_text())["outputs"]
    assert {f"reports/{page}" for page in pages} | {"reports/index.html"} <= set(recorded)
    no_reports = tmp_path / "no_reports"
    assert main(["app", str(ds.root), str(no_reports), "run", "--model", str(EXAMPLES / "one_sample.json"),
                 "--participant-label", "01", "--no-reports", "--cluster", "none", "--no-progress",
                 "--store", str(root / "store.zarr")]) == 0
    assert not (no_reports / "reports").exists()


def test_maps_for_the_workers_are_staged_in_the_store_folder_and_removed(three_subjects, tmp_path, monkeypatch):
    """The stores the fixed-effects (subject) and second-level (dataset) nodes stage for the
    workers lie in STORE/.scratch/ (the file system the workers read the cohort store from), not
    in the app process's TMPDIR, which a multi-node cluster's workers cannot see; nothing is left
    after the run, and a folder a killed run (a dead process) left there is removed."""
    import tempfile

    import chunkglm.cli.app as app_module
    import chunkglm.glm.stats_models.fixed_effects as fixed_effects
    import chunkglm.glm.stats_models.group_level as group_level
    import chunkglm.io.inputs as inputs
    from chunkglm.io.scratch import owned_name

    root, ds = three_subjects
    store, out, temp = root / "store.zarr", tmp_path / "out", tmp_path / "tmpdir"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # the app process's TMPDIR
    # a killed run's folder (named for this host and a pid no process holds), made once the store is there
    leftover = store / ".scratch" / owned_name("chunkglm-app-").replace(f"-{os.getpid()}-", "-999999999-")

    def converting(*args, convert=app_module.convert, **kwargs):
        done = convert(*args, **kwargs)
        (leftover / "store.zarr").mkdir(parents=True)
        return done

    monkeypatch.setattr(app_module, "convert", converting, raising=True)
    staged = []

    def spying(original):
        def write(table, roles, store_path, *args, **kwargs):
            staged.append((Path(store_path), sorted(p.name for p in temp.iterdir())))
            return original(table, roles, store_path, *args, **kwargs)
        return write

    monkeypatch.setattr(inputs, "write_maps_node", spying(inputs.write_maps_node))
    monkeypatch.setattr(fixed_effects, "write_maps_node", spying(fixed_effects.write_maps_node))
    monkeypatch.setattr(group_level, "write_maps_node", spying(group_level.write_maps_node))
    code = main(["app", str(ds.root), str(out), "dataset", "--model", str(EXAMPLES / "one_sample.json"),
                 "--cluster", "none", "--no-progress", "--no-reports", "--store", str(store)])
    assert code == 0
    # one fixed-effects store (the subject node), and the dataset node's store: one maps node per
    # group (input contrast a, b, aMinusB)
    assert len(staged) == 4
    for path, in_temp in staged:
        assert path.parent.parent.parent == store / ".scratch" and path.parent.parent.name.startswith("chunkglm-app-")
        assert not [name for name in in_temp if name.startswith("chunkglm-")]  # nothing staged in TMPDIR
    assert not (store / ".scratch").exists()  # the run's folder and the killed run's removed


def test_another_model_into_the_folder_is_refused_and_overwrite_replaces_it(one_run, tmp_path, capsys):
    """OUTPUT_DIR holds one analysis: the same model again is allowed; another model (here its run
    node renamed, so fitlins' node-<name>/ folder changes) is one line, nothing touched; --overwrite
    leaves only the new model's files. Before, node-run/ stayed beside node-other/ and a record
    describing the second model only."""
    ds, model = one_run
    out = tmp_path / "out"

    def files():
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
                if p.is_file() and "cohort.zarr" not in p.parts}

    assert _app(one_run, out, "--no-reports", "--cluster", "none") == 0
    before = files()
    assert EFFECT in before
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**RUN_MODEL, "Nodes": [{**RUN_MODEL["Nodes"][0], "Name": "other"}]}))
    command = ["app", str(ds.root), str(out), "run", "--model", str(other), "--no-reports", "--cluster", "none"]
    capsys.readouterr()
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "already holds another app analysis (app_provenance.json: " in err and "options.model:" in err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert files() == before
    assert main([*command, "--overwrite"]) == 0
    after = files()
    record = json.loads(after["app_provenance.json"])
    assert not [f for f in after if f.startswith("node-run/")]
    assert {f for f in after if f.startswith("node-")} == {f for f in record["outputs"] if f.startswith("node-")}
    assert any(f.startswith("node-other/") for f in after)
