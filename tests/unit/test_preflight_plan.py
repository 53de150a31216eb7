"""The pre-flight's pure parts: the cost estimate (`finetune_operator.cost`), the plan completed from a
pre-flight result and the budget refusal (`finetune_operator.preflight`), the pre-flight stage of the status
function, and the pre-flight's Job (`render.render_preflight_job`)."""

from __future__ import annotations

import json
import math
from typing import Any

import kubernetes_validate
import pytest

from finetune_operator import conditions as c
from finetune_operator import cost, preflight, render, sizing
from finetune_operator.contract import (
    EXIT_CONFIG_ERROR,
    PreflightArchitecture,
    PreflightResult,
    PreflightSplit,
    TrainerError,
)
from finetune_operator.settings import OperatorSettings, SettingsError
from finetune_operator.spec import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus, MemoryRung, Plan
from finetune_operator.status import Children, PreflightView, compute_status, transition_events

CREATED = "2026-03-01T10:00:00Z"
NOW = "2026-03-01T12:00:00Z"
# A Llama-2-7B shape (6,738,415,616 parameters).
LLAMA7 = PreflightArchitecture(parameters=6_738_415_616, parameters_source="safetensors headers", layers=32,
                               hidden_size=4096, intermediate_size=11008, vocab_size=32000, attention_heads=32,
                               kv_heads=32, head_dim=128, tied_embeddings=False, dtype="float16", model_type="llama")


