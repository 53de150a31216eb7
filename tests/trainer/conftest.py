"""Session fixtures for the trainer tests: a real S3 server, the tiny model and the bundled sample.

Imports stay light (no torch, no boto3 at collection time): each fixture imports what it needs.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from finetune_trainer.s3server import LocalS3

DATA_DIR = Path(__file__).resolve().parents[2] / "trainer-image" / "finetune_trainer" / "data"


@dataclass(frozen=True)
class HealthcareSample:
    """Paths of the bundled synthetic healthcare sample."""

    dir: Path
    train: Path
    test: Path
    glossary: Path


@pytest.fixture(scope="session")
def s3() -> Iterator[LocalS3]:
    """A SeaweedFS S3 server on 127.0.0.1 with enforced credentials, shared by the session.

    Tests that stop it (outages) must start it again before returning; prefer a private `LocalS3()`.
    """
    from finetune_trainer.s3server import LocalS3

    with LocalS3() as server:
        yield server


@pytest.fixture
def s3_env(s3: LocalS3, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point this process's boto3 (AWS_* variables) at the shared server; returns the variables."""
    env = s3.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return env


@pytest.fixture
def bucket(s3: LocalS3) -> str:
    """A new, empty bucket on the shared server."""
    name = f"t-{secrets.token_hex(6)}"
    s3.create_bucket(name)
    return name


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama + tokenizer (finetune_trainer.tiny defaults), built once per session. Do not modify."""
    from finetune_trainer.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def healthcare_sample() -> HealthcareSample:
    return HealthcareSample(
        dir=DATA_DIR,
        train=DATA_DIR / "healthcare_train.jsonl",
        test=DATA_DIR / "healthcare_test.jsonl",
        glossary=DATA_DIR / "healthcare_glossary.txt",
    )
