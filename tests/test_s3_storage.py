"""Object storage backends (obstore, s3fs), retries and cut-off uploads, on a real
moto server on 127.0.0.1 (behind a real TCP proxy where the network must fail)."""

from __future__ import annotations

import pickle

import boto3
import numpy as np
import pytest

import chunkglm
from chunkglm.errors import ChunkglmError, StoreError
from chunkglm.io import layout as st
from chunkglm.io.backends import StorageSettings, choose_backend, open_store

BACKENDS = ["obstore", "fsspec"]


def _options(endpoint, s3_server):
    return {"key": s3_server["key"], "secret": s3_server["secret"], "endpoint_url": endpoint,
            "region": "us-east-1"}


def _settings(backend, endpoint, s3_server, retries=2):
    return StorageSettings(backend=backend, options=_options(endpoint, s3_server), retries=retries)


def _client(s3_server):
    return boto3.client("s3", endpoint_url=s3_server["endpoint"], region_name="us-east-1",
                        aws_access_key_id=s3_server["key"], aws_secret_access_key=s3_server["secret"])


def _assert_same_runs(cohort, reference):
    assert sorted(cohort.runs) == sorted(reference.runs)
    for name, node in reference.runs.items():
        np.testing.assert_array_equal(cohort.runs[name].data().values, node.data().values)


