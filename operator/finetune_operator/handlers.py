"""The operator: kopf handlers gluing the pure core (spec, sizing, render, status) to the Kubernetes API.

Run it with `kopf run -m finetune_operator.handlers --all-namespaces` (or `-n <namespace>`).

One idempotent function, `reconcile`, does everything for one FineTuneJob, under a per-object lock, from
a fresh read of the object:

1. validate the spec (`FineTuneJob.model_validate`); an invalid spec gets Valid=False/InvalidSpec naming
   the fields, phase Failed (the spec is immutable, so it can never become valid), a Warning event, and
   nothing is created;
   with spec.baseModel.fromJob, wait for the base job first (`_chain_gate`, `chain_wait`): phase Pending and
   WaitingForBaseJob True, nothing else done, until the base job Succeeded with its gates passed (or failed,
   or was deleted: this job fails naming it); its resolution (`chain.resolve`) is written to status.baseJob
   once, and every later step of this and every later pass works on `chain.apply(spec, status.baseJob)`;
2. plan it (`sizing.plan`, kept in status.plan; a plan already in the status wins, so an operator
   upgrade never re-sizes a running job);
   the CPU pre-flight stage first (`finetune_operator.preflight`, unless FT_PREFLIGHT=false): its ConfigMap
   and Job are made sure of like any stage's children (step 3), and when its Job finished its result is read
   and the plan completed from it; that plan is written to the status before the pass goes on to the GPU
   stage (pilot or main) in the same pass, or the job ends Failed (the pre-flight's reason, BudgetExceeded);
3. make sure the children exist (ConfigMap, Service, Job, in that order): read each and create it when
   missing (a FineTuneJob without a status yet has never had a pass: its children are created without a
   read first); on 409 read it again. An existing child whose controller owner reference is this
   FineTuneJob's uid is adopted (labels, and the Service's selector and ports, patched to the desired
   ones; the ConfigMap snapshot and the Job template are never rewritten, the first is the running job's
   frozen config and the second is immutable). Anything else is foreign: Created=False/ForeignChild and
   a Warning event name its owner, it is not touched, and later children are not created;
4. apply spec.suspend to the Job (`suspend: true` stops the pods; `false` resumes, the trainer continues
   from its newest checkpoint). A Kueue-managed Job (label `kueue.x-k8s.io/queue-name`) is never
   (un)suspended by the operator: Kueue owns that field;
5. read the Job's pods and the trainer's report (each skipped when nothing can have changed there, see
   below), compute the status (`status.compute_status`), patch the status subresource only when it
   changed, post one event per phase transition. A finished job with spec.serving.apply first gets its
   LLMInferenceService made sure of and its readiness in the status (`inference_service`, `serving_apply`);
   until it is Ready the refresher looks again (`refresh.next_refresh`).

It runs on create, on resume (operator start: the watch lists every object), on a spec update (suspend;
any other spec change is refused with a SpecImmutable Warning and ignored, the CRD's CEL rules normally
stop it earlier; `track` tells these apart from the FineTuneJob's other events), whenever
a labelled batch/v1 Job changes, whenever a training pod (labels `finetune.dev/job` and
`app.kubernetes.io/component=trainer`) appears, changes or goes away, and from one operator-wide
background task, the refresher, for the jobs that need polling. Phase changes come from these watches;
only progress (it lives only in S3) needs polling, and only while a trainer can be writing it. A job waiting
for its base job is woken by the base job's own FineTuneJob events: `track` keeps which jobs name which base
(`Runtime.dependents`, from each job's spec.baseModel.fromJob) and, when a base job is created, deleted, or
changes phase, gates or artifacts (`chain_wait.base_view`; its progress does not count), schedules its
waiting dependents for the refresher's next tick; their own fallback refresh is every 6 intervals. The
refresher's schedule is `refresh.next_refresh` (pure, table-tested): a Running job, or one with pods that
have not finished, is refreshed `FT_STATUS_INTERVAL` seconds (default 10) after a pass that changed its
progress, then at doubling delays while its report stays the same, up to `refresh.BACKOFF_CAP` (6)
intervals; Suspended, Queued, Pending-with-its-Job-but-no-pods, Failed and Succeeded jobs are not
polled at all (a success still missing its artifacts is retried every 6 intervals; a Pending job whose
children are missing or foreign backs off like a running one; a failed pass is retried after one
interval). A pass skips the pod list of a suspended Job the pod watch knows no pods of, and skips the
report read when no pod exists and the report was read since the last pod event.

Worst-case staleness of status.progress (the report is read, not pushed): while the trainer writes its
report at least once per interval, one interval plus the refresher's tick (min(interval, 1 s)) plus
queueing behind other passes; after a quiet spell (three passes without a change), 6 intervals (60 s by
default) plus the same. The final report of a job that stops (suspended, finished) is read by the pass
of the pod or Job event that ends it. kopf timers would put a finalizer on every FineTuneJob, which
blocks `kubectl delete` while the operator is down. There is no finalizer at all: children go with their
owner through garbage collection.

What a FineTuneJob costs the API server: from create to its first status, its three children, one
status write and one event: 5 requests, no reads, nothing written to the FineTuneJob but its status
(bench/operator_scale_bench.py counts them in the audit log, with FT_PREFLIGHT=false). The pre-flight
stage changes the first pass to its ConfigMap and Job, one status write and one event (4); its Job's
completion then costs one S3 read, two status writes and the three children. A chained job (fromJob) costs
one read of its base job per pass while it waits (a pass: its creation, a wake-up from the base job's change, the
fallback refresh), a status write and an event when its wait starts, and one status write and one event
(BaseJobSucceeded) when it resolves, before its first stage as above. The first pass of an
object uses the body of the watch event that brought it (nothing of ours wrote it since); later passes
read it under the object's lock. A Job event runs a pass only when it changes what the status reads from the
Job (`refresh.job_view`): the watch's echo of the operator's create and the controller's bookkeeping on a
suspended Job do not. At most `PASS_CONCURRENCY` passes run at once, on `kube.CONNECTIONS` connections.

An operator restart at any point converges: the children are found and adopted by owner uid, the status
is recomputed from what exists, and events are only posted for transitions against the stored status.

The API calls: `finetune_operator.kube` (one aiohttp session per operator run and identity, created
at startup and closed at cleanup), with the identity the `login` handler gave kopf, kopf's
`settings.networking` timeouts and error backoffs, and errors mapped to `kube.ApiError` (`NotFound`,
`Conflict`). kopf's own client is not used: kopf is used through its public API only.

Kopf settings: only event handlers (`track` decides what a FineTuneJob event needs: a pass when the job
is new to this process or its spec changed), so kopf keeps no handler progress or diff base on the
objects; were a change handler added, its storage is annotations under `kopf.finetune.dev/` (the status
schema is strict, so kopf's default `status.kopf` would be pruned);
peering is off (run one replica; `FT_PEERING=true` turns kopf peering on); logs are JSON
(`FT_LOG_FORMAT=text` keeps kopf's text format). Metrics: see `finetune_operator.metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from finetune_operator import (
    chain,
    chain_wait,
    conditions,
    contract,
    kube,
    oomkill,
    refresh,
    render,
    serving,
    serving_apply,
    sizing,
)
from finetune_operator import inference_service as serving_io
from finetune_operator import metrics as metrics_mod
from finetune_operator import pilot as pilot_mod
from finetune_operator import preflight as preflight_mod
from finetune_operator import status as status_mod
from finetune_operator.manifests import issues_from_validation
from finetune_operator.policy_lookup import PolicyLookup
from finetune_operator.progress import Ignored, ReportReader, report_location
from finetune_operator.settings import OperatorSettings
from finetune_operator.spec import GROUP, KIND, PLURAL, VERSION, Adjustment, FineTuneJob, Plan

log = logging.getLogger("finetune_operator")

ENV_STATUS_INTERVAL = "FT_STATUS_INTERVAL"
ENV_PEERING = "FT_PEERING"
ENV_LOG_FORMAT = "FT_LOG_FORMAT"
DEFAULT_STATUS_INTERVAL = 10.0
#: Status refresh passes in flight at once (see `_refresher`).
REFRESH_CONCURRENCY = 8
#: Reconcile passes in flight at once, whatever started them (see `reconcile`): a few more than the
#: client's connections (`kube.CONNECTIONS`), so that a pass reading S3 does not leave one idle.
PASS_CONCURRENCY = 24
ANNOTATION_PREFIX = "kopf.finetune.dev"
COMPONENT = "finetune-operator"

#: The training pods of every FineTuneJob (what `render.pod_selector` selects for one).
TRAINING_POD_SELECTOR = f"{render.LABEL_JOB},{render.LABEL_COMPONENT}={render.COMPONENT_TRAINER}"

_PLURALS = {"ConfigMap": "configmaps", "Service": "services", "NetworkPolicy": "networkpolicies", "Job": "jobs"}
_TRUE = {"1", "true", "yes", "on"}


# --- runtime state -------------------------------------------------------------------------------


@dataclass
class JobState:
    """Per FineTuneJob (by namespace/name): its training pods as the pod watch reports them, whether its
    report was read since the last pod event with no pod left (`settled`), and its refresh schedule
    (`due`: time.monotonic() of the next periodic pass, None for none; `idle`: the backoff exponent)."""

    pods: set[str] = field(default_factory=set)
    settled: bool = False
    due: float | None = None
    idle: int = 0
    passes: int = 0  # passes begun in this process (0: the body of the watch event `track` handles is fresh)
    job_view: int | None = None  # `refresh.job_view` of the Job the last pass saw
    spec: tuple[tuple[str, int], ...] | None = None  # `spec_digest` of the spec last reconciled (None: not yet)
    ignored: set[str] = field(default_factory=set)  # "<object URI> <cause>" of ignored reports (event posted)
    serving_pending: bool = False  # spec.serving.apply: the last pass's LLMInferenceService needs another look
    # Chained stages (spec.baseModel.fromJob, see `_chain_gate`):
    from_job: str | None = None  # this job's fromJob, as the watch last showed it (its entry in `Runtime.dependents`)
    base_view: tuple[Any, ...] | None = None  # `chain_wait.base_view` of this job when its watch last showed it
    chain_settled: bool = False  # a pass found this job's chain resolved (or the job finished): no more wake-ups
    waiting: bool = False  # the last pass found it waiting for its base job
    poked: bool = False  # woken by its base job's change since its last pass began: refresh at once


@dataclass
class Runtime:
    """Operator-wide state, created at startup and shared through kopf's memo."""

    settings: OperatorSettings
    kopf_settings: kopf.OperatorSettings
    reader: ReportReader
    metrics: metrics_mod.Metrics
    interval: float
    kube: kube.Kube
    server: metrics_mod.MetricsServer | None = None
    known: dict[str, tuple[str, str]] = field(default_factory=dict)  # uid -> (namespace, name)
    names: dict[str, str] = field(default_factory=dict)  # "namespace/name" -> uid, the same jobs by name
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)  # "namespace/name" -> its lock
    jobs: dict[str, JobState] = field(default_factory=dict)  # "namespace/name" -> what the refresher keeps
    # "namespace/base" -> names of the jobs whose spec.baseModel.fromJob is `base` (kept by `track`)
    dependents: dict[str, set[str]] = field(default_factory=dict)
    passes: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(PASS_CONCURRENCY))
    policies: PolicyLookup = field(default_factory=PolicyLookup)
    serving: serving_io.Discovery = field(default_factory=serving_io.Discovery)  # KServe's CRD served? (cached)
    task: asyncio.Task[None] | None = None

    def knows(self, namespace: str, name: str) -> bool:
        """Whether `namespace/name` is a FineTuneJob the watch has shown (and not deleted): only those get state
        (JobState, locks, schedule) from pod and Job events, whose labels and owner names anyone may set."""
        return f"{namespace}/{name}" in self.names

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self.locks.setdefault(f"{namespace}/{name}", asyncio.Lock())

    def job_state(self, namespace: str, name: str) -> JobState:
        return self.jobs.setdefault(f"{namespace}/{name}", JobState())

    def forget_lock(self, namespace: str, name: str) -> None:
        """Drop the lock of a deleted FineTuneJob, unless a pass (for a namesake) still holds it."""
        key = f"{namespace}/{name}"
        lock = self.locks.get(key)
        if lock is not None and not lock.locked():
            del self.locks[key]


