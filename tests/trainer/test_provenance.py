"""The provenance record: file hashes, config hash, resolved settings, determinism."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from finetune_operator import contract, sizing
from finetune_operator.contract import TrainerConfig
from finetune_operator.spec import FineTuneJob
from finetune_trainer.provenance import (
    build_provenance,
    config_sha256,
    resolved_hyperparameters,
    sha256_file,
    sha256_manifest,
    sha256_tree,
)
from tests.trainer.conftest import HealthcareSample

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _config(method: str = "lora", **hp: object) -> TrainerConfig:
    manifest = yaml.safe_load((EXAMPLES / "healthcare-lora.yaml").read_text())
    manifest["spec"]["method"] = method
    manifest["spec"]["hyperparameters"].update(hp)
    manifest["metadata"]["uid"] = "1234-abcd"
    job = FineTuneJob.model_validate(manifest)
    return contract.resolve(job, sizing.plan(job.spec), image="registry.example/finetune-trainer:0.1.0")


def _record(config: TrainerConfig, sample: HealthcareSample, **overrides: object) -> dict:  # type: ignore[type-arg]
    kwargs: dict[str, object] = dict(
        data_files={"train": sample.train, "test": sample.test},
        data_uris={"train": "s3://healthcare-data/instructions/train.jsonl",
                   "test": "s3://healthcare-data/instructions/test.jsonl"},
        base_model_uri=config.spec.base_model.uri,
        base_model_revision="main",
        base_model_files_sha256="ab" * 32,
        image=config.image,
        seed=42,
        world_size=2,
        started_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    kwargs.update(overrides)
    return build_provenance(config, **kwargs)  # type: ignore[arg-type]


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * (3 << 20) + b"tail")  # spans several read chunks
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_data_hashes_match_the_files(healthcare_sample: HealthcareSample) -> None:
    record = _record(_config(), healthcare_sample)
    by_role = {entry["role"]: entry for entry in record["data"]}
    for role, path in (("train", healthcare_sample.train), ("test", healthcare_sample.test)):
        assert by_role[role]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert by_role[role]["bytes"] == path.stat().st_size
        assert by_role[role]["uri"] == f"s3://healthcare-data/instructions/{role}.jsonl"
    assert [e["role"] for e in record["data"]] == ["test", "train"]  # sorted, deterministic


def test_parallel_lists_and_directories(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.jsonl").write_text('{"text": "a"}\n')
    (shards / "b.jsonl").write_text('{"text": "b"}\n')
    single = tmp_path / "v.jsonl"
    single.write_text("{}\n")
    record = _record(
        _config(),
        HealthcareSample(tmp_path, single, single, single),
        data_files=[shards, single],
        data_uris=["s3://d/shards/", "s3://d/v.jsonl"],
        base_model_files_sha256={"model.safetensors": "11" * 32, "config.json": "22" * 32},
    )
    shard_entry = next(e for e in record["data"] if e["uri"] == "s3://d/shards/")
    assert shard_entry["files"] == {
        "a.jsonl": hashlib.sha256(b'{"text": "a"}\n').hexdigest(),
        "b.jsonl": hashlib.sha256(b'{"text": "b"}\n').hexdigest(),
    }
    assert shard_entry["sha256"] == sha256_manifest(shard_entry["files"])
    assert "role" not in shard_entry
    lines = f"{'22' * 32}  config.json\n{'11' * 32}  model.safetensors\n"
    assert record["baseModel"]["filesSha256"] == hashlib.sha256(lines.encode()).hexdigest()
    with pytest.raises(ValueError, match="2 data files but 1 data URIs"):
        _record(_config(), HealthcareSample(tmp_path, single, single, single),
                data_files=[shards, single], data_uris=["s3://d/x"])


def test_sha256_tree_skips_hidden_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/w.bin").write_bytes(b"w")
    (tmp_path / ".partial.tmp").write_bytes(b"junk")
    assert sha256_tree(tmp_path) == {"sub/w.bin": hashlib.sha256(b"w").hexdigest()}


def test_config_hash_is_the_canonical_spec(healthcare_sample: HealthcareSample) -> None:
    config = _config()
    canonical = json.dumps(config.spec.wire(), sort_keys=True, separators=(",", ":"))
    assert config_sha256(config) == hashlib.sha256(canonical.encode()).hexdigest()
    assert _record(config, healthcare_sample)["configSha256"] == config_sha256(config)
    assert config_sha256(_config(seed=7)) != config_sha256(config)


def test_record_contents(healthcare_sample: HealthcareSample) -> None:
    record = _record(_config("qlora"), healthcare_sample)
    assert record["job"] == {"generation": None, "name": "healthcare-assistant", "namespace": "default",
                             "uid": "1234-abcd"}
    assert record["startedAt"] == "2025-01-02T03:04:05Z"
    assert (record["seed"], record["worldSize"], record["method"]) == (42, 2, "qlora")
    assert record["image"] == "registry.example/finetune-trainer:0.1.0"
    assert record["baseModel"] == {"uri": "hf://meta-llama/Llama-2-7b-hf", "revision": "main",
                                   "filesSha256": "ab" * 32}
    hp = record["hyperparameters"]
    assert hp["learningRate"] == 2e-4 and hp["batchSize"] == 4 and hp["maxSeqLength"] == 512
    assert hp["lora"]["r"] == 16 and hp["quantization"]["type"] == "nf4"
    libs = record["libraries"]
    assert libs["torch"] == importlib.metadata.version("torch")
    assert libs["transformers"] == importlib.metadata.version("transformers")
    assert set(libs) >= {"python", "peft", "accelerate", "datasets", "bitsandbytes"}
    assert "quantization" not in _record(_config("lora"), healthcare_sample)["hyperparameters"]
    assert "lora" not in _record(_config("full"), healthcare_sample)["hyperparameters"]


def test_record_is_deterministic_and_host_free(healthcare_sample: HealthcareSample) -> None:
    import socket

    first = _record(_config(), healthcare_sample)
    second = _record(_config(), healthcare_sample)
    assert json.dumps(first) == json.dumps(second)  # same key order, same values
    assert list(first) == sorted(first)
    text = json.dumps(first)
    host = socket.gethostname()
    assert f'"{host}"' not in text and "host" not in text.lower()
    assert str(healthcare_sample.dir) not in text  # no local cache paths


@pytest.mark.parametrize(("method", "block", "settings"), [
    ("prefix", "prefix", {"virtualTokens": 8, "projection": True}),
    ("prompt", "prompt", {"virtualTokens": 12, "init": "text", "initText": "Answer as a clinician."}),
])
def test_virtual_token_methods_record_their_settings(method: str, block: str, settings: dict[str, object]) -> None:
    manifest = yaml.safe_load((EXAMPLES / "healthcare-lora.yaml").read_text())
    spec = manifest["spec"]
    spec["method"] = method
    spec.pop("lora", None)
    spec[block] = settings
    spec["hyperparameters"].update(packing=False, gradientCheckpointing=False)
    manifest["metadata"]["uid"] = "1234-abcd"
    job = FineTuneJob.model_validate(manifest)
    config = contract.resolve(job, sizing.plan(job.spec), image="registry.example/finetune-trainer:0.1.0")
    resolved = resolved_hyperparameters(config)
    assert resolved["method"] == method
    assert {k: resolved[block][k] for k in settings} == settings
    assert "lora" not in resolved and "quantization" not in resolved


def test_a_chained_stage_records_its_chain(healthcare_sample: HealthcareSample) -> None:
    """config.base (resolved from spec.baseModel.fromJob): every earlier stage, the model started from, and each
    merged adapter with its sha256 in merge order; an adapter the trainer did not hash is recorded as null."""
    from finetune_operator.spec import BaseJobStatus, ChainStage

    stages = [ChainStage(name="sft", namespace="clinical", uid="u-1", objective="sft", method="lora",
                         output_uri="s3://out/sft/"),
              ChainStage(name="dpo", namespace="clinical", uid="u-2", objective="dpo", method="qlora",
                         output_uri="s3://out/dpo/")]
    base = BaseJobStatus(name="dpo", uid="u-2", phase="Succeeded", model_uri="hf://org/base", revision="main",
                         adapters=["s3://out/sft/model/", "s3://out/dpo/model/"], chain=stages)
    config = _config().model_copy(update={"base": base})
    record = _record(config, healthcare_sample, merged_adapters=[{"uri": "s3://out/sft/model/", "sha256": "cd" * 32}])
    assert record["chain"] == {
        "adaptersMerged": [{"sha256": "cd" * 32, "uri": "s3://out/sft/model/"},
                           {"sha256": None, "uri": "s3://out/dpo/model/"}],
        "baseJob": {"name": "dpo", "uid": "u-2"},
        "stages": [{"method": "lora", "name": "sft", "namespace": "clinical", "objective": "sft",
                    "outputUri": "s3://out/sft/", "uid": "u-1"},
                   {"method": "qlora", "name": "dpo", "namespace": "clinical", "objective": "dpo",
                    "outputUri": "s3://out/dpo/", "uid": "u-2"}],
        "startedFrom": {"revision": "main", "uri": "hf://org/base"},
    }
    assert "chain" not in _record(_config(), healthcare_sample)  # an unchained job has none


def test_the_model_card_names_the_chain() -> None:
    from finetune_operator.spec import BaseJobStatus, ChainStage
    from finetune_trainer.modelcard import render_model_card
    from finetune_trainer.provenance import chain_card_lines

    assert chain_card_lines(_config()) == []
    base = BaseJobStatus(name="sft", model_uri="hf://org/base", adapters=["s3://out/sft/model/"],
                         chain=[ChainStage(name="sft", namespace="clinical", objective="sft", method="lora",
                                           output_uri="s3://out/sft/")])
    card = render_model_card(_config().model_copy(update={"base": base}), evaluation=None, artifacts={},
                             metrics_summary={})
    assert ("it started from the result of FineTuneJob `sft`, that is `hf://org/base` with 1 earlier adapter(s) merged "
            "into it in order before this stage's method (`s3://out/sft/model/`)") in card
    assert "| 1 | `clinical/sft` | sft | lora | `s3://out/sft/` |" in card
    whole = base.model_copy(update={"model_uri": "s3://out/sft/merged/", "adapters": []})
    assert "`s3://out/sft/merged/` as it is (a whole model)" in "\n".join(
        chain_card_lines(_config().model_copy(update={"base": whole})))
