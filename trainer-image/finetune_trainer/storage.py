"""One storage abstraction over `s3://bucket/prefix`, `pvc://claim/path`, `file:///abs/path` and local dirs.

A `Store` is rooted at a URI; keys are `/`-separated paths relative to that root. The trainer writes its
checkpoints, artifacts and progress report through it and reads models and data with `fetch()`.

Errors say what to fix and never carry secret values:

* `StorageError` reason `MissingObject`: the object, prefix or bucket does not exist (the URI is named).
* `StorageError` reason `AccessDenied`: 403 / InvalidAccessKeyId / SignatureDoesNotMatch / no credentials.
* `StorageError` reason `PathNotAllowed`: a `file://` or `pvc://` path resolves outside the allowed roots.
* `StorageUnavailable` (exit code 1, so the pod is retried): S3 kept failing with connection errors,
  timeouts, throttling or 5xx for the whole retry window (`FT_S3_RETRY_SECONDS`, default 120 s), long
  enough to ride out a short outage.

Local paths (`pvc://`, `file://`) are confined, because a spec value must not be able to read arbitrary
files in the trainer image:

* `pvc://claim/path` resolves to `<FT_PVC_ROOT>/<claim>/<path>` (FT_PVC_ROOT defaults to /mnt/pvc) and its
  real path (symlinks resolved) must stay inside `<FT_PVC_ROOT>/<claim>`.
* `file:///abs/path` must resolve inside one of the allowed roots: the `os.pathsep`-separated list in
  `FT_ALLOWED_ROOTS` when set, otherwise FT_PVC_ROOT, FT_CACHE_DIR (when set) and the system temp
  directory; `fetch()` also allows its own cache directory. So `file:///etc/passwd` is refused unless
  `/etc` is listed in FT_ALLOWED_ROOTS.
* A plain path without a scheme is trusted: only code passes those (the CLI, tests), never a spec.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

from finetune_operator import uris
from finetune_operator.contract import (
    DEFAULT_PVC_ROOT,
    ENV_ALLOWED_ROOTS,
    ENV_CACHE_DIR,
    ENV_PVC_ROOT,
    MARKER_NAME,
)
from finetune_trainer.errors import ConfigError, StorageError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Total time S3 calls keep retrying transient failures before `StorageUnavailable`.
ENV_S3_RETRY_SECONDS = "FT_S3_RETRY_SECONDS"
DEFAULT_S3_RETRY_SECONDS = 120.0
_MAX_BACKOFF_SECONDS = 10.0
_CHUNK = 1 << 20

_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404", "NoSuchUpload"}
_DENIED_CODES = {
    "AccessDenied",
    "403",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
    "AccountProblem",
}
_TRANSFER_ERRORS = {"RetriesExceededError", "S3TransferFailedError", "S3UploadFailedError", "S3DownloadFailedError"}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
    "502",
    "504",
}


class StorageUnavailable(StorageError):
    """S3 could not be reached for the whole retry window. Retryable: the pod exits 1 and is restarted."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message, reason="StorageUnavailable")


# ------------------------------------------------------------------------------------------------
# Local path confinement
# ------------------------------------------------------------------------------------------------


def pvc_root() -> Path:
    return Path(os.environ.get(ENV_PVC_ROOT) or DEFAULT_PVC_ROOT)


def allowed_roots(extra: tuple[Path, ...] = ()) -> list[Path]:
    """Roots a `file://` URI may resolve inside (see the module docstring for the rule)."""
    configured = os.environ.get(ENV_ALLOWED_ROOTS)
    if configured:
        roots = [Path(p) for p in configured.split(os.pathsep) if p]
    else:
        roots = [pvc_root(), Path(tempfile.gettempdir())]
        if os.environ.get(ENV_CACHE_DIR):
            roots.append(Path(os.environ[ENV_CACHE_DIR]))
    return [*roots, *extra]


def _inside(path: Path, root: Path) -> bool:
    real_root = os.path.realpath(root)
    return os.path.commonpath([os.path.realpath(path), real_root]) == real_root


