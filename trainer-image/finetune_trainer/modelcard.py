"""The model card (`README.md` next to the artifacts): Hugging Face style Markdown with YAML front matter.

It says what was trained from what, how (method, plan, hyperparameters), on which data (hashes live in
provenance.json), how it scored against the base model, and what it is not for. Pure: the same inputs
render the same text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import yaml

from finetune_operator.contract import TrainerConfig
from finetune_operator.spec import EvaluationStatus, ExportCheck
from finetune_trainer import charts, methods
from finetune_trainer.provenance import chain_card_lines

#: (Scores field, label, whether higher is better)
_METRICS = (
    ("accuracy", "accuracy", True),
    ("terminology", "terminology", True),
    ("hallucination", "hallucination (lower is better)", False),
    ("format_compliance", "format compliance", True),
    ("eval_loss", "eval loss (lower is better)", False),
    ("perplexity", "perplexity (lower is better)", False),
    ("preference_accuracy", "preference accuracy (held-out pairs)", True),
    ("reward_margin", "reward margin (held-out pairs)", True),
)


def _cell(value: Any) -> str:
    """A Markdown table cell: no pipes or newlines, numbers short."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        value = ", ".join(str(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _base_model_id(uri: str) -> str:
    """`hf://org/name` -> `org/name` (a hub id, as the card metadata expects); other URIs as they are."""
    return uri.removeprefix("hf://")


def _front_matter(config: TrainerConfig) -> str:
    spec = config.spec
    tags = ["finetune-operator", config.method, "text-generation"]
    if spec.dataset.format != "auto":
        tags.append(spec.dataset.format)
    meta = {
        "base_model": _base_model_id(spec.base_model.resolved_uri()),
        "library_name": "peft" if methods.get(config.method).adapter else "transformers",
        "pipeline_tag": "text-generation",
        "tags": tags,
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, default_flow_style=False) + "---\n"


def _score_rows(evaluation: EvaluationStatus, base_scores: Any, tuned_scores: Any) -> list[tuple[Any, ...]]:
    rows = []
    for field, label, higher_better in _METRICS:
        base, tuned = getattr(base_scores, field), getattr(tuned_scores, field)
        if base is None and tuned is None:
            continue
        if field == "accuracy" and evaluation.accuracy_metric:
            label = f"accuracy ({evaluation.accuracy_metric})"
        change = None
        if base is not None and tuned is not None and math.isfinite(base) and math.isfinite(tuned):
            delta = tuned - base
            change = f"{delta:+.4g}" + ("" if delta == 0 else " (better)" if (delta > 0) == higher_better else " (worse)")
        rows.append((label, base, tuned, change))
    return rows


def _evaluation_section(evaluation: EvaluationStatus | None) -> list[str]:
    if evaluation is None:
        return ["## Evaluation", "", "No evaluation was run (`spec.evaluation.enabled: false`, or training did "
                "not finish).", ""]
    rows = _score_rows(evaluation, evaluation.base, evaluation.tuned)
    generated = evaluation.base.accuracy is not None or evaluation.tuned.accuracy is not None
    intro = (f"Base model and fine-tuned model on the same {evaluation.examples} held-out test examples "
             "(greedy decoding)" + (", without retrieval (plain prompts)." if evaluation.with_retrieval else "."))
    if not generated and (evaluation.tuned.preference_pairs or evaluation.base.preference_pairs):
        intro = "Base model and fine-tuned model on the same held-out preference pairs (no test set to generate from)."
    lines = [
        "## Evaluation",
        "",
        intro,
        "",
        _table(("metric", "base", "fine-tuned", "change"), rows) if rows else "No scores were recorded.",
        "",
    ]
    if evaluation.with_retrieval is not None:
        rag = _score_rows(evaluation, evaluation.with_retrieval.base, evaluation.with_retrieval.tuned)
        lines += [
            "With retrieval: the same test examples, each prompt carrying its top-k passages from the corpus "
            "(the layout under Usage). Passages count as context: a term or number taken from them is not a "
            "hallucination.",
            "",
            _table(("metric (with retrieval)", "base", "fine-tuned", "change"), rag) if rag else "No scores.",
            "",
        ]
    pairs = evaluation.tuned.preference_pairs or evaluation.base.preference_pairs
    if pairs:
        lines += [
            f"Preference accuracy and reward margin: on {pairs} held-out preference pairs, the share of pairs whose "
            "chosen answer the model makes more likely than the rejected one, and the mean margin beta x (log "
            "p(chosen) - log p(rejected)) (summed over the answer tokens; reference-free, so base and fine-tuned "
            "are on one scale).",
            "",
        ]
    if evaluation.gates_passed is not None:
        if evaluation.gates_passed:
            lines += ["All quality gates passed.", ""]
        else:
            lines += ["Quality gates missed:", ""] + [f"- {g}" for g in evaluation.failed_gates] + [""]
    lines += [
        f"Accuracy ({evaluation.accuracy_metric or 'see evaluation.json'}) measures the token overlap of "
        "answers and references (longest common subsequence); terminology is the share of the "
        "references' domain terms the answers use; hallucination is the share of domain terms and numbers "
        "in the answers found in neither the question nor the reference.",
        "",
    ]
    return lines


