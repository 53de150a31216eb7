"""Storage over a real S3 server (SeaweedFS on loopback) and local directories."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from finetune_operator.contract import MARKER_NAME
from finetune_trainer.errors import ConfigError, StorageError
from finetune_trainer.s3server import LocalS3
from finetune_trainer.s3server import _free_port as free_port
from finetune_trainer.storage import LocalStore, S3Store, StorageUnavailable, Store, fetch


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


class RecordingS3Store(S3Store):
    """Records the order in which objects are written; optionally fails one key (a real S3Store otherwise)."""

    def __init__(self, *args: object, fail_key: str | None = None, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.fail_key = fail_key
        self.writes: list[str] = []
        self._lock = threading.Lock()

    def upload_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        if key == self.fail_key:
            raise StorageError(f"injected failure for {key}", reason="AccessDenied")
        super().upload_file(local_path, key)
        with self._lock:
            self.writes.append(key)

    def write_bytes(self, key: str, data: bytes) -> None:
        super().write_bytes(key, data)
        with self._lock:
            self.writes.append(key)


# ---------------------------------------------------------------------------------------------- S3


def test_s3_roundtrip_and_listing(s3_env: dict[str, str], bucket: str) -> None:
    store = Store.for_uri(f"s3://{bucket}/runs/one/")
    assert isinstance(store, S3Store)
    store.write_json("status/report.json", {"phase": "training", "step": 3})
    store.write_bytes("b.bin", b"\x00\x01")
    store.write_bytes("a/c.txt", b"c")
    assert store.read_json("status/report.json") == {"phase": "training", "step": 3}
    assert store.read_bytes("b.bin") == b"\x00\x01"
    assert store.list() == ["a/c.txt", "b.bin", "status/report.json"]
    assert store.list("status/") == ["status/report.json"]
    assert store.exists("b.bin") and not store.exists("nope.bin")
    assert store.child("a/c.txt") == f"s3://{bucket}/runs/one/a/c.txt"
    # the prefix is a real prefix: nothing outside it shows up
    Store.for_uri(f"s3://{bucket}/runs/").write_bytes("other.txt", b"x")
    assert "other.txt" not in store.list()


def test_upload_dir_writes_marker_last_with_manifest(s3_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
    files = {"model.safetensors": b"w" * 1000, "config.json": b"{}", "sub/tokenizer.json": b"tok"}
    local = _tree(tmp_path / "out", files)
    store = RecordingS3Store(bucket, "job")
    manifest = store.upload_dir(local, "model", parallel=3)

    assert store.writes[-1] == f"model/{MARKER_NAME}"
    assert sorted(store.writes[:-1]) == sorted(f"model/{rel}" for rel in files)
    assert store.is_complete("model")
    marker = store.read_json(f"model/{MARKER_NAME}")
    assert marker == manifest
    assert {e["path"]: (e["size"], e["sha256"]) for e in marker["files"]} == {
        rel: (len(data), hashlib.sha256(data).hexdigest()) for rel, data in files.items()
    }
    assert marker["count"] == 3 and marker["total_bytes"] == 1005


def test_failed_upload_leaves_no_marker(s3_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
    local = _tree(tmp_path / "out", {"a.txt": b"a", "b.txt": b"b", "c.txt": b"c"})
    good = RecordingS3Store(bucket, "job")
    good.upload_dir(local, "model")
    assert good.is_complete("model")

    # a re-upload over a complete set that fails part-way must not leave the old marker behind
    failing = RecordingS3Store(bucket, "job", fail_key="model/b.txt")
    with pytest.raises(StorageError, match="injected failure"):
        failing.upload_dir(local, "model")
    assert not failing.is_complete("model")
    assert f"model/{MARKER_NAME}" not in failing.writes


def test_upload_dir_without_marker(s3_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
    store = Store.for_uri(f"s3://{bucket}/x")
    store.upload_dir(_tree(tmp_path / "d", {"f": b"1"}), "p", marker=False)
    assert store.list() == ["p/f"]
    assert not store.is_complete("p")


def test_download_prefix_and_delete(s3_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
    files = {"a.txt": b"alpha", "deep/er/b.txt": b"beta"}
    store = Store.for_uri(f"s3://{bucket}/root")
    store.upload_dir(_tree(tmp_path / "src", files), "ckpt/step-10")
    dest = store.download_prefix("ckpt/step-10", tmp_path / "dst")
    assert (dest / "a.txt").read_bytes() == b"alpha"
    assert (dest / "deep/er/b.txt").read_bytes() == b"beta"
    assert (dest / MARKER_NAME).is_file()

    store.delete_prefix("ckpt/step-10")
    assert store.list() == []
    with pytest.raises(StorageError) as err:
        store.download_prefix("ckpt/step-10", tmp_path / "again")
    assert err.value.reason == "MissingObject"


def test_missing_object_names_the_uri(s3_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
    store = Store.for_uri(f"s3://{bucket}/p/")
    with pytest.raises(StorageError) as err:
        store.read_bytes("nothing/here.json")
    assert err.value.reason == "MissingObject"
    assert f"s3://{bucket}/p/nothing/here.json" in str(err.value)
    assert err.value.exit_code == 3

    with pytest.raises(StorageError) as err:
        store.download_file("gone.bin", tmp_path / "gone.bin")
    assert err.value.reason == "MissingObject"
    assert not (tmp_path / "gone.bin").exists()

    with pytest.raises(StorageError) as err:
        Store.for_uri("s3://no-such-bucket-here/x").read_bytes("k")
    assert err.value.reason == "MissingObject" and "no-such-bucket-here" in str(err.value)


def test_wrong_credentials_are_access_denied(
    s3_env: dict[str, str], bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    Store.for_uri(f"s3://{bucket}/").write_bytes("k", b"v")
    wrong_secret = "definitely-not-the-secret-value"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    with pytest.raises(StorageError) as err:
        Store.for_uri(f"s3://{bucket}/").read_bytes("k")
    assert err.value.reason == "AccessDenied"
    assert "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in str(err.value)
    assert wrong_secret not in str(err.value) and s3_env["AWS_SECRET_ACCESS_KEY"] not in str(err.value)
    assert err.value.exit_code == 3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKUNKNOWNKEY0000")
    with pytest.raises(StorageError) as err:
        Store.for_uri(f"s3://{bucket}/").write_bytes("k2", b"v")
    assert err.value.reason == "AccessDenied" and "InvalidAccessKeyId" in str(err.value)


def test_unreachable_s3_is_retryable_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port(set())}")  # nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    store = Store.for_uri("s3://some-bucket/p", retry_seconds=1)
    with pytest.raises(StorageUnavailable) as err:
        store.read_bytes("k")
    assert err.value.reason == "StorageUnavailable"
    assert err.value.exit_code == 1  # retried by the Job, unlike MissingObject/AccessDenied
    assert "s3://some-bucket/p/k" in str(err.value)


def test_s3_outage_is_ridden_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with LocalS3(buckets=("outage",)) as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        store = Store.for_uri("s3://outage/run", retry_seconds=60)
        store.write_bytes("before.txt", b"1")
        server.stop()
        back = threading.Timer(1.5, server.start)
        back.start()
        try:
            store.write_bytes("during.txt", b"2")  # retried until the server is back
            assert store.read_bytes("before.txt") == b"1"
        finally:
            back.join()
        assert store.list() == ["before.txt", "during.txt"]


# ---------------------------------------------------------------------------------------- local


def test_local_store_roundtrip_is_atomic(tmp_path: Path) -> None:
    store = Store.for_uri(str(tmp_path / "out"))
    assert isinstance(store, LocalStore)
    store.write_json("status/report.json", {"step": 1})
    store.write_json("status/report.json", {"step": 2})
    assert store.read_json("status/report.json") == {"step": 2}
    assert sorted(p.name for p in (tmp_path / "out/status").iterdir()) == ["report.json"]  # no temp files
    store.upload_dir(_tree(tmp_path / "src", {"x/y.txt": b"y"}), "model")
    assert store.list() == ["model/_COMPLETE", "model/x/y.txt", "status/report.json"]
    assert store.is_complete("model")
    store.delete_prefix("model")
    assert store.list() == ["status/report.json"]
    assert not (tmp_path / "out/model").exists()
    with pytest.raises(StorageError) as err:
        store.read_bytes("model/x/y.txt")
    assert err.value.reason == "MissingObject"


def test_pvc_uri_resolves_under_pvc_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FT_PVC_ROOT", str(tmp_path))
    store = Store.for_uri("pvc://train-data/runs/a")
    store.write_bytes("f.txt", b"pvc")
    assert (tmp_path / "train-data/runs/a/f.txt").read_bytes() == b"pvc"
    assert store.child("f.txt") == "pvc://train-data/runs/a/f.txt"


def test_pvc_symlink_out_of_the_claim_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FT_PVC_ROOT", str(tmp_path / "pvc"))
    (tmp_path / "pvc/claim").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("s")
    (tmp_path / "pvc/claim/link").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(StorageError) as err:
        fetch("pvc://claim/link", tmp_path / "cache")
    assert err.value.reason == "PathNotAllowed"


def test_keys_may_not_traverse(tmp_path: Path) -> None:
    store = Store.for_uri(str(tmp_path))
    for key in ("../escape.txt", "a/../../b", "/abs"):
        with pytest.raises(ConfigError):
            store.write_bytes(key, b"x")
    assert not (tmp_path.parent / "escape.txt").exists()


# ------------------------------------------------------------------------------------------ fetch


def test_fetch_file_outside_allowed_roots_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FT_ALLOWED_ROOTS", raising=False)
    with pytest.raises(StorageError) as err:
        fetch("file:///etc/hostname", tmp_path / "cache")
    assert err.value.reason == "PathNotAllowed"
    assert "FT_ALLOWED_ROOTS" in str(err.value)

    monkeypatch.setenv("FT_ALLOWED_ROOTS", os.pathsep.join(["/nonexistent", "/etc"]))
    assert fetch("file:///etc/hostname", tmp_path / "cache") == Path("/etc/hostname")


def test_fetch_dotdot_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        fetch(f"file://{tmp_path}/../../etc/passwd", tmp_path / "cache")
    assert err.value.reason == "InvalidURI" and ".." in str(err.value)


def test_fetch_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FT_ALLOWED_ROOTS", str(tmp_path / "allowed"))
    data = _tree(tmp_path / "allowed", {"train.jsonl": b"{}\n"}) / "train.jsonl"
    assert fetch(f"file://{data}", tmp_path / "cache") == data
    with pytest.raises(StorageError) as err:
        fetch(f"file://{tmp_path}/allowed/missing.jsonl", tmp_path / "cache")
    assert err.value.reason == "MissingObject" and "missing.jsonl" in str(err.value)


def test_fetch_s3_prefix_reuses_cache_until_listing_changes(
    s3_env: dict[str, str], bucket: str, tmp_path: Path
) -> None:
    store = Store.for_uri(f"s3://{bucket}/models/tiny")
    store.upload_dir(_tree(tmp_path / "m", {"config.json": b'{"a": 1}', "w/weights.bin": b"123"}), "")
    cache = tmp_path / "cache"

    first = fetch(f"s3://{bucket}/models/tiny/", cache)
    assert (first / "config.json").read_bytes() == b'{"a": 1}'
    assert (first / "w/weights.bin").read_bytes() == b"123"

    # A local edit survives a second fetch: the copy was reused, not downloaded again.
    (first / "config.json").write_bytes(b"locally edited")
    again = fetch(f"s3://{bucket}/models/tiny", cache)  # same prefix without the slash: same entry
    assert again == first
    assert (again / "config.json").read_bytes() == b"locally edited"

    # Changing the object changes its ETag in the listing: the cache is refreshed.
    store.write_bytes("config.json", b'{"a": 2}')
    third = fetch(f"s3://{bucket}/models/tiny/", cache)
    assert (third / "config.json").read_bytes() == b'{"a": 2}'


def test_fetch_s3_single_object(s3_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
    store = Store.for_uri(f"s3://{bucket}/data")
    store.write_bytes("train.jsonl", b'{"text": "x"}\n')
    store.write_bytes("train.jsonl.bak", b"old")
    path = fetch(f"s3://{bucket}/data/train.jsonl", tmp_path / "cache")
    assert path.is_file() and path.name == "train.jsonl"
    assert path.read_bytes() == b'{"text": "x"}\n'
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.jsonl"]


def test_fetch_missing_s3_prefix(s3_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError) as err:
        fetch(f"s3://{bucket}/nothing/", tmp_path / "cache")
    assert err.value.reason == "MissingObject" and f"s3://{bucket}/nothing/" in str(err.value)


def test_fetch_hf_offline_names_the_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StorageError) as err:
        fetch("hf://example-org/missing-model-7b", tmp_path / "cache", revision="main")
    assert "hf://example-org/missing-model-7b" in str(err.value)

