"""Cluster backends with real components: dask-jobqueue job scripts, the
Kubernetes DaskCluster spec against the operator's CRD schema, a real
dask-gateway server on 127.0.0.1, and the dashboard of a running job.

Kubernetes itself cannot run on this machine: the spec is checked against the
OpenAPI schema of the DaskCluster CRD that dask-kubernetes ships, and starting
without cluster access must fail with a clear error.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dask.array as da
import nibabel as nib
import numpy as np
import psutil
import pytest
import yaml

from chunkglm.cluster import (
    ClusterStartError,
    jobqueue_class,
    jobqueue_kwargs,
    kubernetes_spec,
    load_config,
    start,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gateway import LocalGateway  # noqa: E402

PASSWORD_ENV = "DASK_GATEWAY__AUTH__KWARGS__PASSWORD"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """Isolate every test from the caller's CHUNKGLM_* / gateway variables and cwd."""
    for name in list(os.environ):
        if name.startswith("CHUNKGLM_CLUSTER") or name == PASSWORD_ENV:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------- dask-jobqueue
JOBQUEUE = {
    "cores": 2, "memory": "3GiB", "walltime": "00:30:00", "queue": "short",
    "account": "lab42", "job_extra_directives": ["--extra-directive-x"],
    "job_script_prologue": ["module load python/3.11"], "interface": "lo",
    "worker_extra_args": ["--lifetime", "55m"],
    "scheduler_options": {"host": "127.0.0.1", "dashboard_address": None},
}
EXPECTED_LINES = {
    "slurm": ["#SBATCH -p short", "#SBATCH -A lab42", "#SBATCH --cpus-per-task=2",
              "#SBATCH --mem=3G", "#SBATCH -t 00:30:00", "#SBATCH --extra-directive-x"],
    "pbs": ["#PBS -q short", "#PBS -A lab42", "#PBS -l select=1:ncpus=2:mem=3GB",
            "#PBS -l walltime=00:30:00", "#PBS --extra-directive-x"],
    "sge": ["#$ -q short", "#$ -P lab42", "#$ -l h_vmem=1G", "#$ -l h_rt=00:30:00",
            "#$ --extra-directive-x"],
}
RESOURCE_SPEC = {"pbs": "select=1:ncpus=2:mem=3GB", "sge": "h_vmem=1G"}


