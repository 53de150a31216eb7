"""Preference data: reading both forms, refusals naming file/line/field, pair encoding and truncation, the
pre-flight statistics, and the demo's generated pairs (in-process, no training)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from finetune_trainer import dataset as ds
from finetune_trainer import preference_data as pd
from finetune_trainer.errors import DataError
from finetune_trainer.objectives.dpo import PairEncoded
from tests.trainer.conftest import HealthcareSample
from tests.trainer.test_data import _jsonl

PAIR: dict[str, Any] = {
    "prompt": "What is the usual adult dose of this medication?", "input": "metformin",
    "chosen": "Metformin usual adult dose is 500 mg by mouth twice daily.",
    "rejected": "Metformin usual adult dose is 2000 mg by mouth once daily.",
}
CHAT: dict[str, Any] = {  # OpenAI's DPO line, with the (empty) tool fields its examples carry
    "input": {"messages": [{"role": "system", "content": "Answer in one sentence."},
                           {"role": "user", "content": "How is metformin dosed?"}],
              "tools": [], "parallel_tool_calls": True},
    "preferred_output": [{"role": "assistant", "content": "500 mg by mouth twice daily."}],
    "non_preferred_output": [{"role": "assistant", "content": "2000 mg by mouth once daily."}],
}


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    row = copy.deepcopy(base)
    row.update(changes)
    return row


def _chat(chosen: Any = "500 mg by mouth twice daily.", rejected: Any = "2000 mg by mouth once daily.",
          **changes: Any) -> dict[str, Any]:
    return _with(CHAT, preferred_output=[{"role": "assistant", "content": chosen}],
                 non_preferred_output=[{"role": "assistant", "content": rejected}], **changes)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from finetune_trainer.modeling import load_tokenizer

    return load_tokenizer(tiny_model_dir)


# -- reading and validation -----------------------------------------------------------------------


def test_both_forms_are_read_and_detected(tmp_path: Path) -> None:
    plain = _jsonl(tmp_path / "pairs.jsonl", [PAIR, _with(PAIR, input=None), _with(PAIR, input="")])
    loaded = pd.load_preferences([(plain, "s3://b/pairs.jsonl")], "auto", "fail")
    assert loaded.form == "instruction" and len(loaded.rows) == 3 and not loaded.skipped

    chat = tmp_path / "chat.json"  # a JSON array: rows are named "record N"
    chat.write_text(json.dumps([CHAT, CHAT]))
    loaded = pd.load_preferences([(chat, "s3://b/chat.json")], "auto", "fail")
    assert loaded.form == "chat" and [(r.unit, r.line) for r in loaded.rows] == [("record", 1), ("record", 2)]

    # One malformed first row does not decide the form.
    assert pd.detect_form([ds.Row({"prompt": "q"}, "x", 1), ds.Row(CHAT, "x", 2)]) == "chat"


INSTRUCTION_REFUSALS = [
    (_with(PAIR, rejected=None), "missing key 'rejected' (format preference (instruction) expects prompt, "
     "input (optional), chosen, rejected; found keys: chosen, input, prompt)"),
    (_with(PAIR, prompt=" "), "'prompt' must be a non-empty string"),
    (_with(PAIR, input=["metformin"]), "'input' must be a string when present"),
    (_with(PAIR, chosen=["500 mg"]), "'chosen' must be a string (the preferred answer's text), found list"),
    (_with(PAIR, rejected=" \n"), "'rejected' is empty: give the rejected answer's text, or drop the row"),
    (_with(PAIR, chosen=""), "'chosen' is empty: give the preferred answer's text"),
    (_with(PAIR, rejected=PAIR["chosen"]), "'chosen' and 'rejected' are the same text, so the pair teaches "
     "nothing; make the rejected answer the worse one, or drop the row"),
    (_with(PAIR, rejected=PAIR["chosen"] + "  "), "'chosen' and 'rejected' are the same text"),
]
CHAT_REFUSALS = [
    (_with(CHAT, non_preferred_output=None), "missing key 'non_preferred_output' (format preference (chat)"),
    (_with(CHAT, input=[{"role": "user", "content": "q"}]), "'input' must be an object {\"messages\": [...]}"),
    (_with(CHAT, input={"messages": []}), "'input.messages' must be a non-empty list"),
    (_with(CHAT, input={"messages": [{"role": "tool", "content": "x"}]}), "input.messages[0] needs a role of"),
    (_with(CHAT, input={"messages": [{"role": "user", "content": 3}]}), "input.messages[0].content must be a string"),
    (_with(CHAT, input={"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
     "input.messages[1] must be a user message"),
    (_with(CHAT, input={"messages": [{"role": "user", "content": "q"}], "tools": [{"type": "function"}]}),
     "'input.tools' is not supported"),
    (_with(CHAT, preferred_output=CHAT["preferred_output"] * 2),
     "'preferred_output' must be a list with one assistant message, [{\"role\": \"assistant\", \"content\": ...}]; "
     "found a list of 2"),
    (_with(CHAT, preferred_output={"role": "assistant", "content": "a"}),
     "'preferred_output' must be a list with one assistant message, [{\"role\": \"assistant\", \"content\": ...}]; "
     "found dict"),
    (_chat(rejected="x") | {"non_preferred_output": [{"role": "user", "content": "x"}]},
     "non_preferred_output[0].role must be 'assistant', found 'user'"),
    (_chat(chosen=""), "'preferred_output[0].content' is empty: give the preferred answer's text"),
    (_chat(rejected=None), "'non_preferred_output[0].content' must be a string (the rejected answer's text)"),
    (_chat(chosen="Same.", rejected=" Same."),
     "'preferred_output[0].content' and 'non_preferred_output[0].content' are the same text"),
]


@pytest.mark.parametrize(("form", "good", "bad", "expected"),
                         [("instruction", PAIR, bad, expected) for bad, expected in INSTRUCTION_REFUSALS]
                         + [("chat", CHAT, bad, expected) for bad, expected in CHAT_REFUSALS])
def test_refusals_name_file_line_and_field(tmp_path: Path, form: str, good: dict[str, Any], bad: dict[str, Any],
                                           expected: str) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [good, bad, good])
    with pytest.raises(DataError) as err:
        pd.load_preferences([(path, "s3://b/p.jsonl")], "auto", "fail")
    message = err.value.message
    assert err.value.reason == "InvalidData" and err.value.exit_code == 3  # what the pre-flight reports as DataInvalid
    assert message.startswith(f"1 invalid row(s) in spec.dataset.train (format preference ({form})): ")
    assert f"s3://b/p.jsonl line 2: {expected}" in message
    assert message.endswith("Fix them, or set spec.dataset.invalidRows: skip to drop them")


def test_skip_drops_invalid_rows_and_counts_them(tmp_path: Path) -> None:
    rows = [PAIR, _with(PAIR, rejected=PAIR["chosen"]), PAIR, _with(PAIR, chosen=" "), ["not", "an", "object"]]
    path = _jsonl(tmp_path / "p.jsonl", rows, {1: b"{not json"})
    loaded = pd.load_preferences([(path, "p.jsonl")], "instruction", "skip")
    assert [row.line for row in loaded.rows] == [1, 4]
    assert [(p.line, p.message.split(":")[0].split(" (")[0]) for p in loaded.skipped] == [
        (2, "invalid JSON at column 2"),
        (3, "'chosen' and 'rejected' are the same text, so the pair teaches nothing; make the rejected answer "
            "the worse one, or drop the row"),
        (5, "'chosen' is empty"),
        (6, "expected a JSON object, found list"),
    ]
    with pytest.raises(DataError) as err:
        pd.load_preferences([(path, "p.jsonl")], "instruction", "fail")
    assert err.value.message.startswith("4 invalid row(s)")


def test_a_declared_form_checks_every_row_against_it(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [PAIR])
    expected = r"p.jsonl line 1: missing key 'preferred_output' \(format preference \(chat\)"
    with pytest.raises(DataError, match=expected):
        pd.load_preferences([(path, "p.jsonl")], "chat", "fail")


def test_unknown_keys_and_empty_data(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"question": "q", "good": "a", "bad": "b"}])
    with pytest.raises(DataError) as err:
        pd.load_preferences([(path, "p.jsonl")], "auto", "fail")
    assert err.value.reason == "UnknownFormat"
    assert "p.jsonl (line 1): rows have keys [bad, good, question]" in err.value.message
    for expected in pd.EXPECTED_KEYS.values():
        assert expected in err.value.message

    path = _jsonl(tmp_path / "bad.jsonl", [_with(PAIR, rejected=PAIR["chosen"])] * 2)
    with pytest.raises(DataError, match=r"all 2 row\(s\) are invalid and were skipped") as err:
        pd.load_preferences([(path, "bad.jsonl")], "auto", "skip")
    assert err.value.reason == "EmptyDataset"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl is empty") as err:
        pd.load_preferences([(empty, "empty.jsonl")], "auto", "fail")
    assert err.value.reason == "EmptyDataset"


# -- encoding ----------------------------------------------------------------------------------------


def _sft_split(example: ds.Encoded) -> tuple[list[int], list[int]]:
    """(prompt ids, supervised ids) of an SFT example whose supervised tokens all come after its prompt."""
    first = next(i for i, label in enumerate(example.labels) if label != ds.IGNORE_INDEX)
    assert all(label != ds.IGNORE_INDEX for label in example.labels[first:])
    return example.input_ids[:first], example.input_ids[first:]


def test_instruction_pairs_encode_as_the_sft_encoder_does(tokenizer: Any) -> None:
    """The independent path is dataset.encode: a DPO stage after an SFT stage must see the SFT stage's prompt
    tokens, and its loss tokens are what SFT supervises (the answer and EOS)."""
    pair = pd.tokenize_pair(PAIR, "instruction", tokenizer)
    for answer, ids in ((PAIR["chosen"], pair.chosen_ids), (PAIR["rejected"], pair.rejected_ids)):
        sft = ds.encode({"instruction": PAIR["prompt"], "input": PAIR["input"], "output": answer}, "instruction",
                        tokenizer, 4096)
        assert sft is not None
        assert _sft_split(sft) == (pair.prompt_ids, ids)
        assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(pair.prompt_ids) == "<s>" + ds.instruction_prompt({"instruction": PAIR["prompt"],
                                                                              "input": PAIR["input"]})


@pytest.mark.parametrize("templated", [True, False])
def test_chat_pairs_encode_as_the_sft_encoder_does(tokenizer: Any, templated: bool) -> None:
    tok = tokenizer if templated else copy.deepcopy(tokenizer)
    if not templated:
        tok.chat_template = None
    pair = pd.tokenize_pair(CHAT, "chat", tok)
    messages = CHAT["input"]["messages"]
    for output, ids in ((CHAT["preferred_output"], pair.chosen_ids), (CHAT["non_preferred_output"], pair.rejected_ids)):
        sft = ds.encode({"messages": messages + output}, "chat", tok, 4096)
        assert sft is not None
        prompt, supervised = _sft_split(sft)
        assert (tok.decode(prompt), supervised) == (tok.decode(pair.prompt_ids), ids)
        assert tok.decode(ids) == output[0]["content"] + ("</s>\n" if templated else "\n</s>")
    # The prompt is the generation prompt the evaluation asks the model with (the plain template adds the BOS).
    assert tok.decode(pair.prompt_ids) == ("" if templated else "<s>") + ds.chat_prompt(tok, messages)


def test_the_dpo_batch_masks_the_prompt(tokenizer: Any) -> None:
    """The objective's collation of these pairs takes loss on the answer tokens only."""
    from finetune_trainer.objectives.dpo import collate_pairs

    pairs = [pd.tokenize_pair(PAIR, "instruction", tokenizer), pd.tokenize_pair(CHAT, "chat", tokenizer)]
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    for labels, (prompt, answer) in zip(batch["labels"].tolist(), rows, strict=True):
        assert [t for t in labels if t != ds.IGNORE_INDEX] == answer
        assert all(t == ds.IGNORE_INDEX for t in labels[:len(prompt)])


