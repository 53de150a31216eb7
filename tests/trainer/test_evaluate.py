"""The domain evaluator on hand-computed examples, and generation on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from finetune_operator.spec import EvaluationSpec, Gate, Scores
from finetune_trainer.errors import DataError
from finetune_trainer.evaluate import (
    ACCURACY_METRIC,
    EvalExample,
    check_gates,
    compare,
    evaluate_model,
    generate_answers,
    load_glossary,
    perplexity_from_loss,
    rouge_l_f1,
    score,
    score_details,
    technical_terms,
    tokens,
)

GLOSSARY = ["potassium", "hyperkalemia", "hyponatremia", "ICD-10-CM"]
LAB = EvalExample(
    prompt="unused",
    reference="Potassium 6.1 mmol/L is high, consistent with hyperkalemia.",
    context="Interpret this lab result.\npotassium: 6.1 mmol/L",
)
ICD = EvalExample(
    prompt="unused",
    reference="The ICD-10-CM code for essential hypertension is I10.",
    context="Give the ICD-10-CM code.\nessential hypertension",
)


def test_tokens_keep_decimals_and_codes() -> None:
    assert tokens("Dose is 6.25 mg, code E11.9.") == ["dose", "is", "6.25", "mg", "code", "e11.9"]


def test_rouge_l_by_hand() -> None:
    # LCS("the cat sat on the mat", "the cat on mat") = 4: P = 4/4, R = 4/6, F1 = 2PR/(P+R) = 0.8
    assert rouge_l_f1("the cat on mat", "the cat sat on the mat") == pytest.approx(0.8)
    assert rouge_l_f1("The cat sat on the mat.", "the cat sat on the mat") == 1.0
    assert rouge_l_f1("", "") == 1.0
    assert rouge_l_f1("", "something") == 0.0
    assert rouge_l_f1("alpha beta", "gamma delta") == 0.0
    # order matters for LCS: "b a" vs "a b" share a subsequence of length 1: P = R = 1/2
    assert rouge_l_f1("b a", "a b") == pytest.approx(0.5)


def test_scores_with_glossary_by_hand() -> None:
    answers = [
        "Potassium 7.2 mmol/L is high, consistent with hyponatremia.",
        "The ICD-10-CM code for essential hypertension is I10.",
    ]
    scores, details = score_details([LAB, ICD], answers, glossary=GLOSSARY, format_regex=r"The .*")
    # LAB: 9 tokens each, LCS = potassium mmol l is high consistent with = 7 -> F1 7/9; ICD: exact -> 1
    assert scores.accuracy == pytest.approx((7 / 9 + 1) / 2)
    # reference terms: {potassium, hyperkalemia} + {icd 10 cm}; answers use potassium and icd 10 cm
    assert scores.terminology == pytest.approx(2 / 3)
    # answer items: LAB {potassium, hyponatremia, 7.2}, ICD {icd 10 cm, 10}; unsupported: hyponatremia, 7.2
    assert scores.hallucination == pytest.approx(2 / 5)
    assert scores.format_compliance == pytest.approx(1 / 2)
    assert details[0]["unsupported"] == ["hyponatremia", "7.2"]
    assert details[0]["termsMissed"] == ["hyperkalemia"]
    assert details[1]["formatOk"] is True and details[0]["formatOk"] is False


def test_perfect_answers_score_perfectly() -> None:
    scores = score([LAB, ICD], [LAB.reference, ICD.reference], glossary=GLOSSARY, format_regex=r"[A-Z].*\.")
    assert (scores.accuracy, scores.terminology, scores.hallucination, scores.format_compliance) == (1, 1, 0, 1)


def test_scores_without_glossary_use_technical_words() -> None:
    example = EvalExample(
        prompt="unused",
        reference="Metformin dose is 500 mg BID per ADA guidance.",
        context="Dose of metformin?",
    )
    # "Metformin" starts the sentence (not a term); 500 has a digit; BID and ADA are acronyms
    assert technical_terms(example.reference) == {"500", "bid", "ada"}
    answer = "Metformin dose is 850 mg BID per Mayo guidance."
    assert technical_terms(answer) == {"850", "bid", "mayo"}
    scores = score([example], [answer])
    assert scores.terminology == pytest.approx(1 / 3)  # bid of {500, bid, ada}
    assert scores.hallucination == pytest.approx(2 / 3)  # 850 and mayo are in neither context nor reference
    assert scores.format_compliance is None


def test_nothing_to_count_gives_none() -> None:
    example = EvalExample(prompt="p", reference="plain words only", context="nothing technical")
    scores = score([example], ["more plain words"], glossary=GLOSSARY)
    assert scores.terminology is None and scores.hallucination is None
    assert scores.accuracy == pytest.approx(rouge_l_f1("more plain words", "plain words only"))


def test_format_schema_requires_valid_json() -> None:
    schema = {"type": "object", "required": ["code"], "properties": {"code": {"type": "string"}}}
    examples = [EvalExample("p", '{"code": "I10"}', "c")] * 4
    answers = ['{"code": "I10"}', '{"code": 10}', "I10", ' {"code": "E11.9"}\n']
    assert score(examples, answers, format_schema=schema).format_compliance == pytest.approx(0.5)
    # schema and regex together: both must hold
    both = score(examples, answers, format_schema=schema, format_regex=r'\{"code": "I.*')
    assert both.format_compliance == pytest.approx(0.25)


def test_mismatched_lengths_are_an_error() -> None:
    with pytest.raises(ValueError, match="2 examples but 1 answers"):
        score([LAB, ICD], ["x"])


def test_gate_messages_name_metric_value_and_threshold() -> None:
    tuned = Scores(accuracy=0.41, hallucination=0.2, terminology=0.9, eval_loss=2.5)
    gates = [
        Gate(metric="accuracy", min=0.6),
        Gate(metric="hallucination", max=0.1),
        Gate(metric="terminology", min=0.5, max=1.0),
        Gate(metric="formatCompliance", min=0.9),
        Gate(metric="evalLoss", max=2.0),
    ]
    assert check_gates(tuned, gates) == [
        "accuracy 0.41 < min 0.60",
        "hallucination 0.20 > max 0.10",
        "formatCompliance was not measured (gate: min 0.90)",
        "evalLoss 2.50 > max 2.00",
    ]
    assert check_gates(tuned, [Gate(metric="accuracy", min=0.41)]) == []
    assert check_gates(Scores(accuracy=0.599), [Gate(metric="accuracy", min=0.6)]) == ["accuracy 0.599 < min 0.60"]


def test_min_improvement_gates_compare_with_the_base_model() -> None:
    base = Scores(eval_loss=6.0, accuracy=0.2)
    falls = Gate(metric="evalLoss", min_improvement=0.25)  # eval loss must fall to 4.5 or below
    rises = Gate(metric="accuracy", min_improvement=0.5)  # accuracy must rise to 0.3 or above
    assert check_gates(Scores(eval_loss=4.5, accuracy=0.3), [falls, rises], base) == []
    assert check_gates(Scores(eval_loss=4.6, accuracy=0.29), [falls, rises], base) == [
        "evalLoss 4.60 > 4.50 (base 6.00 lowered by minImprovement 0.25)",
        "accuracy 0.29 < 0.30 (base 0.20 raised by minImprovement 0.50)",
    ]
    assert check_gates(Scores(eval_loss=1.0), [falls]) == [
        "evalLoss: the base model's score was not measured (gate: minImprovement 0.25)"]
    assert compare(base, Scores(eval_loss=6.0), 10, gates=[falls]).gates_passed is False


def test_compare_fills_the_status() -> None:
    base, tuned = Scores(accuracy=0.1), Scores(accuracy=0.7)
    status = compare(base, tuned, 50)
    assert (status.accuracy_metric, status.examples, status.base, status.tuned) == (ACCURACY_METRIC, 50, base, tuned)
    assert status.gates_passed is None and status.failed_gates == []
    gated = compare(base, tuned, 50, gates=[Gate(metric="accuracy", min=0.8)])
    assert gated.gates_passed is False and gated.failed_gates == ["accuracy 0.70 < min 0.80"]
    assert compare(base, tuned, 50, gates=[Gate(metric="accuracy", min=0.5)]).gates_passed is True


def test_perplexity_from_loss() -> None:
    assert perplexity_from_loss(math.log(5.0)) == pytest.approx(5.0)
    assert perplexity_from_loss(1e6) == math.inf


def test_load_glossary_formats(tmp_path: Path) -> None:
    lines = tmp_path / "g.txt"
    lines.write_text("# terms\npotassium\n\n  hyperkalemia  \npotassium\n")
    assert load_glossary(lines) == ["potassium", "hyperkalemia"]
    listed = tmp_path / "g.json"
    listed.write_text(json.dumps(["ICD-10-CM", "BID"]))
    assert load_glossary(listed) == ["ICD-10-CM", "BID"]
    for bad in ("[not json", "[1, 2]", "# only a comment\n"):
        (tmp_path / "bad").write_text(bad)
        with pytest.raises(DataError):
            load_glossary(tmp_path / "bad")


def test_bundled_glossary_loads(healthcare_sample) -> None:  # type: ignore[no-untyped-def]
    terms = load_glossary(healthcare_sample.glossary)
    assert "ICD-10-CM" in terms and "metformin" in terms


# ---------------------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def _prompts(tokenizer, questions: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]


QUESTIONS = ["Expand BID.", "What is the usual adult dose of metformin?", "Interpret sodium 128 mmol/L.", "Hi"]


def test_generation_is_greedy_ordered_and_batch_independent(tiny) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = tiny
    prompts = _prompts(tokenizer, QUESTIONS)
    batched = generate_answers(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    singles = [generate_answers(model, tokenizer, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == singles
    assert len(batched) == 4 and all(isinstance(a, str) for a in batched)
    assert tokenizer.padding_side == "right"  # restored
    assert not model.training


def test_generation_on_peft_and_4bit_models(tiny, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model, tokenizer = tiny
    prompts = _prompts(tokenizer, QUESTIONS[:2])
    plain = generate_answers(model, tokenizer, prompts, max_new_tokens=6)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    # a fresh adapter has B = 0, so its answers equal the base model's
    assert generate_answers(peft_model, tokenizer, prompts, max_new_tokens=6) == plain

    quantized = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
        device_map="cpu",
    )
    answers = generate_answers(quantized, tokenizer, prompts, max_new_tokens=6)
    assert len(answers) == 2 and answers == generate_answers(quantized, tokenizer, prompts, max_new_tokens=6)


def test_evaluate_model_scores_the_first_max_examples(tiny) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = tiny
    prompts = _prompts(tokenizer, QUESTIONS)
    examples = [EvalExample(p, "In clinical notes, BID is an abbreviation for twice a day.", q)
                for p, q in zip(prompts, QUESTIONS, strict=True)]
    spec = EvaluationSpec(max_examples=2, max_new_tokens=5, format_regex=r"[A-Z].*")
    got = evaluate_model(model, tokenizer, examples, spec, GLOSSARY)
    expected = score(examples[:2], generate_answers(model, tokenizer, prompts[:2], max_new_tokens=5),
                     glossary=GLOSSARY, format_regex=r"[A-Z].*")
    assert got == expected
    assert got.format_compliance is not None
