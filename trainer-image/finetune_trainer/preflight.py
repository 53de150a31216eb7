"""`python -m finetune_trainer.preflight`: check a job's model, data and output on CPU, before any GPU.

Same environment contract as the trainer (`entrypoint.py`): the TrainerConfig JSON from FT_CONFIG (else
`contract.CONFIG_PATH`), the output prefix from FT_OUTPUT_URI (else spec.output.uri), downloads under
FT_CACHE_DIR, S3 and Hugging Face credentials from the usual variables. It needs no GPU and never loads the
weights. The operator runs it as a CPU-only Job before any GPU Job (`finetune_operator.preflight`) and reads
the result it writes; `finetune plan --inspect` runs the model and data checks on this machine through
`check_local`, which writes nothing.

1. Model (spec.baseModel.uri): only `config.json`, the tokenizer files, `model.safetensors.index.json` and
   each `*.safetensors` file's header (8-byte length + JSON) are read, then parsed by the torch-free
   `finetune_operator.architecture.read_architecture`. `file://`, `pvc://` and plain paths are read in place.
   `s3://`: the small files are downloaded and each header is read with two ranged GETs
   (`Store.read_range`) into a sparse file of the object's full size (so the reader's size checks still
   catch a truncated upload) in a temporary directory. `hf://` (with spec.baseModel.revision): the small
   files through `hf_hub_download`, the headers through `HfApi.get_safetensors_metadata` (itself ranged
   reads), re-serialized into sparse files the same way. The tokenizer is loaded from the same directory.
2. Data: every file of spec.dataset.train, spec.dataset.validation and spec.evaluation.testSet is fetched
   and read by the trainer's own readers (`inputs`, `dataset.load_dataset`), so a bad row fails with the
   trainer's message naming the file and line. Rows are counted per file; tokens are counted with the
   model's tokenizer as `dataset.encode` builds a training example (before truncation to maxSeqLength,
   without retrieved passages) on the first SAMPLE_ROWS valid rows of each file, extrapolated by row count
   for larger files and then flagged `sampled`.
3. Output: the result (`contract.PreflightResult`) is written to `<output>/preflight.json`; that write is
   the writability check.

With spec.serving serving an adapter, the model's architecture (config.json's model_type) must be one whose LoRA
modules vLLM is known to load and spec.lora.targetModules among them (`check_serving`), before the data is read.

The first failure stops the checks. Reasons: `ModelUnreadable`, `ServingUnsupported`, `DataInvalid`,
`OutputNotWritable`; the message names the field, URI and (data) file and line. On failure preflight.json is still written with the
error when the output is writable, the message goes to stderr, and the process exits
`contract.EXIT_CONFIG_ERROR`. S3 that stays unreachable for the whole retry window (`StorageUnavailable`)
is not a verdict on the job: exit 1, nothing written, so a Job retry can run it again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import sys
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune_operator import uris
from finetune_operator.architecture import (
    CONFIG,
    MAX_HEADER_BYTES,
    Architecture,
    ArchitectureError,
    read_architecture,
)
from finetune_operator.contract import (
    ENV_OUTPUT_URI,
    EXIT_CONFIG_ERROR,
    EXIT_OK,
    MAX_PREFLIGHT_FILES,
    PREFLIGHT_KEY,
    PreflightArchitecture,
    PreflightFile,
    PreflightResult,
    PreflightSplit,
    TrainerConfig,
    TrainerError,
)
from finetune_trainer.errors import TrainerFailure

log = logging.getLogger("finetune_trainer.preflight")

#: Valid rows per file tokenized; larger files are extrapolated from them.
SAMPLE_ROWS = 2000
#: Model files fetched besides the headers: config, index, tokenizer and chat-template files.
SMALL_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
#: A "small" file larger than this is not fetched (no tokenizer file comes near it).
MAX_SMALL_BYTES = 256 << 20
#: Longer than any real example, so `dataset.encode` does not truncate while counting.
_NO_TRUNCATION = 1 << 62


class PreflightFailure(TrainerFailure):
    """A check failed: reason ModelUnreadable, DataInvalid or OutputNotWritable; `field` is the spec field
    it concerns (`finetune plan --inspect` reports the failure under it)."""

    _FIELDS = {"ModelUnreadable": "spec.baseModel.uri", "OutputNotWritable": "spec.output.uri"}

    def __init__(self, reason: str, message: str, field: str | None = None):
        super().__init__(reason, message)
        self.field = field or self._FIELDS.get(reason, "spec")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _retryable(err: BaseException) -> bool:
    from finetune_trainer.storage import StorageUnavailable

    return isinstance(err, StorageUnavailable)


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


def _write_sparse(target: Path, header: bytes, size: int) -> None:
    """`header` at the start of a file of `size` bytes whose rest is a hole (no tensor bytes)."""
    with open(target, "wb") as fh:
        fh.write(header)
        fh.truncate(max(size, len(header)))


def _stage_s3_header(store: Any, key: str, size: int, target: Path) -> None:
    """The 8-byte length and JSON header of one safetensors object, through ranged GETs."""
    prefix = store.read_range(key, 0, 8) if size else b""
    header = b""
    if len(prefix) == 8:
        (length,) = struct.unpack("<Q", prefix)
        if length <= MAX_HEADER_BYTES and 8 + length <= size:
            header = store.read_range(key, 8, length)
    # an impossible length is left for read_architecture to name
    _write_sparse(target, prefix + header, size)


def _stage_s3(uri: str, dest: Path) -> None:
    from finetune_trainer.storage import S3Store

    parsed = uris.parse(uri, ("s3",))
    store: Any = S3Store(parsed.authority, parsed.path)
    top = {key: size for key, _, size in store.listing() if "/" not in key}
    if not top:
        raise ArchitectureError(f"{uri}: no objects under this prefix")
    if CONFIG not in top:
        raise ArchitectureError(f"{store.child(CONFIG)}: no such object; the model needs its {CONFIG}")
    for key, size in sorted(top.items()):
        if key.endswith(".safetensors"):
            _stage_s3_header(store, key, size, dest / key)
        elif key.endswith(SMALL_SUFFIXES) and size <= MAX_SMALL_BYTES:
            (dest / key).write_bytes(store.read_bytes(key))


def _stage_hf(uri: str, revision: str | None, dest: Path, cache: Path) -> None:
    from huggingface_hub import HfApi, hf_hub_download

    repo = uris.parse(uri, ("hf",)).authority
    api = HfApi()
    info = api.model_info(repo, revision=revision, files_metadata=True)
    pinned = info.sha or revision
    top = {s.rfilename: s.size for s in info.siblings or [] if "/" not in s.rfilename}
    if CONFIG not in top:
        raise ArchitectureError(f"{uri}/{CONFIG}: no such file in the repository (revision {pinned})")
    for name, size in sorted(top.items()):
        if name.endswith(SMALL_SUFFIXES) and (size or 0) <= MAX_SMALL_BYTES:
            local = hf_hub_download(repo, name, revision=pinned, cache_dir=str(cache / "hf"))
            shutil.copyfile(local, dest / name)
    if any(name.endswith(".safetensors") for name in top):
        metadata = api.get_safetensors_metadata(repo, revision=pinned)
        for name, file_meta in metadata.files_metadata.items():
            if "/" in name:
                continue
            header: dict[str, Any] = {t: {"dtype": i.dtype, "shape": i.shape, "data_offsets": list(i.data_offsets)}
                                      for t, i in file_meta.tensors.items()}
            if file_meta.metadata:
                header["__metadata__"] = file_meta.metadata
            raw = json.dumps(header).encode()
            data_end = max((i.data_offsets[1] for i in file_meta.tensors.values()), default=0)
            _write_sparse(dest / name, struct.pack("<Q", len(raw)) + raw, top.get(name) or 8 + len(raw) + data_end)


def _hf_failure(err: BaseException) -> bool:
    """Whether `err` is the hub's answer about the repository (not found, gated, bad revision)."""
    try:
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return False
    return isinstance(err, HfHubHTTPError)


