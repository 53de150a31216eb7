"""Chained stages on a real node: an SFT FineTuneJob and a DPO FineTuneJob that starts from it
(`spec.baseModel.fromJob`), applied together with the dependent first, as a GitOps sync applies a folder.

The DPO job must wait (Pending, WaitingForBaseJob) without creating a pod until the SFT job Succeeded, then
run from its result (the SFT adapter merged into the base: status.baseJob, provenance's chain) to Succeeded,
its trainer a container of the image `make images` built under the restricted profile like every pod here.
"""

from __future__ import annotations

from typing import Any

from tests.node.conftest import (
    DATA_BUCKET,
    ML_NAMESPACE,
    OUTPUT_BUCKET,
    Installed,
    diagnose,
    ftj,
    tiny_manifest,
    trainer_pods,
    wait_for,
    wait_phase,
    write_manifest,
)

SFT, DPO = "chain-sft", "chain-dpo"


def _dpo_manifest() -> dict[str, Any]:
    manifest = tiny_manifest(DPO, maxSteps=4, learningRate=5e-4)
    spec = manifest["spec"]
    spec["baseModel"] = {"fromJob": SFT, "parameters": "1M", "secretRef": {"name": "s3-credentials"}}
    spec["objective"] = "dpo"
    spec["dpo"] = {"beta": 0.1}
    spec["dataset"] = {**spec["dataset"], "train": f"s3://{DATA_BUCKET}/preferences/train.jsonl",
                       "format": "preference"}
    spec["dataset"].pop("validation", None)
    spec["evaluation"] = {**spec["evaluation"], "preferenceTestSet": f"s3://{DATA_BUCKET}/preferences/test.jsonl"}
    spec["evaluation"].pop("gates", None)
    return manifest


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == kind), {})


def test_a_dpo_stage_waits_for_its_sft_stage_and_starts_from_its_result(installed: Installed) -> None:
    cluster = installed.cluster
    sft = tiny_manifest(SFT, maxSteps=4)
    sft["spec"]["evaluation"].pop("gates", None)
    # The dependent first: it must wait for a base job that does not exist yet.
    cluster.kubectl("-n", ML_NAMESPACE, "apply", "-f", str(write_manifest(installed, _dpo_manifest())))
    waiting = wait_for(f"{DPO} to wait for {SFT}",
                       lambda: (o := ftj(cluster, DPO)) and _condition(o, "WaitingForBaseJob").get("status") == "True"
                       and o, timeout=120)
    assert waiting["status"]["phase"] == "Pending", waiting["status"]
    assert SFT in _condition(waiting, "WaitingForBaseJob")["message"]
    cluster.kubectl("-n", ML_NAMESPACE, "apply", "-f", str(write_manifest(installed, sft)))
    try:
        early_pods: list[str] = []

        def sft_done() -> dict[str, Any] | None:
            obj = ftj(cluster, SFT)
            if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                return obj
            # While the base is not done, the dependent has no pod (no pre-flight, no trainer).
            early_pods.extend(p["metadata"]["name"] for p in cluster.pods(ML_NAMESPACE, f"finetune.dev/job={DPO}"))
            return None

        done_sft = wait_for(f"{SFT} to finish", sft_done, interval=2.0)
        assert done_sft["status"]["phase"] == "Succeeded", diagnose(cluster, SFT)
        assert not early_pods, early_pods
        done_dpo = wait_phase(cluster, DPO)
        assert done_dpo["status"]["phase"] == "Succeeded", diagnose(cluster, DPO)
        status = done_dpo["status"]
        assert status["startTime"] >= done_sft["status"]["completionTime"], (status, done_sft["status"])
        base = status["baseJob"]
        assert base["name"] == SFT and base["uid"] == done_sft["metadata"]["uid"], base
        assert base["adapters"] == [done_sft["status"]["artifacts"]["model"]], base
        assert [stage["name"] for stage in base["chain"]] == [SFT], base
        provenance = installed.read_json(OUTPUT_BUCKET, f"{DPO}/provenance.json")
        assert SFT in str(provenance.get("chain")), provenance.get("chain")
        tuned, before = status["evaluation"]["tuned"], status["evaluation"]["base"]
        assert tuned["preferencePairs"] > 0 and tuned["preferenceAccuracy"] is not None, status["evaluation"]
        assert before["preferenceAccuracy"] is not None, status["evaluation"]
        for pod in trainer_pods(cluster, DPO):
            (cs,) = pod["status"]["containerStatuses"]
            assert cs["state"]["terminated"]["exitCode"] == 0, cs
    finally:
        for name in (DPO, SFT):
            cluster.kubectl("-n", ML_NAMESPACE, "delete", "finetunejobs.finetune.dev", name, "--wait=false",
                            check=False)
