"""Fixtures of the real-API-server suite: a real API server (the `kubeconfig` fixture: a fresh envtest
control plane from KUBEBUILDER_ASSETS, or the cluster of KUBECONFIG with `--e2e`; see tests/conftest.py)
with the CRD, a fresh namespace, a local S3 server (SeaweedFS on this machine's loopback) and the operator
as a `kopf run` subprocess for test_chart.py (`start_operator`).

No test here needs a pod to run (envtest has no scheduler and no kubelet: pods stay Pending). The product's
pods run on a real node in tests/node (see tests/node/conftest.py, and README.md here).

Without either source of an API server the tests are skipped (tests/conftest.py), and package fixtures
only start for tests that run. The same code serves envtest, kind, k3s and cloud clusters: the only
thing it needs from the cluster is its API.

Knobs (environment): FT_E2E_TIMEOUT (seconds a wait may take before it fails, default 1200), FT_E2E_KEEP=1
(keep the namespaces, the CRD and the Helm release for inspection).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import envtest, polling
from tests.conftest import given_cluster
from tests.kube import Kube, KubeError

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "finetune.dev_finetunejobs.yaml"
CRD_URL = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
#: The bucket the FineTuneJobs of these tests name as their output (nothing is written there).
OUTPUT_BUCKET = "finetune-artifacts"

TIMEOUT = float(os.environ.get("FT_E2E_TIMEOUT", "1200"))
KEEP = os.environ.get("FT_E2E_KEEP") == "1"


def wait_for(what: str, check: Callable[[], Any], timeout: float = TIMEOUT, interval: float = 2.0) -> Any:
    """`tests.polling.wait_for` with this tier's default timeout."""
    return polling.wait_for(what, check, timeout, interval)


def kubectl_explain(kubeconfig: str, what: str) -> str:
    """`kubectl explain <what>`'s text, once the API server publishes it (a new CRD's schema takes a moment)."""
    def explain() -> str | None:
        done = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "explain", what],
                              capture_output=True, text=True, timeout=60)
        return done.stdout if done.returncode == 0 else None

    return str(wait_for(f"kubectl explain {what}", explain, timeout=60, interval=2))


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


# -- S3 -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="package")
def s3() -> Iterator[Any]:
    """A SeaweedFS S3 server on loopback: the operator's own S3 identity (progress reports), as the chart
    gives it one by `s3.operatorSecret` or IRSA."""
    from finetune_trainer.s3server import LocalS3

    with LocalS3(buckets=(OUTPUT_BUCKET,)) as server:
        yield server


# -- the operator -----------------------------------------------------------------------------------


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
