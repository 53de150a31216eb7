"""A local pod runner: plays the kubelet for a FineTuneJob's training pods on this machine.

A test cluster may have no GPU nodes, or no kubelet at all (a bare control plane). This runner watches the
pods matching a label selector in one namespace and runs each one's containers as local processes, so the
whole path (operator -> Job -> pods -> trainer -> S3 -> status) runs for real against any API server:

1. **Node.** It registers a Node object (default `finetune-local-runner`, label
   `finetune.dev/local-runner=true`, taint `finetune.dev/local-runner=true:NoSchedule`, the GPU resources
   in capacity) and keeps it alive with a Lease in `kube-node-lease` and a Ready condition, as a kubelet does,
   so the node lifecycle controller does not evict its pods.
2. **Scheduling.** A matching pod with no `spec.nodeName` is bound to that node through the `pods/binding`
   subresource (as the scheduler does); a pod the scheduler already placed there is taken as it is. Pods
   on other nodes are left alone.
3. **Environment.** Each container's environment is built as the kubelet builds it: `envFrom`
   (ConfigMap/Secret, with prefix), `env` values with `$(VAR)` expansion, `valueFrom` secretKeyRef,
   configMapKeyRef, fieldRef (labels, annotations such as the job-completion-index, name, namespace, uid,
   nodeName, serviceAccountName; pod and host IPs read as 127.0.0.1) and resourceFieldRef.
4. **Volumes.** ConfigMap and Secret volumes become files in a temporary directory, emptyDir a temporary
   directory, a PersistentVolumeClaim `<pvc_root>/<claimName>`, projected volumes their ConfigMap, Secret and
   downward-API files (no service-account token is minted). Nothing is mounted on the host: absolute paths
   the container uses are rewritten through its environment and arguments instead (a value at or under a
   mount path, such as `FT_CONFIG=/etc/finetune/job.json` or `FT_CACHE_DIR=/cache`, or the parent of mount
   paths, such as `FT_PVC_ROOT=/mnt/pvc`, becomes the matching local path). When the pod does not set
   `FT_CONFIG` the contract's default is rewritten the same way; `FT_PVC_ROOT` always names the runner's
   PVC root. `HOME`/`TMPDIR` default to directories of the pod; the pod's `PATH` is replaced by this one.
5. **Command.** `command` + `args` run without a shell; a leading `python`/`python3` is this interpreter.
   A container without `command` cannot run (the image's entrypoint is not known here).
6. **GPUs.** Unless the runner is told to use GPUs, a GPU request is ignored: the process runs on CPU with
   `CUDA_VISIBLE_DEVICES=""` and `FT_PROCS_PER_MACHINE=1`.
7. **Networking.** Every pod is a process on this machine, so `FT_MAIN_ADDRESS` (pod 0's DNS name through
   the headless Service) becomes 127.0.0.1: the pods of a multi-node Indexed Job rendezvous on loopback.
8. **Status.** The pod's phase goes back to the API (`pods/status`): Pending -> Running -> Succeeded or
   Failed, with `containerStatuses` carrying the `terminated` exit code, so the Job controller applies the
   Job's podFailurePolicy and completes or fails the Job. A pod being deleted gets SIGTERM, SIGKILL after its
   grace period, and is then removed with grace period 0, as a kubelet confirms a deletion. A SIGKILL (137)
   is reported as reason `Error`, as a kubelet reports a kill from outside, and as `OOMKilled` only when the
   process first wrote the file named by `$PODRUNNER_OOM_MARKER`: there is no memory cgroup here, so a test
   stands in for the kernel's OOM killer that way.

Limits: no images (the local Python environment must hold the trainer), no container isolation (processes
run as this user, without resource limits), no probes, no sidecars, no hostPath volumes, no pod networking
beyond loopback, no service-account token. It is a test tool: it lives with the tests, not in the operator.

It speaks JSON to the API server through the `kubernetes` client library (its generic `ApiClient`), which
reads the kubeconfig and authenticates as kubectl does (client certificates, tokens, token files, basic
auth, exec plugins such as `aws eks get-token` or `gke-gcloud-auth-plugin`), or as the pod's service account
when it runs in a cluster without a kubeconfig.

CLI (against the cluster of $KUBECONFIG)::

    python -m tests.e2e.podrunner --namespace NS --selector finetune.dev/job
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO, Any

import kubernetes
import psutil
import urllib3

from finetune_operator.contract import (
    CONFIG_PATH,
    DEFAULT_PVC_ROOT,
    ENV_CONFIG,
    ENV_MAIN_ADDRESS,
    ENV_PROCS_PER_MACHINE,
    ENV_PVC_ROOT,
)

log = logging.getLogger("podrunner")

NODE_NAME = "finetune-local-runner"
NODE_LABEL = "finetune.dev/local-runner"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
DEFAULT_GPU_RESOURCES = ("nvidia.com/gpu",)
LOCAL_ADDRESS = "127.0.0.1"
#: What the fake node offers the scheduler: enough for any training pod's default requests.
NODE_CAPACITY = {"cpu": "256", "memory": "4Ti", "pods": "110", "ephemeral-storage": "10Ti"}
NODE_GPUS = "64"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
NODE_GPU_MEMORY_MIB = "81920"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40
HEARTBEAT_SECONDS = 10.0
#: The kubelet's limits for a termination message taken from the logs (FallbackToLogsOnError).
LOG_MESSAGE_LINES = 80
LOG_MESSAGE_BYTES = 2048
DEFAULT_TERMINATION_GRACE = 30
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_PYTHON = re.compile(r"^python(3(\.\d+)?)?$")
_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|[KMGTPE]i|[mkMGTPE]?)$")
_SUFFIX: dict[str, Decimal | int] = {
    "": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}
# Host variables a local process keeps (the pod's PATH is replaced: it names the image's directories).
_HOST_ENV = ("LANG", "LC_ALL", "LC_CTYPE", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")


class PodSetupError(Exception):
    """A container that cannot start; `reason` is the kubelet's waiting reason."""

    def __init__(self, message: str, reason: str = "CreateContainerConfigError"):
        super().__init__(message)
        self.reason = reason
        self.message = message


