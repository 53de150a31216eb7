"""Preference data (`dataset.format: preference`): read and check pairs, tokenize them, count them.

A preference row is one prompt with two answers, the one to prefer (chosen) and the one to avoid
(rejected). Two forms are read, one per dataset (`auto` detects it from the first row whose keys fit, as
`dataset.detect_format` does):

- `instruction`: `prompt`, optional `input`, `chosen`, `rejected` (strings). `prompt` and `input` are the
  instruction format's `instruction` and `input`: the prompt text is `dataset.instruction_prompt`, so a
  DPO stage after an SFT stage on instruction data sees the very prompts the SFT stage trained on (the
  `input` key is why this is not TRL's bare `{prompt, chosen, rejected}`: without it, the demo's
  instruction + input would need a prompt template of its own). No `system` key: the instruction template
  has no place for one; a system prompt belongs in the chat form.
- `chat`: the managed APIs' form (OpenAI's DPO file format, also Azure OpenAI, Together, Fireworks):
  `{input: {messages: [...]}, preferred_output: [{role: assistant, content}], non_preferred_output: [...]}`.
  The prompt is the conversation rendered with the tokenizer's chat template and its generation prompt
  (`dataset.chat_prompt`). As OpenAI trains it, each output is exactly one assistant message, the turn that
  follows `input.messages`; tool definitions (`input.tools`) and tool messages are refused rather than
  silently dropped, since dropping them changes the prompt.

Refused rows (named with file, line and field, like any invalid row; `invalidRows: skip` drops and counts
them): a missing or non-string answer, an empty one, and a pair whose answers are the same text (compared
without surrounding whitespace): such a pair has a DPO gradient of exactly zero and only dilutes the mean.

Encoding (`tokenize_pair`, `truncate`, `encode_pairs`) gives `objectives.dpo.PairEncoded`: the prompt's
ids and each answer's ids, the shape the DPO objective consumes (and TRL's DataCollatorForPreference). The
prompt and the answers are tokenized separately, as `dataset.encode` does, so the prompt is token for token
the one the model is asked at inference, and an SFT stage on the same rows supervises exactly the answer ids
here. Instruction answers end with EOS; chat answers end the way the template ends an assistant turn (the
text the template adds for the turn, as TRL takes it: `content</s>\n` for the tiny model), or with a newline
and EOS under the plain template of a tokenizer without one. Loss is on the answer tokens only: the
objective masks `prompt_ids`.

Truncation keeps the answers: each of the two sequences (prompt + chosen, prompt + rejected) must fit
`max_length`, so the prompt is cut from the left first (its end, the question and the generation prompt, is
what the answer follows), down to one token, and only then are the answers cut from the right. A pair left
with no answer token, or whose answers became the same ids, is dropped and counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from finetune_trainer.dataset import (
    CONTEXT_KEY,
    ROLES,
    Row,
    RowProblem,
    chat_prompt,
    check_rows,
    instruction_prompt,
)
from finetune_trainer.errors import DataError
from finetune_trainer.objectives.dpo import PairEncoded

Form = Literal["instruction", "chat"]
FORMS: tuple[Form, ...] = ("instruction", "chat")
#: Shown in errors: what each form expects.
EXPECTED_KEYS: dict[str, str] = {
    "instruction": "prompt, input (optional), chosen, rejected",
    "chat": "input {messages}, preferred_output [{role: assistant, content}], non_preferred_output [...]",
}
#: Where each form keeps its two answers, as errors name them.
ANSWER_FIELDS: dict[str, tuple[str, str]] = {
    "instruction": ("chosen", "rejected"),
    "chat": ("preferred_output[0].content", "non_preferred_output[0].content"),
}


@dataclass
class Preferences:
    """Valid preference rows of one form, plus what was dropped (`invalidRows: skip`)."""

    form: Form
    rows: list[Row]
    skipped: list[RowProblem] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Checking rows
# ------------------------------------------------------------------------------------------------


def _keys(record: dict[str, Any]) -> str:
    # As in dataset: a null value does not count (Parquet gives every row every column).
    return ", ".join(sorted(k for k, v in record.items() if v is not None))


def _answer_problem(name: str, value: Any, which: str) -> str | None:
    """Why the `which` ("preferred", "rejected") answer in field `name` is unusable, or None."""
    if not isinstance(value, str):
        return f"{name!r} must be a string (the {which} answer's text), found {type(value).__name__}"
    if not value.strip():
        return f"{name!r} is empty: give the {which} answer's text, or drop the row"
    return None


def _same(chosen_field: str, rejected_field: str, chosen: str, rejected: str) -> str | None:
    if chosen.strip() != rejected.strip():
        return None
    return (f"{chosen_field!r} and {rejected_field!r} are the same text, so the pair teaches nothing; make the "
            "rejected answer the worse one, or drop the row")


def _instruction_problem(record: dict[str, Any], expected: str) -> str | None:
    for key in ("prompt", "chosen", "rejected"):
        if record.get(key) is None:
            return f"missing key {key!r} ({expected})"
    if not isinstance(record["prompt"], str) or not record["prompt"].strip():
        return "'prompt' must be a non-empty string (the instruction)"
    if record.get("input") is not None and not isinstance(record["input"], str):
        return "'input' must be a string when present (the instruction's input)"
    for key, which in (("chosen", "preferred"), ("rejected", "rejected")):
        if (message := _answer_problem(key, record[key], which)) is not None:
            return message
    return _same("chosen", "rejected", record["chosen"], record["rejected"])


def _output_problem(name: str, output: Any, which: str) -> str | None:
    shape = f"{name!r} must be a list with one assistant message, [{{\"role\": \"assistant\", \"content\": ...}}]"
    if not isinstance(output, list) or len(output) != 1 or not isinstance(output[0], dict):
        found = f"a list of {len(output)}" if isinstance(output, list) else type(output).__name__
        return f"{shape}; found {found}"
    if output[0].get("role") != "assistant":
        return f"{name}[0].role must be 'assistant', found {output[0].get('role')!r}"
    return _answer_problem(f"{name}[0].content", output[0].get("content"), which)


def _chat_problem(record: dict[str, Any], expected: str) -> str | None:
    for key in ("input", "preferred_output", "non_preferred_output"):
        if record.get(key) is None:
            return f"missing key {key!r} ({expected})"
    conversation = record["input"]
    if not isinstance(conversation, dict):
        return f"'input' must be an object {{\"messages\": [...]}}, found {type(conversation).__name__}"
    if conversation.get("tools"):
        return "'input.tools' is not supported (tool definitions are not rendered into the prompt); remove it"
    messages = conversation.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'input.messages' must be a non-empty list of {role, content}"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"input.messages[{i}] needs a role of {', '.join(ROLES)}"
        if not isinstance(message.get("content"), str):
            return f"input.messages[{i}].content must be a string"
    if messages[-1]["role"] != "user":
        return (f"input.messages[{len(messages) - 1}] must be a user message: the answers in preferred_output and "
                "non_preferred_output reply to the conversation's last user turn")
    for key, which in (("preferred_output", "preferred"), ("non_preferred_output", "rejected")):
        if (message := _output_problem(key, record[key], which)) is not None:
            return message
    chosen_field, rejected_field = ANSWER_FIELDS["chat"]
    return _same(chosen_field, rejected_field, record["preferred_output"][0]["content"],
                 record["non_preferred_output"][0]["content"])


def row_problem(record: Any, form: Form) -> str | None:
    """Why `record` is not a valid preference row of `form`, or None. Names the field and says the fix."""
    if not isinstance(record, dict):
        return f"expected a JSON object, found {type(record).__name__}"
    expected = f"format preference ({form}) expects {EXPECTED_KEYS[form]}; found keys: {_keys(record)}"
    if form == "instruction":
        return _instruction_problem(record, expected)
    return _chat_problem(record, expected)


def form_of(keys: Iterable[str]) -> Form | None:
    """The preference form that rows with these keys (those with a value) are in, or None."""
    present = set(keys)
    if {"preferred_output", "non_preferred_output"} <= present:
        return "chat"
    if {"prompt", "chosen", "rejected"} <= present:
        return "instruction"
    return None


def detect_form(rows: Sequence[Row]) -> Form:
    """The form of the first object row whose keys fit one (a malformed first row does not decide); a
    DataError (UnknownFormat) listing the keys found and those each form expects when none fits."""
    objects = [row for row in rows if isinstance(row.data, dict)]
    if not objects:
        raise DataError("cannot detect the preference data's form: no row is a JSON object")
    for row in objects:
        form = form_of(k for k, v in row.data.items() if v is not None)
        if form is not None:
            return form
    first = objects[0]
    expected = "; ".join(f"{name}: {keys}" for name, keys in EXPECTED_KEYS.items())
    raise DataError(
        f"cannot detect the preference data's form in {first.source} ({first.unit} {first.line}): rows have keys "
        f"[{_keys(first.data)}]; expected {expected}. Rename the keys",
        reason="UnknownFormat",
    )


def load_preferences(files: Iterable[tuple[Path, str]], declared: str, invalid_rows: str,
                     what: str = "spec.dataset.train") -> Preferences:
    """Read and check every row of `files` ((local path, source URI) pairs) as preference pairs.

    `declared` is `auto`, `instruction` or `chat`. Like `dataset.load_dataset`: `invalid_rows="fail"` raises
    a DataError naming the first offending rows (file, line, field); `"skip"` drops them and records them in
    `Preferences.skipped`; no valid row at all is a DataError (EmptyDataset).
    """
    if declared not in ("auto", *FORMS):
        raise ValueError(f"declared form {declared!r}: expected auto, instruction or chat")
    form, valid, problems = check_rows(
        files, declared, invalid_rows, what, detect=detect_form, problem=row_problem, fallback="instruction",
        checked=lambda form: f"format preference ({form})", empty="add preference pairs or point it at the data")
    return Preferences(form, valid, problems)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Rendering and tokenizing
# ------------------------------------------------------------------------------------------------


def _templated(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_text(record: dict[str, Any], form: Form, tokenizer: Any) -> str:
    """The prompt a valid row's answers follow: the instruction template (after the row's retrieved passages
    when it carries them) or the chat conversation with its generation prompt."""
    if form == "instruction":
        return instruction_prompt({"instruction": record["prompt"], "input": record.get("input"),
                                   CONTEXT_KEY: record.get(CONTEXT_KEY)})
    return chat_prompt(tokenizer, record["input"]["messages"])


def answers(record: dict[str, Any], form: Form) -> tuple[str, str]:
    """(chosen, rejected) text of a valid row."""
    if form == "instruction":
        return record["chosen"], record["rejected"]
    return record["preferred_output"][0]["content"], record["non_preferred_output"][0]["content"]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _chat_answer_ids(tokenizer: Any, messages: list[dict[str, str]], prompt: str, content: str,
                     eos: list[int]) -> list[int]:
    """An assistant turn's ids: what the template adds to the prompt for the turn (so it ends the turn its
    own way), else the content and EOS (no template, or one whose render is not prefix-stable)."""
    if _templated(tokenizer):
        full = str(tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": content}],
                                                 tokenize=False, add_generation_prompt=False))
        if full.startswith(prompt):
            return _ids(tokenizer, full[len(prompt):])
        return _ids(tokenizer, content) + eos
    # The plain template (dataset.FALLBACK_TURN): the turn is the content and a newline, then EOS.
    return _ids(tokenizer, content + "\n") + eos


def tokenize_pair(record: dict[str, Any], form: Form, tokenizer: Any) -> PairEncoded:
    """A valid row's ids, untruncated (the pre-flight counts these)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompt = prompt_text(record, form, tokenizer)
    chosen, rejected = answers(record, form)
    if form == "instruction":
        return PairEncoded(bos + _ids(tokenizer, prompt), _ids(tokenizer, chosen) + eos,
                           _ids(tokenizer, rejected) + eos)
    messages = record["input"]["messages"]
    # Chat templates put the BOS in the rendered text themselves; the plain template does not.
    prompt_ids = _ids(tokenizer, prompt) if _templated(tokenizer) else bos + _ids(tokenizer, prompt)
    return PairEncoded(prompt_ids, _chat_answer_ids(tokenizer, messages, prompt, chosen, eos),
                       _chat_answer_ids(tokenizer, messages, prompt, rejected, eos))


