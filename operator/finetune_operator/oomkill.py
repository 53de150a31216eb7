"""A training pod out of memory (OOMKilled, or failed with `OutOfMemory`): the next pod starts one rung
down the out-of-memory ladder.

The trainer steps down in its own process when PyTorch raises `torch.OutOfMemoryError`
(`finetune_trainer.oom`). When the kernel's OOM killer ends the container instead (host memory: a
dataloader, a CPU offload, a QLoRA load), the process gets no chance to react; the kubelet records the
container as `terminated` with reason `OOMKilled` (exit code 137), and the Job controller starts a
replacement pod after its pod-failure backoff (10 s after the first failure, doubling). The operator sees
the pod in its watch and writes the next rung into the job's config snapshot (the ConfigMap's
`TrainerConfig.adjustments`), which the replacement pod mounts: it starts at that rung
(`TrainerConfig.start_rung`) and carries the adjustment into its report, `status.adjustments` and the
model card. The same goes for a trainer that failed with a retryable `OutOfMemory` (exit 1: an OOM after
its first checkpoint, or with several processes, where it does not step down in-process).

One incident, one step: every pod of a multi-node group may be OOMKilled by the same step, and the watch
may deliver a pod more than once (and again after an operator restart). A pod created before the last
adjustment (the ConfigMap's `ADJUSTED_AT_ANNOTATION`) ran with the config before it, so its kill belongs to
an incident already handled; an adjustment naming the pod is never made twice.

Pure: `decide` reads a pod, the config snapshot and the FineTuneJob's status; `handlers` does the I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from finetune_operator import contract
from finetune_operator.spec import Adjustment

#: On the config ConfigMap: when the operator last stepped the config down (RFC 3339, the pod's clock is
#: the API server's: both come from it).
ADJUSTED_AT_ANNOTATION = "finetune.dev/oom-adjusted-at"
OOM_KILLED = "OOMKilled"
#: The trainer's failure reason for an out-of-memory error (`finetune_trainer.errors.OutOfMemory`).
OUT_OF_MEMORY = "OutOfMemory"


def killed_container(pod: Mapping[str, Any], container: str) -> Mapping[str, Any] | None:
    """The `terminated` state of `container` when it ran out of memory in a way a lower rung can fix, else
    None: the kubelet says `OOMKilled`, or the trainer exited 1 saying `OutOfMemory:` (an OOM it could not
    step down from in-process: after the first checkpoint, or with several processes; its log tail is the
    termination message). The state comes back with `reason` set to which of the two it was. A final
    `OutOfMemory` (every rung tried) exits `EXIT_CONFIG_ERROR` and fails the Job at once: not this."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") != container:
            continue
        for where in ("state", "lastState"):
            term = (cs.get(where) or {}).get("terminated")
            if not term:
                continue
            if term.get("reason") == OOM_KILLED:
                return dict(term)
            if term.get("exitCode") == 1 and f"{OUT_OF_MEMORY}: " in str(term.get("message") or ""):
                return {**term, "reason": OUT_OF_MEMORY}
    return None


def config_map_name(pod: Mapping[str, Any]) -> str | None:
    """The ConfigMap the pod mounts its config snapshot from (the volume carrying `contract.CONFIG_KEY`)."""
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        source = volume.get("configMap") or {}
        if any(item.get("key") == contract.CONFIG_KEY for item in source.get("items") or []):
            return str(source.get("name")) if source.get("name") else None
    return None


@dataclass(frozen=True)
class Decision:
    """What to do about one OOMKilled pod: `adjustment` to append (None: nothing to write), and why."""

    adjustment: Adjustment | None
    message: str
    bottom: bool = False  # the ladder has no lower rung: the pod's retries will fail the same way


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def decide(pod: Mapping[str, Any], config: contract.TrainerConfig, *, adjusted_at: str | None,
           reported: Sequence[Adjustment] = (), step: int = 0, kind: str = OOM_KILLED) -> Decision | None:
    """The step down after `pod` was OOMKilled, or None when this kill needs nothing (already handled).

    `config`: the snapshot the ConfigMap holds now; `adjusted_at`: its `ADJUSTED_AT_ANNOTATION`;
    `reported`: status.adjustments (the trainer may have stepped down in-process before the kill, so the
    pod ran at the lower of the config's rung and the last reported one); `step`: status.progress.step;
    `kind`: `OOM_KILLED` or `OUT_OF_MEMORY` (`killed_container`'s reason).
    """
    meta = pod.get("metadata") or {}
    name = str(meta.get("name"))
    reason = f"pod {name} {kind}"
    if any(a.reason.startswith(f"pod {name} ") for a in config.adjustments):
        return None
    created, last = _time(meta.get("creationTimestamp")), _time(adjusted_at)
    if created is not None and last is not None and created < last:
        return None  # started before the last step down: the same incident
    current = config.start_rung()
    if reported:
        current = contract.lower(current, reported[-1].to)
    start = config.ladder_start()
    lower = contract.next_rung(current, start, checkpointing=contract.checkpointing_allowed(config.method))
    if lower is None:
        tried = [start, *(a.to for a in (*config.adjustments, *reported))]
        return Decision(None, f"{reason} at {contract.describe(current)}, the bottom of the out-of-memory ladder "
                        f"(tried: {'; '.join(dict.fromkeys(contract.describe(r) for r in tried))}); the next attempts will "
                        "run out of memory too: give the pod more memory (spec.resources) or use qlora", bottom=True)
    adjustment = Adjustment.model_validate({"step": step, "from": current.model_dump(by_alias=True),
                                            "to": lower.model_dump(by_alias=True), "reason": reason,
                                            "by": "operator"})
    return Decision(adjustment, f"{reason} at {contract.describe(current)}; the next pod starts at {contract.describe(lower)} "
                    "(the same examples per optimizer step)")


__all__ = ["ADJUSTED_AT_ANNOTATION", "OOM_KILLED", "OUT_OF_MEMORY", "Decision", "config_map_name", "decide", "killed_container"]
