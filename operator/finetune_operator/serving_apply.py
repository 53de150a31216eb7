"""spec.serving.apply: whether, and what, the operator serves for a finished FineTuneJob, and what its status
says about it. Pure (no I/O, no clock): the requests are `finetune_operator.inference_service`'s.

With `spec.serving.apply: true` the operator creates one KServe `LLMInferenceService` (the one written to
`<output.uri>/serving/llminferenceservice.yaml`, `serving.render_llm_inference_service`, plus a controller owner
reference to the FineTuneJob, so it goes with the job) once the job Succeeded with every evaluation gate held,
and follows its `Ready` condition into `status.serving.ready`. The condition `Serving` says where that stands:

=====================  ===========  =======================================================================
reason                 status       when
=====================  ===========  =======================================================================
GatesFailed            False        the job failed its evaluation gates (or its pilot's): nothing is served
NotServed              False        the job failed for another reason: nothing is served
ServingPending         Unknown      Succeeded, the trainer's report naming the adapter not read yet
ServingCRDMissing      False        the API server serves no `llminferenceservices.serving.kserve.io`
                                    (KServe is not installed): the message names the manifests to
                                    `kubectl apply` by hand; checked again on later refreshes
ForeignChild           False        an LLMInferenceService of that name exists, not controlled by this job
ServingFailed          False        the API server refused a request for it (RBAC, KServe's webhook, ...):
                                    its answer quoted; tried again on later refreshes
ServingCreated         Unknown      created (or found), KServe has not reported its readiness yet
ServingNotReady        False        its Ready condition is not True (its reason and message quoted)
ServingReady           True         its Ready condition is True (`status.serving.url`: its address)
=====================  ===========  =======================================================================

Without spec.serving.apply the operator creates nothing and sets no `Serving` condition. What it serves is
`status.plan.serving` (decided with the plan), else `serving.serving_plan`; the adapter's (or merged model's)
URI is the one the trainer reported (`status.artifacts`), which the plan only predicts.

The job is finished, so no event of its own brings news of the service: `pending` asks the refresher to look
again (`refresh.Outcome.serving_pending`) until the service is Ready, the CRD shows up or a foreign object goes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from finetune_operator import conditions as c
from finetune_operator import serving as serving_mod
from finetune_operator.spec import FineTuneJob, ServingPlan
from finetune_operator.status import FAILED, SUCCEEDED, Event

#: The CRD whose presence decides whether anything can be applied (discovery of `DISCOVERY_PATH`).
CRD_NAME = f"{serving_mod.LLMISVC_PLURAL}.{serving_mod.KSERVE_GROUP}"
DISCOVERY_PATH = f"/apis/{serving_mod.LLMISVC_API_VERSION}"
#: Failure reasons of a job whose evaluation gates (its own or its pilot's) were missed.
GATE_FAILURES = frozenset({c.GATES_FAILED, c.PILOT_GATES_FAILED})
#: Artifact kinds (status.artifacts keys) of what is served, by the prefix under spec.output.uri the plan predicts.
ARTIFACT_PREFIXES = {"model": "model/", "merged": "merged/"}


@dataclass(frozen=True)
class Verdict:
    """The `Serving` condition to set (status True/False/Unknown, a reason of `conditions`, a message)."""

    status: str
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    """What a pass does about serving: set `verdict` with no request, or (`plan` set) make sure of the
    LLMInferenceService serving `plan` and judge what it finds (`observe`). `pending`: look again later."""

    verdict: Verdict | None = None
    plan: ServingPlan | None = None
    pending: bool = False


def collection_path(namespace: str) -> str:
    return f"/apis/{serving_mod.LLMISVC_API_VERSION}/namespaces/{namespace}/{serving_mod.LLMISVC_PLURAL}"


def object_path(namespace: str, name: str) -> str:
    return f"{collection_path(namespace)}/{name}"


def crd_served(discovery: Mapping[str, Any] | None) -> bool:
    """Whether a discovery document (`GET /apis/serving.kserve.io/v1alpha1`, None for 404) lists the resource."""
    return any(isinstance(resource, Mapping) and resource.get("name") == serving_mod.LLMISVC_PLURAL
               for resource in (discovery or {}).get("resources") or [])


def applies(spec: Mapping[str, Any] | None, status: Mapping[str, Any]) -> bool:
    """Whether a pass has anything to do for serving (a cheap look at the raw object before parsing it):
    spec.serving.apply is true and the job is finished."""
    serving = (spec or {}).get("serving")
    return isinstance(serving, Mapping) and serving.get("apply") is True and status.get("phase") in (SUCCEEDED, FAILED)


def decide(job: FineTuneJob, status: Mapping[str, Any], *, report_readable: bool) -> Decision:
    """What to do for `job` (spec.serving.apply set), whose newly computed status is `status`.

    `report_readable`: whether the operator can read the trainer's report at all (False for pvc:// outputs, whose
    artifacts never reach the status: the plan's URIs, where the trainer writes by contract, are used as they are)."""
    assert job.spec.serving is not None
    phase = status.get("phase")
    failed = c.find(status.get("conditions"), c.FAILED)
    if phase == FAILED:
        reason = str((failed or {}).get("reason") or c.JOB_FAILED)
        if reason in GATE_FAILURES:
            return Decision(Verdict(c.FALSE, c.GATES_FAILED, f"the job failed its evaluation gates ({reason}): "
                                    f"{_failed_gates(status, failed)}; nothing is served"))
        return Decision(Verdict(c.FALSE, c.NOT_SERVED, f"the job failed ({reason}): nothing is served"))
    if phase != SUCCEEDED:
        return Decision()
    evaluation = status.get("evaluation") or {}
    if evaluation.get("gatesPassed") is False:
        return Decision(Verdict(c.FALSE, c.GATES_FAILED, f"the evaluation gates failed: "
                                f"{_failed_gates(status, None)}; nothing is served"))
    plan = planned(job, status)
    if plan is None:
        return Decision(Verdict(c.FALSE, c.NOT_SERVED, "no serving plan: status.plan has no resolved method to serve"))
    located = with_artifacts(plan, job.spec.output.uri, status.get("artifacts") or {}, report_readable)
    if located is None:
        return Decision(Verdict(c.UNKNOWN, c.SERVING_PENDING, "waiting for the trainer's report to name the "
                                "trained model (status.artifacts)"), pending=True)
    return Decision(plan=located, pending=True)