def truncate(pair: PairEncoded, max_length: int) -> tuple[PairEncoded, bool]:
    """The pair cut so prompt + chosen and prompt + rejected each fit `max_length`, and whether it was cut.

    The prompt loses its start first, down to one token (the answer's first token needs a token before it
    to be predicted from); then the answers lose their ends.
    """
    longest = max(len(pair.chosen_ids), len(pair.rejected_ids))
    if len(pair.prompt_ids) + longest <= max_length:
        return pair, False
    keep = max(min(len(pair.prompt_ids), 1), max_length - longest)
    prompt = pair.prompt_ids[len(pair.prompt_ids) - keep:]
    room = max(0, max_length - len(prompt))
    return PairEncoded(prompt, pair.chosen_ids[:room], pair.rejected_ids[:room]), True


@dataclass(frozen=True)
class Encoding:
    """Encoded pairs and what truncation did: `truncated` pairs were cut (and kept), `dropped` pairs were
    left with no answer token or with the same ids for both answers, and are not in `pairs`."""

    pairs: list[PairEncoded]
    truncated: int
    dropped: int


def encode_pairs(rows: Sequence[Row], form: Form, tokenizer: Any, max_length: int) -> Encoding:
    """Tokenize and truncate valid rows for training or evaluation."""
    pairs: list[PairEncoded] = []
    truncated = dropped = 0
    for row in rows:
        pair, cut = truncate(tokenize_pair(row.data, form, tokenizer), max_length)
        truncated += cut
        if not pair.chosen_ids or not pair.rejected_ids or pair.chosen_ids == pair.rejected_ids:
            dropped += 1
        else:
            pairs.append(pair)
    return Encoding(pairs, truncated, dropped)