def _architecture(arch: Architecture) -> PreflightArchitecture:
    """The wire form: every field of `PreflightArchitecture` taken from the `Architecture` of the same name."""
    return PreflightArchitecture(**{name: getattr(arch, name) for name in PreflightArchitecture.model_fields})


def read_model(uri: str, revision: str | None, cache: Path, work: Path) -> tuple[Architecture, Path]:
    """The model's architecture and a local directory with its config and tokenizer files (staged under
    `work` for s3:// and hf://). Raises PreflightFailure ModelUnreadable naming the URI and file."""
    from finetune_trainer import storage

    staged = work / "model"
    try:
        if "://" not in uri or uri.startswith(("file://", "pvc://")):
            directory = storage.fetch(uri, cache)  # checks existence and the allowed roots; reads in place
            return read_architecture(directory), directory
        staged.mkdir(parents=True)
        if uri.startswith("s3://"):
            _stage_s3(uri, staged)
        else:
            _stage_hf(uri, revision, staged, cache)
        return read_architecture(staged), staged
    except (ArchitectureError, TrainerFailure, ValueError) as err:
        if _retryable(err):
            raise
        message = str(getattr(err, "message", err)).replace(str(staged), uri.rstrip("/"))
        raise PreflightFailure("ModelUnreadable", f"spec.baseModel.uri {uri}: {message}") from None
    except Exception as err:
        if not _hf_failure(err):
            raise
        raise PreflightFailure("ModelUnreadable", f"spec.baseModel.uri {uri}: {err}") from None


