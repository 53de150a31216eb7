"""The CPU pre-flight in the operator loop (kmock emulator, a local S3 server, the real pre-flight).

The tests play the Job controller and kubelet for the pre-flight's Job (`<name>-preflight`): they run the
real `finetune_trainer.preflight` in this process on the config snapshot the operator put in
`<name>-preflight-config` (the tiny model and the bundled sample in S3; the model's name has no size, so the
plan can only come from its files), then complete or fail the Job as its podFailurePolicy would. They check
that a good job's plan is completed (exact parameters, tokens, steps, GPU-hours) and written before any
training Job exists, that a bad dataset key fails the job with DataInvalid naming the file and line, and
that a run whose estimate exceeds spec.budget.maxGpuHours is refused; in neither case is a training Job
ever created.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from finetune_operator import render
from finetune_operator.contract import CONFIG_KEY, EXIT_CONFIG_ERROR, TrainerConfig
from tests.api.conftest import FTJ, Cluster, ftj_manifest, operator, wait_for
from tests.api.test_operator import finish_job, phase_is, reasons

DATA = Path(__file__).resolve().parents[2] / "trainer-image" / "finetune_trainer" / "data"
TRAIN = DATA / "healthcare_train.jsonl"
BAD_LINE = 7


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune_trainer.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch, tiny_model: Path, tmp_path: Path) -> Iterator[Any]:
    """The S3 server with the tiny model (`s3://out/models/tiny/`), the sample and a copy whose line
    BAD_LINE has `question` in place of `instruction`; the operator and the pre-flight both use it."""
    from finetune_trainer.s3server import LocalS3

    with LocalS3(buckets=("out",)).start() as server:
        server.create_bucket("out")
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("FT_S3_ENDPOINT", server.endpoint_url)
        monkeypatch.setenv("FT_PREFLIGHT", "true")
        client = server.client()
        for path in tiny_model.iterdir():
            client.upload_file(str(path), "out", f"models/tiny/{path.name}")
        client.upload_file(str(TRAIN), "out", "data/train.jsonl")
        lines = TRAIN.read_text(encoding="utf-8").splitlines()
        row = json.loads(lines[BAD_LINE - 1])
        row["question"] = row.pop("instruction")
        lines[BAD_LINE - 1] = json.dumps(row)
        client.put_object(Bucket="out", Key="data/bad.jsonl", Body=("\n".join(lines) + "\n").encode())
        yield server


def manifest(name: str, train: str = "s3://out/data/train.jsonl", **spec: Any) -> dict[str, Any]:
    doc = ftj_manifest(name, uid=None, baseModel={"uri": "s3://out/models/tiny/"}, method="auto",
                       dataset={"train": train, "format": "instruction"}, output={"uri": f"s3://out/runs/{name}/"},
                       **spec)
    return doc


def run_preflight(cluster: Cluster, name: str, cache: Path) -> int:
    """What the pre-flight pod would do: the real checks on the operator's snapshot. Returns the exit code."""
    from finetune_trainer import preflight

    snapshot = cluster.get("v1/configmaps", f"{name}-preflight-config")["data"][CONFIG_KEY]
    config = TrainerConfig.model_validate_json(snapshot)
    assert config.stage == "preflight"
    _, code = preflight.run(config, cache=cache)
    return code


def training_job_created(cluster: Cluster, name: str) -> list[int]:
    """Journal positions of creates of the training Job `name` (never the pre-flight's)."""
    return [call.seq for call in cluster.chaos.journal
            if call.verb == "create" and call.plural == "jobs" and call.body
            and json.loads(call.body)["metadata"]["name"] == name]


def status(cluster: Cluster, name: str) -> dict[str, Any]:
    return cluster.get(FTJ, name).get("status") or {}


def condition(st: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in st.get("conditions") or [] if c["type"] == type_)


