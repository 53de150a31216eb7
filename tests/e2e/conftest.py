"""Fixtures of the end-to-end suite: a real API server (the `kubeconfig` fixture of tests/conftest.py: a
fresh envtest control plane from KUBEBUILDER_ASSETS, or the cluster of KUBECONFIG with `--e2e`) with the
CRD, a fresh namespace, a local S3 server (SeaweedFS on this machine's loopback), the operator as a
`kopf run` subprocess, and the local pod runner standing in for the kubelet of the training pods (see
podrunner.py and README.md).

Without either source of an API server the tests are skipped (tests/conftest.py), and session fixtures
only start for tests that run. The same code serves envtest, kind, k3s and cloud clusters: the only
things it needs from the cluster are the API and, for Job completion and garbage collection, a
kube-controller-manager.

Knobs (environment): FT_E2E_TIMEOUT (seconds a run may take, default 1200), FT_E2E_KEEP=1 (keep the
namespace, the CRD and the work directory for inspection).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import envtest
from tests.conftest import given_cluster
from tests.e2e.podrunner import NODE_LABEL, NODE_NAME, Kube, KubeError, PodRunner

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "finetune.dev_finetunejobs.yaml"
EXAMPLE = REPO / "examples" / "healthcare-lora.yaml"
DATA_DIR = REPO / "trainer-image" / "finetune_trainer" / "data"
CRD_URL = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"

#: Buckets of the example manifest (kept as they are) and where the tiny stand-in model goes.
DATA_BUCKET = "healthcare-data"
OUTPUT_BUCKET = "finetune-artifacts"
MODEL_BUCKET = "ft-e2e-models"
MODEL_PREFIX = "tiny-llama/"
SECRET_NAME = "s3-credentials"
#: The example's name and output prefix (kept as the example has them).
FTJ_NAME = "healthcare-assistant"
OUTPUT_PREFIX = f"{FTJ_NAME}/"

TIMEOUT = float(os.environ.get("FT_E2E_TIMEOUT", "1200"))
KEEP = os.environ.get("FT_E2E_KEEP") == "1"


def wait_for(what: str, check: Callable[[], Any], timeout: float = TIMEOUT, interval: float = 2.0) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout` seconds.

    The timeout only bounds a broken run (nothing asserts on how long anything took).
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {last!r}")


def healthcare_manifest(namespace: str, node_name: str, model_uri: str, secret: str = SECRET_NAME) -> dict[str, Any]:
    """examples/healthcare-lora.yaml made runnable on CPU in minutes, everything else as written.

    Changed: the base model (the tiny Llama uploaded to S3 instead of hf://meta-llama/Llama-2-7b-hf, with
    its size given explicitly), the training length (a few steps of short sequences), evaluation size, the
    checkpoint cadence (so checkpoints happen), and placement: the pods go to the local runner's node.
    Kept: the method (LoRA), adapter settings, data URIs and format, validation split, output URI,
    secrets, provenance requirement.
    """
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["metadata"]["namespace"] = namespace
    spec = manifest["spec"]
    spec["baseModel"] = {"uri": model_uri, "parameters": "1M", "secretRef": {"name": secret}}
    spec["hyperparameters"].update(
        {"epochs": 1, "maxSteps": 4, "batchSize": 4, "gradientAccumulationSteps": 1, "maxSeqLength": 256,
         "precision": "fp32", "gradientCheckpointing": False}
    )
    spec["checkpoint"] = {"everySteps": 2, "keep": 2}
    spec["evaluation"].update({"maxExamples": 4, "maxNewTokens": 8})
    spec["resources"] = {
        # Only the runner's node: on a cluster with GPU nodes the scheduler must not pick a real one,
        # whose pods could not reach the S3 server on this machine's loopback.
        "nodeSelector": {"kubernetes.io/hostname": node_name},
        "tolerations": [{"key": NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}],
    }
    spec["backoffLimit"] = 0  # a failure here is a bug to report, not to retry
    return manifest


# -- cluster ----------------------------------------------------------------------------------------


@pytest.fixture(scope="package")
def kubeconfig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Path of an admin kubeconfig for a real API server: the user's cluster, or a fresh control plane.

    The control plane's processes stop when the e2e tests are done, also when a test fails or the run is
    interrupted (tests/envtest.py); its logs stay in pytest's temporary directory."""
    given = given_cluster(request.config)
    if given:
        yield given
        return
    assets = envtest.assets_dir()
    if assets is None:
        pytest.skip(envtest.HOW_TO_GET_ONE)
    with envtest.ControlPlane(assets, tmp_path_factory.mktemp("envtest")) as plane:
        sys.stderr.write(f"\n[envtest] control plane from {assets} ready in {plane.started_seconds:.1f}s "
                         f"at {plane.server} (logs: {plane.dir})\n")
        yield str(plane.kubeconfig_path)


@pytest.fixture(scope="package")
def kube(kubeconfig: str) -> Kube:
    return Kube.from_kubeconfig(kubeconfig)