def check_serving(config: TrainerConfig, arch: Architecture) -> None:
    """spec.serving: the adapter's target modules must be ones vLLM loads LoRA on for this architecture
    (`finetune_operator.serving.VLLM_LORA_MODULES`); PreflightFailure ServingUnsupported otherwise."""
    from finetune_operator import serving

    problem = serving.target_module_problem(config.spec, config.method, arch.model_type)
    if problem is not None:
        field, message = problem
        raise PreflightFailure("ServingUnsupported", message, field=field)


def load_tokenizer(uri: str, directory: Path) -> Any:
    """The model's tokenizer (the trainer's `modeling.load_tokenizer`); ModelUnreadable when it has none."""
    from finetune_trainer.modeling import load_tokenizer as load

    try:
        return load(directory)
    except TrainerFailure as err:
        message = err.message.replace(str(directory), uri.rstrip("/"))
        raise PreflightFailure("ModelUnreadable", f"spec.baseModel.uri {uri}: {message}") from None


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tokens:
    total: int
    sampled: bool
    sample_rows: int
    too_long: int


def count_tokens(rows: list[Any], fmt: Any, tokenizer: Any, max_seq_length: int) -> Tokens:
    """Tokens of `rows` (one file's valid rows) from the first SAMPLE_ROWS, extrapolated by row count."""
    from finetune_trainer import dataset as ds

    sample = rows[:SAMPLE_ROWS]
    lengths = []
    for row in sample:
        example = ds.encode(row.data, fmt, tokenizer, _NO_TRUNCATION)
        lengths.append(len(example.input_ids) if example is not None else 0)
    counted = sum(lengths)
    sampled = len(rows) > len(sample)
    total = round(counted * len(rows) / len(sample)) if sampled else counted
    return Tokens(total, sampled, len(sample), sum(1 for n in lengths if n > max_seq_length))


def count_pair_tokens(rows: list[Any], form: Any, tokenizer: Any, max_seq_length: int) -> tuple[Tokens, Any]:
    """Tokens of preference `rows` (prompt + chosen + rejected, untruncated) from the first SAMPLE_ROWS,
    extrapolated by row count, and the sample's `preference_data.PairStats`."""
    from finetune_trainer import preference_data

    sample = rows[:SAMPLE_ROWS]
    stats = preference_data.pair_stats((preference_data.tokenize_pair(row.data, form, tokenizer) for row in sample),
                                       max_seq_length)
    sampled = len(rows) > len(sample)
    total = round(stats.tokens * len(rows) / len(sample)) if sampled else stats.tokens
    return Tokens(total, sampled, len(sample), stats.longer_than_max_length), stats