def _runtime(memo: Any) -> Runtime:
    rt = getattr(memo, "finetune", None)
    if not isinstance(rt, Runtime):
        raise kopf.TemporaryError("the operator is still starting", delay=1)
    return rt


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_interval(env: Mapping[str, str] | None = None) -> float:
    env = os.environ if env is None else env
    raw = (env.get(ENV_STATUS_INTERVAL) or "").strip()
    if not raw:
        return DEFAULT_STATUS_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.05 <= value <= 3600:
        raise ValueError(f"{ENV_STATUS_INTERVAL}={raw!r} is not valid; expected seconds in [0.05, 3600]")
    return value


# --- the Kubernetes API ----------------------------------------------------------------------------


def ftj_url(namespace: str, name: str | None = None) -> str:
    base = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
    return f"{base}/{name}" if name else base


def child_url(obj: Mapping[str, Any], *, named: bool = True) -> str:
    api_version = obj["apiVersion"]
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    meta = obj["metadata"]
    base = f"{prefix}/namespaces/{meta['namespace']}/{_PLURALS[obj['kind']]}"
    return f"{base}/{meta['name']}" if named else base


async def post_event(api: kube.Kube, obj: Mapping[str, Any], type_: str, reason: str, message: str,
                     name: str | None = None) -> None:
    """A core/v1 Event about `obj`; failures are logged, never raised (events are auxiliary).

    `name`: a deterministic name (status.event_name) makes a repeated post a no-op (409 from the API)."""
    meta = obj.get("metadata") or {}
    now = datetime.now(UTC).isoformat()
    ref = {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
        "uid": meta.get("uid"),
    }
    body = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name or f"{meta.get('name')}.{secrets.token_hex(8)}", "namespace": meta.get("namespace")},
        "involvedObject": {k: v for k, v in ref.items() if v},
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": os.environ.get("HOSTNAME", COMPONENT),
        "action": reason,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "eventTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "count": 1,
    }
    try:
        await api.create(f"/api/v1/namespaces/{meta.get('namespace')}/events", body)
    except kube.Conflict:
        log.debug("event %s %s for %s already posted", type_, reason, meta.get("name"))
    except (kube.ApiError, OSError) as err:
        log.warning("could not post event %s %s for %s: %s", type_, reason, meta.get("name"), err)


# --- reconcile ------------------------------------------------------------------------------------


