"""A corpus of invalid FineTuneJobs: each a mutation of the healthcare example, the field path the error
must name, and a fragment of the message. Shared by the manifest, CLI and CRD/CEL tests."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "healthcare-lora.yaml"
DELETE = object()


def base_manifest() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


@dataclass(frozen=True)
class Case:
    id: str
    changes: dict[str, Any]  # dotted path -> new value (DELETE removes it)
    path: str  # the field path the error must name
    fragment: str  # part of the message

    def manifest(self) -> dict[str, Any]:
        doc = copy.deepcopy(base_manifest())
        for dotted, value in self.changes.items():
            if dotted == "":
                return value
            *parents, last = dotted.split(".")
            node = doc
            for part in parents:
                node = node.setdefault(part, {})
            if value is DELETE:
                node.pop(last, None)
            else:
                node[last] = value
        return doc


LOSS_GATE = {"metric": "evalLoss", "minImprovement": 0.1}
#: The example as a DPO stage on preference pairs (valid as it stands).
DPO = {"spec.objective": "dpo", "spec.dataset.format": "preference",
       "spec.dataset.train": "s3://healthcare-data/preference/train.jsonl"}
#: The example chained to an SFT stage (valid as it stands: the size comes from spec.baseModel.parameters).
FROM_JOB = {"spec.baseModel.uri": DELETE, "spec.baseModel.revision": DELETE, "spec.baseModel.fromJob": "sft-stage",
            "spec.baseModel.parameters": "7B"}

CASES = [
    Case("unknown-method", {"spec.method": "sft"}, "spec.method", "must be one of"),
    Case("wrong-api-version", {"apiVersion": "finetune.dev/v1"}, "apiVersion", "must be finetune.dev/v1alpha1"),
    Case("wrong-kind", {"kind": "TrainingJob"}, "kind", "must be FineTuneJob"),
    Case("uppercase-name", {"metadata.name": "Healthcare"}, "metadata.name", "DNS label"),
    Case("name-too-long", {"metadata.name": "a" * 60}, "metadata.name", "at most 52 characters"),
    Case("shell-in-name", {"metadata.name": "x;rm-rf"}, "metadata.name", "DNS label"),
    Case("missing-base-model", {"spec.baseModel": DELETE}, "spec.baseModel", "required"),
    Case("ftp-model-uri", {"spec.baseModel.uri": "ftp://host/model"}, "spec.baseModel.uri", "unsupported URI"),
    Case("traversal-model-uri", {"spec.baseModel.uri": "s3://models/../etc/passwd"}, "spec.baseModel.uri", "traversal"),
    Case("shell-model-uri", {"spec.baseModel.uri": "hf://org/model;rm -rf /"}, "spec.baseModel.uri", "not allowed"),
    Case("backtick-data-uri", {"spec.dataset.train": "s3://data/`id`.jsonl"}, "spec.dataset.train", "not allowed"),
    Case("subshell-output-uri", {"spec.output.uri": "s3://out/$(whoami)/"}, "spec.output.uri", "not allowed"),
    Case("bad-parameters", {"spec.baseModel.parameters": "seven"}, "spec.baseModel.parameters", "not a size"),
    Case(
        "unknown-size",
        {"spec.baseModel.uri": "hf://org/mystery-model"},
        "spec.baseModel.parameters",
        "set spec.baseModel.parameters",
    ),
    Case("absurd-size", {"spec.baseModel.parameters": "50000B"}, "spec.baseModel.parameters", "larger than"),
    Case("zero-rank", {"spec.lora.r": 0}, "spec.lora.r", "must be >= 1"),
    Case("huge-rank", {"spec.lora.r": 100000}, "spec.lora.r", "must be <= 1024"),
    Case("dropout-above-one", {"spec.lora.dropout": 1.5}, "spec.lora.dropout", "must be < 1"),
    Case("no-target-modules", {"spec.lora.targetModules": []}, "spec.lora.targetModules", "at least 1"),
    Case("shell-target-module", {"spec.lora.targetModules": ["q_proj; echo"]}, "spec.lora.targetModules[0]", "pattern"),
    Case("quantization-with-lora", {"spec.quantization": {"bits": 4}}, "spec", "only valid with method 'qlora'"),
    Case(
        "bad-quant-type",
        {"spec.method": "qlora", "spec.quantization": {"type": "nf8"}},
        "spec.quantization.type",
        "must be one of",
    ),
    Case(
        "validation-and-split",
        {"spec.dataset.validation": "s3://healthcare-data/val.jsonl"},
        "spec.dataset",
        "at most one",
    ),
    Case("split-too-large", {"spec.dataset.validationSplit": 0.9}, "spec.dataset.validationSplit", "must be <= 0.5"),
    Case("unknown-format", {"spec.dataset.format": "csv"}, "spec.dataset.format", "must be one of"),
    Case("missing-train", {"spec.dataset.train": DELETE}, "spec.dataset.train", "required"),
    Case("relative-file-uri", {"spec.dataset.train": "file://data/train.jsonl"}, "spec.dataset.train", "absolute"),
    Case("negative-examples", {"spec.dataset.examples": -5}, "spec.dataset.examples", "must be >= 1"),
    Case("string-learning-rate", {"spec.hyperparameters.learningRate": "fast"}, "spec.hyperparameters.learningRate", "number"),
    Case("negative-epochs", {"spec.hyperparameters.epochs": -1}, "spec.hyperparameters.epochs", "must be > 0"),
    Case("fractional-batch", {"spec.hyperparameters.batchSize": 1.5}, "spec.hyperparameters.batchSize", "whole number"),
    Case("int8-precision", {"spec.hyperparameters.precision": "int8"}, "spec.hyperparameters.precision", "must be one of"),
    Case(
        "typo-field",
        {"spec.hyperparameters.learningRat": 0.1},
        "spec.hyperparameters.learningRat",
        "unknown field; allowed fields: epochs",
    ),
    Case("huge-seq-length", {"spec.hyperparameters.maxSeqLength": 10**9}, "spec.hyperparameters.maxSeqLength", "<="),
    Case("zero-gpus", {"spec.resources": {"gpus": 0}}, "spec.resources.gpus", "must be >= 1"),
    Case("bad-gpu-memory", {"spec.resources": {"gpuMemory": "lots"}}, "spec.resources.gpuMemory", "not a memory size"),
    Case(
        "uneven-gpus",
        {"spec.resources": {"gpus": 11, "gpusPerNode": 8}},
        "spec.resources.gpus",
        "split evenly",
    ),
    Case("bad-node-selector-value", {"spec.resources": {"nodeSelector": {"gpu": "a b"}}}, "spec.resources.nodeSelector.gpu", "pattern"),
    Case("bad-cpu-quantity", {"spec.resources": {"cpu": "four"}}, "spec.resources.cpu", "pattern"),
    Case("hf-output", {"spec.output.uri": "hf://org/out"}, "spec.output.uri", "unsupported URI"),
    Case("missing-output", {"spec.output": DELETE}, "spec.output", "required"),
    Case("zero-checkpoint-steps", {"spec.checkpoint": {"everySteps": 0}}, "spec.checkpoint.everySteps", "must be >= 1"),
    Case("gate-without-bounds", {"spec.evaluation.gates": [{"metric": "accuracy"}]}, "spec.evaluation.gates[0]", "needs min or max"),
    Case(
        "gate-min-above-max",
        {"spec.evaluation.gates": [{"metric": "accuracy", "min": 0.9, "max": 0.1}]},
        "spec.evaluation.gates[0]",
        "above max",
    ),
    Case("unknown-gate-metric", {"spec.evaluation.gates": [{"metric": "bleu", "min": 1}]}, "spec.evaluation.gates[0].metric", "must be one of"),
    Case("bad-format-regex", {"spec.evaluation.formatRegex": "("}, "spec.evaluation.formatRegex", "regular expression"),
    Case("bad-format-schema", {"spec.evaluation.formatSchema": "{not json"}, "spec.evaluation.formatSchema", "not valid JSON"),
    Case("shell-image", {"spec.image": "evil image; rm -rf /"}, "spec.image", "pattern"),
    Case("string-deadline", {"spec.activeDeadlineSeconds": "soon"}, "spec.activeDeadlineSeconds", "whole number"),
    Case("maybe-suspend", {"spec.suspend": "maybe"}, "spec.suspend", "true or false"),
    Case("spec-is-a-list", {"spec": ["baseModel"]}, "spec", "must be an object"),
    Case("bad-service-account", {"spec.serviceAccountName": "Admin!"}, "spec.serviceAccountName", "pattern"),
    Case("bad-secret-name", {"spec.output.secretRef": {"name": "../secret"}}, "spec.output.secretRef.name", "pattern"),
    Case("not-a-mapping", {"": ["just", "a", "list"]}, "(document)", "must be a mapping"),
    Case("shell-revision", {"spec.baseModel.revision": "main; curl evil"}, "spec.baseModel.revision", "pattern"),
    Case("pipe-glossary-uri", {"spec.evaluation.glossary": "s3://healthcare-data/g.txt|sh"}, "spec.evaluation.glossary", "not allowed"),
    Case("traversal-test-set", {"spec.evaluation.testSet": "pvc://data/../../etc/shadow"}, "spec.evaluation.testSet", "traversal"),
    Case("traversal-file-uri", {"spec.dataset.train": "file:///data/../etc/passwd"}, "spec.dataset.train", "traversal"),
    Case("dot-segment-uri", {"spec.output.uri": "s3://finetune-artifacts/./x/"}, "spec.output.uri", "traversal"),
    Case("bad-pvc-claim", {"spec.baseModel.uri": "pvc://Claim_Name/model"}, "spec.baseModel.uri", "invalid claim name"),
    Case("newline-in-uri", {"spec.dataset.train": "s3://healthcare-data/a\nrm.jsonl"}, "spec.dataset.train", "not allowed"),
    Case("trailing-newline-uri", {"spec.output.uri": "s3://finetune-artifacts/x\n"}, "spec.output.uri", "not allowed"),
    Case("oversized-uri", {"spec.dataset.train": "s3://healthcare-data/" + "a" * 2000}, "spec.dataset.train", "at most 1024"),
    Case("oversized-regex", {"spec.evaluation.formatRegex": "a" * 5000}, "spec.evaluation.formatRegex", "at most 1024"),
    Case("too-many-target-modules", {"spec.lora.targetModules": [f"m{i}" for i in range(100)]}, "spec.lora.targetModules", "at most 64"),
    Case("too-many-gates", {"spec.evaluation.gates": [{"metric": "accuracy", "min": 0.1}] * 20}, "spec.evaluation.gates", "at most 16"),
    Case("huge-gpus", {"spec.resources": {"gpus": 100000}}, "spec.resources.gpus", "must be <= 4096"),
    Case("negative-backoff", {"spec.backoffLimit": -1}, "spec.backoffLimit", "must be >= 0"),
    Case("year-long-deadline", {"spec.activeDeadlineSeconds": 10**9}, "spec.activeDeadlineSeconds", "<="),
    Case("bad-toleration-effect", {"spec.resources": {"tolerations": [{"key": "gpu", "effect": "Always"}]}}, "spec.resources.tolerations[0].effect", "must be one of"),
    Case("shell-priority-class", {"spec.resources": {"priorityClassName": "high; reboot"}}, "spec.resources.priorityClassName", "pattern"),
    Case("bad-gpu-resource-name", {"spec.resources": {"gpuResourceName": "gpu"}}, "spec.resources.gpuResourceName", "pattern"),
    Case("huge-seed", {"spec.hyperparameters.seed": 2**40}, "spec.hyperparameters.seed", "<="),
    Case("bool-epochs", {"spec.hyperparameters.epochs": "three"}, "spec.hyperparameters.epochs", "number"),
    Case("quant-bits-3", {"spec.method": "qlora", "spec.quantization": {"bits": 3}}, "spec.quantization.bits", "must be one of"),
    Case("format-schema-array", {"spec.evaluation.formatSchema": "[1, 2]"}, "spec.evaluation.formatSchema", "JSON object"),
    Case("invalid-rows-policy", {"spec.dataset.invalidRows": "ignore"}, "spec.dataset.invalidRows", "must be one of"),
    Case("unknown-top-level-field", {"spec.gpus": 4}, "spec.gpus", "unknown field; allowed fields: baseModel"),
    Case("missing-metadata-name", {"metadata": {"labels": {"a": "b"}}}, "metadata.name", "required"),
    Case("zero-keep", {"spec.checkpoint": {"keep": 0}}, "spec.checkpoint.keep", "must be >= 1"),
    # spec.pilot: a LoRA pilot before a full, prefix or prompt run.
    Case("pilot-on-lora", {"spec.pilot": {"gates": [LOSS_GATE]}}, "spec", "only valid with methods full, prefix and prompt"),
    Case("pilot-both-bounds", {"spec.method": "full", "spec.pilot": {"maxSteps": 10, "dataFraction": 0.1, "gates": [LOSS_GATE]}},
         "spec.pilot", "at most one of spec.pilot.maxSteps and spec.pilot.dataFraction"),
    Case("pilot-without-gates", {"spec.method": "full", "spec.pilot": {"maxSteps": 10}}, "spec.pilot.gates", "required"),
    Case("pilot-unknown-gate-metric", {"spec.method": "full", "spec.pilot": {"gates": [{"metric": "bleu", "min": 0.1}]}},
         "spec.pilot.gates[0].metric", "must be one of"),
    Case("pilot-gate-without-bounds", {"spec.method": "full", "spec.pilot": {"gates": [{"metric": "accuracy"}]}},
         "spec.pilot.gates[0]", "needs min or max"),
    Case("pilot-without-evaluation", {"spec.method": "full", "spec.evaluation.enabled": False,
                                      "spec.pilot": {"gates": [LOSS_GATE]}}, "spec", "checked on the evaluation"),
    Case("pilot-format-gate-without-format", {"spec.method": "full",
                                              "spec.pilot": {"gates": [{"metric": "formatCompliance", "min": 0.9}]}},
         "spec", "formatCompliance is only measured with spec.evaluation.formatSchema or formatRegex"),
    # spec.serving: vLLM and KServe load LoRA adapters and whole models, up to --max-lora-rank.
    Case("serving-with-prefix", {"spec.method": "prefix", "spec.hyperparameters.gradientCheckpointing": False,
                                 "spec.serving": {}}, "spec", "spec.serving cannot be used with method prefix"),
    Case("serving-with-prompt", {"spec.method": "prompt", "spec.serving": {}}, "spec",
         "spec.serving cannot be used with method prompt"),
    Case("serving-rank-above-max-rank", {"spec.lora.r": 64, "spec.serving": {"maxRank": 32}}, "spec",
         "spec.serving.maxRank 32 is below spec.lora.r 64"),
    Case("serving-default-rank-above-max-rank", {"spec.lora": DELETE, "spec.serving": {"maxRank": 8}}, "spec",
         "spec.serving.maxRank 8 is below spec.lora.r 16"),
    Case("serving-rank-above-vllm-largest", {"spec.lora.r": 1024, "spec.serving": {}}, "spec",
         "spec.lora.r 1024 is above 512"),
    Case("serving-max-rank-not-a-vllm-rank", {"spec.serving": {"maxRank": 48}}, "spec.serving.maxRank", "48"),
    # spec.tracking.mlflow: credentials only from its secretRef, never in the URI.
    Case("tracking-uri-with-credentials", {"spec.tracking": {"mlflow": {"trackingUri": "https://ci:hunter2@mlflow.example.com"}}},
         "spec.tracking.mlflow.trackingUri", "pattern"),
    Case("tracking-uri-with-token-query", {"spec.tracking": {"mlflow": {"trackingUri": "https://mlflow.example.com/?token=hunter2"}}},
         "spec.tracking.mlflow.trackingUri", "pattern"),
    Case("tracking-uri-not-http", {"spec.tracking": {"mlflow": {"trackingUri": "databricks"}}},
         "spec.tracking.mlflow.trackingUri", "pattern"),
    # spec.baseModel: a model's location or another FineTuneJob's result (a chained stage), exactly one.
    Case("uri-and-from-job", {"spec.baseModel.fromJob": "sft-stage"}, "spec.baseModel", "exactly one of uri"),
    Case("neither-uri-nor-from-job", {"spec.baseModel.uri": DELETE, "spec.baseModel.revision": DELETE},
         "spec.baseModel", "exactly one of uri"),
    Case("revision-with-from-job", {"spec.baseModel.uri": DELETE, "spec.baseModel.fromJob": "sft-stage"},
         "spec.baseModel", "revision applies to hf:// URIs"),
    Case("from-job-is-itself", {**FROM_JOB, "spec.baseModel.fromJob": "healthcare-assistant"}, "spec",
         "names this FineTuneJob itself"),
    Case("chained-serving-without-merged", {**FROM_JOB, "spec.serving": {}}, "spec",
         "spec.serving with spec.baseModel.fromJob needs spec.output.saveMerged: true"),
    Case("from-job-not-a-name", {**FROM_JOB, "spec.baseModel.fromJob": "SFT_stage"}, "spec.baseModel.fromJob",
         "pattern"),
    # spec.objective dpo: preference pairs, with full, lora and qlora, no packing, retrieval or pilot.
    Case("dpo-block-without-dpo-objective", {"spec.dpo": {"beta": 0.2}}, "spec",
         "spec.dpo is only valid with spec.objective dpo"),
    Case("dpo-with-prefix", {**DPO, "spec.method": "prefix", "spec.hyperparameters.gradientCheckpointing": False},
         "spec", "cannot be used with method prefix"),
    Case("dpo-with-prompt", {**DPO, "spec.method": "prompt"}, "spec", "cannot be used with method prompt"),
    Case("dpo-with-instruction-data", {**DPO, "spec.dataset.format": "instruction"}, "spec",
         "spec.dataset.format instruction cannot be used with spec.objective dpo"),
    Case("dpo-with-chat-data", {**DPO, "spec.dataset.format": "chat"}, "spec",
         "spec.dataset.format chat cannot be used with spec.objective dpo"),
    Case("dpo-with-text-data", {**DPO, "spec.dataset.format": "text"}, "spec",
         "spec.dataset.format text cannot be used with spec.objective dpo"),
    Case("preference-data-without-dpo", {"spec.dataset.format": "preference"}, "spec",
         "spec.dataset.format preference needs spec.objective dpo"),
    Case("dpo-with-packing", {**DPO, "spec.hyperparameters.packing": True}, "spec",
         "spec.hyperparameters.packing cannot be used with spec.objective dpo"),
    Case("dpo-with-retrieval", {**DPO, "spec.retrieval": {"corpus": "s3://healthcare-data/corpus/"}}, "spec",
         "spec.retrieval cannot be used with spec.objective dpo"),
    Case("dpo-with-pilot", {**DPO, "spec.method": "full", "spec.pilot": {"gates": [LOSS_GATE]}}, "spec",
         "spec.pilot cannot be used with spec.objective dpo"),
    Case("dpo-full-without-precomputed-reference", {**DPO, "spec.method": "full",
                                                    "spec.dpo": {"precomputeReference": "never"}}, "spec",
         "spec.dpo.precomputeReference never cannot be used with method full"),
    Case("dpo-unknown-loss", {**DPO, "spec.dpo": {"loss": "kto"}}, "spec.dpo.loss", "must be one of"),
    Case("dpo-zero-beta", {**DPO, "spec.dpo": {"beta": 0}}, "spec.dpo.beta", "must be > 0"),
    Case("unknown-objective", {"spec.objective": "orpo"}, "spec.objective", "must be one of"),
    Case("preference-gate-without-pairs", {"spec.evaluation.gates": [{"metric": "preferenceAccuracy", "min": 0.6}]},
         "spec", "preferenceAccuracy is measured on preference pairs"),
    Case("reward-margin-gate-without-pairs", {"spec.evaluation.gates": [LOSS_GATE, {"metric": "rewardMargin", "min": 0}]},
         "spec", "rewardMargin is measured on preference pairs"),
    Case("dpo-domain-gate-without-test-set", {**DPO, "spec.evaluation.testSet": DELETE,
                                              "spec.evaluation.gates": [{"metric": "hallucination", "max": 0.5}]},
         "spec", "measured on instruction test examples, which a dpo job has only with spec.evaluation.testSet"),
    Case("pilot-preference-gate", {"spec.method": "full", "spec.evaluation.preferenceTestSet": "s3://healthcare-data/p.jsonl",
                                   "spec.pilot": {"gates": [{"metric": "preferenceAccuracy", "min": 0.5}]}},
         "spec", "which the pilot (an sft LoRA run) is not scored on"),
    # spec.budget: a GPU-hours cap.
    Case("zero-budget", {"spec.budget": {"maxGpuHours": 0}}, "spec.budget.maxGpuHours", "must be > 0"),
    Case("budget-without-cap", {"spec.budget": {}}, "spec.budget.maxGpuHours", "required"),
]
