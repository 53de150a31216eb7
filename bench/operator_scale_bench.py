"""Operator scale: N FineTuneJobs created at once; time until every Job exists, latency, operator RSS.

For each size N (`-n 100 1000` on the emulator, `100 1000 5000` on a real API server by default) one fresh run:

1. the API, by `--api`:
   - `envtest` (what `auto` picks when `KUBEBUILDER_ASSETS` is set or `../shared/envtest` exists next to the
   repository): a fresh real control plane per size from tests/envtest.py (etcd, kube-apiserver,
   kube-controller-manager on loopback, on this machine beside the operator), with an audit policy that
   logs the operator's requests (Metadata level, stage RequestReceived); the CRD from crds/ is applied and
   Established, and the operator runs as its own user (a client certificate CN=finetune-operator,
   O=system:masters), so the audit log tells its requests from the bench's;
   - `emulator` (`auto` without a control plane): kmock's KubernetesEmulator in its own process, served
   over HTTP on 127.0.0.1 (discovery lists kopf's backbone resources, and the emulator fills in what an API server does on create, as in
   tests/api/conftest.py). kmock's request dispatch and object lookups scan everything served and
   stored so far; here they are constant-time (`FastDispatch`, `__get_objs`), else kmock itself would be
   what is measured. `--api-latency-ms` delays each answer like a real API server's round trip.
   - `cluster`: the cluster of `KUBECONFIG`: the run uses a fresh namespace `ftbench-<random>` and deletes
   it at the end (the cluster's garbage collector removes the children). The FineTuneJob CRD must be installed there already
   (`kubectl apply -f crds/`); a finetune-operator deployed in that cluster would reconcile the bench's
   jobs too, so stop it for the run;
2. S3: a local SeaweedFS (`weed mini` on 127.0.0.1, finetune_trainer.s3server) with empty buckets, so
   each reconcile pays for a real report read that finds no report yet (a job that has not started);
3. the operator as its own process, in an environment of its own with only what its image installs
   (`operator_environment`: `pip install .`, no test or trainer packages; `--operator-python` overrides),
   exactly as the Helm chart runs it
   (`kopf run --module=finetune_operator.handlers --standalone --all-namespaces`, or `--namespace` on a
   cluster), with the production status interval (FT_STATUS_INTERVAL unset: 10 s) and JSON logs to a
   file. One warm-up FineTuneJob proves it is up (its Job exists) before the clock starts;
4. on a real API server, first the create-only baseline: the same N FineTuneJobs, same concurrency, in a
   namespace of their own, with no operator running (after 16 untimed warm-up creates; a fresh CRD's
   first creates are slow); with `--api envtest` then the minimum-writes baseline (`minimum_writes_baseline`:
   per job what any operator must have the API server do, done by the bench: the FineTuneJob, its three
   children, one status write, one event). On envtest both run on a fresh control plane of their own,
   stopped before the operator's run starts on another fresh one (`baselines_on_own_plane`); on a
   `cluster` the create-only baseline's jobs are deleted again before the operator starts;
5. N FineTuneJobs (7B..70B, LoRA/QLoRA/full, all `suspend: true` so a real cluster starts no pods),
   created with 16 requests in flight; the bench watches Jobs and FineTuneJobs and records when each
   Job first appears and when each FineTuneJob first has a status phase;
6. then it keeps watching for `--settle` seconds (default 28); the last three quarters of that (21 s, two
   status intervals) are the steady state, in which only the operator's status refresher works.

Figures (one `name=value` line each, all from this run):

- `operator_jobs_<N>_seconds`: from the first create request until the last of the N Jobs exists;
- `operator_status_<N>_seconds`: until every FineTuneJob has a status phase;
- `operator_reconcile_p50_ms_<N>` / `_p99_`: per FineTuneJob, from its create request returning until
  its Job appears in the bench's watch (end to end: kopf's queueing, the reconcile, the API);
- `operator_reconcile_pass_p50_ms_<N>` / `_p99_` / `_mean_`: one reconcile pass as the operator itself
  measures it (`finetune_operator_reconcile_duration_seconds`, every pass of the run: creates, Job
  events, refreshes; quantiles interpolated within the histogram's buckets as Prometheus does);
- `operator_refresh_cycle_seconds_<N>`: in the steady state (all passes are the status refresher's), how
  long one refresh of every job takes: the N+1 jobs divided by the passes per second of the 0.25 s
  periods in which passes happened. A status is at most one interval plus one cycle old;
- `operator_rss_mb_<N>`: peak resident memory of the operator process (VmHWM, MiB), and
  `operator_rss_start_mb_<N>` after the warm-up job, `operator_rss_end_mb_<N>` after the steady state;
- `operator_cpu_seconds_<N>`: operator CPU time from the first create until the statuses are set;
  `operator_steady_cpu_percent_<N>`: its CPU use in the steady state (100 = one core).

On a real API server also:

- `operator_create_only_<N>_seconds`: the baseline above; `operator_jobs_vs_create_only_<N>`: the ratio of
  `operator_jobs_<N>_seconds` to it; `operator_minimum_writes_<N>_seconds` and
  `operator_jobs_vs_minimum_writes_<N>`: the same for the minimum-writes baseline;
- `operator_requests_per_job_<N>` (envtest): the operator's API requests (kopf's and the handlers' own,
  from the audit log) from the first create until the steady state begins, per FineTuneJob, and one
  figure per verb and resource (`operator_requests_per_job_<N>_get_finetunejobs`, `..._create_jobs`,
  `..._patch_finetunejobs_status`, ...); `operator_requests_settling_<N>`: how many of them came after every
  status was set; `operator_steady_requests_per_second_<N>` (and per job per minute) in the steady state,
  broken down on a `#` line;
- `kube_apiserver_cpu_seconds_<N>`, `etcd_...`, `kube_controller_manager_...` (envtest: child processes of
  the bench) from the first create until the statuses are set, and `..._steady_cpu_percent_<N>`.

`--tracemalloc FRAMES` runs the operator under bench/kopf_tracemalloc.py and prints the traced heap after the
warm-up job and at the end of the steady state (`operator_heap_start_mb_<N>`, `..._end_mb_`,
`operator_heap_kib_per_job_<N>`) and the top 10 lines and files by growth.

Targets at 1,000 jobs: every Job within 60 s, within 1.3x of the create-only time (real API), peak RSS under
150 MiB, steady-state CPU under 10% of a core: `operator_targets_met=true|false`. A
missed target is not an error; the exit status is non-zero only when the benchmark itself breaks (the
API or the operator dies, a request fails). The benchmark gives up after `--timeout` seconds (default
300 on the emulator, 3600 on a real API server, all sizes together; a size cut short reports what it measured), and every process it starts is
stopped at the end (and dies with it: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from benchlib import cpu_model

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
CRD_NAME = f"{PLURAL}.{GROUP}"
BUCKETS = ("bench-data", "bench-out")
CONCURRENCY = 16
TARGET_JOBS_SECONDS = 60.0
TARGET_RATIO = 1.3  # Jobs time / create-only time
TARGET_RSS_MIB = 150.0
TARGET_STEADY_CPU_PERCENT = 10.0
TARGET_SIZE = 1000
DEFAULT_TIMEOUT_REAL = 3600.0  # --timeout on a real API server: 100 + 1,000 + 5,000 jobs on 2 cores
REPO = Path(__file__).resolve().parent.parent
# tests.envtest: the real control plane (--api envtest), free ports, children that die with the bench.
sys.path.insert(0, str(REPO))
from tests import envtest  # noqa: E402

#: The identity the operator runs as on envtest: its requests are told apart in the audit log by it.
OPERATOR_USER = "finetune-operator"
AUDIT_POLICY = f"""apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["ResponseStarted", "ResponseComplete"]
rules:
- level: Metadata
  users: ["{OPERATOR_USER}"]
