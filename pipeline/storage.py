"""Object storage (S3, MinIO, Ceph, GCS, memory://) through fsspec: the one place that opens a URL and that turns
what an object store raises into one StorageError naming the URL and the setting to fix.

Where to connect and with which credentials comes from two places, never from weclip's config or records:
the store's own environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ... for
s3fs/botocore) and fsspec storage options (`--storage-options`, e.g. `{"endpoint_url": ..., "key": ..., "secret":
...}`), which live in this process's environment variable OPTIONS_ENV, so that every child process (DataLoader
workers, a local Ray) inherits them; Ray workers elsewhere get them with the extract job (`ExtractJob`), never
through a file. No message, record or log quotes them.

Errors (`storage_errors`): a missing bucket, refused or missing credentials, and an endpoint that cannot be reached
(a closed port, a host name that does not resolve: the AWS default when no endpoint is configured and the network is
closed) each become one StorageError line. Every cache opened at a URL is probed first (one request on its bucket:
on S3 a one-key listing of its prefix), so these show before anything is written.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Any, Iterator, Mapping
from urllib.parse import urlsplit

from weclip.pipeline.errors import ConfigError, StorageError
from weclip.pipeline.files import is_url

OPTIONS_ENV = "WECLIP_STORAGE_OPTIONS"  # JSON object of fsspec storage options for every URL this process opens
# Protocols whose first path component is a bucket that must exist (the probe asks for it).
BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "oss"})
CREDENTIALS_FIX = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or give --storage-options "
                   "'{\"key\": \"...\", \"secret\": \"...\"}'")
ENDPOINT_FIX = ("set AWS_ENDPOINT_URL to the object store (MinIO, Ceph: e.g. http://HOST:9000) or give "
                "--storage-options '{\"endpoint_url\": \"...\"}', and check that it is up and reachable")
# Exception class names (anywhere in the chain of causes) by the kind of failure; names, so that botocore and
# aiohttp need not be installed for local paths.
_NO_CREDENTIALS = frozenset({"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"})
_UNREACHABLE = frozenset({"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                          "ClientConnectorDNSError", "gaierror", "ConnectionRefusedError", "ServerDisconnectedError"})
_REFUSED_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                            "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed"})


def storage_options() -> dict[str, Any]:
    """The fsspec storage options this process opens URLs with (OPTIONS_ENV), {} when none are set."""
    text = os.environ.get(OPTIONS_ENV)
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError:
        options = None
    if not isinstance(options, dict):
        raise ConfigError(f"the environment variable {OPTIONS_ENV} is not a JSON object of fsspec storage options; "
                          "fix or unset it")
    return options


def use_storage_options(options: Mapping[str, Any] | None) -> None:
    """Open every later URL of this process and its children with these fsspec storage options (None: keep the
    current ones)."""
    if options is not None:
        os.environ[OPTIONS_ENV] = json.dumps(dict(options))


def open_fs(url: str, asynchronous: bool = False) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of a URL, with this process's storage options."""
    from fsspec.core import url_to_fs

    options = storage_options()
    with storage_errors(url):
        try:
            return url_to_fs(url, **({"asynchronous": True} if asynchronous else {}), **options)
        except ImportError as err:  # fsspec's "Install s3fs to access S3"
            raise StorageError(f"{url}: {err}; install weclip's extra for it: pip install 'weclip[s3]' (s3fs)") from None


def url_store(url: str, read_only: bool) -> Any:
    """A zarr FsspecStore at `url` whose bucket was probed: a missing bucket, refused credentials or an unreachable
    endpoint raise StorageError here, before anything is read or written."""
    from zarr.core.sync import sync
    from zarr.storage import FsspecStore

    fs, path = open_fs(url, asynchronous=True)
    if not fs.async_impl:  # memory:// and other synchronous filesystems: zarr wraps them itself
        return FsspecStore.from_url(url, storage_options=storage_options(), read_only=read_only)
    if bucket := _bucket(url, path):
        with storage_errors(url, bucket=bucket):
            sync(_probe(fs, bucket, path))
    return FsspecStore(fs=fs, path=path, read_only=read_only)


