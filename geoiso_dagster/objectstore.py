"""The S3 side of an `s3://bucket/prefix` data root. No geo imports.

Every object operation of the project goes through here, for the run process (listing
the inbox, publishing, sweeping) and the workers (fetching sources, uploading staged
outputs) alike, so that errors mean one thing everywhere (DESIGN.md, Failure table):

| what S3 said                                      | error            | retried |
| ------------------------------------------------- | ---------------- | ------- |
| endpoint unreachable, timeout, 5xx, SlowDown      | TransientIOError | yes     |
| 403 (denied, bad key or signature), no such bucket| StorageAccessError | no    |
| no such key (deleted between listing and reading) | BadInputError    | no      |

Endpoint, region and credentials come from the standard AWS chain (AWS_ENDPOINT_URL,
AWS_REGION, AWS_ACCESS_KEY_ID..., ~/.aws/config and credentials, instance roles).
Messages name the bucket and key and S3's error code, never a credential: they are
built here from the code and status alone, not from the client's text.

Object stores have no rename. A staged object is written under a temp name beside its
final key (the same names as local temps, fsutil.temp_path_for), checked, then copied
onto the final key and deleted: readers see the old object or the new one, never a part.
Staged objects and multipart uploads of writers that died are swept like local temps.
"""

import contextlib
import fcntl
import functools
import hashlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from geoiso_dagster import formats, fsutil
from geoiso_dagster.errors import (
    BadInputError,
    GeoisoError,
    StorageAccessError,
    TransientIOError,
    UnsafeNameError,
)

# Multipart part size: S3 allows 5 MiB to 5 GiB a part and 10,000 parts (16 MiB parts:
# objects up to 156 GiB). GEOISO_S3_PART_MB changes it (at least 5).
PART_BYTES = max(5, int(os.environ.get("GEOISO_S3_PART_MB") or 16)) * 2**20
_COPY_MAX = 5 * 2**30  # a single CopyObject copies up to 5 GiB
_ACCESS_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "NoSuchBucket",
    "AccountProblem",
    "403",
}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}


@dataclass(frozen=True)
class S3Root:
    """An `s3://bucket/prefix` data root: keys below `prefix/` are the root's files."""

    bucket: str
    prefix: str  # without a leading or trailing '/'; '' for the bucket's top

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, relative: str) -> str:
        """The object key of `relative` (a path below the root, '/'-separated)."""
        parts = relative.split("/")
        if not relative or any(p in ("", ".", "..") for p in parts):
            raise UnsafeNameError(relative, f"is not a path inside the data root {self.uri}")
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def relative(self, key: str) -> str:
        """The path below the root of object `key`; UnsafeNameError for a key outside it."""
        head = f"{self.prefix}/" if self.prefix else ""
        rest = key[len(head) :] if key.startswith(head) else None
        if not rest or any(p in ("", ".", "..") for p in rest.split("/")):
            raise UnsafeNameError(key, f"lies outside the data root {self.uri}")
        return rest

    def uri_of(self, relative: str) -> str:
        return f"s3://{self.bucket}/{self.key(relative)}"


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    modified: float  # seconds since the epoch


def client():
    """The S3 client of this process, from the standard AWS chain: one per set of AWS_*
    variables (a test, or a long-lived process, may change them). Its own retries are
    few and fast; the step's retry policy (3 attempts, 5-60 s) covers longer outages."""
    return _client(_aws_environment())


@functools.cache
def _client(_aws_environment: tuple):
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"total_max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=60,
        s3={"addressing_style": os.environ.get("GEOISO_S3_ADDRESSING_STYLE", "auto")},
    )
    return boto3.session.Session().client("s3", config=config)


def etag_file(local: Path) -> Path:
    """Where a host's mirror records which object version its copy of a file is."""
    return local.with_name(f".{local.name}.etag")


def remember(local: Path, etag: str) -> None:
    etag_file(local).write_text(etag)


