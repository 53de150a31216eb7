"""spec.retrieval in the trainer: the corpus cut into passages, the BM25 index (built, searched, saved and
loaded), RAFT's distractor share, the prompt layout (training, evaluation and the model card alike), and a
tiny run whose evaluation has the with- and without-retrieval columns, the index as an artifact and the
corpus sha256 in provenance."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.contract import MARKER_NAME, REPORT_KEY
from finetune_trainer import dataset as ds
from finetune_trainer import retrieval as rag
from finetune_trainer.errors import DataError
from tests.trainer import train_helpers as th

CORPUS = Path(__file__).resolve().parents[2] / "trainer-image" / "finetune_trainer" / "data" / "healthcare_corpus.jsonl"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def handbook(tokenizer: Any) -> rag.Retriever:
    documents = rag.read_documents(rag.corpus_files(CORPUS, "s3://b/corpus.jsonl"))
    return rag.Retriever.build(rag.build_passages(documents, tokenizer, 48), top_k=2)


# ------------------------------------------------------------------------------------------------
# Corpus and passages
# ------------------------------------------------------------------------------------------------


def test_passages_are_whole_sentences_within_chunk_tokens(tokenizer: Any) -> None:
    text = ("Metformin is given by mouth. The usual adult dose is 500 mg twice daily.\n\n"
            "Do not exceed 2550 mg in 24 hours. " + "Take it with meals and water every day " * 6 + "now.")
    for limit in (16, 24, 40):
        passages = rag.chunk(text, tokenizer, limit)
        assert passages and all(len(tokenizer(p, add_special_tokens=False).input_ids) <= limit for p in passages)
        assert " ".join(passages).split() == text.split()  # nothing lost or reordered, whitespace collapsed
    passages = rag.chunk(text, tokenizer, 40)
    assert passages[0].startswith("Metformin is given by mouth.") and passages[0].endswith(".")
    assert all("\n" not in p for p in passages)
    # A passage never spans two documents.
    split = rag.build_passages([("First document.", "a"), ("Second document.", "b")], tokenizer, 64)
    assert [(p.text, p.source, p.document) for p in split] == [("First document.", "a", 0),
                                                               ("Second document.", "b", 1)]


def test_corpus_formats_and_errors_name_the_file_and_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl").write_text(json.dumps({"title": "Sodium", "text": "Range 135-145."}) + "\n")
    (tmp_path / "c" / "b.txt").write_text("A whole file is one document.\nSecond line.\n")
    pq.write_table(pa.table({"text": ["From Parquet."]}), tmp_path / "c" / "c.parquet")
    (tmp_path / "c" / "ignored.csv").write_text("x\n")
    files = rag.corpus_files(tmp_path / "c", "s3://b/c/")
    assert [uri for _, uri in files] == ["s3://b/c/a.jsonl", "s3://b/c/b.txt", "s3://b/c/c.parquet"]
    assert [text for text, _ in rag.read_documents(files)] == [
        "Sodium: Range 135-145.", "A whole file is one document.\nSecond line.\n", "From Parquet."]

    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"spec.retrieval.corpus: s3://b/bad.jsonl line 2: .*`text`"):
        rag.read_documents(rag.corpus_files(tmp_path / "bad.jsonl", "s3://b/bad.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no corpus files") as err:
        rag.corpus_files(tmp_path / "empty", "s3://b/empty/")
    assert err.value.reason == "EmptyCorpus"


# ------------------------------------------------------------------------------------------------
# The index
# ------------------------------------------------------------------------------------------------


def test_the_index_finds_the_passage_that_answers(handbook: rag.Retriever) -> None:
    questions = ["What is the usual adult dose of this medication?\nmetformin",
                 "Interpret this lab result for an adult patient.\nmagnesium: 2.5 mg/dL",
                 "What diagnosis does this ICD-10-CM code describe?\nK21.9"]
    found = handbook.search(questions)
    assert [len(ids) for ids in found] == [2, 2, 2]
    assert "Medication: metformin" in handbook.texts(found[0])[0]
    assert "Laboratory: magnesium" in handbook.texts(found[1])[0]
    assert "K21.9" in handbook.texts(found[2])[0]
    assert handbook.search(["zzzz qqqq"]) == [[]]  # no shared word: no passage, not arbitrary ones
    assert handbook.search(questions) == found  # deterministic


def test_the_index_is_saved_and_loads_to_the_same_retriever(handbook: rag.Retriever, tmp_path: Path) -> None:
    handbook.save(tmp_path / "retrieval")
    assert {p.name for p in (tmp_path / "retrieval").iterdir()} == {"index", "passages.jsonl", "retriever.json"}
    loaded = rag.Retriever.load(tmp_path / "retrieval")
    questions = ["How is lisinopril usually dosed in adults?", "Expand this clinical abbreviation.\nBID"]
    assert loaded.search(questions) == handbook.search(questions)
    assert loaded.passages == handbook.passages and loaded.top_k == 2
    record = json.loads((tmp_path / "retrieval" / "retriever.json").read_text())
    assert record["layout"]["example"] == rag.render_instruction_prompt(
        "<instruction>", "<input>", ["<passage 1>", "<passage 2>"])


# ------------------------------------------------------------------------------------------------
# RAFT and the prompt layout
# ------------------------------------------------------------------------------------------------


def test_raft_distractor_share_is_exact_seeded_and_excludes_the_retrieved(handbook: rag.Retriever) -> None:
    chosen = rag.distractor_rows(100, 0.2, seed=7)
    assert len(chosen) == 20 and chosen == rag.distractor_rows(100, 0.2, seed=7)
    assert chosen != rag.distractor_rows(100, 0.2, seed=8)
    assert rag.distractor_rows(100, 0.0, seed=7) == set()
    retrieved = handbook.search(["metformin dose"])[0]
    picked = rag.distractors(retrieved, 2, len(handbook.passages), seed=7, row=3)
    assert len(picked) == 2 and not set(picked) & set(retrieved)
    assert picked == rag.distractors(retrieved, 2, len(handbook.passages), seed=7, row=3)

    prepared = rag.Prepared(handbook, [], 0)
    rows = [ds.Row({"instruction": "What is the usual adult dose of this medication?", "input": drug,
                    "output": "..."}, "s3://b/train.jsonl", i + 1) for i, drug in enumerate(
                        ["metformin", "lisinopril", "atorvastatin", "amlodipine", "omeprazole"] * 4)]
    out = rag.augment_rows(prepared, rows, "instruction", share=0.4, seed=7, training=True)
    assert prepared.distractor_examples == 8
    topk = handbook.search([rag.query_text(r.data, "instruction") for r in rows])
    chosen = rag.distractor_rows(len(rows), 0.4, seed=7)
    for i, (row, ids) in enumerate(zip(out, prepared.train_passages, strict=True)):
        prompt = ds.instruction_prompt(row.data)
        assert prompt.startswith("### Context:\n[1] ")  # every training prompt carries passages
        assert prompt == rag.render_instruction_prompt(rows[i].data["instruction"], rows[i].data["input"],
                                                       handbook.texts(ids))
        assert (ids == topk[i]) is (i not in chosen)
        if i in chosen:
            assert not set(ids) & set(topk[i])
    assert [r.data for r in rag.augment_rows(prepared, rows, "instruction", share=0.4, seed=7, training=True)] == \
        [r.data for r in out]


def test_the_layout_is_the_same_for_training_evaluation_and_chat(tokenizer: Any) -> None:
    record = {"instruction": "Interpret this lab result.", "input": "sodium: 150 mmol/L", "output": "High."}
    passages = ["Laboratory: sodium: The adult reference range for sodium is 135-145 mmol/L.", "Other."]
    augmented = rag.augment(record, "instruction", passages)
    expected = ("### Context:\n[1] Laboratory: sodium: The adult reference range for sodium is 135-145 mmol/L.\n"
                "[2] Other.\n\n### Instruction:\nInterpret this lab result.\n\n### Input:\nsodium: 150 mmol/L\n\n"
                "### Response:\n")
    assert ds.instruction_prompt(augmented) == expected
    item = ds.eval_item(augmented, "instruction", tokenizer)
    assert item.prompt == expected and "135-145" in item.context  # passages support the answer
    encoded = ds.encode(augmented, "instruction", tokenizer, 512)
    assert encoded is not None
    assert tokenizer.decode(encoded.input_ids).startswith(tokenizer.bos_token + expected)
    assert ds.instruction_prompt(rag.augment(record, "instruction", [])) == ds.instruction_prompt(record)

    chat = {"messages": [{"role": "user", "content": "sodium 150?"}, {"role": "assistant", "content": "High."}]}
    messages = rag.augment(chat, "chat", passages)["messages"]
    assert messages[0] == {"role": "system", "content": rag.context_block(passages).rstrip("\n")}
    assert messages[1:] == chat["messages"]
    assert rag.query_text(chat, "chat") == "sodium 150?"
    with pytest.raises(DataError, match="instruction or chat"):
        rag.augment({"text": "x"}, "text", passages)


# ------------------------------------------------------------------------------------------------
# A run with retrieval
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def staged(s3: Any, tiny_model_dir: Path, healthcare_sample: Any) -> th.Staged:
    staged = th.stage_in_new_bucket(s3, "rag", tiny_model_dir, healthcare_sample)
    s3.client().upload_file(str(CORPUS), staged.bucket, "corpus/healthcare_corpus.jsonl")
    return staged


@pytest.mark.slow
def test_a_run_with_retrieval_scores_both_settings_and_publishes_the_index(
        s3_env: Any, staged: th.Staged, tmp_path: Path) -> None:
    corpus_uri = f"s3://{staged.bucket}/corpus/"
    config = th.make_config(staged, {
        "retrieval": {"corpus": corpus_uri, "topK": 2, "chunkTokens": 40, "distractorShare": 0.25},
        "hyperparameters": {"maxSteps": 2, "maxSeqLength": 256},
        "evaluation": {"maxExamples": 3, "maxNewTokens": 6, "gates": [{"metric": "evalLoss", "max": 100}]},
        "compliance": {"provenanceRequired": True},
    })
    outcome = th.run_in_process(config)
    store = th.store(config.spec.output.uri)
    keys = set(store.list(""))
    assert {"retrieval/retriever.json", "retrieval/passages.jsonl", MARKER_NAME} <= keys
    assert any(k.startswith("retrieval/index/") for k in keys)

    # The evaluation: base and tuned, with and without retrieval; gates on the scores with retrieval.
    report = store.read_json(REPORT_KEY)
    evaluation = report["evaluation"]
    for scores in (evaluation["base"], evaluation["tuned"], evaluation["withRetrieval"]["base"],
                   evaluation["withRetrieval"]["tuned"]):
        assert {"accuracy", "evalLoss"} <= set(scores)
    assert evaluation["withRetrieval"]["tuned"]["evalLoss"] != evaluation["tuned"]["evalLoss"]
    assert evaluation["gatesPassed"] is True
    assert json.loads(store.read_bytes("evaluation.json")) == evaluation
    assert report["artifacts"]["retrieval"].endswith("/retrieval/") and outcome.artifacts == report["artifacts"]

    # Provenance: the corpus file with its sha256; the loaded index answers as the trainer's did.
    provenance = store.read_json("provenance.json")
    (entry,) = provenance["retrieval"]["files"]
    assert entry["uri"] == corpus_uri + "healthcare_corpus.jsonl"
    assert entry["sha256"] == hashlib.sha256(CORPUS.read_bytes()).hexdigest()
    assert provenance["retrieval"]["distractorShare"] == 0.25 and provenance["retrieval"]["passages"] > 100
    local = store.download_prefix("retrieval", tmp_path / "retrieval")
    retriever = rag.Retriever.load(local)
    assert retriever.top_k == 2 and retriever.settings["corpusFiles"] == provenance["retrieval"]["files"]
    assert "Medication: metformin" in retriever.texts(retriever.search(["metformin dose"])[0])[0]

    # The model card shows both tables and the layout the prompts had.
    card = store.read_bytes("README.md").decode()
    assert "metric (with retrieval)" in card and "Retriever.load" in card
    assert "### Context:\n[1] <passage 1>\n[2] <passage 2>\n\n### Instruction:\n<instruction>" in card
