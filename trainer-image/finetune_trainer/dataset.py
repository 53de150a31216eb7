"""Training data: read rows, check them against a format, tokenize with loss masks, plan batches.

Files are JSON Lines (`.jsonl`), JSON (`.json`: an array of objects, or JSON Lines under a .json name) or
Parquet (`.parquet`); a directory means every such file in it, in name order. Rows are read here rather
than through `datasets` because every error must name the file and line of the offending row (JSON Lines:
the line; JSON arrays: the record's position, "record N"; Parquet: "row N").

Row size limit: a row over MAX_ROW_BYTES (8 MiB of JSON) is an invalid row, named like any other (fail) or
dropped and counted (skip). JSON Lines are streamed line by line with reads capped at that size, so a huge
line (a 50 MB document, a file without newlines) costs at most 8 MiB of memory, never the line's size; JSON
arrays and Parquet files are read whole (use JSON Lines for very large files). 8 MiB is about twice the
text of the longest allowed maxSeqLength (1,048,576 tokens at about 4 bytes per token): anything longer
would mostly be cut away by truncation, after costing the tokenizer hundreds of MB.

Formats (`spec.dataset.format`):

- `instruction`: `instruction`, optional `input`, `output`. The prompt is rendered with `instruction_prompt`
  (the same text the evaluation generates from); loss is on the output tokens and the EOS only.
- `chat`: `messages`, a list of `{role, content}` with roles system/user/assistant. Rendered with the
  tokenizer's chat template when it has one (else a plain `<|role|>` template); loss is on assistant turns.
- `text`: `text`. Loss on every token.
- `auto`: detected from the first row's keys; when nothing fits, the error lists the keys found and the
  keys each format expects.

Batches are never padded to `maxSeqLength`. Without packing, the examples of each optimizer step are
sorted by length before they are cut into micro-batches (`batch_plan`), and each batch is padded to its own
longest row. With packing, examples are
concatenated into rows of at most `maxSeqLength` tokens with `position_ids` restarting at 0 for every
example and no attention mask: transformers then builds a block-diagonal causal mask from the position ids
(`masking_utils.find_packed_sequence_indices`), so packed examples do not attend to each other. That needs
`use_cache=False` in the forward pass (with a cache the packed-sequence detection is skipped).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from finetune_trainer.errors import DataError

Format = Literal["instruction", "chat", "text"]
SUFFIXES = (".jsonl", ".json", ".parquet")
IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
#: Shown in errors: what each format expects.
EXPECTED_KEYS: dict[str, str] = {
    "instruction": "instruction, input (optional), output",
    "chat": "messages (a list of {role, content})",
    "text": "text",
}
#: How many offending rows an error names.
MAX_NAMED_ROWS = 5
#: Largest row (bytes of JSON; see the module docstring).
MAX_ROW_BYTES = 8 << 20
_CHUNK = 1 << 20
_BOM = b"\xef\xbb\xbf"

PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
FALLBACK_TURN = "<|{role}|>\n{content}\n"
FALLBACK_GENERATION = "<|assistant|>\n"
#: Where a row carries its retrieved passages, rendered (`retrieval.augment`; spec.retrieval).
CONTEXT_KEY = "__retrieval_context__"


@dataclass(frozen=True)
class Row:
    """One record and where it came from (`line` is 1-based: a JSONL line, or the record's position, then
    `unit` says "record" or "row")."""

    data: dict[str, Any]
    source: str
    line: int
    unit: str = "line"


@dataclass(frozen=True)
class RowProblem:
    source: str
    line: int
    message: str
    unit: str = "line"

    def __str__(self) -> str:
        return f"{self.source} {self.unit} {self.line}: {self.message}"


@dataclass
class Dataset:
    """Valid rows of one format, plus what was dropped."""

    format: Format
    rows: list[Row]
    skipped: list[RowProblem] = field(default_factory=list)


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: labels are IGNORE_INDEX where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    #: Whether the example was longer than maxSeqLength and cut to it (counted in the data stats).
    truncated: bool = field(default=False, compare=False)

    @property
    def supervised(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def data_files(path: Path) -> list[Path]:
    """The data files at `path`: the file itself, or the supported files in a directory (name order)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
        if not files:
            raise DataError(f"no data files ({', '.join(SUFFIXES)}) under {path}")
        return files
    if not path.name.endswith(SUFFIXES):
        raise DataError(f"unsupported data file {path.name!r}; use one of {', '.join(SUFFIXES)}")
    return [path]