def now() -> str:
    """RFC 3339 time, seconds precision (what pod status fields carry)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    """RFC 3339 with microseconds (a Lease's MicroTime fields)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---------------------------------------------------------------------------------------------------
# Pure parts: selectors, ConfigMap/Secret data, environment, volumes, commands, status patches.
# ---------------------------------------------------------------------------------------------------


def selector_matches(labels: Mapping[str, str], selector: str) -> bool:
    """Whether `labels` satisfy a Kubernetes label selector (`a`, `!a`, `a=b`, `a!=b`, `a in (x,y)`, ...).

    The server filters by the selector already; the runner checks again so it never touches a pod it was
    not asked to run, whatever the API server (or an emulator) returned.
    """
    for term in _split_terms(selector):
        match = re.fullmatch(r"\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*", term)
        if match:
            key, op, values = match.group(1), match.group(2), {v.strip() for v in match.group(3).split(",")}
            if (op == "in") != (key in labels and labels[key] in values):
                return False
            continue
        match = re.fullmatch(r"\s*([^\s!=]+)\s*(==|=|!=)\s*([^\s]*)\s*", term)
        if match:
            key, op, value = match.groups()
            if (op == "!=") == (labels.get(key) == value):
                return False
            continue
        term = term.strip()
        if term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term and term not in labels:
            return False
    return True


def _split_terms(selector: str) -> list[str]:
    terms, depth, start = [], 0, 0
    for i, char in enumerate(selector):
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            terms.append(selector[start:i])
            start = i + 1
    terms.append(selector[start:])
    return [t for t in terms if t.strip()]


def configmap_values(configmap: Mapping[str, Any]) -> dict[str, str]:
    """A ConfigMap's keys: `data` as is, `binaryData` base64-decoded."""
    values = {k: str(v) for k, v in (configmap.get("data") or {}).items()}
    for key, raw in (configmap.get("binaryData") or {}).items():
        values[key] = base64.b64decode(raw).decode("utf-8", errors="replace")
    return values


def secret_values(secret: Mapping[str, Any]) -> dict[str, str]:
    """A Secret's keys, base64-decoded (`stringData` only exists on writes, but is honoured if present)."""
    values: dict[str, str] = {}
    for key, raw in (secret.get("data") or {}).items():
        try:
            values[key] = base64.b64decode(raw).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            name = (secret.get("metadata") or {}).get("name", "?")
            raise PodSetupError(f"secret {name!r} key {key!r} is not base64-encoded UTF-8 text") from None
    values.update({k: str(v) for k, v in (secret.get("stringData") or {}).items()})
    return values


@dataclass
class Objects:
    """The ConfigMaps and Secrets of the pod's namespace a container refers to, as API objects."""

    configmaps: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    secrets: dict[str, Mapping[str, Any]] = field(default_factory=dict)

    def configmap(self, name: str, optional: bool) -> dict[str, str] | None:
        found = self.configmaps.get(name)
        if found is None:
            if optional:
                return None
            raise PodSetupError(f'configmap "{name}" not found')
        return configmap_values(found)

    def secret(self, name: str, optional: bool) -> dict[str, str] | None:
        found = self.secrets.get(name)
        if found is None:
            if optional:
                return None
            raise PodSetupError(f'secret "{name}" not found')
        return secret_values(found)


def referenced_objects(pod: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """Names of the ConfigMaps and Secrets a pod's containers and volumes refer to."""
    configmaps: set[str] = set()
    secrets: set[str] = set()
    spec = pod.get("spec") or {}
    for container in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        for source in container.get("envFrom") or []:
            if "configMapRef" in source:
                configmaps.add(source["configMapRef"]["name"])
            if "secretRef" in source:
                secrets.add(source["secretRef"]["name"])
        for var in container.get("env") or []:
            ref = var.get("valueFrom") or {}
            if "configMapKeyRef" in ref:
                configmaps.add(ref["configMapKeyRef"]["name"])
            if "secretKeyRef" in ref:
                secrets.add(ref["secretKeyRef"]["name"])
    for volume in spec.get("volumes") or []:
        if "configMap" in volume:
            configmaps.add(volume["configMap"]["name"])
        if "secret" in volume:
            secrets.add(volume["secret"]["secretName"])
        for source in (volume.get("projected") or {}).get("sources") or []:
            if "configMap" in source:
                configmaps.add(source["configMap"]["name"])
            if "secret" in source:
                secrets.add(source["secret"]["name"])
    return configmaps, secrets


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined names are replaced, `$$` is a literal `$`, others stay."""
    out: list[str] = []
    i = 0
    while i < len(value):
        if value[i] == "$" and i + 1 < len(value):
            if value[i + 1] == "$":
                out.append("$")
                i += 2
                continue
            if value[i + 1] == "(":
                end = value.find(")", i + 2)
                if end != -1:
                    name = value[i + 2 : end]
                    out.append(env[name] if name in env else value[i : end + 1])
                    i = end + 1
                    continue
        out.append(value[i])
        i += 1
    return "".join(out)


def field_ref(pod: Mapping[str, Any], path: str) -> str:
    """The downward API: a pod field by its fieldPath. Pod and host IPs are loopback here."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.hostIP": LOCAL_ADDRESS,
        "status.hostIPs": LOCAL_ADDRESS,
        "status.podIP": LOCAL_ADDRESS,
        "status.podIPs": LOCAL_ADDRESS,
    }
    if path in simple:
        return str(simple[path])
    match = _SUBSCRIPT.match(path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise PodSetupError(f"fieldRef {path!r} is not supported by the local pod runner")


def parse_quantity(value: str) -> Decimal:
    """A Kubernetes quantity (`500m`, `2`, `4Gi`, `1e3`) as a number."""
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise PodSetupError(f"resource quantity {value!r} is not valid")
    number, suffix = match.groups()
    try:
        base = Decimal(number)
    except InvalidOperation:
        raise PodSetupError(f"resource quantity {value!r} is not valid") from None
    if suffix[:1] in ("e", "E"):
        return base * (Decimal(10) ** int(suffix[1:]))
    return base * Decimal(_SUFFIX[suffix])


def resource_field_ref(container: Mapping[str, Any], ref: Mapping[str, Any]) -> str:
    """`resourceFieldRef`: a container's request or limit divided by the divisor, rounded up."""
    resource = ref.get("resource", "")
    kind, _, name = resource.partition(".")
    if kind not in ("requests", "limits") or not name:
        raise PodSetupError(f"resourceFieldRef {resource!r} is not valid")
    resources = container.get("resources") or {}
    raw = (resources.get(kind) or {}).get(name)
    if raw is None and kind == "requests":
        raw = (resources.get("limits") or {}).get(name)
    if raw is None:
        raise PodSetupError(
            f"resourceFieldRef {resource!r}: container {container.get('name')!r} sets no {kind} for {name!r} "
            "(a kubelet would use the node's allocatable, which a local runner does not have)"
        )
    divisor = parse_quantity(ref.get("divisor") or "1")
    return str(math.ceil(parse_quantity(raw) / divisor))


def resolve_env(pod: Mapping[str, Any], container: Mapping[str, Any], objects: Objects) -> dict[str, str]:
    """A container's environment exactly as the pod spec defines it (before any local rewriting)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        values: dict[str, str] | None = None
        if "configMapRef" in source:
            ref = source["configMapRef"]
            values = objects.configmap(ref["name"], bool(ref.get("optional")))
        elif "secretRef" in source:
            ref = source["secretRef"]
            values = objects.secret(ref["name"], bool(ref.get("optional")))
        for key, text in (values or {}).items():
            if _ENV_NAME.match(prefix + key):  # the kubelet skips keys that are not variable names
                env[prefix + key] = text
    for var in container.get("env") or []:
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(str(var.get("value", "")), env)
            continue
        ref = var["valueFrom"]
        value: str | None
        if "secretKeyRef" in ref:
            value = _key(objects.secret, ref["secretKeyRef"], "secret")
        elif "configMapKeyRef" in ref:
            value = _key(objects.configmap, ref["configMapKeyRef"], "configmap")
        elif "fieldRef" in ref:
            value = field_ref(pod, ref["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in ref:
            target = ref["resourceFieldRef"].get("containerName") or container.get("name")
            spec = pod.get("spec") or {}
            owner = next((c for c in spec.get("containers") or [] if c.get("name") == target), container)
            value = resource_field_ref(owner, ref["resourceFieldRef"])
        else:
            raise PodSetupError(f"env {name!r}: valueFrom {sorted(ref)} is not supported by the local pod runner")
        if value is not None:
            env[name] = value
    return env


def _key(getter: Callable[[str, bool], dict[str, str] | None], ref: Mapping[str, Any], kind: str) -> str | None:
    optional = bool(ref.get("optional"))
    values = getter(ref["name"], optional)
    if values is None:
        return None
    if ref["key"] not in values:
        if optional:
            return None
        raise PodSetupError(f'couldn\'t find key {ref["key"]} in {kind} {ref["name"]!r}')
    return values[ref["key"]]


def requests_gpu(container: Mapping[str, Any], gpu_resources: Iterable[str]) -> bool:
    """Whether a container requests or limits any of the GPU resources."""
    resources = container.get("resources") or {}
    names = set(gpu_resources)
    for kind in ("limits", "requests"):
        for name, value in (resources.get(kind) or {}).items():
            if name in names and parse_quantity(value) > 0:
                return True
    return False


@dataclass(frozen=True)
class Mount:
    """A container path and the local directory or file standing in for it."""

    container_path: str
    host_path: Path
    read_only: bool = False


def _write_items(target: Path, values: Mapping[str, str], items: list[dict[str, Any]] | None, what: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    if items:
        pairs = []
        for item in items:
            if item["key"] not in values:
                raise PodSetupError(f'{what}: key {item["key"]!r} not found', reason="CreateContainerConfigError")
            pairs.append((item["path"], values[item["key"]]))
    else:
        pairs = sorted(values.items())
    for rel, text in pairs:
        path = _inside(target, rel, what)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def _inside(root: Path, rel: str, what: str) -> Path:
    path = (root / rel).resolve()
    if path != root.resolve() and root.resolve() not in path.parents:
        raise PodSetupError(f"{what}: path {rel!r} leaves the volume")
    return path


def prepare_volumes(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    pod_dir: Path,
    pvc_root: Path,
    objects: Objects,
) -> list[Mount]:
    """Materialize the volumes one container mounts under `pod_dir`; return its mounts, longest path first.

    ConfigMap/Secret/downward-API files are written; emptyDir is a directory of this pod; a PVC is
    `<pvc_root>/<claimName>`, shared by every pod of this runner that mounts the claim.
    """
    volumes = {v["name"]: v for v in (pod.get("spec") or {}).get("volumes") or []}
    mounts: list[Mount] = []
    for mount in container.get("volumeMounts") or []:
        name = mount["name"]
        if name not in volumes:
            raise PodSetupError(f"volumeMount {name!r} names no volume of the pod")
        volume = volumes[name]
        base = _volume_dir(pod, volume, pod_dir / "volumes" / name, pvc_root, objects)
        host = _inside(base, mount["subPath"], f"volumeMount {name!r}") if mount.get("subPath") else base
        if mount.get("subPath") and not host.exists():
            host.mkdir(parents=True, exist_ok=True)
        mounts.append(Mount(mount["mountPath"].rstrip("/") or "/", host, bool(mount.get("readOnly"))))
    return sorted(mounts, key=lambda m: len(m.container_path), reverse=True)


def _volume_dir(pod: Mapping[str, Any], volume: Mapping[str, Any], target: Path, pvc_root: Path, objects: Objects) -> Path:
    name = volume["name"]
    if "persistentVolumeClaim" in volume:
        path = pvc_root / volume["persistentVolumeClaim"]["claimName"]
        path.mkdir(parents=True, exist_ok=True)
        return path
    if "emptyDir" in volume:
        target.mkdir(parents=True, exist_ok=True)
        return target
    if "configMap" in volume:
        ref = volume["configMap"]
        values = objects.configmap(ref["name"], bool(ref.get("optional")))
        _write_items(target, values or {}, ref.get("items"), f"volume {name!r}")
        return target
    if "secret" in volume:
        ref = volume["secret"]
        values = objects.secret(ref["secretName"], bool(ref.get("optional")))
        _write_items(target, values or {}, ref.get("items"), f"volume {name!r}")
        return target
    if "downwardAPI" in volume:
        _write_downward(pod, target, volume["downwardAPI"].get("items") or [], name)
        return target
    if "projected" in volume:
        target.mkdir(parents=True, exist_ok=True)
        for source in volume["projected"].get("sources") or []:
            if "configMap" in source:
                ref = source["configMap"]
                values = objects.configmap(ref["name"], bool(ref.get("optional")))
                _write_items(target, values or {}, ref.get("items"), f"volume {name!r}")
            elif "secret" in source:
                ref = source["secret"]
                values = objects.secret(ref["name"], bool(ref.get("optional")))
                _write_items(target, values or {}, ref.get("items"), f"volume {name!r}")
            elif "downwardAPI" in source:
                _write_downward(pod, target, source["downwardAPI"].get("items") or [], name)
            # serviceAccountToken (the auto-injected kube-api-access volume): no token is minted locally.
        return target
    kinds = sorted(k for k in volume if k != "name")
    raise PodSetupError(f"volume {name!r} of type {', '.join(kinds)} is not supported by the local pod runner")


def _write_downward(pod: Mapping[str, Any], target: Path, items: list[dict[str, Any]], name: str) -> None:
    values = {}
    for item in items:
        if "fieldRef" in item:
            values[item["path"]] = field_ref(pod, item["fieldRef"]["fieldPath"])
        else:
            raise PodSetupError(f"volume {name!r}: only fieldRef downward-API items are supported")
    _write_items(target, values, None, f"volume {name!r}")


def local_path(value: str, mounts: list[Mount]) -> str | None:
    """The local path for a container path, or None when the path is not under (or above) any mount.

    A path at or under a mount path maps into the mount's directory. A directory above mount paths (such
    as `/mnt/pvc` above `/mnt/pvc/data`) maps to the local directory above them when every such mount
    agrees on it (they do for PVCs: `<pvc_root>/<claim>`).
    """
    if not value.startswith("/"):
        return None
    path = value.rstrip("/") or "/"
    for mount in mounts:  # longest first
        if path == mount.container_path:
            return str(mount.host_path)
        if path.startswith(mount.container_path.rstrip("/") + "/"):
            return str(mount.host_path / path[len(mount.container_path.rstrip("/")) + 1 :])
    parents = set()
    for mount in mounts:
        if mount.container_path.startswith(path.rstrip("/") + "/"):
            rel = mount.container_path[len(path.rstrip("/")) + 1 :]
            host = str(mount.host_path)
            if not host.endswith("/" + rel):
                return None
            parents.add(host[: -len(rel) - 1])
    return parents.pop() if len(parents) == 1 else None


def localize_env(
    env: Mapping[str, str],
    mounts: list[Mount],
    *,
    pvc_root: Path,
    ignore_gpus: bool,
) -> dict[str, str]:
    """Rewrite a resolved pod environment for a local process (see the module docstring)."""
    out: dict[str, str] = {}
    for name, value in env.items():
        if name == "PATH":
            continue  # the image's PATH means nothing here
        if value.startswith("/") and ":" in value:
            parts = [local_path(p, mounts) or p for p in value.split(":")]
            out[name] = ":".join(parts)
        else:
            out[name] = local_path(value, mounts) or value
    if ENV_CONFIG not in out:
        config = local_path(CONFIG_PATH, mounts)
        if config is not None:
            out[ENV_CONFIG] = config
    # PVC claims live under `pvc_root` whether or not this container mounts one.
    out[ENV_PVC_ROOT] = local_path(env.get(ENV_PVC_ROOT, DEFAULT_PVC_ROOT), mounts) or str(pvc_root)
    if ENV_MAIN_ADDRESS in out:
        out[ENV_MAIN_ADDRESS] = LOCAL_ADDRESS  # every pod of this runner is a process on this machine
    if ignore_gpus:
        out["CUDA_VISIBLE_DEVICES"] = ""
        out[ENV_PROCS_PER_MACHINE] = "1"
    return out


def build_command(
    container: Mapping[str, Any],
    env: Mapping[str, str],
    mounts: list[Mount],
    python: str = sys.executable,
) -> list[str]:
    """argv for a container: `command` + `args`, `$(VAR)` expanded, container paths made local. No shell."""
    command = list(container.get("command") or [])
    if not command:
        raise PodSetupError(
            f"container {container.get('name')!r} has no command; the local pod runner cannot run an image's "
            "entrypoint",
            reason="RunContainerError",
        )
    argv = [expand(str(arg), env) for arg in command + list(container.get("args") or [])]
    argv = [local_path(arg, mounts) or arg for arg in argv]
    head = argv[0]
    if _PYTHON.match(os.path.basename(head)):
        argv[0] = python
    elif "/" not in head:
        found = shutil.which(head, path=env.get("PATH"))
        if found is None:
            raise PodSetupError(f"executable {head!r} not found on this machine's PATH", reason="RunContainerError")
        argv[0] = found
    elif not os.access(head, os.X_OK):
        raise PodSetupError(f"executable {head!r} does not exist here", reason="RunContainerError")
    return argv


@dataclass
class ContainerState:
    """What the runner knows of one container, the input of the status patches."""

    name: str
    image: str = ""
    state: str = "waiting"  # waiting | running | terminated
    reason: str = "ContainerCreating"
    message: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    restart_count: int = 0
    last_terminated: dict[str, Any] | None = None
    container_id: str = ""

    def terminated(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "containerID": self.container_id,
        }
        if self.message:
            data["message"] = self.message
        return data

    def status(self) -> dict[str, Any]:
        """A containerStatuses entry. The states not in force are null, so a strategic-merge patch
        replaces `running` with `terminated` instead of keeping both."""
        state: dict[str, Any] = {"waiting": None, "running": None, "terminated": None}
        if self.state == "running":
            state["running"] = {"startedAt": self.started_at}
        elif self.state == "terminated":
            state["terminated"] = self.terminated()
        else:
            state["waiting"] = {"reason": self.reason, **({"message": self.message} if self.message else {})}
        return {
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "containerID": self.container_id,
            "ready": self.state == "running",
            "started": self.state == "running",
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {"terminated": self.last_terminated} if self.last_terminated else {},
        }


#: Set in every container's environment: the file a process writes before it SIGKILLs itself to be
#: reported `OOMKilled`. There is no memory cgroup here, so a test stands in for the kernel's OOM killer.
ENV_OOM_MARKER = "PODRUNNER_OOM_MARKER"


def exit_reason(exit_code: int, oom_killed: bool = False) -> str:
    """The kubelet's terminated reason: `OOMKilled` only for the OOM killer's SIGKILL (137); a SIGKILL from
    anyone else is an `Error`, as a kubelet reports it."""
    if exit_code == 0:
        return "Completed"
    return "OOMKilled" if exit_code == 137 and oom_killed else "Error"


def pod_phase(init: list[ContainerState], main: list[ContainerState], restart_policy: str) -> str:
    """Pod phase from its containers (restartPolicy Never: a failed container is final)."""
    final_failure = restart_policy == "Never"
    if any(c.state == "terminated" and c.exit_code != 0 and final_failure for c in init):
        return "Failed"
    if main and all(c.state == "terminated" for c in main):
        if all(c.exit_code == 0 for c in main):
            return "Succeeded"
        if final_failure:
            return "Failed"
    if any(c.state in ("running", "terminated") for c in main):
        return "Running"
    return "Pending"


def status_patch(
    pod: Mapping[str, Any],
    init: list[ContainerState],
    main: list[ContainerState],
    at: str | None = None,
) -> dict[str, Any]:
    """The `pods/status` strategic-merge patch for the containers' states."""
    at = at or now()
    restart_policy = (pod.get("spec") or {}).get("restartPolicy", "Always")
    phase = pod_phase(init, main, restart_policy)
    initialized = all(c.state == "terminated" and c.exit_code == 0 for c in init)
    ready = phase == "Running" and all(c.state == "running" for c in main)
    done_reason = "PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady"

    def condition(kind: str, ok: bool, reason: str = "") -> dict[str, Any]:
        entry: dict[str, Any] = {"type": kind, "status": "True" if ok else "False", "lastProbeTime": None,
                                 "lastTransitionTime": at}
        if not ok and reason:
            entry["reason"] = reason
        return entry

    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [
            condition("PodScheduled", True),
            condition("Initialized", initialized, "ContainersNotInitialized"),
            condition("ContainersReady", ready, done_reason),
            condition("Ready", ready, done_reason),
        ],
        "containerStatuses": [c.status() for c in main],
    }
    if init:
        status["initContainerStatuses"] = [c.status() for c in init]
    if not (pod.get("status") or {}).get("startTime"):
        status["startTime"] = at
    if phase == "Failed":
        failed = next((c for c in init + main if c.state == "terminated" and c.exit_code), None)
        if failed is not None:
            status["message"] = f"container {failed.name} exited with code {failed.exit_code}"
    return {"status": status}


