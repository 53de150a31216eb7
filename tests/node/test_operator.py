"""The operator as the chart's Deployment on a real node: from the image `make images` built, with in-cluster
credentials (its ServiceAccount token, through the `kubernetes` Service), its liveness probe passing, and its
Prometheus metrics scraped from inside the cluster through the chart's metrics Service."""

from __future__ import annotations

import json

from tests.node.conftest import OPERATOR_IMAGE, OPERATOR_NAMESPACE, RELEASE, Installed, wait_for


def test_operator_runs_from_its_image_as_the_chart_s_deployment(installed: Installed) -> None:
    cluster = installed.cluster
    (pod,) = cluster.pods(OPERATOR_NAMESPACE, f"app.kubernetes.io/instance={RELEASE}")
    (status,) = pod["status"]["containerStatuses"]
    assert pod["spec"]["containers"][0]["image"] == OPERATOR_IMAGE
    # The image the container runs is the one `make images` built and the node loaded, not a namesake.
    assert status["imageID"].rsplit("@", 1)[-1] == cluster.image_ids[OPERATOR_IMAGE], \
        (status["imageID"], cluster.image_ids[OPERATOR_IMAGE])
    assert status["ready"] and status["restartCount"] == 0, json.dumps(status, indent=1)
    # The liveness probe is the chart's, and the kubelet has been calling it (no restarts, ready).
    probe = pod["spec"]["containers"][0]["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    # In-cluster credentials: the projected ServiceAccount token, no kubeconfig; the operator lists and
    # watches FineTuneJobs with it (kopf logs a refusal as a permission warning).
    assert pod["spec"]["serviceAccountName"] == RELEASE
    log = cluster.logs(OPERATOR_NAMESPACE, pod["metadata"]["name"])
    assert "forbidden" not in log.lower() and "unauthorized" not in log.lower(), log[-3000:]


def test_metrics_are_scraped_from_inside_the_cluster(installed: Installed) -> None:
    """A pod in the cluster fetches /metrics through the chart's metrics Service, as Prometheus would."""
    cluster = installed.cluster
    services = cluster.get("services", "-n", OPERATOR_NAMESPACE, "-l", f"app.kubernetes.io/instance={RELEASE}")
    (service,) = [s for s in services["items"] if any(p["name"] == "metrics" for p in s["spec"]["ports"])]
    (port,) = [p["port"] for p in service["spec"]["ports"] if p["name"] == "metrics"]
    url = f"http://{service['metadata']['name']}.{OPERATOR_NAMESPACE}.svc.cluster.local:{port}/metrics"
    script = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=10).read().decode())"
    cluster.kubectl("-n", OPERATOR_NAMESPACE, "run", "metrics-scrape", f"--image={OPERATOR_IMAGE}",
                    "--restart=Never", "--command", "--", "python", "-c", script)
    try:
        def finished() -> str | None:
            pod = cluster.get("pod", "-n", OPERATOR_NAMESPACE, "metrics-scrape") or {}
            return pod.get("status", {}).get("phase") if pod.get("status", {}).get("phase") in (
                "Succeeded", "Failed") else None

        phase = wait_for("the scrape pod to finish", finished, timeout=120)
        text = cluster.logs(OPERATOR_NAMESPACE, "metrics-scrape")
        assert phase == "Succeeded", text
        assert "# TYPE" in text and "finetune" in text, text[:2000]
    finally:
        cluster.kubectl("-n", OPERATOR_NAMESPACE, "delete", "pod", "metrics-scrape", "--wait=false", check=False)
