"""Tests for chunkglm.cluster: config loading/validation and starting clusters."""

from __future__ import annotations

import os
import sys
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
    assert dict(cfg.storage) == {"backend": "auto", "options": {}, "retries": 5}
    assert available_configs() == ["gateway", "kubernetes", "local", "pbs", "sge", "slurm"]
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
    assert "Bundled configs: gateway, kubernetes, local, pbs, sge, slurm" in msg
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
    assert "available in this release: local, slurm, pbs, sge, gateway, kubernetes" in msg


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
def test_redact_hides_values_of_secret_keys_at_any_depth():
    assert redact({"x": 1, "secret": "s", "nested": [{"token": "t"}], "S3_Key": "k",
                   "password": None}) == {
        "x": 1, "secret": "***", "nested": [{"token": "***"}], "S3_Key": "***",
        "password": None}


def test_public_api():
    for name in ("start", "load_config", "ClusterConfig", "ClusterConfigError"):
        assert name in cluster_pkg.__all__


# ---------------------------------------------------------------- bundled configs
BUNDLED = ["gateway", "kubernetes", "local", "pbs", "sge", "slurm"]


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_config_loads_validates_and_is_commented(name):
    path = bundled_config_dir() / f"{name}.yaml"
    cfg = load_config(name)
    assert cfg.type == name and Path(cfg.source) == path
    assert (REPO / "cluster_configs" / f"{name}.yaml").read_bytes() == path.read_bytes()
    raw = yaml.safe_load(path.read_text())
    # every key of the backend's section is written out (and so documented)
    assert set(raw[name]) == set(cfg.options)
    comments = [line for line in path.read_text().splitlines() if "#" in line]
    assert len(comments) >= len(cfg.options)
    assert raw["storage"] == {"backend": "auto", "options": {}, "retries": 5}


# ---------------------------------------------------------------- jobqueue sections
@pytest.mark.parametrize("kind", ["slurm", "pbs", "sge"])
def test_jobqueue_defaults_and_processes_default_to_cores(kind):
    cfg = load_config({"type": kind, kind: {"cores": 8}})
    assert cfg.options["processes"] == 8  # one single-threaded worker per core
    assert cfg.options["memory"] == "16GiB" and cfg.options["walltime"] == "01:00:00"
    assert cfg.options["jobs"] == 1 and cfg.options["wait_timeout"] == 600
    assert ("resource_spec" in cfg.options) == (kind != "slurm")
    assert isinstance(cfg.options["job_extra_directives"], tuple)  # read-only