- level: None
"""

_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
#: Discovery for the emulator: kopf's backbone resources and everything the operator touches.
RESOURCES: dict[str, dict[str, Any]] = {
    "v1/namespaces": {"kind": "Namespace", "namespaced": False, "verbs": _VERBS},
    "v1/events": {"kind": "Event", "namespaced": True, "verbs": _VERBS},
    "v1/pods": {"kind": "Pod", "namespaced": True, "verbs": _VERBS, "subresources": {"status"}},
    "v1/configmaps": {"kind": "ConfigMap", "namespaced": True, "verbs": _VERBS},
    "v1/services": {"kind": "Service", "namespaced": True, "verbs": _VERBS, "subresources": {"status"}},
    "batch/v1/jobs": {"kind": "Job", "namespaced": True, "verbs": _VERBS, "subresources": {"status"}},
    "apiextensions.k8s.io/v1/customresourcedefinitions": {
        "kind": "CustomResourceDefinition", "namespaced": False, "verbs": _VERBS, "subresources": {"status"},
    },
    f"{GROUP}/{VERSION}/{PLURAL}": {
        "kind": "FineTuneJob", "namespaced": True, "verbs": _VERBS, "subresources": {"status"},
        "shortnames": {"ftj"}, "singular": "finetunejob",
    },
}


class BenchError(RuntimeError):
    """The benchmark itself broke (not a missed target)."""


# --- child processes --------------------------------------------------------------------------------


def _spawn(cmd: list[str], env: Mapping[str, str], log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd, env=dict(env), stdout=kwargs.pop("stdout", out), stderr=out, stdin=subprocess.DEVNULL,
            preexec_fn=envtest.die_with_parent, **kwargs,
        )


def _stop(proc: subprocess.Popen[bytes] | None, grace: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- the emulated API server (runs in its own process: `--serve-emulator`) --------------------------


def _forget(journal: list[Any], request: Any) -> None:
    """Remove `request` (by identity) from a kmock request journal."""
    for i in range(len(journal) - 1, -1, -1):
        if journal[i] is request:
            del journal[i]
            return


async def _serve_emulator(latency: float) -> None:
    """kmock's KubernetesEmulator on 127.0.0.1 plus what an API server fills in; prints `URL <url>`.

    `latency` (seconds) delays every answer but a watch's, like the round trip to a real API server.
    """
    import uuid
    from datetime import UTC, datetime

    import kmock
    from kmock._internal import enums

    counter = 0
    indexed: list[Any] = []  # keys of kmock's object store, in insertion order
    by_resource: dict[Any, list[Any]] = {}  # resource -> its keys

    def reindex(store: dict[Any, Any]) -> None:
        for key in itertools.islice(store, len(indexed), None):
            indexed.append(key)
            by_resource.setdefault(key[0], []).append(key)

    #: (action, named) -> the reaction kmock picked for the first such Kubernetes request.
    reactions: dict[tuple[Any, bool], Any] = {}

    class FastDispatch(kmock.RawHandler):
        """kmock's reaction lookup, remembered per kind of Kubernetes request.

        kmock picks a reaction by testing `request in reaction._source`, which scans its journal of requests
        through every reaction's filters: quadratic in the requests served (a 100-job run took 4 CPU
        minutes in the emulator). The emulator's own reactions depend on the action alone, so the one kmock
        found for the first LIST/FETCH/CREATE/... request serves every later one; the journals are emptied.
        """

        __slots__ = ()

        async def _handle(self, request: Any) -> Any:
            key = (request.action, request.name is not None)
            try:
                if request.resource is None or request.resource.plural is None or request.action is None:
                    return await super()._handle(request)  # discovery and other non-object requests
                if key not in reactions:
                    for payload in self._payloads:
                        payload._requests.clear()
                    response = await super()._handle(request)
                    found = next((p for p in self._payloads if request in p._requests), None)
                    if found is not None and key not in reactions:  # (None: a concurrent first cleared it)
                        reactions[key] = found
                        served = getattr(found.response.payload, "__name__", "?")
                        print(f"{key[0].name} {'named' if key[1] else 'collection'}: {served}", file=sys.stderr)
                    return response
                return await reactions[key](request)
            finally:
                _forget(self._requests, request)
                for payload in self._payloads:
                    _forget(payload._requests, request)

    class Emulator(kmock.KubernetesEmulator, FastDispatch):
        async def _handle(self, request: Any) -> Any:
            nonlocal counter
            if request.resource is not None and isinstance(request.data, dict):
                if request.action == enums.action.CREATE:
                    meta = request.data.setdefault("metadata", {})
                    if not meta.get("name") and meta.get("generateName"):
                        meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                    if request.namespace and not meta.get("namespace"):
                        meta["namespace"] = request.namespace
                    meta.setdefault("uid", str(uuid.uuid4()))
                    meta.setdefault("creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
                    meta.setdefault("generation", 1)
                if request.action in (enums.action.CREATE, enums.action.UPDATE):
                    counter += 1
                    request.data.setdefault("metadata", {})["resourceVersion"] = str(counter)
            if latency and request.action != enums.action.WATCH:
                await asyncio.sleep(latency)
            return await super()._handle(request)

        def _KubernetesEmulator__get_objs(self, request: Any, strict: bool) -> list[Any]:
            """kmock's object lookup without its scan of every stored object for every read.

            A named object is one dict lookup; a collection is its resource's objects from an index
            (objects are only ever added to kmock's store: deletion marks them). Same results as kmock's.
            """
            store = self._objects._objects
            if request.name is not None and (strict or request.namespace is not None):
                obj = store.get((request.resource, request.namespace, request.name))
                return [] if obj is None else [obj]
            reindex(store)
            return [
                store[key] for key in by_resource.get(request.resource, ())
                if (request.namespace is None or key[1] == request.namespace)
                and (request.name is None or key[2] == request.name)
            ]

        def _get_resources(self) -> list[Any]:
            reindex(self._objects._objects)
            return list(set(kmock.KubernetesScaffold._get_resources(self)) | set(by_resource))

        async def _serve_list(self, request: Any) -> Any:
            result: Any = await super()._serve_list(request)
            selector = (request.params or {}).get("labelSelector")
            if selector:  # equality terms only: what the operator sends
                terms = [t.split("=", 1) for t in selector.split(",") if "=" in t]
                result["items"] = [
                    item for item in result["items"]
                    if all(((item.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in terms)
                ]
            return result

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Emulator() as emulator, kmock.Server(emulator) as server:
        for key, info in RESOURCES.items():
            emulator.resources[key] = kmock.ResourceInfo(**info)
        print(f"URL {str(server.url).rstrip('/')}", flush=True)
        await stop.wait()


# --- a small asynchronous Kubernetes client ---------------------------------------------------------


class Api:
    """JSON requests and watches over one aiohttp session (to the emulator or the kubeconfig's cluster)."""

    def __init__(self, server: str, session: aiohttp.ClientSession):
        self.server = server.rstrip("/")
        self.session = session

    @classmethod
    def for_emulator(cls, url: str) -> Api:
        return cls(url, aiohttp.ClientSession(headers={"Authorization": "Bearer bench"}, read_bufsize=2**22))

    @classmethod
    def from_kubeconfig(cls) -> Api:
        """Credentials from $KUBECONFIG as the operator's kopf gets them: through the `kubernetes` client
        when it is installed (exec plugins, e.g. EKS/GKE), else kopf's own reader (tokens, client
        certificates, basic auth)."""
        import logging

        import kopf

        settings = kopf.OperatorSettings()
        info = kopf.login_via_client(logger=logging.getLogger("bench"), settings=settings)
        info = info or kopf.login_with_kubeconfig(settings=settings)
        if info is None:
            raise BenchError("KUBECONFIG is set but kopf found no usable context in it")
        connector = aiohttp.TCPConnector(ssl=info.as_ssl_context(), limit=64)
        session = aiohttp.ClientSession(
            connector=connector, headers=info.as_http_headers(), auth=info.as_aiohttp_basic_auth(),
            read_bufsize=2**22,
        )
        return cls(info.server, session)

    @classmethod
    def for_envtest(cls, plane: Any) -> Api:
        """The envtest control plane's admin (client certificate); not through $KUBECONFIG, which the
        `kubernetes` client reads once per process."""
        import ssl

        context = ssl.create_default_context(cafile=str(plane.pki.ca))
        context.load_cert_chain(str(plane.pki.admin[0]), str(plane.pki.admin[1]))
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=64), read_bufsize=2**22)
        return cls(plane.server, session)

    async def close(self) -> None:
        await self.session.close()

    async def call(self, method: str, path: str, body: Any = None, *, ok: tuple[int, ...] = (),
                   timeout: float = 30) -> Any:
        headers = {"Content-Type": "application/merge-patch+json" if method == "PATCH" else "application/json"}
        async with self.session.request(
            method, self.server + path, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            text = await resp.text()
            if resp.status >= 300 and resp.status not in ok:
                raise BenchError(f"{method} {path}: HTTP {resp.status}: {text[:500]}")
            return (resp.status, json.loads(text) if text else None)

    async def watch(self, path: str, on_event: Callable[[dict[str, Any]], None],
                    ready: asyncio.Event | None = None) -> None:
        """Stream watch events of `path` (a collection) into `on_event`, reconnecting, until cancelled.

        A 429 is waited out (Retry-After, for up to a minute): a fresh API server answers it while the watch
        cache of a CRD just established is still "(re)initializing". `ready` is set once the watch is open:
        events before that are not seen."""
        refused_since: float | None = None
        while True:
            async with self.session.get(
                self.server + path, params={"watch": "true"}, timeout=aiohttp.ClientTimeout(total=None)
            ) as resp:
                if resp.status == 429:
                    refused_since = refused_since or time.monotonic()
                    if time.monotonic() - refused_since < 60:
                        await asyncio.sleep(float(resp.headers.get("Retry-After") or 1))
                        continue
                if resp.status != 200:
                    raise BenchError(f"watch {path}: HTTP {resp.status}: {(await resp.text())[:500]}")
                refused_since = None
                if ready is not None:
                    ready.set()
                async for line in resp.content:
                    if line.strip():
                        on_event(json.loads(line))
            await asyncio.sleep(0.2)  # the server closed the watch (its timeout): watch again


# --- what the bench creates ----------------------------------------------------------------------


def operator_environment(workdir: Path) -> tuple[str, str]:
    """A virtual environment with the operator as its image installs it (`pip install .`: the operator's
    own dependencies, none of the trainer's, the tests' or the bench's), and a line saying what it holds.

    It matters for memory: kopf imports every Kubernetes client library it finds (`kubernetes` and
    `kubernetes_asyncio`, for their model classes), and the development environment has the synchronous
    `kubernetes` client for the tests, 21 MiB of RSS the shipped operator does not carry (the line
    printed names the client libraries the operator's venv holds: none, since the operator speaks aiohttp). Built with uv
    (from the development venv) and the same constraints.txt; `--operator-python` overrides it."""
    venv = workdir / "operator-venv"
    uv = Path(sys.executable).with_name("uv")
    constraints = str(REPO / "constraints.txt")
    python = venv / "bin" / "python"
    if uv.exists():
        subprocess.run([str(uv), "venv", "-q", "--python", sys.executable, str(venv)], check=True)
        subprocess.run([str(uv), "pip", "install", "-q", "--python", str(python), "-c", constraints, str(REPO)],
                       check=True)
    else:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", constraints, str(REPO)], check=True)
    found = subprocess.run(
        [str(python), "-c", "import importlib.util as u; print(' '.join(m for m in ('kopf', 'kubernetes_asyncio', "
         "'kubernetes', 'torch') if u.find_spec(m)))"], check=True, capture_output=True, text=True).stdout.split()
    return str(python), f"its own venv with `pip install .` (Python packages it can import: {', '.join(found)})"


async def baseline_namespace(api: Api, namespace: str) -> str:
    """Create a baseline's namespace; the path of its FineTuneJob collection."""
    await api.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                  "metadata": {"name": namespace}})
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"


