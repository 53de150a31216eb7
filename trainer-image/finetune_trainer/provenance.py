"""The provenance record of a run (`provenance.json`): what went in, so the result can be traced and redone.

It holds the sha256 of every training/validation/test file, the base model URI, revision and file hashes,
a hash of the resolved spec, the resolved hyperparameters, library versions, seed, image, world size and the
job's identity. It carries no host names and no local cache paths, and its keys are sorted, so two runs
of the same job on the same inputs give records that differ only in `startedAt` (and `job.uid`).

A chained stage (spec.baseModel.fromJob, `TrainerConfig.base`) also records its chain under `chain`: every earlier
stage (name, namespace, uid, objective, method, output URI), first first, the model it started from and the adapters
merged into it before its own method, in merge order, each with the sha256 of its files (`modeling.StartingModel`).
`baseModel` stays the model at spec.baseModel.uri (the chain's start, or the base job's merged/), so its file
hashes say what the chain's adapters were merged into.

This module builds the record; the trainer decides when to upload it (before the first step when
`compliance.provenanceRequired`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune_operator.contract import TrainerConfig
from finetune_operator.spec import BaseJobStatus

SCHEMA_VERSION = 1
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "tokenizers",
             "safetensors", "bm25s", "finetune-operator")
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_manifest(files: Mapping[str, str]) -> str:
    """One digest over {relative path: sha256}: sha256 of `sha256sum`-style lines, sorted by path."""
    lines = "".join(f"{digest}  {name}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def sha256_tree(root: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root` (hidden files skipped)."""
    base = Path(root)
    return {
        p.relative_to(base).as_posix(): sha256_file(p)
        for p in sorted(base.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(base).parts)
    }


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace: the same object always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_sha256(config: TrainerConfig) -> str:
    """sha256 of the canonical JSON of the resolved spec (wire names, unset fields left out)."""
    return hashlib.sha256(canonical_json(config.spec.wire()).encode()).hexdigest()


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def resolved_hyperparameters(config: TrainerConfig) -> dict[str, Any]:
    """The optimization settings as run: defaults filled in, learning rate resolved for the method, and the rung
    (micro-batch, accumulation, gradient checkpointing) the trainer set (`train.Run._use_rung`); gradient
    checkpointing is never left unset: the plan's choice (status.plan.rung, in `plan` too) where the spec left
    it to the plan."""
    spec = config.spec
    hp = spec.hyperparameters.wire()
    hp["learningRate"] = spec.hyperparameters.learning_rate_for(config.method)
    hp["gradientCheckpointing"] = config.gradient_checkpointing()
    resolved: dict[str, Any] = {"method": config.method, **hp}
    if config.method in ("lora", "qlora"):
        resolved["lora"] = spec.lora.wire()
    if config.method == "qlora":
        resolved["quantization"] = spec.resolved_quantization().wire()
    if config.method == "prefix":
        resolved["prefix"] = spec.resolved_prefix().wire()
    if config.method == "prompt":
        resolved["prompt"] = spec.resolved_prompt().wire()
    return resolved


def _data_entries(
    data_files: Mapping[str, Path] | Sequence[Path], data_uris: Mapping[str, str] | Sequence[str]
) -> list[dict[str, Any]]:
    if isinstance(data_files, Mapping):
        uris = data_uris if isinstance(data_uris, Mapping) else {}
        pairs = [(role, Path(path), uris.get(role)) for role, path in data_files.items()]
    else:
        uri_list = list(data_uris.values()) if isinstance(data_uris, Mapping) else list(data_uris)
        if len(uri_list) != len(data_files):
            raise ValueError(f"{len(data_files)} data files but {len(uri_list)} data URIs")
        pairs = [(None, Path(path), uri) for path, uri in zip(data_files, uri_list, strict=True)]
    entries = []
    for role, path, uri in pairs:
        entry: dict[str, Any] = {"uri": uri, "name": path.name}
        if role is not None:
            entry["role"] = role
        if path.is_dir():
            files = sha256_tree(path)
            entry.update(files=files, sha256=sha256_manifest(files),
                         bytes=sum((path / name).stat().st_size for name in files))
        else:
            entry.update(sha256=sha256_file(path), bytes=path.stat().st_size)
        entries.append(entry)
    return sorted(entries, key=lambda e: (e.get("role") or "", e["uri"] or "", e["name"]))


