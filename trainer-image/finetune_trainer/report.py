"""The progress channel: rank 0 keeps a `contract.TrainerReport` at `<output.uri>/status/report.json`.

Who writes: only the process of global rank 0 (`Reporter(enabled=accelerator.is_main_process)`).
When: at every phase change (starting -> training -> evaluating -> uploading -> complete, or failed), at
every logging step (every `log_every(total_steps)` optimizer steps: about 100 reports per run, every step
for runs of up to 100 steps), and after every complete checkpoint.
What: `jobUid` (the FineTuneJob's metadata.uid, from the config snapshot: the operator takes only its own
job's report); `phase`; `step`/`totalSteps`; `epoch` (fractional); latest `loss` (mean token loss of the logging
window), `evalLoss`, `learningRate`; `tokensPerSecond` (non-padding tokens, all processes together);
`etaSeconds`; `worldSize`; `resumedFromStep` (set when the run resumed from a checkpoint); `dataStats`
(`{trainExamples, validationExamples, skippedRows, truncatedExamples}`, once the data is read); `checkpoints`
(complete ones, newest last, each `{step, uri}`); `artifacts` (URIs by kind: model, merged, metrics,
evaluation, provenance, modelCard, lossChart, evaluationChart, tensorboard, retrieval, servingLLMInferenceService,
servingVllm); `export` (the export checks, `finetune_trainer.export`); `tracking` (the MLflow run and its last
failure, `finetune_trainer.tracking`); `evaluation` (base and fine-tuned scores; base as soon as it is
known); `adjustments` (out-of-memory adjustments, oldest first, each `{step, from, to, reason, by}` with
rungs `{microBatch, gradAccum, gradientCheckpointing}`: the config's, then the trainer's own, `oom.py`);
`error` (`{reason, message}` when the phase is failed; `OutOfMemory` names every rung tried); `updatedAt`
(RFC 3339).
How: the whole object is rewritten each time (JSON, camelCase keys), so readers never see a partial
update. Because it lives with the output, it survives pod, node and operator restarts; a restarted trainer
continues the same object (its `checkpoints` list is rebuilt from the complete checkpoints in storage).
Readers: the operator (status.progress, checkpoints, artifacts, evaluation, and the failure reason) and
`finetune run --local` (its progress bar).
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from typing import Any

from finetune_operator.contract import MAX_REPORT_CHECKPOINTS, REPORT_KEY, TrainerError, TrainerReport
from finetune_trainer.errors import TrainerFailure

log = logging.getLogger(__name__)


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def log_every(total_steps: int) -> int:
    """Optimizer steps between reports: every step up to 100 steps, then about 100 reports per run."""
    return max(1, math.ceil(total_steps / 100))


def read_report(store: Any) -> TrainerReport | None:
    """The report under `store` (a storage.Store at the output URI), or None when there is none yet."""
    if not store.exists(REPORT_KEY):
        return None
    return TrainerReport.model_validate(store.read_json(REPORT_KEY))


class Reporter:
    """Keeps the report object and writes it to the output store (only when `enabled`, i.e. on rank 0)."""

    def __init__(self, store: Any, *, enabled: bool, job_uid: str | None = None):
        self.store = store
        self.enabled = enabled
        self.report = TrainerReport(job_uid=job_uid, phase="starting", updated_at=now())

    @property
    def uri(self) -> str:
        return str(self.store.child(REPORT_KEY))

    def update(self, **fields: Any) -> None:
        """Change fields (snake_case names of TrainerReport) and write the report."""
        for name, value in fields.items():
            setattr(self.report, name, value)
        self.write()

    def phase(self, phase: str, **fields: Any) -> None:
        log.info("phase: %s", phase)
        self.update(phase=phase, **fields)

    def write(self) -> None:
        if not self.enabled:
            return
        self.report.updated_at = now()
        # Within the contract's cap (the operator ignores a longer list): complete checkpoints beyond
        # spec.checkpoint.keep only linger when pruning failed; the newest are the ones that matter.
        self.report.checkpoints = self.report.checkpoints[-MAX_REPORT_CHECKPOINTS:]
        self.store.write_json(REPORT_KEY, self.report.model_dump(by_alias=True, exclude_none=True, mode="json"))

    def fail(self, reason: str, message: str) -> None:
        """Record a failure; best effort (the storage may be what failed), never raises."""
        self.report.phase = "failed"
        self.report.error = TrainerError(reason=reason, message=message[:4000])
        try:
            self.write()
        except Exception as err:
            log.warning("could not write the failure report to %s: %s", self.uri, err)

    def fail_with(self, err: BaseException) -> None:
        if isinstance(err, TrainerFailure):
            self.fail(err.reason, err.message)
        else:
            self.fail("Crashed", f"{type(err).__name__}: {err}")