def read_file(path: Path, source: str) -> tuple[list[Row], list[RowProblem]]:
    """Rows of one file and the rows that cannot be read (not JSON, not UTF-8, over MAX_ROW_BYTES)."""
    if path.name.endswith(".parquet"):
        return _read_parquet(path, source)
    if path.name.endswith(".json") and _first_byte(path) == b"[":
        return _sized(_read_json_array(path.read_bytes(), source), path.stat().st_size)
    return _read_jsonl(path, source)


def _first_byte(path: Path) -> bytes:
    """The first byte that is not whitespace (or a UTF-8 byte order mark), b"" for an empty file."""
    with open(path, "rb") as fh:
        head = fh.read(len(_BOM))
        head = head[len(_BOM):] if head == _BOM else head
        while head or (head := fh.read(_CHUNK)):
            stripped = head.lstrip()
            if stripped:
                return stripped[:1]
            head = b""
    return b""


def _too_big(size: int) -> str:
    return (f"the row is {size / 2**20:.1f} MiB, over the {MAX_ROW_BYTES >> 20} MiB limit per row; split it "
            "into smaller rows")


def _sized(rows: list[Row], data_bytes: int) -> tuple[list[Row], list[RowProblem]]:
    """Rows of a file read whole, with those over MAX_ROW_BYTES (as compact JSON) turned into problems.
    Checked only when the file's data (`data_bytes`) is bigger than the limit: no row of less can exceed it."""
    if data_bytes <= MAX_ROW_BYTES:
        return rows, []
    kept: list[Row] = []
    problems: list[RowProblem] = []
    for row in rows:
        size = len(json.dumps(row.data, ensure_ascii=False, separators=(",", ":"), default=str).encode())
        if size > MAX_ROW_BYTES:
            problems.append(RowProblem(row.source, row.line, _too_big(size), row.unit))
        else:
            kept.append(row)
    return kept, problems


def _read_parquet(path: Path, source: str) -> tuple[list[Row], list[RowProblem]]:
    import pyarrow.parquet as pq
    from pyarrow import ArrowException

    try:
        table = pq.read_table(path)
        records = table.to_pylist()
    except (ArrowException, OSError) as err:
        raise DataError(f"{source} is not a readable Parquet file: {err}") from None
    # The file is compressed: its decoded size (doubled for JSON's keys and quotes) bounds the rows' size.
    return _sized([Row(rec, source, i + 1, "row") for i, rec in enumerate(records)], 2 * table.nbytes)


