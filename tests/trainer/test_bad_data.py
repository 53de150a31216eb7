"""Bad training data: every kind ends the run with a DataError (exit code 3) whose reason and message name
the first offending rows by file and line (record for JSON arrays, row for Parquet), and leaves nothing
marked complete. Under `spec.dataset.invalidRows: skip` the bad rows are dropped and counted in the
progress report's `dataStats`, the log, the model card and provenance.json.

Row size limit (dataset.MAX_ROW_BYTES, 8 MiB): a longer row is an invalid row like any other. A 50 MB line
is read with bounded memory (checked with tracemalloc), never whole.
"""

from __future__ import annotations

import json
import logging
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.contract import EXIT_CONFIG_ERROR, MARKER_NAME, REPORT_KEY
from finetune_trainer import dataset as ds
from finetune_trainer.errors import DataError
from tests.trainer import train_helpers as th

GOOD = {"instruction": "What is the usual adult dose?", "input": "metformin", "output": "500 mg twice daily."}
HUGE_BYTES = 50 * 2**20


@pytest.fixture(scope="module")
def staged(s3: Any, tiny_model_dir: Path, healthcare_sample: Any) -> th.Staged:
    return th.stage_in_new_bucket(s3, "baddata", tiny_model_dir, healthcare_sample)