def test_a_good_job_is_planned_from_its_files_before_its_training_job(cluster: Cluster, s3: Any,
                                                                      tmp_path: Path) -> None:
    cluster.chaos.keep_bodies = True
    with operator():
        cluster.create(FTJ, manifest("good", serving={"adapterName": "good-adapter"}))
        pf = wait_for(lambda: cluster.get("batch/v1/jobs", "good-preflight"), "the pre-flight's Job")
        # A CPU Job: no GPU, its own component label (training-pod watches do not see it), the checks' command.
        container = pf["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["python", "-m", "finetune_trainer.preflight"]
        assert not any("gpu" in key for key in container["resources"]["requests"])
        assert pf["spec"]["template"]["metadata"]["labels"][render.LABEL_COMPONENT] == "preflight"
        st = wait_for(lambda: (s := status(cluster, "good")).get("stage") == "Preflight" and s, "stage Preflight")
        assert st["phase"] == "Pending" and "plan" not in st  # no size in the model's name: nothing to plan yet
        assert condition(st, "PreflightPassed")["status"] == "Unknown"
        assert cluster.get("batch/v1/jobs", "good") is None

        assert run_preflight(cluster, "good", tmp_path / "cache") == 0
        finish_job(cluster, "Complete", "CompletionsReached", name="good-preflight")
        wait_for(lambda: cluster.get("batch/v1/jobs", "good"), "the training Job after the pre-flight")
        st = wait_for(lambda: (s := status(cluster, "good")).get("stage") == "Main" and s, "stage Main")

    preflight, plan = st["preflight"], st["plan"]
    assert preflight["phase"] == "Succeeded"
    lines = sum(1 for line in TRAIN.read_text(encoding="utf-8").splitlines() if line.strip())
    assert preflight["examples"] == lines and preflight["tokens"] > lines
    assert preflight["result"] == "s3://out/runs/good/preflight.json"
    estimate = plan["estimate"]
    assert estimate["parameters"] == preflight["parameters"] > 0
    assert estimate["tokens"] == preflight["tokens"] and estimate["trainExamples"] == lines
    assert estimate["steps"] > 0 and estimate["gpuHours"] > 0 and "TFLOPS" in estimate["basis"]
    # method auto on the counted examples (fewer than 10,000 -> qlora), sized from the model's own files
    assert plan["method"] == "qlora" and "counted by the pre-flight" in plan["reason"]
    assert condition(st, "PreflightPassed")["reason"] == "PreflightSucceeded"
    snapshot = json.loads(cluster.get("v1/configmaps", "good-config")["data"][CONFIG_KEY])
    assert snapshot["plan"]["estimate"] == estimate and snapshot["method"] == "qlora"
    # spec.serving: the completed plan says what is served (the tiny llama's q/k/v/o adapter passed the check)
    assert plan["serving"] == snapshot["plan"]["serving"] == {
        "baseModelName": "tiny", "modelUri": "s3://out/models/tiny/", "adapterName": "good-adapter",
        "adapterUri": "s3://out/runs/good/model/", "maxRank": 16,
        "manifests": ["s3://out/runs/good/serving/llminferenceservice.yaml", "s3://out/runs/good/serving/vllm.yaml"],
        "apply": False}

    # The completed plan was written before the training Job was created.
    (created,) = training_job_created(cluster, "good")
    planned = [call.seq for call in cluster.chaos.journal
               if call.plural == "finetunejobs" and call.subresource == "status"
               and call.body and '"estimate"' in call.body]
    assert planned and planned[0] < created, (planned, created)


def test_a_bad_dataset_key_fails_in_preflight_without_a_training_job(cluster: Cluster, s3: Any,
                                                                     tmp_path: Path) -> None:
    cluster.chaos.keep_bodies = True
    with operator():
        cluster.create(FTJ, manifest("bad", train="s3://out/data/bad.jsonl"))
        wait_for(lambda: cluster.get("batch/v1/jobs", "bad-preflight"), "the pre-flight's Job")
        assert run_preflight(cluster, "bad", tmp_path / "cache") == EXIT_CONFIG_ERROR
        finish_job(cluster, "Failed", "PodFailurePolicy", "Container trainer exited with code 3", name="bad-preflight")
        st = wait_for(phase_is(cluster, "Failed", "bad"), "phase Failed")
        wait_for(lambda: ("Warning", "DataInvalid") in reasons(cluster, "bad"), "the DataInvalid event")

    failed = condition(st, "Failed")
    assert failed["reason"] == "DataInvalid", failed
    assert "s3://out/data/bad.jsonl" in failed["message"] and f"line {BAD_LINE}" in failed["message"], failed
    assert "no GPU was requested" in failed["message"]
    assert (st["stage"], st["preflight"]["phase"], st["preflight"]["reason"]) == ("Preflight", "Failed", "DataInvalid")
    assert condition(st, "PreflightPassed")["status"] == "False"
    assert training_job_created(cluster, "bad") == [] and cluster.get("batch/v1/jobs", "bad") is None


def test_an_estimate_over_the_budget_is_refused_before_start(cluster: Cluster, s3: Any, tmp_path: Path) -> None:
    cluster.chaos.keep_bodies = True
    with operator():
        cluster.create(FTJ, manifest("costly", budget={"maxGpuHours": 1e-9}))
        wait_for(lambda: cluster.get("batch/v1/jobs", "costly-preflight"), "the pre-flight's Job")
        assert run_preflight(cluster, "costly", tmp_path / "cache") == 0
        finish_job(cluster, "Complete", "CompletionsReached", name="costly-preflight")
        st = wait_for(phase_is(cluster, "Failed", "costly"), "phase Failed")
        events = wait_for(lambda: [e for e in cluster.events("costly") if e["reason"] == "BudgetExceeded"],
                          "the BudgetExceeded event")

    failed = condition(st, "Failed")
    estimate = st["plan"]["estimate"]["gpuHours"]
    assert failed["reason"] == "BudgetExceeded"
    for text in (failed["message"], events[0]["message"]):
        assert f"estimated {estimate:g} GPU-hours" in text and "spec.budget.maxGpuHours 1e-09" in text, text
    assert st["preflight"]["phase"] == "Succeeded"
    assert training_job_created(cluster, "costly") == [] and cluster.get("batch/v1/jobs", "costly") is None