def planned(job: FineTuneJob, status: Mapping[str, Any]) -> ServingPlan | None:
    """status.plan.serving (decided with the plan) when it is there, else `serving.serving_plan` for status.plan's
    method (None without a plan to read it from)."""
    plan = status.get("plan") or {}
    if plan.get("serving"):
        try:
            return ServingPlan.model_validate(plan["serving"])
        except ValidationError:
            pass
    method = plan.get("method")
    if method not in (*serving_mod.ADAPTER_METHODS, "full"):
        return None
    return serving_mod.serving_plan(job, method)


def with_artifacts(plan: ServingPlan, output_uri: str, artifacts: Mapping[str, str],
                   report_readable: bool) -> ServingPlan | None:
    """`plan` with the URIs the trainer reported in place of those the plan predicted under `output_uri`
    (`<output>/model/` -> status.artifacts.model, `<output>/merged/` -> .merged); None while a reported one is
    missing. Without a readable report the predicted ones are kept (the trainer writes there by contract)."""
    base = output_uri.rstrip("/") + "/"
    reported = {base + prefix: kind for kind, prefix in ARTIFACT_PREFIXES.items()}
    update: dict[str, str] = {}
    for field in ("model_uri", "adapter_uri"):
        predicted = getattr(plan, field)
        kind = reported.get(predicted or "")
        if kind is None or not report_readable:
            continue
        if not artifacts.get(kind):
            return None
        update[field] = artifacts[kind]
    return plan.model_copy(update=update) if update else plan


def desired(job: FineTuneJob, plan: ServingPlan, owner: Mapping[str, Any]) -> dict[str, Any]:
    """The LLMInferenceService to create: the manifest of `<output.uri>/serving/`, owned by the job (`owner`:
    `render.owner_reference`)."""
    obj = serving_mod.render_llm_inference_service(job, plan)
    obj["metadata"]["ownerReferences"] = [dict(owner)]
    return obj


