"""Harness for the operator-loop tests: kmock's KubernetesEmulator as the API server, kopf as the operator.

The emulator runs on its own event loop in a background thread, so the tests are plain synchronous code
that talks to it over HTTP (like kubectl) while `kopf.testing.KopfRunner` runs the real
`finetune_operator.handlers` in another thread, logged in through a kubeconfig that points at it.

What the emulator does not do, and this harness adds (test-side, never in production code):

- discovery of kopf's backbone resources (namespaces, events, CRDs) and ours with verbs, kinds,
  scopes and the status subresource: declared in `RESOURCES`;
- what the API server fills in on create: uid, creationTimestamp, generation, resourceVersion, and a
  name from `generateName`; a 409 for an existing name is kmock's own;
- `labelSelector` on list (kmock returns every object of the resource);
- the controllers: the tests play the Job controller and kubelet (patching Job status, creating pods)
  and the garbage collector (`collect_garbage`), explicitly;
- scripted faults (`cluster.chaos`, see `tests.api.faults`): errors, lost answers, deletions racing a
  write, stalled and expired watches, and an operator killed at its k-th request. Every request is
  journaled (`cluster.chaos.journal`); the test's own client is never faulted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
import pytest
from kmock._internal import enums

from finetune_operator.crd import build_crd
from tests import polling
from tests.api.faults import GONE_EVENT, TEST_HEADER, Chaos, Fault, status_body

FTJ = "finetune.dev/v1alpha1/finetunejobs"
NAMESPACE = "default"
UID = "11111111-2222-4333-8444-555555555555"

_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
RESOURCES: dict[str, dict[str, Any]] = {
    "v1/namespaces": {"kind": "Namespace", "namespaced": False, "verbs": _VERBS},
    "v1/events": {"kind": "Event", "namespaced": True, "verbs": _VERBS},
    "v1/pods": {"kind": "Pod", "namespaced": True, "verbs": _VERBS, "subresources": {"status"}},
    "v1/configmaps": {"kind": "ConfigMap", "namespaced": True, "verbs": _VERBS},
    "v1/secrets": {"kind": "Secret", "namespaced": True, "verbs": _VERBS},
    "v1/services": {"kind": "Service", "namespaced": True, "verbs": _VERBS, "subresources": {"status"}},
    "batch/v1/jobs": {"kind": "Job", "namespaced": True, "verbs": _VERBS, "subresources": {"status"}},
    "apiextensions.k8s.io/v1/customresourcedefinitions": {
        "kind": "CustomResourceDefinition",
        "namespaced": False,
        "verbs": _VERBS,
        "subresources": {"status"},
    },
    FTJ: {
        "kind": "FineTuneJob",
        "namespaced": True,
        "verbs": _VERBS,
        "subresources": {"status"},
        "shortnames": {"ftj"},
        "singular": "finetunejob",
    },
}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _selected(obj: dict[str, Any], selector: str) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, selector.split(",")):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.split("=", 1)
            if labels.get(key.rstrip("=")) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class Emulator(kmock.KubernetesEmulator):
    """KubernetesEmulator plus what a real API server fills in (see the module docstring)."""

    _counter = 0
    #: Plurals whose creation fails with 503 before anything is stored (an API server in trouble).
    failing_creates: set[str] = set()
    #: Plurals whose next read answers 404 although the object exists: a reader racing a writer, so the
    #: operator's create gets the 409 it must handle.
    stale_reads: set[str] = set()
    #: The fault plan (set per instance by `Cluster`); None serves every request as is.
    chaos: Chaos | None = None

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._serving: list[kmock.Request] = []

    def __iter__(self) -> Iterator[kmock.Request]:
        # kmock decides which reaction serves a request with `request in view`, and a view iterates over
        # every request the server has ever seen: each request costs O(requests so far), so a test of a
        # few thousand requests slows to seconds per request. Only the requests being served now can be
        # dispatched, so the view sees just those.
        yield from self._serving

    async def _handle(self, request: kmock.Request) -> Any:
        self._serving.append(request)
        try:
            return await self._dispatch(request)
        finally:
            self._serving.remove(request)

    async def _dispatch(self, request: kmock.Request) -> Any:
        if self.chaos is None:
            return await self._serve(request)
        fault = self.chaos.decide(self.chaos.record(request))
        if fault is None:
            return await self._serve(request)
        if fault.effect == "stall":
            return await self._stall(request)
        if fault.effect == "delete-first":
            path = str(request.url.path).removesuffix("/status")
            async with self.delete(path, headers={TEST_HEADER: "1"}) as response:
                await response.read()
            return await self._serve(request)
        if fault.effect == "lose-answer":
            with contextlib.suppress(Exception):  # whatever it would have answered, the client never sees it
                await self._serve(request)
        response = aiohttp.web.json_response(status_body(fault), status=fault.status)
        if fault.retry_after is not None:
            response.headers["Retry-After"] = str(fault.retry_after)
        return response

    async def _stall(self, request: kmock.Request, limit: float = 60.0) -> Any:
        """Silence on an open connection until the client gives up (or `limit`); a watch gets its headers
        first (a stream that went quiet), any other request not even those (a server that hangs)."""
        raw = request._raw_request
        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        if request.action == enums.action.WATCH:
            await response.prepare(raw)
        deadline = time.monotonic() + limit
        while raw.transport is not None and not raw.transport.is_closing() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if not response.prepared:
            return await self._render_error(kmock.KubernetesError(503, "ServiceUnavailable", "stalled by the test"))
        return response

    async def _serve_watch(self, request: kmock.Request) -> Any:
        plural = request.resource.plural if request.resource is not None else None
        async with contextlib.aclosing(super()._serve_watch(request)) as events:
            async for item in events:
                if isinstance(item, dict) and self.chaos is not None and self.chaos.take_expiry(plural):
                    yield GONE_EVENT  # in place of this event, which the client never sees
                    return
                yield item

    async def _serve(self, request: kmock.Request) -> Any:
        if (
            request.resource is not None
            and request.action == enums.action.FETCH
            and request.resource.plural in self.stale_reads
        ):
            Emulator.stale_reads = self.stale_reads - {request.resource.plural}
            return await self._render_error(kmock.KubernetesNotFoundError())
        if (
            request.resource is not None
            and request.action == enums.action.CREATE
            and request.resource.plural in self.failing_creates
        ):
            return await self._render_error(kmock.KubernetesError(503, "ServiceUnavailable", "injected by the test"))
        if request.resource is not None and request.action == enums.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
            if request.namespace and not meta.get("namespace"):
                meta["namespace"] = request.namespace
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
            meta.setdefault("generation", 1)
        writes = (enums.action.CREATE, enums.action.UPDATE)
        if request.resource is not None and request.action in writes and isinstance(request.data, dict):
            Emulator._counter += 1
            request.data.setdefault("metadata", {})["resourceVersion"] = str(Emulator._counter)
        return await super()._handle(request)

    async def _serve_list(self, request: kmock.Request) -> Any:
        result = await super()._serve_list(request)
        selector = (request.params or {}).get("labelSelector")
        if selector:
            result["items"] = [item for item in result["items"] if _selected(item, selector)]
        return result


class Cluster:
    """The emulated API server in a background thread, with a small synchronous client (like kubectl)."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)
        self.url = ""
        self.emulator: Emulator | None = None
        self._error: BaseException | None = None
        self.chaos = Chaos()

    # -- lifecycle --------------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as err:  # surfaced by start()
            self._error = err
            self._ready.set()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with Emulator() as emulator, kmock.Server(emulator) as server:
            emulator.chaos = self.chaos
            for key, info in RESOURCES.items():
                emulator.resources[key] = kmock.ResourceInfo(**info)
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def start(self) -> Cluster:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        # The CRD object itself, as `kubectl apply -f crds/` would leave it.
        crd = build_crd()
        self.create("apiextensions.k8s.io/v1/customresourcedefinitions", crd, namespaced=False)
        return self

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def kubeconfig(self, directory: Path) -> Path:
        path = directory / "kubeconfig.yaml"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "kmock", "user": {"token": "test"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": NAMESPACE}}],
            "current-context": "kmock",
        }
        path.write_text(json.dumps(config))
        return path

    def fail_creates(self, *plurals: str) -> None:
        """Make creation of these resources fail with 503 (nothing stored) until `heal()`."""
        Emulator.failing_creates = set(plurals)

    def stale_read(self, *plurals: str) -> None:
        """The next read of each of these resources misses (404) once."""
        Emulator.stale_reads = set(plurals)

    @property
    def stale_reads_left(self) -> set[str]:
        return set(Emulator.stale_reads)

    def heal(self) -> None:
        Emulator.failing_creates = set()
        Emulator.stale_reads = set()
        self.chaos.clear()
        self.chaos.revive()

    def inject(self, *faults: Fault) -> list[Fault]:
        """Script faults for the operator's requests (see `tests.api.faults.Fault`)."""
        return self.chaos.add(*faults)

    # -- HTTP client ------------------------------------------------------------------------------

    def _path(self, resource: str, name: str | None = None, *, namespaced: bool = True, sub: str | None = None) -> str:
        parts = resource.split("/")
        prefix = f"/api/{parts[0]}" if len(parts) == 2 else f"/apis/{parts[0]}/{parts[1]}"
        plural = parts[-1]
        path = f"{prefix}/namespaces/{NAMESPACE}/{plural}" if namespaced else f"{prefix}/{plural}"
        if name:
            path += f"/{name}"
        if sub:
            path += f"/{sub}"
        return path

    def _request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", content_type)
        req.add_header(TEST_HEADER, "1")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                text = resp.read()
        except urllib.error.HTTPError as err:
            if err.code >= 500:
                raise AssertionError(f"{method} {path}: {err.code} {err.read()[:2000]!r}") from None
            raise
        return json.loads(text) if text else None

    def get(self, resource: str, name: str) -> dict[str, Any] | None:
        try:
            return self._request("GET", self._path(resource, name))
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise

    def list(self, resource: str, selector: str | None = None) -> list[dict[str, Any]]:
        path = self._path(resource)
        if selector:
            path += "?labelSelector=" + urllib.parse.quote(selector, safe="")
        return list(self._request("GET", path)["items"])

    def create(self, resource: str, body: dict[str, Any], *, namespaced: bool = True) -> dict[str, Any]:
        if namespaced:
            body.setdefault("metadata", {}).setdefault("namespace", NAMESPACE)
        return self._request("POST", self._path(resource, namespaced=namespaced), body)

    def patch(self, resource: str, name: str, body: dict[str, Any], *, sub: str | None = None) -> dict[str, Any]:
        return self._request("PATCH", self._path(resource, name, sub=sub), body, "application/merge-patch+json")

    def delete(self, resource: str, name: str) -> None:
        self._request("DELETE", self._path(resource, name))

    # -- playing the controllers ------------------------------------------------------------------

    def collect_garbage(self) -> list[str]:
        """Delete objects whose owner (by uid) no longer exists, as Kubernetes' garbage collector does."""
        alive = {o["metadata"]["uid"] for o in self.list(FTJ)}
        removed = []
        for resource in ("v1/configmaps", "v1/services", "batch/v1/jobs", "v1/pods"):
            for obj in self.list(resource):
                owners = obj["metadata"].get("ownerReferences") or []
                if owners and all(o["uid"] not in alive for o in owners if o.get("kind") == "FineTuneJob") and any(
                    o.get("kind") == "FineTuneJob" for o in owners
                ):
                    self.delete(resource, obj["metadata"]["name"])
                    removed.append(f"{resource}/{obj['metadata']['name']}")
        return removed

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.list("v1/events") if (e.get("involvedObject") or {}).get("name") == name]