def _lines(*rows: Any) -> bytes:
    """JSONL bytes: dicts are dumped, bytes are taken as they are (a raw, possibly broken line)."""
    return b"".join((row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n" for row in rows)


def _huge_line_file(path: Path, size: int = HUGE_BYTES, before: int = 2) -> Path:
    """`before` good rows, then one `{"text": "aaa..."}` line of `size` bytes, then a good row; written in
    1 MiB pieces so the test itself never holds the line."""
    with open(path, "wb") as fh:
        fh.write(_lines(*[GOOD] * before))
        fh.write(b'{"instruction": "summarize", "output": "')
        left = size - 42
        while left > 0:
            fh.write(b"a" * min(left, 2**20))
            left -= 2**20
        fh.write(b'"}\n')
        fh.write(_lines(GOOD))
    return path


def _parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# -- the reader, in-process (no model) ------------------------------------------------------------------


def test_a_50mb_line_is_refused_with_bounded_memory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _huge_line_file(tmp_path / "huge.jsonl")
    tracemalloc.start()
    try:
        rows, problems = ds.read_file(path, "s3://b/huge.jsonl")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # One capped read (8 MiB; readline joins its pieces, so twice that at its peak) is held at a time, whatever
    # the line's size; reading the file whole would peak above 50 MiB.
    assert peak < 2 * ds.MAX_ROW_BYTES + 4 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert [r.line for r in rows] == [1, 2, 4]
    assert [str(p) for p in problems] == [
        "s3://b/huge.jsonl line 3: the row is 50.0 MiB, over the 8 MiB limit per row; split it into smaller rows"]
    figure(capsys, f"50 MiB line: refused (named: line 3), reader peak {peak / 2**20:.1f} MiB")


def test_a_file_without_newlines_over_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "one.json"  # JSON Lines under a .json name: streamed too
    with open(path, "wb") as fh:
        fh.write(b'{"text": "' + b"b" * (ds.MAX_ROW_BYTES + 10) + b'"}')  # no trailing newline
    rows, problems = ds.read_file(path, "one.json")
    assert rows == [] and len(problems) == 1 and problems[0].line == 1 and "8 MiB limit" in problems[0].message
    # one byte under the limit is fine
    path.write_bytes(b'{"text": "' + b"b" * (ds.MAX_ROW_BYTES - 12) + b'"}')
    rows, problems = ds.read_file(path, "one.json")
    assert problems == [] and len(rows) == 1


def test_oversized_records_in_arrays_and_parquet_are_named(tmp_path: Path) -> None:
    big = {"instruction": "q", "output": "c" * (ds.MAX_ROW_BYTES + 1)}
    array = tmp_path / "a.json"
    array.write_text(json.dumps([GOOD, big, GOOD]))
    table = _parquet(tmp_path / "p.parquet", [GOOD, GOOD, big])
    with pytest.raises(DataError) as err:
        ds.load_dataset([(array, "a.json"), (table, "p.parquet")], "auto", "fail")
    assert "2 invalid row(s)" in err.value.message
    assert "a.json record 2: the row is 8.0 MiB, over the 8 MiB limit" in err.value.message
    assert "p.parquet row 3: the row is 8.0 MiB" in err.value.message


def test_a_bom_and_crlf_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "win.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _lines(GOOD, GOOD).replace(b"\n", b"\r\n"))
    loaded = ds.load_dataset([(path, "win.jsonl")], "auto", "fail")
    assert loaded.format == "instruction" and len(loaded.rows) == 2


def test_one_bad_first_row_does_not_decide_the_format(tmp_path: Path) -> None:
    """`format: auto` with skip: the format comes from the first row that fits one, and the bad first row is
    skipped (it used to make the whole file an unknown format)."""
    path = tmp_path / "t.jsonl"
    path.write_bytes(_lines({"instruction": "no output"}, GOOD, GOOD))
    loaded = ds.load_dataset([(path, "t.jsonl")], "auto", "skip")
    assert loaded.format == "instruction" and len(loaded.rows) == 2
    assert [str(p).split(" (")[0] for p in loaded.skipped] == ["t.jsonl line 1: missing key 'output'"]


# -- through the trainer: exit code 3, the reason, the offending rows, nothing complete ------------------


@dataclass(frozen=True)
class Case:
    name: str
    file: str
    write: Callable[[Path], None]
    reason: str
    #: Fragments of the error message; "{uri}" is replaced by the data file's URI.
    fragments: tuple[str, ...]
    spec: dict[str, Any] | None = None


def _bytes(data: bytes) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_bytes(data)

    return write


def _huge(path: Path) -> None:
    _huge_line_file(path)


def _table(rows: list[dict[str, Any]]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        _parquet(path, rows)

    return write


def figure(capsys: pytest.CaptureFixture[str], text: str) -> None:
    """Print a measured figure for the README's reliability section, past pytest's capture."""
    with capsys.disabled():
        print(f"\n[bad-data] {text}")


CASES = [
    Case("malformed-jsonl", "train.jsonl",
         _bytes(_lines(GOOD, GOOD, b'{"instruction": "x", "output": ', GOOD, GOOD, GOOD, b"not json", GOOD)),
         "InvalidData", ("2 invalid row(s)", "{uri} line 3: invalid JSON", "{uri} line 7: invalid JSON",
                         "invalidRows: skip")),
    Case("empty-file", "train.jsonl", _bytes(b""), "EmptyDataset", ("has no valid rows: {uri} is empty",)),
    Case("blank-lines-only", "train.jsonl", _bytes(b"\n   \n\r\n\t\n"), "EmptyDataset", ("{uri} is empty",)),
    Case("all-invalid-under-skip", "train.jsonl", _bytes(_lines(*[{"instruction": "q", "answer": "a"}] * 6)),
         "EmptyDataset", ("all 6 row(s) are invalid and were skipped", "{uri} line 1: missing key 'output'",
                          "(and 1 more)"), {"dataset": {"invalidRows": "skip", "format": "instruction"}}),
    Case("wrong-keys-declared", "train.jsonl", _bytes(_lines(GOOD, {"prompt": "q", "completion": "a"}, GOOD)),
         "InvalidData", ("{uri} line 2: missing key 'instruction'", "found keys: completion, prompt"),
         {"dataset": {"format": "instruction"}}),
    Case("wrong-keys-auto", "train.jsonl", _bytes(_lines(*[{"prompt": "q", "completion": "a"}] * 3)),
         "UnknownFormat", ("{uri} (line 1)", "[completion, prompt]")),
    Case("huge-line", "train.jsonl", _huge, "InvalidData",
         ("{uri} line 3: the row is 50.0 MiB, over the 8 MiB limit per row",)),
    Case("non-utf8", "train.jsonl", _bytes(_lines(GOOD, '{"instruction": "caf\u00e9", "output": "x"}'.encode("latin-1"),
                                                  GOOD)),
         "InvalidData", ("{uri} line 2: not UTF-8 (byte 0xe9)",)),
    Case("json-array-of-non-objects", "train.json", _bytes(b'[1, "two", ["three"]]'), "InvalidData",
         ("3 invalid row(s) in spec.dataset.train (no row is a JSON object)",
          "{uri} record 1: expected a JSON object, found int", "{uri} record 2: expected a JSON object, found str")),
    Case("parquet-wrong-columns", "train.parquet",
         _table([{"question": "q", "answer": "a"}] * 4), "UnknownFormat",
         ("{uri} (row 1)", "[answer, question]")),
    Case("parquet-wrong-columns-declared", "train.parquet",
         _table([GOOD, {"question": "q", "answer": "a"}]), "InvalidData",
         ("{uri} row 2: missing key 'instruction'",), {"dataset": {"format": "instruction"}}),
]


def _keys(s3: Any, output: str) -> list[str]:
    bucket, _, prefix = output[len("s3://"):].partition("/")
    listed = s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return [obj["Key"][len(prefix):] for obj in listed]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_data_fails_clearly(case: Case, s3: Any, s3_env: Any, staged: th.Staged, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    local = tmp_path / case.file
    case.write(local)
    key = f"bad-{case.name}/{case.file}"
    s3.client().upload_file(str(local), staged.bucket, key)
    uri = f"s3://{staged.bucket}/{key}"
    spec = th._merge({"dataset": {"train": uri}}, case.spec or {})
    config = th.make_config(staged, spec)
    output = config.spec.output.uri

    assert th.exit_code_in_process(config) == EXIT_CONFIG_ERROR
    bucket, _, prefix = output[len("s3://"):].partition("/")
    report = json.loads(s3.client().get_object(Bucket=bucket, Key=prefix + REPORT_KEY)["Body"].read())
    assert report["phase"] == "failed"
    error = report["error"]
    assert error["reason"] == case.reason, error
    for fragment in case.fragments:
        assert fragment.format(uri=uri) in error["message"], error["message"]
    keys = _keys(s3, output)
    assert not any(k.endswith(MARKER_NAME) for k in keys), keys  # nothing partial marked complete
    assert not any(k.startswith(("checkpoints/", "model/")) for k in keys), keys
    figure(capsys, f"{case.name}: exit 3, {error['reason']}, nothing complete: {error['message'][:150]}")


def test_skip_reports_what_was_dropped(s3: Any, s3_env: Any, staged: th.Staged, tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    """invalidRows: skip trains on the good rows and reports the counts: dataStats in the progress report,
    the log, the model card and provenance.json."""
    sample = [json.loads(line) for line in th.REPO.joinpath(
        "trainer-image/finetune_trainer/data/healthcare_train.jsonl").read_text().splitlines()[:24]]
    long_answer = {"instruction": "Summarize.", "output": "word " * 400}  # cut at maxSeqLength, kept
    long_prompt = {"instruction": "word " * 400, "output": "short"}  # no answer token left: dropped
    bad = [b'{"instruction": "broken', {"instruction": "q"}, '{"output": "\u00e9"}'.encode("latin-1"),
           [1, 2], {"text": "x" * (ds.MAX_ROW_BYTES + 1)}]
    rows = sample[:8] + bad[:2] + sample[8:16] + [long_answer, long_prompt, long_answer] + bad[2:] + sample[16:]
    train = tmp_path / "train.jsonl"
    train.write_bytes(_lines(*[json.dumps(r).encode() if isinstance(r, list) else r for r in rows]))
    validation = tmp_path / "validation.jsonl"
    validation.write_bytes(_lines(*sample[:5], b"{oops"))
    client = s3.client()
    client.upload_file(str(train), staged.bucket, "skip/train.jsonl")
    client.upload_file(str(validation), staged.bucket, "skip/validation.jsonl")
    config = th.make_config(staged, {
        "dataset": {"train": f"s3://{staged.bucket}/skip/train.jsonl", "invalidRows": "skip",
                    "validation": f"s3://{staged.bucket}/skip/validation.jsonl"},
        "hyperparameters": {"maxSteps": 2, "maxSeqLength": 512},
        "evaluation": {"enabled": False},
        "compliance": {"provenanceRequired": True},
    })
    caplog.set_level(logging.INFO, logger="finetune_trainer")
    outcome = th.run_in_process(config)
    assert outcome.state.step == 2

    from finetune_trainer.storage import Store

    store = Store.for_uri(config.spec.output.uri)
    expected = {"trainExamples": 24 + 2, "validationExamples": 5, "skippedRows": 5 + 1, "truncatedExamples": 3}
    assert store.read_json(REPORT_KEY)["dataStats"] == expected
    assert store.read_json("provenance.json")["dataStats"] == expected
    card = store.read_bytes("README.md").decode()
    assert "| skipped_rows | 6 |" in card and "| examples_truncated | 3 |" in card, card
    log = caplog.text
    assert "spec.dataset.train: skipped 5 invalid row(s), first: " in log
    assert "spec.dataset.validation: skipped 1 invalid row(s)" in log
    assert "26 training examples (instruction), 5 validation" in log and "6 invalid row(s) skipped" in log
    assert "3 example(s) truncated to maxSeqLength (1 of them dropped" in log
    assert store.is_complete("")
    figure(capsys, f"invalidRows: skip: {len(rows)} training rows read, dataStats {expected}")