def termination_message(log_text: str, exit_code: int, policy: str, file_text: str | None) -> str:
    """The kubelet's termination message: the file's text, or with FallbackToLogsOnError the log tail."""
    if file_text:
        return file_text[-4096:]
    if policy == "FallbackToLogsOnError" and exit_code != 0:
        tail = "\n".join(log_text.splitlines()[-LOG_MESSAGE_LINES:])
        return tail.encode()[-LOG_MESSAGE_BYTES:].decode("utf-8", errors="ignore")
    return ""


# ---------------------------------------------------------------------------------------------------
# The API: JSON dicts through the `kubernetes` client's generic ApiClient. The library reads the kubeconfig
# ($KUBECONFIG lists, contexts, inline or file certificates, tokens and token files, basic auth, exec
# plugins and their refresh, tls-server-name, proxy-url) or the in-cluster service account, and does TLS;
# this facade only turns paths and dicts into requests and non-2xx answers into KubeError.
# ---------------------------------------------------------------------------------------------------

#: Seconds one request may take, connecting included.
REQUEST_TIMEOUT = 60


class KubeError(Exception):
    """A non-2xx answer of the API server (status 0: a request the client could not make, such as TLS)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class Kube:
    """The Kubernetes API as JSON dicts: `request(method, path, body)`, raising KubeError on non-2xx.

    A request that gets no answer (connection refused or reset, timeout) raises ConnectionError, an OSError,
    so a caller can tell an API server that is away from one that said no.
    """

    def __init__(self, api: kubernetes.client.ApiClient):
        self.api = api
        self.api.user_agent = "finetune-podrunner"

    @property
    def server(self) -> str:
        """The API server's URL."""
        return str(self.api.configuration.host)

    @classmethod
    def from_kubeconfig(cls, path: str | None = None, context: str | None = None) -> Kube:
        """A client for a kubeconfig context (default: the current one). `path` may list several files
        (`a:b`, as $KUBECONFIG does); without it, $KUBECONFIG or ~/.kube/config, and in a pod that has
        neither, the pod's service account."""
        default = os.environ.get("KUBECONFIG") or "~/.kube/config"
        in_pod = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        if path is None and context is None and in_pod and not os.environ.get("KUBECONFIG") \
                and not Path(default).expanduser().exists():
            configuration = kubernetes.client.Configuration()
            kubernetes.config.load_incluster_config(client_configuration=configuration)
            return cls(kubernetes.client.ApiClient(configuration))
        # The default is passed explicitly: the library reads $KUBECONFIG once, when it is imported. Nothing
        # is written back to the kubeconfig (persist_config=False), not even a refreshed credential.
        return cls(kubernetes.config.new_client_from_config(
            config_file=path or default, context=context, persist_config=False))

    @classmethod
    def from_url(cls, url: str) -> Kube:
        """A client without credentials (a plain-HTTP emulator in tests, or `kubectl proxy`)."""
        return cls(kubernetes.client.ApiClient(kubernetes.client.Configuration(host=url.rstrip("/"))))

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        try:
            # auth_settings: the kubeconfig's credential (token, token file, basic auth, exec plugin, refreshed
            # when it expires); client certificates and the CA are in the ApiClient's connection pool.
            prepared = self.api.param_serialize(method, path, query_params=dict(query) if query else None,
                                                header_params=headers, body=body, auth_settings=["BearerToken"])
            response = self.api.call_api(*prepared, _request_timeout=REQUEST_TIMEOUT)
            text = response.read().decode("utf-8", errors="replace")
        except kubernetes.client.ApiException as err:
            raise KubeError(err.status or 0, f"{method} {path}: {err.reason}") from err
        except urllib3.exceptions.HTTPError as err:
            raise ConnectionError(f"{method} {path}: {err}") from err
        if not 200 <= response.status <= 299:
            try:
                message = json.loads(text).get("message", text)
            except (ValueError, AttributeError):
                message = text
            raise KubeError(response.status, f"{method} {path}: {message}")
        return json.loads(text) if text else {}

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", path)
        except KubeError as err:
            if err.status == 404:
                return None
            raise

    def patch(self, path: str, body: Mapping[str, Any], strategic: bool = True) -> dict[str, Any]:
        kind = "application/strategic-merge-patch+json" if strategic else "application/merge-patch+json"
        return self.request("PATCH", path, body=dict(body), content_type=kind)


