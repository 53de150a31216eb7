"""The local pod runner (tests/e2e/podrunner.py) without a cluster.

Its pure parts (environment, volumes, commands, status patches) are checked directly; its API loop runs
against kmock's KubernetesEmulator over real HTTP, executing real `python -c` processes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kmock
import kubernetes
import pytest

from tests.e2e import podrunner
from tests.e2e.podrunner import (
    ContainerState,
    Kube,
    Mount,
    Objects,
    PodRunner,
    PodSetupError,
    build_command,
    localize_env,
    prepare_volumes,
    resolve_env,
    selector_matches,
    status_patch,
)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


SECRET = {"metadata": {"name": "s3-credentials"},
          "data": {"AWS_ACCESS_KEY_ID": b64("AKTEST"), "AWS_SECRET_ACCESS_KEY": b64("s3cr3t"), "bad-key!": b64("x")}}
CONFIGMAP = {"metadata": {"name": "job-config"}, "data": {"job.json": '{"name": "demo"}', "LEVEL": "debug"}}


def objects() -> Objects:
    return Objects(configmaps={"job-config": CONFIGMAP}, secrets={"s3-credentials": SECRET})


def pod(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "demo-1-abcde",
            "namespace": "ml",
            "uid": "1234-5678",
            "labels": {"finetune.dev/job": "demo", "job-name": "demo"},
            "annotations": {podrunner.COMPLETION_INDEX_ANNOTATION: "1"},
        },
        "spec": {"nodeName": "n1", "serviceAccountName": "trainer", "restartPolicy": "Never", **spec},
    }


# -- selectors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("finetune.dev/job", True),
        ("!finetune.dev/job", False),
        ("finetune.dev/job=demo", True),
        ("finetune.dev/job==other", False),
        ("finetune.dev/job!=demo", False),
        ("finetune.dev/job=demo,job-name=demo", True),
        ("finetune.dev/job=demo,missing", False),
        ("job-name in (a, demo)", True),
        ("job-name notin (a,demo)", False),
        ("job-name in (a,b),finetune.dev/job", False),
    ],
)
def test_selector_matches(selector: str, expected: bool) -> None:
    assert selector_matches({"finetune.dev/job": "demo", "job-name": "demo"}, selector) is expected


# -- environment ----------------------------------------------------------------------------------


def test_env_from_secret_and_configmap_with_prefix_and_expansion() -> None:
    container = {
        "name": "trainer",
        "envFrom": [{"secretRef": {"name": "s3-credentials"}}, {"configMapRef": {"name": "job-config"}, "prefix": "CM_"}],
        "env": [
            {"name": "GREETING", "value": "key=$(AWS_ACCESS_KEY_ID) level=$(CM_LEVEL) literal=$$(HOME) unknown=$(NOPE)"},
            {"name": "AWS_ACCESS_KEY_ID", "value": "overridden"},
        ],
    }
    env = resolve_env(pod(), container, objects())
    assert env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"  # base64-decoded
    assert env["CM_job.json"] == '{"name": "demo"}'
    assert env["CM_LEVEL"] == "debug"
    assert "bad-key!" not in env  # not a variable name: skipped, as the kubelet does
    assert env["GREETING"] == "key=AKTEST level=debug literal=$(HOME) unknown=$(NOPE)"
    assert env["AWS_ACCESS_KEY_ID"] == "overridden"  # env entries win over envFrom


def test_env_value_from_refs_and_downward_api() -> None:
    container = {
        "name": "trainer",
        "resources": {"limits": {"cpu": "500m", "memory": "1Gi"}},
        "env": [
            {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "s3-credentials", "key": "AWS_SECRET_ACCESS_KEY"}}},
            {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "job-config", "key": "LEVEL"}}},
            {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
                "fieldPath": f"metadata.annotations['{podrunner.COMPLETION_INDEX_ANNOTATION}']"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "JOB", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['finetune.dev/job']"}}},
            {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "MILLICORES", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1m"}}},
            {"name": "MEM_MI", "valueFrom": {"resourceFieldRef": {"resource": "requests.memory", "divisor": "1Mi"}}},
            {"name": "OPTIONAL", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k", "optional": True}}},
        ],
    }
    env = resolve_env(pod(), container, objects())
    assert env["SECRET"] == "s3cr3t"
    assert env["LEVEL"] == "debug"
    assert env["JOB_COMPLETION_INDEX"] == "1"
    assert env["POD_NAME"] == "demo-1-abcde"
    assert env["POD_NS"] == "ml"
    assert env["JOB"] == "demo"
    assert env["SA"] == "trainer"
    assert env["POD_IP"] == "127.0.0.1"
    assert env["MILLICORES"] == "500"
    assert env["MEM_MI"] == "1024"  # requests fall back to limits, as in Kubernetes
    assert "OPTIONAL" not in env


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ([{"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}], 'secret "absent" not found'),
        ([{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "job-config", "key": "nope"}}}],
         "couldn't find key nope in configmap 'job-config'"),
        ([{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.nope"}}}], "fieldRef 'spec.nope' is not supported"),
    ],
)
def test_env_errors_name_the_missing_object(env: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(PodSetupError, match=re.escape(message)) as err:
        resolve_env(pod(), {"name": "trainer", "env": env}, objects())
    assert err.value.reason == "CreateContainerConfigError"


def test_missing_env_from_secret_fails_unless_optional() -> None:
    with pytest.raises(PodSetupError, match='secret "absent" not found'):
        resolve_env(pod(), {"name": "t", "envFrom": [{"secretRef": {"name": "absent"}}]}, objects())
    assert resolve_env(pod(), {"name": "t", "envFrom": [{"secretRef": {"name": "absent", "optional": True}}]},
                       objects()) == {}


# -- volumes and path rewriting -------------------------------------------------------------------

VOLUMES = [
    {"name": "config", "configMap": {"name": "job-config", "items": [{"key": "job.json", "path": "job.json"}]}},
    {"name": "creds", "secret": {"secretName": "s3-credentials"}},
    {"name": "cache", "emptyDir": {"sizeLimit": "10Gi"}},
    {"name": "data", "persistentVolumeClaim": {"claimName": "datasets"}},
    {"name": "kube-api-access-x1", "projected": {"sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
        {"configMap": {"name": "job-config", "items": [{"key": "LEVEL", "path": "level"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
    ]}},
]
MOUNTS = [
    {"name": "config", "mountPath": "/etc/finetune", "readOnly": True},
    {"name": "creds", "mountPath": "/var/run/creds"},
    {"name": "cache", "mountPath": "/cache"},
    {"name": "data", "mountPath": "/mnt/pvc/datasets"},
    {"name": "kube-api-access-x1", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"},
]


def test_volumes_become_local_directories(tmp_path: Path) -> None:
    container = {"name": "trainer", "volumeMounts": MOUNTS}
    mounts = prepare_volumes(pod(volumes=VOLUMES), container, tmp_path / "pod", tmp_path / "pvc", objects())
    by_path = {m.container_path: m.host_path for m in mounts}
    assert (by_path["/etc/finetune"] / "job.json").read_text() == '{"name": "demo"}'
    assert not (by_path["/etc/finetune"] / "LEVEL").exists()  # items select keys
    assert (by_path["/var/run/creds"] / "AWS_SECRET_ACCESS_KEY").read_text() == "s3cr3t"
    assert by_path["/cache"].is_dir() and by_path["/cache"].is_relative_to(tmp_path / "pod")
    assert by_path["/mnt/pvc/datasets"] == tmp_path / "pvc" / "datasets" and by_path["/mnt/pvc/datasets"].is_dir()
    account = by_path["/var/run/secrets/kubernetes.io/serviceaccount"]
    assert (account / "namespace").read_text() == "ml"
    assert (account / "level").read_text() == "debug"
    assert not (account / "token").exists()  # no token is minted locally
    for mount in mounts:
        assert mount.host_path.is_relative_to(tmp_path), "nothing may land outside the runner's directories"


def test_sub_path_and_unsupported_volume(tmp_path: Path) -> None:
    container = {"name": "t", "volumeMounts": [{"name": "cache", "mountPath": "/data", "subPath": "part"}]}
    [mount] = prepare_volumes(pod(volumes=VOLUMES), container, tmp_path, tmp_path / "pvc", objects())
    assert mount.host_path == tmp_path / "volumes" / "cache" / "part"
    host = {"name": "t", "volumeMounts": [{"name": "h", "mountPath": "/h"}]}
    with pytest.raises(PodSetupError, match="volume 'h' of type hostPath is not supported"):
        prepare_volumes(pod(volumes=[{"name": "h", "hostPath": {"path": "/etc"}}]), host, tmp_path, tmp_path, objects())
    escape = {"name": "t", "volumeMounts": [{"name": "cache", "mountPath": "/d", "subPath": "../../etc"}]}
    with pytest.raises(PodSetupError, match="leaves the volume"):
        prepare_volumes(pod(volumes=VOLUMES), escape, tmp_path, tmp_path, objects())


def test_localize_env_rewrites_mount_paths_through_env(tmp_path: Path) -> None:
    mounts = [
        Mount("/mnt/pvc/datasets", tmp_path / "pvc" / "datasets"),
        Mount("/etc/finetune", tmp_path / "config"),
        Mount("/cache", tmp_path / "cache"),
    ]
    env = {
        "FT_CONFIG": "/etc/finetune/job.json",
        "FT_PVC_ROOT": "/mnt/pvc",
        "FT_CACHE_DIR": "/cache",
        "FT_MAIN_ADDRESS": "demo-0.demo",
        "FT_PROCS_PER_MACHINE": "8",
        "FT_ALLOWED_ROOTS": "/cache:/models",
        "PATH": "/opt/conda/bin:/usr/bin",
        "OTHER": "/usr/share/data",
    }
    out = localize_env(env, sorted(mounts, key=lambda m: -len(m.container_path)), pvc_root=tmp_path / "pvc",
                       ignore_gpus=True)
    assert out["FT_CONFIG"] == str(tmp_path / "config" / "job.json")
    assert out["FT_PVC_ROOT"] == str(tmp_path / "pvc")  # the parent of the claim mounts
    assert out["FT_CACHE_DIR"] == str(tmp_path / "cache")
    assert out["FT_ALLOWED_ROOTS"] == f"{tmp_path / 'cache'}:/models"
    assert out["FT_MAIN_ADDRESS"] == "127.0.0.1"
    assert out["FT_PROCS_PER_MACHINE"] == "1" and out["CUDA_VISIBLE_DEVICES"] == ""
    assert "PATH" not in out
    assert out["OTHER"] == "/usr/share/data"


def test_localize_env_fills_contract_defaults(tmp_path: Path) -> None:
    mounts = [Mount("/etc/finetune", tmp_path / "config")]
    out = localize_env({}, mounts, pvc_root=tmp_path / "pvc", ignore_gpus=False)
    assert out == {"FT_CONFIG": str(tmp_path / "config" / "job.json"), "FT_PVC_ROOT": str(tmp_path / "pvc")}
    # Without a claim mounted, the pod's /mnt/pvc still must not point at this machine's /mnt/pvc.
    out = localize_env({"FT_PVC_ROOT": "/mnt/pvc"}, mounts, pvc_root=tmp_path / "pvc", ignore_gpus=False)
    assert out["FT_PVC_ROOT"] == str(tmp_path / "pvc")


def test_build_command_runs_without_a_shell(tmp_path: Path) -> None:
    mounts = [Mount("/etc/finetune", tmp_path / "config")]
    container = {"name": "t", "command": ["python", "-m", "finetune_trainer.launch"],
                 "args": ["--config", "/etc/finetune/job.json", "--name=$(NAME)", "; rm -rf / #"]}
    argv = build_command(container, {"NAME": "demo", "PATH": "/usr/bin"}, mounts, python="/venv/bin/python")
    assert argv == ["/venv/bin/python", "-m", "finetune_trainer.launch", "--config",
                    str(tmp_path / "config" / "job.json"), "--name=demo", "; rm -rf / #"]
    with pytest.raises(PodSetupError, match="has no command") as err:
        build_command({"name": "t", "args": ["x"]}, {}, mounts)
    assert err.value.reason == "RunContainerError"
    with pytest.raises(PodSetupError, match="not found"):
        build_command({"name": "t", "command": ["no-such-binary-here"]}, {"PATH": str(tmp_path)}, mounts)


# -- status patches -------------------------------------------------------------------------------


def test_status_patch_for_running_success_and_failure() -> None:
    running = ContainerState("trainer", "img", state="running", started_at="2024-01-01T00:00:00Z",
                             container_id="local://1")
    patch = status_patch(pod(), [], [running], at="2024-01-01T00:00:01Z")["status"]
    assert patch["phase"] == "Running"
    [entry] = patch["containerStatuses"]
    assert entry["ready"] is True and entry["state"]["running"] == {"startedAt": "2024-01-01T00:00:00Z"}
    assert entry["state"]["terminated"] is None  # null: a strategic merge drops any other state
    assert {c["type"]: c["status"] for c in patch["conditions"]} == {
        "PodScheduled": "True", "Initialized": "True", "ContainersReady": "True", "Ready": "True"}

    done = ContainerState("trainer", "img", state="terminated", exit_code=0, reason=podrunner.exit_reason(0),
                          started_at="t0", finished_at="t1")
    patch = status_patch(pod(), [], [done])["status"]
    assert patch["phase"] == "Succeeded"
    terminated = patch["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"
    assert patch["containerStatuses"][0]["state"]["running"] is None
    assert {c["type"]: c["status"] for c in patch["conditions"]}["Ready"] == "False"

    failed = ContainerState("trainer", "img", state="terminated", exit_code=3, reason=podrunner.exit_reason(3),
                            message="InvalidData: row 3", started_at="t0", finished_at="t1")
    patch = status_patch(pod(), [], [failed])["status"]
    assert patch["phase"] == "Failed"
    terminated = patch["containerStatuses"][0]["state"]["terminated"]
    assert terminated == {"exitCode": 3, "reason": "Error", "message": "InvalidData: row 3", "startedAt": "t0",
                          "finishedAt": "t1", "containerID": ""}
    assert patch["message"] == "container trainer exited with code 3"


def test_pod_phase_with_init_containers_and_restart_policy() -> None:
    ok_init = ContainerState("init", state="terminated", exit_code=0)
    bad_init = ContainerState("init", state="terminated", exit_code=1)
    waiting = ContainerState("trainer")
    failed = ContainerState("trainer", state="terminated", exit_code=1)
    assert podrunner.pod_phase([bad_init], [waiting], "Never") == "Failed"
    assert podrunner.pod_phase([ok_init], [waiting], "Never") == "Pending"
    assert podrunner.pod_phase([], [failed], "OnFailure") == "Running"  # the runner restarts it
    assert podrunner.exit_reason(137) == "Error"  # a SIGKILL from outside
    assert podrunner.exit_reason(137, oom_killed=True) == "OOMKilled"
    assert podrunner.exit_reason(1, oom_killed=True) == "Error"


def test_termination_message_falls_back_to_logs_on_error() -> None:
    logs = "\n".join(f"line {i}" for i in range(200))
    message = podrunner.termination_message(logs, 1, "FallbackToLogsOnError", None)
    assert message.splitlines()[-1] == "line 199" and len(message.splitlines()) <= podrunner.LOG_MESSAGE_LINES
    assert podrunner.termination_message(logs, 0, "FallbackToLogsOnError", None) == ""
    assert podrunner.termination_message(logs, 1, "File", "from the file") == "from the file"


# -- the API loop against kmock's emulator --------------------------------------------------------

PODS = kmock.resource("", "v1", "pods")


@pytest.fixture()
def emulator() -> Iterator[tuple[Any, Kube]]:
    """kmock's KubernetesEmulator on a loopback port, served from its own thread and event loop."""
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def serve() -> None:
        stop = asyncio.Event()
        async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as server:
            for plural in ("v1/pods", "v1/configmaps", "v1/secrets", "v1/nodes",
                           "coordination.k8s.io/v1/leases"):
                k8s.resources[plural] = kmock.ResourceInfo()

            def bind(request: Any) -> dict[str, Any]:  # the API server's pods/binding, which kmock lacks
                k8s.objects[PODS, request.namespace, request.name].patch(
                    {"spec": {"nodeName": request.data["target"]["name"]}})
                return {"kind": "Status", "status": "Success", "code": 201}

            k8s["post", re.compile(r"/api/v1/namespaces/[^/]+/pods/[^/]+/binding")] << bind
            state.update(k8s=k8s, url=str(server.url), stop=stop, loop=asyncio.get_running_loop())
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(30), "kmock did not start"
    try:
        yield state["k8s"], Kube.from_url(state["url"])
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(10)