@pytest.mark.parametrize("kind", ["slurm", "pbs", "sge"])
def test_job_script_holds_the_configured_directives(kind):
    options = dict(JOBQUEUE, **({"resource_spec": RESOURCE_SPEC[kind]} if kind != "slurm" else {}))
    config = load_config({"type": kind, kind: options})
    cls = jobqueue_class(config)
    assert cls.__name__ == {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster"}[kind]
    with cls(**jobqueue_kwargs(config)) as cluster:  # a scheduler, no batch system needed
        script = cluster.job_script()
        scheduler = cluster.scheduler_address
    lines = script.splitlines()
    for expected in EXPECTED_LINES[kind]:
        assert expected in lines, (expected, script)
    assert "module load python/3.11" in lines
    worker = next(line for line in lines if "distributed.cli.dask_worker" in line)
    assert worker.startswith(sys.executable)
    assert scheduler.startswith("tcp://127.0.0.1:") and scheduler in worker
    # processes: null = one single-threaded worker per core; memory split among them
    for flag in ("--nthreads 1", "--nworkers 2", "--memory-limit 1.50GiB", "--interface lo",
                 "--lifetime 55m"):
        assert flag in worker, (flag, worker)


def test_jobqueue_leaves_unset_keys_to_the_site_config():
    kwargs = jobqueue_kwargs(load_config({"type": "slurm", "slurm": {"cores": 8, "processes": 2}}))
    assert kwargs == {"cores": 8, "processes": 2, "memory": "16GiB", "walltime": "01:00:00",
                      "scheduler_options": {"dashboard_address": "127.0.0.1:8787"}}


def test_jobqueue_dashboard_listens_on_loopback_unless_configured():
    config = load_config({"type": "slurm", "slurm": {
        "cores": 1, "scheduler_options": {"host": "127.0.0.1"}}})
    with jobqueue_class(config)(**jobqueue_kwargs(config)) as cluster:
        assert cluster.dashboard_link.startswith("http://127.0.0.1:")
        port = cluster.scheduler.http_server.port
        listening = [c.laddr for c in psutil.Process().net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert {a.ip for a in listening} == {"127.0.0.1"}
    custom = jobqueue_kwargs(load_config({"type": "slurm", "slurm": {
        "scheduler_options": {"dashboard_address": ":9999"}}}))
    assert custom["scheduler_options"] == {"dashboard_address": ":9999"}


def test_workers_that_never_arrive_fail_with_the_queue_state_and_log_folder(tmp_path, monkeypatch):
    # A real failure: no sbatch on PATH, so no job is ever submitted.
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    logs = tmp_path / "job-logs"
    config = {"type": "slurm", "slurm": {
        "cores": 1, "memory": "1GiB", "jobs": 1, "wait_timeout": 3, "log_directory": str(logs),
        "scheduler_options": {"host": "127.0.0.1", "dashboard_address": None}}}
    started = time.monotonic()
    with pytest.raises(ClusterStartError) as info:
        start(config, verbose=False)
    assert time.monotonic() - started < 60
    msg = str(info.value)
    assert "Only 0 of 1 slurm worker(s) joined the scheduler tcp://127.0.0.1:" in msg
    assert "within wait_timeout=3 s" in msg
    assert f"Job logs: {logs}." in msg
    assert "Raise slurm.wait_timeout" in msg


# ---------------------------------------------------------------- Kubernetes
@functools.lru_cache(maxsize=1)
def _operator_schema() -> dict:
    """The DaskCluster CRD's OpenAPI schema, as shipped in dask-kubernetes."""
    import dask_kubernetes

    crd_path = (Path(dask_kubernetes.__file__).parent / "operator" / "deployment" / "helm"
                / "dask-kubernetes-operator" / "crds" / "daskcluster.yaml")
    crd = yaml.safe_load(crd_path.read_text())
    assert crd["spec"]["names"]["kind"] == "DaskCluster"
    version = crd["spec"]["versions"][0]
    return {"group": crd["spec"]["group"], "version": version["name"],
            "schema": version["schema"]["openAPIV3Schema"]}


def _strict(schema: dict) -> dict:
    """Reject unknown fields like the API server's strict field validation:
    objects that list their properties (and do not preserve unknown fields)
    get ``additionalProperties: false``."""
    schema = dict(schema)
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    for key, value in schema.items():
        if key == "properties":
            schema[key] = {name: _strict(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            schema[key] = _strict(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            schema[key] = [_strict(sub) for sub in value]
    return schema


def crd_errors(manifest: dict) -> list[str]:
    """Every way ``manifest`` breaks the DaskCluster CRD (empty when valid)."""
    import jsonschema

    crd = _operator_schema()
    errors = []
    if manifest.get("apiVersion") != f"{crd['group']}/{crd['version']}":
        errors.append(f"apiVersion {manifest.get('apiVersion')!r}")
    if manifest.get("kind") != "DaskCluster":
        errors.append(f"kind {manifest.get('kind')!r}")
    body = {k: v for k, v in manifest.items() if k not in ("apiVersion", "kind", "metadata")}
    validator = jsonschema.Draft7Validator(_strict(crd["schema"]))
    errors += [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
               for e in validator.iter_errors(body)]
    return errors


K8S_CONFIG = {"type": "kubernetes", "kubernetes": {
    "name": "chunkglm-test", "namespace": "dask", "image": "ghcr.io/example/chunkglm:0.1.0",
    "n_workers": 3, "env": {"OMP_NUM_THREADS": "1"},
    "resources": {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"cpu": 2, "memory": "4Gi"}},
    "scheduler_service_type": "NodePort", "idle_timeout": 300}}


def test_kubernetes_spec_is_valid_for_the_operator_crd():
    spec = kubernetes_spec(load_config(K8S_CONFIG))
    assert crd_errors(spec) == []
    assert spec["metadata"] == {"name": "chunkglm-test", "namespace": "dask"}
    body = spec["spec"]
    assert body["idleTimeout"] == 300 and body["worker"]["replicas"] == 3
    assert body["scheduler"]["service"]["type"] == "NodePort"
    for part in ("scheduler", "worker"):
        container = body[part]["spec"]["containers"][0]
        assert container["image"] == "ghcr.io/example/chunkglm:0.1.0"
        assert container["env"] == [{"name": "OMP_NUM_THREADS", "value": "1"}]
        assert container["resources"] == {"requests": {"cpu": "1", "memory": "4Gi"},
                                          "limits": {"cpu": "2", "memory": "4Gi"}}
    assert body["scheduler"]["spec"]["containers"][0]["args"][:2] == ["dask", "scheduler"]
    assert body["worker"]["spec"]["containers"][0]["args"][:2] == ["dask", "worker"]
    # the defaults (no env, no resources, default image) are valid too
    default = kubernetes_spec(load_config("kubernetes"))
    assert crd_errors(default) == []
    assert "env" not in default["spec"]["worker"]["spec"]["containers"][0]


@pytest.mark.parametrize("breakage, expected", [
    (lambda s: s["spec"]["worker"].__setitem__("replicas", "three"), "'three' is not of type 'integer'"),
    (lambda s: s["spec"].pop("scheduler"), "'scheduler' is a required property"),
    (lambda s: s["spec"]["worker"]["spec"]["containers"][0].__setitem__("env", None),
     "None is not of type 'array'"),
    (lambda s: s["spec"]["worker"]["spec"]["containers"][0].__setitem__("imagee", "x"),
     "Additional properties are not allowed ('imagee' was unexpected)"),
    (lambda s: s.__setitem__("kind", "DaskJob"), "kind 'DaskJob'"),
])
def test_a_broken_spec_fails_the_crd_validation(breakage, expected):
    spec = copy.deepcopy(kubernetes_spec(load_config(K8S_CONFIG)))
    breakage(spec)
    errors = crd_errors(spec)
    assert any(expected in error for error in errors), errors


def test_kubernetes_start_without_cluster_access_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config either
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ClusterStartError) as info:
        start(K8S_CONFIG, verbose=False)
    msg = str(info.value)
    assert "Could not create the DaskCluster 'chunkglm-test' (from <dict>)" in msg
    assert "kubectl get pods" in msg and "dask-kubernetes-operator" in msg


# ---------------------------------------------------------------- dask-gateway
GATEWAY_PASSWORD = "gw-test-password-5f2c"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """A real dask-gateway server (local backend) on 127.0.0.1, stopped at the end."""
    server = LocalGateway(tmp_path_factory.mktemp("gateway"), password=GATEWAY_PASSWORD).start()
    try:
        yield server
    finally:
        tree = server.processes()
        server.stop()
        assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.status


def test_gateway_cluster_computes_and_its_dashboard_goes_through_the_proxy(gateway, monkeypatch, capsys):
    monkeypatch.setenv(PASSWORD_ENV, GATEWAY_PASSWORD)
    config = gateway.config(cluster_options={"worker_cores": 1})
    with start(config) as client:
        cluster = client.cluster
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2  # start() waited
        x = np.arange(40_000, dtype="f8").reshape(200, 200)
        assert da.from_array(x, chunks=50).sum().compute() == pytest.approx(x.sum())
        link = cluster.dashboard_link
        assert link == f"{gateway.address}/clusters/{cluster.name}/status"
        assert _get(link) == 200
        name = cluster.name
    err = capsys.readouterr().err
    assert f"Dashboard: {link}" in err and f"cluster {name}, 2 workers" in err
    assert GATEWAY_PASSWORD not in err
    # shutdown_on_close: the gateway no longer lists the cluster
    deadline = time.monotonic() + 30
    while name in gateway_clusters(gateway) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert name not in gateway_clusters(gateway)


def test_gateway_adapt_starts_the_minimum_and_is_reported(gateway, monkeypatch, capsys):
    monkeypatch.setenv(PASSWORD_ENV, GATEWAY_PASSWORD)
    config = dict(gateway.config(), adapt={"minimum": 1, "maximum": 2})
    with start(config) as client:
        assert len(client.scheduler_info(n_workers=-1)["workers"]) >= 1  # start() waited
        name = client.cluster.name
        assert client.submit(sum, [1, 2], pure=False).result(timeout=60) == 3
    assert f"cluster {name}, adaptive 1-2 workers" in capsys.readouterr().err
    deadline = time.monotonic() + 30
    while name in gateway_clusters(gateway) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert name not in gateway_clusters(gateway)


def gateway_clusters(gateway: LocalGateway) -> dict:
    """The gateway's running clusters, from its REST API."""
    token = base64.b64encode(f"chunkglm-test:{GATEWAY_PASSWORD}".encode()).decode()
    request = urllib.request.Request(f"{gateway.address}/api/v1/clusters/",
                                     headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.load(answer)


def test_gateway_errors_name_the_address_without_the_password(gateway, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, "wrong-password-9d1e")
    with pytest.raises(ClusterStartError) as info:
        start(gateway.config(), verbose=False)
    msg = str(info.value)
    assert f"Could not create a cluster on the dask-gateway at {gateway.address}" in msg
    assert "401" in msg or "Unauthorized" in msg
    assert "wrong-password-9d1e" not in msg and PASSWORD_ENV in msg

    monkeypatch.setenv(PASSWORD_ENV, GATEWAY_PASSWORD)
    with pytest.raises(ClusterStartError) as info:
        start(gateway.config(cluster_options={"worker_cores": 9}), verbose=False)
    assert "worker_cores" in str(info.value)


def test_gateway_start_survives_a_connection_the_gateway_closed(gateway, monkeypatch, capsys):
    # The race seen once in CI: after the gateway's 401 answer aiohttp reused a pooled
    # connection the server had closed, and its `assert conn.protocol is not None` failed
    # before the request was sent. Recreate it: the first connection handed out has no
    # protocol. The start is tried again; the gateway's own refusals are not (test above).
    import aiohttp.connector

    real = aiohttp.connector.Connection.protocol
    handed_out = []

    def first_one_closed(conn):
        handed_out.append(conn)
        return None if len(handed_out) == 1 else real.fget(conn)

    monkeypatch.setattr(aiohttp.connector.Connection, "protocol", property(first_one_closed))
    monkeypatch.setenv(PASSWORD_ENV, GATEWAY_PASSWORD)
    with start(gateway.config(cluster_options={"worker_cores": 1}), verbose=False) as client:
        assert client.submit(sum, [1, 2], pure=False).result(timeout=60) == 3
        name = client.cluster.name
    assert len(handed_out) > 1
    deadline = time.monotonic() + 30
    while name in gateway_clusters(gateway) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert name not in gateway_clusters(gateway)


def test_only_failures_before_anything_was_sent_are_retried():
    from chunkglm.cluster.backends import _nothing_was_sent

    def raise_here():
        raise AssertionError  # an assertion of this file, not of aiohttp's connection code

    with pytest.raises(AssertionError) as info:
        raise_here()
    assert not _nothing_was_sent(info.value)
    assert not _nothing_was_sent(ValueError("worker_cores: must be <= 2"))


def _first_level(bids_root, out: Path, cluster: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chunkglm.cli.main", "first-level", str(bids_root), "-o", str(out),
         "--task", "main", "-c", "aMinusB=a - b", "--cluster", cluster],
        capture_output=True, text=True, timeout=600, env=env)


def test_first_level_cli_on_the_gateway_equals_the_local_run(gateway, tiny_bids, tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(gateway.config()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKGLM_CLUSTER")}
    on_gateway = _first_level(tiny_bids.root, tmp_path / "gateway", str(config),
                              {**env, PASSWORD_ENV: GATEWAY_PASSWORD})
    assert on_gateway.returncode == 0, on_gateway.stderr + gateway.logs()[-3000:]
    assert "[2/2] sub-02 written" in on_gateway.stderr
    assert f"Dashboard: {gateway.address}/clusters/" in on_gateway.stderr
    assert GATEWAY_PASSWORD not in on_gateway.stderr + on_gateway.stdout
    local = _first_level(tiny_bids.root, tmp_path / "local", "none", env)
    assert local.returncode == 0, local.stderr
    maps = sorted(p.relative_to(tmp_path / "local")
                  for p in (tmp_path / "local").rglob("*_stat-z.nii.gz"))  # first_level/ (the default layout)
    assert len(maps) == 2
    for relative in maps:
        expected = nib.load(tmp_path / "local" / relative).get_fdata()
        written = nib.load(tmp_path / "gateway" / relative).get_fdata()
        # same float64 graph on other processes: only summation order may differ
        np.testing.assert_allclose(written, expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- dashboard
def test_dashboard_status_answers_while_a_job_runs():
    with start(n_workers=1, dashboard_address=":0", verbose=False) as client:
        link = client.cluster.dashboard_link
        assert link.startswith("http://127.0.0.1:") and link.endswith("/status")
        future = client.submit(time.sleep, 4, pure=False)
        while not any(client.processing().values()):  # the job reached the worker
            time.sleep(0.05)
        answers = []
        while not future.done():
            status = _get(link)
            if not future.done():  # answered while the job was still running
                answers.append(status)
            time.sleep(0.5)
        future.result()
    assert len(answers) >= 2 and set(answers) == {200}


def test_gateway_fixture_stops_every_process(tmp_path, monkeypatch):
    server = LocalGateway(tmp_path, password=GATEWAY_PASSWORD).start()
    monkeypatch.setenv(PASSWORD_ENV, GATEWAY_PASSWORD)
    try:
        client = start(server.config(workers=1, shutdown_on_close=False), verbose=False)
        tree = server.processes()
        assert len(tree) >= 4  # server, proxy, scheduler, worker
        client.close()  # leaves the gateway cluster running: the server must stop it
    finally:
        server.stop()
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
