"""Retrieval augmentation (`spec.retrieval`): the corpus, its passages, the BM25 index and the prompt layout.

Corpus: `spec.retrieval.corpus` is a file or a prefix of files (s3://, pvc://, file://, read like the dataset):
JSON Lines or JSON (one document per row: `text`, optional `title`), Parquet (a `text` column, optional
`title`) or UTF-8 text (`.txt`, `.md`: the whole file is one document). Errors name the file and row.

Passages (`chunk`): each document is cut into passages of whole sentences, each at most `chunkTokens`
tokens of the base model's tokenizer (a longer sentence is cut at words, a longer word at tokens); a
passage never spans two documents. Whitespace is collapsed, so a passage is one line. A row's `title`, when
it has one, is put before its text ("Title: text"), so it is part of the document's first passage.

Index: BM25 (bm25s, Lucene's variant, k1=1.5, b=0.75) over the passages, tokenized by `bm25s.tokenize`
(lowercased words of two or more letters or digits, English stop words removed, no stemming). A search
returns the top-k passages by score, ties broken by passage order; passages that share no word with the
question (score 0) are never returned, so a prompt may carry fewer than k.

The question of an example (`query_text`): instruction + input (instruction format), the user turns up to
the answer (chat). Text rows have none; the spec refuses `retrieval` with `dataset.format: text`.

Prompt layout (`context_block`, `render_instruction_prompt`; training, evaluation and the model card use
these functions): the passages come before the usual prompt, numbered from 1 in rank order:

    ### Context:
    [1] <passage>
    [2] <passage>

    ### Instruction:
    <instruction>

    ### Input:
    <input>

    ### Response:

(`### Input:` only when the row has an input.) Chat rows get the same block, without the blank line after
it, as a system message in front of the conversation (or at the head of its first system message). A
prompt with no passages carries no block: it is the plain prompt.

RAFT (`plan_passages`): `distractorShare` of the training examples (rounded to whole examples, chosen with
the job's seed) carry distractor passages only: topK passages drawn (seeded per example) from the passages
not retrieved for that example. The others, the validation examples and every evaluation prompt carry
their top-k. Same seed, same corpus, same data: the same passages in every prompt.

Artifacts (`save`, `load`): `retrieval/` in the output holds the index (`index/`, bm25s' own files),
`passages.jsonl` (id, text, source URI, document) and `retriever.json` (the settings, the layout, the
corpus files with their sha256), so a serving stack can load the same retriever with `load` and build
the same prompts.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_trainer.dataset import CONTEXT_KEY
from finetune_trainer.errors import DataError

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".md")
TEXT_SUFFIXES = (".txt", ".md")
CONTEXT_HEADER = "### Context:\n"
PASSAGE_LINE = "[{number}] {text}\n"
#: bm25s settings (recorded in retriever.json): tokenization of passages and questions alike.
STOPWORDS = "en"
FORMAT_VERSION = 1

_SENTENCE = re.compile(r"(?<=[.!?])\s+")


# ------------------------------------------------------------------------------------------------
# Prompt layout
# ------------------------------------------------------------------------------------------------


def context_block(passages: Sequence[str]) -> str:
    """The context block for `passages` (rank order), ending with a newline; "" without passages."""
    if not passages:
        return ""
    return CONTEXT_HEADER + "".join(PASSAGE_LINE.format(number=i, text=p) for i, p in enumerate(passages, 1))


def render_instruction_prompt(instruction: str, input_text: str, passages: Sequence[str]) -> str:
    """The whole prompt of an instruction row with its passages (the layout in the module docstring)."""
    from finetune_trainer import dataset as ds

    return ds.instruction_prompt(augment({"instruction": instruction, "input": input_text}, "instruction", passages))


def augment(record: dict[str, Any], fmt: str, passages: Sequence[str]) -> dict[str, Any]:
    """A copy of `record` whose prompt carries `passages` (instruction: through CONTEXT_KEY; chat: a
    system message)."""
    block = context_block(passages)
    out = dict(record)
    if not block:
        return out
    if fmt == "instruction":
        out[CONTEXT_KEY] = block + "\n"
        return out
    if fmt == "chat":
        messages = [dict(m) for m in record["messages"]]
        if messages and messages[0].get("role") == "system":
            messages[0]["content"] = block + "\n" + messages[0]["content"]
        else:
            messages.insert(0, {"role": "system", "content": block.rstrip("\n")})
        out["messages"] = messages
        return out
    raise DataError("spec.retrieval needs instruction or chat rows: text rows have no question to retrieve "
                    "passages for; use format instruction or chat, or remove spec.retrieval", reason="InvalidSpec")


def query_text(record: dict[str, Any], fmt: str) -> str:
    """The question an example's passages are retrieved for."""
    if fmt == "instruction":
        return f"{record['instruction']}\n{record.get('input') or ''}".strip()
    if fmt == "chat":
        messages = record["messages"]
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        upto = answers[-1] if answers else len(messages)
        return "\n".join(m["content"] for m in messages[:upto] if m["role"] == "user")
    return ""