def check_split(field: str, uri: str, declared: str, config: TrainerConfig, tokenizer: Any,
                cache: Path, local: str | None = None, *, preference: bool = False) -> PreflightSplit:
    """Read, check and count one dataset field's files (from the plain path `local` instead of `uri` when
    given: the files then carry their local paths). Raises PreflightFailure DataInvalid. `preference`: the
    rows are preference pairs (`declared` auto, instruction or chat; `preference_data`): a pair with an
    empty answer or the same answer twice is invalid like any malformed row, named with file and line;
    the split reports its pairs, tokens per pair and length bias."""
    from finetune_trainer import dataset as ds
    from finetune_trainer import inputs, preference_data

    try:
        files = inputs.data_files(local or uri, cache)
        if preference:
            loaded = preference_data.load_preferences(files, "auto" if declared == "preference" else declared,
                                                      config.spec.dataset.invalid_rows, what=field)
        else:
            loaded = ds.load_dataset(files, declared, config.spec.dataset.invalid_rows, what=field)
    except TrainerFailure as err:
        if _retryable(err):
            raise
        message = err.message if field in err.message else f"{field} {uri}: {err.message}"
        raise PreflightFailure("DataInvalid", message, field) from None
    skipped = Counter(problem.source for problem in loaded.skipped)
    per_file: list[PreflightFile] = []
    too_long = 0
    max_len = config.spec.hyperparameters.max_seq_length
    sample_pairs = sample_tokens = sample_bias = 0.0
    for _, source in files:
        rows = [row for row in loaded.rows if row.source == source]
        if preference:
            tokens, stats = count_pair_tokens(rows, loaded.form, tokenizer, max_len)
            sample_pairs, sample_tokens = sample_pairs + stats.pairs, sample_tokens + stats.tokens
            sample_bias += stats.chosen_tokens - stats.rejected_tokens
        else:
            tokens = count_tokens(rows, loaded.format, tokenizer, max_len)
        too_long += tokens.too_long
        per_file.append(PreflightFile(uri=source, rows=len(rows) + skipped[source], tokens=tokens.total,
                                      sampled=tokens.sampled, sample_rows=tokens.sample_rows))
    if len(per_file) > MAX_PREFLIGHT_FILES:
        log.info("%s: %d files; the result lists the first %d (its counts cover them all)", field, len(per_file),
                 MAX_PREFLIGHT_FILES)
    split = PreflightSplit(
        field=field, uri=uri, format="preference" if preference else loaded.format, examples=len(loaded.rows),
        skipped_rows=len(loaded.skipped), tokens=sum(f.tokens for f in per_file),
        sampled=any(f.sampled for f in per_file), longer_than_max_seq_length=too_long,
        files=per_file[:MAX_PREFLIGHT_FILES])
    if preference:
        split.pairs = len(loaded.rows)
        split.tokens_per_pair = round(sample_tokens / sample_pairs, 3) if sample_pairs else 0.0
        split.length_bias = round(sample_bias / sample_pairs, 3) if sample_pairs else 0.0
    return split


def check_data(config: TrainerConfig, tokenizer: Any, cache: Path,
               local: Mapping[str, str] | None = None) -> list[PreflightSplit]:
    """Every dataset field of the spec; validation and test set are read in the training set's format.
    `local` maps a dataset URI to a plain path on this machine to read instead (see `check_local`)."""
    spec = config.spec
    local = local or {}
    dpo = spec.objective == "dpo"
    train = check_split("spec.dataset.train", spec.dataset.train, "auto" if dpo else spec.dataset.format, config,
                        tokenizer, cache, local.get(spec.dataset.train), preference=dpo)
    splits = [train]
    if spec.dataset.validation:
        uri = spec.dataset.validation
        splits.append(check_split("spec.dataset.validation", uri, "auto" if dpo else train.format, config,
                                  tokenizer, cache, local.get(uri), preference=dpo))
    if spec.evaluation.test_set:  # for dpo: instruction or chat rows, for the domain scores
        uri = spec.evaluation.test_set
        splits.append(check_split("spec.evaluation.testSet", uri, "auto" if dpo else train.format, config,
                                  tokenizer, cache, local.get(uri)))
    if spec.evaluation.preference_test_set:
        uri = spec.evaluation.preference_test_set
        splits.append(check_split("spec.evaluation.preferenceTestSet", uri, "auto", config, tokenizer, cache,
                                  local.get(uri), preference=True))
    return splits


def check_local(config: TrainerConfig, model_dir: Path, cache: Path,
                local: Mapping[str, str] | None = None) -> PreflightResult:
    """`run`'s model and data checks on files already on this machine, for `finetune plan --inspect`.

    The architecture and the tokenizer are read from the directory `model_dir` (the model the user
    inspected); each dataset URI of the spec is read from its plain path in `local` (a URI not in it is
    fetched as `run` fetches it). Plain paths are read in place without the allowed-roots confinement of
    `file://` URIs (`storage.resolve_local`): the user named them on their own machine, no spec did. The
    output is neither checked nor written. Returns a passing result; raises PreflightFailure
    (ModelUnreadable, DataInvalid) naming the field, file and line, as `run` would report it."""
    spec = config.spec
    uri = spec.base_model.resolved_uri()
    try:
        arch = read_architecture(model_dir)
    except ArchitectureError as err:
        raise PreflightFailure("ModelUnreadable", f"spec.baseModel.uri {uri}: {err}") from None
    check_serving(config, arch)
    tokenizer = load_tokenizer(uri, model_dir)
    splits = check_data(config, tokenizer, cache, local)
    return PreflightResult(ok=True, job_uid=config.uid, model_uri=uri, revision=spec.base_model.revision,
                           output_uri=spec.output.uri, architecture=_architecture(arch), splits=splits,
                           checked_at=_now())


