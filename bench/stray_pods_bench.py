"""Stray training pods: the operator's memory when pods are labelled `finetune.dev/job=<random names>` and no
such FineTuneJob exists (anyone who may create pods in a namespace can label them so).

The operator's pod handler (`finetune_operator.handlers.on_pod_event`) is fed directly, in this process, the
events the pod watch would deliver: for each of `-n` pods (default 5,000) with a random job name, spread
over 50 namespaces, an ADDED and a MODIFIED event (the pods stay Pending: no node runs them). Its API
client is a stub that answers every read with 404, as the API server does for a FineTuneJob that does not
exist, and counts the requests. Two rounds of `-n` fresh pods each:

1. without tracing: the process's resident memory (VmRSS) before and after, and the per-job state the
   operator keeps (`Runtime.jobs` JobStates, `Runtime.locks`);
2. with tracemalloc: the Python heap the round left allocated (after a garbage collection), which RSS
   only shows coarsely (freed memory is not always returned to the OS).

`--handlers-ref REF` runs the handler module as it is at git revision REF instead (e.g. the commit before
the fix, for the before/after figure); the rest of the package is the working tree's.

Figures, one `name=value` line each: `stray_pods`, `stray_pod_events`, `api_requests`,
`job_states_after_round1`/`_round2`, `locks_after_round2`, `rss_before_mb`, `rss_after_mb`,
`rss_growth_mb`, `heap_growth_kib` (round 2), `heap_per_pod_bytes`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import logging
import subprocess
import sys
import tracemalloc
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def handlers_module(ref: str | None) -> ModuleType:
    if ref is None:
        from finetune_operator import handlers

        return handlers
    source = subprocess.run(["git", "show", f"{ref}:operator/finetune_operator/handlers.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("finetune_operator.handlers_at_ref", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    exec(compile(source, f"{ref}:handlers.py", "exec"), module.__dict__)
    return module


class StubApi:
    """Every object is missing (404 -> None), every request counted."""

    def __init__(self) -> None:
        self.requests = 0

    async def get(self, url: str) -> None:
        self.requests += 1
        return None

    async def list(self, url: str, **_: Any) -> list[Any]:
        self.requests += 1
        return []


def pod_body(job: str, namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{job}-0-{uuid.uuid4().hex[:5]}", "namespace": namespace, "uid": str(uuid.uuid4()),
                         "labels": {"finetune.dev/job": job, "app.kubernetes.io/component": "trainer"}},
            "status": {"phase": "Pending"}}


async def feed(handlers: ModuleType, memo: Any, n: int) -> int:
    import kopf

    log = logging.getLogger("stray-pods")
    events = 0
    for i in range(n):
        body = kopf.Body(pod_body(f"stray-{uuid.uuid4().hex[:10]}", f"tenant-{i % 50}"))
        for type_ in ("ADDED", "MODIFIED"):
            await handlers.on_pod_event(type=type_, body=body, memo=memo, logger=log)
            events += 1
    return events


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=5000, help="stray pods per round (default 5000)")
    parser.add_argument("--handlers-ref", help="git revision whose handlers.py to run (default: the working tree)")
    args = parser.parse_args()

    import kopf

    from finetune_operator.metrics import Metrics
    from finetune_operator.progress import ReportReader
    from finetune_operator.settings import OperatorSettings

    logging.basicConfig(level=logging.ERROR)
    handlers = handlers_module(args.handlers_ref)
    api = StubApi()
    rt = handlers.Runtime(settings=OperatorSettings.from_env({}), kopf_settings=kopf.OperatorSettings(),
                          reader=ReportReader(), metrics=Metrics(), interval=10.0, kube=api)
    memo = kopf.Memo()
    memo.finetune = rt

    async def run() -> dict[str, str]:
        out: dict[str, str] = {}
        await feed(handlers, memo, 50)  # warm-up: imports, first allocations of kopf's Body views
        rt.jobs.clear()
        rt.locks.clear()
        api.requests = 0
        gc.collect()
        before = rss_kib()
        events = await feed(handlers, memo, args.n)
        gc.collect()
        after = rss_kib()
        out["job_states_after_round1"] = str(len(rt.jobs))
        tracemalloc.start()
        gc.collect()
        heap0 = tracemalloc.get_traced_memory()[0]
        events += await feed(handlers, memo, args.n)
        gc.collect()
        heap1 = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        out.update({
            "stray_pods": str(2 * args.n), "stray_pod_events": str(events), "api_requests": str(api.requests),
            "job_states_after_round2": str(len(rt.jobs)), "locks_after_round2": str(len(rt.locks)),
            "rss_before_mb": f"{before / 1024:.1f}", "rss_after_mb": f"{after / 1024:.1f}",
            "rss_growth_mb": f"{(after - before) / 1024:.1f}", "heap_growth_kib": f"{(heap1 - heap0) / 1024:.1f}",
            "heap_per_pod_bytes": f"{(heap1 - heap0) / args.n:.0f}",
        })
        return out

    figures = asyncio.run(run())
    print(f"# handlers: {args.handlers_ref or 'working tree'}; {args.n} stray pods per round, 2 rounds")
    for key in ("stray_pods", "stray_pod_events", "api_requests", "job_states_after_round1",
                "job_states_after_round2", "locks_after_round2", "rss_before_mb", "rss_after_mb", "rss_growth_mb",
                "heap_growth_kib", "heap_per_pod_bytes"):
        print(f"{key}={figures[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