@contextlib.contextmanager
def mirror_lock(local: Path) -> Iterator[None]:
    """Hold this host's lock on a mirror file while its copy and its ETag record change
    or are compared: two runs fetching or publishing one file at once (containers on
    one host share the mirror) could otherwise pair one version's bytes with the other's
    ETag, and a later fetch would trust the wrong copy."""
    local.parent.mkdir(parents=True, exist_ok=True)
    lock = local.with_name(f".{local.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def mirror_holds(local: Path, info: ObjectInfo) -> bool:
    """True when the mirror's copy `local` is that very object (same ETag and size)."""
    try:
        return local.stat().st_size == info.size and etag_file(local).read_text() == info.etag
    except OSError:
        return False


def storage_error(exc: BaseException, bucket: str, key: str | None, doing: str) -> GeoisoError:
    """The project's error for an exception of the S3 client, naming the object only."""
    from botocore.exceptions import BotoCoreError, ClientError

    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "?"))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in ("PreconditionFailed", "412"):
            return BadInputError(
                where,
                f"changed after it was listed, while {doing}; it is taken again once it settles",
            )
        if code in _MISSING_CODES and key is not None:
            return BadInputError(
                where, f"does not exist (it was deleted or never arrived) while {doing}"
            )
        if code == "NoSuchBucket" or (code in _MISSING_CODES and key is None):
            return StorageAccessError(f"{where}: the bucket {bucket!r} does not exist ({doing})")
        if code in _ACCESS_CODES or status == 403:
            return StorageAccessError(
                f"{where}: access denied by the bucket {bucket!r} ({code}, HTTP {status}) "
                f"while {doing}; check the credentials and the bucket policy"
            )
        if status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError"):
            return TransientIOError(
                f"{where}: the S3 service failed ({code}, HTTP {status}) while {doing}"
            )
        return StorageAccessError(
            f"{where}: S3 refused the request ({code}, HTTP {status}) while {doing}"
        )
    if isinstance(exc, BotoCoreError | OSError):
        # EndpointConnectionError, timeouts, a reset connection: the endpoint may come back.
        return TransientIOError(
            f"{where}: S3 endpoint unreachable while {doing} ({type(exc).__name__})"
        )
    return GeoisoError(f"{where}: unexpected {type(exc).__name__} while {doing}")


def _call(doing: str, bucket: str, key: str | None, fn, **kwargs):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(Bucket=bucket, **({"Key": key} if key is not None else {}), **kwargs)
    except (ClientError, BotoCoreError, OSError) as exc:
        raise storage_error(exc, bucket, key, doing) from None


def _aws_environment() -> tuple:
    """The AWS_* variables of this process: the key of every cache of a connection."""
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))


@dataclass(frozen=True)
class Connection:
    """How this process reaches its S3 root, resolved once from the standard AWS chain
    (variables, config files, roles) by boto3, for the clients that are not boto3."""

    netloc: str | None  # host[:port] of a custom endpoint (None: AWS's own)
    https: bool
    region: str
    virtual_hosting: bool
    access_key: str | None  # None: anonymous
    secret_key: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)


