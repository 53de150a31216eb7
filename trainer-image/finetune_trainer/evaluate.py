"""The domain evaluation: generate answers to held-out prompts and score them against the references.

Scores (all in 0..1, pooled over the test set):

* **accuracy** (`ACCURACY_METRIC` = "rougeL-f1"): mean ROUGE-L F1 between answer and reference, computed
  here on normalized tokens: lowercased runs of letters and digits, with decimal numbers and codes such as
  `6.25` or `E11.9` kept as one token; no stemming. Two empty texts score 1, one empty text 0.
* **terminology**: of the domain terms that occur in the references, the share the answers also use.
* **hallucination** (lower is better): of the domain terms and numbers in the answers, the share that occur
  in neither the example's context (instruction + input) nor its reference.
* **format compliance**: the share of answers (surrounding whitespace stripped) that parse as JSON and
  validate against `format_schema`, and/or fully match `format_regex`; None when neither is given.

Domain terms come from the glossary when there is one: a term occurs in a text when its normalized tokens
occur there contiguously (`ICD-10-CM` matches "icd 10 cm"). Without a glossary, a word (split on
whitespace, surrounding punctuation removed) is a domain term when it contains a digit (doses, values,
codes), has two or more capital letters (acronyms such as BID, HbA1c), or is capitalized but not the first
word of a sentence (names); such a term is supported when the same word occurs in the context or reference.

terminology and hallucination are None when there is nothing to count (no terms in any reference, no terms
or numbers in any answer).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_operator.spec import EvaluationSpec, EvaluationStatus, Gate, Scores
from finetune_trainer.errors import DataError

ACCURACY_METRIC = "rougeL-f1"

_TOKEN = re.compile(r"[a-z0-9]+(?:\.[0-9]+)*")
_NUMBER = re.compile(r"(?<![A-Za-z0-9.])\d+(?:\.\d+)?")
_STRIP = "\"'.,;:!?()[]{}<>"
_SENTENCE_END = (".", "!", "?", ":")


@dataclass(frozen=True)
class EvalExample:
    """One test example, already formatted: the exact prompt text, the reference answer, and the context
    (instruction + input) that answers may draw facts from."""

    prompt: str
    reference: str
    context: str


# -------------------------------------------------------------------------------------------------
# Text helpers
# -------------------------------------------------------------------------------------------------


def tokens(text: str) -> list[str]:
    """Normalized tokens for ROUGE-L and glossary matching."""
    return _TOKEN.findall(text.lower())


def rouge_l_f1(answer: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence) on normalized tokens."""
    cand, ref = tokens(answer), tokens(reference)
    if not cand and not ref:
        return 1.0
    if not cand or not ref:
        return 0.0
    lcs = _lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


class _Glossary:
    """Glossary terms as normalized token phrases."""

    def __init__(self, terms: Sequence[str]):
        phrases = {" ".join(tokens(term)) for term in terms}
        self.phrases = sorted(p for p in phrases if p)

    def found_in(self, text: str) -> set[str]:
        padded = f" {' '.join(tokens(text))} "
        return {p for p in self.phrases if f" {p} " in padded}


def _words(text: str) -> list[tuple[str, bool]]:
    """Whitespace words with surrounding punctuation removed, each with whether it starts a sentence."""
    words = []
    for line in text.splitlines():
        sentence_start = True  # a new line starts a sentence too
        for raw in line.split():
            word = raw.strip(_STRIP)
            if word:
                words.append((word, sentence_start))
            sentence_start = raw.endswith(_SENTENCE_END)
    return words


def technical_terms(text: str) -> set[str]:
    """Domain terms of a text without a glossary (the rule in the module docstring), lowercased."""
    found = set()
    for word, starts_sentence in _words(text):
        upper = sum(c.isupper() for c in word)
        if any(c.isdigit() for c in word) or upper >= 2 or (word[0].isupper() and not starts_sentence):
            found.add(word.lower())
    return found


def _numbers(text: str) -> set[float]:
    return {float(n) for n in _NUMBER.findall(text)}


# -------------------------------------------------------------------------------------------------
# Scoring
# -------------------------------------------------------------------------------------------------


def _format_ok(answer: str, schema: dict[str, Any] | None, pattern: re.Pattern[str] | None) -> bool:
    text = answer.strip()
    if pattern is not None and not pattern.fullmatch(text):
        return False
    if schema is not None:
        import jsonschema

        try:
            jsonschema.validate(json.loads(text), schema)
        except (json.JSONDecodeError, jsonschema.ValidationError):
            return False
    return True


