"""spec.tracking.mlflow.secretRef reaches the training pods (and only by reference), and the FineTunePolicy's
secret list covers it."""

from __future__ import annotations

import copy
from typing import Any

from finetune_operator import pilot, policy, render
from finetune_operator.settings import OperatorSettings
from finetune_operator.sizing import plan
from finetune_operator.spec import FineTuneJob
from tests.unit.test_render import CASES, kind, pod_spec

MLFLOW = {"trackingUri": "http://mlflow.mlflow.svc:5000", "registeredModel": "healthcare",
          "secretRef": {"name": "mlflow-credentials"}}


def _job(case: str, **mlflow: Any) -> tuple[FineTuneJob, OperatorSettings]:
    data, env = CASES[case]
    data = copy.deepcopy(data)
    data["spec"]["tracking"] = {"mlflow": {**MLFLOW, **mlflow}}
    return FineTuneJob.model_validate(data), OperatorSettings.from_env(env)


def _mlflow_env(container: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in container["env"] if e["name"].startswith("MLFLOW_")]


def test_only_mlflow_keys_of_the_tracking_secret_reach_the_pod() -> None:
    """Key by key, never `envFrom`: AWS keys an MLflow Secret may hold must not shadow the storage Secrets."""
    job, settings = _job("lora-7b")
    container = pod_spec(render.render_children(job, plan(job.spec), settings))["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "hf-token"}}, {"secretRef": {"name": "s3-credentials"}}]
    assert _mlflow_env(container) == [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": "mlflow-credentials", "key": key, "optional": True}}}
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")]
    assert all("value" not in e for e in _mlflow_env(container))  # credentials by reference only


def test_the_tracking_secret_does_not_replace_the_default_s3_secret() -> None:
    job, settings = _job("qlora-7b")
    container = pod_spec(render.render_children(job, plan(job.spec), settings))["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-default"}}]
    assert len(_mlflow_env(container)) == 3


def test_the_pilot_pods_get_it_too() -> None:
    """The pilot logs its own MLflow run (it never registers a version)."""
    job, settings = _job("lora-7b")
    job = FineTuneJob.model_validate({**job.wire(), "spec": {
        **job.spec.wire(), "method": "full", "pilot": {"maxSteps": 20, "gates": [{"metric": "evalLoss", "minImprovement": 0.1}]}}})
    pilot_job = pilot.pilot_job(job)
    objects = render.render_children(pilot_job, pilot.plan(job), settings, stage=pilot.STAGE)
    container = kind(objects, "Job")["spec"]["template"]["spec"]["containers"][0]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in _mlflow_env(container)} == {"mlflow-credentials"}


def test_without_a_secret_nothing_is_added() -> None:
    job, settings = _job("lora-7b", secretRef=None)
    container = pod_spec(render.render_children(job, plan(job.spec), settings))["containers"][0]
    assert _mlflow_env(container) == [] and "mlflow-credentials" not in render.secret_names(job, settings)


def test_the_policy_checks_the_tracking_secret() -> None:
    vap, _ = policy.build_admission_policy()
    (names,) = [v for v in vap["spec"]["variables"] if v["name"] == "secretNames"]
    assert "?object.spec.?tracking.?mlflow.?secretRef.?name" in names["expression"]