async def _probe(fs: Any, bucket: str, path: str) -> None:
    """One request that fails as every later one would: on S3 a one-key listing of the store's own prefix (which a
    policy limited to that prefix allows, unlike HeadBucket), elsewhere the bucket's info."""
    if hasattr(fs, "_call_s3"):
        await fs._call_s3("list_objects_v2", Bucket=bucket, Prefix=path[len(bucket) + 1:], MaxKeys=1)
    else:
        await fs._info(bucket)


def read_bytes(url: str) -> bytes:
    """The bytes of the object at `url` (FileNotFoundError when there is none; other failures as StorageError)."""
    fs, path = open_fs(url)
    with storage_errors(url):
        return fs.cat_file(path)


def object_sizes(url: str) -> dict[str, int]:
    """{key relative to `url`: size} of every object under `url` (listed page by page)."""
    fs, path = open_fs(url)
    with storage_errors(url, bucket=_bucket(url, path)):
        found = fs.find(path, detail=True)
    return {name[len(path):].lstrip("/"): int(info["size"]) for name, info in found.items()}


@contextmanager
def storage_errors(url: str, bucket: str | None = None) -> Iterator[None]:
    """Raise what the block raises, except failures of the object store, which become one StorageError naming `url`
    and the setting to fix; `bucket`: the block only asks for that bucket, so "not found" means it does not exist."""
    try:
        yield
    except StorageError:
        raise
    except Exception as err:
        mapped = storage_error(url, err, bucket)
        if mapped is None:
            raise
        raise mapped from err


def storage_error(url: str, err: BaseException, bucket: str | None = None) -> StorageError | None:
    """The StorageError for an object-store failure while accessing `url`; None for any other exception."""
    chain = _chain(err)
    names = {cls.__name__ for e in chain for cls in type(e).__mro__}
    codes = {_error_code(e) for e in chain} - {None}
    if names & _NO_CREDENTIALS:
        return StorageError(f"no credentials for {url}: none were found in the environment or the storage options; "
                            f"{CREDENTIALS_FIX}")
    if names & _UNREACHABLE:
        endpoint = next((e for e in map(_endpoint, chain) if e), None) or _configured_endpoint()
        why = "its host name does not resolve" if {"gaierror", "ClientConnectorDNSError"} & names else \
            "the connection failed"
        if not _endpoint_configured():
            why += "; no endpoint is configured, so it went to AWS"
        return StorageError(f"cannot reach the object store endpoint {endpoint} for {url} ({why}); {ENDPOINT_FIX}")
    if "NoSuchBucket" in codes or (bucket is not None and isinstance(err, FileNotFoundError)):
        name = bucket or urlsplit(url).netloc
        return StorageError(f"the bucket {name!r} of {url} does not exist at {_configured_endpoint()}; create it "
                            f"(e.g. `aws s3 mb s3://{name}`), or correct the URL or the endpoint (AWS_ENDPOINT_URL)")
    if codes & _REFUSED_CODES or (isinstance(err, PermissionError) and is_url(url) and bucket is not None):
        code = next(iter(sorted(codes & _REFUSED_CODES)), "access denied")
        return StorageError(f"the object store refused the credentials for {url} "
                            f"({'HTTP ' + code if code.isdigit() else code}); {CREDENTIALS_FIX}, "
                            "with the right to read and write that bucket")
    return None


def _chain(err: BaseException) -> list[BaseException]:
    """`err` and its causes / contexts, each once."""
    seen: list[BaseException] = []
    while err is not None and all(err is not e for e in seen):
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def _error_code(err: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError ('NoSuchBucket', 'InvalidAccessKeyId', '403', ...)."""
    response = getattr(err, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


def _endpoint(err: BaseException) -> str | None:
    """scheme://host[:port] of the request a connection error names (botocore keeps it in `kwargs`)."""
    url = (getattr(err, "kwargs", None) or {}).get("endpoint_url")
    if not url:
        return None
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _endpoint_configured() -> str | None:
    """The endpoint an S3 URL goes to when one is set: the storage options', else the environment's."""
    options = storage_options()
    return (options.get("endpoint_url") or options.get("client_kwargs", {}).get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))


def _configured_endpoint() -> str:
    return _endpoint_configured() or "the AWS default (no AWS_ENDPOINT_URL set)"


def _bucket(url: str, path: str) -> str | None:
    """The bucket of a URL of a bucket protocol (s3://BUCKET/...), else None."""
    return path.split("/", 1)[0] if url.split("://", 1)[0].lower() in BUCKET_PROTOCOLS else None