def wait_for(check: Callable[[], Any], what: str, timeout: float = 20.0, interval: float = 0.05) -> Any:
    """`tests.polling.wait_for` for the emulator's fast answers (no timing is asserted)."""
    return polling.wait_for(what, check, timeout, interval)


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A local S3 server (SeaweedFS) with the bucket `out`, its endpoint and keys in the operator's environment."""
    from finetune_trainer.s3server import LocalS3

    with LocalS3(buckets=("out",)).start() as server:
        server.create_bucket("out")
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("FT_S3_ENDPOINT", server.endpoint_url)
        yield server


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    cl = Cluster().start()
    monkeypatch.setenv("KUBECONFIG", str(cl.kubeconfig(tmp_path)))
    monkeypatch.setenv("FT_STATUS_INTERVAL", "0.3")
    monkeypatch.setenv("FT_METRICS_PORT", "0")
    monkeypatch.setenv("FT_LOG_FORMAT", "text")
    monkeypatch.setenv("FT_USE_GPUS", "false")
    # No kubelet runs pods here: the pre-flight stage has its own tests (test_preflight.py), which turn it on.
    monkeypatch.setenv("FT_PREFLIGHT", "false")
    # Reports live in S3. Unless a test starts a server, S3 refuses connections at once (a closed
    # loopback port), never the real AWS: no test may depend on the network.
    monkeypatch.setenv("FT_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    try:
        yield cl
    finally:
        cl.heal()
        cl.close()


@contextlib.contextmanager
def operator(settings: Any = None, stop_timeout: float = 60) -> Iterator[Any]:
    """The real operator (`kopf run -m finetune_operator.handlers`) against the emulator.

    `settings` (a `kopf.OperatorSettings`) starts kopf from these instead of its defaults; the operator's
    startup handler still applies its own values on top (tests use it for knobs the operator leaves at
    kopf's defaults, such as `watching.inactivity_timeout`). `stop_timeout`: how long leaving the block
    waits for kopf to stop before the test fails."""
    from kopf.testing import KopfRunner

    args = ["run", "--standalone", "--all-namespaces", "--verbose", "-m", "finetune_operator.handlers"]
    with KopfRunner(args, timeout=stop_timeout, settings=settings) as runner:
        yield runner
    assert runner.exception is None, runner.output
    assert runner.exit_code == 0, runner.output


def ftj_manifest(name: str = "demo", *, uid: str | None = UID, labels: dict[str, str] | None = None,
                 suspend: bool = False, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels or {}},
        "spec": {
            "baseModel": {"uri": "hf://meta-llama/Llama-2-7b-hf"},
            "method": "qlora",
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/demo/"},
            "suspend": suspend,
            **spec,
        },
    }
    if uid:
        body["metadata"]["uid"] = uid
    return body


__all__ = ["FTJ", "NAMESPACE", "UID", "Cluster", "Fault", "ftj_manifest", "operator", "wait_for"]