def training_pod(name: str, script: str, **extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "ml", "uid": f"uid-{name}",
                     "labels": {"finetune.dev/job": "demo"},
                     "annotations": {podrunner.COMPLETION_INDEX_ANNOTATION: "1"}, **extra.pop("meta", {})},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "trainer",
                "image": "ghcr.io/finetune-dev/finetune-trainer:0.1.0",
                "command": ["python", "-c", script],
                "envFrom": [{"secretRef": {"name": "s3-credentials"}}],
                "env": [
                    {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
                        "fieldPath": f"metadata.annotations['{podrunner.COMPLETION_INDEX_ANNOTATION}']"}}},
                    {"name": "FT_CONFIG", "value": "/etc/finetune/job.json"},
                    {"name": "FT_PVC_ROOT", "value": "/mnt/pvc"},
                    {"name": "FT_MAIN_ADDRESS", "value": "demo-0.demo"},
                    {"name": "FT_PROCS_PER_MACHINE", "value": "8"},
                ],
                "resources": {"limits": {"nvidia.com/gpu": "8"}},
                "volumeMounts": [{"name": "config", "mountPath": "/etc/finetune"},
                                 {"name": "data", "mountPath": "/mnt/pvc/datasets"}],
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }],
            "volumes": [{"name": "config", "configMap": {"name": "job-config"}},
                        {"name": "data", "persistentVolumeClaim": {"claimName": "datasets"}}],
            **extra,
        },
    }