async def create_only_baseline(api: Api, run: Run, namespace: str, *, delete: bool) -> None:
    """`operator_create_only_<N>_seconds`: the same N FineTuneJob creates as the operator's run, same
    concurrency, no operator running, in a namespace of their own (after `CONCURRENCY` untimed warm-up
    creates: a fresh CRD's first creates are slow, 100 creates 2.4 s cold and 0.3 s warm on 2 cores; the
    operator's run has its warm-up job too). `delete`: remove them again (on a cluster the operator's
    run shares); no finalizers, no operator saw them."""
    ftjs = await baseline_namespace(api, namespace)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def create(i: int) -> None:
        async with gate:
            await api.call("POST", ftjs, manifest(i, f"job-{i:05d}", namespace))

    await asyncio.gather(*(api.call("POST", ftjs, manifest(i, f"warmup-{i}", namespace)) for i in range(CONCURRENCY)))
    t_base = time.monotonic()
    await asyncio.gather(*(create(i) for i in range(run.n)))
    run.put("operator_create_only_{n}_seconds", time.monotonic() - t_base)
    if delete:
        await api.call("DELETE", ftjs, timeout=600)
        await api.call("DELETE", f"/api/v1/namespaces/{namespace}")


async def baselines_on_own_plane(run: Run, assets: Path, workdir: Path) -> None:
    """Both baselines (`create_only_baseline`, `minimum_writes_baseline`) on a fresh control plane of their
    own, stopped before the operator's run starts on another: nothing has to be deleted (deleting the 4N
    objects of the minimum-writes baseline took about 150 s at 5,000 jobs on 2 cores), and the operator's
    run meets an API server and etcd that held nothing before, as the baselines did."""
    plane = await asyncio.to_thread(start_plane, assets, workdir)
    api = Api.for_envtest(plane)
    try:
        await install_crd(api, run.deadline)
        await create_only_baseline(api, run, "ftbench-base", delete=False)
        await minimum_writes_baseline(api, run, "ftbench-min", delete=False)
    finally:
        await api.close()
        await asyncio.to_thread(plane.stop)
    run.baselines_measured = True


