"""The FineTuneJob CustomResourceDefinition, generated from the spec model.

`build_crd()` turns the pydantic JSON Schema of `FineTuneJobSpec` and `FineTuneJobStatus` into a
structural OpenAPI v3 schema (refs inlined, nullables dropped, defaults moved into the descriptions the
models already carry), then adds what only the API server can enforce: CEL rules for cross-field
constraints and for immutability after creation, printer columns, the status subresource, the short name
and categories. `crds/finetune.dev_finetunejobs.yaml` is this function's output (`make crd`); a test
fails when they drift.
"""

from __future__ import annotations

from typing import Any

import yaml

from finetune_operator import spec as api

# The spec fields that may change after creation; every other top-level field is immutable.
MUTABLE_SPEC_FIELDS = frozenset({"suspend"})

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase."},
    {"name": "Stage", "type": "string", "jsonPath": ".status.stage",
     "description": "With spec.pilot: Pilot while the LoRA pilot runs, Main after it passed."},
    {"name": "Method", "type": "string", "jsonPath": ".status.plan.method", "description": "Resolved training method."},
    {"name": "Model", "type": "string", "jsonPath": ".spec.baseModel.uri", "description": "Base model."},
    {"name": "From", "type": "string", "jsonPath": ".spec.baseModel.fromJob", "priority": 1,
     "description": "The FineTuneJob this one starts from (spec.baseModel.fromJob)."},
    {"name": "GPUs", "type": "integer", "jsonPath": ".status.plan.gpus", "description": "Planned GPUs."},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary", "description": "Training progress."},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss", "description": "Latest training loss."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

_DROP = {"title", "default", "examples"}