def score_details(
    examples: Sequence[EvalExample],
    answers: Sequence[str],
    *,
    glossary: Sequence[str] | None = None,
    format_schema: dict[str, Any] | None = None,
    format_regex: str | None = None,
) -> tuple[Scores, list[dict[str, Any]]]:
    """Scores plus one record per example (answer, rougeL, terms used, missed and unsupported)."""
    if len(examples) != len(answers):
        raise ValueError(f"{len(examples)} examples but {len(answers)} answers")
    if format_schema is not None:
        import jsonschema

        jsonschema.validators.validator_for(format_schema).check_schema(format_schema)
    pattern = re.compile(format_regex) if format_regex is not None else None
    vocab = _Glossary(glossary) if glossary else None

    rouge_sum = 0.0
    ref_terms_total = ref_terms_used = 0
    answer_items_total = answer_items_unsupported = 0
    formatted = 0
    details = []
    for example, answer in zip(examples, answers, strict=True):
        rouge = rouge_l_f1(answer, example.reference)
        rouge_sum += rouge
        support = f"{example.context}\n{example.reference}"
        if vocab is not None:
            ref_terms = vocab.found_in(example.reference)
            answer_terms = vocab.found_in(answer)
            supported_terms = vocab.found_in(support)
            support_numbers = _numbers(support)
            unsupported = sorted(answer_terms - supported_terms)
            unsupported += sorted(n for n in set(_NUMBER.findall(answer)) if float(n) not in support_numbers)
            items = len(answer_terms) + len(set(_NUMBER.findall(answer)))
        else:
            ref_terms = technical_terms(example.reference)
            answer_terms = technical_terms(answer)
            support_words = {w.lower() for w, _ in _words(support)}
            unsupported = sorted(answer_terms - support_words)
            items = len(answer_terms)
        used = ref_terms & answer_terms
        ref_terms_total += len(ref_terms)
        ref_terms_used += len(used)
        answer_items_total += items
        answer_items_unsupported += len(unsupported)
        ok = _format_ok(answer, format_schema, pattern) if (format_schema is not None or pattern is not None) else None
        formatted += bool(ok)
        details.append(
            {
                "answer": answer,
                "reference": example.reference,
                "rougeL": round(rouge, 6),
                "termsUsed": sorted(used),
                "termsMissed": sorted(ref_terms - answer_terms),
                "unsupported": unsupported,
                "formatOk": ok,
            }
        )

    count = len(examples)
    scores = Scores(
        accuracy=rouge_sum / count if count else None,
        terminology=ref_terms_used / ref_terms_total if ref_terms_total else None,
        hallucination=answer_items_unsupported / answer_items_total if answer_items_total else None,
        format_compliance=(formatted / count if count else None)
        if (format_schema is not None or pattern is not None)
        else None,
    )
    return scores, details


def score(
    examples: Sequence[EvalExample],
    answers: Sequence[str],
    *,
    glossary: Sequence[str] | None = None,
    format_schema: dict[str, Any] | None = None,
    format_regex: str | None = None,
) -> Scores:
    """Accuracy, terminology, hallucination and format compliance of `answers` (see the module docstring)."""
    scores, _ = score_details(
        examples, answers, glossary=glossary, format_schema=format_schema, format_regex=format_regex
    )
    return scores


