"""spec.pilot: what the spec accepts, the pilot run derived from it, its children, and the two-stage status
(pure: `pilot`, `render`, `status.compute_status` with a `PilotView`)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from pydantic import ValidationError

from finetune_operator import conditions as c
from finetune_operator import pilot, render
from finetune_operator.contract import TrainerConfig
from finetune_operator.settings import OperatorSettings
from finetune_operator.sizing import plan as size
from finetune_operator.spec import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
from finetune_operator.status import Children, PilotView, compute_status, transition_events
from tests.unit.test_status import NOW, PLAN, exited, ftj, jcond, job, pod, report

GATES = [{"metric": "evalLoss", "minImprovement": 0.1}, {"metric": "accuracy", "min": 0.3}]


def manifest(**spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "clinic", "namespace": "ml", "uid": "u-1"},
        "spec": {
            "baseModel": {"uri": "hf://meta-llama/Llama-2-7b-hf"},
            "method": "full",
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/clinic"},
            "hyperparameters": {"learningRate": 2e-5, "epochs": 2},
            "resources": {"gpus": 8, "gpuMemory": "80Gi", "nodeSelector": {"pool": "a100"}},
            "pilot": {"maxSteps": 20, "gates": GATES},
            **spec,
        },
    }
    return body


def load(**spec: Any) -> FineTuneJob:
    return FineTuneJob.model_validate(manifest(**spec))


# --- the spec ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["full", "prefix", "prompt"])
def test_pilot_is_accepted_before_methods_that_are_not_lora(method: str) -> None:
    assert load(method=method).spec.pilot is not None


@pytest.mark.parametrize("method", ["lora", "qlora", "auto"])
def test_pilot_on_a_lora_run_is_refused_naming_the_field(method: str) -> None:
    with pytest.raises(ValidationError, match=r"spec\.pilot is only valid with methods full, prefix and prompt"):
        load(method=method)


def test_pilot_gates_name_known_metrics_and_need_a_bound() -> None:
    with pytest.raises(ValidationError, match=r"pilot\.gates\.0\.metric"):
        load(pilot={"gates": [{"metric": "bleu", "min": 1}]})
    with pytest.raises(ValidationError, match="needs min or max"):
        load(pilot={"gates": [{"metric": "accuracy"}]})
    with pytest.raises(ValidationError, match=r"pilot\.gates"):
        load(pilot={"maxSteps": 5})


# --- the derived pilot run ---------------------------------------------------------------------------


def test_pilot_spec_is_a_bounded_lora_run_under_the_pilot_prefix() -> None:
    job = load()
    derived = pilot.pilot_spec(job.spec)
    assert derived.method == "lora" and derived.pilot is None
    assert derived.hyperparameters.max_steps == 20 and derived.hyperparameters.epochs == 2
    assert derived.hyperparameters.learning_rate == 2e-4  # LoRA's default, not the full run's 2e-5
    assert derived.output.uri == "s3://out/clinic/pilot/"
    assert [g.wire() for g in derived.evaluation.gates] == GATES
    # The main run's explicit GPUs are not the pilot's; placement is kept.
    assert derived.resources.gpus is None and derived.resources.gpu_memory is None
    assert derived.resources.node_selector == {"pool": "a100"}
    assert job.spec.method == "full" and job.spec.output.uri == "s3://out/clinic"  # the job itself is untouched
    FineTuneJobSpec.model_validate(derived.wire())  # the derived spec is itself valid
    plan = pilot.plan(job)
    assert (plan.method, plan.gpus, plan.gpu_memory_gib) == ("lora", 1, 24)  # table: 7B LoRA
    assert size(job.spec).gpus == 8


def test_pilot_bound_by_a_share_of_the_data_or_by_default() -> None:
    by_share = pilot.pilot_spec(load(pilot={"dataFraction": 0.1, "gates": GATES, "learningRate": 1e-3}).spec)
    assert by_share.hyperparameters.epochs == 0.1 and by_share.hyperparameters.max_steps is None
    assert by_share.hyperparameters.learning_rate == 1e-3
    assert pilot.pilot_spec(load(pilot={"gates": GATES}).spec).hyperparameters.max_steps == 100


def test_pilot_children_have_their_own_names_labels_and_snapshot() -> None:
    job = load()
    settings = OperatorSettings.from_env({})
    children = render.render_children(pilot.pilot_job(job), pilot.plan(job), settings, pilot.STAGE)
    main = render.render_children(job, size(job.spec), settings)
    assert [(o["kind"], o["metadata"]["name"]) for o in children] == [
        ("ConfigMap", "clinic-pilot-config"), ("Service", "clinic-pilot"),
        ("NetworkPolicy", "clinic-pilot"), ("Job", "clinic-pilot")]
    assert {o["metadata"]["name"] for o in children}.isdisjoint({o["metadata"]["name"] for o in main})
    config_map, service, network_policy, job_obj = children
    assert network_policy["spec"]["podSelector"]["matchLabels"] == service["spec"]["selector"]
    for obj in children:
        assert obj["metadata"]["labels"][render.LABEL_STAGE] == "pilot"
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert service["spec"]["selector"] == {render.LABEL_JOB: "clinic", render.LABEL_COMPONENT: "trainer",
                                           render.LABEL_STAGE: "pilot"}
    template = job_obj["spec"]["template"]
    assert template["metadata"]["labels"][render.LABEL_STAGE] == "pilot"
    assert template["spec"]["subdomain"] == "clinic-pilot"
    env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
    assert env["FT_OUTPUT_URI"] == "s3://out/clinic/pilot/"
    assert env["FT_MAIN_ADDRESS"] == "clinic-pilot-0.clinic-pilot.ml.svc"
    assert template["spec"]["volumes"][0]["configMap"]["name"] == "clinic-pilot-config"
    snapshot = TrainerConfig.model_validate_json(config_map["data"]["job.json"])
    assert (snapshot.stage, snapshot.method, snapshot.spec.output.uri) == ("pilot", "lora", "s3://out/clinic/pilot/")
    assert snapshot.spec.hyperparameters.max_steps == 20 and snapshot.plan.gpus == 1
    # The main stage renders as without a pilot (no stage label, no stage in its snapshot).
    assert render.LABEL_STAGE not in main[2]["metadata"]["labels"]
    assert "stage" not in json.loads(main[0]["data"]["job.json"])


# --- the two-stage status ----------------------------------------------------------------------------

PILOT_PLAN = PLAN.model_copy(update={"method": "lora", "gpus": 1, "nodes": 1, "gpus_per_node": 1})
EVALUATION = {"accuracyMetric": "rougeL", "examples": 50,
              "base": {"accuracy": 0.02, "evalLoss": 6.2}, "tuned": {"accuracy": 0.05, "evalLoss": 5.9},
              "gatesPassed": False, "failedGates": ["accuracy 0.05 < min 0.30"]}


def pilot_view(pilot_job: dict[str, Any] | None, pods: tuple[dict[str, Any], ...] = (), **fields: Any) -> PilotView:
    return PilotView(plan=PILOT_PLAN, children=Children(job=pilot_job, pods=pods), **fields)


def run(status: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    new = compute_status(ftj(status), plan=PLAN, now=NOW, **kwargs)
    FineTuneJobStatus.model_validate(new)  # always a valid status
    return new


def test_while_the_pilot_runs_the_phase_is_the_pilots_and_no_main_job_is_asked_for() -> None:
    new = run(pilot=pilot_view(job(startTime="2026-03-01T11:00:00Z", ready=1), (pod(),),
                               report=report(step=5, total_steps=20)))
    assert (new["phase"], new["stage"]) == ("Running", "Pilot")
    assert new["pilot"]["phase"] == "Running" and new["pilot"]["plan"]["method"] == "lora"
    assert new["pilot"]["progress"]["summary"] == "25% 5/20"
    assert "progress" not in new  # the main stage's progress is the main run's
    assert c.find(new["conditions"], c.PILOT_PASSED)["status"] == c.UNKNOWN
    assert "1 of 1 pilot pod(s) running" in c.find(new["conditions"], c.RUNNING)["message"]
    assert new["plan"] == PLAN.wire()


def test_a_pilot_that_misses_its_gates_fails_the_job_with_its_scores() -> None:
    old = run(pilot=pilot_view(job(ready=1), (pod(),)))
    failed_report = report(phase="failed", evaluation=EVALUATION,
                           error={"reason": "GatesFailed", "message": "accuracy 0.05 < min 0.30"})
    new = run(old, pilot=pilot_view(job(conditions=[jcond("Failed", "PodFailurePolicy")], failed=1),
                                    (pod("Failed", containers=exited(4)),), report=failed_report))
    assert (new["phase"], new["stage"], new["pilot"]["phase"]) == ("Failed", "Pilot", "Failed")
    failed = c.find(new["conditions"], c.FAILED)
    assert failed["reason"] == c.PILOT_GATES_FAILED
    assert "accuracy 0.05 < min 0.30" in failed["message"] and "evalLoss 5.9 (base 6.2)" in failed["message"]
    assert c.find(new["conditions"], c.PILOT_PASSED)["status"] == c.FALSE
    assert new["pilot"]["evaluation"]["failedGates"] == ["accuracy 0.05 < min 0.30"]
    events = transition_events(old, new)
    assert [(e.type, e.reason) for e in events] == [("Warning", c.PILOT_GATES_FAILED)]
    # Terminal: later passes keep it (the handler passes no pilot then).
    assert compute_status(ftj(new), plan=None, now=NOW)["phase"] == "Failed"


def test_exit_code_4_without_a_report_is_pilot_gates_failed_and_other_failures_pilot_failed() -> None:
    by_code = run(pilot=pilot_view(job(conditions=[jcond("Failed", "PodFailurePolicy")]),
                                   (pod("Failed", containers=exited(4, "evalLoss 6.1 > 5.58")),)))
    assert c.find(by_code["conditions"], c.FAILED)["reason"] == c.PILOT_GATES_FAILED
    gave_up = run(pilot=pilot_view(job(conditions=[jcond("Failed", "BackoffLimitExceeded", "too many")]),
                                   report=report(phase="failed", error={"reason": "GatesFailed", "message": "x"})))
    assert c.find(gave_up["conditions"], c.FAILED)["reason"] == c.PILOT_GATES_FAILED
    crashed = run(pilot=pilot_view(job(conditions=[jcond("Failed", "BackoffLimitExceeded", "too many")])))
    failed = c.find(crashed["conditions"], c.FAILED)
    assert failed["reason"] == c.PILOT_FAILED and "BackoffLimitExceeded" in failed["message"]


def test_a_passing_pilot_leads_to_the_main_stage() -> None:
    old = run(pilot=pilot_view(job(ready=1), (pod(),)))
    passed = copy.deepcopy(EVALUATION) | {"gatesPassed": True, "failedGates": []}
    done = pilot_view(job(conditions=[jcond("Complete")], succeeded=1, completionTime="2026-03-01T11:30:00Z"),
                      (pod("Succeeded"),), report=report(phase="complete", step=20, total_steps=20,
                                                          evaluation=passed, artifacts={"model": "s3://o/pilot/model/"}))
    # The pass that sees the pilot complete creates the main Job (here: not there yet, then there).
    new = run(old, pilot=done)
    assert (new["stage"], new["phase"], new["pilot"]["phase"]) == ("Main", "Pending", "Succeeded")
    assert new["pilot"]["artifacts"] == {"model": "s3://o/pilot/model/"}
    assert new["pilot"]["completionTime"] == "2026-03-01T11:30:00Z"
    assert c.find(new["conditions"], c.PILOT_PASSED)["reason"] == c.PILOT_GATES_PASSED
    assert ("Normal", c.PILOT_GATES_PASSED) in [(e.type, e.reason) for e in transition_events(old, new)]
    main = run(new, pilot=PilotView(), children=Children(job=job(ready=1), pods=(pod(),)), report=report())
    assert (main["stage"], main["phase"]) == ("Main", "Running")
    assert main["pilot"] == new["pilot"]  # kept as it ended
    assert main["progress"]["summary"] == "45% 450/1000"
    assert not any(e.reason == c.PILOT_GATES_PASSED for e in transition_events(new, main))


# --- `finetune plan` ---------------------------------------------------------------------------------


def test_finetune_plan_shows_the_pilot_and_prints_its_children_first(capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    import yaml

    from finetune_operator import cli

    example = str(Path(__file__).resolve().parents[2] / "examples" / "healthcare-full-pilot.yaml")
    assert cli.main(["plan", example]) == 0
    table = capsys.readouterr().out
    assert "healthcare-full: pilot first: lora on 1x24GiB (maxSteps 50, 1 gate(s)); the full run's 4 GPU(s)" in table
    assert cli.main(["plan", example, "-o", "yaml"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("ConfigMap", "healthcare-full-pilot-config"), ("Service", "healthcare-full-pilot"),
        ("NetworkPolicy", "healthcare-full-pilot"), ("Job", "healthcare-full-pilot")]


def test_suspend_and_kueue_apply_to_the_pilot_stage() -> None:
    suspended = compute_status(ftj(suspend=True), plan=PLAN, now=NOW, pilot=pilot_view(job(suspend=True)))
    assert (suspended["phase"], suspended["stage"], suspended["pilot"]["phase"]) == ("Suspended", "Pilot", "Suspended")
    queued = compute_status(ftj(queue="gpus"), plan=PLAN, now=NOW, kueue_managed=True,
                            pilot=pilot_view(job(suspend=True)))
    assert (queued["phase"], queued["pilot"]["phase"]) == ("Queued", "Queued")
    assert "pilot" not in compute_status(ftj(), plan=PLAN, now=NOW)  # no pilot: no stage, no pilot block
    assert "stage" not in compute_status(ftj(), plan=PLAN, now=NOW)
