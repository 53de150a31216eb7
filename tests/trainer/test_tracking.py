"""Experiment tracking (issue 22, item 3) against a real MLflow tracking server, and TensorBoard event files.

The server is `mlflow server` on loopback with a SQLite backend store in a temporary directory and the
session's S3 server as its artifact destination (proxied artifacts: the trainer talks HTTP only). It takes
10 s to start here on an idle machine (20-35 s under other tests' load), so one server serves the module. The training tests run the tiny model in-process
(as test_train.py); the pure helpers of `finetune_trainer.tracking` have table tests first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.contract import EXIT_CONFIG_ERROR, MARKER_NAME, REPORT_KEY
from finetune_operator.spec import EvaluationStatus, RetrievalScores, Scores
from finetune_trainer import tracking
from tests.trainer import train_helpers as th

START_TIMEOUT = 120.0
UID = "0b7c5c1e-5a4e-4d4b-9a57-6a1c2a3b4c5d"


# --- pure helpers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("obj", "flat"), [
    ({"a": {"b": 1, "c": [1, 2]}, "d": "x"}, {"a.b": "1", "a.c": "[1, 2]", "d": "x"}),
    ({"gates": [{"metric": "accuracy", "min": 0.5}]}, {"gates": '[{"metric": "accuracy", "min": 0.5}]'}),
    ({"on": True, "rate": 0.001}, {"on": "true", "rate": "0.001"}),
    ({}, {}),
])
def test_flatten(obj: dict[str, Any], flat: dict[str, str]) -> None:
    assert tracking.flatten(obj) == flat


def _config(**spec: Any) -> Any:
    staged = th.Staged("bkt", "s3://bkt/model/", "s3://bkt/data/train.jsonl", "s3://bkt/data/test.jsonl",
                       "s3://bkt/g.txt")
    return th.make_config(staged, spec, name="tiny", uid=UID)


def test_params_are_the_snapshot_without_the_rendezvous_id_and_within_mlflows_limits() -> None:
    config = _config(lora={"targetModules": [f"{'m' * 120}{i:03d}" for i in range(64)]})  # 8,000+ characters
    config = config.model_copy(update={"rendezvous_id": "secret-rendezvous"})
    params = tracking.params(config)
    assert params["method"] == "lora" and params["namespace"] == "default" and params["uid"] == UID
    assert params["spec.hyperparameters.maxSteps"] == "6"
    assert params["spec.baseModel.uri"] == "s3://bkt/model/"
    assert not any("secret-rendezvous" in v for v in params.values()) and "rendezvousId" not in params
    long = params["spec.lora.targetModules"]
    assert len(long) == tracking.MAX_PARAM_VALUE and long.endswith("...")
    assert all(len(k) <= tracking.MAX_KEY for k in params)


def test_evaluation_metrics_name_the_side() -> None:
    evaluation = EvaluationStatus(base=Scores(accuracy=0.25, eval_loss=3.0), tuned=Scores(accuracy=0.5),
                                  with_retrieval=RetrievalScores(tuned=Scores(hallucination=0.1)))
    assert tracking.evaluation_metrics(evaluation) == {
        "base.accuracy": 0.25, "base.eval_loss": 3.0, "tuned.accuracy": 0.5, "retrieval.tuned.hallucination": 0.1}
    assert tracking.evaluation_metrics(None) == {}


@pytest.mark.parametrize(("uris", "source"), [
    ({"model": "s3://o/model/", "merged": "s3://o/merged/"}, "s3://o/merged/"),
    ({"model": "s3://o/model/"}, "s3://o/model/"),
    ({}, None),
])
def test_model_source_prefers_the_merged_model(uris: dict[str, str], source: str | None) -> None:
    assert tracking.model_source(uris) == source


def test_step_metrics_keep_finite_tracked_numbers() -> None:
    record = {"step": 3, "epoch": 0.5, "loss": 2.5, "learning_rate": 1e-3, "tokens": 100,
              "tokens_per_second": None, "eval_loss": float("nan")}
    assert tracking.step_metrics(record) == {"loss": 2.5, "learning_rate": 1e-3}


def test_lineage_tags() -> None:
    config = _config(evaluation={"gates": [{"metric": "accuracy", "min": 0.1}]})
    provenance = {"baseModel": {"filesSha256": "f" * 64}, "configSha256": "c" * 64,
                  "data": [{"uri": "s3://bkt/data/test.jsonl", "sha256": "1" * 64},
                           {"uri": "s3://bkt/data/train.jsonl", "sha256": "2" * 64}]}
    tags = tracking.lineage_tags(config, provenance, gpu_hours=0.0123456789, gates_passed=True)
    assert tags == {
        "base_model.uri": "s3://bkt/model/", "base_model.revision": "unpinned", "base_model.files_sha256": "f" * 64,
        "dataset.sha256": "2" * 64,
        "dataset.files_sha256": json.dumps({"s3://bkt/data/test.jsonl": "1" * 64, "s3://bkt/data/train.jsonl": "2" * 64},
                                           sort_keys=True),
        "method": "lora", "gpu_hours": "0.0123457", "gates.passed": "true",
        "gates": json.dumps([g.wire() for g in config.spec.evaluation.gates], sort_keys=True),
        "config_sha256": "c" * 64, "finetunejob.namespace": "default", "finetunejob.name": "tiny",
        "finetunejob.uid": UID}


def test_probe_address() -> None:
    assert tracking.probe_address("http://mlflow.ml:5000") == ("mlflow.ml", 5000)
    assert tracking.probe_address("https://mlflow.example.com/") == ("mlflow.example.com", 443)
    assert tracking.probe_address("http://127.0.0.1") == ("127.0.0.1", 80)
    assert tracking.probe_address("databricks") is None


def test_probe_address_skips_a_proxied_server(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("no_proxy", "NO_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")
    assert tracking.probe_address("http://mlflow.ml:5000") is None
    monkeypatch.setenv("NO_PROXY", "mlflow.ml")
    assert tracking.probe_address("http://mlflow.ml:5000") == ("mlflow.ml", 5000)


def test_an_unreachable_server_fails_the_probe_quickly() -> None:
    started = time.monotonic()
    assert not tracking.reachable(f"http://127.0.0.1:{th.free_port()}")
    assert time.monotonic() - started < tracking.PROBE_SECONDS


# --- the MLflow server -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    startup_seconds: float

    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="module")
def mlflow_server(s3: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """`mlflow server` with a SQLite backend store and proxied artifacts in the session's S3 server."""
    tmp = tmp_path_factory.mktemp("mlflow")
    bucket = "mlflow-artifacts"
    s3.create_bucket(bucket)
    port = th.free_port()
    # No job execution (MLflow's GenAI job runner, a process of its own): measured here under load, the server
    # answered after 20 s without it and 35 s with it.
    env = {**os.environ, **s3.env(), "MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log_path = tmp / "server.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
             "--artifacts-destination", f"s3://{bucket}/mlflow", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        while not _answers(f"{uri}/health"):
            if proc.poll() is not None or time.monotonic() - started > START_TIMEOUT:
                raise AssertionError(f"mlflow server did not start:\n{log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(0.2)
        startup = time.monotonic() - started
        print(f"mlflow server answered after {startup:.1f} s")
        yield MlflowServer(uri, startup)
    finally:
        # The whole group: the CLI, its uvicorn server and job runner (SIGTERM to the CLI alone took 20 s).
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def staged(s3: Any, tiny_model_dir: Path, healthcare_sample: Any) -> th.Staged:
    return th.stage_in_new_bucket(s3, "tracking", tiny_model_dir, healthcare_sample)


SPEC: dict[str, Any] = {
    "hyperparameters": {"maxSteps": 4, "batchSize": 4, "gradientAccumulationSteps": 1},
    "checkpoint": {"everySteps": 2, "keep": 4},
    "evaluation": {"maxExamples": 2, "maxNewTokens": 4, "gates": [{"metric": "evalLoss", "max": 100.0}]},
}


def _event_scalars(directory: Path, tag: str) -> dict[int, float]:
    """Step -> value of a scalar, as TensorBoard reads a directory of event files (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory))
    accumulator.Reload()
    return {event.step: event.value for event in accumulator.Scalars(tag)}


# --- training with tracking ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_stopped_and_resumed_is_one_mlflow_run_and_registers_a_version(
        s3_env: Any, staged: th.Staged, mlflow_server: MlflowServer, tmp_path: Path) -> None:
    """The first attempt stops at its budget after step 1 (a checkpoint is saved, as a preempted pod's
    would be); the second resumes on the same output. One MLflow run holds both: the snapshot as params, one
    loss per step, eval loss at checkpoints, the scores before and after, the artifacts' URIs; the passed gates
    register a version with its lineage. TensorBoard reads the loss of every step from both attempts' files."""
    model_name = "tiny-healthcare"
    spec = th._merge(SPEC, {"dataset": {"validation": staged.test_uri},
                            "tracking": {"mlflow": {"trackingUri": mlflow_server.uri, "registeredModel": model_name}},
                            "budget": {"maxGpuHours": 1e-9}})
    capped = th.make_config(staged, spec, name="tracked", uid=UID)
    assert th.exit_code_in_process(capped) == EXIT_CONFIG_ERROR  # BudgetExceeded after step 1
    store = th.store(capped.spec.output.uri)
    first = store.read_json(REPORT_KEY)["tracking"]
    assert first["runId"] and "error" not in first
    client = mlflow_server.client()
    assert client.get_run(first["runId"]).info.status == "FAILED"

    larger = capped.spec.model_copy(update={"budget": None})
    outcome = th.run_in_process(capped.model_copy(update={"spec": larger}))
    assert outcome.resumed_from == 1 and store.is_complete("")
    report = store.read_json(REPORT_KEY)
    status = report["tracking"]
    assert status["runId"] == first["runId"] and status["experimentId"] == first["experimentId"]
    assert status["runUrl"] == f"{mlflow_server.uri}/#/experiments/{status['experimentId']}/runs/{status['runId']}"
    assert status["registeredModel"] == model_name and status["modelVersion"] == "1" and "error" not in status

    run = client.get_run(status["runId"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.tags[tracking.RESUMED_TAG] == "1"  # the second attempt reopened it from checkpoint 1
    assert client.get_experiment(status["experimentId"]).name == "default/tracked"
    params = run.data.params
    assert params["method"] == "lora" and params["uid"] == UID
    assert params["spec.hyperparameters.maxSteps"] == "4" and params["spec.budget.maxGpuHours"] == "1e-09"
    assert params["spec.tracking.mlflow.trackingUri"] == mlflow_server.uri
    losses = th.losses(store.read_bytes("metrics.jsonl").decode())
    assert sorted(losses) == [1, 2, 3, 4]
    history = client.get_metric_history(status["runId"], "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # one value per step, over both attempts
    assert {m.step: m.value for m in history} == pytest.approx(losses)
    assert sorted(m.step for m in client.get_metric_history(status["runId"], "eval_loss")) == [1, 2, 4]
    for name in ("learning_rate", "tokens_per_second", "gpu_hours"):
        assert client.get_metric_history(status["runId"], name), name
    evaluation = report["evaluation"]
    metrics = run.data.metrics
    assert metrics["base.eval_loss"] == pytest.approx(evaluation["base"]["evalLoss"])
    assert metrics["tuned.eval_loss"] == pytest.approx(evaluation["tuned"]["evalLoss"])
    assert {"base.accuracy", "tuned.accuracy"} <= set(metrics)
    artifacts = report["artifacts"]
    assert artifacts["tensorboard"] == capped.spec.output.uri + "tensorboard/"
    assert {k: v for k, v in run.data.tags.items() if k.startswith("artifact.")} == {
        f"artifact.{kind}": uri for kind, uri in artifacts.items()}
    assert run.data.tags["gates.passed"] == "true"
    from mlflow.artifacts import download_artifacts

    path = download_artifacts(run_id=status["runId"], artifact_path="finetune/config.json", dst_path=str(tmp_path),
                              tracking_uri=mlflow_server.uri)
    snapshot = json.loads(Path(path).read_text())
    assert snapshot["spec"]["hyperparameters"]["maxSteps"] == 4 and "rendezvousId" not in snapshot

    version = client.get_model_version(model_name, "1")
    assert version.source == artifacts["model"] and version.run_id == status["runId"]
    provenance = store.read_json("provenance.json")
    train = next(d for d in provenance["data"] if d["uri"] == staged.train_uri)
    tags = version.tags
    assert tags["dataset.sha256"] == train["sha256"]
    assert tags["base_model.revision"] == "unpinned"
    assert tags["base_model.files_sha256"] == provenance["baseModel"]["filesSha256"]
    assert tags["method"] == "lora" and tags["gates.passed"] == "true" and float(tags["gpu_hours"]) > 0
    assert (tags["finetunejob.namespace"], tags["finetunejob.name"], tags["finetunejob.uid"]) == (
        "default", "tracked", UID)

    # TensorBoard: both attempts' event files, in the output and in the complete manifest.
    files = store.list("tensorboard/")
    assert len(files) == 2, files
    manifest = store.read_json(MARKER_NAME)
    assert {f"tensorboard/{Path(k).name}" for k in files} <= {e["path"] for e in manifest["files"]}
    local = store.download_prefix("tensorboard", tmp_path / "tb")
    assert _event_scalars(local, "loss") == pytest.approx(losses)
    assert sorted(_event_scalars(local, "eval_loss")) == [1, 2, 4]


@pytest.mark.slow
def test_a_tracking_server_that_is_down_leaves_the_run_succeeded(s3_env: Any, staged: th.Staged,
                                                                   tmp_path: Path) -> None:
    """A closed port: the run completes, the report carries the error naming the spec field, and TensorBoard
    still has every step."""
    down = f"http://127.0.0.1:{th.free_port()}"
    spec = th._merge(SPEC, {"tracking": {"mlflow": {"trackingUri": down, "registeredModel": "never"}}})
    config = th.make_config(staged, spec, name="untracked", uid=UID)
    started = time.monotonic()
    outcome = th.run_in_process(config)
    print(f"run with a tracking server that is down: {time.monotonic() - started:.1f} s")
    store = th.store(config.spec.output.uri)
    assert not outcome.already_complete and store.is_complete("")
    report = store.read_json(REPORT_KEY)
    assert report["phase"] == "complete"
    status = report["tracking"]
    assert "runId" not in status and "modelVersion" not in status
    assert f"spec.tracking.mlflow.trackingUri {down}" in status["error"]
    assert "training goes on" in status["error"]
    local = store.download_prefix("tensorboard", tmp_path / "tb")
    assert sorted(_event_scalars(local, "loss")) == [1, 2, 3, 4]


def test_a_reopened_run_gets_the_params_an_earlier_attempt_could_not_send(mlflow_server: MlflowServer,
                                                                         tmp_path: Path) -> None:
    """The attempt that created the run could not send its params nor the snapshot artifact (the state object
    says so and keeps the snapshot it created the run with); the next attempt, whose snapshot carries an
    out-of-memory adjustment, reopens the run, sends the creation snapshot's params and artifact, records that
    in the state, and tags the checkpoint step it resumes from (0: none)."""
    from types import SimpleNamespace

    from finetune_operator.spec import Adjustment, MlflowSpec

    client = mlflow_server.client()
    created_with = _config(tracking={"mlflow": {"trackingUri": mlflow_server.uri}})
    experiment_id = client.create_experiment("default/reopened")
    run_id = client.create_run(experiment_id).info.run_id
    output = tmp_path / "output"
    store = th.store(str(output))
    store.write_json(tracking.STATE_KEY, {
        "trackingUri": mlflow_server.uri, "jobUid": UID, "experimentId": experiment_id, "runId": run_id,
        "modelVersion": None, "unsent": ["params", "snapshot"], "snapshot": tracking.snapshot(created_with)})
    rung = {"microBatch": 4, "gradAccum": 1, "gradientCheckpointing": False}
    adjustment = Adjustment.model_validate({"step": 0, "from": rung, "to": {**rung, "microBatch": 2, "gradAccum": 2},
                                            "reason": "OOMKilled"})
    later = created_with.model_copy(update={"adjustments": [adjustment]})
    assert tracking.params(later) != tracking.params(created_with)
    run = SimpleNamespace(requested=later, store=store, output_uri=str(output),
                          reporter=SimpleNamespace(update=lambda **_: None))
    mlflow = tracking.Mlflow(run, MlflowSpec.model_validate({"trackingUri": mlflow_server.uri}))  # type: ignore[arg-type]
    mlflow.open()
    assert mlflow.run_id == run_id and not mlflow.down and mlflow.status.error is None
    tracked = client.get_run(run_id).data
    assert tracked.params == tracking.params(created_with)
    assert tracked.tags[tracking.RESUMED_TAG] == "0"
    state = store.read_json(tracking.STATE_KEY)
    assert state["runId"] == run_id and state["unsent"] == [] and "snapshot" not in state
    assert "finetune/config.json" in {a.path for a in client.list_artifacts(run_id, "finetune")}
