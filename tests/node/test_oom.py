"""A training container over its memory limit on a real node: the kernel's OOM killer ends it, the kubelet
records `OOMKilled`, and the operator's out-of-memory ladder (`finetune_operator.oomkill`) starts the
replacement pod one rung lower, which succeeds with the adjustment in status.

The limit is the one the operator renders: twice the memory request (FT_MEMORY_LIMIT_FACTOR), here
`spec.resources.memory: 1Gi` -> 2Gi. The tiny model's memory barely depends on the micro-batch, so the job
runs the test image (`oom-image/`: the trainer plus a hook that, above micro-batch 2, allocates memory until
the limit): the 4 x 1 rung outgrows the limit, 2 x 2 does not. The kill, its reason and everything after it
are the node's and the operator's own. The chart's default FineTunePolicy allows only the trainer image, so
the namespace selects a policy of this test's that also lists the test image (`finetune.dev/policy`).
"""

from __future__ import annotations

import json

from finetune_operator import contract, oomkill, policy
from tests.node.conftest import OOM_IMAGE, Installed, diagnose, tiny_manifest, wait_for, wait_phase

NAMESPACE = "ml-oom"
NAME = "oom-killed"
REQUEST, LIMIT = "1Gi", "2Gi"
POLICY = "oom-test"


def test_an_oom_killed_pod_is_followed_by_one_a_rung_lower(installed: Installed) -> None:
    cluster = installed.cluster
    cluster.kubectl("create", "namespace", NAMESPACE)
    cluster.kubectl("label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=restricted")
    (installed.workdir / "s3.env").write_text("".join(f"{k}={v}\n" for k, v in installed.s3_env.items()))
    cluster.kubectl("-n", NAMESPACE, "create", "secret", "generic", "s3-credentials", "--from-env-file=s3.env",
                    cwd=installed.workdir)
    cluster.apply({"apiVersion": "finetune.dev/v1alpha1", "kind": policy.KIND, "metadata": {"name": POLICY},
                   "spec": {"images": [OOM_IMAGE]}}, NAMESPACE)
    cluster.kubectl("label", "namespace", NAMESPACE, f"{policy.NAMESPACE_LABEL}={POLICY}")
    manifest = tiny_manifest(NAME, maxSteps=8, batchSize=4, gradientAccumulationSteps=1)
    manifest["spec"]["image"] = OOM_IMAGE
    manifest["spec"]["resources"] = {"memory": REQUEST}
    manifest["spec"]["backoffLimit"] = 1  # the replacement pod
    # The API server applies a new parameter and label after its informers see them (about a second).
    wait_for("the test's FineTunePolicy admitting the test image", lambda: cluster.kubectl(
        "-n", NAMESPACE, "apply", "-f", "-", input=json.dumps(manifest), check=False).returncode == 0, timeout=60)
    try:
        obj = wait_phase(cluster, NAME, namespace=NAMESPACE)
        status = obj["status"]
        assert status["phase"] == "Succeeded", diagnose(cluster, NAME, NAMESPACE)

        pods = cluster.pods(NAMESPACE, f"finetune.dev/job={NAME},app.kubernetes.io/component=trainer")
        assert all(p["spec"]["containers"][0]["resources"]["limits"]["memory"] == LIMIT for p in pods)
        killed = [p for p in pods if oomkill.killed_container(p, "trainer")]
        assert len(killed) == 1 and len(pods) == 2, [(p["metadata"]["name"], p["status"]) for p in pods]
        (term,) = [cs["state"]["terminated"] for cs in killed[0]["status"]["containerStatuses"]]
        assert term["reason"] == "OOMKilled", term  # the kubelet's word, from the kernel's kill
        killed_name = killed[0]["metadata"]["name"]

        # The operator's step down, in the ConfigMap the replacement pod mounted...
        cm = cluster.get("configmap", "-n", NAMESPACE, f"{NAME}-config")
        assert oomkill.ADJUSTED_AT_ANNOTATION in cm["metadata"]["annotations"]
        config = contract.TrainerConfig.model_validate_json(cm["data"][contract.CONFIG_KEY])
        assert [(a.by, a.from_.micro_batch, a.from_.grad_accum, a.to.micro_batch, a.to.grad_accum)
                for a in config.adjustments] == [("operator", 4, 1, 2, 2)]
        assert config.adjustments[0].reason == f"pod {killed_name} OOMKilled"
        # ...carried by the trainer into its report and so into the status,
        assert [(a["by"], a["to"]["microBatch"], a["to"]["gradAccum"]) for a in status.get("adjustments") or []] \
            == [("operator", 2, 2)], status.get("adjustments")
        # ...and told to whoever reads the events.
        events = wait_for("the OutOfMemory event", lambda: [
            e for e in cluster.get("events", "-n", NAMESPACE, "--field-selector", f"involvedObject.name={NAME}")
            ["items"] if e.get("reason") == "OutOfMemory"], timeout=60)
        assert killed_name in events[0]["message"] and "micro-batch 2 x 2" in events[0]["message"], \
            json.dumps(events, indent=1)
    finally:
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        cluster.kubectl("delete", "finetunepolicy", POLICY, "--wait=false", check=False)