def test_the_slurm_test_config_shape_validates(tmp_path):
    options = {"cores": 1, "processes": 1, "memory": "2GiB", "walltime": "00:20:00",
               "interface": "lo", "jobs": 2, "local_directory": str(tmp_path / "w"),
               "log_directory": str(tmp_path / "logs"), "queue": None,
               "job_extra_directives": [],
               "scheduler_options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}
    cfg = load_config({"version": 1, "type": "slurm", "slurm": options, "adapt": None})
    assert cfg.options["jobs"] == 2 and cfg.options["interface"] == "lo"
    assert dict(cfg.options["scheduler_options"]) == options["scheduler_options"]


@pytest.mark.parametrize("key, value, expected", [
    ("cores", "four", "expected a positive integer: cores per job"),
    ("cores", 0, "it must be >= 1"),
    ("memory", "lots", 'expected the memory of one job, such as "16GiB"'),
    ("walltime", "1h", 'write it as "HH:MM:SS"'),
    ("walltime", 3600, 'expected a time limit "HH:MM:SS"'),
    ("job_extra_directives", "--qos=short", "expected a list of strings of extra scheduler"),
    ("job_script_prologue", [1, 2], "expected a list of strings of shell lines"),
    ("scheduler_options", "127.0.0.1", "expected a mapping of distributed.Scheduler arguments"),
    ("jobs", -1, "it must be >= 0"),
    ("wait_timeout", 0, "it must be >= 1"),
])
def test_jobqueue_value_errors_name_key_and_file(tmp_path, key, value, expected):
    path = write_yaml(tmp_path / "slurm.yaml", {"type": "slurm", "slurm": {key: value}})
    msg = error_of(str(path))
    assert f"Invalid value for 'slurm.{key}' in {path}: received {value!r}" in msg
    assert expected in msg and "Fix the value, for example" in msg


def test_jobqueue_unknown_key_processes_above_cores_and_resource_spec_on_slurm():
    msg = error_of({"type": "slurm", "slurm": {"partition": "short"}})
    assert "Unknown key 'partition' in section 'slurm' of <dict>" in msg
    assert "cores, processes, memory, walltime, queue, account" in msg
    msg = error_of({"type": "pbs", "pbs": {"cores": 2, "processes": 4}})
    assert "received processes=4 and cores=2" in msg and "Lower processes or raise cores" in msg
    assert "Unknown key 'resource_spec' in section 'slurm'" in error_of(
        {"type": "slurm", "slurm": {"resource_spec": "x"}})


def test_env_overrides_reach_every_backend(monkeypatch):
    monkeypatch.setenv("CHUNKGLM_CLUSTER__SLURM__CORES", "4")
    monkeypatch.setenv("CHUNKGLM_CLUSTER__SLURM__JOB_EXTRA_DIRECTIVES", "['--qos=long']")
    monkeypatch.setenv("CHUNKGLM_CLUSTER__GATEWAY__WORKERS", "7")
    monkeypatch.setenv("CHUNKGLM_CLUSTER__STORAGE__BACKEND", "fsspec")
    cfg = load_config("slurm")
    assert cfg.options["cores"] == 4 and cfg.options["processes"] == 4
    assert cfg.options["job_extra_directives"] == ("--qos=long",)
    assert cfg.storage["backend"] == "fsspec"
    assert load_config("gateway").options["workers"] == 7
    monkeypatch.setenv("CHUNKGLM_CLUSTER__TYPE", "sge")
    assert load_config("slurm").type == "sge"  # the type too, from any file
    monkeypatch.setenv("CHUNKGLM_CLUSTER__SLURM__CORES", "many")
    msg = error_of("slurm")
    assert "overridden by environment variable CHUNKGLM_CLUSTER__SLURM__CORES" in msg


def test_sections_of_other_backends_are_validated_too():
    msg = error_of({"type": "local", "slurm": {"cors": 2}})
    assert "Unknown key 'cors' in section 'slurm'" in msg


# ---------------------------------------------------------------- gateway section
def test_gateway_defaults_and_required_address():
    cfg = load_config({"type": "gateway", "gateway": {"address": "https://gw.example/"}})
    assert cfg.options["address"] == "https://gw.example"
    assert dict(cfg.options["auth"]) == {"type": "basic", "username": None}
    assert cfg.options["workers"] == 2 and cfg.options["shutdown_on_close"] is True
    assert "Missing key 'address' in section 'gateway'" in error_of({"type": "gateway"})
    assert "it must start with http:// or https://" in error_of(
        {"type": "gateway", "gateway": {"address": "gw.example:8000"}})
    msg = error_of({"type": "gateway", "gateway": {"address": "http://x", "auth": {"type": "ldap"}}})
    assert "Invalid value for 'gateway.auth.type'" in msg
    assert "choose one of: none, basic, kerberos, jupyterhub" in msg
    assert "Unknown key 'user' in section 'gateway.auth'" in error_of(
        {"type": "gateway", "gateway": {"address": "http://x", "auth": {"user": "a"}}})


@pytest.mark.parametrize("secret_path", [
    ("gateway", "auth", "password"), ("gateway", "cluster_options", "api_token"),
    ("gateway", "password"),
])
def test_a_gateway_secret_in_the_file_is_an_error_that_never_shows_it(tmp_path, secret_path):
    data = {"type": "gateway", "gateway": {"address": "https://gw.example"}}
    node = data
    for key in secret_path[:-1]:
        node = node.setdefault(key, {})
    node[secret_path[-1]] = "hunter2-secret-value"
    path = write_yaml(tmp_path / "gw.yaml", data)
    msg = error_of(str(path))
    assert f"Secret-looking key '{'.'.join(secret_path)}' in {path}" in msg
    assert "DASK_GATEWAY__AUTH__KWARGS__PASSWORD" in msg and "JUPYTERHUB_API_TOKEN" in msg
    assert "hunter2" not in msg
    with pytest.raises(ClusterConfigError) as info:
        start(str(path), verbose=False)
    assert "hunter2" not in str(info.value)


def test_a_secret_given_through_chunkglm_variables_is_refused_too(monkeypatch):
    monkeypatch.setenv("CHUNKGLM_CLUSTER__GATEWAY__AUTH__PASSWORD", "a: [b")
    msg = error_of({"type": "gateway", "gateway": {"address": "https://gw.example"}})
    assert "Secret-looking key 'gateway.auth.password'" in msg
    assert "environment variable CHUNKGLM_CLUSTER__GATEWAY__AUTH__PASSWORD" in msg
    assert "a: [b" not in msg


# ---------------------------------------------------------------- kubernetes section
def test_kubernetes_section_validation():
    cfg = load_config({"type": "kubernetes", "kubernetes": {
        "worker_command": "dask worker --nthreads 1", "resources": {"limits": {"cpu": 2}}}})
    assert cfg.options["worker_command"] == ("dask", "worker", "--nthreads", "1")
    assert dict(cfg.options["resources"]["limits"]) == {"cpu": "2", "memory": None}
    assert cfg.options["name"] == "chunkglm" and cfg.options["n_workers"] == 2

    def k8s(**options):
        return error_of({"type": "kubernetes", "kubernetes": options})

    assert "at most 53 lower-case letters" in k8s(name="My_Cluster")
    assert 'use a Kubernetes quantity such as "2", "500m" or "4Gi"' in k8s(
        resources={"requests": {"memory": "4 gigs"}})
    assert "Unknown key 'gpu' in section 'kubernetes.resources.limits'" in k8s(
        resources={"limits": {"gpu": 1}})
    assert "choose one of: ClusterIP, NodePort, LoadBalancer" in k8s(scheduler_service_type="Ingress")
    assert "the value of 'OMP_NUM_THREADS' is not a string" in k8s(env={"OMP_NUM_THREADS": 1})
    msg = k8s(env={"AWS_SECRET_ACCESS_KEY": "abc123"})
    assert "Secret-looking key 'kubernetes.env.AWS_SECRET_ACCESS_KEY'" in msg
    assert "Kubernetes Secret" in msg and "abc123" not in msg


# ---------------------------------------------------------------- storage section
def test_storage_section_defaults_validation_and_credentials():
    cfg = load_config({"storage": {"backend": "obstore",
                                   "options": {"endpoint_url": "http://127.0.0.1:9000",
                                               "region": "us-east-1"}, "retries": 0}})
    assert cfg.storage["backend"] == "obstore" and cfg.storage["retries"] == 0
    assert dict(cfg.storage["options"]) == {"endpoint_url": "http://127.0.0.1:9000",
                                            "region": "us-east-1"}
    with pytest.raises(TypeError):
        cfg.storage["backend"] = "fsspec"  # read-only
    assert "choose one of: auto, obstore, fsspec" in error_of({"storage": {"backend": "s3fs"}})
    assert "it must be >= 0" in error_of({"storage": {"retries": -1}})
    assert "Unknown key 'endpoint' in section 'storage'" in error_of({"storage": {"endpoint": "x"}})
    for key in ("key", "secret", "aws_secret_access_key", "token"):
        msg = error_of({"storage": {"options": {key: "AKIAXXXXSECRETVALUE"}}})
        assert f"Secret-looking key 'storage.options.{key}'" in msg
        assert "AWS_ACCESS_KEY_ID" in msg and "AWS_SECRET_ACCESS_KEY" in msg
        assert "AKIAXXXX" not in msg


# ---------------------------------------------------------------- starting
def test_expected_workers_per_backend():
    from chunkglm.cluster import expected_workers

    assert expected_workers(load_config("local")) == 0
    assert expected_workers(load_config({"type": "slurm", "slurm": {
        "cores": 4, "processes": 2, "jobs": 3}})) == 6
    assert expected_workers(load_config({"type": "slurm", "adapt": {"minimum": 2, "maximum": 8}})) == 2
    assert expected_workers(load_config("gateway")) == 2
    assert expected_workers(load_config({"type": "kubernetes", "kubernetes": {"n_workers": 5}})) == 5


def test_repr_shows_options_and_storage():
    text = repr(load_config({"type": "slurm", "slurm": {"cores": 2}}))
    assert text.startswith("ClusterConfig(type='slurm', options={'cores': 2, 'processes': 2")
    assert "storage={'backend': 'auto', 'options': {}, 'retries': 5}" in text


@pytest.mark.parametrize("kind, module, package", [
    ("slurm", "dask_jobqueue", "dask-jobqueue"),
    ("gateway", "dask_gateway", "dask-gateway"),
    ("kubernetes", "dask_kubernetes.operator", "dask-kubernetes"),
])
def test_a_missing_backend_library_names_the_pip_package(monkeypatch, kind, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    config = {"type": kind, "gateway": {"address": "http://127.0.0.1:1"}}
    with pytest.raises(ClusterConfigError) as info:
        start(config, verbose=False)
    msg = str(info.value)
    assert f"Cluster type '{kind}' (from <dict>) needs the Python package '{package}'" in msg
    assert f"pip install {package}" in msg