def spec(**changes: Any) -> FineTuneJobSpec:
    base: dict[str, Any] = {
        "baseModel": {"uri": "s3://models/mystery/"},
        "method": "auto",
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/run/"},
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return FineTuneJobSpec.model_validate(base)


def result(examples: int = 2_000, tokens: int = 600_000, *, ok: bool = True, sampled: bool = False,
           arch: PreflightArchitecture | None = LLAMA7) -> PreflightResult:
    split = PreflightSplit(field="spec.dataset.train", uri="s3://data/train.jsonl", format="instruction",
                           examples=examples, tokens=tokens, sampled=sampled)
    error = None if ok else TrainerError(reason="DataInvalid", message="s3://data/train.jsonl line 7: no 'instruction'")
    return PreflightResult(ok=ok, model_uri="s3://models/mystery/", output_uri="s3://out/run/", architecture=arch,
                           splits=[split] if ok else [], error=error, checked_at="2026-03-01T11:00:00Z")


# --- cost ---------------------------------------------------------------------------------------------


def test_flops_per_token_by_method_and_checkpointing() -> None:
    assert cost.flops_per_token(10, "lora", False) == 40
    assert cost.flops_per_token(10, "lora", True) == 60
    assert cost.flops_per_token(10, "full", False) == 60
    assert cost.flops_per_token(10, "full", True) == 80


@pytest.mark.parametrize(("gib", "name"), [(12, "T4"), (16, "T4"), (24, "A10"), (40, "A100 40GB"), (48, "L40S"),
                                           (80, "A100 80GB"), (20, "A10"), (141, "A100 80GB")])
def test_gpu_class_rows(gib: int, name: str) -> None:
    assert name in cost.gpu_class(gib).name


def test_every_sizing_class_has_a_throughput_row() -> None:
    assert set(sizing.GPU_CLASSES_GIB) <= set(cost.GPU_CLASSES)


def test_estimate_by_hand() -> None:
    """LoRA on 1 x 24 GiB, 1,000 examples of 300 tokens, batch 4 x accumulation 4, 2 epochs, checkpointing."""
    s = spec(method="lora", hyperparameters={"epochs": 2, "batchSize": 4, "gradientAccumulationSteps": 4,
                                             "maxSeqLength": 512})
    p = Plan(method="lora", gpus=1, gpu_memory_gib=24, nodes=1, gpus_per_node=1, estimated_memory_gib=20,
             source="table", reason="r")
    est = cost.estimate(s, p, parameters=7_000_000_000, examples=1000, tokens=300_000, sampled=False)
    assert est.steps == 2 * math.ceil(math.ceil(1000 / 4) / 4) == 126
    assert est.tokens == 300_000 and est.train_examples == 1000
    assert est.tokens_trained == 600_000
    seconds = 600_000 * 6 * 7e9 / (125e12 * 0.25)
    assert est.hours == pytest.approx(seconds / 3600, rel=1e-3)
    assert est.gpu_hours == est.hours
    assert "6N FLOPs per token" in est.basis and "A10" in est.basis and "25%" in est.basis


def test_estimate_runs_at_the_plans_rung() -> None:
    """The trainer starts at status.plan.rung: its checkpointing sets the FLOPs; the steps stay the spec's (the rung
    keeps batchSize x gradientAccumulationSteps)."""
    s = spec(method="lora", hyperparameters={"epochs": 1, "batchSize": 4, "gradientAccumulationSteps": 3,
                                             "maxSeqLength": 512})
    p = Plan(method="lora", gpus=1, gpu_memory_gib=24, nodes=1, gpus_per_node=1, estimated_memory_gib=20,
             source="table", reason="r", rung=MemoryRung(micro_batch=1, grad_accum=12, gradient_checkpointing=False))
    est = cost.estimate(s, p, parameters=7_000_000_000, examples=1001, tokens=300_000, sampled=False)
    # 1,001 micro-batches of 1 in groups of 12: as many steps as 251 of 4 in groups of 3
    assert est.steps == math.ceil(1001 / 12) == math.ceil(math.ceil(1001 / 4) / 3) == 84
    assert "4N FLOPs per token" in est.basis and "gradient checkpointing" not in est.basis
    without = cost.estimate(s, p.model_copy(update={"rung": None}), parameters=7_000_000_000, examples=1001,
                            tokens=300_000, sampled=False)
    assert "6N FLOPs per token" in without.basis and "gradient checkpointing" in without.basis  # unset: on, as before
    assert without.steps == est.steps
    assert est.hours == pytest.approx(without.hours * 4 / 6, rel=1e-3)


def test_estimate_caps_tokens_splits_validation_and_counts_ranks() -> None:
    s = spec(method="full", dataset={"validationSplit": 0.1},
             hyperparameters={"maxSeqLength": 256, "batchSize": 2, "gradientAccumulationSteps": 1, "epochs": 1,
                              "gradientCheckpointing": False})
    p = Plan(method="full", gpus=4, gpu_memory_gib=24, nodes=1, gpus_per_node=4, estimated_memory_gib=90,
             source="table", reason="r")
    # 1,000 examples of 1,000 tokens: each counts 256 at most.
    est = cost.estimate(s, p, parameters=10**9, examples=1000, tokens=1_000_000, sampled=True)
    assert est.train_examples == 900 and est.tokens == round(1000 * 256 * 0.9)
    assert est.steps == math.ceil(900 / (2 * 4))
    assert est.tokens_sampled is True
    assert est.gpu_hours == pytest.approx(est.hours * 4, rel=1e-3)


def test_packing_counts_sequences_not_examples_and_max_steps_wins() -> None:
    s = spec(method="lora", hyperparameters={"packing": True, "maxSeqLength": 1024, "batchSize": 1,
                                             "gradientAccumulationSteps": 1, "epochs": 1})
    p = Plan(method="lora", gpus=1, gpu_memory_gib=24, nodes=1, gpus_per_node=1, estimated_memory_gib=20,
             source="table", reason="r")
    est = cost.estimate(s, p, parameters=10**9, examples=1000, tokens=102_400, sampled=False)
    assert est.steps == 100  # 102,400 tokens in 1,024-token rows
    capped = cost.estimate(spec(method="lora", hyperparameters={"maxSteps": 7}), p, parameters=10**9, examples=1000,
                           tokens=102_400, sampled=False)
    assert capped.steps == 7


@pytest.mark.parametrize(("method", "dpo", "reference"), [
    ("lora", {}, "adapter"),           # the adapter switched off: one more forward (2N) per token, every step
    ("full", {}, "precomputed"),       # one forward over the training tokens before training
    ("lora", {"referenceFree": True}, "none"),
])
def test_dpo_doubles_the_sequences_and_counts_the_reference(method: str, dpo: dict[str, Any], reference: str) -> None:
    """1,000 pairs of 300 tokens (prompt + chosen + rejected), batch 4 x accumulation 4, 2 epochs, checkpointing."""
    hp = {"epochs": 2, "batchSize": 4, "gradientAccumulationSteps": 4, "maxSeqLength": 512}
    s = spec(method=method, objective="dpo", dpo=dpo, dataset={"format": "preference"}, hyperparameters=hp)
    p = Plan(method=method, gpus=1, gpu_memory_gib=24, nodes=1, gpus_per_node=1, estimated_memory_gib=20,
             source="estimate", reason="r")
    est = cost.estimate(s, p, parameters=7_000_000_000, examples=1000, tokens=300_000, sampled=False)
    assert est.steps == 126 and est.train_examples == 1000  # steps count pairs, as the trainer does
    assert est.tokens == 600_000 and est.tokens_trained == 1_200_000  # two sequences per pair, each with the prompt
    sft = cost.estimate(spec(method=method, hyperparameters=hp), p, parameters=7_000_000_000, examples=1000,
                        tokens=300_000, sampled=False)
    passes = round(cost.flops_per_token(7_000_000_000, method, True) / 7e9)
    utilisation = cost.UTILISATION[method]
    flops = 1_200_000 * passes * 7e9 + {"adapter": 1_200_000 * 2 * 7e9, "precomputed": 600_000 * 2 * 7e9,
                                         "none": 0.0}[reference]
    assert est.hours == pytest.approx(flops / (125e12 * utilisation) / 3600, rel=1e-3)
    assert est.hours > 2 * sft.hours * 0.999
    assert f"reference {cost.REFERENCE_COST[reference]}" in est.basis


# --- the completed plan ------------------------------------------------------------------------------------


def test_a_size_is_needed_without_a_preflight() -> None:
    with pytest.raises(sizing.SizeUnknown) as err:
        sizing.plan(spec())
    assert err.value.field == "spec.baseModel.parameters"


def test_complete_plan_sizes_from_the_files_and_decides_auto_on_the_counted_examples() -> None:
    small = preflight.complete_plan(spec(), result(examples=2_000))
    assert small.method == "qlora" and "counted by the pre-flight" in small.reason
    assert small.source == "estimate" and "6,738,415,616 parameters" in small.reason
    assert small.estimate is not None and small.estimate.parameters == LLAMA7.parameters
    assert small.estimate.train_examples == 2_000
    large = preflight.complete_plan(spec(dataset={"examples": 100}), result(examples=50_000, tokens=10**7))
    assert large.method == "lora"  # the count wins over a stale dataset.examples


def test_complete_plan_keeps_the_table_for_a_named_size() -> None:
    plan = preflight.complete_plan(spec(baseModel={"uri": "hf://meta-llama/Llama-2-7b-hf"}, method="lora"), result())
    assert (plan.gpus, plan.gpu_memory_gib, plan.source) == (1, 24, "table")
    assert plan.estimate is not None and plan.estimate.parameters == LLAMA7.parameters


def test_over_budget_names_both_numbers() -> None:
    plan = preflight.complete_plan(spec(method="lora"), result())
    assert plan.estimate is not None
    gpu_hours = plan.estimate.gpu_hours
    assert preflight.over_budget(None, plan) is None
    assert preflight.over_budget(gpu_hours, plan) is None
    message = preflight.over_budget(gpu_hours / 2, plan)
    assert message is not None
    assert f"estimated {gpu_hours:g} GPU-hours" in message and f"maxGpuHours {gpu_hours / 2:g}" in message


def test_failure_reasons() -> None:
    assert preflight.failure(None) is None
    assert preflight.failure(result()) is None
    assert preflight.failure(result(ok=False)) == ("DataInvalid", "s3://data/train.jsonl line 7: no 'instruction'")
    odd = result(ok=False).model_copy(update={"error": TrainerError(reason="Weird", message="m")})
    assert preflight.failure(odd) == ("PreflightFailed", "m")


# --- the status function's pre-flight stage ------------------------------------------------------------------


def ftj(status: dict[str, Any] | None = None, **spec_fields: Any) -> dict[str, Any]:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "demo", "namespace": "default", "uid": "u1", "generation": 1,
                         "creationTimestamp": CREATED},
            "spec": spec_fields, "status": status or {}}