REPORT_SCRIPT = """
import json, os, pathlib
env = {k: os.environ.get(k) for k in ("AWS_SECRET_ACCESS_KEY", "JOB_COMPLETION_INDEX", "FT_MAIN_ADDRESS",
                                       "FT_PROCS_PER_MACHINE", "CUDA_VISIBLE_DEVICES")}
env["config"] = pathlib.Path(os.environ["FT_CONFIG"]).read_text()
out = pathlib.Path(os.environ["FT_PVC_ROOT"]) / "datasets" / "seen.json"
out.write_text(json.dumps(env))
"""


def sync_until(runner: PodRunner, done: Callable[[], bool], passes: int = 600) -> None:
    """Run the runner's passes until `done()`; a bound on passes keeps a broken runner from hanging CI."""
    for _ in range(passes):
        runner.sync()
        if done():
            return
        time.sleep(0.05)
    raise AssertionError(f"the runner did not get there; finished pods: {runner.finished}")


def obj(k8s: Any, name: str) -> dict[str, Any]:
    return dict(k8s.objects[PODS, "ml", name].raw)


def test_runner_runs_pods_and_reports_success_and_failure(emulator: tuple[Any, Kube], tmp_path: Path) -> None:
    k8s, kube = emulator
    kube.request("POST", "/api/v1/namespaces/ml/secrets", body={**SECRET, "metadata": {"name": "s3-credentials",
                                                                                         "namespace": "ml"}})
    kube.request("POST", "/api/v1/namespaces/ml/configmaps", body={**CONFIGMAP, "metadata": {"name": "job-config",
                                                                                              "namespace": "ml"}})
    kube.request("POST", "/api/v1/namespaces/ml/pods", body=training_pod("ok", REPORT_SCRIPT))
    kube.request("POST", "/api/v1/namespaces/ml/pods", body=training_pod(
        "bad", "import sys; print('InvalidData: row 3 has no output'); sys.exit(3)"))
    other = training_pod("other", "raise SystemExit(0)")
    other["metadata"]["labels"] = {"app": "unrelated"}
    kube.request("POST", "/api/v1/namespaces/ml/pods", body=other)

    runner = PodRunner(kube, "ml", "finetune.dev/job", workdir=tmp_path / "work", pvc_root=tmp_path / "pvc",
                       echo=None)
    runner.ensure_node()
    try:
        sync_until(runner, lambda: {"ok", "bad"} <= set(runner.finished))
    finally:
        runner.close()

    ok = obj(k8s, "ok")
    assert ok["spec"]["nodeName"] == podrunner.NODE_NAME  # bound through pods/binding
    assert ok["status"]["phase"] == "Succeeded"
    assert ok["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    seen = json.loads((tmp_path / "pvc" / "datasets" / "seen.json").read_text())
    assert seen == {"AWS_SECRET_ACCESS_KEY": "s3cr3t", "JOB_COMPLETION_INDEX": "1", "FT_MAIN_ADDRESS": "127.0.0.1",
                    "FT_PROCS_PER_MACHINE": "1", "CUDA_VISIBLE_DEVICES": "", "config": '{"name": "demo"}'}

    bad = obj(k8s, "bad")
    assert bad["status"]["phase"] == "Failed"
    terminated = bad["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3 and terminated["reason"] == "Error"
    assert "InvalidData: row 3 has no output" in terminated["message"]  # FallbackToLogsOnError

    untouched = obj(k8s, "other")
    assert "nodeName" not in untouched["spec"] and "status" not in untouched
    node_object = k8s.objects[kmock.resource("", "v1", "nodes"), None, podrunner.NODE_NAME]
    assert node_object.deleted  # close() removed the node it registered
    node = dict(node_object.last.raw)
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == podrunner.NODE_GPUS
    assert node["metadata"]["labels"][podrunner.NODE_LABEL] == "true"
    lease = k8s.objects[kmock.resource("coordination.k8s.io", "v1", "leases"), "kube-node-lease", podrunner.NODE_NAME]
    assert lease["spec"]["holderIdentity"] == podrunner.NODE_NAME


def test_runner_reports_missing_secret_and_recovers(emulator: tuple[Any, Kube], tmp_path: Path) -> None:
    k8s, kube = emulator
    kube.request("POST", "/api/v1/namespaces/ml/configmaps", body={**CONFIGMAP, "metadata": {"name": "job-config",
                                                                                              "namespace": "ml"}})
    kube.request("POST", "/api/v1/namespaces/ml/pods", body=training_pod("p", "pass"))
    runner = PodRunner(kube, "ml", "finetune.dev/job", workdir=tmp_path, echo=None, register_node=False)
    try:
        runner.sync()
        waiting = obj(k8s, "p")["status"]["containerStatuses"][0]["state"]["waiting"]
        assert waiting == {"reason": "CreateContainerConfigError", "message": 'secret "s3-credentials" not found'}
        assert obj(k8s, "p")["status"]["phase"] == "Pending"
        kube.request("POST", "/api/v1/namespaces/ml/secrets", body={**SECRET, "metadata": {"name": "s3-credentials",
                                                                                             "namespace": "ml"}})
        sync_until(runner, lambda: "p" in runner.finished)
    finally:
        runner.close()
    assert obj(k8s, "p")["status"]["phase"] == "Succeeded"


def test_runner_terminates_a_deleted_pod_gracefully(emulator: tuple[Any, Kube], tmp_path: Path) -> None:
    k8s, kube = emulator
    kube.request("POST", "/api/v1/namespaces/ml/secrets", body={**SECRET, "metadata": {"name": "s3-credentials",
                                                                                         "namespace": "ml"}})
    kube.request("POST", "/api/v1/namespaces/ml/configmaps", body={**CONFIGMAP, "metadata": {"name": "job-config",
                                                                                              "namespace": "ml"}})
    marker = tmp_path / "started"
    script = (
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (print('checkpoint saved', flush=True), sys.exit(143)))\n"
        f"pathlib.Path({str(marker)!r}).write_text('up')\n"
        "while True: time.sleep(0.1)\n"
    )
    # A finalizer keeps the deleted pod visible (like the Job controller's tracking finalizer).
    body = training_pod("long", script, meta={"finalizers": ["batch.kubernetes.io/job-tracking"]},
                        terminationGracePeriodSeconds=30)
    kube.request("POST", "/api/v1/namespaces/ml/pods", body=body)
    runner = PodRunner(kube, "ml", "finetune.dev/job", workdir=tmp_path / "w", echo=None, register_node=False)
    try:
        sync_until(runner, marker.exists)
        assert obj(k8s, "long")["status"]["phase"] == "Running"
        kube.request("DELETE", "/api/v1/namespaces/ml/pods/long")
        sync_until(runner, lambda: not runner.runs)
    finally:
        runner.close()
    status = obj(k8s, "long")["status"]
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 143 and status["phase"] == "Failed"
    deletes = list(k8s["delete /api/v1/namespaces/ml/pods/long"])
    assert len(deletes) >= 2  # the test's own delete, then the runner's
    assert any((r.data or {}).get("gracePeriodSeconds") == 0 for r in deletes)  # the kubelet-style confirmation


def test_runner_runs_init_containers_first(emulator: tuple[Any, Kube], tmp_path: Path) -> None:
    k8s, kube = emulator
    shared = [{"name": "work", "mountPath": "/work"}]
    kube.request("POST", "/api/v1/namespaces/ml/pods", body={
        "metadata": {"name": "init", "namespace": "ml", "uid": "u-init", "labels": {"finetune.dev/job": "x"}},
        "spec": {
            "restartPolicy": "Never",
            "volumes": [{"name": "work", "emptyDir": {}}],
            "initContainers": [{"name": "fetch", "volumeMounts": shared, "command": [
                "python", "-c", "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text('fetched')", "/work/data"]}],
            "containers": [{"name": "main", "volumeMounts": shared, "env": [{"name": "DATA", "value": "/work/data"}],
                            "command": ["python", "-c",
                                        "import os, sys; sys.exit(0 if open(os.environ['DATA']).read() == 'fetched' else 5)"]}],
        }})
    runner = PodRunner(kube, "ml", "finetune.dev/job", workdir=tmp_path, echo=None, register_node=False)
    try:
        sync_until(runner, lambda: "init" in runner.finished)
    finally:
        runner.close()
    status = obj(k8s, "init")["status"]
    assert status["phase"] == "Succeeded"
    assert status["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert status["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0


# -- the client: kubeconfig, authentication and transport come from the `kubernetes` library ----------


def write_kubeconfig(path: Path, server: str, user: dict[str, Any], cluster: dict[str, Any] | None = None,
                     other_user: dict[str, Any] | None = None) -> Path:
    """A kubeconfig whose current context `dev` uses `user`; context `other` (same server) `other_user`."""
    path.write_text(json.dumps({  # JSON is YAML
        "apiVersion": "v1", "kind": "Config", "current-context": "dev",
        "clusters": [{"name": "c", "cluster": {"server": server, **(cluster or {})}}],
        "users": [{"name": "u", "user": user}, {"name": "o", "user": other_user or {}}],
        "contexts": [{"name": "dev", "context": {"cluster": "c", "user": "u"}},
                     {"name": "other", "context": {"cluster": "c", "user": "o"}}],
    }))
    return path


def exec_plugin(tmp_path: Path, expiry: str = "2999-01-01T00:00:00Z") -> dict[str, Any]:
    """A kubeconfig exec user whose plugin answers token `gen-<n>` on its n-th run."""
    calls = tmp_path / "calls"
    script = (
        "import json, os, pathlib\n"
        f"p = pathlib.Path({str(calls)!r}); n = len(p.read_text()) + 1 if p.exists() else 1; p.write_text('x' * n)\n"
        "assert json.loads(os.environ['KUBERNETES_EXEC_INFO'])['kind'] == 'ExecCredential'\n"
        "print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1', 'kind': 'ExecCredential',\n"
        f"                  'status': {{'token': os.environ['PREFIX'] + str(n), 'expirationTimestamp': {expiry!r}}}}}))\n"
    )
    return {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
                     "args": ["-c", script], "env": [{"name": "PREFIX", "value": "gen-"}]}}


def authorizations(k8s: Any, kube: Kube, times: int = 1) -> list[str | None]:
    """The Authorization headers the emulator got for `times` listings of pods through `kube`."""
    before = len(list(k8s["get /api/v1/namespaces/ml/pods"]))
    for _ in range(times):
        assert kube.request("GET", "/api/v1/namespaces/ml/pods")["items"] == []
    return [r.headers.get("Authorization") for r in list(k8s["get /api/v1/namespaces/ml/pods"])[before:]]


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ({"token": "t0k3n"}, "Bearer t0k3n"),
        ({"tokenFile": "token.txt"}, "Bearer from-file"),  # relative to the kubeconfig's directory
        ({"username": "admin", "password": "pw"}, "Basic " + b64("admin:pw")),
        ("exec", "Bearer gen-1"),
        ({}, None),
    ],
)
def test_kube_authenticates_as_the_kubeconfig_says(emulator: tuple[Any, Kube], tmp_path: Path,
                                                   user: Any, expected: str | None) -> None:
    k8s, kube = emulator
    (tmp_path / "token.txt").write_text("from-file")
    user = exec_plugin(tmp_path) if user == "exec" else user
    client = Kube.from_kubeconfig(str(write_kubeconfig(tmp_path / "config", kube.server, user)))
    assert client.server == kube.server
    assert authorizations(k8s, client, times=2) == [expected, expected]  # an exec plugin runs once until expiry