async def minimum_writes_baseline(api: Api, run: Run, namespace: str, *, delete: bool = True) -> None:
    """`operator_minimum_writes_<N>_seconds`: the least any operator must have the API server do for N
    FineTuneJobs, done by the bench itself with no operator running: per job, create it, then its three
    children (the operator's own `render.render_children`, owner reference and all), one status write and
    one event, in that order; `CONCURRENCY` jobs in flight, as for the create-only baseline. The
    operator's time to every Job is compared with this (`operator_jobs_vs_minimum_writes_<N>`): what it
    spends beyond it is its own (queueing, reads, retries), not the API server's floor."""
    from finetune_operator import render, sizing
    from finetune_operator.handlers import child_url
    from finetune_operator.settings import OperatorSettings
    from finetune_operator.spec import FineTuneJob

    settings = OperatorSettings.from_env({})
    ftjs = await baseline_namespace(api, namespace)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        async with gate:
            _, made = await api.call("POST", ftjs, manifest(i, f"job-{i:05d}", namespace))
            job = FineTuneJob.model_validate(made)
            for child in render.render_children(job, sizing.plan(job.spec), settings):
                await api.call("POST", child_url(child, named=False), child)
            await api.call("PATCH", f"{ftjs}/{job.metadata.name}/status", {"status": {"phase": "Suspended"}})
            await api.call("POST", f"/api/v1/namespaces/{namespace}/events", {
                "apiVersion": "v1", "kind": "Event",
                "metadata": {"name": f"job-{i:05d}.baseline", "namespace": namespace},
                "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob",
                                   "name": job.metadata.name, "namespace": namespace, "uid": job.metadata.uid},
                "reason": "Suspended", "message": "baseline", "type": "Normal",
                "source": {"component": "bench"}})

    t_start = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(run.n)))
    run.put("operator_minimum_writes_{n}_seconds", time.monotonic() - t_start)
    if not delete:
        return
    # Gone before the operator starts: a namespace deletion left to the controller manager would go on
    # deleting 4N objects in the background of the operator's run.
    for collection in (ftjs, f"/api/v1/namespaces/{namespace}/events", f"/api/v1/namespaces/{namespace}/configmaps",
                       f"/apis/batch/v1/namespaces/{namespace}/jobs"):
        await api.call("DELETE", collection, timeout=600)
    services = await api.call("GET", f"/api/v1/namespaces/{namespace}/services")
    await asyncio.gather(*(api.call("DELETE", f"/api/v1/namespaces/{namespace}/services/{item['metadata']['name']}",
                                    ok=(404,))  # (the garbage collector may be first: their owner is gone)
                           for item in (services[1] or {}).get("items") or []))
    await api.call("DELETE", f"/api/v1/namespaces/{namespace}", timeout=600)
    while (await api.call("GET", f"/api/v1/namespaces/{namespace}", ok=(404,)))[0] != 404:
        if time.monotonic() > run.deadline:
            raise BenchError(f"namespace {namespace} was not deleted")
        await asyncio.sleep(0.5)


def manifest(i: int, name: str, namespace: str) -> dict[str, Any]:
    """A varied, valid FineTuneJob; suspended so that no cluster ever starts its pods."""
    size, method = (("7B", "qlora"), ("13B", "lora"), ("7B", "lora"), ("70B", "qlora"), ("13B", "full"))[i % 5]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "baseModel": {"uri": f"s3://{BUCKETS[0]}/models/llama-{size.lower()}/", "parameters": size},
            "method": method,
            "dataset": {"train": f"s3://{BUCKETS[0]}/{name}/train.jsonl", "examples": 2000 + 13 * i},
            "output": {"uri": f"s3://{BUCKETS[1]}/{name}/"},
            "hyperparameters": {"maxSeqLength": (512, 1024, 2048)[i % 3]},
            "suspend": True,
        },
    }


# --- measuring ---------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a live process, in KiB (Linux /proc)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (Linux /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


@dataclass
class Histogram:
    """finetune_operator_reconcile_duration_seconds as scraped: cumulative buckets, sum, count."""

    buckets: list[tuple[float, float]] = field(default_factory=list)  # (upper bound, cumulative count)
    total: float = 0.0
    count: float = 0.0

    def minus(self, earlier: Histogram) -> Histogram:
        before = dict(earlier.buckets)
        return Histogram(
            [(le, c - before.get(le, 0.0)) for le, c in self.buckets], self.total - earlier.total,
            self.count - earlier.count,
        )

    def quantile(self, q: float) -> float:
        """Prometheus' histogram_quantile: linear interpolation inside the bucket holding rank q*count."""
        if self.count <= 0:
            return float("nan")
        rank = q * self.count
        lower, below = 0.0, 0.0
        for le, cumulative in self.buckets:
            if cumulative >= rank:
                if le == float("inf"):
                    return lower  # beyond the largest finite bound: that bound is all we know
                return lower + (le - lower) * (rank - below) / max(cumulative - below, 1e-12)
            lower, below = le, cumulative
        return lower