def _chart(artifacts: Mapping[str, str], kind: str, file_name: str, alt: str) -> list[str]:
    """A picture written next to the card (charts.py), linked relatively: the link works on the Hugging Face hub
    and in a downloaded copy of the output alike."""
    return [f"![{alt}]({file_name})", ""] if kind in artifacts else []


def _export_section(export: ExportCheck | None) -> list[str]:
    """The export checks (finetune_trainer.export): logits of what was exported vs what was trained."""
    if export is None:
        return []
    rows: list[tuple[Any, ...]] = [("sample prompts", export.prompts)]
    if export.adapter_max_abs_diff is not None:
        rows.append(("saved adapter reloaded on the base vs the trained model: max abs logit difference",
                     f"{export.adapter_max_abs_diff:.3g}"))
    if export.merged_max_abs_diff is not None:
        rows.append(("merged/ vs the adapter on the base (both fp32): max abs logit difference",
                     f"{export.merged_max_abs_diff:.3g}"))
    if export.merged_check is not None:
        rows.append(("merged/ compared", export.merged_check))
    rows.append(("tolerance (max abs logit difference)", f"{export.tolerance:.3g}" if export.tolerance is not None else "-"))
    if export.merge_peak_bytes is not None:
        rows.append(("merge: peak memory of tensors held", f"{export.merge_peak_bytes / 2**20:.1f} MiB"))
    rows.append(("passed", export.passed))
    return ["## Export checks", "",
            "Max abs difference of the logits on sample prompts of the test set. The tolerance is the rounding "
            "of the coarsest dtype involved at the logits' scale, with a margin (16 roundings in bf16, 4096 in "
            "fp32); a wrong export differs by the adapter's whole effect.", "",
            _table(("check", "value"), rows), ""]


def _rung(rung: Any) -> str:
    return (f"{rung.micro_batch} x {rung.grad_accum}, gradient checkpointing "
            f"{'on' if rung.gradient_checkpointing else 'off'}")


def _adjustments_section(config: TrainerConfig) -> list[str]:
    """The out-of-memory adjustments (finetune_trainer/oom.py): the hyperparameters above are the last rung's."""
    if not config.adjustments:
        return []
    rows = [(a.step, a.by, _rung(a.from_), _rung(a.to), a.reason) for a in config.adjustments]
    return [
        "## Out-of-memory adjustments",
        "",
        "Training ran out of memory and continued with a smaller micro-batch (batch size per GPU x accumulation "
        "keeps the examples of every optimizer step, so the loss curve is that of a run started there); the "
        "hyperparameters above are the ones it finished with.",
        "",
        _table(("step", "by", "from (micro-batch x accumulation)", "to", "reason"), rows),
        "",
    ]


