"""Multi-tenant safety of what the operator reads and keeps: reports and pre-flight results are taken only
when they are this FineTuneJob's (`jobUid`) and within the size and list caps (`progress.check`, the
contract's caps), and pod or Job events whose labels name no FineTuneJob the operator knows create no
per-job state (`handlers.on_pod_event`, `handlers.on_job_event`, fed directly with a stub API client that
records every request). The operator loop with a real S3 server: tests/api/test_report_ownership.py."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import kopf
import pytest

from finetune_operator import contract, handlers, render
from finetune_operator.contract import PreflightResult, TrainerReport
from finetune_operator.metrics import Metrics
from finetune_operator.progress import MAX_REPORT_BYTES, Ignored, ReportReader, check
from finetune_operator.settings import OperatorSettings
from finetune_operator.spec import GROUP, KIND, VERSION

UID = "0c1f2e3d-0000-4000-8000-00000000000a"
OTHER = "9f9f9f9f-0000-4000-8000-0000000000ff"
NS = "tenant-a"
REPORT = {"jobUid": UID, "phase": "training", "step": 10, "totalSteps": 100, "updatedAt": "2026-03-01T12:00:00Z"}
RESULT = {"jobUid": UID, "ok": True, "modelUri": "s3://m/", "outputUri": "s3://out/x/", "checkedAt": "2026-03-01T12:00:00Z"}


def raw(doc: Any) -> bytes:
    return json.dumps(doc).encode()


# --- the owner and the bounds of what is read ------------------------------------------------------


def test_own_report_and_result_are_taken() -> None:
    report = check(raw(REPORT), UID, TrainerReport)
    assert isinstance(report, TrainerReport) and report.job_uid == UID and report.step == 10
    result = check(raw(RESULT), UID, PreflightResult, noun="pre-flight result")
    assert isinstance(result, PreflightResult) and result.job_uid == UID


@pytest.mark.parametrize(("doc", "cause"), [
    ({**REPORT, "jobUid": OTHER}, "foreign"),
    ({**REPORT, "jobUid": OTHER, "checkpoints": "not a list"}, "foreign"),  # the owner is checked first
    ({**REPORT, "jobUid": 42}, "foreign"),
    ({k: v for k, v in REPORT.items() if k != "jobUid"}, "unowned"),
    ({**REPORT, "jobUid": ""}, "unowned"),
    ({**REPORT, "jobUid": None}, "unowned"),
    ({**REPORT, "phase": "dancing"}, "invalid"),
    ([REPORT], "invalid"),
])
def test_reports_of_other_jobs_or_of_none_are_ignored(doc: Any, cause: str) -> None:
    found = check(raw(doc), UID, TrainerReport, "s3://b/k", "report")
    assert isinstance(found, Ignored) and (found.cause, found.uri) == (cause, "s3://b/k")
    assert "s3://b/k" in found.message
    if cause == "foreign":
        assert OTHER not in found.message  # nothing about the other job


def test_not_json_and_deep_nesting_are_invalid_not_a_crash() -> None:
    assert check(b"{not json", UID, TrainerReport).cause == "invalid"  # type: ignore[union-attr]
    deep = b"[" * 100_000 + b"]" * 100_000
    assert check(deep, UID, TrainerReport).cause == "invalid"  # type: ignore[union-attr]


def _checkpoints(n: int) -> list[dict[str, Any]]:
    return [{"step": i, "uri": f"s3://out/x/checkpoints/step-{i}/"} for i in range(n)]


def _adjustments(n: int) -> list[dict[str, Any]]:
    rung = {"microBatch": 1, "gradAccum": 8, "gradientCheckpointing": True}
    return [{"step": i, "from": rung, "to": rung, "reason": "oom"} for i in range(n)]


def _files(n: int) -> list[dict[str, Any]]:
    return [{"uri": f"s3://d/{i}.jsonl", "rows": 1, "tokens": 1, "sampled": False, "sampleRows": 1} for i in range(n)]


def _split(files: int = 1) -> dict[str, Any]:
    return {"field": "spec.dataset.train", "uri": "s3://d/", "format": "instruction", "examples": 1, "tokens": 1,
            "sampled": False, "files": _files(files)}


# Every list (and map) of the two models and their nested models, at its cap and one over it.
CAPPED: list[tuple[str, type[Any], dict[str, Any], int, Any]] = [
    ("checkpoints", TrainerReport, REPORT, contract.MAX_REPORT_CHECKPOINTS, _checkpoints),
    ("artifacts", TrainerReport, REPORT, contract.MAX_REPORT_ARTIFACTS,
     lambda n: {f"kind{i}": f"s3://out/x/{i}/" for i in range(n)}),
    ("adjustments", TrainerReport, REPORT, contract.MAX_REPORT_ADJUSTMENTS, _adjustments),
    ("evaluation", TrainerReport, REPORT, 16, lambda n: {"failedGates": [f"accuracy {i}" for i in range(n)]}),
    ("splits", PreflightResult, RESULT, contract.MAX_PREFLIGHT_SPLITS, lambda n: [_split() for _ in range(n)]),
    ("splits", PreflightResult, RESULT, contract.MAX_PREFLIGHT_FILES, lambda n: [_split(n)]),
]


@pytest.mark.parametrize(("field", "model", "base", "cap", "make"), CAPPED,
                         ids=["checkpoints", "artifacts", "adjustments", "failedGates", "splits", "files"])
def test_every_list_has_a_cap_and_one_over_it_is_ignored_whole(field: str, model: type[Any], base: dict[str, Any],
                                                               cap: int, make: Any) -> None:
    at_cap = check(raw({**base, field: make(cap)}), UID, model)
    assert isinstance(at_cap, model), at_cap
    over = check(raw({**base, field: make(cap + 1)}), UID, model)
    assert isinstance(over, Ignored) and over.cause == "invalid"
    assert f"at most {cap} items" in over.message


def test_the_caps_leave_room_for_what_a_trainer_writes() -> None:
    """A report at every cap at once (and long URIs) still fits in MAX_REPORT_BYTES: the size cap never
    refuses a report the list caps allow."""
    long = "s3://" + "b" * 63 + "/" + "p" * 400
    full = {**REPORT, "checkpoints": [{"step": i, "uri": f"{long}/checkpoints/step-{i:09d}/"}
                                      for i in range(contract.MAX_REPORT_CHECKPOINTS)],
            "artifacts": {f"artifact-kind-{i}": f"{long}/{i}/" for i in range(contract.MAX_REPORT_ARTIFACTS)},
            "adjustments": _adjustments(contract.MAX_REPORT_ADJUSTMENTS),
            "error": {"reason": "Crashed", "message": "m" * 4000}}
    assert isinstance(check(raw(full), UID, TrainerReport), TrainerReport)
    assert len(raw(full)) < MAX_REPORT_BYTES


def test_the_trainers_report_carries_the_uid_and_stays_within_the_checkpoint_cap(tmp_path: Any) -> None:
    from finetune_trainer.report import Reporter, read_report
    from finetune_trainer.storage import Store

    store = Store.for_uri(tmp_path.as_uri())
    reporter = Reporter(store, enabled=True, job_uid=UID)
    reporter.update(checkpoints=[contract.CheckpointRecord(step=i, uri=f"s3://o/{i}/")
                                 for i in range(contract.MAX_REPORT_CHECKPOINTS + 5)])
    written = store.read_json(contract.REPORT_KEY)
    assert written["jobUid"] == UID
    assert [c["step"] for c in written["checkpoints"]][-1] == contract.MAX_REPORT_CHECKPOINTS + 4
    assert len(written["checkpoints"]) == contract.MAX_REPORT_CHECKPOINTS
    report = read_report(store)
    assert report is not None and report.job_uid == UID
    assert isinstance(check(raw(written), UID, TrainerReport), TrainerReport)


# --- per-job state only for known FineTuneJobs ------------------------------------------------------


class StubApi:
    """The operator's API client, recording every request; every object is missing."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def get(self, url: str) -> None:
        self.calls.append(("get", url))
        return None

    async def list(self, url: str, **_: Any) -> list[Any]:
        self.calls.append(("list", url))
        return []

    async def create(self, url: str, body: Any) -> Any:
        self.calls.append(("create", url))
        return body

    async def patch(self, url: str, body: Any) -> Any:
        self.calls.append(("patch", url))
        return body