def scrape(port: int) -> tuple[Histogram, float]:
    """The reconcile histogram and the total of reconcile errors, from the operator's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    hist, errors = Histogram(), 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "finetune_operator_reconcile_duration_seconds":
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    hist.buckets.append((float(sample.labels["le"]), sample.value))
                elif sample.name.endswith("_sum"):
                    hist.total = sample.value
                elif sample.name.endswith("_count"):
                    hist.count = sample.value
        elif family.name == "finetune_operator_reconcile_errors":
            errors += sum(s.value for s in family.samples if s.name.endswith("_total"))
    hist.buckets.sort()
    return hist, errors


# --- the real API server (--api envtest, --api cluster) ------------------------------------------------


def envtest_assets() -> Path | None:
    """The folder of etcd, kube-apiserver and kube-controller-manager: $KUBEBUILDER_ASSETS, else
    ../shared/envtest next to the repository; None when neither holds them."""
    found = envtest.assets_dir()
    if found is None:
        shared = REPO.parent / "shared" / "envtest"
        with contextlib.suppress(RuntimeError):
            found = envtest.assets_dir({envtest.ENV_ASSETS: str(shared)}) if shared.is_dir() else None
    return found


def start_plane(assets: Path, workdir: Path) -> Any:
    """A fresh envtest control plane with an audit log of the operator's requests, its CRD installed (by
    main: `install_crd`), and a kubeconfig for the operator's own identity (client certificate
    CN=finetune-operator, O=system:masters)."""
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    policy = workdir / "audit-policy.yaml"
    policy.write_text(AUDIT_POLICY)
    audit_log = workdir / "audit.log"
    plane = envtest.ControlPlane(assets, workdir, extra_apiserver_args=[
        f"--audit-policy-file={policy}", f"--audit-log-path={audit_log}", "--audit-log-format=json",
        "--audit-log-maxbackup=0", "--audit-log-maxsize=0",
    ])
    plane.start()
    cert, key = plane.pki.issue(OPERATOR_USER, OPERATOR_USER, organization="system:masters")
    config = workdir / "operator.kubeconfig"
    config.write_text(yaml.safe_dump(envtest.kubeconfig(plane.server, plane.pki.ca, cert, key, OPERATOR_USER)))
    config.chmod(0o600)
    plane.audit_log = audit_log
    plane.operator_kubeconfig = config
    return plane


async def install_crd(api: Api, deadline: float) -> None:
    """Apply crds/, wait until the CRDs are Established, then install the FineTunePolicy admission as the
    chart's default values do (`install_policy`)."""
    import yaml

    for path in sorted((REPO / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                await api.call("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", doc, ok=(409,))
    from finetune_operator import policy

    pending = {CRD_NAME, f"{policy.PLURAL}.{GROUP}"}
    while pending and time.monotonic() < deadline:
        for name in sorted(pending):
            _, crd = await api.call("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            conditions = (crd.get("status") or {}).get("conditions") or []
            if any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions):
                pending.discard(name)
        await asyncio.sleep(0.2)
    if pending:
        raise BenchError(f"CRDs {sorted(pending)} not Established in time")
    await install_policy(api)


async def install_policy(api: Api) -> None:
    """The chart's admission policy and its default FineTunePolicy: every create of every run (the
    baselines' too) goes through the same admission, and the operator runs with FT_POLICY=true (its own
    policy checks, cached: `finetune_operator.policy_lookup`)."""
    import yaml

    from finetune_operator import policy
    from finetune_operator.settings import DEFAULT_TRAINER_IMAGE

    values = yaml.safe_load((REPO / "charts" / "finetune-operator" / "values.yaml").read_text())
    spec = {**values["policy"]["default"], "images": [DEFAULT_TRAINER_IMAGE]}
    await api.call("POST", f"/apis/{GROUP}/{VERSION}/{policy.PLURAL}", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": policy.KIND, "metadata": {"name": policy.DEFAULT_POLICY},
        "spec": spec}, ok=(409,))
    vap, binding = policy.build_admission_policy()
    base = "/apis/admissionregistration.k8s.io/v1"
    await api.call("POST", f"{base}/validatingadmissionpolicies", vap, ok=(409,))
    await api.call("POST", f"{base}/validatingadmissionpolicybindings", binding, ok=(409,))


def audit_requests(path: Path, user: str, start: float, end: float) -> dict[str, int]:
    """The requests of `user` received in [start, end) (wall clock), counted by `verb resource[/sub]`."""
    from datetime import datetime

    counts: dict[str, int] = {}
    with path.open() as f:
        for line in f:
            event = json.loads(line)
            if (event.get("user") or {}).get("username") != user:
                continue
            when = datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()
            if not start <= when < end:
                continue
            ref = event.get("objectRef") or {}
            what = ref.get("resource") or event.get("requestURI", "?").split("?")[0]
            if ref.get("subresource"):
                what += "/" + ref["subresource"]
            key = f"{event.get('verb', '?')} {what}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def _figure_key(key: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in key.lower()).strip("_")


# --- one run ---------------------------------------------------------------------------------------


@dataclass
class Run:
    n: int
    cluster: bool
    s3_env: dict[str, str]
    deadline: float  # time.monotonic() by which this run gives up
    settle: float
    workdir: Path
    latency_ms: float = 0.0
    plane: Any = None  # tests.envtest.ControlPlane of this run (--api envtest)
    operator_kubeconfig: Path | None = None  # the operator's own identity (envtest), else $KUBECONFIG
    audit_log: Path | None = None
    tracemalloc_frames: int = 0
    python: str = sys.executable  # the operator's interpreter (`operator_environment`)
    figures: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    jobs_seen: dict[str, float] = field(default_factory=dict)
    phase_seen: dict[str, float] = field(default_factory=dict)
    created: dict[str, float] = field(default_factory=dict)
    rss_peak_kib: int = 0
    baselines_measured: bool = False  # the create-only (and minimum-writes) baselines are in `figures` already

    def put(self, name: str, value: float, fmt: str = "{:.2f}") -> None:
        """Record figure `name` (`{n}` in it becomes the size; else `_<size>` is appended)."""
        key = name.format(n=self.n) if "{n}" in name else f"{name}_{self.n}"
        self.figures[key] = fmt.format(value)


async def _wait(check: Callable[[], bool], deadline: float, alive: Callable[[], None]) -> bool:
    """Poll `check` until true (True) or `deadline` (False); `alive` raises when a process died."""
    while not check():
        alive()
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def heap_snapshot(operator: subprocess.Popen[bytes], out: Path, k: int, deadline: float,
                        alive: Callable[[], None]) -> dict[str, Any]:
    """Make the operator (under bench/kopf_tracemalloc.py) write tracemalloc snapshot `k`; its summary."""
    path = Path(f"{out}.{k}.json")
    operator.send_signal(signal.SIGUSR1)
    if not await _wait(path.exists, deadline, alive):
        raise BenchError(f"no tracemalloc snapshot {path}")
    return dict(json.loads(path.read_text()))


def report_heap(run: Run, snap: dict[str, Any]) -> None:
    """Growth of the traced heap from after the warm-up job to the end of the steady state, and its sites."""
    first = json.loads(Path(f"{run.workdir / f'tracemalloc-{run.n}'}.0.json").read_text())
    growth = snap["total"] - first["total"]
    run.put("operator_heap_start_mb", first["total"] / 2**20, "{:.1f}")
    run.put("operator_heap_end_mb", snap["total"] / 2**20, "{:.1f}")
    run.put("operator_heap_growth_mb", growth / 2**20, "{:.1f}")
    run.put("operator_heap_kib_per_job", growth / 1024 / run.n, "{:.1f}")
    lines = [f"{row['size_diff'] / 2**20:+.2f} MiB ({row['count_diff']:+d} blocks, "
             f"{row['size_diff'] / 1024 / run.n:+.2f} KiB/job) {_short(row['where'])}"
             for row in snap.get("growth_by_line", [])[:10]]
    run.notes.append("heap growth (tracemalloc), top 10 lines:\n#   " + "\n#   ".join(lines))
    files = [f"{row['size_diff'] / 2**20:+.2f} MiB {_short(row['where'].rsplit(':', 1)[0])}"
             for row in snap.get("growth_by_file", [])[:10]]
    run.notes.append("heap growth (tracemalloc), top 10 files:\n#   " + "\n#   ".join(files))


def _short(where: str) -> str:
    import re

    return re.sub(r"^.*/(site-packages|python3\.\d+|operator)/", "", where)


async def run_one(run: Run) -> None:
    deadline = run.deadline
    namespace = f"ftbench-{secrets.token_hex(4)}"
    emulator: subprocess.Popen[bytes] | None = None
    operator: subprocess.Popen[bytes] | None = None
    api: Api | None = None
    tasks: list[asyncio.Task[Any]] = []
    op_log = run.workdir / f"operator-{run.n}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FT_", "AWS_"))}
    try:
        if run.plane is not None:
            api = Api.for_envtest(run.plane)
        elif run.cluster:
            api = Api.from_kubeconfig()
        else:
            emu_log = run.workdir / f"emulator-{run.n}.log"
            emulator = _spawn(
                [sys.executable, str(Path(__file__).resolve()), "--serve-emulator",
                 f"--api-latency-ms={run.latency_ms:g}"],
                env, emu_log, stdout=subprocess.PIPE,
            )
            assert emulator.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(emulator.stdout.readline), 60)
            if not line.startswith(b"URL "):
                raise BenchError(f"the emulator did not start:\n{_tail(emu_log)}")
            url = line.split()[1].decode()
            kubeconfig = run.workdir / f"kubeconfig-{run.n}.json"
            kubeconfig.write_text(json.dumps({
                "apiVersion": "v1", "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": url}}],
                "users": [{"name": "kmock", "user": {"token": "bench"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
                "current-context": "kmock",
            }))
            env["KUBECONFIG"] = str(kubeconfig)
            api = Api.for_emulator(url)
            from finetune_operator.crd import build_crd

            await api.call("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", build_crd())

        if run.plane is not None:
            await install_crd(api, deadline)
        if run.cluster:
            status, _ = await api.call("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}",
                                       ok=(404,))
            if status == 404:
                raise BenchError(f"CRD {CRD_NAME} is not installed in the cluster; run `kubectl apply -f crds/`")
            # (kmock serves namespaced objects without a Namespace object, and cannot parse a POST of one.)
            await api.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                          "metadata": {"name": namespace}})
            if not run.baselines_measured:  # (--api envtest measures them on a control plane of their own)
                await create_only_baseline(api, run, f"{namespace}-base", delete=True)

        def on_job(event: dict[str, Any]) -> None:
            name = ((event.get("object") or {}).get("metadata") or {}).get("name")
            if event.get("type") in ("ADDED", "MODIFIED") and name and name not in run.jobs_seen:
                run.jobs_seen[name] = time.monotonic()

        def on_ftj(event: dict[str, Any]) -> None:
            obj = event.get("object") or {}
            name = (obj.get("metadata") or {}).get("name")
            if name and name not in run.phase_seen and (obj.get("status") or {}).get("phase"):
                run.phase_seen[name] = time.monotonic()

        watching = [asyncio.Event(), asyncio.Event()]
        tasks.append(asyncio.create_task(api.watch(f"/apis/batch/v1/namespaces/{namespace}/jobs", on_job,
                                                   watching[0])))
        tasks.append(asyncio.create_task(
            api.watch(f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}", on_ftj, watching[1])))
        # Open before anything is created (a Job or status set before its watch opened would never be seen).
        done, _ = await asyncio.wait([asyncio.create_task(w.wait()) for w in watching], timeout=90)
        for task in tasks[-2:]:
            if task.done() and task.exception() is not None:
                raise BenchError(f"a watch failed: {task.exception()}")
        if len(done) < 2:
            raise BenchError("the bench's watches did not open within 90 s")

        # The operator, as the Helm chart runs it.
        metrics_port, liveness_port = envtest.free_port(), envtest.free_port()
        env.update(run.s3_env)
        # FT_PREFLIGHT=false: the figures are the time to each job's training Job and the requests that take,
        # as issue 13 defines them; with the pre-flight on, no training Job exists before a pre-flight pod ran
        # (this bench runs no pods), and a job's first pass costs 4 requests instead of 5 (handlers.py).
        env.update({"FT_METRICS_PORT": str(metrics_port), "FT_USE_GPUS": "false", "FT_LOG_FORMAT": "json",
                    "FT_PREFLIGHT": "false", "FT_POLICY": "true" if run.plane is not None else "false"})
        if run.operator_kubeconfig is not None:
            env["KUBECONFIG"] = str(run.operator_kubeconfig)
        scope = [f"--namespace={namespace}"] if run.cluster else ["--all-namespaces"]
        kopf_cli = [run.python, "-m", "kopf"]
        heap_out = run.workdir / f"tracemalloc-{run.n}"
        if run.tracemalloc_frames:
            kopf_cli = [run.python, str(Path(__file__).resolve().parent / "kopf_tracemalloc.py")]
            env.update({"FT_BENCH_TRACEMALLOC_FRAMES": str(run.tracemalloc_frames),
                        "FT_BENCH_TRACEMALLOC_OUT": str(heap_out)})
        operator = _spawn(
            [*kopf_cli, "run", "--module=finetune_operator.handlers", "--standalone",
             f"--liveness=http://127.0.0.1:{liveness_port}/healthz", *scope],
            env, op_log,
        )
        pid = operator.pid

        def alive() -> None:
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise BenchError(f"a watch failed: {task.exception()}")
            if operator is not None and operator.poll() is not None:
                raise BenchError(f"the operator exited ({operator.returncode}):\n{_tail(op_log)}")
            if emulator is not None and emulator.poll() is not None:
                raise BenchError(f"the emulator exited ({emulator.returncode})")

        async def sample_rss() -> None:
            while True:
                with contextlib.suppress(OSError):
                    run.rss_peak_kib = max(run.rss_peak_kib, proc_status(pid).get("VmRSS", 0))
                await asyncio.sleep(0.1)

        tasks.append(asyncio.create_task(sample_rss()))

        # Warm-up: the operator is up once the warm-up job's Job exists.
        await api.call("POST", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}",
                       manifest(0, "warmup", namespace))
        if not await _wait(lambda: "warmup" in run.jobs_seen, min(deadline, time.monotonic() + 120), alive):
            raise BenchError(f"the operator did not create the warm-up Job within 120 s:\n{_tail(op_log)}")
        await _wait(lambda: "warmup" in run.phase_seen, deadline, alive)
        rss_start = proc_status(pid)["VmRSS"]
        if run.tracemalloc_frames:
            await heap_snapshot(operator, heap_out, 0, deadline, alive)
        hist_start, _ = await asyncio.to_thread(scrape, metrics_port)
        cpu_start = cpu_seconds(pid)
        api_cpu_start = cpu_seconds(emulator.pid) if emulator is not None else 0.0
        plane_pids = {name: proc.pid for name, proc in (run.plane.processes.items() if run.plane else ())}

        def plane_cpu() -> dict[str, float]:
            out = {}
            for name, ppid in plane_pids.items():
                with contextlib.suppress(OSError):
                    out[name] = cpu_seconds(ppid)
            return out

        plane_start = plane_cpu()

        # The burst.
        names = [f"job-{i:05d}" for i in range(run.n)]
        gate = asyncio.Semaphore(CONCURRENCY)

        async def create(i: int, name: str) -> None:
            async with gate:
                await api.call("POST", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}",
                               manifest(i, name, namespace))
                run.created[name] = time.monotonic()

        t0, w0 = time.monotonic(), time.time()
        await asyncio.gather(*(create(i, name) for i, name in enumerate(names)))
        t_submitted = time.monotonic() - t0
        all_jobs = await _wait(lambda: all(n in run.jobs_seen for n in names), deadline, alive)
        all_status = all_jobs and await _wait(lambda: all(n in run.phase_seen for n in names), deadline, alive)
        cpu_burst = cpu_seconds(pid) - cpu_start
        w_burst = w_settle = time.time()
        plane_burst = plane_cpu()
        api_cpu_burst = cpu_seconds(emulator.pid) - api_cpu_start if emulator is not None else None
        hist_burst, _ = await asyncio.to_thread(scrape, metrics_port)

        run.put("operator_create_requests_{n}_seconds", t_submitted)
        seen = [n for n in names if n in run.jobs_seen]
        run.put("operator_jobs_created", len(seen), "{}")
        if all_jobs:
            run.put("operator_jobs_{n}_seconds", max(run.jobs_seen[n] for n in names) - t0)
        else:
            run.notes.append(f"only {len(seen)} of {run.n} Jobs existed when the time ran out (--timeout)")
        if all_status:
            run.put("operator_status_{n}_seconds", max(run.phase_seen[n] for n in names) - t0)
        latencies = [(run.jobs_seen[n] - run.created[n]) * 1000 for n in seen]
        if all_jobs:  # (percentiles of only the Jobs that made it before the timeout would flatter)
            run.put("operator_reconcile_p50_ms", percentile(latencies, 50), "{:.0f}")
            run.put("operator_reconcile_p99_ms", percentile(latencies, 99), "{:.0f}")
        run.put("operator_cpu_seconds", cpu_burst)
        if api_cpu_burst is not None:
            run.put("emulator_cpu_seconds", api_cpu_burst)
        for name, value in plane_burst.items():
            run.put(f"{_figure_key(name)}_cpu_seconds", value - plane_start.get(name, 0.0))

        # The steady state: only the status refresher works.
        if all_status:
            # The first seconds still finish work of the burst (Job events queued behind the creates).
            settle_end = min(deadline, time.monotonic() + run.settle)
            await _wait(lambda: False, min(settle_end, time.monotonic() + run.settle / 4), alive)
            hist_quiet, _ = await asyncio.to_thread(scrape, metrics_port)
            cpu_settle, t_settle, w_settle = cpu_seconds(pid), time.monotonic(), time.time()
            plane_settle = plane_cpu()
            # Passes come in cycles (all jobs, then a pause of one interval): the refresher's speed is
            # the passes per second of the sampling periods in which passes were made.
            busy, count, last = 0.0, hist_quiet.count, t_settle
            while time.monotonic() < settle_end:
                await _wait(lambda: False, min(settle_end, time.monotonic() + 0.25), alive)
                now_count = (await asyncio.to_thread(scrape, metrics_port))[0].count
                now = time.monotonic()
                if now_count > count:
                    busy += now - last
                count, last = now_count, now
            elapsed = time.monotonic() - t_settle
            hist_end, errors = await asyncio.to_thread(scrape, metrics_port)
            steady = hist_end.minus(hist_quiet)
            if steady.count and busy:
                run.put("operator_refresh_cycle_seconds", (run.n + 1) * busy / steady.count)
            run.put("operator_steady_cpu_percent", 100 * (cpu_seconds(pid) - cpu_settle) / elapsed, "{:.0f}")
            w_end = time.time()
            for name, value in plane_cpu().items():
                run.put(f"{_figure_key(name)}_steady_cpu_percent", 100 * (value - plane_settle.get(name, 0.0)) / elapsed,
                        "{:.0f}")
            if run.audit_log is not None:
                steady_requests = audit_requests(run.audit_log, OPERATOR_USER, w_settle, w_end)
                total = sum(steady_requests.values())
                run.put("operator_steady_requests_per_second", total / (w_end - w_settle), "{:.1f}")
                run.put("operator_steady_requests_per_job_per_minute", 60 * total / (w_end - w_settle) / (run.n + 1),
                        "{:.2f}")
                run.notes.append("steady state, operator requests per second by verb and resource: " + (", ".join(
                    f"{k} {v / (w_end - w_settle):.2f}" for k, v in sorted(steady_requests.items(), key=lambda kv: -kv[1]))
                    or "none"))
                tail = audit_requests(run.audit_log, OPERATOR_USER, w_burst, w_settle)
                run.put("operator_requests_settling", sum(tail.values()), "{:.0f}")
                run.notes.append(f"operator requests between every status set and the steady state "
                                 f"({w_settle - w_burst:.1f} s): " + (", ".join(
                                     f"{k} {v}" for k, v in sorted(tail.items(), key=lambda kv: -kv[1])) or "none"))
        else:
            hist_end, errors = hist_burst, (await asyncio.to_thread(scrape, metrics_port))[1]
        if run.audit_log is not None:
            # The create phase: first create request until the steady state begins (every FineTuneJob has a
            # status, plus the first quarter of --settle in which the Job events of the burst are handled).
            burst_requests = audit_requests(run.audit_log, OPERATOR_USER, w0, w_settle)
            run.put("operator_requests_per_job", sum(burst_requests.values()) / run.n)
            for key, count in sorted(burst_requests.items(), key=lambda kv: -kv[1]):
                run.put(f"operator_requests_per_job_{{n}}_{_figure_key(key)}", count / run.n, "{:.3f}")
        passes = hist_end.minus(hist_start)
        run.put("operator_reconcile_pass_p50_ms", passes.quantile(0.5) * 1000, "{:.1f}")
        run.put("operator_reconcile_pass_p99_ms", passes.quantile(0.99) * 1000, "{:.1f}")
        run.put("operator_reconcile_pass_mean_ms", 1000 * passes.total / max(passes.count, 1), "{:.1f}")
        run.put("operator_reconcile_passes", passes.count, "{:.0f}")
        run.put("operator_reconcile_errors", errors, "{:.0f}")

        mem = proc_status(pid)
        run.rss_peak_kib = max(run.rss_peak_kib, mem["VmHWM"], mem["VmRSS"])
        run.put("operator_rss_mb", run.rss_peak_kib / 1024, "{:.1f}")
        run.put("operator_rss_start_mb", rss_start / 1024, "{:.1f}")
        run.put("operator_rss_end_mb", mem["VmRSS"] / 1024, "{:.1f}")
        if run.tracemalloc_frames:
            report_heap(run, await heap_snapshot(operator, heap_out, 1, deadline + 120, alive))
        alive()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        _stop(operator)
        if api is not None:
            if run.cluster and run.plane is None:  # (an envtest control plane is stopped as a whole)
                with contextlib.suppress(Exception):
                    await api.call("DELETE", f"/api/v1/namespaces/{namespace}", ok=(404,))
            await api.close()
        _stop(emulator)