def test_truncation_cuts_the_prompt_from_the_left_first() -> None:
    pair = PairEncoded(list(range(1, 11)), [20, 21, 22], [30, 31])
    assert pd.truncate(pair, 13) == (pair, False)
    assert pd.truncate(pair, 6) == (PairEncoded([8, 9, 10], [20, 21, 22], [30, 31]), True)
    # Answers longer than the room left: the prompt keeps one token, the answers lose their ends.
    assert pd.truncate(pair, 3) == (PairEncoded([10], [20, 21], [30, 31]), True)
    assert pd.truncate(pair, 1) == (PairEncoded([10], [], []), True)


def test_encode_pairs_keeps_answers_and_counts_truncated_and_dropped(tokenizer: Any) -> None:
    rows = [ds.Row(PAIR, "p", 1), ds.Row(_with(PAIR, input="metformin " * 40), "p", 2)]
    full = [pd.tokenize_pair(row.data, "instruction", tokenizer) for row in rows]
    longest_answer = max(len(full[0].chosen_ids), len(full[0].rejected_ids))
    max_length = len(full[0].prompt_ids) + longest_answer  # the first pair fits exactly, the second does not
    encoded = pd.encode_pairs(rows, "instruction", tokenizer, max_length)
    assert (encoded.truncated, encoded.dropped) == (1, 0)
    assert encoded.pairs[0] == full[0]
    cut = encoded.pairs[1]
    assert (cut.chosen_ids, cut.rejected_ids) == (full[1].chosen_ids, full[1].rejected_ids)  # answers kept
    assert cut.prompt_ids == full[1].prompt_ids[-len(cut.prompt_ids):]  # the prompt's end kept
    assert len(cut.prompt_ids) + longest_answer == max_length

    # No room for an answer token: dropped. Answers cut to a shared start: the same ids, dropped too.
    assert pd.encode_pairs(rows, "instruction", tokenizer, 1) == pd.Encoding([], 2, 2)
    shared = 0
    while full[0].chosen_ids[shared] == full[0].rejected_ids[shared]:
        shared += 1
    assert shared > 0
    encoded = pd.encode_pairs(rows[:1], "instruction", tokenizer, 1 + shared)
    assert (encoded.pairs, encoded.truncated, encoded.dropped) == ([], 1, 1)
    encoded = pd.encode_pairs(rows[:1], "instruction", tokenizer, 2 + shared)
    assert (len(encoded.pairs), encoded.dropped) == (1, 0)


