"""The local SeaweedFS S3 server: real S3 semantics, enforced credentials, restart on the same data."""

from __future__ import annotations

import os

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError

from finetune_trainer.s3server import LocalS3, find_weed


def _client(s3: LocalS3, access_key: str, secret_key: str):  # type: ignore[no-untyped-def]
    return boto3.session.Session().client(
        "s3",
        endpoint_url=s3.endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=s3.region,
        config=Config(retries={"total_max_attempts": 1}),
    )


def test_find_weed_is_executable() -> None:
    path = find_weed()
    assert os.path.basename(path) == "weed"
    assert os.access(path, os.X_OK)


def test_put_get_list(s3: LocalS3, bucket: str) -> None:
    client = s3.client()
    client.put_object(Bucket=bucket, Key="a/b.txt", Body=b"hello")
    assert client.get_object(Bucket=bucket, Key="a/b.txt")["Body"].read() == b"hello"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="a/")["Contents"]]
    assert keys == ["a/b.txt"]
    assert s3.endpoint_url.startswith("http://127.0.0.1:")


@pytest.mark.parametrize(
    ("which", "expected"),
    [("secret", "SignatureDoesNotMatch"), ("key", "InvalidAccessKeyId")],
)
def test_wrong_credentials_are_rejected(s3: LocalS3, bucket: str, which: str, expected: str) -> None:
    s3.client().put_object(Bucket=bucket, Key="x", Body=b"1")
    key = "AKWRONGKEY000000" if which == "key" else s3.access_key
    secret = "not-the-secret" if which == "secret" else s3.secret_key
    with pytest.raises(ClientError) as err:
        _client(s3, key, secret).get_object(Bucket=bucket, Key="x")
    assert err.value.response["Error"]["Code"] == expected
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_anonymous_requests_are_denied(s3: LocalS3, bucket: str) -> None:
    from botocore import UNSIGNED

    anonymous = boto3.session.Session().client(
        "s3", endpoint_url=s3.endpoint_url, region_name=s3.region, config=Config(signature_version=UNSIGNED)
    )
    with pytest.raises(ClientError) as err:
        anonymous.list_objects_v2(Bucket=bucket)
    assert err.value.response["Error"]["Code"] == "AccessDenied"


def test_env_names_the_server(s3: LocalS3) -> None:
    env = s3.env()
    assert env == {
        "AWS_ENDPOINT_URL": s3.endpoint_url,
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "AWS_REGION": s3.region,
        "AWS_DEFAULT_REGION": s3.region,
    }


def test_create_bucket_is_idempotent(s3: LocalS3) -> None:
    s3.create_bucket("twice-made")
    s3.create_bucket("twice-made")
    names = [b["Name"] for b in s3.client().list_buckets()["Buckets"]]
    assert names.count("twice-made") == 1


def test_stop_and_start_keep_data_and_endpoint() -> None:
    with LocalS3(buckets=("keep",)) as server:
        endpoint = server.endpoint_url
        server.client().put_object(Bucket="keep", Key="k", Body=b"before")
        server.stop()
        assert not server.running
        with pytest.raises(EndpointConnectionError):
            server.client(retries=0).get_object(Bucket="keep", Key="k")
        server.start()
        assert server.endpoint_url == endpoint
        assert server.client().get_object(Bucket="keep", Key="k")["Body"].read() == b"before"
    assert not server.root.exists()


def test_a_port_taken_before_weed_binds_it_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """The free-port check and weed's bind are not atomic: a port taken in between gets fresh ports."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    allocate = LocalS3._allocate_ports
    calls: list[dict[str, int]] = []

    def first_with_a_taken_port(self: LocalS3) -> dict[str, int]:
        ports = allocate(self)
        if not calls:
            ports["admin.port"] = taken.getsockname()[1]
        calls.append(ports)
        return ports

    monkeypatch.setattr(LocalS3, "_allocate_ports", first_with_a_taken_port)
    try:
        with LocalS3() as server:
            assert len(calls) == 2 and calls[1]["admin.port"] != taken.getsockname()[1]
            server.client().list_buckets()
    finally:
        taken.close()
