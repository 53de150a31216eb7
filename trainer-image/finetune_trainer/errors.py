"""Failures the trainer reports with a reason and a distinct exit code.

A `TrainerFailure` is an expected failure (bad data, missing object, wrong credentials, missed gates): it
is reported in the progress report with its reason and the process exits with its code, which the Job's
podFailurePolicy maps to "fail the job now". Anything else is a crash (exit 1) and is retried.
"""

from __future__ import annotations

from finetune_operator.contract import EXIT_CONFIG_ERROR, EXIT_GATES_FAILED


class TrainerFailure(Exception):
    """An expected failure: `reason` is CamelCase, the message says what to fix."""

    exit_code = EXIT_CONFIG_ERROR

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class ConfigError(TrainerFailure):
    """The job cannot run as configured (spec, world, format)."""

    def __init__(self, message: str, reason: str = "InvalidConfig"):
        super().__init__(reason, message)


class DataError(TrainerFailure):
    """The data is unusable: malformed rows, unknown format, empty dataset."""

    def __init__(self, message: str, reason: str = "InvalidData"):
        super().__init__(reason, message)


class StorageError(TrainerFailure):
    """An object is missing, or access is denied: retrying will not help."""

    def __init__(self, message: str, reason: str = "StorageError"):
        super().__init__(reason, message)


class GatesFailed(TrainerFailure):
    """The fine-tuned model missed an evaluation gate."""

    exit_code = EXIT_GATES_FAILED

    def __init__(self, message: str):
        super().__init__("GatesFailed", message)


class OutOfMemory(TrainerFailure):
    """Out of memory with nothing left to try (`oom.py`): the message names every rung tried.

    `final` (the ladder's last rung failed): exit EXIT_CONFIG_ERROR, the job fails now, since a new pod
    would only try the same rungs. Otherwise (an OOM the trainer cannot step down from in-process: several
    processes, or after the first checkpoint) exit 1, so the Job's retry can start one rung lower.
    """

    def __init__(self, message: str, *, final: bool):
        super().__init__("OutOfMemory", message)
        self.exit_code = EXIT_CONFIG_ERROR if final else 1


class BudgetExceeded(TrainerFailure):
    """spec.budget.maxGpuHours reached: a checkpoint is saved and the job fails now (a retry would only
    spend more); a FineTuneJob with the same output.uri and a larger budget resumes from the checkpoint."""

    def __init__(self, message: str):
        super().__init__("BudgetExceeded", message)


class ExportCheckFailed(TrainerFailure):
    """The exported model does not compute what the trained one did (the saved adapter reloaded on the base,
    or merged/, against the trained model's logits beyond the tolerance): like GatesFailed, the files are
    uploaded for inspection but the output gets no completion marker."""

    def __init__(self, message: str):
        super().__init__("ExportCheckFailed", message)


class MergeUnsupported(TrainerFailure):
    """spec.output.saveMerged asked for a merge the streaming merge cannot make exactly (merge.py)."""

    def __init__(self, message: str):
        super().__init__("MergeUnsupported", message)
