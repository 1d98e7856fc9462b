"""The command line's conventions (issue 17, defect 1 and item 7): paths of every kind for every
command, one-line errors with exit status 2, one spelling per option across sub-commands, help
text and defaults for every option.

The commands run in this process (``chunkglm.cli.commands.main``) with ``--cluster none``: the
same code path as the ``chunkglm`` executable (tests/test_cli.py runs that as a subprocess),
without a 3-second interpreter start per call.
"""

from __future__ import annotations

import argparse
import json
import re

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from chunkglm.cli import commands
from chunkglm.cli._args import old_two_sided_values, split_list
from chunkglm.cli.commands import build_parser, main
from chunkglm.testing import make_synthetic_bids


@pytest.fixture(scope="module")
def bids3(tmp_path_factory):
    """Three subjects, one tiny run each."""
    return make_synthetic_bids(tmp_path_factory.mktemp("bids3"), n_subjects=3, size="tiny", seed=4)


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_relative_home_and_trailing_slash_paths_for_every_command(bids3, tmp_path, monkeypatch, capsys):
    """The README's commands with relative paths, ``~`` and trailing slashes (second-level crashed
    in ``relative_to`` after the whole computation and wrote no group_provenance.json)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "bids").symlink_to(bids3.root)

    code, out, err = _run(capsys, "convert", "bids/", "-o", "~/c.zarr/", "--cluster", "none",
                          "--subject", "01", "02", "03")
    assert code == 0, err
    store = tmp_path / "home" / "c.zarr"
    assert f"store: {store}" in out and (store / "zarr.json").is_file()
    assert not (tmp_path / "~").exists()

    (tmp_path / "home" / "my.yaml").write_text("version: 1\ntype: local\n")
    args = build_parser().parse_args(["convert", "in", "-o", "s", "--cluster", "~/my.yaml"])
    assert args.cluster == str(tmp_path / "home" / "my.yaml")
    code, out, err = _run(capsys, "info", "~/c.zarr/")
    assert code == 0 and "runs: 3" in out, err

    code, out, err = _run(capsys, "first-level", "~/c.zarr", "-o", "./fl/", "--task", "main",
                          "-c", "aMinusB=a - b", "--confounds", "trans_x", "csf", "--cluster", "none")
    assert code == 0, err
    assert (tmp_path / "fl" / "first_level" / "sub-03" / "sub-03_task-main_contrast-aMinusB_stat-z.nii.gz").is_file()

    code, out, err = _run(capsys, "second-level", "fl/", "-o", "group/", "--first-level-contrast", "aMinusB",
                          "--cluster", "none")
    assert code == 0, err
    record = json.loads((tmp_path / "group" / "group_level" / "group_provenance.json").read_text())
    assert "group_level/group_contrast-mean_stat-z.nii.gz" in record["outputs"]
    assert record["options"]["output_dir"] == str(tmp_path / "group")

    subjects = ("01", "02", "03")  # paths relative to the table's folder
    table = pd.DataFrame({
        "beta": [f"../fl/first_level/sub-{s}/sub-{s}_task-main_contrast-aMinusB_stat-effect.nii.gz"
                 for s in subjects],
        "varcope": [f"../fl/first_level/sub-{s}/sub-{s}_task-main_contrast-aMinusB_stat-variance.nii.gz"
                    for s in subjects]})
    (tmp_path / "tables").mkdir()
    table.to_csv(tmp_path / "tables" / "studies.tsv", sep="\t", index=False)
    code, out, err = _run(capsys, "meta", "--estimator", "DerSimonianLaird", "--table", "tables/studies.tsv",
                          "-o", "~/meta_out/", "--cluster", "none")
    assert code == 0, err
    assert (tmp_path / "home" / "meta_out" / "meta" / "provenance.json").is_file()

    grid = nib.load(bids3.runs[0].bold_path)
    rng = np.random.default_rng(0)
    maps = np.abs(rng.normal(size=(*grid.shape[:3], 2))).astype(np.float32)
    nib.save(nib.Nifti1Image(maps, grid.affine), tmp_path / "atlas.nii.gz")
    code, out, err = _run(capsys, "extract", "~/c.zarr/", "--maps", "atlas.nii.gz", "--atlas", "toy",
                          "-o", "ts/", "--cluster", "none", "--no-progress")
    assert code == 0, err
    assert len(list((tmp_path / "ts").glob("sub-*/func/*_desc-toy_timeseries.tsv"))) == 3

    code, out, err = _run(capsys, "report", "group/", "--height-control", "none", "--threshold", "2",
                          "--bg-img", "none")
    assert code == 0, err
    assert (tmp_path / "group" / "group_level").exists() and out.strip()

    code, out, err = _run(capsys, "to-nifti", "~/c.zarr", f"runs/{bids3.runs[0].name}", "back/run.nii.gz")
    assert code == 0 and (tmp_path / "back" / "run.nii.gz").is_file(), err
    code, out, err = _run(capsys, "verify", "~/c.zarr/")
    assert code == 0 and "clean" in out, err


def _one_line_error(code, err, command):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"chunkglm {command}: error: "), err
    assert "Traceback" not in err


def test_every_error_is_one_line_with_exit_status_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, "second-level", "absent/", "-o", "g", "--cluster", "none")
    _one_line_error(code, err, "second-level")
    assert str(tmp_path / "absent") in err  # says what was received
    # a usage error: one line (argparse printed its usage block first)
    with pytest.raises(SystemExit) as exit_:
        main(["first-level", "in", "--task", "main", "-c", "a=a", "--noise-model", "ar9"])
    _one_line_error(exit_.value.code, capsys.readouterr().err, "first-level")
    code, _, err = _run(capsys, "first-level", "in", "--task", "main", "-c", "a=a")
    _one_line_error(code, err, "first-level")
    assert "-o/--output-dir" in err
    # an environment error (the output folder is a file)
    (tmp_path / "file").write_text("x")
    code, _, err = _run(capsys, "first-level", "file", "-o", "file/out", "--task", "main", "-c", "a=a",
                        "--cluster", "none")
    _one_line_error(code, err, "first-level")
    # a multi-line message becomes one line; a defect is named as one, without a traceback
    def broken(args):
        raise RuntimeError("first line\nsecond line")

    parser = build_parser()
    monkeypatch.setattr(commands, "build_parser", lambda: _with_handler(parser, "info", broken))
    code, _, err = _run(capsys, "info", "x")
    _one_line_error(code, err, "info")
    assert "unexpected RuntimeError: first line; second line" in err and "CHUNKGLM_TRACEBACK=1" in err


def _with_handler(parser, command, func):
    parser._subparsers._group_actions[0].choices[command].set_defaults(func=func)
    return parser


# -- item 7: one spelling per option ------------------------------------------------------------


def _subparsers():
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices


def test_every_option_has_help_text_and_states_its_default():
    problems = []
    for name, sub in _subparsers().items():
        required = set((sub.get_default("_required") or {}).values())
        required |= {"/".join(a.option_strings) for group in sub._mutually_exclusive_groups if group.required
                     for a in group._group_actions}  # one of them is required
        formatter = sub._get_formatter()
        for action in sub._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            flags = "/".join(action.option_strings) or action.dest
            if not action.help:
                problems.append(f"{name} {flags}: no help")
                continue
            takes_value = action.option_strings and action.nargs != 0
            text = formatter._expand_help(action)
            if takes_value and not action.required and flags not in required and "default" not in text:
                problems.append(f"{name} {flags}: no default in {text!r}")
    assert not problems, "\n".join(problems)


def test_output_dir_everywhere_old_spellings_still_work(capsys):
    parser = build_parser()
    for command, old in (("convert", "--store"), ("first-level", "--out-dir"), ("second-level", "--out-dir"),
                         ("meta", "--out"), ("extract", "--out"), ("extract", "--out-dir"), ("demo", "--out")):
        sub = _subparsers()[command]
        flags = {s for a in sub._actions for s in a.option_strings}
        assert {"-o", "--output-dir"} <= flags, command
        assert not re.search(f"{old}\\b(?!-)", sub.format_help()), (command, old)  # hidden
        args = parser.parse_args([command, old, "/tmp/x"] + _minimal(command))
        assert args.output_dir == "/tmp/x"
        assert f"{old} is deprecated; use -o/--output-dir" in capsys.readouterr().err


def _minimal(command):
    return {"convert": ["in"], "first-level": ["in", "--task", "t", "-c", "a=a"], "second-level": ["in"],
            "meta": ["--estimator", "Hedges", "--table", "t"], "extract": ["--maps", "m", "--atlas", "a"], "demo": []}[command]


def test_one_spelling_for_sidedness_lists_confounds_and_cluster_threshold(capsys):
    parser = build_parser()
    for command, default in (("second-level", True), ("meta", True), ("report", False)):
        flags = {s for a in _subparsers()[command]._actions for s in a.option_strings}
        assert {"--two-sided", "--one-sided"} <= flags, command
        base = {"second-level": ["in"], "meta": ["--estimator", "Hedges", "--table", "t"],
                "report": ["d"]}[command]
        assert parser.parse_args([command, *base]).two_sided is default
        assert parser.parse_args([command, *base, "--one-sided"]).two_sided is False
        assert parser.parse_args([command, *base, "--two-sided"]).two_sided is True
    # meta's old --two-sided yes|no
    assert old_two_sided_values(["meta", "--two-sided", "no", "-o", "x"]) == ["meta", "--one-sided", "-o", "x"]
    assert old_two_sided_values(["meta", "--two-sided=yes"]) == ["meta", "--two-sided"]
    assert "--two-sided no is deprecated" in capsys.readouterr().err
    # space-separated lists, repeatable, commas too
    args = parser.parse_args(["first-level", "in", "--task", "t", "-c", "a=a", "b=b", "--subject", "01", "02",
                              "--subject", "03", "--confounds", "trans_x", "csf,rot_x"])
    assert args.subject == ["01", "02", "03"] and args.contrast == ["a=a", "b=b"]
    assert split_list(args.confounds) == ["trans_x", "csf", "rot_x"]
    assert parser.parse_args(["convert", "in", "--session", "1", "2"]).session == ["1", "2"]
    assert parser.parse_args(["meta", "--estimator", "Hedges", "--table", "t", "--correct", "fdr",
                              "bonferroni"]).correct == ["fdr", "bonferroni"]
    # --confounds in extract (old --confounds-columns kept)
    args = parser.parse_args(["extract", "--maps", "m", "--atlas", "a", "--confounds", "csf", "trans_x"])
    assert args.confounds == ["csf", "trans_x"]
    args = parser.parse_args(["extract", "--maps", "m", "--atlas", "a", "--confounds-columns", "csf,trans_x"])
    assert split_list(args.confounds) == ["csf", "trans_x"]
    # --cluster-threshold is a voxel count in second-level as in report; the p has its own flag
    args = parser.parse_args(["second-level", "in", "--cluster-threshold", "10", "--cluster-forming-p", "0.001"])
    assert (args.cluster_threshold, args.cluster_forming_p) == (10, 0.001)
    assert parser.parse_args(["report", "d", "--cluster-threshold", "10"]).cluster_threshold == 10
    capsys.readouterr()
    old = parser.parse_args(["second-level", "in", "--cluster-threshold", "0.001"])  # the old meaning
    assert (old.cluster_threshold, old.cluster_forming_p) == (0, 0.001)
    assert "--cluster-forming-p 0.001" in capsys.readouterr().err
    assert parser.parse_args(["second-level", "in", "--min-cluster-size", "5"]).cluster_threshold == 5
    with pytest.raises(SystemExit):
        parser.parse_args(["second-level", "in", "--cluster-threshold", "2.5"])
    assert "whole number" in capsys.readouterr().err


# -- item 8: a running scheduler, the local cluster's size ------------------------------------


def _subprocess_cli(*args, env=None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "chunkglm.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def test_commands_run_on_a_running_scheduler_given_by_flag_or_environment(tiny_bids, tmp_path):
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster:
        address = cluster.scheduler_address
        done = _subprocess_cli("convert", tiny_bids.root, "-o", tmp_path / "a.zarr", "--scheduler", address)
        assert done.returncode == 0, done.stderr
        assert f"Scheduler: {address} (running scheduler, 1 worker(s))" in done.stderr
        ran = list(cluster.scheduler.task_prefixes)  # one C-level copy: the scheduler runs in a thread
        assert any(p.startswith("convert") for p in ran), f"no conversion task ran on the scheduler: {ran}"
        # DASK_SCHEDULER_ADDRESS, when neither --scheduler nor --cluster is given
        done = _subprocess_cli("convert", tiny_bids.root, "-o", tmp_path / "b.zarr", "--no-progress",
                               env={"DASK_SCHEDULER_ADDRESS": address})
        assert done.returncode == 0 and f"Scheduler: {address}" in done.stderr, done.stderr
        assert cluster.scheduler.status.name == "running"  # the command left it running
        assert len(cluster.scheduler.workers) == 1
    for store in ("a.zarr", "b.zarr"):
        assert len(__import__("chunkglm").open_cohort(tmp_path / store).runs) == len(tiny_bids.runs)


def test_workers_sizes_the_local_cluster(tiny_bids, tmp_path, capsys, monkeypatch):
    done = _subprocess_cli("convert", tiny_bids.root, "-o", tmp_path / "c.zarr", "--workers", "1",
                           env={"CHUNKGLM_CLUSTER__LOCAL__DASHBOARD_ADDRESS": "127.0.0.1:0"})
    assert done.returncode == 0, done.stderr
    assert "(local, 1 worker" in done.stderr
    import dask

    monkeypatch.setitem(dask.config.config["distributed"]["comm"]["timeouts"], "connect", "1s")  # nothing listens
    for extra, message in ((["--workers", "0"], "--workers takes a number of workers >= 1; received 0"),
                           (["--workers", "2", "--cluster", "none"], "--cluster none runs in this process"),
                           (["--scheduler", "tcp://127.0.0.1:9", "--cluster", "local"], "not both"),
                           (["--scheduler", "tcp://127.0.0.1:9", "--workers", "2"], "has its own workers"),
                           (["--scheduler", "tcp://127.0.0.1:9"], "cannot reach the dask scheduler at "
                                                                  "tcp://127.0.0.1:9")):
        code, _, err = _run(capsys, "convert", tiny_bids.root, "-o", tmp_path / "d.zarr", *extra)
        _one_line_error(code, err, "convert")
        assert message in err, err
    assert not (tmp_path / "d.zarr").exists()


@pytest.mark.parametrize("argv, message", [
    (["convert", "in", "-o", "s", "--task-memory", "abc"], "argument --task-memory: a size such as"),
    (["convert", "in", "-o", "s", "--chunk-size", "-5"], "argument --chunk-size: a size such as"),
    (["first-level", "in", "-o", "o", "--task", "t", "-c", "a=a", "--high-pass", "-1"],
     "argument --high-pass: a number >= 0 is needed; received '-1'"),
    (["first-level", "in", "-o", "o", "--task", "t", "-c", "a=a", "--hrf-model", "nope"],
     "argument --hrf-model: invalid choice: 'nope'"),
    (["second-level", "in", "-o", "o", "--alpha", "5"], "argument --alpha: a p-value between 0 and 1"),
    (["second-level", "in", "-o", "o", "--smoothing-fwhm", "x"], "argument --smoothing-fwhm: a number is needed"),
    (["meta", "--estimator", "Hedges", "--table", "t", "-o", "o", "--n-iters", "0"], "argument --n-iters: a whole"),
    (["extract", "in", "--maps", "m", "--atlas", "a", "-o", "o", "--t-r", "0"], "argument --t-r: a number > 0"),
    (["report", "d", "--alpha", "0"], "argument --alpha: a p-value"),
    # a list option takes every value after it: the positional it swallowed is named as the cause
    (["second-level", "--mask", "m.nii.gz", "in", "-o", "o"], "input; --mask took every value after it: put the "
     "positional arguments first, or end the list with --"),
    (["second-level", "-o", "o"], "arguments are required: input (see"),
])
def test_a_bad_option_value_is_a_one_line_usage_error(argv, message, capsys):
    """Issue 18 item 8's user errors that the command line can tell at once (they were tracebacks or
    errors named as defects)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    _one_line_error(exit_.value.code, err, argv[0])
    assert message in err, err