def machine(cluster: bool, latency_ms: float, assets: Path | None = None) -> str:
    from importlib.metadata import version

    cpu = cpu_model()
    if assets is not None:
        try:
            kube = subprocess.run([str(assets / "kube-apiserver"), "--version"], capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            kube = "kube-apiserver"
        api = (f"envtest ({kube}, etcd, kube-controller-manager from {assets}; a fresh control plane per size, "
               f"on this machine beside the operator; operator as user {OPERATOR_USER}, audit log at Metadata)")
    else:
        api = "a real cluster ($KUBECONFIG)" if cluster else (
            f"kmock {version('kmock')} KubernetesEmulator in its own process on 127.0.0.1"
            + (f", every answer delayed {latency_ms:g} ms" if latency_ms else ""))
    return (f"# machine: nproc={os.cpu_count()}, cpu={cpu}, python {platform.python_version()}, "
            f"kopf {version('kopf')}; API: {api}; S3: SeaweedFS weed mini on 127.0.0.1")


def code_version() -> str:
    """The commit of the checkout and the operator files changed in the working tree (measured as they are)."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    sha = git("rev-parse", "--short", "HEAD") or "?"
    dirty = [line.split(maxsplit=1)[-1] for line in git("status", "--porcelain", "--", "operator").splitlines()]
    if not dirty:
        return f"git {sha}"
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(dirty):
        with contextlib.suppress(OSError):
            digest.update(name.encode() + b"\0" + (REPO / name).read_bytes())
    return f"git {sha} plus uncommitted changes to {', '.join(dirty)} (sha256 of them {digest.hexdigest()[:12]})"


def resolve_api(choice: str) -> tuple[str, Path | None]:
    """`--api` -> (emulator|envtest|cluster, the envtest assets). auto: envtest when a control plane is at
    hand ($KUBEBUILDER_ASSETS, or ../shared/envtest next to the repository), else the emulator."""
    if choice in ("auto", "envtest"):
        assets = envtest_assets()
        if assets is not None:
            return "envtest", assets
        if choice == "envtest":
            raise BenchError("--api envtest: no control plane: set KUBEBUILDER_ASSETS to a folder with etcd, "
                             "kube-apiserver and kube-controller-manager (or put them in ../shared/envtest)")
        return "emulator", None
    return choice, None


async def main_async(args: argparse.Namespace) -> int:
    from finetune_trainer.s3server import LocalS3

    mode, assets = resolve_api(args.api)
    cluster = mode != "emulator"
    if cluster and args.api_latency_ms:
        raise BenchError("--api-latency-ms applies to the emulator only")
    sizes = args.n or ([100, 1000, 5000] if cluster else [100, 1000])
    timeout = args.timeout if args.timeout is not None else (DEFAULT_TIMEOUT_REAL if cluster else 300.0)
    print(machine(cluster, args.api_latency_ms, assets), flush=True)
    print(f"# operator code: {code_version()}", flush=True)
    print(f"# api={mode}; sizes {' '.join(map(str, sizes))}; --timeout {timeout:g} s; "
          f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)
    print("# operator_reconcile_p50/p99_ms: per FineTuneJob, its create request returned -> its Job seen in a "
          "watch; operator_reconcile_pass_*: the operator's own finetune_operator_reconcile_duration_seconds "
          "(every pass); RSS in MiB", flush=True)
    if mode == "envtest":
        print("# the API server, etcd and the controller manager share this machine's "
              f"{os.cpu_count()} cores with the operator and the bench (their CPU: kube_apiserver_*, etcd_*, "
              "kube_controller_manager_*); operator_create_only_<N>_seconds: the same N creates at the same "
              f"concurrency ({CONCURRENCY}) with no operator running; operator_requests_per_job_<N>: the operator's "
              "requests in the audit log, first create -> steady state (statuses set + a quarter of --settle), "
              "per FineTuneJob", flush=True)
    deadline = time.monotonic() + timeout
    verdicts: list[bool] = []
    with contextlib.ExitStack() as stack:
        if args.logs:
            tmp = str(Path(args.logs).resolve())
            Path(tmp).mkdir(parents=True, exist_ok=True)
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="ftbench-"))
        if args.operator_python:
            python, what = args.operator_python, f"{args.operator_python} (--operator-python)"
        else:
            python, what = await asyncio.to_thread(operator_environment, Path(tmp))
        print(f"# operator process: {what}", flush=True)
        s3 = stack.enter_context(LocalS3(buckets=BUCKETS))
        for bucket in BUCKETS:
            s3.create_bucket(bucket)
        s3_env = {**s3.env(), "FT_S3_ENDPOINT": s3.endpoint_url, "AWS_EC2_METADATA_DISABLED": "true"}
        for n in sizes:
            if deadline - time.monotonic() < 30:
                print(f"# {n} jobs: not run, the --timeout of {timeout:g} s is spent", flush=True)
                continue
            size_start = time.monotonic()
            run = Run(n=n, cluster=cluster, s3_env=s3_env, deadline=deadline, settle=args.settle,
                      workdir=Path(tmp), latency_ms=args.api_latency_ms, tracemalloc_frames=args.tracemalloc,
                      python=python)
            plane = None
            try:
                if assets is not None:
                    await baselines_on_own_plane(run, assets, Path(tmp) / f"envtest-{n}-baselines")
                    plane = await asyncio.to_thread(start_plane, assets, Path(tmp) / f"envtest-{n}")
                    run.plane, run.audit_log = plane, plane.audit_log
                    run.operator_kubeconfig = plane.operator_kubeconfig
                await run_one(run)
            except BaseException:
                for name, value in run.figures.items():
                    print(f"{name}={value}", flush=True)
                log = Path(tmp) / f"operator-{n}.log"
                if log.exists():
                    print(f"operator log tail:\n{_tail(log)}", file=sys.stderr)
                raise
            finally:
                if plane is not None:
                    await asyncio.to_thread(plane.stop)
            took = run.figures.get(f"operator_jobs_{n}_seconds")
            base = run.figures.get(f"operator_create_only_{n}_seconds")
            if took is not None and base is not None:
                run.put("operator_jobs_vs_create_only", float(took) / float(base))
            floor = run.figures.get(f"operator_minimum_writes_{n}_seconds")
            if took is not None and floor is not None:
                run.put("operator_jobs_vs_minimum_writes", float(took) / float(floor))
            for name, value in run.figures.items():
                print(f"{name}={value}", flush=True)
            for note in run.notes:
                print(f"# {n} jobs: {note}", flush=True)
            print(f"# {n} jobs: this size took {time.monotonic() - size_start:.0f} s of wall time "
                  f"(control plane start and stop included)", flush=True)
            if n == TARGET_SIZE:
                rss = float(run.figures[f"operator_rss_mb_{n}"])
                ratio = run.figures.get(f"operator_jobs_vs_create_only_{n}")
                cpu = run.figures.get(f"operator_steady_cpu_percent_{n}")
                verdicts.append(
                    took is not None and float(took) <= TARGET_JOBS_SECONDS and rss < TARGET_RSS_MIB
                    and (ratio is None or float(ratio) <= TARGET_RATIO)
                    and cpu is not None and float(cpu) < TARGET_STEADY_CPU_PERCENT)
    if verdicts:
        print(f"# targets at {TARGET_SIZE} jobs: Jobs <= {TARGET_JOBS_SECONDS:g} s, Jobs / create-only <= "
              f"{TARGET_RATIO:g} (real API only), peak RSS < {TARGET_RSS_MIB:g} MiB, steady CPU < "
              f"{TARGET_STEADY_CPU_PERCENT:g}% of a core")
        print(f"operator_targets_met={'true' if all(verdicts) else 'false'}")
    else:
        print(f"# targets apply at {TARGET_SIZE} jobs, not run")
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM ends the run like Ctrl-C, so the `finally` blocks stop the child processes."""
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, nargs="+",
                        help="sizes to run (default: 100 1000 5000 on a real API server, 100 1000 on the emulator)")
    parser.add_argument("--api", choices=("auto", "emulator", "envtest", "cluster"), default="auto",
                        help="envtest: a fresh control plane per size from $KUBEBUILDER_ASSETS (or ../shared/envtest); "
                        "cluster: the cluster of $KUBECONFIG; auto: envtest when one is at hand, else the emulator")
    parser.add_argument("--timeout", type=float,
                        help="give up after this many seconds, all sizes together (default 300 on the emulator, "
                        f"{DEFAULT_TIMEOUT_REAL:g} on a real API server)")
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                        help="run the operator under tracemalloc (bench/kopf_tracemalloc.py) keeping FRAMES frames "
                        "per allocation, and print the heap's growth and its top sites (slows the operator)")
    parser.add_argument("--settle", type=float, default=28.0,
                        help="seconds observed after the statuses are set; the steady-state figures come from "
                        "the last three quarters (default 28: two status intervals of 10 s and more)")
    parser.add_argument("--api-latency-ms", type=float, default=0.0,
                        help="emulator only: delay every API answer (not watch events) by this many ms, "
                        "like the round trip to a real API server (default 0: loopback only)")
    parser.add_argument("--operator-python", metavar="PATH",
                        help="run the operator with this interpreter instead of building its shipped environment "
                             "(e.g. .venv/bin/python: the development venv)")
    parser.add_argument("--logs", help="keep the operator's and the emulator's logs in this directory")
    parser.add_argument("--serve-emulator", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_emulator:
        asyncio.run(_serve_emulator(args.api_latency_ms / 1000))
        return 0
    if any(n < 1 for n in args.n or ()):
        parser.error("-n: sizes must be at least 1")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return asyncio.run(main_async(args))
    except (TimeoutError, BenchError, OSError, aiohttp.ClientError) as err:
        print(f"operator_scale_bench: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("operator_scale_bench: interrupted; child processes stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