def _usage_section(config: TrainerConfig, artifacts: Mapping[str, str]) -> list[str]:
    """How to load the artifact: with peft on the base for adapters, with transformers for whole models."""
    method = methods.get(config.method)
    model_dir = "path/to/model"  # model/ downloaded from the artifacts
    if method.adapter:
        code = [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{_base_model_id(config.spec.base_model.resolved_uri())}")',
            f'model = PeftModel.from_pretrained(base, "{model_dir}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{model_dir}")',
        ]
    else:
        code = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{model_dir}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{model_dir}")',
        ]
    if config.spec.dataset.format == "chat":
        prompt = ('prompt = tokenizer.apply_chat_template([{"role": "user", "content": "..."}], '
                  'add_generation_prompt=True, tokenize=False)')
    elif config.spec.dataset.format == "text":
        prompt = 'prompt = "..."  # text in the style of the training data'
    else:  # the instruction layout the trainer trained on (dataset.PROMPT_NO_INPUT)
        prompt = 'prompt = "### Instruction:\\n...\\n\\n### Response:\\n"'
    where = f" (`{artifacts['model']}`)" if artifacts.get("model") else ""
    retrieval_lines: list[str] = []
    if config.spec.retrieval is not None:
        prompt, retrieval_lines = _retrieval_usage(config, artifacts)
    return ["## Usage", "", f"{method.usage_note} Download `model/`{where}, then:", "", "```python", *code,
            prompt, 'inputs = tokenizer(prompt, return_tensors="pt")',
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0], skip_special_tokens=True))",
            "```", "", *retrieval_lines]


def _retrieval_usage(config: TrainerConfig, artifacts: Mapping[str, str]) -> tuple[str, list[str]]:
    """The prompt line of the usage code with retrieval, and the layout the model was trained on (rendered
    by the trainer's own functions, so the card shows exactly what training and evaluation used)."""
    from finetune_trainer import retrieval as rag

    spec = config.spec.retrieval
    assert spec is not None
    where = f" (`{artifacts['retrieval']}`)" if artifacts.get("retrieval") else ""
    if config.spec.dataset.format == "chat":
        prompt = ('prompt = tokenizer.apply_chat_template([{"role": "system", "content": context_block(retriever.texts('
                  'retriever.search([question])[0])).rstrip()}, {"role": "user", "content": question}], '
                  'add_generation_prompt=True, tokenize=False)')
    else:
        prompt = ("prompt = render_instruction_prompt(instruction, input_text, retriever.texts("
                  "retriever.search([instruction + '\\n' + input_text])[0]))")
    example = rag.render_instruction_prompt("<instruction>", "<input>", ["<passage 1>", "<passage 2>"])
    lines = [
        f"This model was trained with retrieval augmentation (RAFT): every prompt carried up to {spec.top_k} "
        f"passages of at most {spec.chunk_tokens} tokens from `{spec.corpus}`, found by BM25 with the question; "
        f"{spec.distractor_share:.0%} of the training prompts carried unrelated (distractor) passages only. Serve it "
        f"with the same retriever: download `retrieval/`{where} (the index, the passages, retriever.json) and "
        "build prompts with the trainer's functions, before the code above:",
        "",
        "```python",
        "from pathlib import Path",
        "from finetune_trainer.retrieval import Retriever, context_block, render_instruction_prompt",
        "",
        'retriever = Retriever.load(Path("path/to/retrieval"))',
        'question = "..."' if config.spec.dataset.format == "chat" else 'instruction, input_text = "...", ""',
        "```",
        "",
        "The layout (instruction rows; chat rows get the same block as a system message):",
        "",
        "```text",
        *example.rstrip("\n").split("\n"),
        "```",
        "",
    ]
    return prompt, lines