# -- statistics ----------------------------------------------------------------------------------------


def test_stats_count_tokens_and_the_length_bias(tokenizer: Any) -> None:
    long_chosen = [_with(PAIR, chosen=PAIR["chosen"] + " Take it with food to reduce nausea.")] * 3
    pairs = [pd.tokenize_pair(row, "instruction", tokenizer) for row in long_chosen]
    stats = pd.pair_stats(pairs)
    assert stats.pairs == 3
    assert stats.tokens == sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    assert stats.length_bias > 0  # chosen answers are the longer ones
    swapped = pd.pair_stats(PairEncoded(p.prompt_ids, p.rejected_ids, p.chosen_ids) for p in pairs)
    assert swapped.length_bias == -stats.length_bias
    assert swapped.tokens_per_pair == stats.tokens_per_pair

    wire = stats.wire()
    assert set(wire) == {"pairs", "tokens", "tokensPerPair", "meanChosenTokens", "meanRejectedTokens",
                         "lengthBias", "longerThanMaxSeqLength"}
    assert wire["lengthBias"] == pytest.approx(wire["meanChosenTokens"] - wire["meanRejectedTokens"], abs=2e-3)
    assert pd.pair_stats([]).wire()["tokensPerPair"] == 0.0
    longest = len(pairs[0].prompt_ids) + len(pairs[0].chosen_ids)
    assert pd.pair_stats(pairs, max_length=longest).longer_than_max_length == 0
    assert pd.pair_stats(pairs, max_length=longest - 1).longer_than_max_length == 3


