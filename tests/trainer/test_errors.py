"""Expected failures end with a clear reason and exit code 3 (or 4), crashes with 1, and nothing partial
is ever marked complete."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.contract import EXIT_CONFIG_ERROR, MARKER_NAME, REPORT_KEY
from tests.trainer import train_helpers as th


@pytest.fixture(scope="module")
def staged(s3: Any, tiny_model_dir: Path, healthcare_sample: Any) -> th.Staged:
    return th.stage_in_new_bucket(s3, "errors", tiny_model_dir, healthcare_sample)


def _report(s3: Any, output: str) -> dict[str, Any]:
    bucket, _, prefix = output[len("s3://"):].partition("/")
    body = s3.client().get_object(Bucket=bucket, Key=prefix + REPORT_KEY)["Body"].read()
    return dict(json.loads(body))


def _keys(s3: Any, output: str) -> list[str]:
    bucket, _, prefix = output[len("s3://"):].partition("/")
    listed = s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return [obj["Key"][len(prefix):] for obj in listed]


def _upload(s3: Any, staged: th.Staged, key: str, data: bytes) -> str:
    s3.client().put_object(Bucket=staged.bucket, Key=key, Body=data)
    return f"s3://{staged.bucket}/{key}"


def _assert_failed(s3: Any, config: Any, reason: str, *fragments: str) -> dict[str, Any]:
    output = config.spec.output.uri
    assert th.exit_code_in_process(config) == EXIT_CONFIG_ERROR
    report = _report(s3, output)
    assert report["phase"] == "failed"
    assert report["error"]["reason"] == reason, report["error"]
    for fragment in fragments:
        assert fragment in report["error"]["message"]
    keys = _keys(s3, output)
    assert MARKER_NAME not in keys and not any(k.endswith(MARKER_NAME) for k in keys)
    return report


def test_the_report_names_its_finetunejob(s3: Any, s3_env: Any, staged: th.Staged) -> None:
    """Every report carries the FineTuneJob's uid from the config snapshot (`jobUid`): the operator takes no
    report that is not its job's."""
    uid = "5e1f0b7a-0000-4000-8000-0000000000c1"
    uri = _upload(s3, staged, "uid/train.jsonl", b'{"instruction": "no output"}\n')
    config = th.make_config(staged, {"dataset": {"train": uri}}, uid=uid)
    report = _assert_failed(s3, config, "UnknownFormat", f"{uri} (line 1)")
    assert report["jobUid"] == uid


def test_malformed_rows_fail_with_file_and_line(s3: Any, s3_env: Any, staged: th.Staged) -> None:
    good = Path(__file__).resolve().parents[2] / "trainer-image/finetune_trainer/data/healthcare_train.jsonl"
    lines = good.read_bytes().splitlines()
    lines[4] = b'{"instruction": "broken'
    lines[9] = b'{"instruction": "no output"}'
    uri = _upload(s3, staged, "bad/train.jsonl", b"\n".join(lines))
    config = th.make_config(staged, {"dataset": {"train": uri}})
    _assert_failed(s3, config, "InvalidData", f"{uri} line 5: invalid JSON", f"{uri} line 10: missing key 'output'")


def test_unknown_format_names_keys(s3: Any, s3_env: Any, staged: th.Staged) -> None:
    uri = _upload(s3, staged, "qa/train.jsonl", b'{"question": "q", "answer": "a"}\n' * 10)
    config = th.make_config(staged, {"dataset": {"train": uri}})
    _assert_failed(s3, config, "UnknownFormat", "[answer, question]", "instruction, input (optional), output")


def test_missing_s3_object(s3: Any, s3_env: Any, staged: th.Staged) -> None:
    uri = f"s3://{staged.bucket}/data/nope.jsonl"
    config = th.make_config(staged, {"dataset": {"train": uri}})
    _assert_failed(s3, config, "MissingObject", uri)


def test_wrong_credentials(s3: Any, s3_env: Any, staged: th.Staged, monkeypatch: pytest.MonkeyPatch,
                           tmp_path: Path) -> None:
    """Wrong keys for the data: AccessDenied, exit 3. The output is a local directory here, since the
    same wrong keys could not write a report to S3 either."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    monkeypatch.setenv("FT_S3_RETRY_SECONDS", "2")
    monkeypatch.setenv("FT_CACHE_DIR", str(tmp_path / "cache"))  # nothing cached from earlier tests
    output = tmp_path / "out"
    config = th.make_config(staged)
    assert th.exit_code_in_process(config, str(output)) == EXIT_CONFIG_ERROR
    report = json.loads((output / REPORT_KEY).read_text())
    assert report["error"]["reason"] == "AccessDenied"
    assert "AWS_SECRET_ACCESS_KEY" in report["error"]["message"]
    assert "wrong-secret" not in report["error"]["message"]
    assert not (output / MARKER_NAME).exists()


def test_unknown_target_module_is_a_config_error(s3: Any, s3_env: Any, staged: th.Staged) -> None:
    config = th.make_config(staged, {"lora": {"targetModules": ["attn_qkv"]}})
    _assert_failed(s3, config, "InvalidConfig", "spec.lora.targetModules", "attn_qkv", "q_proj")


def test_a_crash_is_exit_1_and_reported(s3: Any, s3_env: Any, staged: th.Staged,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_trainer import train

    def boom(self: Any, per_rank: int, total: int) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(train.Run, "_train", boom)
    config = th.make_config(staged, {"evaluation": {"enabled": False}})
    assert th.exit_code_in_process(config) == 1
    report = _report(s3, config.spec.output.uri)
    assert report["error"] == {"reason": "Crashed", "message": "RuntimeError: simulated bug"}
    assert MARKER_NAME not in _keys(s3, config.spec.output.uri)


def test_missing_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_trainer import entrypoint

    monkeypatch.setenv("FT_CONFIG", str(tmp_path / "absent.json"))
    assert entrypoint.main([]) == EXIT_CONFIG_ERROR


def test_exit_code_survives_the_launcher_with_two_processes(s3: Any, s3_env: dict[str, str], staged: th.Staged,
                                                            tmp_path: Path) -> None:
    """torchrun reports any failed worker as 1; the launcher must still exit 3 for bad data."""
    uri = _upload(s3, staged, "bad2/train.jsonl", b'{"instruction": "x", "output": "y"}\nnot json\n')
    config = th.make_config(staged, {"dataset": {"train": uri}})
    env = th.trainer_env(config, tmp_path, s3_env, FT_NUM_MACHINES="1", FT_PROCS_PER_MACHINE="2")
    proc = th.launch(env)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_CONFIG_ERROR, out.decode(errors="replace")[-3000:]
    assert b"line 2: invalid JSON" in out
    report = _report(s3, config.spec.output.uri)
    assert report["error"]["reason"] == "InvalidData" and report["worldSize"] == 2