def _controller(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return dict(ref)
    return None


def _foreign_message(obj: Mapping[str, Any], desired: Mapping[str, Any], uid: str) -> str:
    meta = obj.get("metadata") or {}
    what = f"{desired['kind']} {meta.get('namespace')}/{meta.get('name')}"
    owner = _controller(obj)
    if owner is None:
        return f"{what} already exists and is not controlled by this FineTuneJob (it has no controller); delete or rename it"
    return (
        f"{what} already exists and is controlled by {owner.get('kind')} {owner.get('name')} "
        f"(uid {owner.get('uid')}), not by this FineTuneJob (uid {uid}); delete or rename it"
    )


def _adoption_patch(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """What may safely be brought to the desired state on an adopted child (see the module docstring)."""
    patch: dict[str, Any] = {}
    have = (existing.get("metadata") or {}).get("labels") or {}
    want = desired["metadata"].get("labels") or {}
    missing = {k: v for k, v in want.items() if have.get(k) != v}
    if missing:
        patch["metadata"] = {"labels": missing}
    if desired["kind"] == "Service":
        spec = existing.get("spec") or {}
        changed: dict[str, Any] = {}
        for key in ("selector", "ports", "publishNotReadyAddresses"):
            want_value = desired["spec"][key]
            if spec.get(key) == want_value:
                continue
            if isinstance(want_value, dict) and isinstance(spec.get(key), dict):
                # A merge patch merges maps: stale selector keys must be removed explicitly.
                want_value = {**{k: None for k in spec[key] if k not in want_value}, **want_value}
            changed[key] = want_value
        if changed:
            patch["spec"] = changed
    return patch


async def ensure_children(
    api: kube.Kube, rt: Runtime, body: Mapping[str, Any], job: FineTuneJob, plan: Plan, logger: Any,
    stage: str | None = None,
) -> status_mod.Children:
    uid = str(job.metadata.uid)
    known = _condition_true(body, "Created")
    # A FineTuneJob with no status yet has never had a pass: its children almost surely do not exist, so
    # they are created without a read first (a 409 then reads and decides by owner as below). Later
    # passes read first: the children usually exist, and a read is cheaper than a refused create.
    fresh = not body.get("status")
    created: list[str] = []
    adopted: list[str] = []
    job_obj: dict[str, Any] | None = None
    # A chained job's `job` is already `chain.apply`'s; its snapshot also carries the resolution (TrainerConfig.base).
    base = chain_wait.resolution(body.get("status"))
    for desired in render.render_children(job, plan, rt.settings, stage, rendezvous_id=secrets.token_hex(16),
                                          base=base):
        label = f"{desired['kind']}/{desired['metadata']['name']}"
        url = child_url(desired)
        existing = None if fresh else await api.get(url)
        if existing is None:
            try:
                # Only the Job's answer is used: the others' (the ConfigMap's holds the whole snapshot) go
                # undecoded.
                made = await api.create(child_url(desired, named=False), desired, answer=desired["kind"] == "Job")
            except kube.Conflict:
                # Created by someone (or an earlier us) since the read: decide by its owner below.
                existing = await api.get(url)
                if existing is None:
                    raise kopf.TemporaryError(f"{label} conflicted on create but cannot be read", delay=2) from None
            else:
                created.append(label)
                rt.metrics.children.labels(action="created").inc()
                logger.info(f"created {label}")
                if desired["kind"] == "Job":
                    job_obj = made or dict(desired)
                continue
        owner = _controller(existing)
        if owner is None or owner.get("uid") != uid:
            message = _foreign_message(existing, desired, uid)
            rt.metrics.children.labels(action="foreign").inc()
            logger.warning(message)
            return status_mod.Children(job=None, created=tuple(created), adopted=tuple(adopted), foreign=(message,))
        if not known:
            adopted.append(label)
            rt.metrics.children.labels(action="adopted").inc()
            patch = _adoption_patch(existing, desired)
            if patch:
                existing = await api.patch(url, patch)
            logger.info(f"adopted {label}")
        if desired["kind"] == "Job":
            job_obj = existing
    return status_mod.Children(job=job_obj, created=tuple(created), adopted=tuple(adopted))


def _condition_true(body: Mapping[str, Any], type_: str) -> bool:
    for cond in (body.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return bool(cond.get("status") == "True")
    return False


def _job_finished(job_obj: Mapping[str, Any]) -> bool:
    return any(
        cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True"
        for cond in (job_obj.get("status") or {}).get("conditions") or []
    )


def _kueue_managed(body: Mapping[str, Any], job_obj: Mapping[str, Any] | None) -> bool:
    mine = (body.get("metadata") or {}).get("labels") or {}
    theirs = ((job_obj or {}).get("metadata") or {}).get("labels") or {}
    return bool(mine.get(render.KUEUE_QUEUE_LABEL) or theirs.get(render.KUEUE_QUEUE_LABEL))


def _existing_plan(body: Mapping[str, Any], stage: str | None = None) -> Plan | None:
    status = body.get("status") or {}
    raw = (status.get("pilot") or {}).get("plan") if stage else status.get("plan")
    if not raw:
        return None
    try:
        return Plan.model_validate(raw)
    except ValidationError:
        return None


async def _read_report(rt: Runtime, body: Mapping[str, Any], output_uri: str) -> Any:
    return await _read_owned(rt, body, rt.reader.read, output_uri, conditions.REPORT_IGNORED)


async def _read_owned(rt: Runtime, body: Mapping[str, Any], read: Any, output_uri: str, reason: str) -> Any:
    """`read(output_uri, uid)` (the reader's report or pre-flight result) for the FineTuneJob `body`, in a thread.

    An object the reader ignored (`progress.Ignored`: another job's, without a jobUid, too large, invalid or
    over a list cap) gives None, so the status keeps its previous values, and one Warning event per object
    and cause on the FineTuneJob: once in this process (`JobState.ignored`), and under a name derived from
    the job, object and cause, so that a restarted operator's repeat is refused (409) rather than stored."""
    meta = body.get("metadata") or {}
    uid = str(meta.get("uid"))
    found = await asyncio.to_thread(read, output_uri, uid)
    if not isinstance(found, Ignored):
        return found
    key = f"{found.uri} {found.cause}"
    state = rt.jobs.get(f"{meta.get('namespace')}/{meta.get('name')}")
    if state is not None:
        if key in state.ignored:
            return None
        state.ignored.add(key)
    digest = hashlib.sha256(f"{uid}\n{key}".encode()).hexdigest()[:16]
    await post_event(rt.kube, body, "Warning", reason, found.message, name=f"{meta.get('name')}.{digest}")
    return None


async def _write(api: kube.Kube, rt: Runtime, body: Mapping[str, Any], new: dict[str, Any]) -> None:
    meta = body.get("metadata") or {}
    old = dict(body.get("status") or {})
    uid = str(meta.get("uid"))
    new = await _serve(api, rt, body, new)
    if uid in rt.known:  # not for an object deleted while this pass ran (no await since the check)
        rt.metrics.observe_phase(uid, new.get("phase"))
    if not status_mod.status_changed(old, new):
        return
    # Events first, under names derived from `old`: if this pass dies before the status write, the next
    # pass computes the same transition from the same `old` and its posts are refused as repeats; posting
    # after the write would lose them instead (the write lands, the pass dies, the next sees no transition).
    for event in [*status_mod.transition_events(old, new), *serving_apply.events(old, new)]:
        await post_event(api, body, event.type, event.reason, event.message,
                         name=status_mod.event_name(meta["name"], uid, old, event))
    try:
        await api.patch(ftj_url(meta["namespace"], meta["name"]) + "/status", status_mod.status_patch(old, new))
    except kube.NotFound:
        # Deleted since this pass read it: nothing to report on and nothing to retry (its children, if
        # this pass created any, go with it through garbage collection).
        log.info("%s/%s was deleted during its reconcile; status not written", meta["namespace"], meta["name"])
        return
    rt.metrics.status_writes.inc()
    if new.get("phase") and new.get("phase") != old.get("phase"):
        rt.metrics.transitions.labels(phase=new["phase"]).inc()


async def _serve(api: kube.Kube, rt: Runtime, body: Mapping[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """spec.serving.apply for a finished job (`inference_service.settle`: its LLMInferenceService made sure of,
    its readiness in the status); whether the refresher must look again goes to `JobState.serving_pending`."""
    new, pending = await serving_io.settle(api, rt.serving, body, new, _now())
    meta = body.get("metadata") or {}
    state = rt.jobs.get(f"{meta.get('namespace')}/{meta.get('name')}")
    if state is not None:
        state.serving_pending = pending
    return new


async def reconcile_body(api: kube.Kube, rt: Runtime, body: dict[str, Any], logger: Any) -> refresh.Outcome:
    """One pass over one FineTuneJob (`body` freshly read). Idempotent. Returns what the refresh schedule
    needs to know (`refresh.next_refresh`)."""
    now = _now()
    meta = body.get("metadata") or {}
    try:
        job = FineTuneJob.model_validate(body)
    except ValidationError as err:
        message = "; ".join(str(issue) for issue in issues_from_validation(err))
        new = status_mod.compute_status(body, plan=None, validation_error=message, now=now)
        await _write(api, rt, body, new)
        return refresh.Outcome(phase=new.get("phase"))

    output_uri = job.spec.output.uri
    old_status = body.get("status") or {}
    if old_status.get("phase") in status_mod.TERMINAL_PHASES:
        # Finished: children are never recreated. A success whose artifacts were not read yet (the report
        # was unreadable at that moment) keeps looking for them; a failure was read at its transition.
        report = None
        awaiting = (
            old_status.get("phase") == status_mod.SUCCEEDED
            and not old_status.get("artifacts")
            and report_location(output_uri) is not None
        )
        if awaiting:
            report = await _read_report(rt, body, output_uri)
        finished = rt.jobs.get(f"{meta.get('namespace')}/{meta.get('name')}")
        if finished is not None:
            finished.chain_settled, finished.waiting = True, False
        new = status_mod.compute_status(body, plan=None, report=report, now=now)
        await _write(api, rt, body, new)
        return refresh.Outcome(phase=new.get("phase"), awaiting_artifacts=awaiting and not new.get("artifacts"))

    state = rt.job_state(meta["namespace"], meta["name"])
    if job.spec.base_model.from_job is not None:
        gated = await _chain_gate(api, rt, body, job, state, logger, now)
        if isinstance(gated, refresh.Outcome):
            return gated  # waiting for the base job, or failed because of it: nothing else is done
        body, job = gated  # from here on the spec's baseModel is the resolution (`chain.apply`)
        old_status = body.get("status") or {}
    checking = _preflight_runs(rt, body)
    plan = _existing_plan(body)
    if plan is None:
        try:
            plan = serving.attach(job, sizing.plan(job.spec))  # plan.serving: what spec.serving serves
        except sizing.SizeUnknown as err:
            if not checking:  # nothing will read the size from the model's files
                new = status_mod.compute_status(body, plan=None, planning_error=str(err), now=now)
                await _write(api, rt, body, new)
                return refresh.Outcome(phase=new.get("phase"))
        except sizing.PlanningError as err:
            new = status_mod.compute_status(body, plan=None, planning_error=str(err), now=now)
            await _write(api, rt, body, new)
            return refresh.Outcome(phase=new.get("phase"))

    if not _condition_true(body, conditions.CREATED):
        # Before the first pod of any stage. The GPU cap on a plan the pre-flight will not change (the table's,
        # for a chosen method), else after it (below).
        final = plan is not None and (not checking or (plan.source == "table" and job.spec.method != "auto"))
        refused = await _policy_refusal(api, rt, body, plan, final, now)
        if refused is not None:
            return refused

    if checking:
        # The CPU pre-flight first: no GPU Job until the model, data and output checked out. Once it passed,
        # the completed plan is written before any GPU Job exists, and this pass goes on with it.
        view = await _preflight_pass(api, rt, body, job, plan, logger, state)
        new = status_mod.compute_status(body, plan=plan, preflight=view, now=now)
        passed = (new.get("preflight") or {}).get("phase") == status_mod.SUCCEEDED and new.get("phase") not in \
            status_mod.TERMINAL_PHASES
        await _write(api, rt, body, new)
        if not passed:
            return refresh.Outcome(
                phase=new.get("phase"),
                children_ready=view.children.job is not None and not view.children.foreign
                and not (view.readable and view.result is None and _condition_of(view.children.job, "Complete")),
            )
        logger.info(f"the pre-flight of {meta['name']} passed; planning from its result")
        body = {**body, "status": new}
        old_status = new
        plan = _existing_plan(body)
        refused = await _policy_refusal(api, rt, body, plan, True, now)
        if refused is not None:
            return refused
    assert plan is not None  # an unknown size failed above, unless the pre-flight read it (then it is planned)

    pilot_view: status_mod.PilotView | None = None
    if job.spec.pilot is not None and (old_status.get("pilot") or {}).get("phase") != status_mod.SUCCEEDED:
        # The pilot stage first: the main Job (and its large GPU request) only after the pilot's Job completed.
        pilot_view = await _pilot_pass(api, rt, body, job, logger, state)
        pilot_job = pilot_view.children.job
        if pilot_job is None or not _condition_of(pilot_job, "Complete"):
            new = status_mod.compute_status(body, plan=plan, pilot=pilot_view,
                                            kueue_managed=_kueue_managed(body, pilot_job), now=now)
            await _write(api, rt, body, new)
            return refresh.Outcome(
                phase=new.get("phase"),
                children_ready=pilot_job is not None and not pilot_view.children.foreign,
                pods_active=refresh.pods_active(pilot_view.children.pods),
                report_changed=refresh.report_changed(old_status, new),
            )
        logger.info(f"the pilot of {meta['name']} passed its gates; creating the main stage")
    elif job.spec.pilot is not None:
        pilot_view = status_mod.PilotView()  # passed in an earlier pass: status.pilot stays as it is

    children, report, kueue = await _observe_stage(api, rt, body, job, plan, logger, state)
    new = status_mod.compute_status(body, plan=plan, children=children, report=report, kueue_managed=kueue,
                                    pilot=pilot_view, now=now)
    await _write(api, rt, body, new)
    return refresh.Outcome(
        phase=new.get("phase"),
        children_ready=children.job is not None and not children.foreign,
        pods_active=refresh.pods_active(children.pods),
        report_changed=refresh.report_changed(old_status, new),
    )


async def _chain_gate(api: kube.Kube, rt: Runtime, body: dict[str, Any], job: FineTuneJob, state: JobState,
                      logger: Any, now: str) -> refresh.Outcome | tuple[dict[str, Any], FineTuneJob]:
    """spec.baseModel.fromJob before anything else (`chain_wait`): the pass's Outcome while the job waits for its
    base job or after it failed because of it; else the body (its status holding the resolution) and the job with
    its spec applied (`chain.apply`), for the rest of the pass.

    The resolution is made once: while status.baseJob has no modelUri the base job is read (one GET) and judged
    (`chain_wait.decide`); the pass that resolves it writes the status (status.baseJob, WaitingForBaseJob False,
    the BaseJobSucceeded event) before anything is created, and every later pass starts from that recording
    without reading the base job (which may since have been deleted: this job keeps what it started from)."""
    meta = body["metadata"]
    namespace, name = str(meta["namespace"]), str(meta["name"])
    status = body.get("status") or {}
    resolved = chain_wait.resolution(status)
    if resolved is None:
        base_name = str(job.spec.base_model.from_job)
        base = await api.get(ftj_url(namespace, base_name))

        def next_of(link: str) -> str | None:
            # A cycle runs only through jobs that wait: the base job as just read, the others as their last pass
            # in this process found them (a job that resolved, or finished, ended its link).
            if link == base_name:
                waits = base is not None and chain_wait.resolution(base.get("status")) is None and (
                    (base.get("status") or {}).get("phase") not in status_mod.TERMINAL_PHASES)
                return chain_wait.from_job(base) if waits and base is not None else None
            other = rt.jobs.get(f"{namespace}/{link}")
            return other.from_job if other is not None and other.waiting else None

        verdict = chain_wait.decide(name, namespace, base_name, chain_wait.recorded(status), base,
                                    chain_wait.find_cycle(name, base_name, next_of))
        new = status_mod.compute_status(body, plan=None, chain=verdict, now=now)
        await _write(api, rt, body, new)
        state.waiting = verdict.action == "wait"
        state.chain_settled = verdict.action != "wait"
        if verdict.action != "start":
            return refresh.Outcome(phase=new.get("phase"), waiting_for_base=state.waiting)
        logger.info(f"{name}: {verdict.message}")
        body = {**body, "status": new}
        resolved = verdict.base_job
    state.waiting, state.chain_settled = False, True
    return body, job.model_copy(update={"spec": chain.apply(job.spec, resolved)})


async def _policy_refusal(api: kube.Kube, rt: Runtime, body: dict[str, Any], plan: Plan | None, final: bool,
                          now: str) -> refresh.Outcome | None:
    """With FineTunePolicies on (`settings.policy`): what admission cannot see (`policy_lookup`), the GPU cap
    only when `final` (the plan will not change before the pods): the job failed with PolicyViolation, or
    None when it may go on."""
    if not rt.settings.policy:
        return None
    gpus = plan.gpus if final and plan is not None else None
    violation = await rt.policies.violation(api, body["metadata"]["namespace"], gpus)
    if violation is None:
        return None
    new = status_mod.compute_status(body, plan=plan, policy_violation=violation, now=now)
    await _write(api, rt, body, new)
    return refresh.Outcome(phase=new.get("phase"))


def _preflight_runs(rt: Runtime, body: Mapping[str, Any]) -> bool:
    """Whether this pass is in the pre-flight stage: the operator runs pre-flights, this job's has not passed,
    and it is this job's first stage (a job that got its GPU Job before pre-flights were turned on keeps
    going without one)."""
    if not rt.settings.preflight:
        return False
    status = body.get("status") or {}
    checked = status.get("preflight")
    if checked:
        return bool(checked.get("phase") != status_mod.SUCCEEDED)
    return not status.get("stage") and not _condition_true(body, "Created")


async def _preflight_pass(api: kube.Kube, rt: Runtime, body: dict[str, Any], job: FineTuneJob, plan: Plan | None,
                          logger: Any, state: JobState) -> status_mod.PreflightView:
    """What the pre-flight stage looks like now: its children (created when missing), its Job's suspension
    (applied), and once the Job finished its result (`<output.uri>/preflight.json`) and the plan completed
    from it (`preflight.complete_plan`)."""
    meta = body.get("metadata") or {}
    stage = preflight_mod.STAGE
    placeholder = preflight_mod.placeholder_plan(job.spec)
    children = await ensure_children(api, rt, body, job, placeholder, logger, stage)
    job_obj = dict(children.job) if children.job is not None else None
    state.job_view = refresh.job_view(job_obj)
    output_uri = job.spec.output.uri
    where = report_location(output_uri, contract.PREFLIGHT_KEY)
    result_uri = output_uri.rstrip("/") + "/" + contract.PREFLIGHT_KEY
    view = status_mod.PreflightView(children=children, readable=where is not None, result_uri=result_uri)
    if job_obj is None:
        return view
    if not _job_finished(job_obj):
        job_obj = await _apply_suspend(api, job, job_obj, logger, stage)
        state.job_view = refresh.job_view(job_obj)
        return replace(view, children=replace(children, job=job_obj))
    result = await _read_owned(rt, body, rt.reader.read_preflight, output_uri,
                               conditions.PREFLIGHT_RESULT_IGNORED) if where is not None else None
    if result is not None and not status_mod.written_since(result.checked_at, meta.get("creationTimestamp")):
        result = None  # an earlier job's, at the same output URI
    pods: list[dict[str, Any]] = []
    if _condition_of(job_obj, "Failed") and (result is None or result.ok):
        # No verdict in a result: the pod's termination message says what happened.
        selector = ",".join(f"{k}={v}" for k, v in render.pod_selector(job, stage).items())
        pods = await api.list(f"/api/v1/namespaces/{meta['namespace']}/pods", label_selector=selector)
    completed: Plan | None = None
    error: str | None = None
    if result is not None and result.ok:
        try:
            completed = serving.attach(job, preflight_mod.complete_plan(job.spec, result))
        except sizing.PlanningError as err:
            error = str(err)
    elif result is None and where is None and plan is None:
        error = str(sizing.SizeUnknown(job.spec.base_model.resolved_uri())) + (
            f" (the pre-flight read it, but the operator cannot read {result_uri})")
    return replace(view, children=replace(children, job=job_obj, pods=pods), result=result, plan=completed,
                   planning_error=error)


async def _apply_suspend(api: kube.Kube, job: FineTuneJob, job_obj: dict[str, Any], logger: Any,
                         stage: str | None) -> dict[str, Any]:
    """Bring a stage's unfinished Job's suspension to spec.suspend (not for Kueue's Jobs: Kueue owns it)."""
    desired = bool(job.spec.suspend)
    if bool((job_obj.get("spec") or {}).get("suspend")) == desired:
        return job_obj
    name = render.child_names(job.metadata.name, stage).job
    job_url = f"/apis/batch/v1/namespaces/{job.metadata.namespace}/jobs/{name}"
    patched = await api.patch(job_url, {"spec": {"suspend": desired}})
    logger.info(f"{'suspended' if desired else 'resumed'} Job {name}")
    return dict(patched)


async def _pilot_pass(api: kube.Kube, rt: Runtime, body: dict[str, Any], job: FineTuneJob, logger: Any,
                      state: JobState) -> status_mod.PilotView:
    """What the pilot stage looks like now: its plan, its children (created when missing), pods, report."""
    stage_job = pilot_mod.pilot_job(job)
    plan = _existing_plan(body, pilot_mod.STAGE)
    if plan is None:
        try:
            plan = sizing.plan(stage_job.spec)
        except sizing.PlanningError as err:
            return status_mod.PilotView(planning_error=str(err))
    children, report, _ = await _observe_stage(api, rt, body, stage_job, plan, logger, state, pilot_mod.STAGE)
    return status_mod.PilotView(plan=plan, children=children, report=report)


def _condition_of(obj: Mapping[str, Any], type_: str) -> bool:
    return any(cond.get("type") == type_ and cond.get("status") == "True"
               for cond in (obj.get("status") or {}).get("conditions") or [])


async def _observe_stage(
    api: kube.Kube, rt: Runtime, body: dict[str, Any], job: FineTuneJob, plan: Plan, logger: Any, state: JobState,
    stage: str | None = None,
) -> tuple[status_mod.Children, Any, bool]:
    """One stage's children (made sure of), its Job's suspension (applied), its pods and its report.

    `job` is the stage's job (`pilot.pilot_job` for the pilot: its output URI is the pilot's)."""
    meta = body.get("metadata") or {}
    children = await ensure_children(api, rt, body, job, plan, logger, stage)
    job_obj = dict(children.job) if children.job is not None else None
    # Recorded now, not at the end of the pass: the watch's echo of a Job just created usually arrives
    # while this pass still writes the status, and can then be dropped without waiting for it.
    state.job_view = refresh.job_view(job_obj)
    kueue = _kueue_managed(body, job_obj)
    pods: list[dict[str, Any]] = []
    if job_obj is not None:
        if not kueue and not _job_finished(job_obj):
            job_obj = await _apply_suspend(api, job, job_obj, logger, stage)
        suspended = bool((job_obj.get("spec") or {}).get("suspend")) and not _job_finished(job_obj)
        if not refresh.skip_pods(suspended, len(state.pods)):
            # The main stage's selector also matches the pilot's pods: each stage keeps its own.
            selector = ",".join(f"{k}={v}" for k, v in render.pod_selector(job, stage).items())
            pods = [pod for pod in await api.list(f"/api/v1/namespaces/{meta['namespace']}/pods", label_selector=selector)
                    if render.stage_of(pod) == stage]
    report = None
    # Read once after the last pod went away, then not again until a pod event (no trainer, no writes).
    # Nor in the pass that created the Job: none of its trainers has run, so a report at the output URI
    # is an earlier run's, and this run's first report follows a pod event, whose pass reads it.
    job_created = any(label.startswith("Job/") for label in children.created)
    skipped = job_obj is not None and (job_created or refresh.skip_report(len(pods), state.settled))
    if not skipped:
        report = await _read_report(rt, body, job.spec.output.uri)
    state.settled = job_obj is not None and not pods and not job_created and (skipped or report is not None)
    state.job_view = refresh.job_view(job_obj)
    children = status_mod.Children(
        job=job_obj, pods=pods, created=children.created, adopted=children.adopted, foreign=children.foreign
    )
    return children, report, kueue


def _schedule(rt: Runtime, body: Mapping[str, Any], outcome: refresh.Outcome) -> None:
    """Set when the refresher next visits this FineTuneJob (`refresh.next_refresh`)."""
    meta = body.get("metadata") or {}
    if str(meta.get("uid")) not in rt.known:
        return  # deleted meanwhile (or not seen by the watch yet: `track` schedules it then)
    state = rt.job_state(str(meta.get("namespace")), str(meta.get("name")))
    if state.serving_pending:
        outcome = replace(outcome, serving_pending=True)
    decision = refresh.next_refresh(outcome, state.idle, rt.interval)
    state.idle = decision.idle
    state.due = None if decision.delay is None else time.monotonic() + decision.delay
    if state.poked:  # its base job changed while this pass ran, perhaps after the pass read it: look again now
        state.due = time.monotonic()


async def reconcile(
    rt: Runtime, namespace: str, name: str, logger: Any, cause: str, given: Mapping[str, Any] | None = None,
    job_view: int | None = None,
) -> None:
    """Reconcile the FineTuneJob `namespace/name` if it exists, serialized per object.

    `given`: the body of the watch event `track` handles. The first pass of an object in this process
    uses it as is, since nothing of ours can have written the object since the watch delivered it (the
    operator writes only status and Job suspension, and only in passes); every other pass reads it.
    `job_view`: a Job event's `refresh.job_view`; no pass when the last pass saw the same.

    At most `PASS_CONCURRENCY` passes run at once: a burst of creates then finishes job after job
    instead of interleaving every job's requests on the shared connections (where each job's status
    waited for the whole burst), and holds only that many bodies, plans and rendered children at once.
    """
    api = rt.kube
    # The lock is keyed by the name the caller knows, so one read under it is fresh (no one else is
    # writing): a pass costs one read of the object, not two (a read to learn its uid, then a re-read).
    async with rt.lock(namespace, name), rt.passes:
        state = rt.job_state(namespace, name)
        if job_view is not None and state.job_view == job_view:
            return
        first = state.passes == 0
        state.passes += 1
        state.poked = False  # this pass reads the base job after the change that woke it
        if given is not None and first:
            body: dict[str, Any] | None = dict(given)
        else:
            body = await api.get(ftj_url(namespace, name))
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            return
        started = time.monotonic()
        outcome = refresh.Outcome(phase=None, failed=True)
        try:
            outcome = await reconcile_body(api, rt, body, logger)
        except kube.ApiError as err:
            rt.metrics.reconcile_errors.labels(reason=f"api{err.status}" if err.status else "unreachable").inc()
            raise kopf.TemporaryError(f"Kubernetes API error during {cause}: {err}", delay=5) from err
        except kopf.TemporaryError:
            rt.metrics.reconcile_errors.labels(reason="temporary").inc()
            raise
        except Exception:
            rt.metrics.reconcile_errors.labels(reason="exception").inc()
            raise
        finally:
            rt.metrics.reconcile_duration.observe(time.monotonic() - started)
            _schedule(rt, body, outcome)


async def after_oom_kill(rt: Runtime, namespace: str, owner: str, pod: Mapping[str, Any],
                         term: Mapping[str, Any], logger: Any) -> None:
    """A training pod ran out of memory (OOMKilled, or the trainer's retryable `OutOfMemory`): step the job's
    config snapshot one rung down the ladder, so the replacement pod (the Job controller waits 10 s or more
    before it) starts there (`oomkill`). `term`: the container's terminated state (`oomkill.killed_container`)."""
    name = oomkill.config_map_name(pod)
    if name is None:
        return
    url = f"/api/v1/namespaces/{namespace}/configmaps/{name}"
    ftj = await rt.kube.get(ftj_url(namespace, owner))
    status = (ftj or {}).get("status") or {}
    reported = [Adjustment.model_validate(a) for a in status.get("adjustments") or []]
    step = int((status.get("progress") or {}).get("step") or 0)
    for _attempt in range(3):  # a lost race with another writer of the ConfigMap: read it again
        cm = await rt.kube.get(url)
        if cm is None or contract.CONFIG_KEY not in (cm.get("data") or {}):
            return
        meta = cm.get("metadata") or {}
        config = contract.TrainerConfig.model_validate_json(cm["data"][contract.CONFIG_KEY])
        decision = oomkill.decide(pod, config, adjusted_at=(meta.get("annotations") or {}).get(
            oomkill.ADJUSTED_AT_ANNOTATION), reported=reported, step=step, kind=str(term.get("reason")))
        if decision is None:
            return
        if decision.adjustment is not None:
            config.adjustments.append(decision.adjustment)
            # The kill's time on the kubelet's clock: pods of the same incident were created before it.
            at = str(term.get("finishedAt") or datetime.now(UTC).isoformat())
            try:
                await rt.kube.patch(url, {
                    "metadata": {"resourceVersion": meta.get("resourceVersion"),
                                 "annotations": {oomkill.ADJUSTED_AT_ANNOTATION: at}},
                    "data": {contract.CONFIG_KEY: contract.config_json(config)},
                })
            except kube.Conflict:
                continue
        logger.warning(decision.message)
        if ftj is not None:
            pod_name = str((pod.get("metadata") or {}).get("name"))
            await post_event(rt.kube, ftj, "Warning", "OutOfMemory", decision.message,
                             name=f"{owner}.oomkilled.{pod_name}"[:253])
        return
    logger.warning(f"could not step {name} down after an OOMKilled pod: the ConfigMap kept changing")


# --- kopf wiring ------------------------------------------------------------------------------------


def _credentials(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The pod's service account, else $KUBECONFIG (both read now, by kopf's readers); a kubeconfig user
    without static credentials (an exec plugin or auth provider, e.g. `aws eks get-token`) goes through
    the `kubernetes` client library when it is installed (it runs the plugin)."""
    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is not None and (info.token or info.username or info.certificate_path or info.certificate_data):
        return info
    try:
        return kopf.login_via_client(**kwargs) or info
    except kopf.LoginError:
        return info


def _identity(memo: Any) -> kube.Identity:
    """The run's `kube.Identity`: made by whichever of startup and login comes first (startup does)."""
    identity = getattr(memo, "finetune_identity", None)
    if not isinstance(identity, kube.Identity):
        identity = kube.Identity()
        memo.finetune_identity = identity
    return identity


@kopf.on.login()
async def login(memo: kopf.Memo, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """Credentials, chosen when the operator logs in rather than when this module is imported.

    kopf registers its fallback logins from the environment at import time, so an import before
    KUBECONFIG is set (a test collector, a tool importing the module) left it with none. The `kubernetes`
    client is not asked first (as kopf would when it is installed): it fixes its kubeconfig location at
    import and raises rather than falling through; see `_credentials` for the order.

    The same credentials go to the operator's own client (`kube.Kube`, through `kube.Identity`), which
    repeats this login when the API server answers it 401 (a rotated service-account token). The
    readers are blocking (files; the `kubernetes` client may run a kubeconfig exec plugin), so they run
    in a thread.
    """
    kwargs["memo"] = memo
    info = await asyncio.to_thread(lambda: _credentials(**kwargs))
    _identity(memo).update(info, relogin=lambda: asyncio.to_thread(lambda: _credentials(**kwargs)))
    return info


class NoDiffBase(kopf.DiffBaseStorage):
    """A diff base that keeps nothing. kopf builds one (a deep copy of the object, then a diff) for every
    event of every watched resource, which only change handlers read: at 1,000 jobs that was 7% of the
    operator's CPU (py-spy, bench/operator_scale_bench.py) with no change handler to use it."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    ft_settings = OperatorSettings.from_env()
    interval = status_interval()
    port = metrics_mod.port_from_env()

    # Every handler is an event handler: no progress or diff base is ever stored. Should a change handler be
    # added, its progress goes to annotations (the status schema is strict) and it needs a real diff base
    # (kopf.AnnotationsDiffBaseStorage) instead of `NoDiffBase`.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = NoDiffBase()
    if (os.environ.get(ENV_PEERING) or "").strip().lower() not in _TRUE:
        settings.peering.standalone = True
    # Re-list well within the API server's own watch timeout, and notice a dead connection quickly.
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.watching.connect_timeout = 10
    # The pod watch (`on_pod_event`) streams training pods only, selected by the API server, not every
    # pod of the cluster filtered here.
    settings.watching.label_selectors["v1", "pods"] = TRAINING_POD_SELECTOR
    # For kopf's requests and the operator's own (`kube.Kube` reads the same settings).
    settings.networking.request_timeout = 30
    settings.networking.connect_timeout = 10
    # Kept at kopf's defaults on purpose (tests/api/test_api_faults.py covers them): a watch silent for
    # watching.inactivity_timeout (70 s, above the API server's 60 s bookmark period) is re-opened, and a
    # 410 Gone makes kopf re-list; 429/5xx are retried per request (networking.error_backoffs, 1 to 21 s,
    # about a minute in all, by kopf's client and by `kube.Kube`), a longer Retry-After is honoured.
    # Only our explicit events: no "Handler ... succeeded" noise on the objects.
    settings.posting.loggers = False
    if (os.environ.get(ENV_LOG_FORMAT) or "json").strip().lower() == "json":
        level = logging.getLogger().level
        kopf.configure(log_format=kopf.LogFormat.JSON, log_refkey="object")
        logging.getLogger().setLevel(level)

    rt = Runtime(
        settings=ft_settings,
        kopf_settings=settings,
        reader=ReportReader.from_env(),
        metrics=metrics_mod.Metrics(),
        interval=interval,
        # kopf logs in after the startup handlers: the client connects on its first request.
        kube=kube.Kube(settings, _identity(memo)),
        policies=PolicyLookup(ft_settings.policy_cache_seconds),
        serving=serving_io.Discovery(ttl=interval),
    )
    rt.server = metrics_mod.start(rt.metrics, port)
    memo.finetune = rt
    rt.task = asyncio.create_task(_refresher(rt), name="finetune status refresher")
    logger.info(
        f"finetune-operator started: status every {interval:g}s, metrics "
        + (f"on :{rt.server.port}" if rt.server else "off")
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    rt = getattr(memo, "finetune", None)
    if not isinstance(rt, Runtime):
        return
    if rt.task is not None:
        rt.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await rt.task
    if rt.server is not None:
        rt.server.close()
    await rt.kube.close()


def _due(rt: Runtime, now: float) -> list[tuple[str, tuple[str, str]]]:
    """The known FineTuneJobs whose periodic refresh is due at `now` (time.monotonic())."""
    due = []
    for uid, (namespace, name) in rt.known.items():
        state = rt.jobs.get(f"{namespace}/{name}")
        if state is not None and state.due is not None and state.due <= now:
            due.append((uid, (namespace, name)))
    return due


async def _refresher(rt: Runtime) -> None:
    """Reconcile the FineTuneJobs whose refresh is due (`refresh.next_refresh`: running ones, with backoff
    while their report does not change; suspended, queued, pending-without-pods and finished ones never).

    The schedule is checked every interval (at most every second); a job's pass sets its next due time.
    A pass mostly waits on round trips (five API requests and one S3 read), so passes run
    `REFRESH_CONCURRENCY` at a time. One at a time, a refresh of 1,000 jobs took 31-41 s with a 5 ms
    API round trip (bench/operator_scale_bench.py --api-latency-ms 5), three to four intervals, so
    statuses lagged far behind FT_STATUS_INTERVAL; eight at a time it took 9-10 s. Each object's
    passes stay serialized by its lock.
    """
    logger = logging.getLogger("finetune_operator.refresher")
    tick = min(rt.interval, 1.0)
    while True:
        await asyncio.sleep(tick)
        due = _due(rt, time.monotonic())
        if not due:
            continue
        pending = iter(due)  # shared by the workers: each job is taken once
        await asyncio.gather(*(_refresh_some(rt, pending, logger) for _ in range(REFRESH_CONCURRENCY)))


async def _refresh_some(rt: Runtime, pending: Iterator[tuple[str, tuple[str, str]]], logger: Any) -> None:
    """One refresher worker: reconcile jobs from `pending` until it is exhausted."""
    for uid, (namespace, name) in pending:
        if uid not in rt.known:
            continue
        if rt.lock(namespace, name).locked():
            continue  # a pass is in flight (or waiting for a slot): it sets the next refresh when it ends
        try:
            await reconcile(rt, namespace, name, logger, "refresh")
        except asyncio.CancelledError:
            raise
        except kopf.TemporaryError as err:
            logger.warning(f"refresh of {namespace}/{name} failed, retrying next interval: {err}")
        except Exception:
            rt.metrics.reconcile_errors.labels(reason="refresh").inc()
            logger.exception(f"refresh of {namespace}/{name} failed")


def spec_digest(spec: Any) -> tuple[tuple[str, int], ...]:
    """A small in-memory fingerprint of a spec: each top-level field's name and a hash of its value.

    `track` compares it between events of a FineTuneJob: its status writes and metadata changes need no
    pass, a changed spec does, and the fields that changed can be named without keeping the spec (a
    job's fingerprint is about 1 KiB; kopf's diff base kept the whole spec in an annotation on the object,
    cost a patch per job and deep copies per event)."""
    if not isinstance(spec, Mapping):
        return ()
    return tuple(sorted((sys.intern(str(key)), hash(json.dumps(value, sort_keys=True, default=str)))
                        for key, value in spec.items()))


def changed_spec_fields(before: tuple[tuple[str, int], ...], after: tuple[tuple[str, int], ...]) -> list[str]:
    """`spec.<field>` names whose value differs between two `spec_digest`s (added, removed or changed)."""
    old, new = dict(before), dict(after)
    return sorted(f"spec.{key}" for key in old.keys() | new.keys() if old.get(key) != new.get(key))


@kopf.on.event(GROUP, VERSION, PLURAL)
async def track(type: str, body: kopf.Body, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    """Every FineTuneJob event: keep the set of jobs the refresher visits, and reconcile a job that is new
    to this process (created, or listed when the operator starts: that is the resume) or whose spec
    changed. Events of the operator's own status writes, and metadata changes, need no pass.

    An event handler rather than kopf's create/resume/update handlers: those keep a diff base in an
    annotation on every object (one patch per job: a sixth request besides the three children, the status
    write and the event) and deep-copy the object on every event. A failed pass is not retried by kopf: it
    schedules a refresh one interval later (`refresh.next_refresh`), which the refresher runs."""
    rt = _runtime(memo)
    uid = str(body.metadata.uid)
    namespace, name = str(body.metadata.namespace), str(body.metadata.name)
    if type == "DELETED":
        rt.known.pop(uid, None)
        if rt.names.get(f"{namespace}/{name}") == uid:
            del rt.names[f"{namespace}/{name}"]
        rt.forget_lock(namespace, name)
        gone = rt.jobs.pop(f"{namespace}/{name}", None)
        if gone is not None:
            _link(rt, namespace, name, gone.from_job, None)
        rt.metrics.forget(uid)
        _wake_dependents(rt, namespace, name)
        return
    rt.known[uid] = (namespace, name)
    rt.names[f"{namespace}/{name}"] = uid
    state = rt.job_state(namespace, name)
    from_job = chain_wait.from_job(body)
    if from_job != state.from_job:
        _link(rt, namespace, name, state.from_job, from_job)
        state.from_job = from_job
    view = chain_wait.base_view(body)
    if view != state.base_view:
        state.base_view = view
        _wake_dependents(rt, namespace, name)
    digest = spec_digest(body.get("spec"))
    before = state.spec
    if before == digest:
        return
    state.spec = digest
    if before is None:
        cause = "create" if type == "ADDED" else "resume"
    else:
        cause = "update"
        refused = [path for path in changed_spec_fields(before, digest) if path != "spec.suspend"]
        if refused:
            message = (
                f"the spec is immutable except spec.suspend; ignored changes to {', '.join(refused)}. "
                "Delete and recreate the FineTuneJob to change them"
            )
            logger.warning(message)
            await post_event(rt.kube, dict(body), "Warning", conditions.SPEC_IMMUTABLE, message)
    try:
        # The body kopf hands over is fresh for the first pass (`reconcile`'s `given`).
        await reconcile(rt, namespace, name, logger, cause, given=body)
    except kopf.TemporaryError as err:
        logger.warning(f"{cause} pass of {namespace}/{name} failed, retried by the refresher: {err}")


def _link(rt: Runtime, namespace: str, name: str, before: str | None, after: str | None) -> None:
    """Move job `name` in `Runtime.dependents` from base job `before` to base job `after` (either may be None)."""
    if before is not None:
        names = rt.dependents.get(f"{namespace}/{before}")
        if names is not None:
            names.discard(name)
            if not names:
                del rt.dependents[f"{namespace}/{before}"]
    if after is not None:
        rt.dependents.setdefault(f"{namespace}/{after}", set()).add(name)


def _wake_dependents(rt: Runtime, namespace: str, base: str) -> None:
    """The FineTuneJob `base` changed in a way its dependents' verdicts read (`chain_wait.base_view`: created,
    deleted, phase, gates, artifacts): each job that waits for it (`Runtime.dependents`, not settled) is refreshed
    at the refresher's next tick, at most a second away. Through the refresher rather than a pass here, so that
    this watch's handler never waits on other jobs' locks and passes, and a burst of changes costs one pass per
    dependent. A dependent whose pass is in flight keeps the wake-up (`JobState.poked`) for right after it."""
    for name in rt.dependents.get(f"{namespace}/{base}", ()):
        state = rt.jobs.get(f"{namespace}/{name}")
        if state is None or state.chain_settled:
            continue
        state.poked = True
        state.due = time.monotonic()


@kopf.on.event("batch", "v1", "jobs", labels={render.LABEL_JOB: kopf.PRESENT})
async def on_job_event(type: str, body: kopf.Body, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    """A training Job changed (status, suspension, deletion): refresh its FineTuneJob now."""
    rt = _runtime(memo)
    owner = _controller(body)
    if owner is None or owner.get("kind") != KIND:
        return
    namespace = str(body.metadata.namespace)
    if rt.known.get(str(owner.get("uid"))) != (namespace, owner.get("name")):
        return  # not a FineTuneJob of ours (anyone may label a Job): no state, no request (see on_pod_event)
    # A pass is only needed when something the status reads from the Job changed since the last pass saw
    # it: the watch's echo of the operator's own create and the controller's Suspended condition need none
    # (compared under the object's lock, after a pass in flight has recorded what it saw).
    view = None if type == "DELETED" else refresh.job_view(body)
    state = rt.jobs.get(f"{namespace}/{owner.get('name')}")
    if view is not None and state is not None and state.job_view == view:
        return  # dropped at once: waiting for the lock would hold the Job's body until a pass slot is free
    try:
        await reconcile(rt, namespace, str(owner.get("name")), logger, f"Job {type or 'event'}", job_view=view)
    except kopf.TemporaryError as err:
        # Event handlers are not retried; the failed pass scheduled a refresh one interval from now.
        logger.warning(f"refresh after a Job event failed: {err}")


@kopf.on.event("", "v1", "pods", labels={render.LABEL_JOB: kopf.PRESENT, render.LABEL_COMPONENT: render.COMPONENT_TRAINER})
async def on_pod_event(type: str, body: kopf.Body, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    """A training pod appeared, changed or went away: refresh its FineTuneJob now (its name is the pod's
    `finetune.dev/job` label). Pod transitions come from this watch, not from polling."""
    rt = _runtime(memo)
    namespace = str(body.metadata.namespace)
    owner = str(body.metadata.labels.get(render.LABEL_JOB) or "")
    if not owner or not rt.knows(namespace, owner):
        # Anyone who may create pods may label them: a label naming no FineTuneJob the watch has shown gets no
        # state (JobState, lock, schedule) and no request, and an empty one would make the GET of its
        # FineTuneJob a LIST. A job's pods seen before its FineTuneJob (the operator starting) are read by
        # the FineTuneJob's own first pass.
        return
    state = rt.job_state(namespace, owner)
    if type == "DELETED":
        state.pods.discard(str(body.metadata.name))
    else:
        state.pods.add(str(body.metadata.name))
    state.settled = False  # the trainer may have written its report: read it on the next pass
    try:
        term = None if type == "DELETED" else oomkill.killed_container(body, render.CONTAINER_NAME)
        if term is not None:
            try:
                async with rt.lock(namespace, owner):
                    await after_oom_kill(rt, namespace, owner, body, term, logger)
            except kube.ApiError as err:  # the pass below still runs; the next OOMKilled event tries again
                logger.warning(f"stepping down after an OOMKilled pod failed: {err}")
        await reconcile(rt, namespace, owner, logger, f"Pod {type or 'event'}")
    except kopf.TemporaryError as err:
        # Event handlers are not retried; the failed pass scheduled a refresh one interval from now.
        logger.warning(f"refresh after a Pod event failed: {err}")