def runtime() -> tuple[handlers.Runtime, StubApi, kopf.Memo]:
    api = StubApi()
    rt = handlers.Runtime(settings=OperatorSettings.from_env({}), kopf_settings=kopf.OperatorSettings(),
                          reader=ReportReader(), metrics=Metrics(), interval=10.0, kube=api)  # type: ignore[arg-type]
    memo = kopf.Memo()
    memo.finetune = rt
    return rt, api, memo


def pod(job: str, name: str | None = None, namespace: str = NS) -> kopf.Body:
    return kopf.Body({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name or f"{job}-0-{uuid.uuid4().hex[:5]}", "namespace": namespace,
                     "uid": str(uuid.uuid4()),
                     "labels": {render.LABEL_JOB: job, render.LABEL_COMPONENT: render.COMPONENT_TRAINER}},
        "status": {"phase": "Pending"},
    })


def ftj(name: str, uid: str) -> kopf.Body:
    return kopf.Body({"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                      "metadata": {"name": name, "namespace": NS, "uid": uid}, "spec": {}})


def state_count(rt: handlers.Runtime) -> int:
    return len(rt.jobs) + len(rt.locks) + len(rt.known) + len(rt.names)


LOG = logging.getLogger("test")


def test_5000_pods_naming_no_finetunejob_leave_no_state_and_make_no_request() -> None:
    """Anyone who may create pods may label them `finetune.dev/job=<anything>`: 5,000 such pods (each added,
    modified and deleted) leave no JobState, lock or schedule entry, and the operator asks the API nothing."""
    rt, api, memo = runtime()

    async def feed() -> None:
        for i in range(5000):
            body = pod(uuid.uuid4().hex[:12], namespace=f"ns-{i % 50}")
            for type_ in ("ADDED", "MODIFIED", "DELETED"):
                await handlers.on_pod_event(type=type_, body=body, memo=memo, logger=LOG)

    asyncio.run(feed())
    assert state_count(rt) == 0
    assert api.calls == []


def test_an_empty_job_label_is_ignored_without_a_request() -> None:
    rt, api, memo = runtime()
    asyncio.run(handlers.on_pod_event(type="ADDED", body=pod(""), memo=memo, logger=LOG))
    assert state_count(rt) == 0 and api.calls == []


def test_pods_of_a_known_finetunejob_still_reach_it_until_it_is_deleted() -> None:
    rt, api, memo = runtime()
    # What `track` records for a FineTuneJob the watch showed (its pass is not what this test is about).
    rt.known[UID] = (NS, "mine")
    rt.names[f"{NS}/mine"] = UID

    async def run() -> None:
        await handlers.on_pod_event(type="ADDED", body=pod("mine", "mine-0-abcde"), memo=memo, logger=LOG)
        assert rt.jobs[f"{NS}/mine"].pods == {"mine-0-abcde"}
        assert api.calls == [("get", handlers.ftj_url(NS, "mine"))]  # its pass read the FineTuneJob
        # A pod of the same name in another namespace is not this job's.
        await handlers.on_pod_event(type="ADDED", body=pod("mine", namespace="tenant-b"), memo=memo, logger=LOG)
        assert set(rt.jobs) == {f"{NS}/mine"} and len(api.calls) == 1
        await handlers.track(type="DELETED", body=ftj("mine", UID), memo=memo, logger=LOG)
        assert state_count(rt) == 0
        await handlers.on_pod_event(type="DELETED", body=pod("mine", "mine-0-abcde"), memo=memo, logger=LOG)
        assert state_count(rt) == 0 and len(api.calls) == 1

    asyncio.run(run())


def test_jobs_owned_by_no_known_finetunejob_leave_no_state() -> None:
    rt, api, memo = runtime()
    rt.known[UID] = (NS, "mine")
    rt.names[f"{NS}/mine"] = UID

    def job(owner: str, uid: str) -> kopf.Body:
        return kopf.Body({"apiVersion": "batch/v1", "kind": "Job", "metadata": {
            "name": owner, "namespace": NS, "labels": {render.LABEL_JOB: owner},
            "ownerReferences": [{"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": owner, "uid": uid,
                                 "controller": True}]}, "status": {}})

    async def run() -> None:
        for i in range(100):
            await handlers.on_job_event(type="ADDED", body=job(f"stray-{i}", str(uuid.uuid4())), memo=memo, logger=LOG)
        # A forged owner reference naming a known job by name but not by uid.
        await handlers.on_job_event(type="ADDED", body=job("mine", OTHER), memo=memo, logger=LOG)

    asyncio.run(run())
    assert set(rt.jobs) == set() and rt.locks == {} and api.calls == []
