"""Secrets stay secret on the operator side, and no spec value reaches a shell.

One sentinel value is both the operator's own S3 secret key (`AWS_SECRET_ACCESS_KEY` in its environment,
which it signs its report reads with against a real local S3 server) and a key of the Secret the jobs
name in `secretRef` (stored in the emulator, as `kubectl create secret` would). Jobs then run through
success, a trainer failure, a report that is not valid JSON, and, after a restart with a wrong access key
id, report reads that S3 refuses. Afterwards the sentinel (plain, and base64 as in a Secret's `data`) must
appear in:

- no object in the emulator of any kind, in any version ever stored (kmock keeps each object's
  history), the Secret itself aside: children, statuses, conditions, events;
- no request body the operator sent (every create and patch is journaled);
- no log line: the runners' captured output, and every log record of every logger (pytest's caplog at
  DEBUG, so botocore's and kopf's debug records are included).

And no rendered container (the Jobs the operator created here, and `render_children` of every example)
runs a shell (`sh -c`, `bash -c`, ...) or carries a spec value in `command` or `args`: specs reach the
trainer only through the ConfigMap snapshot.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator import chain, render
from finetune_operator.contract import REPORT_KEY
from finetune_operator.settings import OperatorSettings
from finetune_operator.sizing import plan as size
from finetune_operator.spec import BaseJobStatus, FineTuneJob
from tests.api.conftest import FTJ, Cluster, ftj_manifest, operator, wait_for

SENTINEL = "sEnTiNeL-7c1e5a0f9b2d4e68-do-not-leak"
FORMS = (SENTINEL, base64.b64encode(SENTINEL.encode()).decode())
SECRET = "s3-credentials"
ROOT = Path(__file__).resolve().parents[2]
#: What a chained example (spec.baseModel.fromJob) starts from when rendered here: its base job's model.
CHAIN_START = "hf://meta-llama/Llama-2-7b-hf"
SHELLS = {"sh", "bash", "dash", "zsh", "ash", "ksh", "/bin/sh", "/bin/bash", "/usr/bin/env", "-c"}


def leaks(text: str) -> list[str]:
    return [form for form in FORMS if form in text]


def status(cluster: Cluster, name: str) -> dict[str, Any]:
    return dict((cluster.get(FTJ, name) or {}).get("status") or {})


def reaches(cluster: Cluster, name: str, phase: str) -> dict[str, Any]:
    return wait_for(lambda: (st := status(cluster, name)).get("phase") == phase and st, f"{name} {phase}")


def job_status(cluster: Cluster, name: str, **fields: Any) -> None:
    cluster.patch("batch/v1/jobs", name, {"status": fields}, sub="status")


def finished(type_: str, reason: str) -> dict[str, Any]:
    return {"conditions": [{"type": type_, "status": "True", "reason": reason, "message": "",
                            "lastTransitionTime": "2026-01-01T01:00:00Z"}], "active": 0, "ready": 0}


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def check_commands(job_obj: dict[str, Any], spec: dict[str, Any]) -> int:
    """Assert no shell and no spec value in any container's command/args; return the containers checked."""
    pod = job_obj["spec"]["template"]["spec"]
    containers = [*pod.get("initContainers", []), *pod["containers"]]
    values = {v for v in strings(spec) if len(v) >= 3}
    for container in containers:
        argv = [*container.get("command", []), *container.get("args", [])]
        assert argv, f"{container['name']} relies on the image's entrypoint"
        assert not SHELLS & {a.strip() for a in argv}, argv
        assert not any(a.endswith(("/sh", "/bash")) for a in argv), argv
        for arg in argv:
            inside = [v for v in values if v in arg or arg in v]
            assert not inside, (container["name"], arg, inside)
    return len(containers)


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A real S3 server whose one identity's secret key is the sentinel: the operator's own credentials."""
    from finetune_trainer.s3server import LocalS3

    with LocalS3(access_key="FTOPERATOR", secret_key=SENTINEL) as server:
        server.create_bucket("out")
        monkeypatch.setenv("FT_S3_ENDPOINT", server.endpoint_url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SENTINEL)
        monkeypatch.setenv("FT_S3_SECRET", SECRET)  # the default S3 Secret for jobs that name none
        yield server


def test_no_secret_value_in_objects_events_requests_or_logs(
    cluster: Cluster, s3: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cluster.chaos.keep_bodies = True
    encoded = base64.b64encode(SENTINEL.encode()).decode()
    cluster.create("v1/secrets", {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET},
                                  "type": "Opaque", "data": {"AWS_ACCESS_KEY_ID": base64.b64encode(b"FTOPERATOR")
                                                             .decode(), "AWS_SECRET_ACCESS_KEY": encoded}})

    def report(name: str, body: bytes | None = None, **fields: Any) -> None:
        doc = {"jobUid": cluster.get(FTJ, name)["metadata"]["uid"], "phase": "training", "step": 10,
               "totalSteps": 100, "loss": 1.5,
               "updatedAt": (datetime.now(UTC) + timedelta(seconds=5)).isoformat(), **fields}
        s3.client().put_object(Bucket="out", Key=f"{name}/{REPORT_KEY}", Body=body or json.dumps(doc).encode())

    def job(name: str, *, secret_refs: bool = True) -> dict[str, Any]:
        ref = {"secretRef": {"name": SECRET}} if secret_refs else {}  # none: FT_S3_SECRET stands in
        return ftj_manifest(name, uid=None, output={"uri": f"s3://out/{name}/", **ref},
                            dataset={"train": "s3://data/train.jsonl", **ref})

    outputs = []
    with operator() as runner:
        for name in ("good", "bad", "garbled"):
            cluster.create(FTJ, job(name))
        cluster.create(FTJ, job("default-secret", secret_refs=False))
        for name in ("good", "bad", "garbled", "default-secret"):
            wait_for(lambda n=name: cluster.get("batch/v1/jobs", n), f"{name}'s Job")
            job_status(cluster, name, active=1, ready=1, startTime="2026-01-01T00:00:00Z")

        # Success, read with the sentinel-signed requests.
        report("good", artifacts={"model": "s3://out/good/model/"})
        wait_for(lambda: status(cluster, "good").get("progress", {}).get("step") == 10, "good's progress")
        job_status(cluster, "good", succeeded=1, **finished("Complete", "CompletionsReached"))
        reaches(cluster, "good", "Succeeded")
        # A trainer failure, with the trainer's own words.
        report("bad", phase="failed", error={"reason": "InvalidData", "message": "row 3 has no 'output' key"})
        job_status(cluster, "bad", failed=1, **finished("Failed", "PodFailurePolicy"))
        assert next(c for c in reaches(cluster, "bad", "Failed")["conditions"] if c["type"] == "Failed")[
            "reason"] == "InvalidData"
        # A report that is not a report: the read fails, the status goes on from the Job alone.
        report("garbled", body=b"{not json")
        wait_for(lambda: any("is not a valid report" in r.getMessage() for r in caplog.records), "the warning")
        job_status(cluster, "default-secret", succeeded=1, **finished("Complete", "CompletionsReached"))
        reaches(cluster, "default-secret", "Succeeded")
    outputs.append(runner.output)

    # The operator again, now with an access key id S3 does not know (the secret key is still the sentinel).
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "FTWRONGKEY")
    with operator() as runner:
        cluster.create(FTJ, job("denied"))
        report("denied")
        wait_for(lambda: any("InvalidAccessKeyId" in r.getMessage() or "SignatureDoesNotMatch" in r.getMessage()
                             for r in caplog.records), "the refused report read")
        reaches(cluster, "denied", "Pending")
        job_status(cluster, "garbled", failed=1, **finished("Failed", "BackoffLimitExceeded"))
        reaches(cluster, "garbled", "Failed")
    outputs.append(runner.output)

    # The jobs really used the Secret by name (and the operator really signed with the sentinel).
    for name in ("good", "default-secret"):
        (container,) = cluster.get("batch/v1/jobs", name)["spec"]["template"]["spec"]["containers"]
        assert {"secretRef": {"name": SECRET}} in container["envFrom"], name
    assert status(cluster, "good")["artifacts"] == {"model": "s3://out/good/model/"}

    # 1. Every version of every object of every kind, the Secret aside.
    assert cluster.emulator is not None
    scanned = 0
    for (resource, _namespace, name), obj in list(cluster.emulator.objects.items()):
        if resource.plural == "secrets":
            continue
        for version in obj.history:
            if version is not None:
                scanned += 1
                assert not leaks(json.dumps(version.raw)), (resource.plural, name)
    kinds = {r.plural for (r, _, _) in cluster.emulator.objects}
    assert {"finetunejobs", "configmaps", "services", "jobs", "events", "secrets"} <= kinds, kinds
    # 2. Every request body the operator sent.
    sent = [c for c in cluster.chaos.calls() if c.body]
    assert sent and not [str(c) for c in sent if leaks(c.body or "")]
    # 3. Every log line and record.
    for text in outputs:
        assert not leaks(text)
    records = list(caplog.records)
    for record in records:
        text = record.getMessage() + (record.exc_text or "") + repr(record.args)
        assert not leaks(text), (record.name, text[:300])

    # No shell, no spec value in command/args: the Jobs created here, and every example rendered.
    containers = 0
    for job_obj in cluster.list("batch/v1/jobs"):
        spec = cluster.get(FTJ, job_obj["metadata"]["name"])["spec"]
        containers += check_commands(job_obj, spec)
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            ftj = FineTuneJob.model_validate(doc)
            if ftj.spec.base_model.from_job is not None:  # a chained stage: rendered once resolved, as the operator does
                resolved = BaseJobStatus(name=ftj.spec.base_model.from_job, phase="Succeeded", model_uri=CHAIN_START,
                                         adapters=[f"s3://out/{ftj.spec.base_model.from_job}/model/"])
                ftj = ftj.model_copy(update={"spec": chain.apply(ftj.spec, resolved)})
            rendered = render.render_children(ftj, size(ftj.spec), OperatorSettings.from_env())
            containers += check_commands(next(o for o in rendered if o["kind"] == "Job"), doc["spec"])
    print(f"\nsecrets: sentinel absent from {scanned} object versions ({len(kinds)} kinds), {len(sent)} operator "
          f"request bodies, {sum(len(t.splitlines()) for t in outputs)} output lines, {len(records)} log records; "
          f"{containers} containers without a shell or a spec value in command/args")


def test_the_command_check_catches_a_shell_and_a_spec_value() -> None:
    """The checker above can fail: a shell wrapper, or a spec value spliced into argv, is refused."""
    spec = ftj_manifest()["spec"]
    ftj = FineTuneJob.model_validate(ftj_manifest())
    rendered = next(o for o in render.render_children(ftj, size(ftj.spec), OperatorSettings.from_env())
                    if o["kind"] == "Job")
    assert check_commands(rendered, spec) == 1
    container = rendered["spec"]["template"]["spec"]["containers"][0]
    for argv in (["sh", "-c", "python -m finetune_trainer.launch"],
                 ["python", "-m", "finetune_trainer.launch", "--output", spec["output"]["uri"]]):
        container["command"] = argv
        with pytest.raises(AssertionError):
            check_commands(rendered, spec)
