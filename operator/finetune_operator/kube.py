"""The few Kubernetes API calls the operator makes, as plain dicts, over aiohttp.

kopf stays the framework (watches, handlers, login, settings); this module is the operator's own client
for what its handlers do: read, create and merge-patch objects, list with a label selector, with raw
JSON in and out. It speaks HTTP through aiohttp, the library kopf's own API client is built on (one
session, one pool of `CONNECTIONS` connections, per identity), and adds what kopf's internal client did
for it:

- TLS and credentials from the `kopf.ConnectionInfo` kopf logged in with (`tls`, `headers`): CA, client
  certificate, bearer token or basic auth, as a kubeconfig or a service account gives them;
- the identity: the `kopf.ConnectionInfo` the operator's `@kopf.on.login` handler returned, handed over
  through `Identity` (kopf logs in after the startup handlers have run, so the client is built on first
  use, and again whenever kopf logs in anew). A 401 makes the client run the same login once more (a
  rotated service-account token) and repeat the request once with what it returns;
- retries: 429, 500, 502, 503 and 504 answers, refused or dropped connections and timeouts are retried
  after the pauses of kopf's `settings.networking.error_backoffs` (1, 1, 2, 3, 5, 8, 13, 21 s by
  default), and a 429 or 503 that asks for a longer pause (`Retry-After`, or `retryAfterSeconds` in the
  Status body) gets it (always, with `settings.networking.enforce_retry_after`);
- timeouts: `settings.networking.request_timeout` and `connect_timeout` for every request;
- errors: an answer outside 2xx raises `ApiError` (`NotFound` for 404, `Conflict` for 409) with the
  status, the Status reason and message; no answer at all, once the retries are used up, raises
  `Unreachable` (status 0).

Why not a generated client: until 2026-12-02 this module sent its requests through kubernetes_asyncio's
`ApiClient`, for its TLS and authentication set-up only. Importing it loads every generated model class:
the operator's modules imported took 110 MiB resident with it and take 57 MiB without it (kopf also
imports any Kubernetes client library it finds installed), for an operator that uses none of them. The operator image no longer installs it.

Writes are not made idempotent here: a create retried after a lost answer meets its own object (409),
which the caller resolves (the handlers adopt by owner uid; an event with a deterministic name was
already posted).
"""

from __future__ import annotations

import asyncio
import base64
import collections.abc
import contextlib
import itertools
import json
import logging
import os
import shutil
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import aiohttp
import kopf

log = logging.getLogger("finetune_operator.kube")

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
#: Answers that mean "try again later": throttling and an API server (or what is in front of it) in trouble.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Answers whose `Retry-After` is honoured when it asks for more than the next backoff.
RETRY_AFTER_STATUSES = frozenset({429, 503})
#: How long a request waits for the first login (kopf logs in right after the startup handlers).
LOGIN_WAIT = 60.0
#: The operator's own connections to the API server at most (kubernetes_asyncio's default was 100). A
#: burst of 1,000 creates opened 224 connections between kopf's client and this one, about 40 MiB of TLS
#: buffers (bench/results/operator-scale-envtest-heap-1000-*); 16 keep the API server as busy.
CONNECTIONS = 16
USER_AGENT = f"finetune-operator aiohttp/{aiohttp.__version__}"

_TRANSPORT_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)


# --- errors ----------------------------------------------------------------------------------------


class ApiError(Exception):
    """A request the API server refused (or, `Unreachable`, never answered)."""

    def __init__(self, method: str, path: str, status: int, reason: str = "", message: str = "",
                 *, retry_after: float | None = None):
        self.method = method
        self.path = path
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after
        detail = ": ".join(part for part in (reason, message) if part)
        super().__init__(f"{method} {path}: {status}{' ' + detail if detail else ''}")


class NotFound(ApiError):
    """404: the object (or its namespace) does not exist."""


class Conflict(ApiError):
    """409: it already exists (create), or the write lost a race (resourceVersion)."""


class Unauthorized(ApiError):
    """401: the credentials were refused, also after logging in again."""


class Unreachable(ApiError):
    """No answer: connection refused or dropped, or timed out, on every attempt (status 0)."""


_ERRORS: dict[int, type[ApiError]] = {401: Unauthorized, 404: NotFound, 409: Conflict}


def _retry_after(headers: Mapping[str, str], details: Mapping[str, Any]) -> float | None:
    raw = headers.get("Retry-After")
    if raw:
        try:
            return max(0.0, float(raw))
        except ValueError:
            return None  # an HTTP date: not sent by Kubernetes; the backoff applies
    seconds = details.get("retryAfterSeconds")
    return float(seconds) if isinstance(seconds, int | float) and seconds > 0 else None


def error_from_answer(method: str, path: str, status: int, headers: Mapping[str, str], data: bytes) -> ApiError:
    """The `ApiError` for a non-2xx answer, with the reason and message of its `Status` body if any."""
    try:
        body = json.loads(data) if data else {}
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    details = body.get("details") if isinstance(body.get("details"), dict) else {}
    reason = str(body.get("reason") or "")
    message = str(body.get("message") or (data[:200].decode("utf-8", "replace") if not body else ""))
    cls = _ERRORS.get(status, ApiError)
    return cls(method, path, status, reason, message, retry_after=_retry_after(headers, details or {}))