def _decode(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{source} line {line}: not UTF-8 (byte {raw[err.start]:#04x} at offset {err.start}); "
            "save the file as UTF-8"
        ) from None


def _read_json_array(raw: bytes, source: str) -> list[Row]:
    text = _decode(raw.removeprefix(_BOM), source)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{source} line {err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(records, list):
        raise DataError(f"{source}: a .json data file must hold an array of objects or JSON Lines")
    # Positions in an array have no line numbers of their own; the record index (1-based) stands in.
    return [Row(rec, source, i + 1, "record") for i, rec in enumerate(records)]


def _lines(path: Path) -> Iterable[tuple[int, bytes | int]]:
    """(line number, content without the newline) of every line, or (line number, size) for a line over
    MAX_ROW_BYTES, whose content is skipped without being held in memory."""
    with open(path, "rb") as fh:
        number = 0
        while line := fh.readline(MAX_ROW_BYTES + 1):
            number += 1
            if number == 1 and line.startswith(_BOM):
                line = line[len(_BOM):]
            if line.endswith(b"\n"):
                yield number, line[:-1]
                continue
            if len(line) <= MAX_ROW_BYTES:  # the last line, without a newline
                yield number, line
                continue
            size = len(line)
            while (more := fh.readline(_CHUNK)) and not more.endswith(b"\n"):
                size += len(more)
            size += len(more.rstrip(b"\n"))
            yield number, size


def _read_jsonl(path: Path, source: str) -> tuple[list[Row], list[RowProblem]]:
    rows: list[Row] = []
    problems: list[RowProblem] = []
    for number, line in _lines(path):
        if isinstance(line, int):
            problems.append(RowProblem(source, number, _too_big(line)))
            continue
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            problems.append(RowProblem(source, number, f"not UTF-8 (byte {line[err.start]:#04x}); save as UTF-8"))
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            problems.append(RowProblem(source, number, f"invalid JSON at column {err.colno}: {err.msg}"))
            continue
        rows.append(Row(record, source, number))
    return rows, problems


# ------------------------------------------------------------------------------------------------
# Formats
# ------------------------------------------------------------------------------------------------


def _keys(record: Any) -> str:
    # Keys with a null value do not count: Parquet gives every row every column of the file, null where unset.
    if not isinstance(record, dict):
        return f"(not an object: {type(record).__name__})"
    return ", ".join(sorted(k for k, v in record.items() if v is not None))


def row_problem(record: Any, fmt: Format) -> str | None:
    """Why `record` is not a valid `fmt` row, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, found {type(record).__name__}"
    expected = f"format {fmt} expects {EXPECTED_KEYS[fmt]}; found keys: {_keys(record)}"
    if fmt == "instruction":
        for key in ("instruction", "output"):
            if record.get(key) is None:
                return f"missing key {key!r} ({expected})"
            if not isinstance(record[key], str) or not record[key].strip():
                return f"{key!r} must be a non-empty string"
        if record.get("input") is not None and not isinstance(record["input"], str):
            return "'input' must be a string when present"
        return None
    if fmt == "text":
        if record.get("text") is None:
            return f"missing key 'text' ({expected})"
        if not isinstance(record["text"], str) or not record["text"].strip():
            return "'text' must be a non-empty string"
        return None
    messages = record.get("messages")
    if messages is None:
        return f"missing key 'messages' ({expected})"
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"messages[{i}] needs a role of {', '.join(ROLES)}"
        if not isinstance(message.get("content"), str):
            return f"messages[{i}].content must be a string"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return "no assistant message with content (nothing to learn from)"
    return None


def _format_of(keys: set[str]) -> Format | None:
    if "messages" in keys:
        return "chat"
    if {"instruction", "output"} <= keys:
        return "instruction"
    if "text" in keys:
        return "text"
    return None


def detect_format(rows: Sequence[Row]) -> Format:
    """The format of the first object row whose keys fit one (so one malformed first row does not decide
    the format of a whole file); DataError listing found and expected keys if no row fits."""
    objects = [row for row in rows if isinstance(row.data, dict)]
    if not objects:
        raise DataError("cannot detect the data format: no row is a JSON object")
    for row in objects:
        fmt = _format_of(set(row.data))
        if fmt is not None:
            return fmt
    first = objects[0]
    expected = "; ".join(f"{name}: {keys}" for name, keys in EXPECTED_KEYS.items())
    raise DataError(
        f"cannot detect the data format of {first.source} ({first.unit} {first.line}): rows have keys "
        f"[{_keys(first.data)}]; expected {expected}. Rename the keys or set spec.dataset.format",
        reason="UnknownFormat",
    )


def load_dataset(
    files: Iterable[tuple[Path, str]], declared: str, invalid_rows: str, what: str = "spec.dataset.train"
) -> Dataset:
    """Read and check every row of `files` ((local path, source URI) pairs).

    `invalid_rows="fail"` raises a DataError naming the first offending rows; `"skip"` drops them and
    records them in `Dataset.skipped`.
    """
    fmt, valid, problems = check_rows(
        files, declared, invalid_rows, what, detect=detect_format, problem=row_problem, fallback="text",
        checked=lambda fmt: f"format {fmt}", empty="add rows or point it at the data")
    return Dataset(fmt, valid, problems)  # type: ignore[arg-type]


def check_rows(files: Iterable[tuple[Path, str]], declared: str, invalid_rows: str, what: str, *,
               detect: Callable[[Sequence[Row]], str], problem: Callable[[Any, Any], str | None], fallback: str,
               checked: Callable[[str], str], empty: str) -> tuple[str, list[Row], list[RowProblem]]:
    """Every row of `files` read and checked against one row format: the declared one, else the one `detect`
    finds (`fallback` names what a file of non-object rows is checked as: any format refuses them). Returns
    the format, the valid rows and the problems; with `invalid_rows="fail"` a problem raises a DataError
    naming the first offending rows (file, line, field), and no valid row at all is one too (EmptyDataset).
    `checked` words the format in that message; `empty` says what to do about empty files."""
    rows: list[Row] = []
    problems: list[RowProblem] = []
    sources: list[str] = []
    for path, source in files:
        got, bad = read_file(path, source)
        rows.extend(got)
        problems.extend(bad)
        sources.append(source)
    if not rows and not problems:
        raise DataError(f"{what} has no valid rows: {', '.join(sources)} {'is' if len(sources) == 1 else 'are'} "
                        f"empty (no row is a JSON object, only blank lines); {empty}", reason="EmptyDataset")
    # With no object row at all there is no format to detect: every row is named as not an object.
    fmt = declared if declared != "auto" else (
        detect(rows) if any(isinstance(row.data, dict) for row in rows) else None)
    valid: list[Row] = []
    for row in rows:
        message = problem(row.data, fmt or fallback)  # (a non-object row fails before the format matters)
        if message is None:
            valid.append(row)
        else:
            problems.append(RowProblem(row.source, row.line, message, row.unit))
    problems.sort(key=lambda p: (p.source, p.line))
    named = "; ".join(str(p) for p in problems[:MAX_NAMED_ROWS])
    more = f" (and {len(problems) - MAX_NAMED_ROWS} more)" if len(problems) > MAX_NAMED_ROWS else ""
    if problems and invalid_rows == "fail":
        raise DataError(
            f"{len(problems)} invalid row(s) in {what} ({checked(fmt) if fmt else 'no row is a JSON object'}): "
            f"{named}{more}. Fix them, or set spec.dataset.invalidRows: skip to drop them"
        )
    if not valid:
        raise DataError(f"{what} has no valid rows: all {len(problems)} row(s) are invalid and were skipped: "
                        f"{named}{more}", reason="EmptyDataset")
    assert fmt is not None  # valid rows are objects, so a format was declared or detected
    return fmt, valid, problems


def split_holdout(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """(kept, held out): a seeded random `fraction` of the rows (at least one) held out."""
    if len(rows) < 2:
        raise DataError(f"cannot hold out a validation split from {len(rows)} training row(s)")
    count = min(len(rows) - 1, max(1, round(len(rows) * fraction)))
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# ------------------------------------------------------------------------------------------------
# Rendering and tokenizing
# ------------------------------------------------------------------------------------------------


def instruction_prompt(record: dict[str, Any]) -> str:
    """The prompt text of an instruction row (training and evaluation use the same), after the row's
    retrieved passages when it carries them (`retrieval.augment`)."""
    context = record.get(CONTEXT_KEY) or ""
    if record.get("input"):
        return context + PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return context + PROMPT_NO_INPUT.format(instruction=record["instruction"])


def _render_chat(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return str(
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        )
    text = "".join(FALLBACK_TURN.format(role=m["role"], content=m["content"]) for m in messages)
    return text + (FALLBACK_GENERATION if generation_prompt else "")


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The text a model continues to answer after `messages`."""
    return _render_chat(tokenizer, messages, generation_prompt=True)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _chat_segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """(text, supervised) pieces whose concatenation is the rendered conversation.

    The template is rendered for every prefix of the conversation; the difference between consecutive
    renders is one turn. Assistant turns are split into the generation prompt (not supervised) and the
    answer (supervised). Templates that are not prefix-stable fall back to the plain template.
    """
    templated = bool(getattr(tokenizer, "chat_template", None))
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = _render_chat(tokenizer, messages[:i], generation_prompt=True) if i else ""
            if not templated:
                prompt = done + FALLBACK_GENERATION
            full = _render_chat(tokenizer, messages[: i + 1], generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                return _fallback_segments(messages)
            segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        else:
            full = _render_chat(tokenizer, messages[: i + 1], generation_prompt=False)
            if not full.startswith(done):
                return _fallback_segments(messages)
            segments.append((full[len(done):], False))
        done = full
    return segments


def _fallback_segments(messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    segments: list[tuple[str, bool]] = []
    for m in messages:
        if m["role"] == "assistant":
            segments += [(FALLBACK_GENERATION, False), (m["content"] + "\n", True)]
        else:
            segments.append((FALLBACK_TURN.format(role=m["role"], content=m["content"]), False))
    return segments


def encode(record: dict[str, Any], fmt: Format, tokenizer: Any, max_length: int) -> Encoded | None:
    """Tokenize one valid row; None when truncation leaves no supervised token.

    The first label of every example is IGNORE_INDEX: nothing inside the example predicts it, and in a
    packed row the previous example's last token must not be trained to predict it.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pieces: list[tuple[list[int], bool]]
    if fmt == "instruction":
        pieces = [(bos, False), (_ids(tokenizer, instruction_prompt(record)), False),
                  (_ids(tokenizer, record["output"]) + eos, True)]
    elif fmt == "text":
        pieces = [(bos + _ids(tokenizer, record["text"]) + eos, True)]
    else:
        templated = bool(getattr(tokenizer, "chat_template", None))
        # Chat templates put the BOS in the rendered text themselves; the plain template does not.
        pieces = [] if templated else [(bos, False)]
        segments = _chat_segments(tokenizer, record["messages"])
        for text, supervised in segments:
            ids = _ids(tokenizer, text)
            # The plain template has no end-of-turn token: end every answer with EOS so the model learns
            # to stop. Chat templates end turns themselves.
            if supervised and eos and not templated:
                ids = ids + eos
            pieces.append((ids, supervised))
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, supervised in pieces:
        input_ids += ids
        labels += ids if supervised else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > max_length
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if labels:
        labels[0] = IGNORE_INDEX
    example = Encoded(input_ids, labels, truncated)
    return example if example.supervised else None


def encode_all(rows: Sequence[Row], fmt: Format, tokenizer: Any, max_length: int) -> tuple[list[Encoded], int]:
    """Encoded examples and how many rows were dropped because truncation left nothing to learn."""
    out: list[Encoded] = []
    dropped = 0
    for row in rows:
        example = encode(row.data, fmt, tokenizer, max_length)
        if example is None:
            dropped += 1
        else:
            out.append(example)
    return out, dropped


@dataclass(frozen=True)
class EvalItem:
    """What the evaluation generates from and scores against."""

    prompt: str
    reference: str
    context: str


def eval_item(record: dict[str, Any], fmt: Format, tokenizer: Any) -> EvalItem:
    """Prompt, reference answer and context (what the answer may draw on) of one row.

    Chat: the conversation up to its last assistant turn, which is the reference. Text has no question and
    answer: the first half of its words is the prompt and the rest the reference.
    """
    if fmt == "instruction":
        context = record["instruction"] + ("\n" + record["input"] if record.get("input") else "")
        # Retrieved passages are context too: a fact taken from them is supported, not hallucinated.
        context = (record.get(CONTEXT_KEY) or "") + context
        return EvalItem(instruction_prompt(record), record["output"], context)
    if fmt == "chat":
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        context = "\n".join(m["content"] for m in messages[:last])
        return EvalItem(chat_prompt(tokenizer, messages[:last]), messages[last]["content"], context)
    words = record["text"].split(" ")
    half = max(1, len(words) // 2)
    prompt = " ".join(words[:half])
    return EvalItem(prompt, " ".join(words[half:]), prompt)


# ------------------------------------------------------------------------------------------------
# Packing, batch plans and collation
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Packed:
    """Several examples in one row; position ids restart at 0 at every example boundary."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def pack(examples: Sequence[Encoded], max_length: int, seed: int) -> list[Packed]:
    """Concatenate examples (in a seeded shuffled order) into rows of at most `max_length` tokens."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    rows: list[Packed] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for index in order:
        example = examples[index]
        if ids and len(ids) + len(example.input_ids) > max_length:
            rows.append(Packed(ids, labels, positions))
            ids, labels, positions = [], [], []
        ids = ids + example.input_ids
        labels = labels + example.labels
        positions = positions + list(range(len(example.input_ids)))
    if ids:
        rows.append(Packed(ids, labels, positions))
    return rows


def batch_plan(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool,
               step_batches: int = 1, world: int = 1) -> list[list[int]]:
    """The epoch's batches as lists of item indices, deterministic in (seed, epoch, world).

    Items are shuffled and cut into batches. With `group_by_length`, the shuffled order is first cut into
    windows of one optimizer step (`step_batches` batches per process, the gradient accumulation steps, times
    `world` processes), each window is sorted by length and cut into batches. Each batch then holds similar
    lengths and pads little, while the examples of every optimizer step stay a uniform random sample: the
    step's loss is token-weighted over all its micro-batches, so how a window is split changes only the
    padding. (Sorting larger groups, across steps, pads even less but makes each step's examples alike in
    length, and so in kind: measured, it trained to a higher loss in the same steps; see
    bench/throughput_bench.py.)

    With one process the batches of a window are shuffled. With several, `shard` deals a step's batches to
    the ranks in rounds of `world` consecutive batches, and the batches are ordered so that every rank gets
    about the same tokens: sorted longest first, each to the rank with the fewest tokens so far (`_deal`). Ranks wait for each other at every step's gradient exchange,
    so the step takes as long as its slowest rank: with a shuffled deal of the length-sorted batches the ranks
    were busy 79-83% of the wall time (bench/results/scaling-2core-20261202.txt). The batches are those one
    process would train on the same step's examples, whatever the world size.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length or step_batches * world <= 1:  # one batch per step: nothing to group
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * step_batches * world
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        ranked = sorted(order[start:start + window], key=lambda j: -lengths[j])
        chunk = [ranked[i:i + batch_size] for i in range(0, len(ranked), batch_size)]
        if world == 1:
            rng.shuffle(chunk)
            batches += chunk
        else:
            batches += _deal(chunk, world, [max(lengths[j] for j in b) * len(b) for b in chunk], rng)
    return batches


def _deal(chunk: list[list[int]], world: int, costs: list[int], rng: random.Random) -> list[list[int]]:
    """`chunk`'s batches (longest first) reordered in rounds of `world`, one batch per rank (what `shard`
    takes), so that every rank's padded tokens add up to about the same: each batch, longest first, goes to the
    rank with the fewest tokens so far that still takes batches (every rank takes the same number); ranks are
    visited in an order drawn per window, so no rank always gets the longest."""
    ranks = list(range(world))
    rng.shuffle(ranks)
    room = -(-len(chunk) // world)
    mine: dict[int, list[list[int]]] = {r: [] for r in ranks}
    load = dict.fromkeys(ranks, 0)
    for batch, cost in zip(chunk, costs, strict=True):
        r = min((r for r in ranks if len(mine[r]) < room), key=lambda r: load[r])
        mine[r].append(batch)
        load[r] += cost
    return [mine[r][k] for k in range(room) for r in range(world) if k < len(mine[r])]


def shard(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """This rank's batches: every world-th, cut so every rank gets the same number (ranks stay in step)."""
    per_rank = len(batches) // world
    return batches[rank::world][:per_rank]


def collate(items: Sequence[Encoded | Packed], pad_id: int) -> dict[str, Any]:
    """Tensors for one batch, padded to the batch's longest row (never to maxSeqLength).

    Packed rows get no attention mask (see the module docstring); their padding tail is given position
    ids from 0, which makes it a segment of its own that no real token attends to, and labels that are
    ignored. Unpacked rows are right-padded with an attention mask.
    """
    import torch

    width = max(len(item.input_ids) for item in items)
    input_ids, labels = [], []
    for item in items:
        pad = width - len(item.input_ids)
        input_ids.append(item.input_ids + [pad_id] * pad)
        labels.append(item.labels + [IGNORE_INDEX] * pad)
    batch: dict[str, Any] = {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }
    tokens = sum(len(item.input_ids) for item in items)
    if isinstance(items[0], Packed):
        positions = [item.position_ids + list(range(width - len(item.input_ids))) for item in items]  # type: ignore[union-attr]
        batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
    else:
        mask = [[1] * len(item.input_ids) + [0] * (width - len(item.input_ids)) for item in items]
        batch["attention_mask"] = torch.tensor(mask, dtype=torch.long)
    batch["num_tokens"] = tokens
    return batch


def steps_per_epoch(batches_per_rank: int, accumulation: int) -> int:
    return math.ceil(batches_per_rank / accumulation)
