"""The requests of spec.serving.apply: is KServe's LLMInferenceService served here, and the one of a finished job
made sure of. The decisions are `finetune_operator.serving_apply`'s (pure); this is the thin part that talks.

`settle` runs in every status write of a finished FineTuneJob with spec.serving.apply (`handlers._write`), and
costs nothing for any other job. For one that Succeeded with its gates held:

1. discovery: `GET /apis/serving.kserve.io/v1alpha1` lists `llminferenceservices`? The answer is cached for one
   status interval (FT_STATUS_INTERVAL, 10 s by default), operator-wide: a thousand jobs cost one request, and a
   CRD installed later is seen within that time. Not served: the `Serving` condition says ServingCRDMissing,
   nothing is created;
2. the LLMInferenceService, named after the job: read; created when missing (with a controller owner reference
   to the job, so it goes with it through garbage collection); on 409 read again. One this job controls is
   adopted (its missing labels patched; its spec never rewritten: it may have been tuned); anything else is
   foreign: left alone, ForeignChild;
3. its Ready condition (and address) into status.serving and the `Serving` condition.

A refused request (RBAC, KServe's admission webhook; or no answer after the client's retries) is
ServingFailed, quoting the API server: the job's own status is written all the same, and the refresher tries
again.

Whether the refresher must look again (not Ready yet, no CRD, foreign, waiting for the report) is returned with
the status; the refresher's backoff (`refresh.next_refresh`) then bounds what the wait costs: one read of the
FineTuneJob and one of its LLMInferenceService per job, at most once every `refresh.BACKOFF_CAP` intervals
once it settled (a minute by default). Polling rather than a watch: a watch on LLMInferenceServices would stream
every one on the cluster (most of them not ours) to the operator, and cannot start before KServe's CRD exists;
the operator needs to know one object's readiness, once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from finetune_operator import chain_wait, kube, render
from finetune_operator import serving_apply as decide_mod
from finetune_operator.progress import report_location
from finetune_operator.spec import FineTuneJob, ServingPlan

log = logging.getLogger("finetune_operator.serving")

#: Seconds a discovery answer (the CRD served or not) is kept; the operator keeps it one status interval.
DISCOVERY_TTL = 10.0


class Discovery:
    """Whether the API server serves LLMInferenceServices, asked at most once per `ttl` seconds."""

    def __init__(self, ttl: float = DISCOVERY_TTL) -> None:
        self.ttl = ttl
        self._until = 0.0
        self._served = False

    async def served(self, api: kube.Kube) -> bool:
        if time.monotonic() < self._until:
            return self._served
        self._served = decide_mod.crd_served(await api.get(decide_mod.DISCOVERY_PATH))
        self._until = time.monotonic() + self.ttl
        return self._served

    def forget(self) -> None:
        """Drop the cached answer (a create answered 404: the CRD went away meanwhile)."""
        self._until = 0.0


async def settle(api: kube.Kube, discovery: Discovery, body: Mapping[str, Any], new: dict[str, Any],
                 now: str) -> tuple[dict[str, Any], bool]:
    """The status `new` of the FineTuneJob `body` completed for spec.serving.apply (see the module docstring),
    and whether to look again later. `new` as it is, and False, for every job it does not concern."""
    if not decide_mod.applies(body.get("spec"), new):
        return new, False
    try:
        job = FineTuneJob.model_validate(body)
    except ValidationError:
        return new, False
    job = chain_wait.applied(job, new)  # a chained job serves what it started from (spec.baseModel.fromJob)
    decision = decide_mod.decide(job, new, report_readable=report_location(job.spec.output.uri) is not None)
    verdict, served = decision.verdict, None
    if decision.plan is not None:
        try:
            verdict, served = await _ensure(api, discovery, job, decision.plan)
        except kube.ApiError as err:  # after kube's own retries: written into the status, tried again later
            log.warning("spec.serving.apply of FineTuneJob %s/%s: %s", job.metadata.namespace, job.metadata.name, err)
            verdict = decide_mod.request_failed(err.status, str(err), str(job.metadata.namespace))
    if verdict is None:
        return new, False
    pending = decision.pending and not (served or {}).get("ready")
    generation = (body.get("metadata") or {}).get("generation")
    return decide_mod.apply(new, verdict, served, generation=generation, now=now), pending


async def _ensure(api: kube.Kube, discovery: Discovery, job: FineTuneJob,
                  plan: ServingPlan) -> tuple[decide_mod.Verdict, dict[str, Any] | None]:
    """Steps 1 to 3 of the module docstring: the verdict, and status.serving (None when there is none)."""
    if not await discovery.served(api):
        return decide_mod.crd_missing(job.spec.output.uri), None
    uid = str(job.metadata.uid)
    wanted = decide_mod.desired(job, plan, render.owner_reference(job.metadata))
    namespace, name = str(job.metadata.namespace), str(wanted["metadata"]["name"])
    url = decide_mod.object_path(namespace, name)
    found = await api.get(url)
    if found is None:
        try:
            found = await api.create(decide_mod.collection_path(namespace), wanted)
        except kube.NotFound:
            # The resource went away since discovery said it was there (KServe uninstalled).
            discovery.forget()
            return decide_mod.crd_missing(job.spec.output.uri), None
        except kube.Conflict:
            # Created since the read (by an earlier pass whose status write was lost, or by someone): its owner decides.
            found = await api.get(url)
            if found is None:
                raise
        else:
            log.info("created %s %s/%s for FineTuneJob %s", wanted["kind"], namespace, name, job.metadata.name)
            return decide_mod.observe(found or wanted, uid)
    verdict, served = decide_mod.observe(found, uid)
    if served is not None:
        patch = decide_mod.label_patch(found, wanted)
        if patch:
            await api.patch(url, patch)
            log.info("adopted %s %s/%s for FineTuneJob %s", wanted["kind"], namespace, name, job.metadata.name)
    return verdict, served


__all__ = ["DISCOVERY_TTL", "Discovery", "settle"]