def backoff_schedule(backoffs: float | collections.abc.Iterable[float]) -> Iterator[float | None]:
    """kopf's `networking.error_backoffs` as pauses between attempts, then None (no more attempts)."""
    pauses = backoffs if isinstance(backoffs, collections.abc.Iterable) else [backoffs]
    return itertools.chain(pauses, itertools.repeat(None))


# --- identity --------------------------------------------------------------------------------------


Relogin = Callable[[], Awaitable[kopf.ConnectionInfo | None]]


class Identity:
    """The credentials kopf logged in with, for the operator's own client (one per operator run).

    The login handler calls `update` with what it returns, and with a way to log in again; the client
    waits for the first login and notices later ones."""

    def __init__(self) -> None:
        self._info: kopf.ConnectionInfo | None = None
        self._relogin: Relogin | None = None
        self._ready = asyncio.Event()
        self._lock = asyncio.Lock()

    @property
    def info(self) -> kopf.ConnectionInfo | None:
        return self._info

    def update(self, info: kopf.ConnectionInfo | None, relogin: Relogin | None = None) -> None:
        if info is None:
            return
        self._info = info
        if relogin is not None:
            self._relogin = relogin
        self._ready.set()

    async def current(self, timeout: float = LOGIN_WAIT) -> kopf.ConnectionInfo | None:
        """The latest credentials; None if there is still no login after `timeout` seconds."""
        if self._info is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout)
        return self._info

    async def refresh(self, refused: kopf.ConnectionInfo) -> bool:
        """After a 401 with `refused`: log in again. True when there are other credentials to try."""
        async with self._lock:
            if self._info is not refused:
                return True  # someone logged in anew meanwhile (kopf itself, or a concurrent request)
            if self._relogin is None:
                return False
            info = await self._relogin()
            if info is None or info == refused:
                return False
            self._info = info
            return True


# --- configuration ---------------------------------------------------------------------------------


def _pem(data: str | bytes) -> bytes:
    """kubeconfig `*-data` fields are base64 of PEM; a PEM given as is passes through (as kopf reads them)."""
    raw = data.encode("ascii") if isinstance(data, str) else data
    return raw if raw.lstrip().startswith(b"-----BEGIN ") else base64.b64decode(raw)


def _path(value: str | bytes | os.PathLike[str] | os.PathLike[bytes] | None) -> str | None:
    return os.fsdecode(value) if value else None


def tls(info: kopf.ConnectionInfo, directory: Callable[[], str]) -> ssl.SSLContext:
    """The TLS context for exactly this identity: its CA (file or inline), its client certificate and
    key (files or inline), and no verification when the kubeconfig says `insecure-skip-tls-verify`.

    OpenSSL loads a client certificate only from files, so inline ones (a kubeconfig's
    `client-certificate-data` and `client-key-data`) are written to a private folder from `directory()`
    (called only then: an in-cluster login has none, and a pod's root is read-only) and are gone from the
    disk again as soon as the context holds them: the caller removes the folder right after."""
    ca = _path(info.ca_path)
    context = ssl.create_default_context(
        cafile=ca, cadata=None if ca or not info.ca_data else _pem(info.ca_data).decode("ascii"))
    if info.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE

    def file(name: str, path: Any, data: str | bytes | None) -> str | None:
        if path:
            return _path(path)
        if not data:
            return None
        target = os.path.join(directory(), name)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(_pem(data))
        return target

    certificate = file("client.crt", info.certificate_path, info.certificate_data)
    if certificate:
        context.load_cert_chain(certificate, file("client.key", info.private_key_path, info.private_key_data))
    return context


def headers(info: kopf.ConnectionInfo) -> dict[str, str]:
    """The headers every request of this identity carries: who we are, and its credentials (a bearer
    token with its scheme, basic auth, or a bare scheme, as kopf sends them)."""
    sent = {"User-Agent": USER_AGENT}
    if info.token:
        sent["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
    elif info.username and info.password:
        sent["Authorization"] = "Basic " + base64.b64encode(f"{info.username}:{info.password}".encode()).decode()
    elif info.scheme:
        sent["Authorization"] = info.scheme
    return sent


class _Client:
    """One aiohttp session (one connection pool of `CONNECTIONS`) for one identity."""

    def __init__(self, info: kopf.ConnectionInfo):
        self.info = info
        self.host = info.server.rstrip("/")
        scratch: list[str] = []

        def directory() -> str:
            if not scratch:
                scratch.append(tempfile.mkdtemp(prefix="finetune-operator-kube-"))  # mode 0700
            return scratch[0]

        try:
            context = tls(info, directory)
        finally:
            for folder in scratch:
                shutil.rmtree(folder, ignore_errors=True)
        # Connections are what a burst of passes costs in memory (each TLS connection holds OpenSSL
        # buffers outside Python's heap); more than a few in flight only queue on the API server's side.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=CONNECTIONS, ssl=context),
            headers=headers(info),
        )

    async def close(self) -> None:
        await self.session.close()


