"""pipeline/storage.py without a server: which exceptions become which StorageError, and the storage options of a
process. (Against a real S3 server: tests/stages/test_extract_s3.py.)"""
from __future__ import annotations

import socket

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from weclip.pipeline import storage
from weclip.pipeline.errors import ConfigError, StorageError

URL = "s3://bucket/cache"


def raised(err: BaseException, cause: BaseException | None = None) -> BaseException:
    """`err` as it arrives from a `raise err from cause`."""
    try:
        try:
            raise cause or err
        except BaseException as inner:
            if cause is None:
                raise
            raise err from inner
    except BaseException as outer:
        return outer


@pytest.fixture(autouse=True)
def no_endpoint(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", storage.OPTIONS_ENV):
        monkeypatch.delenv(name, raising=False)


def test_no_endpoint_configured_and_no_dns_names_the_url_the_endpoint_and_the_setting():
    """What an s3:// URL gives on a machine without network when no endpoint is set: botocore's connection error
    over a DNS failure, as one line naming where it went and what to set."""
    err = raised(EndpointConnectionError(endpoint_url="https://bucket.s3.amazonaws.com/?list-type=2"),
                 socket.gaierror(-2, "Name or service not known"))
    mapped = storage.storage_error(URL, err)
    assert isinstance(mapped, StorageError) and "\n" not in str(mapped)
    for part in (URL, "https://bucket.s3.amazonaws.com", "does not resolve", "went to AWS", "AWS_ENDPOINT_URL",
                 "endpoint_url"):
        assert part in str(mapped), part


def test_a_configured_endpoint_is_not_said_to_be_aws(monkeypatch):
    monkeypatch.setenv(storage.OPTIONS_ENV, '{"endpoint_url": "http://minio:9000"}')
    mapped = storage.storage_error(URL, raised(EndpointConnectionError(endpoint_url="http://minio:9000/bucket")))
    assert "http://minio:9000 for" in str(mapped) and "AWS" not in str(mapped).split(";")[0]


def test_credentials_and_buckets():
    missing = storage.storage_error(URL, raised(NoCredentialsError()))
    assert "no credentials" in str(missing) and "AWS_ACCESS_KEY_ID" in str(missing) and URL in str(missing)
    refused = ClientError({"Error": {"Code": "SignatureDoesNotMatch", "Message": "no"}}, "PutObject")
    assert "SignatureDoesNotMatch" in str(storage.storage_error(URL, raised(PermissionError("no"), refused)))
    no_bucket = ClientError({"Error": {"Code": "NoSuchBucket", "Message": "no"}}, "PutObject")
    assert "'bucket'" in str(storage.storage_error(URL, raised(FileNotFoundError("x"), no_bucket)))


def test_other_errors_pass_through_unchanged():
    for err in (ValueError("a bug"), FileNotFoundError("bucket/cache/zarr.json"), PermissionError("read-only")):
        assert storage.storage_error(URL, raised(err)) is None  # a missing key is no missing bucket
    with pytest.raises(KeyError):
        with storage.storage_errors(URL):
            raise KeyError("x")


def test_storage_options_of_a_process(monkeypatch):
    assert storage.storage_options() == {}
    storage.use_storage_options({"endpoint_url": "http://127.0.0.1:9", "key": "k"})
    assert storage.storage_options() == {"endpoint_url": "http://127.0.0.1:9", "key": "k"}
    monkeypatch.setenv(storage.OPTIONS_ENV, '["not", "an object"]')
    with pytest.raises(ConfigError, match=storage.OPTIONS_ENV):
        storage.storage_options()


def test_a_url_without_its_filesystem_package_names_the_extra(monkeypatch):
    import fsspec.core

    def missing(url, **options):
        raise ImportError("Install s3fs to access S3")
    monkeypatch.setattr(fsspec.core, "url_to_fs", missing)
    with pytest.raises(StorageError, match=r"s3://bucket/cache: Install s3fs .*pip install 'weclip\[s3\]'"):
        storage.open_fs(URL)