# ------------------------------------------------------------------------------------------------
# Statistics for the pre-flight
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairStats:
    """Counts of tokenized pairs (`pair_stats`), for `status.preflight`.

    `length_bias` (mean chosen minus mean rejected answer tokens) says whether the data prefers longer
    (positive) or shorter (negative) answers: DPO learns a length preference as readily as the intended
    one, so a large bias is worth knowing before training.
    """

    pairs: int
    #: prompt + chosen + rejected tokens, summed over the pairs.
    tokens: int
    chosen_tokens: int
    rejected_tokens: int
    #: Pairs whose longer sequence (prompt + the longer answer) exceeds the max length given, if any.
    longer_than_max_length: int = 0

    @property
    def tokens_per_pair(self) -> float:
        return self.tokens / self.pairs if self.pairs else 0.0

    @property
    def length_bias(self) -> float:
        return (self.chosen_tokens - self.rejected_tokens) / self.pairs if self.pairs else 0.0

    def wire(self) -> dict[str, Any]:
        """The camelCase object the pre-flight reports."""
        def mean(total: int) -> float:
            return round(total / self.pairs, 3) if self.pairs else 0.0

        return {
            "pairs": self.pairs,
            "tokens": self.tokens,
            "tokensPerPair": round(self.tokens_per_pair, 3),
            "meanChosenTokens": mean(self.chosen_tokens),
            "meanRejectedTokens": mean(self.rejected_tokens),
            "lengthBias": round(self.length_bias, 3),
            "longerThanMaxSeqLength": self.longer_than_max_length,
        }


def pair_stats(pairs: Iterable[PairEncoded], max_length: int | None = None) -> PairStats:
    """Pairs, tokens and answer lengths of `pairs` (untruncated ones, for the pre-flight)."""
    count = tokens = chosen = rejected = too_long = 0
    for pair in pairs:
        count += 1
        prompt = len(pair.prompt_ids)
        chosen += len(pair.chosen_ids)
        rejected += len(pair.rejected_ids)
        tokens += prompt + len(pair.chosen_ids) + len(pair.rejected_ids)
        if max_length is not None and prompt + max(len(pair.chosen_ids), len(pair.rejected_ids)) > max_length:
            too_long += 1
    return PairStats(count, tokens, chosen, rejected, too_long)