# --- the client -------------------------------------------------------------------------------------


class Kube:
    """The operator's Kubernetes client: JSON requests with retries, as plain dicts (see the module doc).

    One per operator run, shared by every handler (one connection pool); `close()` it at cleanup."""

    def __init__(self, settings: kopf.OperatorSettings, identity: Identity):
        self.settings = settings
        self.identity = identity
        self._client: _Client | None = None
        self._retired: list[_Client] = []

    # -- plumbing ---------------------------------------------------------------------------------

    async def _current(self, method: str, path: str) -> _Client:
        info = await self.identity.current()
        if info is None:
            raise Unreachable(method, path, 0, "NotLoggedIn", "the operator has not logged in to Kubernetes")
        if self._client is None or self._client.info is not info:
            if self._client is not None:
                # Requests in flight may still use it: closed with the rest at the end.
                self._retired.append(self._client)
            self._client = _Client(info)
        return self._client

    def _timeout(self) -> aiohttp.ClientTimeout:
        networking = self.settings.networking
        return aiohttp.ClientTimeout(total=networking.request_timeout, sock_connect=networking.connect_timeout)

    async def _once(self, client: _Client, method: str, path: str, body: Any, content_type: str,
                    params: list[tuple[str, str]] | None, answer: bool = True) -> Any:
        async with client.session.request(
            method, client.host + path,
            params=params or None,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Accept": JSON, "Content-Type": content_type},
            proxy=client.info.proxy_url or None,
            timeout=self._timeout(),
        ) as response:
            data = await response.read()
        if not 200 <= response.status <= 299:
            raise error_from_answer(method, path, response.status, response.headers, data)
        return json.loads(data) if data and answer else None

    async def request(self, method: str, path: str, body: Any = None, *, content_type: str = JSON,
                      params: list[tuple[str, str]] | None = None, answer: bool = True) -> Any:
        """One API request, retried as the module docstring says; the decoded JSON answer (None with
        `answer=False`: the caller needs only the success)."""
        what = f"{method} {path}"
        schedule = backoff_schedule(self.settings.networking.error_backoffs)
        relogged = False
        attempt = 0
        while True:
            attempt += 1
            client = await self._current(method, path)
            try:
                return await self._once(client, method, path, body, content_type, params, answer)
            except Unauthorized:
                if relogged or not await self.identity.refresh(client.info):
                    raise
                relogged = True
                log.warning(f"{what}: 401 Unauthorized; logged in again, repeating the request")
                continue
            except ApiError as err:
                if err.status not in RETRY_STATUSES:
                    raise
                failure: BaseException = err
                retry_after = err.retry_after if err.status in RETRY_AFTER_STATUSES else None
            except _TRANSPORT_ERRORS as err:
                failure, retry_after = err, None
            backoff = next(schedule)
            if backoff is None:
                log.error(f"{what}: attempt {attempt} failed, giving up: {failure!r}")
                if isinstance(failure, ApiError):
                    raise failure
                raise Unreachable(method, path, 0, type(failure).__name__, str(failure)) from failure
            if retry_after is not None and (self.settings.networking.enforce_retry_after or retry_after > backoff):
                log.warning(f"{what}: honouring the server's Retry-After of {retry_after:g}s "
                            f"instead of the backoff of {backoff:g}s")
                backoff = retry_after
            log.warning(f"{what}: attempt {attempt} failed, retrying in {backoff:g}s: {failure!r}")
            await asyncio.sleep(backoff)

    async def close(self) -> None:
        clients, self._retired = [*self._retired, *([self._client] if self._client else [])], []
        self._client = None
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()

    # -- the calls --------------------------------------------------------------------------------

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object at `path`, or None when it does not exist."""
        try:
            return dict(await self.request("GET", path))
        except NotFound:
            return None

    async def create(self, path: str, body: Mapping[str, Any], *, answer: bool = True) -> dict[str, Any]:
        """POST `body` to the collection at `path`; `Conflict` when it already exists. The created object, or
        `{}` with `answer=False` (its JSON left undecoded)."""
        return dict(await self.request("POST", path, dict(body), answer=answer) or {})

    async def patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """A JSON merge patch (RFC 7386: maps merge, lists and scalars replace, null deletes)."""
        return dict(await self.request("PATCH", path, dict(body), content_type=MERGE_PATCH))

    async def list(self, path: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        params = [("labelSelector", label_selector)] if label_selector else None
        result = await self.request("GET", path, params=params)
        return [dict(item) for item in (result or {}).get("items") or []]


__all__ = [
    "ApiError",
    "Conflict",
    "Identity",
    "Kube",
    "NotFound",
    "Unauthorized",
    "Unreachable",
    "backoff_schedule",
    "error_from_answer",
    "headers",
    "tls",
]