def chain_record(base: BaseJobStatus, merged_adapters: Sequence[Mapping[str, str]] = ()) -> dict[str, Any]:
    """The `chain` entry of a chained stage: its earlier stages, the model it started from, and the adapters merged
    into that model in order (`merged_adapters`: [{uri, sha256}] as the merge hashed them; an adapter missing there
    is recorded with sha256 null, never left out)."""
    digests = {entry["uri"]: entry.get("sha256") for entry in merged_adapters}
    return {
        "baseJob": {"name": base.name, "uid": base.uid},
        "stages": [{"name": stage.name, "namespace": stage.namespace, "uid": stage.uid, "objective": stage.objective,
                    "method": stage.method, "outputUri": stage.output_uri} for stage in base.chain],
        "startedFrom": {"uri": base.model_uri, "revision": base.revision},
        "adaptersMerged": [{"uri": uri, "sha256": digests.get(uri)} for uri in base.adapters],
    }


def chain_card_lines(config: TrainerConfig) -> list[str]:
    """The model card's account of a chained stage (Markdown lines, ending with a blank one); [] without config.base."""
    base = config.base
    if base is None:
        return []
    rows = [f"| {i} | `{stage.namespace}/{stage.name}` | {stage.objective} | {stage.method} | `{stage.output_uri}` |"
            for i, stage in enumerate(base.chain, 1)]
    merged = (f"with {len(base.adapters)} earlier adapter(s) merged into it in order before this stage's method ("
              + ", ".join(f"`{uri}`" for uri in base.adapters) + ")") if base.adapters else "as it is (a whole model)"
    return [f"This is a chained stage: it started from the result of FineTuneJob `{base.name}`, that is "
            f"`{base.model_uri}` {merged}. The earlier stages, first first (their adapters' sha256 are in the "
            "provenance record):", "",
            "| stage | FineTuneJob | objective | method | output |", "|---|---|---|---|---|", *rows, "",
            *([f"**This adapter applies to the chain's start, not to `{base.model_uri}` alone**: load `merged/` "
               "(spec.output.saveMerged), or merge the earlier adapters above into the base first, in order. "
               "Serving a chained stage therefore needs saveMerged (admission refuses spec.serving without it).", ""]
              if base.adapters and config.method in ("lora", "qlora") else [])]


def _timestamp(value: datetime | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sorted(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list | tuple):
        return [_sorted(v) for v in obj]
    return obj


def build_provenance(
    config: TrainerConfig,
    *,
    data_files: Mapping[str, Path] | Sequence[Path],
    data_uris: Mapping[str, str] | Sequence[str],
    base_model_uri: str,
    base_model_revision: str | None,
    base_model_files_sha256: str | Mapping[str, str] | None,
    image: str | None,
    seed: int,
    world_size: int,
    started_at: datetime | str | None,
    data_stats: Mapping[str, int] | None = None,
    retrieval: Mapping[str, Any] | None = None,
    merged_adapters: Sequence[Mapping[str, str]] = (),
) -> dict[str, Any]:
    """The provenance record (a JSON-ready dict with sorted keys).

    `data_files`/`data_uris`: local copies and their source URIs, either as {role: path} and {role: uri}
    (roles such as train/validation/test) or as two parallel lists. A directory is hashed file by file.
    `base_model_files_sha256`: one digest, or {relative path: sha256} of the model files (then the digest
    is `sha256_manifest` of it). `started_at`: a datetime (rendered RFC 3339 UTC) or an RFC 3339 string.
    `data_stats`: what was trained on (`contract.DataStats` wire form: examples, skipped rows, truncated).
    `retrieval`: spec.retrieval's corpus (every file's URI, sha256 and size), passages and settings
    (`retrieval.provenance_record`); left out without retrieval.
    `merged_adapters`: for a chained stage (`config.base`), the adapters merged before training with the sha256 of
    their files (`modeling.StartingModel.adapter_records()`); the `chain` entry is left out without config.base.
    """
    base_model: dict[str, Any] = {"uri": base_model_uri, "revision": base_model_revision}
    if isinstance(base_model_files_sha256, Mapping):
        base_model["files"] = dict(base_model_files_sha256)
        base_model["filesSha256"] = sha256_manifest(base_model_files_sha256)
    else:
        base_model["filesSha256"] = base_model_files_sha256
    record = {
        "schemaVersion": SCHEMA_VERSION,
        "job": {
            "name": config.name,
            "namespace": config.namespace,
            "uid": config.uid,
            "generation": config.generation,
        },
        "startedAt": _timestamp(started_at),
        "image": image,
        "seed": seed,
        "worldSize": world_size,
        "method": config.method,
        "baseModel": base_model,
        "data": _data_entries(data_files, data_uris),
        "configSha256": config_sha256(config),
        "hyperparameters": resolved_hyperparameters(config),
        "plan": config.plan.wire(),
        "libraries": library_versions(),
    }
    if data_stats is not None:
        record["dataStats"] = dict(data_stats)
    if retrieval is not None:
        record["retrieval"] = dict(retrieval)
    if config.base is not None:
        record["chain"] = chain_record(config.base, merged_adapters)
    return _sorted(record)