@pytest.fixture(scope="package")
def crd(kube: Kube) -> Iterator[dict[str, Any]]:
    """The generated CRD, applied (created, or replaced when it exists) and Established."""
    manifest = yaml.safe_load(CRD_PATH.read_text())
    name = manifest["metadata"]["name"]
    existing = kube.get(f"{CRD_URL}/{name}")
    if existing is None:
        kube.request("POST", CRD_URL, body=manifest)
    else:
        manifest["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
        kube.request("PUT", f"{CRD_URL}/{name}", body=manifest)

    def established() -> dict[str, Any] | None:
        found = kube.get(f"{CRD_URL}/{name}") or {}
        conditions = {c["type"]: c["status"] for c in (found.get("status") or {}).get("conditions") or []}
        return found if conditions.get("Established") == "True" else None

    yield wait_for(f"CRD {name} to be Established", established, timeout=120)
    if existing is None and not KEEP:  # only remove what this session installed
        with contextlib.suppress(KubeError):
            kube.request("DELETE", f"{CRD_URL}/{name}")


@pytest.fixture(scope="package")
def namespace(kube: Kube) -> Iterator[str]:
    name = f"ft-e2e-{secrets.token_hex(4)}"
    kube.request("POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace",
                                                     "metadata": {"name": name, "labels": {"finetune.dev/e2e": "true"}}})
    yield name
    if not KEEP:
        with contextlib.suppress(KubeError):
            kube.request("DELETE", f"/api/v1/namespaces/{name}")


# -- S3 and data ------------------------------------------------------------------------------------


@pytest.fixture(scope="package")
def s3() -> Iterator[Any]:
    from finetune_trainer.s3server import LocalS3

    with LocalS3(buckets=(DATA_BUCKET, OUTPUT_BUCKET, MODEL_BUCKET)) as server:
        yield server


@pytest.fixture(scope="package")
def model_uri(s3: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Llama and its tokenizer, uploaded where the manifest's baseModel points; the example's data
    (the bundled healthcare sample) uploaded at the example's own URIs."""
    from finetune_trainer.tiny import build_tiny_model

    client = s3.client()
    model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
    for path in sorted(model_dir.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), MODEL_BUCKET, MODEL_PREFIX + path.relative_to(model_dir).as_posix())
    for local, key in (
        ("healthcare_train.jsonl", "instructions/train.jsonl"),
        ("healthcare_test.jsonl", "instructions/test.jsonl"),
        ("healthcare_glossary.txt", "glossary.txt"),
    ):
        client.upload_file(str(DATA_DIR / local), DATA_BUCKET, key)
    return f"s3://{MODEL_BUCKET}/{MODEL_PREFIX}"


@pytest.fixture(scope="package")
def s3_secret(kube: Kube, namespace: str, s3: Any) -> str:
    """The Secret the example names, holding this session's S3 server and keys (pods get it by envFrom)."""
    env = s3.env()
    data = {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION")}
    kube.request("POST", f"/api/v1/namespaces/{namespace}/secrets", body={
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": SECRET_NAME, "namespace": namespace}, "stringData": data})
    return SECRET_NAME


# -- the operator and the pod runner ------------------------------------------------------------------


@dataclass
class Operator:
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise AssertionError(f"the operator exited with code {code}; log tail:\n{self.log_tail()}")

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, then SIGKILL for its process group after `timeout` seconds; echo the log tail."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        sys.stderr.write(f"\n--- operator log tail ({self.log_path}) ---\n{self.log_tail(40)}\n")


def start_operator(kopf_args: list[str], kubeconfig: str, log_path: Path, env: dict[str, str]) -> Operator:
    """`python -m kopf <kopf_args>` from this checkout with `kubeconfig`'s identity; output to `log_path`.

    `env` is added to this process's environment (KUBECONFIG is always `kubeconfig`). Stop it with
    `Operator.stop()`, in a `finally`.
    """
    with open(log_path, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "kopf", *kopf_args],
            stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
            env={**os.environ, **env, "KUBECONFIG": kubeconfig}, cwd=REPO, start_new_session=True,
        )
    return Operator(process, log_path)


@pytest.fixture(scope="package")
def operator(
    crd: Any, namespace: str, s3: Any, kubeconfig: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    """`kopf run -m finetune_operator.handlers --namespace <ns>` with this session's S3 for progress reports.

    The trainer image setting is irrelevant: the local pod runner runs the trainer from this checkout.
    """
    env = {
        **s3.env(),  # the operator reads status/report.json with its own identity (progress.py)
        "FT_STATUS_INTERVAL": "2",
        "FT_LOG_FORMAT": "text",
        "FT_TERMINATION_GRACE_SECONDS": "30",
    }
    operator = start_operator(
        ["run", "--standalone", "-m", "finetune_operator.handlers", "--namespace", namespace],
        kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log", env)
    try:
        yield operator
    finally:
        operator.stop()


@dataclass
class RunnerHandle:
    runner: PodRunner
    thread: threading.Thread
    errors: list[BaseException]

    def check_alive(self) -> None:
        if self.errors:
            raise AssertionError(f"the pod runner stopped: {self.errors[0]!r}")


@pytest.fixture(scope="package")
def pod_runner(kube: Kube, namespace: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunnerHandle]:
    """The local pod runner for the test namespace, in a thread, with a node name of its own."""
    with run_pod_runner(kube, namespace, tmp_path_factory.mktemp("podrunner")) as handle:
        yield handle


@contextlib.contextmanager
def run_pod_runner(kube: Kube, namespace: str, workdir: Path) -> Iterator[RunnerHandle]:
    """A local pod runner for the training pods of `namespace`, in a thread, with a node name of its own."""
    node_name = f"{NODE_NAME}-{secrets.token_hex(3)}"
    runner = PodRunner(kube, namespace, "finetune.dev/job", workdir=workdir, node_name=node_name)
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            runner.run(stop, interval=1.0)
        except BaseException as err:  # surfaced to the tests by check_alive()
            errors.append(err)

    runner.ensure_node()
    thread = threading.Thread(target=loop, name="podrunner", daemon=True)
    thread.start()
    try:
        yield RunnerHandle(runner, thread, errors)
    finally:
        stop.set()
        thread.join(30)
        runner.close()
        sys.stderr.write(f"\n--- pod runner work dir (pod logs): {workdir} ---\n")
