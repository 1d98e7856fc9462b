"""obstore vs s3fs (fsspec) as the zarr store of a cohort on S3, on a local server.

Usage::

    python benchmarks/s3_readers.py [--size small|realistic] [--chunk-mb 64] [--repeat 3]

What it does: makes a synthetic run (``chunkglm.testing``), converts it into a
local cohort store, starts moto in server mode (its own process) on
127.0.0.1, then times, best of ``--repeat``:

- write: every object of the local store put into the bucket through each
  zarr store (16 requests in flight, the same for both);
- read: every chunk of the run's ``bold`` array through zarr
  (``array[...]``: fetch + decompress) with each store;
- fetch: every object of ``bold`` fetched, not decoded, through each zarr store;
- baselines for the server itself: a plain boto3 GET loop and a plain obstore
  GET loop over the same objects (one at a time), and zarr reading the local
  copy from disk (the floor without any network).

Figures are only comparable within one run of this script: moto is a Python
server and shares this machine's cores with the client.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype

import chunkglm
from chunkglm.io.backends import StorageSettings, open_store, sync
from chunkglm.testing import make_synthetic_bids

MiB = 2**20
KEY, SECRET = "bench-key", "bench-secret"


def main(argv=None) -> None:
    args = _parse(argv)
    with tempfile.TemporaryDirectory(prefix="s3bench-") as tmp:
        local, node = _make_store(Path(tmp), args.size, args.chunk_mb)
        server, endpoint = _start_moto()
        try:
            rows = _measure(local, node, endpoint, args.repeat)
        finally:
            server.terminate()
            server.wait(10)
    _print(rows, args)


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small", "realistic"])
    parser.add_argument("--chunk-mb", type=float, default=64.0)
    parser.add_argument("--repeat", type=int, default=3)
    return parser.parse_args(argv)


def _make_store(tmp: Path, size: str, chunk_mb: float):
    bids = make_synthetic_bids(tmp / "bids", n_subjects=1, size=size, seed=3)
    store = tmp / "cohort.zarr"
    chunkglm.convert(bids.root, store, chunk_bytes=int(chunk_mb * MiB))
    node = next(iter(chunkglm.open_cohort(store).runs))
    return store, node


def _start_moto():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    _wait_for(endpoint)
    return server, endpoint


def _wait_for(endpoint, timeout=30):
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(endpoint + "/", timeout=1)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _boto3(endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=KEY, aws_secret_access_key=SECRET)


def _settings(backend, endpoint):
    return StorageSettings(backend=backend, options={
        "key": KEY, "secret": SECRET, "endpoint_url": endpoint, "region": "us-east-1"})


def _measure(local: Path, node: str, endpoint: str, repeat: int) -> list[tuple]:
    client = _boto3(endpoint)
    local_store = zarr.storage.LocalStore(str(local), read_only=True)
    keys = sorted(sync(_collect(local_store.list())))
    bold_prefix = f"runs/{node}/bold/"
    bold_keys = [k for k in keys if k.startswith(bold_prefix) and "/c/" in k]
    bold_bytes = sum((local / k).stat().st_size for k in bold_keys)
    all_bytes = sum((local / k).stat().st_size for k in keys)
    rows = []
    for backend in ("obstore", "fsspec"):
        bucket = f"bench-{backend}"
        client.create_bucket(Bucket=bucket)
        url = f"s3://{bucket}/cohort.zarr"
        settings = _settings(backend, endpoint)
        write = _best(repeat, lambda: _copy(local_store, open_store(url, settings), keys))
        rows.append((f"write store ({backend})", write, all_bytes, len(keys)))
        read = _best(repeat, lambda: zarr.open_array(open_store(url, settings, read_only=True),
                                                     path=f"runs/{node}/bold", mode="r")[...])
        rows.append((f"read bold via zarr ({backend})", read, bold_bytes, len(bold_keys)))
        fetch = _best(repeat, lambda: _fetch(open_store(url, settings, read_only=True), bold_keys))
        rows.append((f"fetch bold objects ({backend})", fetch, bold_bytes, len(bold_keys)))
    bucket = "bench-obstore"
    rows.append(("GET loop, plain boto3", _best(repeat, lambda: [
        client.get_object(Bucket=bucket, Key=f"cohort.zarr/{k}")["Body"].read() for k in bold_keys]),
        bold_bytes, len(bold_keys)))
    rows.append(("GET loop, plain obstore", _best(repeat, lambda: _obstore_loop(endpoint, bucket, bold_keys)),
                 bold_bytes, len(bold_keys)))
    rows.append(("read bold via zarr (local disk)", _best(repeat, lambda: zarr.open_array(
        local_store, path=f"runs/{node}/bold", mode="r")[...]), bold_bytes, len(bold_keys)))
    _check_equal(local_store, node, endpoint)
    return rows


async def _collect(agen):
    return [item async for item in agen]


def _copy(source, target, keys, in_flight=16):
    proto = default_buffer_prototype()

    async def one(key, gate):
        async with gate:
            await target.set(key, await source.get(key, proto))

    async def run():
        gate = asyncio.Semaphore(in_flight)
        await asyncio.gather(*(one(k, gate) for k in keys))

    sync(run())


def _fetch(store, keys, in_flight=16):
    proto = default_buffer_prototype()

    async def one(key, gate):
        async with gate:
            return await store.get(key, proto)

    async def run():
        gate = asyncio.Semaphore(in_flight)
        return await asyncio.gather(*(one(k, gate) for k in keys))

    return sync(run())


def _obstore_loop(endpoint, bucket, keys):
    import obstore
    from obstore.store import S3Store

    store = S3Store(bucket, prefix="cohort.zarr", endpoint=endpoint, region="us-east-1",
                    access_key_id=KEY, secret_access_key=SECRET, client_options={"allow_http": True})
    return [obstore.get(store, k).bytes() for k in keys]


def _check_equal(local_store, node, endpoint):
    """Both backends read back exactly what was written."""
    ref = zarr.open_array(local_store, path=f"runs/{node}/bold", mode="r")[...]
    for backend in ("obstore", "fsspec"):
        store = open_store(f"s3://bench-{backend}/cohort.zarr", _settings(backend, endpoint), read_only=True)
        np.testing.assert_array_equal(zarr.open_array(store, path=f"runs/{node}/bold", mode="r")[...], ref)


def _best(repeat, work) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def _print(rows, args) -> None:
    print(f"\nsize={args.size} chunk-mb={args.chunk_mb} best of {args.repeat}; moto server on 127.0.0.1, "
          f"{os.cpu_count()} cores\n")
    print("| step | objects | MiB | seconds | MiB/s |")
    print("|---|---:|---:|---:|---:|")
    for label, seconds, nbytes, count in rows:
        print(f"| {label} | {count} | {nbytes / MiB:.1f} | {seconds:.3f} | {nbytes / MiB / seconds:.0f} |")


if __name__ == "__main__":
    main()