def pf_job(*conditions: tuple[str, str, str], **status: Any) -> dict[str, Any]:
    conds = [{"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": "2026-03-01T11:30:00Z"}
             for t, r, m in conditions]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "demo-preflight"}, "spec": {},
            "status": {"conditions": conds, **status}}


def conds(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {x["type"]: x for x in st["conditions"]}


def test_status_while_the_preflight_runs() -> None:
    view = PreflightView(children=Children(job=pf_job(active=1, ready=1), created=("Job/demo-preflight",)))
    st = compute_status(ftj(), plan=None, preflight=view, now=NOW)
    assert (st["phase"], st["stage"], st["preflight"]["phase"]) == ("Running", "Preflight", "Running")
    assert conds(st)["PreflightPassed"]["status"] == "Unknown"
    assert conds(st)["Planned"]["status"] == "Unknown" and "plan" not in st


def test_status_when_the_preflight_passed_holds_the_completed_plan() -> None:
    plan = preflight.complete_plan(spec(), result())
    view = PreflightView(children=Children(job=pf_job(("Complete", "CompletionsReached", ""))), result=result(),
                         plan=plan, result_uri="s3://out/run/preflight.json")
    st = compute_status(ftj(), plan=None, preflight=view, now=NOW)
    assert st["phase"] == "Pending" and st["preflight"]["phase"] == "Succeeded"
    assert st["plan"] == plan.wire() and st["plan"]["estimate"]["gpuHours"] > 0
    assert st["preflight"]["examples"] == 2_000 and st["preflight"]["parameters"] == LLAMA7.parameters
    passed = conds(st)["PreflightPassed"]
    assert passed["status"] == "True" and "GPU-hours" in passed["message"]
    events = transition_events(ftj()["status"], st)
    assert [(e.type, e.reason) for e in events] == [("Normal", "Starting"), ("Normal", "PreflightSucceeded")]
    assert "GPU-hours" in events[1].message
    # The next pass (the main stage) moves the stage on.
    main = compute_status(ftj(st), plan=plan, now=NOW)
    assert main["stage"] == "Main" and main["preflight"]["phase"] == "Succeeded"


def test_status_carries_the_pair_counts_of_preference_data() -> None:
    """objective dpo: the train split's pairs, tokens per pair and length bias land in status.preflight (the
    spec model's wire names), beside the examples and tokens; an sft result carries none of them."""
    pairs = PreflightSplit(field="spec.dataset.train", uri="s3://data/pairs.jsonl", format="preference",
                           examples=199, tokens=59_700, sampled=False, pairs=199, tokens_per_pair=300.0,
                           length_bias=-12.3456)
    held_out = PreflightSplit(field="spec.evaluation.preferenceTestSet", uri="s3://data/pairs-test.jsonl",
                              format="preference", examples=50, tokens=14_000, sampled=False, pairs=50,
                              tokens_per_pair=280.0, length_bias=40.0)
    found = result().model_copy(update={"splits": [held_out, pairs]})
    dpo = spec(objective="dpo", method="lora", dataset={"format": "preference"})
    plan = preflight.complete_plan(dpo, found)
    view = PreflightView(children=Children(job=pf_job(("Complete", "CompletionsReached", ""))), result=found,
                         plan=plan, result_uri="s3://out/run/preflight.json")
    st = compute_status(ftj(), plan=None, preflight=view, now=NOW)
    pf = st["preflight"]
    assert (pf["examples"], pf["pairs"], pf["tokensPerPair"], pf["lengthBias"]) == (199, 199, 300.0, -12.35)
    assert FineTuneJobStatus.model_validate(st).preflight.length_bias == -12.35  # type: ignore[union-attr]
    assert not {"pairs", "tokensPerPair", "lengthBias"} & set(preflight.summary(result(), None))


def test_status_when_the_estimate_exceeds_the_budget() -> None:
    plan = preflight.complete_plan(spec(), result())
    view = PreflightView(children=Children(job=pf_job(("Complete", "CompletionsReached", ""))), result=result(),
                         plan=plan)
    st = compute_status(ftj(budget={"maxGpuHours": 1e-6}), plan=None, preflight=view, now=NOW)
    assert st["phase"] == "Failed" and conds(st)["Failed"]["reason"] == c.BUDGET_EXCEEDED
    assert "maxGpuHours 1e-06" in conds(st)["Failed"]["message"]


def test_status_when_the_preflight_found_bad_data() -> None:
    view = PreflightView(children=Children(job=pf_job(("Failed", "PodFailurePolicy", "exit 3"))),
                         result=result(ok=False))
    st = compute_status(ftj(), plan=None, preflight=view, now=NOW)
    assert st["phase"] == "Failed" and st["stage"] == "Preflight"
    failed = conds(st)["Failed"]
    assert failed["reason"] == "DataInvalid" and "line 7" in failed["message"]
    assert "no GPU was requested" in failed["message"]
    assert (st["preflight"]["phase"], st["preflight"]["reason"]) == ("Failed", "DataInvalid")


def test_status_when_the_preflight_found_an_adapter_vllm_cannot_load() -> None:
    """spec.serving's check (reason ServingUnsupported): the job fails before any GPU, with the trainer's words."""
    message = ("spec.lora.targetModules ['c_attn'] cannot be loaded as LoRA by vLLM for model type 'llama': ...; "
               "set spec.output.saveMerged: true")
    refused = result(ok=False).model_copy(update={"error": TrainerError(reason="ServingUnsupported", message=message)})
    assert preflight.failure(refused) == ("ServingUnsupported", message)
    view = PreflightView(children=Children(job=pf_job(("Failed", "PodFailurePolicy", "exit 3"))), result=refused)
    st = compute_status(ftj(), plan=None, preflight=view, now=NOW)
    assert st["phase"] == "Failed" and conds(st)["Failed"]["reason"] == "ServingUnsupported"
    assert "saveMerged: true" in conds(st)["Failed"]["message"] and "no GPU was requested" in conds(st)["Failed"]["message"]
    assert (st["preflight"]["phase"], st["preflight"]["reason"]) == ("Failed", "ServingUnsupported")


def test_status_when_the_preflight_job_failed_without_a_result() -> None:
    pod = {"metadata": {"name": "demo-preflight-x"}, "status": {"containerStatuses": [
        {"state": {"terminated": {"exitCode": EXIT_CONFIG_ERROR, "message": "ModelUnreadable: no config.json"}}}]}}
    view = PreflightView(children=Children(job=pf_job(("Failed", "PodFailurePolicy", "exit 3")), pods=[pod]))
    st = compute_status(ftj(), plan=None, preflight=view, now=NOW)
    failed = conds(st)["Failed"]
    assert failed["reason"] == "PreflightFailed" and "no config.json" in failed["message"]
    deadline = PreflightView(children=Children(job=pf_job(("Failed", "DeadlineExceeded", "too long"))))
    st = compute_status(ftj(), plan=None, preflight=deadline, now=NOW)
    assert conds(st)["Failed"]["reason"] == "PreflightFailed" and "DeadlineExceeded" in conds(st)["Failed"]["message"]


def test_status_waits_for_an_unreadable_result_but_not_on_a_pvc() -> None:
    done = Children(job=pf_job(("Complete", "CompletionsReached", "")))
    st = compute_status(ftj(), plan=None, preflight=PreflightView(children=done, result_uri="s3://o/preflight.json"),
                        now=NOW)
    assert st["phase"] == "Pending" and st["preflight"]["phase"] == "Pending"
    assert "s3:GetObject" in conds(st)["PreflightPassed"]["message"]
    plan = sizing.plan(spec(baseModel={"uri": "hf://meta-llama/Llama-2-7b-hf"}))
    st = compute_status(ftj(), plan=plan, preflight=PreflightView(children=done, readable=False), now=NOW)
    assert st["preflight"]["phase"] == "Succeeded" and st["plan"] == plan.wire()


# --- the pre-flight's Job -------------------------------------------------------------------------------------


def job_of(**spec_fields: Any) -> FineTuneJob:
    body = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "a" * 52, "namespace": "ml", "uid": "u1"},
            "spec": {"baseModel": {"uri": "hf://meta-llama/Llama-2-7b-hf"}, "method": "lora",
                     "dataset": {"train": "s3://data/train.jsonl", "secretRef": {"name": "data"}},
                     "output": {"uri": "s3://out/run/"}, **spec_fields}}
    return FineTuneJob.model_validate(body)