def resolve_local(uri: str, *, extra_roots: tuple[Path, ...] = ()) -> Path:
    """The local path of a `pvc://`, `file://` or plain-path URI, confined as the module docstring says.

    Does not check existence. Raises ConfigError for a malformed URI and StorageError PathNotAllowed for a
    path outside its allowed roots.
    """
    if "://" not in uri:
        return Path(uri)
    parsed = _parse(uri, ("pvc", "file"))
    if parsed.scheme == "pvc":
        claim_root = pvc_root() / parsed.authority
        path = claim_root / parsed.path if parsed.path else claim_root
        if not _inside(path, claim_root):
            raise StorageError(
                f"{uri} resolves to {os.path.realpath(path)}, outside the claim mount {claim_root}; "
                "symlinks may not leave the volume",
                reason="PathNotAllowed",
            )
        return path
    path = Path(parsed.path)
    roots = allowed_roots(extra_roots)
    if not any(_inside(path, root) for root in roots):
        listed = os.pathsep.join(str(r) for r in roots)
        raise StorageError(
            f"{uri} resolves to {os.path.realpath(path)}, outside the allowed roots ({listed}); use a pvc:// "
            f"or s3:// URI, or add the directory to {ENV_ALLOWED_ROOTS}",
            reason="PathNotAllowed",
        )
    return path


def _parse(uri: str, allowed: tuple[str, ...]) -> uris.Uri:
    try:
        return uris.parse(uri, allowed)
    except ValueError as err:
        raise ConfigError(str(err), reason="InvalidURI") from None


def _check_key(key: str) -> str:
    """Keys are relative, `/`-separated and never traverse upwards."""
    if key.startswith("/") or any(part in ("..", ".") for part in key.split("/")) or "\\" in key:
        raise ConfigError(f"storage key {key!r} must be a relative path without '.' or '..' segments",
                          reason="InvalidKey")
    return key


