"""Everything the run reads before the model: data files, splits, tokenized examples, evaluation items.

Splits:
- validation (eval loss during training): `dataset.validation`, else a seeded `dataset.validationSplit` of
  the training rows, else none.
- test set (base vs fine-tuned evaluation): `evaluation.testSet`, else the validation rows, else a seeded
  5% of the training rows, held out of training. At most `evaluation.maxExamples` rows are scored.

With `spec.retrieval` (`retrieval.py`): the corpus is indexed, the training prompts carry their top-k
passages (RAFT's distractor share carries distractors only), the validation prompts their top-k, and the
test set is kept twice: plain (`eval_items`, `test`) and with its top-k passages (`rag_eval_items`,
`rag_test`), so the evaluation scores both models with and without retrieval.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_operator.contract import DataStats, TrainerConfig
from finetune_trainer import dataset as ds
from finetune_trainer import retrieval as rag
from finetune_trainer.errors import DataError

log = logging.getLogger(__name__)

#: Fraction of the training rows held out as the test set when neither a test set nor validation is given.
HOLDOUT_FRACTION = 0.05


@dataclass
class Inputs:
    format: ds.Format
    train: list[ds.Encoded | ds.Packed]
    validation: list[ds.Encoded]
    test_rows: list[ds.Row]
    test: list[ds.Encoded]
    eval_items: list[ds.EvalItem]
    #: (local path, source URI) of every data file read, for provenance.
    files: list[tuple[Path, str]] = field(default_factory=list)
    glossary: Path | None = None
    skipped_rows: int = 0
    #: Training examples dropped because truncation to maxSeqLength left no answer token.
    truncated_away: int = 0
    train_examples: int = 0
    #: Training examples longer than maxSeqLength (cut, or dropped: `truncated_away` of them).
    truncated: int = 0
    #: spec.retrieval: the index, and the test set with its passages (empty without retrieval).
    retrieval: rag.Prepared | None = None
    rag_test: list[ds.Encoded] = field(default_factory=list)
    rag_eval_items: list[ds.EvalItem] = field(default_factory=list)

    def stats(self) -> DataStats:
        """The data stats of the progress report (`contract.DataStats`)."""
        return DataStats(train_examples=self.train_examples, validation_examples=len(self.validation),
                         skipped_rows=self.skipped_rows, truncated_examples=self.truncated)


def data_files(uri: str, cache: Path) -> list[tuple[Path, str]]:
    """Local copies of the data at `uri`, each with its own URI (for error messages and provenance)."""
    from finetune_trainer import storage

    local = Path(storage.fetch(uri, cache))
    if local.is_file():
        return [(local, uri)]
    base = uri.rstrip("/")
    return [(path, f"{base}/{path.relative_to(local).as_posix()}") for path in ds.data_files(local)]


def _load(uri: str, fmt: str, invalid_rows: str, cache: Path, what: str) -> tuple[ds.Dataset, list[tuple[Path, str]]]:
    files = data_files(uri, cache)
    loaded = ds.load_dataset(files, fmt, invalid_rows, what=what)
    if loaded.skipped:
        log.warning("%s: skipped %d invalid row(s), first: %s", what, len(loaded.skipped), loaded.skipped[0])
    return loaded, files


def load_inputs(config: TrainerConfig, tokenizer: Any, cache: Path) -> Inputs:
    spec = config.spec
    data, hp, ev = spec.dataset, spec.hyperparameters, spec.evaluation
    train, files = _load(data.train, data.format, data.invalid_rows, cache, "spec.dataset.train")
    fmt = train.format
    rows = train.rows
    skipped = len(train.skipped)

    validation_rows: list[ds.Row] = []
    if data.validation:
        val, val_files = _load(data.validation, fmt, data.invalid_rows, cache, "spec.dataset.validation")
        validation_rows, files, skipped = val.rows, files + val_files, skipped + len(val.skipped)
    elif data.validation_split:
        rows, validation_rows = ds.split_holdout(rows, data.validation_split, hp.seed)

    if ev.test_set:
        test_set, test_files = _load(ev.test_set, fmt, data.invalid_rows, cache, "spec.evaluation.testSet")
        test_rows, files, skipped = test_set.rows, files + test_files, skipped + len(test_set.skipped)
    elif validation_rows:
        test_rows = validation_rows
    else:
        rows, test_rows = ds.split_holdout(rows, HOLDOUT_FRACTION, hp.seed + 1)
    test_rows = test_rows[: ev.max_examples]

    prepared, rag_test_rows = None, []
    if spec.retrieval is not None:
        if fmt == "text":
            raise DataError("spec.retrieval cannot be used with text rows (dataset.format detected as text): they have "
                            "no question to retrieve passages for; use instruction or chat rows, or remove "
                            "spec.retrieval", reason="InvalidSpec")
        prepared = rag.prepare(spec.retrieval, tokenizer, cache, seed=hp.seed)
        rows = rag.augment_rows(prepared, rows, fmt, share=spec.retrieval.distractor_share, seed=hp.seed,
                                training=True)
        validation_rows = rag.augment_rows(prepared, validation_rows, fmt)
        rag_test_rows = rag.augment_rows(prepared, test_rows, fmt)
        log.info("retrieval: %d of %d training prompts carry distractor passages only (distractorShare %s)",
                 prepared.distractor_examples, len(rows), spec.retrieval.distractor_share)

    encoded, dropped = ds.encode_all(rows, fmt, tokenizer, hp.max_seq_length)
    if dropped:
        log.warning("%d training example(s) have no answer tokens left after truncation to maxSeqLength=%d",
                    dropped, hp.max_seq_length)
    if not encoded:
        raise DataError(f"no training example has answer tokens within maxSeqLength={hp.max_seq_length}; "
                        "raise spec.hyperparameters.maxSeqLength", reason="EmptyDataset")
    validation, _ = ds.encode_all(validation_rows, fmt, tokenizer, hp.max_seq_length)
    test, _ = ds.encode_all(test_rows, fmt, tokenizer, hp.max_seq_length)
    items: list[ds.Encoded | ds.Packed] = list(ds.pack(encoded, hp.max_seq_length, hp.seed)) if hp.packing \
        else list(encoded)

    glossary = None
    if ev.glossary:
        from finetune_trainer import storage

        glossary = Path(storage.fetch(ev.glossary, cache))
        files.append((glossary, ev.glossary))
    return Inputs(
        format=fmt,
        train=items,
        validation=validation,
        test_rows=test_rows,
        test=test,
        eval_items=[ds.eval_item(r.data, fmt, tokenizer) for r in test_rows],
        files=files,
        glossary=glossary,
        skipped_rows=skipped,
        truncated_away=dropped,
        train_examples=len(encoded),
        truncated=dropped + sum(1 for example in encoded if example.truncated),
        retrieval=prepared,
        rag_test=ds.encode_all(rag_test_rows, fmt, tokenizer, hp.max_seq_length)[0],
        rag_eval_items=[ds.eval_item(r.data, fmt, tokenizer) for r in rag_test_rows],
    )