def test_drift_model_none_and_convert_onto_a_file(tmp_path, capsys):
    args = build_parser().parse_args(["first-level", "in", "-o", "o", "--task", "t", "-c", "a=a",
                                      "--drift-model", "none"])
    assert args.drift_model is None
    (tmp_path / "afile").write_text("x")
    code, _, err = _run(capsys, "convert", tmp_path, "-o", tmp_path / "afile", "--cluster", "none")
    _one_line_error(code, err, "convert")
    assert "is an existing file; give a folder" in err


def test_a_library_message_is_printed_once_per_command(bids3, tmp_path, capsys):
    """nilearn prints "A 'modulation' column was found ..." for every subject's design (issue 17
    item 4: each third-party message at most once per command); other lines pass unchanged."""
    code, out, err = _run(capsys, "first-level", bids3.root, "-o", tmp_path / "fl", "--task", "main", "-c", "a=a",
                          "--cluster", "none", "--no-progress")
    assert code == 0, err
    assert out.count("A 'modulation' column was found") == 1, out
    assert f"derivatives: {tmp_path / 'fl'}" in out


def test_the_demo_summary_does_not_offer_a_closed_dashboard():
    """Issue 17 item 4: the demo printed the dashboard link after its cluster had shut down."""
    from chunkglm.cli.demo import dashboard_line

    link = "http://127.0.0.1:8787/status"
    assert dashboard_line(link, None) == f"closed with the demo's cluster (it was {link} while the demo ran)"
    assert dashboard_line(link, "tcp://127.0.0.1:8786") == f"{link} (the running scheduler's)"
    assert dashboard_line(None, None) == "none (no cluster)"