# ---------------------------------------------------------------------------------------------------
# The runner.
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Proc:
    """One started container process."""

    state: ContainerState
    popen: subprocess.Popen[bytes]
    log_path: Path
    message_file: Path | None
    policy: str
    pump: threading.Thread
    oom_marker: Path | None = None


@dataclass
class _PodRun:
    """A pod this runner executes."""

    name: str
    uid: str
    pod_dir: Path
    init: list[ContainerState]
    main: list[ContainerState]
    procs: dict[str, _Proc] = field(default_factory=dict)
    kill_deadline: float | None = None
    reported: str = ""  # JSON of the last status patch sent, so unchanged states are not re-sent

    def finished(self, restart_policy: str) -> bool:
        return pod_phase(self.init, self.main, restart_policy) in ("Succeeded", "Failed")


def kill_tree(pid: int) -> None:
    """SIGKILL a process, its process group and all its descendants (found before anything dies, so
    none is reparented away first)."""
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            child.kill()


class PodRunner:
    """Runs the pods matching `selector` in `namespace` as local processes (see the module docstring).

    Call `sync()` in a loop (or `run()`); `close()` stops every process and, unless `keep_node`, removes the
    node it registered.
    """

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        selector: str,
        *,
        workdir: str | os.PathLike[str] | None = None,
        pvc_root: str | os.PathLike[str] | None = None,
        node_name: str = NODE_NAME,
        gpu_resources: Iterable[str] = DEFAULT_GPU_RESOURCES,
        use_gpus: bool = False,
        register_node: bool = True,
        keep_node: bool = False,
        extra_env: Mapping[str, str] | None = None,
        echo: IO[str] | None = sys.stderr,
        python: str = sys.executable,
    ):
        self.kube = kube
        self.namespace = namespace
        self.selector = selector
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="ft-podrunner-"))
        self.pvc_root = Path(pvc_root) if pvc_root is not None else self.workdir / "pvc"
        self.node_name = node_name
        self.gpu_resources = tuple(gpu_resources)
        self.use_gpus = use_gpus
        self.register_node = register_node
        self.keep_node = keep_node
        self.extra_env = dict(extra_env or {})
        self.echo = echo
        self.python = python
        self.runs: dict[str, _PodRun] = {}
        self.finished: dict[str, str] = {}  # pod name -> final phase, for callers and the CLI
        self._node_uid: str | None = None
        self._next_heartbeat = 0.0
        self._echo_lock = threading.Lock()

    # -- node ---------------------------------------------------------------------------------------

    def node_manifest(self) -> dict[str, Any]:
        capacity = {**NODE_CAPACITY, **{name: NODE_GPUS for name in self.gpu_resources}}
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    NODE_LABEL: "true",
                    # GPU feature discovery's label, which the operator's GPU-memory node affinity reads.
                    GPU_MEMORY_LABEL: NODE_GPU_MEMORY_MIB,
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "type": "finetune-local-runner",
                },
            },
            "spec": {"taints": [{"key": NODE_LABEL, "value": "true", "effect": "NoSchedule"}]},
            "status": {"capacity": capacity, "allocatable": capacity, "conditions": self._node_conditions()},
        }

    def _node_conditions(self) -> list[dict[str, Any]]:
        at = now()
        return [{"type": "Ready", "status": "True", "reason": "LocalRunnerReady", "lastHeartbeatTime": at,
                 "lastTransitionTime": at, "message": "the finetune local pod runner is running"}]

    def ensure_node(self) -> None:
        """Register the node (or adopt an existing one of the same name) and mark it Ready."""
        if not self.register_node:
            return
        manifest = self.node_manifest()
        try:
            created = self.kube.request("POST", "/api/v1/nodes", body=manifest)
            log.info("registered node %s", self.node_name)
        except KubeError as err:
            if err.status != 409:
                raise
            created = self.kube.request("GET", f"/api/v1/nodes/{self.node_name}")
        self._node_uid = (created.get("metadata") or {}).get("uid")
        # Status on create is not kept by every API server: set it through the subresource too.
        self.kube.patch(f"/api/v1/nodes/{self.node_name}/status", {"status": manifest["status"]})
        self._heartbeat(force=True)

    def _heartbeat(self, force: bool = False) -> None:
        if not self.register_node or (not force and time.monotonic() < self._next_heartbeat):
            return
        self._next_heartbeat = time.monotonic() + HEARTBEAT_SECONDS
        try:
            self.kube.patch(f"/api/v1/nodes/{self.node_name}/status", {"status": {"conditions": self._node_conditions()}})
            self._renew_lease()
        except KubeError as err:  # a missed heartbeat is not fatal; the next one may get through
            log.warning("node heartbeat failed: %s", err)

    def _renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"
        spec = {"holderIdentity": self.node_name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now_micro()}
        try:
            self.kube.patch(f"{path}/{self.node_name}", {"spec": spec}, strategic=False)
        except KubeError as err:
            if err.status != 404:
                raise
            meta: dict[str, Any] = {"name": self.node_name, "namespace": LEASE_NAMESPACE}
            if self._node_uid:  # as the kubelet does: the node owns its lease, GC removes it with the node
                meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": self.node_name,
                                            "uid": self._node_uid}]
            self.kube.request("POST", path, body={"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                                  "metadata": meta, "spec": spec})

    # -- loop ---------------------------------------------------------------------------------------

    def sync(self) -> None:
        """One pass: bind, start, poll, report and clean up every matching pod."""
        self._heartbeat()
        listing = self.kube.request(
            "GET", f"/api/v1/namespaces/{self.namespace}/pods", query={"labelSelector": self.selector}
        )
        pods = [p for p in listing.get("items") or []
                if selector_matches((p.get("metadata") or {}).get("labels") or {}, self.selector)]
        seen = set()
        for pod in pods:
            seen.add(pod["metadata"]["uid"])
            try:
                self._sync_pod(pod)
            except KubeError as err:
                if err.status not in (404, 409):  # gone or changed meanwhile: the next pass sees the news
                    raise
                log.info("pod %s: %s (retrying on the next pass)", pod["metadata"]["name"], err)
            except PodSetupError as err:
                log.warning("pod %s cannot run here: %s", pod["metadata"]["name"], err.message)
        for uid in [u for u in self.runs if u not in seen]:  # deleted without us: stop its processes
            run = self.runs.pop(uid)
            log.info("pod %s is gone; stopping its processes", run.name)
            self._kill(run, signal.SIGKILL)

    def run(self, stop: Callable[[], bool] | threading.Event | None = None, interval: float = 1.0) -> None:
        """Sync until `stop` (a callable or an Event) says so."""
        def done() -> bool:
            if stop is None:
                return False
            return stop.is_set() if isinstance(stop, threading.Event) else stop()

        self.ensure_node()
        while not done():
            try:
                self.sync()
            except (KubeError, OSError) as err:
                # The API server restarting or a dropped connection: keep the processes, try again.
                log.warning("sync failed: %s", err)
            time.sleep(interval)

    def _sync_pod(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        uid, name = meta["uid"], meta["name"]
        phase = (pod.get("status") or {}).get("phase", "Pending")
        node = spec.get("nodeName")
        run = self.runs.get(uid)
        if meta.get("deletionTimestamp"):
            if run is None and meta.get("deletionGracePeriodSeconds") == 0:
                return  # deletion confirmed; only the Job controller's finalizer holds the pod now
            if node == self.node_name or run is not None:
                self._delete(pod, run)
            return
        if phase in ("Succeeded", "Failed"):
            if run is not None:
                self._kill(run, signal.SIGKILL)
                self.runs.pop(uid, None)
            self.finished[name] = phase
            return
        if not node:
            self._bind(pod)
            node = spec["nodeName"] = self.node_name
        if node != self.node_name:
            return
        if run is None:
            if phase == "Running":
                # Running on our node but not started by this process: a previous runner died with it.
                self._report_lost(pod)
                return
            run = self.runs[uid] = self._new_run(pod)
        self._advance(pod, run)

    def _bind(self, pod: Mapping[str, Any]) -> None:
        name = pod["metadata"]["name"]
        body = {"apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": name, "uid": pod["metadata"]["uid"]},
                "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name}}
        self.kube.request("POST", f"/api/v1/namespaces/{self.namespace}/pods/{name}/binding", body=body)
        log.info("bound pod %s to node %s", name, self.node_name)

    def _new_run(self, pod: Mapping[str, Any]) -> _PodRun:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        for container in spec.get("initContainers") or []:
            if container.get("restartPolicy") == "Always":
                raise PodSetupError("sidecar containers are not supported by the local pod runner")
        pod_dir = self.workdir / "pods" / f"{meta['name']}-{meta['uid'][:8]}"
        pod_dir.mkdir(parents=True, exist_ok=True)
        return _PodRun(
            name=meta["name"],
            uid=meta["uid"],
            pod_dir=pod_dir,
            init=[ContainerState(c["name"], c.get("image", "")) for c in spec.get("initContainers") or []],
            main=[ContainerState(c["name"], c.get("image", "")) for c in spec.get("containers") or []],
        )

    def _advance(self, pod: dict[str, Any], run: _PodRun) -> None:
        spec = pod.get("spec") or {}
        restart_policy = spec.get("restartPolicy", "Always")
        self._reap(run, restart_policy)
        if not run.finished(restart_policy):
            pending_init = [c for c in run.init if c.state != "terminated" or c.exit_code != 0]
            if pending_init:
                current = pending_init[0]
                if current.state == "waiting" and (current.exit_code is None or restart_policy != "Never"):
                    self._start(pod, run, current, spec["initContainers"])
            else:
                for state in run.main:
                    if state.state == "waiting":
                        self._start(pod, run, state, spec["containers"])
        self._report(pod, run)

    def _start(self, pod: Mapping[str, Any], run: _PodRun, state: ContainerState, specs: list[dict[str, Any]]) -> None:
        container = next(c for c in specs if c["name"] == state.name)
        try:
            argv, env, cwd, message_file = self._prepare(pod, run, container)
        except PodSetupError as err:
            state.reason, state.message = err.reason, err.message
            log.warning("pod %s container %s cannot start: %s", run.name, state.name, err.message)
            return
        log_path = run.pod_dir / f"{state.name}.{state.restart_count}.log"
        oom_marker = run.pod_dir / f"{state.name}.{state.restart_count}.oom-killed"
        oom_marker.unlink(missing_ok=True)
        env = {**env, ENV_OOM_MARKER: str(oom_marker)}
        popen = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so SIGKILL can take every process it started
        )
        pump = threading.Thread(target=self._pump, args=(popen, log_path, f"{run.name}/{state.name}"), daemon=True)
        pump.start()
        state.state, state.reason, state.message = "running", "", ""
        state.started_at, state.finished_at, state.exit_code = now(), None, None
        state.container_id = f"local://{popen.pid}"
        policy = container.get("terminationMessagePolicy", "File")
        run.procs[state.name] = _Proc(state, popen, log_path, message_file, policy, pump, oom_marker)
        log.info("pod %s container %s started (pid %d): %s", run.name, state.name, popen.pid, " ".join(argv))

    def _prepare(
        self, pod: Mapping[str, Any], run: _PodRun, container: Mapping[str, Any]
    ) -> tuple[list[str], dict[str, str], str, Path | None]:
        objects = self._objects(pod)
        mounts = prepare_volumes(pod, container, run.pod_dir, self.pvc_root, objects)
        pod_env = resolve_env(pod, container, objects)
        ignore_gpus = not self.use_gpus and requests_gpu(container, self.gpu_resources)
        env = localize_env(pod_env, mounts, pvc_root=self.pvc_root, ignore_gpus=ignore_gpus)
        home = run.pod_dir / "home"
        tmp = run.pod_dir / "tmp"
        home.mkdir(exist_ok=True)
        tmp.mkdir(exist_ok=True)
        spec = pod.get("spec") or {}
        base = {k: os.environ[k] for k in _HOST_ENV if k in os.environ}
        base.update({
            "PATH": os.pathsep.join([os.path.dirname(self.python), os.environ.get("PATH", os.defpath)]),
            "HOME": str(home),
            "TMPDIR": str(tmp),
            "HOSTNAME": spec.get("hostname") or pod["metadata"]["name"],
        })
        full_env = {**base, **env, **self.extra_env}
        argv = build_command(container, full_env, mounts, python=self.python)
        workdir = container.get("workingDir")
        cwd = (local_path(workdir, mounts) if workdir else None) or str(run.pod_dir / "work")
        Path(cwd).mkdir(parents=True, exist_ok=True)
        message_path = container.get("terminationMessagePath") or "/dev/termination-log"
        message_file = local_path(message_path, mounts)
        return argv, full_env, cwd, Path(message_file) if message_file else None

    def _objects(self, pod: Mapping[str, Any]) -> Objects:
        configmaps, secrets = referenced_objects(pod)
        objects = Objects()
        for name in configmaps:
            found = self.kube.get(f"/api/v1/namespaces/{self.namespace}/configmaps/{name}")
            if found is not None:
                objects.configmaps[name] = found
        for name in secrets:
            found = self.kube.get(f"/api/v1/namespaces/{self.namespace}/secrets/{name}")
            if found is not None:
                objects.secrets[name] = found
        return objects

    def _pump(self, popen: subprocess.Popen[bytes], log_path: Path, prefix: str) -> None:
        assert popen.stdout is not None
        with open(log_path, "wb") as sink:
            for line in popen.stdout:
                sink.write(line)
                sink.flush()
                if self.echo is not None:
                    with self._echo_lock:
                        self.echo.write(f"[{prefix}] {line.decode('utf-8', errors='replace')}")
                        self.echo.flush()

    def _reap(self, run: _PodRun, restart_policy: str) -> None:
        for name, proc in list(run.procs.items()):
            code = proc.popen.poll()
            if code is None:
                continue
            proc.pump.join(timeout=5)
            del run.procs[name]
            state = proc.state
            exit_code = code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as containers report
            log_text = proc.log_path.read_text(encoding="utf-8", errors="replace") if proc.log_path.exists() else ""
            file_text = None
            if proc.message_file is not None and proc.message_file.is_file():
                file_text = proc.message_file.read_text(encoding="utf-8", errors="replace")
            state.state, state.exit_code, state.finished_at = "terminated", exit_code, now()
            state.reason = exit_reason(exit_code, proc.oom_marker is not None and proc.oom_marker.exists())
            state.message = termination_message(log_text, exit_code, proc.policy, file_text)
            log.info("pod %s container %s exited with code %d", run.name, name, exit_code)
            retry = exit_code != 0 and restart_policy in ("OnFailure", "Always") and run.kill_deadline is None
            if retry or (restart_policy == "Always" and exit_code == 0 and run.kill_deadline is None
                         and state in run.main):
                state.last_terminated = state.terminated()
                state.restart_count += 1
                state.state, state.reason, state.message = "waiting", "CrashLoopBackOff", ""

    def _report(self, pod: Mapping[str, Any], run: _PodRun) -> None:
        patch = status_patch(pod, run.init, run.main)
        key = json.dumps({k: v for k, v in patch["status"].items() if k not in ("conditions", "startTime")},
                         sort_keys=True)
        if key == run.reported:
            return
        self.kube.patch(f"/api/v1/namespaces/{self.namespace}/pods/{run.name}/status", patch)
        run.reported = key
        phase = patch["status"]["phase"]
        log.info("pod %s is %s", run.name, phase)
        if phase in ("Succeeded", "Failed"):
            self.finished[run.name] = phase

    def _report_lost(self, pod: Mapping[str, Any]) -> None:
        spec = pod.get("spec") or {}
        states = []
        for container in spec.get("containers") or []:
            state = ContainerState(container["name"], container.get("image", ""), state="terminated", exit_code=137,
                                   reason="Error", started_at=now(), finished_at=now(),
                                   message="the local pod runner that ran this container is gone")
            states.append(state)
        patched = {**pod, "spec": {**spec, "restartPolicy": "Never"}}
        self.kube.patch(f"/api/v1/namespaces/{self.namespace}/pods/{pod['metadata']['name']}/status",
                        status_patch(patched, [], states))
        log.warning("pod %s was Running without a process here; reported it Failed", pod["metadata"]["name"])

    def _delete(self, pod: Mapping[str, Any], run: _PodRun | None) -> None:
        """Graceful deletion: SIGTERM, SIGKILL after the grace period, report, then confirm the delete."""
        name = pod["metadata"]["name"]
        if run is not None and run.procs:
            grace = pod["metadata"].get("deletionGracePeriodSeconds")
            if grace is None:
                grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds", DEFAULT_TERMINATION_GRACE)
            if run.kill_deadline is None:
                log.info("pod %s is being deleted: SIGTERM, %ss grace", name, grace)
                run.kill_deadline = time.monotonic() + float(grace)
                self._kill(run, signal.SIGTERM)
            elif time.monotonic() >= run.kill_deadline:
                self._kill(run, signal.SIGKILL)
            self._reap(run, "Never")
            if run.procs:
                return
            try:
                self._report(pod, run)
            except KubeError as err:
                log.info("pod %s: final status not recorded: %s", name, err)
        self.runs.pop(pod["metadata"]["uid"], None)
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                "preconditions": {"uid": pod["metadata"]["uid"]}}
        try:
            self.kube.request("DELETE", f"/api/v1/namespaces/{self.namespace}/pods/{name}", body=body)
        except KubeError as err:
            if err.status not in (404, 409):
                raise
        log.info("pod %s deleted", name)

    def _kill(self, run: _PodRun, sig: signal.Signals) -> None:
        """SIGTERM goes to each container's main process only, as Kubernetes signals PID 1 (the trainer's
        launcher forwards it to its workers itself); SIGKILL takes everything the container started, as a
        runtime kills the whole cgroup: its process group and every descendant, since torchrun starts its
        workers in sessions of their own (a group kill alone left them training as orphans)."""
        for proc in run.procs.values():
            if proc.popen.poll() is None:
                if sig == signal.SIGKILL:
                    kill_tree(proc.popen.pid)
                else:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.popen.pid, sig)

    def pids(self, pod_name: str) -> dict[str, int]:
        """PIDs of a pod's running container processes, by container name ({} when none runs here).

        For tests (fault injection). Each leads its own process group, but that group does not hold
        everything it started: torchrun starts its workers in sessions of their own. To kill a whole
        container as a runtime does (an OOM kill of the cgroup, a node going away), use `kill_tree`.
        """
        for run in list(self.runs.values()):
            if run.name == pod_name:
                return {name: proc.popen.pid for name, proc in list(run.procs.items()) if proc.popen.poll() is None}
        return {}

    def close(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL), remove the node unless kept, and the work dir if ours."""
        for run in self.runs.values():
            self._kill(run, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for run in self.runs.values():
            for proc in run.procs.values():
                try:
                    proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self._kill(run, signal.SIGKILL)
                    proc.popen.wait()
        self.runs.clear()
        if self.register_node and not self.keep_node:
            try:
                self.kube.request("DELETE", f"/api/v1/nodes/{self.node_name}")
            except KubeError as err:
                if err.status != 404:
                    log.warning("could not delete node %s: %s", self.node_name, err)
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.e2e.podrunner",
        description="Run the training pods of a namespace as local processes (a stand-in kubelet).",
    )
    parser.add_argument("--namespace", "-n", required=True, help="namespace of the pods")
    parser.add_argument("--selector", "-l", default="finetune.dev/job",
                        help="label selector of the pods to run (default: finetune.dev/job)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")
    parser.add_argument("--workdir", help="where pod directories and logs go (default: a new temporary dir, kept)")
    parser.add_argument("--pvc-root", help="local directory standing in for PVCs, one subdirectory per claim")
    parser.add_argument("--node-name", default=NODE_NAME, help=f"node to register and bind to (default {NODE_NAME})")
    parser.add_argument("--no-register-node", action="store_true",
                        help="do not create the Node object (pods are still bound to --node-name)")
    parser.add_argument("--keep-node", action="store_true", help="leave the Node object on exit")
    parser.add_argument("--gpu-resource", action="append", default=None,
                        help="extended resource that counts as a GPU (repeatable; default nvidia.com/gpu)")
    parser.add_argument("--use-gpus", action="store_true",
                        help="let processes see this machine's GPUs instead of forcing CPU")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for every process, over the pod's (repeatable)")
    parser.add_argument("--exit-after", type=int, default=0, metavar="N",
                        help="exit once N matching pods have finished (0: run until interrupted)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between passes (default 1)")
    parser.add_argument("--quiet", action="store_true", help="do not echo the containers' output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s podrunner %(message)s")
    extra = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not _ENV_NAME.match(name):
            parser.error(f"--env {item!r}: expected NAME=VALUE")
        extra[name] = value
    runner = PodRunner(
        Kube.from_kubeconfig(args.kubeconfig, args.context),
        args.namespace,
        args.selector,
        workdir=args.workdir or tempfile.mkdtemp(prefix="ft-podrunner-"),
        pvc_root=args.pvc_root,
        node_name=args.node_name,
        gpu_resources=args.gpu_resource or DEFAULT_GPU_RESOURCES,
        use_gpus=args.use_gpus,
        register_node=not args.no_register_node,
        keep_node=args.keep_node,
        extra_env=extra,
        echo=None if args.quiet else sys.stderr,
    )
    log.info("running pods %r of namespace %s; work dir %s", args.selector, args.namespace, runner.workdir)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        runner.run(lambda: stop.is_set() or (args.exit_after > 0 and len(runner.finished) >= args.exit_after),
                   interval=args.interval)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        runner.close()
    failed = sorted(name for name, phase in runner.finished.items() if phase == "Failed")
    log.info("finished pods: %s", json.dumps(runner.finished, sort_keys=True))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
