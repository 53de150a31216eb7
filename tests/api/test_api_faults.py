"""The operator against an API server that misbehaves: scripted faults under kmock (`tests.api.faults`).

For every fault: the operator does not crash (KopfRunner exits cleanly, no exception), no child is
duplicated (exactly one ConfigMap, Service and Job per FineTuneJob), and once the fault clears the job
reaches the phase it should have. Faults only hit the operator's requests; the test's own requests (it
plays kubectl and the cluster's controllers) are served normally.

What the clients do (kopf's for its watches, the operator's own `finetune_operator.kube`
for everything the handlers read and write) and what the operator adds:

- 429/5xx: both clients retry each request (`networking.error_backoffs`, 1, 1, 2, 3, 5, 8, 13, 21 s);
  a longer `Retry-After` is honoured on a 429 (kopf's client and the operator's) and on a 503 (the
  operator's; kopf's keeps its own backoff there);
  a request that still fails ends the pass with a TemporaryError (retried by the status refresher one
  interval later);
- a create whose answer was lost is retried and meets its own object (409): the operator reads
  it, recognises its owner uid and adopts it, never a second copy;
- 409/422 on a patch fail the pass; the next pass (the refresher's retry) patches again;
- 404 on the status write: the FineTuneJob was deleted mid-pass; the pass ends quietly and nothing is
  recreated (children already created go with their owner through garbage collection);
- a watch that ends with `410 Gone` makes kopf re-list the resource; a watch that stalls is dropped after
  `watching.inactivity_timeout` of silence and re-opened (kopf's default, 70 s, is above the API server's
  60 s bookmark period; these tests set 1 s).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kopf
import pytest

from finetune_operator import render
from tests.api.conftest import FTJ, Cluster, Fault, ftj_manifest, operator, wait_for

CHILDREN = ("v1/configmaps", "v1/services", "batch/v1/jobs")


def status(cluster: Cluster, name: str = "demo") -> dict[str, Any]:
    return dict((cluster.get(FTJ, name) or {}).get("status") or {})


def phase(cluster: Cluster, name: str = "demo") -> str | None:
    return status(cluster, name).get("phase")


def reaches(cluster: Cluster, want: str, name: str = "demo") -> dict[str, Any]:
    return wait_for(lambda: (st := status(cluster, name)).get("phase") == want and st, f"{name} {want}")


def condition(cluster: Cluster, type_: str, name: str = "demo") -> dict[str, Any]:
    return next(c for c in status(cluster, name).get("conditions") or [] if c["type"] == type_)


def children(cluster: Cluster, name: str = "demo") -> list[int]:
    """How many of each child (ConfigMap, Service, Job) carry the job's label or name."""
    counts = []
    for resource in CHILDREN:
        objs = cluster.list(resource)
        counts.append(sum(1 for o in objs if (o["metadata"].get("labels") or {}).get(render.LABEL_JOB) == name))
    return counts


def start_pod(cluster: Cluster, name: str = "demo") -> None:
    cluster.patch("batch/v1/jobs", name, {"status": {"active": 1, "ready": 1, "startTime": "2026-01-01T00:00:00Z"}},
                  sub="status")


def calls(cluster: Cluster, verb: str, plural: str, sub: str | None = None) -> int:
    return sum(1 for c in cluster.chaos.calls() if c.verb == verb and c.plural == plural and c.subresource == sub)


@pytest.fixture
def fast_watch() -> Iterator[kopf.OperatorSettings]:
    """kopf settings with a 1 s watch inactivity timeout (the operator keeps kopf's 70 s)."""
    settings = kopf.OperatorSettings()
    settings.watching.inactivity_timeout = 1.0
    yield settings


# --------------------------------------------------------------------------------------------------


def test_lost_create_answers_are_adopted_never_duplicated(cluster: Cluster) -> None:
    # Each child's create is stored, but the operator only ever sees a 500: its retry meets a 409.
    faults = cluster.inject(*(Fault("create", plural, status=500, effect="lose-answer")
                              for plural in ("configmaps", "services", "jobs")))
    with operator():
        cluster.create(FTJ, ftj_manifest())
        reaches(cluster, "Pending")
        created = condition(cluster, "Created")
        assert created["status"] == "True" and created["reason"] == "AdoptedChildren", created
        assert all(f.hits == 1 for f in faults)
        # Two POSTs per child (the lost one and the retry that met the object), one object each.
        assert [calls(cluster, "create", p) for p in ("configmaps", "services", "jobs")] == [2, 2, 2]
        assert children(cluster) == [1, 1, 1]
        start_pod(cluster)
        reaches(cluster, "Running")
    assert children(cluster) == [1, 1, 1]


