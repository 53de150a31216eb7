"""The operator's report reader (against a real S3 server on loopback) and its Prometheus metrics."""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from finetune_operator.metrics import DEFAULT_PORT, Metrics, port_from_env, start
from finetune_operator.progress import MAX_REPORT_BYTES, Ignored, ReportReader, report_location

UID = "0c1f2e3d-0000-4000-8000-00000000000a"
REPORT = {"jobUid": UID, "phase": "training", "step": 10, "totalSteps": 100, "loss": 2.5,
          "updatedAt": "2026-03-01T12:00:00Z"}


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    from finetune_trainer.s3server import LocalS3

    with LocalS3(buckets=("out",)) as server:
        yield server


@pytest.fixture
def s3_env(s3: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The operator's environment pointing at the server (boto3 takes credentials from it)."""
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FT_S3_ENDPOINT", s3.endpoint_url)
    return s3


def warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Our warnings only (an operator run earlier in the session may have turned on DEBUG everywhere)."""
    return [r for r in caplog.records if r.name == "finetune_operator.progress" and r.levelno >= logging.WARNING]


def reader_for(s3: Any, monkeypatch: pytest.MonkeyPatch | None = None, **overrides: str) -> ReportReader:
    if monkeypatch is not None:
        for key, value in overrides.items():
            monkeypatch.setenv(key, value)
    return ReportReader.from_env()


@pytest.mark.parametrize(("uri", "where"), [
    ("s3://out/runs/demo/", ("out", "runs/demo/status/report.json")),
    ("s3://out/runs/demo", ("out", "runs/demo/status/report.json")),
    ("s3://out", ("out", "status/report.json")),
    ("pvc://claim/runs/demo", None),
])
def test_report_location(uri: str, where: tuple[str, str] | None) -> None:
    assert report_location(uri) == where


def test_report_location_rejects_other_schemes() -> None:
    with pytest.raises(ValueError, match="unsupported URI"):
        report_location("hf://org/name")


def test_from_env_prefers_the_operator_settings() -> None:
    reader = ReportReader.from_env({"FT_S3_ENDPOINT": "http://a:1", "AWS_ENDPOINT_URL": "http://b:2",
                                    "AWS_REGION": "eu-west-1"})
    assert (reader.endpoint_url, reader.region) == ("http://a:1", "eu-west-1")
    reader = ReportReader.from_env({"AWS_ENDPOINT_URL": "http://b:2", "FT_S3_REGION": "us-west-2"})
    assert (reader.endpoint_url, reader.region) == ("http://b:2", "us-west-2")
    assert ReportReader.from_env({}).endpoint_url is None


def test_reads_a_report(s3_env: Any) -> None:
    s3 = s3_env
    s3.client().put_object(Bucket="out", Key="ok/status/report.json", Body=json.dumps(REPORT).encode())
    report = reader_for(s3).read("s3://out/ok/", UID)
    assert report is not None
    assert (report.phase, report.step, report.total_steps, report.loss) == ("training", 10, 100, 2.5)


def test_missing_report_is_quietly_none(s3_env: Any, caplog: pytest.LogCaptureFixture) -> None:
    s3 = s3_env
    with caplog.at_level(logging.WARNING, logger="finetune_operator.progress"):
        assert reader_for(s3).read("s3://out/not-started/", UID) is None
        assert reader_for(s3).read("s3://no-such-bucket/x/", UID) is None
    assert warnings(caplog) == []


def test_pvc_outputs_have_no_readable_report(s3_env: Any) -> None:
    s3 = s3_env
    assert reader_for(s3).read("pvc://claim/runs/demo", UID) is None


def test_bad_report_is_none_and_logged_once(s3_env: Any, caplog: pytest.LogCaptureFixture) -> None:
    s3 = s3_env
    s3.client().put_object(Bucket="out", Key="bad/status/report.json",
                           Body=json.dumps({"jobUid": UID, "phase": "dancing"}).encode())
    reader = reader_for(s3)
    with caplog.at_level(logging.WARNING, logger="finetune_operator.progress"):
        for _ in range(2):
            ignored = reader.read("s3://out/bad/", UID)
            assert isinstance(ignored, Ignored) and ignored.cause == "invalid"
    (record,) = warnings(caplog)
    assert "s3://out/bad/status/report.json is not a valid report" in record.getMessage()
    assert "phase" in record.getMessage()


def test_wrong_credentials_are_none_and_logged(
    s3_env: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = s3_env
    s3.client().put_object(Bucket="out", Key="ok/status/report.json", Body=json.dumps(REPORT).encode())
    reader = reader_for(s3, monkeypatch, AWS_SECRET_ACCESS_KEY="wrong-secret-value")
    with caplog.at_level(logging.WARNING, logger="finetune_operator.progress"):
        assert reader.read("s3://out/ok/", UID) is None
    (record,) = warnings(caplog)
    assert "cannot read s3://out/ok/status/report.json" in record.getMessage()
    assert "wrong-secret-value" not in record.getMessage()  # no secret in logs


def test_unreachable_endpoint_is_none_and_logged_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    reader = ReportReader.from_env({"FT_S3_ENDPOINT": "http://127.0.0.1:9"})
    with caplog.at_level(logging.WARNING, logger="finetune_operator.progress"):
        assert reader.read("s3://out/x/", UID) is None
        assert reader.read("s3://out/x/", UID) is None
    assert len(warnings(caplog)) == 1


@pytest.mark.parametrize(("doc", "cause", "words"), [
    ({**REPORT, "jobUid": "9f9f9f9f-0000-4000-8000-0000000000ff", "loss": 0.01}, "foreign",
     "written for another FineTuneJob"),
    ({k: v for k, v in REPORT.items() if k != "jobUid"}, "unowned", "names no FineTuneJob"),
    ({**REPORT, "checkpoints": [{"step": i, "uri": f"s3://out/c/{i}/"} for i in range(129)]}, "invalid",
     "checkpoints: List should have at most 128 items"),
    ({**REPORT, "error": {"reason": "Crashed", "message": "x" * MAX_REPORT_BYTES}}, "oversized",
     f"larger than {MAX_REPORT_BYTES} bytes"),
])
def test_reports_not_of_this_job_or_out_of_bounds_are_ignored_and_logged_once(
    s3_env: Any, caplog: pytest.LogCaptureFixture, doc: dict[str, Any], cause: str, words: str
) -> None:
    """Another job's report (its scores, loss and artifacts), one without an owner, one with a list over its
    cap, one over the size cap: refused whole, with a cause the operator turns into one Warning event."""
    s3 = s3_env
    s3.client().put_object(Bucket="out", Key=f"{cause}/status/report.json", Body=json.dumps(doc).encode())
    reader = reader_for(s3)
    with caplog.at_level(logging.WARNING, logger="finetune_operator.progress"):
        for _ in range(3):
            ignored = reader.read(f"s3://out/{cause}/", UID)
            assert isinstance(ignored, Ignored), ignored
            assert (ignored.cause, ignored.uri) == (cause, f"s3://out/{cause}/status/report.json")
            assert words in ignored.message
    (record,) = warnings(caplog)
    assert words in record.getMessage()
    if cause == "foreign":
        assert "0.01" not in ignored.message  # nothing of another job's report in what this job is told


def test_preflight_result_of_another_job_is_ignored(s3_env: Any) -> None:
    s3 = s3_env
    result = {"jobUid": "9f9f9f9f-0000-4000-8000-0000000000ff", "ok": True, "modelUri": "s3://m/", "outputUri":
              "s3://out/pf/", "checkedAt": "2026-03-01T12:00:00Z"}
    s3.client().put_object(Bucket="out", Key="pf/preflight.json", Body=json.dumps(result).encode())
    reader = reader_for(s3)
    ignored = reader.read_preflight("s3://out/pf/", UID)
    assert isinstance(ignored, Ignored) and ignored.cause == "foreign"
    s3.client().put_object(Bucket="out", Key="pf/preflight.json", Body=json.dumps({**result, "jobUid": UID}).encode())
    found = reader.read_preflight("s3://out/pf/", UID)
    assert found is not None and not isinstance(found, Ignored) and found.ok


# --- metrics -----------------------------------------------------------------------------------


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    value = metrics.registry.get_sample_value(name, labels)
    return None if value is None else float(value)


def test_jobs_gauge_follows_the_current_phases() -> None:
    m = Metrics()
    assert sample(m, "finetune_operator_jobs", phase="Running") == 0.0
    m.observe_phase("a", "Pending")
    m.observe_phase("b", "Pending")
    m.observe_phase("a", "Running")
    assert sample(m, "finetune_operator_jobs", phase="Pending") == 1.0
    assert sample(m, "finetune_operator_jobs", phase="Running") == 1.0
    m.forget("a")
    m.forget("unknown")
    assert sample(m, "finetune_operator_jobs", phase="Running") == 0.0
    assert sample(m, "finetune_operator_jobs", phase="Pending") == 1.0


def test_counters_and_histogram() -> None:
    m = Metrics()
    m.reconcile_errors.labels(reason="api500").inc()
    m.reconcile_duration.observe(0.02)
    m.children.labels(action="created").inc(3)
    assert sample(m, "finetune_operator_reconcile_errors_total", reason="api500") == 1.0
    assert sample(m, "finetune_operator_reconcile_duration_seconds_count") == 1.0
    assert sample(m, "finetune_operator_children_total", action="created") == 3.0


@pytest.mark.parametrize(("value", "port"), [(None, DEFAULT_PORT), ("", DEFAULT_PORT), ("8081", 8081), ("0", 0),
                                             ("off", None), ("-1", None)])
def test_port_from_env(value: str | None, port: int | None) -> None:
    env = {} if value is None else {"FT_METRICS_PORT": value}
    assert port_from_env(env) == port


@pytest.mark.parametrize("value", ["http", "70000"])
def test_port_from_env_rejects_bad_values(value: str) -> None:
    with pytest.raises(ValueError, match="FT_METRICS_PORT"):
        port_from_env({"FT_METRICS_PORT": value})


def test_server_serves_and_frees_its_port() -> None:
    m = Metrics()
    m.observe_phase("a", "Succeeded")
    server = start(m, 0)
    assert server is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert 'finetune_operator_jobs{phase="Succeeded"} 1.0' in text
    assert "process_cpu_seconds_total" in text
    port = server.port
    server.close()
    again = start(Metrics(), port)  # the port is free again
    assert again is not None
    again.close()
    assert start(m, None) is None
