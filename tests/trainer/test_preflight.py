"""`python -m finetune_trainer.preflight` against the tiny model and the bundled sample in the local S3."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.contract import EXIT_CONFIG_ERROR, PREFLIGHT_KEY, PreflightResult

from .train_helpers import Staged, make_config, stage_in_new_bucket, store, trainer_env


@pytest.fixture(scope="module")
def staged(s3: Any, tiny_model_dir: Path, healthcare_sample: Any) -> Staged:
    return stage_in_new_bucket(s3, "preflight", tiny_model_dir, healthcare_sample)


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _run(config: Any, tmp_path: Path) -> tuple[PreflightResult, int]:
    from finetune_trainer import preflight

    return preflight.run(config, cache=tmp_path / "cache")


def _written(output_uri: str) -> PreflightResult:
    return PreflightResult.model_validate(store(output_uri).read_json(PREFLIGHT_KEY))


def test_good_job_reports_the_model_and_the_data(staged: Staged, s3_env: dict[str, str], tiny_model_dir: Path,
                                                 healthcare_sample: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    uid = "5e1f0b7a-0000-4000-8000-0000000000c2"
    config = make_config(staged, uid=uid)
    result, code = _run(config, tmp_path)

    assert code == 0, result.error
    written = _written(config.spec.output.uri)
    assert written == result
    assert written.job_uid == uid  # the operator takes only its own FineTuneJob's result
    assert store(config.spec.output.uri).read_json(PREFLIGHT_KEY)["jobUid"] == uid
    assert written.ok and written.error is None
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    arch = written.architecture
    assert arch is not None
    assert arch.parameters == sum(p.numel() for p in model.parameters())
    assert arch.parameters_source == "safetensors headers"
    assert (arch.layers, arch.hidden_size, arch.vocab_size, arch.attention_heads, arch.kv_heads) == (
        model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size,
        model.config.num_attention_heads, model.config.num_key_value_heads)
    splits = {s.field: s for s in written.splits}
    assert set(splits) == {"spec.dataset.train", "spec.evaluation.testSet"}
    for field, path, uri in (("spec.dataset.train", healthcare_sample.train, staged.train_uri),
                             ("spec.evaluation.testSet", healthcare_sample.test, staged.test_uri)):
        split = splits[field]
        assert [f.uri for f in split.files] == [uri]
        assert split.examples == split.files[0].rows == _lines(path)
        assert split.format == "instruction"
        assert split.tokens > split.examples  # every example has more than one token
        assert split.sampled is (split.examples > 2000)


def test_s3_model_is_read_without_its_weights(staged: Staged, s3_env: dict[str, str], tiny_model_dir: Path,
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole objects read are the small files only; of a safetensors object, only its header's bytes."""
    from finetune_trainer.storage import S3Store

    whole: list[str] = []
    ranged: dict[str, int] = {}
    read_bytes, read_range = S3Store.read_bytes, S3Store.read_range

    def spy_bytes(self: S3Store, key: str) -> bytes:
        whole.append(key)
        return read_bytes(self, key)

    def spy_range(self: S3Store, key: str, start: int, length: int) -> bytes:
        data = read_range(self, key, start, length)
        ranged[key] = ranged.get(key, 0) + len(data)
        return data

    monkeypatch.setattr(S3Store, "read_bytes", spy_bytes)
    monkeypatch.setattr(S3Store, "read_range", spy_range)
    result, code = _run(make_config(staged), tmp_path)

    assert code == 0, result.error
    assert "config.json" in whole and not any(key.endswith(".safetensors") for key in whole)
    weights = sorted(p for p in tiny_model_dir.glob("*.safetensors"))
    assert sorted(ranged) == [p.name for p in weights]
    for path in weights:
        assert 8 < ranged[path.name] < path.stat().st_size


def test_file_model_is_read_in_place(staged: Staged, s3_env: dict[str, str], tiny_model_dir: Path,
                                     tmp_path: Path) -> None:
    from_s3, _ = _run(make_config(staged), tmp_path)
    in_place, code = _run(make_config(staged, {"baseModel": {"uri": f"file://{tiny_model_dir}"}}), tmp_path)

    assert code == 0, in_place.error
    assert in_place.architecture == from_s3.architecture is not None
    assert in_place.splits == from_s3.splits