# ------------------------------------------------------------------------------------------------
# Output and the whole check
# ------------------------------------------------------------------------------------------------


def _check_bucket(store: Any, output_uri: str) -> None:
    """An s3:// output's bucket must exist: some S3-compatible servers (SeaweedFS) create a bucket on the
    first PUT, which a pre-flight must not do; AWS S3 refuses that PUT with NoSuchBucket."""
    from finetune_trainer.errors import StorageError
    from finetune_trainer.storage import S3Store

    if not isinstance(store, S3Store):
        return
    try:
        store._call("check", store.uri, lambda: store.client.head_bucket(Bucket=store.bucket))
    except StorageError as err:
        if err.reason != "MissingObject":
            raise
        raise StorageError(f"the bucket {store.bucket!r} does not exist", reason="MissingObject") from None


def write_result(output_uri: str, result: PreflightResult) -> None:
    """Write `<output_uri>/preflight.json`; PreflightFailure OutputNotWritable naming the URI."""
    from finetune_trainer.storage import Store

    try:
        store = Store.for_uri(output_uri)
        _check_bucket(store, output_uri)
        store.write_json(PREFLIGHT_KEY, result.model_dump(by_alias=True, mode="json", exclude_none=True))
    except TrainerFailure as err:
        if _retryable(err):
            raise
        raise PreflightFailure("OutputNotWritable", f"spec.output.uri {output_uri}: cannot write "
                               f"{PREFLIGHT_KEY}: {err.message}") from None
    except OSError as err:  # a local output whose directory cannot be created or written
        raise PreflightFailure("OutputNotWritable", f"spec.output.uri {output_uri}: cannot write "
                               f"{PREFLIGHT_KEY}: {err}") from None


def run(config: TrainerConfig, output_uri: str | None = None, cache: Path | None = None) -> tuple[PreflightResult, int]:
    """Run every check; returns the result (also written to the output when it is writable) and the exit
    code."""
    from finetune_trainer.modeling import cache_dir

    spec = config.spec
    output = output_uri or os.environ.get(ENV_OUTPUT_URI) or spec.output.uri
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    # jobUid: the operator takes only its own FineTuneJob's result (`finetune_operator.progress`).
    result = PreflightResult(ok=False, job_uid=config.uid, model_uri=spec.base_model.resolved_uri(),
                             revision=spec.base_model.revision, output_uri=output, checked_at=_now())
    failure: PreflightFailure | None = None
    work = Path(tempfile.mkdtemp(prefix="preflight-", dir=cache))
    try:
        arch, model_dir = read_model(spec.base_model.resolved_uri(), spec.base_model.revision, cache, work)
        result.architecture = _architecture(arch)
        check_serving(config, arch)
        log.info("model: %s", arch.describe())
        tokenizer = load_tokenizer(spec.base_model.resolved_uri(), model_dir)
        result.splits = check_data(config, tokenizer, cache)
        result.ok = True
    except PreflightFailure as err:
        failure = err
    except TrainerFailure as err:  # StorageUnavailable: retry the pod
        log.error("%s", err)
        print(f"preflight: {err}", file=sys.stderr)
        return result, err.exit_code
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if failure is not None:
        result.error = TrainerError(reason=failure.reason, message=failure.message)
    try:
        write_result(output, result)
    except PreflightFailure as err:
        failure = failure or err
        if failure is err:
            result.ok, result.error = False, TrainerError(reason=err.reason, message=err.message)
        else:
            log.warning("%s (and %s)", failure, err)
    except TrainerFailure as err:
        print(f"preflight: {err}", file=sys.stderr)
        return result, err.exit_code
    if failure is not None:
        print(f"preflight failed: {failure}", file=sys.stderr)
        return result, EXIT_CONFIG_ERROR
    log.info("preflight passed; wrote %s/%s", output.rstrip("/"), PREFLIGHT_KEY)
    return result, EXIT_OK


def main(argv: list[str] | None = None) -> int:
    from finetune_trainer.entrypoint import load_config, setup_logging

    del argv  # everything comes from the config file and the environment
    setup_logging()
    try:
        config = load_config()
    except TrainerFailure as err:
        print(f"preflight: {err}", file=sys.stderr)
        return err.exit_code
    return run(config)[1]


if __name__ == "__main__":
    sys.exit(main())
