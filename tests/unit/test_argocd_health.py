"""The Argo CD health check (`charts/finetune-operator/argocd/health.lua`) against sample statuses.

Argo CD runs health scripts in gopher-lua, a Lua 5.1; the tests run the script in Lua 5.1 through
`lupa` the way Argo CD does: the object as the global `obj`, the script's return value as the health.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lupa.lua51 as lua51
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "charts" / "finetune-operator" / "argocd" / "health.lua"
README = SCRIPT.parents[1] / "README.md"
T = "2026-01-01T00:00:00Z"


def health(obj: dict[str, Any]) -> tuple[str, str]:
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(SCRIPT.read_text())
    return result["status"], result["message"]


def ftj(status: dict[str, Any] | None, generation: int = 1) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "run", "namespace": "ml", "generation": generation},
        "spec": {},
    }
    if status is not None:
        obj["status"] = status
    return obj


def cond(type_: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": T}


VALID = cond("Valid", "True", "SpecValid")


@pytest.mark.parametrize(
    ("status", "expected", "message"),
    [
        (None, "Progressing", "Waiting for the operator to pick up the FineTuneJob"),
        ({}, "Progressing", "Waiting for the operator to pick up the FineTuneJob"),
        (
            {"phase": "Pending", "observedGeneration": 1, "conditions": [VALID, cond("Planned", "True", "Planned", "7B lora -> 1x24GiB")]},
            "Progressing",
            "Pending: 7B lora -> 1x24GiB",
        ),
        ({"phase": "Pending", "observedGeneration": 1}, "Progressing", "Pending: creating the training workload"),
        (
            {"phase": "Queued", "observedGeneration": 1, "conditions": [VALID, cond("Running", "False", "Queued", "waiting for Kueue admission in team-a")]},
            "Progressing",
            "Queued: waiting for Kueue admission in team-a",
        ),
        (
            {"phase": "Running", "observedGeneration": 1, "conditions": [VALID], "progress": {"summary": "45% 450/1000"}},
            "Progressing",
            "Training: 45% 450/1000",
        ),
        (
            {"phase": "Running", "observedGeneration": 1, "conditions": [VALID, cond("Running", "True", "PodsRunning", "2/2 pods running")]},
            "Progressing",
            "2/2 pods running",
        ),
        (
            {"phase": "Succeeded", "observedGeneration": 1, "conditions": [VALID, cond("Complete", "True", "Succeeded", "model at s3://b/run/model/")]},
            "Healthy",
            "model at s3://b/run/model/",
        ),
        ({"phase": "Succeeded", "observedGeneration": 1}, "Healthy", "Fine-tuning complete"),
        (
            {"phase": "Failed", "observedGeneration": 1, "conditions": [VALID, cond("Failed", "True", "GatesFailed", "gate accuracy >= 0.8 missed: 0.71")]},
            "Degraded",
            "gate accuracy >= 0.8 missed: 0.71",
        ),
        ({"phase": "Failed", "observedGeneration": 1, "conditions": []}, "Degraded", "Fine-tuning failed"),
        (
            {"phase": "Pending", "observedGeneration": 1, "conditions": [cond("Valid", "False", "InvalidSpec", "spec.dataset.train: unsupported URI")]},
            "Degraded",
            "spec.dataset.train: unsupported URI",
        ),
        (
            {"phase": "Suspended", "observedGeneration": 1, "conditions": [VALID, cond("Suspended", "True", "Suspended", "suspended at step 300")]},
            "Suspended",
            "suspended at step 300",
        ),
        ({"phase": "Suspended", "observedGeneration": 1}, "Suspended", "Suspended (spec.suspend is true)"),
        ({"phase": "Exploded", "observedGeneration": 1}, "Unknown", "Unknown phase Exploded"),
    ],
)
def test_health(status: dict[str, Any] | None, expected: str, message: str) -> None:
    assert health(ftj(status)) == (expected, message)


def test_stale_observed_generation_is_progressing() -> None:
    """After `suspend` is toggled the status still describes the old generation: not Healthy/Degraded yet."""
    stale = {"phase": "Failed", "observedGeneration": 1, "conditions": [cond("Failed", "True", "BackoffLimitExceeded")]}
    assert health(ftj(stale, generation=2)) == (
        "Progressing",
        "Waiting for the operator to observe generation 2 (status is for generation 1)",
    )
    # The same status for the current generation is judged normally.
    assert health(ftj(stale, generation=1))[0] == "Degraded"


def test_status_without_observed_generation_is_judged_by_phase() -> None:
    assert health(ftj({"phase": "Succeeded"}, generation=3))[0] == "Healthy"


def test_readme_documents_the_customization_key() -> None:
    text = README.read_text()
    assert "resource.customizations.health.finetune.dev_FineTuneJob" in text
    assert "argocd/health.lua" in text
