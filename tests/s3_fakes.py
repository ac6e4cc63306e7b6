"""A real S3-compatible HTTP server for the tests: moto's server mode on 127.0.0.1, one fresh bucket per test.

`s3` sets the environment so that every S3 client of the test (this process, its child processes, a local Ray)
talks to that server only: AWS_ENDPOINT_URL points at it, credentials are fake, the instance-metadata lookup and
the user's AWS config files are switched off, so nothing ever contacts AWS or any address but 127.0.0.1.
Import the fixtures into a test module: `from tests.s3_fakes import moto_server, s3  # noqa: F401`.
"""
from __future__ import annotations

import logging
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import pytest

from weclip.pipeline.storage import OPTIONS_ENV

ACCESS_KEY, SECRET_KEY = "AKIAWECLIPTEST000000", "weclip-test-secret"


@dataclass(frozen=True)
class S3:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    fs: Any  # a synchronous s3fs.S3FileSystem on the server

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}".rstrip("/")

    def objects(self) -> dict[str, bytes]:
        """Every object of the bucket, key (without the bucket) -> bytes."""
        self.fs.invalidate_cache()
        return {key.split("/", 1)[1]: self.fs.cat_file(key) for key in self.fs.find(self.bucket)}


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """The endpoint URL of one moto S3 server for the whole session, bound to 127.0.0.1 on a free port."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log on stderr
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def s3_environment(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point every S3 client of this process and its children at `endpoint` with fake credentials, nowhere else."""
    for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                        "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent/aws-config",
                        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials"}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", OPTIONS_ENV):
        monkeypatch.delenv(name, raising=False)
    clear_clients()


def clear_clients() -> None:
    """Close and forget the cached s3fs instances, whose clients keep the endpoint and credentials they were made
    with: the synchronous ones on fsspec's loop, the asynchronous ones (zarr's stores) on zarr's."""
    import s3fs

    for fs in list(s3fs.S3FileSystem._cache.values()):
        close(fs)
    s3fs.S3FileSystem.clear_instance_cache()


def close(fs: Any) -> None:
    """Close an s3fs instance's client (an unclosed one is reported when it is garbage collected)."""
    import fsspec.asyn
    from zarr.core.sync import sync

    if getattr(fs, "_s3", None) is not None:
        sync(fs._s3.close()) if fs.asynchronous else fsspec.asyn.sync(fs.loop, fs._s3.close)


@pytest.fixture
def s3(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    """A new empty bucket on the moto server, and the environment pointing at it."""
    import s3fs

    s3_environment(monkeypatch, moto_server)
    bucket = f"weclip-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(bucket)
    yield S3(endpoint=moto_server, bucket=bucket, fs=fs)
    close(fs)
    clear_clients()


@contextmanager
def refusing_credentials() -> Iterator[None]:
    """Inside the block the moto server checks credentials (it accepts any by default) and so refuses every key,
    since it never issued one."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    before = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT, ActionAuthenticatorMixin.request_count = 0, 0
    try:
        yield
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = before