# ------------------------------------------------------------------------------------------------
# Corpus and passages
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Passage:
    id: int
    text: str
    source: str
    document: int


def corpus_files(local: Path, uri: str) -> list[tuple[Path, str]]:
    """(path, URI) of every corpus file at `local` (the fetched `uri`): the file, or a prefix's files in
    name order."""
    if local.is_file():
        if not local.name.endswith(SUFFIXES):
            raise DataError(f"spec.retrieval.corpus: unsupported file {uri}; use one of {', '.join(SUFFIXES)}",
                            reason="InvalidData")
        return [(local, uri)]
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
    if not files:
        raise DataError(f"spec.retrieval.corpus: no corpus files ({', '.join(SUFFIXES)}) under {uri}",
                        reason="EmptyCorpus")
    base = uri.rstrip("/")
    return [(p, f"{base}/{p.relative_to(local).as_posix()}") for p in files]


def read_documents(files: Sequence[tuple[Path, str]]) -> list[tuple[str, str]]:
    """(text, source URI) of every document; a row without a non-empty string `text` fails naming it."""
    from finetune_trainer import dataset as ds

    documents: list[tuple[str, str]] = []
    for path, uri in files:
        if path.name.endswith(TEXT_SUFFIXES):
            try:
                text = path.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"spec.retrieval.corpus: {uri} is not UTF-8 (byte offset {err.start}); save it "
                                "as UTF-8", reason="InvalidData") from None
            if text.strip():
                documents.append((text, uri))
            continue
        rows, problems = ds.read_file(path, uri)
        bad = [str(p) for p in problems]
        for row in rows:
            text = row.data.get("text") if isinstance(row.data, dict) else None
            title = row.data.get("title") if isinstance(row.data, dict) else None
            if not isinstance(text, str) or not text.strip() or (title is not None and not isinstance(title, str)):
                bad.append(f"{row.source} {row.unit} {row.line}: a corpus row needs a non-empty string `text` "
                           "(and optionally a string `title`)")
                continue
            documents.append((f"{title.strip()}: {text}" if title else text, uri))
        if bad:
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            raise DataError("spec.retrieval.corpus: " + "; ".join(bad[:5]) + more, reason="InvalidData")
    if not documents:
        raise DataError("spec.retrieval.corpus holds no documents", reason="EmptyCorpus")
    return documents


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _pieces(sentence: str, tokenizer: Any, limit: int) -> list[str]:
    """A sentence longer than `limit` tokens cut at words (a word longer than that at tokens)."""
    out: list[str] = []
    current: list[str] = []
    for word in sentence.split(" "):
        if _count(tokenizer, word) > limit:
            if current:
                out.append(" ".join(current))
                current = []
            ids = tokenizer(word, add_special_tokens=False)["input_ids"]
            out += [tokenizer.decode(ids[i:i + limit]) for i in range(0, len(ids), limit)]
            continue
        if current and _count(tokenizer, " ".join([*current, word])) > limit:
            out.append(" ".join(current))
            current = []
        current.append(word)
    if current:
        out.append(" ".join(current))
    return out