class _Converter:
    def __init__(self, defs: dict[str, Any]):
        self.defs = defs

    def convert(self, schema: dict[str, Any]) -> dict[str, Any]:
        schema = dict(schema)
        description = schema.pop("description", None)
        if "$ref" in schema:
            target = self.defs[schema.pop("$ref").rsplit("/", 1)[-1]]
            out = self.convert(target)
        elif "anyOf" in schema:
            options = [o for o in schema.pop("anyOf") if o.get("type") != "null"]
            if len(options) == 1:
                out = self.convert(options[0])
            elif {o.get("type") for o in options} <= {"integer", "string"}:
                out = {"x-kubernetes-int-or-string": True}
            else:
                raise ValueError(f"cannot express anyOf {options} structurally")
        else:
            out = self._plain(schema)
        if description:
            out["description"] = " ".join(description.split())
        return out

    def _plain(self, schema: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        kind = schema.get("type")
        if "const" in schema:
            out["enum"] = [schema["const"]]
            kind = kind or type_of(schema["const"])
        if kind:
            out["type"] = kind
        for key in ("enum", "pattern", "maxLength", "minLength", "maxItems", "minItems", "maxProperties", "format"):
            if key in schema:
                out[key] = schema[key]
        # OpenAPI v3.0 (Kubernetes) spells exclusive bounds as booleans next to minimum/maximum.
        for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
            if exclusive in schema:
                out[bound] = schema[exclusive]
                out[exclusive] = True
            elif bound in schema:
                out[bound] = schema[bound]
        if kind == "object":
            props = schema.get("properties")
            if props:
                out["properties"] = {name: self.convert(p) for name, p in props.items()}
                if schema.get("required"):
                    out["required"] = list(schema["required"])
            extra = schema.get("additionalProperties")
            patterns = schema.get("patternProperties")
            if patterns:
                # Structural schemas have no patternProperties: values via additionalProperties, keys via CEL.
                (key_pattern, value_schema), *more = patterns.items()
                if more:
                    raise ValueError("only one key pattern per map is supported")
                out["additionalProperties"] = self.convert(value_schema)
                out["x-kubernetes-validations"] = [
                    _rule(f"self.all(k, k.matches(r'{key_pattern}'))", f"every key must match {key_pattern}")
                ]
            elif isinstance(extra, dict) and extra:
                out["additionalProperties"] = self.convert(extra)
            elif not props and extra in (None, True, {}):
                out["x-kubernetes-preserve-unknown-fields"] = True
        if kind == "array":
            out["items"] = self.convert(schema["items"])
        for key in _DROP:
            out.pop(key, None)
        return out


def type_of(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string"


def model_schema(model: type[api._Model]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation", ref_template="#/$defs/{model}")
    defs = raw.pop("$defs", {})
    return _Converter(defs).convert(raw)


def _rule(rule: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"rule": rule, "message": message, **extra}


def _add_rules(spec_schema: dict[str, Any]) -> None:
    props = spec_schema["properties"]
    spec_rules = [
        _rule(
            "!has(self.quantization) || (has(self.method) && self.method == 'qlora')",
            "spec.quantization is only valid with method: qlora",
            fieldPath=".quantization",
            reason="FieldValueForbidden",
        ),
    ]
    for block in api.VIRTUAL_TOKEN_METHODS:
        spec_rules.append(_rule(
            f"!has(self.{block}) || (has(self.method) && self.method == '{block}')",
            f"spec.{block} is only valid with method: {block}",
            fieldPath=f".{block}",
            reason="FieldValueForbidden",
        ))
    virtual = "has(self.method) && (self.method == 'prefix' || self.method == 'prompt')"
    spec_rules += [
        _rule(
            f"!({virtual}) || !has(self.hyperparameters) || !has(self.hyperparameters.packing) "
            "|| !self.hyperparameters.packing",
            "spec.hyperparameters.packing cannot be used with methods prefix and prompt (virtual tokens break "
            "the per-example attention of packed rows); set packing: false",
            fieldPath=".hyperparameters.packing",
            reason="FieldValueForbidden",
        ),
        _rule(
            "!(has(self.method) && self.method == 'prefix') || !has(self.hyperparameters) "
            "|| !has(self.hyperparameters.gradientCheckpointing) || !self.hyperparameters.gradientCheckpointing",
            "spec.hyperparameters.gradientCheckpointing cannot be used with method prefix; set it to false "
            "(the default for prefix)",
            fieldPath=".hyperparameters.gradientCheckpointing",
            reason="FieldValueForbidden",
        ),
        _rule(
            f"!({virtual}) || !has(self.output.saveMerged) || !self.output.saveMerged",
            "spec.output.saveMerged cannot be used with methods prefix and prompt (nothing to merge); "
            "set saveMerged: false",
            fieldPath=".output.saveMerged",
            reason="FieldValueForbidden",
        ),
    ]
    methods = ", ".join(f"'{m}'" for m in api.PILOT_METHODS)
    spec_rules += [
        _rule(
            f"!has(self.pilot) || (has(self.method) && self.method in [{methods}])",
            "spec.pilot is only valid with methods full, prefix and prompt: the pilot is a short LoRA run, and "
            "lora, qlora and auto already are one; remove pilot, or bound the run with hyperparameters.maxSteps",
            fieldPath=".pilot",
            reason="FieldValueForbidden",
        ),
        _rule(
            "!has(self.pilot) || !has(self.evaluation) || !has(self.evaluation.enabled) || self.evaluation.enabled",
            "spec.pilot.gates are checked on the evaluation; set spec.evaluation.enabled: true or remove pilot",
            fieldPath=".pilot",
            reason="FieldValueForbidden",
        ),
        _rule(
            "!has(self.pilot) || self.pilot.gates.all(g, g.metric != 'formatCompliance') || (has(self.evaluation) "
            "&& (has(self.evaluation.formatSchema) || has(self.evaluation.formatRegex)))",
            "spec.pilot.gates: formatCompliance is only measured with spec.evaluation.formatSchema or formatRegex",
            fieldPath=".pilot.gates",
            reason="FieldValueForbidden",
        ),
    ]
    spec_rules += _retrieval_rules()
    spec_rules += _serving_rules()
    spec_rules += _objective_rules()
    for name in props:
        if name in MUTABLE_SPEC_FIELDS:
            continue
        spec_rules.append(
            _rule(
                f"has(self.{name}) == has(oldSelf.{name}) && (!has(self.{name}) || self.{name} == oldSelf.{name})",
                f"spec.{name} is immutable after creation; only spec.suspend may change. "
                "Create a new FineTuneJob to change it.",
                fieldPath=f".{name}",
                reason="FieldValueForbidden",
            )
        )
    spec_schema["x-kubernetes-validations"] = spec_rules
    props["dataset"]["x-kubernetes-validations"] = [
        _rule(
            "!(has(self.validation) && has(self.validationSplit))",
            "set at most one of spec.dataset.validation and spec.dataset.validationSplit",
        )
    ]
    props["baseModel"]["x-kubernetes-validations"] = _base_model_rules()
    props["prompt"]["x-kubernetes-validations"] = [
        _rule("!has(self.init) || self.init != 'text' || has(self.initText)",
              "spec.prompt.initText is required with init: text"),
        _rule("!has(self.initText) || (has(self.init) && self.init == 'text')",
              "spec.prompt.initText is only used with init: text"),
    ]
    for gate in (props["evaluation"]["properties"]["gates"]["items"], props["pilot"]["properties"]["gates"]["items"]):
        gate["x-kubernetes-validations"] = [
            _rule("has(self.min) || has(self.max) || has(self.minImprovement)",
                  "a gate needs min or max (or minImprovement)"),
            _rule("!has(self.min) || !has(self.max) || self.min <= self.max", "a gate's min must not exceed its max"),
        ]
    props["pilot"]["x-kubernetes-validations"] = [
        _rule("!(has(self.maxSteps) && has(self.dataFraction))",
              "set at most one of spec.pilot.maxSteps and spec.pilot.dataFraction"),
    ]


def _base_model_rules() -> list[dict[str, Any]]:
    """spec.baseModel's rules (the spec model's `BaseModelSpec._one_source`): one source, and revision only with a
    URI. That fromJob does not name the job itself is a rule at the root, the one node that sees metadata.name."""
    return [
        _rule(
            "has(self.uri) != has(self.fromJob)",
            "spec.baseModel needs exactly one of uri (a model's location) and fromJob (another FineTuneJob's "
            "result); set one and remove the other",
        ),
        _rule(
            "!has(self.fromJob) || !has(self.revision)",
            "spec.baseModel.revision applies to hf:// URIs, not to fromJob (the base job's result is fixed when it "
            "succeeds); remove revision",
            fieldPath=".revision",
            reason="FieldValueForbidden",
        ),
    ]


def _objective_rules() -> list[dict[str, Any]]:
    """spec.objective's cross-field rules (the spec model's `_objective_limits`). The CRD carries no defaults: an
    unset objective is sft, an unset method auto (lora or qlora), an unset format auto, unset packing false."""
    dpo = "(has(self.objective) && self.objective == 'dpo')"
    methods = ", ".join(f"'{m}'" for m in api.DPO_METHODS)
    preference_metrics = ", ".join(f"'{m}'" for m in api.PREFERENCE_METRICS)
    return [
        _rule(
            f"!has(self.dpo) || {dpo}",
            "spec.dpo is only valid with spec.objective dpo; set objective: dpo or remove dpo",
            fieldPath=".dpo",
            reason="FieldValueForbidden",
        ),
        _rule(
            f"!{dpo} || !has(self.method) || self.method in [{methods}]",
            "spec.objective dpo cannot be used with methods prefix and prompt: virtual tokens have no adapter to "
            "switch off for the reference; use method lora, qlora or full",
            fieldPath=".method",
            reason="FieldValueForbidden",
        ),
        _rule(
            f"!{dpo} || !has(self.dataset.format) || self.dataset.format in ['auto', 'preference']",
            "spec.dataset.format instruction, chat and text cannot be used with spec.objective dpo: DPO trains on "
            "preference pairs; set format: preference (or auto) and give pairs",
            fieldPath=".dataset.format",
            reason="FieldValueForbidden",
        ),
        _rule(
            f"{dpo} || !has(self.dataset.format) || self.dataset.format != 'preference'",
            "spec.dataset.format preference needs spec.objective dpo (pairs have no single answer to train on); "
            "set objective: dpo, or give instruction, chat or text data",
            fieldPath=".dataset.format",
            reason="FieldValueForbidden",
        ),
        _rule(
            f"!{dpo} || !has(self.hyperparameters) || !has(self.hyperparameters.packing) "
            "|| !self.hyperparameters.packing",
            "spec.hyperparameters.packing cannot be used with spec.objective dpo: the two sequences of a pair are "
            "compared with each other and are never packed; set packing: false",
            fieldPath=".hyperparameters.packing",
            reason="FieldValueForbidden",
        ),
        _rule(
            f"!{dpo} || !has(self.retrieval)",
            "spec.retrieval cannot be used with spec.objective dpo; train with retrieval in an sft stage and chain "
            "the dpo stage to it (spec.baseModel.fromJob)",
            fieldPath=".retrieval",
            reason="FieldValueForbidden",
        ),
        _rule(
            f"!{dpo} || !has(self.pilot)",
            "spec.pilot cannot be used with spec.objective dpo (the pilot is an sft LoRA run); remove pilot, or run "
            "an sft stage first and chain this job to it",
            fieldPath=".pilot",
            reason="FieldValueForbidden",
        ),
        _rule(
            f"!{dpo} || !has(self.method) || self.method != 'full' || !has(self.dpo) "
            "|| !has(self.dpo.precomputeReference) || self.dpo.precomputeReference != 'never' "
            "|| (has(self.dpo.referenceFree) && self.dpo.referenceFree)",
            "spec.dpo.precomputeReference never cannot be used with method full: the reference would be a second "
            "copy of the weights; set precomputeReference: auto",
            fieldPath=".dpo.precomputeReference",
            reason="FieldValueForbidden",
        ),
        _rule(
            f"{dpo} || !has(self.evaluation) || has(self.evaluation.preferenceTestSet) "
            f"|| !has(self.evaluation.gates) || self.evaluation.gates.all(g, !(g.metric in [{preference_metrics}]))",
            "spec.evaluation.gates preferenceAccuracy and rewardMargin are measured on preference pairs: set "
            "spec.objective dpo or spec.evaluation.preferenceTestSet, or gate another metric",
            fieldPath=".evaluation.gates",
            reason="FieldValueForbidden",
        ),
        _rule(
            f"!{dpo} || !has(self.evaluation) || has(self.evaluation.testSet) || !has(self.evaluation.gates) "
            f"|| self.evaluation.gates.all(g, g.metric in [{preference_metrics}])",
            api.DPO_DOMAIN_GATE_MESSAGE,
            fieldPath=".evaluation.gates",
            reason="FieldValueForbidden",
        ),
        _rule(
            f"!has(self.pilot) || !has(self.pilot.gates) || self.pilot.gates.all(g, !(g.metric in [{preference_metrics}]))",
            "spec.pilot.gates preferenceAccuracy and rewardMargin are measured on preference pairs, which the pilot "
            "(an sft LoRA run) is not scored on; gate the pilot on another metric",
            fieldPath=".pilot.gates",
            reason="FieldValueForbidden",
        ),
    ]


CHAINED_SERVING_MESSAGE = api.CHAINED_SERVING_MESSAGE


def _serving_rules() -> list[dict[str, Any]]:
    """spec.serving's cross-field rules (the spec model's `_serving_limits`). The CRD carries no defaults: an unset
    method is `auto` (lora or qlora, never virtual tokens) and an unset lora.r is its default."""
    rank = api.LoraSpec.model_fields["r"].default
    lora_r = f"(has(self.lora) && has(self.lora.r) ? self.lora.r : {rank})"
    virtual = ", ".join(f"'{m}'" for m in api.VIRTUAL_TOKEN_METHODS)
    return [
        _rule(
            "!has(self.serving) || !has(self.baseModel.fromJob) || (has(self.method) && self.method == 'full') "
            "|| (has(self.output.saveMerged) && self.output.saveMerged)",
            CHAINED_SERVING_MESSAGE,
            fieldPath=".output.saveMerged",
            reason="FieldValueRequired",
        ),
        _rule(
            f"!has(self.serving) || !has(self.method) || !(self.method in [{virtual}])",
            "spec.serving cannot be used with methods prefix and prompt: vLLM and KServe load LoRA adapters or "
            "whole models, not virtual tokens, and virtual tokens cannot be merged into the weights; use method "
            "lora or qlora, or remove serving",
            fieldPath=".serving",
            reason="FieldValueForbidden",
        ),
        _rule(
            "!has(self.serving) || !has(self.serving.maxRank) || (has(self.method) && self.method == 'full') "
            f"|| {lora_r} <= self.serving.maxRank",
            f"spec.serving.maxRank must be at least spec.lora.r (default {rank}): vLLM refuses adapters of a higher "
            "rank than --max-lora-rank; raise serving.maxRank, lower lora.r, or leave maxRank unset (the smallest "
            "rank vLLM accepts that fits)",
            fieldPath=".serving.maxRank",
            reason="FieldValueInvalid",
        ),
        _rule(
            f"!has(self.serving) || (has(self.method) && self.method == 'full') || {lora_r} <= {api.VLLM_MAX_LORA_RANKS[-1]}",
            f"spec.lora.r above {api.VLLM_MAX_LORA_RANKS[-1]}, the largest --max-lora-rank vLLM accepts, cannot be "
            "served as an adapter: lower lora.r, or set spec.output.saveMerged: true and serve the merged model",
            fieldPath=".lora.r",
            reason="FieldValueInvalid",
        ),
    ]


def _retrieval_rules() -> list[dict[str, Any]]:
    """spec.retrieval's cross-field rules (the spec model's `_retrieval_limits`), with the model's defaults
    spelled out: the CRD carries no defaults, so an unset field is read as its documented default."""
    top_k = f"(has(self.retrieval.topK) ? self.retrieval.topK : {api.DEFAULT_TOP_K})"
    chunk = f"(has(self.retrieval.chunkTokens) ? self.retrieval.chunkTokens : {api.DEFAULT_CHUNK_TOKENS})"
    longest = api.Hyperparameters.model_fields["max_seq_length"].default
    seq = (f"(has(self.hyperparameters) && has(self.hyperparameters.maxSeqLength) ? "
           f"self.hyperparameters.maxSeqLength : {longest})")
    return [
        _rule(
            "!has(self.retrieval) || !has(self.dataset.format) || self.dataset.format != 'text'",
            "spec.retrieval cannot be used with spec.dataset.format text (text rows have no question to retrieve "
            "passages for); use format instruction or chat, or remove retrieval",
            fieldPath=".retrieval",
            reason="FieldValueForbidden",
        ),
        _rule(
            f"!has(self.retrieval) || {top_k} * {chunk} < {seq}",
            "spec.retrieval.chunkTokens: topK x chunkTokens must stay below spec.hyperparameters.maxSeqLength "
            "(room for the question and answer); lower chunkTokens or topK, or raise maxSeqLength",
            fieldPath=".retrieval.chunkTokens",
            reason="FieldValueInvalid",
        ),
    ]


def build_schema() -> dict[str, Any]:
    spec_schema = model_schema(api.FineTuneJobSpec)
    _add_rules(spec_schema)
    status_schema = model_schema(api.FineTuneJobStatus)
    return {
        "type": "object",
        "description": "FineTuneJob turns a base model, a dataset and an output location into a sized, "
        "distributed, resumable fine-tuning run whose artifacts land in S3.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": "Versioned schema of this object: finetune.dev/v1alpha1.",
            },
            "kind": {"type": "string", "description": "FineTuneJob."},
            # The API server refuses anything under `metadata` but `type: object` (and name/generateName
            # constraints): "must not specify anything other than name and generateName". The name rules
            # live in the CEL validations below instead.
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
        "x-kubernetes-validations": [
            _rule(
                f"self.metadata.name.size() <= {api.MAX_NAME_LENGTH}",
                f"metadata.name must be at most {api.MAX_NAME_LENGTH} characters, so child names fit 63",
            ),
            _rule(
                f"self.metadata.name.matches('{api.NAME_PATTERN}')",
                "metadata.name must be a DNS label starting with a letter (it names a Service)",
            ),
            # At the root: the one node whose `self` sees both metadata.name and the spec.
            _rule(
                "!has(self.spec) || !has(self.spec.baseModel) || !has(self.spec.baseModel.fromJob) "
                "|| self.spec.baseModel.fromJob != self.metadata.name",
                "spec.baseModel.fromJob names this FineTuneJob itself; a job cannot start from its own result: "
                "name the earlier stage's FineTuneJob",
                fieldPath=".spec.baseModel.fromJob",
                reason="FieldValueInvalid",
            ),
        ],
    }


def crd_object(kind: str, plural: str, singular: str, short_names: list[str], scope: str,
               schema: dict[str, Any], printer_columns: list[dict[str, Any]], *,
               status: bool = False) -> dict[str, Any]:
    """A CustomResourceDefinition of this project's group and version (`status`: with the status subresource)."""
    version: dict[str, Any] = {"name": api.VERSION, "served": True, "storage": True}
    if status:
        version["subresources"] = {"status": {}}
    version["additionalPrinterColumns"] = printer_columns
    version["schema"] = {"openAPIV3Schema": schema}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "finetune-operator", "app.kubernetes.io/part-of": "finetune-operator"},
        },
        "spec": {
            "group": api.GROUP,
            "scope": scope,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": list(short_names),
                "categories": list(api.CATEGORIES),
            },
            "versions": [version],
        },
    }


def build_crd() -> dict[str, Any]:
    """The whole CRD object."""
    return crd_object(api.KIND, api.PLURAL, api.SINGULAR, list(api.SHORT_NAMES), "Namespaced", build_schema(),
                      PRINTER_COLUMNS, status=True)


HEADER = "# Generated from finetune_operator.spec by `make crd` (finetune crd). Do not edit by hand.\n"


def crd_yaml() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=120)