def perplexity_from_loss(loss: float) -> float:
    """exp(mean token loss); inf when it overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


# -------------------------------------------------------------------------------------------------
# Generation
# -------------------------------------------------------------------------------------------------


def generate_answers(
    model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 8
) -> list[str]:
    """Greedy answers to `prompts`, in order. Left padding, no sampling: the same model gives the same
    answers. Works on plain, peft and 4-bit models. The special tokens (BOS) are added by the tokenizer
    only when the prompts do not already start with the BOS text (chat templates often include it)."""
    import torch
    from transformers import GenerationConfig

    if not prompts:
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        use_cache=True,
    )
    bos = tokenizer.bos_token
    add_special = not (bos and all(p.startswith(bos) for p in prompts))
    lengths = [len(tokenizer(p, add_special_tokens=add_special).input_ids) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))  # less padding per batch
    device = _input_device(model)

    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    was_training = model.training
    answers: dict[int, str] = {}
    try:
        tokenizer.padding_side = "left"  # generation continues from the last position of every row
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.eval()
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            batch = tokenizer(
                [prompts[i] for i in index], return_tensors="pt", padding=True, add_special_tokens=add_special
            ).to(device)
            with torch.no_grad():
                out = model.generate(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], generation_config=config
                )
            new = out[:, batch["input_ids"].shape[1]:]
            for i, text in zip(index, tokenizer.batch_decode(new, skip_special_tokens=True), strict=True):
                answers[i] = text.strip()
    finally:
        tokenizer.padding_side = old_side
        if old_pad is None:
            tokenizer.pad_token = None
        model.train(was_training)
    return [answers[i] for i in range(len(prompts))]


def _input_device(model: Any) -> Any:
    embeddings = model.get_input_embeddings()
    return embeddings.weight.device


def evaluate_model(
    model: Any,
    tokenizer: Any,
    examples: Sequence[EvalExample],
    spec: EvaluationSpec,
    glossary: Sequence[str] | None,
    *,
    batch_size: int = 8,
) -> Scores:
    """Generate answers for the first `spec.max_examples` examples and score them."""
    chosen = list(examples)[: spec.max_examples]
    answers = generate_answers(
        model, tokenizer, [e.prompt for e in chosen], max_new_tokens=spec.max_new_tokens, batch_size=batch_size
    )
    return score(chosen, answers, glossary=glossary, format_schema=spec.format_schema, format_regex=spec.format_regex)


# -------------------------------------------------------------------------------------------------
# Comparison and gates
# -------------------------------------------------------------------------------------------------


def _snake(metric: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), metric)


def _fmt(value: float) -> str:
    if value != 0 and abs(value) < 0.01:
        return f"{value:.3g}"
    text = f"{value:.4f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


#: Scores where lower is better: a gate's minImprovement asks them to fall, the others to rise.
LOWER_IS_BETTER = frozenset({"evalLoss", "perplexity", "hallucination"})
#: Higher is better, but the score is signed (not a share or a loss): minImprovement is a rise by that fraction
#: of the base's magnitude (`_improvement_miss`). preferenceAccuracy (a share) is compared like accuracy.
SIGNED = frozenset({"rewardMargin"})


def check_gates(tuned: Scores, gates: Sequence[Gate], base: Scores | None = None) -> list[str]:
    """One message per missed gate, naming the metric, its value and the threshold (`minImprovement`: against
    the base model's score in `base`)."""
    failures = []
    for gate in gates:
        value = getattr(tuned, _snake(gate.metric))
        bounds = [f"{name} {_fmt(limit)}" for name, limit in (("min", gate.min), ("max", gate.max),
                                                              ("minImprovement", gate.min_improvement))
                  if limit is not None]
        if value is None:
            failures.append(f"{gate.metric} was not measured (gate: {', '.join(bounds)})")
            continue
        if gate.min is not None and value < gate.min:
            failures.append(f"{gate.metric} {_fmt(value)} < min {_fmt(gate.min)}")
        if gate.max is not None and value > gate.max:
            failures.append(f"{gate.metric} {_fmt(value)} > max {_fmt(gate.max)}")
        if gate.min_improvement is not None:
            failures += _improvement_miss(gate.metric, value, getattr(base, _snake(gate.metric)) if base else None,
                                          gate.min_improvement)
    return failures


def _improvement_miss(metric: str, value: float, before: float | None, fraction: float) -> list[str]:
    """[] when `value` improved on the base's `before` by at least `fraction` of it, else the miss."""
    if before is None:
        return [f"{metric}: the base model's score was not measured (gate: minImprovement {_fmt(fraction)})"]
    if metric in LOWER_IS_BETTER:
        limit = round(before * (1 - fraction), 12)  # 6.0 x 0.75 is 4.5, not 4.500000000000001
        if value > limit:
            return [f"{metric} {_fmt(value)} > {_fmt(limit)} (base {_fmt(before)} lowered by minImprovement "
                    f"{_fmt(fraction)})"]
        return []
    if metric in SIGNED:
        # A margin can be 0 or negative (the base often prefers the rejected answer): a relative rise of
        # before x (1 + fraction) would then ask for less than the base. Raised by `fraction` of its size
        # instead, and strictly above it (so a base margin of 0 needs a positive one).
        limit = round(before + fraction * abs(before), 12)
        if value < limit or value <= before:
            return [f"{metric} {_fmt(value)} < {_fmt(limit)} (base {_fmt(before)} raised by minImprovement "
                    f"{_fmt(fraction)} of its magnitude, and strictly)" if value < limit else
                    f"{metric} {_fmt(value)} is not above the base's {_fmt(before)} (minImprovement {_fmt(fraction)})"]
        return []
    limit = round(before * (1 + fraction), 12)
    if value < limit:
        return [f"{metric} {_fmt(value)} < {_fmt(limit)} (base {_fmt(before)} raised by minImprovement {_fmt(fraction)})"]
    return []


def compare(base: Scores, tuned: Scores, examples: int, *, gates: Sequence[Gate] | None = None) -> EvaluationStatus:
    """The evaluation status: base beside tuned; with `gates`, whether they held and which were missed."""
    status = EvaluationStatus(accuracy_metric=ACCURACY_METRIC, examples=examples, base=base, tuned=tuned)
    if gates:
        failed = check_gates(tuned, gates, base)
        status.gates_passed = not failed
        status.failed_gates = failed[:16]
    return status


def load_glossary(path: str | Path) -> list[str]:
    """Glossary terms from a file: a JSON list of strings, or one term per line (`#` lines are comments)."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"glossary {path} looks like JSON but does not parse: {err}", reason="InvalidGlossary") from None
        if not all(isinstance(t, str) for t in data):
            raise DataError(f"glossary {path} must be a JSON list of strings", reason="InvalidGlossary")
        terms = data
    else:
        terms = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    cleaned = list(dict.fromkeys(t.strip() for t in terms if t.strip()))
    if not cleaned:
        raise DataError(f"glossary {path} has no terms; put one term per line", reason="InvalidGlossary")
    return cleaned