def _join(prefix: str, key: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{key}" if prefix else key


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# Stores
# ------------------------------------------------------------------------------------------------


class Store(ABC):
    """Objects under one root URI. Keys are relative to the root."""

    uri: str

    @staticmethod
    def for_uri(uri: str, *, retry_seconds: float | None = None) -> Store:
        """A store for `s3://bucket/prefix`, `pvc://claim/path`, `file:///abs/path` or a local directory.

        S3 settings come from the environment: AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3), AWS_REGION /
        AWS_DEFAULT_REGION, and boto3's default credential chain (env keys from the secretRef, IRSA web
        identity, instance profile). `retry_seconds` bounds the retry window (default FT_S3_RETRY_SECONDS
        or 120 s).
        """
        if "://" not in uri:
            return LocalStore(Path(uri), uri=uri)
        parsed = _parse(uri, ("s3", "pvc", "file"))
        if parsed.scheme == "s3":
            return S3Store(parsed.authority, parsed.path, retry_seconds=retry_seconds)
        return LocalStore(resolve_local(uri), uri=uri.rstrip("/"))

    @abstractmethod
    def child(self, key: str) -> str:
        """The URI of `key`."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None: ...

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """Up to `length` bytes of `key` from byte `start` (fewer at the end of the object). The stores below
        read only those bytes (a ranged GET on S3); this fallback reads the whole object."""
        return self.read_bytes(key)[start:start + length]

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys (relative to the root) that start with `prefix`, sorted."""

    @abstractmethod
    def upload_file(self, local_path: str | os.PathLike[str], key: str) -> None: ...

    @abstractmethod
    def download_file(self, key: str, local_path: str | os.PathLike[str]) -> Path: ...

    @abstractmethod
    def _delete_keys(self, keys: list[str]) -> None: ...

    # -- shared behaviour ------------------------------------------------------------------------

    def read_json(self, key: str) -> Any:
        data = self.read_bytes(key)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StorageError(f"{self.child(key)} is not valid JSON: {err}", reason="InvalidObject") from None

    def write_json(self, key: str, obj: Any) -> None:
        self.write_bytes(key, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def is_complete(self, prefix: str) -> bool:
        """Whether the marker object `prefix/_COMPLETE` exists (it is written after everything else)."""
        return self.exists(_join(prefix, MARKER_NAME))

    def delete_prefix(self, prefix: str) -> None:
        """Delete every key under `prefix` (the marker first, so a half-deleted set never looks complete)."""
        keys = self.list(_dir_prefix(prefix))
        marker = _join(prefix, MARKER_NAME)
        ordered = [k for k in keys if k == marker] + [k for k in keys if k != marker]
        if ordered:
            self._delete_keys(ordered)

    def upload_dir(
        self, local_dir: str | os.PathLike[str], prefix: str, *, marker: bool = True, parallel: int = 8
    ) -> dict[str, Any]:
        """Upload every file under `local_dir` to `prefix/`, then write the marker with a manifest.

        Files go up in parallel; the marker `prefix/_COMPLETE` (JSON: every file's key, size and sha256)
        is written last and only when every upload succeeded. An old marker is removed first, so a
        re-upload over a complete set is not "complete" until it has finished. Returns the manifest.
        """
        root = Path(local_dir)
        if not root.is_dir():
            raise StorageError(f"cannot upload {root}: not a directory", reason="MissingObject")
        files = sorted(
            p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != MARKER_NAME
        )
        marker_key = _join(prefix, MARKER_NAME)
        if marker and self.exists(marker_key):
            self._delete_keys([marker_key])

        def one(path: Path) -> dict[str, Any]:
            rel = path.relative_to(root).as_posix()
            entry = {"path": rel, "size": path.stat().st_size, "sha256": sha256_of(path)}
            self.upload_file(path, _join(prefix, rel))
            return entry

        entries = _run_all(one, files, parallel)
        manifest = {
            "files": entries,
            "count": len(entries),
            "total_bytes": sum(int(e["size"]) for e in entries),
        }
        if marker:
            self.write_json(marker_key, manifest)
        return manifest

    def download_prefix(
        self, prefix: str, local_dir: str | os.PathLike[str], *, parallel: int = 8
    ) -> Path:
        """Download every key under `prefix/` into `local_dir` (relative layout kept). Returns `local_dir`."""
        dest = Path(local_dir)
        base = _dir_prefix(prefix)
        keys = self.list(base)
        if not keys:
            raise StorageError(f"no objects under {self.child(base) if base else self.uri}", reason="MissingObject")
        dest.mkdir(parents=True, exist_ok=True)

        def one(key: str) -> None:
            rel = key[len(base):]
            target = dest / _check_key(rel)
            self.download_file(key, target)

        _run_all(one, keys, parallel)
        return dest


def _dir_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


def _run_all(fn: Callable[[Any], T], items: list[Any], parallel: int) -> list[T]:
    """Run `fn` over `items` on a thread pool; wait for all, then raise the first failure (in item order)."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(items)))) as pool:
        futures = [pool.submit(fn, item) for item in items]
        _, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:  # stop starting new transfers after the first failure
            future.cancel()
    errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
    if errors:
        if len(errors) > 1:
            log.warning("%d of %d transfers failed; first: %s", len(errors), len(items), errors[0])
        raise errors[0]  # type: ignore[misc]
    return [f.result() for f in futures]


class LocalStore(Store):
    """A directory (PVC mount, file:// path or plain local directory)."""

    def __init__(self, root: Path, *, uri: str | None = None):
        self.root = root
        self.uri = uri or str(root)

    def child(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{_check_key(key)}" if key else self.uri

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise StorageError(f"{self.child(key)} does not exist", reason="MissingObject") from None
        except PermissionError:
            raise StorageError(f"permission denied reading {self.child(key)}", reason="AccessDenied") from None

    def read_range(self, key: str, start: int, length: int) -> bytes:
        try:
            with open(self._path(key), "rb") as fh:
                fh.seek(start)
                return fh.read(length)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise StorageError(f"{self.child(key)} does not exist", reason="MissingObject") from None
        except PermissionError:
            raise StorageError(f"permission denied reading {self.child(key)}", reason="AccessDenied") from None

    def _atomic(self, key: str, write: Callable[[Path], None]) -> None:
        # Temp file in the same directory + rename: a reader never sees half a file, even after a crash.
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            write(Path(tmp))
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def write_bytes(self, key: str, data: bytes) -> None:
        self._atomic(key, lambda tmp: tmp.write_bytes(data))

    def upload_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        source = Path(local_path)
        if not source.is_file():
            raise StorageError(f"cannot upload {source}: no such file", reason="MissingObject")
        self._atomic(key, lambda tmp: shutil.copyfile(source, tmp))

    def download_file(self, key: str, local_path: str | os.PathLike[str]) -> Path:
        source = self._path(key)
        if not source.is_file():
            raise StorageError(f"{self.child(key)} does not exist", reason="MissingObject")
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        LocalStore(dest.parent).upload_file(source, dest.name)
        return dest

    def list(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            return []
        keys = []
        for path in self.root.rglob("*"):
            # in-flight temp files of _atomic are not objects
            if path.is_file() and not (path.name.startswith(".") and path.name.endswith(".tmp")):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def _delete_keys(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        # prune directories left empty, deepest first
        for parent in sorted({self._path(k).parent for k in keys}, key=lambda p: len(p.parts), reverse=True):
            while parent != self.root and _inside(parent, self.root):
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent

    def __repr__(self) -> str:
        return f"LocalStore({self.uri!r})"


# ------------------------------------------------------------------------------------------------
# S3
# ------------------------------------------------------------------------------------------------


def _error_code(err: BaseException) -> tuple[str, int | None]:
    response = getattr(err, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code, status


def _chain(err: BaseException) -> Iterator[BaseException]:
    """The error and what caused it (s3transfer wraps ClientErrors without `from`)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        last = getattr(current, "last_exception", None)
        current = current.__cause__ or current.__context__ or (last if isinstance(last, BaseException) else None)


def classify(err: BaseException, uri: str, action: str) -> StorageError | None:
    """A permanent StorageError for an S3 failure `err`, or None when it is transient (retry it)."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError,
        CredentialRetrievalError,
        HTTPClientError,
        IncompleteReadError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    for cause in _chain(err):
        if isinstance(cause, StorageError):
            return cause
        if isinstance(cause, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
            return StorageError(
                f"no usable S3 credentials to {action} {uri} ({type(cause).__name__}); set a secretRef with "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or give the service account an IAM role",
                reason="AccessDenied",
            )
        if isinstance(cause, ClientError):
            code, status = _error_code(cause)
            if code in _MISSING_CODES or status == 404:
                what = "bucket" if code == "NoSuchBucket" else "object"
                return StorageError(f"cannot {action} {uri}: the {what} does not exist ({code or status})",
                                    reason="MissingObject")
            if code in _DENIED_CODES or status == 403:
                return StorageError(
                    f"access denied to {action} {uri} ({code or status}); check the secretRef's "
                    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the service account's IAM role) and the "
                    "bucket policy",
                    reason="AccessDenied",
                )
            if code in _TRANSIENT_CODES or (status is not None and status >= 500):
                return None
            message = cause.response.get("Error", {}).get("Message", "")
            return StorageError(f"cannot {action} {uri}: {code or status} {message}".strip(), reason="S3Error")
        if isinstance(cause, ConnectionError | HTTPClientError | IncompleteReadError):
            return None
        if isinstance(cause, BotoCoreError):
            return StorageError(f"cannot {action} {uri}: {cause}", reason="S3Error")
    return None  # s3transfer gave up after its own retries of a transient error


def _is_s3_failure(err: BaseException) -> bool:
    """Whether `err` came from S3 (botocore or s3transfer), as opposed to a local bug or disk error."""
    from botocore.exceptions import BotoCoreError, ClientError

    return any(
        isinstance(c, BotoCoreError | ClientError | StorageError) or type(c).__name__ in _TRANSFER_ERRORS
        for c in _chain(err)
    )


class S3Store(Store):
    """Objects under `s3://bucket/prefix/`."""

    def __init__(self, bucket: str, prefix: str = "", *, retry_seconds: float | None = None, parallel: int = 16):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = _dir_prefix(prefix)
        self.uri = f"s3://{bucket}/{self.prefix}"
        if retry_seconds is None:
            retry_seconds = float(os.environ.get(ENV_S3_RETRY_SECONDS) or DEFAULT_S3_RETRY_SECONDS)
        self.retry_seconds = retry_seconds
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
        config = Config(
            # botocore retries each call a few times quickly; `_call` adds the bounded outer window
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=max(10, parallel * 2),
            # S3-compatible servers behind a custom endpoint rarely do virtual-host buckets
            s3={"addressing_style": "path" if endpoint else "auto"},
        )
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)
        self._transfer = TransferConfig(max_concurrency=4, multipart_threshold=64 * _CHUNK)

    def _key(self, key: str) -> str:
        return self.prefix + _check_key(key) if key else self.prefix

    def child(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _call(self, action: str, uri: str, fn: Callable[[], T]) -> T:
        """Run `fn`, retrying transient failures with backoff until `retry_seconds` have passed."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.5
        while True:
            try:
                return fn()
            except Exception as err:
                if not _is_s3_failure(err):
                    raise
                failure = classify(err, uri, action)
                if failure is not None:
                    raise failure from None
                if time.monotonic() + delay > deadline:
                    raise StorageUnavailable(
                        f"cannot {action} {uri}: S3 kept failing for {self.retry_seconds:.0f}s "
                        f"({type(err).__name__}: {err})"
                    ) from err
                log.warning("S3 %s %s failed (%s); retrying in %.1fs", action, uri, type(err).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF_SECONDS)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        def head() -> bool:
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as err:
                code, status = _error_code(err)
                if status == 404 or code in _MISSING_CODES:
                    return False
                raise
            return True

        return self._call("check", self.child(key), head)

    def read_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            with contextlib.closing(body):
                return bytes(body.read())

        return self._call("read", self.child(key), get)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""

        def get() -> bytes:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key),
                                          Range=f"bytes={start}-{start + length - 1}")["Body"]
            with contextlib.closing(body):
                return bytes(body.read())

        return self._call("read", self.child(key), get)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call("write", self.child(key),
                   lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data))

    def list(self, prefix: str = "") -> list[str]:
        return [key for key, _, _ in self.listing(prefix)]

    def listing(self, prefix: str = "") -> list[tuple[str, str, int]]:
        """(key, ETag, size) of every object under `prefix`, keys relative to the root, sorted."""
        full = self.prefix + prefix

        def pages() -> list[tuple[str, str, int]]:
            found = []
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    found.append((obj["Key"][len(self.prefix):], str(obj.get("ETag", "")), int(obj["Size"])))
            return sorted(found)

        return self._call("list", f"s3://{self.bucket}/{full}", pages)

    def upload_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        source = Path(local_path)
        if not source.is_file():
            raise StorageError(f"cannot upload {source}: no such file", reason="MissingObject")
        self._call("write", self.child(key), lambda: self.client.upload_file(
            str(source), self.bucket, self._key(key), Config=self._transfer))

    def download_file(self, key: str, local_path: str | os.PathLike[str]) -> Path:
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # download next to the target and rename, so a partial file never has the final name
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")

        def get() -> None:
            self.client.download_file(self.bucket, self._key(key), str(tmp), Config=self._transfer)
            os.replace(tmp, dest)

        try:
            self._call("read", self.child(key), get)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def _delete_keys(self, keys: list[str]) -> None:
        full = [self._key(k) for k in keys]
        for start in range(0, len(full), 1000):  # DeleteObjects takes at most 1000 keys
            batch = full[start:start + 1000]

            def delete(batch: list[str] = batch) -> None:
                result = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
                if result.get("Errors"):
                    first = result["Errors"][0]
                    raise StorageError(
                        f"cannot delete s3://{self.bucket}/{first.get('Key')}: {first.get('Code')} "
                        f"{first.get('Message', '')}".strip(),
                        reason="AccessDenied" if first.get("Code") == "AccessDenied" else "S3Error",
                    )

            self._call("delete", self.uri, delete)

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r})"


# ------------------------------------------------------------------------------------------------
# fetch: materialize a model or dataset locally
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock file, so local ranks sharing a cache download (or merge) once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch(uri: str, cache_dir: str | os.PathLike[str], *, revision: str | None = None, parallel: int = 8) -> Path:
    """A local path holding `uri`: a directory for a prefix or model, a file for a single object.

    * `s3://bucket/prefix/` or `s3://bucket/key`: downloaded under `cache_dir/s3/<sha256(uri)[:24]>/`;
      the copy is reused while the listing (keys, ETags, sizes) is unchanged.
    * `hf://org/name` (with `revision`): `huggingface_hub.snapshot_download` into `cache_dir/hf`.
    * `pvc://`, `file://`, plain paths: the path itself, after checking it exists and is allowed.
    """
    cache = Path(cache_dir)
    if "://" not in uri or uri.startswith(("pvc://", "file://")):
        path = resolve_local(uri, extra_roots=(cache,))
        if not path.exists():
            raise StorageError(f"{uri} does not exist (looked at {path})", reason="MissingObject")
        return path
    parsed = _parse(uri, tuple(uris.SCHEMES))
    if parsed.scheme == "hf":
        return _fetch_hf(uri, parsed.authority, revision, cache / "hf")
    return _fetch_s3(uri, parsed, cache, parallel)


def _fetch_s3(uri: str, parsed: uris.Uri, cache: Path, parallel: int) -> Path:
    store = S3Store(parsed.authority)
    path = parsed.path
    listing = store.listing(path)
    single = bool(path) and not path.endswith("/") and any(key == path for key, _, _ in listing)
    if single:
        listing = [item for item in listing if item[0] == path]
    else:
        base = _dir_prefix(path)
        listing = [item for item in listing if item[0].startswith(base)]
    if not listing:
        raise StorageError(f"{uri} does not exist: no object or prefix with that name", reason="MissingObject")

    # `s3://b/model` and `s3://b/model/` name the same prefix: one cache entry
    normalized = f"s3://{parsed.authority}/{path if single else path.rstrip('/')}"
    entry = cache / "s3" / hashlib.sha256(normalized.encode()).hexdigest()[:24]
    content = entry / "content"
    result = content / Path(path).name if single else content
    wanted = {"uri": normalized, "objects": [list(item) for item in listing]}
    with locked(entry.with_suffix(".lock")):
        stamp = entry / "listing.json"
        if stamp.is_file() and json.loads(stamp.read_text()) == wanted and result.exists():
            log.info("using cached copy of %s at %s", uri, result)
            return result
        staging = Path(tempfile.mkdtemp(prefix=entry.name + ".", dir=entry.parent))
        try:
            if single:
                store.download_file(path, staging / "content" / Path(path).name)
            else:
                store.download_prefix(path, staging / "content", parallel=parallel)
            (staging / "listing.json").write_text(json.dumps(wanted, sort_keys=True))
            if entry.exists():
                shutil.rmtree(entry)
            os.replace(staging, entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return result


def _fetch_hf(uri: str, repo_id: str, revision: str | None, cache: Path) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as err:  # pragma: no cover - huggingface_hub ships with transformers
        raise StorageError(f"cannot fetch {uri}: huggingface_hub is not installed ({err})") from None
    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision, cache_dir=str(cache)))
    except GatedRepoError:
        raise StorageError(
            f"access to {uri} is gated; accept its license on the hub and set HF_TOKEN through the "
            "baseModel secretRef",
            reason="AccessDenied",
        ) from None
    except RevisionNotFoundError:
        raise StorageError(f"{uri} has no revision {revision!r}", reason="MissingObject") from None
    except RepositoryNotFoundError:
        raise StorageError(
            f"{uri} was not found on the Hugging Face hub (or it is private: set HF_TOKEN through the "
            "baseModel secretRef)",
            reason="MissingObject",
        ) from None
    except LocalEntryNotFoundError as err:
        raise StorageUnavailable(
            f"cannot download {uri}: the Hugging Face hub is unreachable and no cached copy exists ({err}); "
            "check network egress, or copy the model to s3:// or pvc:// and point baseModel.uri there"
        ) from None
    except OSError as err:
        raise StorageUnavailable(f"cannot download {uri} from the Hugging Face hub: {err}") from None