# -- the demo's pairs -----------------------------------------------------------------------------------

PREFERENCE_FILES = ("healthcare_preference_train.jsonl", "healthcare_preference_test.jsonl")


@pytest.fixture(scope="module")
def make_preference(healthcare_sample: HealthcareSample) -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_preference", healthcare_sample.dir / "make_preference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_pairs_are_what_the_generator_writes(make_preference: ModuleType,
                                                  healthcare_sample: HealthcareSample) -> None:
    files = make_preference.generate()
    assert set(files) == set(PREFERENCE_FILES)
    for name, text in files.items():
        assert (healthcare_sample.dir / name).read_text() == text, f"{name} is stale: run make_preference.py"
    # Another process, another hash seed: the same files (the check exits 1 on any difference).
    script = healthcare_sample.dir / "make_preference.py"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run([sys.executable, str(script), "--check"], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr


def test_demo_pairs_are_valid_preference_data(make_preference: ModuleType,
                                              healthcare_sample: HealthcareSample) -> None:
    for name, (source, every) in make_preference.SOURCES.items():
        loaded = pd.load_preferences([(healthcare_sample.dir / name, name)], "auto", "fail")
        assert loaded.form == "instruction" and not loaded.skipped
        instructions = [json.loads(line) for line in (healthcare_sample.dir / source).read_text().splitlines()]
        # One pair per `every`-th instruction row, in order: the chosen answer is the row's reference.
        assert [(r.data["prompt"], r.data["input"], r.data["chosen"]) for r in loaded.rows] == [
            (row["instruction"], row["input"], row["output"]) for row in instructions[::every]]
        assert len(loaded.rows) == {"healthcare_train.jsonl": 199, "healthcare_test.jsonl": 50}[source]


def _terms(text: str) -> set[str]:
    """Words, numbers and codes ("6.25", "E11.9", "ICD-10-CM") of a text."""
    return set(re.findall(r"[A-Za-z0-9]+(?:[.-][A-Za-z0-9]+)*", text))


def test_every_rejected_answer_invents_something(healthcare_sample: HealthcareSample) -> None:
    """Every rejected answer has a term found in neither the prompt nor the chosen answer, and the
    evaluation's own hallucination score (the chosen answer as reference) counts it, except a wrong
    ICD-10-CM code, which that score does not read as a number."""
    from finetune_trainer.evaluate import EvalExample, score

    glossary = healthcare_sample.glossary.read_text().splitlines()
    codes_only = lookups = 0
    for name in PREFERENCE_FILES:
        for line in (healthcare_sample.dir / name).read_text().splitlines():
            row = json.loads(line)
            lookups += row["chosen"].startswith("The ICD-10-CM code for ")
            context = f"{row['prompt']}\n{row['input']}"
            invented = _terms(row["rejected"]) - _terms(f"{context}\n{row['chosen']}")
            assert row["rejected"] != row["chosen"] and invented, row
            example = EvalExample(prompt=row["prompt"], reference=row["chosen"], context=context)
            hallucination = score([example], [row["rejected"]], glossary=glossary).hallucination
            if all(re.fullmatch(r"[A-Z]\d\d(?:\.\d+)?", term) for term in invented):
                codes_only += 1
                assert row["chosen"].startswith("The ICD-10-CM code for "), row
            else:
                assert hallucination is not None and hallucination > 0, row
    assert 0 < codes_only == lookups  # exactly the code lookups: the exception is no way around the check
