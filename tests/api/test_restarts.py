"""Operator restarts: killed at 20 random points while 50 FineTuneJobs reconcile, every job converges with
exactly one ConfigMap, Service and Job.

A kill is played at the API: the operator dies at its k-th request (`Chaos.kill_after`). That request takes
effect but its answer is lost (the worst moment: a child created, a status written, an event posted, and
the operator never learns it); every later request of the dying operator is refused (503, nothing
stored), so nothing it still does in memory reaches the cluster. Then its KopfRunner is stopped (it must
exit cleanly) and the next operator starts against the same emulator state.

The kill points come from a seeded RNG and alternate between two counts, so that they land both anywhere
and where it hurts:

- even kills: the k-th request of any kind (watches aside), k uniform in [1, R], R = the fewest requests
  the starting operator is certain to make (`startup_requests`: every job is reconciled once at start,
  and only running jobs are polled after that), so these kills spread over kopf's start-up and the
  handlers' passes. (Before the refresher polled every job every interval, R was a fixed 1000, the
  measured cost of a first full pass of 50 fresh jobs; an idle operator now makes almost no requests,
  so such a k would never come);
- odd kills: the k-th write (create or patch), k uniform in [1, W], W = the number of jobs whose status
  is behind their Job at that moment; each needs at least one write, so the kill is certain to come.

The 50 jobs arrive 5 per cycle over the first 10 cycles, so child creation happens throughout, and between
kills the test plays the Job controller and kubelet on the Jobs that exist (pods start; Jobs complete or
fail), so every operator has transitions to write and to be killed in the middle of.

Checked after every kill (the state the dead operator left): at most one child of each kind per job, each
controlled by its own FineTuneJob's uid, and no phase ahead of what the Job implies. At the end one
operator runs undisturbed: every job reaches the phase its Job implies with exactly one of each child,
and every job's final-phase event was posted exactly once, although kills fall between event posts and
status writes (events are posted first, under names derived from the status they leave, so a repeated
pass's posts are refused as repeats). A summary line (`-s`) gives the figures.

Stopping a killed operator is bounded and measured. kopf's `queueing.exit_timeout` (how long a stopping
kopf lets queued events be processed, 2 s by default) is 0.1 s: a killed operator has nothing to finish.
Its request retries (`networking.error_backoffs`, 1 to 21 s, 54 s in all by default) are cut to 0.1-0.4 s:
every answer after the kill is a 503, so retrying can only delay the stop (kopf waits up to 5 s for such
tasks, then cancels them). The stop must take under STOP_TIMEOUT; the longest one is in the summary line.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Any

import kopf

from finetune_operator import render
from tests.api.conftest import FTJ, Cluster, ftj_manifest, operator, wait_for

JOBS = 50
KILLS = 20
BATCH = 5
SEED = 20260601
#: Seconds a killed operator may take to stop (measured: 0.05-5.5 s; the 5 s is kopf's grace for tasks
#: still running, when the kill falls in its start-up).
STOP_TIMEOUT = 30
CHILDREN = ("v1/configmaps", "v1/services", "batch/v1/jobs")
#: What the status may say while the Jobs imply a phase (it may lag behind them, never run ahead).
ALLOWED = {
    "Pending": {None, "Pending"},
    "Running": {None, "Pending", "Running"},
    "Succeeded": {None, "Pending", "Running", "Succeeded"},
    "Failed": {None, "Pending", "Running", "Failed"},
}
FINAL_EVENT = {"Pending": "Starting", "Running": "Running", "Succeeded": "TrainingSucceeded",
               "Failed": "BackoffLimitExceeded"}


def by_job(cluster: Cluster, resource: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for obj in cluster.list(resource):
        out.setdefault((obj["metadata"].get("labels") or {}).get(render.LABEL_JOB, "?"), []).append(obj)
    return out


def check_children(cluster: Cluster, uids: dict[str, str], *, exactly_one: bool) -> None:
    for resource in CHILDREN:
        found = by_job(cluster, resource)
        assert set(found) <= set(uids), (resource, set(found) - set(uids))
        for name in uids:
            objs = found.get(name, [])
            assert len(objs) == 1 if exactly_one else len(objs) <= 1, (resource, name, len(objs))
            for obj in objs:
                (owner,) = obj["metadata"]["ownerReferences"]
                assert owner["uid"] == uids[name] and owner["controller"] is True, (resource, name, owner)


def phases(cluster: Cluster) -> dict[str, str | None]:
    return {o["metadata"]["name"]: (o.get("status") or {}).get("phase") for o in cluster.list(FTJ)}


def startup_requests(seen: dict[str, str | None]) -> int:
    """The fewest requests (watches aside) an operator starting now makes: it reconciles every FineTuneJob
    once (on create or resume): one read of it; for a job without a status also its three children's
    reads, the pod list and the first status write; for one in progress the reads and the pod list; for a
    finished one nothing more."""
    cost = {None: 6, "Pending": 5, "Running": 5, "Succeeded": 1, "Failed": 1}
    return sum(cost[phase] for phase in seen.values())


def play_controllers(cluster: Cluster, rng: random.Random, expected: dict[str, str]) -> None:
    """Move some Jobs along: Pending -> Running (a pod runs), Running -> Succeeded or Failed."""
    jobs = {o["metadata"]["name"] for o in cluster.list("batch/v1/jobs")}
    for name in sorted(jobs):
        if rng.random() >= 0.3:
            continue
        if expected[name] == "Pending":
            status: dict[str, Any] = {"active": 1, "ready": 1, "startTime": "2026-01-01T00:00:00Z"}
            expected[name] = "Running"
        elif expected[name] == "Running":
            ok = rng.random() < 0.7
            cond = {"type": "Complete" if ok else "Failed", "status": "True",
                    "reason": "CompletionsReached" if ok else "BackoffLimitExceeded",
                    "lastTransitionTime": "2026-01-01T01:00:00Z"}
            status = {"conditions": [cond], "active": 0, "ready": 0, **({"succeeded": 1} if ok else {"failed": 1})}
            expected[name] = "Succeeded" if ok else "Failed"
        else:
            continue
        cluster.patch("batch/v1/jobs", name, {"status": status}, sub="status")


def test_killed_at_random_points_every_job_converges(cluster: Cluster) -> None:
    rng = random.Random(SEED)
    settings = kopf.OperatorSettings()
    settings.queueing.exit_timeout = 0.1
    settings.networking.error_backoffs = (0.1, 0.2, 0.4)
    uids: dict[str, str] = {}
    expected: dict[str, str] = {}
    kills: list[tuple[str, int, str]] = []
    stops: list[float] = []

    for cycle in range(KILLS):
        for i in range(len(uids), min(JOBS, len(uids) + BATCH)):
            name = f"ftj-{i:02d}"
            uids[name] = cluster.create(FTJ, ftj_manifest(name, uid=None))["metadata"]["uid"]
            expected[name] = "Pending"
        behind = sum(1 for name, seen in phases(cluster).items() if seen != expected[name])
        writes = cycle % 2 == 1 and behind > 0
        k = rng.randint(1, behind if writes else startup_requests(phases(cluster)))
        cluster.chaos.kill_after(k, writes_only=writes)
        with operator(settings=settings, stop_timeout=STOP_TIMEOUT):  # asserts a clean exit after the kill
            assert cluster.chaos.killed.wait(120), f"the operator made fewer than {k} requests"
            killed_at = time.monotonic()
        stops.append(time.monotonic() - killed_at)
        kills.append(("write" if writes else "request", k, str(cluster.chaos.kill_call)))
        cluster.chaos.revive()

        check_children(cluster, uids, exactly_one=False)
        for name, seen in phases(cluster).items():
            assert seen in ALLOWED[expected[name]], (name, seen, expected[name])
        play_controllers(cluster, rng, expected)
    assert len(uids) == JOBS

    with operator(settings=settings):
        wait_for(lambda: phases(cluster) == expected, "every job in the phase its Job implies", timeout=120,
                 interval=0.5)
    check_children(cluster, uids, exactly_one=True)

    events = Counter((e["involvedObject"]["name"], e["type"], e["reason"]) for e in cluster.list("v1/events"))
    twice = {key: n for key, n in events.items() if n > 1}
    assert not twice, twice
    lost = [n for n in uids if not any(key[0] == n and key[2] == FINAL_EVENT[expected[n]] for key in events)]
    assert not lost, lost
    at = Counter(" ".join(call.split()[:2]) for _, _, call in kills)
    print(f"\nrestarts: {len(kills)} kills ({sum(1 for m, _, _ in kills if m == 'write')} at a write), "
          f"{JOBS} jobs; converged {JOBS}/{JOBS} with exactly one ConfigMap/Service/Job each; final phases "
          f"{dict(Counter(expected.values()))}; final-phase events lost to kills: {len(lost)}, duplicated: 0; "
          f"killed at: {dict(at)}; k: {[(m[0], k) for m, k, _ in kills]}; stop after kill: median "
          f"{sorted(stops)[len(stops) // 2]:.2f} s, max {max(stops):.2f} s")