def test_throttling_and_server_errors_are_retried(cluster: Cluster) -> None:
    faults = cluster.inject(
        Fault("create", "jobs", status=429, retry_after=2),
        Fault("create", "configmaps", status=500, times=2),  # a first pass creates without reading first
        Fault("update", "finetunejobs", subresource="status", status=503, retry_after=1),
        Fault("list", "pods", status=503),
    )
    with operator() as runner:
        cluster.create(FTJ, ftj_manifest())
        reaches(cluster, "Pending")
        assert [f.hits for f in faults] == [1, 2, 1, 1]
        assert children(cluster) == [1, 1, 1]
        assert calls(cluster, "create", "jobs") == 2
        start_pod(cluster)
        reaches(cluster, "Running")
    # The operator's client waited the server's Retry-After (2 s) instead of its first backoff (1 s).
    assert "honouring the server's Retry-After of 2s instead of the backoff of 1s" in runner.output
    assert "failed with an exception" not in runner.output


def test_refused_patches_are_retried_until_they_apply(cluster: Cluster) -> None:
    faults = cluster.inject(
        Fault("update", "finetunejobs", subresource="status", status=409),
        Fault("update", "finetunejobs", subresource="status", status=422),
        Fault("update", "jobs", name="demo", status=409),  # the suspend patch
        Fault("update", "jobs", name="demo", status=422),
    )
    with operator():
        cluster.create(FTJ, ftj_manifest())
        reaches(cluster, "Pending")
        cluster.patch(FTJ, "demo", {"spec": {"suspend": True}})
        wait_for(lambda: cluster.get("batch/v1/jobs", "demo")["spec"]["suspend"] is True, "the Job suspended")
        reaches(cluster, "Suspended")
        wait_for(lambda: [f.hits for f in faults] == [1, 1, 1, 1], "every refusal met")
        # The refused status writes were written again by later passes, which found the children the
        # first pass had created (and not recorded) and took them over by owner uid.
        assert condition(cluster, "Created")["reason"] == "AdoptedChildren"
        assert condition(cluster, "Suspended")["status"] == "True"
    assert children(cluster) == [1, 1, 1]


def test_deletion_in_the_middle_of_a_reconcile_ends_it_quietly(cluster: Cluster) -> None:
    # The first status write of `demo` finds it gone: deleted after the pass read it.
    (fault,) = cluster.inject(Fault("update", "finetunejobs", name="demo", subresource="status",
                                    effect="delete-first"))
    with operator() as runner:
        cluster.create(FTJ, ftj_manifest())
        wait_for(lambda: fault.hits == 1, "the status write of a deleted job")
        wait_for(lambda: cluster.get(FTJ, "demo") is None, "demo deleted")  # the fault deletes, then serves
        # What the pass created before it met the 404 belongs to a gone owner: garbage collection removes it.
        wait_for(lambda: cluster.collect_garbage() or children(cluster) == [0, 0, 0], "children collected")

        cluster.create(FTJ, ftj_manifest("marker", uid=None))  # a later job proves the loop went on
        reaches(cluster, "Pending", "marker")
        assert children(cluster, "marker") == [1, 1, 1]
    assert children(cluster) == [0, 0, 0]  # never recreated for the deleted job
    assert "failed temporarily" not in runner.output  # a deletion is not an error
    assert "failed with an exception" not in runner.output


def test_expired_watch_makes_kopf_relist(cluster: Cluster) -> None:
    with operator():
        cluster.create(FTJ, ftj_manifest("first", uid=None))
        reaches(cluster, "Pending", "first")
        lists = calls(cluster, "list", "finetunejobs")
        # The next FineTuneJob event on the open watch is replaced by ERROR 410 Gone: the ADDED event of
        # `second` never arrives on that stream.
        cluster.chaos.expire_watches("finetunejobs")
        cluster.create(FTJ, ftj_manifest("second", uid=None))
        reaches(cluster, "Pending", "second")
        assert calls(cluster, "list", "finetunejobs") > lists  # kopf listed again after the 410
    assert children(cluster, "first") == [1, 1, 1] and children(cluster, "second") == [1, 1, 1]


def test_stalled_watch_is_reopened(cluster: Cluster, fast_watch: kopf.OperatorSettings) -> None:
    # The first FineTuneJob watch gets its headers and then nothing, on a connection that stays open.
    (stall,) = cluster.inject(Fault("watch", "finetunejobs", effect="stall"))
    with operator(settings=fast_watch):
        wait_for(lambda: stall.hits == 1, "the stalled watch")
        cluster.create(FTJ, ftj_manifest())  # its ADDED event goes nowhere until the watch is re-opened
        reaches(cluster, "Pending")
        assert calls(cluster, "watch", "finetunejobs") >= 2
        start_pod(cluster)
        reaches(cluster, "Running")
    assert children(cluster) == [1, 1, 1]