def controller_of(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if isinstance(ref, Mapping) and ref.get("controller"):
            return ref
    return None


def label_patch(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch adopting an LLMInferenceService of ours: its missing or changed labels (its spec is left
    as it is: someone may have tuned it)."""
    have = (existing.get("metadata") or {}).get("labels") or {}
    want = (wanted.get("metadata") or {}).get("labels") or {}
    missing = {k: v for k, v in want.items() if have.get(k) != v}
    return {"metadata": {"labels": missing}} if missing else {}


def crd_missing(output_uri: str) -> Verdict:
    where = f"{output_uri.rstrip('/')}/serving/"
    return Verdict(c.FALSE, c.SERVING_CRD_MISSING,
                   f"the CRD {CRD_NAME} is not installed (KServe's LLMInferenceService): nothing was created. "
                   f"The manifests are at {where}: `kubectl apply -f` {where}{serving_mod.LLMISVC_FILE.split('/')[-1]} "
                   f"once KServe is installed (the operator also creates it then, on a later refresh), or "
                   f"{where}{serving_mod.VLLM_FILE.split('/')[-1]} (a plain vLLM Deployment) without KServe")


def request_failed(status: int, detail: str, namespace: str) -> Verdict:
    """The API server refused (or never answered) a request for the LLMInferenceService: the job's status is
    still written (a serving problem never holds up the job's own), and the request is tried again later."""
    hint = ""
    if status == 403:
        hint = (f"; the operator's role must allow create, get and patch on {CRD_NAME} in namespace {namespace} "
                "(the chart's does: upgrade it)")
    elif status in (400, 422):
        hint = "; KServe refused the manifest: see its message, and spec.serving"
    return Verdict(c.FALSE, c.SERVING_FAILED, f"could not make sure of the {serving_mod.LLMISVC_KIND}: {detail}{hint}")


def observe(found: Mapping[str, Any], uid: str) -> tuple[Verdict, dict[str, Any] | None]:
    """The `Serving` condition and status.serving for the LLMInferenceService `found` (as read or created): a
    foreign one (not controlled by the job of `uid`) gives ForeignChild and no status.serving."""
    meta = found.get("metadata") or {}
    name = str(meta.get("name"))
    what = f"{serving_mod.LLMISVC_KIND} {meta.get('namespace')}/{name}"
    owner = controller_of(found)
    if owner is None or owner.get("uid") != uid:
        held = "has no controller" if owner is None else (
            f"is controlled by {owner.get('kind')} {owner.get('name')} (uid {owner.get('uid')})")
        return Verdict(c.FALSE, c.FOREIGN_CHILD, f"{what} already exists and {held}, not by this FineTuneJob "
                       f"(uid {uid}): it is left alone; delete or rename it to have this job served"), None
    status = found.get("status") or {}
    url = _address(status)
    served: dict[str, Any] = {"name": name, "ready": False}
    if url:
        served["url"] = url
    ready = c.find(status.get("conditions"), "Ready")
    if ready is None:
        return Verdict(c.UNKNOWN, c.SERVING_CREATED, f"{what} created; KServe has not reported its readiness yet"), served
    if ready.get("status") == c.TRUE:
        served["ready"] = True
        return Verdict(c.TRUE, c.SERVING_READY, f"{what} is ready" + (f" at {url}" if url else "")), served
    detail = ": ".join(str(part) for part in (ready.get("reason"), ready.get("message")) if part)
    return Verdict(c.FALSE, c.SERVING_NOT_READY, f"{what} is not ready" + (f" ({detail})" if detail else "")), served


def apply(status: Mapping[str, Any], verdict: Verdict, served: Mapping[str, Any] | None, *, generation: int | None,
          now: str) -> dict[str, Any]:
    """`status` with the `Serving` condition set to `verdict`, and status.serving replaced by `served` when given
    (kept otherwise: a failed look keeps the last one known)."""
    new = dict(status)
    new["conditions"] = c.set_condition(status.get("conditions"), c.SERVING, verdict.status, verdict.reason,
                                        verdict.message[:2048], generation, now)
    if served is not None:
        new["serving"] = dict(served)
    return new


def events(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[Event]:
    """The events a change of the `Serving` condition posts: a Warning when it turns
    ServingCRDMissing, ForeignChild or ServingFailed, a Normal event when the service is created and when it is ready. Nothing
    for an unchanged reason."""
    now_cond = c.find(new.get("conditions"), c.SERVING)
    was = c.find((old or {}).get("conditions"), c.SERVING)
    if now_cond is None or (was is not None and was.get("reason") == now_cond.get("reason")):
        return []
    reason = str(now_cond.get("reason"))
    message = str(now_cond.get("message") or "")
    if reason in (c.SERVING_CRD_MISSING, c.FOREIGN_CHILD, c.SERVING_FAILED):
        return [Event("Warning", reason, message)]
    if reason in (c.SERVING_CREATED, c.SERVING_READY):
        return [Event("Normal", reason, message)]
    return []  # GatesFailed and NotServed: the job's Failed event said it


def _address(status: Mapping[str, Any]) -> str | None:
    url = status.get("url")
    if isinstance(url, str) and url:
        return url
    address = status.get("address")
    if isinstance(address, Mapping) and isinstance(address.get("url"), str) and address["url"]:
        return str(address["url"])
    return None


def _failed_gates(status: Mapping[str, Any], failed: Mapping[str, Any] | None) -> str:
    gates = (status.get("evaluation") or {}).get("failedGates") or ((status.get("pilot") or {}).get(
        "evaluation") or {}).get("failedGates") or []
    if gates:
        return "missed " + "; ".join(str(g) for g in gates)
    return str((failed or {}).get("message") or "the gates were missed")
