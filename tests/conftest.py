"""Shared fixtures: synthetic BIDS data, real example images, a real S3 server."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import nibabel as nib
import pytest

from chunkglm.testing import make_synthetic_bids

#: nibabel and nipy ship these in their wheels: real images nobody here made.
EXAMPLE4D = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"


def nipy_functional() -> Path:
    import nipy.testing

    return Path(nipy.testing.funcfile)


@pytest.fixture(scope="session")
def real_images() -> list[Path]:
    """nibabel's example4d (int16, 2 volumes) and nipy's functional (int16, scaled)."""
    paths = [EXAMPLE4D, nipy_functional()]
    assert all(p.is_file() for p in paths)
    return paths


@pytest.fixture(scope="session")
def tiny_bids(tmp_path_factory):
    """Two subjects, one run each, tiny grid; read-only for tests."""
    return make_synthetic_bids(tmp_path_factory.mktemp("bids"), n_subjects=2, size="tiny", seed=1)


@pytest.fixture(scope="session")
def tiny_bids_sessions(tmp_path_factory):
    """Two subjects x two sessions x two runs, int16 with scaling."""
    return make_synthetic_bids(tmp_path_factory.mktemp("bids_ses"), n_subjects=2, n_sessions=2,
                               n_runs=2, size="tiny", dtype="int16", seed=2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto in server mode) on 127.0.0.1.

    Yields a dict with ``endpoint``, ``key``, ``secret`` and ``storage_options``
    for fsspec/s3fs. Credentials are fake and exist only in this process.
    """
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    key, secret = "testing-key-id", "super-secret-value-1234"
    options = {"key": key, "secret": secret, "client_kwargs": {"endpoint_url": endpoint,
                                                              "region_name": "us-east-1"}}
    try:
        yield {"endpoint": endpoint, "key": key, "secret": secret, "storage_options": options}
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket per test; returns its name."""
    import boto3

    name = "bucket-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    client = boto3.client("s3", endpoint_url=s3_server["endpoint"], region_name="us-east-1",
                          aws_access_key_id=s3_server["key"],
                          aws_secret_access_key=s3_server["secret"])
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(autouse=True)
def _no_real_aws(monkeypatch):
    """Never let a test reach a real cloud endpoint through ambient credentials."""
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