def test_kube_refreshes_an_expired_exec_credential(emulator: tuple[Any, Kube], tmp_path: Path) -> None:
    k8s, kube = emulator
    user = exec_plugin(tmp_path, expiry="2000-01-01T00:00:00Z")
    client = Kube.from_kubeconfig(str(write_kubeconfig(tmp_path / "config", kube.server, user)))
    first, second = authorizations(k8s, client, times=2)
    assert first and second and first.startswith("Bearer gen-") and second.startswith("Bearer gen-")
    assert first != second  # the plugin ran again for the second request


def test_kube_picks_the_kubeconfig_file_and_context(emulator: tuple[Any, Kube], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    k8s, kube = emulator
    config = write_kubeconfig(tmp_path / "config", kube.server, {"token": "dev"}, other_user={"token": "other"})
    # $KUBECONFIG-style lists skip missing files; --context picks a context other than the current one.
    assert authorizations(k8s, Kube.from_kubeconfig(f"{tmp_path / 'absent'}:{config}", "other")) == ["Bearer other"]
    # Without a path: $KUBECONFIG as it is now (the library reads it once, at import).
    monkeypatch.setenv("KUBECONFIG", str(config))
    assert authorizations(k8s, Kube.from_kubeconfig()) == ["Bearer dev"]
    with pytest.raises(kubernetes.config.ConfigException):
        Kube.from_kubeconfig(str(config), context="prod")


def test_kube_uses_the_service_account_in_a_pod_without_kubeconfig(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("sa-token")
    ca.write_text("not read until a connection is made")
    monkeypatch.setattr(kubernetes.config.incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(kubernetes.config.incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    kube = Kube.from_kubeconfig()
    assert kube.server == "https://10.96.0.1:443"
    assert kube.api.configuration.auth_settings()["BearerToken"]["value"] == "bearer sa-token"
    assert kube.api.configuration.ssl_ca_cert == str(ca)


def test_kube_raises_connection_error_when_nothing_answers() -> None:
    """What PodRunner.run relies on to keep its processes through an API server restart."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectionError, match=r"GET /api/v1/nodes: "):
        Kube.from_url(f"http://127.0.0.1:{port}").get("/api/v1/nodes")


def test_cli_runs_a_pod_with_kubeconfig_credentials(emulator: tuple[Any, Kube], tmp_path: Path) -> None:
    k8s, kube = emulator
    kube.request("POST", "/api/v1/namespaces/ml/pods", body={
        "metadata": {"name": "hello", "namespace": "ml", "uid": "u-hello", "labels": {"finetune.dev/job": "x"}},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "command": [
            "python", "-c", "import os, sys; sys.exit(0 if os.environ['GREETING'] == 'hi' else 1)"]}]}})
    config = write_kubeconfig(tmp_path / "config", kube.server, {"token": "t0k3n"})
    code = podrunner.main(["--kubeconfig", str(config), "-n", "ml", "-l", "finetune.dev/job", "--exit-after", "1",
                           "--env", "GREETING=hi", "--quiet", "--workdir", str(tmp_path / "w"), "--interval", "0.1"])
    assert code == 0
    assert obj(k8s, "hello")["status"]["phase"] == "Succeeded"
    bound = list(k8s["post /api/v1/namespaces/ml/pods/hello/binding"])
    assert bound and bound[0].headers.get("Authorization") == "Bearer t0k3n"


def test_cli_rejects_a_bad_env_assignment(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        podrunner.main(["--namespace", "ml", "--env", "not-an-assignment"])
    assert exit_info.value.code == 2
    assert "--env 'not-an-assignment': expected NAME=VALUE" in capsys.readouterr().err


# -- the rendered training pod, with the real trainer ----------------------------------------------


def pod_from_job(job: dict[str, Any], index: int) -> dict[str, Any]:
    """The pod the Job controller makes from an Indexed Job's template (what kmock has no controller for)."""
    template = job["spec"]["template"]
    name = job["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{name}-{index}-x7k2p",
            "namespace": job["metadata"]["namespace"],
            "uid": f"uid-{name}-{index}",
            "labels": {**template["metadata"]["labels"], "job-name": name,
                       "batch.kubernetes.io/job-completion-index": str(index)},
            "annotations": {podrunner.COMPLETION_INDEX_ANNOTATION: str(index)},
        },
        "spec": {**template["spec"], "hostname": f"{name}-{index}"},
    }


@pytest.mark.slow
def test_runner_trains_the_rendered_example_pod(emulator: tuple[Any, Kube], tmp_path: Path) -> None:
    """examples/healthcare-lora.yaml as the e2e suite derives it, rendered by the operator's renderer and
    run by the runner with the real trainer on CPU against a real local S3 server: the part of the e2e
    path below the Job controller, checked without a cluster."""
    from finetune_operator import render, sizing
    from finetune_operator.settings import OperatorSettings
    from finetune_operator.spec import FineTuneJob
    from finetune_trainer.s3server import LocalS3
    from tests.e2e import conftest as e2e

    k8s, kube = emulator
    with LocalS3(buckets=(e2e.DATA_BUCKET, e2e.OUTPUT_BUCKET, e2e.MODEL_BUCKET)) as s3:
        from finetune_trainer.tiny import build_tiny_model

        client = s3.client()
        model_dir = build_tiny_model(tmp_path / "model")
        for path in sorted(model_dir.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), e2e.MODEL_BUCKET, e2e.MODEL_PREFIX + path.relative_to(model_dir).as_posix())
        for local, key in (("healthcare_train.jsonl", "instructions/train.jsonl"),
                           ("healthcare_test.jsonl", "instructions/test.jsonl"),
                           ("healthcare_glossary.txt", "glossary.txt")):
            client.upload_file(str(e2e.DATA_DIR / local), e2e.DATA_BUCKET, key)

        manifest = e2e.healthcare_manifest("ml", podrunner.NODE_NAME, f"s3://{e2e.MODEL_BUCKET}/{e2e.MODEL_PREFIX}")
        manifest["metadata"]["uid"] = "ftj-uid"
        ftj = FineTuneJob.model_validate(manifest)
        config_map, _service, job = render.render_children(ftj, sizing.plan(ftj.spec), OperatorSettings())
        env = s3.env()
        kube.request("POST", "/api/v1/namespaces/ml/secrets", body={
            "metadata": {"name": e2e.SECRET_NAME, "namespace": "ml"},
            "data": {k: b64(env[k]) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                                              "AWS_REGION")}})
        kube.request("POST", "/api/v1/namespaces/ml/configmaps", body=config_map)
        kube.request("POST", "/api/v1/namespaces/ml/pods", body=pod_from_job(job, 0))

        runner = PodRunner(kube, "ml", "finetune.dev/job", workdir=tmp_path / "work", echo=None)
        runner.ensure_node()
        try:
            sync_until(runner, lambda: bool(runner.finished), passes=6000)
        finally:
            runner.close()
        [pod_name] = runner.finished
        status = obj(k8s, pod_name)["status"]
        terminated = status["containerStatuses"][0]["state"]["terminated"]
        assert status["phase"] == "Succeeded", terminated.get("message")
        assert terminated["exitCode"] == 0
        marker = json.loads(client.get_object(Bucket=e2e.OUTPUT_BUCKET, Key=e2e.OUTPUT_PREFIX + "_COMPLETE")["Body"].read())
        assert {"evaluation.json", "provenance.json", "metrics.jsonl"} <= {f["path"] for f in marker["files"]}
        # The report the operator turns into status: what the e2e suite expects of status, checked here.
        report = json.loads(client.get_object(Bucket=e2e.OUTPUT_BUCKET, Key=e2e.OUTPUT_PREFIX + "status/report.json")
                            ["Body"].read())
        assert report["phase"] == "complete"
        assert report["step"] == report["totalSteps"] == 4
        assert [c["step"] for c in report["checkpoints"]] == [2, 4]
        assert set(report["artifacts"]) >= {"model", "metrics", "evaluation", "provenance", "modelCard"}
        assert report["evaluation"]["examples"] > 0
        for model in ("base", "tuned"):
            for score in ("accuracy", "terminology", "hallucination"):
                assert 0.0 <= report["evaluation"][model][score] <= 1.0, (model, score)