@pytest.fixture(scope="module")
def local_reference(tiny_bids, tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    chunkglm.convert(tiny_bids.root, path, chunk_bytes=16 * 1024)
    return chunkglm.open_cohort(path)


def test_auto_picks_obstore_only_where_it_can_serve_the_url_options_and_credentials(monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    assert choose_backend("s3://b/x", {"key": "k", "secret": "s"}) == "obstore"
    assert choose_backend("s3://b/x", {"anon": True}) == "obstore"
    # no credentials obstore can find: s3fs, whose botocore chain reads profiles and SSO
    assert choose_backend("s3://b/x", {}) == "fsspec"
    # an option obstore does not understand
    assert choose_backend("s3://b/x", {"anon": True, "use_ssl": False}) == "fsspec"
    assert choose_backend("gs://b/x", {"anon": True}) == "fsspec"
    assert choose_backend("s3://b/x", StorageSettings("fsspec", {"anon": True})) == "fsspec"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    assert choose_backend("s3://b/x", {}) == "obstore"


def test_forcing_obstore_where_it_cannot_work_says_why_and_names_no_secret():
    with pytest.raises(StoreError, match=r"does not understand the storage option\(s\) \['use_ssl'\]"
                       r".*backend 'fsspec'") as err:
        open_store("s3://b/x", StorageSettings("obstore", {"use_ssl": False, "secret": "hush-1234"}))
    assert "hush-1234" not in str(err.value)
    with pytest.raises(StoreError, match="serves s3://"):
        open_store("gs://b/x", StorageSettings("obstore"))
    with pytest.raises(StoreError, match="backend must be one of .*received 'boto'"):
        StorageSettings("boto")
    with pytest.raises(StoreError, match="retries must be a whole number >= 0; received -1"):
        StorageSettings(retries=-1)
    settings = StorageSettings(options={"key": "AKID", "secret": "hush-1234"})
    assert "hush-1234" not in repr(settings) and "AKID" not in repr(settings)
    assert pickle.loads(pickle.dumps(settings)) == settings


def test_retries_from_the_settings_reach_both_clients(s3_server):
    fast = open_store("s3://b/x", _settings("obstore", s3_server["endpoint"], s3_server, retries=7))
    assert fast.store.retry_config["max_retries"] == 7
    slow = open_store("s3://b/x", _settings("fsspec", s3_server["endpoint"], s3_server, retries=7))
    assert slow.fs.config_kwargs["retries"] == {"max_attempts": 8, "mode": "standard"}


@pytest.mark.parametrize("writer, reader", [("obstore", "obstore"), ("fsspec", "fsspec"),
                                            ("fsspec", "obstore"), ("obstore", "fsspec")])
def test_read_after_write_on_both_backends(writer, reader, tiny_bids, s3_server, s3_bucket, local_reference):
    url = f"s3://{s3_bucket}/{writer}.zarr"
    report = chunkglm.convert(tiny_bids.root, url, chunk_bytes=16 * 1024,
                              storage_options=_settings(writer, s3_server["endpoint"], s3_server))
    assert len(report.converted) == len(tiny_bids.runs)
    cohort = chunkglm.open_cohort(url, storage_options=_settings(reader, s3_server["endpoint"], s3_server))
    assert type(cohort.zarr_store).__name__ == {"obstore": "_ObjectStore", "fsspec": "_FsspecStore"}[reader]
    _assert_same_runs(cohort, local_reference)


def test_endpoint_region_and_credentials_from_the_environment_only(tiny_bids, s3_server, s3_bucket,
                                                                   monkeypatch, local_reference):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    url = f"s3://{s3_bucket}/env.zarr"
    assert choose_backend(url) == "obstore"
    chunkglm.convert(tiny_bids.root, url, chunk_bytes=16 * 1024)
    _assert_same_runs(chunkglm.open_cohort(url), local_reference)
    _assert_same_runs(chunkglm.open_cohort(url, StorageSettings("fsspec")), local_reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transient_server_errors_are_retried(backend, s3_server, s3_bucket, s3_proxy):
    proxy = s3_proxy(fail_first=2)  # two "503 Slow Down" answers, then the real server
    root = st.open_root(f"s3://{s3_bucket}/retry.zarr", _settings(backend, proxy.endpoint, s3_server, 3),
                        mode="a")
    assert proxy.failed_left == 0
    assert root.attrs[st.ATTR]["format"] == st.FORMAT_NAME


def test_without_retries_a_transient_error_is_reported_clearly(s3_server, s3_bucket, s3_proxy):
    proxy = s3_proxy(fail_first=1)
    with pytest.raises(StoreError, match=rf"could not (read|write) s3://{s3_bucket}/noretry.zarr/"
                       r"zarr.json after 0 retries: .*run the same command again") as err:
        st.open_root(f"s3://{s3_bucket}/noretry.zarr",
                     _settings("obstore", proxy.endpoint, s3_server, retries=0), mode="a")
    assert s3_server["secret"] not in str(err.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_upload_cut_off_mid_node_never_counts_as_complete_and_a_rerun_repairs_it(
        backend, tiny_bids, s3_server, s3_bucket, s3_proxy, local_reference):
    target = sorted(local_reference.runs)[-1]  # converted last: the run before it completes
    # the network goes down while the second data chunk of the target run is being uploaded
    proxy = s3_proxy(cut_on=rf"PUT /[^ ]*/runs/{target}/bold/c/".encode(), cut_after=2)
    url = f"s3://{s3_bucket}/cut.zarr"
    with pytest.raises(ChunkglmError) as err:
        chunkglm.convert(tiny_bids.root, url, chunk_bytes=16 * 1024,
                         storage_options=_settings(backend, proxy.endpoint, s3_server, retries=1))
    assert proxy.cut_done.is_set()
    message = str(err.value)
    assert f"s3://{s3_bucket}/cut.zarr" in message and "run the same" in message, message
    assert s3_server["secret"] not in message

    direct = _settings(backend, s3_server["endpoint"], s3_server)
    written = [o["Key"] for o in _client(s3_server).list_objects_v2(
        Bucket=s3_bucket, Prefix=f"cut.zarr/runs/{target}/").get("Contents", [])]
    assert f"cut.zarr/runs/{target}/bold/zarr.json" in written  # cut mid-node, not before it
    cohort = chunkglm.open_cohort(url, storage_options=direct)
    assert target not in cohort.runs and f"runs/{target}" in cohort.incomplete
    assert len(cohort.runs) == len(local_reference.runs) - 1
    for name in cohort.runs:  # whatever counts as complete is complete and right
        np.testing.assert_array_equal(cohort.runs[name].data().values, local_reference.runs[name].data().values)

    again = chunkglm.convert(tiny_bids.root, url, chunk_bytes=16 * 1024, storage_options=direct)
    assert f"runs/{target}" in again.converted
    _assert_same_runs(chunkglm.open_cohort(url, storage_options=direct), local_reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cohort_on_s3_is_read_by_worker_processes(backend, tiny_bids, s3_server, s3_bucket, local_reference):
    from distributed import Client, LocalCluster

    url = f"s3://{s3_bucket}/dist.zarr"
    settings = _settings(backend, s3_server["endpoint"], s3_server)
    chunkglm.convert(tiny_bids.root, url, chunk_bytes=16 * 1024, storage_options=settings)
    cohort = chunkglm.open_cohort(url, storage_options=settings)
    assert s3_server["secret"] not in repr(cohort)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        for name, node in local_reference.runs.items():
            data = cohort.runs[name].data()  # lazy: the workers read the chunks (store pickled to them)
            assert data.chunks is not None and len(data.chunks[1]) > 1
            values = client.compute(data.data).result()
            np.testing.assert_array_equal(values, node.data().values)


def test_the_cluster_configs_storage_section_becomes_settings(s3_server, s3_bucket, tmp_path):
    from chunkglm.cluster.config import load_config
    from chunkglm.io.backends import storage_settings

    path = tmp_path / "cluster.yaml"
    path.write_text("version: 1\ntype: local\nstorage:\n  backend: fsspec\n  retries: 3\n"
                    f"  options: {{endpoint_url: '{s3_server['endpoint']}', region: us-east-1}}\n")
    settings = storage_settings(load_config(str(path)).storage, {"key": s3_server["key"],
                                                                 "secret": s3_server["secret"]})
    assert (settings.backend, settings.retries) == ("fsspec", 3)
    assert settings.options["endpoint_url"] == s3_server["endpoint"] and settings.options["key"]
    root = st.open_root(f"s3://{s3_bucket}/cfg.zarr", settings, mode="a")
    assert root.attrs[st.ATTR]["format"] == st.FORMAT_NAME
    assert storage_settings({"endpoint_url": "x"}).options == {"endpoint_url": "x"}  # plain s3fs options


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_first_level_fit_on_an_s3_cohort_streams_its_residuals_back_to_s3(backend, tiny_bids, s3_server,
                                                                           s3_bucket, local_reference):
    import xarray as xr

    from chunkglm.glm.first_level import FirstLevelModel

    url = f"s3://{s3_bucket}/glm.zarr"
    settings = _settings(backend, s3_server["endpoint"], s3_server)
    chunkglm.convert(tiny_bids.root, url, chunk_bytes=16 * 1024, storage_options=settings)
    name = sorted(local_reference.runs)[0]
    remote = FirstLevelModel(slice_time_ref=0.5).fit(chunkglm.open_cohort(url, settings).runs[name])
    local = FirstLevelModel(slice_time_ref=0.5).fit(local_reference.runs[name])
    [path] = remote.voxelwise("residuals", store=f"s3://{s3_bucket}/out.zarr", storage_options=settings)
    written = xr.open_zarr(open_store(f"s3://{s3_bucket}/out.zarr", settings, read_only=True),
                           group=path.rsplit("/", 1)[0], zarr_format=3, consolidated=False)
    # same inputs, same graph: bit-identical to the local fit's residuals (stored as float32)
    expected = local.voxelwise("residuals")[0].compute().astype(np.float32)
    np.testing.assert_array_equal(written["residuals"].values, expected)
