"""Bad manifests at the operator: every invalid FineTuneJob the CRD lets through, all at once, next to a
valid one.

The corpus (`tests/unit/invalid_corpus.py`) holds invalid FineTuneJobs with the field path each error
must name. The ones the CRD refuses (`tests/unit/admission.admit`: OpenAPI schema + CEL rules) never reach
the operator, and neither do the ones whose apiVersion or kind differ from the URL they are posted to
(the API server's decoder refuses those before any CRD validation). Every other case reaches the
operator, and must end with:

- phase Failed, a Warning event, and no child of any kind;
- a message naming the same field path as `finetune plan`, and equal to what `finetune plan` prints
  (`manifests.validate_document`), so a user sees the same words in `kubectl describe` and in CI;
- Valid=False/InvalidSpec, or, for a spec that is valid but cannot be sized (`sizing.plan` refuses it),
  Valid=True with Planned=False/PlanningFailed;

while the valid job, submitted last, gets its children and runs to Succeeded: a bad manifest never
stops the operator from serving the others.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from finetune_operator import render
from finetune_operator.manifests import validate_document
from finetune_operator.spec import FineTuneJob
from tests.api.conftest import FTJ, NAMESPACE, Cluster, operator, wait_for
from tests.unit.admission import admit
from tests.unit.invalid_corpus import CASES, Case, base_manifest

# Refused by the API server itself: the body's apiVersion/kind must match the endpoint's.
DECODER_REFUSED = {"apiVersion", "kind"}
CHILDREN = ("v1/configmaps", "v1/services", "batch/v1/jobs")


def reaching_the_operator() -> list[Case]:
    return [c for c in CASES if admit(c.manifest()).admitted and c.path not in DECODER_REFUSED]


def named(doc: dict[str, Any], name: str) -> dict[str, Any]:
    doc["metadata"]["name"] = name
    doc["metadata"]["namespace"] = NAMESPACE
    return doc


def expected_message(doc: dict[str, Any]) -> str:
    """What `finetune plan` says about this document: its issues, one per field, joined."""
    loaded = validate_document(doc)
    assert loaded.issues, "the case is valid for `finetune plan`"
    return "; ".join(str(issue) for issue in loaded.issues)


def model_accepts(doc: dict[str, Any]) -> bool:
    try:
        FineTuneJob.model_validate(doc)
    except ValidationError:
        return False
    return True


def cond(st: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in st.get("conditions") or [] if c["type"] == type_)


def test_every_invalid_manifest_fails_alone_and_the_valid_one_runs(cluster: Cluster) -> None:
    cases = reaching_the_operator()
    # The corpus filter is what it claims: the CRD refuses most cases, admits the rest.
    assert 20 <= len(cases) < len(CASES), [c.id for c in cases]
    docs = {f"bad-{c.id}"[:52]: named(c.manifest(), f"bad-{c.id}"[:52]) for c in cases}
    assert len(docs) == len(cases)
    valid = named(base_manifest(), "good")
    assert admit(valid).admitted and validate_document(valid).ok

    with operator() as runner:
        for doc in docs.values():
            cluster.create(FTJ, doc)
        cluster.create(FTJ, valid)

        # The valid one, submitted last, is served while the others fail.
        wait_for(lambda: cluster.get("batch/v1/jobs", "good"), "the valid job's Job")
        cluster.patch("batch/v1/jobs", "good", {"status": {"active": 1, "ready": 1,
                                                           "startTime": "2026-01-01T00:00:00Z"}}, sub="status")
        wait_for(lambda: (cluster.get(FTJ, "good").get("status") or {}).get("phase") == "Running", "good Running")
        done = {"type": "Complete", "status": "True", "reason": "CompletionsReached",
                "lastTransitionTime": "2026-01-01T01:00:00Z"}
        cluster.patch("batch/v1/jobs", "good", {"status": {"conditions": [done], "active": 0, "ready": 0,
                                                           "succeeded": 1}}, sub="status")
        wait_for(lambda: (cluster.get(FTJ, "good").get("status") or {}).get("phase") == "Succeeded", "good Succeeded")

        failed: dict[str, dict[str, Any]] = {}
        for name in docs:
            failed[name] = wait_for(
                lambda n=name: (st := cluster.get(FTJ, n).get("status") or {}).get("phase") == "Failed" and st,
                f"{name} Failed",
            )
        events = wait_for(
            lambda: (ev := cluster.list("v1/events"))
            and {e["involvedObject"]["name"] for e in ev if e["type"] == "Warning"} >= set(docs) and ev,
            "a Warning event for every invalid job",
        )

    planning = []
    for case, (name, doc) in zip(cases, docs.items(), strict=True):
        st = failed[name]
        want = expected_message(doc)
        assert case.path in want and case.fragment in want, (case.id, want)
        if cond(st, "Valid")["status"] == "False":
            valid_cond = cond(st, "Valid")
            assert valid_cond["reason"] == "InvalidSpec", (case.id, valid_cond)
            assert valid_cond["message"] == want, (case.id, valid_cond["message"], want)
            assert "Planned" not in {c["type"] for c in st["conditions"]}
            reason = "InvalidSpec"
        else:
            planned = cond(st, "Planned")
            assert planned["status"] == "False" and planned["reason"] == "PlanningFailed", (case.id, st)
            assert planned["message"] == want, (case.id, planned["message"], want)
            reason = "PlanningFailed"
            planning.append(case.id)
        failed_cond = cond(st, "Failed")
        assert failed_cond["status"] == "True" and failed_cond["reason"] == reason, (case.id, failed_cond)
        assert failed_cond["message"] == want
        assert "plan" not in st, case.id
        mine = [e for e in events if e["involvedObject"]["name"] == name]
        assert [(e["type"], e["reason"]) for e in mine] == [("Warning", reason)], (case.id, mine)
        assert case.path in mine[0]["message"], (case.id, mine[0]["message"])

    # PlanningFailed exactly for the specs the model accepts and sizing refuses (the corpus has two; the
    # unknown size only because this operator runs no pre-flight, which would read it from config.json).
    assert planning == [c.id for c in cases if model_accepts(c.manifest())], planning
    assert sorted(planning) == ["uneven-gpus", "unknown-size"]

    # No child of any kind for any invalid job; exactly one of each for the valid one.
    for resource in CHILDREN:
        owners = [o["metadata"]["ownerReferences"][0]["name"] for o in cluster.list(resource)]
        assert owners == ["good"], (resource, owners)
    assert len(cluster.list("v1/pods")) == 0
    labelled = cluster.list("batch/v1/jobs", f"{render.LABEL_JOB}=good")
    assert len(labelled) == 1
    # Invalid specs are outcomes, not errors: no handler failed or was retried.
    assert "failed with an exception" not in runner.output
    assert "failed temporarily" not in runner.output