def test_preflight_children() -> None:
    job = job_of(suspend=True, resources={"nodeSelector": {"gpu": "yes"}, "gpus": 2})
    settings = OperatorSettings(preflight_cpu="500m", preflight_memory="1Gi", preflight_deadline_seconds=300)
    cm, pf = render.render_children(job, sizing.plan(job.spec), settings, preflight.STAGE)
    assert (cm["kind"], cm["metadata"]["name"]) == ("ConfigMap", f"{'a' * 52}-preflight-config")
    assert (pf["kind"], pf["metadata"]["name"]) == ("Job", f"{'a' * 52}-preflight")
    assert json.loads(cm["data"]["job.json"])["stage"] == "preflight"
    spec_ = pf["spec"]
    assert (spec_["completions"], spec_["backoffLimit"], spec_["activeDeadlineSeconds"], spec_["suspend"]) == (
        1, 1, 300, True)
    assert spec_["podFailurePolicy"]["rules"][1]["onExitCodes"]["values"][0] == EXIT_CONFIG_ERROR
    pod = spec_["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "finetune_trainer.preflight"]
    # Disk: /tmp only (it reads headers, never the weights).
    assert container["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi", "ephemeral-storage": "8Gi"},
                                      "limits": {"cpu": "1", "memory": "2Gi"}}
    assert container["envFrom"] == [{"secretRef": {"name": "data"}}]
    # No GPU, no GPU placement, no rendezvous: it runs on any node.
    assert "nodeSelector" not in pod and "tolerations" not in pod and "affinity" not in pod
    assert "ports" not in container and not any(v["name"] == render.VOLUME_SHM for v in pod["volumes"])
    assert spec_["template"]["metadata"]["labels"][render.LABEL_COMPONENT] == "preflight"
    assert render.pod_selector(job, preflight.STAGE)[render.LABEL_COMPONENT] == "preflight"
    for obj in (cm, pf):
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "u1"
        assert obj["metadata"]["labels"][render.LABEL_STAGE] == "preflight"
    kubernetes_validate.validate(pf, "1.33", strict=True)