def chunk(text: str, tokenizer: Any, chunk_tokens: int) -> list[str]:
    """Passages of whole sentences of at most `chunk_tokens` tokens (see the module docstring)."""
    flat = " ".join(text.split())
    if not flat:
        return []
    sentences: list[str] = []
    for sentence in _SENTENCE.split(flat):
        if _count(tokenizer, sentence) > chunk_tokens:
            sentences += _pieces(sentence, tokenizer, chunk_tokens)
        else:
            sentences.append(sentence)
    passages: list[str] = []
    current = ""
    for sentence in sentences:
        joined = f"{current} {sentence}" if current else sentence
        if current and _count(tokenizer, joined) > chunk_tokens:
            passages.append(current)
            current = sentence
        else:
            current = joined
    if current:
        passages.append(current)
    return passages


def build_passages(documents: Sequence[tuple[str, str]], tokenizer: Any, chunk_tokens: int) -> list[Passage]:
    passages: list[Passage] = []
    for number, (text, source) in enumerate(documents):
        for piece in chunk(text, tokenizer, chunk_tokens):
            passages.append(Passage(len(passages), piece, source, number))
    return passages


# ------------------------------------------------------------------------------------------------
# The index
# ------------------------------------------------------------------------------------------------


def _bm25_tokens(texts: Sequence[str], *, ids: bool) -> Any:
    import bm25s

    return bm25s.tokenize(list(texts), stopwords=STOPWORDS, return_ids=ids, show_progress=False)