def connection() -> Connection:
    """This process's connection. Credentials are frozen when it is made, so it is made
    again every 10 minutes (a role's temporary credentials last an hour at least), and
    for every set of AWS_* variables."""
    return _connection(_aws_environment(), int(time.time() // 600))


@functools.lru_cache(maxsize=4)
def _connection(_aws_environment: tuple, _period: int) -> Connection:
    from urllib.parse import urlsplit

    import boto3

    session = boto3.session.Session()
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    parts = urlsplit(endpoint) if endpoint else None
    credentials = session.get_credentials()
    frozen = credentials.get_frozen_credentials() if credentials is not None else None
    return Connection(
        netloc=parts.netloc if parts else None,
        https=(parts.scheme or "https") == "https" if parts else True,
        region=session.region_name or "us-east-1",
        virtual_hosting=os.environ.get("GEOISO_S3_ADDRESSING_STYLE") == "virtual",
        access_key=frozen.access_key if frozen else None,
        secret_key=frozen.secret_key if frozen else None,
        token=frozen.token if frozen else None,
    )


def arrow_filesystem():
    """pyarrow's S3 filesystem for reading GeoParquet in place (range requests), set up
    from the same connection as boto3 (see `connection`)."""
    return _arrow_filesystem(connection())


@functools.lru_cache(maxsize=4)
def _arrow_filesystem(how: Connection):
    from pyarrow import fs

    options: dict = {"region": how.region, "connect_timeout": 5, "request_timeout": 60}
    if how.netloc:
        options.update(endpoint_override=how.netloc, scheme="https" if how.https else "http")
    if how.virtual_hosting:
        options["force_virtual_addressing"] = True
    if how.access_key is None:
        options["anonymous"] = True
    else:
        options.update(
            access_key=how.access_key, secret_key=how.secret_key, session_token=how.token
        )
    return fs.S3FileSystem(**options)


# The names GDAL is given to read in place: its allow-list is split at commas and spaces,
# and a '?' or '#' means something to its URL handling; other names are fetched.
_GDAL_READABLE = re.compile(r"^s3://[a-z0-9][a-z0-9.-]+/[A-Za-z0-9!_.*'()@=+/-]+$")


def gdal_readable(uri: str) -> bool:
    """Whether workers may open `uri` in place through GDAL's /vsis3/ (see gdal_config)."""
    return bool(_GDAL_READABLE.match(uri))


def gdal_config(allowed: list[str]) -> dict[str, str | None]:
    """GDAL configuration options for reading the objects `allowed` (s3:// URIs, the
    source first) through /vsis3/, and no other network name: the AWS settings translated
    for GDAL (which has its own names: AWS_S3_ENDPOINT is host[:port], AWS_HTTPS,
    AWS_VIRTUAL_HOSTING), the credentials as resolved by boto3, and the allow-list.

    A one-object source is allowed by its exact name (CPL_VSIL_CURL_ALLOWED_FILENAME,
    compared exactly). A shapefile's parts need a list: CPL_VSIL_CURL_ALLOWED_EXTENSIONS,
    which GDAL compares with the end of each name, case-insensitively, so each entry is a
    whole /vsis3/ name (its leading '/' left off: GDAL wants the name longer than the
    entry). A name that differs from a part's only in case passes that comparison; the
    shapefile driver asks only for its own parts' names."""
    how = connection()
    options: dict[str, str | None] = {
        "AWS_REGION": how.region,
        "AWS_HTTPS": "YES" if how.https else "NO",
        "AWS_VIRTUAL_HOSTING": "TRUE" if how.virtual_hosting else "FALSE",
        "AWS_S3_ENDPOINT": how.netloc,
        "AWS_NO_SIGN_REQUEST": "YES" if how.access_key is None else None,
        "AWS_ACCESS_KEY_ID": how.access_key,
        "AWS_SECRET_ACCESS_KEY": how.secret_key,
        "AWS_SESSION_TOKEN": how.token,
        # Never list the folder to find a file's parts (an inbox of 10,000 objects):
        # GDAL asks for each name it wants, and only the allowed ones go out.
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        "GDAL_HTTP_MAX_RETRY": "2",
        "GDAL_HTTP_RETRY_DELAY": "1",
        "GDAL_HTTP_CONNECTTIMEOUT": "5",
        "GDAL_HTTP_TIMEOUT": "60",
    }
    names = ["/vsis3/" + uri.removeprefix("s3://") for uri in allowed]
    if len(names) == 1:
        options["CPL_VSIL_CURL_ALLOWED_FILENAME"] = names[0]
    else:
        options["CPL_VSIL_CURL_ALLOWED_EXTENSIONS"] = ",".join(n[1:] for n in names)
    return options


def split_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def arrow_error(exc: OSError, uri: str, doing: str) -> GeoisoError:
    """The project's error for an OSError of Arrow's S3 filesystem (its text names the
    bucket and key and AWS's error kind, never a credential)."""
    text = str(exc)
    if isinstance(exc, FileNotFoundError) or "NO_SUCH_KEY" in text or "does not exist" in text:
        return BadInputError(uri, f"does not exist (not materialized, or deleted) while {doing}")
    if "ACCESS_DENIED" in text or "403" in text:
        bucket = split_uri(uri)[0]
        return StorageAccessError(
            f"{uri}: access denied by the bucket {bucket!r} while {doing}; check the "
            "credentials and the bucket policy"
        )
    kind = text.split("AWS Error ", 1)[1].split(" ", 1)[0] if "AWS Error " in text else "I/O"
    return TransientIOError(f"{uri}: S3 read failed ({kind}) while {doing}")


def in_root(root: S3Root, uri: str) -> str:
    """'bucket/key' of `uri` for Arrow, once it is known to be an object of `root`
    (BadInputError or UnsafeNameError otherwise)."""
    bucket, key = split_uri(uri)
    if bucket != root.bucket:
        raise BadInputError(uri, "is not an object of this data root's bucket")
    root.relative(key)  # refuses a key outside the root's prefix
    return f"{bucket}/{key}"


def parquet_file(root: S3Root, uri: str, **kwargs):
    """A pyarrow ParquetFile over object `uri` of `root`, read in place:
    its footer, then only the column chunks asked for, by range requests."""
    import pyarrow.parquet as pq

    try:
        handle = arrow_filesystem().open_input_file(in_root(root, uri))
        return pq.ParquetFile(handle, **kwargs)
    except OSError as exc:
        raise arrow_error(exc, uri, "opening it") from None


def check_bucket(root: S3Root) -> None:
    """StorageAccessError (or TransientIOError) unless the root's bucket answers."""
    _call("checking the bucket", root.bucket, None, client().head_bucket)


def head(root: S3Root, key: str) -> ObjectInfo:
    root.relative(key)  # refuses keys outside the root
    answer = _call("reading its size", root.bucket, key, client().head_object)
    return ObjectInfo(
        key, int(answer["ContentLength"]), answer["ETag"], answer["LastModified"].timestamp()
    )


def list_objects(root: S3Root, relative_dir: str, starting: str = "") -> Iterator[ObjectInfo]:
    """The objects directly in `relative_dir/` (not in its sub-folders) whose names start
    with `starting`, page by page."""
    prefix = root.key(relative_dir) + "/" + starting
    token = None
    while True:
        extra = {"ContinuationToken": token} if token else {}
        page = _call(
            "listing", root.bucket, None, client().list_objects_v2,
            Prefix=prefix, Delimiter="/", MaxKeys=1000, **extra,
        )  # fmt: skip
        for item in page.get("Contents", []):
            yield ObjectInfo(
                item["Key"], int(item["Size"]), item["ETag"], item["LastModified"].timestamp()
            )
        if not page.get("IsTruncated"):
            return
        token = page["NextContinuationToken"]


def source_objects(root: S3Root, relative: str) -> dict[str, ObjectInfo]:
    """By name: source object `relative` and the parts its format opens beside it (exact
    stem), as listed now; listed by their stem, never the whole folder."""
    folder, _, name = relative.rpartition("/")
    wanted = {name, *formats.companion_names(name)}
    return {
        info.key.rpartition("/")[2]: info
        for info in list_objects(root, folder, starting=name.rpartition(".")[0])
        if info.key.rpartition("/")[2] in wanted
    }


def versions(root: S3Root, relative: str) -> dict[str, str]:
    """ETag by name of a source object and of the parts its format opens beside it."""
    return {name: info.etag for name, info in source_objects(root, relative).items()}


def read_chunks(
    root: S3Root, key: str, expect_etag: str, start: int = 0, length: int | None = None
) -> Iterator[bytes]:
    """The bytes of object `key` (from `start`, `length` of them or to its end), as they
    arrive; BadInputError if it is no longer version `expect_etag`."""
    root.relative(key)
    end = "" if length is None else str(start + length - 1)
    extra = {"Range": f"bytes={start}-{end}"} if start or length is not None else {}
    answer = _call("reading", root.bucket, key, client().get_object, IfMatch=expect_etag, **extra)
    try:
        yield from answer["Body"].iter_chunks(2**20)
    except Exception as exc:  # the connection dropped mid-body
        raise storage_error(exc, root.bucket, key, "reading") from None


def read_small(root: S3Root, key: str, limit: int) -> bytes:
    """The bytes of a small object (a settings sidecar); BadInputError when larger."""
    info = head(root, key)
    if info.size > limit:
        raise BadInputError(f"s3://{root.bucket}/{key}", f"is {info.size} bytes; at most {limit}")
    answer = _call("reading", root.bucket, key, client().get_object, Range=f"bytes=0-{limit}")
    return answer["Body"].read(limit + 1)


def download(root: S3Root, key: str, target: Path, expect_etag: str | None = None) -> ObjectInfo:
    """Copy object `key` to local `target` atomically (a temp, then a rename); with
    `expect_etag`, BadInputError if the object changed since it was listed."""
    root.relative(key)
    extra = {"IfMatch": expect_etag} if expect_etag else {}
    answer = _call("downloading", root.bucket, key, client().get_object, **extra)
    try:
        with fsutil.atomic_path(target) as tmp, open(tmp, "wb") as out:
            for chunk in answer["Body"].iter_chunks(PART_BYTES // 4):
                out.write(chunk)
    except OSError as exc:
        raise TransientIOError(f"{target}: {exc.strerror or exc} while downloading") from None
    except Exception as exc:  # the connection dropped mid-body
        raise storage_error(exc, root.bucket, key, "downloading") from None
    return ObjectInfo(
        key, int(answer["ContentLength"]), answer["ETag"], answer["LastModified"].timestamp()
    )


def upload(root: S3Root, source: Path, key: str, on_part=None) -> ObjectInfo:
    """Upload local `source` to `key`: one PUT when small, else a multipart upload (aborted
    on any error, so no part of it is ever visible). `on_part(n)` after each part."""
    root.relative(key)
    s3 = client()
    size = source.stat().st_size
    digest = hashlib.md5(usedforsecurity=False)
    if size <= PART_BYTES:
        body = source.read_bytes()
        answer = _call("uploading", root.bucket, key, s3.put_object, Body=body)
        return ObjectInfo(key, size, answer["ETag"], time.time())
    started = _call("starting an upload", root.bucket, key, s3.create_multipart_upload)
    upload_id = started["UploadId"]
    try:
        parts = []
        with open(source, "rb") as handle:
            number = 1
            while chunk := handle.read(PART_BYTES):
                digest.update(chunk)
                answer = _call(
                    "uploading a part", root.bucket, key, s3.upload_part,
                    UploadId=upload_id, PartNumber=number, Body=chunk,
                )  # fmt: skip
                parts.append({"PartNumber": number, "ETag": answer["ETag"]})
                if on_part is not None:
                    on_part(number)
                number += 1
        answer = _call(
            "finishing an upload", root.bucket, key, s3.complete_multipart_upload,
            UploadId=upload_id, MultipartUpload={"Parts": parts},
        )  # fmt: skip
    except BaseException:
        try:
            s3.abort_multipart_upload(Bucket=root.bucket, Key=key, UploadId=upload_id)
        except Exception:  # noqa: BLE001 - the sweep aborts it later
            pass
        raise
    return ObjectInfo(key, size, answer["ETag"], time.time())


def publish(root: S3Root, staged_key: str, key: str) -> None:
    """Make the checked staged object the published one (server-side copy, then delete).
    A copy is atomic for readers: they get the old object or the new one."""
    root.relative(staged_key)
    root.relative(key)
    source = {"Bucket": root.bucket, "Key": staged_key}
    size = head(root, staged_key).size
    if size <= _COPY_MAX:
        _call("publishing", root.bucket, key, client().copy_object, CopySource=source)
    else:  # a managed multipart copy, still server-side
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            client().copy(source, root.bucket, key)
        except (ClientError, BotoCoreError, OSError) as exc:
            raise storage_error(exc, root.bucket, key, "publishing") from None
    delete(root, staged_key)


def delete(root: S3Root, key: str) -> None:
    root.relative(key)
    _call("deleting", root.bucket, key, client().delete_object)


def discard_staged(root: S3Root, key: str) -> None:
    """Delete a staged object and abort any multipart upload still open on its key (a
    worker killed mid-upload leaves one: invisible, but billed until aborted)."""
    delete(root, key)
    uploads = _call(
        "listing uploads", root.bucket, None, client().list_multipart_uploads, Prefix=key
    )
    for item in uploads.get("Uploads", []):
        if item["Key"] == key:
            _call(
                "aborting an upload", root.bucket, key,
                client().abort_multipart_upload, UploadId=item["UploadId"],
            )  # fmt: skip


def sweep_staged(root: S3Root, key: str) -> list[str]:
    """Delete staged objects of `key` whose writer is dead (fsutil's rules: a writer of
    this host by its pid, another host's by the lease on the object's age), and abort
    their multipart uploads still open. Returns the keys swept."""
    folder, _, name = key.rpartition("/")
    stem = f"{folder}/.{fsutil.short_name(name)}{fsutil.TEMP_MARKER}"
    now = time.time()
    swept = []
    relative_dir = root.relative(key).rpartition("/")[0]
    for info in list_objects(root, relative_dir):
        if info.key.startswith(stem) and fsutil.abandoned_name(
            info.key.rpartition("/")[2], now - info.modified
        ):
            delete(root, info.key)
            swept.append(info.key)
    uploads = _call(
        "listing uploads", root.bucket, None, client().list_multipart_uploads, Prefix=stem
    )
    for item in uploads.get("Uploads", []):
        idle = now - item["Initiated"].timestamp()
        if fsutil.abandoned_name(item["Key"].rpartition("/")[2], idle):
            _call(
                "aborting an upload", root.bucket, item["Key"],
                client().abort_multipart_upload, UploadId=item["UploadId"],
            )  # fmt: skip
            swept.append(f"{item['Key']} (upload {item['UploadId'][:8]})")
    return swept
