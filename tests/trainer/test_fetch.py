"""`python -m finetune_trainer.fetch`: the serving pod's init container, against a real S3 server (SeaweedFS)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_trainer.fetch import fetch_into, main
from finetune_trainer.storage import Store


def test_fetch_s3_prefix_as_a_subprocess(s3_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
    """The command the vLLM Deployment's init container runs: the adapter's files land in DIR, layout kept."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_config.json").write_text('{"r": 8}')
    (src / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    Store.for_uri(f"s3://{bucket}/run/").upload_dir(src, "model")

    dest = tmp_path / "models" / "adapter"
    done = subprocess.run([sys.executable, "-m", "finetune_trainer.fetch", f"s3://{bucket}/run/model/", str(dest)],
                          capture_output=True, text=True, env={**os.environ, **s3_env}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (dest / "adapter_config.json").read_text() == '{"r": 8}'
    assert (dest / "sub" / "weights.bin").read_bytes() == b"\x00\x01"
    assert "3 files" in done.stdout  # the two files and the completion marker


def test_fetch_missing_prefix_exits_3_naming_the_uri(s3_env: dict[str, str], bucket: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main([f"s3://{bucket}/nothing/", str(tmp_path / "d")]) == 3
    assert f"s3://{bucket}/nothing" in capsys.readouterr().err


def test_fetch_local_copy_and_unsafe_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "pvc"
    (root / "claim" / "model").mkdir(parents=True)
    (root / "claim" / "model" / "config.json").write_text("{}")
    monkeypatch.setenv("FT_PVC_ROOT", str(root))
    assert (fetch_into("pvc://claim/model", tmp_path / "out") / "config.json").read_text() == "{}"
    assert main(["s3://bucket/../etc/", str(tmp_path / "x")]) == 3
    assert "path traversal" in capsys.readouterr().err