@dataclass
class Retriever:
    """BM25 over the passages; `search` gives each question's top-k passage ids."""

    passages: list[Passage]
    top_k: int
    bm25: Any
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, passages: list[Passage], top_k: int, settings: dict[str, Any] | None = None) -> Retriever:
        import bm25s

        bm25 = bm25s.BM25()
        bm25.index(_bm25_tokens([p.text for p in passages], ids=True), show_progress=False)
        return cls(passages, top_k, bm25, dict(settings or {}))

    def search(self, queries: Sequence[str], k: int | None = None) -> list[list[int]]:
        """Top-k passage ids of each query: by score, ties by passage order, score 0 left out."""
        k = min(k or self.top_k, len(self.passages))
        if not queries:
            return []
        tokens = _bm25_tokens(queries, ids=False)
        # Ask for every tie at the k-th score: bm25s orders equal scores arbitrarily.
        found, scores = self.bm25.retrieve(tokens, k=len(self.passages) if len(self.passages) <= 4096 else
                                           min(len(self.passages), 4 * k), show_progress=False, n_threads=1)
        results = []
        for ids, values in zip(found.tolist(), scores.tolist(), strict=True):
            ranked = sorted(((-s, i) for i, s in zip(ids, values, strict=True) if s > 0))
            results.append([i for _, i in ranked[:k]])
        return results

    def texts(self, ids: Sequence[int]) -> list[str]:
        return [self.passages[i].text for i in ids]

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.bm25.save(str(directory / "index"), show_progress=False)
        with open(directory / "passages.jsonl", "w", encoding="utf-8") as fh:
            for p in self.passages:
                fh.write(json.dumps({"id": p.id, "text": p.text, "source": p.source, "document": p.document},
                                    ensure_ascii=False) + "\n")
        record = {"formatVersion": FORMAT_VERSION, "topK": self.top_k, "passages": len(self.passages),
                  "bm25": {"library": "bm25s", "method": "lucene", "k1": 1.5, "b": 0.75,
                           "tokenize": {"stopwords": STOPWORDS, "lower": True, "stemmer": None}},
                  "layout": {"contextHeader": CONTEXT_HEADER, "passageLine": PASSAGE_LINE,
                             "example": render_instruction_prompt("<instruction>", "<input>",
                                                                  ["<passage 1>", "<passage 2>"])},
                  **self.settings}
        (directory / "retriever.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: Path) -> Retriever:
        import bm25s

        record = json.loads((directory / "retriever.json").read_text())
        passages = [Passage(d["id"], d["text"], d["source"], d["document"]) for d in
                    (json.loads(line) for line in (directory / "passages.jsonl").read_text().splitlines() if line)]
        bm25 = bm25s.BM25.load(str(directory / "index"), show_progress=False)
        return cls(passages, int(record["topK"]), bm25, record)


# ------------------------------------------------------------------------------------------------
# RAFT: which passages each training example carries
# ------------------------------------------------------------------------------------------------


def distractor_rows(count: int, share: float, seed: int) -> set[int]:
    """The `round(share x count)` example indexes (seeded) that carry distractors only."""
    chosen = round(share * count)
    return set(random.Random(f"raft-rows:{seed}").sample(range(count), chosen)) if chosen else set()


def distractors(retrieved: Sequence[int], k: int, total: int, seed: int, row: int) -> list[int]:
    """`k` passage ids (seeded by example) from those not in `retrieved`."""
    excluded = set(retrieved)
    pool = [i for i in range(total) if i not in excluded]
    return random.Random(f"raft-distractors:{seed}:{row}").sample(pool, min(k, len(pool)))


@dataclass
class Prepared:
    """The corpus read, chunked and indexed, and what the prompts of each split carry."""

    retriever: Retriever
    files: list[tuple[Path, str]]
    documents: int
    distractor_examples: int = 0
    #: Passage ids per training example (after RAFT), for tests and the log.
    train_passages: list[list[int]] = field(default_factory=list)


def prepare(spec: Any, tokenizer: Any, cache: Path, *, seed: int) -> Prepared:
    """Fetch the corpus of `spec` (RetrievalSpec), cut it into passages and index them."""
    from finetune_trainer import storage

    local = Path(storage.fetch(spec.corpus, cache))
    files = corpus_files(local, spec.corpus)
    documents = read_documents(files)
    passages = build_passages(documents, tokenizer, spec.chunk_tokens)
    from finetune_trainer import provenance

    corpus_files_record = sorted(({"uri": uri, "name": path.name, "sha256": provenance.sha256_file(path),
                                   "bytes": path.stat().st_size} for path, uri in files), key=lambda f: f["uri"])
    settings = {"chunkTokens": spec.chunk_tokens, "distractorShare": spec.distractor_share, "seed": seed,
                "corpus": spec.corpus, "corpusFiles": corpus_files_record}
    retriever = Retriever.build(passages, spec.top_k, settings)
    log.info("retrieval: %d document(s) in %d file(s) -> %d passage(s) of at most %d tokens, top %d per prompt",
             len(documents), len(files), len(passages), spec.chunk_tokens, spec.top_k)
    return Prepared(retriever, files, len(documents))


def augment_rows(prepared: Prepared, rows: Sequence[Any], fmt: str, *, share: float = 0.0, seed: int = 0,
                 training: bool = False) -> list[Any]:
    """Rows (dataset.Row) whose prompts carry their passages: the top-k, or for RAFT's `share` of the
    training rows distractors only."""
    from finetune_trainer import dataset as ds

    retriever = prepared.retriever
    found = retriever.search([query_text(r.data, fmt) for r in rows])
    chosen = distractor_rows(len(rows), share, seed) if training else set()
    out: list[Any] = []
    carried: list[list[int]] = []
    for i, (row, ids) in enumerate(zip(rows, found, strict=True)):
        if i in chosen:
            ids = distractors(ids, retriever.top_k, len(retriever.passages), seed, i)
        carried.append(list(ids))
        out.append(ds.Row(augment(row.data, fmt, retriever.texts(ids)), row.source, row.line, row.unit))
    if training:
        prepared.distractor_examples = len(chosen)
        prepared.train_passages = carried
    return out


def provenance_record(prepared: Prepared, spec: Any) -> dict[str, Any]:
    """What provenance.json records about retrieval: the corpus files with their sha256, the settings."""
    return {"corpus": spec.corpus, "files": prepared.retriever.settings["corpusFiles"],
            "documents": prepared.documents,
            "passages": len(prepared.retriever.passages), "topK": spec.top_k, "chunkTokens": spec.chunk_tokens,
            "distractorShare": spec.distractor_share, "distractorExamples": prepared.distractor_examples,
            "index": "bm25s (lucene, k1 1.5, b 0.75), stopwords en"}
