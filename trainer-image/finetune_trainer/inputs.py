"""Everything the run reads before the model: data files, splits, tokenized examples, evaluation items.

Splits:
- validation (eval loss during training): `dataset.validation`, else a seeded `dataset.validationSplit` of
  the training rows, else none.
- test set (base vs fine-tuned evaluation): `evaluation.testSet`, else the validation rows, else a seeded
  5% of the training rows, held out of training. At most `evaluation.maxExamples` rows are scored.

Objective `dpo` (`preference_data.py`): the training and validation splits are preference pairs
(`objectives.dpo.PairEncoded` in `train` and `validation`: the loop and the objective take them as they are),
read in the preference form `auto` detects (or declared instruction/chat rows under format `preference`):
- validation pairs (the checkpoints' eval loss, the DPO loss): `dataset.validation`, else a seeded
  `dataset.validationSplit` of the training pairs, else none.
- held-out pairs (`preference_test`: preference accuracy and reward margin of base and fine-tuned):
  `evaluation.preferenceTestSet`, else the validation pairs, else a seeded 5% of the training pairs, held
  out of training (the rule of the sft test set). Every held-out pair is scored (a forward pass per pair,
  cheap next to generation): `evaluation.maxExamples` caps the generated answers only.
- the test set of the domain scores (`test`, `eval_items`): `evaluation.testSet` when given, instruction or
  chat rows (its format detected); none otherwise.
Objective `sft` with `evaluation.preferenceTestSet`: those pairs too, for the preference metrics.

With `spec.retrieval` (`retrieval.py`): the corpus is indexed, the training prompts carry their top-k
passages (RAFT's distractor share carries distractors only), the validation prompts their top-k, and the
test set is kept twice: plain (`eval_items`, `test`) and with its top-k passages (`rag_eval_items`,
`rag_test`), so the evaluation scores both models with and without retrieval.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_operator.contract import DataStats, TrainerConfig
from finetune_operator.spec import DatasetSpec
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
    #: `spec.objective`; for dpo `train` and `validation` hold preference pairs (`objectives.dpo.PairEncoded`).
    objective: str = "sft"
    #: Held-out preference pairs scored for preference accuracy and reward margin (empty: not measured).
    preference_test: list[Any] = field(default_factory=list)

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


def _load_pairs(uri: str, declared: str, invalid_rows: str, cache: Path,
                what: str) -> tuple[Any, list[tuple[Path, str]]]:
    from finetune_trainer import preference_data

    files = data_files(uri, cache)
    loaded = preference_data.load_preferences(files, declared, invalid_rows, what=what)
    if loaded.skipped:
        log.warning("%s: skipped %d invalid pair(s), first: %s", what, len(loaded.skipped), loaded.skipped[0])
    return loaded, files


def _encode_pairs(rows: list[ds.Row], form: Any, tokenizer: Any, max_length: int, what: str) -> Any:
    from finetune_trainer import preference_data

    encoding = preference_data.encode_pairs(rows, form, tokenizer, max_length)
    if encoding.dropped:
        log.warning("%s: %d pair(s) dropped: no answer token left after truncation to maxSeqLength=%d, or both "
                    "answers the same tokens", what, encoding.dropped, max_length)
    return encoding


def _split_validation(load: Callable[..., tuple[Any, list[tuple[Path, str]]]], data: DatasetSpec,
                      rows: list[ds.Row], fmt: Any, seed: int,
                      cache: Path) -> tuple[list[ds.Row], list[ds.Row], list[tuple[Path, str]], int]:
    """(training rows, validation rows, files read, rows skipped): `dataset.validation` read by `load` (`_load`
    for rows, `_load_pairs` for preference pairs) in the training data's format `fmt`, else a seeded
    `dataset.validationSplit` of `rows`, else none."""
    if data.validation:
        val, files = load(data.validation, fmt, data.invalid_rows, cache, "spec.dataset.validation")
        return rows, val.rows, files, len(val.skipped)
    if data.validation_split:
        kept, held = ds.split_holdout(rows, data.validation_split, seed)
        return kept, held, [], 0
    return rows, [], [], 0


def load_preference_test(config: TrainerConfig, tokenizer: Any, cache: Path, form: str = "auto") -> tuple[list[Any], list[tuple[Path, str]], int]:
    """`evaluation.preferenceTestSet` encoded (pairs, files, skipped rows); nothing when it is unset."""
    spec = config.spec
    uri = spec.evaluation.preference_test_set
    if not uri:
        return [], [], 0
    loaded, files = _load_pairs(uri, form, spec.dataset.invalid_rows, cache, "spec.evaluation.preferenceTestSet")
    encoding = _encode_pairs(loaded.rows, loaded.form, tokenizer, spec.hyperparameters.max_seq_length,
                             "spec.evaluation.preferenceTestSet")
    return encoding.pairs, files, len(loaded.skipped)


def load_preference_inputs(config: TrainerConfig, tokenizer: Any, cache: Path) -> Inputs:
    """Objective dpo: pairs for training, validation and the held-out preference metrics; the instruction
    test set for the domain scores when `evaluation.testSet` is given."""
    spec = config.spec
    data, hp, ev = spec.dataset, spec.hyperparameters, spec.evaluation
    declared = "auto"  # format auto or preference: the preference form (instruction or chat) is detected
    train, files = _load_pairs(data.train, declared, data.invalid_rows, cache, "spec.dataset.train")
    form, rows, skipped = train.form, train.rows, len(train.skipped)

    rows, validation_rows, val_files, val_skipped = _split_validation(_load_pairs, data, rows, form, hp.seed, cache)
    files, skipped = files + val_files, skipped + val_skipped

    held_rows: list[ds.Row] = []
    preference_test, test_files, test_skipped = load_preference_test(config, tokenizer, cache)
    files, skipped = files + test_files, skipped + test_skipped
    if not ev.preference_test_set and not validation_rows:
        rows, held_rows = ds.split_holdout(rows, HOLDOUT_FRACTION, hp.seed + 1)

    encoded = _encode_pairs(rows, form, tokenizer, hp.max_seq_length, "spec.dataset.train")
    if not encoded.pairs:
        raise DataError(f"no training pair has answer tokens within maxSeqLength={hp.max_seq_length}; raise "
                        "spec.hyperparameters.maxSeqLength", reason="EmptyDataset")
    validation = _encode_pairs(validation_rows, form, tokenizer, hp.max_seq_length, "spec.dataset.validation").pairs
    if not ev.preference_test_set:
        preference_test = validation if validation_rows else \
            _encode_pairs(held_rows, form, tokenizer, hp.max_seq_length, "held-out pairs").pairs

    test_rows: list[ds.Row] = []
    fmt: Any = "instruction"
    if ev.test_set:  # instruction or chat rows: the domain scores (accuracy, terminology, hallucination)
        test_set, more = _load(ev.test_set, "auto", data.invalid_rows, cache, "spec.evaluation.testSet")
        fmt, test_rows, files, skipped = test_set.format, test_set.rows[: ev.max_examples], files + more, \
            skipped + len(test_set.skipped)
    glossary = None
    if ev.glossary:
        from finetune_trainer import storage

        glossary = Path(storage.fetch(ev.glossary, cache))
        files.append((glossary, ev.glossary))
    return Inputs(
        format="preference",  # type: ignore[arg-type]
        train=encoded.pairs,  # type: ignore[arg-type]
        validation=validation,
        test_rows=test_rows,
        test=ds.encode_all(test_rows, fmt, tokenizer, hp.max_seq_length)[0] if test_rows else [],
        eval_items=[ds.eval_item(r.data, fmt, tokenizer) for r in test_rows],
        files=files,
        glossary=glossary,
        skipped_rows=skipped,
        truncated_away=encoded.dropped,
        train_examples=len(encoded.pairs),
        truncated=encoded.truncated,
        objective="dpo",
        preference_test=preference_test,
    )


def load_inputs(config: TrainerConfig, tokenizer: Any, cache: Path) -> Inputs:
    """What the run trains and evaluates on, by `spec.objective` (see the module docstring)."""
    spec = config.spec
    if spec.objective == "dpo":
        return load_preference_inputs(config, tokenizer, cache)
    data, hp, ev = spec.dataset, spec.hyperparameters, spec.evaluation
    train, files = _load(data.train, data.format, data.invalid_rows, cache, "spec.dataset.train")
    fmt = train.format
    rows = train.rows
    skipped = len(train.skipped)

    rows, validation_rows, val_files, val_skipped = _split_validation(_load, data, rows, fmt, hp.seed, cache)
    files, skipped = files + val_files, skipped + val_skipped

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
    preference_test, pair_files, pair_skipped = load_preference_test(config, tokenizer, cache)
    files, skipped = files + pair_files, skipped + pair_skipped
    return Inputs(
        preference_test=preference_test,
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