def render_model_card(
    config: TrainerConfig,
    *,
    evaluation: EvaluationStatus | None,
    artifacts: Mapping[str, str],
    metrics_summary: Mapping[str, Any],
    export: ExportCheck | None = None,
) -> str:
    """The model card as Markdown (front matter, method and plan, data, hyperparameters, evaluation,
    artifacts, intended use and limitations)."""
    spec, plan = config.spec, config.plan
    hp = spec.hyperparameters
    method = methods.get(config.method)
    revision = f" (revision `{spec.base_model.revision}`)" if spec.base_model.revision else ""
    lines = [
        _front_matter(config),
        f"# {config.name}",
        "",
        f"Fine-tuned from `{spec.base_model.resolved_uri()}`{revision} with {method.title} by "
        f"finetune-operator (FineTuneJob `{config.namespace}/{config.name}`).",
        "",
        *chain_card_lines(config),  # a chained stage (spec.baseModel.fromJob): where it started from
        "## Method and plan",
        "",
    ]
    method_rows: list[tuple[Any, ...]] = [("method", config.method), *method.card_rows(spec),
                                          ("objective", spec.objective)]
    if spec.objective == "dpo":
        dpo = spec.resolved_dpo()
        reference = ("none (reference-free)" if dpo.reference_free else
                     "precomputed before training" if dpo.precomputes(config.method) else
                     "the base (adapter switched off)")
        method_rows += [("DPO loss / beta", f"{dpo.loss} / {dpo.beta:g}"), ("DPO reference", reference)]
    method_rows += [
        ("GPUs", f"{plan.gpus} x {plan.gpu_memory_gib} GiB on {plan.nodes} node(s)"),
        ("plan source", plan.source),
        ("plan reason", plan.reason),
    ]
    lines += [_table(("setting", "value"), method_rows), ""]

    data_rows: list[tuple[Any, ...]] = [("train", spec.dataset.train), ("format", spec.dataset.format)]
    if spec.dataset.validation:
        data_rows.append(("validation", spec.dataset.validation))
    if spec.dataset.validation_split:
        data_rows.append(("validation split", spec.dataset.validation_split))
    if spec.evaluation.test_set:
        data_rows.append(("test set", spec.evaluation.test_set))
    if spec.evaluation.preference_test_set:
        data_rows.append(("preference test set", spec.evaluation.preference_test_set))
    if spec.evaluation.glossary:
        data_rows.append(("glossary", spec.evaluation.glossary))
    provenance = artifacts.get("provenance")
    lines += [
        "## Data",
        "",
        _table(("input", "URI"), data_rows),
        "",
        f"The sha256 of every data file, the base model files and the resolved configuration are recorded "
        f"in the provenance record{f' (`{provenance}`)' if provenance else ''}.",
        "",
        "## Hyperparameters",
        "",
        _table(
            ("hyperparameter", "value"),
            [
                ("epochs", hp.epochs),
                ("max steps", hp.max_steps),
                ("learning rate", hp.learning_rate_for(config.method)),
                ("scheduler / warmup ratio", f"{hp.lr_scheduler} / {hp.warmup_ratio}"),
                ("batch size per GPU x accumulation", f"{hp.batch_size} x {hp.gradient_accumulation_steps}"),
                ("max sequence length", hp.max_seq_length),
                ("packing", hp.packing),
                ("precision", hp.precision),
                ("gradient checkpointing", config.gradient_checkpointing()),
                ("weight decay", hp.weight_decay),
                ("seed", hp.seed),
            ],
        ),
        "",
    ]
    lines += _adjustments_section(config)
    if metrics_summary or charts.LOSS_KIND in artifacts:
        lines += ["## Training", ""]
        if metrics_summary:
            lines += [_table(("metric", "value"), sorted(metrics_summary.items())), ""]
        lines += _chart(artifacts, charts.LOSS_KIND, charts.LOSS_FILE,
                        "Loss curve: training loss per step and eval loss at checkpoints")
    lines += _evaluation_section(evaluation)
    lines += _chart(artifacts, charts.EVALUATION_KIND, charts.EVALUATION_FILE,
                    "Evaluation: base vs fine-tuned scores")
    lines += _export_section(export)
    if artifacts:
        lines += ["## Artifacts", ""] + [f"- {kind}: `{uri}`" for kind, uri in sorted(artifacts.items())] + [""]
    lines += _usage_section(config, artifacts)
    lines += [
        "## Intended use and limitations",
        "",
        "- Intended for the domain and task of its training data, and for research and evaluation of that "
        "use; check its answers before relying on them.",
        "- The scores above come from a small automatic evaluation on held-out examples. They do not "
        "establish factual correctness, safety or fitness for any decision.",
        "- It can state wrong facts and numbers fluently (see the hallucination score), and it inherits the "
        "limitations, biases and license of the base model.",
        "- Not a medical, legal or financial device: in regulated domains a qualified professional must "
        "review every output.",
        "",
    ]
    return "\n".join(lines)