def test_kueue_labels_stay_off_the_preflight() -> None:
    body = job_of().wire()
    body["metadata"]["labels"] = {render.KUEUE_QUEUE_LABEL: "gpu-queue"}
    job = FineTuneJob.model_validate(body)
    _, pf = render.render_children(job, sizing.plan(job.spec), OperatorSettings(), preflight.STAGE)
    assert render.KUEUE_QUEUE_LABEL not in pf["metadata"]["labels"] and pf["spec"]["suspend"] is False


@pytest.mark.parametrize(("env", "field", "value"), [
    ({}, "preflight", True),
    ({"FT_PREFLIGHT": "false"}, "preflight", False),
    ({"FT_PREFLIGHT_DEADLINE_SECONDS": "120"}, "preflight_deadline_seconds", 120),
    ({"FT_PREFLIGHT_MEMORY": "4Gi"}, "preflight_memory", "4Gi"),
])
def test_preflight_settings(env: dict[str, str], field: str, value: Any) -> None:
    assert getattr(OperatorSettings.from_env(env), field) == value


@pytest.mark.parametrize("env", [{"FT_PREFLIGHT": "maybe"}, {"FT_PREFLIGHT_DEADLINE_SECONDS": "5"},
                                 {"FT_PREFLIGHT_CPU": "lots"}])
def test_bad_preflight_settings_name_the_variable(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match=next(iter(env))):
        OperatorSettings.from_env(env)
