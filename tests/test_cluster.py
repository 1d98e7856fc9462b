"""Tests for chunkglm.cluster: config loading/validation and starting clusters."""

from __future__ import annotations

import os
import time
from pathlib import Path

import dask.array as da
import numpy as np
import psutil
import pytest
import yaml
from distributed.core import Status
from distributed.deploy.adaptive import Adaptive

import chunkglm.cluster as cluster_pkg
from chunkglm.cluster import (
    ClusterConfig,
    ClusterConfigError,
    available_configs,
    default_memory_limit,
    default_n_workers,
    load_config,
    local_cluster_kwargs,
    redact,
    resolve_config_path,
    start,
    total_memory,
    usable_cores,
)
from chunkglm.cluster.config import bundled_config_dir

GiB = 2**30
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """Isolate every test from the caller's CHUNKGLM_* variables and cwd."""
    for name in list(os.environ):
        if name.startswith("CHUNKGLM_CLUSTER"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write_yaml(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def error_of(config, **kwargs) -> str:
    with pytest.raises(ClusterConfigError) as info:
        load_config(config, **kwargs)
    return str(info.value)


def listening(pid: int) -> list:
    conns = psutil.Process(pid).net_connections(kind="inet")
    return [c.laddr for c in conns if c.status == psutil.CONN_LISTEN]


def wait_gone(pids, timeout=15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    return alive


# ---------------------------------------------------------------- real cluster
def test_real_local_cluster_computes_binds_localhost_and_shuts_down(capsys):
    with start(n_workers=2, dashboard_address=":0") as client:
        x = np.arange(200_000, dtype="f8").reshape(400, 500)
        total = da.from_array(x, chunks=(100, 100)).sum().compute()
        assert total == pytest.approx(x.sum())

        pids = sorted(client.run(os.getpid).values())
        assert len(pids) == 2 and os.getpid() not in pids

        cluster = client.cluster
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        sched_port = int(cluster.scheduler_address.rsplit(":", 1)[1])
        dash_port = cluster.scheduler.http_server.port
        ours = [a for a in listening(os.getpid()) if a.port in (sched_port, dash_port)]
        assert {a.port for a in ours} == {sched_port, dash_port}
        assert {a.ip for a in ours} == {"127.0.0.1"}
        for pid in pids:
            assert {a.ip for a in listening(pid)} == {"127.0.0.1"}
        for info in client.scheduler_info(n_workers=-1)["workers"].values():
            assert info["nanny"].startswith("tcp://127.0.0.1:")

    out, err = capsys.readouterr()
    assert out == ""
    assert f"Scheduler: tcp://127.0.0.1:{sched_port}" in err
    assert f"Dashboard: http://127.0.0.1:{dash_port}/status" in err
    assert cluster.status == Status.closed
    assert wait_gone(pids) == []


def test_close_also_closes_cluster_and_verbose_false_is_silent(capsys):
    client = start(n_workers=1, processes=False, dashboard_address=None, verbose=False)
    cluster = client.cluster
    assert client.submit(sum, [1, 2, 3]).result() == 6
    client.close()
    assert cluster.status == Status.closed
    assert capsys.readouterr() == ("", "")


def test_adapt_is_applied():
    config = {"type": "local", "adapt": {"minimum": 1, "maximum": 2}}
    with start(config, n_workers=1, processes=False, dashboard_address=None,
               verbose=False) as client:
        adaptive = client.cluster._adaptive
        assert isinstance(adaptive, Adaptive)
        assert (adaptive.minimum, adaptive.maximum) == (1, 2)


# ---------------------------------------------------------------- sizing
def test_default_sizing_is_one_worker_per_core_and_80_percent_of_ram():
    assert default_n_workers(8) == 8
    assert default_n_workers(8, threads_per_worker=2) == 4
    assert default_n_workers(1, threads_per_worker=4) == 1
    assert default_memory_limit(10 * GiB, 4) == int(10 * GiB * 0.8) // 4

    kwargs = local_cluster_kwargs(load_config(), cores=6, memory=60 * 10**9)
    assert kwargs["n_workers"] == 6
    assert kwargs["threads_per_worker"] == 1
    assert kwargs["processes"] is True
    assert kwargs["memory_limit"] == 8 * 10**9
    assert kwargs["host"] == "127.0.0.1"
    assert kwargs["dashboard_address"] == "127.0.0.1:8787"
    assert "local_directory" not in kwargs
    threads = local_cluster_kwargs(load_config({"local": {"processes": False}}), cores=2)
    assert "host" not in threads  # in-process workers: inproc://, no TCP listener


def test_sizing_respects_explicit_values_and_adapt_maximum(tmp_path):
    cfg = load_config({"local": {"n_workers": 3, "memory_limit": "4GiB",
                                 "local_directory": str(tmp_path)}})
    kwargs = local_cluster_kwargs(cfg, cores=64, memory=10**12)
    assert (kwargs["n_workers"], kwargs["memory_limit"]) == (3, 4 * GiB)
    assert kwargs["local_directory"] == str(tmp_path)
    cfg = load_config({"adapt": {"minimum": 1, "maximum": 8}})
    kwargs = local_cluster_kwargs(cfg, cores=4, memory=80 * 10**9)
    assert kwargs["n_workers"] == 4
    assert kwargs["memory_limit"] == 8 * 10**9  # 80% shared by up to 8 workers


def test_measured_cores_and_memory():
    assert usable_cores() == len(os.sched_getaffinity(0))
    assert 0 < total_memory() <= psutil.virtual_memory().total


@pytest.mark.parametrize("given, expected", [
    ("4GiB", 4 * GiB), ("4 GB", 4 * 10**9), ("4000MB", 4 * 10**9),
    (4_000_000_000, 4 * 10**9), (None, None),
])
def test_memory_sizes(given, expected):
    assert load_config({"local": {"memory_limit": given}}).options["memory_limit"] == expected


@pytest.mark.parametrize("given, expected", [
    (":0", "127.0.0.1:0"), ("127.0.0.1:8787", "127.0.0.1:8787"),
    ("localhost:9000", "127.0.0.1:9000"), (8788, "127.0.0.1:8788"), (None, None),
])
def test_dashboard_address_is_forced_to_loopback(given, expected):
    cfg = load_config({"local": {"dashboard_address": given}})
    assert cfg.options["dashboard_address"] == expected


# ---------------------------------------------------------------- loading
def test_default_config_is_the_bundled_local_yaml():
    cfg = load_config()
    assert isinstance(cfg, ClusterConfig)
    assert cfg.type == "local" and cfg.adapt is None
    assert Path(cfg.source) == bundled_config_dir() / "local.yaml"
    assert dict(cfg.options) == {
        "n_workers": None, "threads_per_worker": 1, "memory_limit": None,
        "dashboard_address": "127.0.0.1:8787", "processes": True,
        "local_directory": None,
    }
    assert "local" in available_configs()
    with pytest.raises(TypeError):
        cfg.options["n_workers"] = 3  # read-only
    with pytest.raises(AttributeError):
        cfg.type = "slurm"  # frozen


def test_repository_symlink_points_at_bundled_configs():
    link = REPO / "cluster_configs"
    assert link.is_symlink()
    assert link.resolve() == bundled_config_dir()


def test_name_resolution_order(tmp_path, monkeypatch):
    bundled = bundled_config_dir() / "local.yaml"
    assert resolve_config_path("local") == bundled

    local_dir = write_yaml(tmp_path / "cluster_configs" / "local.yaml", {"type": "local"})
    assert resolve_config_path("local") == local_dir

    env_dir = tmp_path / "site"
    env_file = write_yaml(env_dir / "local.yaml", {"type": "local"})
    monkeypatch.setenv("CHUNKGLM_CLUSTER_CONFIGS", str(env_dir))
    assert resolve_config_path("local") == env_file

    as_path = write_yaml(tmp_path / "local", {"type": "local"})
    assert resolve_config_path("local") == as_path
    assert load_config(str(as_path)).source == str(as_path)
    assert load_config(as_path).source == str(as_path)


def test_dict_config_is_not_mutated():
    given = {"type": "local", "local": {"n_workers": 2}}
    cfg = load_config(given, overrides={"n_workers": 1})
    assert cfg.source == "<dict>" and cfg.options["n_workers"] == 1
    assert given == {"type": "local", "local": {"n_workers": 2}}


# ---------------------------------------------------------------- errors
def test_unresolvable_name_lists_places_searched_and_bundled_names(tmp_path):
    msg = error_of("no-such-cluster")
    assert "'no-such-cluster' was not found" in msg
    assert str(tmp_path / "cluster_configs" / "no-such-cluster.yaml") in msg
    assert str(bundled_config_dir() / "no-such-cluster.yaml") in msg
    assert "CHUNKGLM_CLUSTER_CONFIGS" in msg
    assert "Bundled configs: local" in msg
    with pytest.raises(ClusterConfigError, match="no-such-cluster"):
        start("no-such-cluster")
    assert issubclass(ClusterConfigError, ValueError)


def test_unknown_key_names_key_file_and_allowed_keys(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"type": "local", "local": {"nworkers": 2}})
    msg = error_of(str(path))
    assert "Unknown key 'nworkers' in section 'local'" in msg
    assert str(path) in msg
    assert ("Allowed keys: n_workers, threads_per_worker, memory_limit, "
            "dashboard_address, processes, local_directory") in msg

    msg = error_of({"type": "local", "workers": 2})
    assert "Unknown key 'workers' in the top level of <dict>" in msg
    assert "version, type, local, slurm" in msg

    msg = error_of({"adapt": {"maximum": 2, "max": 3}})
    assert "Unknown key 'max' in section 'adapt'" in msg
    assert "Allowed keys: minimum, maximum" in msg


@pytest.mark.parametrize("key, value, received, expected", [
    ("n_workers", "four", "received 'four' (str)", "expected a positive integer"),
    ("n_workers", True, "received True (bool)", "expected a positive integer"),
    ("n_workers", 0, "received 0 (int)", "it must be >= 1"),
    ("threads_per_worker", 1.5, "received 1.5 (float)", "expected a positive integer"),
    ("memory_limit", "lots", "received 'lots' (str)", 'expected a memory size per worker such as "4GiB"'),
    ("processes", "yes", "received 'yes' (str)", "expected true (worker processes)"),
    ("dashboard_address", "0.0.0.0:8787", "received '0.0.0.0:8787' (str)", "listens on 127.0.0.1 only"),
    ("dashboard_address", "127.0.0.1:http", "received '127.0.0.1:http' (str)", "the port must be an integer"),
])
def test_wrong_value_type_names_key_value_and_expected(tmp_path, key, value, received, expected):
    path = write_yaml(tmp_path / "c.yaml", {"type": "local", "local": {key: value}})
    msg = error_of(str(path))
    assert f"Invalid value for 'local.{key}' in {path}" in msg
    assert received in msg
    assert expected in msg
    assert "Fix the value, for example" in msg


def test_unknown_type_lists_known_backends():
    msg = error_of({"type": "slurmm"})
    assert "Invalid value for 'type' in <dict>: received 'slurmm' (str)" in msg
    assert "expected one of: local, slurm, pbs, sge, gateway, kubernetes" in msg
    assert "available in this release: local" in msg


def test_version_section_and_adapt_errors(tmp_path):
    assert "expected the integer 1" in error_of({"version": 2})
    assert "received 5 (int); expected a mapping of local options" in error_of({"local": 5})
    assert "Missing key 'maximum' in section 'adapt'" in error_of({"adapt": {"minimum": 1}})
    msg = error_of({"adapt": {"minimum": 3, "maximum": 2}})
    assert "received minimum=3 and maximum=2; expected minimum <= maximum" in msg
    bad = write_yaml(tmp_path / "bad.yaml", "type: local\nlocal: [1, 2\n")
    assert f"Could not parse cluster config {bad}, line" in error_of(str(bad))
    empty = write_yaml(tmp_path / "empty.yaml", "")
    assert "received NoneType" in error_of(str(empty))
    assert "received int" in error_of(3)


@pytest.mark.parametrize("kind", ["slurm", "pbs", "sge", "gateway", "kubernetes"])
def test_known_but_unavailable_backend_loads_but_does_not_start(kind):
    cfg = load_config({"type": kind, kind: {"cores": 4}})
    assert cfg.type == kind and dict(cfg.options) == {"cores": 4}
    with pytest.raises(ClusterConfigError) as info:
        start({"type": kind, kind: {"cores": 4}}, verbose=False)
    msg = str(info.value)
    assert f"Cluster type '{kind}' (from <dict>) is not available in this version" in msg
    assert "available: local" in msg
    assert "Use `type: local`" in msg


# ---------------------------------------------------------------- environment
def test_env_overrides_apply_and_parse_yaml(monkeypatch, tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"type": "local", "local": {"n_workers": 3,
                                                                      "memory_limit": "1GiB"}})
    monkeypatch.setenv("CHUNKGLM_CLUSTER__TYPE", "local")
    monkeypatch.setenv("CHUNKGLM_CLUSTER__LOCAL__N_WORKERS", "1")
    monkeypatch.setenv("CHUNKGLM_CLUSTER__LOCAL__MEMORY_LIMIT", "null")
    monkeypatch.setenv("CHUNKGLM_CLUSTER__LOCAL__PROCESSES", "false")
    monkeypatch.setenv("CHUNKGLM_CLUSTER__ADAPT__MAXIMUM", "4")
    cfg = load_config(str(path))
    assert cfg.options["n_workers"] == 1
    assert cfg.options["memory_limit"] is None
    assert cfg.options["processes"] is False
    assert cfg.adapt == (1, 4)
    # keyword overrides win over the environment
    assert load_config(str(path), overrides={"n_workers": 2}).options["n_workers"] == 2
    # an explicit environment mapping replaces os.environ
    assert load_config(str(path), environ={}).options["n_workers"] == 3


def test_env_overrides_are_validated_and_named(monkeypatch):
    monkeypatch.setenv("CHUNKGLM_CLUSTER__LOCAL__N_WORKERS", "four")
    msg = error_of(None)
    assert "Invalid value for 'local.n_workers'" in msg
    assert "overridden by environment variable CHUNKGLM_CLUSTER__LOCAL__N_WORKERS" in msg
    assert "received 'four' (str)" in msg
    monkeypatch.delenv("CHUNKGLM_CLUSTER__LOCAL__N_WORKERS")

    monkeypatch.setenv("CHUNKGLM_CLUSTER__LOCAL__NWORKERS", "2")
    msg = error_of(None)
    assert "Unknown key 'nworkers' in section 'local'" in msg
    assert "environment variable CHUNKGLM_CLUSTER__LOCAL__NWORKERS" in msg

    monkeypatch.delenv("CHUNKGLM_CLUSTER__LOCAL__NWORKERS")
    msg = error_of(None, overrides={"n_wrkers": 2})
    assert "Unknown key 'n_wrkers'" in msg and "start() keyword argument n_wrkers=" in msg


# ---------------------------------------------------------------- redaction
def test_secrets_are_redacted_in_repr_and_errors(monkeypatch):
    secret_cfg = {"type": "gateway",
                  "gateway": {"address": "https://gw.example", "password": "hunter2",
                              "auth": {"api_token": "tok-123", "S3_Key": "AKIA"}}}
    cfg = load_config(secret_cfg)
    text = repr(cfg)
    for secret in ("hunter2", "tok-123", "AKIA"):
        assert secret not in text
    assert "'password': '***'" in text and "https://gw.example" in text
    assert cfg.options["password"] == "hunter2"  # the value itself is kept

    with pytest.raises(ClusterConfigError) as info:
        start(secret_cfg, verbose=False)
    assert "hunter2" not in str(info.value)

    # secrets from the environment are kept verbatim, never parsed as YAML
    monkeypatch.setenv("CHUNKGLM_CLUSTER__GATEWAY__PASSWORD", "a: [b")
    assert load_config(secret_cfg).options["password"] == "a: [b"

    assert redact({"x": 1, "secret": "s", "nested": [{"token": "t"}]}) == {
        "x": 1, "secret": "***", "nested": [{"token": "***"}]}


def test_public_api():
    for name in ("start", "load_config", "ClusterConfig", "ClusterConfigError"):
        assert name in cluster_pkg.__all__