def test_sampled_token_count_is_extrapolated(staged: Staged, s3_env: dict[str, str], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_trainer import preflight

    config = make_config(staged)
    full, _ = _run(config, tmp_path)
    monkeypatch.setattr(preflight, "SAMPLE_ROWS", 10)
    sampled, code = _run(config, tmp_path)

    assert code == 0
    train, train_full = sampled.splits[0], full.splits[0]
    assert train.examples > 10 and not train_full.sampled
    assert train.sampled and train.files[0].sampled and train.files[0].sample_rows == 10
    assert train.examples == train_full.examples
    # an estimate from 10 rows of similar length: near the exact count, but not copied from it
    assert 0.5 * train_full.tokens < train.tokens < 2 * train_full.tokens


def test_wrong_key_is_data_invalid_naming_file_and_line(staged: Staged, s3: Any, s3_env: dict[str, str],
                                                        tmp_path: Path) -> None:
    good = '{"instruction": "Define fever.", "output": "A raised body temperature."}'
    bad = '{"instructions": "Define cough.", "output": "A reflex that clears the airways."}'
    key = f"data/bad-{secrets.token_hex(3)}.jsonl"
    s3.client().put_object(Bucket=staged.bucket, Key=key, Body=f"{good}\n{good}\n{bad}\n".encode())
    uri = f"s3://{staged.bucket}/{key}"
    config = make_config(staged, {"dataset": {"train": uri, "format": "instruction"}})

    result, code = _run(config, tmp_path)

    assert code == EXIT_CONFIG_ERROR
    assert result.error is not None and result.error.reason == "DataInvalid"
    assert f"{uri} line 3" in result.error.message and "'instruction'" in result.error.message
    written = _written(config.spec.output.uri)
    assert not written.ok and written.error == result.error
    assert written.architecture is not None  # the model was read before the data
    assert written.job_uid is None  # a config without a uid (`finetune plan`, tests): none written


def test_missing_model_is_model_unreadable(staged: Staged, s3_env: dict[str, str], tmp_path: Path) -> None:
    missing = f"s3://{staged.bucket}/no-such-model/"
    config = make_config(staged, {"baseModel": {"uri": missing}})

    result, code = _run(config, tmp_path)

    assert code == EXIT_CONFIG_ERROR
    assert result.error is not None and result.error.reason == "ModelUnreadable"
    assert missing in result.error.message
    written = _written(config.spec.output.uri)
    assert written.error == result.error and written.architecture is None and written.splits == []


def test_unwritable_output_is_output_not_writable(staged: Staged, s3_env: dict[str, str], tmp_path: Path) -> None:
    output = f"s3://no-bucket-{secrets.token_hex(4)}/out/"
    config = make_config(staged, {"output": {"uri": output}})

    result, code = _run(config, tmp_path)

    assert code == EXIT_CONFIG_ERROR
    assert result.error is not None and result.error.reason == "OutputNotWritable"
    assert output in result.error.message
    assert result.architecture is not None and result.splits  # everything before the write passed


def test_output_path_that_cannot_be_created_is_output_not_writable(staged: Staged, s3_env: dict[str, str],
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that really fails: the output directory would have to be created inside a regular file."""
    monkeypatch.setenv("FT_PVC_ROOT", str(tmp_path))
    (tmp_path / "a-file").write_text("not a directory")
    output = "pvc://a-file/out"
    config = make_config(staged, {"output": {"uri": output}})

    result, code = _run(config, tmp_path)

    assert code == EXIT_CONFIG_ERROR
    assert result.error is not None and result.error.reason == "OutputNotWritable"
    assert output in result.error.message
    assert (tmp_path / "a-file").read_text() == "not a directory"


def test_module_exits_config_error_with_the_reason_on_stderr(staged: Staged, s3_env: dict[str, str],
                                                             tmp_path: Path) -> None:
    """The pod's command: FT_CONFIG in, exit code and stderr out (here a file:// model that is not there)."""
    missing = f"file://{tmp_path}/no-model"
    config = make_config(staged, {"baseModel": {"uri": missing}})
    env = trainer_env(config, tmp_path, s3_env)

    proc = subprocess.run([sys.executable, "-m", "finetune_trainer.preflight"], env=env, capture_output=True,
                          text=True, timeout=300)

    assert proc.returncode == EXIT_CONFIG_ERROR, proc.stderr
    assert "ModelUnreadable" in proc.stderr and missing in proc.stderr
    assert _written(config.spec.output.uri).error is not None


# spec.serving: the adapter's target modules must be ones vLLM loads LoRA on (finetune_operator.serving's table).


def test_serving_with_modules_vllm_cannot_load_is_serving_unsupported(staged: Staged, s3_env: dict[str, str],
                                                                     tmp_path: Path) -> None:
    config = make_config(staged, {"lora": {"targetModules": ["q_proj", "v_proj", "c_attn"]}, "serving": {}})

    result, code = _run(config, tmp_path)

    assert code == EXIT_CONFIG_ERROR
    assert result.error is not None and result.error.reason == "ServingUnsupported"
    message = result.error.message
    assert "spec.lora.targetModules ['c_attn']" in message and "'llama'" in message
    assert "spec.output.saveMerged: true" in message
    assert result.architecture is not None and result.splits == []  # before the data: no time spent on it
    assert _written(config.spec.output.uri).error == result.error

    merged = make_config(staged, {"lora": {"targetModules": ["q_proj", "v_proj", "c_attn"]}, "serving": {},
                                  "output": {"saveMerged": True}})
    passed, code = _run(merged, tmp_path)
    assert code == 0 and passed.ok, passed.error  # the merged model is served: no LoRA for vLLM to load


def test_serving_on_an_architecture_vllm_lora_is_not_known_for(staged: Staged, s3_env: dict[str, str],
                                                              tiny_model_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config_json = json.loads((model / "config.json").read_text())
    config_json["model_type"] = "gpt_neox"
    (model / "config.json").write_text(json.dumps(config_json))
    config = make_config(staged, {"baseModel": {"uri": f"file://{model}"}, "serving": {}})

    result, code = _run(config, tmp_path)

    assert code == EXIT_CONFIG_ERROR
    assert result.error is not None and result.error.reason == "ServingUnsupported"
    assert "model type 'gpt_neox'" in result.error.message and "saveMerged" in result.error.message
