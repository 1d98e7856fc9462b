"""The ``chunkglm`` command, run as users run it (a real subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys

import nibabel as nib
import numpy as np

import chunkglm


def _cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "chunkglm.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_convert_info_and_to_nifti(tiny_bids, tmp_path):
    store = tmp_path / "c.zarr"
    run = tiny_bids.runs[0]
    done = _cli("convert", tiny_bids.root, "-o", store, "--task", "main", "--subject", "01",
                "--cluster", "none")
    assert done.returncode == 0, done.stderr
    assert list(chunkglm.open_cohort(store).runs) == [run.name]

    info = _cli("info", store)
    assert info.returncode == 0 and f"runs/{run.name}  volumes={tiny_bids.n_volumes}  TR=2.0" in info.stdout

    out = tmp_path / "back.nii.gz"
    back = _cli("to-nifti", store, f"runs/{run.name}", out)
    assert back.returncode == 0, back.stderr
    mask = chunkglm.open_cohort(store).runs[run.name].grid.mask
    np.testing.assert_array_equal(nib.load(out).get_fdata(dtype=np.float32)[mask],
                                  np.asarray(nib.load(run.bold_path).dataobj, dtype=np.float32)[mask])


def test_convert_on_the_default_local_cluster_prints_the_dashboard(tiny_bids, tmp_path):
    env = {"CHUNKGLM_CLUSTER__LOCAL__N_WORKERS": "2",
           "CHUNKGLM_CLUSTER__LOCAL__DASHBOARD_ADDRESS": "127.0.0.1:0"}
    done = _cli("convert", tiny_bids.root, "-o", tmp_path / "c.zarr", env=env)
    assert done.returncode == 0, done.stderr
    assert "Dashboard: http://127.0.0.1:" in done.stderr
    assert f"[{len(tiny_bids.runs)}/{len(tiny_bids.runs)}]" in done.stderr


def test_errors_exit_2_with_a_message_and_no_traceback(tiny_bids, tmp_path):
    bad = _cli("convert", tiny_bids.root, "-o", tmp_path / "c.zarr", "--task", "rest", "--cluster", "none")
    assert bad.returncode == 2
    assert "chunkglm convert: error: no run under" in bad.stderr and "Traceback" not in bad.stderr
    missing = _cli("info", tmp_path / "absent.zarr")
    assert missing.returncode == 2 and "no cohort store" in missing.stderr


def test_a_broken_cluster_config_names_the_key(tiny_bids, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("version: 1\ntype: local\nlocal:\n  n_worker: 2\n")
    bad = _cli("convert", tiny_bids.root, "-o", tmp_path / "c.zarr", "--cluster", config)
    assert bad.returncode == 2, bad.stderr
    assert "n_worker" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "c.zarr").exists()


def test_chunk_mb_sets_the_chunk_size_and_excludes_chunk_size(tiny_bids, tmp_path):
    store = tmp_path / "c.zarr"
    done = _cli("convert", tiny_bids.root, "-o", store, "--chunk-mb", "0.05", "--cluster", "none")
    assert done.returncode == 0, done.stderr
    bold = next(iter(chunkglm.open_cohort(store).runs.values())).data().data
    n_time, blocks = bold.shape[0], bold.chunks[1]
    assert len(blocks) > 1 and max(blocks) * n_time * 4 <= 0.05 * 2**20
    both = _cli("convert", tiny_bids.root, "-o", tmp_path / "d.zarr", "--chunk-mb", "1",
                "--chunk-size", "1MiB", "--cluster", "none")
    assert both.returncode == 2 and "--chunk-mb" in both.stderr and "not both" in both.stderr
